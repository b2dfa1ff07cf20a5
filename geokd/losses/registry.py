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
from geokd.losses.attention import AttentionRows, attention_map_loss, attention_relation_loss
from geokd.losses.flexkd import FlexKDLoss
from geokd.losses.geometry import cka, gram, procrustes
from geokd.losses.pointwise import _require_equal_widths, cosine, mse, proj
from geokd.losses.relational import rkd, spkd


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


class AttentionMapLoss(nn.Module):
    """`attn` (TinyBERT): `forward(student: AttentionRows, teacher: AttentionRows)`; `map` is
    "scores" (pre-softmax, TinyBERT's choice) or "probs" (`--attn-map`)."""

    name = "attn"
    needs = "scores"  # what geokd.models.attention.AttentionTap captures for it

    def __init__(self, student_dim: int = 0, teacher_dim: int = 0, map: str = "scores"):
        super().__init__()
        self.map = map

    def forward(self, student: AttentionRows, teacher: AttentionRows) -> torch.Tensor:
        return attention_map_loss(student, teacher, self.map)

    def extra_repr(self) -> str:
        return f"map={self.map}"


class AttentionRelationLoss(nn.Module):
    """`attn-relation` (MiniLMv2): `forward(student: AttentionRows, teacher: AttentionRows)` over
    `heads` relation heads (`--relation-heads`, resolved by the workload from both models)."""

    name = "attn-relation"
    needs = "qkv"

    def __init__(self, student_dim: int = 0, teacher_dim: int = 0, heads: int = 12):
        super().__init__()
        self.heads = heads

    def forward(self, student: AttentionRows, teacher: AttentionRows) -> torch.Tensor:
        return attention_relation_loss(student, teacher, self.heads)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


# Losses that read attention (AttentionRows from geokd.models.attention) instead of feature rows:
# per-query losses, averaged within a micro-batch, never gathered into a batch-level loss.
ATTENTION_LOSSES = ("attn", "attn-relation")


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
    "rkd": lambda d_s, d_t: FunctionalLoss("rkd", rkd),
    "spkd": lambda d_s, d_t: FunctionalLoss("spkd", spkd),
    "attn": AttentionMapLoss,
    "attn-relation": AttentionRelationLoss,
}


def feature_loss_names() -> list[str]:
    return list(FEATURE_LOSSES)


def row_loss_names() -> list[str]:
    """The losses that compare `[n, d]` row matrices (every loss but the attention losses)."""
    return [name for name in FEATURE_LOSSES if name not in ATTENTION_LOSSES]


def build_feature_loss(name: str, student_dim: int, teacher_dim: int, **options) -> nn.Module:
    """Build the feature loss `name` for the given widths (`options`: flexkd's `basis`, attn's
    `map`, attn-relation's `heads`); unknown
    names and width mismatches raise `GeokdError` with the accepted choices."""
    if name not in FEATURE_LOSSES:
        raise GeokdError(f"unknown loss {name!r}; choose one of: {', '.join(FEATURE_LOSSES)}")
    return FEATURE_LOSSES[name](student_dim, teacher_dim, **options)
