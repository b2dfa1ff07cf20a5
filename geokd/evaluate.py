"""`geokd eval`: task metrics of any model on a task split, and the geometry report of a student
against a teacher (issue #4).

* `evaluate_model(...)` loads a model (a run directory, its `final/`, an export, a local folder or
  a Hugging Face id), checks that its head fits the task, predicts with `predict` and scores with
  `geokd.tasks.compute_metrics`. The result is a JSON-ready dict: task, split, n_examples, metrics,
  model identity (path, weights SHA-256, parameters, label mapping, the run's own record), data
  source and fingerprint, settings, geokd version, elapsed time.
* **Labels.** Predictions are returned in the task's label ids (the `datasets` glue convention, e.g.
  RTE entailment = 0). A model whose `id2label` names the labels (`ENTAILMENT`, `not_entailment`:
  case, `-`, `_` and spaces ignored) is mapped by name, so a head trained with another order still
  scores correctly; generic names (`LABEL_0`, `0`) are taken as ids. Names that are neither are an
  error, never a silent guess.
* **Throughput.** `predict` sorts the examples by length (longest first), packs each batch up to a
  token budget (`batch_size` examples at the longest length: shorter inputs share a batch with more
  of their kind), runs under `torch.inference_mode()`, keeps results on the device until the end
  (one host sync) and returns them in input order. `bench/eval.py` measures it against fixed-order
  batching.
* **Geometry report.** `geometry_report(...)` forwards student and teacher over the split, pools
  every hidden state (`cls` or `mean` rows, one per example) and reports, for each mapped layer
  pair, three distances in float64 (0 = same geometry), under these keys everywhere (JSON, table
  columns, plot panels): `procrustes` (the loss library's squared normalised Procrustes distance),
  `gram` (normalised Gram distance) and `cka_distance` (= 1 − linear CKA); and how many of the
  teacher's ε-orthogonal example pairs (|centred cosine| ≤ ε) stay ε-orthogonal in the student.
  On request (`--plot`) the three distances are also computed for every student × teacher layer
  combination (the heat-map of `plot_geometry`).
* **Undefined distances.** All three distances divide by the norm of the centred rows. At a layer
  whose rows are all identical (numerically: zero after centring, within the rounding of their
  dtype), such as the [CLS] row of the embedding layer (hidden state 0), every one of them is 0/0:
  it is reported as `null` with a per-pair `undefined` note saying which side has no geometry (and
  `null` in the grid, `n/a` in the table, a hatched grey `n/a` cell in the plot), never as 0
  ("same geometry") or 1. Such rows never count as ε-orthogonal to anything.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

import geokd
from geokd import distributed
from geokd.errors import GeokdError
from geokd.losses._core import _NOISE_FLOOR_ULPS
from geokd.runtime import Runtime

if TYPE_CHECKING:  # pragma: no cover - typing only
    from geokd.data import DataSplit
    from geokd.models import LoadedModel
    from geokd.tasks import TaskSpec

GEOMETRY_FEATURES = ("cls", "mean")
GEOMETRY_METRICS = ("procrustes", "gram", "cka_distance")  # every one 0 = same geometry
# Names transformers gives labels it knows nothing about, and bare ids.
_GENERIC_LABEL = re.compile(r"(?:label_?)?(\d+)", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Batching and prediction
# --------------------------------------------------------------------------------------------


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of example indices, longest first, each padded to at most `batch_size` × the
    longest length in tokens (so every batch is at most as large as the first one, and short
    inputs are packed more densely). Every index appears exactly once."""
    if batch_size < 1:
        raise GeokdError(f"--batch-size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    budget = batch_size * max(1, lengths[order[0]])
    result, start = [], 0
    while start < len(order):
        width = max(1, lengths[order[start]])  # the batch's longest: the order is descending
        size = max(1, budget // width)
        result.append(order[start : start + size])
        start += size
    return result


def fixed_order_batches(n: int, batch_size: int) -> list[list[int]]:
    """The naive baseline: `batch_size` examples at a time in dataset order."""
    return [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]


@dataclass
class Predictions:
    """What `predict` returns, in input order: `logits [n, C]` float32 on the CPU and, when asked,
    `features[l] [n, d]` = pooled hidden state `l` (0 = embeddings) in float32."""

    logits: torch.Tensor
    features: list[torch.Tensor] | None = None


def predict(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    collate: Callable,
    runtime: Runtime,
    batch_size: int,
    *,
    sort_by_length: bool = True,
    pool: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    shard: bool = False,
) -> Predictions:
    """Forward `model` over tokenised `features` under inference mode.

    `shard=True` under torchrun: each rank forwards every W-th batch of the plan and the logits
    (and pooled rows) of all ranks are gathered, so every rank returns the whole split's
    predictions in input order (`geokd eval` on N processes). Every rank must call it then.

    `sort_by_length=False` gives fixed-order batches (the naive baseline). `pool` (`cls`/`mean`)
    also returns every hidden state pooled to one row per example. `on_batch(k)` is told the number
    of examples of each finished batch (for a progress bar)."""
    from geokd.models import extract_features

    n = len(features)
    if n == 0:
        raise GeokdError("eval: no examples to predict; the split is empty")
    plan = (
        length_sorted_batches([len(f["input_ids"]) for f in features], batch_size)
        if sort_by_length
        else fixed_order_batches(n, batch_size)
    )
    world = distributed.world_size() if shard else 1
    if world > 1:  # every W-th batch of the length-sorted plan: the ranks get similar lengths
        plan = plan[distributed.rank() :: world]
    was_training = model.training
    model.eval()
    indices: list[torch.Tensor] = []
    logits_parts: list[torch.Tensor] = []
    pooled_parts: list[list[torch.Tensor]] = []
    try:
        with torch.inference_mode():
            for batch_indices in plan:
                batch = collate([features[i] for i in batch_indices])
                inputs = {
                    k: v.to(runtime.device, non_blocking=True)
                    for k, v in batch.items()
                    if k not in ("labels", "example_id")
                }
                with runtime.autocast():
                    out = model(**inputs, output_hidden_states=pool is not None)
                logits_parts.append(out.logits.float())  # [B, C]
                if pool is not None:
                    layers = list(range(len(out.hidden_states)))
                    rows = extract_features(out.hidden_states, inputs["attention_mask"], layers, pool)
                    pooled_parts.append([r.float() for r in rows])  # L+1 x [B, d]
                indices.append(torch.as_tensor(batch_indices))
                if on_batch is not None:
                    on_batch(len(batch_indices))
    finally:
        model.train(was_training)
    config = getattr(model, "config", None)
    width, labels = getattr(config, "hidden_size", 0), getattr(config, "num_labels", 0)
    layers_out = getattr(config, "num_hidden_layers", -1) + 1
    empty = torch.empty(0, device=runtime.device)
    position = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)  # [n]: row -> input index
    logits = torch.cat(logits_parts) if logits_parts else empty.new_empty(0, labels)
    pooled_local = None
    if pool is not None:
        pooled_local = [
            torch.cat([part[layer] for part in pooled_parts]) if pooled_parts else empty.new_empty(0, width)
            for layer in range(len(pooled_parts[0]) if pooled_parts else layers_out)
        ]
    if world > 1:  # a rank with no batch contributes empty rows
        position = distributed.gather_rows(position.to(runtime.device).unsqueeze(1)).squeeze(1)
        logits = distributed.gather_rows(logits)
        if pooled_local is not None:
            pooled_local = [distributed.gather_rows(rows) for rows in pooled_local]
    position = position.cpu()
    inverse = torch.empty_like(position)
    inverse[position] = torch.arange(n)
    pooled = None if pooled_local is None else [rows.cpu()[inverse] for rows in pooled_local]  # [n, d]
    return Predictions(logits=logits.cpu()[inverse], features=pooled)  # one host sync, input order


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _normalize_label(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


@dataclass(frozen=True)
class LabelMapping:
    """How the model's output ids become the task's label ids. `kind`: `regression` (one output),
    `by_id` (generic model labels: output i is task label i) or `by_name` (matched by name)."""

    kind: Literal["regression", "by_id", "by_name"]
    model_to_task: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_to_task": list(self.model_to_task)}

    def apply(self, logits: torch.Tensor) -> np.ndarray:
        """Task predictions from model logits `[n, C]`: scores `[n]` or task label ids `[n]`."""
        if self.kind == "regression":
            return logits[:, 0].numpy().astype(np.float64)
        model_ids = logits.argmax(dim=-1).numpy()
        return np.asarray(self.model_to_task, dtype=np.int64)[model_ids]


def _model_label_names(config: Any) -> list[str]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]


def label_mapping(task: TaskSpec, config: Any, model_name: str) -> LabelMapping:
    """Check that a model's head fits `task` and say how its outputs map to the task's labels.

    Raises a GeokdError for a head of the wrong kind or size (a 2-label model on STS-B), and for
    label names that name other labels than the task's."""
    n = int(config.num_labels)
    names = _model_label_names(config)
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(names))
    if task.is_regression:
        if n != 1:
            raise GeokdError(
                f"eval: task {task.name!r} is a regression (one output score) but model {model_name!r} has a "
                f"{n}-label classification head ({shown}); evaluate a model fine-tuned on {task.name}"
            )
        return LabelMapping("regression")
    space = ", ".join(f"{i}={name}" for i, name in enumerate(task.label_names))
    if n == 1:
        raise GeokdError(
            f"eval: model {model_name!r} has a regression head (one output) but task {task.name!r} has "
            f"{task.num_labels} labels ({space}); evaluate a model fine-tuned on {task.name}"
        )
    if n != task.num_labels:
        raise GeokdError(
            f"eval: model {model_name!r} has {n} labels ({shown}) but task {task.name!r} has "
            f"{task.num_labels} ({space}); evaluate a model fine-tuned on {task.name}"
        )
    generic = [_GENERIC_LABEL.fullmatch(name) for name in names]
    if all(generic):
        ids = tuple(int(m[1]) for m in generic if m is not None)
        if sorted(ids) == list(range(n)):
            return LabelMapping("by_id", ids)
    wanted = {_normalize_label(name): i for i, name in enumerate(task.label_names)}
    mapped = tuple(wanted.get(_normalize_label(name), -1) for name in names)
    if -1 in mapped or sorted(mapped) != list(range(n)):
        raise GeokdError(
            f"eval: the labels of model {model_name!r} ({shown}) are not the labels of task {task.name!r} "
            f"({space}); evaluate a model fine-tuned on {task.name}, or fix id2label in its config.json"
        )
    kind: Literal["by_id", "by_name"] = "by_id" if mapped == tuple(range(n)) else "by_name"
    return LabelMapping(kind, mapped)


