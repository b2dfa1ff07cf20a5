"""Relational feature losses: RKD (Park et al., 2019) and similarity-preserving KD (Tung & Mori,
2019). Like the geometry losses they compare the relations *between* the rows of a batch, so the
student and teacher widths may differ and no projector is needed. Shapes: `student [n, d_s]`,
`teacher [n, d_t]` (rows already masked and flattened: pooled examples or tokens) -> 0-d float32
(float64 for float64 input).

* `rkd`: `λ_D·L_D + λ_A·L_A` with the paper's weights λ_D = 1, λ_A = 2. The distance potential is
  `ψ_D(i, j) = ‖x_i − x_j‖ / μ` (μ the mean distance over the batch's pairs), the angle potential
  `ψ_A(i, j, k) = cos ∠x_i x_j x_k = ⟨e_ij, e_kj⟩` with `e_ij = (x_i − x_j)/‖x_i − x_j‖`, and each
  term is the Huber loss (δ = 1) between the teacher's and student's potentials, averaged over the
  ordered pairs i ≠ j and over the triplets of distinct i, j, k.
* `spkd`: `‖Ĝ_s − Ĝ_t‖²_F / n²` with `G = X Xᵀ` (no centring, as in the paper) and `Ĝ` its rows
  scaled to unit L2 norm.

Cost: both are written through the row Gram matrix `X Xᵀ` (one n×n×d product), never through the
n×n×d difference tensor. The angle term still touches n³ triplets: it is computed a chunk of
vertices at a time, each chunk recomputed in the backward pass (memory O(chunk·n²)), and refused
above `RKD_MAX_ROWS` rows with a message. `spkd` switches to d×d matrices when n exceeds both widths
(`‖G_i‖² = x_iᵀ(XᵀX)x_i`, `⟨G_s,i, G_t,i⟩ = s_iᵀ(SᵀT)t_i`), so n×n is never formed for token rows.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from geokd.errors import GeokdError
from geokd.losses._core import check_pair, finish, safe_sqrt, use_row_gram

RKD_DISTANCE_WEIGHT = 1.0  # λ_D (Park et al. 2019, §4.1)
RKD_ANGLE_WEIGHT = 2.0  # λ_A
# The angle term compares n(n−1)(n−2) triplets; above this many rows it is refused (token rows of a
# whole batch): n = 1024 is ~10⁹ triplets, seconds on a GPU and minutes on a CPU per step.
RKD_MAX_ROWS = 1024
_NOISE_ULPS = 64.0  # as geokd.losses._core: values below this many ulps of the scale are rounding noise


def _floor(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _NOISE_ULPS * torch.finfo(dtype).eps * scale


def _distances(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G = x xᵀ [n, n] of the centred rows, pairwise distances [n, n]) with an exact zero diagonal;
    distances below rounding noise (coincident rows) are exactly 0 with a zero gradient."""
    x = x - x.mean(dim=0, keepdim=True)  # translation-invariant; better conditioned Gram differences
    g = x @ x.T  # [n, n]
    sq = g.diagonal()
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * g  # [n, n]
    with torch.no_grad():
        keep = d2 > _floor(sq.max().clamp_min(0.0), x.dtype)
        keep.fill_diagonal_(False)
    dist = torch.where(keep, torch.where(keep, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))
    return g, dist


