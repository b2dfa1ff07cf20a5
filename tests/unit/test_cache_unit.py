"""geokd.cache helpers: the tokenizer hash ignores class names and run-time state."""

from __future__ import annotations

from transformers import BertTokenizer, DistilBertTokenizer

from geokd.cache import tokenizer_sha256

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]


def test_tokenizer_hash_is_about_the_token_ids_only():
    bert = BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})
    distil = DistilBertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})
    before = tokenizer_sha256(bert)
    assert tokenizer_sha256(distil) == before  # one vocabulary, two classes
    bert(["good film"], truncation=True, max_length=4, padding="max_length")
    assert tokenizer_sha256(bert) == before  # truncation/padding state is not the tokenizer
    swapped = list(VOCAB)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    assert tokenizer_sha256(BertTokenizer(vocab={t: i for i, t in enumerate(swapped)})) != before
    lower = BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=False)
    assert tokenizer_sha256(lower) != before  # normalisation decides ids too
