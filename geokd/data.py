"""Loading task data, tokenising it and collating batches.

`load_split(task, data, split)` returns a `DataSplit`: the task spec, one `Example` per row (its
texts, its label id or score, and a stable `example_id` = the row's position in its split), where
the rows came from and a fingerprint of that source. `data` is

* a GLUE task folder holding the GLUE distribution's `train.tsv` / `dev.tsv` (MNLI:
  `dev_matched.tsv`, `dev_mismatched.tsv`), or the GLUE root above it (`glue/` with `SST-2/` in
  it); the files are read as they are distributed: tab-separated with no quote processing
  (`csv.QUOTE_NONE`: SST-2 and MRPC contain bare `"`), `utf-8-sig` (MRPC starts with a BOM),
  CoLA without a header;
* a file: a GLUE TSV for a GLUE task, or `.csv` (comma, standard quoting), `.tsv` (tab, no quote
  processing, header row) or `.jsonl` (one object per line) for a custom task (and for a GLUE
  task, with the `datasets` field names such as `sentence1`, `sentence2`, `label`);
* a custom task folder holding `train.{csv,tsv,jsonl}`, `dev.{csv,tsv,jsonl}`;
* a Hugging Face `datasets` name (`nyu-mll/glue`, or `name:config`), tried only when `data` is not
  an existing path; `None` loads a GLUE task from `nyu-mll/glue`. Offline, the error says to pass
  `--data DIR` with the GLUE TSV files.

`tokenize_examples` turns examples into per-example features (input_ids, attention_mask,
token_type_ids when the tokenizer makes them, labels, example_id) and `collate` pads a list of them
to the longest in the batch. Bad input (a missing file or column, an empty split, a label outside
the label space, a non-numeric score) raises one GeokdError line with the value and the fix.

`datasets`, `transformers` and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geokd.errors import GeokdError
from geokd.tasks import TaskSpec, encode_label, get_task, infer_label_names, label_text, resolve_split

if TYPE_CHECKING:
    import torch

GLUE_HUB_NAME = "nyu-mll/glue"
_GLUE_HUB_ALIASES = ("glue", GLUE_HUB_NAME)
_HUB_SPLITS = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
    "test": "test",
}
_FILE_FORMATS = (".csv", ".tsv", ".jsonl")


@dataclass(frozen=True)
class Example:
    """One labelled example. `example_id` is the row's 0-based position among the data rows of its
    split (header excluded), in file order: stable across runs and shuffles, so features cached by
    id can be read back in any order. (It equals the `idx` field of the `datasets` glue configs.)"""

    example_id: int
    texts: tuple[str, ...]  # one or two texts, in the order of TaskSpec.text_fields
    label: int | float  # class id, or score for regression


@dataclass(frozen=True)
class DataSplit:
    """The examples of one split of one task, with their provenance.

    `task` is the spec the examples were encoded with; for a custom task whose labels were inferred
    from this (training) split, it carries the inferred `label_names`: pass it on to load `dev`.
    `fingerprint` is `sha256:<hex>` of the file read (see `fingerprint_files`) or
    `datasets:<fingerprint>` of a `datasets` split.
    """

    task: TaskSpec
    split: str
    examples: tuple[Example, ...]
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class GlueTsvLayout:
    """Where a GLUE task's texts and label sit in the GLUE distribution's TSV files."""

    directory: str  # the task's folder in the GLUE distribution, e.g. "SST-2"
    text_columns: tuple[str, ...]  # header names, in TaskSpec.text_fields order
    label_column: str
    files: Mapping[str, str]  # canonical split -> file name
    columns: tuple[str, ...] | None = None  # only for header-less files (CoLA): the column names


_TRAIN_DEV = {"train": "train.tsv", "dev": "dev.tsv"}

GLUE_TSV_LAYOUTS: Mapping[str, GlueTsvLayout] = {
    # CoLA has no header; its third column is the original annotation, `*` for unacceptable.
    "cola": GlueTsvLayout(
        "CoLA", ("sentence",), "label", _TRAIN_DEV, columns=("source", "label", "original_label", "sentence")
    ),
    "sst2": GlueTsvLayout("SST-2", ("sentence",), "label", _TRAIN_DEV),
    "mrpc": GlueTsvLayout("MRPC", ("#1 String", "#2 String"), "Quality", _TRAIN_DEV),
    "qqp": GlueTsvLayout("QQP", ("question1", "question2"), "is_duplicate", _TRAIN_DEV),
    # The GLUE file has `source1 source2` before the sentences; some copies omit them. Columns
    # are found by header name, so both load.
    "stsb": GlueTsvLayout("STS-B", ("sentence1", "sentence2"), "score", _TRAIN_DEV),
    "mnli": GlueTsvLayout(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
    ),
    "qnli": GlueTsvLayout("QNLI", ("question", "sentence"), "label", _TRAIN_DEV),
    "rte": GlueTsvLayout("RTE", ("sentence1", "sentence2"), "label", _TRAIN_DEV),
    "wnli": GlueTsvLayout("WNLI", ("sentence1", "sentence2"), "label", _TRAIN_DEV),
}

# A record read from any source, with where it came from ("dev.tsv:12") for error messages.
_Row = tuple[str, Mapping[str, Any]]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_split(task: TaskSpec | str, data: str | Path | None = None, split: str = "train") -> DataSplit:
    """Load one split of `task` from `data` (see the module docstring for what `data` may be).

    `split`: `train`, `dev` (`validation` works too; for MNLI `dev` means `dev_matched`), or
    `dev_matched` / `dev_mismatched` for MNLI, `test` for custom tasks. A custom classification task
    without label names infers them from its `train` split (`DataSplit.task` has them).
    """
    spec = get_task(task) if isinstance(task, str) else task
    canonical = resolve_split(spec, split)
    if data is None:
        if not spec.glue:
            raise GeokdError(
                f"task {spec.name!r} needs --data: a .csv/.tsv/.jsonl file or a folder with train/dev files"
            )
        return _load_hub(spec, canonical, GLUE_HUB_NAME, spec.name, given=None)
    path = Path(data).expanduser()
    if path.is_dir():
        return _load_file(spec, canonical, _find_split_file(spec, canonical, path))
    if path.is_file():
        return _load_file(spec, canonical, path)
    text = str(data)
    if _looks_like_path(text):
        raise GeokdError(f"--data: no such file or folder: {text!r}; check the path")
    name, _, config = text.partition(":")
    if not config and spec.glue and name in _GLUE_HUB_ALIASES:
        config = spec.name
    return _load_hub(spec, canonical, name, config or None, given=text)


def _looks_like_path(text: str) -> bool:
    """A `--data` value that is clearly meant as a path (so a missing one is a 'no such file' error,
    not a `datasets` lookup): a data-file suffix, an absolute/relative/home prefix, a backslash, or
    more than one `/` (hub names are `name` or `owner/name`)."""
    return (
        text.lower().endswith((*_FILE_FORMATS, ".json", ".txt"))
        or text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
    )


def _find_split_file(spec: TaskSpec, split: str, folder: Path) -> Path:
    if spec.glue:
        name = GLUE_TSV_LAYOUTS[spec.name].files[split]
        subfolder = GLUE_TSV_LAYOUTS[spec.name].directory
        candidates = [folder / name, folder / subfolder / name]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise GeokdError(
                f"--data: no {name} for task {spec.name!r} in {str(folder)!r} (looked for "
                f"{str(candidates[0])!r} and {str(candidates[1])!r}); pass the GLUE folder that holds "
                "the task's TSV files"
            )
        return found[0]
    found = [
        folder / f"{split}{suffix}" for suffix in _FILE_FORMATS if (folder / f"{split}{suffix}").is_file()
    ]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        seen = ", ".join(p.name for p in found) if found else "none"
        raise GeokdError(
            f"--data: {what} {split} file in {str(folder)!r} (expected exactly one of "
            f"{', '.join(split + s for s in _FILE_FORMATS)}; found {seen}); add or remove files, or "
            "pass the file itself"
        )
    return found[0]


def _load_file(spec: TaskSpec, split: str, path: Path) -> DataSplit:
    suffix = path.suffix.lower()
    if spec.glue and suffix not in (".csv", ".jsonl"):
        layout = GLUE_TSV_LAYOUTS[spec.name]
        text_columns, label_column = layout.text_columns, layout.label_column
        columns, rows = _read_delimited(path, "\t", csv.QUOTE_NONE, header=layout.columns)
    else:
        text_columns, label_column = spec.text_fields, spec.label_field
        if suffix == ".jsonl":
            columns, rows = None, _read_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            delimiter, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
            columns, rows = _read_delimited(path, delimiter, quoting)
        else:
            raise GeokdError(
                f"--data: cannot tell the format of {str(path)!r} from its suffix {suffix!r}; "
                "use a .csv, .tsv or .jsonl file"
            )
    if columns == []:
        raise GeokdError(f"{path}: the file is empty (no header row); check the file")
    if columns is not None:
        missing = [c for c in (*text_columns, label_column) if c not in columns]
        if missing:
            raise GeokdError(
                f"{path}: missing column {missing[0]!r} (columns: {', '.join(columns)}); "
                + (
                    f"is this the {spec.name} data? GLUE test files have no labels"
                    if spec.glue
                    else "fix the file or --text-fields / --label-field"
                )
            )
    spec, examples = _to_examples(spec, split, rows, text_columns, label_column, str(path))
    return DataSplit(spec, split, examples, str(path), fingerprint_files([path]))


def _read_delimited(
    path: Path, delimiter: str, quoting: int, header: tuple[str, ...] | None = None
) -> tuple[list[str], list[_Row]]:
    """Rows of a delimited text file as dicts. The header row gives the column names unless
    `header` is given (a header-less file). Blank lines are skipped; a row with a different number
    of fields than the header is an error (it means a stray tab, or quotes merging lines)."""
    rows: list[_Row] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            columns = list(header) if header is not None else [c.strip() for c in next(reader, [])]
            for fields in reader:
                if not fields:
                    continue
                where = f"{path}:{reader.line_num}"
                if len(fields) != len(columns):
                    raise GeokdError(
                        f"{where}: expected {len(columns)} fields ({', '.join(columns)}), got {len(fields)}; "
                        "the row has a stray delimiter or line break, or the file is not in the expected layout"
                    )
                rows.append((where, dict(zip(columns, fields, strict=True))))
    except (UnicodeDecodeError, OSError) as exc:
        raise _read_error(path, exc) from None
    except csv.Error as exc:
        raise GeokdError(f"{path}: unreadable as delimited text ({exc}); check the file") from None
    return columns, rows


def _read_error(path: Path, exc: UnicodeDecodeError | OSError) -> GeokdError:
    """One line for a file that cannot be read as UTF-8 text."""
    if isinstance(exc, UnicodeDecodeError):
        return GeokdError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")
    return GeokdError(f"{path}: cannot read the file ({exc.strerror}); check its permissions")


def _read_jsonl(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GeokdError(
                        f"{where}: not valid JSON ({exc.msg}); each line must be one object"
                    ) from None
                if not isinstance(record, dict):
                    raise GeokdError(
                        f"{where}: expected a JSON object, got {type(record).__name__}; "
                        "each line must be one object"
                    )
                rows.append((where, record))
    except (UnicodeDecodeError, OSError) as exc:
        raise _read_error(path, exc) from None
    return rows


def _to_examples(
    spec: TaskSpec,
    split: str,
    rows: Sequence[_Row],
    text_columns: tuple[str, ...],
    label_column: str,
    source: str,
) -> tuple[TaskSpec, tuple[Example, ...]]:
    """Encode rows into examples; infer a custom task's label names from its train split first."""
    if not rows:
        raise GeokdError(f"{source}: split {split!r} has no data rows (empty split); check the file")
    texts = [tuple(_field(record, column, where) for column in text_columns) for where, record in rows]
    raw_labels = [_field(record, label_column, where, text=False) for where, record in rows]
    if not spec.is_regression and not spec.label_names:
        if split != "train":
            raise GeokdError(
                f"task {spec.name!r}: its labels are inferred from the train split, but {split!r} was "
                "loaded first; load train first and pass its DataSplit.task on, or give label_names"
            )
        spec = infer_label_names(spec, [label_text(raw) for raw in raw_labels])
    examples = tuple(
        Example(example_id=i, texts=row_texts, label=encode_label(spec, raw, where))
        for i, ((where, _), row_texts, raw) in enumerate(zip(rows, texts, raw_labels, strict=True))
    )
    return spec, examples


