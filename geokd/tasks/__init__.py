"""The task registry: what each task is (text fields, label space, splits, metrics), how a raw
label is turned into a label id, and the official metrics.

* The nine GLUE tasks by name (`get_task("mrpc")`; "SST-2", "CoLA", "sts-b" work too), with the
  label ids of the Hugging Face `datasets` glue configs (cola 0=unacceptable 1=acceptable, ...,
  wnli 0=not_entailment 1=entailment) and STS-B as a regression on scores in [0, 5].
* A custom task (`custom_task(("a", "b"), "y")`) over CSV/TSV/JSONL data: classification with
  labels inferred from the training split (`geokd.data.load_split`) or given, or regression
  (`num_labels=1`).
* `compute_metrics(task, predictions, labels)` with scikit-learn / scipy: CoLA Matthews
  correlation, accuracy, F1 of class 1 (MRPC, QQP), Pearson and Spearman (STS-B); each task names
  its `primary_metric`.

Where the data comes from (GLUE TSV layouts, the `datasets` hub, tokenisation) is `geokd.data`.
Nothing here imports torch; scikit-learn and scipy are imported when a metric is computed.

The instruction-following task (`--task instruct`, issue #11) lives beside this module in
`geokd.tasks.instruct`: its examples are prompts with reference responses, not texts with a label
id, so a `TaskSpec` cannot describe it (no label space, no `num_labels`, metrics over generated
text). `get_task("instruct")` therefore refuses with a line pointing to
`geokd.tasks.instruct.load_instruct_split`; callers branch on `is_instruct_task(name)` first.
This module does not import `geokd.tasks.instruct` (which imports `geokd.data`, which imports
this module): import it by its own name.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from geokd.errors import GeokdError

# Split names: `dev` is the labelled evaluation split of the GLUE distribution (`validation` on the
# `datasets` hub). GLUE test splits carry no labels, so they are not loadable tasks' splits here.
_SPLIT_ALIASES = {
    "validation": "dev",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
}


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, independent of where its data comes from.

    `text_fields` name the one or two texts of an example, in the order they are fed to the
    tokenizer (for GLUE, the field names of the `datasets` glue configs). `label_names[i]` is the
    name of label id `i`; it is empty for a regression task, and for a custom classification task
    whose labels are still to be inferred from its training split. `label_field` is the column
    that holds the label in custom data (GLUE layouts are fixed in `geokd.data`).
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    is_regression: bool
    metrics: tuple[str, ...]
    primary_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    label_field: str = "label"
    score_range: tuple[float, float] | None = None  # regression targets must lie in it (inclusive)
    glue: bool = False  # GLUE tasks accept a label as its name or its id; custom ones by name only

    @property
    def num_labels(self) -> int:
        """Width of the model's output head: 1 for regression, else the number of classes (0 while
        a custom task's labels are still to be inferred)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def dev_split(self) -> str:
        """The split to evaluate on during training (`dev`; `dev_matched` for MNLI)."""
        return self.eval_splits[0]

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split name this task can load (aliases such as `validation` aside)."""
        extra = ("test",) if not self.glue else ()
        return ("train", *self.eval_splits, *extra)

    @property
    def id2label(self) -> dict[int, str]:
        """Label id -> name, for a model config (empty for regression)."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """Label name -> id, for a model config (empty for regression)."""
        return {name: i for i, name in enumerate(self.label_names)}


def _glue(
    name: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    primary_metric: str,
    **kwargs: Any,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        text_fields=text_fields,
        label_names=label_names,
        is_regression=not label_names,
        metrics=metrics,
        primary_metric=primary_metric,
        glue=True,
        **kwargs,
    )


# Label ids and text fields follow the Hugging Face `datasets` glue configs. Primary metrics follow
# the convention of the BERT paper's GLUE table: F1 for MRPC and QQP, Spearman for STS-B, Matthews
# correlation for CoLA, accuracy elsewhere.
GLUE_TASKS: Mapping[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews_correlation",),
            "matthews_correlation",
        ),
        _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
        _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1"),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1"),
        _glue(
            "stsb",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman"),
            "spearman",
            score_range=(0.0, 5.0),
        ),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            eval_splits=("dev_matched", "dev_mismatched"),
        ),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        _glue(
            "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy"
        ),
    )
}


# The name of the instruction-following task (`--task instruct`); see `geokd.tasks.instruct`.
INSTRUCT_TASK = "instruct"


def is_instruct_task(name: str) -> bool:
    """Whether `name` names the instruction-following task (case, dashes and spaces ignored, as for
    `get_task`): such a task is loaded by `geokd.tasks.instruct`, not described by a `TaskSpec`."""
    return isinstance(name, str) and _normalize_task_name(name) == INSTRUCT_TASK


def task_names() -> list[str]:
    """The GLUE task names, in GLUE's order (plus `custom`, which `custom_task` builds)."""
    return [*GLUE_TASKS, "custom"]


