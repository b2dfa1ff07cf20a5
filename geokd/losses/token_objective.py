"""The decoder objective (issue #11): `γ·L_SFT + α·Σ_layers L_feature + (1 − α)·L_KD` on response
tokens only.

* `L_SFT`: cross-entropy of the student's next-token prediction at every response position,
  averaged over the micro-batch's response tokens.
* `L_KD`: a token-level divergence between the teacher's and the student's next-token
  distributions at the same positions (`--kd forward|reverse|jsd|skew-forward|skew-reverse|tvd`,
  `geokd.losses.token_kd`), averaged over the same tokens.
* `L_feature`: any feature loss of the library on response-token rows (or their mean, or the last
  prompt token), one per mapped layer pair, as for encoders.

Both vocabulary-sized terms start from the final hidden states of the response positions and apply
the output heads chunk by chunk, so no `[B, T, V]` (or `[N, V]`) float32 logits exist at once: the
KD term through `chunked_token_kd`'s own autograd function, the SFT term through activation
checkpointing per chunk (the chunk's logits are recomputed in the backward pass instead of kept).
The engine weights each micro-batch by its number of response tokens, so a step's loss is the sum
over the step's response tokens divided by their count: never an average of averages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from geokd.losses.objective import LossOutput, Objective
from geokd.losses.token_kd import chunked_token_kd
from geokd.losses.topk_kd import chunked_topk_kd
from geokd.losses.uld import chunked_topk_uld, chunked_uld


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              vocab: int | None) -> torch.Tensor:  # fmt: skip
    logits = F.linear(hidden, weight if vocab is None else weight[:vocab], None if bias is None else
                      (bias if vocab is None else bias[:vocab]))  # fmt: skip
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, vocab: int | None = None, chunk_tokens: int = 256
) -> torch.Tensor:
    """Σ over rows of −log softmax(head(hidden))[target], computed `chunk_tokens` rows at a time with
    each chunk's logits recomputed in the backward pass (peak memory: one chunk's logits)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            part = checkpoint(_chunk_ce, hidden[rows], head.weight, head.bias, targets[rows], vocab, use_reentrant=False)
        else:
            part = _chunk_ce(hidden[rows], head.weight, head.bias, targets[rows], vocab)
        total = total + part
    return total


class TokenObjective(Objective):
    """Weighted sum of response-token SFT, token-level KD and per-layer feature losses (the feature
    losses, their projection heads and their weighting are the encoder `Objective`'s)."""

    def __init__(
        self,
        loss: str,
        layer_pairs: list[tuple[int, int]],
        student_dim: int,
        teacher_dim: int,
        *,
        alpha: float = 0.5,
        gamma: float = 1.0,
        temperature: float = 1.0,
        kd: str = "forward",
        kd_beta: float = 0.5,
        kd_skew: float = 0.1,
        mode: str = "distill",
        vocab: int | None = None,
        chunk_tokens: int = 256,
        flexkd_basis: str = "dims",
        loss_options: dict | None = None,
    ):
        super().__init__(loss, layer_pairs, student_dim, teacher_dim, alpha=alpha, gamma=gamma,
                         temperature=temperature, mode=mode, flexkd_basis=flexkd_basis,
                         loss_options=loss_options)  # fmt: skip
        self.kd, self.kd_beta, self.kd_skew = kd, kd_beta, kd_skew
        self.vocab, self.chunk_tokens = vocab, chunk_tokens

    def term_names(self) -> list[str]:
        names = ["sft"]
        if self.mode == "distill":
            names += ["kd"] if self.alpha < 1.0 else []
            names += [f"feature/{self.loss_name}/{s}->{t}" for s, t in self.layer_pairs]
        return names

    def forward(
        self,
        student_hidden: torch.Tensor,  # [N, d_s]: final hidden states at the response positions
        student_head: nn.Linear,
        targets: torch.Tensor,  # [N]: the next token at each of those positions
        teacher_hidden: torch.Tensor | None = None,  # [N, d_t]
        teacher_head: nn.Linear | None = None,
        student_features: list[torch.Tensor] | None = None,
        teacher_features: list[torch.Tensor] | None = None,
        cached_targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        aligned: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LossOutput:
        """`cached_targets` (`ids [N, k]`, `log_probs [N, k]`, `log_tail [N]` from a decoder cache)
        replaces the live teacher in the KD term: top-k + tail KD (`geokd.losses.topk_kd`).
        With `kd="uld"`, `aligned` holds the student's and the teacher's final hidden states at the
        aligned response positions (`geokd.losses.uld.uld_positions`; the tokenizers may differ) and
        the KD term is their mean ULD. Both together (`kd="uld"` from a cache): `aligned[0]` holds
        the student's aligned rows, `cached_targets` the cache's at the same positions, and the KD
        term is the mean top-k ULD (`geokd.losses.uld.topk_uld_distance`)."""
        if self._features_only:  # the rows-only first pass of --geometry-batch global
            self.add_feature_terms(student_hidden.new_zeros(()), {}, student_features, teacher_features)
            return LossOutput(total=student_hidden.new_zeros(()))
        n = max(1, int(targets.shape[0]))
        terms: dict[str, torch.Tensor] = {}
        sft = chunked_cross_entropy(student_hidden, student_head, targets, self.vocab, self.chunk_tokens) / n
        terms["sft"] = sft
        total = self.gamma * sft
        if self.mode == "distill":
            if cached_targets is not None and self.alpha < 1.0 and self.kd == "uld":
                rows = aligned[0] if aligned is not None else student_hidden
                uld_sum, m = chunked_topk_uld(rows, student_head, cached_targets[1], cached_targets[2],
                                              temperature=self.temperature, chunk_tokens=self.chunk_tokens)  # fmt: skip
                terms["kd"] = uld_sum / max(1, m)
                total = total + (1.0 - self.alpha) * terms["kd"]
            elif cached_targets is not None and self.alpha < 1.0:
                kd_sum, _ = chunked_topk_kd(
                    student_hidden, student_head, *cached_targets, self.kd, temperature=self.temperature,
                    beta=self.kd_beta, skew=self.kd_skew, vocab=self.vocab, chunk_tokens=self.chunk_tokens,
                )  # fmt: skip
                terms["kd"] = kd_sum / n
                total = total + (1.0 - self.alpha) * terms["kd"]
            elif self.kd == "uld" and aligned is not None and teacher_head is not None and self.alpha < 1.0:
                uld_sum, m = chunked_uld(aligned[0], student_head, aligned[1], teacher_head,
                                         temperature=self.temperature, chunk_tokens=self.chunk_tokens)  # fmt: skip
                terms["kd"] = uld_sum / max(1, m)
                total = total + (1.0 - self.alpha) * terms["kd"]
            elif teacher_hidden is not None and teacher_head is not None and self.alpha < 1.0:
                kd_sum, _ = chunked_token_kd(
                    student_hidden, student_head, teacher_hidden, teacher_head, self.kd,
                    temperature=self.temperature, beta=self.kd_beta, skew=self.kd_skew, vocab=self.vocab,
                    chunk_tokens=self.chunk_tokens,
                )  # fmt: skip
                kd_value = kd_sum / n
                terms["kd"] = kd_value
                total = total + (1.0 - self.alpha) * kd_value
            total = self.add_feature_terms(total, terms, student_features, teacher_features)
        return LossOutput(total=total, terms={k: v.detach() for k, v in terms.items()})
