"""`geokd eval` end to end on the tiny fine-tuned teacher (issue #4): metrics equal to the training
run's and to a plain-transformers re-computation, the JSON record, the run's eval/ file, the
geometry report against the loss library, `--seeds`, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from toyglue import options
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from typer.testing import CliRunner

from geokd.cli import app
from geokd.losses import cka, gram, procrustes

runner = CliRunner()


def _eval(*args: str):
    return runner.invoke(app, ["eval", "--quiet", *map(str, args)])


def test_eval_of_a_run_reproduces_its_dev_metrics_and_records_itself(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = _eval(teacher_dir, "--task", "sst2", "--data", glue_dir, "--json", out, "--batch-size", 5)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    trained = json.loads((teacher_dir / "results.json").read_text())
    assert record["task"] == "sst2" and record["split"] == "dev" and record["n_examples"] == 48
    assert record["metrics"] == pytest.approx(trained["metrics"], abs=1e-12)
    model = record["model"]
    assert model["run_dir"] == str(teacher_dir) and model["path_or_id"] == str(
        (teacher_dir / "final").resolve()
    )
    assert len(model["weights_sha256"]) == 64 and model["parameters"] > 0
    assert model["label_mapping"] == {"kind": "by_id", "model_to_task": [0, 1]}
    assert model["geokd_record"]["config"]["task"] == "sst2"
    assert record["data"]["fingerprint"].startswith("sha256:") and record["geokd_version"]
    assert record["elapsed_s"] > 0 and record["examples_per_s"] > 0
    assert record["warnings"] == [] and model["geokd_record"]["weights_sha256"] == model["weights_sha256"]
    # The run directory keeps its own copy, under eval/<task>-<split>.json.
    assert json.loads((teacher_dir / "eval" / "sst2-dev.json").read_text())["metrics"] == record["metrics"]


def test_eval_defaults_to_the_recorded_task_and_data_and_limits(teacher_dir):
    result = _eval(teacher_dir / "final", "--limit", 10, "--json", teacher_dir / "limited.json")
    assert result.exit_code == 0, result.output
    record = json.loads((teacher_dir / "limited.json").read_text())
    assert record["n_examples"] == 10 and record["data"]["limit"] == 10
    # A partial evaluation never takes the place of the full one inside the run.
    assert json.loads((teacher_dir / "eval" / "sst2-dev-first10.json").read_text())["n_examples"] == 10


def test_eval_accepts_a_single_file_and_a_renamed_label_order(teacher_dir, glue_dir, tmp_path):
    """A model whose head lists the labels in the other order, with names, is mapped by name: the
    metric is unchanged, although its raw output ids are swapped."""
    swapped = tmp_path / "swapped"
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir / "final")
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    model.config.label2id = {"POSITIVE": 0, "NEGATIVE": 1}
    model.save_pretrained(swapped)
    for name in os.listdir(teacher_dir / "final"):
        if name.startswith(("tokenizer", "vocab", "special")):
            (swapped / name).write_bytes((teacher_dir / "final" / name).read_bytes())
    result = _eval(swapped, "--task", "sst2", "--data", glue_dir / "dev.tsv", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s.json").read_text())
    trained = json.loads((teacher_dir / "results.json").read_text())
    assert record["model"]["label_mapping"] == {"kind": "by_name", "model_to_task": [1, 0]}
    assert record["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert record["data"]["source"].endswith("dev.tsv")


def test_eval_warns_when_the_weights_are_not_the_recorded_ones(teacher_dir, glue_dir, tmp_path):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(teacher_dir / "final", copy)
    model = AutoModelForSequenceClassification.from_pretrained(copy)
    with torch.no_grad():
        model.classifier.bias.add_(0.01)
    model.save_pretrained(copy)  # geokd.json stays: its weights_sha256 no longer matches
    result = _eval(copy, "--data", glue_dir, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    (warning,) = json.loads((tmp_path / "e.json").read_text())["warnings"]
    assert "changed after training" in warning and "warning:" in result.output


def _linear_cka(x, y) -> float:
    """Linear CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XXᵀ,
    L = YYᵀ, HSIC(K, L) = tr(K H L H) and H = I − 11ᵀ/n, in numpy float64."""
    import numpy as np

    h = np.eye(len(x)) - 1.0 / len(x)
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: float(np.trace(a @ h @ b @ h))  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_geometry_report_equals_the_loss_library_on_the_same_features(
    teacher_dir, base_dir, glue_dir, tmp_path
):
    from geokd import data as data_lib
    from geokd.models import extract_features
    from geokd.tasks import get_task

    out, plot = tmp_path / "geo.json", tmp_path / "geo.png"
    result = _eval(teacher_dir, "--teacher", base_dir, "--geometry", "--features", "mean", "--layers", "1:2,4:4",
                   "--json", out, "--plot", plot, "--epsilon", 0.2)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["geometry"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert report["n_examples"] == 48 and report["features"] == "mean" and report["epsilon"] == 0.2
    assert [(e["student_layer"], e["teacher_layer"]) for e in report["layer_pairs"]] == [(1, 2), (4, 4)]
    assert len(report["grid"]["procrustes"]) == 5 and len(report["grid"]["procrustes"][0]) == 5

    # Recompute independently: plain forward, one batch, the loss library in float64.
    dev = data_lib.load_split(get_task("sst2"), glue_dir, "dev")

    def rows(folder, cls=AutoModelForSequenceClassification):
        from transformers import BertTokenizer

        tokenizer = BertTokenizer.from_pretrained(folder)
        model = cls.from_pretrained(folder).eval()
        batch = data_lib.make_collate_fn(tokenizer, get_task("sst2"))(
            data_lib.tokenize_examples(dev, tokenizer)
        )
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"], output_hidden_states=True).hidden_states  # fmt: skip
        return extract_features(hidden, batch["attention_mask"], list(range(len(hidden))), "mean")

    student, teacher = rows(teacher_dir / "final"), rows(base_dir, BertForSequenceClassification)
    for entry in report["layer_pairs"]:
        s, t = student[entry["student_layer"]].double(), teacher[entry["teacher_layer"]].double()
        assert entry["procrustes"] == pytest.approx(float(procrustes(s, t)), abs=1e-6)
        assert entry["gram"] == pytest.approx(float(gram(s, t)), abs=1e-6)
        assert entry["cka_distance"] == pytest.approx(float(cka(s, t)), abs=1e-6)
        assert entry["cka_distance"] == pytest.approx(1.0 - _linear_cka(s.numpy(), t.numpy()), abs=1e-6)
        assert 0 <= entry["preserved_pairs"] <= entry["teacher_pairs"] <= 48 * 47 // 2
    # The model against itself: zero distances and every pair preserved.
    self_check = _eval(teacher_dir, "--teacher", teacher_dir, "--geometry", "--json", tmp_path / "self.json")
    assert self_check.exit_code == 0, self_check.output
    self_report = json.loads((tmp_path / "self.json").read_text())["geometry"]
    assert self_report["grid"] is None  # the all-layers grid is computed for --plot only
    for entry in self_report["layer_pairs"]:
        # Procrustes reads a few 1e-6 here: singular values below ~1e-6·σ_max count as zero.
        assert entry["procrustes"] < 1e-5 and entry["cka_distance"] < 1e-6
        assert entry["preserved_pairs"] == entry["teacher_pairs"]


def test_geometry_at_identical_rows_is_undefined_everywhere(teacher_dir, base_dir, tmp_path):
    """The [CLS] row of the embedding layer (hidden state 0) is the same for every example: there
    procrustes, gram and cka_distance are 0/0, so null with a note in the JSON (pairs and grid),
    `n/a` in the table and hatched in the plot; never 0 ("same geometry")."""
    out, plot = tmp_path / "geo.json", tmp_path / "geo.png"
    result = runner.invoke(app, ["eval", "--quiet", str(teacher_dir), "--teacher", str(base_dir), "--geometry",
                                 "--features", "cls", "--layers", "0:0,0:2,2:2", "--json", str(out),
                                 "--plot", str(plot)], env={"COLUMNS": "250"})  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["geometry"]
    both, student_only, defined = report["layer_pairs"]
    for entry in (both, student_only):
        assert [entry[k] for k in ("procrustes", "gram", "cka_distance")] == [None, None, None]
        assert "0/0" in entry["undefined"]
        assert entry["student_pairs"] == entry["preserved_pairs"] == 0  # no direction, no pair
    assert both["undefined"].startswith("student and teacher rows are identical")
    assert (
        student_only["undefined"].startswith("student rows are identical")
        and student_only["teacher_pairs"] > 0
    )
    assert defined["undefined"] is None and 0.0 < defined["cka_distance"] < 1.0
    assert "cka" not in defined and set(report["grid"]) >= {"procrustes", "gram", "cka_distance"}
    assert report["constant_layers"] == {"student": [0], "teacher": [0]}
    for name in ("procrustes", "gram", "cka_distance"):
        grid = report["grid"][name]
        assert grid[0] == [None] * 5 and [row[0] for row in grid] == [None] * 5
        assert all(value is not None for row in grid[1:] for value in row[1:])
        assert grid[2][2] == defined[name]
    table = result.output
    assert re.search(r"0\s*[│|]\s*0\s*[│|]\s*n/a\s*[│|]\s*n/a\s*[│|]\s*n/a\s*[│|]", table), table
    assert re.search(r"0\s*[│|]\s*2\s*[│|]\s*n/a\s*[│|]\s*n/a\s*[│|]\s*n/a\s*[│|]", table), table
    assert (
        "cka_distance" in table and "1 - linear CKA" in table and "n/a at 0:0: student and teacher" in table
    )
    assert f"{defined['cka_distance']:.4f}" in table
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_distill_over_seeds_writes_one_run_per_seed_and_the_comparison(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "seeds"
    args = ["distill", "--quiet", "--seeds", "3,1", *options(teacher=teacher_dir / "final", student="truncate:2",
            task="sst2", data=glue_dir, out=out, max_steps=3, batch_size=16)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for seed in (3, 1):
        assert (out / f"seed-{seed}" / "results.json").is_file()
        assert f"seed: {seed}" in (out / f"seed-{seed}" / "config.yaml").read_text()
    comparison = json.loads((out / "compare.json").read_text())
    (group,) = comparison["groups"]
    assert group["n"] == 2 and [r["seed"] for r in group["runs"]] == [3, 1]
    assert (out / "compare.png").is_file()
    # Resuming keeps finished seeds and only runs the new one.
    before = (out / "seed-3" / "results.json").stat().st_mtime_ns
    again = runner.invoke(app, [*args[:3], "3,1,2", *args[4:], "--resume", "auto"])
    assert again.exit_code == 0, again.output
    assert (out / "seed-3" / "results.json").stat().st_mtime_ns == before
    assert json.loads((out / "compare.json").read_text())["groups"][0]["n"] == 3
    # A used --out without --resume, and --seed with --seeds, are refused.
    assert runner.invoke(app, args).exit_code == 2
    clash = runner.invoke(app, [*args, "--seed", "5"])
    assert clash.exit_code == 2 and "contradict" in clash.output


def test_seeds_with_finetune_teacher_share_one_teacher(base_dir, glue_dir, tmp_path):
    import yaml

    out = tmp_path / "ft"
    result = runner.invoke(app, ["distill", "--quiet", "--seeds", "1,2", "--finetune-teacher",
                                 *options(teacher=base_dir, student="truncate:2", task="sst2", data=glue_dir,
                                          out=out, max_steps=2, batch_size=16)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "teacher" / "final" / "config.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "compare.json",
        "compare.png",
        "seed-1",
        "seed-2",
        "teacher",
    ]
    for seed in (1, 2):
        config = yaml.safe_load((out / f"seed-{seed}" / "config.yaml").read_text())
        assert config["teacher"] == str(out / "teacher" / "final") and config["seed"] == seed
        assert not (out / f"seed-{seed}" / "teacher").exists()


def _one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def test_bad_inputs_are_one_line_errors(teacher_dir, base_dir, glue_dir, tmp_path, monkeypatch):
    # A model without a task head.
    _one_line_error(_eval(base_dir, "--task", "sst2", "--data", glue_dir), "has no trained task head")
    # A 2-label model on STS-B (a regression task).
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    (stsb / "dev.tsv").write_text("sentence1\tsentence2\tscore\ngood\tbad\t2.5\n")
    _one_line_error(
        _eval(teacher_dir, "--task", "stsb", "--data", stsb), "is a regression (one output score)"
    )
    # An empty split.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dev.tsv").write_text("sentence\tlabel\n")
    _one_line_error(_eval(teacher_dir, "--task", "sst2", "--data", empty), "has no data rows (empty split)")
    # An unreadable file (as root, chmod 0 does not stop reads: geokd.data's open refuses it instead).
    locked = tmp_path / "locked.tsv"
    locked.write_text("sentence\tlabel\ngood\t1\n")
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        import builtins

        import geokd.data

        def refuse(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return builtins.open(path, *args, **kwargs)

        monkeypatch.setattr(geokd.data, "open", refuse, raising=False)
    _one_line_error(
        _eval(teacher_dir, "--task", "sst2", "--data", locked), "cannot read the file (Permission denied)"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--geometry"], "--geometry and --teacher go together"),
        (["--layers", "last"], "--layers only apply to the geometry report"),
        (["--plot", "x.png"], "--plot draws the geometry report"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--max-length", "4096"], "exceeds the model's 128 positions"),
        (["--split", "test"], "has no split 'test'"),
        (["--task", "rte"], "are not the labels of task 'rte'"),
        (["--teacher", "{base}", "--geometry", "--features", "tokens"], "takes cls or mean"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_bad_options_are_one_line_errors(teacher_dir, base_dir, args, fragment):
    args = [a.format(base=base_dir) for a in args]
    _one_line_error(_eval(teacher_dir, *args), fragment)


def test_eval_of_an_unfinished_run_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("mode: finetune\n")
    _one_line_error(_eval(run, "--task", "sst2"), "has not finished")


def test_without_a_terminal_errors_are_exactly_one_line_and_progress_is_plain_lines(
    teacher_dir, base_dir, glue_dir, tmp_path
):
    """No --quiet: a progress display must not add lines around an error, and training still
    reports progress as plain lines when stderr is not a terminal (a log file, CI)."""
    failed = runner.invoke(app, ["eval", str(base_dir), "--task", "sst2", "--data", str(glue_dir)])
    assert failed.exit_code == 2 and len(failed.output.splitlines()) == 1, failed.output
    failed = runner.invoke(app, ["finetune", *options(model=base_dir, task="sst2", data=tmp_path / "none",
                                                      out=tmp_path / "x")])  # fmt: skip
    assert failed.exit_code == 2 and len(failed.output.splitlines()) == 1, failed.output
    done = runner.invoke(app, ["finetune", *options(model=base_dir, task="sst2", data=glue_dir, out=tmp_path / "r",
                                                    max_steps=4, batch_size=16)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert [line.split()[:3] for line in done.output.splitlines() if line.startswith("finetune step")] == [
        ["finetune", "step", f"{k}/4"] for k in (1, 2, 3, 4)
    ]
