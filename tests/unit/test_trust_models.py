"""Trustworthy model loading (issue #10): damaged safetensors files and pickled checkpoints are one
line naming the file, and a teacher whose head lists the task's labels in another order is put in
the task's order before it teaches (or is copied into a `truncate:` student).

Every model is a tiny random BERT / RoBERTa saved with `save_pretrained` next to a 100-word
tokenizer, loaded back offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from geokd import GeokdError
from geokd import models as M
from geokd.models import load_model, load_student, load_teacher

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(95)]
SENTENCES = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14"]
MNLI = {0: "entailment", 1: "neutral", 2: "contradiction"}  # geokd's task order
NLI_MODEL = {0: "contradiction", 1: "neutral", 2: "entailment"}  # a common checkpoint order


def _tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL + WORDS)})


def _config(**overrides) -> BertConfig:
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    return BertConfig(**{**sizes, **overrides})


def _save(folder: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _with_labels(model: torch.nn.Module, id2label: dict[int, str]) -> torch.nn.Module:
    model.config.id2label = dict(id2label)
    model.config.label2id = {name: i for i, name in id2label.items()}
    return model


def _permuted(model: torch.nn.Module, head: torch.nn.Linear, order: list[int], id2label) -> torch.nn.Module:
    """The same function with output i = the original output order[i]."""
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        head.bias.copy_(head.bias[order].clone())
    return _with_labels(model, id2label)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """BERT teachers with MNLI heads: in the task's order, the same function in the usual NLI
    checkpoint order, with generic names, with foreign names; a RoBERTa pair (head in
    classifier.out_proj); a RoBERTa whose width equals its label count (head not unambiguous)."""
    root = tmp_path_factory.mktemp("trust-models")
    torch.manual_seed(0)
    ordered = _with_labels(BertForSequenceClassification(_config()), MNLI)
    folders = {"ordered": _save(root / "ordered", ordered)}
    swap = [2, 1, 0]  # NLI_MODEL[i] == MNLI[swap[i]]
    other = BertForSequenceClassification.from_pretrained(folders["ordered"])
    folders["permuted"] = _save(root / "permuted", _permuted(other, other.classifier, swap, NLI_MODEL))
    generic = BertForSequenceClassification.from_pretrained(folders["ordered"])
    folders["generic"] = _save(root / "generic", _with_labels(generic, {i: f"LABEL_{i}" for i in range(3)}))
    foreign = BertForSequenceClassification.from_pretrained(folders["ordered"])
    folders["foreign"] = _save(root / "foreign", _with_labels(foreign, {0: "yes", 1: "maybe", 2: "no"}))
    roberta = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=66, num_labels=3)  # fmt: skip
    rob = _with_labels(RobertaForSequenceClassification(roberta), MNLI)
    folders["roberta"] = _save(root / "roberta", rob)
    rob2 = RobertaForSequenceClassification.from_pretrained(folders["roberta"])
    folders["roberta_permuted"] = _save(
        root / "roberta_permuted", _permuted(rob2, rob2.classifier.out_proj, swap, NLI_MODEL)
    )
    narrow = RobertaConfig(vocab_size=100, hidden_size=3, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=8, max_position_embeddings=66, num_labels=3)  # fmt: skip
    folders["narrow"] = _save(
        root / "narrow", _with_labels(RobertaForSequenceClassification(narrow), NLI_MODEL)
    )
    return folders


def _logits(loaded) -> torch.Tensor:
    batch = loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Teacher label order (issue #10, item 14)
# ---------------------------------------------------------------------------------------------


def test_a_teacher_in_another_label_order_gives_the_same_logits_and_students(teachers):
    a = load_teacher(str(teachers["ordered"]), num_labels=3, id2label=MNLI)
    b = load_teacher(str(teachers["permuted"]), num_labels=3, id2label=MNLI)
    raw = load_model(str(teachers["permuted"]), hash_weights=False)  # its own order: 0=contradiction
    assert not torch.equal(_logits(raw), _logits(a)), "the fixture must really be permuted"
    assert torch.equal(_logits(a), _logits(b))  # so identical KL targets
    assert b.config.id2label == MNLI and b.config.label2id == {v: k for k, v in MNLI.items()}
    assert a.warnings == b.warnings == ()
    student_a = load_student("truncate:2", a).model.state_dict()
    student_b = load_student("truncate:2", b).model.state_dict()
    assert student_a.keys() == student_b.keys()
    assert all(torch.equal(student_a[k], student_b[k]) for k in student_a)


def test_the_head_is_found_in_a_roberta_classifier_too(teachers):
    a = load_teacher(str(teachers["roberta"]), num_labels=3, id2label=MNLI)
    b = load_teacher(str(teachers["roberta_permuted"]), num_labels=3, id2label=MNLI)
    assert torch.equal(_logits(a), _logits(b))


def test_labels_that_are_not_the_tasks_are_one_line_naming_both_lists(teachers):
    with pytest.raises(GeokdError) as exc:
        load_teacher(str(teachers["foreign"]), num_labels=3, id2label=MNLI)
    message = _one_line(exc)
    assert "0=yes, 1=maybe, 2=no" in message and "0=entailment, 1=neutral, 2=contradiction" in message


def test_generic_label_names_keep_their_order_with_a_warning(teachers):
    generic = load_teacher(str(teachers["generic"]), num_labels=3, id2label=MNLI)
    ordered = load_teacher(str(teachers["ordered"]), num_labels=3, id2label=MNLI)
    assert torch.equal(_logits(generic), _logits(ordered))
    assert len(generic.warnings) == 1 and "LABEL_0" in generic.warnings[0]
    assert "0=entailment" in generic.warnings[0] and "\n" not in generic.warnings[0]
    assert generic.config.id2label == MNLI


def test_a_head_that_cannot_be_found_unambiguously_is_refused(teachers):
    with pytest.raises(GeokdError) as exc:  # width 3 = 3 labels: dense and out_proj both fit
        load_teacher(str(teachers["narrow"]), num_labels=3, id2label=MNLI)
    assert "cannot find" in _one_line(exc) and "0=contradiction" in str(exc.value)


def test_other_label_counts_and_regression_keep_their_behaviour(teachers, tmp_path):
    with pytest.raises(GeokdError, match="does not fit the task's 2 labels"):
        load_teacher(str(teachers["ordered"]), num_labels=2, id2label={0: "negative", 1: "positive"})
    torch.manual_seed(1)
    regression = _save(tmp_path / "reg", BertForSequenceClassification(_config(num_labels=1)))
    loaded = load_teacher(str(regression), num_labels=1)
    assert loaded.config.problem_type == "regression" and loaded.warnings == ()


# ---------------------------------------------------------------------------------------------
# Damaged safetensors files and pickled checkpoints (issue #10, items 11 and 12)
# ---------------------------------------------------------------------------------------------


def _damage(data: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how == "short":
        return data[:5]
    if how == "truncated":
        return data[: len(data) * 2 // 3]
    if how == "garbage":
        return b"\x00garbage!" + data[9:]  # the header length field is nonsense
    if how == "bad-json":
        return data[:8] + b"{x" + data[10:]
    if how == "extended":
        return data + b"\x00" * 16
    if how == "offsets":  # a header whose tensor claims more bytes than its shape needs
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [1]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # shorter: padded
        assert len(text) == length
        return data[:8] + text + data[8 + length :]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["empty", "short", "truncated", "garbage", "bad-json", "extended", "offsets"])
def test_a_damaged_weights_file_is_one_line_naming_it(teachers, tmp_path, how):
    folder = tmp_path / "damaged"
    shutil.copytree(teachers["ordered"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(_damage(weights.read_bytes(), how))
    for load in (load_model, load_teacher):
        with pytest.raises(GeokdError) as exc:
            load(str(folder))
        message = _one_line(exc)
        assert str(weights) in message and "not a valid safetensors file" in message


def test_a_valid_file_passes_the_structural_check(teachers):
    M.check_safetensors(teachers["ordered"] / "model.safetensors")


def test_damage_the_structural_check_misses_is_still_one_line(teachers, tmp_path, monkeypatch):
    folder = tmp_path / "damaged"
    shutil.copytree(teachers["ordered"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    monkeypatch.setattr(M, "check_safetensors", lambda *args, **kwargs: None)  # let safetensors see it
    with pytest.raises(GeokdError) as exc:
        load_model(str(folder))
    message = _one_line(exc)
    assert str(weights) in message and "could not be read" in message


def test_a_damaged_shard_of_a_sharded_checkpoint_is_named(teachers, tmp_path):
    folder = tmp_path / "sharded"
    model = BertForSequenceClassification.from_pretrained(teachers["ordered"])
    model.save_pretrained(folder, max_shard_size="20KB")
    _tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert torch.equal(
        _logits(load_teacher(str(folder), hash_weights=False)),
        _logits(load_teacher(str(teachers["ordered"]))),
    )
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(GeokdError) as exc:
        load_model(str(folder))
    assert str(shards[1]) in _one_line(exc)
    shards[1].unlink()
    with pytest.raises(GeokdError) as exc:
        load_model(str(folder))
    assert shards[1].name in _one_line(exc) and "not there" in str(exc.value)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(GeokdError) as exc:
        load_model(str(folder))
    assert "model.safetensors.index.json" in _one_line(exc) and "damaged" in str(exc.value)


@pytest.mark.parametrize("index", [False, True])
def test_a_pickled_checkpoint_is_refused_with_the_conversion(teachers, tmp_path, index):
    folder = tmp_path / "pickled"
    shutil.copytree(teachers["ordered"], folder)
    state = load_file_state(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # transformers 5 no longer writes .bin itself
    if index:
        weight_map = {key: "pytorch_model.bin" for key in state}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "pytorch_model.bin").rename(folder / "pytorch_model-00001-of-00001.bin")
    for load in (load_model, load_teacher):
        with pytest.raises(GeokdError) as exc:
            load(str(folder))
        message = _one_line(exc)
        assert "never unpickles" in message and "safe_serialization=True" in message
        assert ("pytorch_model.bin.index.json" if index else "pytorch_model.bin") in message


def load_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
