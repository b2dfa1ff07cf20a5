"""The ULD distance (issue #12): pinned against a float64 reference written from the definition
with Python lists (sort, pad with zeros, L1), its invariances (vocabulary permutations, zero-mass
padding, bounds), and its gradient against autograd through the reference."""

from __future__ import annotations

import math

import pytest
import torch

from geokd import GeokdError
from geokd.losses.topk_kd import topk_targets
from geokd.losses.uld import chunked_topk_uld, topk_uld_distance, uld_distance, uld_positions


def sorted_probs(row: list[float], temperature: float) -> list[float]:
    """softmax(row / τ) sorted in decreasing order, in Python floats."""
    exps = [math.exp(x / temperature - max(row) / temperature) for x in row]
    return sorted((e / sum(exps) for e in exps), reverse=True)


def reference(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 1.0) -> list[float]:
    out = []
    for s_row, t_row in zip(zs.double().tolist(), zt.double().tolist(), strict=True):
        q, p = sorted_probs(s_row, temperature), sorted_probs(t_row, temperature)
        n = max(len(q), len(p))
        q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
        out.append(sum(abs(a - b) for a, b in zip(q, p, strict=True)))
    return out


def _logits(n, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("sizes", [(30, 30), (20, 45), (45, 20)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_the_definition(sizes, temperature):
    zs, zt = _logits(5, sizes[0], 1), _logits(5, sizes[1], 2)
    got = uld_distance(zs, zt, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), torch.tensor(reference(zs, zt, temperature), dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    got64 = uld_distance(zs.double(), zt.double(), temperature=temperature)
    torch.testing.assert_close(got64, torch.tensor(reference(zs, zt, temperature), dtype=torch.float64),
                               rtol=1e-12, atol=1e-13)  # fmt: skip


def test_uld_invariances_and_bounds():
    zs, zt = _logits(6, 25, 3), _logits(6, 40, 4)
    base = uld_distance(zs, zt)
    assert ((base >= 0) & (base <= 2)).all()
    perm_s, perm_t = torch.randperm(25), torch.randperm(40)
    torch.testing.assert_close(uld_distance(zs[:, perm_s], zt[:, perm_t]), base)  # token identities do not matter
    padded = torch.cat([zs, torch.full((6, 7), -math.inf)], dim=1)  # zero-probability tokens change nothing
    torch.testing.assert_close(uld_distance(padded, zt), base)
    assert torch.allclose(uld_distance(zt[:, perm_t], zt), torch.zeros(6), atol=1e-6)  # same shape: 0
    one_hot = torch.full((1, 10), -1e4)
    one_hot[0, 3] = 0.0
    uniform = torch.zeros(1, 10)
    torch.testing.assert_close(uld_distance(one_hot, uniform), torch.tensor([1.8]))  # |1 - .1| + 9 · .1


def test_uld_gradient_matches_autograd_through_a_sort_free_reference():
    zs, zt = _logits(4, 12, 5, torch.float64), _logits(4, 17, 6, torch.float64)
    a = zs.clone().requires_grad_(True)
    (uld_distance(a, zt) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)).sum().backward()
    # The same function written with the order fixed up front (argsort of the values, a constant).
    b = zs.clone().requires_grad_(True)
    q = torch.softmax(b, -1)
    order = q.detach().argsort(dim=-1, descending=True)
    q_sorted = torch.nn.functional.pad(q.gather(-1, order), (0, 5))
    p_sorted = torch.softmax(zt, -1).sort(-1, descending=True).values
    ((q_sorted - p_sorted).abs().sum(-1) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, zt[:2]), (zs[:2].clone().requires_grad_(True),))


def test_uld_positions_and_bad_shapes():
    assert uld_positions(7, 5) == 5 and uld_positions(0, 3) == 0
    with pytest.raises(GeokdError, match="same N aligned positions"):
        uld_distance(torch.zeros(3, 5), torch.zeros(4, 5))
    with pytest.raises(GeokdError, match="temperature must be > 0"):
        uld_distance(torch.zeros(3, 5), torch.zeros(3, 5), temperature=0)


def topk_reference(zs: torch.Tensor, zt: torch.Tensor, k: int, temperature: float = 1.0) -> list[float]:
    """ULD_k from its definition: the first k sorted ranks exactly, then |P - Q| of the tail masses."""
    out = []
    for s_row, t_row in zip(zs.double().tolist(), zt.double().tolist(), strict=True):
        q, p = sorted_probs(s_row, temperature), sorted_probs(t_row, temperature)
        q = q + [0.0] * max(0, k - len(q))
        head = sum(abs(a - b) for a, b in zip(q[:k], p[:k], strict=True))
        out.append(head + abs(sum(q[k:]) - sum(p[k:])))
    return out


@pytest.mark.parametrize(("sizes", "k"), [((30, 30), 5), ((20, 45), 12), ((45, 20), 3), ((8, 20), 12), ((30, 30), 30)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_uld_matches_the_definition_and_bounds_uld(sizes, k, temperature):
    zs, zt = _logits(6, sizes[0], 5), _logits(6, sizes[1], 6)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        _, log_probs, log_tail = topk_targets(zt.to(dtype), k, temperature=temperature)
        got = topk_uld_distance(zs.to(dtype), log_probs, log_tail, temperature=temperature)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), torch.tensor(topk_reference(zs, zt, k, temperature), dtype=torch.float64),
                                   rtol=tol, atol=tol)  # fmt: skip
    full = uld_distance(zs.double(), zt.double(), temperature=temperature)
    assert (got <= full + 1e-12).all()  # a lower bound of ULD
    if k == sizes[1]:  # k covers the teacher's vocabulary: ULD itself
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)


def test_chunked_topk_uld_value_and_gradient_match_the_unchunked_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=True)
    hidden = torch.randn(11, 8, requires_grad=True)
    _, log_probs, log_tail = topk_targets(_logits(11, 40, 7), 6, temperature=1.5)
    total, n = chunked_topk_uld(hidden, head, log_probs, log_tail, temperature=1.5, chunk_tokens=4)
    total.backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    direct = topk_uld_distance(head(hidden), log_probs, log_tail, temperature=1.5).sum()
    direct.backward()
    assert n == 11
    torch.testing.assert_close(total, direct)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)
    with pytest.raises(GeokdError, match="align them first"):
        chunked_topk_uld(hidden[:3], head, log_probs, log_tail)
    with pytest.raises(GeokdError, match=r"log tail \[N\]"):
        topk_uld_distance(head(hidden), log_probs, log_tail[:3])
