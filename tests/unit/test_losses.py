"""The loss library pinned against float64 references written from the definitions (issue #2).

References are independent of geokd's formulations: scipy's orthogonal Procrustes solver on
zero-padded matrices for D_P², explicit n×n Gram matrices for the Gram distance, and the HSIC form
with an explicit centring matrix for CKA.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from geokd import GeokdError
from geokd.losses import (
    FEATURE_LOSSES,
    build_feature_loss,
    cka,
    cosine,
    feature_loss_names,
    gram,
    kl,
    mse,
    procrustes,
    proj,
    row_loss_names,
    task_loss,
)
from geokd.losses._core import cross_nuclear_norm, nuclear_norm, nuclear_norm_and_polar

# ---------------------------------------------------------------------------------------------
# float64 references, straight from the definitions
# ---------------------------------------------------------------------------------------------


def _prep(x: torch.Tensor, normalize: bool) -> np.ndarray:
    a = x.detach().double().numpy()
    a = a - a.mean(axis=0, keepdims=True)
    if normalize:
        a = a / np.linalg.norm(a)
    return a


def ref_procrustes(s: torch.Tensor, t: torch.Tensor, normalize: bool = True) -> float:
    """min over orthogonal Q of ‖S_pad Q − T_pad‖²_F, solved by scipy on zero-padded inputs."""
    a, b = _prep(s, normalize), _prep(t, normalize)
    d = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, d - a.shape[1])))
    b = np.pad(b, ((0, 0), (0, d - b.shape[1])))
    q, _ = scipy.linalg.orthogonal_procrustes(a, b)
    return float(np.linalg.norm(a @ q - b) ** 2)


def ref_gram(s: torch.Tensor, t: torch.Tensor, normalize: bool = True) -> float:
    a, b = _prep(s, normalize), _prep(t, normalize)
    return float(np.linalg.norm(a @ a.T - b @ b.T))


def ref_cka(s: torch.Tensor, t: torch.Tensor) -> float:
    """1 − HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H), H = I − 11ᵀ/n."""
    a = s.detach().double().numpy()
    b = t.detach().double().numpy()
    n = a.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, ll = a @ a.T, b @ b.T

    def hsic(x, y):
        return np.trace(x @ h @ y @ h)

    return float(1.0 - hsic(k, ll) / math.sqrt(hsic(k, k) * hsic(ll, ll)))


REFERENCES = {"procrustes": ref_procrustes, "gram": ref_gram, "cka": ref_cka}
GEOMETRY = {"procrustes": procrustes, "gram": gram, "cka": cka}

# n < d (sentence level: n×n forms, thin teacher factor) and n > d (token level: d×d forms),
# d_s < d_t and d_s = d_t.
SHAPES = [(16, 24, 48), (16, 48, 48), (40, 8, 96), (300, 16, 32), (300, 32, 32), (1000, 24, 40)]


def _orthogonal(d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _pair(n, d_s, d_t, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d_s, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(n, d_t, generator=gen, dtype=torch.float64).to(dtype)
    return s, t


# ---------------------------------------------------------------------------------------------
# Agreement with the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
def test_geometry_losses_match_float64_reference(name, n, d_s, d_t):
    s, t = _pair(n, d_s, d_t, seed=n + d_s + d_t)
    out = GEOMETRY[name](s, t)
    assert out.dtype == torch.float32 and out.dim() == 0
    expected = REFERENCES[name](s, t)
    assert out.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
def test_unnormalized_procrustes_and_gram_match_reference(n, d_s, d_t):
    s, t = _pair(n, d_s, d_t, seed=7)
    s = 3.0 * s + 1.0  # scale and offset matter without normalisation (offset never does)
    assert procrustes(s, t, normalize=False).item() == pytest.approx(ref_procrustes(s, t, False), rel=1e-4)
    assert gram(s, t, normalize=False).item() == pytest.approx(ref_gram(s, t, False), rel=1e-4)


@pytest.mark.parametrize("n,d_s,d_t", [(16, 24, 48), (300, 16, 32)])
def test_teacher_with_grad_takes_the_full_path_and_agrees(n, d_s, d_t):
    s, t = _pair(n, d_s, d_t, seed=3)
    t = t.clone().requires_grad_(True)
    assert procrustes(s, t).item() == pytest.approx(ref_procrustes(s, t), rel=1e-4)
    assert gram(s, t).item() == pytest.approx(ref_gram(s, t), rel=1e-4)
    assert cka(s, t).item() == pytest.approx(ref_cka(s, t), rel=1e-4)


def test_procrustes_range_and_definition_as_min_over_rotations():
    s, t = _pair(50, 20, 30, seed=11)
    value = procrustes(s, t).item()
    assert 0.0 <= value <= 4.0
    # Any particular orthogonal map gives an upper bound on the minimum.
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor(_prep(s, True))
    b = torch.tensor(_prep(t, True))
    a_pad = F.pad(a, (0, 10))
    for _ in range(5):
        q = _orthogonal(30, gen, torch.float64)
        assert value <= ((a_pad @ q - b) ** 2).sum().item() + 1e-6


@pytest.mark.parametrize("method", ["eigh", "svd"])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (20, 20)])
def test_nuclear_norm_value_and_polar_factor_match_numpy_svd(method, shape):
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(*shape, generator=gen, dtype=torch.float64)
    value, polar = nuclear_norm_and_polar(m, method)
    u, sigma, vt = np.linalg.svd(m.numpy(), full_matrices=False)
    assert value.item() == pytest.approx(sigma.sum(), rel=1e-10)
    np.testing.assert_allclose(polar.numpy(), u @ vt, atol=1e-8)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (20, 20)])
def test_float32_svd_method_matches_numpy_svd(shape):
    """"svd32" (the method for GPUs with slow float64) on float32 input."""
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(*shape, generator=gen)
    value, polar = nuclear_norm_and_polar(m, "svd32")
    u, sigma, vt = np.linalg.svd(m.double().numpy(), full_matrices=False)
    assert value.dtype == torch.float64 and polar.dtype == torch.float32
    assert value.item() == pytest.approx(sigma.sum(), rel=1e-6)
    np.testing.assert_allclose(polar.numpy(), u @ vt, atol=2e-5)


@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
def test_procrustes_with_the_float32_svd_matches_the_float64_reference(n, d_s, d_t, monkeypatch):
    monkeypatch.setenv("GEOKD_NUCLEAR_METHOD", "svd32")
    s, t = _pair(n, d_s, d_t, seed=n + d_s + d_t)
    assert procrustes(s, t).item() == pytest.approx(ref_procrustes(s, t), rel=1e-4)
    # near the optimum (student = rotated teacher + small noise), where the loss is small
    gen = torch.Generator().manual_seed(3)
    close = t[:, :d_s] @ _orthogonal(d_s, gen) + 1e-3 * torch.randn(n, d_s, generator=gen)
    assert procrustes(close, t[:, :d_s]).item() == pytest.approx(ref_procrustes(close, t[:, :d_s]), rel=1e-3, abs=1e-6)


def test_nuclear_method_by_device(monkeypatch):
    from geokd.losses._core import default_nuclear_method

    assert default_nuclear_method(torch.device("cpu")) == "eigh"
    monkeypatch.setenv("GEOKD_NUCLEAR_METHOD", "svd")
    assert default_nuclear_method(torch.device("cpu")) == "svd"
    monkeypatch.setenv("GEOKD_NUCLEAR_METHOD", "qr")
    with pytest.raises(GeokdError, match="GEOKD_NUCLEAR_METHOD: expected one of eigh, svd, svd32, got 'qr'"):
        default_nuclear_method(torch.device("cpu"))


def test_thin_teacher_factor_gives_the_same_value_and_gradient():
    s, t = _pair(16, 40, 96, seed=5, dtype=torch.float64)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    thin = cross_nuclear_norm(s1, t)  # n < min(d_s, d_t), teacher without grad -> thin factor
    full = nuclear_norm(s2.T @ t)
    torch.testing.assert_close(thin, full)
    thin.backward()
    full.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n,d_s,d_t", [(16, 24, 48), (300, 16, 32)])
def test_rotation_of_either_side_leaves_geometry_losses_unchanged(name, n, d_s, d_t):
    gen = torch.Generator().manual_seed(2)
    s, t = _pair(n, d_s, d_t, seed=9)
    fn = GEOMETRY[name]
    base = fn(s, t).item()
    assert fn(s @ _orthogonal(d_s, gen), t).item() == pytest.approx(base, rel=1e-4, abs=1e-6)
    assert fn(s, t @ _orthogonal(d_t, gen)).item() == pytest.approx(base, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", list(GEOMETRY))
def test_translation_scale_and_consistent_row_permutation_invariance(name):
    s, t = _pair(24, 12, 20, seed=4)
    fn = GEOMETRY[name]
    base = fn(s, t).item()
    shift = torch.randn(1, 12)
    assert fn(s + shift, t).item() == pytest.approx(base, rel=1e-4)
    assert fn(7.5 * s, 0.01 * t).item() == pytest.approx(base, rel=1e-4)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert fn(s[perm], t[perm]).item() == pytest.approx(base, rel=1e-4)
    # ...but permuting one side only changes the geometry.
    assert abs(fn(s[perm], t).item() - base) > 1e-3


def test_cka_is_scale_invariant_even_for_the_d_form():
    s, t = _pair(400, 16, 24, seed=8)  # n > d: d×d form
    assert cka(1e3 * s, 1e-3 * t).item() == pytest.approx(cka(s, t).item(), rel=1e-4)


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n,d", [(16, 32), (300, 32)])
def test_identical_and_rotated_inputs_give_zero(name, n, d):
    gen = torch.Generator().manual_seed(6)
    t = torch.randn(n, d, generator=gen)
    fn = GEOMETRY[name]
    assert fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-5)
    # The rotated copy is rounded to float32, and in the d×d form (n > d) the Gram distance is the
    # square root of a float32-rounded difference: its floor is ~sqrt(eps32)·‖K‖ ≈ 1e-5, not 0.
    tol = 1e-4 if (name == "gram" and n > d) else 1e-5
    assert fn(t @ _orthogonal(d, gen), t).item() == pytest.approx(0.0, abs=tol)


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n", [24, 400])
def test_narrower_exact_copy_gives_zero(name, n):
    """A student holding the teacher's geometry in fewer dimensions (zero-padding equivalence)."""
    gen = torch.Generator().manual_seed(12)
    s = torch.randn(n, 10, generator=gen)
    t = F.pad(s, (0, 22)) @ _orthogonal(32, gen)  # same geometry, embedded in 32 dims
    tol = 2e-4 if (name == "gram" and n > 32) else 1e-5  # sqrt floor of the d×d form, see above
    assert GEOMETRY[name](s, t).item() == pytest.approx(0.0, abs=tol)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n,d_s,d_t", [(6, 8, 10), (6, 4, 4), (12, 3, 5)])
