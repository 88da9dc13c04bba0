"""Structural tests of the batch layouts (CONTRACTS.md §2), against per-sequence references."""

import numpy as np
import pytest

from dpoq_jax.data.examples import TokenizedPair, TokenizedSFT
from dpoq_jax.data.layouts import (
    attention_allowed,
    first_fit_decreasing,
    gather_flat,
    preference_batch,
    rows_needed,
    sft_batch,
)


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lp, lc, lr = rng.integers(1, 9), rng.integers(1, 6), rng.integers(1, 6)
        out.append(
            TokenizedPair(
                [int(x) for x in rng.integers(3, 50, lp)],
                [int(x) for x in rng.integers(3, 50, lc)],
                [int(x) for x in rng.integers(3, 50, lr)],
                {"i": i},
            )
        )
    return out


LAYOUT_KW = [("padded", {}), ("prefix_shared", {}), ("packed", {"num_rows": 3})]


def _check_structure(batch, pairs, P, R):
    """Every response token r: pred_idx points at the previous token of its own sequence, which sees
    exactly its own sequence's earlier tokens (prompt + own response prefix), with consecutive
    positions."""
    tokens = batch["tokens"].reshape(-1)
    pos = batch["positions"].reshape(-1)
    S = batch["tokens"].shape[1]
    allowed = attention_allowed(batch["segment_ids"], batch["branch_ids"])
    for i in range(P):
        if i >= len(pairs) or pairs[i] is None:
            assert batch["pair_mask"][i] == 0
            assert batch["chosen_mask"][i].sum() == 0 and batch["rejected_mask"][i].sum() == 0
            continue
        p = pairs[i]
        assert batch["pair_mask"][i] == 1
        for side, resp in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            seq = p.prompt_ids + resp
            lp = len(p.prompt_ids)
            idx = batch[f"{side}_pred_idx"][i]
            np.testing.assert_array_equal(batch[f"{side}_targets"][i, : len(resp)], resp)
            want_mask = (np.arange(R) < len(resp)).astype(np.float32)
            np.testing.assert_array_equal(batch[f"{side}_mask"][i], want_mask)
            # flat index of every token of this sequence in row storage, found via the predictors
            last = idx[len(resp) - 1]
            n = last // S
            # the predicting position holds the token just before response token r in the sequence
            for r in range(len(resp)):
                assert tokens[idx[r]] == seq[lp + r - 1]
                assert pos[idx[r]] == lp + r - 1
            # visible set from the last predicting position == the whole sequence minus the final token
            vis = np.nonzero(allowed[n, last % S])[0] + n * S
            np.testing.assert_array_equal(sorted(tokens[vis].tolist()), sorted(seq[:-1]))
            np.testing.assert_array_equal(sorted(pos[vis].tolist()), list(range(len(seq) - 1)))
            # each predicting position of the response sees the previous predicting positions
            for r in range(1, len(resp)):
                assert allowed[n, idx[r] % S, idx[r - 1] % S]


@pytest.mark.parametrize("layout,kw", LAYOUT_KW)
def test_structure(layout, kw):
    pairs = _pairs(5)
    P, R = 6, 6
    b = preference_batch(pairs + [None], layout, seq_len=40, response_len=R, num_pairs=P, **kw)
    N = {"padded": 2 * P, "prefix_shared": P, "packed": 3}[layout]
    assert b["tokens"].shape == (N, 40) and b["chosen_pred_idx"].shape == (P, R)
    for k in ("tokens", "positions", "segment_ids", "branch_ids", "chosen_pred_idx", "rejected_pred_idx"):
        assert b[k].dtype == np.int32
    assert b["chosen_mask"].dtype == np.float32 and b["pair_mask"].dtype == np.float32
    _check_structure(b, pairs, P, R)
    # padding has segment 0 and token 0
    assert np.all(b["tokens"][b["segment_ids"] == 0] == 0)
    # tokens in row storage: exactly the prompt once (shared) or twice (padded), plus both responses
    n_real = int((b["segment_ids"] > 0).sum())
    per = [
        len(p.prompt_ids) * (2 if layout == "padded" else 1) + len(p.chosen_ids) + len(p.rejected_ids)
        for p in pairs
    ]
    assert n_real == sum(per)


def test_chosen_rejected_cannot_see_each_other():
    p = TokenizedPair([5, 6], [7, 8, 2], [9, 2], {})
    b = preference_batch([p], "prefix_shared", seq_len=8, response_len=3)
    allowed = attention_allowed(b["segment_ids"], b["branch_ids"])[0]
    np.testing.assert_array_equal(b["tokens"][0], [5, 6, 7, 8, 2, 9, 2, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 2, 3, 0])
    np.testing.assert_array_equal(b["branch_ids"][0], [0, 0, 1, 1, 1, 2, 2, 0])
    assert not allowed[5, 2:5].any() and allowed[5, :2].all()
    np.testing.assert_array_equal(b["rejected_pred_idx"][0], [1, 5, 0])
    np.testing.assert_array_equal(b["chosen_pred_idx"][0], [1, 2, 3])


