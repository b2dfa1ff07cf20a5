"""Shared numerics for the geometry losses: input checks, centring/normalisation, the nuclear norm
with a robust polar-factor gradient, and the Gram-difference norm in its n×n and d×d forms.

Conventions (see docs/ARCHITECTURE.md and the design notes in the README):

* Inputs are `student [n, d_s]` and `teacher [n, d_t]`: rows are examples (pooled features) or
  non-padding tokens, already masked and flattened. Widths may differ.
* Geometry is computed in float32 whatever the model dtype (bf16/fp16 lose the digits that the
  distances live in near the optimum); float64 inputs stay float64 so `gradcheck` can run.
* Final scalars are accumulated in float64: every geometry loss is a difference of nearly equal
  quantities close to its optimum, and float32 would return 0 there (issue #2, accuracy near the
  optimum).
"""

from __future__ import annotations

import math
import os

import torch

from geokd.errors import GeokdError

# Centred features whose norm is below this multiple of machine epsilon times the norm of the raw
# features are rounding noise (a constant student is centred to ~1e-8, not to 0): they are treated
# as exactly zero, so a collapsed student gets a zero (not a 1e8-sized) gradient.
_NOISE_FLOOR_ULPS = 64.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and upcast both sides to the compute dtype; returns (student, teacher)."""
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2:
            raise GeokdError(
                f"{name}: {side} features must be 2-D [rows, width], got shape {tuple(x.shape)}; "
                "flatten tokens with the attention mask first"
            )
        if not x.is_floating_point():
            raise GeokdError(f"{name}: {side} features must be floating point, got {x.dtype}")
    if student.shape[0] != teacher.shape[0]:
        raise GeokdError(
            f"{name}: student and teacher need the same number of rows, got {student.shape[0]} "
            f"and {teacher.shape[0]}; pool or mask both sides the same way"
        )
    if student.shape[0] == 0:
        raise GeokdError(f"{name}: got 0 rows; a batch needs at least one example or token")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return student.to(dtype), teacher.to(dtype)


def center_and_scale(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre the rows of `x [n, d]` and, if `normalize`, scale to unit Frobenius norm.

    Returns `(x_tilde, nonzero, sq_norm)`: `nonzero` is a 0-d tensor, 1.0 when the centred matrix
    carries signal and 0.0 when it is zero up to rounding (constant or all-zero rows, or n = 1), in
    which case `x_tilde` is exactly zero and so is its gradient; `sq_norm` is `‖x_tilde‖²_F`
    (differentiable; exactly `nonzero` when normalised), so callers never need another pass over
    the n×d matrix. No host sync is needed.
    """
    mean = x.mean(dim=0, keepdim=True)  # [1, d]
    centered = x - mean  # [n, d]
    # Not torch.linalg.vector_norm: in float32 it is off by ~1e-6 relative on CPU, which shows
    # directly in D_P² = 2 − 2‖SᵀT‖_* near the optimum; a plain sum of squares is ~1e-8.
    sum_sq = centered.square().sum()
    norm = safe_sqrt(sum_sq)
    with torch.no_grad():  # ‖x‖² = ‖x − 1μᵀ‖² + n‖μ‖² (Pythagoras): no extra pass over x
        raw_norm = (sum_sq + x.shape[0] * mean.square().sum()).sqrt()
        floor = _NOISE_FLOOR_ULPS * torch.finfo(x.dtype).eps * raw_norm
    nonzero = norm > floor
    scale_if_ok = 1.0 / torch.where(nonzero, norm, torch.ones_like(norm))  # never divides by 0
    flag = nonzero.to(x.dtype)
    scale = torch.where(nonzero, scale_if_ok, torch.zeros_like(norm)) if normalize else flag
    sq_norm = flag if normalize else sum_sq * flag
    if centered.requires_grad:
        return centered * scale, flag, sq_norm
    return centered.mul_(scale), flag, sq_norm  # a constant (the teacher): no copy needed


