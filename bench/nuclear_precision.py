"""How accurate is each nuclear-norm method inside the Procrustes loss, and what does it cost here?
(issue #14: the float64 eigensolve must not become the bottleneck on GPUs with weak float64.)

Methods (geokd.losses._core.nuclear_norm_and_polar): "eigh" (float64 eigensolve of the smaller
Gram matrix, the CPU and full-rate-float64 GPU default), "svd" (float64 SVD, the reference),
"svd32" (float32 SVD, the default on GPUs without full-rate float64) and, for contrast, "eigh32"
(float32 eigensolve of the Gram matrix, which squares the condition number; not offered by geokd).

For each regime it reports the Procrustes loss's absolute and relative error against a float64
SVD of the float64 inputs, the gradient's relative error (‖ΔG‖/‖G‖), and the time of the bare
nuclear norm + polar factor on this machine's device. Regimes: random features, student close
to a rotated teacher (near the optimum: a small loss), and low-rank features (rank-deficient
batches, n < d).

    python bench/nuclear_precision.py [--device cuda] [--out bench/results/nuclear_precision.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _meta import write_result  # noqa: E402

from geokd.losses import _core, procrustes  # noqa: E402
from geokd.losses._core import nuclear_norm_and_polar  # noqa: E402


def _eigh32(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = m.detach().float()
    wide = m.shape[0] <= m.shape[1]
    evals, evecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma > sigma.max() * 1e-3
    inv = torch.where(keep, 1 / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma))
    polar = (evecs * inv) @ (evecs.T @ m) if wide else (m @ evecs) * inv @ evecs.T
    return (sigma * keep).sum().double(), polar


def _method(name: str):
    if name == "eigh32":
        return _eigh32
    return lambda m: nuclear_norm_and_polar(m, name)


def _regimes(n: int, d_s: int, d_t: int, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = torch.randn(n, d_t, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d_t, d_t, generator=gen, dtype=torch.float64))
    close = (t @ q)[:, :d_s] + 1e-3 * torch.randn(n, d_s, generator=gen, dtype=torch.float64)
    low = torch.randn(n, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, d_s, generator=gen, dtype=torch.float64)
    return {
        "random": (torch.randn(n, d_s, generator=gen, dtype=torch.float64), t),
        "near optimum": (close, t),
        "rank 8": (low + 1e-4 * torch.randn(n, d_s, generator=gen, dtype=torch.float64), t),
    }


def _timed(fn, m: torch.Tensor, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn(m)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "nuclear_precision.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    methods = ["eigh", "svd", "svd32", "eigh32"]
    rows = []
    for n, d_s, d_t in ((32, 384, 768), (2048, 384, 768), (4096, 768, 1024)):
        for regime, (s64, t64) in _regimes(n, d_s, d_t, gen).items():
            s_ref = s64.clone().requires_grad_(True)
            os.environ["GEOKD_NUCLEAR_METHOD"] = "svd"
            value = procrustes(s_ref, t64)
            value.backward()
            reference = {"loss": value.item(), "grad": s_ref.grad.clone()}
            for name in methods:
                s32 = s64.float().to(device).requires_grad_(True)
                t32 = t64.float().to(device)
                if name == "eigh32":
                    saved = _core.nuclear_norm_and_polar
                    _core.nuclear_norm_and_polar = lambda m, method="eigh": _eigh32(m)
                    os.environ["GEOKD_NUCLEAR_METHOD"] = "eigh"
                else:
                    os.environ["GEOKD_NUCLEAR_METHOD"] = name
                try:
                    loss = procrustes(s32, t32)
                    loss.backward()
                finally:
                    if name == "eigh32":
                        _core.nuclear_norm_and_polar = saved
                grad = s32.grad.double().cpu()
                m = (s32.detach() - s32.detach().mean(0)).T @ (t32 - t32.mean(0))
                ms = _timed(_method(name), m, device, args.repeats)
                rows.append({
                    "n": n, "d_s": d_s, "d_t": d_t, "regime": regime, "method": name,
                    "loss": loss.item(), "reference": reference["loss"],
                    "abs_error": abs(loss.item() - reference["loss"]),
                    "rel_error": abs(loss.item() - reference["loss"]) / max(abs(reference["loss"]), 1e-30),
                    "grad_rel_error": float((grad - reference["grad"]).norm() / reference["grad"].norm()),
                    "nuclear_ms": ms,
                })  # fmt: skip
            os.environ.pop("GEOKD_NUCLEAR_METHOD", None)
    print(f"{'n':>5} {'d_s':>4} {'d_t':>5} {'regime':<13} {'method':<7} {'loss':>10} {'rel err':>9} "
          f"{'grad err':>9} {'ms':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['n']:>5} {r['d_s']:>4} {r['d_t']:>5} {r['regime']:<13} {r['method']:<7} {r['loss']:>10.6f} "
              f"{r['rel_error']:>9.1e} {r['grad_rel_error']:>9.1e} {r['nuclear_ms']:>8.2f}")  # fmt: skip
    write_result(args.out, {"device": str(device), "rows": rows, "device_name": (
        torch.cuda.get_device_name(device) if device.type == "cuda" else None)}, ROOT)  # fmt: skip


if __name__ == "__main__":
    main()
