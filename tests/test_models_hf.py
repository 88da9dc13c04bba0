"""The decoder against transformers' PyTorch models: tiny random models of each family, saved to a temp
directory, loaded by dpoq_jax; logits (padding, explicit positions), export back, KV-cache decoding."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dpoq_jax.models import hf
from dpoq_jax.models import safetensors_dir as stdir
from dpoq_jax.train.load import load_model

V = 128
TOL = 1e-4
_TINY = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)

FAMILIES = {
    "neox_parallel": lambda: transformers.GPTNeoXConfig(**_TINY, rotary_pct=0.5, use_parallel_residual=True),
    "neox_sequential": lambda: transformers.GPTNeoXConfig(
        **_TINY, rotary_pct=0.25, use_parallel_residual=False
    ),
    "llama3_gqa": lambda: transformers.LlamaConfig(
        **_TINY,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=10000.0,
    ),
    "llama_tied_bias": lambda: transformers.LlamaConfig(
        **_TINY, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "qwen2": lambda: transformers.Qwen2Config(  # window 3 from layer 1 on (max_window_layers)
        **_TINY,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # Newer families: windows of 3-4 tokens and small soft-caps so that each feature changes the logits.
    "qwen3_window_yarn": lambda: transformers.Qwen3Config(
        **_TINY,
        num_key_value_heads=2,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        },
    ),  # fmt: skip
    "mistral_window": lambda: transformers.MistralConfig(**_TINY, num_key_value_heads=2, sliding_window=4),
    "gemma2": lambda: transformers.Gemma2Config(
        **_TINY,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),  # fmt: skip
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**_TINY, "num_hidden_layers": 3},
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        },
    ),  # fmt: skip
}
_OUR_FAMILY = {"neox_parallel": "gpt_neox", "neox_sequential": "gpt_neox", "gpt2": "gpt2", "qwen2": "qwen2",
               "qwen3_window_yarn": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}  # fmt: skip
NEW = ["qwen3_window_yarn", "mistral_window", "gemma2", "gemma3"]


def _randomise(model) -> None:
    """Default inits are tiny (std 0.02, zero biases); larger random values make the comparison bite."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """family -> (torch model, saved directory)."""
    out = {}
    for i, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        m = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        _randomise(m)
        if m.config.tie_word_embeddings:
            m.tie_weights()
        d = str(tmp_path_factory.mktemp(name))
        m.save_pretrained(d)
        out[name] = (m, d)
    return out


@nnx.jit
def _jit_forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)


def _forward(model, tokens, positions, segment_ids=None):
    """Jitted forward (eager op-by-op dispatch is slower than compiling these tiny graphs)."""
    return _jit_forward(
        model,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        None if segment_ids is None else jnp.asarray(segment_ids),
    )


@nnx.jit
def _decode(model, tokens, positions, cache, mask):
    return model.decode(tokens, positions, cache, mask)


def _padded_batch(seed: int = 0):
    """Left- and right-padded rows of different lengths with position ids that do not start at 0."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, V, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + np.array([[0], [5], [2]])
    return ids, mask, pos


