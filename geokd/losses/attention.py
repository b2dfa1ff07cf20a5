"""Attention losses: TinyBERT's attention-map distillation (`attn`, Jiao et al., 2020) and
MiniLM/MiniLMv2's self-attention relation distillation (`attn-relation`, Wang et al., 2020/2021).

They read `AttentionRows` (what `geokd.models.attention.AttentionTap` captures of one mapped layer in
one micro-batch), not feature rows, and they are per-query losses: each is a mean over the
micro-batch's query rows (non-padding tokens for encoders, response tokens for decoders) and needs
no batch-level gathering. The valid (query, key) pairs are the keys the query may attend to: every
non-padding key, and for causal models only keys at or before the query. Padding and future
positions never count.

* `attention_map_loss`: `(1/H) Σ_h mean_{valid (q,k)} (A^S_h[q,k] − A^T_h[q,k])²` with `A` the
  pre-softmax scores `q·k / √d_head` as the attention kernel computes them (after rotary
  positions and q/k norms; TinyBERT's choice, `map="scores"`) or the softmax probabilities over the
  valid keys (`map="probs"`). Equal head counts and the same tokenisation are required.
* `attention_relation_loss`: for X ∈ {Q, K, V} (the attention projections' outputs, key/value
  heads of grouped-query attention repeated to the query heads), split the concatenated heads
  into R relation heads of width d_r and form `softmax(X_r X_rᵀ / √d_r)` over the valid keys; the
  loss is `Σ_{X} mean_{r, valid q} KL(R^T_{X,r}[q] ‖ R^S_{X,r}[q])`. Widths and head counts may
  differ: only R is shared (`--relation-heads`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from geokd.errors import GeokdError

ATTENTION_MAPS = ("scores", "probs")


@dataclass
class AttentionRows:
    """One model's attention inputs at one mapped layer, for one micro-batch.

    `kind="scores"`: `query [B, H, T, d_h]`, `key [B, H_kv, T, d_h]` as the attention kernel reads
    them, and its `scaling`. `kind="qkv"`: the projections' outputs `query`, `key`, `value`
    `[B, T, H·d_h]` (key/value heads already repeated to the query heads). `query_mask [B, T]`
    marks the loss's query rows, `key_mask [B, T]` the non-padding keys; `causal` restricts keys to
    positions at or before the query."""

    kind: str
    query: torch.Tensor
    key: torch.Tensor
    query_mask: torch.Tensor
    key_mask: torch.Tensor
    causal: bool
    value: torch.Tensor | None = None
    scaling: float | None = None

    @property
    def heads(self) -> int:
        return int(self.query.shape[1]) if self.kind == "scores" else 0


def valid_pairs(rows: AttentionRows) -> torch.Tensor:
    """[B, T, T] boolean: (query, key) pairs that count."""
    mask = rows.query_mask.bool().unsqueeze(2) & rows.key_mask.bool().unsqueeze(1)
    if rows.causal:
        t = mask.shape[1]
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return mask


def _check_same_positions(name: str, student: AttentionRows, teacher: AttentionRows) -> None:
    if student.query_mask.shape != teacher.query_mask.shape:
        raise GeokdError(
            f"{name}: the student's batch is {tuple(student.query_mask.shape)} [B, T] and the teacher's "
            f"{tuple(teacher.query_mask.shape)}; attention losses compare position by position and need one "
            "tokenisation; use a feature loss on pooled rows across tokenizers"
        )


def attention_scores(rows: AttentionRows) -> torch.Tensor:
    """Pre-softmax scores `[B, H, T, T]` in float32 (float64 stays float64)."""
    dtype = torch.float64 if rows.query.dtype == torch.float64 else torch.float32
    query, key = rows.query.to(dtype), rows.key.to(dtype)
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:  # grouped-query attention: each key head serves heads // kv_heads queries
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    scaling = rows.scaling if rows.scaling is not None else query.shape[-1] ** -0.5
    return (query @ key.transpose(-1, -2)) * scaling


# A finite stand-in for −inf at the (query, key) pairs that do not count: exp() of it is exactly 0 in
# float32, and 0 · (log p_t − log p_s) stays 0 (with −inf it would be NaN).
_MASKED = -1.0e4


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last dim restricted to `valid` (broadcast over heads): invalid entries
    get probability exactly 0 (log-probability about −1e4, finite). A row without any valid key
    comes out uniform; callers leave such rows out."""
    return F.log_softmax(logits.masked_fill(~valid, _MASKED), dim=-1)