def _field(record: Mapping[str, Any], column: str, where: str, text: bool = True) -> Any:
    value = record.get(column)
    if value is None:
        present = ", ".join(map(str, record)) or "none"
        raise GeokdError(
            f"{where}: missing field {column!r} (fields: {present}); fix the row or the field names"
        )
    if text and not isinstance(value, str):
        if isinstance(value, (dict, list)):
            raise GeokdError(f"{where}: field {column!r} must be text, got {type(value).__name__}")
        value = str(value)
    return value


def _load_hub(spec: TaskSpec, split: str, name: str, config: str | None, given: str | None) -> DataSplit:
    """A split from the Hugging Face `datasets` hub (or its local cache)."""
    hub_split = _HUB_SPLITS[split]
    label = f"{name}" + (f" ({config})" if config else "")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=hub_split)
    except Exception as exc:  # offline, unknown name, no such config/split: all a user-facing failure
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        what = f"--data {given!r} is not an existing path, and loading it" if given else "loading it"
        raise GeokdError(
            f"task {spec.name!r}: {what} as {label} split {hub_split!r} from the Hugging Face datasets hub "
            f"failed ({reason}); pass --data DIR with the GLUE TSV files (train.tsv, dev.tsv)"
        ) from exc
    text_columns, label_column = spec.text_fields, spec.label_field
    missing = [c for c in (*text_columns, label_column) if c not in dataset.column_names]
    if missing:
        raise GeokdError(
            f"{label} split {hub_split!r}: missing column {missing[0]!r} (columns: "
            f"{', '.join(dataset.column_names)}); choose a dataset with the task's fields"
        )
    columns = {c: dataset[c] for c in (*text_columns, label_column)}  # column-wise: fast
    rows = [
        (f"{label} [{hub_split}] row {i}", {c: values[i] for c, values in columns.items()})
        for i in range(len(dataset))
    ]
    spec, examples = _to_examples(spec, split, rows, text_columns, label_column, f"{label} [{hub_split}]")
    fingerprint = getattr(dataset, "_fingerprint", None) or "unknown"
    return DataSplit(spec, split, examples, f"{label} [{hub_split}]", f"datasets:{fingerprint}")


