"""Decoder properties without torch: layouts (padding, packing, prefix sharing) give the same per-token
log-probs as each sequence alone; remat policies; dtype policy; config round trips; sharding rules;
params checkpoints and `dpoq convert` both ways (tokenizer included)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpoq_jax.commands.convert import convert_main
from dpoq_jax.models import Decoder, ModelConfig, attention_mask, config_from_hf, config_to_hf, hf
from dpoq_jax.models.sharding import spec_for
from dpoq_jax.train.load import load_model

V, S = 64, 16
LLAMA = ModelConfig(
    family="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=48, max_position_embeddings=64, norm="rmsnorm", norm_eps=1e-6, activation="silu",
    gated_mlp=True, rotary_dim=8, rope_type="llama3", rope_theta=500.0,
    rope_scaling=(("factor", 4.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 16)),
)  # fmt: skip
GPT2 = ModelConfig(
    family="gpt2", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
    intermediate_size=64, max_position_embeddings=32, activation="gelu_new", qkv_bias=True, out_bias=True,
    mlp_bias=True, tie_word_embeddings=True,
)  # fmt: skip
NEOX = ModelConfig(
    family="gpt_neox", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
    intermediate_size=64, max_position_embeddings=64, parallel_residual=True, rotary_dim=4, qkv_bias=True,
    out_bias=True, mlp_bias=True,
)  # fmt: skip
QWEN = LLAMA.replace(
    family="qwen2", rope_type="default", rope_scaling=(), qkv_bias=True, tie_word_embeddings=True
)
GEMMA3 = LLAMA.replace(
    family="gemma3", activation="gelu_new", rope_type="linear", rope_scaling=(("factor", 8.0),),
    tie_word_embeddings=True, sliding_window=4, layer_types=("sliding_attention", "full_attention"),
    local_rope_theta=10.0, query_pre_attn_scalar=16.0, attn_softcap=3.0, final_softcap=20.0,
)  # fmt: skip
QWEN3_YARN = LLAMA.replace(
    family="qwen3", rope_type="yarn", sliding_window=3, layer_types=("full_attention", "sliding_attention"),
    rope_scaling=(("beta_fast", 16.0), ("factor", 4.0), ("original_max_position_embeddings", 16)),
)  # fmt: skip
MISTRAL = LLAMA.replace(
    rope_type="default", rope_scaling=(), sliding_window=5, layer_types=("sliding_attention",) * 2
)


def _model(cfg: ModelConfig, seed: int = 0, **kw) -> Decoder:
    model = Decoder(cfg, rngs=nnx.Rngs(seed), **kw)
    # Random norms/biases too (init leaves them at 1/0), so every parameter matters.
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.RandomState(seed + 1)  # numpy noise: no per-shape compilation
    leaves = [x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


@nnx.jit
def _logps(model, tokens, positions, segment_ids, branch_ids):
    return jax.nn.log_softmax(model(tokens, positions, segment_ids, branch_ids), axis=-1)


def _rows(pieces_per_row):
    """Rows built from (tokens, positions, segment, branch) pieces, padded to S with segment 0."""
    out = {k: np.zeros((len(pieces_per_row), S), np.int32) for k in ("tok", "pos", "seg", "br")}
    where = []
    for n, pieces in enumerate(pieces_per_row):
        s = 0
        for toks, pos, seg, br in pieces:
            k = len(toks)
            out["tok"][n, s : s + k], out["pos"][n, s : s + k] = toks, pos
            out["seg"][n, s : s + k], out["br"][n, s : s + k] = seg, br
            where.append((n, s, k))
            s += k
    return out, where


@pytest.mark.parametrize(
    "cfg,attention",
    [(LLAMA, "xla"), (GPT2, "xla"), (GEMMA3, "xla"), (GEMMA3, "splash_interpret")],
    ids=["llama", "gpt2", "gemma3_window_softcap", "gemma3_window_softcap_splash"],
)
def test_packed_and_prefix_shared_equal_separate_rows(cfg, attention):
    """A sliding window (GEMMA3: 4 positions) counts positions: rejected tokens see the prompt's end
    although the chosen tokens lie between them in the row."""
    model = _model(cfg, attention=attention)
    rng = np.random.RandomState(0)
    p, c, r = rng.randint(1, V, 4), rng.randint(1, V, 3), rng.randint(1, V, 2)
    q, d = rng.randint(1, V, 3), rng.randint(1, V, 4)  # a second plain sequence
    # Separate: one sequence per row (right padded).
    sep, sep_at = _rows([
        [(np.r_[p, c], np.arange(7), 1, 0)],
        [(np.r_[p, r], np.arange(6), 1, 0)],
        [(np.r_[q, d], np.arange(7), 1, 0)],
        [],
    ])  # fmt: skip
    # Prefix shared: prompt (branch 0), chosen (1), rejected (2) in one row, rejected positions continue
    # from the prompt; packed: that row plus another sequence as segment 2; a left-padded row.
    shared, sh_at = _rows([
        [(p, np.arange(4), 1, 0), (c, 4 + np.arange(3), 1, 1), (r, 4 + np.arange(2), 1, 2)],
        [(p, np.arange(4), 1, 0), (c, 4 + np.arange(3), 1, 1), (r, 4 + np.arange(2), 1, 2),
         (np.r_[q, d], np.arange(7), 2, 0)],
        [(np.zeros(9, np.int32), np.zeros(9), 0, 0), (np.r_[q, d], np.arange(7), 3, 0)],
        [],
    ])  # fmt: skip
    a = np.asarray(_logps(model, *(jnp.asarray(sep[k]) for k in ("tok", "pos", "seg", "br"))))
    b = np.asarray(_logps(model, *(jnp.asarray(shared[k]) for k in ("tok", "pos", "seg", "br"))))
    (n_pc, s_pc, _), (n_pr, s_pr, _), (n_qd, s_qd, _) = sep_at
    chex_close = lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)  # noqa: E731
    for row in (0, 1):
        chex_close(b[row, 0:4], a[n_pc, s_pc : s_pc + 4])  # prompt
        chex_close(b[row, 4:7], a[n_pc, s_pc + 4 : s_pc + 7])  # chosen sees prompt + chosen
        chex_close(b[row, 7:9], a[n_pr, s_pr + 4 : s_pr + 6])  # rejected sees prompt + rejected only
    chex_close(b[1, 9:16], a[n_qd, s_qd : s_qd + 7])  # packed second segment
    chex_close(b[2, 9:16], a[n_qd, s_qd : s_qd + 7])  # left padded


def test_final_softcap_reaches_the_train_steps_logps():
    """The train step's chunked log-probs (hidden @ unembedding) apply Gemma's final soft-cap as the
    model's logits do."""
    from dpoq_jax import tokenq

    cfg = GEMMA3.replace(final_softcap=0.5)  # small: the cap changes every log-prob
    model = _model(cfg)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 6)))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    want = tokenq.token_logps(model(tokens, pos)[:, :-1], tokens[:, 1:])
    hidden, w = model(tokens, pos, return_hidden=True), model.unembedding()
    got = tokenq.lean_token_logps(hidden[:, :-1], w, tokens[:, 1:], chunk_size=4, softcap=cfg.final_softcap)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    uncapped = tokenq.lean_token_logps(hidden[:, :-1], w, tokens[:, 1:], chunk_size=4)
    assert float(jnp.abs(uncapped - want).max()) > 0.1


