"""Causal language models (decoders): loading from a folder, a Hugging Face id, an alias or a GGUF
file (`load_causal_lm`), students built from a causal-LM teacher (`DecoderStudents`, used by
`load_student`), the same-tokenizer check for token-level KD (`check_same_tokenizer`), the output
head (`output_head`) and the response-token feature rows (`decoder_features`).

Rules (tested in tests/unit/test_decoder_models.py):

* **Loading** follows the encoder rules (names, offline hub, safetensors only, one GeokdError line
  per failure, provenance) with `AutoModelForCausalLM`. A `.gguf` file (or the `smollm2` alias) is
  de-quantised by transformers (`gguf_file=`, `GgufConfig(dequantize=True)`, so the model is a plain
  float32 model that trains and saves, even where a GGUF matmul kernel is installed); its tokenizer
  comes from the same file; it needs the `gguf` and `accelerate` packages. Every weight the model
  needs must come from the checkpoint (tied output heads are not stored and count as present).
  A tokenizer without a pad token gets its eos token as pad token (noted in `warnings`).
* **One copy of the weights.** transformers 5 builds the model on the meta device (no random
  initialisation) and then assigns the checkpoint's tensors to it: a safetensors file is memory-
  mapped and each tensor is materialised once in `dtype`; a GGUF file is de-quantised tensor by
  tensor into a state dict whose tensors become the parameters without a copy (measured: the
  resident size does not grow between the de-quantised state dict and the loaded model). geokd
  never holds a second reference: no state dict is kept, nothing is deep-copied or cast afterwards
  (pass the wanted `dtype` here, not `.to()` later).
* **Block lists** (`geokd.models.students.BLOCK_LISTS`): `model.layers` (Llama, Qwen2, Qwen3,
  Mistral), `transformer.h` (GPT-2), `model.decoder.layers` (OPT).
* **`truncate:N`** keeps the embeddings, the final norm and the output head and N blocks chosen by
  the `uniform` rule; `num_hidden_layers`, `layer_types` / `no_rope_layers` and Qwen's
  `max_window_layers` follow the kept blocks. Tied embeddings stay tied.
* **`shrink:layers=L,hidden=H,heads=A[,kv_heads=K][,intermediate=I]`** is a random model of the
  teacher's config class. K defaults to A divided by the teacher's grouped-query ratio (query
  heads per key/value head), so the ratio is kept; I defaults to the teacher's I·H/H_t (rounded),
  GPT-2 keeps its 4·H. Tied embeddings, vocabulary, positions and special token ids are the
  teacher's; per-layer settings come from the teacher layer the `uniform` map pairs each student
  layer with. Head counts that cannot work (H not divisible by A, A not divisible by the ratio, an
  odd rotary head width) are one line naming the numbers and the head counts that work.
* **Same tokenizer.** Token-level KD compares next-token distributions id by id, so
  `check_same_tokenizer` requires the same token -> id map, the same special tokens and the same
  split of a probe text. Output heads may be larger than the tokenizer (padding rows); the shared
  vocabulary is the tokenizer's ids 0..V-1 and V is returned: slice both models' logits to it.
* **Output head.** `output_head(model)(hidden_states[-1])` equals the model's logits for every
  supported family: in transformers 5 `hidden_states[-1]` is the final hidden state after the final
  norm (and after OPT's `project_out`, so with OPT-350m's `word_embed_proj_dim` it is narrower than
  the other layers). Families that change the logits after the head (Gemma 2's logit softcapping,
  Cohere's logit_scale, Granite's logits_scaling) are refused with one line.
* **Rows** (`decoder_features`): `tokens` = the response tokens' hidden states, flattened;
  `mean` = their mean per example (float32); `last` = the last prompt token, the position just
  before the first response token (the state that predicts the response's first token). Prompt
  and padding positions never enter `tokens`/`mean` rows.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from geokd.errors import GeokdError
from geokd.models.features import extract_features, uniform_layer
from geokd.models.loading import (
    SMOLLM2_INSTALL,
    LoadedModel,
    LoadedStudent,
    _check_weights,
    _finder,
    _load_error,
    _load_tokenizer,
    _locate,
    _package_attr,
    _source,
    _weights_files,
)
from geokd.models.students import ModelKind, StudentBuilder, StudentSpec, map_layer_config

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Row layouts of `decoder_features`.
DECODER_FEATURES = ("tokens", "mean", "last")
# Config entries that change the logits after the output head, with their neutral value.
_LOGIT_TRANSFORMS: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3: cap·tanh(logits/cap)
    "logit_scale": 1.0,  # Cohere: logits·scale
    "logits_scaling": 1.0,  # Granite: logits/scaling
}
# Feed-forward width names of the causal-LM configs (Llama/Qwen/Mistral, OPT, GPT-2).
_INTERMEDIATE_NAMES = ("intermediate_size", "ffn_dim", "n_inner")
# Text that both tokenizers must split identically (ASCII, digits, punctuation, whitespace runs,
# the MiniLLM template's markers and a few non-ASCII characters).
_PROBE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nList 3 prime numbers, e.g. 2, 3 & 5!\n\n### Response:\n  Café: naïve — 東京 🙂"
)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _require_gguf_packages(shown: str, target: str) -> None:
    """The packages transformers needs to read a GGUF file, or one GeokdError line naming them."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        smollm2 = _package_attr("_smollm2_file")()
        fix = (
            SMOLLM2_INSTALL
            if smollm2 is not None and Path(target) == smollm2
            else "pip install gguf accelerate"
        )
        raise GeokdError(
            f"model: {shown} is a GGUF file and reading it needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}, which {'are' if len(missing) > 1 else 'is'} not installed; {fix}"
        )


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """Silence the tqdm bars of transformers' GGUF reader for the block (it imports tqdm itself, and
    tqdm reads TQDM_DISABLE only at import, so the reader's own reference is swapped)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_causal_lm(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> LoadedModel:
    """Load a causal language model and its tokenizer: a local directory, a Hugging Face id (from
    the local cache only under HF_HUB_OFFLINE=1; `revision` applies to ids), an alias (`smollm2`)
    or a `.gguf` file. Weights load in `dtype` (float32 by default), the model in eval mode, with
    provenance (`ModelSource`: path or id, commit, SHA-256 of the weights or of the GGUF file).
    Every failure is one GeokdError line (see the module docstring)."""
    # transformers reads a GGUF file several times (config, tokenizer, weights), each pass with
    # its own tqdm bar, even in logs: geokd prints its own summary instead.
    with _no_tqdm():
        return _load_causal_lm(name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                               hash_weights=hash_weights)  # fmt: skip


def is_encoder_model(name: str, *, trust_remote_code: bool = False) -> bool:
    """Whether `name` (alias, folder, Hub id; never a .gguf) names an encoder such as BERT or
    MiniLM rather than a causal LM: its config's family has a masked-LM head in transformers and
    its architectures are not causal LMs. Anything unreadable counts as "not an encoder" (the
    causal-LM loader then reports it in one line)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        target, kind = _locate(name, gguf=True)
        if kind == "gguf":
            return False
        config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - any failure: let the real loader say what is wrong
        return False
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not causal