def fingerprint_files(paths: Sequence[str | Path]) -> str:
    """`sha256:<hex>` of the data read, for provenance: for one file, the SHA-256 of its bytes (what
    `sha256sum` prints); for several, the SHA-256 of their `sha256sum`-style listing
    (`<hex>  <file name>` lines, in the order given)."""
    digests = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests.append((digest.hexdigest(), Path(path).name))
    if len(digests) == 1:
        return f"sha256:{digests[0][0]}"
    listing = "".join(f"{hexdigest}  {name}\n" for hexdigest, name in digests)
    return f"sha256:{hashlib.sha256(listing.encode()).hexdigest()}"


# --------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------


def tokenize_examples(
    examples: DataSplit | Sequence[Example], tokenizer: Any, max_length: int = 128, batch_size: int = 1024
) -> list[dict[str, Any]]:
    """Tokenise examples (single texts or pairs) with a Hugging Face tokenizer, truncating to
    `max_length` tokens (pairs: the longer text first). No padding: that is `collate`'s job.

    Returns one dict per example: `input_ids`, `attention_mask` and, when the tokenizer makes them,
    `token_type_ids` (lists of ints), plus `labels` (class id or score) and `example_id`.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise GeokdError(f"max_length must be a positive integer, got {max_length!r}")
    if isinstance(examples, DataSplit):
        examples = examples.examples
    if not examples:
        return []
    widths = {len(e.texts) for e in examples}
    if len(widths) != 1 or widths - {1, 2}:
        raise GeokdError(f"examples must all have one text or all two, got text counts {sorted(widths)}")
    pair = widths == {2}
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= special:
        raise GeokdError(
            f"max_length {max_length} leaves no room for text: the tokenizer adds {special} special "
            f"tokens to a {'pair' if pair else 'single text'}; use a larger max_length"
        )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    features: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        first = [e.texts[0] for e in chunk]
        second = [e.texts[1] for e in chunk] if pair else None
        encoded = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
        present = [k for k in keys if k in encoded]
        for i, example in enumerate(chunk):
            feature = {k: list(encoded[k][i]) for k in present}
            feature["labels"] = example.label
            feature["example_id"] = example.example_id
            features.append(feature)
    return features


def collate(
    features: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    regression: bool,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of `tokenize_examples` features to the longest in the batch.

    Returns `input_ids`, `attention_mask` (built from the lengths if the features lack it) and
    `token_type_ids` if present, all `[B, T]` int64 with `T` = the longest sequence; `labels` `[B]`
    (int64 for classification, float32 for regression) and `example_id` `[B]` int64. Padding uses
    `pad_token_id` for input ids and 0 elsewhere, on the right or (decoder models) the left.
    """
    import torch

    if not features:
        raise ValueError("collate needs at least one feature")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(f["input_ids"]) for f in features]
    batch_size, width = len(features), max(lengths)  # B, T
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    batch: dict[str, torch.Tensor] = {}
    for key, pad_value in pad_values.items():
        if key == "attention_mask" and key not in features[0]:
            sequences: Iterator[Sequence[int]] = ([1] * n for n in lengths)
        elif key in features[0]:
            sequences = (f[key] for f in features)
        else:
            continue
        padded = torch.full((batch_size, width), pad_value, dtype=torch.long)  # [B, T]
        for row, (values, n) in enumerate(zip(sequences, lengths, strict=True)):
            span = slice(0, n) if padding_side == "right" else slice(width - n, width)
            padded[row, span] = torch.as_tensor(values, dtype=torch.long)
        batch[key] = padded
    label_dtype = torch.float32 if regression else torch.long
    batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=label_dtype)  # [B]
    batch["example_id"] = torch.tensor([f["example_id"] for f in features], dtype=torch.long)  # [B]
    return batch


def make_collate_fn(
    tokenizer: Any, task: TaskSpec
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """`collate` bound to the tokenizer's pad token and padding side and the task's label type: a
    picklable `collate_fn` for `torch.utils.data.DataLoader`."""
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        raise GeokdError(
            f"tokenizer {type(tokenizer).__name__} has no pad token, so batches cannot be padded; "
            "set tokenizer.pad_token (e.g. to its eos_token) first"
        )
    return functools.partial(
        collate,
        pad_token_id=int(pad_token_id),
        regression=task.is_regression,
        padding_side=getattr(tokenizer, "padding_side", "right"),
    )
