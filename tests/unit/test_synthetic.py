"""The geometry benchmark (issue #2): pair statistics, the optimisation experiment and the CKA
counterexample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geokd import GeokdError
from geokd.losses import cka, gram, procrustes
from geokd.synthetic import (
    SyntheticConfig,
    centred_cosines,
    counterexample,
    counterexample_sets,
    greedy_max_set,
    orthogonal_pairs,
    preserved,
    run_synthetic,
)


def test_centred_cosines_and_pairs_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=gen)
    cos = centred_cosines(x)
    a = x.double().numpy()
    a = a - a.mean(0)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, a @ a.T, atol=1e-12)
    adj = orthogonal_pairs(cos, 0.2)
    assert not adj.diagonal().any() and (adj == adj.T).all()
    assert adj.sum() == ((np.abs(a @ a.T) <= 0.2).sum() - np.sum(np.abs(np.diag(a @ a.T)) <= 0.2))


def test_greedy_max_set_is_a_maximal_clique():
    gen = np.random.default_rng(0)
    upper = np.triu(gen.random((40, 40)) < 0.5, 1)
    adj = upper | upper.T
    size = greedy_max_set(adj)
    # Brute-force check on a small graph: a clique exists of this size and cannot be extended.
    assert size >= 2
    complete = np.ones((5, 5), dtype=bool)
    np.fill_diagonal(complete, False)
    assert greedy_max_set(complete) == 5
    assert greedy_max_set(np.zeros((5, 5), dtype=bool)) == 1


def test_preserved_counts_a_perfect_student_fully():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(50, 20, generator=gen)
    adj = orthogonal_pairs(centred_cosines(teacher), 0.1)
    q = torch.linalg.qr(torch.randn(20, 20, generator=gen))[0]
    pairs, max_set = preserved(adj, teacher @ q, 0.1)  # a rotation keeps every pair
    assert pairs == int(np.triu(adj).sum()) and max_set == greedy_max_set(adj)


@pytest.mark.parametrize("delta", [0.1])
def test_cka_counterexample_orders(delta):
    """Theorem 1 construction at δ = 0.1: CKA barely separates (b) from (a), O(δ⁴); Procrustes and
    Gram see the perturbation, O(δ²); all three are exactly blind to the copy (c) vs (a)."""
    config = SyntheticConfig(delta=delta, d_teacher=64, d_student=32, counterexample_n=32)
    result = counterexample(config)
    losses = result["losses"]
    for name in ("procrustes", "gram", "cka"):
        assert losses[name]["to_a"] == pytest.approx(0.0, abs=1e-12)
    assert losses["cka"]["order"] == pytest.approx(4.0, abs=0.1)
    assert losses["procrustes"]["order"] == pytest.approx(2.0, abs=0.1)
    assert losses["gram"]["order"] == pytest.approx(2.0, abs=0.1)
    assert losses["cka"]["to_b"] < delta**4
    for name in ("procrustes", "gram"):
        assert losses[name]["to_b"] > 1e3 * losses["cka"]["to_b"]
        assert losses[name]["to_b"] > delta**2 / 10


def test_counterexample_construction_and_closed_forms():
    n, delta = 32, 0.1
    a, b, c, p = counterexample_sets(n, 64, 32, delta, torch.Generator().manual_seed(0))
    assert p == 8 and a.shape == (n, 64) and c.shape == (n, 32)
    assert torch.allclose(a @ a.T, c @ c.T)  # (c) is an exact copy of (a)'s geometry
    moved = (b - a).abs().sum(1) > 0
    assert int(moved.sum()) == p
    e = (b - a)[moved]  # the moves: length δ, mutually orthogonal, orthogonal to the cluster axis
    torch.testing.assert_close(e @ e.T, delta**2 * torch.eye(p, dtype=torch.float64))
    torch.testing.assert_close(e @ a[0], torch.zeros(p, dtype=torch.float64))
    # Uncentred leading-order predictions (the clusters are balanced, the mean shift is O(δ/n)):
    # 1 − CKA ≈ δ⁴ p (n² − p) / (2 n⁴) and D_P² ≈ δ² p / n.
    assert float(cka(c, b)) == pytest.approx(delta**4 * p * (n**2 - p) / (2 * n**4), rel=0.2)
    assert float(procrustes(c, b)) == pytest.approx(delta**2 * p / n, rel=0.2)
    assert float(gram(c, b)) > 0


def test_optimisation_projection_preserves_clearly_fewer_pairs():
    config = SyntheticConfig(n=128, d_teacher=32, d_student=16, steps=300, log_every=50, seed=0)
    result = run_synthetic(config)
    losses = result["losses"]
    assert set(losses) == {"procrustes", "gram", "cka", "proj"}
    total = result["teacher"]["epsilon_orthogonal_pairs"]
    for name, entry in losses.items():
        assert entry["total_pairs"] == total
        assert 0 <= entry["preserved_pairs"] <= total
        hist = entry["history"]
        assert hist["step"][0] == 0 and hist["step"][-1] == config.steps
        assert hist["loss"][-1] < hist["loss"][0], name  # the optimisation did something
        assert hist["preserved_pairs"][-1] > hist["preserved_pairs"][0], name
    best_geometry = min(losses["procrustes"]["preserved_pairs"], losses["gram"]["preserved_pairs"])
    assert losses["proj"]["preserved_pairs"] < 0.95 * best_geometry


def test_optimisation_is_deterministic_for_a_seed():
    config = SyntheticConfig(
        n=40, d_teacher=16, d_student=8, steps=30, log_every=10, losses=("procrustes", "proj")
    )
    first, second = run_synthetic(config), run_synthetic(config)
    for name in config.losses:
        assert first["losses"][name]["history"] == second["losses"][name]["history"]


def test_under_complete_regime_runs():
    """n < d_t (every teacher pair can be near-orthogonal; sentence-level shapes and code paths)."""
    config = SyntheticConfig(n=24, d_teacher=48, d_student=16, steps=50, log_every=25)
    result = run_synthetic(config)
    for entry in result["losses"].values():
        assert math.isfinite(entry["final_loss"])


def test_config_validation_lists_every_problem():
    with pytest.raises(GeokdError) as info:
        SyntheticConfig(n=2, d_student=64, d_teacher=64, epsilon=1.5, losses=("mse",)).validate()
    message = str(info.value)
    for fragment in (
        "n must be at least 3, got 2",
        "d_student must be between 1 and d_teacher - 1 = 63",
        "epsilon must be in (0, 1), got 1.5",
        "losses must be a non-empty subset",
    ):
        assert fragment in message
