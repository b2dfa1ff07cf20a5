"""Loading (GLUE TSV folders and files, custom CSV/TSV/JSONL, the `datasets` hub path), errors,
fingerprints, tokenisation and collation.

GLUE fixtures are written in tmp_path with the quirks of the real distribution: a UTF-8 BOM (MRPC),
bare double quotes (SST-2, MRPC, CoLA), a header-less CoLA file and label names (RTE, QNLI, MNLI).
The official row counts are checked on the real GLUE files when present ($GEOKD_DATA/glue, else
`../shared/data/glue`: `geokd.paths.shared_data_dir`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from _datadir import shared_data

from geokd import paths
from geokd.data import (
    GLUE_TSV_LAYOUTS,
    DataSplit,
    Example,
    collate,
    fingerprint_files,
    load_split,
    make_collate_fn,
    tokenize_examples,
)
from geokd.errors import GeokdError
from geokd.tasks import custom_task, get_task

# --------------------------------------------------------------------------------------------
# GLUE fixtures: (header or None, rows, expected (texts, label) per row) per split file
# --------------------------------------------------------------------------------------------

_MNLI_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2"
).split()
_STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def _mnli_row(i: int, premise: str, hypothesis: str, labels: list[str]) -> list[str]:
    return [
        str(i),
        "31193",
        f"{i}n",
        "government",
        "( x )",
        "( y )",
        "(ROOT x)",
        "(ROOT y)",
        premise,
        hypothesis,
        *labels,
    ]


GLUE_FIXTURES: dict[
    str, dict[str, tuple[list[str] | None, list[list[str]], list[tuple[tuple[str, ...], object]]]]
] = {
    "cola": {  # no header: source, label, original_label, sentence
        "train.tsv": (
            None,
            [
                ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
                ["gj04", "0", "*", 'They drank the "pub.'],
                ["cj99", "1", "", "The more you read, the less you understand."],
            ],
            [
                (("Our friends won't buy this analysis, let alone the next one we propose.",), 1),
                (('They drank the "pub.',), 0),
                (("The more you read, the less you understand.",), 1),
            ],
        ),
        "dev.tsv": (
            None,
            [["clc95", "0", "*", "Bill coughed his way out of the restaurant the."]],
            [(("Bill coughed his way out of the restaurant the.",), 0)],
        ),
    },
    "sst2": {
        "train.tsv": (
            ["sentence", "label"],
            [
                ["hide new secretions from the parental units ", "0"],
                ['" the quote opens here and never closes ', "1"],  # a bare quote at the start of a field
                ['a "quoted" word , and a comma ', "1"],
                ["unflinchingly bleak and desperate ", "0"],
            ],
            [
                (("hide new secretions from the parental units ",), 0),
                (('" the quote opens here and never closes ',), 1),
                (('a "quoted" word , and a comma ',), 1),
                (("unflinchingly bleak and desperate ",), 0),
            ],
        ),
        "dev.tsv": (
            ["sentence", "label"],
            [["it 's a charming journey . ", "1"]],
            [(("it 's a charming journey . ",), 1)],
        ),
    },
    "mrpc": {  # written with a BOM (see _write_glue)
        "train.tsv": (
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [
                ["1", "702876", "702977", 'Amrozi called him "the witness".', '"The witness, Amrozi said.'],
                ["0", "2108705", "2108831", "Yucaipa owned Dominick's.", "Yucaipa bought Dominick's."],
            ],
            [
                (('Amrozi called him "the witness".', '"The witness, Amrozi said.'), 1),
                (("Yucaipa owned Dominick's.", "Yucaipa bought Dominick's."), 0),
            ],
        ),
        "dev.tsv": (
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [
                [
                    "1",
                    "1355540",
                    "1355592",
                    "He said the pie business doesn't fit.",
                    '"The pie business does not fit.',
                ]
            ],
            [(("He said the pie business doesn't fit.", '"The pie business does not fit.'), 1)],
        ),
    },
    "qqp": {
        "train.tsv": (
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [
                ["133273", "213221", "213222", 'How do I "learn" fast?', "How to learn quickly?", "1"],
                ["402555", "536040", "536041", "What is x?", "What is y?", "0"],
            ],
            [(('How do I "learn" fast?', "How to learn quickly?"), 1), (("What is x?", "What is y?"), 0)],
        ),
        "dev.tsv": (
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [["1", "2", "3", "Why?", "Why not?", "0"]],
            [(("Why?", "Why not?"), 0)],
        ),
    },
    "stsb": {  # the GLUE layout with source1/source2 (the shared copy has the 8-column one)
        "train.tsv": (
            _STSB_HEADER,
            [
                [
                    "0",
                    "main-captions",
                    "MSRvid",
                    "2012test",
                    "0001",
                    "none",
                    "none",
                    "A plane is taking off.",
                    "An air plane is taking off.",
                    "5.000",
                ],
                [
                    "1",
                    "main-captions",
                    "MSRvid",
                    "2012test",
                    "0004",
                    "none",
                    "none",
                    "A man plays a flute.",
                    "A man plays a large flute.",
                    "3.800",
                ],
            ],
            [
                (("A plane is taking off.", "An air plane is taking off."), 5.0),
                (("A man plays a flute.", "A man plays a large flute."), 3.8),
            ],
        ),
        "dev.tsv": (
            _STSB_HEADER,
            [
                [
                    "0",
                    "main-forums",
                    "f",
                    "2014",
                    "0000",
                    "none",
                    "none",
                    "A cat sleeps.",
                    "A dog runs.",
                    "0.000",
                ]
            ],
            [(("A cat sleeps.", "A dog runs."), 0.0)],
        ),
    },
    "mnli": {  # label names; gold_label is the last column; dev has five annotator labels
        "train.tsv": (
            [*_MNLI_HEADER, "label1", "gold_label"],
            [
                _mnli_row(
                    0,
                    "Conceptually cream skimming has two dimensions.",
                    "Product and geography matter.",
                    ["neutral", "neutral"],
                ),
                _mnli_row(
                    1, 'you know "during the season".', "You lose the things.", ["entailment", "entailment"]
                ),
            ],
            [
                (("Conceptually cream skimming has two dimensions.", "Product and geography matter."), 1),
                (('you know "during the season".', "You lose the things."), 0),
            ],
        ),
        "dev_matched.tsv": (
            [*_MNLI_HEADER, "label1", "label2", "label3", "label4", "label5", "gold_label"],
            [
                _mnli_row(
                    0,
                    "The new rights are nice.",
                    "Everyone hates them.",
                    ["contradiction"] * 5 + ["contradiction"],
                )
            ],
            [(("The new rights are nice.", "Everyone hates them."), 2)],
        ),
        "dev_mismatched.tsv": (
            [*_MNLI_HEADER, "label1", "label2", "label3", "label4", "label5", "gold_label"],
            [
                _mnli_row(0, "Your gift is appreciated.", "Hundreds gave.", ["neutral"] * 6),
                _mnli_row(1, "Yes.", "No.", ["contradiction"] * 6),
            ],
            [(("Your gift is appreciated.", "Hundreds gave."), 1), (("Yes.", "No."), 2)],
        ),
    },
    "qnli": {
        "train.tsv": (
            ["index", "question", "sentence", "label"],
            [
                ["0", "When did it start?", "It started in 1990.", "entailment"],
                ["1", "Who?", "Nobody knows where.", "not_entailment"],
            ],
            [(("When did it start?", "It started in 1990."), 0), (("Who?", "Nobody knows where."), 1)],
        ),
        "dev.tsv": (
            ["index", "question", "sentence", "label"],
            [["0", "What?", "That.", "entailment"]],
            [(("What?", "That."), 0)],
        ),
    },
    "rte": {
        "train.tsv": (
            ["index", "sentence1", "sentence2", "label"],
            [
                [
                    "0",
                    "No Weapons of Mass Destruction Found in Iraq Yet.",
                    "Weapons Found in Iraq.",
                    "not_entailment",
                ],
                ["1", 'He said "go".', "He spoke.", "entailment"],
            ],
            [
                (("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons Found in Iraq."), 1),
                (('He said "go".', "He spoke."), 0),
            ],
        ),
        "dev.tsv": (
            ["index", "sentence1", "sentence2", "label"],
            [["0", "Dana died.", "Dana lived.", "not_entailment"]],
            [(("Dana died.", "Dana lived."), 1)],
        ),
    },
    "wnli": {  # ids: 1 = entailment
        "train.tsv": (
            ["index", "sentence1", "sentence2", "label"],
            [
                ["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"],
                ["1", "John could not see the stage.", "The stage was short.", "0"],
            ],
            [
                (("I stuck a pin through a carrot.", "The carrot had a hole."), 1),
                (("John could not see the stage.", "The stage was short."), 0),
            ],
        ),
        "dev.tsv": (
            ["index", "sentence1", "sentence2", "label"],
            [["0", "A.", "B.", "0"]],
            [(("A.", "B."), 0)],
        ),
    },
}


def _write_lines(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _write_glue(root: Path, task: str) -> Path:
    """Write the task's fixture files into root/<GLUE folder>/ and return that folder."""
    folder = root / GLUE_TSV_LAYOUTS[task].directory
    for name, (header, rows, _) in GLUE_FIXTURES[task].items():
        lines = (["\t".join(header)] if header else []) + ["\t".join(row) for row in rows]
        _write_lines(folder / name, lines, bom=task == "mrpc")
    return folder