def _load_causal_lm(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    target, kind = _locate(name, gguf=True)
    shown = repr(name) if name == target else f"{name!r} ({target!r})"
    if kind == "gguf":
        _require_gguf_packages(shown, target)
        from transformers import GgufConfig

        root = str(Path(target).parent)
        where: dict[str, Any] = {"gguf_file": Path(target).name}
        hub: dict[str, Any] = {}
    else:
        root = target
        hub = {"revision": revision} if kind == "hub" and revision is not None else {}
        where = dict(hub)
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code, **where)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error(name, target, kind, "config", exc, trust_remote_code) from exc
    if getattr(config, "is_encoder_decoder", False):
        raise GeokdError(
            f"model: {shown} is an encoder-decoder model ({config.model_type}); geokd's decoder path takes "
            "decoder-only causal LMs (Llama, Qwen2/3, Mistral, GPT-2, OPT)"
        )
    tokenizer = _load_tokenizer(name, target, kind, config, trust_remote_code, hub)
    warnings: tuple[str, ...] = ()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        warnings += (
            f"model: the tokenizer of {name!r} has no pad token; using its eos token {tokenizer.eos_token!r}",
        )
    if kind == "gguf":
        load: dict[str, Any] = {
            "gguf_file": Path(target).name,
            "quantization_config": GgufConfig(dequantize=True),
        }
    else:
        find = _finder(target, kind, revision)
        _check_weights(shown, find, local=kind == "local", auto_class="AutoModelForCausalLM")
        load = {"use_safetensors": True, "weights_only": True, **hub}  # never a pickled .bin
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            root,
            config=config,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            ignore_mismatched_sizes=True,  # reported and refused below, in one line
            output_loading_info=True,
            **load,
        )
    except SafetensorError as exc:  # damage the structural check cannot see
        files = ", ".join(repr(str(f)) for f in _weights_files(_finder(target, kind, revision))) or shown
        detail = " ".join(str(exc).split())[:200]
        raise GeokdError(
            f"model: the safetensors weights {files} could not be read ({detail}); the file is damaged: copy or "
            "download it again, or re-create it with save_pretrained"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, IndexError) as exc:
        if kind == "gguf":
            detail = " ".join(str(exc).split())[:200]
            raise GeokdError(
                f"model: could not read the GGUF file {shown} ({type(exc).__name__}: {detail}); check that it is a "
                "complete GGUF file of an architecture transformers supports (llama, qwen2, qwen3, mistral, gpt2, ...)"
            ) from None
        raise _load_error(name, target, kind, "weights", exc, trust_remote_code) from exc
    missing = sorted(set(info.get("missing_keys", ())))
    reshaped = sorted(
        f"{key} {list(old)} -> {list(new)}" for key, old, new in info.get("mismatched_keys", ())
    )
    if missing or reshaped:
        problems = missing + reshaped
        listed = ", ".join(problems[:3]) + (", ..." if len(problems) > 3 else "")
        raise GeokdError(
            f"model: the checkpoint of {shown} lacks {len(missing)} weight(s) and has {len(reshaped)} of another shape "
            f"than the {type(model).__name__} needs ({listed}); pass the complete model folder of a causal LM"
        )
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        source=_source(name, target, kind, revision, hash_weights),
        warnings=warnings,
    )