def _normalize_task_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.strip().lower())  # "SST-2" -> "sst2", "STS-B" -> "stsb"


def get_task(
    name: str,
    text_fields: str | Sequence[str] | None = None,
    label_field: str | None = None,
    num_labels: int | None = None,
) -> TaskSpec:
    """The task called `name`: a GLUE task (case and dashes ignored: "SST-2", "CoLA", "sts-b"), or
    `custom` with `text_fields` (a sequence, or comma-separated as on the command line) and
    `label_field`, built by `custom_task` (which see for `num_labels`)."""
    key = _normalize_task_name(name)
    custom_args = {"text_fields": text_fields, "label_field": label_field, "num_labels": num_labels}
    if key == "custom":
        if text_fields is None or label_field is None:
            raise GeokdError(
                f"task 'custom' needs text fields and a label field, got text_fields={text_fields!r}, "
                f"label_field={label_field!r}; pass --text-fields a[,b] and --label-field y"
            )
        if isinstance(text_fields, str):
            text_fields = [f.strip() for f in text_fields.split(",")]
        return custom_task(text_fields, label_field, num_labels=num_labels)
    if key == INSTRUCT_TASK:
        raise GeokdError(
            f"task {name!r} is the instruction-following task, which has no TaskSpec (prompts with reference "
            "responses, not labels); load its data with geokd.tasks.instruct.load_instruct_split(data, split) "
            "and branch on geokd.tasks.is_instruct_task(name) before calling get_task"
        )
    if key in GLUE_TASKS:
        given = [f"{k}={v!r}" for k, v in custom_args.items() if v is not None]
        if given:
            raise GeokdError(
                f"task {key!r} is a GLUE task with fixed fields and labels, got {', '.join(given)}; "
                "drop them, or use --task custom"
            )
        return GLUE_TASKS[key]
    raise GeokdError(f"unknown task {name!r}; choose one of: {', '.join([*task_names(), INSTRUCT_TASK])}")


def custom_task(
    text_fields: Sequence[str],
    label_field: str,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    name: str = "custom",
) -> TaskSpec:
    """A task over your own CSV/TSV/JSONL data.

    * `num_labels=1`: regression, labels parsed as floats; metrics Pearson and Spearman.
    * `label_names` given: classification with label id `i` = `label_names[i]`.
    * `num_labels=k >= 2` alone: classification over the integer labels `0..k-1`.
    * neither: classification whose labels are inferred from the training split when it is
      loaded (`geokd.data.load_split` returns the completed spec as `DataSplit.task`): the sorted
      unique label strings, numerically sorted when they are all integers.

    Custom labels are matched by name only (the cell's text, or the JSON value as text).
    Classification metrics: accuracy (primary) and macro-averaged F1.
    """
    fields = tuple(text_fields)
    if len(fields) not in (1, 2) or any(not isinstance(f, str) or not f for f in fields):
        raise GeokdError(
            f"custom task: text_fields must name one or two columns, got {list(fields)!r}; "
            "pass e.g. ('text',) or ('premise', 'hypothesis')"
        )
    if not isinstance(label_field, str) or not label_field:
        raise GeokdError(f"custom task: label_field must name a column, got {label_field!r}")
    if label_field in fields:
        raise GeokdError(
            f"custom task: label_field {label_field!r} is also a text field {list(fields)!r}; "
            "name a separate label column"
        )
    if num_labels is not None and (isinstance(num_labels, bool) or num_labels < 1):
        raise GeokdError(
            f"custom task: num_labels must be 1 (regression) or >= 2 (classes), got {num_labels!r}"
        )
    regression = num_labels == 1
    if label_names is None:
        names = tuple(str(i) for i in range(num_labels)) if num_labels and num_labels >= 2 else ()
    else:
        names = tuple(str(n) for n in label_names)
        if regression:
            raise GeokdError(
                f"custom task: num_labels=1 (regression) cannot have label_names {list(names)!r}; "
                "drop one of the two"
            )
        if len(names) < 2 or len(set(names)) != len(names):
            raise GeokdError(
                f"custom task: label_names must be at least two distinct names, got {list(names)!r}"
            )
    if names and num_labels is not None and num_labels != len(names):
        raise GeokdError(
            f"custom task: num_labels={num_labels} but {len(names)} label_names {list(names)!r}; "
            "make them agree"
        )
    return TaskSpec(
        name=name,
        text_fields=fields,
        label_names=names,
        is_regression=regression,
        metrics=("pearson", "spearman") if regression else ("accuracy", "f1_macro"),
        primary_metric="spearman" if regression else "accuracy",
        label_field=label_field,
        glue=False,
    )


