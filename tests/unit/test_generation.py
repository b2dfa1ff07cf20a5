"""geokd.generation: batched generation with left padding and the KV cache, seeded sampling, and
the MiniLLM metrics (ROUGE-L against its definition, exact match), on tiny random causal LMs
(issue #11, "Evaluation")."""

from __future__ import annotations

import json
import random
import re
import statistics

import pytest
import torch
from tinylm import make_causal_lm, make_tokenizer

from geokd import GeokdError
from geokd.generation import (
    GenerationOutput,
    _sample,
    evaluate_generations,
    exact_match,
    generate,
    generation_batches,
    normalize_answer,
    rouge_l,
    score_generations,
    write_generations_jsonl,
)

EOS = 2  # tinylm's </s>
# A large init scale makes tiny random models produce varied tokens instead of one repeated id, so
# a wrong position, mask or order changes the output.
VARIED = {"initializer_range": 0.5}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _prompts(tokenizer, n=11, seed=0, low=1, high=24):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    return [[1] + [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _ids(outputs):
    return [o.token_ids for o in outputs]


# --------------------------------------------------------------------------------------------
# ROUGE-L and exact match against their definitions
# --------------------------------------------------------------------------------------------


def _reference_tokens(text: str) -> list[str]:
    """rouge-score's tokenisation, from its description: lower-case, every character outside
    [a-z0-9] becomes a space, split, Porter-stem tokens longer than 3 characters."""
    from nltk.stem.porter import PorterStemmer

    stemmer = PorterStemmer()
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [stemmer.stem(w) if len(w) > 3 else w for w in words]


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def _reference_rouge_l(prediction: str, reference: str) -> float:
    p, r = _reference_tokens(prediction), _reference_tokens(reference)
    lcs = _lcs(p, r)
    if not p or not r or lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 100.0 * 2 * precision * recall / (precision + recall)


ROUGE_CASES = [
    ("The cat sat on the mat.", "the cat is sitting on a mat"),
    ("Running runners ran quickly; they were RUNNING!", "the runner runs quick"),
    ("Paris is the capital of France.", "The capital of France is Paris"),
    ("1. Apples\n2. Oranges\n3. Pears", "apples, pears and oranges"),
    ("completely unrelated words", "nothing shared here at all"),
    (
        "Camels store fat in their humps for energy.",
        "Camels use the fat in their humps to keep them energised.",
    ),
]


@pytest.mark.parametrize("prediction,reference", ROUGE_CASES)
def test_rouge_l_equals_the_lcs_f_measure_on_stemmed_lowercased_tokens(prediction, reference):
    assert rouge_l(prediction, reference) == pytest.approx(
        _reference_rouge_l(prediction, reference), abs=1e-9
    )
    assert rouge_l(prediction, [reference]) == rouge_l(prediction, reference)


def test_rouge_l_is_the_best_over_the_references():
    prediction = "The capital of France is Paris."
    references = ["Berlin is in Germany", "paris, the capital", "It is Paris, the capital of France"]
    scores = [_reference_rouge_l(prediction, r) for r in references]
    assert len(set(scores)) == 3  # the references really differ
    assert rouge_l(prediction, references) == pytest.approx(max(scores))
    assert rouge_l(prediction, list(reversed(references))) == pytest.approx(max(scores))


@pytest.mark.parametrize("prediction", ["", "   ", "?!...", "\n"])
def test_rouge_l_of_an_empty_prediction_is_zero(prediction):
    assert rouge_l(prediction, ["some reference text", "another"]) == 0.0
    assert exact_match(prediction, "some reference text") == 0.0


def test_rouge_l_of_an_identical_prediction_is_100_and_needs_a_reference():
    assert rouge_l("Exactly the same words.", "exactly the same words") == pytest.approx(100.0)
    with pytest.raises(GeokdError, match="no reference"):
        rouge_l("anything", [])


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("Tope", "tope", 100.0),  # case
        ("  Tope.\n", "Tope", 100.0),  # punctuation and white space
        ("New   York,\tNY!", "new york ny", 100.0),
        ("the Tope", "Tope", 0.0),  # articles are kept (MiniLLM's normalisation keeps them)
        ("Topes", "Tope", 0.0),  # no stemming
        ("don't", "dont", 100.0),  # the apostrophe is punctuation
        ("café", "cafe", 0.0),  # accents are not folded
    ],
)
def test_exact_match_normalises_case_punctuation_and_white_space_only(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected
    assert exact_match(prediction, ["something else", reference]) == expected


def test_normalize_answer():
    assert normalize_answer("  The Cat's  hat,\nwas RED. ") == "the cats hat was red"


def test_score_generations_averages_per_example_scores():
    predictions = ["Tope", "Paris is the capital", ""]
    references = [["Tope", "Rope"], "The capital is Paris", "anything"]
    scores = score_generations(predictions, references, token_counts=[1, 4, 0])
    expected_rouge = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    assert scores["rouge_l"] == pytest.approx(sum(expected_rouge) / 3)
    assert scores["exact_match"] == pytest.approx(100.0 / 3)
    assert scores["mean_tokens"] == pytest.approx(5 / 3)
    assert scores["mean_words"] == pytest.approx((1 + 4 + 0) / 3)
    assert scores["n_empty"] == 1 and scores["n_examples"] == 3
    with pytest.raises(GeokdError, match="2 predictions for 3"):
        score_generations(predictions[:2], references)


# --------------------------------------------------------------------------------------------
# Batched greedy generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen3", "mistral"])
def test_batched_greedy_equals_per_example_greedy(tokenizer, family):
    model = make_causal_lm(family, **VARIED)
    prompts = _prompts(tokenizer, n=11)
    assert len({len(p) for p in prompts}) > 5  # really different lengths: left padding matters
    batched = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    single = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=1)
    assert _ids(batched) == _ids(single)
    assert [o.text for o in batched] == [o.text for o in single]
    # ... and both equal transformers' own greedy search, one example at a time.
    for prompt, out in zip(prompts, batched, strict=True):
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=0
        )[0, len(prompt) :].tolist()
        expected = reference[: reference.index(EOS)] if EOS in reference else reference
        assert out.token_ids == expected
        assert out.stopped_at_eos == (EOS in reference)
    assert len({tuple(o.token_ids) for o in batched}) > 5  # the outputs are varied, not one repeated answer