# --------------------------------------------------------------------------------------------
# Output head and the shared vocabulary
# --------------------------------------------------------------------------------------------


def output_head(model: nn.Module) -> nn.Linear:
    """The output head (`get_output_embeddings()`, an `nn.Linear` from the final hidden state to
    the vocabulary), such that `output_head(model)(hidden_states[-1])` equals the model's logits.
    One GeokdError line for a model without such a head or one that changes its logits after it."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise GeokdError(
            f"model: {type(model).__name__} has no nn.Linear output head (get_output_embeddings() gives "
            f"{type(head).__name__}); token-level KD needs a causal LM whose logits are head(final hidden state)"
        )
    config = getattr(model, "config", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise GeokdError(
                f"model: {type(model).__name__} changes its logits after the output head ({name}={value}), so "
                "head(final hidden state) is not its logits; geokd's token-level KD does not support this family yet"
            )
    return head


def vocab_rows(model: nn.Module) -> int:
    """The number of logits the model produces per position (its output head's rows)."""
    return int(output_head(model).out_features)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, str | None]:
    named = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    return {name: None if value is None else str(value) for name, value in named.items()}


def _first_vocab_difference(teacher: dict[str, int], student: dict[str, int]) -> str:
    """The first id (in id order) whose token differs, in words."""
    t_by_id = {i: token for token, i in teacher.items()}
    s_by_id = {i: token for token, i in student.items()}
    for i in sorted(set(t_by_id) | set(s_by_id)):
        a, b = t_by_id.get(i), s_by_id.get(i)
        if a == b:
            continue
        if a is not None and b is not None:
            where = f"has {a!r} at id {student[a]}" if a in student else f"has no {a!r}"
            return f"id {i} is {a!r} in the teacher but {b!r} in the student (which {where})"
        if a is not None:
            where = f" (the student has it at id {student[a]})" if a in student else ""
            return f"id {i} is {a!r} in the teacher and absent from the student{where}"
        assert b is not None
        where = f" (the teacher has it at id {teacher[b]})" if b in teacher else ""
        return f"id {i} is {b!r} in the student and absent from the teacher{where}"
    return "the same tokens under different ids"  # pragma: no cover - equal maps never get here


