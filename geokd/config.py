"""Typed run configuration for `geokd finetune` and `geokd distill`: defaults, YAML files, `--set
key=value` overrides and first-class flags, resolved in that order, validated all at once.

One name per concept: the YAML key, the `--set` key, the CLI flag (with dashes) and the log key
are spelled the same. The resolved config is saved as `config.yaml` in every run directory and
read back (and checked) on resume.

    config = resolve_config("distill", file="recipe.yaml", overrides=["alpha=0.7"],
                            flags={"teacher": "teacher/final", "loss": "procrustes"})
    config.validate()   # one GeokdError listing every problem
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from geokd.errors import GeokdError

MODES = ("finetune", "distill")
# Keys a recipe file or --set may not switch on: running a model repository's code is the user's
# own decision, typed as a flag (a file asking for it is an error unless the flag is also given).
FLAG_ONLY = ("trust_remote_code",)
# Keys that only mean something to distill (not printed for finetune).
DISTILL_ONLY = ("teacher", "finetune_teacher", "cache", "loss", "alpha", "gamma", "temperature", "layers", "features",
                "kd", "kd_beta", "kd_skew", "flexkd_basis", "flexkd_samples", "flexkd_output", "prune_samples",
                "geometry_batch", "shard_teacher", "attn_map", "relation_heads")
# Keys that only mean something for --task instruct.
INSTRUCT_ONLY = ("kd", "kd_beta", "kd_skew", "format", "template", "max_prompt_length", "eval_generate",
                 "max_new_tokens")
FEATURES = ("cls", "mean", "tokens", "last", "spans")
# The token-level KD kinds (geokd.losses.token_kd) and ULD (geokd.losses.uld), which also works
# between different tokenizers.
KD_KINDS = ("forward", "reverse", "jsd", "skew-forward", "skew-reverse", "tvd", "uld")
TEMPLATES = ("alpaca", "chat")
FLEXKD_BASES = ("dims", "tangent")  # geokd.losses.flexkd
FLEXKD_OUTPUTS = ("prediction", "label")  # geokd.flexkd
# With --grad-accum: batch-geometry losses over the step's whole batch (GradCache-style, the
# default) or over each micro-batch on its own (the pre-0.2 behaviour, one forward less).
GEOMETRY_BATCHES = ("global", "micro")
INSTRUCT_FORMATS = ("auto", "minillm", "dolly", "self-instruct", "chat", "prompt-completion")
# `--task instruct` (decoders, issue #11) changes these defaults when they are not given: token rows
# (the geometry paper aligns decoder token representations), MiniLLM's 512-token sequences, and
# τ = 1 (token-level KD as in MiniLLM/DistiLLM, not the sentence-level τ = 2 of encoders).
INSTRUCT_DEFAULTS = {"features": "tokens", "max_length": 512, "temperature": 1.0}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_LAYER_PAIRS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")


@dataclass
class RunConfig:
    """Everything a finetune or distill run needs. `student` is the model being trained (for
    finetune: `--model`); `teacher` is only used by distill."""

    mode: str = "distill"
    # models
    teacher: str | None = None
    student: str | None = None
    finetune_teacher: bool = False
    cache: str | None = None  # distill: read the teacher's logits and features from a geokd cache
    trust_remote_code: bool = False
    # data
    task: str | None = None
    data: str | None = None
    text_fields: str | None = None  # custom tasks: "a,b"
    label_field: str | None = None
    max_length: int = 128
    # objective: gamma * task + alpha * sum_layers feature + (1 - alpha) * tau^2 * KL
    loss: str = "procrustes"
    alpha: float = 0.5
    gamma: float = 1.0
    temperature: float = 2.0
    layers: str = "uniform"
    features: str = "cls"
    # decoders (--task instruct): token-level KD, data format and prompt template
    kd: str = "forward"
    kd_beta: float = 0.5  # jsd: the teacher's weight in the mixture
    kd_skew: float = 0.1  # skew-forward / skew-reverse: the skew α
    # --loss flexkd (issue #13, geokd.flexkd): the teacher subspace, how many training examples
    # score it (0: all) and which task output's gradient scores it
    flexkd_basis: str = "dims"
    flexkd_samples: int = 1024
    flexkd_output: str = "prediction"
    # --loss attn (issue #15): pre-softmax scores (TinyBERT) or softmax probabilities; --loss
    # attn-relation: the number of relation heads (None: the teacher's head count, or the largest
    # divisor of both attention widths below it; geokd.losses.attention.resolve_relation_heads)
    attn_map: str = "scores"
    relation_heads: int | None = None
    # --student prune:... (geokd.models.prune): training examples of the calibration pass
    prune_samples: int = 256
    format: str = "auto"
    template: str = "alpaca"
    max_prompt_length: int = 256
    eval_generate: int | None = None  # greedy ROUGE-L on the first N dev examples
    max_new_tokens: int = 128
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    geometry_batch: str = "global"  # feature losses over the step's batch or each micro-batch
    seed: int = 42
    # bookkeeping
    eval_every: int | None = None
    save_every: int | None = None
    # Checkpoint also whenever this many minutes passed since the last one (0: only --save-every),
    # so a killed or preempted run always has something recent to resume from.
    save_minutes: float = 10.0
    keep_checkpoints: int | None = None  # keep the newest K checkpoints (None: all)
    resume: str | None = None
    device: str = "auto"
    # torchrun (geokd.distributed): replicate the student on every rank (ddp) or shard each of its
    # transformer blocks over the ranks with FSDP2 (fsdp; --shard-teacher shards the teacher's too)
    strategy: str = "ddp"
    shard_teacher: bool = False
    precision: str = "auto"  # forward passes: auto (bf16 / fp16+scaling / fp32 by device), fp32, bf16, fp16
    # CUDA speed (issue #14): torch.compile of the student's forward, and activation checkpointing
    # (recompute each block's activations in the backward) for students that do not fit
    compile: bool = False
    activation_checkpointing: bool = False
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise one GeokdError listing every problem, each with the value received and a fix."""
        problems = validation_problems(self)
        if problems:
            raise GeokdError("; ".join(problems))


