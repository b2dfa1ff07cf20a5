"""Token-level KD for decoders (issue #11, "Objective"): every divergence pinned against a float64
reference written from its definition with explicit probabilities, its invariances and bounds, the
temperature convention, analytic gradients (gradcheck), and the chunked form from hidden states
against the naive full-logits form (values and gradients, tied heads, bias, vocabulary slicing,
bf16 inputs, and no [N, V] tensor anywhere)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from geokd import GeokdError
from geokd.losses import KD_KINDS, chunked_token_kd, kl, token_divergence

BETA, SKEW = 0.3, 0.2  # deliberately not the defaults, so a swapped weight shows

# ---------------------------------------------------------------------------------------------
# float64 references, straight from the definitions (probabilities, not log-softmax helpers)
# ---------------------------------------------------------------------------------------------


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) per row, for strictly positive probabilities."""
    return (a * torch.log(a / b)).sum(-1)


def reference(zs, zt, kind, temperature=1.0, beta=BETA, skew=SKEW) -> torch.Tensor:
    """Per-token divergence in float64, differentiable w.r.t. `zs` by plain autograd."""
    q = torch.exp(zs.double() / temperature)
    q = q / q.sum(-1, keepdim=True)
    p = torch.exp(zt.double() / temperature)
    p = p / p.sum(-1, keepdim=True)
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
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def _logits(n: int, v: int, seed: int, spread: float = 2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


def _div(zs, zt, kind, **kw):
    kw.setdefault("beta", BETA)
    kw.setdefault("skew", SKEW)
    return token_divergence(zs, zt, kind, **kw)


# ---------------------------------------------------------------------------------------------
# The divergences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kinds_match_float64_reference(kind, temperature):
    zs, zt = _logits(16, 50, seed=1), _logits(16, 50, seed=2)
    expected = reference(zs, zt, kind, temperature)
    got32 = _div(zs, zt, kind, temperature=temperature)
    assert got32.dtype == torch.float32 and got32.shape == (16,)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-6)
    got64 = _div(zs.double(), zt.double(), kind, temperature=temperature)
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradient_matches_autograd_of_the_reference(kind):
    zs, zt = _logits(8, 30, seed=3, dtype=torch.float64), _logits(8, 30, seed=4, dtype=torch.float64)
    weights = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = zs.clone().requires_grad_(True)
    (reference(a, zt, kind, 1.7) * weights).sum().backward()
    b = zs.clone().requires_grad_(True)
    (_div(b, zt, kind, temperature=1.7) * weights).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck_token_divergence_in_float64(kind):
    zs = _logits(5, 7, seed=6, dtype=torch.float64).requires_grad_(True)
    zt = _logits(5, 7, seed=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: _div(s, zt, kind, temperature=1.3), (zs,))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_distributions_give_zero(kind):
    zs = _logits(10, 40, seed=8)
    shifted = zs + torch.linspace(-3.0, 5.0, 10).unsqueeze(-1)  # same distributions, other logits
    for zt in (zs.clone(), shifted):
        out = _div(zs.clone().requires_grad_(True), zt, kind, temperature=1.5)
        torch.testing.assert_close(out, torch.zeros(10), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_adding_a_constant_to_logits_changes_nothing(kind):
    zs, zt = _logits(12, 40, seed=9, dtype=torch.float64), _logits(12, 40, seed=10, dtype=torch.float64)
    base = _div(zs, zt, kind, temperature=2.0)
    for cs, ct in ((7.0, 0.0), (0.0, -11.0), (100.0, 100.0)):
        torch.testing.assert_close(
            _div(zs + cs, zt + ct, kind, temperature=2.0), base, rtol=1e-10, atol=1e-12
        )


def test_bounds():
    # far-apart distributions (spread 40): the bounded divergences approach their suprema
    zs, zt = _logits(64, 30, seed=11, spread=40.0), _logits(64, 30, seed=12, spread=40.0)
    for kind in ("forward", "reverse", "skew-forward", "skew-reverse"):
        assert (_div(zs, zt, kind) >= 0).all(), kind
    tvd = _div(zs, zt, "tvd")
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-6).all() and tvd.max() > 0.99
    jsd = _div(zs, zt, "jsd", beta=0.5)
    assert (jsd >= 0).all() and (jsd <= math.log(2) + 1e-6).all() and jsd.max() > 0.99 * math.log(2)
    for kind in ("skew-forward", "skew-reverse"):
        assert (_div(zs, zt, kind, skew=0.1) <= -math.log(0.1) + 1e-5).all(), kind
    disjoint_s = torch.tensor([[0.0, -1e4]])  # one-hot on different tokens
    disjoint_t = torch.tensor([[-1e4, 0.0]])
    assert _div(disjoint_s, disjoint_t, "tvd").item() == pytest.approx(1.0)
    assert _div(disjoint_s, disjoint_t, "jsd", beta=0.5).item() == pytest.approx(math.log(2), rel=1e-6)