def test_batched_greedy_with_a_token_budget_equals_per_example(tokenizer):
    model = make_causal_lm("gpt2", **VARIED)  # absolute positions: padding offsets would show
    prompts = _prompts(tokenizer, n=9, seed=3)
    budget = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=64, batch_tokens=70)
    single = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert _ids(budget) == _ids(single)


def test_generation_batches_respect_rows_and_token_budget():
    lengths = [5, 30, 12, 30, 1, 7, 18, 2]
    for batch_size, budget in [(1, None), (3, None), (8, 100), (4, 60), (100, 1)]:
        plan = generation_batches(lengths, 10, batch_size, budget)
        assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
        for batch in plan:
            assert len(batch) <= batch_size
            if budget is not None and len(batch) > 1:
                assert len(batch) * (max(lengths[i] for i in batch) + 10) <= budget
        flat = [lengths[i] for batch in plan for i in batch]
        assert flat == sorted(flat, reverse=True)  # longest first: similar lengths share a batch


def test_results_come_back_in_input_order(tokenizer):
    model = make_causal_lm("llama", **VARIED)
    prompts = _prompts(tokenizer, n=8, seed=5)
    forward = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    backward = generate(model, tokenizer, prompts[::-1], max_new_tokens=6, batch_size=3)
    assert _ids(backward) == _ids(forward)[::-1]
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert _ids(forward) == _ids(alone)


def test_text_is_the_decoded_response_without_prompt_or_special_tokens(tokenizer):
    model = make_causal_lm("qwen2", **VARIED)
    prompts = _prompts(tokenizer, n=4, seed=7)
    for out in generate(model, tokenizer, prompts, max_new_tokens=7):
        assert isinstance(out, GenerationOutput)
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
        assert out.n_new_tokens == len(out.token_ids) + int(out.stopped_at_eos) <= 7
        assert EOS not in out.token_ids


# --------------------------------------------------------------------------------------------
# Stopping at EOS
# --------------------------------------------------------------------------------------------


def test_a_head_biased_towards_eos_stops_at_once(tokenizer):
    model = make_causal_lm("llama", **VARIED)
    bias = torch.zeros(model.config.vocab_size)
    bias[EOS] = 1e4
    model.lm_head.bias = torch.nn.Parameter(bias)  # nn.Linear adds it when set
    outputs = generate(model, tokenizer, _prompts(tokenizer, n=5), max_new_tokens=20, batch_size=2)
    for out in outputs:
        assert out.token_ids == [] and out.text == ""
        assert out.stopped_at_eos and out.n_new_tokens == 1


