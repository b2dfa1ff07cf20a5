"""The instruction-following task (`--task instruct`, issue #11): reading instruction data, the
prompt templates, tokenising with response-only labels, collation and the contamination check.

This is the MiniLLM / DistiLLM protocol's data side. The engine trains on `tokenize_instruct`
features; the generation eval renders the same prompts with `tokenize_prompts`.

Reading (`read_instruct(path)`, `load_instruct_split(data, split)`)
  One `.jsonl` file (one JSON object per line) or `.json` file (a JSON array of objects, or JSON
  lines), in one of these formats, detected from the keys of every record (`format="auto"`) or
  forced with `format=` (`--format`):

  =====================  ===================================================  ======================
  format                 fields                                               example(s) per record
  =====================  ===================================================  ======================
  `minillm` (`alpaca`)   `instruction`, `input` (optional), `output`          one
  `dolly`                `instruction`, `context` (optional), `response`      one
  `self-instruct`        `instruction`, `instances[{input, output}]`          one per instance
  `chat`                 `messages[{role, content}]`                          one
  `prompt-completion`    `prompt`, `completion`                               one
  =====================  ===================================================  ======================

  `output` / `response` / `completion` is a string or a list of reference strings; the first
  reference is the training target, and the generation eval scores against the best of them. A
  chat record's last message must be the assistant's: it is the response, and every message before
  it is the prompt (kept in `InstructExample.messages`; its last user message is the
  `instruction`). Every example gets `example_id` = its 0-based position among the split's
  examples in file order (after self-instruct instances are expanded, in instance order): stable
  across runs and shuffles, and equal to the index in `InstructSplit.examples`. The split records
  its source path, format and `sha256:<hex>` fingerprint of the file's bytes (the convention of
  `geokd.data.fingerprint_files`). A missing file, invalid JSON (with its line), an unknown,
  ambiguous or mixed format (naming the keys found), an empty instruction or an example without a
  reference is one `GeokdError` line.

Templates (`render_prompt(example, template, tokenizer)`)
  `alpaca` (default) is the MiniLLM prompt, verbatim, with or without the input block
  (`ALPACA_PROMPT`, `ALPACA_PROMPT_WITH_INPUT`); `chat` is the tokenizer's own chat template over
  the prompt messages with the generation prompt added.

Tokenising (`tokenize_instruct`, `tokenize_prompts`)
  A training sequence is `prompt ids + response ids + [EOS]`; prompt positions carry label -100
  (`IGNORE_INDEX`) and response positions their own ids, so only response tokens (and the EOS that
  teaches the model to stop) ever enter a loss. Prompt and response are tokenised separately and
  their ids concatenated: see `tokenize_instruct` for why. Prompts longer than `max_prompt_length`
  are dropped and counted, never cut mid-instruction; responses are cut to fit `max_length` and
  counted.

Collation (`make_instruct_collate`): right padding for training, left padding for batched
generation; padding has attention 0 and label -100.

Contamination (`contamination(eval_split, train_split)`): the eval examples whose normalised
instruction and input also occur in the training data (`normalize_text`).

The task has no `geokd.tasks.TaskSpec` (no label space; its metrics score generated text), so
`geokd.tasks.get_task("instruct")` refuses with a line pointing here; callers branch on
`geokd.tasks.is_instruct_task(name)`. torch is imported only by the collator.
"""

from __future__ import annotations

import json
import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geokd.data import fingerprint_files
from geokd.errors import GeokdError
from geokd.tasks import INSTRUCT_TASK

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "INSTRUCT_METRICS",
    "INSTRUCT_PRIMARY_METRIC",
    "INSTRUCT_TASK",
    "TEMPLATES",
    "InstructCollator",
    "InstructExample",
    "InstructSplit",
    "contamination",
    "load_instruct_split",
    "make_instruct_collate",
    "normalize_text",
    "prompt_messages",
    "read_instruct",
    "render_prompt",
    "tokenize_instruct",
    "tokenize_prompts",
]