def _one_line(exc_info: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------------------------
# GLUE TSV
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(GLUE_FIXTURES))
def test_glue_folder_loads_every_split_with_texts_labels_and_ids(task, tmp_path):
    folder = _write_glue(tmp_path, task)
    for file_name, (_, rows, expected) in GLUE_FIXTURES[task].items():
        split = file_name.removesuffix(".tsv")
        loaded = load_split(task, folder, split)
        assert isinstance(loaded, DataSplit) and loaded.split == split and loaded.task is get_task(task)
        assert len(loaded) == len(rows)
        assert [(e.texts, e.label) for e in loaded.examples] == expected
        assert [e.example_id for e in loaded.examples] == list(range(len(rows)))
        assert all(type(e.label) is (float if task == "stsb" else int) for e in loaded.examples)
        assert loaded.source == str(folder / file_name)
        assert loaded.fingerprint == "sha256:" + hashlib.sha256((folder / file_name).read_bytes()).hexdigest()


def test_fixtures_reproduce_the_quirks_a_naive_reader_gets_wrong(tmp_path):
    sst2 = _write_glue(tmp_path, "sst2") / "train.tsv"
    with open(sst2, encoding="utf-8", newline="") as handle:
        naive = list(csv.reader(handle, delimiter="\t"))  # default quoting: '"' opens a quoted field
    assert len(naive) - 1 != len(GLUE_FIXTURES["sst2"]["train.tsv"][1])  # rows merged
    assert len(load_split("sst2", sst2.parent, "train")) == 4
    mrpc = _write_glue(tmp_path, "mrpc") / "train.tsv"
    assert mrpc.read_bytes().startswith(b"\xef\xbb\xbfQuality")
    with open(mrpc, encoding="utf-8") as handle:
        assert handle.readline().split("\t")[0] == "\ufeffQuality"  # a plain utf-8 read keeps the BOM
    assert load_split("mrpc", mrpc.parent, "train").examples[0].label == 1


