"""The Universal Logit Distillation distance (ULD; Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030): token-level KD
between models whose vocabularies differ (issue #12).

Definition, per aligned position: with `p = softmax(z_t/τ)` over the teacher's vocabulary
`V_t` and `q = softmax(z_s/τ)` over the student's `V_s`, sort each in decreasing order and pad the
shorter one with zeros to `n = max(|V_t|, |V_s|)` entries; then

    ULD(p, q) = Σ_{i=1..n} | p_(i) − q_(i) |

This is the closed form the paper uses for the 1-Wasserstein distance between the two
distributions under a uniform transport cost once the token identities are dropped (only the
shape of the distribution is compared, so no vocabulary mapping is needed). It lies in [0, 2], is
0 exactly when the sorted probability vectors agree, is invariant to permuting either vocabulary,
and does not change when zero-probability tokens are added to either side.

Positions: the paper aligns the i-th response token of the teacher's tokenisation with the i-th of
the student's and truncates both to the shorter response (`uld_positions`). The full objective
adds the student's own cross-entropy: `γ·L_SFT + λ·mean ULD` (geokd: `(1 − α)` is λ).

The gradient flows through the sort (a permutation) to the student's logits only.

From a decoder cache (`topk_uld_distance`): the cache holds only the teacher's k largest
probabilities `p_(1..k)` (sorted) and its tail mass `P = Σ_{i>k} p_(i)`. geokd then computes

    ULD_k(p, q) = Σ_{i=1..k} | p_(i) − q_(i) | + | P − Q |,   Q = Σ_{i>k} q_(i)

(q padded with zeros to k entries when the student's vocabulary is smaller). The first k ranks are
exact; the tail is compared by its mass only. By the triangle inequality
`Σ_{i>k} |p_(i) − q_(i)| ≥ |P − Q|`, so ULD_k is a lower bound of ULD, equal to it when k covers
the teacher's vocabulary (then P = 0 and the rest of q is compared with zeros) and whenever q's
tail ranks all lie on one side of p's. Its gradient is exact for the first k ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from geokd.errors import GeokdError
from geokd.losses._core import compute_dtype


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-position ULD `[N]` between `student_logits [N, V_s]` and `teacher_logits [N, V_t]` (any
    two vocabulary sizes), in float32 (float64 for float64 input); the teacher is a constant."""
    if not temperature > 0:
        raise GeokdError(f"ULD: temperature must be > 0, got {temperature}")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise GeokdError(
            f"ULD: expected student [N, V_s] and teacher [N, V_t] logits at the same N aligned positions, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; align them with uld_positions first"
        )
    dtype = compute_dtype(student_logits)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    with torch.no_grad():
        p = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    n = max(q.shape[1], p.shape[1])
    q = F.pad(q, (0, n - q.shape[1]))
    p = F.pad(p, (0, n - p.shape[1]))
    return (q - p).abs().sum(dim=-1)


def topk_uld_distance(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_log_tail: torch.Tensor, *,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Per-position ULD_k `[N]` (module docstring) between `student_logits [N, V_s]` and a cached
    teacher: its k largest log-probabilities `[N, k]` in decreasing order (already at
    `temperature`, as the cache stores them) and the log of its remaining mass `[N]`."""
    if not temperature > 0:
        raise GeokdError(f"ULD: temperature must be > 0, got {temperature}")
    n = student_logits.shape[0] if student_logits.dim() == 2 else -1
    if teacher_log_probs.dim() != 2 or teacher_log_probs.shape[0] != n or tuple(teacher_log_tail.shape) != (n,):
        raise GeokdError(
            f"ULD: expected student logits [N, V_s], cached log-probabilities [N, k] and log tail [N] at the same N "
            f"aligned positions, got {tuple(student_logits.shape)}, {tuple(teacher_log_probs.shape)} and "
            f"{tuple(teacher_log_tail.shape)}"
        )
    dtype = compute_dtype(student_logits)
    k = teacher_log_probs.shape[1]
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    q_top, q_tail = F.pad(q[:, :k], (0, max(0, k - q.shape[1]))), q[:, k:].sum(dim=-1)
    with torch.no_grad():
        p_top = teacher_log_probs.detach().to(dtype).exp()
        p_tail = teacher_log_tail.detach().to(dtype).exp()
    return (q_top - p_top).abs().sum(dim=-1) + (q_tail - p_tail).abs()


def uld_positions(student_count: int, teacher_count: int) -> int:
    """How many response positions ULD compares when the student's tokenisation of a response has
    `student_count` tokens and the teacher's `teacher_count`: the first min(·, ·) of each, in
    order (the paper's alignment)."""
    if student_count < 0 or teacher_count < 0:
        raise GeokdError(f"ULD: token counts must be >= 0, got {student_count} and {teacher_count}")
    return min(student_count, teacher_count)


def _chunk_uld(s_hidden, weight, bias, t_logits, temperature: float) -> torch.Tensor:
    return uld_distance(F.linear(s_hidden, weight, bias), t_logits, temperature=temperature).sum()


def _sum_chunks(fn, chunk, student_hidden: torch.Tensor, student_head: nn.Linear, chunk_tokens: int) -> torch.Tensor:
    """`Σ fn(*chunk(rows))` over row chunks of `chunk_tokens`, each recomputed in backward
    (activation checkpointing) when a gradient is needed."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.weight.requires_grad)
    for start in range(0, student_hidden.shape[0], chunk_tokens):
        args = chunk(slice(start, start + chunk_tokens))
        total = total + (checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return total


def _chunk_topk_uld(s_hidden, weight, bias, log_probs, log_tail, temperature: float) -> torch.Tensor:
    return topk_uld_distance(F.linear(s_hidden, weight, bias), log_probs, log_tail, temperature=temperature).sum()


def chunked_topk_uld(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_log_probs: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, int]:
    """`(Σ ULD_k, N)` over N aligned positions: the student's final hidden states `[N, d_s]`
    against a cache's top-k targets at the same positions, the head applied `chunk_tokens` rows at
    a time with each chunk's logits recomputed in backward."""
    if student_hidden.shape[0] != teacher_log_probs.shape[0]:
        raise GeokdError(
            f"ULD: {student_hidden.shape[0]} student positions and {teacher_log_probs.shape[0]} cached ones; align them first"
        )

    def chunk(rows: slice) -> tuple:
        return (student_hidden[rows], student_head.weight, student_head.bias, teacher_log_probs[rows],
                teacher_log_tail[rows], float(temperature))  # fmt: skip

    total = _sum_chunks(_chunk_topk_uld, chunk, student_hidden, student_head, chunk_tokens)
    return total, int(student_hidden.shape[0])


def chunked_uld(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, int]:
    """`(Σ ULD, N)` over N aligned positions from each model's final hidden states (`[N, d_s]`,
    `[N, d_t]`, already aligned by `uld_positions`), applying the heads `chunk_tokens` rows at a
    time; the student's chunk logits are recomputed in backward (activation checkpointing), the
    teacher's are computed without a graph."""
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise GeokdError(
            f"ULD: {student_hidden.shape[0]} student and {teacher_hidden.shape[0]} teacher positions; align them first"
        )

    def chunk(rows: slice) -> tuple:
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[rows].to(teacher_head.weight.dtype)).float()
        return student_hidden[rows], student_head.weight, student_head.bias, t_logits, float(temperature)

    total = _sum_chunks(_chunk_uld, chunk, student_hidden, student_head, chunk_tokens)
    return total, int(student_hidden.shape[0])