def _torch_logits(m, ids, mask=None, pos=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask), "position_ids": torch.tensor(pos)}
        return m(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(torch_models, family):
    m, d = torch_models[family]
    model = load_model(d)
    cfg = model.cfg
    assert cfg.family == _OUR_FAMILY.get(family, "llama")
    ids, mask, pos = _padded_batch()
    # Plain causal rows (no segment ids).
    plain = np.asarray(_forward(model, ids, np.broadcast_to(np.arange(9), ids.shape)))
    np.testing.assert_allclose(plain, _torch_logits(m, ids), atol=TOL, rtol=0)
    # Padding (segment 0) and explicit positions; only real tokens are compared.
    ours = np.asarray(_forward(model, ids, pos, mask))
    ref = _torch_logits(m, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= TOL


@pytest.mark.parametrize("family", ["neox_sequential", "llama3_gqa", "qwen2", "gpt2"])
def test_export_loads_in_transformers(torch_models, family, tmp_path):
    m, d = torch_models[family]
    model = load_model(d)
    cfg = model.cfg
    hf.save_hf(model, cfg, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    ).eval()
    ids, mask, pos = _padded_batch(1)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        _torch_logits(back, ids, mask, pos)[real], _torch_logits(m, ids, mask, pos)[real], atol=TOL, rtol=0
    )
    # And our loader reads the export back to the same config.
    cfg2 = load_model(str(tmp_path)).cfg
    assert cfg2 == cfg


@pytest.mark.parametrize("family", NEW)
def test_convert_both_ways_loads_in_transformers(torch_models, family, tmp_path):
    """`dpoq convert` HF -> orbax -> HF, then AutoModelForCausalLM: the original logits and config."""
    from dpoq_jax.commands.convert import convert_main

    m, d = torch_models[family]
    ck, back = str(tmp_path / "ck"), str(tmp_path / "back")
    assert convert_main(["--from", d, "--to", ck]) == 0
    assert convert_main(["--from", ck, "--to", back]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    assert type(reloaded) is type(m)
    ids, mask, pos = _padded_batch(1)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        _torch_logits(reloaded, ids, mask, pos)[real],
        _torch_logits(m, ids, mask, pos)[real],
        atol=TOL,
        rtol=0,
    )
    assert load_model(back).cfg == load_model(d).cfg


@pytest.mark.parametrize("family", ["neox_parallel", "llama3_gqa", "gpt2", *NEW])
def test_kv_cache_decoding_equals_full_forward(torch_models, family):
    """Left-padded prefill, then one token at a time; every step's logits equal the full forward."""
    _, d = torch_models[family]
    model = load_model(d)
    rng = np.random.RandomState(2)
    B, T0, steps = 2, 5, 4
    prompt = rng.randint(0, V, (B, T0))
    mask = np.ones((B, T0), np.int32)
    mask[1, :2] = 0  # row 1 is left-padded
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(B, T0 + steps, jnp.float32)
    logits, cache = _decode(model, jnp.asarray(prompt), jnp.asarray(pos), cache, jnp.asarray(mask))
    toks, msk, ps = prompt, mask, pos
    full = np.asarray(_forward(model, toks, ps, msk))
    np.testing.assert_allclose(
        np.asarray(logits)[mask.astype(bool)], full[mask.astype(bool)], atol=TOL, rtol=0
    )
    got = []
    for _ in range(steps):
        nxt = np.asarray(logits[:, -1]).argmax(-1)[:, None]
        nxt_pos = ps[:, -1:] + 1
        logits, cache = _decode(model, jnp.asarray(nxt), jnp.asarray(nxt_pos), cache, jnp.ones((B, 1), bool))
        got.append(np.asarray(logits)[:, 0])
        toks = np.concatenate([toks, nxt], 1)
        ps = np.concatenate([ps, nxt_pos], 1)
        msk = np.concatenate([msk, np.ones((B, 1), np.int32)], 1)
    # Causal attention: one forward over the final sequence gives every step's logits.
    full = np.asarray(_forward(model, toks, ps, msk))
    for s, g in enumerate(got):
        np.testing.assert_allclose(g, full[:, T0 + s], atol=TOL, rtol=0)
    assert int(cache["index"]) == T0 + steps


def test_kv_cache_right_padded_prompts(torch_models):
    """Right padding: rows continue at their own positions while sharing the write index."""
    m, d = torch_models["llama3_gqa"]
    model = load_model(d)
    rng = np.random.RandomState(3)
    prompt = rng.randint(0, V, (2, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)
    cache = model.init_cache(2, 8)
    pos = np.arange(6)[None].repeat(2, 0)
    _, cache = _decode(model, jnp.asarray(prompt), jnp.asarray(pos), cache, jnp.asarray(mask))
    nxt = rng.randint(0, V, (2, 1))
    logits, cache = _decode(model, jnp.asarray(nxt), jnp.asarray([[6], [4]]), cache, jnp.ones((2, 1), bool))
    for b, n in ((0, 6), (1, 4)):
        seq = np.concatenate([prompt[b, :n], nxt[b]])[None]
        np.testing.assert_allclose(np.asarray(logits)[b, 0], _torch_logits(m, seq)[0, -1], atol=TOL, rtol=0)


def test_sharded_load_matches(torch_models):
    """Parameters land sharded on an (fsdp, tensor) mesh; the forward is unchanged."""
    _, d = torch_models["llama3_gqa"]
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=auto, devices=jax.devices()[:8])
    rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
    sharded = load_model(d, mesh=mesh, rules=rules)
    plain = load_model(d)
    wq = sharded.blocks.attn.wq[...]  # stacked layers [L, D, H, F]: the layer axis stays whole
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (wq.shape[0], 16, 1, 8)
    wk = sharded.blocks.attn.wk[...]  # 2 kv heads over 4 tensor shards: stays whole on that axis
    assert wk.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    ids = jnp.asarray(_padded_batch()[0])
    pos = jnp.broadcast_to(jnp.arange(9), ids.shape)
    np.testing.assert_allclose(np.asarray(sharded(ids, pos)), np.asarray(plain(ids, pos)), atol=1e-5, rtol=0)


def test_load_hf_config_overrides(torch_models):
    """Keywords replace config.json's fields, also those config.json sets (norm_eps, rope_theta)."""
    import dataclasses

    _, d = torch_models["qwen2"]
    plain = load_model(d)
    cfg = plain.cfg
    model = load_model(d, norm_eps=1e-2, rope_theta=123.0, remat="full")
    cfg2 = model.cfg
    assert cfg2 == dataclasses.replace(cfg, norm_eps=1e-2, rope_theta=123.0, remat="full")
    assert (cfg.norm_eps, cfg.rope_theta) != (1e-2, 123.0)
    ids = jnp.asarray([[1, 5, 9, 2, 7, 3]])
    pos = jnp.arange(6)[None]
    assert not np.allclose(np.asarray(model(ids, pos)), np.asarray(plain(ids, pos)), atol=1e-4)
    with pytest.raises(TypeError, match="no_such_field"):
        load_model(d, no_such_field=1)


def test_clear_errors(torch_models, tmp_path):
    _, d = torch_models["qwen2"]
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        load_model(str(bad))
    # Missing tensor: drop one layer's weights from the file.
    st = stdir.SafetensorsDir(d)
    tensors = {n: np.asarray(st.get(n)) for n in st.where if "layers.1.mlp.up_proj" not in n}
    (bad / "config.json").write_text(json.dumps(cfg))
    stdir.write_safetensors(str(bad / "model.safetensors"), tensors)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight"):
        load_model(str(bad))
    # Shape mismatch: config says a wider MLP than the tensors hold.
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    stdir.write_safetensors(str(bad / "model.safetensors"), {n: np.asarray(st.get(n)) for n in st.where})
    with pytest.raises(
        ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight'"
    ):
        load_model(str(bad))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_sharded_safetensors_directory(torch_models, tmp_path):
    """A checkpoint split over several files with an index loads like the single file."""
    m, d = torch_models["gpt2"]
    m.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    sharded = load_model(str(tmp_path))
    single = load_model(d)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(single, nnx.Param), nnx.state(sharded, nnx.Param))
    os.remove(tmp_path / sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0])
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json: lists files that are missing"):
        load_model(str(tmp_path))
