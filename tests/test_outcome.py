"""Unpaired outcome-label training: labelled rows -> layouts -> step -> precomputed reference.

The step's loss is checked against float64 log-probs from the model run on each unpadded sequence
alone (an independent path to the layouts and the lean log-probs), with a policy that differs from
its reference (after two updates), in every layout.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import local_batches, run_steps, tiny_config

from dpoq_jax.data import token_cache
from dpoq_jax.data.examples import PreferenceExample, TokenizedOutcome, unpair
from dpoq_jax.data.sources import SourceConfig, load_examples
from dpoq_jax.train import inputs
from dpoq_jax.train.precompute import precompute_reference
from dpoq_jax.train.setup import global_batch, setup


def outcome_config(layout: str = "padded", **loss):
    c = tiny_config("dpo")  # a one-device mesh
    c.loss.loss_type = "outcome_ce"
    c.loss.beta = 0.5
    c.loss.update(loss)
    c.data.layout = layout
    return c


def test_pairs_unpair_into_good_and_bad_responses():
    pairs = [PreferenceExample("p", " a", " b", {"line": 3})]
    out = unpair(pairs)
    assert [(e.completion, e.label, e.meta["side"], e.meta["line"]) for e in out] == [
        (" a", 1.0, "chosen", 3), (" b", 0.0, "rejected", 3)]  # fmt: skip
    src = SourceConfig(source="synthetic", task="error_injection", num_examples=5)
    examples, _ = load_examples(src, "outcome")
    assert [e.label for e in examples] == [1.0, 0.0] * 5


def test_labelled_jsonl_rows_strings_and_messages(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [
        {"prompt": "a b", "completion": " c", "label": True, "id": 7},
        {"prompt": "a", "completion": " d", "label": 0.25},
        {"prompt": [{"role": "user", "content": "hi"}],
         "completion": [{"role": "assistant", "content": "yo"}], "label": False},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, policy = load_examples(SourceConfig(source="jsonl", path=str(path)), "outcome")
    assert [e.label for e in examples] == [1.0, 0.25, 0.0] and policy.n_ok == 3
    assert examples[0].meta["id"] == 7 and "label" not in examples[0].meta
    assert examples[2].completion == [{"role": "assistant", "content": "yo"}]
    pairs = tmp_path / "pairs.jsonl"  # a pair file read for an unpaired loss: unpaired
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " c", "rejected": " d"}) + "\n")
    examples, _ = load_examples(SourceConfig(source="jsonl", path=str(pairs)), "outcome")
    assert [(e.completion, e.label) for e in examples] == [(" c", 1.0), (" d", 0.0)]


def _float64_loss(model_policy, model_ref, items, beta):
    """The outcome CE of `items` from each sequence run alone, log-softmax in float64."""

    def logps(model, item):
        ids = np.asarray(item.prompt_ids + item.completion_ids, np.int32)[None]
        L = ids.shape[1]
        logits = model(ids, np.arange(L)[None], np.ones_like(ids), np.zeros_like(ids))
        logits = np.asarray(logits, np.float64)[0]
        logits = logits - logits.max(-1, keepdims=True)
        lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        lp = len(item.prompt_ids)
        return sum(lsm[lp - 1 + j, t] for j, t in enumerate(item.completion_ids))

    per = []
    for item in items:
        r = beta * (logps(model_policy, item) - logps(model_ref, item))
        per.append(-(item.label * -np.logaddexp(0, -r) + (1 - item.label) * -np.logaddexp(0, r)))
    return float(np.mean(per))


def test_outcome_step_in_every_layout_equals_float64_per_sequence():
    run = setup(outcome_config(), devices=jax.devices()[:1])
    assert all(isinstance(x, TokenizedOutcome) for x in run.dataset.train)
    assert sorted({x.label for x in run.dataset.train}) == [0.0, 1.0]
    batches = local_batches(run, 3)
    assert set(batches[0]["label"][0].tolist()) == {0.0, 1.0}
    state, step_losses = run_steps(run, batches[:2])  # the policy moves away from its reference
    assert np.isfinite(step_losses).all()
    np.testing.assert_allclose(step_losses[0], np.log(2.0), rtol=1e-5)  # π = π_ref: r = 0 for every label
    B = run.cfg.train.batch_size
    items = run.dataset.train[2 * B : 3 * B]
    policy = nnx.merge(run.graphdef, state.params, run.rest)
    reference = nnx.merge(run.graphdef, state.ref_params, run.rest)
    want = _float64_loss(policy, reference, items, beta=0.5)
    assert abs(want - np.log(2.0)) > 1e-3  # the check can tell a moved policy from the reference
    for layout in ("padded", "prefix_shared", "packed"):
        r = setup(outcome_config(layout), devices=jax.devices()[:1])
        make = inputs.micro_batch_fn(r.cfg, B)
        batch = inputs.stack_micro(items, make, 1)
        b_sh = r.batch_shardings(batch)
        _, eval_fn = r.compile(b_sh)
        m = eval_fn(state, global_batch(batch, b_sh))
        np.testing.assert_allclose(float(m["loss"]), want, rtol=2e-5, err_msg=layout)
        assert float(m["weight"]) == B


def _all_devices(cfg):
    """precompute-ref runs on every device (the tests' 8 CPU devices): the data axis takes them all."""
    c = cfg.copy_and_resolve_references()
    c.mesh.data = -1
    return c


def test_precomputed_reference_trains_like_the_frozen_one(tmp_path, loss_type="apo_zero_unpaired"):
    """(outcome_ce runs through the step in every layout above; here the other unpaired type.)"""
    cfg = outcome_config(loss_type=loss_type)
    out = tmp_path / "ref_cache"
    n = precompute_reference(_all_devices(cfg), str(out))
    cache = token_cache.TokenCache(str(out))
    # data.num_examples counts the labelled responses used (from 64 pairs unpaired: the first 64)
    assert n == len(cache) == cfg.data.num_examples + cfg.data.num_eval
    assert cache.fields == ["ref_completion_logps"]
    frozen = setup(cfg, devices=jax.devices()[:1])
    _, want = run_steps(frozen, local_batches(frozen, 3))
    pre = outcome_config(loss_type=loss_type)
    pre.reference.mode, pre.reference.logps_path = "precomputed", str(out)
    run = setup(pre, devices=jax.devices()[:1])
    assert run.shardings.ref_params is None  # no reference parameters held
    batches = local_batches(run, 3)
    assert "ref_completion_logps" in batches[0]
    _, got = run_steps(run, batches)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(set(got.tolist())) == 3  # it trains


def test_precomputed_file_of_pairs_is_refused_for_labelled_responses(tmp_path):
    pairs_cfg = tiny_config("dpo")
    out = tmp_path / "pairs_ref"
    precompute_reference(_all_devices(pairs_cfg), str(out))
    pre = outcome_config()
    pre.reference.mode, pre.reference.logps_path = "precomputed", str(out)
    with pytest.raises(ValueError, match="has fields .*ref_chosen_logps.*lacks .*ref_completion_logps"):
        setup(pre, devices=jax.devices()[:1])


def test_ahead_of_time_batch_has_the_precomputed_completion_logps():
    from dpoq_jax.train.aot import abstract_batch

    c = outcome_config()
    c.reference.mode = "precomputed"
    batch = abstract_batch(c, lambda example: dict.fromkeys(example))
    assert batch["ref_completion_logps"].shape == batch["completion_mask"].shape
    assert batch["label"].shape == batch["example_mask"].shape and "pair_mask" not in batch
