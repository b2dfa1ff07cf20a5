"""Issue #15, the relational losses: `rkd` (Park et al. 2019) and `spkd` (Tung & Mori 2019) against
float64 references written from the papers' definitions, their invariances, gradient checks, and
bounded gradients on degenerate input."""

from __future__ import annotations

import itertools

import pytest
import torch

from geokd.errors import GeokdError
from geokd.losses import relational
from geokd.losses.registry import build_feature_loss
from geokd.losses.relational import rkd, spkd


def _random(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_random(d, d, seed))
    return q


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def rkd_reference(s: torch.Tensor, t: torch.Tensor) -> float:
    """Straight from Park et al.: ψ_D = ‖x_i − x_j‖/μ, μ the mean over pairs; ψ_A = ⟨e_ij, e_kj⟩;
    Huber (δ = 1); mean over ordered pairs i ≠ j and over distinct triplets; λ_D = 1, λ_A = 2."""
    n = s.shape[0]

    def potentials(x):
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        dist = {p: float(torch.linalg.norm(x[p[0]] - x[p[1]])) for p in pairs}
        mu = sum(dist.values()) / len(pairs)
        psi_d = {p: dist[p] / mu for p in pairs}
        psi_a = {}
        for i, j, k in itertools.permutations(range(n), 3):
            e_ij = (x[i] - x[j]) / torch.linalg.norm(x[i] - x[j])
            e_kj = (x[k] - x[j]) / torch.linalg.norm(x[k] - x[j])
            psi_a[(i, j, k)] = float(e_ij @ e_kj)
        return psi_d, psi_a

    sd, sa = potentials(s)
    td, ta = potentials(t)
    distance = sum(_huber(sd[p] - td[p]) for p in sd) / len(sd)
    angle = sum(_huber(sa[p] - ta[p]) for p in sa) / len(sa)
    return distance + 2.0 * angle


def spkd_reference(s: torch.Tensor, t: torch.Tensor) -> float:
    """Tung & Mori: G = Q Qᵀ, row-wise L2 normalisation, ‖Ĝ_t − Ĝ_s‖²_F / b²."""
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        gs = torch.stack([s[i] @ s[j] for j in range(n)])
        gt = torch.stack([t[i] @ t[j] for j in range(n)])
        total += float(((gs / gs.norm() - gt / gt.norm()) ** 2).sum())
    return total / n**2


# -------------------------------------------------------------------------------------------- rkd


@pytest.mark.parametrize("n, d_s, d_t", [(6, 4, 9), (9, 12, 3), (3, 2, 2)])
def test_rkd_matches_the_reference(n, d_s, d_t):
    s, t = _random(n, d_s, 1), _random(n, d_t, 2)
    assert float(rkd(s, t)) == pytest.approx(rkd_reference(s, t), rel=1e-10, abs=1e-12)


def test_rkd_huber_is_in_its_linear_branch_too():
    s, t = _random(6, 3, 3), _random(6, 3, 4)
    t[0] *= 40.0  # a far outlier: normalised distance differences above 1
    assert float(rkd(s, t)) == pytest.approx(rkd_reference(s, t), rel=1e-10)


def test_rkd_float32_close_to_float64():
    s, t = _random(32, 24, 5), _random(32, 48, 6)
    assert float(rkd(s.float(), t.float())) == pytest.approx(float(rkd(s, t)), rel=1e-4)


