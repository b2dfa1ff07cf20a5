"""Device, precision and process-rank resolution, in one place (STYLE.md §8).

`resolve_runtime("auto")` picks CUDA when available, else MPS, else CPU, and says why; on CUDA
with bf16 support (compute capability ≥ 8.0) forward passes run under bf16 autocast while the
geometry losses stay in float32 (geokd.losses upcasts). Ranks come from torchrun's environment
variables; geokd never re-launches itself. Only rank 0 prints or writes shared files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from geokd.errors import GeokdError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32
    reason: str  # one line for the run summary
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scaling(self) -> bool:
        """fp16 forward passes need loss scaling (bf16 has float32's exponent range)."""
        return self.autocast_dtype == torch.float16

    def autocast(self):
        """Context manager for model forward passes (no-op without an autocast dtype)."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Full float32 matmuls inside the block (TF32 off, also under an enclosing autocast): the
    geometry losses are computed this way on every device."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type="cuda", enabled=False), torch.autocast(device_type="cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The device, ranks and forward precision of a run. `precision="auto"`: bf16 autocast on CUDA
    GPUs with native bf16 (compute capability ≥ 8.0), fp16 autocast with gradient scaling on older
    ones, float32 elsewhere; `fp32`, `bf16`, `fp16` force one (CPU autocast supports both half
    types). The geometry losses run in float32 whatever the forward does."""
    if precision not in PRECISIONS:
        raise GeokdError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev, why = _resolve_device(device, local_rank)
    forced = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise GeokdError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
        major, minor = torch.cuda.get_device_capability(index)
        # TF32 for the models' float32 matmuls (Ampere and newer); the geometry losses switch it
        # off for themselves (`full_float32`).
        torch.backends.cuda.matmul.allow_tf32 = major >= 8
        torch.backends.cudnn.allow_tf32 = major >= 8
        tf32 = " and TF32 matmuls" if major >= 8 else ""
        if precision == "bf16" and major < 8:
            raise GeokdError(
                f"--precision bf16: this GPU (sm{major}{minor}) has no native bf16; use --precision fp16 or auto"
            )
        if precision != "auto":
            dtype = forced[precision]
            return Runtime(dev, dtype, f"{why}; --precision {precision}{tf32} (sm{major}{minor}), losses in float32",
                           rank, world_size)  # fmt: skip
        if major >= 8:  # native bf16 (Ampere and newer); is_bf16_supported() also admits emulation
            return Runtime(dev, torch.bfloat16, f"{why}; bf16 autocast{tf32} (sm{major}{minor}), losses in float32",
                           rank, world_size)  # fmt: skip
        return Runtime(dev, torch.float16,
                       f"{why}; fp16 autocast with gradient scaling (sm{major}{minor} has no bf16), losses in float32",
                       rank, world_size)  # fmt: skip
    if precision in ("bf16", "fp16"):
        scaled = " with gradient scaling" if precision == "fp16" else ""
        return Runtime(dev, forced[precision], f"{why}; --precision {precision}: {precision} autocast{scaled} on "
                       f"{dev.type}, losses in float32", rank, world_size)  # fmt: skip
    return Runtime(dev, None, f"{why}; float32 on {dev.type}", rank, world_size)


def _resolve_device(device: str, local_rank: int) -> tuple[torch.device, str]:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank), "auto: CUDA available"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS available"
        return torch.device("cpu"), "auto: no GPU found"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GeokdError(f"--device: cannot parse {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GeokdError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GeokdError(
            f"--device {device}: Apple MPS is not available on this machine; use --device cpu or auto"
        )
    return dev, f"--device {device}"
