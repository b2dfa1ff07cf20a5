"""Token-level KD: peak memory and wall time of the chunked form against the naive form (issue #11).

The whole KD term is measured, from final hidden states to the loss to the backward gradients,
for forward KL at SmolLM2-135M's sizes: N = B x T = 8 x 512 = 4096 response tokens, vocabulary
V = 49,152, width d = 576 for both models, tied-style heads without bias (the student head's weight
requires grad, the teacher's does not), float32 on CPU.

* naive: the full logits of both models in float32 (`h @ Wᵀ`, `[N, V]` each), then
  `τ² · kl_div(log_softmax(z_s/τ), log_softmax(z_t/τ))` summed over tokens, then `backward()`
  through plain autograd.
* chunked: `geokd.losses.chunked_token_kd(..., chunk_tokens=256)`, which applies each head to 256
  rows at a time in forward and again in backward, so no `[N, V]` tensor exists.

Each variant runs in its own fresh subprocess (peak RSS only ever grows within a process). Memory:
`ru_maxrss` (the process's peak resident set) after the first forward + backward, minus the
resident set just before it (torch imported, inputs and heads allocated, `gc.collect()`): the
growth is what the KD term itself added at its peak, its returned gradient buffers included.
ru_maxrss is used rather than torch's profiler because it counts every byte the process touched
(the allocator's, BLAS/oneDNN workspaces) and needs no instrumentation of the code measured; glibc
serves the large tensors here (> 32 MiB) with mmap and unmaps them on free, so the resident set
follows the live tensors. Time: the median over `--repeats` further forward + backward calls in
the same process. The parent checks that both variants return the same loss and gradients (the
tolerances are in the JSON) and reports the memory ratio chunked / naive; the issue's target is
at most 0.3x.

    python bench/token_kd.py [--tokens 4096] [--vocab 49152] [--dim 576] [--chunk 256]
                             [--repeats 3] [--threads N] [--out bench/results/token_kd.json]

About a minute on 2 idle CPU cores, and ~6 GiB of free memory for the naive form.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download (nothing here would)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _meta import git_commit  # noqa: E402  (bench/ is on sys.path when a script runs)
from torch import nn  # noqa: E402

import geokd  # noqa: E402
from geokd.losses import chunked_token_kd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("bench/results/token_kd.json")
TARGET_RATIO = 0.3
SEED = 0
LOSS_RTOL = 1e-5  # |Δloss| / |loss|
GRAD_RTOL = 1e-5  # max |Δg| / max |g|, per gradient
MIB = 2**20


def _rss_bytes() -> int:
    """The current resident set (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _inputs(n: int, vocab: int, dim: int):
    """Student hidden states and head (grad), teacher hidden states and head (constant)."""
    torch.manual_seed(SEED)
    hidden = torch.randn(n, dim, requires_grad=True)
    head = nn.Linear(dim, vocab, bias=False)
    t_hidden = torch.randn(n, dim)
    t_head = nn.Linear(dim, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():  # logits with a std of ~2.4, like a trained LM's, not ~0.6
        head.weight.normal_(0.0, 0.1)
        t_head.weight.normal_(0.0, 0.1)
    return hidden, head, t_hidden, t_head


def naive_loss(hidden, head, t_hidden, t_head, temperature: float) -> torch.Tensor:
    """Full logits of both models in float32, then the divergence (summed over tokens)."""
    z_s = head(hidden)  # [N, V]
    with torch.no_grad():
        z_t = t_head(t_hidden)  # [N, V]
    log_q = F.log_softmax(z_s / temperature, dim=-1)
    log_p = F.log_softmax(z_t / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def chunked_loss(hidden, head, t_hidden, t_head, temperature: float, chunk: int) -> torch.Tensor:
    loss, _ = chunked_token_kd(
        hidden, head, t_hidden, t_head, "forward", temperature=temperature, chunk_tokens=chunk
    )
    return loss


def worker(args: argparse.Namespace) -> int:
    """One variant in this (fresh) process: memory of the first call, then timed repeats."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hidden, head, t_hidden, t_head = _inputs(args.tokens, args.vocab, args.dim)
    if args.worker == "naive":

        def fn():
            return naive_loss(hidden, head, t_hidden, t_head, args.temperature)
    else:

        def fn():
            return chunked_loss(hidden, head, t_hidden, t_head, args.temperature, args.chunk)

    gc.collect()
    rss_before, maxrss_before = _rss_bytes(), _maxrss_bytes()
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    first_s = time.perf_counter() - start
    maxrss_after = _maxrss_bytes()
    torch.save(
        {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": head.weight.grad}, args.save
    )
    times, losses = [], [loss.item()]
    for _ in range(args.repeats):
        hidden.grad = None
        head.weight.grad = None
        start = time.perf_counter()
        again = fn()
        again.backward()
        times.append(time.perf_counter() - start)
        losses.append(again.item())
    print(
        json.dumps(
            {
                "variant": args.worker,
                "rss_before_mib": rss_before / MIB,
                "maxrss_before_mib": maxrss_before / MIB,
                "maxrss_after_mib": maxrss_after / MIB,
                "peak_growth_mib": (maxrss_after - rss_before) / MIB,
                "peak_exceeded_earlier_peak": maxrss_after > maxrss_before,
                "first_call_s": first_s,
                "seconds": statistics.median(times) if times else first_s,
                "seconds_all": times,
                "loss_every_call": losses,
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


def _run_variant(variant: str, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--save", str(save)]
    for name in ("tokens", "vocab", "dim", "chunk", "repeats", "temperature", "threads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(naive: dict, chunked: dict) -> dict:
    loss_rel = abs(float(chunked["loss"]) - float(naive["loss"])) / abs(float(naive["loss"]))
    grads = {}
    for name in ("grad_hidden", "grad_weight"):
        a, b = naive[name].double(), chunked[name].double()
        grads[name] = float((a - b).abs().max() / a.abs().max())
    return {
        "loss_naive": float(naive["loss"]),
        "loss_chunked": float(chunked["loss"]),
        "loss_rel_diff": loss_rel,
        "grad_max_abs_diff_over_max_abs": grads,
        "tolerance": {"loss_rel": LOSS_RTOL, "grad_max_abs_diff_over_max_abs": GRAD_RTOL},
        "equal": loss_rel <= LOSS_RTOL and all(v <= GRAD_RTOL for v in grads.values()),
    }


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        # naive first, then chunked; each in a fresh process
        runs = {v: _run_variant(v, args, Path(tmp) / f"{v}.pt") for v in ("naive", "chunked")}
        results = {v: torch.load(Path(tmp) / f"{v}.pt") for v in runs}
    check = _compare(results["naive"], results["chunked"])
    ratio = runs["chunked"]["peak_growth_mib"] / runs["naive"]["peak_growth_mib"]
    n, v, d = args.tokens, args.vocab, args.dim
    payload = {
        "what": "peak memory and wall time of the whole token-level KD term (hidden states -> loss -> "
        "backward gradients), chunked vs naive, forward KL",
        "shape": {
            "tokens": n,
            "batch_x_seq": "8 x 512" if n == 4096 else None,
            "vocab": v,
            "dim": d,
            "chunk_tokens": args.chunk,
            "temperature": args.temperature,
            "dtype": "float32",
            "student_head": "Linear(d, V, bias=False), weight requires grad",
            "teacher_head": "Linear(d, V, bias=False), constant",
        },  # fmt: skip
        "sizes_mib": {
            "one_full_logits_float32": n * v * 4 / MIB,
            "one_chunk_logits_float32": min(args.chunk, n) * v * 4 / MIB,
            "head_weight_gradient": v * d * 4 / MIB,
        },
        "memory_method": (
            "fresh subprocess per variant; ru_maxrss (peak resident set) after the first forward + backward "
            "minus the resident set (/proc/self/statm) just before it, with torch imported, inputs and "
            "heads allocated and gc run: the growth the KD term alone caused at its peak, gradient "
            "buffers included. Chosen over torch's profiler because it counts everything the process "
            "touched (allocator, BLAS workspaces) without instrumenting the code measured; tensors "
            "> 32 MiB are mmapped by glibc and unmapped on free, so RSS follows live tensors."
        ),
        "time_method": f"median of {args.repeats} further forward + backward calls in the same process",
        "naive": runs["naive"],
        "chunked": runs["chunked"],
        "memory_ratio_chunked_over_naive": ratio,
        "time_ratio_chunked_over_naive": runs["chunked"]["seconds"] / runs["naive"]["seconds"],
        "target_memory_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "results_equal": check,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": "cpu",
        "threads": runs["chunked"]["threads"],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "geokd": geokd.__version__,
        "commit": git_commit(ROOT),
        "load_average": {
            "before": load_before,
            "after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for name in ("naive", "chunked"):
        r = runs[name]
        print(
            f"{name:8s} peak +{r['peak_growth_mib']:7.0f} MiB   {r['seconds']:6.2f} s (first call {r['first_call_s']:.2f} s)"
        )
    print(
        f"memory ratio {ratio:.3f}x (target <= {TARGET_RATIO}x: {'met' if payload['met'] else 'MISSED'}), "
        f"time ratio {payload['time_ratio_chunked_over_naive']:.2f}x, results equal: {check['equal']} "
        f"(loss rel {check['loss_rel_diff']:.1e}, grads {check['grad_max_abs_diff_over_max_abs']})"
    )
    print(f"wrote {args.out} in {payload['wall_s']:.0f} s")
    if not check["equal"]:
        print("chunked and naive results differ beyond the tolerance", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="response tokens N (default 8 x 512)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary V (default SmolLM2's)")
    parser.add_argument("--dim", type=int, default=576, help="hidden width d (default SmolLM2-135M's)")
    parser.add_argument("--chunk", type=int, default=256, help="chunk_tokens of the chunked form")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the measured one")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--worker", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(worker(arguments) if arguments.worker else main(arguments))
