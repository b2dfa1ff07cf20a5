"""Token-level KD for decoders: divergences between next-token distributions (issue #11).

Notation: `z_s`, `z_t` are student and teacher logits over the same vocabulary, τ the temperature,
`q = softmax(z_s/τ)` the student's and `p = softmax(z_t/τ)` the teacher's distribution. Per token:

* `forward`      `τ² · KL(p ‖ q)`  (Hinton et al. 2015; geokd's default, as `geokd.losses.kl`)
* `reverse`      `τ² · KL(q ‖ p)`  (MiniLLM's objective at τ = 1)
* `jsd`          `β · KL(p ‖ m) + (1 − β) · KL(q ‖ m)`, `m = β·p + (1 − β)·q`: the generalised JSD
                 of GKD (Agarwal et al. 2024, "On-policy distillation of language models", eq. 1;
                 TRL's `generalized_jsd_loss` uses the same weights). β = 0.5 is the symmetric JSD,
                 bounded by ln 2. DistiLLM's `js_distance(lam)` is the same family with the weights
                 swapped: its `lam` is `1 − β` here. Needs 0 < β < 1 (at either end it is
                 identically 0; use `forward` or `reverse` for the limits).
* `skew-forward` `KL(p ‖ α·p + (1 − α)·q)`, α = `skew` (DistiLLM, Ko et al. 2024, "skew KL";
                 DistiLLM's code minimises the cross-entropy `−Σ p log m`, which differs from this
                 by the teacher's entropy, a constant: same gradient). Bounded by −ln α.
* `skew-reverse` `KL(q ‖ α·q + (1 − α)·p)` (DistiLLM's "skew reverse KL": the mixture leans
                 towards the *student*, whose divergence it is). Bounded by −ln α. 0 ≤ α < 1; α = 0
                 gives the plain KL without the τ² factor.
* `tvd`          `½ · Σ |p − q|` ∈ [0, 1] (DistiLLM's `tv_distance`).

Temperature convention: every kind compares the τ-softened distributions; the τ² factor (which
keeps the gradient's scale independent of τ) multiplies the two unbounded KLs, `forward` and
`reverse`, only. The bounded kinds (`jsd`, `skew-*`, `tvd`) are reported unscaled, so their bounds
hold at every τ; at τ = 1 (the MiniLLM/DistiLLM/GKD setting) the conventions coincide.

Numerics: computed in float32 whatever the input dtype (float64 stays float64 for `gradcheck`),
from log-softmax; mixtures are formed in log space (`logaddexp`), so probabilities that underflow
never produce `log 0`. `-inf` logits (masked vocabulary entries) are allowed: such an entry has
probability exactly 0 and contributes 0 (`0 · log 0 = 0`). Masking an entry on one side only makes
the KL that puts weight on it infinite, as it should be (mask both heads alike). The teacher is a
constant: no gradient flows to the teacher's logits, hidden states or head.

Gradients are analytic. With `s = z_s/τ`, any per-token `L(q)` has
`∂L/∂s_j = q_j (g_j − Σ_k q_k g_k)`, `g = ∂L/∂q`, and `∂L/∂z_s = (∂L/∂s)/τ`:

* forward:  `∂/∂s = τ² (q − p)`
* reverse:  `g = log q − log p` (+1, removed by centring); times τ²
* jsd:      `g = (1 − β)(log q − log m)` (the `p/m` and `q/m` terms cancel)
* skew-fwd: `g = −(1 − α) p/m`, so `q·g = −(1 − α)·exp(log q + log p − log m)`
* skew-rev: `g = log q − log m − α q/m`
* tvd:      `g = ½ sign(q − p)` (subgradient 0 where q = p)

`chunked_token_kd` computes the summed divergence straight from the final hidden states, applying
each model's output head to `chunk_tokens` rows at a time in a custom autograd Function that saves
no logits and recomputes each chunk's logits in backward, so neither model's full `[N, V]` logits
exist at once (bench/token_kd.py measures the peak memory against the naive form).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from geokd.errors import GeokdError
from geokd.losses._core import compute_dtype

KD_KINDS = ("forward", "reverse", "jsd", "skew-forward", "skew-reverse", "tvd")
_TAU_SQUARED_KINDS = ("forward", "reverse")  # the kinds the τ² factor multiplies


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_options(kind: str, temperature: float, beta: float, skew: float) -> None:
    if kind not in KD_KINDS:
        raise GeokdError(f"token KD: unknown kind {kind!r}; use one of {', '.join(KD_KINDS)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise GeokdError(f"token KD: temperature must be a finite number > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise GeokdError(
            f"token KD: jsd needs 0 < beta < 1, got {beta}; at 0 or 1 it is identically 0 "
            "(use forward or reverse for the limits)"
        )
    if kind.startswith("skew") and not 0.0 <= skew < 1.0:
        raise GeokdError(f"token KD: {kind} needs 0 <= skew < 1, got {skew}; DistiLLM uses 0.1")


# --------------------------------------------------------------------------------------------
# The divergences and their gradients on one block of logits
# --------------------------------------------------------------------------------------------


def _mask_masked(x: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """`x` with 0 wherever `log_a` is -inf (probability exactly 0: the entry contributes nothing)."""
    return x.masked_fill_(torch.isneginf(log_a), 0.0)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`Σ_j a_j (log a_j − log b_j)` per row, with `0 · log 0 = 0`."""
    terms = _mask_masked(log_a.exp() * (log_a - log_b), log_a)
    return terms.sum(dim=-1)


