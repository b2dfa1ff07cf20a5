"""Students built from a teacher: parse `--student`, find a model's block list, copy uniformly
spaced blocks (`truncate:N`), build a smaller random model of the teacher's family (`shrink:...`),
or load a pretrained model; `load_student` picks the per-kind builder (encoder or causal LM).

The kinds differ only in a few decisions (which block lists exist, how a config is shrunk, how a
pretrained student is loaded and checked against the teacher), so each kind is one small
`StudentBuilder` (`geokd.models.encoder.EncoderStudents`, `geokd.models.decoder.DecoderStudents`)
and the shared work (block copying, seeded random init, provenance) lives here once.
"""

from __future__ import annotations

import abc
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from geokd.errors import GeokdError
from geokd.models.features import uniform_layer
from geokd.models.loading import LoadedModel, LoadedStudent, ModelSource

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig

ModelKind = Literal["encoder", "decoder"]

# The one place that knows where each architecture keeps its transformer blocks (an
# nn.ModuleList), as attribute paths from the model geokd loads, per kind of model:
# * encoders (sequence classification): BERT, RoBERTa (ELECTRA and DeBERTa share the layout but
#   are untested) and DistilBERT;
# * causal LMs: Llama, Qwen2/Qwen3, Mistral (`model.layers`), GPT-2 (`transformer.h`) and OPT
#   (`model.decoder.layers`).
BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "encoder": ("base_model.encoder.layer", "base_model.transformer.layer"),
    "decoder": ("model.layers", "transformer.h", "model.decoder.layers"),
}
# Config entries with one value per block, sliced with the blocks (truncate) or mapped by the
# `uniform` rule (shrink). Only these names: a list that merely happens to have L entries (e.g.
# Llama 3's three eos_token_id) must not be touched.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")

_SHRINK_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate")
_SHRINK_REQUIRED = ("layers", "hidden", "heads")
_PRUNE_KEYS = ("hidden", "heads", "kv_heads", "intermediate", "layers", "depth")
_SPEC_HELP = ("use truncate:N, truncate:BLOCKS (e.g. truncate:1-4,9-12), shrink:layers=L,hidden=H,heads=A[,kv_heads=K]"
              "[,intermediate=I], prune:hidden=H,heads=A,intermediate=F,layers=L (any subset) or a model name")


@dataclass(frozen=True)
class StudentSpec:
    """A parsed `--student` value: `truncate:N`, `shrink:...` or a model name (alias, directory, id)."""

    kind: Literal["pretrained", "truncate", "shrink", "prune"]
    text: str
    name: str | None = None  # pretrained
    layers: int | None = None  # truncate (N) and shrink
    blocks: tuple[int, ...] | None = None  # truncate:BLOCKS, the 1-based teacher blocks to copy
    hidden: int | None = None  # shrink
    heads: int | None = None  # shrink
    intermediate: int | None = None  # shrink (None: the family's default, see the builders)
    kv_heads: int | None = None  # shrink, grouped-query causal LMs (None: keep the teacher's ratio)
    depth: str | None = None  # prune: how blocks are chosen, skip (default) or uniform


# --------------------------------------------------------------------------------------------
# Kinds and block lists
# --------------------------------------------------------------------------------------------


def model_kind(model: nn.Module) -> ModelKind:
    """ "decoder" for a causal language model (a transformers model that can generate and is not an
    encoder-decoder), else "encoder" (sequence classification and bare encoders)."""
    from transformers import GenerationMixin

    config = getattr(model, "config", None)
    if isinstance(model, GenerationMixin) and not getattr(config, "is_encoder_decoder", False):
        return "decoder"
    return "encoder"