def test_glue_root_folder_file_path_and_mnli_dev(tmp_path):
    for task in ("rte", "mnli"):
        _write_glue(tmp_path, task)
    # the GLUE root: the task's sub-folder is found
    assert len(load_split("rte", tmp_path, "dev")) == 1
    # a file path: read with the task's layout, for the split named
    direct = load_split("rte", tmp_path / "RTE" / "train.tsv", "train")
    assert [e.label for e in direct.examples] == [1, 0]
    # MNLI: dev means matched; validation_mismatched is an alias
    matched = load_split("mnli", tmp_path / "MNLI", "dev")
    assert matched.split == "dev_matched" and len(matched) == 1
    mismatched = load_split("mnli", tmp_path, "validation_mismatched")
    assert mismatched.split == "dev_mismatched" and [e.label for e in mismatched.examples] == [1, 2]


def test_stsb_without_source_columns_loads_by_header_name(tmp_path):
    header = "index genre filename year old_index sentence1 sentence2 score".split()
    row = ["0", "main-captions", "MSRvid", "2012test", "0000", "A man dances.", "A man is dancing.", "4.750"]
    path = _write_lines(tmp_path / "dev.tsv", ["\t".join(header), "\t".join(row)])
    loaded = load_split("stsb", path, "dev")
    assert loaded.examples == (Example(0, ("A man dances.", "A man is dancing."), 4.75),)


