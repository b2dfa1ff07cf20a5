"""Output-level losses: temperature-scaled logit KD and the task loss.

Shapes: logits `[n, C]` (C = 1 for regression), labels `[n]`. Computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geokd.errors import GeokdError
from geokd.losses._core import compute_dtype


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """`τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`, averaged over rows (Hinton et al. 2015).

    The τ² factor keeps the gradient scale independent of τ. For a regression head (C = 1) there is
    no distribution; the squared error of the raw outputs is used instead (no τ scaling).
    """
    if temperature <= 0:
        raise GeokdError(f"kl: temperature must be > 0, got {temperature}; the usual range is 1-4")
    if student_logits.shape != teacher_logits.shape:
        raise GeokdError(
            f"kl: student and teacher logits differ in shape, {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; both models need the same label space"
        )
    dtype = compute_dtype(student_logits)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if s.shape[-1] == 1:
        return F.mse_loss(s, t)
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    loss = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return loss * temperature**2


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (`logits [n, C]`, integer labels) or mean squared error for
    regression (`logits [n, 1]`, float labels), as Hugging Face sequence classifiers define it."""
    dtype = compute_dtype(logits)
    logits = logits.to(dtype)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(dtype))
    return F.cross_entropy(logits, labels.long())