# Data formats, in the order auto-detection reports them; `alpaca` etc. are accepted aliases.
FORMATS = ("minillm", "dolly", "self-instruct", "chat", "prompt-completion")
# Accepted spellings, compared without case, dashes or underscores ("Self_Instruct", "alpaca").
_FORMAT_NAMES = {
    **{name.replace("-", ""): name for name in FORMATS},
    "alpaca": "minillm",
    "selfinst": "self-instruct",
    "messages": "chat",
}
# The keys that identify each format (all must be present). A record matching none, or more than
# one, is refused under `format="auto"`.
_SIGNATURES: Mapping[str, tuple[str, ...]] = {
    "minillm": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "self-instruct": ("instruction", "instances"),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
}
_FIELDS_IN_WORDS = (
    "minillm (instruction, input, output), dolly (instruction, context, response), self-instruct "
    "(instruction, instances), chat (messages), prompt-completion (prompt, completion)"
)

TEMPLATES = ("alpaca", "chat")
IGNORE_INDEX = -100  # the label of prompt and padding positions (torch's cross-entropy default)

# What the generation eval reports for this task (ROUGE-L is the MiniLLM protocol's score).
INSTRUCT_METRICS = ("rougeL", "exact_match", "response_length")
INSTRUCT_PRIMARY_METRIC = "rougeL"

# The MiniLLM prompt, verbatim (see ../shared/data/README.md): without and with an input block.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_TOKENIZE_BATCH = 512


# --------------------------------------------------------------------------------------------
# Examples and splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructExample:
    """One instruction-following example.

    `example_id` is its 0-based position among its split's examples (= its index in
    `InstructSplit.examples`); `row` is the 0-based index of the record it came from (they differ
    only for self-instruct, whose records hold several instances). `input` is "" when there is
    none. `references` holds at least one non-blank string; `references[0]` is the training target.
    `messages` is set for chat data only: the conversation before the response, as
    `{"role", "content"}` dicts.
    """

    example_id: int
    instruction: str
    input: str
    references: tuple[str, ...]
    messages: tuple[Mapping[str, str], ...] | None = None
    row: int = 0

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]


@dataclass(frozen=True)
class InstructSplit:
    """The examples of one instruction-data file, with their provenance: `source` (the path read),
    `format` (detected or forced, one of `FORMATS`) and `fingerprint` (`sha256:<hex>` of the file's
    bytes, as `geokd.data.fingerprint_files`)."""

    split: str
    examples: tuple[InstructExample, ...]
    source: str
    format: str
    fingerprint: str
    task: str = field(default=INSTRUCT_TASK)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[InstructExample]:
        return iter(self.examples)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _canonical_format(format: str) -> str:
    key = str(format).strip().lower().replace("_", "").replace("-", "")
    if key == "auto":
        return key
    if key not in _FORMAT_NAMES:
        raise GeokdError(
            f"--format {format!r} is not an instruction-data format; choose auto or one of: "
            f"{', '.join(FORMATS)} (alpaca = minillm)"
        )
    return _FORMAT_NAMES[key]


def load_instruct_split(data: str | Path, split: str = "train", format: str = "auto") -> InstructSplit:
    """One split of instruction data. `data` is a folder holding `<split>.jsonl` or `<split>.json`
    (`train` and `dev` for training; `validation` means `dev`), or a single `.jsonl`/`.json` file
    (for `eval`: it is read whatever `split` says, and `split` names it)."""
    path = Path(data).expanduser()
    name = {"validation": "dev", "valid": "dev"}.get(split, split)
    if path.is_dir():
        found = [
            path / f"{name}{suffix}" for suffix in (".jsonl", ".json") if (path / f"{name}{suffix}").is_file()
        ]
        if len(found) != 1:
            present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json"))
            what = "no" if not found else "both a .jsonl and a .json"
            raise GeokdError(
                f"--data {str(data)!r}: {what} {name} file in the folder (expected exactly one of {name}.jsonl, "
                f"{name}.json; JSON files there: {', '.join(present) or 'none'}); add it, remove one, or pass "
                "the file itself"
            )
        return replace(read_instruct(found[0], format=format), split=name)
    if path.is_file():
        return replace(read_instruct(path, format=format), split=name)
    raise GeokdError(
        f"--data {str(data)!r}: no such file or folder; pass a .jsonl/.json file or a folder holding "
        "train.jsonl and dev.jsonl"
    )


