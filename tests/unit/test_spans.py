"""Span alignment across tokenizers (`--features spans`, issue #12): hand-made offsets, the shared
boundaries rule, identical tokenisations giving one token per span (the token rows themselves),
truncation, and the span means against a direct computation."""

from __future__ import annotations

import pytest
import torch
from tinylm import make_bpe_tokenizer, make_tokenizer

from geokd import GeokdError
from geokd.models.spans import common_spans, response_token_ends, span_rows


def test_spans_close_at_shared_boundaries():
    # "w17 w3  w45" as byte-level BPE (w|17|Ġw|3|Ġ|Ġw|45) and as words (w17|w3|w45), + EOS (end 12).
    bpe = [1, 3, 5, 6, 7, 9, 11, 12]
    words = [3, 6, 11, 12]
    a, b, n = common_spans(bpe, words)
    assert n == 4 and a == [0, 0, 1, 1, 2, 2, 2, 3] and b == [0, 1, 2, 3]


def test_identical_tokenisations_give_one_token_per_span():
    ends = [2, 5, 9, 10]
    a, b, n = common_spans(ends, ends)
    assert a == b == [0, 1, 2, 3] and n == 4


def test_unclosed_tails_and_zero_width_tokens():
    # b was cut earlier: its last token ends at 7, a's tokens continue past it.
    a, b, n = common_spans([3, 6, 9, 12], [3, 7])
    assert n == 1 and a == [0, -1, -1, -1] and b == [0, -1]
    # A zero-width token (end equal to the previous end) joins the span it ends in.
    a, b, n = common_spans([3, 3, 6], [3, 6])
    assert a == [0, 0, 1] and b == [0, 1] and n == 2


def test_response_token_ends_from_real_fast_tokenizers():
    text = "w17 w3  w45"
    word, bpe = make_tokenizer(), make_bpe_tokenizer()
    word_ids = word(text, add_special_tokens=False)["input_ids"]
    bpe_ids = bpe(text, add_special_tokens=False)["input_ids"]
    a, b, n = common_spans(response_token_ends(text, bpe, bpe_ids), response_token_ends(text, word, word_ids))
    assert n == 4 and b == [0, 1, 2, 3] and a[-1] == 3 and sorted(set(a)) == [0, 1, 2, 3]
    with pytest.raises(GeokdError, match="tokenises a response differently"):
        response_token_ends(text, word, word_ids[:-1])


def test_span_rows_are_means_and_single_token_spans_are_the_token_rows():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3, dtype=torch.float64)
    spans = torch.tensor([[-1, 0, 0, 1, -1], [0, 1, 1, 1, -1]])
    rows = span_rows(hidden, spans, torch.tensor([2, 2]))
    want = torch.stack([hidden[0, 1:3].mean(0), hidden[0, 3], hidden[1, 0], hidden[1, 1:4].mean(0)]).float()
    torch.testing.assert_close(rows, want)
    # one token per span: the rows are the token rows, in order
    ones = torch.tensor([[-1, 0, 1, 2, 3]])
    torch.testing.assert_close(span_rows(hidden[:1], ones, torch.tensor([4])), hidden[0, 1:].float())
