"""Encoders: sequence-classification models for GLUE-style tasks (`load_model` for fine-tuning,
`load_teacher` with its head checked and put in the task's label order) and `EncoderStudents`,
the encoder side of `load_student` (truncate / shrink / pretrained students).

The rules are listed in the `geokd.models` package docstring ("Loading", "Teacher head",
"Teacher labels", "truncate", "shrink").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from geokd.errors import GeokdError
from geokd.models.loading import (
    LoadedModel,
    LoadedStudent,
    _check_weights,
    _finder,
    _head_keys,
    _load_error,
    _load_tokenizer,
    _locate,
    _sha256,
    _source,
    _weights_files,
)
from geokd.models.students import ModelKind, StudentBuilder, StudentSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig

# The feed-forward width has no standard config name across encoder families.
_INTERMEDIATE_NAMES = ("intermediate_size", "hidden_dim")


def _checked_labels(
    num_labels: int | None, id2label: Mapping[int, str] | None
) -> tuple[int | None, dict[int, str] | None]:
    """(num_labels, {id: name}) checked: a positive count, and one name per id 0..num_labels-1."""
    if num_labels is not None and (
        isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
        raise GeokdError(f"model: num_labels must be a positive integer, got {num_labels!r}")
    labels = None
    if id2label is not None:
        labels = {int(k): str(v) for k, v in id2label.items()}
        num_labels = len(labels) if num_labels is None else num_labels
        if sorted(labels) != list(range(num_labels)):
            raise GeokdError(
                f"model: id2label must have exactly the keys 0..{num_labels - 1}, got {sorted(labels)}; "
                "give one name per label id"
            )
    return num_labels, labels


def _output_layer(model: nn.Module, num_labels: int) -> nn.Linear | None:
    """The head's final output layer: the last `nn.Linear` outside `base_model`, when it has
    `num_labels` outputs and is the only such layer there; None when that is not unambiguous."""
    base = getattr(model, "base_model", None)
    inside = {id(m) for m in base.modules()} if isinstance(base, nn.Module) and base is not model else set()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    outputs = [m for m in linears if m.out_features == num_labels]
    if len(outputs) == 1 and linears[-1] is outputs[0]:
        return outputs[0]
    return None


def _align_labels(name: str, loaded: LoadedModel, task_labels: Mapping[int, str]) -> tuple[str, ...]:
    """Put the teacher's classification head in the task's label order, matching label names as
    `geokd eval` does; set its id2label/label2id to the task's. Returns the warnings to show."""
    from geokd.evaluate import _GENERIC_LABEL, _normalize_label

    config = loaded.config
    n = int(config.num_labels)
    own = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [own.get(i, f"LABEL_{i}") for i in range(n)]
    wanted = [task_labels[i] for i in range(n)]
    own_shown = ", ".join(f"{i}={label}" for i, label in enumerate(names))
    task_shown = ", ".join(f"{i}={label}" for i, label in enumerate(wanted))
    warnings: tuple[str, ...] = ()
    index = {_normalize_label(label): j for j, label in enumerate(wanted)}
    mapped = [index.get(_normalize_label(label), -1) for label in names]  # teacher output i -> task label
    if sorted(mapped) != list(range(n)):
        generic = [_GENERIC_LABEL.fullmatch(label) for label in names]
        ids = [int(m[1]) for m in generic if m is not None]
        if len(ids) != n or sorted(ids) != list(range(n)):
            raise GeokdError(
                f"teacher: the labels of {name!r} ({own_shown}) are not the task's labels ({task_shown}); "
                "pass a teacher fine-tuned on this task, or fix id2label in its config.json if its names are wrong"
            )
        mapped = ids
        warnings = (
            f"teacher: {name!r} names its labels generically ({own_shown}), so geokd cannot check their order "
            f"and takes output i as task label i ({task_shown}); if the teacher was trained with another order, "
            "set id2label in its config.json",
        )
    if mapped != list(range(n)):
        layer = _output_layer(loaded.model, n)
        if layer is None:
            raise GeokdError(
                f"teacher: the labels of {name!r} ({own_shown}) are in another order than the task's ({task_shown}) "
                f"and geokd cannot find the single {n}-output nn.Linear that ends its {type(loaded.model).__name__} "
                "head to reorder it; save the teacher with its head in the task's label order"
            )
        task_to_model = torch.tensor([mapped.index(j) for j in range(n)])  # row j of the new head
        with torch.no_grad():
            layer.weight.copy_(layer.weight[task_to_model.to(layer.weight.device)])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[task_to_model.to(layer.bias.device)])
    config.id2label = dict(enumerate(wanted))
    config.label2id = {label: i for i, label in enumerate(wanted)}
    return warnings


