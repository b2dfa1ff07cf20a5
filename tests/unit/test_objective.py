"""The distillation objective against its definition."""

from __future__ import annotations

import pytest
import torch

from geokd.losses import gram, kl, procrustes, task_loss
from geokd.losses.objective import Objective


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(8, 3, generator=gen, requires_grad=True)
    t_logits = torch.randn(8, 3, generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen)
    s_feats = [torch.randn(8, 16, generator=gen, requires_grad=True) for _ in range(2)]
    t_feats = [torch.randn(8, 32, generator=gen) for _ in range(2)]
    return s_logits, t_logits, labels, s_feats, t_feats


@pytest.mark.parametrize("loss_name, fn", [("procrustes", procrustes), ("gram", gram)])
def test_distill_objective_is_the_weighted_sum(loss_name, fn):
    s_logits, t_logits, labels, s_feats, t_feats = _batch()
    objective = Objective(loss_name, [(1, 2), (2, 4)], 16, 32, alpha=0.3, gamma=0.8, temperature=2.5)
    out = objective(s_logits, labels, t_logits, s_feats, t_feats)
    expected = (
        0.8 * task_loss(s_logits, labels)
        + 0.3 * (fn(s_feats[0], t_feats[0]) + fn(s_feats[1], t_feats[1]))
        + 0.7 * kl(s_logits, t_logits, 2.5)
    )
    torch.testing.assert_close(out.total, expected)
    assert (
        list(out.terms)
        == objective.term_names()
        == [
            "task",
            "kl",
            f"feature/{loss_name}/1->2",
            f"feature/{loss_name}/2->4",
        ]
    )
    out.total.backward()
    assert s_feats[0].grad is not None and s_logits.grad is not None


def test_loss_none_is_logit_kd_plus_task():
    s_logits, t_logits, labels, _, _ = _batch(1)
    objective = Objective("none", [(1, 2)], 16, 32, alpha=0.5)
    out = objective(s_logits, labels, t_logits)
    torch.testing.assert_close(out.total, task_loss(s_logits, labels) + 0.5 * kl(s_logits, t_logits, 2.0))
    assert list(out.terms) == ["task", "kl"]


def test_finetune_objective_is_the_task_loss_only():
    s_logits, _, labels, _, _ = _batch(2)
    objective = Objective("procrustes", [(1, 2)], 16, 32, mode="finetune")
    out = objective(s_logits, labels)
    torch.testing.assert_close(out.total, task_loss(s_logits, labels))
    assert list(out.terms) == ["task"] and len(list(objective.parameters())) == 0


def test_projection_objective_owns_one_projection_per_pair():
    objective = Objective("proj", [(1, 2), (2, 4)], 16, 32)
    assert [tuple(p.shape) for p in objective.parameters()] == [(16, 32), (16, 32)]
    s_logits, t_logits, labels, s_feats, t_feats = _batch(3)
    floats = objective(s_logits, labels, t_logits, s_feats, t_feats).as_floats()
    assert set(floats) == {"loss", "task", "kl", "feature/proj/1->2", "feature/proj/2->4"}
