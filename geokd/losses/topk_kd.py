"""Token-level KD against a teacher known only by its top-k next-token log-probabilities and the
log of the remaining tail mass: what a decoder cache stores (issue #12).

Notation as in `geokd.losses.token_kd`: `p = softmax(z_t/τ)` (teacher), `q = softmax(z_s/τ)`
(student), over the vocabulary V. For one response token the teacher is stored as a set
`S = {i_1, ..., i_k}` of its k most probable token ids, `log p_{i_1}, ..., log p_{i_k}` and
`log p_tail = log Σ_{j ∉ S} p_j`.

**The approximation.** Both distributions are coarse-grained onto the same k + 1 outcomes, "token
i_1", ..., "token i_k" and "any other token":

    p̃ = (p_{i_1}, ..., p_{i_k}, p_tail)        q̃ = (q_{i_1}, ..., q_{i_k}, q_tail),  q_tail = Σ_{j ∉ S} q_j

and every KD kind of `token_kd.KD_KINDS` is computed between `p̃` and `q̃` (forward and reverse
keep their τ² factor). The student's side is exact: `q̃` is the student's own full softmax
renormalised over `S` plus its own tail mass. What is lost is how the teacher and the student
spread their tail mass *within* the tail. Consequences:

* k = V (empty tail) gives the full-vocabulary divergence exactly (tested);
* by the data-processing inequality, the coarse-grained forward and reverse KL, JSD and TVD never
  exceed the full ones: the approximation under-estimates, by at most what the tails disagree on;
* the gradient w.r.t. the student's logits is exact for the coarse-grained loss: inside `S` it
  is the k + 1-outcome gradient, and on each tail token j it is the tail outcome's gradient spread
  in proportion to `q_j / q_tail`;
* the stored values are rounded (bf16/fp16 caches): the teacher's k + 1 log-probabilities are
  renormalised (`log_softmax`) before use, so a rounded row is still a distribution.

The temperature is fixed when the cache is built: `p` is `softmax(z_t/τ)` at the cache's τ, and
`distill --cache` uses the same τ (a different one cannot be recovered from top-k values).

`bench/topk_kd.py` measures, on real SmolLM2-135M-Instruct outputs, the relative error of the
forward-KL loss and the cosine between its student-logit gradient and the full-vocabulary one for
several k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from geokd.errors import GeokdError
from geokd.losses._core import compute_dtype
from geokd.losses.token_kd import (
    _accumulate_head_grads,
    _cast_head_grads,
    _check_options,
    _divergence,
    _divergence_grad,
    _head_grad_buffers,
    _head_slice,
    _logits,
)

_TAU_SQUARED_KINDS = ("forward", "reverse")


def topk_targets(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a decoder cache stores for each row of `teacher_logits [N, V]`: `(ids [N, k] int64,
    log_probs [N, k], log_tail [N])` in the compute dtype, with `log_probs` in decreasing order
    and `log_tail = log Σ_{j ∉ top-k} p_j` (−inf when k covers the vocabulary). `vocab` keeps the
    first `vocab` logits (the real vocabulary when the head has padding rows)."""
    if teacher_logits.dim() != 2 or not teacher_logits.is_floating_point():
        raise GeokdError(f"top-k KD: teacher logits must be floating point [N, V], got {tuple(teacher_logits.shape)}")
    if vocab is not None:
        teacher_logits = teacher_logits[:, :vocab]
    n_vocab = teacher_logits.shape[1]
    if not 1 <= k <= n_vocab:
        raise GeokdError(f"top-k KD: k must be in 1..{n_vocab} (the vocabulary), got {k}")
    dtype = compute_dtype(teacher_logits)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1, sorted=True)
    log_tail = _log_tail(log_p, ids)
    return ids, values, log_tail