def test_temperature_convention():
    """Every kind compares softmax(z/τ); τ² multiplies forward and reverse only."""
    zs, zt = _logits(10, 40, seed=13, dtype=torch.float64), _logits(10, 40, seed=14, dtype=torch.float64)
    tau = 3.0
    for kind in KD_KINDS:
        at_tau = _div(zs, zt, kind, temperature=tau)
        at_one = _div(zs / tau, zt / tau, kind, temperature=1.0)
        factor = tau**2 if kind in ("forward", "reverse") else 1.0
        torch.testing.assert_close(at_tau, factor * at_one, rtol=1e-10, atol=1e-12)
    # forward is the token-level form of geokd's encoder logit KD, τ² included
    torch.testing.assert_close(
        _div(zs, zt, "forward", temperature=tau).mean(), kl(zs, zt, temperature=tau), rtol=1e-10, atol=0
    )


def test_skew_and_beta_limits_and_directions():
    zs, zt = _logits(6, 20, seed=15, dtype=torch.float64), _logits(6, 20, seed=16, dtype=torch.float64)
    fwd, rev = _div(zs, zt, "forward"), _div(zs, zt, "reverse")
    torch.testing.assert_close(_div(zs, zt, "skew-forward", skew=0.0), fwd)
    torch.testing.assert_close(_div(zs, zt, "skew-reverse", skew=0.0), rev)
    # the generalised JSD is symmetric under (p, q, β) -> (q, p, 1 - β), and not under β alone
    torch.testing.assert_close(_div(zs, zt, "jsd", beta=0.3), _div(zt, zs, "jsd", beta=0.7))
    assert not torch.allclose(_div(zs, zt, "jsd", beta=0.3), _div(zs, zt, "jsd", beta=0.7))
    # skew-reverse of (s, t) is skew-forward with the roles swapped
    torch.testing.assert_close(_div(zs, zt, "skew-reverse", skew=0.2), _div(zt, zs, "skew-forward", skew=0.2))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_underflow_and_masked_vocabulary_entries_stay_finite(kind):
    zs, zt = _logits(6, 20, seed=17, spread=3.0), _logits(6, 20, seed=18, spread=3.0)
    # underflow: probabilities of ~e^-3000 are 0 in float32, yet nothing becomes NaN or inf
    wide_s, wide_t = zs.clone(), zt.clone()
    wide_s[:, :5] -= 3000.0
    wide_t[:, 3:8] -= 3000.0
    s = wide_s.clone().requires_grad_(True)
    out = _div(s, wide_t, kind)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    # -inf on both sides (a masked entry) is the same as the entry not existing
    masked_s, masked_t = zs.clone(), zt.clone()
    masked_s[:, 15:] = float("-inf")
    masked_t[:, 15:] = float("-inf")
    s = masked_s.clone().requires_grad_(True)
    out = _div(s, masked_t, kind, temperature=2.0)
    out.sum().backward()
    torch.testing.assert_close(out, _div(zs[:, :15], zt[:, :15], kind, temperature=2.0))
    assert torch.isfinite(s.grad).all() and (s.grad[:, 15:] == 0).all()
    s2 = zs[:, :15].clone().requires_grad_(True)
    _div(s2, zt[:, :15], kind, temperature=2.0).sum().backward()
    torch.testing.assert_close(s.grad[:, :15], s2.grad)


def test_teacher_logits_get_no_gradient_and_leading_dims_are_kept():
    zs = _logits(6, 10, seed=19).reshape(2, 3, 10).requires_grad_(True)
    zt = _logits(6, 10, seed=20).reshape(2, 3, 10).requires_grad_(True)
    out = _div(zs, zt, "forward")
    assert out.shape == (2, 3)
    out.sum().backward()
    assert zt.grad is None and zs.grad is not None


