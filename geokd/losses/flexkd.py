"""Flex-KD (arXiv 2507.10155, "What Should Feature Distillation Transfer in LLMs? A Task-Tangent
Geometry View"): distil only the teacher's task-relevant subspace, with no projector (issue #13).

1. **Scores.** Before training, the fine-tuned teacher runs over (a subset of) the training data.
   For each mapped teacher layer `l` and hidden dimension `j`, `score_j = Σ_rows |∂f/∂h_{l,j}|`,
   the gradient magnitude of the teacher's task output `f` with respect to that layer's hidden
   state, summed over rows (tokens or examples). `DimensionScores` accumulates it, and the
   second moments of the gradients for the tangent basis.
2. **Selection** (`DimensionScores.select(d_s)`): the d_s highest-scoring teacher dimensions
   (all of them when d_s ≥ d_t), ties to the lower index. geokd's choice where the paper is silent:
   the selected dimensions are **kept in ascending index order** and the student's dimension `i`
   pairs with the `i`-th of them; for a student not cut from the teacher the order is arbitrary, and
   the loss lets the student learn it. A `prune:` student's channel `i` *is* the teacher channel
   `hidden_channels[i]` (chosen by activation size, not by this score), so `geokd.flexkd.install`
   reorders the selection to pair every selected channel a student channel was cut from with that
   channel (`geokd.flexkd.pair_with_origin`); the ascending pairing would shift them apart as soon as
   the two selections differ.
3. **Loss** (`flexkd`): per-dimension Pearson correlation over the batch rows between student
   dimension `i` and its teacher dimension, `1 − mean_i corr_i`. It lies in [0, 2], is 0 exactly
   when every student column is an increasing affine function of its teacher column, and is
   invariant to per-dimension positive scalings and shifts on either side. A column that is
   constant up to rounding (its centred norm below the noise floor of `geokd.losses._core`)
   contributes correlation 0 with a zero gradient, never a 0/0.
4. **Task-tangent variant** (`--flexkd-basis tangent`): instead of coordinate dimensions, the top-d_s
   principal directions `U [d_t, d_s]` (orthonormal) of the covariance of the gradients; the
   teacher's rows are projected, `T U`, and aligned with the same loss. The directions come out of
   `torch.linalg.eigh` in decreasing eigenvalue order, and each is signed so that its largest
   coordinate is positive (an eigenvector's sign is arbitrary; this makes the basis reproducible).
"""

from __future__ import annotations

import torch
from torch import nn

from geokd.config import FLEXKD_BASES
from geokd.errors import GeokdError
from geokd.losses._core import _NOISE_FLOOR_ULPS, check_pair, compute_dtype


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """Centre each column of `x [n, d]` and scale it to unit norm; a column that is zero up to
    rounding (relative to the column's raw norm) becomes exactly zero, gradient included."""
    centered = x - x.mean(dim=0, keepdim=True)
    sum_sq = centered.square().sum(dim=0)  # [d]
    with torch.no_grad():
        floor = _NOISE_FLOOR_ULPS * torch.finfo(x.dtype).eps * x.square().sum(dim=0).sqrt()
        keep = sum_sq.sqrt() > floor
    safe = torch.where(keep, sum_sq, torch.ones_like(sum_sq))
    return centered * torch.where(keep, safe.rsqrt(), torch.zeros_like(safe))