def _log_tail(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`log Σ_{j ∉ ids} exp(log_p_j)` per row (−inf for an empty tail), without `log(1 − Σ)`
    cancellation: the top-k entries are masked out and the rest summed in log space."""
    if ids.shape[1] == log_p.shape[1]:
        return torch.full(log_p.shape[:1], -math.inf, dtype=log_p.dtype, device=log_p.device)
    return log_p.scatter(-1, ids, -math.inf).logsumexp(dim=-1)


def _coarse(log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`[c, k + 1]`: the student's log-probabilities at `ids` and its log tail mass."""
    return torch.cat([log_q.gather(-1, ids), _log_tail(log_q, ids).unsqueeze(-1)], dim=-1)


def _teacher_coarse(log_probs: torch.Tensor, log_tail: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's k + 1 outcomes, renormalised (rounded caches sum to 1 only approximately)."""
    return F.log_softmax(torch.cat([log_probs.to(dtype), log_tail.to(dtype).unsqueeze(-1)], dim=-1), dim=-1)


def _topk_loss_and_grad(
    zs: torch.Tensor,
    ids: torch.Tensor,
    t_coarse: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss `[c]` and (when `need_grad`) its gradient `[c, V]` w.r.t. the student logits
    `zs`. The k + 1-outcome divergence is `token_kd`'s at τ = 1 on log-probabilities (a
    log-softmax of normalised log-probabilities is the identity), times τ² for the KL kinds."""
    tau = float(temperature)
    scale = tau * tau if kind in _TAU_SQUARED_KINDS else 1.0
    log_q = F.log_softmax(zs / tau if tau != 1.0 else zs, dim=-1)
    s_coarse = _coarse(log_q, ids)
    loss = _divergence(s_coarse, t_coarse, kind, 1.0, beta, skew).mul_(scale)
    if not need_grad:
        return loss, None
    # G: gradient w.r.t. the coarse log-probabilities; it sums to 0 over the k + 1 outcomes (a
    # log-softmax gradient), so the normaliser's share vanishes and
    #   ∂L/∂s_j = G_{i(j)} for j in S,   G_tail · q_j / q_tail for j not in S.
    g = _divergence_grad(s_coarse, t_coarse, kind, 1.0, beta, skew).mul_(scale)
    tail_share = (log_q - s_coarse[:, -1:]).exp_()  # q_j / q_tail (only used outside S)
    tail_share.nan_to_num_(nan=0.0, posinf=0.0)  # an empty or zero-mass tail gets nothing
    grad = tail_share.mul_(g[:, -1:])
    grad.scatter_(-1, ids, g[:, :-1])
    return loss, grad.div_(tau)


def _check_targets(ids: torch.Tensor, log_probs: torch.Tensor, log_tail: torch.Tensor, rows: int, vocab: int) -> None:
    if ids.dim() != 2 or log_probs.shape != ids.shape or log_tail.shape != ids.shape[:1] or ids.shape[0] != rows:
        raise GeokdError(
            f"top-k KD: expected ids and log_probs [N, k] and log_tail [N] for N = {rows} rows, got "
            f"{tuple(ids.shape)}, {tuple(log_probs.shape)} and {tuple(log_tail.shape)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise GeokdError(
            f"top-k KD: a teacher token id {int(ids.max())} is outside the student's vocabulary of {vocab}; "
            "the cache was built with another tokenizer"
        )


class _TopkDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, ids, log_probs, log_tail, kind, temperature, beta, skew):  # type: ignore[override]
        dtype = compute_dtype(student_logits)
        t_coarse = _teacher_coarse(log_probs, log_tail, dtype)
        loss, grad = _topk_loss_and_grad(student_logits.to(dtype), ids, t_coarse, kind, temperature, beta, skew,
                                         ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(grad)
        ctx.input_dtype = student_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        nones = (None,) * 7
        if grad is None:
            return (None, *nones)
        return (grad * grad_out.to(grad.dtype).unsqueeze(-1)).to(ctx.input_dtype), *nones


def topk_token_divergence(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    log_probs: torch.Tensor,
    log_tail: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence `[N]` between the teacher's top-k + tail distribution (`ids`,
    `log_probs [N, k]`, `log_tail [N]`, as `topk_targets` makes them) and the student's full
    softmax coarse-grained onto the same k + 1 outcomes (see the module docstring). Float32
    (float64 for float64 logits), differentiable w.r.t. `student_logits [N, V]` only."""
    _check_options(kind, temperature, beta, skew)
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise GeokdError(f"top-k KD: student logits must be floating point [N, V], got {tuple(student_logits.shape)}")
    _check_targets(ids, log_probs, log_tail, student_logits.shape[0], student_logits.shape[1])
    return _TopkDivergence.apply(student_logits, ids.long(), log_probs.detach(), log_tail.detach(), kind,
                                 float(temperature), float(beta), float(skew))  # fmt: skip


class _ChunkedTopkKD(torch.autograd.Function):
    """Σ over rows of `topk_token_divergence(head_s(h_s)[:, :V], ...)`, `chunk` rows of logits at a
    time in forward and in backward (backward recomputes each chunk's logits)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, ids, log_probs, log_tail, kind, temperature, beta, skew, vocab,  # type: ignore[override]
                chunk):  # fmt: skip
        dtype = compute_dtype(s_hidden)
        total = torch.zeros((), dtype=torch.float64, device=s_hidden.device)
        with torch.no_grad(), torch.autocast(s_hidden.device.type, enabled=False):
            ws, bs = _head_slice(s_weight, s_bias, vocab, dtype)
            for start in range(0, s_hidden.shape[0], chunk):
                stop = min(start + chunk, s_hidden.shape[0])
                zs = _logits(s_hidden[start:stop].to(dtype), ws, bs)
                t_coarse = _teacher_coarse(log_probs[start:stop], log_tail[start:stop], dtype)
                loss, _ = _topk_loss_and_grad(zs, ids[start:stop], t_coarse, kind, temperature, beta, skew, False)
                total += loss.sum(dtype=torch.float64)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, ids, log_probs, log_tail)
        ctx.options = (kind, temperature, beta, skew, vocab, chunk)
        return total.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        s_hidden, s_weight, s_bias, ids, log_probs, log_tail = ctx.saved_tensors
        kind, temperature, beta, skew, vocab, chunk = ctx.options
        nones = (None,) * 9
        if not any(ctx.needs_input_grad[:3]):
            return (None, None, None, *nones)
        dtype = compute_dtype(s_hidden)
        grads = _head_grad_buffers(ctx, s_hidden, s_weight, s_bias, dtype)
        scale = grad_out.to(dtype)
        with torch.no_grad(), torch.autocast(s_hidden.device.type, enabled=False):
            ws, bs = _head_slice(s_weight, s_bias, vocab, dtype)
            for start in range(0, s_hidden.shape[0], chunk):
                stop = min(start + chunk, s_hidden.shape[0])
                hs = s_hidden[start:stop].to(dtype)
                zs = _logits(hs, ws, bs)
                t_coarse = _teacher_coarse(log_probs[start:stop], log_tail[start:stop], dtype)
                _, g = _topk_loss_and_grad(zs, ids[start:stop], t_coarse, kind, temperature, beta, skew, True)
                assert g is not None
                g.mul_(scale)
                _accumulate_head_grads(g, hs, ws, slice(start, stop), vocab, *grads)
        return (*_cast_head_grads(grads, s_hidden, s_weight, s_bias), *nones)


def chunked_topk_kd(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    ids: torch.Tensor,
    log_probs: torch.Tensor,
    log_tail: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    vocab: int | None = None,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, int]:
    """`(loss_sum, count)` of the top-k + tail divergence over N response rows, from the student's
    final hidden states `[N, d]` and its head, applied `chunk_tokens` rows at a time (the cached
    counterpart of `token_kd.chunked_token_kd`; the same contract). `vocab` keeps the first
    `vocab` outputs of the head (default: all)."""
    _check_options(kind, temperature, beta, skew)
    if student_hidden.dim() != 2 or not student_hidden.is_floating_point():
        raise GeokdError(f"top-k KD: student hidden states must be floating point [N, d], got {tuple(student_hidden.shape)}")
    if not isinstance(student_head, nn.Linear) or student_head.in_features != student_hidden.shape[1]:
        raise GeokdError(f"top-k KD: the student head must be an nn.Linear taking width {student_hidden.shape[1]}")
    vocab = student_head.out_features if vocab is None else vocab
    if not 0 < vocab <= student_head.out_features:
        raise GeokdError(f"top-k KD: vocab must be in 1..{student_head.out_features}, got {vocab}")
    if chunk_tokens < 1:
        raise GeokdError(f"top-k KD: chunk_tokens must be >= 1, got {chunk_tokens}")
    _check_targets(ids, log_probs, log_tail, student_hidden.shape[0], vocab)
    loss_sum = _ChunkedTopkKD.apply(
        student_hidden, student_head.weight, student_head.bias, ids.long(), log_probs.detach(), log_tail.detach(),
        kind, float(temperature), float(beta), float(skew), int(vocab), int(chunk_tokens),
    )  # fmt: skip
    return loss_sum, int(student_hidden.shape[0])