def _label_config(
    config: PretrainedConfig, num_labels: int | None, id2label: Mapping[int, str] | None
) -> None:
    """Set num_labels / id2label / label2id / problem_type on `config` in place."""
    num_labels, labels = _checked_labels(num_labels, id2label)
    if num_labels is not None:
        if config.num_labels != num_labels:
            config.num_labels = num_labels  # resets id2label/label2id to LABEL_i
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    elif config.num_labels == 1 and config.problem_type is None:
        config.problem_type = "regression"
    if labels is not None:
        config.id2label = labels
        config.label2id = {label: i for i, label in labels.items()}


@dataclass
class _Loaded:
    loaded: LoadedModel
    missing: set[str]
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (checkpoint shape, model shape)


def _load(
    name: str,
    *,
    num_labels: int | None,
    id2label: Mapping[int, str] | None,
    revision: str | None,
    trust_remote_code: bool,
    dtype: torch.dtype,
    hash_weights: bool,
) -> _Loaded:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    target, kind = _locate(name)
    hub = {"revision": revision} if kind == "hub" and revision is not None else {}
    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, target, kind, "config", exc, trust_remote_code) from exc
    _label_config(config, num_labels, id2label)
    tokenizer = _load_tokenizer(name, target, kind, config, trust_remote_code, hub)
    from safetensors import SafetensorError

    shown = repr(name) if name == target else f"{name!r} ({target!r})"
    find = _finder(target, kind, revision)
    _check_weights(shown, find, local=kind == "local")  # before transformers touches the files
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            target,
            config=config,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=True,  # never a pickled .bin (refused above with the conversion)
            weights_only=True,  # belt and braces: were a .bin ever read, tensors only
            ignore_mismatched_sizes=True,  # a head of another size is re-initialised and reported below
            output_loading_info=True,
            **hub,
        )
    except SafetensorError as exc:  # damage the structural check cannot see
        files = ", ".join(repr(str(f)) for f in _weights_files(find)) or shown
        detail = " ".join(str(exc).split())[:200]
        raise GeokdError(
            f"model: the safetensors weights {files} could not be read ({detail}); the file is damaged: copy or "
            "download it again, or re-create it with save_pretrained"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, target, kind, "weights", exc, trust_remote_code) from exc
    missing = set(info.get("missing_keys", ()))
    reshaped = {key: (tuple(old), tuple(new)) for key, old, new in info.get("mismatched_keys", ())}
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        source=_source(name, target, kind, revision, hash_weights),
        new_weights=tuple(sorted(missing | set(reshaped))),
    )
    return _Loaded(loaded, missing, reshaped)


