"""Feature losses by name. Each entry builds an `nn.Module` with `forward(student, teacher)`.

Adding a loss = one function, one entry here, one reference test (tests/unit/test_losses.py).
Stateless losses wrap their function; `proj` owns its projection matrix, an auxiliary parameter
that is trained with the student, saved for resume and never exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from geokd.errors import GeokdError
from geokd.losses.flexkd import FlexKDLoss
from geokd.losses.geometry import cka, gram, procrustes
from geokd.losses.pointwise import _require_equal_widths, cosine, mse, proj


class FunctionalLoss(nn.Module):
    """A parameter-free feature loss: `forward(student [n, d_s], teacher [n, d_t]) -> scalar`."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name = name
        self.fn = fn

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.fn(student, teacher)

    def extra_repr(self) -> str:
        return self.name


class ProjectionLoss(nn.Module):
    """`‖S W − T‖²_F / n` with a learned `W [d_s, d_t]` (initialised like `nn.Linear`)."""

    name = "proj"

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(student_dim)
        self.weight = nn.Parameter(torch.empty(student_dim, teacher_dim).uniform_(-bound, bound))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return proj(student, teacher, self.weight)

    def extra_repr(self) -> str:
        return f"student_dim={self.weight.shape[0]}, teacher_dim={self.weight.shape[1]}"


def _equal_width(name: str, fn):
    def build(student_dim: int, teacher_dim: int) -> nn.Module:
        _require_equal_widths(name, student_dim, teacher_dim)
        return FunctionalLoss(name, fn)

    return build


FEATURE_LOSSES: dict[str, Callable[[int, int], nn.Module]] = {
    "procrustes": lambda d_s, d_t: FunctionalLoss("procrustes", procrustes),
    "gram": lambda d_s, d_t: FunctionalLoss("gram", gram),
    "cka": lambda d_s, d_t: FunctionalLoss("cka", cka),
    "proj": ProjectionLoss,
    "mse": _equal_width("mse", mse),
    "cosine": _equal_width("cosine", cosine),
    "flexkd": FlexKDLoss,  # its selection is filled by the scoring pass (geokd.flexkd)
}


def feature_loss_names() -> list[str]:
    return list(FEATURE_LOSSES)


def build_feature_loss(name: str, student_dim: int, teacher_dim: int, **options) -> nn.Module:
    """Build the feature loss `name` for the given widths (`options`: flexkd's `basis`); unknown
    names and width mismatches raise `GeokdError` with the accepted choices."""
    if name not in FEATURE_LOSSES:
        raise GeokdError(f"unknown loss {name!r}; choose one of: {', '.join(FEATURE_LOSSES)}")
    return FEATURE_LOSSES[name](student_dim, teacher_dim, **options)