def test_glue_task_from_jsonl_uses_the_datasets_field_names(tmp_path):
    path = tmp_path / "rte.jsonl"
    rows = [
        {"sentence1": "A.", "sentence2": "B.", "label": "entailment"},
        {"sentence1": "C.", "sentence2": "D.", "label": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [(e.texts, e.label) for e in load_split("rte", path, "train").examples] == [
        (("A.", "B."), 0),
        (("C.", "D."), 1),
    ]


def _glue_error_case(name: str, tmp_path: Path) -> tuple[str, str, object, tuple[str, ...]]:
    """(task, split, data, message fragments) for one kind of bad input."""
    write = _write_lines
    if name == "missing file":
        return (
            "sst2",
            "dev",
            str(tmp_path / "missing" / "dev.tsv"),
            ("no such file or folder", "missing/dev.tsv"),
        )
    if name == "missing relative path":
        return "sst2", "dev", "./nope", ("no such file or folder: './nope'",)
    if name == "folder without the split file":
        (tmp_path / "nothing").mkdir()
        return "sst2", "dev", tmp_path / "nothing", ("no dev.tsv for task 'sst2'", "SST-2/dev.tsv")
    if name == "another task's folder":
        return (
            "sst2",
            "dev",
            _write_glue(tmp_path, "rte"),
            (
                "missing column 'sentence'",
                "columns: index, sentence1, sentence2, label",
                "is this the sst2 data?",
            ),
        )
    if name == "unlabelled test file":
        path = write(tmp_path / "test.tsv", ["index\tsentence", "0\tno label here"])
        return "sst2", "dev", path, ("missing column 'label'", "GLUE test files have no labels")
    if name == "empty file":
        path = write(tmp_path / "dev.tsv", [])
        return "sst2", "dev", path, ("dev.tsv: the file is empty",)
    if name == "empty split":
        path = write(tmp_path / "empty" / "dev.tsv", ["sentence\tlabel"])
        return "sst2", "dev", path.parent, ("has no data rows (empty split)", "empty/dev.tsv")
    if name == "label outside the label space":
        path = write(tmp_path / "bad_label.tsv", ["sentence\tlabel", "good\t1", "odd\t2"])
        return (
            "sst2",
            "dev",
            path,
            ("bad_label.tsv:3: label '2' is outside the label space", "0=negative, 1=positive"),
        )
    if name == "non-numeric STS-B score":
        row = ["0", "g", "f", "y", "0", "s", "s", "A.", "B.", "n/a"]
        path = write(tmp_path / "bad_score.tsv", ["\t".join(_STSB_HEADER), "\t".join(row)])
        return "stsb", "dev", path, ("bad_score.tsv:2: score 'n/a' is not a number",)
    if name == "stray tab":
        path = write(tmp_path / "stray.tsv", ["sentence\tlabel", "one\ttab\ttoo many\t1"])
        return "sst2", "dev", path, ("stray.tsv:2: expected 2 fields (sentence, label), got 4",)
    if name == "CoLA file with a header":
        path = write(tmp_path / "cola.tsv", ["sentence\tlabel", "A sentence.\t1"])
        return "cola", "dev", path, ("cola.tsv:1: expected 4 fields",)
    if name == "not UTF-8":
        path = tmp_path / "latin1.tsv"
        path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
        return "sst2", "dev", path, ("not UTF-8 text", "save it as UTF-8")
    if name == "unknown task":
        return "sst3", "dev", _write_glue(tmp_path, "sst2"), ("unknown task 'sst3'",)
    assert name == "unknown split"
    return "sst2", "test", _write_glue(tmp_path, "sst2"), ("task 'sst2' has no split 'test'",)


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "missing relative path",
        "folder without the split file",
        "another task's folder",
        "unlabelled test file",
        "empty file",
        "empty split",
        "label outside the label space",
        "non-numeric STS-B score",
        "stray tab",
        "CoLA file with a header",
        "not UTF-8",
        "unknown task",
        "unknown split",
    ],
)
def test_bad_glue_input_is_one_error_line_with_the_value_and_fix(case, tmp_path):
    task, split, data, fragments = _glue_error_case(case, tmp_path)
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, data, split)
    _one_line(exc_info, *fragments)


def test_fingerprints(tmp_path):
    a = _write_lines(tmp_path / "a.tsv", ["sentence\tlabel", "x\t1"])
    b = _write_lines(tmp_path / "b.tsv", ["sentence\tlabel", "y\t0"])
    digest_a = hashlib.sha256(a.read_bytes()).hexdigest()
    assert fingerprint_files([a]) == f"sha256:{digest_a}"  # what `sha256sum a.tsv` prints
    listing = f"{digest_a}  a.tsv\n{hashlib.sha256(b.read_bytes()).hexdigest()}  b.tsv\n"
    assert fingerprint_files([a, b]) == "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    assert fingerprint_files([a, b]) != fingerprint_files([b, a])
    before = load_split("sst2", a, "dev").fingerprint
    _write_lines(a, ["sentence\tlabel", "x\t0"])
    assert load_split("sst2", a, "dev").fingerprint != before


# --------------------------------------------------------------------------------------------
# Custom tasks
# --------------------------------------------------------------------------------------------


def test_custom_csv_infers_sorted_labels_from_train_and_reuses_them(tmp_path):
    _write_lines(
        tmp_path / "train.csv",
        [
            "premise,hypothesis,y",
            '"Hello, world",plain,pos',
            '"She said ""hi""",x,neg',
            "a,b,neutral",
            "c,d,pos",
        ],
    )
    _write_lines(tmp_path / "dev.csv", ["y,premise,hypothesis", "neg,e,f", "pos,g,h"])
    task = custom_task(("premise", "hypothesis"), "y")
    train = load_split(task, tmp_path, "train")
    assert train.task.label_names == ("neg", "neutral", "pos") and train.task.num_labels == 3
    assert [(e.texts, e.label) for e in train.examples] == [
        (("Hello, world", "plain"), 2),
        (('She said "hi"', "x"), 0),
        (("a", "b"), 1),
        (("c", "d"), 2),
    ]
    dev = load_split(train.task, tmp_path, "dev")  # the inferred mapping, columns in any order
    assert [e.label for e in dev.examples] == [0, 2] and dev.task is train.task
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, tmp_path, "dev")  # labels unknown yet: train must come first
    _one_line(exc_info, "inferred from the train split", "load train first")
    with pytest.raises(GeokdError) as exc_info:
        load_split(custom_task(("premise", "hypothesis"), "y", num_labels=2), tmp_path, "train")
    _one_line(exc_info, "train.csv:2: label 'pos' is outside the label space", "(0=0, 1=1)")