def test_gradcheck_geometry_losses_in_float64(name, n, d_s, d_t):
    s, t = _pair(n, d_s, d_t, seed=13, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = GEOMETRY[name]
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-5)
    t_fixed = t.detach()  # the thin-factor path (n < d_t, teacher without grad)
    assert torch.autograd.gradcheck(lambda x: fn(x, t_fixed), (s,), eps=1e-6, atol=1e-5)


def test_gradcheck_row_wise_and_logit_losses_in_float64():
    s, t = _pair(5, 4, 4, seed=14, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64)
    for x in (s, t, w):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(proj, (s, t, w))
    assert torch.autograd.gradcheck(mse, (s, t))
    assert torch.autograd.gradcheck(cosine, (s, t))
    logits = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kl(a, b, 2.0), (logits, teacher_logits))


def _degenerate_students(n: int, d: int, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    u = torch.randn(n, 1, generator=gen)
    v = torch.randn(1, d, generator=gen)
    half = torch.randn(n // 2, d, generator=gen)
    q = torch.linalg.qr(torch.randn(n, d, generator=gen))[0] if n >= d else None
    cases = {
        "rank1": u @ v,
        "duplicate_rows": torch.cat([half, half]),
        "all_zero": torch.zeros(n, d),
        "constant": torch.full((n, d), 0.3),
        "constant_rows_value": torch.ones(n, 1) @ v,
        "equal_to_teacher": teacher[:, :d].clone(),
    }
    if q is not None:
        cases["repeated_singular_values"] = 2.0 * q  # all singular values equal
    return cases


@pytest.mark.parametrize("name", row_loss_names())
@pytest.mark.parametrize("n,d", [(8, 16), (64, 16)])
def test_gradients_finite_and_bounded_on_degenerate_inputs(name, n, d):
    gen = torch.Generator().manual_seed(22)
    teacher = torch.randn(n, d, generator=gen)
    loss_fn = build_feature_loss(name, d, d)
    for case, student in _degenerate_students(n, d, teacher).items():
        for t in (teacher, student.detach().clone()):  # also: teacher equal to the student
            x = student.clone().requires_grad_(True)
            value = loss_fn(x, t)
            value.backward()
            assert torch.isfinite(value), (name, case)
            assert torch.isfinite(x.grad).all(), (name, case)
            assert x.grad.abs().max().item() < 1e3, (name, case, x.grad.abs().max().item())


@pytest.mark.parametrize("name", row_loss_names())
def test_single_row_is_finite_with_zero_geometry(name):
    student = torch.randn(1, 8, requires_grad=True)
    teacher = torch.randn(1, 8)
    value = build_feature_loss(name, 8, 8)(student, teacher)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    if name in ("procrustes", "gram"):
        assert value.item() == 0.0  # one row has no geometry to disagree on
        assert student.grad.abs().max().item() == 0.0


def test_degenerate_values_are_the_limits_of_the_definitions():
    teacher = torch.randn(20, 12, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros(20, 8)
    # Procrustes from nothing to a unit-norm teacher: 1; Gram: ‖K_t‖_F; CKA: 0 -> loss 1.
    assert procrustes(zero, teacher).item() == pytest.approx(1.0)
    k_t = _prep(teacher, True) @ _prep(teacher, True).T
    assert gram(zero, teacher).item() == pytest.approx(np.linalg.norm(k_t), rel=1e-4)
    assert cka(zero, teacher).item() == pytest.approx(1.0)


def test_repeated_singular_values_gradient_matches_float64_polar_factor():
    """Built-in SVD backward divides by σᵢ² − σⱼ²; ours must give U Vᵀ regardless."""
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(32, 8, generator=gen, dtype=torch.float64))[0]
    m = (q.T @ torch.linalg.qr(torch.randn(32, 8, generator=gen, dtype=torch.float64))[0]).requires_grad_(
        True
    )
    nuclear_norm(m).backward()  # m is orthogonal: all σ = 1
    u, _, vt = np.linalg.svd(m.detach().numpy())
    np.testing.assert_allclose(m.grad.numpy(), u @ vt, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Dtypes and accuracy near the optimum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", row_loss_names())
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [16, 300])
def test_half_precision_inputs_are_upcast(name, low, n):
    s, t = _pair(n, 32, 32, seed=15)
    s, t = s.to(low), t.to(low)
    fn = build_feature_loss(name, 32, 32)
    out_low = fn(s, t)
    out_ref = fn(s.float(), t.float())
    assert out_low.dtype == torch.float32
    torch.testing.assert_close(out_low, out_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(GEOMETRY))
@pytest.mark.parametrize("n,d_s,d_t", [(32, 64, 64), (32, 48, 64), (4096, 48, 64), (2000, 64, 64)])
def test_accuracy_near_the_optimum(name, n, d_s, d_t):
    gen = torch.Generator().manual_seed(16)
    t = torch.randn(n, d_t, generator=gen)
    s = t[:, :d_s] + 1e-2 * torch.randn(n, d_s, generator=gen)
    if d_s < d_t:  # keep the student near-optimal: teacher lives in the student's subspace
        t = F.pad(t[:, :d_s], (0, d_t - d_s)) @ _orthogonal(d_t, gen)
    expected = REFERENCES[name](s, t)
    assert expected > 0
    assert GEOMETRY[name](s, t).item() == pytest.approx(expected, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Row-wise baselines, logit KD, task loss, registry
# ---------------------------------------------------------------------------------------------


def test_row_wise_losses_match_definitions():
    s, t = _pair(10, 6, 6, seed=17, dtype=torch.float64)
    w = torch.randn(6, 6, dtype=torch.float64)
    a, b, m = s.numpy(), t.numpy(), w.numpy()
    assert proj(s, t, w).item() == pytest.approx(np.sum((a @ m - b) ** 2) / 10)
    assert mse(s, t).item() == pytest.approx(np.sum((a - b) ** 2) / 10)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine(s, t).item() == pytest.approx(np.mean(1 - cos))


def test_kl_matches_reference_with_temperature_squared_scaling():
    gen = torch.Generator().manual_seed(18)
    s = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    tau = 3.0

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(t.numpy() / tau), softmax(s.numpy() / tau)
    expected = tau**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert kl(s, t, tau).item() == pytest.approx(expected, rel=1e-10)
    assert kl(t.float(), t.float(), tau).item() == pytest.approx(0.0, abs=1e-6)
    assert kl(s.float(), t.float(), tau).dtype == torch.float32
    with pytest.raises(GeokdError, match="temperature"):
        kl(s, t, 0.0)


def test_task_loss_classification_and_regression():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + np.exp(-1))), np.log(0.5)])
    assert task_loss(logits, labels).item() == pytest.approx(expected)
    reg = torch.tensor([[1.0], [3.0]])
    assert task_loss(reg, torch.tensor([2.0, 2.0])).item() == pytest.approx(1.0)