def check_same_tokenizer(teacher: LoadedModel, student: LoadedModel) -> int:
    """Check that teacher and student tokenise alike, which token-level KD and token features
    need, and return the shared vocabulary size V (the tokenizer's ids 0..V-1; slice both models'
    logits to `[..., :V]`). Output heads larger than the tokenizer (padding rows, e.g. 49,280 rows
    for 49,152 tokens) are accepted. A different token -> id map, different special tokens or a
    different split of a probe text is one GeokdError line naming the first difference."""
    t_tok, s_tok = teacher.tokenizer, student.tokenizer
    t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
    fix = (
        "token-level KD needs the teacher's tokenizer: pick a student with the teacher's tokenizer, "
        "or use truncate:N / shrink:..."
    )
    if t_vocab != s_vocab:
        raise GeokdError(
            f"tokenizer: the teacher and the student have different vocabularies ({len(t_vocab)} vs "
            f"{len(s_vocab)} tokens): {_first_vocab_difference(t_vocab, s_vocab)}; {fix}"
        )
    t_special, s_special = _special_tokens(t_tok), _special_tokens(s_tok)
    for name in t_special:
        if t_special[name] != s_special[name]:
            raise GeokdError(
                f"tokenizer: the {name.replace('_', ' ')} is {t_special[name]!r} in the teacher but "
                f"{s_special[name]!r} in the student; {fix}"
            )
    extra = sorted(set(map(str, t_tok.all_special_tokens)) ^ set(map(str, s_tok.all_special_tokens)))
    if extra:
        owner = "teacher" if extra[0] in map(str, t_tok.all_special_tokens) else "student"
        raise GeokdError(f"tokenizer: {extra[0]!r} is a special token of the {owner} only; {fix}")
    t_ids, s_ids = t_tok(_PROBE)["input_ids"], s_tok(_PROBE)["input_ids"]
    if t_ids != s_ids:
        k = next(
            (i for i, (a, b) in enumerate(zip(t_ids, s_ids, strict=False)) if a != b),
            min(len(t_ids), len(s_ids)),
        )
        shown_t = t_ids[k] if k < len(t_ids) else "the end"
        shown_s = s_ids[k] if k < len(s_ids) else "the end"
        raise GeokdError(
            f"tokenizer: the teacher and the student split the same text differently (token {k} is {shown_t} in "
            f"the teacher but {shown_s} in the student: other merges, normalisation or added bos/eos); {fix}"
        )
    shared = max(t_vocab.values()) + 1
    for who, loaded in (("teacher", teacher), ("student", student)):
        rows = vocab_rows(loaded.model)
        if rows < shared:
            raise GeokdError(
                f"tokenizer: the {who}'s output head has {rows} rows but its tokenizer has ids up to {shared - 1}; "
                "pass a model whose tokenizer and weights belong together"
            )
    return shared


