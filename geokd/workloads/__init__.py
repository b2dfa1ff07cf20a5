"""What a training run trains on, behind one interface: `Workload`.

The training loop (`geokd.engine`) owns everything every run shares: the run directory, the lock,
checkpoints and resume, the optimizer and schedule, gradient accumulation, signals, logging. A
workload owns what differs between model kinds, side by side instead of `if is_decoder` branches:

* `geokd.workloads.encoder`: encoders (BERT family) on GLUE or custom classification data, with
  logit KD and pooled/token feature rows, a live teacher or a teacher cache.
* `geokd.workloads.decoder`: causal LMs on instruction data (issue #11): response-token SFT,
  token-level KD, response-token feature rows, perplexity and ROUGE-L evaluation.

`build_workload(config, runtime, warn)` loads and checks everything (data, models, layer map,
cache) without writing anything, so the engine can validate all input before `--out` exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from geokd.config import RunConfig
from geokd.losses.objective import LossOutput
from geokd.runtime import Runtime


@dataclass
class Workload:
    """Everything the loop needs from one kind of model and data."""

    kind: str  # "encoder" or "decoder"
    task: str  # task name for results.json and final/geokd.json
    dev_split: str  # the split `evaluate` scores
    student: Any  # geokd.models.LoadedModel
    tokenizer: Any
    teacher_info: dict[str, Any] | None  # name, parameters, layers, hidden, source
    teacher_sha256: str | None  # checked on resume
    layer_pairs: list[tuple[int, int]]
    objective: nn.Module  # its parameters (projection heads) are optimised and checkpointed
    train_features: list[dict[str, Any]]
    dev_examples: int
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    data: dict[str, str]  # split -> fingerprint
    step: Callable[[dict[str, torch.Tensor]], LossOutput]  # one micro-batch, on the device
    size: Callable[[dict[str, torch.Tensor]], int]  # a micro-batch's weight: examples or tokens
    evaluate: Callable[[], dict[str, float]]  # dev metrics during training
    final_evaluate: Callable[[], tuple[dict[str, float], dict[str, dict[str, float]]]]  # + other splits
    # --loss flexkd: run the teacher over the given training examples and return each mapped
    # teacher layer's gradient statistics (geokd.flexkd); None where no live teacher can be scored
    score_flexkd: Callable[[list[int]], dict[int, Any]] | None = None
    teacher_model: Any = None  # the live teacher module (None: cached or feature-less), for --shard-teacher
    attention_note: list[str] = field(default_factory=list)  # attention losses: what is captured, per model
    warnings: list[str] = field(default_factory=list)
    extra_results: dict[str, Any] = field(default_factory=dict)  # e.g. generations written

    @property
    def data_fingerprint(self) -> str:
        return self.data["train"]


def teacher_summary(name: str | None, teacher: Any) -> dict[str, Any]:
    """What the run summary, env.json and the layer map need to know of a live teacher."""
    from geokd.models import count_parameters

    return {
        "name": name,
        "parameters": count_parameters(teacher.model),
        "layers": teacher.num_layers,
        "hidden": teacher.config.hidden_size,
        "source": teacher.source.to_dict(),
    }


def cached_teacher_summary(name: str | None, manifest: dict[str, Any], path: Any) -> dict[str, Any]:
    """`teacher_summary` of a teacher known only through a cache's manifest (encoder or decoder)."""
    return {
        "name": name or manifest["teacher"]["path_or_id"],
        "parameters": None,
        "layers": int(manifest["teacher_layers"]),
        "hidden": int(manifest["hidden_size"]),
        "source": {**manifest["teacher"], "cache": str(path)},
    }


def place_models(student: Any, teacher: Any | None, device: torch.device) -> None:
    """Student on the device in training mode; teacher (if any) on the device, in eval mode, frozen."""
    student.model.to(device).train()
    if teacher is not None:
        teacher.model.to(device).eval()
        for param in teacher.model.parameters():
            param.requires_grad_(False)


@dataclass
class AttentionSetup:
    """The attention losses' taps on both models (`geokd.models.attention`), the options of the
    loss module, and the run summary's lines about what is captured."""

    student: Any  # AttentionTap
    teacher: Any
    options: dict[str, Any]
    notes: list[str]


def attention_setup(config: RunConfig, student: nn.Module, teacher: nn.Module,
                    layer_pairs: list[tuple[int, int]], causal: bool) -> AttentionSetup | None:  # fmt: skip
    """Taps for `--loss attn|attn-relation` (None for every other loss), with the checks that can
    be made before training: mapped layers are blocks, equal head counts for `attn`, relation heads
    that divide both attention widths for `attn-relation`."""
    from geokd.errors import GeokdError
    from geokd.losses.attention import resolve_relation_heads
    from geokd.losses.registry import ATTENTION_LOSSES, FEATURE_LOSSES
    from geokd.models.attention import AttentionTap, attention_capture_note

    if config.loss not in ATTENTION_LOSSES or not layer_pairs:
        return None
    needs = FEATURE_LOSSES[config.loss].needs  # type: ignore[attr-defined]
    s_tap = AttentionTap(student, [s for s, _ in layer_pairs], needs, causal)
    t_tap = AttentionTap(teacher, [t for _, t in layer_pairs], needs, causal)
    if needs == "scores":
        if s_tap.heads != t_tap.heads:
            raise GeokdError(
                f"--loss attn: compares attention maps head by head and needs equal head counts, got student "
                f"{s_tap.heads} and teacher {t_tap.heads}; use --loss attn-relation (any head counts and widths)"
            )
        options: dict[str, Any] = {"map": config.attn_map}
    else:
        heads = resolve_relation_heads(config.relation_heads, s_tap.width, t_tap.width, t_tap.heads)
        options = {"heads": heads}
    notes = [attention_capture_note(needs, student, [s for s, _ in layer_pairs], "student"),
             attention_capture_note(needs, teacher, [t for _, t in layer_pairs], "teacher")]  # fmt: skip
    if needs == "qkv":
        notes.append(f"{options['heads']} relation heads: student {s_tap.width // options['heads']} and teacher "
                     f"{t_tap.width // options['heads']} dims each")  # fmt: skip
    else:
        notes.append(f"attention maps compared as {config.attn_map} ({s_tap.heads} heads)")
    return AttentionSetup(s_tap, t_tap, options, notes)


def build_workload(config: RunConfig, runtime: Runtime, warn: Callable[[str], None]) -> Workload:
    """The workload `config` asks for: decoders for `--task instruct`, encoders otherwise."""
    from geokd.tasks import is_instruct_task

    if config.task is not None and is_instruct_task(config.task):
        from geokd.workloads.decoder import decoder_workload

        return decoder_workload(config, runtime, warn)
    from geokd.workloads.encoder import encoder_workload

    return encoder_workload(config, runtime, warn)