def test_packed_segments_isolated_and_static_shape():
    pairs = _pairs(6, seed=1)
    n = rows_needed(pairs, 30)
    b = preference_batch(pairs, "packed", seq_len=30, response_len=6, num_rows=n)
    assert b["tokens"].shape == (n, 30)
    allowed = attention_allowed(b["segment_ids"], b["branch_ids"])
    seg = b["segment_ids"]
    assert not (allowed & (seg[:, :, None] != seg[:, None, :])).any()
    with pytest.raises(ValueError, match="does not fit"):
        preference_batch(pairs, "packed", seq_len=30, response_len=6, num_rows=n - 1)
    stats = {}
    b2 = preference_batch(
        pairs, "packed", seq_len=30, response_len=6, num_rows=n - 1, overflow="drop", stats=stats
    )
    assert stats["n_dropped"] >= 1 and b2["pair_mask"].sum() == len(pairs) - stats["n_dropped"]
    _check_structure(b2, [p if b2["pair_mask"][i] else None for i, p in enumerate(pairs)], 6, 6)


def test_first_fit_decreasing():
    assert first_fit_decreasing([3, 5, 2, 4], 2, 7) == [(1, 4), (0, 0), (0, 5), (1, 0)]
    assert first_fit_decreasing([8], 2, 7) == [None]


def test_bad_pairs_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        preference_batch([TokenizedPair([], [1], [2], {})], "padded", seq_len=8, response_len=2)
    with pytest.raises(ValueError, match="response_len"):
        preference_batch(
            [TokenizedPair([1], [1, 2, 3], [2], {"source": "f.jsonl", "line": 3})],
            "padded",
            seq_len=8,
            response_len=2,
        )
    with pytest.raises(ValueError, match="num_rows"):
        preference_batch(_pairs(1), "packed", seq_len=8, response_len=8)


def test_reference_logps_copied():
    p = TokenizedPair([1, 2], [3, 4], [5], {"ref_chosen_logps": [-1.0, -2.0], "ref_rejected_logps": [-3.0]})
    b = preference_batch([p, None], "prefix_shared", seq_len=8, response_len=3)
    np.testing.assert_allclose(b["ref_chosen_logps"], [[-1, -2, 0], [0, 0, 0]])
    np.testing.assert_allclose(b["ref_rejected_logps"][0], [-3, 0, 0])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_structure(layout):
    rng = np.random.default_rng(3)
    exs = [
        TokenizedSFT(
            [int(x) for x in rng.integers(3, 50, rng.integers(1, 6))],
            [int(x) for x in rng.integers(3, 50, rng.integers(1, 5))],
            {},
        )
        for _ in range(4)
    ]
    b = sft_batch(
        exs + [None],
        layout,
        seq_len=12,
        response_len=4,
        batch_size=5,
        num_rows=3 if layout == "packed" else None,
    )
    tokens, pos = b["tokens"].reshape(-1), b["positions"].reshape(-1)
    allowed = attention_allowed(b["segment_ids"], b["branch_ids"])
    S = 12
    for i, e in enumerate(exs):
        seq, lp = e.prompt_ids + e.completion_ids, len(e.prompt_ids)
        idx = b["completion_pred_idx"][i]
        for r in range(len(e.completion_ids)):
            assert tokens[idx[r]] == seq[lp + r - 1] and pos[idx[r]] == lp + r - 1
        last = idx[len(e.completion_ids) - 1]
        vis = np.nonzero(allowed[last // S, last % S])[0]
        assert sorted(tokens[vis + last // S * S].tolist()) == sorted(seq[:-1])
    assert b["example_mask"].tolist() == [1, 1, 1, 1, 0]


def test_gather_flat():
    x = np.arange(24).reshape(2, 4, 3)
    np.testing.assert_array_equal(gather_flat(x, np.array([[5, 0]])), [[x[1, 1], x[0, 0]]])


def test_layouts_give_same_token_logps_on_a_model():
    """padded, prefix_shared and packed give the padded layout's per-token log-probs and gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dpoq_jax.models import decoder
    from dpoq_jax.models.model_config import ModelConfig

    V = 50
    cfg = ModelConfig(
        family="llama",
        vocab_size=V,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=64,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        rotary_dim=8,
    )
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, attention="xla")
    pairs = _pairs(5, seed=4)
    P, R, S = 6, 6, 24

    graphdef, state = nnx.split(model)
    weights = np.random.default_rng(1).normal(size=(2, P, R)).astype(np.float32)  # a DPO-like signed sum

    @jax.jit
    def logps_and_grad(state, batch):
        def f(state):
            logits = nnx.merge(graphdef, state)(
                batch["tokens"], batch["positions"], batch["segment_ids"], batch["branch_ids"]
            )
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, V)
            out = jnp.stack(
                [
                    logp[batch[f"{side}_pred_idx"], batch[f"{side}_targets"]] * batch[f"{side}_mask"]
                    for side in ("chosen", "rejected")
                ]
            )
            return jnp.sum(out * weights), out

        (_, out), grad = jax.value_and_grad(f, has_aux=True)(state)
        return out, grad

    def run(layout, **kw):
        batch = preference_batch(pairs, layout, seq_len=S, response_len=R, num_pairs=P, **kw)
        return logps_and_grad(state, {k: jnp.asarray(v) for k, v in batch.items()})

    want, want_grad = run("padded")
    assert np.all(np.asarray(want)[:, :5].sum(-1) < 0)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want_grad))
    for layout, kw in (("prefix_shared", {}), ("packed", {"num_rows": rows_needed(pairs, S)})):
        got, grad = run(layout, **kw)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=layout)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=f"{layout} gradient")
