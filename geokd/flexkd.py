"""The Flex-KD scoring pass and its record in the run directory (issue #13; the loss and the
selection math are `geokd.losses.flexkd`).

Before the first step of a `--loss flexkd` run, the teacher runs forward and backward over
`--flexkd-samples` training examples (a seeded subset; 0: all). For every mapped teacher layer the
gradient of the teacher's task output with respect to that layer's hidden state is accumulated
over the scored rows (`DimensionScores`):

* task output `--flexkd-output prediction` (default): for a classifier, the cross-entropy of the
  teacher's own predicted class (for a regression head: the predicted value itself, whose loss
  against itself would be 0); for a causal LM, the log-probability of its own greedy next token,
  summed over the response positions. `label`: the same against the gold label or next token.
* rows: an encoder's non-padding tokens; a decoder's response tokens (the rows its features use).

The scores and each pair's selection are written to `RUN/flexkd.safetensors` (metadata: basis,
output, samples, the teacher's weights hash, the data fingerprint). A run that is resumed from a
checkpoint restores the selection with the objective's buffers; a run restarted before its first
checkpoint reads the file back (when its metadata matches) instead of scoring again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from geokd.errors import GeokdError
from geokd.losses.flexkd import DimensionScores, FlexKDLoss

RECORD = "flexkd.safetensors"  # in a run directory and in a cache folder


def classifier_output(logits: torch.Tensor, labels: torch.Tensor, output: str) -> torch.Tensor:
    """The scalar whose gradient scores an encoder classifier's dimensions (module docstring)."""
    logits = logits.float()
    if logits.shape[-1] == 1:  # regression
        value = logits.squeeze(-1)
        return value.sum() if output == "prediction" else 0.5 * (value - labels.float()).square().sum()
    target = logits.argmax(dim=-1) if output == "prediction" else labels
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum")


def next_token_output(logits: torch.Tensor, targets: torch.Tensor, output: str) -> torch.Tensor:
    """The scalar of a causal LM at its response positions: `logits [N, V]`, gold next tokens `[N]`."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_p.argmax(dim=-1) if output == "prediction" else targets
    return log_p.gather(-1, chosen.unsqueeze(-1)).sum()


def score_teacher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    layers: Sequence[int],
    forward: Callable[[dict[str, torch.Tensor]], tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]],
    *,
    tangent: bool,
) -> dict[int, DimensionScores]:
    """Accumulate `DimensionScores` for each of `layers` (indices into the hidden-state tuple).
    `forward(batch)` runs the model and returns `(hidden_states, task output scalar, rows mask
    [B, T])`. The model's input embeddings are made to require grad for the pass (a frozen model
    has no graph otherwise); no parameter gradient is computed or kept."""
    layers = sorted(set(layers))
    embeddings = model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    scores: dict[int, DimensionScores] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                hidden_states, output, rows = forward(batch)
                wanted = [hidden_states[layer] for layer in layers]
                grads = torch.autograd.grad(output, wanted, allow_unused=True)
                for layer, grad, state in zip(layers, grads, wanted, strict=True):
                    if grad is None:
                        grad = torch.zeros_like(state)  # the output does not read this layer
                    if layer not in scores:
                        scores[layer] = DimensionScores(grad.shape[-1], tangent=tangent)
                    scores[layer].update(grad[rows])
    finally:
        hook.remove()
        model.train(was_training)
    return scores


def sample_indices(n_examples: int, samples: int, seed: int) -> list[int]:
    """The scored examples: a seeded random subset of `samples` (all when 0 or more than there are),
    in ascending order."""
    if samples <= 0 or samples >= n_examples:
        return list(range(n_examples))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_examples, generator=g)[:samples].tolist())


def selections(objective: torch.nn.Module) -> list[tuple[tuple[int, int], FlexKDLoss]]:
    """The objective's `(student layer, teacher layer)` pairs with their FlexKDLoss modules."""
    losses = getattr(objective, "feature_losses", [])
    return [(pair, loss) for pair, loss in zip(objective.layer_pairs, losses, strict=True) if isinstance(loss, FlexKDLoss)]


