"""The loss library. Feature losses take `student [n, d_s]`, `teacher [n, d_t]` (rows already
masked and flattened) and return a float32 scalar:

* `procrustes(s, t, normalize=True)`: squared Procrustes distance `2 − 2‖SᵀT‖_*`.
* `gram(s, t, normalize=True)`: `‖S Sᵀ − T Tᵀ‖_F`.
* `cka(s, t)`: `1 − linear CKA`.
* `proj(s, t, weight)`, `mse(s, t)`, `cosine(s, t)`: row-wise baselines.

plus `kl(student_logits, teacher_logits, temperature)` and `task_loss(logits, labels)`. The
registry (`build_feature_loss`, `FEATURE_LOSSES`) maps names to modules.
"""

from geokd.losses.geometry import cka, gram, procrustes
from geokd.losses.logits import kl, task_loss
from geokd.losses.pointwise import cosine, mse, proj
from geokd.losses.registry import (
    FEATURE_LOSSES,
    FunctionalLoss,
    ProjectionLoss,
    build_feature_loss,
    feature_loss_names,
)

__all__ = [
    "FEATURE_LOSSES",
    "FunctionalLoss",
    "ProjectionLoss",
    "build_feature_loss",
    "cka",
    "cosine",
    "feature_loss_names",
    "gram",
    "kl",
    "mse",
    "procrustes",
    "proj",
    "task_loss",
]
