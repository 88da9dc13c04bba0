"""Hugging Face directories in and out: config.json + *.safetensors (sharded index too) <-> Decoder
parameters (the files themselves: models/safetensors_dir.py), PEFT adapter folders, tokenizers.

Reading builds each parameter on its own (one host copy of one tensor at a time); with shardings every
device's shard is cut from that tensor by jax.make_array_from_callback, so no device ever holds a full
copy of a sharded parameter. Models are built by dpoq_jax.train.load.load_model, which calls read_params.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16", which safetensors' numpy reader asks for
import numpy as np
from flax import nnx

from dpoq_jax import paths
from dpoq_jax.models import lora as lora_lib
from dpoq_jax.models.decoder import Decoder
from dpoq_jax.models.model_config import ModelConfig, config_to_hf
from dpoq_jax.models.safetensors_dir import (
    MAX_SHARD_SIZE,
    SafetensorsDir,
    check_storable,
    parse_size,
    save_safetensors_dir,
    write_safetensors,
)

log = logging.getLogger(__name__)

Path = tuple[str | int, ...]
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "attention.bias",
    "attention.masked_bias",
    "attn.bias",
    "attn.masked_bias",
)


# ----------------------------------------------------------------------------------------------
# Name maps. Each family gives, per parameter path of our model, the HF tensor it comes from and a
# function HF array -> our layout; export goes the other way.

Spec = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _t(w: np.ndarray) -> np.ndarray:
    return w.T


def _heads_in(n: int, f: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear [n*f, D] -> [D, n, f]."""
    return lambda w: w.reshape(n, f, -1).transpose(2, 0, 1)