def read_instruct(path: str | Path, format: str = "auto") -> InstructSplit:
    """Read one `.jsonl` or `.json` instruction-data file (see the module docstring for the formats).
    `format="auto"` detects the format from each record's keys and requires one format per file;
    any format name (`minillm`/`alpaca`, `dolly`, `self-instruct`, `chat`, `prompt-completion`)
    reads every record as that format. The split is named after the file (`eval.jsonl` -> `eval`)."""
    fmt = _canonical_format(format)
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise GeokdError(f"{path} {what}; pass a .jsonl or .json file of instruction data")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise GeokdError(
            f"{path}: cannot read instruction data from a {path.suffix or 'suffix-less'!r} file; "
            "use a .jsonl (one object per line) or .json (an array of objects) file"
        )
    records = _read_records(path)
    if not records:
        raise GeokdError(f"{path}: the file holds no records (empty); check the file")
    if fmt == "auto":
        fmt = _detect_format(records)
    examples: list[InstructExample] = []
    for row, (where, record) in enumerate(records):
        for instruction, input_text, references, messages in _PARSERS[fmt](record, where, fmt):
            examples.append(
                InstructExample(len(examples), instruction, input_text, references, messages, row)
            )
    return InstructSplit(path.stem, tuple(examples), str(path), fmt, fingerprint_files([path]))


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """`(where, record)` pairs: a JSON array of objects (where = `path item i`) when the file starts
    with `[`, else JSON lines (where = `path:line`; blank lines skipped)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GeokdError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise GeokdError(f"{path}: cannot read the file ({exc.strerror}); check its permissions") from None
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeokdError(
                f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); the file must be a "
                "JSON array of objects or one object per line"
            ) from None
        records = [(f"{path} item {i}", item) for i, item in enumerate(items)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise GeokdError(
                    f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); each line must be one "
                    "JSON object (or the file one JSON array)"
                ) from None
    for where, record in records:
        if not isinstance(record, dict):
            raise GeokdError(
                f"{where}: expected a JSON object, got {type(record).__name__}; each record must be an object"
            )
    return records


def _keys(record: Mapping[str, Any]) -> str:
    return ", ".join(map(str, record)) or "none"


def _detect_format(records: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    first: tuple[str, str] | None = None  # (format, where) of the first record
    for where, record in records:
        matches = [fmt for fmt, keys in _SIGNATURES.items() if all(k in record for k in keys)]
        if not matches:
            raise GeokdError(
                f"{where}: unknown instruction-data format (keys: {_keys(record)}); expected {_FIELDS_IN_WORDS}; "
                "fix the record or pass --format"
            )
        if len(matches) > 1:
            raise GeokdError(
                f"{where}: ambiguous instruction-data format: keys ({_keys(record)}) fit {' and '.join(matches)}; "
                "pass --format"
            )
        if first is None:
            first = (matches[0], where)
        elif matches[0] != first[0]:
            raise GeokdError(
                f"{where}: mixed formats: this record is {matches[0]} (keys: {_keys(record)}) but {first[1]} is "
                f"{first[0]}; keep one format per file, or pass --format to read every record as one"
            )
    assert first is not None
    return first[0]


def _text(record: Mapping[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    """A text field; a missing optional one (or JSON null) is ""."""
    value = record.get(key)
    if value is None:
        if required:
            raise GeokdError(
                f"{where}: missing field {key!r} for format {fmt} (keys: {_keys(record)}); fix the record or --format"
            )
        return ""
    if not isinstance(value, str):
        raise GeokdError(f"{where}: field {key!r} must be text, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _instruction(record: Mapping[str, Any], key: str, where: str, fmt: str) -> str:
    text = _text(record, key, where, fmt)
    if not text.strip():
        raise GeokdError(
            f"{where}: empty instruction (field {key!r}); every example needs one: fix or remove it"
        )
    return text


def _references(record: Mapping[str, Any], key: str, where: str, fmt: str) -> tuple[str, ...]:
    """A string or a list of strings; each must be non-blank, and there must be one at least."""
    if key not in record or record[key] is None:
        raise GeokdError(
            f"{where}: no reference: missing field {key!r} for format {fmt} (keys: {_keys(record)}); "
            "every example needs a response"
        )
    value = record[key]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise GeokdError(
            f"{where}: field {key!r} must be a string or a list of strings, got {type(value).__name__} {_short(value)}"
        )
    if not values:
        raise GeokdError(
            f"{where}: no reference: field {key!r} is an empty list; every example needs a response"
        )
    for i, reference in enumerate(values):
        if not isinstance(reference, str) or not reference.strip():
            what = "blank" if isinstance(reference, str) else f"a {type(reference).__name__}, not text"
            position = f" (reference {i})" if len(values) > 1 else ""
            raise GeokdError(
                f"{where}: no reference: field {key!r}{position} is {what}; every reference must be non-empty text"
            )
    return tuple(values)


_Parsed = tuple[str, str, tuple[str, ...], "tuple[Mapping[str, str], ...] | None"]


def _parse_minillm(record: Mapping[str, Any], where: str, fmt: str) -> list[_Parsed]:
    instruction = _instruction(record, "instruction", where, fmt)
    return [
        (
            instruction,
            _text(record, "input", where, fmt, required=False),
            _references(record, "output", where, fmt),
            None,
        )
    ]


def _parse_dolly(record: Mapping[str, Any], where: str, fmt: str) -> list[_Parsed]:
    instruction = _instruction(record, "instruction", where, fmt)
    context = _text(record, "context", where, fmt, required=False)
    return [(instruction, context, _references(record, "response", where, fmt), None)]


def _parse_self_instruct(record: Mapping[str, Any], where: str, fmt: str) -> list[_Parsed]:
    instruction = _instruction(record, "instruction", where, fmt)
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        got = "missing" if instances is None else f"{type(instances).__name__} {_short(instances)}"
        raise GeokdError(
            f"{where}: no reference: field 'instances' must be a non-empty list of {{input, output}} objects, "
            f"got {got}; every task needs an instance"
        )
    parsed: list[_Parsed] = []
    for i, instance in enumerate(instances):
        spot = f"{where} instance {i}"
        if not isinstance(instance, dict):
            raise GeokdError(f"{spot}: expected an {{input, output}} object, got {type(instance).__name__}")
        parsed.append(
            (
                instruction,
                _text(instance, "input", spot, fmt, required=False),
                _references(instance, "output", spot, fmt),
                None,
            )
        )
    return parsed


def _parse_chat(record: Mapping[str, Any], where: str, fmt: str) -> list[_Parsed]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"{type(messages).__name__} {_short(messages)}"
        raise GeokdError(
            f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, got {got}"
        )
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        spot = f"{where} message {i}"
        if not isinstance(message, dict):
            raise GeokdError(f"{spot}: expected a {{role, content}} object, got {type(message).__name__}")
        turns.append(
            {"role": _text(message, "role", spot, fmt), "content": _text(message, "content", spot, fmt)}
        )
    if turns[-1]["role"] != "assistant":
        raise GeokdError(
            f"{where}: no reference: the last message has role {turns[-1]['role']!r}; a chat example must end "
            "with the assistant's response"
        )
    response = turns[-1]["content"]
    if not response.strip():
        raise GeokdError(
            f"{where}: no reference: the last (assistant) message is empty; every example needs a response"
        )
    prompt = turns[:-1]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise GeokdError(
            f"{where}: empty instruction: no non-empty user message before the response (roles: "
            f"{', '.join(m['role'] for m in turns)}); every example needs one"
        )
    return [(users[-1], "", (response,), tuple(prompt))]


def _parse_prompt_completion(record: Mapping[str, Any], where: str, fmt: str) -> list[_Parsed]:
    instruction = _instruction(record, "prompt", where, fmt)
    return [(instruction, "", _references(record, "completion", where, fmt), None)]


_PARSERS = {
    "minillm": _parse_minillm,
    "dolly": _parse_dolly,
    "self-instruct": _parse_self_instruct,
    "chat": _parse_chat,
    "prompt-completion": _parse_prompt_completion,
}


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def prompt_messages(example: InstructExample) -> list[dict[str, str]]:
    """The conversation before the response: a chat example's own prompt messages, or else one user
    message holding the instruction, followed by a blank line and the input when there is one."""
    if example.messages is not None:
        return [dict(m) for m in example.messages]
    content = example.instruction + (f"\n\n{example.input}" if example.input.strip() else "")
    return [{"role": "user", "content": content}]


def _check_template(template: str, tokenizer: Any) -> None:
    if template not in TEMPLATES:
        raise GeokdError(
            f"--template {template!r} is not a prompt template; choose one of: {', '.join(TEMPLATES)}"
        )
    if template == "chat":
        if tokenizer is None:
            raise GeokdError(
                "--template chat needs the model's tokenizer (its chat template renders the prompt)"
            )
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise GeokdError(
                f"--template chat: tokenizer {name!r} has no chat template; use --template alpaca, or a tokenizer "
                "that ships one"
            )


def render_prompt(example: InstructExample, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text the model sees before its response.

    * `alpaca`: the MiniLLM prompt, `ALPACA_PROMPT_WITH_INPUT` when the example has an input (an
      input of only whitespace counts as none) and `ALPACA_PROMPT` otherwise, with the instruction
      and input inserted as they are. A chat example qualifies only when its prompt is a single
      user message (a system message or earlier turns would be lost): otherwise use `chat`.
    * `chat`: `tokenizer.apply_chat_template(prompt_messages(example), add_generation_prompt=True,
      tokenize=False)`; the tokenizer must have a chat template.
    """
    _check_template(template, tokenizer)
    if template == "chat":
        return tokenizer.apply_chat_template(
            prompt_messages(example), add_generation_prompt=True, tokenize=False
        )
    if example.messages is not None and [m["role"] for m in example.messages] != ["user"]:
        roles = ", ".join(m["role"] for m in example.messages)
        raise GeokdError(
            f"example {example.example_id}: its prompt is a conversation ({roles}), which the alpaca template "
            "cannot hold; use --template chat"
        )
    # Filled by position, not with str.format: instructions may contain braces.
    if example.input.strip():
        head, rest = ALPACA_PROMPT_WITH_INPUT.split("{instruction}")
        middle, tail = rest.split("{input}")
        return head + example.instruction + middle + example.input + tail
    head, tail = ALPACA_PROMPT.split("{instruction}")
    return head + example.instruction + tail


