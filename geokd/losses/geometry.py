"""Geometry losses: Procrustes distance, Gram-matrix distance and CKA (arXiv 2509.25253).

All three compare the *geometry* of two row sets (the matrix of pairwise inner products between
rows after centring), so they are invariant to orthogonal transforms of either side and accept
different widths. Shapes: `student [n, d_s]`, `teacher [n, d_t]` -> 0-d float32 tensor (float64 for
float64 inputs).
"""

from __future__ import annotations

import torch

from geokd.losses._core import (
    center_and_scale,
    check_pair,
    cross_nuclear_norm,
    finish,
    gram_terms,
    safe_sqrt,
    squared_norm64,
    use_row_gram,
)


def procrustes(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Squared Procrustes distance `D_P² = ‖S‖² + ‖T‖² − 2‖SᵀT‖_*` after centring the rows of both
    sides and (if `normalize`) scaling each to unit Frobenius norm; then `D_P² = 2 − 2‖SᵀT‖_*`, which
    lies in [0, 2] (inside the [0, 4] of the general bound). It equals `min_Q ‖S_pad − T_pad Q‖²_F`
    over orthogonal Q with the narrower side zero-padded.

    A degenerate side (constant rows, all zeros, one row) is the zero matrix after centring.
    """
    student, teacher = check_pair(student, teacher, "procrustes")
    s, _, s_sq = center_and_scale(student, normalize)  # [n, d_s], ‖S‖²
    t, _, t_sq = center_and_scale(teacher, normalize)  # [n, d_t], ‖T‖²
    value = s_sq.double() + t_sq.double() - 2.0 * cross_nuclear_norm(s, t)
    return finish(value.clamp_min(0.0), student)


def gram(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Gram distance `‖S Sᵀ − T Tᵀ‖_F` after centring (and, if `normalize`, unit Frobenius norm).

    For n ≤ max(d_s, d_t) the n×n difference is formed directly (no cancellation). Otherwise
    `‖K_s − K_t‖² = ‖SᵀS‖² + ‖TᵀT‖² − 2‖SᵀT‖²` with d×d cross-products, accumulated in float64.
    """
    student, teacher = check_pair(student, teacher, "gram")
    s = center_and_scale(student, normalize)[0]
    t = center_and_scale(teacher, normalize)[0]
    n = s.shape[0]
    if use_row_gram(n, s.shape[1], t.shape[1]):
        squared = squared_norm64(s @ s.T - t @ t.T)  # [n, n] difference, exact up to rounding
    else:
        s_s, t_t, s_t = gram_terms(s, t)
        squared = (s_s + t_t - 2.0 * s_t).clamp_min(0.0)
    return finish(safe_sqrt(squared), student)


def cka(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`1 − linear CKA`, with `CKA = ‖SᵀT‖²_F / (‖SᵀS‖_F ‖TᵀT‖_F)` on row-centred features.

    Computed as `½‖K̂_s − K̂_t‖²_F` with `K̂ = K / ‖K‖_F` (identical by algebra, and free of the
    cancellation in `1 − c/√(ab)` when the n×n form applies). A side that is constant after
    centring has no geometry; CKA is then taken as 0 (loss 1) with a zero gradient.
    """
    student, teacher = check_pair(student, teacher, "cka")
    # Unit-Frobenius scaling first: CKA is scale-invariant, and it gives the degenerate-side flags.
    s, s_ok, _ = center_and_scale(student, normalize=True)
    t, t_ok, _ = center_and_scale(teacher, normalize=True)
    both = s_ok * t_ok
    n = s.shape[0]
    if use_row_gram(n, s.shape[1], t.shape[1]):
        k_s = s @ s.T  # [n, n]
        k_t = t @ t.T
        k_s = k_s / torch.where(s_ok > 0, torch.linalg.matrix_norm(k_s), torch.ones_like(s_ok))
        k_t = k_t / torch.where(t_ok > 0, torch.linalg.matrix_norm(k_t), torch.ones_like(t_ok))
        value = 0.5 * squared_norm64(k_s - k_t) * both.double()
    else:
        s_s, t_t, s_t = gram_terms(s, t)
        denom = torch.where(both > 0, s_s * t_t, torch.ones_like(s_s)).sqrt()  # no sqrt(0) in backward
        value = (1.0 - s_t / denom) * both.double()
    # Degenerate side: CKA undefined, reported as loss 1 with no gradient.
    value = value + (1.0 - both.double())
    return finish(value.clamp(0.0, 1.0), student)