def _log_mix(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`log(weight · a + (1 − weight) · b)` in log space (no underflow to log 0)."""
    if weight == 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _centred(q: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """`q_j g_j − q_j Σ_k q_k g_k`, given `q` and the products `q ⊙ g` (in place on `qg`)."""
    return qg.sub_(q * qg.sum(dim=-1, keepdim=True))


def _log_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(logits / tau if tau != 1.0 else logits, dim=-1)


def _divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Per-row divergence `[c]` of `[c, V]` logits in the compute dtype (no autograd graph)."""
    tau = float(temperature)
    log_q = _log_probs(student_logits, tau)
    log_p = _log_probs(teacher_logits, tau)
    scale = tau * tau if kind in _TAU_SQUARED_KINDS else 1.0
    if kind == "forward":
        # Σ p (log p − log q) with one temporary; an entry with p = 0 exactly (a -inf teacher
        # logit) makes a NaN here (0 · -inf), and only then the masked form is needed
        terms = torch.sub(log_p, log_q, out=log_q).mul_(log_p.exp())
        loss = terms.sum(dim=-1)
        if torch.isnan(loss).any():
            loss = _kl_rows(log_p, _log_probs(student_logits, tau))
    elif kind == "reverse":
        loss = _kl_rows(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mix(beta, log_p, log_q)
        loss = beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    elif kind == "skew-forward":
        loss = _kl_rows(log_p, _log_mix(skew, log_p, log_q))
    elif kind == "skew-reverse":
        loss = _kl_rows(log_q, _log_mix(skew, log_q, log_p))
    else:  # tvd
        loss = 0.5 * log_q.exp_().sub_(log_p.exp_()).abs_().sum(dim=-1)
    return loss.mul_(scale)


def _divergence_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Gradient `[c, V]` of the per-row divergence w.r.t. the student logits (see the module
    docstring for the formulas); a fresh tensor the caller may scale in place."""
    tau = float(temperature)
    scale = tau * tau if kind in _TAU_SQUARED_KINDS else 1.0
    if kind == "forward":  # τ² (q − p) / τ, from the fused softmax (no log-probabilities needed)
        s = student_logits / tau if tau != 1.0 else student_logits
        t = teacher_logits / tau if tau != 1.0 else teacher_logits
        return F.softmax(s, dim=-1).sub_(F.softmax(t, dim=-1)).mul_(scale / tau)
    log_q = _log_probs(student_logits, tau)
    log_p = _log_probs(teacher_logits, tau)
    q = log_q.exp()
    if kind == "reverse":
        grad = _centred(q, _mask_masked(q * (log_q - log_p), log_q))
    elif kind == "jsd":
        log_m = _log_mix(beta, log_p, log_q)
        grad = _centred(q, _mask_masked(q * (log_q - log_m), log_q)).mul_(1.0 - beta)
    elif kind == "skew-forward":
        log_m = _log_mix(skew, log_p, log_q)
        qw = (log_q + log_p - log_m).exp_()  # q·p/m, never q times an overflowing p/m
        qw.masked_fill_(torch.isneginf(log_p) | torch.isneginf(log_q), 0.0)
        grad = _centred(q, qw).mul_(-(1.0 - skew))
    elif kind == "skew-reverse":
        g = log_q - _log_mix(skew, log_q, log_p)
        if skew > 0.0:
            g -= skew * g.exp()  # α q/m = α exp(log q − log m) ≤ 1
        grad = _centred(q, _mask_masked(q * g, log_q))
    else:  # tvd
        grad = _centred(q, q * (q - log_p.exp_()).sign_().mul_(0.5))
    return grad.mul_(scale / tau)  # ∂/∂z_s = τ⁻¹ ∂/∂s, and the τ² of the KL kinds


class _TokenDivergence(torch.autograd.Function):
    """Per-token divergence `[N]` of `[N, V]` logits, with the analytic gradient w.r.t. the
    student logits (the teacher's logits get none)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, kind, temperature, beta, skew):  # type: ignore[override]
        dtype = compute_dtype(student_logits)
        s, t = student_logits.to(dtype), teacher_logits.to(dtype)
        loss = _divergence(s, t, kind, temperature, beta, skew)
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.options = (kind, temperature, beta, skew)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        student_logits, teacher_logits = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        dtype = compute_dtype(student_logits)
        s, t = student_logits.to(dtype), teacher_logits.to(dtype)
        grad = _divergence_grad(s, t, *ctx.options)
        grad.mul_(grad_out.to(dtype).unsqueeze(-1))
        return grad.to(student_logits.dtype), None, None, None, None, None


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence between next-token distributions (see the module docstring).

    `student_logits`, `teacher_logits`: `[..., V]` (any leading shape, e.g. `[N, V]`). Returns the
    divergence per token, shape `[...]`, in float32 (float64 for float64 input), differentiable
    w.r.t. the student logits only (the teacher is a constant). `temperature` = τ; `beta` is the
    JSD weight; `skew` is DistiLLM's α for `skew-forward`/`skew-reverse`.
    """
    _check_options(kind, temperature, beta, skew)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise GeokdError(
            f"token KD: student and teacher logits differ in shape, {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; slice both to the shared vocabulary first"
        )
    for side, x in (("student", student_logits), ("teacher", teacher_logits)):
        if not x.is_floating_point():
            raise GeokdError(f"token KD: {side} logits must be floating point, got {x.dtype}")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    loss = _TokenDivergence.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        kind,
        temperature,
        beta,
        skew,
    )
    return loss.reshape(lead)


# --------------------------------------------------------------------------------------------
# Chunked, memory-bounded KD from the final hidden states
# --------------------------------------------------------------------------------------------


def _head_slice(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int, dtype: torch.dtype):
    """The first `vocab` rows of a head in the compute dtype (a view when no cast is needed)."""
    w = weight[:vocab].to(dtype)
    b = None if bias is None else bias[:vocab].to(dtype)
    return w, b


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


def _head_grad_buffers(ctx, s_hidden, s_weight, s_bias, dtype):
    """Zero/empty gradient buffers for the student's hidden states, head weight and bias (None
    where autograd does not need one), in the compute dtype."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        torch.empty(s_hidden.shape, dtype=dtype, device=s_hidden.device) if need_h else None,
        torch.zeros(s_weight.shape, dtype=dtype, device=s_weight.device) if need_w else None,
        torch.zeros(s_bias.shape, dtype=dtype, device=s_bias.device) if need_b else None,
    )


def _accumulate_head_grads(g, hs, ws, rows: slice, vocab: int, grad_h, grad_w, grad_b) -> None:
    """Add one chunk's contribution: `g [c, V]` is ∂loss/∂logits of the chunk's rows `hs [c, d]`."""
    if grad_h is not None:
        torch.mm(g, ws, out=grad_h[rows])
    if grad_w is not None:
        grad_w[:vocab].addmm_(g.T, hs)
    if grad_b is not None:
        grad_b[:vocab] += g.sum(dim=0)


def _cast_head_grads(grads, s_hidden, s_weight, s_bias) -> tuple:
    return tuple(None if g is None else g.to(ref.dtype) for g, ref in zip(grads, (s_hidden, s_weight, s_bias), strict=True))


class _ChunkedTokenKD(torch.autograd.Function):
    """Σ over rows of the token divergence of `head_s(h_s)[:, :V]` against `head_t(h_t)[:, :V]`.

    Forward loops over row chunks and keeps only the running sum; backward recomputes each chunk's
    logits (the teacher's too, without grad) and accumulates the gradients w.r.t. the student's
    hidden states, head weight and bias. Saved tensors are the inputs themselves."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        s_hidden,
        s_weight,
        s_bias,
        t_hidden,
        t_weight,
        t_bias,
        kind,
        temperature,
        beta,
        skew,
        vocab,
        chunk,
    ):
        dtype = compute_dtype(s_hidden)
        n = s_hidden.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=s_hidden.device)
        with torch.autocast(s_hidden.device.type, enabled=False):
            ws, bs = _head_slice(s_weight, s_bias, vocab, dtype)
            wt, bt = _head_slice(t_weight, t_bias, vocab, dtype)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                zs = _logits(s_hidden[start:stop].to(dtype), ws, bs)
                zt = _logits(t_hidden[start:stop].to(dtype), wt, bt)
                loss = _divergence(zs, zt, kind, temperature, beta, skew)
                total += loss.sum(dtype=torch.float64)
                del zs, zt, loss
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.options = (kind, temperature, beta, skew, vocab, chunk)
        return total.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        kind, temperature, beta, skew, vocab, chunk = ctx.options
        nones = (None,) * 9
        if not any(ctx.needs_input_grad[:3]):
            return (None, None, None, *nones)
        dtype = compute_dtype(s_hidden)
        n = s_hidden.shape[0]
        grads = _head_grad_buffers(ctx, s_hidden, s_weight, s_bias, dtype)
        scale = grad_out.to(dtype)
        with torch.no_grad(), torch.autocast(s_hidden.device.type, enabled=False):
            ws, bs = _head_slice(s_weight, s_bias, vocab, dtype)
            wt, bt = _head_slice(t_weight, t_bias, vocab, dtype)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                hs = s_hidden[start:stop].to(dtype)
                zs = _logits(hs, ws, bs)
                zt = _logits(t_hidden[start:stop].to(dtype), wt, bt)
                g = _divergence_grad(zs, zt, kind, temperature, beta, skew)
                del zs, zt
                g.mul_(scale)  # [c, V]: ∂(grad_out · loss_sum)/∂z_s
                _accumulate_head_grads(g, hs, ws, slice(start, stop), vocab, *grads)
                del g
        return (*_cast_head_grads(grads, s_hidden, s_weight, s_bias), *nones)


def chunked_token_kd(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    vocab: int | None = None,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, int]:
    """Summed token divergence from final hidden states, one chunk of rows at a time.

    `student_hidden [N, d_s]` and `teacher_hidden [N, d_t]` are the final hidden states at the N
    response positions (the caller gathers them; the same rows on both sides). The heads map them
    to logits (`nn.Linear` with or without bias; the student's weight may be tied to its input
    embeddings: its gradient reaches that parameter like any other). `vocab` keeps the first
    `vocab` entries of both heads' outputs (the shared vocabulary when one model has padding rows);
    without it both heads must have the same number of outputs.

    Returns `(loss_sum, count)`: `loss_sum` is the sum over the N rows of
    `token_divergence(head_s(h_s)[:, :V], head_t(h_t)[:, :V], kind, ...)`, a 0-d float32 tensor
    (float64 for float64 hidden states) with gradients to `student_hidden` and the student head's
    parameters; `count = N`. Divide summed `loss_sum` by summed `count` across micro-batches (and
    ranks) for the token mean. The teacher is a constant. At most `chunk_tokens` rows of logits
    exist at a time, in forward and in backward.
    """
    _check_options(kind, temperature, beta, skew)
    for side, h, head in (
        ("student", student_hidden, student_head),
        ("teacher", teacher_hidden, teacher_head),
    ):
        if h.dim() != 2 or not h.is_floating_point():
            raise GeokdError(
                f"token KD: {side} hidden states must be floating point [N, d], got {h.dtype} of shape "
                f"{tuple(h.shape)}; gather the response positions first"
            )
        if not isinstance(head, nn.Linear) or head.in_features != h.shape[1]:
            width = head.in_features if isinstance(head, nn.Linear) else type(head).__name__
            raise GeokdError(
                f"token KD: the {side} head must be an nn.Linear taking the hidden width {h.shape[1]}, got {width}"
            )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise GeokdError(
            f"token KD: student and teacher need the same response positions, got {student_hidden.shape[0]} "
            f"and {teacher_hidden.shape[0]} rows"
        )
    v_s, v_t = student_head.out_features, teacher_head.out_features
    if vocab is None:
        if v_s != v_t:
            raise GeokdError(
                f"token KD: the student's head has {v_s} outputs and the teacher's {v_t}; pass vocab= "
                "the shared vocabulary size to slice off padding rows"
            )
        vocab = v_s
    if not 0 < vocab <= min(v_s, v_t):
        raise GeokdError(f"token KD: vocab must be in 1..{min(v_s, v_t)} (both heads' outputs), got {vocab}")
    if chunk_tokens < 1:
        raise GeokdError(f"token KD: chunk_tokens must be >= 1, got {chunk_tokens}")
    loss_sum = _ChunkedTokenKD.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher_hidden.detach(),
        teacher_head.weight.detach(),
        None if teacher_head.bias is None else teacher_head.bias.detach(),
        kind,
        float(temperature),
        float(beta),
        float(skew),
        int(vocab),
        int(chunk_tokens),
    )
    return loss_sum, int(student_hidden.shape[0])
