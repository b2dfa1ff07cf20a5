"""`--student prune:...`: a student cut out of the teacher by activation importance (Minitron:
Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv 2407.14679), next to `truncate` and `shrink` (issue #13).

    prune:hidden=H,heads=A,kv_heads=K,intermediate=F,layers=L,depth=skip|uniform   (any subset)

A calibration pass runs the teacher over `--prune-samples` training examples (non-padding tokens
only) and ranks, with forward hooks:

* **embedding channels** by their mean absolute activation at the output of every LayerNorm /
  RMSNorm of width H (summed over those norms);
* **attention heads** by the mean L2 norm of each head's output (the input of the attention output
  projection), per block; with grouped-query attention the key/value groups are ranked by the sum
  of their query heads and the K best groups are kept, each with its A/K best query heads (in the
  teacher's order, so query head j of the student still reads group j // (A/K));
* **MLP neurons** by their mean absolute activation (the input of the down projection), per block;
* **blocks** (`layers=L`): `depth=skip` (default) scores each block by the KL divergence between
  the teacher's output distribution and the output with that block skipped (replaced by the
  identity), and keeps the L highest; `depth=uniform` keeps the blocks `truncate:L` would.

The student is a standard model of the teacher's class with the smaller config (head width stays
the teacher's), holding the corresponding slices of the teacher's weights in the teacher's order:
embeddings, norms, attention projections, MLP, pooler/classifier or LM head. It saves and loads
with plain transformers. Pruning channels changes what LayerNorm/RMSNorm average over; like
Minitron, geokd does not rescale, and distillation recovers it. At full size every selection is
the identity and the student is the teacher.

Supported: BERT, RoBERTa (encoders); Llama, Qwen2, Qwen3, Mistral, GPT-2 (its fused Conv1D q/k/v
projection sliced per third) and OPT (causal LMs). Any other family is refused in one line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from geokd.errors import GeokdError

# Axis roles per parameter, by name suffix (first match wins): "hidden" (embedding channels), "q"
# (query heads x head width; keys and values of encoders too), "kv" (key/value groups), "ffn" (MLP
# neurons), None (kept whole).
_ENCODER_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", (None, "hidden")),
    (r"LayerNorm\.(weight|bias)$", ("hidden",)),
    (r"attention\.self\.(query|key|value)\.weight$", ("q", "hidden")),
    (r"attention\.self\.(query|key|value)\.bias$", ("q",)),
    (r"attention\.output\.dense\.weight$", ("hidden", "q")),
    (r"attention\.output\.dense\.bias$", ("hidden",)),
    (r"intermediate\.dense\.weight$", ("ffn", "hidden")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"output\.dense\.weight$", ("hidden", "ffn")),
    (r"output\.dense\.bias$", ("hidden",)),
    (r"pooler\.dense\.weight$", ("hidden", "hidden")),
    (r"pooler\.dense\.bias$", ("hidden",)),
    (r"classifier\.dense\.weight$", ("hidden", "hidden")),  # RoBERTa's head
    (r"classifier\.dense\.bias$", ("hidden",)),
    (r"classifier\.out_proj\.weight$", (None, "hidden")),
    (r"classifier\.out_proj\.bias$", (None,)),
    (r"classifier\.weight$", (None, "hidden")),
    (r"classifier\.bias$", (None,)),
]
_DECODER_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed_tokens\.weight$", (None, "hidden")),
    (r"lm_head\.weight$", (None, "hidden")),
    (r"(q_norm|k_norm)\.weight$", (None,)),  # Qwen3: over the head width, which stays
    (r"norm\.weight$", ("hidden",)),
    (r"q_proj\.weight$", ("q", "hidden")),
    (r"q_proj\.bias$", ("q",)),
    (r"(k_proj|v_proj)\.weight$", ("kv", "hidden")),
    (r"(k_proj|v_proj)\.bias$", ("kv",)),
    (r"o_proj\.weight$", ("hidden", "q")),
    (r"o_proj\.bias$", ("hidden",)),
    (r"(gate_proj|up_proj)\.weight$", ("ffn", "hidden")),
    (r"(gate_proj|up_proj)\.bias$", ("ffn",)),
    (r"down_proj\.weight$", ("hidden", "ffn")),
    (r"down_proj\.bias$", ("hidden",)),
]
# Conv1D weights are [in, out]: the roles are those of nn.Linear transposed. c_attn holds q, k and v
# side by side ("qkv": the kept heads in each third).
_GPT2_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(wte|wpe)\.weight$", (None, "hidden")),
    (r"lm_head\.weight$", (None, "hidden")),
    (r"ln_(1|2|f)\.(weight|bias)$", ("hidden",)),
    (r"c_attn\.weight$", ("hidden", "qkv")),
    (r"c_attn\.bias$", ("qkv",)),
    (r"attn\.c_proj\.weight$", ("q", "hidden")),
    (r"attn\.c_proj\.bias$", ("hidden",)),
    (r"c_fc\.weight$", ("hidden", "ffn")),
    (r"c_fc\.bias$", ("ffn",)),
    (r"mlp\.c_proj\.weight$", ("ffn", "hidden")),
    (r"mlp\.c_proj\.bias$", ("hidden",)),
]
_OPT_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(embed_tokens|embed_positions)\.weight$", (None, "hidden")),
    (r"lm_head\.weight$", (None, "hidden")),
    (r"project_in\.weight$", ("hidden", None)),
    (r"project_out\.weight$", (None, "hidden")),
    (r"layer_norm\.(weight|bias)$", ("hidden",)),
    (r"(q_proj|k_proj|v_proj)\.weight$", ("q", "hidden")),
    (r"(q_proj|k_proj|v_proj)\.bias$", ("q",)),
    (r"out_proj\.weight$", ("hidden", "q")),
    (r"out_proj\.bias$", ("hidden",)),
    (r"fc1\.weight$", ("ffn", "hidden")),
    (r"fc1\.bias$", ("ffn",)),
    (r"fc2\.weight$", ("hidden", "ffn")),
    (r"fc2\.bias$", ("hidden",)),
]


@dataclass(frozen=True)
class Family:
    """How one architecture is pruned: its slicing rules, the modules (inside a block) whose input
    is the heads' concatenated output and the MLP activation, whether its width is tied to heads x
    head width, whether it has key/value groups, and its config's feed-forward width name."""

    kind: str
    rules: list[tuple[str, tuple[str | None, ...]]]
    head_out: str
    ffn_out: str
    tied_width: bool
    grouped: bool
    intermediate: str = "intermediate_size"