def test_bad_options_are_user_errors():
    zs, zt = _logits(2, 5, seed=21), _logits(2, 5, seed=22)
    with pytest.raises(GeokdError, match="unknown kind"):
        token_divergence(zs, zt, "kl")
    with pytest.raises(GeokdError, match="temperature"):
        token_divergence(zs, zt, "forward", temperature=0.0)
    with pytest.raises(GeokdError, match="0 < beta < 1"):
        token_divergence(zs, zt, "jsd", beta=1.0)
    with pytest.raises(GeokdError, match="0 <= skew < 1"):
        token_divergence(zs, zt, "skew-forward", skew=1.0)
    with pytest.raises(GeokdError, match="differ in shape"):
        token_divergence(zs, zt[:, :4], "forward")


# ---------------------------------------------------------------------------------------------
# Chunked KD from hidden states
# ---------------------------------------------------------------------------------------------


def _setup(n=13, d_s=8, d_t=12, v=40, bias=True, tied=False, pad_t=0, seed=30, dtype=torch.float32):
    """Student: an embedding (if tied, the head's weight) and hidden states that depend on it, so
    a tied weight gets gradient through both paths; teacher: a head on another width, with
    `pad_t` extra output rows (padding) after the shared `v`."""
    torch.manual_seed(seed)
    emb = nn.Embedding(v, d_s).to(dtype)
    head = nn.Linear(d_s, v, bias=bias).to(dtype)
    if tied:
        head.weight = emb.weight
    ids = torch.randint(0, v, (n,))
    base = torch.randn(n, d_s, dtype=dtype, requires_grad=True)
    t_head = nn.Linear(d_t, v + pad_t).to(dtype)
    t_hidden = torch.randn(n, d_t, dtype=dtype)
    return emb, head, ids, base, t_head, t_hidden


def _student_hidden(emb, ids, base):
    return base + 0.5 * emb(ids)


def _grads(*tensors):
    out = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # 13 rows: divides, does not divide, >= N
