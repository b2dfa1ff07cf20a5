"""Baseline feature losses that compare rows one by one: learned projection (FitNets-style), MSE and
cosine. Shapes: `student [n, d_s]`, `teacher [n, d_t]` -> 0-d float32 tensor.

These are the baselines that arXiv 2509.25253 shows can be driven to zero while the student's own
geometry is wrong; geokd ships them so the comparison is one flag away.
"""

from __future__ import annotations

import torch

from geokd.errors import GeokdError
from geokd.losses._core import check_pair, finish, squared_norm


def _require_equal_widths(name: str, d_student: int, d_teacher: int) -> None:
    if d_student != d_teacher:
        raise GeokdError(
            f"{name} needs equal widths, got student {d_student} and teacher {d_teacher}; "
            "use proj (learned projection), procrustes, gram or cka"
        )


def proj(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Projection loss `‖S W − T‖²_F / n` with `weight W [d_s, d_t]` (a learned auxiliary parameter)."""
    student, teacher = check_pair(student, teacher, "proj")
    if weight.shape != (student.shape[1], teacher.shape[1]):
        raise GeokdError(
            f"proj: weight must have shape [d_s, d_t] = [{student.shape[1]}, {teacher.shape[1]}], "
            f"got {tuple(weight.shape)}"
        )
    residual = student @ weight.to(student.dtype) - teacher  # [n, d_t]
    return finish(squared_norm(residual) / student.shape[0], student)


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`‖S − T‖²_F / n` (sum over features, mean over rows; same scale as `proj`). Equal widths only."""
    student, teacher = check_pair(student, teacher, "mse")
    _require_equal_widths("mse", student.shape[1], teacher.shape[1])
    return finish(squared_norm(student - teacher) / student.shape[0], student)


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `1 − cos(sᵢ, tᵢ)`. Equal widths only.

    A zero row has no direction: its cosine is taken as 0 with a zero gradient (the usual
    `x / max(‖x‖, eps)` would give it a 1/eps-sized gradient)."""
    student, teacher = check_pair(student, teacher, "cosine")
    _require_equal_widths("cosine", student.shape[1], teacher.shape[1])
    s_unit = _unit_rows(student)  # [n, d]
    t_unit = _unit_rows(teacher)
    cos = (s_unit * t_unit).sum(dim=1)  # [n]
    return finish((1.0 - cos).double().mean(), student)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # [n, 1]
    with torch.no_grad():
        floor = 64.0 * torch.finfo(x.dtype).eps * norms.max()
    ok = norms > floor
    return x * torch.where(ok, 1.0 / torch.where(ok, norms, torch.ones_like(norms)), torch.zeros_like(norms))