def load_model(
    name: str,
    *,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> LoadedModel:
    """Load a sequence-classification model, e.g. to fine-tune it (`geokd finetune --model`).

    `name` is an alias, a local directory or a Hugging Face id (`revision` applies to ids only).
    `num_labels` / `id2label` set the head (None keeps the checkpoint's); `num_labels=1` makes a
    regression head. A head that the checkpoint lacks, or holds with another number of labels, is
    newly initialised and listed in `new_weights`. The model comes back in eval mode.
    """
    return _load(
        name,
        num_labels=num_labels,
        id2label=id2label,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        hash_weights=hash_weights,
    ).loaded


def load_teacher(
    name: str,
    *,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> LoadedModel:
    """Load a fine-tuned teacher (arguments as `load_model`). Refuse one whose task head, or any
    other weight, is not in its checkpoint: distilling from a random head teaches nothing.

    With `id2label` (the task's labels) the teacher keeps its own label names while loading; they
    are matched to the task's by name and the head's output rows are permuted into the task's order
    (see the module docstring, "Teacher labels"), so logit i is task label i."""
    num_labels, task_labels = _checked_labels(num_labels, id2label)
    result = _load(
        name,
        num_labels=num_labels,
        id2label=None,  # the teacher's own names, matched to the task's below
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        hash_weights=False,  # hashed below, once the teacher is accepted
    )
    model = result.loaded.model
    missing_head = sorted(_head_keys(model, sorted(result.missing)))
    if missing_head:
        raise GeokdError(
            f"teacher: {name!r} has no trained classification head (its checkpoint lacks "
            f"{', '.join(missing_head)}); fine-tune it on the task first with `geokd finetune --model {name}` "
            "and pass the result as --teacher, or add --finetune-teacher"
        )
    if result.reshaped:
        shapes = ", ".join(
            f"{key} {list(old)} -> {list(new)}" for key, (old, new) in sorted(result.reshaped.items())
        )
        raise GeokdError(
            f"teacher: the head of {name!r} does not fit the task's {result.loaded.config.num_labels} labels "
            f"(checkpoint -> needed: {shapes}); pass a teacher fine-tuned on this task (geokd finetune)"
        )
    if result.missing:
        keys = sorted(result.missing)
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise GeokdError(
            f"teacher: the checkpoint of {name!r} lacks {len(keys)} weight(s) the model needs ({shown}); "
            "pass the complete fine-tuned model directory"
        )
    if task_labels is not None and int(result.loaded.config.num_labels) > 1:
        result.loaded.warnings += _align_labels(name, result.loaded, task_labels)
    source = result.loaded.source
    if hash_weights and source.weights_files:
        files = [Path(f) for f in source.weights_files]
        result.loaded.source = replace(source, weights_sha256=_sha256(files))
    return result.loaded


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


class EncoderStudents(StudentBuilder):
    """Students of a sequence-classification teacher: truncate (shared), shrink with the encoder
    config names, and pretrained students that get a head of the teacher's labels."""

    kind: ClassVar[ModelKind] = "encoder"

    def shrink_config(self, spec: StudentSpec, teacher: LoadedModel) -> PretrainedConfig:
        assert spec.layers is not None and spec.hidden is not None and spec.heads is not None
        config = copy.deepcopy(teacher.config)
        if spec.kv_heads is not None:
            raise GeokdError(
                f"student: {spec.text!r}: kv_heads applies to causal LMs with grouped-query attention, not to "
                f"model_type {config.model_type!r}; leave it out"
            )
        teacher_hidden = int(config.hidden_size)
        intermediate_name = next(
            (n for n in _INTERMEDIATE_NAMES if isinstance(getattr(config, n, None), int)), None
        )
        if intermediate_name is None:
            raise GeokdError(
                f"student: shrink does not know the feed-forward width of model_type {config.model_type!r} "
                f"(none of {', '.join(_INTERMEDIATE_NAMES)} in its config); use truncate:N or a pretrained student"
            )
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(set(layer_types)) > 1:
            raise GeokdError(
                f"student: shrink cannot choose layer types for model_type {config.model_type!r} (mixed layer_types); "
                "use truncate:N or a pretrained student"
            )
        config.num_hidden_layers = spec.layers
        config.hidden_size = spec.hidden
        config.num_attention_heads = spec.heads
        setattr(config, intermediate_name, spec.intermediate or 4 * spec.hidden)
        if isinstance(layer_types, list):
            config.layer_types = layer_types[:1] * spec.layers
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = spec.hidden // spec.heads
        if getattr(config, "num_key_value_heads", None) is not None:
            config.num_key_value_heads = spec.heads
        for name in ("pooler_hidden_size", "embedding_size"):  # widths tied to hidden_size in some families
            if getattr(config, name, None) == teacher_hidden:
                setattr(config, name, spec.hidden)
        return config

    def pretrained(
        self,
        spec: StudentSpec,
        teacher: LoadedModel,
        *,
        revision: str | None,
        trust_remote_code: bool,
        dtype: torch.dtype,
        allow_different_tokenizer: bool,
        hash_weights: bool,
    ) -> LoadedStudent:
        assert spec.name is not None
        loaded = _load(
            spec.name,
            num_labels=teacher.config.num_labels,
            id2label=teacher.config.id2label,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            hash_weights=hash_weights,
        ).loaded
        if not allow_different_tokenizer and loaded.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise GeokdError(
                f"student: {spec.text!r} uses a different vocabulary than the teacher ({len(loaded.tokenizer.get_vocab())} "
                f"vs {len(teacher.tokenizer.get_vocab())} tokens); one tokenised batch feeds both models, so pick a "
                "student with the teacher's tokenizer, or use truncate:N / shrink:..."
            )
        return LoadedStudent(**vars(loaded), init="pretrained", spec=spec.text)