# --------------------------------------------------------------------------------------------
# Model and task resolution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLocation:
    """`model` as given, the directory (or id) to load, the run directory it belongs to (if any)
    and the run's own record of the model (`final/geokd.json`, if any)."""

    given: str
    load: str
    run_dir: Path | None
    record: dict[str, Any] | None


def locate_model(model: str) -> ModelLocation:
    """A run directory means its `final/`; a run's `final/` knows its run directory. Anything else
    (an export, a model folder, a Hugging Face id, an alias) is loaded as given."""
    path = Path(model).expanduser()
    run_dir = None
    load = model
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        if not (path / "final" / "config.json").is_file():
            raise GeokdError(
                f"eval: {model!r} is a run directory without a final model (no final/config.json); the run "
                "has not finished: resume it (--resume auto) or pass a checkpoint's student/ folder"
            )
        run_dir, load = path, str(path / "final")
    elif path.is_dir() and path.name == "final" and (path.parent / "config.yaml").is_file():
        run_dir = path.parent
    record = None
    record_path = Path(load).expanduser() / "geokd.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GeokdError(
                f"eval: {str(record_path)!r} is unreadable ({exc}); the model folder is damaged, re-export it"
            ) from None
    return ModelLocation(given=model, load=load, run_dir=run_dir, record=record)