def infer_label_names(task: TaskSpec, raw_labels: Sequence[str]) -> TaskSpec:
    """Complete a custom classification task from the raw label strings of its training split: the
    sorted unique labels become ids 0..k-1 (numeric order when all are integers, so "0".."k-1" map
    to themselves; string order otherwise). Fails with fewer than two distinct labels."""
    unique = set(raw_labels)
    if all(re.fullmatch(r"[+-]?\d+", label) for label in unique):
        ordered = sorted(unique, key=int)
    else:
        ordered = sorted(unique)
    if len(ordered) < 2:
        raise GeokdError(
            f"task {task.name!r}: label column {task.label_field!r} has {len(ordered)} distinct value(s) "
            f"{ordered!r} in the training data; classification needs at least two "
            "(use num_labels=1 for regression)"
        )
    return replace(task, label_names=tuple(ordered))


def resolve_split(task: TaskSpec, split: str) -> str:
    """The canonical split name: `validation*` -> `dev*`, and `dev` -> `dev_matched` for MNLI."""
    key = _SPLIT_ALIASES.get(split, split)
    if key == "dev" and "dev" not in task.eval_splits:
        key = task.eval_splits[0]
    if key not in task.splits:
        raise GeokdError(
            f"task {task.name!r} has no split {split!r}; choose one of: {', '.join(task.splits)}"
        )
    return key


def encode_label(task: TaskSpec, raw: object, where: str = "") -> int | float:
    """Turn a raw label (a TSV/CSV cell, a JSON value or a `datasets` integer) into the task's label:
    a class id for classification, a float for regression.

    GLUE classification labels may be given as names (`entailment`) or ids (`0`); custom ones by
    name. Raises GeokdError naming `where` (e.g. "dev.tsv:12") and the value when the label is not
    in the label space, or a regression score is not a finite number in `task.score_range`.
    """
    prefix = f"{where}: " if where else ""
    if task.is_regression:
        return _encode_score(task, raw, prefix)
    if not task.label_names:
        raise ValueError(f"task {task.name!r} has no label names yet; call infer_label_names first")
    text = label_text(raw)
    label_id = task.label2id.get(text)
    if label_id is not None:
        return label_id
    if task.glue and re.fullmatch(r"\d+", text) and int(text) < task.num_labels:
        return int(text)
    space = ", ".join(f"{i}={n}" for i, n in enumerate(task.label_names))
    raise GeokdError(
        f"{prefix}label {text!r} is outside the label space of task {task.name!r} ({space}); "
        "fix the data or choose the matching --task"
    )


def _encode_score(task: TaskSpec, raw: object, prefix: str) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        score = float(raw.strip()) if isinstance(raw, str) else float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GeokdError(
            f"{prefix}score {raw!r} is not a number; task {task.name!r} is a regression and needs "
            "numeric labels (fix the row, or use a classification task)"
        ) from None
    if not math.isfinite(score):
        raise GeokdError(f"{prefix}score {raw!r} is not finite; task {task.name!r} needs finite scores")
    if task.score_range is not None and not task.score_range[0] <= score <= task.score_range[1]:
        low, high = task.score_range
        raise GeokdError(
            f"{prefix}score {score:g} is outside the label space of task {task.name!r} "
            f"([{low:g}, {high:g}]); fix the row or choose the matching --task"
        )
    return score


def label_text(value: object) -> str:
    """A raw label as the text that label names are matched (and custom ones inferred) in: strings
    stripped, integers as digits, booleans and null in JSON spelling, anything else via `str`."""
    if isinstance(value, str):
        return value.strip()
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------------------------
# Metrics (scikit-learn / scipy)
# --------------------------------------------------------------------------------------------


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 (MRPC's `equivalent`, QQP's `duplicate`); 0.0 when class 1 is never predicted
    and never present (scikit-learn's `zero_division=0`)."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(labels, predictions, labels=[0, 1], pos_label=1, average="binary", zero_division=0.0)
    )


