"""LoRA policies (models/lora.py): zero-init adapters are the base, only adapters train and hold optimizer
state, adapters shard by the same rules, adapters-only checkpoints point at their base, and the merged
and PEFT exports compute the adapted model."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import local_batches, tiny_config

from dpoq_jax.models import hf, lora
from dpoq_jax.models import safetensors_dir as stdir
from dpoq_jax.models.decoder import Decoder
from dpoq_jax.models.model_config import ModelConfig
from dpoq_jax.train.checkpoint import RunCheckpoints
from dpoq_jax.train.config import ConfigError, validate
from dpoq_jax.train.load import load_model
from dpoq_jax.train.loop import train
from dpoq_jax.train.setup import global_batch, setup


def lora_config(stage="dpo", rank=4, **mesh):
    c = tiny_config(stage, **mesh)
    c.model.lora.rank = rank
    c.model.lora.alpha = 8.0
    return c


def _tokens(cfg, n=2, s=12, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (n, s))), jnp.broadcast_to(jnp.arange(s), (n, s))


def test_zero_init_adapters_are_the_base_and_disable_gives_it_back():
    mcfg = ModelConfig.from_dict(tiny_config().model.config.to_dict())
    tok, pos = _tokens(mcfg)
    base = Decoder(mcfg, rngs=nnx.Rngs(0))
    model = Decoder(mcfg, rngs=nnx.Rngs(0), lora=lora.LoraConfig(rank=4))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapters, base_params = lora.split_adapters(params)
    # the base's random init does not depend on the adapters (their own RNG stream)
    for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(nnx.state(base, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(tok, pos), base(tok, pos))  # B = 0: exactly the base
    # trained adapters change the logits; disabled ones give the base back bitwise
    trained = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), adapters)
    moved = nnx.merge(graphdef, base_params, trained, rest)(tok, pos)
    assert np.max(np.abs(np.asarray(moved - base(tok, pos)))) > 1e-3
    off = nnx.merge(graphdef, base_params, lora.disable(trained), rest)(tok, pos)
    np.testing.assert_array_equal(off, base(tok, pos))


def _spec(x):
    return tuple(x.sharding.spec)


def test_lora_dpo_step_log2_at_start_trains_only_adapters_sharded_by_the_rules():
    cfg = lora_config("dpo", data=2, fsdp=2, tensor=2)
    cfg.optim.name = "adamw"
    run = setup(cfg)
    batches = local_batches(run, 1) * 3  # one batch thrice: its loss must fall
    b_sh = run.batch_shardings(batches[0])
    step_fn, _ = run.compile(b_sh)
    state = run.new_state()
    base0 = [np.asarray(x) for x in jax.tree.leaves(state.ref_params)]
    ad0 = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    # state.params are the adapters only; optimizer moments exist for them and nothing else
    n_ad = sum(x.size for x in jax.tree.leaves(state.params))
    n_base = sum(x.size for x in jax.tree.leaves(state.ref_params))
    assert all(p == "a" or p == "b" for p in _last_keys(state.params))
    assert n_ad < n_base / 5
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_ad  # adam mu, nu
    # adapters shard by the same logical rules as their projection (tensor over heads, fsdp over embed)
    q = nnx.to_pure_dict(state.params)["blocks"]["attn"]["wq_lora"]
    wq = nnx.to_pure_dict(state.ref_params)["blocks"]["attn"]["wq"]
    assert _spec(q["a"])[:2] == _spec(wq)[:2] and "fsdp" in str(_spec(q["a"]))
    assert _spec(q["b"])[2:] == _spec(wq)[2:] and "tensor" in str(_spec(q["b"]))
    losses = []
    for b in batches:
        state, m = step_fn(state, global_batch(b, b_sh))
        losses.append(float(m["loss"]))
        if len(losses) == 1:
            assert float(m["grad_norm"]) > 0
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert losses[-1] < losses[0]
    for a, b in zip(base0, jax.tree.leaves(state.ref_params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base: bitwise unchanged
    after = jax.tree.leaves(state.params)
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(ad0, after, strict=True))  # all updated


def _last_keys(state):
    return [p[-1] for p, _ in nnx.to_flat_state(state)]


@pytest.mark.slow
def test_lora_run_folder_from_a_random_base_loads_merged(tmp_path):
    """`load_model(WORKDIR)` of a LoRA run whose base was a random init: the base is initialised again
    from the run's seed, checked against the checksums stored with the adapters, and the adapters
    merged in: the same logits as the run's own merged export."""
    cfg = lora_config("sft", data=-1, fsdp=1, tensor=1)
    cfg.train.num_steps = cfg.checkpoint.every_steps = 2
    cfg.train.eval_every, cfg.train.progress_bar = 0, False
    work = str(tmp_path / "run")
    train(cfg, work)
    mcfg = ModelConfig.from_dict(cfg.model.config.to_dict())
    tok, pos = _tokens(mcfg, seed=2)
    exported = np.asarray(load_model(os.path.join(work, "hf"))(tok, pos))
    np.testing.assert_allclose(np.asarray(load_model(work)(tok, pos)), exported, atol=1e-5, rtol=0)
    base_only = np.asarray(Decoder(mcfg, rngs=nnx.Rngs(cfg.seed))(tok, pos))
    assert np.max(np.abs(exported - base_only)) > 1e-4  # the adapters changed the model


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_with_base_pointer_and_exports_merged_and_peft(tmp_path):
    """A LoRA-DPO run from a Hugging Face base: checkpoints hold adapters plus a pointer to the base
    (a changed base is refused on resume), the merged export computes the adapted model, and so does
    the PEFT adapter folder on the base in transformers (if peft is installed)."""
    mcfg = ModelConfig.from_dict(tiny_config().model.config.to_dict())
    base_dir = str(tmp_path / "base")
    hf.save_hf(Decoder(mcfg, rngs=nnx.Rngs(3)), mcfg, base_dir)
    cfg = lora_config("dpo", data=-1, fsdp=1, tensor=1)
    cfg.model.init, cfg.model.path = "hf", base_dir
    cfg.train.num_steps, cfg.checkpoint.every_steps = 4, 2
    cfg.train.eval_every, cfg.train.progress_bar = 0, False
    work = str(tmp_path / "run")
    result = train(cfg, work)
    ckpts = RunCheckpoints(os.path.join(work, "checkpoints"), every_steps=1, keep=9)
    saved = ckpts.read_json(4, "integrity")["arrays"]
    assert saved and all("_lora']" in k for k in saved if k.startswith("params"))  # adapters only
    assert not any("ref_params" in k for k in saved)  # and no base copy in train_state
    assert ckpts.read_json(4, "base")["path"] == os.path.abspath(base_dir)
    state = result.state
    run = setup(cfg)
    graphdef, rest = run.graphdef, run.rest
    tok, pos = _tokens(mcfg, seed=1)
    adapted = np.asarray(nnx.merge(graphdef, state.ref_params, state.params, rest)(tok, pos))
    off = lora.disable(state.params)
    base_logits = np.asarray(nnx.merge(graphdef, state.ref_params, off, rest)(tok, pos))
    assert np.max(np.abs(adapted - base_logits)) > 1e-4  # the adapters learned something
    merged = load_model(os.path.join(work, "hf"))
    np.testing.assert_allclose(np.asarray(merged(tok, pos)), adapted, atol=1e-5, rtol=0)
    # the run folder itself (what `dpoq generate/score/convert` read): its base loaded again from the
    # pointer, checked, the adapters merged in: the same model as the export
    from_run = load_model(work)
    np.testing.assert_allclose(np.asarray(from_run(tok, pos)), adapted, atol=1e-5, rtol=0)

    # resume (two more steps) reloads the base and checks it against the pointer
    with cfg.unlocked():
        cfg.train.num_steps = 6
    resumed = train(cfg, work)
    assert int(resumed.state.step) == 6
    # a base that changed since the adapters were trained is refused, in one line naming the step
    st = stdir.SafetensorsDir(base_dir)
    tensors = {k: np.array(st.get(k)) for k in st.where}  # copies: the file is rewritten below
    del st
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    stdir.write_safetensors(os.path.join(base_dir, "model.safetensors"), tensors)
    with cfg.unlocked():
        cfg.train.num_steps = 8
    with pytest.raises(ValueError, match=r"checkpoints/6: the base model .* differs"):
        train(cfg, work)

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    stdir.write_safetensors(os.path.join(base_dir, "model.safetensors"), {
        **tensors, "model.norm.weight": tensors["model.norm.weight"] - 1.0})
    base_pt = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model_pt = peft.PeftModel.from_pretrained(base_pt, os.path.join(work, "hf_adapter")).eval()
    final = resumed.state
    want = np.asarray(nnx.merge(graphdef, final.ref_params, final.params, rest)(tok, pos))
    with torch.no_grad():
        got = model_pt(torch.as_tensor(np.asarray(tok))).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model.lora.rank", -1, "model.lora.rank' must be >= 0"),
        ("model.lora.targets", ("q", "w_qkv"), r"model.lora.targets': unknown \['w_qkv'\]"),
        ("model.lora.alpha", 0.0, "model.lora.alpha' must be"),
        ("reference.mode", "precomputed", "reference.mode' must be 'frozen' with LoRA"),
    ],
)
def test_lora_config_errors_name_the_key(key, value, match):
    cfg = lora_config("dpo")
    group, *rest = key.split(".")
    node = cfg[group]
    for k in rest[:-1]:
        node = node[k]
    with node.unlocked():
        node[rest[-1]] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
