"""geokd compare on synthetic run directories with known statistics (issue #4): grouping, mean and
sample std, Welch and paired t-tests against textbook formulas, the bootstrap interval, notes for
small groups, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from geokd import GeokdError
from geokd.cli import app
from geokd.compare import bootstrap_ci, compare_runs, paired_test, welch_test

runner = CliRunner()


def _run(root: Path, name: str, value: float, seed: int, task: str = "rte", **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"mode": "distill", "task": task, "loss": "procrustes", "lr": 5e-5, "seed": seed,
           "out": str(run), "device": "auto", "resume": None, **config}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"accuracy": value} if task == "rte" else {"f1": value, "accuracy": value - 0.05}
    (run / "results.json").write_text(json.dumps({"task": task, "split": "dev", "metrics": metrics}))
    return run


BASE = [0.60, 0.62, 0.65, 0.61]
GEOM = [0.63, 0.66, 0.66, 0.64]


@pytest.fixture
def runs(tmp_path) -> list[str]:
    paths = [_run(tmp_path, f"proj-{s}", v, s, loss="proj") for s, v in zip((1, 2, 3, 4), BASE, strict=True)]
    paths += [_run(tmp_path, f"proc-{s}", v, s) for s, v in zip((1, 2, 3, 4), GEOM, strict=True)]
    return [str(p) for p in paths]


def _welch_reference(a, b):
    """Welch's t-test from its definition: t, Welch–Satterthwaite df, two-sided p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, 2 * stats.t.sf(abs(t), df)