def attention_map_loss(student: AttentionRows, teacher: AttentionRows, map: str = "scores") -> torch.Tensor:
    """TinyBERT's attention loss (module docstring). Returns a 0-d float32 tensor (float64 for
    float64 input)."""
    if map not in ATTENTION_MAPS:
        raise GeokdError(f"attn: map must be one of {', '.join(ATTENTION_MAPS)}, got {map!r}")
    _check_same_positions("attn", student, teacher)
    if student.heads != teacher.heads:
        raise GeokdError(
            f"attn: compares attention maps head by head and needs equal head counts, got student {student.heads} "
            f"and teacher {teacher.heads}; use --loss attn-relation (any head counts and widths)"
        )
    valid = valid_pairs(teacher).unsqueeze(1)  # [B, 1, T, T]
    s, t = attention_scores(student), attention_scores(teacher)  # [B, H, T, T]
    if map == "probs":
        s, t = _masked_log_softmax(s, valid).exp(), _masked_log_softmax(t, valid).exp()
    # summed in the compute dtype (a float64 copy of [B, H, T, T] would cost more than the loss)
    squared = torch.where(valid, (s - t).square(), torch.zeros_like(s)).sum().double()
    count = valid.sum() * s.shape[1]
    return (squared / count.clamp_min(1)).to(s.dtype)


def resolve_relation_heads(requested: int | None, student_width: int, teacher_width: int, teacher_heads: int) -> int:
    """The number of relation heads R: `requested`, or by default the teacher's attention-head count
    when it divides both query widths, else the largest divisor of both widths not above it.
    Every relation head of each model must have a whole width (width / R)."""
    if requested is not None:
        bad = [f"{side} {w}" for side, w in (("student", student_width), ("teacher", teacher_width)) if w % requested]
        if requested < 1 or bad:
            raise GeokdError(
                f"--relation-heads: {requested} relation heads must divide both attention widths (the heads' "
                f"concatenated width), but {', '.join(bad) or 'R < 1'} does not; try "
                f"{resolve_relation_heads(None, student_width, teacher_width, teacher_heads)}"
            )
        return requested
    common = math.gcd(student_width, teacher_width)
    return max(r for r in range(1, max(1, teacher_heads) + 1) if common % r == 0)


def _relation_log_probs(x: torch.Tensor, heads: int, valid: torch.Tensor) -> torch.Tensor:
    """`log softmax(X_r X_rᵀ / √d_r)` over valid keys: `x [B, T, w]` -> `[B, R, T, T]`."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, t, width = x.shape
    split = x.to(dtype).view(b, t, heads, width // heads).transpose(1, 2)  # [B, R, T, d_r]
    logits = (split @ split.transpose(-1, -2)) / math.sqrt(width // heads)
    return _masked_log_softmax(logits, valid)


def attention_relation_loss(student: AttentionRows, teacher: AttentionRows, heads: int) -> torch.Tensor:
    """MiniLMv2's relation loss over Q-Q, K-K and V-V (module docstring)."""
    _check_same_positions("attn-relation", student, teacher)
    valid = valid_pairs(teacher).unsqueeze(1)  # [B, 1, T, T]
    queries = valid.any(dim=-1)  # [B, 1, T]: query rows with at least one key
    count = queries.sum() * heads
    total = None
    for s_x, t_x in ((student.query, teacher.query), (student.key, teacher.key), (student.value, teacher.value)):
        assert s_x is not None and t_x is not None
        for side, x in (("student", s_x), ("teacher", t_x)):
            if x.shape[-1] % heads:
                raise GeokdError(f"attn-relation: {heads} relation heads do not divide the {side}'s width {x.shape[-1]}")
        log_s = _relation_log_probs(s_x, heads, valid)
        log_t = _relation_log_probs(t_x, heads, valid)
        # KL per query row (invalid keys carry p_t = 0 exactly), then only the rows that count;
        # kl_div(log_target) computes exp(t)·(t − s) in one kernel
        rows = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=-1)  # [B, R, T]
        kl = torch.where(queries, rows, torch.zeros_like(rows)).sum().double()
        total = kl if total is None else total + kl
    dtype = torch.float64 if student.query.dtype == torch.float64 else torch.float32
    return (total / count.clamp_min(1)).to(dtype)  # type: ignore[operator]