def test_each_row_stops_at_its_own_first_eos(tokenizer):
    """Take a token the model produces mid-answer as the EOS id: every answer must end right before
    its first occurrence, while the rest of the batch carries on."""
    model = make_causal_lm("opt", **VARIED)
    prompts = _prompts(tokenizer, n=10, seed=11)
    free = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, eos_token_id=[])
    assert all(o.n_new_tokens == 12 and not o.stopped_at_eos for o in free)
    counts: dict[int, int] = {}
    for o in free:
        for t in set(o.token_ids[1:8]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)  # a token several answers contain mid-way
    stopped = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, eos_token_id=stop)
    n_stopped = 0
    for f, s in zip(free, stopped, strict=True):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop)
            assert s.token_ids == f.token_ids[:cut] and s.stopped_at_eos and s.n_new_tokens == cut + 1
            n_stopped += 1
        else:
            assert s.token_ids == f.token_ids and not s.stopped_at_eos
    assert 2 <= n_stopped < len(prompts)  # some rows stopped early, others ran to the end


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(tokenizer):
    model = make_causal_lm("llama", **VARIED)
    prompts = _prompts(tokenizer, n=8, seed=2)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, prompts, max_new_tokens=10, decoding="sample", seed=10, batch_size=3)
    again = generate(model, tokenizer, prompts, max_new_tokens=10, decoding="sample", seed=10, batch_size=3)
    other = generate(model, tokenizer, prompts, max_new_tokens=10, decoding="sample", seed=20, batch_size=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert _ids(first) == _ids(again)
    assert sum(a != b for a, b in zip(_ids(first), _ids(other), strict=True)) >= len(prompts) // 2
    greedy = generate(model, tokenizer, prompts, max_new_tokens=10)
    assert _ids(first) != _ids(greedy)


def test_sampling_does_not_depend_on_batch_composition(tokenizer):
    model = make_causal_lm("gpt2", **VARIED)
    prompts = _prompts(tokenizer, n=9, seed=4)
    ids = [f"dolly-{i}" for i in range(len(prompts))]
    kwargs = dict(max_new_tokens=10, decoding="sample", seed=30)
    together = generate(model, tokenizer, prompts, example_ids=ids, batch_size=4, **kwargs)
    alone = generate(model, tokenizer, prompts, example_ids=ids, batch_size=1, **kwargs)
    assert _ids(together) == _ids(alone)
    subset = [0, 5, 8]
    part = generate(model, tokenizer, [prompts[i] for i in subset], example_ids=[ids[i] for i in subset],
                    batch_size=2, **kwargs)  # fmt: skip
    assert _ids(part) == [together[i].token_ids for i in subset]
    # The stream belongs to the example id, not its position.
    renamed = generate(
        model, tokenizer, prompts, example_ids=[f"x{i}" for i in range(9)], batch_size=4, **kwargs
    )
    assert _ids(renamed) != _ids(together)


def test_top_k_1_and_a_tiny_nucleus_are_greedy(tokenizer):
    model = make_causal_lm("mistral", **VARIED)
    prompts = _prompts(tokenizer, n=6, seed=8)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=8)
    top1 = generate(model, tokenizer, prompts, max_new_tokens=8, decoding="sample", seed=1, top_k=1)
    nucleus = generate(model, tokenizer, prompts, max_new_tokens=8, decoding="sample", seed=1, top_p=1e-6)
    cold = generate(model, tokenizer, prompts, max_new_tokens=8, decoding="sample", seed=1, temperature=1e-4)
    assert _ids(top1) == _ids(greedy) == _ids(nucleus) == _ids(cold)