def test_attention_mask_layout():
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 0]])
    br = jnp.array([[0, 0, 1, 2, 2, 0, 0, 0]])
    m = np.asarray(attention_mask(seg, br))[0, 0].astype(int)
    expected = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 0],  # branch 2 does not see branch 1
        [1, 1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],  # new segment
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees itself only (no empty softmax row)
    ])  # fmt: skip
    np.testing.assert_array_equal(m, expected)


def test_remat_policies_same_gradients():
    model = _model(NEOX)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 8)))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    grads = {}
    for policy in ("none", "full", "dots"):
        m = Decoder(NEOX.replace(remat=policy), rngs=nnx.Rngs(0))
        nnx.update(m, nnx.state(model, nnx.Param))
        graphdef, params = nnx.split(m, nnx.Param)

        def loss(p, graphdef=graphdef):
            out = nnx.merge(graphdef, p)(tokens, pos, return_hidden=True)
            return jnp.sum(jnp.sin(out))

        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in ("full", "dots"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), grads["none"],
                     grads[policy])  # fmt: skip


@nnx.jit
def _logits_hidden(model, tokens, positions):
    return model(tokens, positions), model(tokens, positions, return_hidden=True), model.unembedding()


def test_dtype_policy_and_unembedding():
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, 8)))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    model = _model(LLAMA, dtype=jnp.bfloat16)
    logits, hidden, w16 = _logits_hidden(model, tokens, pos)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16 and w16.dtype == jnp.bfloat16
    assert model.embed[...].dtype == jnp.float32  # parameters stay float32
    f32 = _model(LLAMA)
    logits32, hidden32, w = _logits_hidden(f32, tokens, pos)
    # Measured: max |bf16 − f32| logit error 0.015 on these tokens (0.014–0.023 over token seeds 1–5,
    # logits of magnitude ~1.7); 0.05 is ~3x that. Above 1e-3: the bf16 path really computes in bf16.
    err = float(np.abs(np.asarray(logits) - np.asarray(logits32)).max())
    assert 1e-3 < err < 0.05, err
    assert w.shape == (32, V)
    np.testing.assert_allclose(hidden32 @ w, logits32, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [LLAMA, GPT2, NEOX, QWEN, GEMMA3, QWEN3_YARN, MISTRAL],
    ids=["llama", "gpt2", "neox", "qwen2", "gemma3", "qwen3_yarn", "mistral"],
)
def test_config_round_trip(cfg):
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_from_old_style_hf_configs():
    """config.json files written before transformers 5 (Pythia, Llama 3.2, Qwen2.5 on the Hub)."""
    pythia = {"model_type": "gpt_neox", "hidden_size": 2560, "num_attention_heads": 32,
              "num_hidden_layers": 32, "intermediate_size": 10240, "vocab_size": 50304, "rotary_pct": 0.25,
              "rotary_emb_base": 10000,
              "use_parallel_residual": True, "tie_word_embeddings": False, "layer_norm_eps": 1e-5,
              "hidden_act": "gelu", "max_position_embeddings": 2048, "eos_token_id": 0}  # fmt: skip
    c = config_from_hf(pythia)
    assert (c.family, c.head_dim, c.rotary_dim, c.parallel_residual, c.qkv_bias) == (
        "gpt_neox",
        80,
        20,
        True,
        True,
    )
    llama32 = {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
               "num_key_value_heads": 8, "num_hidden_layers": 16, "intermediate_size": 8192,
               "vocab_size": 128256, "head_dim": 64,
               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "eos_token_id": [128001, 128008, 128009]}  # fmt: skip
    c = config_from_hf(llama32)
    assert (c.rope_type, c.rope_theta, c.num_kv_heads, c.rotary_dim, c.eos_token_id) == (
        "llama3",
        500000.0,
        8,
        64,
        (128001, 128008, 128009),
    )
    assert dict(c.rope_scaling)["factor"] == 32.0 and c.tie_word_embeddings
    qwen = {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
            "num_hidden_layers": 24, "intermediate_size": 4864, "vocab_size": 151936, "rope_theta": 1000000.0,
            "use_sliding_window": False, "sliding_window": 32768, "tie_word_embeddings": True}  # fmt: skip
    c = config_from_hf(qwen)
    assert (c.qkv_bias, c.out_bias, c.head_dim, c.rope_theta) == (True, False, 64, 1000000.0)
    assert (c.sliding_window, c.layer_types) == (None, ())
    # the window slides from layer max_window_layers on (transformers' Qwen2Config)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    c = config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 20, "rope_scaling": yarn})
    assert (
        c.sliding_window == 32768 and c.layer_types == ("full_attention",) * 20 + ("sliding_attention",) * 4
    )
    assert (c.rope_type, dict(c.rope_scaling)) == (
        "yarn",
        {"factor": 4.0, "original_max_position_embeddings": 32768},
    )
    gemma3 = {"model_type": "gemma3_text", "hidden_size": 1152, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 26, "intermediate_size": 6912,
              "vocab_size": 262144,
              "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
              "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
              "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
              "attn_logit_softcapping": None}  # fmt: skip
    c = config_from_hf(gemma3)
    assert (c.family, c.activation, c.rope_theta, c.local_rope_theta, c.tie_word_embeddings) == (
        "gemma3", "gelu_new", 1e6, 1e4, True,
    )  # fmt: skip
    assert c.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and c.final_softcap is None
    gemma2 = {"model_type": "gemma2", "hidden_size": 2304, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "num_hidden_layers": 26, "intermediate_size": 9216,
              "vocab_size": 256000}  # fmt: skip
    c = config_from_hf(gemma2)  # Gemma2Config's defaults: caps 50 / 30, every other layer local
    assert (c.attn_softcap, c.final_softcap, c.sliding_window, c.query_pre_attn_scalar) == (
        50.0,
        30.0,
        4096,
        256.0,
    )
    assert c.layer_types[:2] == ("sliding_attention", "full_attention")