def squared_norm64(x: torch.Tensor) -> torch.Tensor:
    """‖x‖²_F accumulated and returned in float64 (keeps the gradient). For the small d×d and n×n
    matrices whose squared norms enter a cancelling difference."""
    return x.double().square().sum()


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖²_F of a large matrix, summed in its own dtype (a sum of non-negative terms loses no
    digits to cancellation; a float64 copy of an n×d matrix would cost more than the loss), returned
    in float64 for the final scalar arithmetic."""
    return x.square().sum().double()


# --------------------------------------------------------------------------------------------
# Nuclear norm with the polar factor as its gradient
# --------------------------------------------------------------------------------------------


def nuclear_norm_and_polar(m: torch.Tensor, method: str = "eigh") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(‖m‖_*, P)` for `m [p, q]`: the nuclear norm in float64 and the polar factor
    `P = U Vᵀ` (restricted to numerically non-zero singular values) in `m`'s dtype.

    `P` is the minimum-norm subgradient of the nuclear norm: exactly the gradient when `m` has full
    rank, and a bounded, deterministic choice (spectral norm ≤ 1) when it does not, including
    `m = 0`. Singular-vector derivatives (the 1/(σᵢ² − σⱼ²) terms that make the built-in SVD
    backward blow up on repeated singular values) never appear.

    method:
      * "eigh" (default): eigen-decompose the smaller Gram matrix (`m mᵀ` or `mᵀ m`) in float64.
        float64 keeps σ accurate to ~1e-8·σ_max, well below float32 input noise, and a
        min(p,q)-sized symmetric eigensolve is 2-3× cheaper than an SVD of the p×q matrix
        (bench/losses.py measures both).
      * "svd": thin SVD of `m` in float64 (the reference formulation).
      * "svd32": thin SVD of `m` in float32, for GPUs whose float64 runs at 1/32-1/64 of float32
        (`default_nuclear_method`); σ to about 1e-6·σ_max (bench/nuclear_precision.py).
    """
    if method == "svd32":  # float32 thin SVD of m itself (no squared condition number)
        u, sigma, vh = torch.linalg.svd(m.detach().float(), full_matrices=False)
        p, q = m.shape
        # A float32 SVD resolves σ to about sqrt(k)·eps32·σ_max: smaller ones are rounding noise.
        keep = sigma > sigma.max() * (10.0 * math.sqrt(min(p, q)) * torch.finfo(torch.float32).eps)
        polar = (u * keep.to(u.dtype)) @ vh
        return (sigma.double() * keep).sum(), polar.to(m.dtype)
    m64 = m.detach().double()
    p, q = m64.shape
    if method == "svd":
        u, sigma, vh = torch.linalg.svd(m64, full_matrices=False)
        keep = sigma > _zero_singular_value_tol(sigma, p, q)
        polar = (u * keep.to(u.dtype)) @ vh
        return (sigma * keep).sum(), polar.to(m.dtype)
    if method != "eigh":
        raise ValueError(f"unknown nuclear-norm method {method!r}; use one of {', '.join(NUCLEAR_METHODS)}")
    wide = p <= q
    gram = m64 @ m64.T if wide else m64.T @ m64  # [k, k], k = min(p, q)
    evals, evecs = torch.linalg.eigh(gram)
    sigma = evals.clamp_min(0.0).sqrt()
    keep = sigma > _zero_singular_value_tol(sigma, p, q)
    inv_sigma = torch.where(
        keep, 1.0 / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma)
    )
    if wide:  # P = U Σ⁻¹ Uᵀ m, with U the left singular vectors
        polar = (evecs * inv_sigma) @ (evecs.T @ m64)
    else:  # P = m V Σ⁻¹ Vᵀ
        polar = (m64 @ evecs) * inv_sigma @ evecs.T
    return (sigma * keep).sum(), polar.to(m.dtype)


NUCLEAR_METHODS = ("eigh", "svd", "svd32")
# CUDA compute capabilities with full-rate float64 (P100, V100, A100, H100/H200, B100/B200): the
# float64 eigensolve stays. Every other CUDA GPU (GeForce, RTX workstation, L4, L40, A10, T4) runs
# float64 at 1/32-1/64 of float32 and gets "svd32".
FULL_RATE_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def default_nuclear_method(device: torch.device) -> str:
    """The nuclear-norm method for a device (overridden by GEOKD_NUCLEAR_METHOD): "eigh" (float64)
    on CPU and on data-centre GPUs with full-rate float64, "svd32" on GPUs without it. Accuracy of
    each against the float64 SVD: bench/nuclear_precision.py."""
    forced = os.environ.get("GEOKD_NUCLEAR_METHOD")
    if forced:
        if forced not in NUCLEAR_METHODS:
            raise GeokdError(f"GEOKD_NUCLEAR_METHOD: expected one of {', '.join(NUCLEAR_METHODS)}, got {forced!r}")
        return forced
    if device.type != "cuda":
        return "eigh"
    return "eigh" if torch.cuda.get_device_capability(device) in FULL_RATE_FLOAT64 else "svd32"