def pearson_alignment(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`1 − mean_i corr(student[:, i], teacher[:, i])` over the rows, for `student [n, d]` and
    `teacher [n, d]` (the teacher's selected or projected columns); float32 (float64 for float64
    input); the teacher is a constant."""
    student, teacher = check_pair(student, teacher, "flexkd")
    if student.shape[1] != teacher.shape[1]:
        raise GeokdError(
            f"flexkd: the student has {student.shape[1]} columns and the selected teacher subspace {teacher.shape[1]}; "
            "select as many teacher dimensions as the student is wide"
        )
    s = _unit_columns(student)
    with torch.no_grad():
        t = _unit_columns(teacher.detach())
    corr = (s * t).sum(dim=0)  # [d]
    return (1.0 - corr.double().mean()).to(compute_dtype(student))


class DimensionScores:
    """Running Flex-KD statistics of one teacher layer of width `dim`: `Σ |g_j|` per dimension and,
    for the tangent basis, `Σ g`, `Σ g gᵀ` and the row count (float64 accumulators)."""

    def __init__(self, dim: int, tangent: bool = False):
        self.dim, self.tangent = int(dim), bool(tangent)
        self.abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64) if tangent else None
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64) if tangent else None
        self.rows = 0

    def update(self, grads: torch.Tensor) -> None:
        """Add gradient rows `[..., dim]` (padding rows already removed)."""
        g = grads.detach().reshape(-1, grads.shape[-1]).to("cpu", torch.float64)
        if g.shape[1] != self.dim:
            raise GeokdError(f"flexkd: gradient rows of width {g.shape[1]} for a layer of width {self.dim}")
        self.abs_sum += g.abs().sum(dim=0)
        if self.tangent:
            self.sum += g.sum(dim=0)  # type: ignore[operator]
            self.outer += g.T @ g  # type: ignore[operator]
        self.rows += g.shape[0]

    def _require_rows(self) -> None:
        if self.rows == 0:
            raise GeokdError("flexkd: no gradient rows were scored; the scoring pass saw no training rows")

    def select(self, k: int) -> torch.Tensor:
        """The `min(k, dim)` highest-scoring dimensions (ties to the lower index), ascending."""
        self._require_rows()
        k = min(int(k), self.dim)
        order = sorted(range(self.dim), key=lambda j: (-float(self.abs_sum[j]), j))
        return torch.tensor(sorted(order[:k]), dtype=torch.long)

    def basis(self, k: int) -> torch.Tensor:
        """The top-`min(k, dim)` principal directions `[dim, k]` (orthonormal columns, decreasing
        variance, each signed so its largest-magnitude coordinate is positive) of the gradients'
        covariance."""
        k = min(int(k), self.dim)
        cov = self.covariance()
        _, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending eigenvalues
        top = vectors[:, -k:].flip(1)
        peak = top.gather(0, top.abs().argmax(dim=0, keepdim=True))
        return top * torch.where(peak < 0, -1.0, 1.0)

    def covariance(self) -> torch.Tensor:
        """The gradients' covariance `[dim, dim]` (tangent statistics only)."""
        if not self.tangent:
            raise GeokdError("flexkd: this layer was scored without the tangent statistics (--flexkd-basis tangent)")
        self._require_rows()
        mean = self.sum / self.rows  # type: ignore[operator]
        return self.outer / self.rows - torch.outer(mean, mean)  # type: ignore[operator]

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators as named tensors (what a run directory or cache stores)."""
        out = {"abs_sum": self.abs_sum, "rows": torch.tensor([self.rows], dtype=torch.long)}
        if self.tangent:
            out.update(sum=self.sum, outer=self.outer)  # type: ignore[arg-type]
        return out


class FlexKDLoss(nn.Module):
    """`flexkd` between `student [n, d_s]` and `teacher [n, d_t]` rows through a fixed selection
    of w = min(d_s, d_t) teacher directions: the buffer `index [w]` (`basis="dims"`) or the
    orthonormal buffer `basis [d_t, w]` (`basis="tangent"`). Buffers are saved with the objective
    (resume restores the scored selection) and never trained. Until `set_selection` fills it the
    selection is the first w coordinates; training runs the scoring pass before the first step.
    A student wider than the teacher aligns its first d_t columns."""

    name = "flexkd"

    def __init__(self, student_dim: int, teacher_dim: int, basis: str = "dims"):
        super().__init__()
        if basis not in FLEXKD_BASES:
            raise GeokdError(f"flexkd: basis must be one of {', '.join(FLEXKD_BASES)}, got {basis!r}")
        self.student_dim, self.teacher_dim, self.basis_kind = int(student_dim), int(teacher_dim), basis
        self.width = min(self.student_dim, self.teacher_dim)
        if basis == "dims":
            self.register_buffer("index", torch.arange(self.width, dtype=torch.long))
        else:
            self.register_buffer("basis", torch.eye(self.teacher_dim, self.width))

    def set_selection(self, selection: torch.Tensor) -> None:
        """Install `DimensionScores.select(w)` (dims) or `DimensionScores.basis(w)` (tangent)."""
        if self.basis_kind == "dims":
            ok = (selection.dim() == 1 and selection.shape[0] == self.width and not selection.is_floating_point()
                  and int(selection.min()) >= 0 and int(selection.max()) < self.teacher_dim
                  and selection.unique().numel() == self.width)  # fmt: skip
            if not ok:
                raise GeokdError(f"flexkd: expected {self.width} distinct indices in [0, {self.teacher_dim}), got "
                                 f"{tuple(selection.shape)} {selection.dtype}")  # fmt: skip
            self.index.copy_(selection)
        else:
            if tuple(selection.shape) != (self.teacher_dim, self.width):
                raise GeokdError(f"flexkd: expected a [{self.teacher_dim}, {self.width}] basis, got {tuple(selection.shape)}")
            self.basis.copy_(selection.to(self.basis.dtype))

    def teacher_rows(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's selected columns `[n, w]` (or its rows in the tangent basis)."""
        if self.basis_kind == "dims":
            return teacher.index_select(1, self.index.to(teacher.device))
        dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
        return teacher.to(dtype) @ self.basis.to(teacher.device, dtype)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            picked = self.teacher_rows(teacher.detach())
        return pearson_alignment(student[:, : self.width], picked)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, basis={self.basis_kind}"
