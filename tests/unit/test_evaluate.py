"""geokd.evaluate: batching plans, prediction order, label mapping, and the geometry statistics
against references written from their definitions (issue #4)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from geokd import GeokdError
from geokd.data import Example, collate, tokenize_examples
from geokd.evaluate import (
    GEOMETRY_METRICS,
    GEOMETRY_PANELS,
    LabelMapping,
    constant_rows,
    fixed_order_batches,
    geometry_distances,
    label_mapping,
    length_sorted_batches,
    plot_geometry,
    predict,
    preserved_pairs,
)
from geokd.losses import cka, gram, procrustes
from geokd.runtime import resolve_runtime
from geokd.synthetic import centred_cosines, orthogonal_pairs
from geokd.tasks import get_task

# --------------------------------------------------------------------------------------------
# Batching plans
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8, 50])
def test_length_sorted_batches_cover_every_index_once_within_the_token_budget(batch_size):
    rng = random.Random(batch_size)
    lengths = [rng.randint(1, 60) for _ in range(103)]
    plan = length_sorted_batches(lengths, batch_size)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    budget = batch_size * max(lengths)
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) <= budget
    assert len(plan[0]) == min(batch_size, len(lengths))  # the longest batch holds batch_size


def test_short_inputs_are_packed_into_larger_batches():
    lengths = [60] * 8 + [6] * 100
    plan = length_sorted_batches(lengths, 4)
    assert [len(b) for b in plan] == [4, 4, 40, 40, 20]  # budget 4 x 60 = 240 tokens per batch


def test_length_sorted_batches_edge_cases():
    assert length_sorted_batches([], 4) == []
    assert length_sorted_batches([5, 5, 5], 2) == [[0, 1], [2]]  # ties keep input order
    assert length_sorted_batches([0, 0], 1) == [[0], [1]]  # zero-length inputs still batch
    with pytest.raises(GeokdError, match="batch-size"):
        length_sorted_batches([3], 0)
    assert fixed_order_batches(5, 2) == [[0, 1], [2, 3], [4]]


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    rng = random.Random(0)
    examples = [
        Example(i, (" ".join(f"w{rng.randrange(30)}" for _ in range(rng.randint(1, 20))),), i % 3)
        for i in range(37)
    ]
    features = tokenize_examples(examples, tokenizer, max_length=32)
    return model, tokenizer, features


def _collate(features):
    return collate(features, pad_token_id=0, regression=False)


def test_predict_returns_input_order_and_matches_unbatched_forwards(tiny_classifier):
    model, _, features = tiny_classifier
    runtime = resolve_runtime("cpu")
    model.train()  # predict switches to eval mode (no dropout) and restores the caller's mode
    sorted_out = predict(model, features, _collate, runtime, batch_size=4, pool="mean")
    assert model.training is True
    model.eval()
    fixed_out = predict(model, features, _collate, runtime, batch_size=4, sort_by_length=False, pool="mean")
    with torch.no_grad():
        single = torch.cat([model(**{k: v for k, v in _collate([f]).items() if k not in ("labels", "example_id")})
                            .logits for f in features])  # fmt: skip
    torch.testing.assert_close(sorted_out.logits, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed_out.logits, single, atol=1e-5, rtol=1e-5)
    assert sorted_out.features is not None and len(sorted_out.features) == 3  # embeddings + 2 blocks
    for a, b in zip(sorted_out.features, fixed_out.features, strict=True):
        assert a.shape == (len(features), 16)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_predict_reports_progress_and_refuses_empty_input(tiny_classifier):
    model, _, features = tiny_classifier
    seen = []
    predict(model, features, _collate, resolve_runtime("cpu"), batch_size=5, on_batch=seen.append)
    assert sum(seen) == len(features)
    with pytest.raises(GeokdError, match="empty"):
        predict(model, [], _collate, resolve_runtime("cpu"), batch_size=5)


# --------------------------------------------------------------------------------------------
# Label mapping
# --------------------------------------------------------------------------------------------


def _config(num_labels, id2label=None):
    config = BertConfig(num_labels=num_labels)
    if id2label is not None:
        config.id2label = dict(enumerate(id2label))
    return config


def test_generic_labels_are_ids_and_named_labels_are_matched_by_name():
    rte = get_task("rte")  # 0 = entailment, 1 = not_entailment
    assert label_mapping(rte, _config(2), "m") == LabelMapping("by_id", (0, 1))
    assert label_mapping(rte, _config(2, ["1", "0"]), "m").model_to_task == (1, 0)
    swapped = label_mapping(rte, _config(2, ["NOT_ENTAILMENT", "Entailment"]), "m")
    assert swapped == LabelMapping("by_name", (1, 0))
    mnli = get_task("mnli")  # roberta-large-mnli's order: CONTRADICTION, NEUTRAL, ENTAILMENT
    mapping = label_mapping(mnli, _config(3, ["CONTRADICTION", "NEUTRAL", "ENTAILMENT"]), "m")
    assert mapping.model_to_task == (2, 1, 0)
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    np.testing.assert_array_equal(mapping.apply(logits), [2, 0, 1])  # task ids
    assert label_mapping(get_task("mrpc"), _config(2, ["not equivalent", "equivalent"]), "m").kind == "by_id"


@pytest.mark.parametrize(
    ("task", "config", "fragment"),
    [
        ("stsb", _config(2), "regression (one output score) but model 'm' has a 2-label"),
        ("rte", _config(1), "regression head"),
        ("rte", _config(3), "has 3 labels"),
        ("sst2", _config(2, ["neg", "pos"]), "are not the labels of task 'sst2'"),
        ("sst2", _config(2, ["positive", "positive"]), "are not the labels"),
    ],
)
def test_heads_that_do_not_fit_the_task_are_one_line_errors(task, config, fragment):
    with pytest.raises(GeokdError) as info:
        label_mapping(get_task(task), config, "m")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_custom_models_keep_the_label_names_training_stored():
    from geokd.evaluate import ModelLocation, _resolve_task

    location = ModelLocation(given="m", load="m", run_dir=None, record=None)
    ratings = _config(3, ["1", "2", "3"])  # a custom task trained on ratings 1..3
    spec = _resolve_task("custom", "text", "rating", location, ratings)
    assert spec.label_names == ("1", "2", "3")
    assert label_mapping(spec, ratings, "m") == LabelMapping("by_id", (0, 1, 2))
    words = _config(2, ["pos", "neg"])
    spec = _resolve_task("custom", "text", "y", location, words)
    assert spec.label_names == ("pos", "neg") and label_mapping(spec, words, "m").model_to_task == (0, 1)
    anonymous = _resolve_task("custom", "text", "y", location, _config(2))  # LABEL_0, LABEL_1
    assert anonymous.label_names == ("0", "1")


def test_regression_mapping_returns_scores():
    mapping = label_mapping(get_task("stsb"), _config(1), "m")
    np.testing.assert_allclose(mapping.apply(torch.tensor([[1.5], [4.0]])), [1.5, 4.0])


# --------------------------------------------------------------------------------------------
# Geometry statistics
# --------------------------------------------------------------------------------------------


def _reference_counts(student, teacher, epsilon):
    """Pairs i < j from explicit n×n centred-cosine matrices (geokd.synthetic's definitions)."""
    a_t = orthogonal_pairs(centred_cosines(teacher), epsilon)
    a_s = orthogonal_pairs(centred_cosines(student), epsilon)
    upper = np.triu(np.ones_like(a_t), k=1)
    return {
        "teacher_pairs": int((a_t & upper).sum()),
        "student_pairs": int((a_s & upper).sum()),
        "preserved_pairs": int((a_t & a_s & upper).sum()),
    }


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_preserved_pairs_match_the_dense_definition_in_any_chunking(chunk):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(150, 40, generator=gen)
    student = teacher[:, :12] + 0.3 * torch.randn(150, 12, generator=gen)
    counts = preserved_pairs(student, teacher, 0.1, chunk=chunk)
    assert {k: counts[k] for k in ("teacher_pairs", "student_pairs", "preserved_pairs")} == _reference_counts(
        student, teacher, 0.1
    )
    assert counts["all_pairs"] == 150 * 149 // 2
    assert counts["teacher_pairs"] > 0 and 0 < counts["preserved_pairs"] < counts["teacher_pairs"]


def test_preserved_pairs_brute_force_and_invariances():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    student = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    centred_t, centred_s = teacher - teacher.mean(0), student - student.mean(0)
    expected = 0
    for i, j in itertools.combinations(range(30), 2):
        cos_t = float(centred_t[i] @ centred_t[j] / (centred_t[i].norm() * centred_t[j].norm()))
        cos_s = float(centred_s[i] @ centred_s[j] / (centred_s[i].norm() * centred_s[j].norm()))
        expected += abs(cos_t) <= 0.3 and abs(cos_s) <= 0.3
    assert preserved_pairs(student, teacher, 0.3)["preserved_pairs"] == expected
    # Invariant to a rotation, a global scale and a translation of either side.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    moved = 3.0 * teacher @ q + 5.0
    assert preserved_pairs(student, moved, 0.3) == preserved_pairs(student, teacher, 0.3)
    # A model compared with itself preserves every pair.
    same = preserved_pairs(teacher, teacher, 0.3)
    assert same["preserved_pairs"] == same["teacher_pairs"] == same["student_pairs"]


def test_constant_rows_are_never_counted_as_orthogonal():
    # Integer rows A and -A around an exact zero mean, plus one row equal to the mean: that row is
    # exactly zero once centred (no direction), and no pair with it may count.
    gen = torch.Generator().manual_seed(2)
    half = torch.randint(-5, 6, (12, 6), generator=gen).double()
    teacher = torch.cat([torch.zeros(1, 6, dtype=torch.float64), half, -half])
    student = torch.randn(25, 4, generator=gen, dtype=torch.float64)
    counts = preserved_pairs(student, teacher, 0.5)
    a_t = orthogonal_pairs(centred_cosines(teacher), 0.5)  # takes the zero row's cosines as 0
    a_s = orthogonal_pairs(centred_cosines(student), 0.5)
    a_t[0, :] = a_t[:, 0] = False  # ... which must not count
    upper = np.triu(np.ones_like(a_t), k=1)
    assert counts["teacher_pairs"] == int((a_t & upper).sum()) < 24 * 23 // 2 + 24
    assert counts["preserved_pairs"] == int((a_t & a_s & upper).sum())
    assert counts["student_pairs"] == int((a_s & upper).sum())
    # A layer whose rows are all equal (e.g. the [CLS] embedding at layer 0) has no pairs at all.
    constant = torch.full((25, 6), 0.5, dtype=torch.float64)
    assert preserved_pairs(student, constant, 0.5)["teacher_pairs"] == 0


def test_geometry_distances_are_the_loss_library_in_float64():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(50, 10, generator=gen), torch.randn(50, 24, generator=gen)
    values = geometry_distances(s, t)
    assert values["procrustes"] == float(procrustes(s.double(), t.double()))
    assert values["gram"] == float(gram(s.double(), t.double()))
    assert values["cka_distance"] == float(cka(s.double(), t.double()))
    same = geometry_distances(t, t)
    assert abs(same["procrustes"]) < 1e-10 and abs(same["gram"]) < 1e-7 and abs(same["cka_distance"]) < 1e-10


def _linear_cka_from_the_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XXᵀ, L = YYᵀ, HSIC(K, L) =
    tr(K H L H) with the explicit centring matrix H = I − 11ᵀ/n; numpy float64."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_distance_is_one_minus_linear_cka_under_one_name():
    """One quantity, one name: the key `cka_distance` holds 1 − CKA (0 = same geometry, as for
    procrustes and gram); there is no `cka` key that could be read as CKA itself."""
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    t = s[:, :5] @ torch.randn(5, 12, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        40, 12, generator=gen
    )
    values = geometry_distances(s, t)
    assert tuple(values) == GEOMETRY_METRICS == ("procrustes", "gram", "cka_distance")
    reference = _linear_cka_from_the_definition(s.numpy(), t.numpy())
    assert 0.05 < reference < 0.95  # a case where CKA and 1 − CKA cannot be confused
    assert values["cka_distance"] == pytest.approx(1.0 - reference, rel=1e-10, abs=1e-12)
    assert geometry_distances(s, 2.0 * s + 1.0)["cka_distance"] == pytest.approx(0.0, abs=1e-12)


def test_identical_rows_make_every_distance_undefined_not_zero():
    """At a layer whose rows are all identical (the [CLS] embedding at layer 0) the centred rows are
    zero and every normalised distance is 0/0: None, on either side, also when float32 rounding
    makes the rows differ in their last bits. A tiny but real spread stays defined."""
    gen = torch.Generator().manual_seed(5)
    varied = torch.randn(30, 6, generator=gen)
    constant = torch.randn(1, 6, generator=gen).expand(30, 6).contiguous()
    # Identical up to float32 rounding: some entries nudged by one ulp.
    nudged = torch.where(
        torch.rand(30, 6, generator=gen) < 0.5, torch.nextafter(constant, constant + 1), constant
    )
    assert not torch.equal(nudged, constant)
    for student, teacher in ((constant, varied), (varied, constant), (constant, constant), (nudged, varied)):
        assert geometry_distances(student, teacher) == {
            "procrustes": None,
            "gram": None,
            "cka_distance": None,
        }
    assert constant_rows(constant) and constant_rows(nudged) and constant_rows(varied[:1])
    assert not constant_rows(varied) and not constant_rows(1e-30 * varied.double())  # scale-free
    defined = geometry_distances(1e-3 * varied.double() + 100.0, varied.double())  # same geometry, off-centre
    assert defined["cka_distance"] == pytest.approx(0.0, abs=1e-9)


def test_rows_identical_up_to_rounding_never_count_as_orthogonal():
    """Rows that differ only by float32 rounding have no direction: before, their noise was
    normalised into random unit vectors and many pairs counted as ε-orthogonal."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(1, 8, generator=gen).expand(40, 8).contiguous()
    nudged = torch.where(torch.rand(40, 8, generator=gen) < 0.5, torch.nextafter(base, base + 1), base)
    teacher = torch.randn(40, 8, generator=gen)
    counts = preserved_pairs(nudged, teacher, 0.3)
    assert counts["teacher_pairs"] > 0
    assert counts["student_pairs"] == counts["preserved_pairs"] == 0
    assert preserved_pairs(teacher, nudged, 0.3)["teacher_pairs"] == 0


def _grid_report():
    """A geometry report by hand: 3 student × 3 teacher hidden states, layer 0 of each constant."""
    cells = {
        "procrustes": [[None, None, None], [None, 0.5, 0.4], [None, 0.3, 0.2]],
        "gram": [[None, None, None], [None, 0.6, 0.5], [None, 0.4, 0.3]],
        "cka_distance": [[None, None, None], [None, 0.2, 0.1], [None, 0.1, 0.05]],
    }
    pairs = [
        {"student_layer": 0, "teacher_layer": 0, "procrustes": None, "gram": None, "cka_distance": None,
         "undefined": "student and teacher rows are identical", "teacher_pairs": 0, "preserved_pairs": 0,
         "preserved_fraction": None},
        {"student_layer": 2, "teacher_layer": 2, "procrustes": 0.2, "gram": 0.3, "cka_distance": 0.05,
         "undefined": None, "teacher_pairs": 10, "preserved_pairs": 5, "preserved_fraction": 0.5},
    ]  # fmt: skip
    return {"n_examples": 30, "split": "dev", "features": "cls", "epsilon": 0.1, "layer_pairs": pairs,
            "grid": {"student_layers": [0, 1, 2], "teacher_layers": [0, 1, 2], **cells}}  # fmt: skip


def test_plot_names_the_same_quantity_and_marks_undefined_cells(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_geometry(_grid_report(), tmp_path / "geo.png")
    assert (tmp_path / "geo.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_title()]  # the colour bars have no title
    titles = [ax.get_title() for ax in panels]
    assert titles == [GEOMETRY_PANELS[name] for name in GEOMETRY_METRICS]
    assert titles[2].startswith("cka_distance: 1 − linear CKA") and "0 = same geometry" in titles[2]
    for ax in panels:
        # 5 undefined cells (row 0 and column 0), each hatched and marked n/a; the mapped pairs in red.
        assert sum(1 for p in ax.patches if p.get_hatch()) == 5
        assert sum(1 for text in ax.texts if text.get_text() == "n/a") == 5
        image = ax.images[0].get_array()
        assert image.mask[0].all() and image.mask[:, 0].all() and not image.mask[1:, 1:].any()
        assert image[2, 2] == pytest.approx(_grid_report()["grid"][GEOMETRY_METRICS[panels.index(ax)]][2][2])
    assert "n/a = undefined" in fig._suptitle.get_text()