# --------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GeokdError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    return value


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        chunk = list(texts[start : start + _TOKENIZE_BATCH])
        encoded = tokenizer(
            chunk, add_special_tokens=add_special_tokens, padding=False, truncation=False, verbose=False
        )
        ids.extend(list(map(int, row)) for row in encoded["input_ids"])
    return ids


def _prompt_ids(
    split: InstructSplit | Sequence[InstructExample], tokenizer: Any, template: str
) -> list[list[int]]:
    """Prompt ids as the model sees them, in training and in generation alike. With `alpaca` the
    tokenizer adds its usual special tokens (a BOS for tokenizers that use one); with `chat` it adds
    none, since the rendered template already spells them out."""
    _check_template(template, tokenizer)
    prompts = [render_prompt(e, template, tokenizer) for e in split]
    return _encode(tokenizer, prompts, add_special_tokens=template != "chat")


def _all_dropped(split: Any, lengths: Sequence[int], max_prompt_length: int) -> GeokdError:
    source = getattr(split, "source", "the data")
    shortest = min(lengths)
    return GeokdError(
        f"{source}: every one of the {len(lengths)} prompts is longer than --max-prompt-length {max_prompt_length} "
        f"tokens (the shortest has {shortest}); raise --max-prompt-length to at least {shortest}"
    )