def test_sampling_draws_tokens_with_their_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, -1)
    generator = torch.Generator().manual_seed(0)
    tokens = _sample(logits, [generator] * 20000, 1.0, 0, 1.0)
    frequencies = torch.bincount(tokens, minlength=5).double() / 20000
    assert frequencies[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(frequencies, probs.double(), atol=0.015)
    top2 = torch.bincount(_sample(logits, [generator] * 20000, 1.0, 2, 1.0), minlength=5).double() / 20000
    assert torch.allclose(top2, torch.tensor([0.625, 0, 0.375, 0, 0], dtype=torch.float64), atol=0.015)
    nucleus = torch.bincount(_sample(logits, [generator] * 20000, 1.0, 0, 0.75), minlength=5).double() / 20000
    assert torch.allclose(nucleus, torch.tensor([0.625, 0, 0.375, 0, 0], dtype=torch.float64), atol=0.015)


# --------------------------------------------------------------------------------------------
# Evaluation over generation seeds, and the JSONL
# --------------------------------------------------------------------------------------------


def test_evaluate_generations_reports_mean_and_sample_std_over_seeds(tokenizer, tmp_path):
    model = make_causal_lm("llama", **VARIED)
    prompts = _prompts(tokenizer, n=6, seed=9, high=10)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    references = [[" ".join(random.Random(i).choices(vocab[4:], k=6)), "w1 w2 w3"] for i in range(6)]
    ids = [f"ex{i}" for i in range(6)]
    seen = []
    result = evaluate_generations(
        model, tokenizer, prompts, references, ids, decoding="sample", gen_seeds=(10, 20, 30),
        max_new_tokens=8, batch_size=4, on_batch=lambda k, t: seen.append((k, t)),
    )  # fmt: skip
    runs = result["per_seed"]
    assert [run["seed"] for run in runs] == [10, 20, 30]
    rouge = [run["rouge_l"] for run in runs]
    assert len(set(rouge)) > 1  # the seeds give different samples and scores
    assert result["metrics"]["rouge_l"]["mean"] == pytest.approx(sum(rouge) / 3)
    mean = sum(rouge) / 3
    assert result["metrics"]["rouge_l"]["std"] == pytest.approx(
        (sum((r - mean) ** 2 for r in rouge) / 2) ** 0.5
    )
    assert result["metrics"]["exact_match"]["values"] == [run["exact_match"] for run in runs]
    for run in runs:  # each seed's score is the score of its own generations
        own = [r for r in result["records"] if r["seed"] == run["seed"]]
        assert [r["example_id"] for r in own] == ids
        assert run["rouge_l"] == pytest.approx(
            statistics.fmean(rouge_l(r["prediction"], r["references"]) for r in own)
        )
        assert run["n_new_tokens"] == sum(r["n_new_tokens"] for r in own)
        assert run["tokens_per_s"] > 0
    assert sum(k for k, _ in seen) == 6 * 3 and sum(t for _, t in seen) == sum(
        run["n_new_tokens"] for run in runs
    )
    settings = result["decoding"]
    assert settings["decoding"] == "sample" and settings["gen_seeds"] == [10, 20, 30]
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (1.0, 0, 1.0)

    path = write_generations_jsonl(tmp_path / "generations.jsonl", result["records"])
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6 * 3
    assert set(lines[0]) >= {"example_id", "seed", "prompt", "prediction", "references", "rouge_l"}
    assert lines == json.loads(json.dumps(result["records"]))
    assert [p.name for p in tmp_path.iterdir()] == ["generations.jsonl"]  # no temporary file left behind
    json.dumps({k: v for k, v in result.items() if k != "records"})  # JSON-ready


def test_evaluate_generations_greedy_runs_once_and_checks_its_inputs(tokenizer):
    model = make_causal_lm("gpt2", **VARIED)
    prompts = _prompts(tokenizer, n=3, seed=1, high=6)
    result = evaluate_generations(model, tokenizer, prompts, ["w1", ["w2", "w3"], "w4"], max_new_tokens=4)
    assert [run["seed"] for run in result["per_seed"]] == [None]
    assert result["metrics"]["rouge_l"]["std"] is None
    assert result["decoding"]["gen_seeds"] is None and result["decoding"]["temperature"] is None
    assert [r["example_id"] for r in result["records"]] == [0, 1, 2]
    with pytest.raises(GeokdError, match="only apply to decoding='sample'"):
        evaluate_generations(model, tokenizer, prompts, ["a", "b", "c"], gen_seeds=(10,), max_new_tokens=4)
    with pytest.raises(GeokdError, match="2 references for 3 prompts"):
        evaluate_generations(model, tokenizer, prompts, ["a", "b"], max_new_tokens=4)
    default = evaluate_generations(model, tokenizer, prompts[:1], ["a"], decoding="sample", max_new_tokens=2)
    assert default["decoding"]["gen_seeds"] == [10, 20, 30, 40, 50]  # MiniLLM's seeds


def test_generate_refuses_bad_settings_in_one_line(tokenizer):
    model = make_causal_lm("opt")
    prompts = _prompts(tokenizer, n=2)
    with pytest.raises(GeokdError, match="needs a seed"):
        generate(model, tokenizer, prompts, max_new_tokens=4, decoding="sample")
    with pytest.raises(GeokdError, match="has no tokens"):
        generate(model, tokenizer, [[1, 5], []], max_new_tokens=4)
    with pytest.raises(GeokdError, match="positions"):
        generate(model, tokenizer, prompts, max_new_tokens=250)  # the tiny models have 256 positions
    with pytest.raises(GeokdError, match="decoding must be one of"):
        generate(model, tokenizer, prompts, max_new_tokens=4, decoding="beam")
    assert generate(model, tokenizer, [], max_new_tokens=4) == []