def _zero_singular_value_tol(sigma: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """Singular values below this count as zero, for both methods alike (so they agree): the Gram
    route resolves σ to about sqrt(k·eps64)·σ_max, and below that float32 inputs carry only
    rounding noise anyway (rank-deficient batches, n < d). They are left out of the value and of
    the subgradient."""
    return sigma.max() * (10.0 * math.sqrt(min(p, q) * torch.finfo(torch.float64).eps))


class _NuclearNorm(torch.autograd.Function):
    """‖m‖_* with backward `grad · U Vᵀ` (see `nuclear_norm_and_polar`)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, method: str) -> torch.Tensor:  # type: ignore[override]
        value, polar = nuclear_norm_and_polar(m, method)
        ctx.save_for_backward(polar)
        return value  # float64 0-d

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (polar,) = ctx.saved_tensors
        return grad.to(polar.dtype) * polar, None


def nuclear_norm(m: torch.Tensor, method: str = "eigh") -> torch.Tensor:
    """Differentiable nuclear norm of `m [p, q]` in float64 with the polar factor as gradient."""
    return _NuclearNorm.apply(m, method)


def cross_nuclear_norm(student: torch.Tensor, teacher: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """‖studentᵀ teacher‖_* in float64, differentiable in both arguments.

    When the batch has fewer rows than either width (n < min(d_s, d_t), sentence-level batches)
    and the teacher needs no gradient, the teacher's thin factor shrinks the problem:
    teacherᵀ = Q R with Q [d_t, n] orthonormal, so studentᵀ teacher = (studentᵀ Rᵀ) Qᵀ and
    ‖studentᵀ teacher‖_* = ‖studentᵀ Rᵀ‖_*, a d_s × n matrix whose eigen-problem is n × n instead
    of min(d_s, d_t) square (issue #2). For n ≥ d_s the eigen-problem would not shrink and the
    QR (2·d_t·n² flops) would only add cost (bench/losses.py).
    """
    method = method or default_nuclear_method(student.device)
    n, d_t = teacher.shape
    if n < min(student.shape[1], d_t) and not teacher.requires_grad:
        with torch.no_grad():
            r = torch.linalg.qr(teacher.T, mode="r")[1]  # [n, n], teacher = rᵀ qᵀ
        return nuclear_norm(student.T @ r.T, method)  # [d_s, n]
    return nuclear_norm(student.T @ teacher, method)  # [d_s, d_t]


# --------------------------------------------------------------------------------------------
# Gram-matrix differences
# --------------------------------------------------------------------------------------------


def use_row_gram(n: int, d_student: int, d_teacher: int) -> bool:
    """n×n Gram matrices are formed only when n ≤ the larger width; otherwise d×d cross-products."""
    return n <= max(d_student, d_teacher)


def gram_terms(
    student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return float64 `(‖SᵀS‖²_F, ‖TᵀT‖²_F, ‖SᵀT‖²_F)` = `(‖K_s‖², ‖K_t‖², ⟨K_s, K_t⟩)` using
    d×d cross-products only (for n > d), never n×n matrices."""
    if teacher.requires_grad:  # general case: plain autograd
        s_s = squared_norm64(student.T @ student)  # [d_s, d_s]
        s_t = squared_norm64(student.T @ teacher)  # [d_s, d_t]
        t_t = squared_norm64(teacher.T @ teacher)  # [d_t, d_t]
        return s_s, t_t, s_t
    s_s, s_t = _StudentGramTerms.apply(student, teacher)
    with torch.no_grad():
        t_t = symmetric_gram_sq_norm(teacher)
    return s_s, t_t, s_t


class _StudentGramTerms(torch.autograd.Function):
    """`(‖SᵀS‖²_F, ‖SᵀT‖²_F)` in float64 for a constant teacher, with a fused backward.

    Autograd would differentiate `SᵀS` through both of its operands (two n×d_s×d_s products);
    here `∂/∂S = 4·g_a·S A + 2·g_c·T Cᵀ` costs one product each (bench/losses.py, token level).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor):  # type: ignore[override]
        a = student.T @ student  # [d_s, d_s]
        c = student.T @ teacher  # [d_s, d_t]
        ctx.save_for_backward(student, teacher, a, c)
        return squared_norm64(a), squared_norm64(c)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_c: torch.Tensor):  # type: ignore[override]
        student, teacher, a, c = ctx.saved_tensors
        dtype = student.dtype
        grad = student @ (a * (4.0 * grad_a).to(dtype))  # [n, d_s]
        grad.addmm_(teacher, c.T * (2.0 * grad_c).to(dtype))
        return grad, None


def symmetric_gram_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖xᵀx‖²_F in float64, exploiting symmetry: with x = [x₁ x₂] split by columns,
    ‖xᵀx‖² = ‖x₁ᵀx₁‖² + 2‖x₁ᵀx₂‖² + ‖x₂ᵀx₂‖², three quarter-size products instead of four
    (the teacher's d_t × d_t Gram is the largest product of the d×d form)."""
    d = x.shape[1]
    if d < 256:
        return squared_norm64(x.T @ x)
    h = d // 2
    x1, x2 = x[:, :h], x[:, h:]
    return squared_norm64(x1.T @ x1) + 2.0 * squared_norm64(x1.T @ x2) + squared_norm64(x2.T @ x2)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt that is exactly 0 with a zero (not infinite or NaN) gradient at x ≤ 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def finish(value64: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cast a float64 scalar back to the loss's output dtype (float32, or float64 for float64 input)."""
    return value64.to(compute_dtype(like))