_LLAMA = Family("decoder", _DECODER_RULES, "self_attn.o_proj", "mlp.down_proj", tied_width=False, grouped=True)
_BERT = Family("encoder", _ENCODER_RULES, "attention.output.dense", "output.dense", tied_width=True, grouped=False)
FAMILIES: dict[str, Family] = {
    "bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "mistral": _LLAMA,
    "gpt2": Family("decoder", _GPT2_RULES, "attn.c_proj", "mlp.c_proj", tied_width=True, grouped=False,
                   intermediate="n_inner"),
    "opt": Family("decoder", _OPT_RULES, "self_attn.out_proj", "fc2", tied_width=True, grouped=False,
                  intermediate="ffn_dim"),
}  # fmt: skip


def _family(config: Any) -> Family:
    model_type = getattr(config, "model_type", "?")
    if model_type not in FAMILIES:
        raise GeokdError(
            f"student: prune supports {', '.join(FAMILIES)}; the teacher is model_type {model_type!r}; use "
            "truncate:, shrink: or a pretrained student"
        )
    if getattr(config, "is_heterogeneous", False):
        raise GeokdError("student: prune does not re-index per-layer configs (per_layer_config); use a pretrained student")
    return FAMILIES[model_type]


def _ffn_width(config: Any, family: Family) -> int:
    value = getattr(config, family.intermediate, None)
    return int(value) if value else 4 * int(config.hidden_size)  # GPT-2: n_inner None means 4 x n_embd


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class Importance:
    """Calibration statistics of one teacher (float64 sums over valid tokens)."""

    def __init__(self, hidden: int, layers: int):
        self.channels = torch.zeros(hidden, dtype=torch.float64)
        self.heads: list[torch.Tensor | None] = [None] * layers
        self.neurons: list[torch.Tensor | None] = [None] * layers
        self.tokens = 0