def tokenize_instruct(
    split: InstructSplit | Sequence[InstructExample],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training features: one dict per kept example with `example_id`, `input_ids` (prompt ids +
    response ids + EOS), `labels` (-100 on each prompt position, the token's own id on each response
    position, EOS included so the model learns to stop) and `prompt_length` (the number of prompt
    ids). Labels are aligned with `input_ids` (not shifted): the causal-LM loss shifts them.

    The prompt (`render_prompt`) and the response (the first reference, without special tokens) are
    tokenised separately and their ids concatenated. Tokenising the joined text instead could merge
    characters across the boundary into one token (BPE merges such as "\\n" + "The", or a
    SentencePiece word-start marker), so the sequence's prompt part would differ from the prompt ids
    the model is given at generation time (`tokenize_prompts`), and a straddling token would belong
    to neither side. Concatenating ids makes the training prompt exactly the generation prompt and
    the prompt/response boundary exact. (MiniLLM tokenises the two parts separately too.)

    Prompts longer than `max_prompt_length` tokens are dropped and counted (never cut
    mid-instruction); a sequence longer than `max_length` keeps its prompt and the first
    `max_length - prompt_length` response tokens (its EOS is then lost) and is counted.
    `max_prompt_length` must be smaller than `max_length`, so every kept example has a response
    token. Returns `(features, stats)` with stats `examples`, `kept`, `dropped_prompt`,
    `truncated_response`; a split where every prompt is too long is an error naming
    `--max-prompt-length`.
    """
    max_prompt_length = _positive("max_prompt_length", max_prompt_length)
    max_length = _positive("max_length", max_length)
    if max_prompt_length >= max_length:
        raise GeokdError(
            f"--max-prompt-length {max_prompt_length} must be smaller than --max-length {max_length}, to leave room "
            "for the response; lower one or raise the other"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise GeokdError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, so a response cannot end with one; set "
            "tokenizer.eos_token first"
        )
    examples = list(split)
    prompt_ids = _prompt_ids(examples, tokenizer, template)
    response_ids = _encode(tokenizer, [e.response for e in examples], add_special_tokens=False)
    features: list[dict[str, Any]] = []
    dropped = truncated = 0
    for example, prompt, response in zip(examples, prompt_ids, response_ids, strict=True):
        if len(prompt) > max_prompt_length:
            dropped += 1
            continue
        target = [*response, int(eos)]
        room = max_length - len(prompt)
        if len(target) > room:
            target = target[:room]
            truncated += 1
        features.append(
            {
                "example_id": example.example_id,
                "input_ids": prompt + target,
                "labels": [IGNORE_INDEX] * len(prompt) + target,
                "prompt_length": len(prompt),
            }
        )
    if examples and not features:
        raise _all_dropped(split, [len(p) for p in prompt_ids], max_prompt_length)
    stats = {
        "examples": len(examples),
        "kept": len(features),
        "dropped_prompt": dropped,
        "truncated_response": truncated,
    }
    return features, stats


def tokenize_prompts(
    split: InstructSplit | Sequence[InstructExample],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Generation features: one dict per kept example with `example_id`, `input_ids` (the prompt ids
    exactly as `tokenize_instruct` puts them before the response) and `prompt_length`. The same drop
    rule: prompts longer than `max_prompt_length` are dropped and counted. Returns
    `(features, stats)` with stats `examples`, `kept`, `dropped_prompt`; every prompt too long is
    an error naming `--max-prompt-length`. The references of a feature are
    `split.examples[feature["example_id"]].references`."""
    max_prompt_length = _positive("max_prompt_length", max_prompt_length)
    examples = list(split)
    prompt_ids = _prompt_ids(examples, tokenizer, template)
    features = [
        {"example_id": e.example_id, "input_ids": ids, "prompt_length": len(ids)}
        for e, ids in zip(examples, prompt_ids, strict=True)
        if len(ids) <= max_prompt_length
    ]
    if examples and not features:
        raise _all_dropped(split, [len(p) for p in prompt_ids], max_prompt_length)
    stats = {
        "examples": len(examples),
        "kept": len(features),
        "dropped_prompt": len(examples) - len(features),
    }
    return features, stats


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructCollator:
    """A picklable `collate_fn` for `tokenize_instruct` / `tokenize_prompts` features.

    Returns `input_ids` and `attention_mask` `[B, T]` (T = the longest in the batch), `labels`
    `[B, T]` when the features carry labels (-100 on padding), `example_id` and `prompt_length`
    `[B]`, all int64. Padding goes on the right (training) or the left (batched generation, so
    every prompt ends at the last position). Padding positions are excluded by `attention_mask`
    and their labels, never by comparing ids with `pad_token_id`: it may be the EOS id, which
    responses end with. `warnings` holds one-line notes to show the user.
    """

    pad_token_id: int
    padding_side: str = "right"
    warnings: tuple[str, ...] = ()

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if not features:
            raise ValueError("the instruct collator needs at least one feature")
        lengths = [len(f["input_ids"]) for f in features]
        batch_size, width = len(features), max(lengths)  # B, T
        has_labels = "labels" in features[0]
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention = torch.zeros((batch_size, width), dtype=torch.long)  # [B, T]
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[row, span] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention[row, span] = 1
            if has_labels:
                labels[row, span] = torch.as_tensor(feature["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if has_labels:
            batch["labels"] = labels
        batch["example_id"] = torch.tensor([f["example_id"] for f in features], dtype=torch.long)  # [B]
        batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)  # [B]
        return batch


def make_instruct_collate(tokenizer: Any, padding_side: str = "right") -> InstructCollator:
    """The collator for `tokenizer`: pads with its pad id, or with its EOS id when it has no pad
    token (noted in `InstructCollator.warnings`; harmless, since padding is masked by attention and
    labels). `padding_side`: `right` for training, `left` for generation."""
    if padding_side not in ("right", "left"):
        raise GeokdError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    pad = getattr(tokenizer, "pad_token_id", None)
    notes: tuple[str, ...] = ()
    if pad is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise GeokdError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token, so batches cannot be "
                "padded; set tokenizer.pad_token first"
            )
        pad = eos
        notes = (
            f"tokenizer has no pad token: padding with its EOS token {getattr(tokenizer, 'eos_token', None)!r} "
            f"(id {int(eos)}); padding is masked by attention_mask and label -100, so it never enters a loss",
        )
    return InstructCollator(pad_token_id=int(pad), padding_side=padding_side, warnings=notes)


# --------------------------------------------------------------------------------------------
# Contamination
# --------------------------------------------------------------------------------------------


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_text(text: str) -> str:
    """The text compared by `contamination`: lower-cased, every run of whitespace (spaces, tabs,
    newlines, Unicode spaces) collapsed to one space, and punctuation and whitespace stripped from
    both ends (ASCII punctuation and Unicode category P*). Inner punctuation is kept."""
    collapsed = " ".join(text.lower().split())
    start, end = 0, len(collapsed)
    while start < end and (_is_punctuation(collapsed[start]) or collapsed[start].isspace()):
        start += 1
    while end > start and (_is_punctuation(collapsed[end - 1]) or collapsed[end - 1].isspace()):
        end -= 1
    return collapsed[start:end]


def contamination(
    eval_split: InstructSplit | Sequence[InstructExample],
    train_split: InstructSplit | Sequence[InstructExample],
) -> dict[str, Any]:
    """The eval examples whose instruction and input, each normalised with `normalize_text`, occur
    as a pair (instruction with the same input) in the training data.

    Returns `count` and `example_ids` (sorted eval ids) under that normalisation, `exact_count` for
    the same check on the raw strings (for comparison with counts quoted elsewhere), and `total`
    (the number of eval examples). For the real Dolly split, `count` is 10 and `exact_count` 9: the
    tenth eval example differs from its training copy only by whitespace before a line break."""

    def pair(example: InstructExample, normalise: bool) -> tuple[str, str]:
        if normalise:
            return normalize_text(example.instruction), normalize_text(example.input)
        return example.instruction, example.input

    train = list(train_split)
    seen = {pair(e, True) for e in train}
    seen_exact = {pair(e, False) for e in train}
    evals = list(eval_split)
    ids = sorted(e.example_id for e in evals if pair(e, True) in seen)
    exact = sum(pair(e, False) in seen_exact for e in evals)
    return {"count": len(ids), "example_ids": ids, "exact_count": exact, "total": len(evals)}
