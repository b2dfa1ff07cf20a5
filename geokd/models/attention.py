"""Capturing what the attention losses (`geokd.losses.attention`) read, for the mapped blocks only.

`AttentionTap(model, layers, needs)` attaches to the attention modules of the blocks that `layers`
names (hidden-states indexing: layer i is the output of block i, so its attention is block i's;
layer 0, the embeddings, has none). Inside `with tap.recording() as captured:` a forward pass fills
`captured` with, per mapped block:

* `needs="qkv"` (`attn-relation`): the outputs of the attention's query, key and value projections,
  from forward hooks on the projection modules: BERT/RoBERTa/ELECTRA (`query`, `key`, `value`),
  DistilBERT (`q_lin`, `k_lin`, `v_lin`), Llama/Qwen/Mistral/Gemma/OPT (`q_proj`, `k_proj`,
  `v_proj`) and GPT-2's fused `c_attn` (split in three). Grouped-query key/value heads are repeated
  to the query heads, as the attention itself uses them.
* `needs="scores"` (`attn`): the query and key exactly as the model's attention kernel receives
  them (after rotary positions and any q/k norm) and its scaling, read by a pass-through wrapper
  around the model's registered attention function (transformers' `AttentionInterface`) for the
  duration of the forward. The kernel is not switched: sdpa (or flash, or eager) still computes the
  output, and the loss recomputes the mapped layers' scores from the captured tensors.

Nothing is kept for unmapped blocks, nothing is recorded outside `recording()` (evaluation,
activation-checkpoint recomputation), and the captured tensors live only until the loss is built.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from geokd.errors import GeokdError
from geokd.losses.attention import AttentionRows
from geokd.models.students import block_list

# (attribute names of the query, key and value projections) inside an attention module
_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
_FUSED = "c_attn"  # GPT-2: one Conv1D producing [q | k | v]


def _find_attention(block: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """(the attention module inside a transformer block, its projection attribute names)."""
    for _, module in block.named_modules():
        for names in _PROJECTIONS:
            if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                return module, names
        if isinstance(getattr(module, _FUSED, None), nn.Module):
            return module, (_FUSED,)
    raise GeokdError(
        f"attention losses: no query/key/value projections found in {type(block).__name__} (looked for "
        "query/key/value, q_proj/k_proj/v_proj, q_lin/k_lin/v_lin and GPT-2's c_attn); use a feature loss"
    )


def head_counts(model: nn.Module) -> tuple[int, int]:
    """(attention heads, key/value heads) from the model's config."""
    config = model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.n_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads, kv_heads


