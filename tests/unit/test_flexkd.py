"""Flex-KD's math (issue #13): the per-dimension Pearson loss against scipy, its invariances and
its zero set, finite gradients on constant and duplicate columns, the scoring's selection on a
constructed teacher whose output reads a known subset of dimensions, the tangent basis of
gradients confined to a known subspace, and the selection surviving a state_dict round trip."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from geokd import GeokdError
from geokd import flexkd as flexkd_lib
from geokd.losses.flexkd import DimensionScores, FlexKDLoss, pearson_alignment


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def reference(s: torch.Tensor, t: torch.Tensor) -> float:
    corrs = [stats.pearsonr(s[:, i].numpy(), t[:, i].numpy()).statistic for i in range(s.shape[1])]
    return 1.0 - sum(corrs) / len(corrs)


def test_pearson_alignment_matches_scipy():
    s, t = _rows(40, 7, 1), _rows(40, 7, 2)
    s = s + 0.8 * t  # correlated, not identical
    torch.testing.assert_close(pearson_alignment(s, t), torch.tensor(reference(s, t), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    got32 = pearson_alignment(s.float(), t.float())
    assert got32.dtype == torch.float32 and abs(float(got32) - reference(s, t)) < 1e-5


def test_pearson_alignment_invariances_and_zero_set():
    s, t = _rows(30, 5, 3), _rows(30, 5, 4)
    base = pearson_alignment(s, t)
    scale, shift = torch.rand(5, dtype=torch.float64) * 3 + 0.1, torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(pearson_alignment(s * scale + shift, t), base)  # per-dimension positive affine
    torch.testing.assert_close(pearson_alignment(s, t * scale - shift), base)
    perm = torch.randperm(30)
    torch.testing.assert_close(pearson_alignment(s[perm], t[perm]), base)  # rows are a set
    assert float(pearson_alignment(t * scale + shift, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(pearson_alignment(-t, t)) == pytest.approx(2.0, abs=1e-12)  # the sign matters
    assert 0.0 <= float(base) <= 2.0


def test_gradients_are_finite_on_constant_and_duplicate_columns():
    t = _rows(16, 4, 5)
    s = _rows(16, 4, 6)
    s[:, 1] = 3.0  # a constant column
    s[:, 3] = s[:, 2]  # a duplicate column
    s.requires_grad_(True)
    loss = pearson_alignment(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[:, 1], torch.zeros(16, dtype=torch.float64))  # correlation 0, gradient 0
    # the constant column counts as correlation 0
    expected = 1.0 - (sum(stats.pearsonr(s.detach()[:, i].numpy(), t[:, i].numpy()).statistic for i in (0, 2, 3))) / 4
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    t_const = t.clone()
    t_const[:, 0] = -1.0
    assert torch.isfinite(pearson_alignment(_rows(16, 4, 7), t_const))


def test_scoring_selects_exactly_the_dimensions_the_output_reads():
    """A teacher head that reads only dimensions {2, 5, 11, 17} of a 24-wide layer."""
    torch.manual_seed(0)
    used = [2, 5, 11, 17]
    head = torch.nn.Sequential(torch.nn.Linear(len(used), 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    scores = DimensionScores(24)
    for seed in range(5):
        h = _rows(32, 24, 10 + seed).requires_grad_(True)
        logits = head(h[:, used])
        own = logits.argmax(dim=-1)  # the task output: the loss of the teacher's own prediction
        loss = torch.nn.functional.cross_entropy(logits, own, reduction="sum")
        (grad,) = torch.autograd.grad(loss, h)
        scores.update(grad)
    assert scores.select(4).tolist() == used
    assert scores.select(30).tolist() == list(range(24))  # d_s >= d_t: every dimension
    assert scores.rows == 160


def test_tangent_basis_spans_the_gradient_subspace():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))
    scores = DimensionScores(12, tangent=True)
    for _ in range(4):
        scores.update(torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0]) @ q.T)
    u = scores.basis(3)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(u @ u.T, q @ q.T, rtol=0, atol=1e-8)  # the same subspace
    assert (u.gather(0, u.abs().argmax(dim=0, keepdim=True)) > 0).all()  # deterministic signs
    torch.testing.assert_close(scores.basis(3), u)
    with pytest.raises(GeokdError, match="tangent statistics"):
        DimensionScores(12).basis(3)
    with pytest.raises(GeokdError, match="no gradient rows"):
        DimensionScores(12).select(3)


def test_flexkd_loss_zero_for_the_selected_teacher_subspace_and_resume_keeps_the_selection():
    t = _rows(20, 10, 8)
    loss = FlexKDLoss(4, 10)
    loss.set_selection(torch.tensor([1, 4, 6, 9]))
    student = t[:, [1, 4, 6, 9]] * torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64) + 1.0
    assert float(loss(student, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(t[:, :4], t)) > 0.1  # another subspace
    restored = FlexKDLoss(4, 10)
    restored.load_state_dict(loss.state_dict())
    assert restored.index.tolist() == [1, 4, 6, 9]

    q, _ = torch.linalg.qr(_rows(10, 4, 9))
    tangent = FlexKDLoss(4, 10, basis="tangent")
    tangent.set_selection(q)
    assert float(tangent(t @ q, t)) == pytest.approx(0.0, abs=1e-6)  # float32 buffer
    restored = FlexKDLoss(4, 10, basis="tangent")
    restored.load_state_dict(tangent.state_dict())
    torch.testing.assert_close(restored.basis, q.float())

    wide = FlexKDLoss(16, 10)  # d_s >= d_t: all teacher dimensions, the student's first 10 columns
    assert float(wide(torch.cat([t, _rows(20, 6, 10)], dim=1), t)) == pytest.approx(0.0, abs=1e-12)
    for bad in (torch.tensor([1, 1, 2, 3]), torch.tensor([0, 1, 2, 10]), torch.tensor([0.0, 1.0, 2.0, 3.0])):
        with pytest.raises(GeokdError, match="distinct indices"):
            FlexKDLoss(4, 10).set_selection(bad)
    with pytest.raises(GeokdError, match="columns"):
        pearson_alignment(_rows(5, 3, 1), _rows(5, 4, 2))


def test_selected_correlation_is_the_mean_pearson_correlation_with_the_selected_subspace():
    from geokd.flexkd import selected_correlation

    s, t = _rows(25, 3, 11), _rows(25, 8, 12)
    s = s + t[:, [0, 4, 6]]
    expected = sum(stats.pearsonr(s[:, i].numpy(), t[:, j].numpy()).statistic for i, j in enumerate([0, 4, 6])) / 3
    assert selected_correlation(s, t, torch.tensor([0, 4, 6])) == pytest.approx(expected, abs=1e-12)
    basis = torch.eye(8, dtype=torch.float64)[:, [0, 4, 6]]  # the coordinate basis: the same numbers
    assert selected_correlation(s, t, basis) == pytest.approx(expected, abs=1e-12)
    assert selected_correlation(s[:, :2], t, torch.tensor([0, 4, 6])) is None  # narrower than the selection


def test_pair_with_origin_pairs_a_pruned_channel_with_its_own_teacher_channel():
    # selected teacher dims 2, 3, 5, 8; the student's channels were cut from 0, 2, 6, 8: channels 1 and 3 keep
    # their own teacher channel, 0 and 2 take the selected dims no channel came from (3, 5), ascending
    paired = flexkd_lib.pair_with_origin(torch.tensor([2, 3, 5, 8]), [0, 2, 6, 8])
    assert paired.tolist() == [3, 2, 5, 8]  # the ascending pairing would give 2 to channel 0, 3 to channel 1
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        chosen = torch.randperm(40, generator=g)[:15].sort().values
        origin = torch.randperm(40, generator=g)[:15].sort().values.tolist()
        paired = flexkd_lib.pair_with_origin(chosen, origin)
        assert sorted(paired.tolist()) == chosen.tolist()  # the same teacher subspace
        assert all(p == o for p, o in zip(paired.tolist(), origin, strict=True) if o in set(chosen.tolist()))
    same = torch.tensor([1, 4, 7])
    assert flexkd_lib.pair_with_origin(same, [1, 4, 7]).tolist() == [1, 4, 7]  # selections coincide: unchanged
    with pytest.raises(GeokdError, match="3 selected teacher dimensions for 2 pruned student channels"):
        flexkd_lib.pair_with_origin(same, [1, 4])