def block_list(model: nn.Module, kind: ModelKind | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer block list of `model` and its state-dict prefix, e.g.
    ('bert.encoder.layer', ModuleList) or ('model.layers', ModuleList). `kind` (default: the
    model's own, `model_kind`) chooses which layouts of `BLOCK_LISTS` are tried; any other layout
    is one GeokdError line naming the class."""
    kind = kind or model_kind(model)
    paths = BLOCK_LISTS[kind]
    for path in paths:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            for name, candidate in model.named_modules():
                if candidate is module:
                    return name, module
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise GeokdError(
        f"student: truncate does not support model_type {model_type!r} ({type(model).__name__}): no block list at "
        f"{' or '.join(paths)}; use shrink:... or a pretrained student instead"
    )


def truncate_blocks(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """The 0-based teacher blocks that `truncate:N` copies, in order: student block i (1-based) is
    teacher block t(i) of the `uniform` rule, so 12 -> 6 gives (1, 3, 5, 7, 9, 11)."""
    if not 1 <= student_layers <= teacher_layers:
        raise GeokdError(
            f"student: truncate:{student_layers} is out of range; the teacher has {teacher_layers} blocks, "
            f"choose N in 1..{teacher_layers}"
        )
    return tuple(uniform_layer(i, student_layers, teacher_layers) - 1 for i in range(1, student_layers + 1))


def copied_blocks(spec: str | None, teacher_layers: int) -> tuple[int, ...] | None:
    """The 0-based teacher blocks a `--student` value copies (`truncate:N` or `truncate:BLOCKS`),
    or None for any other student: what `--layers copied` pairs with when the student is read
    back from a run directory rather than built."""
    if not spec:
        return None
    try:
        parsed = parse_student_spec(spec)
    except GeokdError:
        return None
    if parsed.kind != "truncate" or parsed.layers is None:
        return None
    if parsed.blocks is not None:
        return tuple(block - 1 for block in parsed.blocks)
    return truncate_blocks(teacher_layers, parsed.layers)


def map_layer_config(config: PretrainedConfig, source_blocks: Sequence[int], teacher_layers: int) -> None:
    """Give student block i the per-layer settings of teacher block `source_blocks[i]` (0-based):
    every `PER_LAYER_CONFIG` list with one entry per teacher block is re-indexed, and Qwen2/Qwen3's
    `max_window_layers` (blocks below it use full attention) becomes the number of student blocks
    taken from below it, so it agrees with the re-indexed `layer_types`."""
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == teacher_layers:
            setattr(config, name, [values[j] for j in source_blocks])
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and not isinstance(window, bool):
        config.max_window_layers = sum(1 for j in source_blocks if j < window)


# --------------------------------------------------------------------------------------------
# --student
# --------------------------------------------------------------------------------------------


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


def _parse_blocks(text: str, problems: list[str]) -> tuple[int, ...]:
    """`1-4,9,11-12` -> (1, 2, 3, 4, 9, 11, 12): 1-based teacher blocks (the numbering of
    `--layers`), strictly increasing; each problem is appended to `problems`."""
    blocks: list[int] = []
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            problems.append(f"{item.strip()!r} is not a block number or a range such as 3-7")
            continue
        if low < 1 or high < low:
            problems.append(f"{item.strip()!r} is not a range of blocks counted from 1")
            continue
        if blocks and low <= blocks[-1]:
            problems.append(f"{item.strip()!r} does not come after block {blocks[-1]} (blocks must increase)")
            continue
        blocks.extend(range(low, high + 1))
    return tuple(blocks)


def _near_divisors(number: int, wanted: int) -> str:
    """The divisors of `number` closest to `wanted`, e.g. '3 or 5' for (30, 4)."""
    divisors = sorted(
        (d for d in range(1, number + 1) if number % d == 0), key=lambda d: (abs(d - wanted), d)
    )
    return " or ".join(str(d) for d in sorted(divisors[:2]))


def parse_student_spec(spec: str) -> StudentSpec:
    """Parse a `--student` value; every problem in a `truncate:`/`shrink:` spec is reported at once.

    The truncate range (N ≤ teacher blocks) and the head counts a family allows need the teacher and
    are checked by `load_student`.
    """
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep or Path(text).expanduser().exists():
        return StudentSpec(kind="pretrained", text=text, name=text)
    if kind == "truncate":
        problems: list[str] = []
        if "," in rest or "-" in rest:
            blocks = _parse_blocks(rest, problems)
            if problems:
                raise GeokdError(
                    f"student: {spec!r}: {'; '.join(problems)}; use truncate:BLOCKS with increasing 1-based teacher "
                    "blocks and ranges, e.g. truncate:1-4,9-12, or truncate:N"
                )
            return StudentSpec(kind="truncate", text=text, layers=len(blocks), blocks=blocks)
        n = _int_value("N", rest, problems)
        if problems:
            raise GeokdError(
                f"student: {spec!r}: {'; '.join(problems)}; use truncate:N, e.g. truncate:6, or truncate:BLOCKS, "
                "e.g. truncate:1-4,9-12"
            )
        return StudentSpec(kind="truncate", text=text, layers=n)
    if kind == "shrink":
        problems = []
        values, given = _key_values(rest, _SHRINK_KEYS, problems)
        problems += [f"{key} is missing" for key in _SHRINK_REQUIRED if key not in given]
        hidden, heads, kv_heads = values.get("hidden"), values.get("heads"), values.get("kv_heads")
        if hidden is not None and heads is not None and hidden % heads:
            problems.append(
                f"hidden={hidden} is not divisible by heads={heads} (e.g. heads={_near_divisors(hidden, heads)})"
            )
        if heads is not None and kv_heads is not None and heads % kv_heads:
            problems.append(
                f"heads={heads} is not divisible by kv_heads={kv_heads} (e.g. kv_heads={_near_divisors(heads, kv_heads)})"
            )
        if problems:
            raise GeokdError(
                f"student: {spec!r}: {'; '.join(problems)}; "
                "use shrink:layers=L,hidden=H,heads=A[,kv_heads=K][,intermediate=I], "
                "e.g. shrink:layers=4,hidden=256,heads=4"
            )
        return StudentSpec(
            kind="shrink",
            text=text,
            layers=values["layers"],
            hidden=hidden,
            heads=heads,
            intermediate=values.get("intermediate"),
            kv_heads=kv_heads,
        )
    if kind == "prune":
        return _parse_prune(spec, text, rest)
    if re.fullmatch(r"[A-Za-z_-]+", kind):
        raise GeokdError(f"student: unknown initialisation {kind!r} in {spec!r}; {_SPEC_HELP}")
    return StudentSpec(kind="pretrained", text=text, name=text)


def _key_values(rest: str, keys: Sequence[str], problems: list[str],
                text_keys: Sequence[str] = ()) -> tuple[dict[str, Any], set[str]]:  # fmt: skip
    """`k=v,k=v` of a `shrink:`/`prune:` spec: (values, keys given); integers except `text_keys`;
    every problem (not key=value, unknown or repeated key, bad integer) appended to `problems`."""
    values: dict[str, Any] = {}
    given: set[str] = set()
    for item in rest.split(",") if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"{item.strip()!r} is not key=value")
        elif key not in keys:
            problems.append(f"unknown key {key!r} (keys: {', '.join(keys)})")
        elif key in given:
            problems.append(f"{key} is given twice")
        else:
            given.add(key)
            if key in text_keys:
                values[key] = value.strip()
            elif (number := _int_value(key, value, problems)) is not None:
                values[key] = number
    return values, given


def _parse_prune(spec: str, text: str, rest: str) -> StudentSpec:
    """`prune:hidden=H,heads=A,kv_heads=K,intermediate=F,layers=L,depth=skip|uniform`, any subset
    (at least one); what fits the teacher is checked by `geokd.models.prune.check_prune_spec`."""
    problems: list[str] = []
    values, given = _key_values(rest, _PRUNE_KEYS, problems, text_keys=("depth",))
    depth = values.get("depth")
    if depth is not None and depth not in ("skip", "uniform"):
        problems.append(f"depth must be skip or uniform, got {depth!r}")
    if not given - {"depth"}:
        problems.append("nothing to prune (give at least one of hidden, heads, kv_heads, intermediate, layers)")
    if problems:
        raise GeokdError(f"student: {spec!r}: {'; '.join(problems)}; use prune:hidden=H,heads=A,intermediate=F,layers=L "
                         "(any subset), e.g. prune:hidden=192,heads=6,intermediate=768")  # fmt: skip
    return StudentSpec(kind="prune", text=text, layers=values.get("layers"), hidden=values.get("hidden"),
                       heads=values.get("heads"), intermediate=values.get("intermediate"),
                       kv_heads=values.get("kv_heads"), depth=depth)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


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


def copied_student(model: nn.Module, teacher: LoadedModel, spec: StudentSpec, init: Literal["truncate", "prune"],
                   teacher_blocks: tuple[int, ...], hidden_channels: tuple[int, ...] | None = None) -> LoadedStudent:  # fmt: skip
    """A student whose weights were copied out of the teacher (`truncate:`, `prune:`), in eval mode,
    sharing the teacher's tokenizer and provenance."""
    model.eval()
    return LoadedStudent(model=model, tokenizer=teacher.tokenizer, config=model.config,
                         source=_derived_source(spec.text, teacher), new_weights=teacher.new_weights, init=init,
                         spec=spec.text, teacher_blocks=teacher_blocks, hidden_channels=hidden_channels)  # fmt: skip


def _refuse_heterogeneous(spec: StudentSpec, config: PretrainedConfig) -> None:
    """transformers 5 configs may carry per-layer overrides (`per_layer_config`); geokd does not
    re-index them yet, so a student of such a teacher would silently get the wrong layers."""
    if getattr(config, "is_heterogeneous", False):
        raise GeokdError(
            f"student: {spec.text!r}: the teacher's {config.model_type} config has per-layer settings "
            "(per_layer_config), which truncate and shrink do not re-index yet; use a pretrained student"
        )


class StudentBuilder(abc.ABC):
    """What one kind of model (encoder, causal LM) decides when a student is made from a teacher.

    Subclasses set `kind` (which `BLOCK_LISTS` apply) and implement `shrink_config` (the teacher's
    config resized, or one GeokdError line) and `pretrained` (load `--student NAME` and check it
    against the teacher). Block copying and seeded random initialisation are shared."""

    kind: ClassVar[ModelKind]

    def truncate(self, spec: StudentSpec, teacher: LoadedModel) -> LoadedStudent:
        """The teacher's embeddings, everything outside the block list (final norms, heads) and the
        `truncate_blocks` blocks, copied (the student owns its tensors); per-layer config entries
        are sliced with the blocks."""
        assert spec.layers is not None
        _refuse_heterogeneous(spec, teacher.config)
        teacher_layers = teacher.num_layers
        if spec.blocks is not None:
            if spec.blocks[-1] > teacher_layers:
                raise GeokdError(
                    f"student: {spec.text!r} copies block {spec.blocks[-1]}, but the teacher has {teacher_layers} "
                    f"blocks; choose blocks in 1..{teacher_layers}"
                )
            kept = tuple(block - 1 for block in spec.blocks)
        else:
            kept = truncate_blocks(teacher_layers, spec.layers)
        prefix, blocks = block_list(teacher.model, self.kind)
        if (
            len(blocks) != teacher_layers
        ):  # a config that does not describe its model: a bug, not a user error
            raise RuntimeError(f"{prefix} has {len(blocks)} blocks but num_hidden_layers is {teacher_layers}")
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = spec.layers
        map_layer_config(config, kept, teacher_layers)
        student = type(teacher.model)(config)
        teacher_state = teacher.model.state_dict()
        state = {}
        for key in student.state_dict():
            source_key = key
            if key.startswith(prefix + "."):
                index, tail = key[len(prefix) + 1 :].split(".", 1)
                source_key = f"{prefix}.{kept[int(index)]}.{tail}"
            state[key] = teacher_state[source_key]
        student.load_state_dict(state, strict=True)  # copies into the student's own tensors
        return copied_student(student, teacher, spec, "truncate", kept)

    @abc.abstractmethod
    def shrink_config(self, spec: StudentSpec, teacher: LoadedModel) -> PretrainedConfig:
        """The teacher's config resized to `spec`, or one GeokdError line."""

    def shrink(self, spec: StudentSpec, teacher: LoadedModel, seed: int | None) -> LoadedStudent:
        """A randomly initialised model of the teacher's class with `shrink_config`, drawn from
        `seed` when given without touching the global RNG."""
        _refuse_heterogeneous(spec, teacher.config)
        config = self.shrink_config(spec, teacher)
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

    @abc.abstractmethod
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
        """Load `--student NAME` (a pretrained model of this kind) and check it against the teacher."""


def builder_for(teacher: LoadedModel) -> StudentBuilder:
    """The student builder of the teacher's kind (`model_kind`)."""
    if model_kind(teacher.model) == "decoder":
        from geokd.models.decoder import DecoderStudents

        return DecoderStudents()
    from geokd.models.encoder import EncoderStudents

    return EncoderStudents()


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
    calibration: Any = None,
) -> LoadedStudent:
    """Build or load the student for `teacher` (an encoder or a causal LM) from `--student`:

    * `truncate:N`: the teacher's embeddings, head and N uniformly spaced blocks (`truncate_blocks`);
    * `truncate:BLOCKS`: the same with the listed 1-based teacher blocks, e.g. `truncate:1-7,23-30`;
    * `shrink:layers=L,hidden=H,heads=A[,kv_heads=K][,intermediate=I]`: a random model of the
      teacher's family (initialised from `seed` when given, without touching the global RNG);
    * `prune:hidden=H,heads=A,intermediate=F,layers=L,...`: the teacher's most important channels,
      heads, neurons and blocks on the batches `calibration()` yields (`geokd.models.prune`);
    * anything else: a pretrained model (alias, directory, id; for causal LMs also a .gguf file).
      An encoder student gets a head of the teacher's labels; a causal-LM student is loaded with
      `load_causal_lm`. Its tokenizer must be the teacher's (one tokenised batch feeds both models)
      unless `allow_different_tokenizer`.

    Derived students share the teacher's tokenizer object and are float32 unless `dtype` says
    otherwise; every student comes back in eval mode.
    """
    parsed = parse_student_spec(spec)
    builder = builder_for(teacher)
    if parsed.kind == "truncate":
        student = builder.truncate(parsed, teacher)
    elif parsed.kind == "shrink":
        student = builder.shrink(parsed, teacher, seed)
    elif parsed.kind == "prune":
        from geokd.models.prune import prune_student

        student = prune_student(parsed, teacher, calibration)
    else:
        loaded = builder.pretrained(
            parsed,
            teacher,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            allow_different_tokenizer=allow_different_tokenizer,
            hash_weights=hash_weights,
        )
        return with_recorded_origin(loaded, parsed.name, teacher)
    student.model.to(dtype)
    return student


def _config_int(config: Any, key: str) -> int | None:
    value = getattr(getattr(config, "text_config", None) or config, key, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def with_recorded_origin(student: LoadedStudent, name: str | None, teacher: LoadedModel) -> LoadedStudent:
    """A geokd model folder (a run's `final/`, a checkpoint's student, an export) records in its
    geokd.json the teacher blocks (`teacher_blocks`) and hidden channels (`hidden_channels`) its
    `truncate:`/`prune:` ancestor was cut from. A run that starts from such a folder gets them back:
    `--layers copied` pairs the copied blocks again, and Flex-KD pairs each channel with the teacher
    channel it was cut from. Kept only where they fit this student and teacher (one block per student
    block, one channel per student channel, all within the teacher's depth and width, no repeats)."""
    import json

    record_file = Path(name).expanduser() / "geokd.json" if name else None
    if record_file is None or not record_file.is_file():
        return student
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return student  # the folder itself loaded; its record is only a hint here
    if not isinstance(record, dict):
        return student

    def fits(values: Any, count: int | None, bound: int | None) -> bool:
        return (isinstance(values, list) and count is not None and bound is not None and len(values) == count
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < bound for v in values)
                and len(set(values)) == len(values))  # fmt: skip

    blocks, channels = record.get("teacher_blocks"), record.get("hidden_channels")
    if fits(blocks, _config_int(student.config, "num_hidden_layers"), _config_int(teacher.config, "num_hidden_layers")):
        student.teacher_blocks = tuple(blocks)
    if fits(channels, _config_int(student.config, "hidden_size"), _config_int(teacher.config, "hidden_size")):
        student.hidden_channels = tuple(channels)
    return student
