"""The distillation objective: `γ·L_task + α·Σ_layers L_feature + (1 − α)·τ²·KL` (arXiv 2509.25253,
§5: feature losses alone fail; they are combined with logit KD and the task loss).

`Objective` owns one feature-loss module per mapped layer pair (a `proj` loss has its own
projection per pair, an auxiliary parameter saved for resume and never exported) and returns a
`LossOutput` with the total and every term, named for logging:

    task, kl, feature/<loss>/<student_layer>-><teacher_layer>

With `loss="none"` there are no feature terms and the KL weight stays `1 − α` (so `alpha=0` gives
plain logit KD + task loss). Finetuning is `Objective(..., mode="finetune")`: the task loss only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from geokd import distributed
from geokd.losses.logits import kl, task_loss
from geokd.losses.registry import ATTENTION_LOSSES, build_feature_loss
from geokd.runtime import full_float32


@dataclass
class LossOutput:
    total: torch.Tensor  # 0-d, differentiable
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), **{k: float(v) for k, v in self.terms.items()}}


class Objective(nn.Module):
    """Weighted sum of the task loss, per-layer feature losses and logit KD."""

    def __init__(
        self,
        loss: str,
        layer_pairs: list[tuple[int, int]],
        student_dim: int,
        teacher_dim: int,
        alpha: float = 0.5,
        gamma: float = 1.0,
        temperature: float = 2.0,
        mode: str = "distill",
        flexkd_basis: str = "dims",
        loss_options: dict | None = None,
    ):
        super().__init__()
        self.loss_name = loss
        # Attention losses are per-query means within a micro-batch: no global geometry batch, no
        # row gathering under torchrun (each rank's micro-batches are weighted like the task loss).
        self.batch_level = loss not in ATTENTION_LOSSES
        self.layer_pairs = list(layer_pairs) if mode == "distill" and loss != "none" else []
        self.alpha, self.gamma, self.temperature, self.mode = alpha, gamma, temperature, mode
        options = {"basis": flexkd_basis} if loss == "flexkd" else dict(loss_options or {})
        self.feature_losses = nn.ModuleList(
            build_feature_loss(loss, student_dim, teacher_dim, **options) for _ in self.layer_pairs
        )

    # The global geometry batch (geokd.engine, --geometry-batch global): while `collecting`, each
    # call's feature rows are appended to a list instead of becoming feature terms, so the engine
    # can evaluate the batch-level losses once over the rows of all the step's micro-batches.
    _collected: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
    _features_only = False

    @contextmanager
    def collecting(self, features_only: bool) -> Iterator[list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
        """Within the block, forward() adds no feature terms; each call appends its (student rows,
        teacher rows) per layer pair to the yielded list. `features_only`: forward() computes
        nothing else either and returns a zero total (the rows-only first pass)."""
        self._collected, self._features_only = [], features_only
        try:
            yield self._collected
        finally:
            self._collected, self._features_only = None, False

    def term_names(self) -> list[str]:
        names = ["task"]
        if self.mode == "distill":
            names.append("kl")
            names += [f"feature/{self.loss_name}/{s}->{t}" for s, t in self.layer_pairs]
        return names

    def forward(
        self,
        student_logits: torch.Tensor,  # [B, C]
        labels: torch.Tensor,  # [B]
        teacher_logits: torch.Tensor | None = None,  # [B, C]
        student_features: list[torch.Tensor] | None = None,  # per pair: [n, d_s]
        teacher_features: list[torch.Tensor] | None = None,  # per pair: [n, d_t]
    ) -> LossOutput:
        if self._features_only:
            self.add_feature_terms(student_logits.new_zeros(()), {}, student_features, teacher_features)
            return LossOutput(total=student_logits.new_zeros(()))
        terms: dict[str, torch.Tensor] = {}
        task = task_loss(student_logits, labels)
        terms["task"] = task
        total = self.gamma * task
        if self.mode == "distill":
            if teacher_logits is not None:
                distill = kl(student_logits, teacher_logits, self.temperature)
                terms["kl"] = distill
                total = total + (1.0 - self.alpha) * distill
            elif self.alpha != 1.0:  # only a feature-only objective (alpha = 1) may go without
                raise ValueError("distill objective needs teacher logits unless alpha = 1")
            total = self.add_feature_terms(total, terms, student_features, teacher_features)
        return LossOutput(total=total, terms={k: v.detach() for k, v in terms.items()})

    def add_feature_terms(
        self,
        total: torch.Tensor,
        terms: dict[str, torch.Tensor],
        student_features: list[torch.Tensor] | None,
        teacher_features: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """`total + α·Σ_pairs L_feature`, recording each pair's term in `terms`."""
        if not self.layer_pairs:
            return total
        if student_features is None or teacher_features is None:
            raise ValueError("feature loss needs student and teacher features for every layer pair")
        if self._collected is not None:
            self._collected.append((list(student_features), list(teacher_features)))
            return total
        if distributed.world_size() > 1 and self.batch_level:  # torchrun: the loss of the global batch (geokd.distributed)
            student_features = [distributed.gather_rows(s) for s in student_features]
            teacher_features = [distributed.gather_rows(t) for t in teacher_features]
        for (s_layer, t_layer), loss_fn, s, t in zip(
            self.layer_pairs, self.feature_losses, student_features, teacher_features, strict=True
        ):
            with full_float32():
                value = loss_fn(s, t)
            terms[f"feature/{self.loss_name}/{s_layer}->{t_layer}"] = value
            total = total + self.alpha * value
        return total
