"""Issue #15, the attention losses and their capture.

* `attn` (TinyBERT) and `attn-relation` (MiniLMv2) against float64 references written from the
  papers' definitions with explicit loops over examples, heads and (query, key) pairs;
  invariances (padding, identical inputs, rotations inside a relation head), gradient checks and
  bounded gradients on degenerate input.
* `AttentionTap` on tiny BERT, Llama (grouped-query), Qwen3 (q/k norms), GPT-2 (fused c_attn) and
  OPT: the captured scores reproduce the attention weights the model itself computes
  (`output_attentions` with eager attention), with rotary positions, scaling and GQA; the Q/K/V are
  the projections' outputs; only mapped blocks are captured, and only inside `recording()`.
"""

from __future__ import annotations

import math

import pytest
import torch
from tinylm import make_causal_lm

from geokd.errors import GeokdError
from geokd.losses.attention import (
    AttentionRows,
    attention_map_loss,
    attention_relation_loss,
    resolve_relation_heads,
)
from geokd.models.attention import AttentionTap


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masks(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _scores_rows(b, h, kv, t, dh, seed, lengths, causal=False, query_mask=None, dtype=torch.float64):
    q = torch.randn(b, h, t, dh, generator=_g(seed), dtype=dtype)
    k = torch.randn(b, kv, t, dh, generator=_g(seed + 1), dtype=dtype)
    keys = _masks(lengths, t)
    return AttentionRows("scores", q, k, keys if query_mask is None else query_mask, keys, causal, scaling=dh**-0.5)


def _valid(rows: AttentionRows, b: int, q: int, k: int) -> bool:
    return bool(rows.query_mask[b, q]) and bool(rows.key_mask[b, k]) and (not rows.causal or k <= q)


def attn_reference(s: AttentionRows, t: AttentionRows, probs: bool) -> float:
    """TinyBERT: (1/h) Σ_h MSE(A^S_h, A^T_h) over the valid (query, key) pairs; A the scores
    q·k·scaling with key heads shared by their query-head group, or the softmax over valid keys."""
    b, h, length, _ = s.query.shape

    def a(rows, i, head, q, k):
        group = head // (h // rows.key.shape[1])
        return float(rows.query[i, head, q] @ rows.key[i, group, k]) * rows.scaling

    total, count = 0.0, 0
    for i in range(b):
        for head in range(h):
            for q in range(length):
                keys = [k for k in range(length) if _valid(t, i, q, k)]
                if not keys:
                    continue
                sv = [a(s, i, head, q, k) for k in keys]
                tv = [a(t, i, head, q, k) for k in keys]
                if probs:
                    sv = [math.exp(v) / sum(math.exp(w) for w in sv) for v in sv]
                    tv = [math.exp(v) / sum(math.exp(w) for w in tv) for v in tv]
                total += sum((x - y) ** 2 for x, y in zip(sv, tv, strict=True))
                count += len(keys)
    return total / count


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("causal, kv", [(False, 4), (True, 2), (True, 1)])
def test_attn_matches_the_reference(probs, causal, kv):
    s = _scores_rows(2, 4, kv, 6, 3, 1, [6, 4], causal)
    t = _scores_rows(2, 4, kv, 6, 3, 7, [6, 4], causal)
    value = attention_map_loss(s, t, "probs" if probs else "scores")
    assert float(value) == pytest.approx(attn_reference(s, t, probs), rel=1e-10)


def test_attn_queries_restricted_to_the_loss_rows():
    """Decoders: the queries are the response tokens only; keys are every earlier token."""
    responses = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    s = _scores_rows(2, 2, 2, 6, 3, 2, [6, 3], True, query_mask=responses)
    t = _scores_rows(2, 2, 2, 6, 3, 9, [6, 3], True, query_mask=responses)
    assert float(attention_map_loss(s, t)) == pytest.approx(attn_reference(s, t, False), rel=1e-10)


def test_attn_padding_and_future_positions_never_count():
    s = _scores_rows(2, 2, 2, 6, 3, 3, [6, 3], causal=True)
    t = _scores_rows(2, 2, 2, 6, 3, 4, [6, 3], causal=True)
    base = float(attention_map_loss(s, t))
    s2 = AttentionRows("scores", s.query.clone(), s.key.clone(), s.query_mask, s.key_mask, True, scaling=s.scaling)
    s2.query[1, :, 3:] = 1e3  # padded queries of example 1
    s2.key[1, :, 3:] = float("nan")  # padded keys
    assert float(attention_map_loss(s2, t)) == pytest.approx(base, rel=1e-12)
    # appending padding to every example changes nothing either
    pad = lambda x: torch.cat([x, torch.randn_like(x[:, :, :2])], dim=2)  # noqa: E731
    grow = lambda m: torch.cat([m, torch.zeros_like(m[:, :2])], dim=1)  # noqa: E731
    s3 = AttentionRows("scores", pad(s.query), pad(s.key), grow(s.query_mask), grow(s.key_mask), True, scaling=s.scaling)
    t3 = AttentionRows("scores", pad(t.query), pad(t.key), grow(t.query_mask), grow(t.key_mask), True, scaling=t.scaling)
    assert float(attention_map_loss(s3, t3)) == pytest.approx(base, rel=1e-12)


def test_attn_identical_is_zero_and_heads_must_match():
    t = _scores_rows(2, 4, 2, 5, 3, 5, [5, 2])
    assert float(attention_map_loss(t, t)) == 0.0
    assert float(attention_map_loss(t, t, "probs")) == 0.0
    other = _scores_rows(2, 2, 2, 5, 3, 5, [5, 2])
    with pytest.raises(GeokdError, match="equal head counts.*student 2 and teacher 4.*attn-relation"):
        attention_map_loss(other, t)
    with pytest.raises(GeokdError, match="one tokenisation"):
        attention_map_loss(_scores_rows(2, 4, 2, 4, 3, 5, [4, 2]), t)


@pytest.mark.parametrize("probs", [False, True])
def test_attn_gradcheck(probs):
    t = _scores_rows(1, 2, 1, 4, 2, 6, [3], causal=True)
    s = _scores_rows(1, 2, 1, 4, 2, 8, [3], causal=True)
    q, k = s.query.requires_grad_(True), s.key.requires_grad_(True)

    def f(q, k):
        rows = AttentionRows("scores", q, k, s.query_mask, s.key_mask, True, scaling=s.scaling)
        return attention_map_loss(rows, t, "probs" if probs else "scores")

    assert torch.autograd.gradcheck(f, (q, k))


# ------------------------------------------------------------------------------- attn-relation


def _qkv_rows(b, t, width, seed, lengths, causal=False, dtype=torch.float64):
    x = [torch.randn(b, t, width, generator=_g(seed + i), dtype=dtype) for i in range(3)]
    keys = _masks(lengths, t)
    return AttentionRows("qkv", x[0], x[1], keys, keys, causal, value=x[2])


def relation_reference(s: AttentionRows, t: AttentionRows, heads: int) -> float:
    """MiniLMv2: per relation head r, softmax over valid keys of x_r(q)·x_r(k)/√d_r; KL(T ‖ S)
    summed over keys, averaged over valid queries and heads; summed over Q-Q, K-K and V-V."""
    b, length, _ = s.query.shape
    total, count = 0.0, 0
    for xs_all, xt_all in ((s.query, t.query), (s.key, t.key), (s.value, t.value)):
        ds, dt = xs_all.shape[-1] // heads, xt_all.shape[-1] // heads
        for i in range(b):
            for r in range(heads):
                xs, xt = xs_all[i, :, r * ds : (r + 1) * ds], xt_all[i, :, r * dt : (r + 1) * dt]
                for q in range(length):
                    keys = [k for k in range(length) if _valid(t, i, q, k)]
                    if not keys:
                        continue
                    ls = torch.tensor([float(xs[q] @ xs[k]) / math.sqrt(ds) for k in keys], dtype=torch.float64)
                    lt = torch.tensor([float(xt[q] @ xt[k]) / math.sqrt(dt) for k in keys], dtype=torch.float64)
                    ps, pt = ls.softmax(0), lt.softmax(0)
                    total += float((pt * (pt.log() - ps.log())).sum())
                    count += 1
    return total / (count / 3)


@pytest.mark.parametrize("causal", [False, True])
def test_attn_relation_matches_the_reference_across_widths(causal):
    s = _qkv_rows(2, 5, 6, 1, [5, 3], causal)  # width 6, teacher width 12, 3 relation heads
    t = _qkv_rows(2, 5, 12, 11, [5, 3], causal)
    value = attention_relation_loss(s, t, 3)
    assert float(value) == pytest.approx(relation_reference(s, t, 3), rel=1e-10)


def test_attn_relation_invariances():
    s = _qkv_rows(2, 6, 8, 2, [6, 4])
    t = _qkv_rows(2, 6, 16, 12, [6, 4])
    base = float(attention_relation_loss(s, t, 2))
    # a rotation inside each relation head (block-diagonal) leaves every relation unchanged
    q1, _ = torch.linalg.qr(torch.randn(4, 4, generator=_g(3), dtype=torch.float64))
    block = torch.block_diag(q1, q1.T)
    rotated = AttentionRows("qkv", s.query @ block, s.key @ block, s.query_mask, s.key_mask, False, value=s.value @ block)
    assert float(attention_relation_loss(rotated, t, 2)) == pytest.approx(base, rel=1e-10)
    padded = AttentionRows("qkv", s.query.clone(), s.key.clone(), s.query_mask, s.key_mask, False, value=s.value.clone())
    padded.query[1, 4:] = 1e4
    padded.value[1, 4:] = float("nan")
    assert float(attention_relation_loss(padded, t, 2)) == pytest.approx(base, rel=1e-12)
    assert float(attention_relation_loss(t, t, 2)) == 0.0
    assert base > 0.01


def test_attn_relation_gradcheck_and_degenerate_input():
    t = _qkv_rows(1, 4, 4, 20, [3], causal=True)
    s = _qkv_rows(1, 4, 2, 30, [3], causal=True)
    tensors = tuple(x.requires_grad_(True) for x in (s.query, s.key, s.value))

    def f(q, k, v):
        return attention_relation_loss(AttentionRows("qkv", q, k, s.query_mask, s.key_mask, True, value=v), t, 2)

    assert torch.autograd.gradcheck(f, tensors)
    zeros = [torch.zeros(1, 4, 2, requires_grad=True) for _ in range(3)]
    value = attention_relation_loss(AttentionRows("qkv", *zeros[:2], s.query_mask, s.key_mask, True, value=zeros[2]),
                                    t, 2)  # fmt: skip
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(z.grad).all() for z in zeros)