def _resolve_task(
    task: str | None,
    text_fields: str | None,
    label_field: str | None,
    location: ModelLocation,
    config: Any,
) -> TaskSpec:
    """`--task`, or the task the model was trained on (its geokd.json). A custom task takes its label
    names from the model's id2label (what training stored), or 0..k-1 for generic names."""
    from geokd.tasks import custom_task, get_task

    record_cfg = (location.record or {}).get("config") or {}
    name = task or record_cfg.get("task")
    if name is None:
        raise GeokdError(
            f"eval: no --task given and {location.given!r} does not record one; pass --task (e.g. --task rte)"
        )
    if task is None:  # inherit a custom task's fields too
        text_fields = text_fields or record_cfg.get("text_fields")
        label_field = label_field or record_cfg.get("label_field")
    spec = get_task(name, text_fields=text_fields, label_field=label_field)
    if spec.glue:
        return spec
    if int(config.num_labels) == 1:
        return custom_task(spec.text_fields, spec.label_field, num_labels=1)
    names = _model_label_names(config)
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):  # transformers' placeholders: no names known
        return custom_task(spec.text_fields, spec.label_field, num_labels=len(names))
    return custom_task(spec.text_fields, spec.label_field, label_names=names)  # what training stored


def _task_key(name: Any) -> str | None:
    from geokd.tasks import _normalize_task_name

    return _normalize_task_name(name) if isinstance(name, str) else None