def _f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, average="macro", zero_division=0.0))


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation; 0.0 when it is undefined (one predicted class, or one true class), as
    scikit-learn returns."""
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        # All predictions and labels one class: sklearn warns about the confusion matrix's shape
        # and returns 0.0, which is the value we want.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        value = float(matthews_corrcoef(labels, predictions))
    return value if math.isfinite(value) else 0.0


def _correlation(kind: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(predictions: np.ndarray, labels: np.ndarray) -> float:
        from scipy import stats

        # Undefined for constant predictions or labels (and fewer than two points): scipy would
        # return NaN with a warning; we return 0.0 (no linear/rank association can be measured).
        if predictions.size < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
            return 0.0
        fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
        value = float(fn(predictions, labels).statistic)
        return value if math.isfinite(value) else 0.0

    metric.__doc__ = f"{kind.capitalize()} correlation; 0.0 for constant inputs or fewer than 2 points."
    return metric


METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "f1_macro": _f1_macro,
    "matthews_correlation": _matthews,
    "pearson": _correlation("pearson"),
    "spearman": _correlation("spearman"),
}


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def compute_metrics(task: TaskSpec | str, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics, `{name: value}` in `task.metrics` order, as Python floats.

    `predictions`: for classification, class ids `[n]` or logits `[n, num_labels]` (argmax taken);
    for regression, scores `[n]` or `[n, 1]`. `labels`: `[n]` ids or scores. Lists, numpy arrays
    and torch tensors are accepted. Metrics are scikit-learn's and scipy's:

    * `matthews_correlation` (CoLA): `sklearn.metrics.matthews_corrcoef`, 0.0 with one class.
    * `accuracy`; `f1` (MRPC, QQP): F1 of class 1, 0.0 when class 1 never appears in either;
      `f1_macro` (custom classification).
    * `pearson`, `spearman` (STS-B, custom regression): `scipy.stats.pearsonr` / `spearmanr`. They
      are undefined for constant predictions or labels, where scipy gives NaN: we return 0.0
      instead, so a collapsed regressor scores 0 rather than poisoning averages with NaN.
    """
    spec = get_task(task) if isinstance(task, str) else task
    preds, gold = _as_array(predictions), _as_array(labels)
    if gold.ndim != 1:
        raise GeokdError(f"{spec.name}: labels must be 1-D [n], got shape {gold.shape}")
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise GeokdError(
                f"{spec.name}: regression predictions must be [n] or [n, 1], got shape {preds.shape}"
            )
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
    else:
        preds = _class_ids(spec, preds)
        gold = gold.astype(np.int64)
        outside = gold[(gold < 0) | (gold >= spec.num_labels)] if spec.num_labels else gold[:0]
        if outside.size:
            raise GeokdError(
                f"{spec.name}: label {int(outside[0])} is outside the label space 0..{spec.num_labels - 1}; "
                "score a labelled split (GLUE test splits have no labels)"
            )
    if preds.shape[0] != gold.shape[0]:
        raise GeokdError(
            f"{spec.name}: {preds.shape[0]} predictions for {gold.shape[0]} labels; they must pair up"
        )
    if gold.shape[0] == 0:
        raise GeokdError(f"{spec.name}: no predictions to score; the evaluation split is empty")
    return {name: METRICS[name](preds, gold) for name in spec.metrics}


def _class_ids(spec: TaskSpec, preds: np.ndarray) -> np.ndarray:
    """Class ids `[n]` from ids `[n]` or logits `[n, num_labels]`, checked against the label space."""
    if preds.ndim == 2:
        if spec.num_labels and preds.shape[1] != spec.num_labels:
            raise GeokdError(
                f"{spec.name}: logits have {preds.shape[1]} columns but the task has {spec.num_labels} "
                "labels; check the model head"
            )
        return preds.argmax(axis=1).astype(np.int64)  # [n]
    if preds.ndim != 1:
        raise GeokdError(
            f"{spec.name}: predictions must be ids [n] or logits [n, C], got shape {preds.shape}"
        )
    if preds.size and not np.all(np.equal(np.mod(preds, 1), 0)):
        raise GeokdError(
            f"{spec.name}: classification predictions must be class ids or logits [n, C], got "
            f"non-integer values such as {float(preds[np.mod(preds, 1) != 0][0]):g}"
        )
    ids = preds.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= spec.num_labels)] if spec.num_labels else ids[:0]
    if bad.size:
        raise GeokdError(
            f"{spec.name}: predicted class {int(bad[0])} is outside the label space 0..{spec.num_labels - 1}"
        )
    return ids