def _paired_reference(a, b):
    d = np.asarray(a) - np.asarray(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return t, len(d) - 1, 2 * stats.t.sf(abs(t), len(d) - 1)


def test_groups_means_stds_and_tests_match_the_definitions(runs):
    result = compare_runs(runs)
    assert result["task"] == "rte" and result["metric"] == "accuracy"  # RTE's primary metric
    base, geom = result["groups"]
    assert base["label"] == "loss=proj" and base["is_baseline"] and result["baseline"] == "loss=proj"
    assert geom["label"] == "loss=procrustes" and geom["n"] == 4
    assert geom["mean"] == pytest.approx(np.mean(GEOM), abs=1e-12)
    assert geom["std"] == pytest.approx(np.std(GEOM, ddof=1), abs=1e-12)
    versus = geom["vs_baseline"]
    assert versus["difference"] == pytest.approx(np.mean(GEOM) - np.mean(BASE), abs=1e-12)
    t, df, p = _welch_reference(GEOM, BASE)
    assert versus["welch"]["t"] == pytest.approx(t, rel=1e-10)
    assert versus["welch"]["df"] == pytest.approx(df, rel=1e-10)
    assert versus["welch"]["p"] == pytest.approx(p, rel=1e-8)
    t, df, p = _paired_reference(GEOM, BASE)  # seeds 1..4 on both sides
    assert versus["paired"]["seeds"] == [1, 2, 3, 4] and versus["paired"]["n_pairs"] == 4
    assert versus["paired"]["t"] == pytest.approx(t, rel=1e-10)
    assert versus["paired"]["p"] == pytest.approx(p, rel=1e-8)
    low, high = versus["ci95"]
    diffs = np.subtract(GEOM, BASE)
    assert versus["ci_paired"] and diffs.min() <= low <= diffs.mean() <= high <= diffs.max()
    assert base["vs_baseline"] is None
    (note,) = result["notes"]  # 4 seeds: the bootstrap interval gets its small-sample caveat
    assert "cannot be wider than the observed spread" in note


def test_paired_test_needs_matching_seeds(tmp_path):
    a = [_run(tmp_path, f"a{s}", v, s, loss="proj") for s, v in ((1, 0.6), (2, 0.7), (3, 0.65))]
    b = [_run(tmp_path, f"b{s}", v, s) for s, v in ((7, 0.61), (8, 0.72), (9, 0.7))]
    versus = compare_runs([str(p) for p in a + b])["groups"][1]["vs_baseline"]
    assert versus["paired"] is None and not versus["ci_paired"]
    assert versus["welch"]["p"] == pytest.approx(_welch_reference([0.61, 0.72, 0.7], [0.6, 0.7, 0.65])[2])
    low, high = versus["ci95"]  # independent resampling: within the extreme differences of means
    assert -0.1 <= low <= versus["difference"] <= high <= 0.12


def test_bootstrap_interval_against_a_numpy_percentile_bootstrap():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
    low, high = bootstrap_ci(a, b, paired=False)
    draws = np.random.default_rng(1)
    boots = [draws.choice(a, 30).mean() - draws.choice(b, 30).mean() for _ in range(20_000)]
    ref_low, ref_high = np.percentile(boots, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.05) and high == pytest.approx(ref_high, abs=0.05)
    # A constant paired difference has a zero-width interval at that difference.
    assert bootstrap_ci(np.array([0.5, 0.6, 0.7]), np.array([0.4, 0.5, 0.6]), paired=True) == pytest.approx(
        (0.1, 0.1)
    )
    assert bootstrap_ci(np.array([0.5]), np.array([0.4, 0.5]), paired=False) is None


def test_degenerate_statistics_are_none_not_nan():
    same = np.array([0.5, 0.5, 0.5])
    assert welch_test(same, same) == {"t": None, "df": None, "p": None}
    assert welch_test(np.array([0.5]), same)["p"] is None
    assert paired_test(np.array([0.6, 0.7]), np.array([0.5, 0.6]))["p"] is None  # constant difference


def test_partial_seed_overlap_is_compared_as_independent_samples(tmp_path):
    base = [
        _run(tmp_path, f"a{s}", v, s, loss="proj")
        for s, v in zip((1, 2, 3, 4), (0.6, 0.61, 0.7, 0.71), strict=True)
    ]
    other = [_run(tmp_path, f"b{s}", v, s) for s, v in zip((1, 2, 9), (0.62, 0.63, 0.70), strict=True)]
    result = compare_runs([str(p) for p in base + other])
    versus = result["groups"][1]["vs_baseline"]
    assert versus["paired"] is None and versus["ci_paired"] is False
    low, high = versus["ci95"]
    assert low < versus["difference"] < high  # the interval is about the difference in the table
    assert any("different seed sets" in note for note in result["notes"])


def test_the_same_run_twice_and_mixed_splits_are_refused(tmp_path):
    run = _run(tmp_path, "a", 0.6, 1)
    with pytest.raises(GeokdError, match="are the same run"):
        compare_runs([str(run), str(tmp_path / "." / "a")])
    # An eval JSON of the run's model is the same run, too.
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"task": "rte", "split": "dev", "metrics": {"accuracy": 0.6},
                                     "model": {"run_dir": str(run)}, "data": {"limit": None}}))  # fmt: skip
    with pytest.raises(GeokdError, match="are the same run"):
        compare_runs([str(run), str(eval_json)])
    limited = tmp_path / "limited.json"
    limited.write_text(json.dumps({"task": "rte", "split": "dev", "metrics": {"accuracy": 0.6},
                                   "model": {"run_dir": str(_run(tmp_path, "b", 0.6, 2))}, "data": {"limit": 10}}))  # fmt: skip
    with pytest.raises(GeokdError, match=r"different splits \(dev, dev\[:10\]\)"):
        compare_runs([str(run), str(limited)])


def test_files_that_are_not_results_are_one_line_errors(tmp_path):
    png = tmp_path / "compare.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(GeokdError, match="is not text"):
        compare_runs([str(png)])
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"task": "rte", "metrics": {"accuracy": 0.5}, "model": "x"}))
    with pytest.raises(GeokdError, match="did not train"):
        compare_runs([str(odd)])


def test_single_run_groups_get_a_note_and_no_statistics(tmp_path):
    runs = [
        _run(tmp_path, "a", 0.6, 1, loss="proj"),
        _run(tmp_path, "b", 0.7, 1),
        _run(tmp_path, "c", 0.72, 2),
    ]
    result = compare_runs([str(r) for r in runs])
    base, other = result["groups"]
    assert base["std"] is None and base["n"] == 1
    assert other["vs_baseline"]["welch"]["p"] is None and other["vs_baseline"]["ci95"] is None
    assert any("'loss=proj' has 1 run" in note for note in result["notes"])