class AttentionTap:
    """Records the attention inputs of the blocks behind `layers` (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], needs: str, causal: bool):
        if needs not in ("qkv", "scores"):
            raise ValueError(f"needs must be qkv or scores, got {needs!r}")
        _, blocks = block_list(model)
        bad = [layer for layer in layers if not 1 <= layer <= len(blocks)]
        if bad:
            raise GeokdError(
                f"layers: attention losses map transformer blocks, layers 1..{len(blocks)} (layer i is block i's "
                f"attention); got {bad[0]}{' (the embeddings have no attention)' if bad[0] == 0 else ''}"
            )
        self.model, self.needs, self.causal = model, needs, causal
        self.layers = sorted(set(layers))
        self.heads, self.kv_heads = head_counts(model)
        self._recording = False
        self._captured: dict[int, Any] = {}
        self._by_module: dict[int, int] = {}  # id(attention module) -> layer
        self._handles = []
        self.width = 0  # the query projection's width, H·d_head (known after the first capture)
        for layer in self.layers:
            attention, names = _find_attention(blocks[layer - 1])
            self._by_module[id(attention)] = layer
            if needs == "qkv":
                if names == (_FUSED,):
                    self._handles.append(getattr(attention, _FUSED).register_forward_hook(self._fused_hook(layer)))
                else:
                    for role, name in zip("qkv", names, strict=True):
                        hook = self._projection_hook(layer, role)
                        self._handles.append(getattr(attention, name).register_forward_hook(hook))
                weight = getattr(attention, names[0]).weight
                # nn.Linear stores [out, in]; GPT-2's Conv1D [in, out] with out = 3 × width
                self.width = int(weight.shape[1] // 3 if names == (_FUSED,) else weight.shape[0])

    def _projection_hook(self, layer: int, role: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._recording:
                self._captured.setdefault(layer, {})[role] = output

        return hook

    def _fused_hook(self, layer: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._recording:
                q, k, v = output.split(output.shape[-1] // 3, dim=-1)
                self._captured[layer] = {"q": q, "k": k, "v": v}

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def recording(self) -> Iterator[dict[int, Any]]:
        """Capture during one forward pass; yields the dict that fills (layer -> tensors)."""
        self._captured = {}
        self._recording = True
        try:
            if self.needs == "scores":
                with _intercept_attention(self.model, self._capture_scores):
                    yield self._captured
            else:
                yield self._captured
        finally:
            self._recording = False

    def _capture_scores(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: Any) -> None:
        layer = self._by_module.get(id(module))
        if layer is not None and self._recording:
            self._captured[layer] = {"q": query, "k": key, "scaling": scaling}

    def rows(self, captured: dict[int, Any], layers: Sequence[int], query_mask: torch.Tensor,
             key_mask: torch.Tensor) -> list[AttentionRows]:  # fmt: skip
        """The losses' inputs for `layers` (in order, repeats allowed) from one recording."""
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise GeokdError(
                f"attention losses: block {missing[0]}'s attention was not captured ({type(self.model).__name__}, "
                f"attn_implementation {getattr(self.model.config, '_attn_implementation', None)!r}); this model's "
                "attention bypasses the projections or the attention interface geokd taps; use a feature loss"
            )
        out = []
        for layer in layers:
            got = captured[layer]
            if self.needs == "scores":
                scaling = got["scaling"]
                out.append(AttentionRows("scores", got["q"], got["k"], query_mask, key_mask, self.causal,
                                         scaling=float(scaling) if scaling is not None else None))  # fmt: skip
                continue
            q, k, v = got["q"], got["k"], got["v"]
            if self.kv_heads != self.heads and k.shape[-1] != q.shape[-1]:
                k, v = self._repeat_kv(k), self._repeat_kv(v)
            out.append(AttentionRows("qkv", q, k, query_mask, key_mask, self.causal, value=v))
        return out

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        head_dim = width // self.kv_heads
        grouped = x.view(b, t, self.kv_heads, head_dim).repeat_interleave(self.heads // self.kv_heads, dim=2)
        return grouped.reshape(b, t, self.heads * head_dim)


@contextmanager
def _intercept_attention(model: nn.Module, capture) -> Iterator[None]:  # noqa: ANN001
    """Wrap the model's registered attention function so that `capture(module, query, key,
    scaling)` sees every call, then the original runs unchanged. Restored on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(model.config, "_attn_implementation", None) or "eager"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_local, previous = name in local, local.get(name)
    original = None if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):  # noqa: ANN001, ANN202
        capture(module, query, key, kwargs.get("scaling", args[0] if args else None))
        # "eager" is each modeling file's own function (the default the model passes in)
        function = original or sys.modules[type(module).__module__].eager_attention_forward
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    local[name] = wrapper
    try:
        yield
    finally:
        if had_local:
            local[name] = previous
        else:
            local.pop(name, None)


def attention_capture_note(needs: str, model: nn.Module, layers: Sequence[int], role: str) -> str:
    """One line for the run summary: what is captured and that the attention kernel is unchanged."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    blocks = ", ".join(str(layer) for layer in sorted(set(layers)))
    if needs == "qkv":
        return f"{role}: query/key/value projection outputs of blocks {blocks} (forward hooks); attention kernel {impl} unchanged"
    return (f"{role}: query/key as the {impl} attention kernel reads them, blocks {blocks}; scores recomputed for "
            "those blocks only, the kernel is not switched to eager")  # fmt: skip
