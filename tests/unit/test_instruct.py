"""The instruction-following data (issue #11, `geokd.tasks.instruct`): every format read from a
small file written here, the MiniLLM prompt text, the chat template, response-only labels, the drop
and truncation rules, collation, contamination, each user error as one line, and the real MiniLLM
files when they are present."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from _datadir import shared_data
from tinylm import make_causal_lm, make_tokenizer

from geokd.errors import GeokdError
from geokd.tasks import INSTRUCT_TASK, get_task, is_instruct_task
from geokd.tasks.instruct import (
    FORMATS,
    IGNORE_INDEX,
    InstructExample,
    InstructSplit,
    contamination,
    load_instruct_split,
    make_instruct_collate,
    normalize_text,
    read_instruct,
    render_prompt,
    tokenize_instruct,
    tokenize_prompts,
)

# The MiniLLM prompt, typed out from ../shared/data/README.md (not taken from the module).
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{i}\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{i}\n\n### Input:\n{x}"
    "\n\n### Response:\n"
)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _one_line(exc_info: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _example(example_id: int, instruction: str, input: str = "", response: str = "w9") -> InstructExample:
    return InstructExample(example_id, instruction, input, (response,))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# --------------------------------------------------------------------------------------------
# Reading: every format, detection and override
# --------------------------------------------------------------------------------------------


def test_reads_minillm_jsonl_with_ids_provenance_and_fingerprint(tmp_path):
    path = _jsonl(
        tmp_path / "eval.jsonl",
        [
            {"instruction": "Name a colour.", "input": "", "output": "Red."},
            {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
            {"instruction": "No input field at all.", "output": "Fine."},
        ],
    )
    split = read_instruct(path)
    assert isinstance(split, InstructSplit)
    assert split.format == "minillm" and split.split == "eval" and split.source == str(path)
    assert split.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(split) == 3 and [e.example_id for e in split] == [0, 1, 2]
    assert [e.example_id for e in split.examples] == list(range(len(split.examples)))
    first, second, third = split.examples
    assert (first.instruction, first.input, first.references) == ("Name a colour.", "", ("Red.",))
    assert (second.input, second.response) == ("A long text.", "Short.")
    assert third.input == "" and third.messages is None


def test_minillm_output_may_be_a_list_of_references(tmp_path):
    path = _jsonl(
        tmp_path / "e.jsonl", [{"instruction": "Say hi.", "input": "", "output": ["Hi.", "Hello!"]}]
    )
    (example,) = read_instruct(path).examples
    assert example.references == ("Hi.", "Hello!") and example.response == "Hi."


def test_reads_dolly_context_as_input(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Q?", "context": "Some context.", "response": "A.", "category": "closed_qa"},
            {"instruction": "Q2?", "context": "", "response": "B."},
        ],
    )
    split = read_instruct(path)
    assert split.format == "dolly"
    assert [(e.instruction, e.input, e.references) for e in split] == [
        ("Q?", "Some context.", ("A.",)),
        ("Q2?", "", ("B.",)),
    ]


def test_self_instruct_expands_one_example_per_instance(tmp_path):
    path = _jsonl(
        tmp_path / "s.jsonl",
        [
            {"id": "t0", "instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]},
            {"id": "t1", "instruction": "Greet.", "instances": [{"input": "", "output": "Hello."}]},
        ],
    )  # fmt: skip
    split = read_instruct(path)
    assert split.format == "self-instruct" and len(split) == 3
    assert [(e.example_id, e.row, e.instruction, e.input, e.response) for e in split] == [
        (0, 0, "Add.", "1 2", "3"),
        (1, 0, "Add.", "2 2", "4"),
        (2, 1, "Greet.", "", "Hello."),
    ]


def test_reads_chat_last_assistant_message_is_the_response(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
    ]
    split = read_instruct(_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))
    assert split.format == "chat"
    (example,) = split.examples
    assert example.references == ("Apple.",)
    assert [dict(m) for m in example.messages] == messages[:-1]
    assert example.instruction == "Name a fruit." and example.input == ""


def test_reads_prompt_completion(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Hi", "completion": ["Yo", "Hey"]}],
    )
    split = read_instruct(path)
    assert split.format == "prompt-completion"
    assert [(e.instruction, e.input, e.references) for e in split] == [
        ("2+2=", "", ("4",)),
        ("Hi", "", ("Yo", "Hey")),
    ]


def test_reads_a_json_array_and_json_lines_in_a_json_file(tmp_path):
    records = [
        {"instruction": "A.", "input": "", "output": "B."},
        {"instruction": "C.", "input": "", "output": "D."},
    ]
    array = tmp_path / "arr.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    lines = _jsonl(tmp_path / "lines.json", records)
    for path in (array, lines):
        split = read_instruct(path)
        assert split.format == "minillm" and [e.response for e in split] == ["B.", "D."]


def test_format_override_reads_every_record_as_the_named_format(tmp_path):
    # Both `output` and `response`: ambiguous under auto-detection, read as asked otherwise.
    path = _jsonl(
        tmp_path / "x.jsonl", [{"instruction": "I.", "input": "", "output": "O.", "response": "R."}]
    )
    with pytest.raises(GeokdError) as exc_info:
        read_instruct(path)
    _one_line(exc_info, "ambiguous", "minillm and dolly", "--format")
    assert read_instruct(path, format="dolly").examples[0].response == "R."
    assert read_instruct(path, format="minillm").examples[0].response == "O."
    assert read_instruct(path, format="alpaca").format == "minillm"
    assert read_instruct(path, format=" Dolly ").format == "dolly"
    # An override whose fields are absent names them.
    with pytest.raises(GeokdError) as exc_info:
        read_instruct(path, format="prompt-completion")
    _one_line(exc_info, "missing field 'prompt'", "prompt-completion", "instruction, input, output, response")


def test_every_format_is_auto_detected_as_itself(tmp_path):
    samples = {
        "minillm": {"instruction": "i", "input": "", "output": "o"},
        "dolly": {"instruction": "i", "context": "", "response": "o"},
        "self-instruct": {"instruction": "i", "instances": [{"input": "", "output": "o"}]},
        "chat": {"messages": [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}]},
        "prompt-completion": {"prompt": "i", "completion": "o"},
    }
    assert set(samples) == set(FORMATS)
    for fmt, record in samples.items():
        split = read_instruct(_jsonl(tmp_path / f"{fmt}.jsonl", [record, record]))
        assert split.format == fmt and [(e.instruction, e.response) for e in split] == [("i", "o")] * 2
        assert read_instruct(tmp_path / f"{fmt}.jsonl", format=fmt).format == fmt
        assert read_instruct(tmp_path / f"{fmt}.jsonl", format=fmt.upper().replace("-", "_")).format == fmt


def test_load_instruct_split_from_a_folder_or_a_file(tmp_path):
    record = {"instruction": "I.", "input": "", "output": "O."}
    _jsonl(tmp_path / "train.jsonl", [record] * 3)
    (tmp_path / "dev.json").write_text(json.dumps([record] * 2), encoding="utf-8")
    train = load_instruct_split(tmp_path, "train")
    dev = load_instruct_split(tmp_path, "validation")
    assert (train.split, len(train), Path(train.source).name) == ("train", 3, "train.jsonl")
    assert (dev.split, len(dev), Path(dev.source).name) == ("dev", 2, "dev.json")
    single = load_instruct_split(tmp_path / "train.jsonl", "eval")
    assert single.split == "eval" and len(single) == 3 and single.fingerprint == train.fingerprint


# --------------------------------------------------------------------------------------------
# Errors: one line each, naming the value and the fix
# --------------------------------------------------------------------------------------------

_GOOD = {"instruction": "I.", "input": "", "output": "O."}


@pytest.mark.parametrize(
    "content, fragments",
    [
        ('{"instruction": "I.", "output": "O."}\n{"instruction": "I2", "output": \n', ["x.jsonl:2", "not valid JSON"]),
        ('[\n  {"instruction": "I.", "output": "O."},\n  {"instruction": \n]', ["x.jsonl:4", "not valid JSON"]),
        ('["just a string"]', ["item 0", "expected a JSON object, got str"]),
        ("", ["no records"]),
        (json.dumps({"question": "Q", "answer": "A"}), ["x.jsonl:1", "unknown instruction-data format", "keys: question, answer", "--format"]),
        (
            json.dumps(_GOOD) + "\n" + json.dumps({"instruction": "I.", "context": "", "response": "R."}),
            ["x.jsonl:2", "mixed formats", "dolly", "keys: instruction, context, response", "x.jsonl:1 is minillm"],
        ),
        (json.dumps({"instruction": "  ", "input": "", "output": "O."}), ["x.jsonl:1", "empty instruction"]),
        (json.dumps({"instruction": "I.", "input": "", "output": []}), ["x.jsonl:1", "no reference", "empty list"]),
        (json.dumps({"instruction": "I.", "input": "", "output": " "}), ["no reference", "blank"]),
        (json.dumps({"instruction": "I.", "input": "", "output": ["ok", 3]}), ["no reference", "reference 1", "int"]),
        (json.dumps({"instruction": "I.", "input": ["x"], "output": "O."}), ["field 'input' must be text, got list"]),
        (json.dumps({"instruction": "I.", "instances": []}), ["no reference", "'instances'", "non-empty list"]),
        (json.dumps({"instruction": "I.", "instances": [{"input": "a", "output": ""}]}), ["instance 0", "no reference"]),
        (
            json.dumps({"messages": [{"role": "assistant", "content": "A."}, {"role": "user", "content": "Q?"}]}),
            ["no reference", "last message has role 'user'"],
        ),
        (json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}), ["empty instruction", "system, assistant"]),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_errors(tmp_path, content, fragments):
    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(GeokdError) as exc_info:
        read_instruct(path)
    _one_line(exc_info, *fragments)


def test_path_and_option_errors_are_one_line(tmp_path):
    cases = [
        (lambda: read_instruct(tmp_path / "missing.jsonl"), ["missing.jsonl does not exist"]),
        (
            lambda: load_instruct_split(tmp_path / "nowhere"),
            ["no such file or folder", "train.jsonl and dev.jsonl"],
        ),
        (lambda: load_instruct_split(tmp_path, "dev"), ["no dev file", "dev.jsonl, dev.json"]),
        (lambda: read_instruct(tmp_path / "a.txt"), ["'.txt'", ".jsonl"]),
        (
            lambda: read_instruct(tmp_path / "train.jsonl", format="sharegpt"),
            ["--format 'sharegpt'", "minillm, dolly"],
        ),
    ]
    (tmp_path / "a.txt").write_text("{}", encoding="utf-8")
    _jsonl(tmp_path / "train.jsonl", [_GOOD])
    for call, fragments in cases:
        with pytest.raises(GeokdError) as exc_info:
            call()
        _one_line(exc_info, *fragments)
    (tmp_path / "train.json").write_text(json.dumps([_GOOD]), encoding="utf-8")
    with pytest.raises(GeokdError) as exc_info:
        load_instruct_split(tmp_path, "train")
    _one_line(exc_info, "both a .jsonl and a .json", "train.json, train.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b'{"instruction": "\xff"}\n')
    with pytest.raises(GeokdError) as exc_info:
        read_instruct(tmp_path / "bad.jsonl")
    _one_line(exc_info, "not UTF-8")


def test_get_task_points_instruct_to_its_loader():
    assert INSTRUCT_TASK == "instruct" and is_instruct_task(" Instruct ") and not is_instruct_task("sst2")
    with pytest.raises(GeokdError) as exc_info:
        get_task("instruct")
    _one_line(exc_info, "no TaskSpec", "load_instruct_split", "is_instruct_task")
    with pytest.raises(GeokdError) as exc_info:
        get_task("instrukt")
    _one_line(exc_info, "unknown task", "custom, instruct")


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def test_alpaca_template_is_the_minillm_prompt_without_and_with_input():
    assert render_prompt(_example(0, "Name a {colour}.")) == NO_INPUT.format(i="Name a {colour}.")
    assert render_prompt(_example(0, "Sum {input}", input="1 2\n3")) == WITH_INPUT.format(
        i="Sum {input}", x="1 2\n3"
    )
    assert render_prompt(_example(0, "Name one.", input=" \n")) == NO_INPUT.format(i="Name one.")
    # The exact bytes, for one case written out in full.
    assert render_prompt(_example(0, "Q", input="C")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ\n\n### Input:\nC\n\n"
        "### Response:\n"
    )


def test_chat_template_uses_the_tokenizers_template(tok, tmp_path):
    plain = render_prompt(_example(0, "w1 w2", input="w3"), "chat", tok)
    assert plain == "<|im_start|> user w1 w2\n\nw3 <|im_end|> <|im_start|> assistant "
    messages = [
        {"role": "system", "content": "w5"},
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w7"},
    ]
    (example,) = read_instruct(_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])).examples
    assert render_prompt(example, "chat", tok) == (
        "<|im_start|> system w5 <|im_end|> <|im_start|> user w1 <|im_end|> <|im_start|> assistant "
    )
    with pytest.raises(GeokdError) as exc_info:  # the alpaca prompt cannot hold a system message
        render_prompt(example, "alpaca")
    _one_line(exc_info, "system, user", "--template chat")


def test_template_errors_are_one_line(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    for call, fragments in [
        (
            lambda: render_prompt(_example(0, "w1"), "chat", bare),
            ["has no chat template", "--template alpaca"],
        ),
        (lambda: render_prompt(_example(0, "w1"), "chat"), ["needs the model's tokenizer"]),
        (lambda: render_prompt(_example(0, "w1"), "vicuna", tok), ["--template 'vicuna'", "alpaca, chat"]),
    ]:
        with pytest.raises(GeokdError) as exc_info:
            call()
        _one_line(exc_info, *fragments)


# --------------------------------------------------------------------------------------------
# Tokenising: response-only labels, drop and truncation rules
# --------------------------------------------------------------------------------------------


def _split(*examples: InstructExample) -> InstructSplit:
    return InstructSplit("train", tuple(examples), "mem", "minillm", "sha256:0")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_positions_are_masked_and_response_positions_carry_their_ids(tok, template):
    split = _split(_example(0, "w1 w2", response="w3 w4 w5"), _example(1, "w6", input="w7 w8", response="w9"))
    features, stats = tokenize_instruct(split, tok, template=template, max_prompt_length=64, max_length=128)
    prompts, _ = tokenize_prompts(split, tok, template=template, max_prompt_length=64)
    assert stats == {"examples": 2, "kept": 2, "dropped_prompt": 0, "truncated_response": 0}
    for feature, prompt, example in zip(features, prompts, split, strict=True):
        ids, labels, p = feature["input_ids"], feature["labels"], feature["prompt_length"]
        assert set(feature) == {"example_id", "input_ids", "labels", "prompt_length"}
        assert feature["example_id"] == prompt["example_id"] == example.example_id
        assert len(ids) == len(labels) and p == prompt["prompt_length"] == len(prompt["input_ids"])
        assert all(label == IGNORE_INDEX for label in labels[:p])  # every prompt position
        assert labels[p:] == ids[p:] and IGNORE_INDEX not in labels[p:]  # every response position
        assert ids[-1] == labels[-1] == tok.eos_token_id  # the model learns to stop
        # The training sequence starts with exactly the prompt the model gets when generating ...
        assert ids[:p] == prompt["input_ids"]
        response = tok(example.response, add_special_tokens=False).input_ids
        assert ids == prompt["input_ids"] + response + [tok.eos_token_id]
        # ... and is the tokenisation of the prompt text followed by the response text.
        text = render_prompt(example, template, tok) + example.response
        assert ids == tok(text, add_special_tokens=template != "chat").input_ids + [tok.eos_token_id]
        assert tok.unk_token_id not in ids[p:]


def test_labels_are_what_a_causal_lm_scores(tok):
    """The labels are aligned with input_ids (not shifted), as transformers' causal-LM loss expects:
    its loss equals the mean cross-entropy over exactly the response tokens (EOS included)."""
    split = _split(_example(0, "w1 w2 w3", response="w4 w5"), _example(1, "w6", response="w7 w8 w9 w10"))
    features, _ = tokenize_instruct(split, tok, template="alpaca", max_prompt_length=64, max_length=128)
    batch = make_instruct_collate(tok)(features)
    model = make_causal_lm("llama")
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
    logprobs = out.logits.double().log_softmax(-1)  # [B, T, V]
    terms = []
    for row, feature in enumerate(features):
        ids, p = feature["input_ids"], feature["prompt_length"]
        terms += [-logprobs[row, t - 1, ids[t]] for t in range(p, len(ids))]
    assert len(terms) == 3 + 5  # responses + one EOS each
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_over_long_prompts_are_dropped_and_counted_never_cut(tok):
    short, exact, long = (_example(i, " ".join(["w1"] * n)) for i, n in enumerate((2, 5, 9)))
    base = len(tok(render_prompt(_example(0, "w1"))).input_ids) - 1  # template tokens around the instruction
    limit = base + 5
    split = _split(short, exact, long)
    features, stats = tokenize_instruct(
        split, tok, template="alpaca", max_prompt_length=limit, max_length=limit + 8
    )
    assert [f["example_id"] for f in features] == [0, 1]  # a prompt of exactly the limit is kept
    assert stats == {"examples": 3, "kept": 2, "dropped_prompt": 1, "truncated_response": 0}
    prompts, prompt_stats = tokenize_prompts(split, tok, template="alpaca", max_prompt_length=limit)
    assert [f["example_id"] for f in prompts] == [0, 1]  # the same rule for generation
    assert prompt_stats == {"examples": 3, "kept": 2, "dropped_prompt": 1}
    assert "labels" not in prompts[0] and max(f["prompt_length"] for f in features) == limit


def test_long_responses_are_truncated_and_counted(tok):
    split = _split(_example(0, "w1", response="w2 w3 w4 w5 w6 w7"), _example(1, "w1", response="w2"))
    p = len(tokenize_prompts(split, tok, max_prompt_length=64)[0][0]["input_ids"])
    features, stats = tokenize_instruct(split, tok, template="alpaca", max_prompt_length=p, max_length=p + 4)
    assert stats == {"examples": 2, "kept": 2, "dropped_prompt": 0, "truncated_response": 1}
    cut, whole = features
    assert len(cut["input_ids"]) == p + 4 and tok.eos_token_id not in cut["input_ids"][p:]
    assert cut["labels"][p:] == tok("w2 w3 w4 w5", add_special_tokens=False).input_ids
    assert whole["input_ids"][p:] == [*tok("w2", add_special_tokens=False).input_ids, tok.eos_token_id]


def test_tokenizing_errors_are_one_line(tok):
    split = _split(_example(0, "w1 w1 w1"), _example(1, "w1 w1"))
    cases = [
        (lambda: tokenize_instruct(split, tok, template="alpaca", max_prompt_length=4, max_length=64), ["every one of the 2 prompts", "--max-prompt-length"]),
        (lambda: tokenize_prompts(split, tok, template="alpaca", max_prompt_length=4), ["raise --max-prompt-length to at least"]),
        (lambda: tokenize_instruct(split, tok, template="alpaca", max_prompt_length=64, max_length=64), ["must be smaller than --max-length 64"]),
        (lambda: tokenize_instruct(split, tok, template="alpaca", max_prompt_length=0, max_length=64), ["--max-prompt-length must be a positive integer, got 0"]),
        (lambda: tokenize_instruct(split, tok, template="chatml", max_prompt_length=8, max_length=64), ["--template 'chatml'"]),
    ]  # fmt: skip
    for call, fragments in cases:
        with pytest.raises(GeokdError) as exc_info:
            call()
        _one_line(exc_info, *fragments)
    shortest = len(tokenize_prompts(split, tok, max_prompt_length=64)[0][1]["input_ids"])
    with pytest.raises(GeokdError) as exc_info:
        tokenize_instruct(split, tok, template="alpaca", max_prompt_length=shortest - 1, max_length=64)
    _one_line(exc_info, f"at least {shortest}")


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def _features(tok):
    split = _split(_example(0, "w1", response="w2 w3 w4"), _example(1, "w1 w5 w6", input="w7", response="w8"))
    return tokenize_instruct(split, tok, template="alpaca", max_prompt_length=64, max_length=128)[0]


def test_right_padding_for_training(tok):
    features = _features(tok)
    collate = make_instruct_collate(tok)
    assert collate.warnings == () and pickle.loads(pickle.dumps(collate)) == collate
    batch = collate(features)
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_id", "prompt_length"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["example_id"].tolist() == [0, 1]
    assert batch["prompt_length"].tolist() == [f["prompt_length"] for f in features]
    for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["labels"][row, :n].tolist() == feature["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert min(lengths) < width  # the test pads something


def test_left_padding_for_generation(tok):
    split = _split(_example(0, "w1"), _example(1, "w1 w5 w6", input="w7"))
    prompts, _ = tokenize_prompts(split, tok, template="alpaca", max_prompt_length=64)
    batch = make_instruct_collate(tok, padding_side="left")(prompts)
    assert "labels" not in batch
    width = max(len(f["input_ids"]) for f in prompts)
    for row, feature in enumerate(prompts):
        n = len(feature["input_ids"])
        # Every prompt ends at the last position, where generation continues.
        assert batch["input_ids"][row, width - n :].tolist() == feature["input_ids"]
        assert batch["input_ids"][row, : width - n].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
    # Training features padded on the left keep labels aligned and -100 on the padding.
    features = _features(tok)
    left = make_instruct_collate(tok, padding_side="left")(features)
    n0 = len(features[0]["input_ids"])
    assert left["labels"][0, -n0:].tolist() == features[0]["labels"]
    assert set(left["labels"][0, :-n0].tolist()) <= {IGNORE_INDEX}


def test_padding_falls_back_to_eos_and_says_so(tok):
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    collate = make_instruct_collate(no_pad)
    assert collate.pad_token_id == no_pad.eos_token_id
    assert (
        len(collate.warnings) == 1
        and "no pad token" in collate.warnings[0]
        and "\n" not in collate.warnings[0]
    )
    features = _features(tok)
    batch = collate(features)
    n = min(len(f["input_ids"]) for f in features)
    short = min(range(2), key=lambda r: len(features[r]["input_ids"]))
    # The response's own EOS keeps its label although padding uses the same id.
    assert batch["labels"][short, n - 1].item() == no_pad.eos_token_id
    assert set(batch["labels"][short, n:].tolist()) == {IGNORE_INDEX}
    with pytest.raises(GeokdError) as exc_info:
        make_instruct_collate(tok, padding_side="middle")
    _one_line(exc_info, "'middle'", "'right' or 'left'")


# --------------------------------------------------------------------------------------------
# Contamination
# --------------------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  What IS\tthe\n\ncapital  of France?  ") == "what is the capital of france"
    assert normalize_text("«Hello, world!»") == "hello, world"  # inner punctuation kept
    assert normalize_text("...") == "" and normalize_text("") == ""


def test_contamination_counts_eval_examples_whose_instruction_and_input_occur_in_train():
    train = _split(
        _example(0, "Name a colour.", response="r"), _example(1, "Summarise", input="Text A.", response="r")
    )
    evals = _split(
        _example(0, "name a   COLOUR", response="x"),  # normalised match
        _example(1, "Summarise", input="Text B.", response="x"),  # same instruction, other input: clean
        _example(2, "Summarise.", input=" text a ", response="x"),  # match
        _example(3, "Name a colour.", input="Text A.", response="x"),  # the pair differs: clean
        _example(4, "Name a colour.", response="x"),  # exact match
    )
    result = contamination(evals, train)
    assert result == {"count": 3, "example_ids": [0, 2, 4], "exact_count": 1, "total": 5}
    assert contamination(train, train)["count"] == 2


# --------------------------------------------------------------------------------------------
# The real MiniLLM files (skipped when the data folder is absent)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts, rows", [(("dolly", "train.jsonl"), 11435), (("dolly", "dev.jsonl"), 1000), (("dolly", "eval.jsonl"), 500), (("self-inst", "eval.jsonl"), 242)]
)  # fmt: skip
def test_real_minillm_files(parts, rows):
    path = shared_data("instruct", *parts)
    split = read_instruct(path)
    assert split.format == "minillm" and len(split) == rows
    assert split.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(len(e.references) == 1 and e.instruction.strip() for e in split)


def test_real_dolly_folder_and_contamination():
    folder = shared_data("instruct", "dolly")
    train, dev = load_instruct_split(folder, "train"), load_instruct_split(folder, "dev")
    evals = load_instruct_split(folder / "eval.jsonl", "eval")
    assert (len(train), len(dev), len(evals)) == (11435, 1000, 500)
    result = contamination(evals, train)
    # The data README's 9 counts the raw strings. Normalised, a tenth eval example matches: its
    # input differs from a training row's only by two spaces before a paragraph break.
    assert result["exact_count"] == 9
    assert result["count"] == 10 and len(result["example_ids"]) == 10 and result["total"] == 500
    self_inst = load_instruct_split(shared_data("instruct", "self-inst", "eval.jsonl"), "eval")
    assert contamination(self_inst, train)["count"] == 0


def test_real_self_instruct_seed_tasks():
    split = read_instruct(shared_data("instruct", "self_instruct_seed_tasks.jsonl"))
    assert split.format == "self-instruct" and len({e.row for e in split}) == 175 and len(split) >= 175