def _add(store: list, index: int, value: torch.Tensor) -> None:
    store[index] = value if store[index] is None else store[index] + value


def calibrate(model: nn.Module, family: Family, batches: Iterable[dict[str, torch.Tensor]], *, head_dim: int,
              forward: Callable[[dict[str, torch.Tensor]], Any]) -> Importance:  # fmt: skip
    """Run `forward(batch)` on every batch with hooks that accumulate `Importance`."""
    from geokd.models.students import block_list

    _, blocks = block_list(model, family.kind)
    hidden = int(model.config.hidden_size)
    stats = Importance(hidden, len(blocks))
    mask: dict[str, torch.Tensor] = {}

    def valid(x: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [n, W] rows of non-padding tokens
        m = mask["m"]
        return x[m] if x.dim() == 3 and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])

    def on_norm(module, args, out):
        if isinstance(out, torch.Tensor) and out.shape[-1] == hidden:
            stats.channels.add_(valid(out.detach()).abs().double().sum(dim=0).cpu())

    def on_heads(index):
        def hook(module, args):
            rows = valid(args[0].detach()).double()
            norms = rows.reshape(rows.shape[0], -1, head_dim).norm(dim=-1).sum(dim=0)
            _add(stats.heads, index, norms.cpu())

        return hook

    def on_neurons(index):
        def hook(module, args):
            _add(stats.neurons, index, valid(args[0].detach()).abs().double().sum(dim=0).cpu())

        return hook

    handles = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.shape == (hidden,):
            handles.append(module.register_forward_hook(on_norm))
    for index, block in enumerate(blocks):
        handles.append(block.get_submodule(family.head_out).register_forward_pre_hook(on_heads(index)))
        handles.append(block.get_submodule(family.ffn_out).register_forward_pre_hook(on_neurons(index)))
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].bool()
                forward(batch)
                stats.tokens += int(mask["m"].sum())
    finally:
        for handle in handles:
            handle.remove()
    if stats.tokens == 0:
        raise GeokdError("student: prune's calibration pass saw no tokens; check --prune-samples and the data")
    return stats