def pair_with_origin(chosen: torch.Tensor, origin: Sequence[int]) -> torch.Tensor:
    """Order the selected teacher dimensions `chosen` (ascending, one per student channel) so that
    student channel i pairs with `origin[i]`, the teacher channel it was cut from, wherever that
    channel is selected; the selected dimensions no student channel was cut from go, ascending, to
    the remaining student channels in their order. The result is a permutation of `chosen` (the same
    teacher subspace); it is `chosen` itself when `origin` selects the same channels."""
    picked = [int(c) for c in chosen.tolist()]
    if len(origin) != len(picked):
        raise GeokdError(f"flexkd: {len(picked)} selected teacher dimensions for {len(origin)} pruned student channels")
    selected, cut_from = set(picked), {int(o) for o in origin}
    leftover = iter([c for c in picked if c not in cut_from])
    paired = [int(o) if int(o) in selected else next(leftover) for o in origin]
    return torch.tensor(paired, dtype=chosen.dtype)


def install(objective: torch.nn.Module, scores: dict[int, DimensionScores],
            origin: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Set each FlexKDLoss's selection from the scores of its teacher layer; a summary for logs.
    `origin`: a `prune:` student's teacher channel per student channel (`pair_with_origin`)."""
    summary = {}
    for (s_layer, t_layer), loss in selections(objective):
        state = scores[t_layer]
        entry: dict[str, Any] = {"width": loss.width, "of": state.dim}
        if loss.basis_kind == "dims":
            chosen = state.select(loss.width)
            if origin is not None:  # a prune: student's channels are its own width: one origin each
                chosen = pair_with_origin(chosen, origin)
                # how many student channels are paired with the teacher channel they were cut from
                entry["own_channel"] = sum(int(c) == int(o) for c, o in zip(chosen.tolist(), origin, strict=True))
            loss.set_selection(chosen)
            kept = state.abs_sum[chosen].sum() / state.abs_sum.sum().clamp_min(1e-300)
        else:
            basis = state.basis(loss.width)
            loss.set_selection(basis)
            cov = state.covariance()
            kept = torch.trace(basis.T @ cov @ basis) / torch.trace(cov).clamp_min(1e-300)
        summary[f"{s_layer}->{t_layer}"] = {**entry, "score_kept": float(kept)}
    return summary


def write_scores(path: Path, scores: dict[int, DimensionScores], meta: dict[str, Any],
                 pairs: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Every layer's accumulators (and `pairs`: named selections) with `meta`, atomically."""
    from safetensors.torch import save_file

    from geokd.artifacts import atomic_path

    tensors: dict[str, torch.Tensor] = {}
    for layer, state in scores.items():
        for name, value in state.state().items():
            tensors[f"layer.{layer}.{name}"] = value.contiguous()
    tensors.update(pairs or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"geokd": json.dumps(meta, sort_keys=True)})


def _open(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(meta, tensors)` of a Flex-KD file; a damaged one is an error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("geokd", "{}"))
            return meta, {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise GeokdError(f"{str(path)!r} is damaged ({exc}); delete it and score the teacher again") from None


def _scores(path: Path, tensors: dict[str, torch.Tensor], layers: Sequence[int], tangent: bool) -> dict[int, DimensionScores]:
    """The `DimensionScores` of `layers` held in a Flex-KD file's tensors."""
    scores: dict[int, DimensionScores] = {}
    for layer in layers:
        if f"layer.{layer}.abs_sum" not in tensors or (tangent and f"layer.{layer}.outer" not in tensors):
            raise GeokdError(f"{str(path)!r} holds no Flex-KD scores of teacher layer {layer}; score it again with that layer")
        abs_sum = tensors[f"layer.{layer}.abs_sum"]
        state = DimensionScores(abs_sum.shape[0], tangent=tangent)
        state.abs_sum = abs_sum.double()
        state.rows = int(tensors[f"layer.{layer}.rows"][0])
        if tangent:
            state.sum, state.outer = tensors[f"layer.{layer}.sum"].double(), tensors[f"layer.{layer}.outer"].double()
        scores[layer] = state
    return scores


def write_record(path: Path, scores: dict[int, DimensionScores], objective: torch.nn.Module,
                 meta: dict[str, Any]) -> None:  # fmt: skip
    """`RUN/flexkd.safetensors`: every layer's accumulators and every pair's selection."""
    pairs = {f"pair.{s}.{t}": (loss.index if loss.basis_kind == "dims" else loss.basis).cpu().contiguous()
             for (s, t), loss in selections(objective)}  # fmt: skip
    write_scores(path, scores, meta, pairs)


def read_record(path: Path, meta: dict[str, Any]) -> dict[int, DimensionScores] | None:
    """The scores stored at `path` when its metadata equals `meta` (same teacher, data, layers,
    basis, output, samples), else None (the caller scores again and overwrites it)."""
    if not path.is_file():
        return None
    stored, tensors = _open(path)
    if stored != json.loads(json.dumps(meta, sort_keys=True)):
        return None
    return _scores(path, tensors, meta["teacher_layers"], tangent=meta["basis"] == "tangent")


# The scalar each kind of teacher is scored by, as a `score_teacher` forward.


def encoder_forward(model: torch.nn.Module, output: str, autocast: Callable[[], Any]) -> Callable:
    """`batch -> (hidden_states, classifier_output, non-padding mask)` of a classifier teacher."""

    def forward(batch: dict[str, torch.Tensor]):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_id")}
        with autocast():
            out = model(**inputs, output_hidden_states=True)
        return out.hidden_states, classifier_output(out.logits, batch["labels"], output), batch["attention_mask"].bool()

    return forward


def decoder_forward(model: torch.nn.Module, head: torch.nn.Module, vocab: int | None, output: str,
                    autocast: Callable[[], Any], teacher_keys: bool = False) -> Callable:  # fmt: skip
    """`batch -> (hidden_states, next_token_output, response-token mask)` of a causal-LM teacher
    (`teacher_keys`: read the teacher's own tokenisation, `teacher_input_ids` etc., of a paired
    cross-tokenizer batch)."""
    from geokd.workloads.decoder import _base_forward, response_positions, teacher_view

    def forward(batch: dict[str, torch.Tensor]):
        t_batch, labels = teacher_view(batch, teacher_keys)
        positions, targets = response_positions(labels)
        with autocast():
            out = _base_forward(model, t_batch, True)
            logits = head(out.last_hidden_state[:, :-1][positions])
        if vocab is not None:
            logits = logits[:, :vocab]
        return out.hidden_states, next_token_output(logits, targets, output), labels != -100

    return forward


def batches_of(features: Sequence[dict[str, Any]], indices: Sequence[int], collate: Callable, batch_size: int,
               device: Any) -> Iterable[dict[str, torch.Tensor]]:  # fmt: skip
    """The examples `indices` of `features`, collated `batch_size` at a time, on `device`."""
    for first in range(0, len(indices), batch_size):
        batch = collate([features[i] for i in indices[first : first + batch_size]])
        yield {k: v.to(device) for k, v in batch.items()}


def score_into_cache(out: Path, model: torch.nn.Module, forward: Callable, features: Sequence[dict[str, Any]],
                     collate: Callable, layers: Sequence[int], *, samples: int, output: str, seed: int,
                     batch_size: int, device: Any) -> dict[str, Any]:  # fmt: skip
    """`geokd cache --flexkd-samples N`: score the teacher's cached layers (with the tangent
    statistics, so either basis can be chosen at distill time) into `CACHE/flexkd.safetensors`;
    returns the manifest entry (file, SHA-256, samples, output, seed, scored examples)."""
    from geokd.cache import file_sha256

    indices = sample_indices(len(features), samples, seed)
    scores = score_teacher(model, batches_of(features, indices, collate, batch_size, device), layers, forward,
                           tangent=True)  # fmt: skip
    meta = {"samples": samples, "output": output, "seed": seed, "examples": len(indices), "layers": sorted(scores)}
    path = out / RECORD
    write_scores(path, scores, meta)
    return {**meta, "file": RECORD, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def cached_scores(cache_path: Path, entry: dict[str, Any], layers: Sequence[int], tangent: bool) -> dict[int, DimensionScores]:
    """The Flex-KD scores a cache holds (`score_into_cache`), checked against its manifest's SHA-256."""
    from geokd.cache import file_sha256

    path = Path(cache_path) / entry["file"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise GeokdError(f"--cache: {str(path)!r} is missing or does not match the manifest's SHA-256; rebuild the "
                         "cache's Flex-KD scores (geokd cache ... --flexkd-samples N)")  # fmt: skip
    missing = [layer for layer in layers if layer not in entry["layers"]]
    if missing:
        raise GeokdError(f"--cache: the cache's Flex-KD scores cover teacher layers {entry['layers']}, not {missing}; "
                         "use those layers or rebuild the cache with them")  # fmt: skip
    return _scores(path, _open(path)[1], layers, tangent)


def check_cache_entry(entry: dict[str, Any] | None, samples: int, output: str) -> None:
    """`--loss flexkd --cache`: the cache must hold scores made the way the run asks for them."""
    if not entry:
        raise GeokdError("--loss flexkd: the cache holds no Flex-KD scores; rebuild it with geokd cache ... "
                         "--flexkd-samples N (or distil from the live --teacher)")  # fmt: skip
    if entry["output"] != output or entry["samples"] != samples:
        raise GeokdError(f"--loss flexkd: the cache was scored with --flexkd-output {entry['output']} and "
                         f"--flexkd-samples {entry['samples']}, the run asks for {output} and {samples}; pass "
                         f"--flexkd-output {entry['output']} --flexkd-samples {entry['samples']}")  # fmt: skip


def prepare(objective: torch.nn.Module, run_dir: Path, meta: dict[str, Any],
            score: Callable[[], dict[int, DimensionScores]], warn: Callable[[str], None],
            write: bool = True, origin: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Fill the objective's Flex-KD selections before the first step: from `RUN/flexkd.safetensors`
    when it matches `meta`, else by running `score()` and writing the record (`write=False`: a
    torchrun rank other than 0, which scores the same examples and writes nothing). Returns a
    summary."""
    path = run_dir / RECORD
    started = time.perf_counter()
    scores = read_record(path, meta)
    reused = scores is not None
    if scores is None:
        if path.is_file():
            warn(f"{path} was scored for another teacher, data or setting; scoring again")
        scores = score()
    summary = install(objective, scores, origin)
    if not reused and write:
        write_record(path, scores, objective, meta)
    return {"reused": reused, "seconds": time.perf_counter() - started, "rows": max(s.rows for s in scores.values()),
            "pairs": summary}  # fmt: skip


def read_selections(run_dir: str | Path | None) -> dict[tuple[int, int], torch.Tensor]:
    """The `(student layer, teacher layer) -> selection` of a finished flexkd run (index vector or
    basis), empty when the run did not use flexkd; a damaged record is an error naming it."""
    path = Path(run_dir) / RECORD if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    tensors = _open(path)[1]
    return {(int(name.split(".")[1]), int(name.split(".")[2])): value
            for name, value in tensors.items() if name.startswith("pair.")}  # fmt: skip


def selected_correlation(student: torch.Tensor, teacher: torch.Tensor, selection: torch.Tensor) -> float | None:
    """The mean per-dimension Pearson correlation (1 − the flexkd loss) between the student's rows
    and the teacher's selected subspace; None when the student has fewer columns than selected."""
    from geokd.losses.flexkd import pearson_alignment

    width = selection.shape[0] if selection.dim() == 1 else selection.shape[1]
    if student.shape[1] < width:
        return None
    picked = teacher.index_select(1, selection.long()) if selection.dim() == 1 else teacher.double() @ selection.double()
    return 1.0 - float(pearson_alignment(student[:, :width].double(), picked.double()))