# --------------------------------------------------------------------------------------------
# Feature rows
# --------------------------------------------------------------------------------------------


def decoder_features(
    hidden_states: Sequence[torch.Tensor],
    response_mask: torch.Tensor,
    layers: Sequence[int],
    features: str,
    *,
    attention_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Rows for the feature losses of a causal LM: one tensor per entry of `layers`, in order.

    `hidden_states`: the L + 1 tensors `[B, T, d]` of `output_hidden_states=True`;
    `response_mask` `[B, T]`: 1 at response tokens, 0 at prompt and padding positions (left or
    right padding). `features`:

    * `tokens`: every response token, `[N_response, d]`, example by example in position order;
    * `mean`: the mean over each example's response tokens, `[B, d]` in float32 (a zero row for an
      example without response tokens);
    * `last`: the last prompt token, the position just before each example's first response token,
      `[B, d]`; every example needs a response token with a prompt token before it (and, when
      `attention_mask` is given, that position must not be padding).

    Positions outside the response never enter `tokens`/`mean` rows (masked with `where`, so even
    NaN there is harmless). A `response_mask` that marks padding (per `attention_mask`) is refused.
    """
    if features not in DECODER_FEATURES:
        raise GeokdError(
            f"features: must be one of {', '.join(DECODER_FEATURES)} for a causal LM, got {features!r}"
        )
    mask = response_mask.to(torch.bool)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(mask.shape):
            raise GeokdError(
                f"features: attention_mask has shape {tuple(attention_mask.shape)}, response_mask {tuple(mask.shape)}"
            )
        if bool((mask & ~attention_mask.to(torch.bool)).any()):
            raise GeokdError(
                "features: the response mask marks padding positions; build it from non-padding tokens only"
            )
    if features != "last":
        return extract_features(hidden_states, mask, layers, features)
    bad = [layer for layer in layers if not 0 <= layer < len(hidden_states)]
    if bad:
        raise GeokdError(
            f"layers: layer index {bad[0]} is out of range 0..{len(hidden_states) - 1} for a model with "
            f"{len(hidden_states) - 1} blocks; check the layer map"
        )
    if not layers:
        return []
    shape = tuple(hidden_states[layers[0]].shape[:2])
    if tuple(mask.shape) != shape:
        raise GeokdError(
            f"features: response_mask has shape {tuple(mask.shape)}, hidden states {shape} [B, T]"
        )
    has_response = mask.any(dim=1)
    if not bool(has_response.all()):
        example = int((~has_response).nonzero()[0, 0])
        raise GeokdError(
            f"features: example {example} of the batch has no response token, so it has no last prompt token "
            "before a response; drop examples without a response or use features=mean"
        )
    first = mask.to(torch.int8).argmax(dim=1)  # [B] the first response position
    if bool((first == 0).any()):
        example = int((first == 0).nonzero()[0, 0])
        raise GeokdError(
            f"features: the response of example {example} starts at position 0, so there is no prompt token "
            "before it; every example needs a prompt"
        )
    position = first - 1  # [B]
    if attention_mask is not None:
        rows_mask = attention_mask.to(torch.bool)[torch.arange(len(position)), position]
        if not bool(rows_mask.all()):
            example = int((~rows_mask).nonzero()[0, 0])
            raise GeokdError(
                f"features: the position before the response of example {example} is padding; pad on the left of "
                "the prompt or on the right of the response, never between them"
            )
    index = torch.arange(len(position), device=position.device)
    rows: dict[int, torch.Tensor] = {}
    for layer in layers:
        if layer not in rows:
            rows[layer] = hidden_states[layer][index, position.to(hidden_states[layer].device)]  # [B, d]
    return [rows[layer] for layer in layers]


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


def _uses_rope(config: PretrainedConfig) -> bool:
    return (
        getattr(config, "rope_parameters", None) is not None
        or getattr(config, "rope_theta", None) is not None
    )


class DecoderStudents(StudentBuilder):
    """Students of a causal-LM teacher: truncate (shared), shrink that keeps the grouped-query ratio
    and tied embeddings, and pretrained causal LMs checked with `check_same_tokenizer`."""

    kind: ClassVar[ModelKind] = "decoder"

    def shrink_config(self, spec: StudentSpec, teacher: LoadedModel) -> PretrainedConfig:
        assert spec.layers is not None and spec.hidden is not None and spec.heads is not None
        config = copy.deepcopy(teacher.config)
        hidden, heads, layers = spec.hidden, spec.heads, spec.layers
        teacher_hidden, teacher_heads = int(config.hidden_size), int(config.num_attention_heads)
        teacher_layers = int(config.num_hidden_layers)
        grouped = "num_key_value_heads" in config.to_dict() or hasattr(config, "num_key_value_heads")
        teacher_kv = getattr(config, "num_key_value_heads", None) or teacher_heads
        ratio = teacher_heads // teacher_kv if grouped and teacher_heads % teacher_kv == 0 else 1
        even = _uses_rope(config)  # rotary embeddings rotate pairs of dimensions

        def works(a: int) -> bool:
            return hidden % a == 0 and a % ratio == 0 and (not even or (hidden // a) % 2 == 0)

        valid = [a for a in range(1, hidden + 1) if works(a)]
        problems = []
        if spec.kv_heads is not None and not grouped:
            problems.append(
                f"kv_heads={spec.kv_heads} does not apply: {config.model_type} has no grouped-query attention"
            )
        if spec.kv_heads is None and heads % ratio:
            problems.append(
                f"heads={heads} is not divisible by the teacher's grouped-query ratio {ratio} "
                f"({teacher_heads} query heads / {teacher_kv} key-value heads)"
            )
        if even and hidden % heads == 0 and (hidden // heads) % 2:
            problems.append(
                f"hidden={hidden} / heads={heads} gives an odd head width {hidden // heads} (rotary needs even)"
            )
        if problems:
            near = sorted(valid, key=lambda a: (abs(a - heads), a))[:3]
            choice = (
                f"for hidden={hidden} choose heads from {', '.join(map(str, sorted(near)))}"
                if near
                else f"no head count works with hidden={hidden}; choose hidden as a multiple of {2 * ratio if even else ratio}"
            )
            raise GeokdError(f"student: {spec.text!r}: {'; '.join(problems)}; {choice}")
        kv_heads = spec.kv_heads if spec.kv_heads is not None else heads // ratio
        config.num_hidden_layers = layers
        config.hidden_size = hidden
        config.num_attention_heads = heads
        if grouped:
            config.num_key_value_heads = kv_heads
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = hidden // heads
        name = next((n for n in _INTERMEDIATE_NAMES if n in config.to_dict()), None)
        if spec.intermediate is not None:
            if name is None:
                raise GeokdError(
                    f"student: {spec.text!r}: geokd does not know the feed-forward width of {config.model_type} "
                    f"(none of {', '.join(_INTERMEDIATE_NAMES)}); leave intermediate out"
                )
            setattr(config, name, spec.intermediate)
        elif name is not None and isinstance(getattr(config, name), int):
            setattr(config, name, max(1, round(getattr(config, name) * hidden / teacher_hidden)))
        # (GPT-2's n_inner=None means 4·n_embd and stays None.)
        if getattr(config, "word_embed_proj_dim", None) == teacher_hidden:  # OPT without project_in/out
            config.word_embed_proj_dim = hidden
        mapping = [uniform_layer(i, layers, teacher_layers) - 1 for i in range(1, layers + 1)]
        map_layer_config(config, mapping, teacher_layers)
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
        loaded = load_causal_lm(
            spec.name,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            hash_weights=hash_weights,
        )
        if not allow_different_tokenizer:
            check_same_tokenizer(teacher, loaded)
        return LoadedStudent(**vars(loaded), init="pretrained", spec=spec.text)