def _heads_out(n: int, f: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear [D, n*f] -> [n, f, D]."""
    return lambda w: w.reshape(-1, n, f).transpose(1, 2, 0)


def _import_map(cfg: ModelConfig) -> dict[Path, Spec]:
    H, K, F, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    ident = lambda w: w  # noqa: E731
    m: dict[Path, Spec] = {}
    if cfg.family in ("llama", "qwen2", "qwen3", "gemma2", "gemma3"):
        m[("embed",)] = ("model.embed_tokens.weight", ident)
        m[("final_norm", "scale")] = ("model.norm.weight", ident)
        if not cfg.tie_word_embeddings:
            m[("lm_head",)] = ("lm_head.weight", _t)
        for i in range(cfg.num_layers):
            p, b = f"model.layers.{i}.", ("blocks", i)
            m[b + ("ln1", "scale")] = (p + "input_layernorm.weight", ident)
            if cfg.gemma:  # norms before and after attention and MLP
                m[b + ("ln1_post", "scale")] = (p + "post_attention_layernorm.weight", ident)
                m[b + ("ln2", "scale")] = (p + "pre_feedforward_layernorm.weight", ident)
                m[b + ("ln2_post", "scale")] = (p + "post_feedforward_layernorm.weight", ident)
            else:
                m[b + ("ln2", "scale")] = (p + "post_attention_layernorm.weight", ident)
            if cfg.qk_norm:
                m[b + ("attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", ident)
                m[b + ("attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", ident)
            for ours, hf, n in (("q", "q_proj", H), ("k", "k_proj", K), ("v", "v_proj", K)):
                m[b + ("attn", "w" + ours)] = (p + f"self_attn.{hf}.weight", _heads_in(n, F))
                if cfg.qkv_bias:
                    m[b + ("attn", "b" + ours)] = (p + f"self_attn.{hf}.bias", lambda w, n=n: w.reshape(n, F))
            m[b + ("attn", "wo")] = (p + "self_attn.o_proj.weight", _heads_out(H, F))
            if cfg.out_bias:
                m[b + ("attn", "bo")] = (p + "self_attn.o_proj.bias", ident)
            for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                m[b + ("mlp", "w_" + ours)] = (p + f"mlp.{hf}.weight", _t)
                if cfg.mlp_bias:
                    m[b + ("mlp", "b_" + ours)] = (p + f"mlp.{hf}.bias", ident)
    elif cfg.family == "gpt_neox":
        m[("embed",)] = ("gpt_neox.embed_in.weight", ident)
        m[("final_norm", "scale")] = ("gpt_neox.final_layer_norm.weight", ident)
        m[("final_norm", "bias")] = ("gpt_neox.final_layer_norm.bias", ident)
        if not cfg.tie_word_embeddings:
            m[("lm_head",)] = ("embed_out.weight", _t)
        for i in range(cfg.num_layers):
            p, b = f"gpt_neox.layers.{i}.", ("blocks", i)
            for ours, hf in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                m[b + (ours, "scale")] = (p + hf + ".weight", ident)
                m[b + (ours, "bias")] = (p + hf + ".bias", ident)
            # Fused QKV rows are ordered [head, (q, k, v), head_dim].
            for j, ours in enumerate("qkv"):
                m[b + ("attn", "w" + ours)] = (
                    p + "attention.query_key_value.weight",
                    lambda w, j=j: w.reshape(H, 3, F, D)[:, j].transpose(2, 0, 1),
                )
                if cfg.qkv_bias:
                    m[b + ("attn", "b" + ours)] = (
                        p + "attention.query_key_value.bias",
                        lambda w, j=j: w.reshape(H, 3, F)[:, j],
                    )
            m[b + ("attn", "wo")] = (p + "attention.dense.weight", _heads_out(H, F))
            if cfg.out_bias:
                m[b + ("attn", "bo")] = (p + "attention.dense.bias", ident)
            m[b + ("mlp", "w_up")] = (p + "mlp.dense_h_to_4h.weight", _t)
            m[b + ("mlp", "b_up")] = (p + "mlp.dense_h_to_4h.bias", ident)
            m[b + ("mlp", "w_down")] = (p + "mlp.dense_4h_to_h.weight", _t)
            m[b + ("mlp", "b_down")] = (p + "mlp.dense_4h_to_h.bias", ident)
    elif cfg.family == "gpt2":
        # transformers' GPT-2 uses Conv1D: weights stored [in, out], i.e. already x @ W.
        m[("embed",)] = ("transformer.wte.weight", ident)
        m[("pos_embed",)] = ("transformer.wpe.weight", ident)
        m[("final_norm", "scale")] = ("transformer.ln_f.weight", ident)
        m[("final_norm", "bias")] = ("transformer.ln_f.bias", ident)
        for i in range(cfg.num_layers):
            p, b = f"transformer.h.{i}.", ("blocks", i)
            for ours, hf in (("ln1", "ln_1"), ("ln2", "ln_2")):
                m[b + (ours, "scale")] = (p + hf + ".weight", ident)
                m[b + (ours, "bias")] = (p + hf + ".bias", ident)
            for j, ours in enumerate("qkv"):
                m[b + ("attn", "w" + ours)] = (
                    p + "attn.c_attn.weight",
                    lambda w, j=j: w[:, j * D : (j + 1) * D].reshape(D, H, F),
                )
                m[b + ("attn", "b" + ours)] = (
                    p + "attn.c_attn.bias",
                    lambda w, j=j: w[j * D : (j + 1) * D].reshape(H, F),
                )
            m[b + ("attn", "wo")] = (p + "attn.c_proj.weight", lambda w: w.reshape(H, F, D))
            m[b + ("attn", "bo")] = (p + "attn.c_proj.bias", ident)
            m[b + ("mlp", "w_up")] = (p + "mlp.c_fc.weight", ident)
            m[b + ("mlp", "b_up")] = (p + "mlp.c_fc.bias", ident)
            m[b + ("mlp", "w_down")] = (p + "mlp.c_proj.weight", ident)
            m[b + ("mlp", "b_down")] = (p + "mlp.c_proj.bias", ident)
    return m


def _export_tensors(cfg: ModelConfig, get: Callable[[Path], np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors from our parameters (get(path) -> numpy array in our layout)."""
    H, F, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for path, (name, _) in _import_map(cfg).items():
        x = get(path)
        leaf = path[-1]
        if cfg.family == "gpt_neox" and "query_key_value" in name:
            fused.setdefault(name, {})[leaf[1]] = x
            continue
        if cfg.family == "gpt2" and "c_attn" in name:
            fused.setdefault(name, {})[leaf[1]] = x
            continue
        if leaf in ("wq", "wk", "wv"):  # [D, n, f] -> [n*f, D]
            x = x.transpose(1, 2, 0).reshape(-1, D)
        elif leaf == "wo":
            x = x.reshape(H * F, D) if cfg.family == "gpt2" else x.transpose(2, 0, 1).reshape(D, H * F)
        elif leaf in ("bq", "bk", "bv"):
            x = x.reshape(-1)
        elif leaf in ("lm_head",) or (leaf.startswith("w_") and cfg.family != "gpt2"):
            x = x.T
        out[name] = x
    for name, parts in fused.items():
        if cfg.family == "gpt_neox":
            if name.endswith("weight"):  # [D, H, F] x3 -> [H, 3, F, D] -> [H*3*F, D]
                x = np.stack([parts[c].transpose(1, 2, 0) for c in "qkv"], axis=1).reshape(H * 3 * F, D)
            else:
                x = np.stack([parts[c] for c in "qkv"], axis=1).reshape(-1)
        else:
            if name.endswith("weight"):
                x = np.concatenate([parts[c].reshape(D, D) for c in "qkv"], axis=1)
            else:
                x = np.concatenate([parts[c].reshape(-1) for c in "qkv"])
        out[name] = x
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Public API


def _path_key(path) -> Path:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _resolve_name(st: SafetensorsDir, name: str) -> str:
    """Some GPT-2 checkpoints (the original OpenAI upload) lack the `transformer.` prefix."""
    if name not in st and name.startswith("transformer.") and name[len("transformer.") :] in st:
        return name[len("transformer.") :]
    return name


def read_params(path: str, cfg: ModelConfig, abs_params: nnx.State, shardings: Any = None) -> nnx.State:
    """The parameters of a local Hugging Face directory in the layout (and dtypes) of `abs_params`, the
    abstract parameters of Decoder(cfg). With `shardings` (in the tree of `abs_params`) each one lands
    directly in its sharding, cut on the host tensor by tensor. A gs:// directory is copied to local
    disk first. Build models with `dpoq_jax.train.load.load_model`, which calls this."""
    path = paths.local_dir(path)
    st = SafetensorsDir(path)
    specs = _import_map(cfg)
    pure = nnx.to_pure_dict(abs_params)
    used: set[str] = set()
    missing = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    shard_leaves = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    values = []

    def tensor(key: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        """Our parameter `key` (one layer's for ("blocks", i, ...)) from its HF tensor, or None if missing."""
        if key not in specs:
            raise RuntimeError(f"internal: no HF name for parameter {key} of family {cfg.family}")
        name, fn = specs[key]
        name = _resolve_name(st, name)
        if name not in st:
            missing.append(name)
            return None
        used.add(name)
        raw = st.get(name)
        try:
            arr = fn(raw)
        except ValueError:  # a reshape that cannot fit: same report as a wrong final shape
            arr = None
        if arr is None or arr.shape != shape:
            raise ValueError(
                f"{st.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, which does not fit "
                f"parameter {'/'.join(map(str, key))} of shape {shape} for this config.json"
            )
        return arr

    for (kpath, abstract), sharding in zip(leaves, shard_leaves, strict=True):
        key = _path_key(kpath)
        if key[0] != "blocks":
            arr = tensor(key, abstract.shape)
            values.append(None if arr is None else _place(arr, abstract.dtype, sharding))
            continue
        # stacked layers [L, ...]: HF stores one tensor per layer ("blocks", i, ...) in the name map
        layers = [tensor(("blocks", i, *key[1:]), abstract.shape[1:]) for i in range(cfg.num_layers)]
        if any(a is None for a in layers):
            values.append(None)
            continue
        values.append(_place(np.stack(layers), abstract.dtype, sharding))
    if missing:
        raise KeyError(
            f"{path}: safetensors files lack tensors {sorted(set(missing))[:8]} "
            f"({len(set(missing))} missing) needed by model_type {cfg.family}"
        )
    unused = [n for n in st.where if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if unused and not (cfg.tie_word_embeddings and unused in (["lm_head.weight"], ["embed_out.weight"])):
        log.warning("%s: %d tensors not used by the model, e.g. %s", path, len(unused), unused[:5])
    params = jax.tree.map(lambda x: x, abs_params)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, values))
    return params


def _place(arr: np.ndarray, dtype: Any, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(arr).astype(dtype))
    # Each device gets only its slice, cast on the host.
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: np.asarray(arr[idx]).astype(dtype))


