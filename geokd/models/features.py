"""Layer maps and feature rows for encoders: which student layer learns from which teacher layer,
and the `[n, d]` row matrices the feature losses compare (`cls`, `mean`, `tokens`). The decoder
rows (response tokens only) are `geokd.models.decoder.decoder_features`."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from geokd.errors import GeokdError

# The row layouts of `extract_features`; the same spelling as RunConfig.features.
FEATURES = ("cls", "mean", "tokens")


def uniform_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """t(i) = max(1, floor(i·L_t/L_s + 1/2)), in exact integer arithmetic: the teacher layer the
    `uniform` map pairs with student layer i (also the block `truncate:N` copies)."""
    return max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers))


_PAIR = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_layer_map(
    spec: str, student_layers: int, teacher_layers: int, copied_from: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """`uniform`, `last`, `copied` or `"s:t,s:t"` -> [(student_layer, teacher_layer), ...] in
    hidden_states indexing (0 = embeddings, i = output of block i). `uniform` maps student layer i
    in 1..L_s to teacher layer max(1, floor(i·L_t/L_s + 1/2)); `last` is [(L_s, L_t)]; `copied`
    pairs each block of a `truncate:` student with the teacher block it was copied from
    (`copied_from`, 0-based, as `LoadedStudent.teacher_blocks`; the same pairs as `uniform` for
    `truncate:N`); explicit pairs keep their order. Every malformed or out-of-range pair is
    reported at once."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive, got {student_layers} and {teacher_layers}")
    text = spec.strip()
    if text == "copied":
        if copied_from is None:
            raise GeokdError(
                "layers: 'copied' pairs the blocks of a truncate: student with the teacher blocks they were copied "
                "from, and this student was not built by truncate:; use 'uniform', 'last' or pairs such as '2:4,4:8'"
            )
        if len(copied_from) != student_layers:  # a LoadedStudent that does not describe its model: a bug
            raise ValueError(f"copied_from has {len(copied_from)} blocks for {student_layers} student layers")
        return [(i, block + 1) for i, block in enumerate(copied_from, start=1)]
    if text == "uniform":
        return [(i, uniform_layer(i, student_layers, teacher_layers)) for i in range(1, student_layers + 1)]
    if text == "last":
        return [(student_layers, teacher_layers)]
    pairs: list[tuple[int, int]] = []
    problems: list[str] = []
    for item in text.split(","):
        match = _PAIR.fullmatch(item)
        if match is None:
            problems.append(f"{item.strip()!r} is not student:teacher")
            continue
        pair = (int(match[1]), int(match[2]))
        if pair[0] > student_layers:
            problems.append(f"student layer {pair[0]} is out of range 0..{student_layers}")
        if pair[1] > teacher_layers:
            problems.append(f"teacher layer {pair[1]} is out of range 0..{teacher_layers}")
        if pair in pairs:
            problems.append(f"pair {pair[0]}:{pair[1]} is repeated")
        pairs.append(pair)
    if problems:
        raise GeokdError(
            f"layers: {'; '.join(problems)} in {spec!r}; use 'uniform', 'last', 'copied' or pairs such as '2:4,4:8' with "
            f"student layers in 0..{student_layers} and teacher layers in 0..{teacher_layers} (0 = embeddings)"
        )
    return pairs


def extract_features(
    hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    features: str,
) -> list[torch.Tensor]:
    """Rows for the feature losses: one `[n, d]` tensor per entry of `layers`, in that order.

    `hidden_states` is the model output with `output_hidden_states=True` (L + 1 tensors
    `[B, T, d]`), `attention_mask` `[B, T]` (1 = token, 0 = padding). `features`:

    * `cls`: position 0 of each example, `[B, d]` (every example must start with a token: right
      padding, as BERT-style tokenizers produce);
    * `mean`: masked mean over each example's tokens, `[B, d]`, computed and returned in float32
      (float64 stays float64): a half-precision sum over hundreds of tokens loses the digits the
      geometry losses work with. An example without tokens gives a zero row;
    * `tokens`: every non-padding token, `[N_tokens, d]`, example by example in position order.

    Padding positions are never read into a row (masked with `where`, so even NaN there is
    harmless). Only the requested layers are touched; a layer listed twice is computed once.
    """
    if features not in FEATURES:
        raise GeokdError(f"features: must be one of {', '.join(FEATURES)}, got {features!r}")
    bad = [layer for layer in layers if not 0 <= layer < len(hidden_states)]
    if bad:
        raise GeokdError(
            f"layers: layer index {bad[0]} is out of range 0..{len(hidden_states) - 1} for a model with "
            f"{len(hidden_states) - 1} blocks; check the layer map"
        )
    if not layers:
        return []
    mask = attention_mask.to(torch.bool)  # [B, T]
    shape = tuple(hidden_states[layers[0]].shape[:2])
    if tuple(mask.shape) != shape:
        raise GeokdError(
            f"features: attention_mask has shape {tuple(mask.shape)}, hidden states {shape} [B, T]"
        )
    # Checked where it costs nothing: a host tensor here, the tokenizer's padding side for the
    # training loop (geokd.workloads.encoder), which never synchronises with a GPU per batch.
    if features == "cls" and mask.device.type == "cpu" and not bool(mask[:, 0].all()):
        raise GeokdError(
            "features: cls pooling reads position 0, but some examples start with padding (left padding); "
            "pad on the right or use features=mean"
        )
    rows: dict[int, torch.Tensor] = {}
    for layer in layers:
        if layer in rows:
            continue
        hidden = hidden_states[layer]  # [B, T, D]
        if features == "cls":
            rows[layer] = hidden[:, 0]  # [B, D]
        elif features == "tokens":
            rows[layer] = hidden[mask]  # [N_tokens, D]
        else:
            dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            keep = mask.unsqueeze(-1)  # [B, T, 1]
            summed = torch.where(keep, hidden.to(dtype), 0.0).sum(dim=1)  # [B, D]
            counts = keep.sum(dim=1).clamp_min(1).to(dtype)  # [B, 1]
            rows[layer] = summed / counts  # [B, D]
    return [rows[layer] for layer in layers]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