def _distance_term(d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    n = d_s.shape[0]
    pairs = n * (n - 1)

    def normalised(d: torch.Tensor) -> torch.Tensor:
        mu = d.sum() / pairs
        ok = mu > 0
        return d * torch.where(ok, 1.0 / torch.where(ok, mu, torch.ones_like(mu)), torch.zeros_like(mu))

    # the diagonal is 0 − 0 on both sides: it adds nothing
    return F.smooth_l1_loss(normalised(d_s), normalised(d_t), reduction="sum", beta=1.0).double() / pairs


def _cosines(g: torch.Tensor, dist: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """cos ∠x_i x_j x_k for each vertex j in `vertices` [c]: [c, n, n] (i, k), 0 where x_i or x_k
    coincides with x_j. ⟨x_i − x_j, x_k − x_j⟩ = G_ik − G_ij − G_jk + G_jj."""
    g_j = g[vertices]  # [c, n]: G_jk
    inner = g.unsqueeze(0) - g_j.unsqueeze(2) - g_j.unsqueeze(1) + g[vertices, vertices].view(-1, 1, 1)
    d_j = dist[vertices]  # [c, n]
    ok = d_j > 0
    inv = torch.where(ok, 1.0 / torch.where(ok, d_j, torch.ones_like(d_j)), torch.zeros_like(d_j))
    return inner * inv.unsqueeze(2) * inv.unsqueeze(1)


def _angle_chunk(g_s, d_s, g_t, d_t, vertices) -> torch.Tensor:  # noqa: ANN001
    """Σ over i, k of the Huber loss between the two sides' cosines at each vertex j of the chunk.
    No mask is needed: for i = j or k = j both cosines are exactly 0 (no direction), and for i = k
    both are 1 up to rounding, a difference of ~1e-7 whose Huber term is ~1e-14."""
    return F.smooth_l1_loss(_cosines(g_s, d_s, vertices), _cosines(g_t, d_t, vertices), reduction="sum", beta=1.0).double()


def _angle_term(g_s, d_s, g_t, d_t) -> torch.Tensor:  # noqa: ANN001
    n = g_s.shape[0]
    triplets = n * (n - 1) * (n - 2)
    if triplets == 0:
        return g_s.new_zeros((), dtype=torch.float64)
    chunk = max(1, (1 << 22) // (n * n))  # ~4M entries per chunk
    total = g_s.new_zeros((), dtype=torch.float64)
    grad = torch.is_grad_enabled() and (g_s.requires_grad or g_t.requires_grad)
    for start in range(0, n, chunk):
        vertices = torch.arange(start, min(n, start + chunk), device=g_s.device)
        if grad:
            total = total + checkpoint(_angle_chunk, g_s, d_s, g_t, d_t, vertices, use_reentrant=False)
        else:
            total = total + _angle_chunk(g_s, d_s, g_t, d_t, vertices)
    return total / triplets


def rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = RKD_DISTANCE_WEIGHT,
        angle_weight: float = RKD_ANGLE_WEIGHT) -> torch.Tensor:  # fmt: skip
    """Relational KD (Park et al., CVPR 2019): `λ_D·L_D + λ_A·L_A` over the batch's rows (module
    docstring). Invariant to translation, rotation and scaling of either side; 0 for n < 2 rows."""
    student, teacher = check_pair(student, teacher, "rkd")
    n = student.shape[0]
    if n > RKD_MAX_ROWS and angle_weight:
        raise GeokdError(
            f"rkd: the angle term compares every triplet of the batch's rows, and this batch has {n} rows (at most "
            f"{RKD_MAX_ROWS}); use --features cls or mean (one row per example) or a smaller --batch-size"
        )
    if n < 2:
        return finish(student.new_zeros((), dtype=torch.float64), student) + 0.0 * student.sum()
    g_s, d_s = _distances(student)
    g_t, d_t = _distances(teacher)
    value = distance_weight * _distance_term(d_s, d_t)
    if angle_weight:
        value = value + angle_weight * _angle_term(g_s, d_s, g_t, d_t)
    return finish(value, student)


def _unit_row_scale(norm_sq: torch.Tensor) -> torch.Tensor:
    """1/‖row‖ from squared row norms, exactly 0 (zero gradient) for rows at rounding noise."""
    norm = safe_sqrt(norm_sq)  # a zero row: 0 with a zero (not NaN) gradient
    with torch.no_grad():
        ok = norm > _floor(norm.max(), norm.dtype)
    return torch.where(ok, 1.0 / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def spkd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): `‖Ĝ_s − Ĝ_t‖²_F / n²`, `G = X Xᵀ`, `Ĝ` with
    unit-L2 rows. Invariant to rotations and to a global scaling of either side (not to
    translation: the paper does not centre). A zero row of X gives a zero row of Ĝ."""
    student, teacher = check_pair(student, teacher, "spkd")
    n = student.shape[0]
    if use_row_gram(n, student.shape[1], teacher.shape[1]):
        g_s, g_t = student @ student.T, teacher @ teacher.T  # [n, n]
        g_s = g_s * _unit_row_scale(g_s.square().sum(dim=1)).unsqueeze(1)
        g_t = g_t * _unit_row_scale(g_t.square().sum(dim=1)).unsqueeze(1)
        value = (g_s - g_t).double().square().sum()
    else:
        # ‖G_i‖² = x_iᵀ (XᵀX) x_i and ⟨G_s,i, G_t,i⟩ = s_iᵀ (SᵀT) t_i: d×d matrices only.
        a_s = ((student @ (student.T @ student)) * student).sum(dim=1)  # [n]
        a_t = ((teacher @ (teacher.T @ teacher)) * teacher).sum(dim=1)
        cross = ((student @ (student.T @ teacher)) * teacher).sum(dim=1)
        inv_s, inv_t = _unit_row_scale(a_s), _unit_row_scale(a_t)
        unit_s, unit_t = (inv_s > 0).double(), (inv_t > 0).double()  # ‖Ĝ_i‖² is 1 (0 for a zero row)
        value = (unit_s + unit_t - 2.0 * (cross * inv_s * inv_t).double()).sum()
    return finish(value.clamp_min(0.0) / (n * n), student)
