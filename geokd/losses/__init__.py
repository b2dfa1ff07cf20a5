"""The loss library. Feature losses take `student [n, d_s]`, `teacher [n, d_t]` (rows already
masked and flattened) and return a float32 scalar:

* `procrustes(s, t, normalize=True)`: squared Procrustes distance `2 − 2‖SᵀT‖_*`.
* `gram(s, t, normalize=True)`: `‖S Sᵀ − T Tᵀ‖_F`.
* `cka(s, t)`: `1 − linear CKA`.
* `proj(s, t, weight)`, `mse(s, t)`, `cosine(s, t)`: row-wise baselines.

plus `kl(student_logits, teacher_logits, temperature)` and `task_loss(logits, labels)`, and for
decoders the token-level KD divergences (`KD_KINDS`, `token_divergence`, and `chunked_token_kd`,
which starts from the final hidden states and never holds full `[N, V]` logits), their top-k +
tail form for cached teachers (`topk_targets`, `topk_token_divergence`, `chunked_topk_kd`) and the
cross-tokenizer ULD distance (`uld_distance`; `topk_uld_distance` from a cache). The
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
    row_loss_names,
)
from geokd.losses.token_kd import KD_KINDS, chunked_token_kd, token_divergence
from geokd.losses.topk_kd import chunked_topk_kd, topk_targets, topk_token_divergence
from geokd.losses.uld import topk_uld_distance, uld_distance, uld_positions

__all__ = [
    "FEATURE_LOSSES",
    "FunctionalLoss",
    "KD_KINDS",
    "ProjectionLoss",
    "build_feature_loss",
    "chunked_token_kd",
    "chunked_topk_kd",
    "cka",
    "cosine",
    "feature_loss_names",
    "gram",
    "kl",
    "mse",
    "procrustes",
    "proj",
    "row_loss_names",
    "task_loss",
    "token_divergence",
    "topk_targets",
    "topk_token_divergence",
    "topk_uld_distance",
    "uld_distance",
    "uld_positions",
]
