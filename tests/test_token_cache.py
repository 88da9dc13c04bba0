"""Token caches (data/token_cache.py, train/precompute.py): format round trip, fingerprints refused,
streamed reads, runs fed from a cache equal runs with the frozen reference, and the cached token losses
(token_weighted, selective) in the real step on every layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_MODEL, local_batches, loop_config, run_steps, tiny_config

from dpoq_jax import losses
from dpoq_jax.data import token_cache
from dpoq_jax.train import inputs
from dpoq_jax.train.precompute import precompute_reference, token_rewards, write_values_cache
from dpoq_jax.train.setup import setup

FIELDS = ["chosen_token_values", "rejected_token_values"]
SYNTHETIC = Path(__file__).resolve().parents[1] / "dpoq_jax" / "configs" / "synthetic.py"


def _write(tmp_path, items, dtype="float32", shard_items=3, kind="token_rewards", fp=None):
    out = str(tmp_path / "cache")
    w = token_cache.CacheWriter(out, kind, FIELDS, fp or {"tokenizer": "t", "data": "d"}, dtype, shard_items)
    for key, vals in items.items():
        w.add(key, vals)
    return out, w.close()


def _items(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return {f"{i:016x}": {f: rng.normal(size=int(rng.integers(1, 9))) for f in FIELDS} for i in range(n)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_in_shards(tmp_path, dtype):
    items = _items()
    out, manifest = _write(tmp_path, items, dtype)
    assert manifest["items"] == 7 and [s["items"] for s in manifest["shards"]] == [3, 3, 1]
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    cache = token_cache.TokenCache(out)
    assert len(cache) == 7 and cache.values("00000000000000ff") is None
    cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    for key, vals in items.items():
        got = cache.values(key)
        for f in FIELDS:
            assert len(got[f]) == len(vals[f])
            want = np.asarray(vals[f], np.float32).astype(cast).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(got[f]), want)


def test_writer_refuses_bad_values_and_skips_repeats(tmp_path):
    w = token_cache.CacheWriter(str(tmp_path / "c"), "token_weights", FIELDS, {})
    with pytest.raises(ValueError, match="non-finite value in field 'rejected_token_values'"):
        w.add("0" * 16, {"chosen_token_values": [1.0], "rejected_token_values": [np.nan]})
    with pytest.raises(ValueError, match="negative weight in field 'chosen_token_values'"):
        w.add("0" * 16, {"chosen_token_values": [-1.0], "rejected_token_values": [1.0]})
    with pytest.raises(ValueError, match="no values for fields"):
        w.add("0" * 16, {"chosen_token_values": [1.0]})
    w.add("0" * 16, {"chosen_token_values": [1.0], "rejected_token_values": [2.0]})
    w.add("0" * 16, {"chosen_token_values": [5.0], "rejected_token_values": [5.0]})  # same key: skipped
    assert w.close()["items"] == 1


def test_damaged_or_incomplete_caches_are_refused(tmp_path):
    out, _ = _write(tmp_path, _items())
    os.truncate(os.path.join(out, "shard-00001.safetensors"), 100)
    with pytest.raises(ValueError, match="shard shard-00001.safetensors is missing or not"):
        token_cache.TokenCache(out)
    os.remove(os.path.join(out, "manifest.json"))  # a write cut short before its manifest
    with pytest.raises(ValueError, match="not a token cache"):
        token_cache.TokenCache(out)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"format": "dpoq-token-cache", "version": 9}))
    with pytest.raises(ValueError, match="key 'version' is 9"):
        token_cache.TokenCache(str(tmp_path / "m"))


def test_a_new_cache_replaces_the_old_only_when_whole(tmp_path):
    out, _ = _write(tmp_path, _items(3))
    w = token_cache.CacheWriter(out, "token_rewards", FIELDS, {"data": "new"})
    w.add("1" * 16, {f: [0.5] for f in FIELDS})  # not closed: the old cache is still there, whole
    assert token_cache.TokenCache(out).manifest["fingerprint"]["data"] == "d"
    w.close()
    assert len(token_cache.TokenCache(out)) == 1 and not os.path.exists(out + ".partial")


def test_check_names_the_mismatch(tmp_path):
    out, _ = _write(tmp_path, _items(2), fp={"tokenizer": "abc", "data": "d1"})
    cache = token_cache.TokenCache(out)
    cache.check({"tokenizer": "abc", "data": "d1"}, ("token_rewards",), FIELDS, "x")
    with pytest.raises(token_cache.CacheMismatch, match=r"made for another data: cache d1, this run d2"):
        cache.check({"tokenizer": "abc", "data": "d2"}, ("token_rewards",), FIELDS, "x")
    with pytest.raises(token_cache.CacheMismatch, match="cache; this run needs reference_logps"):
        cache.check({}, ("reference_logps",), FIELDS, "x")


# ---- caches of a run's data ---------------------------------------------------------------------------


def _small(cfg):
    cfg.data.num_examples, cfg.data.num_eval = 32, 8
    return cfg


def _all_devices(cfg):
    """The cache writers run on every device (the tests' 8 CPU devices): the data axis takes them all."""
    c = cfg.copy_and_resolve_references()
    c.mesh.data = -1
    return c


def test_precomputed_cache_trains_like_the_frozen_reference(tmp_path):
    from dpoq_jax.train.loop import train

    cfg = _small(loop_config("dpo", steps=3))
    cfg.train.eval_every = 0
    out = str(tmp_path / "ref_cache")
    assert precompute_reference(cfg, out) == 40
    cache = token_cache.TokenCache(out)
    assert cache.kind == "reference_logps" and cache.fields == ["ref_chosen_logps", "ref_rejected_logps"]
    frozen = train(cfg, str(tmp_path / "frozen"))
    pre = cfg.copy_and_resolve_references()
    pre.reference.mode, pre.reference.logps_path = "precomputed", out
    got = train(pre, str(tmp_path / "pre"))
    assert got.state.ref_params is None
    for key in ("loss", "rewards/margins", "token_rewards/chosen_mean"):
        np.testing.assert_allclose(got.metrics[key], frozen.metrics[key], rtol=1e-5, atol=1e-6)

    # the same log-probs as JSON lines (what dpoq wrote before the cache) still load
    legacy = tmp_path / "ref.jsonl"
    run = setup(pre, devices=jax.devices()[:1])
    with legacy.open("w") as fh:
        for item in run.dataset.train + run.dataset.eval:
            row = {"fingerprint": inputs.fingerprint(item)}
            row.update({k: np.asarray(item.meta[k]).tolist() for k in cache.fields})
            fh.write(json.dumps(row) + "\n")
    pre.reference.logps_path = str(legacy)
    old = train(pre, str(tmp_path / "legacy"))
    np.testing.assert_allclose(old.metrics["loss"], got.metrics["loss"], rtol=1e-6)

    # another model than the one the cache was computed with: refused at the start of training
    other = pre.copy_and_resolve_references()
    other.reference.logps_path, other.seed = out, 7
    with pytest.raises(token_cache.CacheMismatch, match="made for another model"):
        train(other, str(tmp_path / "other"))


def test_cache_of_other_data_or_tokenizer_is_refused(tmp_path):
    cfg = _small(tiny_config())
    out = str(tmp_path / "ref_cache")
    precompute_reference(_all_devices(cfg), out)
    other = cfg.copy_and_resolve_references()
    other.reference.mode, other.reference.logps_path = "precomputed", out
    other.data.task_kwargs.seed = 3  # other synthetic data
    with pytest.raises(token_cache.CacheMismatch, match="'reference.logps_path': .* another data"):
        setup(other, devices=jax.devices()[:1])
    sub = cfg.copy_and_resolve_references()
    sub.reference.mode, sub.reference.logps_path = "precomputed", out
    sub.data.num_examples = 16  # a subset of the cached pairs is fine
    assert len(setup(sub, devices=jax.devices()[:1]).dataset.train) == 16
    sub.data.response_len = 6  # other truncation: other token ids
    sub.data.truncate_responses, sub.data.on_error = True, "skip"  # (pairs made equal: skipped)
    with pytest.raises(ValueError, match="no values for pair"):
        setup(sub, devices=jax.devices()[:1])


def _perturbed(run, state, scale=0.05, seed=1):
    noise = jax.tree.map(lambda x: scale * jax.random.normal(jax.random.key(seed), x.shape), state.params)
    return jax.tree.map(jnp.add, state.params, noise)


def _dense_logps(run, params, tokens):
    """log π(tokens[1:]) of one sequence from the full logits in float64 (numpy)."""
    model = nnx.merge(run.graphdef, params, run.rest)
    t = jnp.asarray(tokens)[None]
    logits = np.asarray(model(t, jnp.arange(len(tokens))[None]), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - logz[:-1]


def test_token_rewards_are_the_oracle_log_ratio(tmp_path):
    """dpoq token-rewards' values: β(log π − log π_ref) of every response token, against float64 log-probs
    of the full logits of two checkpoints that differ."""
    from dpoq_jax.models.decoder import split_params
    from dpoq_jax.models.params_io import save_params
    from dpoq_jax.train.load import load_model

    cfg = _small(tiny_config())
    run = setup(cfg, devices=jax.devices()[:1])
    state = run.new_state()
    dirs = {}
    for name, params in (("policy", _perturbed(run, state)), ("reference", state.params)):
        dirs[name] = str(tmp_path / name)
        save_params(dirs[name], nnx.merge(run.graphdef, params, run.rest), run.source.model_config)
    out = str(tmp_path / "rewards")
    assert token_rewards(_all_devices(cfg), dirs["policy"], dirs["reference"], out, beta=0.5) == 40
    cache = token_cache.TokenCache(out)
    assert cache.kind == "token_rewards" and cache.manifest["fingerprint"]["beta"] == 0.5
    models = {k: split_params(load_model(v)) for k, v in dirs.items()}
    for item in (run.dataset.train[0], run.dataset.eval[3]):
        vals = cache.values(inputs.fingerprint(item))
        for side, ids in inputs.reference_sides(item):
            seq = np.array(item.prompt_ids + ids)
            lp = {k: _dense_logps(run, m[1], seq)[len(item.prompt_ids) - 1 :] for k, m in models.items()}
            want = 0.5 * (lp["policy"] - lp["reference"])
            assert np.abs(want).max() > 1e-3
            np.testing.assert_allclose(np.asarray(vals[f"{side}_token_values"]), want, atol=2e-5)


def _cache_of(tmp_path, run, values_fn, kind="token_rewards"):
    """A token cache of the run's pairs whose values are values_fn(item, side, ids)."""
    out = str(tmp_path / f"cache_{kind}")
    assert write_values_cache(run.cfg, out, kind, values_fn) == 40
    return out


def _loss_and_grads(cfg, params=None):
    run = setup(cfg, devices=jax.devices()[:1])
    state = run.new_state()
    params = _perturbed(run, state) if params is None else params
    (batch,) = local_batches(run, 1)
    micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    (loss, (_, m)), g = jax.value_and_grad(run.loss_fn, has_aux=True)(params, state.ref_params, micro)
    return float(loss), g, m, micro


def _pseudo_rewards(item, side, ids):
    return np.sin(np.arange(len(ids)) * 1.7 + len(item.prompt_ids) + (side == "rejected"))


@pytest.mark.parametrize("loss_type", ["token_weighted", "selective"])
def test_cached_token_losses_in_the_step_on_every_layout(tmp_path, loss_type):
    """The step feeds the cache's values to the loss: equal to losses.preference_loss given the same
    values by hand (TIS weights or SePO selection), and the same loss and gradients in padded,
    prefix-shared and packed rows."""
    base = _small(tiny_config())
    cache = _cache_of(tmp_path, setup(base, devices=jax.devices()[:1]), _pseudo_rewards)
    out = {}
    for layout in ("padded", "prefix_shared", "packed"):
        cfg = base.copy_and_resolve_references()
        cfg.data.layout, cfg.data.seq_len = layout, 64
        cfg.loss.loss_type, cfg.loss.token_weights = loss_type, cache
        cfg.loss.tis_mu, cfg.loss.tis_lower, cfg.loss.tis_upper, cfg.loss.select_ratio = 0.8, -0.5, 0.7, 0.4
        loss, grads, metrics, micro = _loss_and_grads(cfg)
        out[layout] = (loss, grads)
        assert "chosen_token_values" in micro
        if layout == "padded":
            assert metrics[f"{loss_type}/" + ("weight_chosen" if loss_type == "token_weighted"
                                              else "fraction_chosen")] != 1.0  # fmt: skip
    loss0, g0 = out["padded"]
    for layout in ("prefix_shared", "packed"):
        np.testing.assert_allclose(out[layout][0], loss0, rtol=1e-5, err_msg=layout)
        for a, b in zip(jax.tree.leaves(out[layout][1]), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=layout)


def test_step_weights_are_tis_weights_of_the_cached_rewards(tmp_path):
    base = _small(tiny_config())
    run0 = setup(base, devices=jax.devices()[:1])
    cfg = base.copy_and_resolve_references()
    cfg.loss.loss_type, cfg.loss.token_weights = "token_weighted", _cache_of(tmp_path, run0, _pseudo_rewards)
    cfg.loss.tis_mu, cfg.loss.tis_lower, cfg.loss.tis_upper = 0.8, -0.5, 0.7
    run = setup(cfg, devices=jax.devices()[:1])
    state = run.new_state()
    params = _perturbed(run, state)
    loss, _, _, micro = _loss_and_grads(cfg, params)
    from dpoq_jax.train.step import layout_logps

    pc, pr = layout_logps(run.graphdef, run.rest, params, micro, run.forward)
    rc, rr = layout_logps(run.graphdef, run.rest, state.ref_params, micro, run.forward)
    w = {}
    for side in ("chosen", "rejected"):
        r, m = np.asarray(micro[f"{side}_token_values"], np.float64), np.asarray(micro[f"{side}_mask"])
        sign = 1.0 if side == "chosen" else -1.0
        w[side] = np.exp(sign * 0.8 * np.clip(r, -0.5, 0.7)) * m  # TIS-DPO's weights, by hand
    want, _ = losses.preference_loss(pc, pr, rc, rr, micro["chosen_mask"], micro["rejected_mask"],
                                     config=losses.LossConfig(beta=0.1, loss_type="token_weighted"),
                                     pair_mask_B=micro["pair_mask"],
                                     chosen_weights_BT=jnp.asarray(w["chosen"]),
                                     rejected_weights_BT=jnp.asarray(w["rejected"]))  # fmt: skip
    np.testing.assert_allclose(loss, float(want), rtol=1e-5)


def test_weights_of_one_train_like_dpo_and_selective_at_ratio_one_like_simpo(tmp_path):
    """A cache of weights all 1 makes token_weighted DPO's sigmoid loss over whole training runs (1e-5);
    selective at ratio 1 is SimPO."""
    base = _small(tiny_config())
    run0 = setup(base, devices=jax.devices()[:1])
    ones = _cache_of(tmp_path, run0, lambda item, s, ids: np.ones(len(ids)), kind="token_weights")
    _, want = run_steps(run0, local_batches(run0, 3))
    cfg = base.copy_and_resolve_references()
    cfg.loss.loss_type, cfg.loss.token_weights = "token_weighted", ones
    run = setup(cfg, devices=jax.devices()[:1])
    assert run.caches["token_values"].kind == "token_weights"
    _, got = run_steps(run, local_batches(run, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(set(got.tolist())) == 3

    rewards = _cache_of(tmp_path, run0, _pseudo_rewards)
    simpo = base.copy_and_resolve_references()
    simpo.loss.loss_type = "simpo"
    run_s = setup(simpo, devices=jax.devices()[:1])
    _, want = run_steps(run_s, local_batches(run_s, 3))
    sel = base.copy_and_resolve_references()
    sel.loss.loss_type, sel.loss.token_weights, sel.loss.select_ratio = "selective", rewards, 1.0
    run = setup(sel, devices=jax.devices()[:1])
    assert run.shardings.ref_params is None  # reference-free: no reference held
    _, got = run_steps(run, local_batches(run, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_config_errors_for_token_caches(tmp_path):
    from dpoq_jax.train.config import ConfigError, validate

    cfg = tiny_config()
    cfg.loss.loss_type = "selective"
    with pytest.raises(ConfigError, match="'loss.token_weights' is required for loss.loss_type"):
        validate(cfg)
    cfg.loss.loss_type, cfg.loss.token_weights = "sigmoid", str(tmp_path)
    with pytest.raises(ConfigError, match="uses no token cache"):
        validate(cfg)
    cfg.loss.loss_type, cfg.loss.token_weights = "token_weighted", str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        validate(cfg)
    run0 = setup(_small(tiny_config()), devices=jax.devices()[:1])
    weights = _cache_of(tmp_path, run0, lambda item, s, ids: np.ones(len(ids)), kind="token_weights")
    cfg = _small(tiny_config())
    cfg.loss.loss_type, cfg.loss.token_weights = "selective", weights
    with pytest.raises(token_cache.CacheMismatch, match="weights' cache; this run needs token_rewards"):
        setup(cfg, devices=jax.devices()[:1])


def test_token_rewards_command_then_train(tmp_path, capsys):
    """`dpoq token-rewards` on two checkpoints, then `dpoq train` with token_weighted and selective on its
    cache (the synthetic config), and a cache of other data refused in one line."""
    from dpoq_jax import cli
    from dpoq_jax.models.params_io import save_params

    cfg = _small(tiny_config())
    run = setup(cfg, devices=jax.devices()[:1])
    state = run.new_state()
    dirs = {}
    for name, params in (("policy", _perturbed(run, state)), ("reference", state.params)):
        dirs[name] = str(tmp_path / name)
        save_params(dirs[name], nnx.merge(run.graphdef, params, run.rest), run.source.model_config)
    config = f"{SYNTHETIC}:error_injection:dpo:{dirs['reference']}"
    over = ["--config.data.num_examples=32", "--config.data.num_eval=8", "--config.train.batch_size=8",
            *(f"--config.model.config.{k}={v}" for k, v in TINY_MODEL.items())]  # fmt: skip
    out = str(tmp_path / "oracle")
    rc = cli.main(["token-rewards", "--config", config, "--policy", dirs["policy"], "--reference",
                   dirs["reference"], "--out", out, *over])  # fmt: skip
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert "wrote token rewards of 40 pairs" in capsys.readouterr().out
    for loss in ("token_weighted", "selective"):
        rc = cli.main(["train", "--config", config, "--workdir", str(tmp_path / loss), *over,
                       "--config.train.num_steps=2", "--config.train.eval_every=0",
                       "--config.model.hf_export=false",
                       f"--config.loss.loss_type={loss}", f"--config.loss.token_weights={out}"])  # fmt: skip
        assert rc == 0, capsys.readouterr().err[-2000:]
    with pytest.raises(SystemExit) as e:  # a user error: one line (exit status 1), no traceback
        cli.main(["train", "--config", config, "--workdir", str(tmp_path / "other"), *over,
                  "--config.data.task_kwargs.seed=5", "--config.loss.loss_type=selective",
                  f"--config.loss.token_weights={out}"])  # fmt: skip
    msg = str(e.value.code)
    assert "\n" not in msg and "token cache" in msg and "was made for another data" in msg, msg