def test_registry_names_and_modules():
    assert feature_loss_names() == ["procrustes", "gram", "cka", "proj", "mse", "cosine", "flexkd", "rkd", "spkd",
                                    "attn", "attn-relation"]
    assert row_loss_names() == feature_loss_names()[:-2]
    s, t = _pair(12, 8, 16, seed=19)
    for name in ("procrustes", "gram", "cka"):
        assert build_feature_loss(name, 8, 16)(s, t).item() == pytest.approx(GEOMETRY[name](s, t).item())
    projection = build_feature_loss("proj", 8, 16)
    assert [p.shape for p in projection.parameters()] == [torch.Size([8, 16])]
    assert projection(s, t).item() == pytest.approx(proj(s, t, projection.weight).item())
    assert set(FEATURE_LOSSES) == set(feature_loss_names())
    tangent = build_feature_loss("flexkd", 8, 16, basis="tangent")  # its selection is a buffer, not a parameter
    assert list(tangent.parameters()) == [] and tangent.basis.shape == (16, 8)


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_pointwise_losses_refuse_unequal_widths(name):
    with pytest.raises(GeokdError, match=r"needs equal widths, got student 8 and teacher 16; use proj"):
        build_feature_loss(name, 8, 16)


def test_unknown_loss_and_bad_shapes_are_user_errors():
    with pytest.raises(GeokdError, match="unknown loss 'ckaa'; choose one of: procrustes, gram, cka"):
        build_feature_loss("ckaa", 8, 8)
    with pytest.raises(GeokdError, match="same number of rows, got 4 and 5"):
        procrustes(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(GeokdError, match=r"must be 2-D"):
        gram(torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    with pytest.raises(GeokdError, match="0 rows"):
        cka(torch.randn(0, 3), torch.randn(0, 3))


def test_projection_loss_learns_a_linear_map():
    gen = torch.Generator().manual_seed(20)
    s = torch.randn(64, 8, generator=gen)
    t = s @ torch.randn(8, 16, generator=gen)
    loss_fn = build_feature_loss("proj", 8, 16)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    first = loss_fn(s, t).item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(s, t)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


# ---------------------------------------------------------------------------------------------
# Cost: no n×n matrix at token level
# ---------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the shapes and the largest size (in elements) of every tensor produced by an op,
    forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("name", list(GEOMETRY))
def test_token_level_losses_never_materialise_n_by_n(name):
    n, d_s, d_t = 3000, 16, 24  # n > both widths: an n×n matrix would have 9e6 elements
    s, t = _pair(n, d_s, d_t, seed=23)
    s.requires_grad_(True)
    with _LargestOutput() as mode:
        GEOMETRY[name](s, t).backward()
    assert (n, n) not in mode.shapes
    assert mode.largest <= n * max(d_s, d_t)  # nothing bigger than the inputs themselves


@pytest.mark.parametrize("name", list(GEOMETRY))
def test_sentence_level_uses_the_n_by_n_form(name):
    """The n×n form is the accurate one; it is used whenever n ≤ the larger width (and for
    Procrustes the thin teacher factor when n < both widths)."""
    n, d_s, d_t = 20, 32, 48
    s, t = _pair(n, d_s, d_t, seed=24)
    with _LargestOutput() as mode:
        GEOMETRY[name](s, t)
    if name == "procrustes":  # the thin factor reduces the problem to n × n as well
        assert mode.largest <= n * d_t
    assert (n, n) in mode.shapes