def test_relation_heads_default_and_checks():
    assert resolve_relation_heads(None, 192, 384, 12) == 12
    assert resolve_relation_heads(None, 384, 576, 9) == 8  # gcd 192: 9 does not divide it, 8 does
    assert resolve_relation_heads(48, 384, 768, 12) == 48
    with pytest.raises(GeokdError, match="--relation-heads: 5 .*student 384.*teacher 576.*try 8"):
        resolve_relation_heads(5, 384, 576, 9)


# ------------------------------------------------------------------------------------- capture


def _tiny_bert(impl: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)  # fmt: skip
    return BertModel(config).eval()


def _tiny_decoder(family: str, impl: str):
    model = make_causal_lm(family, initializer_range=0.2)
    model.config._attn_implementation = impl
    return model


def _batch(t=7):
    ids = torch.randint(3, 40, (2, t), generator=_g(0))
    mask = _masks([t, t - 3], t).long()
    return ids, mask


@pytest.mark.parametrize("family", ["bert", "llama", "qwen3", "gpt2", "opt"])
def test_captured_scores_reproduce_the_models_own_attention(family):
    """softmax(captured q·k·scaling) over the valid keys = the attention weights the model computes
    with eager attention (rotary positions, q/k norms, scaling and GQA all included), while the
    capture itself runs under sdpa."""
    ids, mask = _batch()
    make = _tiny_bert if family == "bert" else (lambda impl: _tiny_decoder(family, impl))
    eager = make("eager")
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model = make("sdpa")
    model.load_state_dict(eager.state_dict())
    causal = family != "bert"
    tap = AttentionTap(model, [1, 3], "scores", causal)
    with torch.no_grad(), tap.recording() as captured:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(captured) == [1, 3]  # the mapped blocks only
    keys = mask.bool()
    for layer, rows in zip([1, 3], tap.rows(captured, [1, 3], keys, keys), strict=True):
        from geokd.losses.attention import _masked_log_softmax, attention_scores, valid_pairs

        probs = _masked_log_softmax(attention_scores(rows), valid_pairs(rows).unsqueeze(1)).exp()
        valid = valid_pairs(rows).unsqueeze(1).expand_as(probs)
        torch.testing.assert_close(probs[valid], reference[layer - 1].float()[valid], rtol=1e-4, atol=1e-5)
    tap.close()


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "opt"])
def test_captured_qkv_are_the_projection_outputs(family):
    ids, mask = _batch()
    model = _tiny_bert("sdpa") if family == "bert" else _tiny_decoder(family, "sdpa")
    tap = AttentionTap(model, [2], "qkv", causal=family != "bert")
    from geokd.models.students import block_list

    block = block_list(model)[1][1]
    seen = {}
    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    inputs = block.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad(), tap.recording() as captured:
        model(input_ids=ids, attention_mask=mask)
    inputs.remove()
    assert sorted(captured) == [2]
    rows = tap.rows(captured, [2], mask.bool(), mask.bool())[0]
    heads = model.config.num_attention_heads
    assert rows.query.shape[-1] == rows.key.shape[-1] == rows.value.shape[-1] == tap.width
    if family == "llama":  # grouped-query: key/value heads repeated to the query heads
        attention = block.self_attn
        x = block.input_layernorm(seen["x"])
        k = attention.k_proj(x)
        dh = k.shape[-1] // model.config.num_key_value_heads
        expected = k.view(2, -1, model.config.num_key_value_heads, dh).repeat_interleave(
            heads // model.config.num_key_value_heads, dim=2).reshape(2, -1, heads * dh)  # fmt: skip
        torch.testing.assert_close(rows.key, expected)
        torch.testing.assert_close(rows.query, attention.q_proj(x))
    # outside recording() nothing is kept
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert sorted(captured) == [2] and tap._captured is captured
    tap.close()
    assert not any(m._forward_hooks for m in model.modules())


def test_attention_interface_is_restored_after_recording():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    for impl in ("sdpa", "eager"):
        model = _tiny_bert(impl)
        tap = AttentionTap(model, [1], "scores", causal=False)
        ids, mask = _batch()
        with tap.recording():
            assert impl in ALL_ATTENTION_FUNCTIONS._local_mapping
            model(input_ids=ids, attention_mask=mask)
        assert ALL_ATTENTION_FUNCTIONS._local_mapping == before


def test_tap_refuses_the_embedding_layer():
    with pytest.raises(GeokdError, match="layers 1..3.*got 0.*embeddings have no attention"):
        AttentionTap(_tiny_bert("sdpa"), [0, 2], "qkv", causal=False)


def test_attn_loss_is_the_same_under_eager_and_sdpa():
    ids, mask = _batch()
    values = []
    for impl in ("eager", "sdpa"):
        student, teacher = _tiny_decoder("llama", impl), _tiny_decoder("qwen2", impl)
        s_tap, t_tap = AttentionTap(student, [2], "scores", True), AttentionTap(teacher, [4], "scores", True)
        with torch.no_grad(), s_tap.recording() as s_cap:
            student(input_ids=ids, attention_mask=mask)
        with torch.no_grad(), t_tap.recording() as t_cap:
            teacher(input_ids=ids, attention_mask=mask)
        keys = mask.bool()
        values.append(float(attention_map_loss(s_tap.rows(s_cap, [2], keys, keys)[0], t_tap.rows(t_cap, [4], keys, keys)[0])))
    assert values[0] == pytest.approx(values[1], rel=1e-5) and values[0] > 0