def _field_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]


def validation_problems(config: RunConfig) -> list[str]:
    """All problems with `config`, in field order (empty when valid)."""
    from geokd.losses import feature_loss_names
    from geokd.losses.attention import ATTENTION_MAPS
    from geokd.losses.registry import ATTENTION_LOSSES

    p: list[str] = []
    for f in fields(RunConfig):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{f.name}: must be a finite number, got {value}")
    if p:
        return p
    if config.mode not in MODES:
        p.append(f"mode: must be one of {', '.join(MODES)}, got {config.mode!r}")
    if not config.student:
        flag = "--model" if config.mode == "finetune" else "--student"
        p.append(f"student: no model given; pass {flag} (a local directory, a Hugging Face id or an alias)")
    if config.mode == "distill" and not config.teacher and not config.cache:
        p.append("teacher: no teacher given; pass --teacher (a fine-tuned model directory) or --cache")
    if config.cache and config.mode != "distill":
        p.append(f"cache: only distill reads a teacher cache, got cache={config.cache!r} in {config.mode}")
    if config.cache and config.finetune_teacher:
        p.append(
            "cache/finetune_teacher: a cache holds an already fine-tuned teacher; drop --finetune-teacher"
        )
    if not config.task:
        p.append("task: no task given; pass --task (a GLUE task such as rte, or 'custom' with --text-fields)")
    if (config.text_fields is None) != (config.label_field is None):
        p.append(
            f"text_fields/label_field: give both or neither for a custom task, got text_fields={config.text_fields!r}, "
            f"label_field={config.label_field!r}"
        )
    if config.max_length < 8:
        p.append(f"max_length: must be at least 8 tokens, got {config.max_length}")
    losses = [*feature_loss_names(), "none"]
    if config.loss not in losses:
        close = difflib.get_close_matches(str(config.loss), losses, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        p.append(f"loss: unknown loss {config.loss!r}{hint}; choose one of: {', '.join(losses)}")
    if not 0.0 <= config.alpha <= 1.0:
        p.append(f"alpha: the feature weight must be in [0, 1], got {config.alpha}")
    if config.gamma < 0:
        p.append(f"gamma: the task-loss weight must be >= 0, got {config.gamma}")
    if config.temperature <= 0:
        p.append(f"temperature: must be > 0, got {config.temperature}; 2.0 is a common choice")
    layers = str(config.layers)
    if layers not in ("uniform", "last", "copied") and not _LAYER_PAIRS.match(layers):
        p.append(
            f"layers: expected 'uniform', 'last', 'copied' (a truncate: student's source blocks) or student:teacher pairs such as '2:4,4:8', got {layers!r}"
        )
    if config.features not in FEATURES:
        p.append(f"features: must be one of {', '.join(FEATURES)}, got {config.features!r}")
    instruct = config.task == "instruct"
    if instruct and config.features == "cls":
        p.append("features: a decoder has no [CLS] row; use tokens (default), mean or last with --task instruct")
    if not instruct and config.features == "spans":
        p.append("features: spans (span-aligned token rows across tokenizers) is for --task instruct; use cls, mean or tokens")
    if not instruct and config.features == "last":
        p.append("features: last (the last prompt token) is for --task instruct; use cls, mean or tokens")
    if config.kd not in KD_KINDS:
        p.append(f"kd: must be one of {', '.join(KD_KINDS)}, got {config.kd!r}")
    if not 0.0 < config.kd_beta < 1.0:
        p.append(f"kd_beta: the JSD mixture weight must be in (0, 1), got {config.kd_beta}")
    if not 0.0 <= config.kd_skew < 1.0:
        p.append(f"kd_skew: the skew must be in [0, 1), got {config.kd_skew}")
    if config.strategy not in ("ddp", "fsdp"):
        p.append(f"strategy: must be ddp (replicated student) or fsdp (blocks sharded over the ranks), got "
                 f"{config.strategy!r}")  # fmt: skip
    if config.shard_teacher and config.strategy != "fsdp":
        p.append("shard_teacher: shards the teacher's blocks with FSDP2; add --strategy fsdp or drop it")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):  # geokd.runtime.PRECISIONS
        p.append(f"precision: must be auto, fp32, bf16 or fp16, got {config.precision!r}")
    if config.geometry_batch not in GEOMETRY_BATCHES:
        p.append(f"geometry_batch: must be global (feature losses over the step's whole batch) or micro (over each "
                 f"micro-batch), got {config.geometry_batch!r}")  # fmt: skip
    if config.flexkd_basis not in FLEXKD_BASES:
        p.append(f"flexkd_basis: must be dims (teacher coordinates) or tangent (principal gradient directions), "
                 f"got {config.flexkd_basis!r}")  # fmt: skip
    if config.attn_map not in ATTENTION_MAPS:
        p.append(f"attn_map: must be scores (pre-softmax, TinyBERT) or probs (softmax probabilities), got {config.attn_map!r}")
    if config.relation_heads is not None and config.relation_heads < 1:
        p.append(f"relation_heads: must be at least 1 (or unset for the default), got {config.relation_heads}")
    if config.cache and config.loss in ATTENTION_LOSSES:
        p.append(f"cache: --loss {config.loss} reads attention (queries and keys of every token pair), which a cache "
                 "does not hold (the maps are O(T²) per head); drop --cache or use a feature loss such as procrustes")
    if config.flexkd_samples < 0:
        p.append(f"flexkd_samples: must be >= 0 (0: every training example), got {config.flexkd_samples}")
    if config.prune_samples < 1:
        p.append(f"prune_samples: the calibration pass needs at least 1 example, got {config.prune_samples}")
    if config.flexkd_output not in FLEXKD_OUTPUTS:
        p.append(f"flexkd_output: must be prediction (the teacher's own) or label (the gold one), got "
                 f"{config.flexkd_output!r}")  # fmt: skip
    if config.template not in TEMPLATES:
        p.append(f"template: must be one of {', '.join(TEMPLATES)}, got {config.template!r}")
    if config.format not in INSTRUCT_FORMATS:
        p.append(f"format: must be one of {', '.join(INSTRUCT_FORMATS)}, got {config.format!r}")
    if config.max_prompt_length < 1 or (instruct and config.max_prompt_length >= config.max_length):
        p.append(
            f"max_prompt_length: must be at least 1 and below max_length ({config.max_length}) so a response "
            f"fits, got {config.max_prompt_length}"
        )
    if config.max_new_tokens < 1:
        p.append(f"max_new_tokens: must be at least 1, got {config.max_new_tokens}")
    if config.max_steps is None and config.epochs <= 0:
        p.append(f"epochs: must be > 0 (or give max_steps), got {config.epochs}")
    if config.max_steps is not None and config.max_steps < 1:
        p.append(f"max_steps: must be at least 1, got {config.max_steps}")
    if config.lr <= 0:
        p.append(f"lr: must be > 0, got {config.lr}")
    if config.weight_decay < 0:
        p.append(f"weight_decay: must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        p.append(f"warmup_ratio: must be in [0, 1), got {config.warmup_ratio}")
    if config.max_grad_norm <= 0:
        p.append(f"max_grad_norm: must be > 0, got {config.max_grad_norm}")
    for name in ("batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            p.append(f"{name}: must be at least 1, got {getattr(config, name)}")
    if config.save_minutes < 0:
        p.append(f"save_minutes: must be >= 0 (0 turns wall-clock checkpoints off), got {config.save_minutes}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "eval_generate"):
        value = getattr(config, name)
        if value is not None and value < 1:
            p.append(f"{name}: must be at least 1 step (or unset), got {value}")
    if not _DEVICE.match(str(config.device)):
        p.append(f"device: expected auto, cpu, cuda, cuda:N or mps, got {config.device!r}")
    if config.resume not in (None, "auto") and not Path(config.resume).exists():
        p.append(
            f"resume: checkpoint {config.resume!r} does not exist; pass 'auto' or a checkpoints/step-N directory"
        )
    return p


# ---------------------------------------------------------------------------------------------
# Resolution: defaults < YAML file < --set overrides < first-class flags
# ---------------------------------------------------------------------------------------------


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Convert a YAML/--set value to the field's type; raise GeokdError naming the source."""
    field = next(f for f in fields(RunConfig) if f.name == name)
    kind = str(field.type)
    if raw is None:
        if "None" in kind:
            return None
        raise GeokdError(f"{source}: {name} cannot be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = kind.split(" ")[0].replace("|", "")
        raise GeokdError(f"{source}: {name} expects {expected}, got {raw!r}") from None


def _check_key(name: str, source: str) -> None:
    if name not in _field_names():
        close = difflib.get_close_matches(name, _field_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_field_names())}"
        raise GeokdError(f"{source}: unknown key {name!r}{hint}")


def load_yaml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping of config keys (dashes or underscores); `what` names the file in errors
    (`--config`, or `study` for a study file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GeokdError(f"{what}: file {str(path)!r} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise GeokdError(f"{what}: {str(path)!r} is not valid YAML{line}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GeokdError(
            f"{what}: {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` (value parsed as YAML, so 0.5 is a float and true a bool)."""
    import yaml

    if "=" not in text:
        raise GeokdError(f"--set: expected key=value, got {text!r}; for example --set alpha=0.7")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def resolve_config(
    mode: str,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig from defaults, then the YAML file, then `--set` overrides, then flags that
    were given (None means "not given"). Unknown keys and type errors raise GeokdError; range
    checks are left to `validate()` so they can be reported together."""
    values: dict[str, Any] = {"mode": mode}
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        layers.append((f"--config {file}", load_yaml(file)))
    if overrides:
        layers.append(("--set", dict(parse_override(o) for o in overrides)))
    if flags:
        layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    for source, mapping in layers:
        for name, raw in mapping.items():
            _check_key(name, source)
            if name in FLAG_ONLY and source != "flag":
                if _coerce(name, raw, source) and not (flags or {}).get(name):
                    raise GeokdError(
                        f"{source}: asks for {name}={raw!r}, which lets the model's repository run code on this "
                        "machine; geokd takes it only from the command line: pass --trust-remote-code yourself "
                        "if you trust that code"
                    )
                continue
            values[name] = _coerce(name, raw, source)
    if values.get("task") == "instruct":
        for name, value in INSTRUCT_DEFAULTS.items():
            values.setdefault(name, value)
    return RunConfig(**values)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml

    from geokd.artifacts import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def read_config(path: str | Path) -> RunConfig:
    """Read a saved `config.yaml` back into a RunConfig (checked like any YAML config)."""
    data = load_yaml(path)
    return _from_mapping(str(data.pop("mode", "distill")), data, str(path))


def config_from_dict(data: dict[str, Any], source: str) -> RunConfig:
    """A RunConfig from a stored mapping (a checkpoint's record), checked like a YAML file."""
    data = dict(data)
    return _from_mapping(str(data.pop("mode", "distill")), data, source)


def _from_mapping(mode: str, data: dict[str, Any], source: str) -> RunConfig:
    values: dict[str, Any] = {"mode": mode}
    for name, raw in data.items():
        _check_key(name, source)
        values[name] = _coerce(name, raw, source)
    return RunConfig(**values)