def check_max_length(loaded: LoadedModel, max_length: int, option: str = "--max-length") -> None:
    """Refuse a token budget beyond the model's position table."""
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise GeokdError(
            f"{option}: {max_length} tokens exceeds the model's {limit} positions; use {option} {limit} or less"
        )


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_eval_split(task: TaskSpec, data: str | None, split: str, limit: int | None) -> DataSplit:
    from dataclasses import replace

    from geokd.data import load_split

    loaded = load_split(task, data, split)
    if limit is not None:
        loaded = replace(loaded, examples=loaded.examples[:limit])
    return loaded


def _validate_common(batch_size: int, max_length: int, limit: int | None) -> None:
    problems = []
    if batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {batch_size}")
    if max_length < 2:
        problems.append(f"--max-length must be at least 2, got {max_length}")
    if limit is not None and limit < 1:
        problems.append(f"--limit must be at least 1, got {limit} (leave it out to use every example)")
    if problems:
        raise GeokdError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# geokd eval
# --------------------------------------------------------------------------------------------


def evaluate_model(
    model: str,
    task: str | None = None,
    data: str | None = None,
    split: str | None = None,
    *,
    text_fields: str | None = None,
    label_field: str | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    teacher: str | None = None,
    geometry: bool = False,
    geometry_grid: bool = False,
    layers: str | None = None,
    features: str | None = None,
    epsilon: float = 0.1,
    on_batch: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `task` (default: the task it was trained on) and return the result dict
    described in the module docstring. `split` None means every evaluation split of the task (dev;
    MNLI: dev_matched, then dev_mismatched under `other_splits`). With `geometry=True` and a
    `teacher`, the result also holds `geometry` (see `geometry_report`), on the first split."""
    from geokd.data import make_collate_fn, tokenize_examples
    from geokd.models import count_parameters, load_model
    from geokd.runtime import resolve_runtime
    from geokd.tasks import compute_metrics, resolve_split

    started = time.perf_counter()
    _validate_common(batch_size, max_length or 128, limit)
    if geometry != (teacher is not None):
        raise GeokdError(
            "eval: --geometry and --teacher go together (the report compares the model with a teacher); "
            "pass both or neither"
        )
    stray = [name for name, value in (("--layers", layers), ("--features", features)) if value is not None]
    if stray and not geometry:
        raise GeokdError(
            f"{', '.join(stray)} only apply to the geometry report; add --geometry --teacher TEACHER"
        )
    if geometry and not 0.0 < epsilon < 1.0:
        raise GeokdError(f"--epsilon must be in (0, 1), got {epsilon}; 0.1 is a common choice")
    _quiet_transformers()
    location = locate_model(model)
    recorded = (location.record or {}).get("config") or {}
    if max_length is None:  # the run's own truncation, so `geokd eval RUN` reproduces results.json
        max_length = recorded.get("max_length") if isinstance(recorded.get("max_length"), int) else 128
    loaded = load_model(location.load, trust_remote_code=trust_remote_code)
    head_missing = [k for k in loaded.new_weights if not k.startswith(loaded.model.base_model_prefix + ".")]
    if head_missing:
        raise GeokdError(
            f"eval: model {model!r} has no trained task head (its checkpoint lacks {', '.join(head_missing)}); "
            f"fine-tune it first (geokd finetune --model {model}) and evaluate the result"
        )
    spec = _resolve_task(task, text_fields, label_field, location, loaded.config)
    trained_on = _task_key(recorded.get("task"))
    if data is None and trained_on == spec.name and isinstance(recorded.get("data"), str):
        # `geokd eval RUN`: the run's own data, when it is still where training read it.
        data = recorded["data"] if Path(recorded["data"]).exists() else None
    mapping = label_mapping(spec, loaded.config, model)
    check_max_length(loaded, max_length)
    splits = list(spec.eval_splits) if split is None else [resolve_split(spec, split)]
    warnings = []
    recorded_sha = (location.record or {}).get("weights_sha256")
    if recorded_sha and loaded.source.weights_sha256 and recorded_sha != loaded.source.weights_sha256:
        warnings.append(
            f"the weights in {location.load!r} (sha256 {loaded.source.weights_sha256[:12]}) are not the ones its "
            f"geokd.json records (sha256 {recorded_sha[:12]}): they were changed after training, so the record "
            "does not describe them"
        )
    if trained_on is not None and trained_on != spec.name:
        warnings.append(f"the model was trained on task {trained_on!r}, evaluated here on {spec.name!r}")

    runtime = resolve_runtime(device)
    distributed.init(runtime.device)  # torchrun: the ranks share the forward passes (predict shard=True)
    loaded.model.to(runtime.device)
    collate = make_collate_fn(loaded.tokenizer, spec)
    loaded_splits = [_load_eval_split(spec, data, name, limit) for name in splits]
    if on_total is not None:
        on_total(sum(len(s) for s in loaded_splits))
    geometry_features = None
    if geometry:
        trained_rows = recorded.get("features") if recorded.get("features") in GEOMETRY_FEATURES else None
        geometry_features = features or trained_rows or "cls"
        if geometry_features not in GEOMETRY_FEATURES:
            raise GeokdError(
                f"--features: the geometry report compares one row per example, so it takes cls or mean, got "
                f"{geometry_features!r}"
            )
    per_split, student_rows = {}, None
    for index, data_split in enumerate(loaded_splits):
        tokenized = tokenize_examples(data_split, loaded.tokenizer, max_length)
        pool = geometry_features if index == 0 else None
        tic = time.perf_counter()
        out = predict(loaded.model, tokenized, collate, runtime, batch_size, pool=pool, on_batch=on_batch,
                      shard=True)  # fmt: skip
        seconds = time.perf_counter() - tic
        if index == 0:
            student_rows = out.features
        labels = np.asarray([f["labels"] for f in tokenized])
        per_split[data_split.split] = {
            "n_examples": len(tokenized),
            "metrics": compute_metrics(spec, mapping.apply(out.logits), labels),
            "data": {"source": data_split.source, "fingerprint": data_split.fingerprint, "limit": limit},
            "predict_s": seconds,
            "examples_per_s": len(tokenized) / max(seconds, 1e-9),
        }
    first = splits[0]
    result: dict[str, Any] = {
        "task": spec.name,
        "split": first,
        "n_examples": per_split[first]["n_examples"],
        "metrics": per_split[first]["metrics"],
        "primary_metric": spec.primary_metric,
        "model": {
            **loaded.source.to_dict(),
            "given": model,
            "run_dir": str(location.run_dir) if location.run_dir is not None else None,
            "model_type": getattr(loaded.config, "model_type", None),
            "parameters": count_parameters(loaded.model),
            "num_labels": int(loaded.config.num_labels),
            "id2label": {str(i): name for i, name in enumerate(_model_label_names(loaded.config))},
            "label_mapping": mapping.to_dict(),
            "geokd_record": location.record,
        },
        "data": per_split[first]["data"],
        "settings": {
            "batch_size": batch_size,
            "max_length": max_length,
            "device": str(runtime.device),
            "precision": runtime.reason,
            "batching": "length-sorted, token budget batch_size x longest",
        },
        "predict_s": per_split[first]["predict_s"],
        "examples_per_s": per_split[first]["examples_per_s"],
        "geokd_version": geokd.__version__,
        "warnings": warnings,
    }
    if len(splits) > 1:
        result["other_splits"] = {name: per_split[name] for name in splits[1:]}
    if geometry:
        from geokd.flexkd import read_selections

        assert teacher is not None and geometry_features is not None
        result["geometry"] = geometry_report(
            loaded,
            teacher,
            loaded_splits[0],
            layers=layers or recorded.get("layers") or "uniform",
            student_spec=recorded.get("student") if isinstance(recorded.get("student"), str) else None,
            features=geometry_features,
            epsilon=epsilon,
            batch_size=batch_size,
            max_length=max_length,
            runtime=runtime,
            trust_remote_code=trust_remote_code,
            student_rows=student_rows,
            grid=geometry_grid,
            flexkd_selections=read_selections(location.run_dir),
            teacher_blocks=(location.record or {}).get("teacher_blocks"),
        )
    result["elapsed_s"] = time.perf_counter() - started
    return result


def default_eval_path(run_dir: str | Path | None, task: str, split: str, limit: int | None) -> Path | None:
    """`RUN/eval/<task>-<split>.json` for a model that belongs to a run directory (None otherwise);
    `<task>-<split>-first<N>.json` for a `--limit N` evaluation, so it never replaces a full one."""
    if run_dir is None:
        return None
    suffix = f"-first{limit}" if limit is not None else ""
    return Path(run_dir) / "eval" / f"{task}-{split}{suffix}.json"


# --------------------------------------------------------------------------------------------
# Geometry report
# --------------------------------------------------------------------------------------------


def _centred(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Rows centred over the set in float64, which rows have no direction, and whether the whole
    set has none (its rows are all the same).

    "Zero after centring" is judged at the precision the rows were computed in, as the loss library
    does (`center_and_scale`): the set when ‖X − 1μᵀ‖_F ≤ 64·eps(dtype)·‖X‖_F, a row when its centred
    norm is below that floor at the rows' root-mean-square length. So float32 rows that differ only by
    rounding (identical inputs in differently shaped batches) count as identical, not as noise whose
    directions are random. A constant set makes every row directionless."""
    x = rows.double()
    centred = x - x.mean(dim=0, keepdim=True)
    dtype = rows.dtype if rows.is_floating_point() else torch.float64
    floor = _NOISE_FLOOR_ULPS * torch.finfo(dtype).eps * float(x.square().sum().sqrt())
    row_norms = centred.square().sum(dim=1).sqrt()  # [n]
    constant = float(row_norms.square().sum().sqrt()) <= floor
    flat = row_norms <= floor / math.sqrt(max(1, rows.shape[0]))
    if constant:
        flat = torch.ones_like(flat)
    return centred, flat, constant


def constant_rows(rows: torch.Tensor) -> bool:
    """True when the rows `[n, d]` are all identical up to the rounding of their dtype (their centred
    matrix is numerically zero, as for n = 1): normalised Procrustes, Gram and CKA are then 0/0."""
    return _centred(rows)[2]


def _unit_centred(rows: torch.Tensor) -> torch.Tensor:
    """Rows centred over the set, each scaled to unit length (float64). A row that is zero after
    centring (see `_centred`) has no direction: it becomes NaN, so every cosine with it is NaN and
    no pair with it counts as ε-orthogonal (`|NaN| <= ε` is False)."""
    x, flat, _ = _centred(rows)
    norms = x.square().sum(dim=1, keepdim=True).sqrt()
    return torch.where(flat[:, None], torch.full_like(x, math.nan), x / norms.clamp_min(1e-300))


def preserved_pairs(
    student: torch.Tensor, teacher: torch.Tensor, epsilon: float, chunk: int = 2048
) -> dict[str, int]:
    """Count example pairs i < j by ε-orthogonality of their centred cosines (a pair with a row that
    is zero after centring never counts; at a layer whose rows are all identical, such as the [CLS]
    embedding at layer 0, no pair counts).

    Returns `teacher_pairs` (|cos_t| ≤ ε), `student_pairs` (|cos_s| ≤ ε), `preserved_pairs` (both)
    and `all_pairs` = n(n−1)/2. Computed in row blocks of `chunk`, so no n×n matrix is held."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"row counts differ: {student.shape[0]} vs {teacher.shape[0]}")
    s, t = _unit_centred(student), _unit_centred(teacher)
    n = s.shape[0]
    counts = {"teacher_pairs": 0, "student_pairs": 0, "preserved_pairs": 0}
    columns = torch.arange(n)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk))
        upper = columns[None, :] > rows[:, None]  # [c, n]: pairs i < j only
        ortho_t = ((t[rows] @ t.T).abs() <= epsilon) & upper
        ortho_s = ((s[rows] @ s.T).abs() <= epsilon) & upper
        counts["teacher_pairs"] += int(ortho_t.sum())
        counts["student_pairs"] += int(ortho_s.sum())
        counts["preserved_pairs"] += int((ortho_t & ortho_s).sum())
    counts["all_pairs"] = n * (n - 1) // 2
    return counts


def undefined_note(student_constant: bool, teacher_constant: bool) -> str | None:
    """Why the distances of a layer pair are undefined (None when they are defined)."""
    if not (student_constant or teacher_constant):
        return None
    side = (
        "student and teacher"
        if student_constant and teacher_constant
        else ("student" if student_constant else "teacher")
    )
    return f"{side} rows are identical (all zero after centring): every normalised distance is 0/0"


def geometry_distances(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float | None]:
    """`procrustes` (the loss library's squared normalised Procrustes distance), `gram` (normalised
    Gram distance) and `cka_distance` (= 1 − linear CKA), in float64; 0 = same geometry.

    All three are None when either side's rows are identical (`constant_rows`): each divides by the
    norm of the centred rows, so each is 0/0 there (the loss library would read 0 or 1).
    Procrustes treats singular values of SᵀT below about 1e-6·σ_max as zero (the library's rank
    tolerance), so a model compared with itself can read a few 1e-6 rather than 0 when its
    features are ill-conditioned."""
    from geokd.losses import cka, gram, procrustes

    if constant_rows(student) or constant_rows(teacher):
        return dict.fromkeys(GEOMETRY_METRICS)
    s, t = student.double(), teacher.double()
    return {
        "procrustes": float(procrustes(s, t)),
        "gram": float(gram(s, t)),
        "cka_distance": float(cka(s, t)),  # the library's `cka` loss is 1 − CKA
    }


def flexkd_entry(selections: dict[tuple[int, int], torch.Tensor] | None, s_layer: int, t_layer: int,
                 student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float | None]:  # fmt: skip
    """`{"flexkd_correlation": ...}` for a pair a flexkd run selected a subspace for, else `{}`."""
    from geokd.flexkd import selected_correlation

    if not selections or (s_layer, t_layer) not in selections:
        return {}
    return {"flexkd_correlation": selected_correlation(student, teacher, selections[(s_layer, t_layer)])}


def geometry_report(
    student: LoadedModel,
    teacher: str,
    data_split: DataSplit,
    *,
    layers: str,
    features: str,
    epsilon: float,
    batch_size: int,
    max_length: int,
    runtime: Runtime,
    trust_remote_code: bool = False,
    student_rows: list[torch.Tensor] | None = None,
    grid: bool = False,
    student_spec: str | None = None,
    flexkd_selections: dict[tuple[int, int], torch.Tensor] | None = None,
    teacher_blocks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The geometry of `student` against `teacher` on `data_split` (rows = examples, pooled by
    `features`). Each model reads the texts through its own tokenizer, so any two models compare.
    `student_rows` (every hidden state pooled by `features`, from `predict`) saves a second student
    forward pass. `grid=True` also computes the three distances for every student × teacher layer
    combination (what `plot_geometry` draws; (L_s+1)·(L_t+1) float64 evaluations). `student_spec`
    (the run's `--student`) lets `layers="copied"` find a truncate: student's source blocks.
    `teacher_blocks` (a run's record) gives `copied` the blocks a `prune:` student kept.
    `flexkd_selections` (a flexkd run's, `geokd.flexkd.read_selections`) adds each selected pair's
    `flexkd_correlation`: the mean Pearson correlation of the student's dimensions with the
    teacher's selected subspace on these rows."""
    from geokd.data import make_collate_fn, tokenize_examples
    from geokd.models import load_model, parse_layer_map
    from geokd.models.students import copied_blocks

    if features not in GEOMETRY_FEATURES:
        raise GeokdError(
            f"--features: the geometry report compares one row per example, so it takes cls or mean, got "
            f"{features!r}"
        )
    teacher_model = load_model(locate_model(teacher).load, trust_remote_code=trust_remote_code)
    check_max_length(teacher_model, max_length, option="--max-length (for the teacher)")
    copied_from = (getattr(student, "teacher_blocks", None) or (tuple(teacher_blocks) if teacher_blocks else None)
                   or copied_blocks(student_spec, teacher_model.num_layers))  # fmt: skip
    pairs = parse_layer_map(layers, student.num_layers, teacher_model.num_layers, copied_from)
    teacher_model.model.to(runtime.device)
    pooled = {"student": student_rows}
    for role, loaded in (("student", student), ("teacher", teacher_model)):
        if pooled.get(role) is not None:
            continue
        tokenized = tokenize_examples(data_split, loaded.tokenizer, max_length)
        collate = make_collate_fn(loaded.tokenizer, data_split.task)
        pooled[role] = predict(loaded.model, tokenized, collate, runtime, batch_size, pool=features,
                               shard=True).features  # fmt: skip
    s_rows, t_rows = pooled["student"], pooled["teacher"]
    assert s_rows is not None and t_rows is not None
    s_constant = [constant_rows(rows) for rows in s_rows]
    t_constant = [constant_rows(rows) for rows in t_rows]
    entries = []
    for s_layer, t_layer in pairs:
        counts = preserved_pairs(s_rows[s_layer], t_rows[t_layer], epsilon)
        entries.append(
            {
                "student_layer": s_layer,
                "teacher_layer": t_layer,
                **geometry_distances(s_rows[s_layer], t_rows[t_layer]),
                "undefined": undefined_note(s_constant[s_layer], t_constant[t_layer]),
                **counts,
                # None (JSON null), not NaN, when the teacher layer has no ε-orthogonal pair
                "preserved_fraction": counts["preserved_pairs"] / counts["teacher_pairs"]
                if counts["teacher_pairs"]
                else None,
                **flexkd_entry(flexkd_selections, s_layer, t_layer, s_rows[s_layer], t_rows[t_layer]),
            }
        )
    table: dict[str, list[list[float | None]]] | None = None
    if grid:
        table = {name: [[None for _ in t_rows] for _ in s_rows] for name in GEOMETRY_METRICS}
        for i, s in enumerate(s_rows):
            for j, t in enumerate(t_rows):
                if s_constant[i] or t_constant[j]:
                    continue  # undefined: stays None (JSON null)
                for name, value in geometry_distances(s, t).items():
                    table[name][i][j] = value
    return {
        "teacher": teacher_model.source.to_dict(),
        "split": data_split.split,
        "n_examples": len(data_split),
        "features": features,
        "layers": layers,
        "epsilon": epsilon,
        "layer_pairs": entries,
        # Hidden states whose rows are all identical: every distance with them is undefined (null).
        "constant_layers": {
            "student": [i for i, flag in enumerate(s_constant) if flag],
            "teacher": [j for j, flag in enumerate(t_constant) if flag],
        },
        "grid": None
        if table is None
        else {
            "student_layers": list(range(len(s_rows))),
            "teacher_layers": list(range(len(t_rows))),
            **table,
        },
    }


# Panel titles: each names its grid / JSON key and table column (one quantity, one name).
GEOMETRY_PANELS = {
    "procrustes": "procrustes: squared Procrustes distance (0 = same geometry)",
    "gram": "gram: Gram distance (0 = same geometry)",
    "cka_distance": "cka_distance: 1 − linear CKA (0 = same geometry)",
}
UNDEFINED_CAPTION = (
    "hatched grey n/a = undefined: that layer's rows are all identical (e.g. the [CLS] embedding, "
    "layer 0), so every normalised distance is 0/0"
)


def plot_geometry(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Heat-maps of `procrustes`, `gram` and `cka_distance` (1 − CKA) over every student × teacher
    layer, all on one reading (0 = same geometry, a reversed colour map), with the mapped pairs
    outlined and their preserved-pair fraction written in. Undefined cells (null in the grid) are
    hatched grey and marked `n/a`, explained in the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = report["grid"]
    if grid is None:
        raise ValueError("plot_geometry needs a report computed with grid=True")
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(grid["student_layers"]) + 2.5), squeeze=False)
    any_undefined = False
    for ax, name in zip(axes[0], GEOMETRY_METRICS, strict=True):
        values = np.asarray([[math.nan if v is None else v for v in row] for row in grid[name]], dtype=float)
        undefined = np.isnan(values)
        any_undefined = any_undefined or bool(undefined.any())
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")
        finite = values[~undefined]
        limits = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        image = ax.imshow(
            np.ma.masked_invalid(values),
            cmap=cmap,
            aspect="auto",
            origin="lower",
            vmin=limits[0],
            vmax=limits[1],
        )
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(GEOMETRY_PANELS[name], fontsize=10)
        ax.set_xlabel("teacher hidden state (0 = embeddings)")
        ax.set_ylabel("student hidden state")
        ax.set_xticks(grid["teacher_layers"])
        ax.set_yticks(grid["student_layers"])
        for s, t in zip(*np.nonzero(undefined), strict=True):
            ax.add_patch(
                Rectangle(
                    (t - 0.5, s - 0.5),
                    1,
                    1,
                    facecolor="lightgrey",
                    edgecolor="dimgrey",
                    hatch="//",
                    linewidth=0,
                )
            )
            ax.text(t, s, "n/a", ha="center", va="center", fontsize=7, color="black")
        for entry in report["layer_pairs"]:
            s, t = entry["student_layer"], entry["teacher_layer"]
            ax.add_patch(Rectangle((t - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            if name == "procrustes" and entry["preserved_fraction"] is not None and not undefined[s, t]:
                ax.text(
                    t,
                    s,
                    f"{entry['preserved_fraction']:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    fig.suptitle(
        (title + "\n" if title else "")
        + f"{report['n_examples']} {report['split']} examples, {report['features']} rows; red = mapped pairs "
        f"(procrustes panel: share of the teacher's ε={report['epsilon']:g}-orthogonal pairs preserved)"
        + (f"\n{UNDEFINED_CAPTION}" if any_undefined else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