@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_chunked_equals_naive_full_logits(kind, chunk, tied, bias):
    emb, head, ids, base, t_head, t_hidden = _setup(bias=bias, tied=tied)
    params = [base, emb.weight] + ([] if tied else [head.weight]) + ([head.bias] if bias else [])
    opts = dict(temperature=2.0, beta=BETA, skew=SKEW)
    # naive: full logits of both models, then the divergence, then backward (plain autograd
    # through the float64 reference, so the analytic gradients are checked too)
    naive = reference(head(_student_hidden(emb, ids, base)), t_head(t_hidden).detach(), kind, **opts).sum()
    naive.backward()
    expected = _grads(*params)
    loss, count = chunked_token_kd(
        _student_hidden(emb, ids, base), head, t_hidden, t_head, kind, chunk_tokens=chunk, **opts
    )
    assert count == 13 and loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    got = _grads(*params)
    torch.testing.assert_close(loss.double(), naive.detach(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert t_head.weight.grad is None and t_head.bias.grad is None  # the teacher is a constant


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck_chunked_in_float64(kind):
    emb, head, ids, base, t_head, t_hidden = _setup(n=5, d_s=3, d_t=4, v=7, pad_t=2, dtype=torch.float64)
    hidden = base.detach().clone().requires_grad_(True)

    def fn(h, w, b):
        student = nn.Linear(3, 7).double()
        del student.weight, student.bias
        student.weight, student.bias = w, b  # plain tensors standing in for the parameters
        return chunked_token_kd(
            h, student, t_hidden, t_head, kind, temperature=1.5, beta=BETA, skew=SKEW, vocab=7, chunk_tokens=2
        )[0]

    assert torch.autograd.gradcheck(fn, (hidden, head.weight, head.bias))


def test_vocab_slicing_drops_padding_rows():
    """A teacher head with padding rows, sliced by `vocab`, equals the same head without them; a
    student head with padding rows gets exactly zero gradient on them."""
    emb, head, ids, base, t_head, t_hidden = _setup(v=40, pad_t=9)
    with torch.no_grad():
        t_head.weight[40:] = 50.0  # padding rows that would dominate the softmax if kept
        t_head.bias[40:] = 50.0
    unpadded = nn.Linear(12, 40)
    with torch.no_grad():
        unpadded.weight.copy_(t_head.weight[:40])
        unpadded.bias.copy_(t_head.bias[:40])
    wide = nn.Linear(8, 45)  # student with 5 padding rows of its own
    with torch.no_grad():
        wide.weight[:40] = head.weight
        wide.bias[:40] = head.bias
    hidden = _student_hidden(emb, ids, base).detach().requires_grad_(True)
    ref_loss, _ = chunked_token_kd(hidden, head, t_hidden, unpadded, "forward", chunk_tokens=4)
    ref_loss.backward()
    ref_h, ref_w = _grads(hidden, head.weight)
    loss, _ = chunked_token_kd(hidden, wide, t_hidden, t_head, "forward", vocab=40, chunk_tokens=4)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(hidden.grad, ref_h)
    torch.testing.assert_close(wide.weight.grad[:40], ref_w)
    assert (wide.weight.grad[40:] == 0).all() and (wide.bias.grad[40:] == 0).all()
    with pytest.raises(GeokdError, match="pass vocab="):
        chunked_token_kd(hidden, head, t_hidden, t_head, "forward")
    with pytest.raises(GeokdError, match="vocab must be in 1..40"):
        chunked_token_kd(hidden, head, t_hidden, t_head, "forward", vocab=41)


@pytest.mark.parametrize("kind", ["forward", "skew-reverse"])
def test_bf16_hidden_states_and_heads_are_upcast(kind):
    emb, head, ids, base, t_head, t_hidden = _setup()
    h16 = _student_hidden(emb, ids, base).detach().bfloat16().requires_grad_(True)
    t16 = t_hidden.bfloat16()
    head16, t_head16 = nn.Linear(8, 40).bfloat16(), nn.Linear(12, 40).bfloat16()
    loss, _ = chunked_token_kd(h16, head16, t16, t_head16, kind, chunk_tokens=4)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h16.grad.dtype == torch.bfloat16 and head16.weight.grad.dtype == torch.bfloat16
    # the same computation on the upcast values, in float32 throughout
    h32 = h16.detach().float().requires_grad_(True)
    head32, t_head32 = nn.Linear(8, 40), nn.Linear(12, 40)
    head32.load_state_dict({k: v.float() for k, v in head16.state_dict().items()})
    t_head32.load_state_dict({k: v.float() for k, v in t_head16.state_dict().items()})
    loss32, _ = chunked_token_kd(h32, head32, t16.float(), t_head32, kind, chunk_tokens=4)
    loss32.backward()
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h16.grad, h32.grad.bfloat16())


def test_no_response_tokens_gives_zero_and_a_gradient():
    emb, head, ids, base, t_head, t_hidden = _setup()
    hidden = torch.zeros(0, 8, requires_grad=True)
    loss, count = chunked_token_kd(hidden, head, t_hidden[:0], t_head, "forward")
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert (head.weight.grad == 0).all() and hidden.grad.shape == (0, 8)


def test_chunked_inputs_are_checked():
    emb, head, ids, base, t_head, t_hidden = _setup()
    hidden = _student_hidden(emb, ids, base)
    with pytest.raises(GeokdError, match="same response positions"):
        chunked_token_kd(hidden, head, t_hidden[:5], t_head, "forward")
    with pytest.raises(GeokdError, match="hidden width 8"):
        chunked_token_kd(hidden, nn.Linear(9, 40), t_hidden, t_head, "forward")
    with pytest.raises(GeokdError, match="chunk_tokens"):
        chunked_token_kd(hidden, head, t_hidden, t_head, "forward", chunk_tokens=0)
    with pytest.raises(GeokdError, match="unknown kind"):
        chunked_token_kd(hidden, head, t_hidden, t_head, "kl")


class _LargestOutput(TorchDispatchMode):
    """Records the shapes and the largest size (in elements) of every tensor an op produces,
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


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_never_materialises_full_logits(kind):
    n, d, v, chunk = 300, 8, 500, 32  # [N, V] would be 150,000 elements; a chunk's logits 16,000
    emb, head, ids, base, t_head, t_hidden = _setup(n=n, d_s=d, d_t=d, v=v, tied=True)
    hidden = _student_hidden(emb, ids, base)
    with _LargestOutput() as mode:
        loss, _ = chunked_token_kd(hidden, head, t_hidden, t_head, kind, chunk_tokens=chunk)
        loss.backward()
    assert (n, v) not in mode.shapes
    assert mode.largest <= max(chunk * v, v * d, n * d)
