"""Span-aligned token rows across tokenizers (`--features spans`, issue #12).

Two tokenizers cut the same text at different places. The spans are the groups of consecutive
tokens that end where *both* tokenisations end a token: every character boundary shared by the two
tokenisations closes a span, so a span is a whole number of tokens on each side and no span can be
split further without cutting a token of one side. (Where the tokenisations agree, every token is
its own span.) Each model's row for a span is the mean of its hidden states over its own tokens
inside the span, so the rows of the two models describe the same piece of text and token-level
geometry losses apply across tokenizers.

Boundaries are the end offsets of the tokens (character positions from the fast tokenizers'
`offset_mapping`), so whitespace a tokenizer folds into the next token (byte-level BPE's `Ġw`) or
drops (word-level) does not matter. The EOS that ends a training response is a span of its own.
Tokens after the last shared boundary (a response cut at `--max-length` differently on the two
sides) belong to no span and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from geokd.errors import GeokdError


def common_spans(ends_a: Sequence[int], ends_b: Sequence[int]) -> tuple[list[int], list[int], int]:
    """Span index of each token of tokenisation `a` and of `b` (-1: in no closed span), and the
    number of spans. `ends_*` are the tokens' end offsets, non-decreasing."""
    span_a: list[int] = []
    span_b: list[int] = []
    i = j = span = 0
    while i < len(ends_a) and j < len(ends_b):
        if ends_a[i] < ends_b[j]:
            span_a.append(span)
            i += 1
        elif ends_b[j] < ends_a[i]:
            span_b.append(span)
            j += 1
        else:  # a shared boundary closes the span (zero-width tokens ending there join it)
            span_a.append(span)
            span_b.append(span)
            i, j = i + 1, j + 1
            while i < len(ends_a) and ends_a[i] == ends_a[i - 1] and (j >= len(ends_b) or ends_b[j] != ends_a[i]):
                span_a.append(span)
                i += 1
            while j < len(ends_b) and ends_b[j] == ends_b[j - 1] and (i >= len(ends_a) or ends_a[i] != ends_b[j]):
                span_b.append(span)
                j += 1
            span += 1
    # An unclosed group (one side ran out first) is no span: its tokens and the rest are left out.
    span_a = [s if s < span else -1 for s in span_a] + [-1] * (len(ends_a) - len(span_a))
    span_b = [s if s < span else -1 for s in span_b] + [-1] * (len(ends_b) - len(span_b))
    return span_a, span_b, span


def response_token_ends(text: str, tokenizer: Any, expected: Sequence[int]) -> list[int]:
    """End offsets (in `text`) of the tokens `tokenizer` makes of a response, checked against the
    ids training uses (`expected`, without the EOS); the EOS gets `len(text) + 1`."""
    if not getattr(tokenizer, "is_fast", False):
        raise GeokdError(
            f"--features spans: {type(tokenizer).__name__} is not a fast tokenizer, so it has no character offsets; "
            "use --features mean or last"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if list(encoded["input_ids"]) != list(expected):
        raise GeokdError(
            f"--features spans: {type(tokenizer).__name__} tokenises a response differently with offsets than without; "
            "use --features mean or last"
        )
    return [int(end) for _, end in encoded["offset_mapping"]] + [len(text) + 1]


def span_rows(hidden: torch.Tensor, span_ids: torch.Tensor, n_spans: torch.Tensor) -> torch.Tensor:
    """`[S, d]` float32 rows: the mean of `hidden [B, T, d]` over the positions of each span.
    `span_ids [B, T]` gives each position's span within its example (-1: none), `n_spans [B]` the
    example's number of spans; the rows are example after example, span after span."""
    first = torch.cumsum(n_spans, 0) - n_spans  # [B]: the example's first global span
    valid = span_ids >= 0
    index = (span_ids + first.unsqueeze(1))[valid]
    total = int(n_spans.sum())
    rows = hidden.new_zeros((total, hidden.shape[-1]), dtype=torch.float32)
    rows.index_add_(0, index, hidden[valid].float())
    counts = torch.zeros(total, dtype=torch.float32, device=hidden.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float32)
    )
    return rows / counts.clamp_min(1.0).unsqueeze(1)