def test_config_errors():
    """What is still refused says so in one line."""
    for rope in ("dynamic", "longrope"):
        with pytest.raises(ValueError, match=f"rope type '{rope}' is not supported"):
            config_from_hf({**config_to_hf(LLAMA), "rope_parameters": {"rope_type": rope, "factor": 2.0}})
    with pytest.raises(ValueError, match="unsupported model_type 'gemma3': the multimodal Gemma 3"):
        config_from_hf({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ValueError, match="bidirectional attention is not supported"):
        config_from_hf({**config_to_hf(GEMMA3), "use_bidirectional_attention": True})
    local_yarn = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope scaling on the sliding .local. layers is not supported"):
        config_from_hf({**config_to_hf(GEMMA3), "rope_parameters": {"sliding_attention": local_yarn}})
    with pytest.raises(ValueError, match="sliding layers need sliding_window > 0"):
        MISTRAL.replace(sliding_window=None)
    with pytest.raises(KeyError, match="x.json: missing key 'hidden_size'"):
        config_from_hf({"model_type": "llama"}, where="x.json")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**LLAMA.to_dict(), "bogus": 1})


def test_spec_for_rules():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "vocab": ("fsdp", "tensor")}
    assert spec_for(("embed", "heads", "head_dim"), (32, 4, 8), mesh, rules) == P("fsdp", "tensor", None)
    assert spec_for(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh, rules) == P("fsdp", None, None)
    assert spec_for(("vocab", "embed"), (64, 32), mesh, rules) == P(("fsdp", "tensor"), None)


