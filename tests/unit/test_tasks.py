"""The task registry (GLUE specs, custom tasks, label encoding, splits) and the metrics, checked
against scikit-learn / scipy on fixed predictions, degenerate cases included."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from geokd.errors import GeokdError
from geokd.tasks import (
    GLUE_TASKS,
    compute_metrics,
    custom_task,
    encode_label,
    get_task,
    infer_label_names,
    label_text,
    resolve_split,
    task_names,
)

# The label ids of the Hugging Face `datasets` glue configs, written out independently.
HF_GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": (),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
HF_GLUE_FIELDS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
OFFICIAL_METRICS = {
    "cola": {"matthews_correlation"},
    "sst2": {"accuracy"},
    "mrpc": {"f1", "accuracy"},
    "qqp": {"f1", "accuracy"},
    "stsb": {"pearson", "spearman"},
    "mnli": {"accuracy"},
    "qnli": {"accuracy"},
    "rte": {"accuracy"},
    "wnli": {"accuracy"},
}


def _one_line_error(exc_info: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_has_every_glue_task_with_hf_label_ids_fields_and_metrics():
    assert list(GLUE_TASKS) == list(HF_GLUE_LABELS)
    assert task_names() == [*HF_GLUE_LABELS, "custom"]
    for name, labels in HF_GLUE_LABELS.items():
        spec = get_task(name)
        assert spec.name == name and spec.glue
        assert spec.label_names == labels
        assert spec.text_fields == HF_GLUE_FIELDS[name]
        assert set(spec.metrics) == OFFICIAL_METRICS[name]
        assert spec.primary_metric in spec.metrics
        assert spec.is_regression == (name == "stsb")
        assert spec.num_labels == (1 if name == "stsb" else len(labels))
        assert spec.id2label == dict(enumerate(labels))
        assert spec.label2id == {label: i for i, label in enumerate(labels)}


def test_primary_metrics_follow_the_usual_glue_reporting():
    primary = {name: spec.primary_metric for name, spec in GLUE_TASKS.items()}
    assert primary["cola"] == "matthews_correlation"
    assert primary["mrpc"] == primary["qqp"] == "f1"
    assert primary["stsb"] == "spearman"
    assert all(primary[t] == "accuracy" for t in ("sst2", "mnli", "qnli", "rte", "wnli"))


@pytest.mark.parametrize(
    "alias, name", [("SST-2", "sst2"), ("CoLA", "cola"), ("sts-b", "stsb"), (" MNLI ", "mnli")]
)
def test_task_names_ignore_case_and_dashes(alias, name):
    assert get_task(alias) is GLUE_TASKS[name]


def test_unknown_task_lists_the_choices():
    with pytest.raises(GeokdError) as exc_info:
        get_task("sst3")
    _one_line_error(exc_info, "unknown task 'sst3'", "cola, sst2, mrpc", "custom")


def test_get_task_custom_needs_fields_and_glue_refuses_them():
    spec = get_task("custom", text_fields="premise, hypothesis", label_field="y")
    assert spec.text_fields == ("premise", "hypothesis") and spec.label_field == "y" and not spec.glue
    assert get_task("custom", text_fields=["t"], label_field="y", num_labels=1).is_regression
    with pytest.raises(GeokdError) as exc_info:
        get_task("custom", text_fields="a")
    _one_line_error(exc_info, "label_field=None", "--label-field")
    with pytest.raises(GeokdError) as exc_info:
        get_task("rte", text_fields="a", label_field="y")
    _one_line_error(exc_info, "text_fields='a'", "--task custom")


def test_splits_and_aliases():
    rte, mnli = get_task("rte"), get_task("mnli")
    assert rte.splits == ("train", "dev") and rte.dev_split == "dev"
    assert mnli.splits == ("train", "dev_matched", "dev_mismatched") and mnli.dev_split == "dev_matched"
    assert resolve_split(rte, "validation") == "dev"
    assert resolve_split(mnli, "dev") == "dev_matched"  # "dev" for MNLI means matched
    assert resolve_split(mnli, "validation_mismatched") == "dev_mismatched"
    with pytest.raises(GeokdError) as exc_info:
        resolve_split(rte, "test")  # GLUE test splits have no labels
    _one_line_error(exc_info, "no split 'test'", "train, dev")
    with pytest.raises(GeokdError):
        resolve_split(rte, "dev_matched")
    assert resolve_split(custom_task(["t"], "y"), "test") == "test"


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, raw, expected",
    [
        ("rte", "entailment", 0),
        ("rte", "not_entailment", 1),
        ("rte", "1", 1),
        ("qnli", " not_entailment ", 1),
        ("mnli", "contradiction", 2),
        ("mnli", 1, 1),  # a `datasets` integer
        ("wnli", "1", 1),
        ("wnli", "entailment", 1),
        ("cola", "0", 0),
        ("mrpc", "equivalent", 1),
        ("stsb", "3.800", 3.8),
        ("stsb", 5, 5.0),
        ("stsb", "0", 0.0),
    ],
)
def test_glue_labels_by_name_or_id(task, raw, expected):
    value = encode_label(get_task(task), raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "task, raw, fragments",
    [
        ("sst2", "2", ["label '2' is outside the label space of task 'sst2'", "0=negative, 1=positive"]),
        ("rte", "neutral", ["label 'neutral'", "0=entailment, 1=not_entailment", "--task"]),
        ("mnli", -1, ["label '-1'"]),  # the `datasets` placeholder for unlabelled test rows
        ("mnli", "-", ["label '-'"]),
        ("stsb", "abc", ["score 'abc' is not a number", "regression"]),
        ("stsb", "nan", ["score 'nan' is not finite"]),
        ("stsb", "5.5", ["score 5.5 is outside the label space", "[0, 5]"]),
        ("stsb", "-0.1", ["score -0.1 is outside"]),
    ],
)
def test_bad_labels_are_one_line_errors_with_the_value(task, raw, fragments):
    with pytest.raises(GeokdError) as exc_info:
        encode_label(get_task(task), raw, where="dev.tsv:7")
    message = _one_line_error(exc_info, *fragments)
    assert message.startswith("dev.tsv:7: ")


def test_custom_labels_match_by_name_only():
    spec = custom_task(["t"], "y", label_names=["1", "2", "5"])
    assert [encode_label(spec, raw) for raw in ("1", "2", "5", 5)] == [0, 1, 2, 2]
    with pytest.raises(GeokdError, match="label '0' is outside"):
        encode_label(spec, "0")  # an id, but custom labels are names


def test_infer_label_names_sorts_strings_and_integers():
    spec = custom_task(["t"], "y")
    assert spec.label_names == () and spec.num_labels == 0
    assert infer_label_names(spec, ["pos", "neg", "pos", "neutral"]).label_names == ("neg", "neutral", "pos")
    # integers sort numerically, so "0".."k-1" map to themselves
    assert infer_label_names(spec, ["10", "2", "0", "1"]).label_names == ("0", "1", "2", "10")
    with pytest.raises(GeokdError) as exc_info:
        infer_label_names(spec, ["pos", "pos"])
    _one_line_error(exc_info, "1 distinct value(s) ['pos']", "num_labels=1")


def test_label_text_spells_json_values():
    values = (" a ", 3, np.int64(4), True, None, 1.5)
    assert [label_text(v) for v in values] == ["a", "3", "4", "true", "null", "1.5"]


def test_custom_task_specs_and_validation():
    classes = custom_task(("a", "b"), "y", label_names=["no", "yes"])
    assert classes.num_labels == 2 and classes.metrics == ("accuracy", "f1_macro")
    assert classes.primary_metric == "accuracy" and not classes.is_regression
    regression = custom_task(["a"], "y", num_labels=1)
    assert (
        regression.is_regression
        and regression.num_labels == 1
        and regression.metrics == ("pearson", "spearman")
    )
    assert regression.score_range is None and encode_label(regression, "-12.5") == -12.5
    integers = custom_task(["a"], "y", num_labels=3)  # num_labels alone: labels are 0..k-1
    assert integers.label_names == ("0", "1", "2") and encode_label(integers, 2) == 2
    bad = [
        ((), "y", {}, "one or two columns"),
        (("a", "b", "c"), "y", {}, "one or two columns"),
        (("a",), "", {}, "label_field must name a column"),
        (("a",), "a", {}, "also a text field"),
        (("a",), "y", {"num_labels": 0}, "num_labels must be 1"),
        (("a",), "y", {"num_labels": 1, "label_names": ["x", "z"]}, "cannot have label_names"),
        (("a",), "y", {"label_names": ["x"]}, "at least two distinct names"),
        (("a",), "y", {"label_names": ["x", "x"]}, "at least two distinct names"),
        (("a",), "y", {"label_names": ["x", "z"], "num_labels": 3}, "make them agree"),
    ]
    for fields, label_field, kwargs, fragment in bad:
        with pytest.raises(GeokdError) as exc_info:
            custom_task(fields, label_field, **kwargs)
        _one_line_error(exc_info, fragment)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _random_classes(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, size=n))  # 70% copied
    return predictions, labels


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli"])
def test_classification_metrics_match_sklearn(task):
    spec = get_task(task)
    predictions, labels = _random_classes(200, spec.num_labels, seed=len(task))
    references = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions),  # binary, positive class 1
        "matthews_correlation": lambda: matthews_corrcoef(labels, predictions),
    }
    expected = {name: references[name]() for name in spec.metrics}
    result = compute_metrics(task, predictions, labels)
    assert list(result) == list(spec.metrics)
    for name, value in result.items():
        assert type(value) is float
        assert value == pytest.approx(expected[name], abs=1e-12)
    assert 0.3 < result[spec.primary_metric] < 1.0  # the fixture is informative, not degenerate


def test_stsb_metrics_match_scipy():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, size=300)
    predictions = labels + rng.normal(0, 1.0, size=300)
    result = compute_metrics("stsb", predictions, labels)
    assert result["pearson"] == pytest.approx(stats.pearsonr(predictions, labels).statistic, abs=1e-12)
    assert result["spearman"] == pytest.approx(stats.spearmanr(predictions, labels).statistic, abs=1e-12)
    assert 0.5 < result["spearman"] < 1.0
    # [n, 1] predictions (a regression head's output) and torch tensors are accepted
    as_column = compute_metrics("stsb", torch.tensor(predictions).float()[:, None], torch.tensor(labels))
    assert as_column["pearson"] == pytest.approx(result["pearson"], abs=1e-6)


def test_custom_metrics_match_sklearn_and_scipy():
    classes = custom_task(["t"], "y", label_names=["a", "b", "c"])
    predictions, labels = _random_classes(150, 3, seed=3)
    result = compute_metrics(classes, predictions, labels)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert result["f1_macro"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    regression = custom_task(["t"], "y", num_labels=1)
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    truth = np.array([0.0, 0.5, 0.3, 1.0, 0.1])
    result = compute_metrics(regression, scores, truth)
    assert result["spearman"] == pytest.approx(stats.spearmanr(scores, truth).statistic)


def test_logits_are_argmaxed_and_checked_against_the_label_space():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])  # [n, 3]
    labels = [0, 2, 1, 1]
    assert compute_metrics("mnli", logits, labels) == {"accuracy": 0.75}
    assert compute_metrics("mnli", np.array([0.0, 2.0, 1.0, 0.0]), labels) == {"accuracy": 0.75}  # float ids
    with pytest.raises(GeokdError) as exc_info:
        compute_metrics("rte", logits, labels)  # 3 columns for a 2-label task
    _one_line_error(exc_info, "logits have 3 columns", "2 labels")
    with pytest.raises(GeokdError, match="predicted class 2 is outside the label space 0..1"):
        compute_metrics("rte", [0, 2], [0, 1])
    with pytest.raises(GeokdError, match="non-integer values such as 0.4"):
        compute_metrics("rte", [0.4, 1.0], [0, 1])


def test_metric_input_errors():
    with pytest.raises(GeokdError) as exc_info:
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    _one_line_error(exc_info, "3 predictions for 2 labels")
    with pytest.raises(GeokdError, match="split is empty"):
        compute_metrics("sst2", [], [])
    with pytest.raises(GeokdError, match=r"\[n\] or \[n, 1\]"):
        compute_metrics("stsb", np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(GeokdError, match="label -1 is outside the label space 0..1; score a labelled split"):
        compute_metrics("sst2", [0, 1], [0, -1])  # the `datasets` placeholder of a test split
    with pytest.raises(GeokdError, match="labels must be 1-D"):
        compute_metrics("sst2", [0, 1], [[0], [1]])


def test_degenerate_classification_metrics_are_zero_not_nan():
    labels = np.array([0, 1, 1, 0, 1])
    one_class = np.ones(5, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings either
        cola = compute_metrics("cola", one_class, labels)
        assert cola == {"matthews_correlation": 0.0}
        assert compute_metrics("cola", np.zeros(5, dtype=int), labels) == {"matthews_correlation": 0.0}
        # predictions and labels all one class: sklearn warns about the matrix shape; still 0.0
        assert compute_metrics("cola", one_class, one_class) == {"matthews_correlation": 0.0}
        assert matthews_corrcoef(labels, one_class) == 0.0  # what sklearn itself says
        # MRPC: class 1 never predicted -> F1 0 (sklearn zero_division=0), accuracy still counted
        mrpc = compute_metrics("mrpc", np.zeros(5, dtype=int), labels)
        assert mrpc == {"f1": 0.0, "accuracy": pytest.approx(0.4)}
        # class 1 neither predicted nor present: F1 is 0.0, accuracy 1.0
        assert compute_metrics("qqp", np.zeros(3, dtype=int), np.zeros(3, dtype=int)) == {
            "f1": 0.0,
            "accuracy": 1.0,
        }
        assert compute_metrics("mrpc", labels, labels) == {"f1": 1.0, "accuracy": 1.0}


def test_degenerate_correlations_are_zero_not_nan():
    labels = np.array([0.0, 1.5, 3.0, 4.5, 5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning must not escape
        assert compute_metrics("stsb", np.full(5, 2.5), labels) == {"pearson": 0.0, "spearman": 0.0}
        assert compute_metrics("stsb", labels, np.full(5, 2.5)) == {"pearson": 0.0, "spearman": 0.0}
        assert compute_metrics("stsb", [1.0], [2.0]) == {"pearson": 0.0, "spearman": 0.0}
        perfect = compute_metrics("stsb", labels, labels)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    # scipy alone gives NaN for the constant case: this is the behaviour being replaced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.pearsonr(np.full(5, 2.5), labels).statistic)