def test_custom_unseen_dev_label_and_missing_columns(tmp_path):
    train = _write_lines(tmp_path / "train.tsv", ["text\tlabel", 'a "bare" quote\tyes', "b\tno"])
    dev = _write_lines(tmp_path / "dev.tsv", ["text\tlabel", "c\tmaybe"])
    task = load_split(custom_task(["text"], "label"), train, "train").task
    # TSV: no quote processing, as in GLUE
    assert load_split(task, train, "train").examples[0].texts == ('a "bare" quote',)
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, dev, "dev")
    _one_line(exc_info, "dev.tsv:2: label 'maybe' is outside the label space", "0=no, 1=yes")
    with pytest.raises(GeokdError) as exc_info:
        load_split(custom_task(["txt"], "label"), train, "train")
    _one_line(exc_info, "missing column 'txt'", "columns: text, label", "--text-fields")


def test_custom_jsonl_classification_and_regression(tmp_path):
    rows = [{"q": "first", "y": 1}, {"q": "second", "y": 0, "extra": [1]}, {"q": 3, "y": 1}]
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in rows] + [""])
    loaded = load_split(custom_task(["q"], "y"), path, "train")
    assert loaded.task.label_names == ("0", "1")  # integer labels map to themselves
    assert [(e.texts, e.label) for e in loaded.examples] == [(("first",), 1), (("second",), 0), (("3",), 1)]
    scores = _write_lines(
        tmp_path / "scores.jsonl", [json.dumps({"q": "a", "y": 0.25}), json.dumps({"q": "b", "y": "-3"})]
    )
    regression = load_split(custom_task(["q"], "y", num_labels=1), scores, "dev")
    assert [e.label for e in regression.examples] == [0.25, -3.0]
    cases = [
        (['{"q": "a", "y": "x"}', '{"q": "b"}'], ("bad.jsonl:2: missing field 'y'", "fields: q")),
        (['{"q": "a", "y": "x"}', "{not json"], ("bad.jsonl:2: not valid JSON",)),
        (['["q", "y"]'], ("bad.jsonl:1: expected a JSON object, got list",)),
        (['{"q": "a", "y": "high"}'], ("bad.jsonl:1: score 'high' is not a number",)),
        (['{"q": {"nested": 1}, "y": 1}'], ("field 'q' must be text, got dict",)),
        ([""], ("split 'train' has no data rows",)),
    ]
    for lines, fragments in cases:
        bad = _write_lines(tmp_path / "bad.jsonl", lines)
        with pytest.raises(GeokdError) as exc_info:
            load_split(custom_task(["q"], "y", num_labels=1), bad, "train")
        _one_line(exc_info, *fragments)


def test_custom_folder_file_lookup_and_format_errors(tmp_path):
    task = custom_task(["t"], "y")
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, tmp_path, "train")
    _one_line(exc_info, "no train file", "train.csv, train.tsv, train.jsonl")
    _write_lines(tmp_path / "train.csv", ["t,y", "a,1", "b,0"])
    assert len(load_split(task, tmp_path, "train")) == 2
    _write_lines(tmp_path / "train.jsonl", ['{"t": "a", "y": 1}'])
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, tmp_path, "train")
    _one_line(exc_info, "more than one train file", "found train.csv, train.jsonl")
    odd = _write_lines(tmp_path / "data.parquet", ["x"])
    with pytest.raises(GeokdError, match="cannot tell the format"):
        load_split(task, odd, "train")
    with pytest.raises(GeokdError) as exc_info:
        load_split(task, None, "train")
    _one_line(exc_info, "needs --data")


# --------------------------------------------------------------------------------------------
# The `datasets` hub path
# --------------------------------------------------------------------------------------------