def _tiny_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(V - 3)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def test_checkpoint_and_convert_round_trip(tmp_path):
    model = _model(NEOX)
    src, ck, back = str(tmp_path / "hf"), str(tmp_path / "ck"), str(tmp_path / "back")
    hf.save_hf(model, NEOX, src)
    _tiny_tokenizer(src)
    assert convert_main(["--from", src, "--to", ck]) == 0
    assert os.path.isfile(os.path.join(ck, "model_config.json")) and os.path.isdir(os.path.join(ck, "params"))
    restored = load_model(ck)
    cfg = restored.cfg
    assert cfg == NEOX
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), nnx.state(restored, nnx.Param))
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = load_model(ck, mesh=mesh, rules={"embed": "fsdp", "mlp": "tensor"})
    # stacked layers [L, D, M]: the layer axis stays whole
    assert sharded.blocks.mlp.w_up[...].sharding.spec == P(None, "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), nnx.state(sharded, nnx.Param))
    assert convert_main(["--from", ck, "--to", back]) == 0
    again = load_model(back)
    cfg2 = again.cfg
    assert cfg2 == NEOX
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), nnx.state(again, nnx.Param))
    before_self_convert = sorted(os.listdir(back))
    tok = hf.load_tokenizer(back)
    assert tok.encode("w1 w2 w3") == hf.load_tokenizer(src).encode("w1 w2 w3") == [4, 5, 6]
    with pytest.raises(SystemExit, match=r"^dpoq convert: error: --from .*nothing: not a directory$"):
        convert_main(["--from", str(tmp_path / "nothing"), "--to", back])
    with pytest.raises(SystemExit, match="same directory"):  # would write into its own source
        convert_main(["--from", back, "--to", back + "/"])
    assert sorted(os.listdir(back)) == before_self_convert


def test_train_checkpoint_layout_and_bf16_export(tmp_path):
    """A training workdir (checkpoints/<step>/params + model_config items) exports the latest step."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    mgr = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), options=options)
    models = {}
    for step in (3, 7):
        models[step] = _model(GPT2, seed=step)
        params = nnx.to_pure_dict(nnx.state(models[step], nnx.Param))
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               model_config=ocp.args.JsonSave(GPT2.to_dict())))  # fmt: skip
    mgr.wait_until_finished()
    mgr.close()
    out = str(tmp_path / "hf")
    assert convert_main(["--from", str(tmp_path / "run"), "--to", out, "--dtype", "bfloat16"]) == 0
    loaded = load_model(out)
    want = nnx.state(models[7], nnx.Param)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=2e-2, rtol=1e-2),
        want,
        nnx.state(loaded, nnx.Param),
    )
    m3 = load_model(str(tmp_path / "run"), step=3)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(models[3], nnx.Param), nnx.state(m3, nnx.Param))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_eager_init_equals_direct_draw():
    """Eager construction draws small parameters through shared power-of-two buckets (fast on CPU);
    the values must be bitwise those of the direct draw that jit / eval_shape construction makes."""
    from dpoq_jax.models.layers import _INIT_STD, _normal

    key = jax.random.key(3)
    for shape, dtype in (((V, 32), jnp.float32), ((32, 4, 8), jnp.bfloat16), ((5,), jnp.float32)):
        eager = _normal(key, shape, dtype)
        direct = jax.jit(lambda k, s=shape, d=dtype: _INIT_STD * jax.random.normal(k, s, d))(key)
        traced = jax.jit(lambda k, s=shape, d=dtype: _normal(k, s, d))(key)  # the tracer path
        assert eager.shape == shape and eager.dtype == dtype
        np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(direct, np.float32))
        np.testing.assert_array_equal(np.asarray(traced, np.float32), np.asarray(direct, np.float32))
    model = Decoder(LLAMA, rngs=nnx.Rngs(3))
    assert float(jnp.std(model.embed[...])) == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(model.final_norm.scale[...], np.ones(32, np.float32))