def skip_importance(model: nn.Module, kind: str, batches: list[dict[str, torch.Tensor]],
                    logits: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> list[float]:  # fmt: skip
    """Per block: the mean KL(teacher output ‖ output with the block skipped), over the rows that
    `logits(batch)` returns ([n, C], already restricted to valid positions). Batch by batch, so
    only one batch's reference distribution is held (a decoder's is [n, V])."""
    from geokd.models.students import block_list

    _, blocks = block_list(model, kind)

    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    totals, rows = [0.0] * len(blocks), 0
    with torch.no_grad():
        for batch in batches:
            reference = torch.log_softmax(logits(batch).float(), dim=-1)
            for index, block in enumerate(blocks):
                handle = block.register_forward_hook(identity, with_kwargs=True)
                try:
                    skipped = torch.log_softmax(logits(batch).float(), dim=-1)
                finally:
                    handle.remove()
                totals[index] += float((reference.exp() * (reference - skipped)).sum(dtype=torch.float64))
            rows += reference.shape[0]
    return [total / max(1, rows) for total in totals]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest scores' indices (ties to the lower index), ascending."""
    order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _heads_per_block(spec: Any, config: Any, family: Family, stats: Importance, block: int) -> tuple[list[int], list[int]]:
    """(kept query heads in the teacher's order, kept key/value groups) of one teacher block."""
    heads_t = int(config.num_attention_heads)
    scores = stats.heads[block]
    assert scores is not None
    heads_s = spec.heads or heads_t
    if not family.grouped:
        kept = _top(scores, heads_s)
        return kept, kept
    kv_t = int(getattr(config, "num_key_value_heads", None) or heads_t)
    ratio = heads_t // kv_t
    kv_s = spec.kv_heads or max(1, heads_s // ratio)
    per_group = heads_s // kv_s
    group_scores = scores.reshape(kv_t, ratio).sum(dim=1)
    groups = _top(group_scores, kv_s)
    kept = []
    for g in groups:
        within = _top(scores[g * ratio : (g + 1) * ratio], per_group)
        kept += [g * ratio + h for h in within]
    return kept, groups


def _indices(role: str, block: int | None, channels: list[int], head_sel: dict, neuron_sel: dict, d: int,
             q_width: int) -> list[int]:  # fmt: skip
    """The teacher indices one axis of role `role` keeps (in block `block` for per-block roles);
    `q_width` is the teacher's heads x head width (the offset of k and v in a fused qkv axis)."""
    if role == "hidden":
        return channels
    assert block is not None, role
    if role == "ffn":
        return neuron_sel[block]
    units = head_sel[block][1 if role == "kv" else 0]
    rows = [u * d + r for u in units for r in range(d)]
    return [part * q_width + i for part in range(3) for i in rows] if role == "qkv" else rows


def check_prune_spec(spec: Any, config: Any) -> None:
    """Every problem of `spec` against the teacher's config, in one GeokdError line."""
    family = _family(config)
    hidden_t, heads_t = int(config.hidden_size), int(config.num_attention_heads)
    d = _head_dim(config)
    problems = []
    for key, value, limit in (("hidden", spec.hidden, hidden_t), ("heads", spec.heads, heads_t),
                              ("intermediate", spec.intermediate, _ffn_width(config, family)),
                              ("layers", spec.layers, int(config.num_hidden_layers))):  # fmt: skip
        if value is not None and value > limit:
            problems.append(f"{key}={value} exceeds the teacher's {limit}")
    if not family.grouped and spec.kv_heads is not None:
        problems.append(f"kv_heads applies to grouped-query models, not to {config.model_type}")
    if family.tied_width:
        hidden_s, heads_s = spec.hidden or hidden_t, spec.heads or heads_t
        if hidden_s % d:
            problems.append(f"{config.model_type} ties the width to heads x head width ({d}): hidden={hidden_s} is not a "
                            f"multiple of {d} (e.g. hidden={max(d, hidden_s // d * d)})")  # fmt: skip
        elif hidden_s != heads_s * d:
            problems.append(f"{config.model_type} ties the width to heads x head width ({d}): hidden={hidden_s} needs "
                            f"heads={hidden_s // d}, heads={heads_s} needs hidden={heads_s * d}")  # fmt: skip
    if family.grouped:
        kv_t = int(getattr(config, "num_key_value_heads", None) or heads_t)
        ratio = heads_t // kv_t
        heads_s = spec.heads or heads_t
        kv_s = spec.kv_heads or (heads_s // ratio if heads_s % ratio == 0 else None)
        if kv_s is None:
            problems.append(f"heads={heads_s} is not a multiple of the teacher's {ratio} query heads per key/value "
                            f"head; pass kv_heads=K too")  # fmt: skip
        elif kv_s > kv_t or heads_s % kv_s or heads_s // kv_s > ratio:
            problems.append(f"heads={heads_s} over kv_heads={kv_s} does not fit the teacher's {kv_t} key/value heads of "
                            f"{ratio} query heads each (kv_heads <= {kv_t}, heads = kv_heads x m with m <= {ratio})")  # fmt: skip
    if spec.depth not in (None, "skip", "uniform"):
        problems.append(f"depth must be skip or uniform, got {spec.depth!r}")
    if problems:
        raise GeokdError(f"student: {spec.text!r}: {'; '.join(problems)}")


def prune_student(spec: Any, teacher: Any, calibration: Callable[[], Iterable[dict[str, torch.Tensor]]] | None) -> Any:
    """Build the `prune:` student of `teacher` (a LoadedModel) from the batches `calibration()`
    yields; returns a LoadedStudent."""
    from geokd.models.students import block_list, copied_student, map_layer_config, truncate_blocks

    config_t = teacher.config
    check_prune_spec(spec, config_t)
    family = _family(config_t)
    kind = family.kind
    if calibration is None:
        raise GeokdError(f"student: {spec.text!r} needs calibration data; prune is built by distill, which has it")
    model = teacher.model
    d = _head_dim(config_t)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in calibration()]

    def run(batch):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return model(**inputs)

    was_training = model.training
    model.eval()
    try:
        stats = calibrate(model, family, batches, head_dim=d, forward=run)
        layers_t = int(config_t.num_hidden_layers)
        layers_s = spec.layers or layers_t
        if layers_s == layers_t:
            kept_blocks = tuple(range(layers_t))
        elif (spec.depth or "skip") == "uniform":
            kept_blocks = truncate_blocks(layers_t, layers_s)
        else:
            def logits(batch):
                out = run(batch).logits
                return out if out.dim() == 2 else out[batch["attention_mask"].bool()]

            depth_batches = batches[: max(1, len(batches) // 4)]  # a quarter of the calibration set
            scores = skip_importance(model, kind, depth_batches, logits)
            kept_blocks = tuple(_top(torch.tensor(scores), layers_s))
    finally:
        model.train(was_training)

    hidden_t, heads_t = int(config_t.hidden_size), int(config_t.num_attention_heads)
    channels = _top(stats.channels, spec.hidden or hidden_t)
    head_sel = {j: _heads_per_block(spec, config_t, family, stats, j) for j in kept_blocks}
    ffn_t = _ffn_width(config_t, family)
    neuron_sel = {j: _top(stats.neurons[j], spec.intermediate or ffn_t) for j in kept_blocks}  # type: ignore[arg-type]

    config = copy.deepcopy(config_t)
    config.hidden_size = len(channels)
    config.num_attention_heads = len(head_sel[kept_blocks[0]][0])
    setattr(config, family.intermediate, len(neuron_sel[kept_blocks[0]]))
    config.num_hidden_layers = len(kept_blocks)
    if family.grouped:
        config.head_dim = d
        config.num_key_value_heads = len(head_sel[kept_blocks[0]][1])
    if getattr(config, "word_embed_proj_dim", None) == hidden_t:  # OPT without project_in/out
        config.word_embed_proj_dim = len(channels)
    map_layer_config(config, kept_blocks, layers_t)
    with torch.random.fork_rng(devices=[]):
        student = type(model)(config)
    prefix, _ = block_list(model, kind)
    rules = family.rules
    teacher_state = model.state_dict()

    state = {}
    for key, target in student.state_dict().items():
        source_key, block = key, None
        if key.startswith(prefix + "."):
            index, tail = key[len(prefix) + 1 :].split(".", 1)
            block = kept_blocks[int(index)]
            source_key = f"{prefix}.{block}.{tail}"
        value = teacher_state[source_key]
        if value.shape != target.shape:
            roles = next((r for pattern, r in rules if re.search(pattern, key)), None)
            if roles is None or len(roles) != value.dim():
                raise RuntimeError(f"prune: no slicing rule for {key} {tuple(value.shape)} -> {tuple(target.shape)}")
            for axis, role in enumerate(roles):
                if role is None:
                    continue
                index_list = _indices(role, block, channels, head_sel, neuron_sel, d, heads_t * d)
                value = value.index_select(axis, torch.tensor(index_list, dtype=torch.long, device=value.device))
        if value.shape != target.shape:
            raise RuntimeError(f"prune: {key} sliced to {tuple(value.shape)}, the student needs {tuple(target.shape)}")
        state[key] = value
    student.load_state_dict(state, strict=True)
    return copied_student(student.to(device), teacher, spec, "prune", kept_blocks, tuple(channels))