def test_rkd_invariances():
    s, t = _random(8, 5, 7), _random(8, 6, 8)
    base = float(rkd(s, t))
    assert float(rkd(s @ _orthogonal(5, 9), t)) == pytest.approx(base, rel=1e-9)  # rotation
    assert float(rkd(s, t @ _orthogonal(6, 10))) == pytest.approx(base, rel=1e-9)
    assert float(rkd(3.5 * s + 2.0, t)) == pytest.approx(base, rel=1e-9)  # scale and translation
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert float(rkd(s[perm], t[perm])) == pytest.approx(base, rel=1e-9)  # row order
    assert float(rkd(t, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(rkd(t @ _orthogonal(6, 11), t)) == pytest.approx(0.0, abs=1e-12)
    assert float(rkd(s, t)) > 0.01


def test_rkd_distance_and_angle_weights():
    s, t = _random(6, 4, 12), _random(6, 4, 13)
    d = float(rkd(s, t, angle_weight=0.0))
    a = float(rkd(s, t, distance_weight=0.0, angle_weight=1.0))
    assert float(rkd(s, t)) == pytest.approx(d + 2.0 * a, rel=1e-12)


def test_rkd_gradcheck():
    s = _random(5, 3, 14).requires_grad_(True)
    t = _random(5, 4, 15)
    assert torch.autograd.gradcheck(lambda x: rkd(x, t), (s,))


def test_rkd_chunked_angle_term_matches_one_chunk(monkeypatch):
    s, t = _random(12, 5, 16).requires_grad_(True), _random(12, 7, 17)
    value = rkd(s, t)
    (grad,) = torch.autograd.grad(value, s)
    # force one vertex per chunk (each recomputed in the backward pass)
    monkeypatch.setattr(relational, "_angle_term", _one_vertex_chunks(relational._angle_term))
    s2 = s.detach().clone().requires_grad_(True)
    value2 = rkd(s2, t)
    (grad2,) = torch.autograd.grad(value2, s2)
    assert float(value2) == pytest.approx(float(value), rel=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=1e-10, atol=1e-12)


def _one_vertex_chunks(original):
    def angle_term(g_s, d_s, g_t, d_t):
        n = g_s.shape[0]
        total = g_s.new_zeros((), dtype=torch.float64)
        for j in range(n):
            vertices = torch.tensor([j])
            total = total + torch.utils.checkpoint.checkpoint(
                relational._angle_chunk, g_s, d_s, g_t, d_t, vertices, use_reentrant=False
            )
        return total / (n * (n - 1) * (n - 2))

    return angle_term


def test_rkd_degenerate_inputs_give_bounded_gradients():
    t = _random(6, 4, 18)
    for student in (torch.zeros(6, 4), torch.ones(6, 4) * 3.0, _random(1, 4, 19).repeat(6, 1).float()):
        s = student.clone().requires_grad_(True)
        value = rkd(s, t.float())
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e3
    # two coincident rows among distinct ones
    s = _random(6, 4, 20).float()
    s[1] = s[0]
    s.requires_grad_(True)
    rkd(s, t.float()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e3
    one = _random(1, 4, 21).requires_grad_(True)
    assert float(rkd(one, t[:1])) == 0.0


def test_rkd_refuses_too_many_rows_in_one_line(monkeypatch):
    monkeypatch.setattr(relational, "RKD_MAX_ROWS", 16)
    with pytest.raises(GeokdError, match="17 rows .*at most 16.*--features cls or mean"):
        rkd(torch.randn(17, 3), torch.randn(17, 3))


# ------------------------------------------------------------------------------------------- spkd


@pytest.mark.parametrize("n, d_s, d_t", [(6, 8, 10), (40, 5, 7), (12, 12, 3)])
def test_spkd_matches_the_reference_in_both_forms(n, d_s, d_t):
    """n ≤ max(d): the n×n matrices; n > max(d): the d×d form that never forms n×n."""
    s, t = _random(n, d_s, 22), _random(n, d_t, 23)
    assert float(spkd(s, t)) == pytest.approx(spkd_reference(s, t), rel=1e-10, abs=1e-13)


def test_spkd_forms_agree_in_float32_at_scale():
    s, t = _random(600, 32, 24), _random(600, 64, 25)
    reference = spkd_reference(s[:60], t[:60])
    assert float(spkd(s[:60].float(), t[:60].float())) == pytest.approx(reference, rel=1e-4)
    assert float(spkd(s.float(), t.float())) == pytest.approx(float(spkd(s, t)), rel=1e-4)


def test_spkd_invariances():
    for n in (6, 40):  # both forms
        s, t = _random(n, 5, 26), _random(n, 9, 27)
        base = float(spkd(s, t))
        assert float(spkd(s @ _orthogonal(5, 28), t)) == pytest.approx(base, rel=1e-9)
        assert float(spkd(s, 0.01 * t @ _orthogonal(9, 29))) == pytest.approx(base, rel=1e-9)
        assert float(spkd(t, t)) == pytest.approx(0.0, abs=1e-12)
        assert float(spkd(s + 1.0, t)) != pytest.approx(base, rel=1e-3)  # no centring (as the paper)
        assert base > 1e-3


def test_spkd_gradcheck_both_forms():
    for n, d in ((4, 6), (9, 3)):
        s = _random(n, d, 30).requires_grad_(True)
        t = _random(n, d + 1, 31)
        assert torch.autograd.gradcheck(lambda x, t=t: spkd(x, t), (s,))


def test_spkd_zero_rows_and_zero_inputs_are_finite():
    t = _random(8, 4, 32).float()
    for n_rows in (8, 3):
        s = _random(8, 4 if n_rows == 8 else 2, 33).float()
        s[2] = 0.0
        s.requires_grad_(True)
        value = spkd(s, t)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e2
    z = torch.zeros(8, 4, requires_grad=True)
    value = spkd(z, t)
    value.backward()
    assert float(value) == pytest.approx(1.0 / 8)  # every Ĝ_t row (unit norm) against a zero row: 8 / 64
    assert torch.isfinite(z.grad).all()


def test_registry_builds_both_at_any_widths():
    for name in ("rkd", "spkd"):
        loss = build_feature_loss(name, 7, 13)
        value = loss(torch.randn(10, 7), torch.randn(10, 13))
        assert value.dtype == torch.float32 and value.ndim == 0 and float(value) > 0