def save_hf(
    model: Decoder | nnx.State,
    cfg: ModelConfig,
    path: str,
    *,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Write config.json + model.safetensors, or shards of at most max_shard_size bytes (int or "5GB")
    with model.safetensors.index.json, as transformers' save_pretrained (its AutoModelForCausalLM loads
    them); see save_safetensors_dir for how an earlier export in `path` is replaced. dtype: storage
    dtype of the tensors (default: the parameters' own). Parameters must be addressable from this
    process (single host). A gs:// `path` is written locally, then uploaded."""
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    pure = nnx.to_pure_dict(state)

    def get(p: Path) -> np.ndarray:
        layer = None
        if p[0] == "blocks":  # ("blocks", i, ...) is layer i of the stacked parameter ("blocks", ...)
            layer, p = p[1], (p[0], *p[2:])
        x = pure
        for k in p:
            x = x[k]
        x = np.asarray(jax.device_get(x if layer is None else x[layer]))
        return x.astype(dtype) if dtype is not None else x

    tensors = _export_tensors(cfg, get)
    parse_size(max_shard_size)  # a bad size or dtype fails before anything is written
    check_storable(path, tensors)
    hf_cfg = config_to_hf(cfg)
    some = next(iter(tensors.values()))
    hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(some.dtype), "float32"
    )
    paths.makedirs(path)
    paths.write_text(paths.join(path, "config.json"), json.dumps(hf_cfg, indent=2))
    if tokenizer is not None:
        if paths.is_gcs(path):
            staging = paths.staging_dir()
            tokenizer.save_pretrained(staging)
            paths.upload_dir(staging, path)
        else:
            tokenizer.save_pretrained(path)
    save_safetensors_dir(path, tensors, max_shard_size=max_shard_size)  # its index last of all


