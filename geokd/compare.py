"""`geokd compare`: group finished runs by configuration (everything but the seed), and test every
group against a baseline with honest statistics (issue #4).

Inputs are run directories (`results.json` + `config.yaml`; a directory of `seed-K/` runs, as
`--seeds` writes, stands for all of them) or `geokd eval --json` files of models trained by geokd.
All must be scored on the same task and split, and each run may appear once.
For each group: n, mean and sample standard deviation (ddof = 1) of the metric. Against the
baseline group:

* Welch's t-test (`scipy.stats.ttest_ind(equal_var=False)`): two-sided p-value, t and the
  Welch–Satterthwaite degrees of freedom. Needs 2 or more runs on each side.
* The paired t-test (`scipy.stats.ttest_rel`) when both groups ran exactly the same seeds (at
  least two, none repeated): a seed fixes the data order and the student initialisation on both
  sides, so pairing removes that share of the variance. A partial overlap is compared as
  independent samples, with a note.
* A bootstrap 95% confidence interval of the difference of means (`scipy.stats.bootstrap`,
  percentile method, 10,000 resamples, fixed generator): of the paired differences when paired,
  else of the two independent samples. With 3 seeds a bootstrap interval is rough: it cannot be
  wider than the spread of the data; read it next to the t-tests.

A group with fewer than 2 runs gets its mean and a note saying what cannot be computed. Degenerate
cases (zero variance on both sides, constant paired differences) give `None` with a note, never a
NaN or a warning.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geokd.errors import GeokdError

# Config keys that say how a run was executed, not what was trained: never a reason to split groups.
IGNORED_KEYS = ("seed", "out", "resume", "device", "eval_every", "save_every")
N_RESAMPLES = 10_000
SMALL_SAMPLE = 5  # below this many runs a side, the bootstrap interval gets a caveat note
CONFIDENCE = 0.95


@dataclass(frozen=True)
class RunResult:
    """One finished run: where it is (`identity`: the run directory, also for an eval JSON of a
    run's model), its config (as saved), seed, task, what it was scored on, and its metrics."""

    path: str
    identity: str
    config: dict[str, Any]
    seed: int | None
    task: str
    split: str
    metrics: dict[str, float]


@dataclass
class Group:
    label: str
    key: tuple[tuple[str, str], ...]
    runs: list[RunResult] = field(default_factory=list)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GeokdError(
            f"compare: {str(path)!r} is not text; pass run directories or files written by geokd eval --json"
        ) from None
    except OSError as exc:
        raise GeokdError(f"compare: cannot read {str(path)!r} ({exc.strerror}); check the path") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise GeokdError(
            f"compare: {str(path)!r} is not valid JSON ({exc.msg}); pass run directories or files written by "
            "geokd eval --json"
        ) from None
    if not isinstance(data, dict):
        raise GeokdError(f"compare: {str(path)!r} does not hold a JSON object")
    return data


def _check_result(data: dict[str, Any], where: str) -> None:
    metrics = data.get("metrics")
    if not isinstance(data.get("task"), str) or not isinstance(metrics, dict) or not metrics:
        raise GeokdError(
            f"compare: {where} has no task and metrics; pass run directories written by geokd finetune/distill "
            "or files written by geokd eval --json"
        )
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise GeokdError(f"compare: {where}: metric {bad[0]!r} is not a number ({metrics[bad[0]]!r})")


def _read_config(config_file: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(_read_text(config_file))
    except yaml.YAMLError as exc:
        raise GeokdError(
            f"compare: {str(config_file)!r} is not valid YAML ({type(exc).__name__}); the run is damaged"
        ) from None
    if not isinstance(config, dict):
        raise GeokdError(f"compare: {str(config_file)!r} does not hold a mapping; the run is damaged")
    return config


def load_run(path: str | Path) -> RunResult:
    """Read one run directory (results.json + config.yaml) or one `geokd eval --json` file.

    The config is always the run's `config.yaml` (what was asked for) when the run directory is at
    hand, so a run and an eval of its model group alike; an eval JSON of a model whose run
    directory is gone falls back to the config recorded in the model's geokd.json. The split of an
    eval JSON names its `--limit` too (`dev[:10]`), so partial scores never pool with full ones."""
    target = Path(path)
    if target.is_file():
        data = _read_json(target)
        _check_result(data, repr(str(target)))
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        run_dir = model.get("run_dir")
        record = model.get("geokd_record") if isinstance(model.get("geokd_record"), dict) else {}
        if isinstance(run_dir, str) and (Path(run_dir) / "config.yaml").is_file():
            config, identity = _read_config(Path(run_dir) / "config.yaml"), str(Path(run_dir).resolve())
        elif isinstance(record.get("config"), dict):
            config, identity = record["config"], str(target.resolve())
        else:
            raise GeokdError(
                f"compare: {str(target)!r} evaluates a model geokd did not train (no recorded config), so it "
                "cannot be grouped; pass run directories instead"
            )
        split = str(data.get("split", ""))
        limit = (data.get("data") or {}).get("limit") if isinstance(data.get("data"), dict) else None
        if limit:
            split += f"[:{limit}]"
    elif target.is_dir():
        results, config_file = target / "results.json", target / "config.yaml"
        if not results.is_file() or not config_file.is_file():
            missing = "results.json" if not results.is_file() else "config.yaml"
            raise GeokdError(
                f"compare: {str(target)!r} is not a finished run (no {missing}); pass run directories of "
                "finished geokd finetune/distill runs"
            )
        data = _read_json(results)
        _check_result(data, repr(str(results)))
        config, identity = _read_config(config_file), str(target.resolve())
        split = str(data.get("split", ""))
    else:
        raise GeokdError(f"compare: no such run directory or file: {str(target)!r}; check the path")
    seed = config.get("seed")
    return RunResult(
        path=str(target),
        identity=identity,
        config=config,
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        task=str(data["task"]),
        split=split,
        metrics={k: float(v) for k, v in data["metrics"].items()},
    )


def expand_paths(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Each argument as given, except a directory that is not itself a run but holds `seed-K/`
    runs (what `--seeds` writes), which stands for its finished seed runs in seed order. Returns
    the paths and notes on unfinished seed runs left out."""
    expanded: list[Path] = []
    notes: list[str] = []
    for given in paths:
        path = Path(given)
        seed_dirs = [p for p in path.glob("seed-*") if p.is_dir()] if path.is_dir() else []
        if path.is_dir() and not (path / "results.json").is_file() and seed_dirs:
            seed_dirs.sort(key=lambda p: (len(p.name), p.name))
            finished = [p for p in seed_dirs if (p / "results.json").is_file()]
            unfinished = [p.name for p in seed_dirs if p not in finished]
            if unfinished:
                notes.append(f"{str(path)!r}: left out unfinished {', '.join(unfinished)} (no results.json)")
            expanded.extend(finished)
        else:
            expanded.append(path)
    return expanded, notes


def _short(value: Any, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def group_runs(runs: list[RunResult]) -> list[Group]:
    """Group runs whose configs agree on everything but IGNORED_KEYS, in order of first appearance;
    each group's label names the keys in which the groups differ (`loss=procrustes`)."""
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for run in runs:
        key = tuple(
            sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.config.items() if k not in IGNORED_KEYS)
        )
        groups.setdefault(key, Group(label="", key=key)).runs.append(run)
    ordered = list(groups.values())
    varying = sorted({k for g in ordered for k, v in g.key if any(dict(o.key).get(k) != v for o in ordered)})
    for group in ordered:
        values = dict(group.key)
        parts = [f"{k}={_short(json.loads(values[k])) if k in values else '-'}" for k in varying]
        group.label = ", ".join(parts) if parts else "all runs"
    seen: dict[str, int] = {}
    for group in ordered:  # shortened values can collide: number the repeats
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label += f" (#{seen[group.label]})"
    return ordered


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def welch_test(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Welch's two-sided t-test of mean(a) − mean(b): t, degrees of freedom, p (None if undefined)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"t": None, "df": None, "p": None}
    var_a, var_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    if var_a + var_b == 0:
        return {"t": None, "df": None, "p": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return {
        "t": _finite_or_none(result.statistic),
        "df": _finite_or_none(df),
        "p": _finite_or_none(result.pvalue),
    }


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """The paired two-sided t-test of a − b (rows paired by position): t, df = n − 1, p."""
    from scipy import stats

    diff = a - b
    if len(diff) < 2 or np.ptp(diff) == 0:
        return {"t": None, "df": None, "p": None}
    result = stats.ttest_rel(a, b)
    return {
        "t": _finite_or_none(result.statistic),
        "df": float(len(diff) - 1),
        "p": _finite_or_none(result.pvalue),
    }


def bootstrap_ci(a: np.ndarray, b: np.ndarray, paired: bool, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap 95% CI of mean(a) − mean(b) (`scipy.stats.bootstrap`): resampling the
    paired differences when `paired`, else each sample independently. None with fewer than 2 values
    on a side."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    params = inspect.signature(stats.bootstrap).parameters
    generator = np.random.default_rng(seed)
    rng = {"rng": generator} if "rng" in params else {"random_state": generator}
    common = {"confidence_level": CONFIDENCE, "n_resamples": N_RESAMPLES, "method": "percentile", **rng}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) resamples are fine for percentiles
        if paired:
            result = stats.bootstrap((a - b,), np.mean, vectorized=True, axis=-1, **common)
        else:

            def difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
                return np.mean(x, axis=axis) - np.mean(y, axis=axis)

            result = stats.bootstrap((a, b), difference, vectorized=True, axis=-1, **common)
    low, high = result.confidence_interval
    return float(low), float(high)


def compare_generations(model: str | Path, baseline: str | Path, metric: str = "rouge_l") -> dict[str, Any] | None:
    """Paired comparison of two `*.generations.jsonl` files of `geokd eval --task instruct` over
    the prompts both scored (greedy: one row per example): n, the mean of model − baseline, its
    percentile-bootstrap 95% CI, the paired t-test p and the Wilcoxon signed-rank p. None when a
    file is missing or fewer than two prompts are shared."""
    scores = []
    for path in (Path(model), Path(baseline)):
        if not path.is_file():
            return None
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        scores.append({(r["example_id"], r.get("seed")): float(r[metric]) for r in rows})
    shared = sorted(set(scores[0]) & set(scores[1]), key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    if len(shared) < 2:
        return None
    return paired_items(np.array([scores[0][key] for key in shared]), np.array([scores[1][key] for key in shared]))


def paired_items(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Two scores of the same items (prompts): n, the mean of a − b, its percentile-bootstrap 95% CI,
    the paired t-test p and the Wilcoxon signed-rank p (None when every pair is equal)."""
    from scipy import stats

    wilcoxon = float(stats.wilcoxon(a, b).pvalue) if np.any(a != b) else None
    return {"n": len(a), "difference": float(np.mean(a - b)), "ci95": bootstrap_ci(a, b, paired=True),
            "p_paired_t": paired_test(a, b)["p"], "p_wilcoxon": wilcoxon}  # fmt: skip


def _pick_metric(runs: list[RunResult], metric: str | None) -> str:
    from geokd.tasks import GLUE_TASKS

    if metric is None:
        spec = GLUE_TASKS.get(runs[0].task)
        if spec is not None:
            metric = spec.primary_metric
        elif runs[0].task == "instruct":  # generation quality when scored, else dev perplexity
            metric = "rouge_l" if all("rouge_l" in r.metrics for r in runs) else "perplexity"
        else:
            metric = next(iter(runs[0].metrics))
    lacking = [r for r in runs if metric not in r.metrics]
    if lacking:
        shared = sorted(set.intersection(*(set(r.metrics) for r in runs)))
        raise GeokdError(
            f"--metric: {metric!r} is not among the metrics of {lacking[0].path!r} "
            f"({', '.join(sorted(lacking[0].metrics))}); pass --metric with one of {', '.join(shared) or 'none'}"
        )
    return metric


def _pick_baseline(groups: list[Group], baseline: str | None) -> Group:
    if baseline is None:
        return groups[0]
    exact = [g for g in groups if g.label == baseline]
    if exact:
        return exact[0]
    partial = [
        g for g in groups if baseline in [p.strip() for p in g.label.split(",")] or baseline in g.label
    ]
    if len(partial) == 1:
        return partial[0]
    labels = "; ".join(g.label for g in groups)
    what = "matches no group" if not partial else f"matches {len(partial)} groups"
    raise GeokdError(f"--baseline: {baseline!r} {what}; choose one of the group labels: {labels}")


def compare_runs(paths: list[str], metric: str | None = None, baseline: str | None = None) -> dict[str, Any]:
    """Load, group and compare runs; returns the JSON-ready comparison (see the module docstring)."""
    if not paths:
        raise GeokdError("compare: no runs given; pass two or more run directories")
    expanded, notes = expand_paths(paths)
    if not expanded:
        raise GeokdError(
            f"compare: no finished runs in {', '.join(map(repr, paths))}; wait for a run to finish"
        )
    runs = [load_run(p) for p in expanded]
    first_seen: dict[str, RunResult] = {}
    for run in runs:
        if run.identity in first_seen:
            raise GeokdError(
                f"compare: {run.path!r} and {first_seen[run.identity].path!r} are the same run; pass each run once"
            )
        first_seen[run.identity] = run
    for what, values in (("tasks", {r.task for r in runs}), ("splits", {r.split for r in runs})):
        if len(values) > 1:
            raise GeokdError(
                f"compare: the runs are scored on different {what} ({', '.join(sorted(values))}); compare runs "
                f"scored on the same {what[:-1]}"
            )
    metric = _pick_metric(runs, metric)
    groups = group_runs(runs)
    base = _pick_baseline(groups, baseline)
    rows = []
    for group in groups:
        values = np.asarray([r.metrics[metric] for r in group.runs], dtype=np.float64)
        entry: dict[str, Any] = {
            "label": group.label,
            "config": {k: json.loads(v) for k, v in group.key},
            "runs": [{"path": r.path, "seed": r.seed, "value": r.metrics[metric]} for r in group.runs],
            "n": len(values),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) >= 2 else None,
            "is_baseline": group is base,
            "vs_baseline": None,
        }
        if len(values) < 2:
            notes.append(
                f"group {group.label!r} has {len(values)} run: no standard deviation, t-test or interval for it; "
                "run more seeds (--seeds 1,2,3)"
            )
        if group is not base:
            entry["vs_baseline"] = _versus(group, base, metric, notes)
        rows.append(entry)
    return {
        "task": runs[0].task,
        "split": runs[0].split,
        "metric": metric,
        "baseline": base.label,
        "groups": rows,
        "notes": notes,
        "method": {
            "std": "sample standard deviation (ddof=1)",
            "welch": "scipy.stats.ttest_ind(equal_var=False), two-sided",
            "paired": "scipy.stats.ttest_rel over common seeds, two-sided",
            "ci": f"scipy.stats.bootstrap percentile, {N_RESAMPLES} resamples, {CONFIDENCE:.0%}, seed 0",
        },
    }


def _seed_values(group: Group, metric: str) -> dict[int, float] | None:
    """seed -> value when every run of the group has a seed and no seed repeats, else None."""
    seeds = [r.seed for r in group.runs]
    if any(seed is None for seed in seeds) or len(set(seeds)) != len(seeds):
        return None
    return {r.seed: r.metrics[metric] for r in group.runs if r.seed is not None}


def _versus(group: Group, base: Group, metric: str, notes: list[str]) -> dict[str, Any]:
    """The group against the baseline. The paired test and a paired interval apply when both groups
    ran exactly the same seeds (at least two, none repeated); otherwise the samples are treated
    as independent, and a partial overlap is noted rather than used."""
    a = np.asarray([r.metrics[metric] for r in group.runs], dtype=np.float64)
    b = np.asarray([r.metrics[metric] for r in base.runs], dtype=np.float64)
    seeds_a, seeds_b = _seed_values(group, metric), _seed_values(base, metric)
    paired = (
        seeds_a is not None and seeds_b is not None and set(seeds_a) == set(seeds_b) and len(seeds_a) >= 2
    )
    welch = welch_test(a, b)
    result: dict[str, Any] = {
        "difference": float(a.mean() - b.mean()),
        "welch": welch,
        "paired": None,
        "ci95": None,
        "ci_paired": paired,
    }
    if len(a) >= 2 and len(b) >= 2 and welch["p"] is None:
        notes.append(f"{group.label!r} vs {base.label!r}: no variance on either side, so no Welch t-test")
    if paired:
        assert seeds_a is not None and seeds_b is not None
        common = sorted(seeds_a)
        pa = np.asarray([seeds_a[s] for s in common])
        pb = np.asarray([seeds_b[s] for s in common])
        result["paired"] = {**paired_test(pa, pb), "n_pairs": len(common), "seeds": common}
        if result["paired"]["p"] is None:
            notes.append(
                f"{group.label!r} vs {base.label!r}: the paired differences are constant, so no paired test"
            )
        ci = bootstrap_ci(pa, pb, paired=True)
    else:
        if seeds_a and seeds_b and set(seeds_a) & set(seeds_b):
            notes.append(
                f"{group.label!r} vs {base.label!r}: the groups ran different seed sets, so no paired test; "
                "compared as independent samples"
            )
        ci = bootstrap_ci(a, b, paired=False)
    result["ci95"] = list(ci) if ci is not None else None
    smallest = len(pa) if paired else min(len(a), len(b))
    if ci is not None and smallest < SMALL_SAMPLE:
        notes.append(
            f"{group.label!r} vs {base.label!r}: with {smallest} runs a side the bootstrap interval cannot be wider "
            "than the observed spread (it excludes 0 whenever every difference has one sign); read it next to the "
            "t-tests, or run more seeds"
        )
    return result


def plot_comparison(comparison: dict[str, Any], path: str | Path) -> None:
    """Per-seed points and the mean ± std of every group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = comparison["groups"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.5))
    jitter = np.random.default_rng(0)
    for x, group in enumerate(groups):
        values = [r["value"] for r in group["runs"]]
        xs = x + jitter.uniform(-0.12, 0.12, len(values))
        ax.scatter(
            xs, values, color="tab:blue" if not group["is_baseline"] else "tab:gray", alpha=0.7, zorder=3
        )
        for xi, run in zip(xs, group["runs"], strict=True):
            if run["seed"] is not None:
                ax.annotate(
                    str(run["seed"]),
                    (xi, run["value"]),
                    fontsize=7,
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                )
        ax.errorbar(
            x + 0.3, group["mean"], yerr=group["std"] or 0.0, fmt="D", color="black", capsize=4, zorder=4
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [g["label"] + (" (baseline)" if g["is_baseline"] else "") for g in groups],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(comparison["metric"])
    ax.set_title(
        f"{comparison['task']}: {comparison['metric']} per seed (points, labelled by seed), mean ± std (◆)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