def test_unfinished_seed_runs_are_left_out_with_a_note(tmp_path):
    for s in (1, 2):
        _run(tmp_path / "g", f"seed-{s}", 0.5 + s / 100, s)
    (tmp_path / "g" / "seed-3").mkdir()
    result = compare_runs([str(tmp_path / "g")])
    assert result["groups"][0]["n"] == 2 and any("unfinished seed-3" in n for n in result["notes"])


def test_seed_directories_expand_and_baseline_and_metric_can_be_chosen(tmp_path):
    for s, v in zip((1, 2, 3), (0.80, 0.82, 0.81), strict=True):
        _run(tmp_path / "gram", f"seed-{s}", v, s, task="mrpc", loss="gram")
        _run(tmp_path / "cka", f"seed-{s}", v - 0.02, s, task="mrpc", loss="cka")
    result = compare_runs(
        [str(tmp_path / "gram"), str(tmp_path / "cka")], baseline="loss=cka", metric="accuracy"
    )
    assert result["metric"] == "accuracy" and result["baseline"] == "loss=cka"
    gram_group = result["groups"][0]
    assert [r["seed"] for r in gram_group["runs"]] == [1, 2, 3]
    assert gram_group["vs_baseline"]["difference"] == pytest.approx(0.02)
    assert compare_runs([str(tmp_path / "gram")])["metric"] == "f1"  # MRPC's primary metric
    assert compare_runs([str(tmp_path / "gram")])["groups"][0]["label"] == "all runs"


@pytest.mark.parametrize(
    ("make", "kwargs", "fragment"),
    [
        (lambda root: [root / "missing"], {}, "no such run directory"),
        (lambda root: [root], {}, "not a finished run (no results.json)"),
        (lambda root: [_run(root, "a", 0.5, 1), _run(root, "b", 0.5, 1, task="mrpc")], {}, "different tasks"),
        (lambda root: [_run(root, "a", 0.5, 1)], {"metric": "f1"}, "--metric: 'f1'"),
        (
            lambda root: [_run(root, "a", 0.5, 1)],
            {"baseline": "loss=gram"},
            "--baseline: 'loss=gram' matches no",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, make, kwargs, fragment):
    with pytest.raises(GeokdError) as info:
        compare_runs([str(p) for p in make(tmp_path)], **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_prints_the_table_and_writes_json_and_plot(runs, tmp_path, monkeypatch):
    import geokd.cli

    monkeypatch.setattr(geokd.cli.console, "width", 200)  # one table row per line
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", *runs, "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "loss=procrustes" in result.output and "Welch p" in result.output
    assert json.loads(out_json.read_text())["groups"][1]["n"] == 4
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, ["compare", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such run directory" in bad.output


def test_compare_generations_pairs_prompts_and_matches_scipy(tmp_path):
    import json as _json

    import numpy as _np
    from scipy import stats as _stats

    from geokd.compare import compare_generations

    rng = _np.random.default_rng(0)
    base = rng.uniform(0, 40, size=30)
    model = base + rng.normal(1.0, 2.0, size=30)
    for name, values, ids in (("m", model, range(30)), ("b", base, reversed(range(31)))):
        rows = [{"example_id": i, "seed": None, "rouge_l": float(values[i]) if i < 30 else 99.0} for i in ids]
        (tmp_path / f"{name}.generations.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    found = compare_generations(tmp_path / "m.generations.jsonl", tmp_path / "b.generations.jsonl")
    assert found["n"] == 30  # example 30 is only in the baseline: not paired
    assert found["difference"] == pytest.approx(float(_np.mean(model - base)), rel=1e-12)
    assert found["p_paired_t"] == pytest.approx(float(_stats.ttest_rel(model, base).pvalue), rel=1e-12)
    assert found["p_wilcoxon"] == pytest.approx(float(_stats.wilcoxon(model, base).pvalue), rel=1e-12)
    low, high = found["ci95"]
    assert low < found["difference"] < high
    assert compare_generations(tmp_path / "missing.jsonl", tmp_path / "b.generations.jsonl") is None