def save_peft(
    adapters: nnx.State,
    model_cfg: ModelConfig,
    cfg: lora_lib.LoraConfig,
    path: str,
    base_model: str | None = None,
) -> None:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, path)` loads onto the HF export of the base model."""
    if model_cfg.family not in lora_lib.PEFT_FAMILIES:
        raise ValueError(
            f"PEFT export: family {model_cfg.family!r} fuses its projections (supported: "
            f"{lora_lib.PEFT_FAMILIES}); use the merged export"
        )
    tensors = lora_lib.peft_tensors(adapters, cfg)
    targets = sorted({k.split(".")[-3] for k in tensors})
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# Files a Hugging Face tokenizer can be built from (tokenizer_config.json alone names a class, no
# vocabulary), then the files that go with them; a tokenizer folder is copied as all of these.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "merges.txt")
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def _tokenizer_problem(path: str) -> str | None:
    """Why directory `path` (local or gs://) holds no Hugging Face tokenizer; None when it holds one."""
    if not paths.isdir(path):
        return "tokenizer directory does not exist"
    if not any(paths.isfile(paths.join(path, f)) for f in VOCAB_FILES):
        return f"no tokenizer files in this directory (none of {', '.join(VOCAB_FILES)})"
    return None


def has_tokenizer(path: str) -> bool:
    """Does directory `path` hold Hugging Face tokenizer files (one a tokenizer can be built from)?"""
    return _tokenizer_problem(path) is None


def check_tokenizer(path: str, flag: str | None = None) -> None:
    """FileNotFoundError naming `path` (and the command-line `flag` that gave it, whose values may also be
    'synthetic') unless it is a Hugging Face tokenizer directory."""
    problem = _tokenizer_problem(str(path))
    if problem is not None:
        hint = "give a Hugging Face tokenizer directory" + (" or 'synthetic'" if flag else "")
        raise FileNotFoundError(f"{_named(path, flag)}: {problem}; {hint}")


def _named(path: str | os.PathLike, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def run_root(path: str) -> str | None:
    """The `dpoq train` workdir that `path` is, or is the checkpoints directory or a step of; else None."""
    here = paths.absolute(path)
    for cand in (here, paths.dirname(here), paths.dirname(paths.dirname(here))):
        if paths.isdir(paths.join(cand, "checkpoints")) and paths.isfile(paths.join(cand, "config.json")):
            return cand
    return None


def find_tokenizer(path: str) -> str | None:
    """The tokenizer that goes with a model directory: `path` itself or its hf/ when they hold
    tokenizer files; for a `dpoq train` run, what it trained with (as train.inputs.load_dataset
    chooses: data.tokenizer_path, else "synthetic" for synthetic data, else model.path). None: none."""
    for cand in (path, paths.join(path, "hf")):
        if has_tokenizer(cand):
            return cand
    root = run_root(path)
    if root is None:
        return None
    if has_tokenizer(paths.join(root, "hf")):
        return paths.join(root, "hf")
    cfg_file = paths.join(root, "config.json")
    try:
        with paths.open(cfg_file, "rb") as f:
            cfg = json.loads(f.read())
        data, model = cfg.get("data", {}), cfg.get("model", {})
        source, tok_path, model_path = data.get("source"), data.get("tokenizer_path"), model.get("path")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_file}: not a run config ({type(e).__name__}: {e})") from None
    if not tok_path and source == "synthetic":
        return "synthetic"
    named = tok_path or model_path
    if not named:
        return None
    for cand in (named, paths.join(named, "hf")):  # model.path may be another run's workdir
        if has_tokenizer(cand):
            return cand
    raise FileNotFoundError(
        f"{cfg_file}: the run's tokenizer {named} (data.tokenizer_path or model.path) has no tokenizer "
        "files any more; pass --tokenizer DIR"
    )


def load_tokenizer(path: str | os.PathLike, flag: str | None = None) -> Any:
    """The Hugging Face tokenizer stored in a directory, local or gs:// (copied to local disk first:
    transformers reads local files only); never downloads from the Hub. Errors name `path` (and `flag`,
    the command-line option that gave it, as `check_tokenizer` does)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (heavy import, only when needed)

    check_tokenizer(str(path), flag)
    try:
        return AutoTokenizer.from_pretrained(paths.local_dir(str(path)), local_files_only=True)
    except (OSError, ValueError) as e:  # unreadable tokenizer files: name the directory
        raise ValueError(f"{_named(path, flag)}: no usable tokenizer ({type(e).__name__}: {e})") from e