def _force_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_DATASETS_OFFLINE=1 as the library sees it, even if `datasets` was imported earlier."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.mark.parametrize(
    "data, fragments",
    [
        (None, ("task 'sst2': loading it as nyu-mll/glue (sst2) split 'validation'", "pass --data DIR")),
        (
            "someone/some-dataset",
            ("--data 'someone/some-dataset' is not an existing path", "pass --data DIR"),
        ),
    ],
)
def test_unreachable_hub_fails_fast_and_says_pass_data(data, fragments, monkeypatch, tmp_path):
    _force_offline(monkeypatch)
    import datasets.config
    import huggingface_hub.constants

    # empty caches, so a copy cached on this machine cannot make the load succeed
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    start = time.perf_counter()
    with pytest.raises(GeokdError) as exc_info:
        load_split("sst2", data, "dev")
    assert time.perf_counter() - start < 15.0  # offline: no retries, no hanging
    _one_line(exc_info, *fragments)


def test_hub_records_are_mapped_by_the_datasets_field_names(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(
            {"premise": ["P0", "P1"], "hypothesis": ["H0", "H1"], "label": [2, 0], "idx": [0, 1]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_split("mnli", None, "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert [(e.example_id, e.texts, e.label) for e in loaded.examples] == [
        (0, ("P0", "H0"), 2),
        (1, ("P1", "H1"), 0),
    ]
    assert loaded.fingerprint.startswith("datasets:") and loaded.fingerprint != "datasets:unknown"
    load_split("mnli", "glue", "dev")  # the short name gets the task's config
    load_split("mnli", "me/my-nli:v2", "train")  # name:config
    assert calls[1:] == [("glue", "mnli", "validation_matched"), ("me/my-nli", "v2", "train")]
    with pytest.raises(GeokdError) as exc_info:
        load_split("rte", "me/other", "train")
    _one_line(exc_info, "missing column 'sentence1'", "columns: premise, hypothesis, label, idx")


# --------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------

_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"a man is dancing the cat sat on mat . good bad".split(),
]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(_VOCAB) + "\n")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5: `vocab` takes the file path


@pytest.fixture(scope="module")
def wordlevel_tokenizer():
    """A tokenizer without token_type_ids or special tokens (GPT-style), with left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2, "man": 3, "cat": 4}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


PAIRS = (
    Example(7, ("a man is dancing .", "the cat"), 1),
    Example(3, ("good", "the cat sat on the mat ."), 0),
    Example(0, ("bad", "a"), 1),
)


def test_tokenize_pairs_matches_the_tokenizer_and_keeps_labels_and_ids(bert_tokenizer):
    features = tokenize_examples(PAIRS, bert_tokenizer, max_length=32)
    assert [f["example_id"] for f in features] == [7, 3, 0] and [f["labels"] for f in features] == [1, 0, 1]
    for example, feature in zip(PAIRS, features, strict=True):
        expected = bert_tokenizer(*example.texts)
        assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels", "example_id"}
        assert feature["input_ids"] == expected["input_ids"]
        assert feature["token_type_ids"] == expected["token_type_ids"]
        assert feature["attention_mask"] == [1] * len(expected["input_ids"])
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert features[2]["input_ids"] == [cls, _VOCAB.index("bad"), sep, _VOCAB.index("a"), sep]
    assert features[2]["token_type_ids"] == [0, 0, 0, 1, 1]


def test_tokenize_truncates_to_max_length_and_batches(bert_tokenizer):
    features = tokenize_examples(PAIRS, bert_tokenizer, max_length=6, batch_size=2)
    assert [len(f["input_ids"]) for f in features] == [6, 6, 5]
    assert all(
        f["input_ids"][0] == bert_tokenizer.cls_token_id and f["input_ids"][-1] == bert_tokenizer.sep_token_id
        for f in features
    )
    singles = [Example(i, (text,), 0) for i, text in enumerate(["a man is dancing on the mat .", "cat"])]
    single = tokenize_examples(singles, bert_tokenizer, max_length=4)
    assert [len(f["input_ids"]) for f in single] == [4, 3] and "token_type_ids" in single[0]
    assert tokenize_examples([], bert_tokenizer) == []


def test_tokenize_accepts_a_datasplit_and_rejects_bad_arguments(
    bert_tokenizer, wordlevel_tokenizer, tmp_path
):
    split = load_split("rte", _write_glue(tmp_path, "rte"), "train")
    features = tokenize_examples(split, bert_tokenizer, max_length=16)
    assert [f["example_id"] for f in features] == [0, 1]
    no_types = tokenize_examples([Example(0, ("a man",), 0)], wordlevel_tokenizer, max_length=8)
    assert no_types == [{"input_ids": [2, 3], "attention_mask": [1, 1], "labels": 0, "example_id": 0}]
    with pytest.raises(GeokdError) as exc_info:
        tokenize_examples(PAIRS, bert_tokenizer, max_length=3)
    _one_line(exc_info, "max_length 3 leaves no room", "adds 3 special tokens to a pair")
    with pytest.raises(GeokdError, match="positive integer, got 0"):
        tokenize_examples(PAIRS, bert_tokenizer, max_length=0)
    with pytest.raises(GeokdError, match="all have one text or all two"):
        tokenize_examples([PAIRS[0], Example(1, ("a",), 0)], bert_tokenizer)


def test_collate_pads_to_the_longest_with_masks_and_typed_labels(bert_tokenizer):
    features = tokenize_examples(PAIRS, bert_tokenizer, max_length=32)
    lengths = [len(f["input_ids"]) for f in features]
    batch = make_collate_fn(bert_tokenizer, get_task("rte"))(features)
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "example_id"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long  # [B, T]
    for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["input_ids"][row, n:].eq(bert_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["token_type_ids"][row, n:].eq(0).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]
    assert batch["example_id"].tolist() == [7, 3, 0]
    regression = make_collate_fn(bert_tokenizer, get_task("stsb"))(
        [dict(f, labels=score) for f, score in zip(features, (4.75, 0.0, 2.5), strict=True)]
    )
    assert regression["labels"].dtype == torch.float32 and regression["labels"].tolist() == [4.75, 0.0, 2.5]


def test_collate_left_padding_and_a_missing_attention_mask(wordlevel_tokenizer):
    features = tokenize_examples(
        [Example(0, ("a man cat",), 1), Example(1, ("cat",), 0)], wordlevel_tokenizer, 8
    )
    batch = make_collate_fn(wordlevel_tokenizer, get_task("sst2"))(features)
    assert batch["input_ids"].tolist() == [[2, 3, 4], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "token_type_ids" not in batch
    bare = [
        {"input_ids": [5, 6], "labels": 0, "example_id": 0},
        {"input_ids": [5], "labels": 1, "example_id": 1},
    ]
    built = collate(bare, pad_token_id=9, regression=False)
    assert built["input_ids"].tolist() == [[5, 6], [5, 9]]
    assert built["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError):
        collate([], pad_token_id=0, regression=False)


def test_make_collate_fn_needs_a_pad_token(wordlevel_tokenizer):
    import copy

    tokenizer = copy.deepcopy(wordlevel_tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(GeokdError) as exc_info:
        make_collate_fn(tokenizer, get_task("sst2"))
    _one_line(exc_info, "has no pad token", "set tokenizer.pad_token")


def test_shuffled_dataloader_batches_map_back_by_example_id(bert_tokenizer, tmp_path):
    import pickle

    split = load_split("mnli", _write_glue(tmp_path, "mnli"), "train")
    features = tokenize_examples(split, bert_tokenizer, max_length=16)
    collate_fn = make_collate_fn(bert_tokenizer, split.task)
    pickle.dumps(collate_fn)  # usable with DataLoader workers
    loader = torch.utils.data.DataLoader(
        features,
        batch_size=2,
        shuffle=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(1),
    )
    by_id = {e.example_id: e for e in split.examples}
    seen = []
    for batch in loader:
        for row, example_id in enumerate(batch["example_id"].tolist()):
            assert batch["labels"][row].item() == by_id[example_id].label
            seen.append(example_id)
    assert sorted(seen) == [0, 1]


# --------------------------------------------------------------------------------------------
# The real GLUE files (<data folder>/glue, see geokd.paths): official row counts
# --------------------------------------------------------------------------------------------

OFFICIAL_ROWS = {
    ("sst2", "train"): 67_349,
    ("sst2", "dev"): 872,
    ("mrpc", "train"): 3_668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2_490,
    ("rte", "dev"): 277,
    ("stsb", "train"): 5_749,
    ("stsb", "dev"): 1_500,
}


@pytest.mark.parametrize("task, split", list(OFFICIAL_ROWS))
def test_real_glue_files_give_the_official_row_counts(task, split):
    loaded = load_split(task, shared_data("glue", GLUE_TSV_LAYOUTS[task].directory), split)
    assert len(loaded) == OFFICIAL_ROWS[task, split]
    assert [e.example_id for e in loaded.examples] == list(range(len(loaded)))
    spec = loaded.task
    if spec.is_regression:
        assert all(0.0 <= e.label <= 5.0 for e in loaded.examples)
    else:
        assert {e.label for e in loaded.examples} == set(range(spec.num_labels))  # both classes occur
    assert all(len(e.texts) == len(spec.text_fields) and e.texts[0] for e in loaded.examples)
    # the bare quotes survive as text, not as field delimiters
    if (task, split) == ("mrpc", "dev"):
        assert loaded.examples[0].texts[1].startswith('"The foodservice pie business')
        assert loaded.examples[0].label == 1


def test_cache_size_estimate_counts_every_tensor_byte():
    import torch

    from geokd.cache import DTYPES, expected_bytes, parse_cache_layers

    lengths = [5, 9, 3]
    for features in ("cls", "tokens"):
        for dtype in DTYPES:
            rows = sum(lengths) if features == "tokens" else len(lengths)
            tensors = [torch.zeros(rows, 16, dtype=DTYPES[dtype]) for _ in range(2)]
            tensors += [torch.zeros(3, dtype=torch.long), torch.zeros(3, 2)]  # example ids, logits
            if features == "tokens":
                tensors.append(torch.zeros(4, dtype=torch.long))  # offsets
            actual = sum(t.numel() * t.element_size() for t in tensors)
            assert expected_bytes(lengths, 2, 16, dtype, features, num_labels=2, logits=True) == actual
    assert parse_cache_layers("all", 4) == (1, 2, 3, 4)
    assert parse_cache_layers("4, 2,2", 6) == (2, 4)


# --------------------------------------------------------------------------------------------
# Where the real data is found (geokd.paths): $GEOKD_DATA wins, else ../shared/data by the checkout
# --------------------------------------------------------------------------------------------


def test_shared_data_dir_prefers_geokd_data_then_the_checkout_folder(tmp_path, monkeypatch):
    env_data, checkout_data = tmp_path / "env", tmp_path / "checkout" / "shared" / "data"
    env_data.mkdir()
    checkout_data.mkdir(parents=True)
    monkeypatch.setattr(paths, "CHECKOUT_DATA", checkout_data)
    monkeypatch.setenv("GEOKD_DATA", str(env_data))
    assert paths.shared_data_dir() == env_data.resolve()  # the variable wins over the checkout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEOKD_DATA", "env")  # relative to the current directory
    assert paths.shared_data_dir() == env_data.resolve()
    for unset in ("", "  "):  # empty counts as unset
        monkeypatch.setenv("GEOKD_DATA", unset)
        assert paths.shared_data_dir() == checkout_data
    monkeypatch.delenv("GEOKD_DATA")
    assert paths.shared_data_dir() == checkout_data
    monkeypatch.setattr(paths, "CHECKOUT_DATA", tmp_path / "nowhere")
    assert paths.shared_data_dir() is None
    monkeypatch.setattr(paths, "CHECKOUT_DATA", None)  # an installed geokd: no checkout folder
    assert paths.shared_data_dir() is None


def test_the_default_checkout_folder_is_the_projects_sibling_shared_data():
    root = Path(__file__).resolve().parents[2]
    assert paths.CHECKOUT_DATA == root.parent / "shared" / "data"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_geokd_data_that_is_no_folder_is_a_one_line_error(tmp_path, monkeypatch, kind):
    target = tmp_path / "data"
    if kind == "file":
        target.write_text("not a folder")
    monkeypatch.setattr(paths, "CHECKOUT_DATA", tmp_path)  # exists, yet never used instead
    monkeypatch.setenv("GEOKD_DATA", str(target))
    with pytest.raises(GeokdError) as info:
        paths.shared_data_dir()
    message = str(info.value)
    assert "GEOKD_DATA" in message and str(target) in message and "\n" not in message
    assert ("does not exist" if kind == "missing" else "is not a folder") in message


def test_require_shared_data_names_the_option_and_both_places(tmp_path, monkeypatch):
    monkeypatch.delenv("GEOKD_DATA", raising=False)
    monkeypatch.setattr(paths, "CHECKOUT_DATA", tmp_path / "absent")
    with pytest.raises(GeokdError, match="pass --glue") as info:
        paths.require_shared_data("glue", option="--glue")
    assert "GEOKD_DATA" in str(info.value) and str(tmp_path / "absent") in str(info.value)
    monkeypatch.setenv("GEOKD_DATA", str(tmp_path))
    (tmp_path / "glue").mkdir()
    assert paths.require_shared_data("glue", option="--glue") == (tmp_path / "glue").resolve()
    with pytest.raises(GeokdError, match="instruct does not exist .* from GEOKD_DATA"):
        paths.require_shared_data("instruct", option="--data")


def test_data_tests_skip_with_a_reason_naming_both_places(tmp_path, monkeypatch):
    monkeypatch.delenv("GEOKD_DATA", raising=False)
    monkeypatch.setattr(paths, "CHECKOUT_DATA", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="GEOKD_DATA") as info:
        shared_data("glue")
    assert str(tmp_path / "absent") in str(info.value)
    monkeypatch.setenv("GEOKD_DATA", str(tmp_path / "typo"))
    with pytest.raises(pytest.skip.Exception, match="typo does not exist"):
        shared_data("glue")
    monkeypatch.setenv("GEOKD_DATA", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="lacks"):
        shared_data("glue")
    (tmp_path / "glue").mkdir()
    assert shared_data("glue") == (tmp_path / "glue").resolve()
