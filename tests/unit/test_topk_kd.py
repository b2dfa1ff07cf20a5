"""Top-k + tail token KD (issue #12, the decoder cache's loss): each KD kind between the
coarse-grained teacher and student distributions pinned against a float64 reference written from
the definition (explicit probabilities, explicit tail sums), equality with full-vocabulary KD when
k = V, the data-processing bound, analytic gradients (gradcheck and against autograd through the
reference), and the chunked form from hidden states against the unchunked one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geokd import GeokdError
from geokd.losses.token_kd import KD_KINDS, token_divergence
from geokd.losses.topk_kd import chunked_topk_kd, topk_targets, topk_token_divergence

BETA, SKEW = 0.3, 0.2  # deliberately not the defaults, so a swapped weight shows


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) per row, for strictly positive probabilities."""
    return (a * torch.log(a / b)).sum(-1)


def _coarse_reference(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, k + 1] probabilities: softmax(z/τ) at ids, then the sum over every other token."""
    probs = torch.softmax(z.double() / temperature, dim=-1)
    rows = []
    for r in range(z.shape[0]):
        chosen = [int(i) for i in ids[r]]
        tail = sum(probs[r, j] for j in range(z.shape[1]) if j not in chosen)
        rows.append(torch.stack([*(probs[r, j] for j in chosen), torch.as_tensor(tail, dtype=torch.float64)]))
    return torch.stack(rows)


def reference(zs, zt, ids, kind, temperature=1.0, beta=BETA, skew=SKEW):
    q, p = _coarse_reference(zs, ids, temperature), _coarse_reference(zt, ids, temperature)
    if kind == "forward":
        return temperature**2 * _kl(p, q)
    if kind == "reverse":
        return temperature**2 * _kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew-forward":
        return _kl(p, skew * p + (1 - skew) * q)
    if kind == "skew-reverse":
        return _kl(q, skew * q + (1 - skew) * p)
    return 0.5 * (p - q).abs().sum(-1)


def _logits(n, v, seed, spread=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kinds_match_float64_reference(kind, temperature):
    zs, zt = _logits(6, 40, 1), _logits(6, 40, 2)
    ids, log_probs, log_tail = topk_targets(zt, 5, temperature=temperature)
    assert ids.shape == (6, 5) and (log_probs[:, :-1] >= log_probs[:, 1:]).all()
    torch.testing.assert_close(ids, torch.softmax(zt.double(), -1).topk(5).indices)
    expected = reference(zs, zt, ids, kind, temperature)
    got = topk_token_divergence(zs, ids, log_probs, log_tail, kind, temperature=temperature, beta=BETA, skew=SKEW)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    ids64, lp64, lt64 = topk_targets(zt.double(), 5, temperature=temperature)
    got64 = topk_token_divergence(zs.double(), ids64, lp64, lt64, kind, temperature=temperature, beta=BETA, skew=SKEW)
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_topk_gradient_matches_autograd_through_the_reference(kind):
    zs, zt = _logits(5, 30, 3, dtype=torch.float64), _logits(5, 30, 4, dtype=torch.float64)
    ids, log_probs, log_tail = topk_targets(zt, 4, temperature=1.5)
    weights = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    a = zs.clone().requires_grad_(True)
    (topk_token_divergence(a, ids, log_probs, log_tail, kind, temperature=1.5, beta=BETA, skew=SKEW) * weights).sum().backward()
    b = zs.clone().requires_grad_(True)
    (reference(b, zt, ids, kind, 1.5) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    c = zs[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: topk_token_divergence(x, ids[:2], log_probs[:2], log_tail[:2], kind, temperature=1.5, beta=BETA,
                                        skew=SKEW), (c,))  # fmt: skip


@pytest.mark.parametrize("kind", KD_KINDS)
def test_k_equal_to_the_vocabulary_is_full_kd_and_smaller_k_never_exceeds_it(kind):
    zs, zt = _logits(8, 25, 5), _logits(8, 25, 6)
    full = token_divergence(zs, zt, kind, temperature=1.3, beta=BETA, skew=SKEW)
    ids, log_probs, log_tail = topk_targets(zt, 25, temperature=1.3)
    assert torch.isneginf(log_tail).all()
    a = zs.clone().requires_grad_(True)
    exact = topk_token_divergence(a, ids, log_probs, log_tail, kind, temperature=1.3, beta=BETA, skew=SKEW)
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)
    exact.sum().backward()
    b = zs.clone().requires_grad_(True)
    token_divergence(b, zt, kind, temperature=1.3, beta=BETA, skew=SKEW).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    if kind in ("forward", "reverse", "jsd", "tvd"):  # f-divergences: coarse-graining never increases them
        for k in (1, 3, 10):
            coarse = topk_token_divergence(zs, *topk_targets(zt, k, temperature=1.3), kind, temperature=1.3, beta=BETA)
            assert (coarse <= full + 1e-6).all(), k


def test_rounded_cached_values_are_renormalised_and_bad_targets_are_one_line():
    zs, zt = _logits(4, 30, 7), _logits(4, 30, 8)
    ids, log_probs, log_tail = topk_targets(zt, 6)
    exact = topk_token_divergence(zs, ids, log_probs, log_tail, "forward")
    rounded = topk_token_divergence(zs, ids, log_probs.bfloat16(), log_tail.bfloat16(), "forward")
    assert torch.isfinite(rounded).all()
    torch.testing.assert_close(rounded, exact, rtol=2e-2, atol=2e-3)
    with pytest.raises(GeokdError, match="outside the student's vocabulary of 30"):
        topk_token_divergence(zs, ids + 30, log_probs, log_tail, "forward")
    with pytest.raises(GeokdError, match=r"expected ids and log_probs \[N, k\]"):
        topk_token_divergence(zs, ids[:2], log_probs, log_tail, "forward")
    with pytest.raises(GeokdError, match="k must be in 1..30"):
        topk_targets(zt, 31)


@pytest.mark.parametrize("kind", ["forward", "jsd", "skew-reverse"])
def test_chunked_topk_kd_equals_the_unchunked_form(kind):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64)
    head = nn.Linear(8, 20, bias=True).double()
    ids, log_probs, log_tail = topk_targets(_logits(13, 20, 9, dtype=torch.float64), 4, temperature=2.0)
    h1 = hidden.clone().requires_grad_(True)
    loss, count = chunked_topk_kd(h1, head, ids, log_probs, log_tail, kind, temperature=2.0, chunk_tokens=5)
    loss.backward()
    grads = (h1.grad, head.weight.grad.clone(), head.bias.grad.clone())
    head.zero_grad()
    h2 = hidden.clone().requires_grad_(True)
    topk_token_divergence(head(h2), ids, log_probs, log_tail, kind, temperature=2.0).sum().backward()
    assert count == 13
    expected = topk_token_divergence(head(hidden), ids, log_probs, log_tail, kind, temperature=2.0).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, (h2.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
