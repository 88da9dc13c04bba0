"""Model hyper-parameters (frozen dataclass) and their translation from / to a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from dpoq_jax import paths

FAMILIES = ("gpt_neox", "llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
# config.json model_type -> our family. Mistral is the Llama shape (+ a sliding window); gemma3_text is
# Gemma 3's text decoder (Gemma3ForCausalLM).
_MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
}
_ARCHITECTURES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# Why some near relatives are refused (config.json model_type -> reason).
_REFUSED = {
    "gemma3": "the multimodal Gemma 3 checkpoint; only the text decoder (model_type gemma3_text, "
    "Gemma3ForCausalLM) is supported",
    "gemma": "Gemma 1 is not supported (Gemma 2 and Gemma 3 text are)",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder; `family` fixes the block shape and the HF tensor names.

    rotary_dim: leading dims of each head that get rotary embeddings (0 = learned positions, GPT-2).
    rope_scaling: sorted (key, value) pairs of the HF rope parameters besides rope_type/theta.
    sliding_window / layer_types: layers typed "sliding_attention" see only keys whose position is
    within sliding_window - 1 of the query's (transformers' window); () = every layer full attention.
    local_rope_theta: rope base of the sliding layers when it differs (Gemma 3; default rope there).
    query_pre_attn_scalar: attention scale is its -1/2 power (Gemma), else head_dim ** -0.5.
    attn_softcap / final_softcap: c * tanh(x / c) on attention scores / final logits (Gemma 2).
    remat: "none" | "full" (recompute each block in the backward pass) | "dots" (keep matmul outputs).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu" (erf) | "gelu_new" (tanh) | "silu"
    gated_mlp: bool = False
    parallel_residual: bool = False
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    remat: str = "none"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim={self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.layer_types and (
            len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES)
        ):
            raise ValueError(
                f"layer_types must be {self.num_layers} entries of {LAYER_TYPES}, got {self.layer_types}"
            )
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise ValueError(f"sliding layers need sliding_window > 0, got {self.sliding_window}")
        if self.learned_positions and (self.sliding_window or self.local_rope_theta):
            raise ValueError("sliding windows and local rope bases need rotary (not learned) positions")

    @property
    def gemma(self) -> bool:
        """Gemma blocks: sqrt(D)-scaled embeddings, (1 + w) RMS norms, norms before and after attention
        and MLP."""
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        """RMS norms over each query and key head before rope (Qwen3, Gemma 3)."""
        return self.family in ("qwen3", "gemma3")

    def local_layers(self) -> np.ndarray:
        """bool [L]: which layers use the sliding window (and the local rope base)."""
        return np.array([t == "sliding_attention" for t in self.layer_types] or [False] * self.num_layers)

    @property
    def learned_positions(self) -> bool:
        return self.rotary_dim == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["layer_types"] = list(self.layer_types)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        d = dict(d)
        d["rope_scaling"] = _freeze_rope(d.get("rope_scaling") or {})
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _freeze_rope(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")))


def _get(hf: dict[str, Any], *keys: str, default: Any = KeyError, where: str = "config.json") -> Any:
    for k in keys:
        if k in hf and hf[k] is not None:
            return hf[k]
    if default is KeyError:
        raise KeyError(f"{where}: missing key {' / '.join(repr(k) for k in keys)}")
    return default


def _rope(
    hf: dict[str, Any], default_theta: float, where: str, params: dict[str, Any] | None = None
) -> tuple[float, str, tuple, float]:
    """(theta, rope_type, scaling pairs, partial_rotary_factor) from old (rope_theta/rope_scaling) or
    transformers-5 (rope_parameters) keys; `params`: one layer type's entry of a nested rope_parameters."""
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params = dict(params)
    theta = float(params.get("rope_theta", _get(hf, "rope_theta", "rotary_emb_base", default=default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if rope_type in ("llama3", "yarn"):  # transformers fills it in the same way (standardize_rope_params)
        params.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048),
        )
    partial = float(
        params.pop("partial_rotary_factor", _get(hf, "partial_rotary_factor", "rotary_pct", default=1.0))
    )
    return theta, rope_type, _freeze_rope(params), partial


def _gemma3_rope(hf: dict[str, Any], where: str) -> tuple[tuple[float, str, tuple, float], float]:
    """(global rope as _rope gives it, local rope base) of a Gemma 3 config: nested rope_parameters
    {"full_attention": ..., "sliding_attention": ...} or the older rope_theta / rope_local_base_freq /
    rope_scaling (the scaling applies to the global layers only)."""
    nested = hf.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        full = dict(nested.get("full_attention") or {})
        local = dict(nested.get("sliding_attention") or {})
    else:
        full = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {}), **nested}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    full.setdefault("rope_theta", 1_000_000.0)
    local.setdefault("rope_theta", 10_000.0)
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope scaling on the sliding (local) layers is not supported")
    return _rope(hf, 1_000_000.0, where, full), float(local["rope_theta"])


def _layer_types(hf: dict[str, Any], family: str, model_type: str, layers: int) -> tuple[int | None, tuple]:
    """(sliding_window, layer_types) as transformers' config classes derive them (see their __post_init__)."""
    window = hf.get("sliding_window", 4096)  # the config classes' default when the key is absent
    if family in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window") else None
        first = hf.get("max_window_layers", 28)
        default = ["sliding_attention" if window and i >= first else "full_attention" for i in range(layers)]
    elif family == "gemma2":
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif family == "gemma3":
        pattern = hf.get("sliding_window_pattern", 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif model_type == "mistral":  # every layer slides when the window is set
        return (int(window), ("sliding_attention",) * layers) if window else (None, ())
    else:
        return None, ()
    types = tuple(hf.get("layer_types") or default)
    if not window or "sliding_attention" not in types:
        return None, ()
    return int(window), types


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (GPT-NeoX/Pythia, Llama/Mistral, Qwen2/3, Gemma 2,
    Gemma 3 text, GPT-2)."""
    model_type = hf.get("model_type")
    if model_type in _REFUSED:
        raise ValueError(f"{where}: unsupported model_type {model_type!r}: {_REFUSED[model_type]}")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{where}: unsupported model_type {model_type!r} (architectures={hf.get('architectures')}); "
            f"supported: {sorted(_MODEL_TYPES)}"
        )
    family = _MODEL_TYPES[model_type]
    common = dict(
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"])
        if isinstance(hf.get("eos_token_id"), list)
        else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ValueError(f"{where}: GPT-2 attention scaling variants are not supported")
        d = int(_get(hf, "n_embd", "hidden_size", where=where))
        heads = int(_get(hf, "n_head", "num_attention_heads", where=where))
        act = hf.get("activation_function", "gelu_new")
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size", where=where)),
            hidden_size=d,
            num_layers=int(_get(hf, "n_layer", "num_hidden_layers", where=where)),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d // heads,
            intermediate_size=int(_get(hf, "n_inner", default=4 * d)),
            max_position_embeddings=int(_get(hf, "n_positions", "max_position_embeddings", where=where)),
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation={"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}.get(
                act, act
            ),
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        )
    else:
        d = int(_get(hf, "hidden_size", where=where))
        heads = int(_get(hf, "num_attention_heads", where=where))
        head_dim = int(hf.get("head_dim") or d // heads)
        if family == "gemma3":
            (theta, rope_type, scaling, partial), local_theta = _gemma3_rope(hf, where)
        else:
            theta, rope_type, scaling, partial = _rope(hf, 10000.0, where)
            local_theta = None
        default_act = {"gpt_neox": "gelu", "gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh"}
        act = hf.get("hidden_activation") or hf.get("hidden_act") or default_act.get(family, "silu")
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size", where=where)),
            hidden_size=d,
            num_layers=int(_get(hf, "num_hidden_layers", where=where)),
            num_heads=heads,
            head_dim=head_dim,
            intermediate_size=int(_get(hf, "intermediate_size", where=where)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=scaling,
            activation={"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}.get(act, act),
            rotary_dim=int(head_dim * partial) // 2 * 2,
        )
        if family == "gpt_neox":
            kw.update(
                num_kv_heads=heads,
                norm="layernorm",
                norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                qkv_bias=bool(hf.get("attention_bias", True)),
                out_bias=bool(hf.get("attention_bias", True)),
                mlp_bias=True,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        else:
            if hf.get("use_bidirectional_attention"):
                raise ValueError(f"{where}: bidirectional attention is not supported (a causal decoder only)")
            window, layer_types = _layer_types(hf, family, model_type, kw["num_layers"])
            gemma = family in ("gemma2", "gemma3")
            bias = bool(hf.get("attention_bias", False))
            kw.update(
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                gated_mlp=True,
                qkv_bias=True if family == "qwen2" else bias,
                out_bias=False if family == "qwen2" else bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
                sliding_window=window,
                layer_types=layer_types,
                local_rope_theta=local_theta,
            )
            if gemma:  # soft-capping defaults: Gemma2Config's (Gemma 3 has none)
                caps = (50.0, 30.0) if family == "gemma2" else (None, None)
                kw.update(
                    query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                    attn_softcap=_opt_float(hf.get("attn_logit_softcapping", caps[0])),
                    final_softcap=_opt_float(hf.get("final_logit_softcapping", caps[1])),
                )
    if kw["activation"] not in ("gelu", "gelu_new", "silu"):
        raise ValueError(f"{where}: activation {kw['activation']!r} is not supported")
    return ModelConfig(**{"family": family, **kw, **common, **overrides})  # overrides win, not collide


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _int_if_whole(x: float | None) -> float | int | None:
    """transformers' Gemma configs type query_pre_attn_scalar as int (strict dataclasses)."""
    return int(x) if x is not None and float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back to the same model."""
    act = {"gelu_new": "gelu_new", "gelu": "gelu", "silu": "silu"}[cfg.activation]
    tokens = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.to_dict()["eos_token_id"],
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family == "gpt2":
        out = dict(
            n_embd=cfg.hidden_size,
            n_head=cfg.num_heads,
            n_layer=cfg.num_layers,
            n_inner=cfg.intermediate_size,
            n_positions=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=act,
            tie_word_embeddings=True,
        )
    else:
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
        out = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_act=act,
            tie_word_embeddings=cfg.tie_word_embeddings,
            rope_theta=cfg.rope_theta,
        )
        if cfg.family == "gpt_neox":
            rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
            out.update(
                layer_norm_eps=cfg.norm_eps,
                use_parallel_residual=cfg.parallel_residual,
                attention_bias=cfg.qkv_bias,
                rotary_pct=cfg.rotary_dim / cfg.head_dim,
            )
        else:
            out.update(
                num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                rms_norm_eps=cfg.norm_eps,
                mlp_bias=cfg.mlp_bias,
            )
            if cfg.family in ("llama", "qwen3", "gemma2", "gemma3"):
                out["attention_bias"] = cfg.qkv_bias
            if cfg.family in ("qwen2", "qwen3"):
                out.update(use_sliding_window=cfg.sliding_window is not None)
            if cfg.sliding_window is not None:
                out.update(sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types))
            if cfg.gemma:
                del out["hidden_act"]
                out.update(
                    hidden_activation={"gelu_new": "gelu_pytorch_tanh"}.get(act, act),
                    query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
                    attn_logit_softcapping=cfg.attn_softcap,
                    final_logit_softcapping=cfg.final_softcap,
                    sliding_window=cfg.sliding_window,
                    layer_types=list(cfg.layer_types) or ["full_attention"] * cfg.num_layers,
                )
        if cfg.family == "gemma3":  # one rope per layer type; the local layers' is plain rope
            local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
            out.pop("rope_theta")
            out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        else:
            out["rope_parameters"] = rope
            if cfg.rope_type != "default":
                out["rope_scaling"] = dict(rope)
    model_type = {"gemma3": "gemma3_text"}.get(cfg.family, cfg.family)
    if cfg.family == "llama" and cfg.sliding_window is not None:
        if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias or len(set(cfg.layer_types)) > 1:
            raise ValueError("export: a windowed Llama is written as Mistral, which has no biases and "
                             "slides every layer")  # fmt: skip
        model_type = "mistral"
        for k in ("attention_bias", "mlp_bias", "layer_types"):
            out.pop(k, None)
    out.update(
        model_type=model_type, architectures=[_ARCHITECTURES[model_type]], torch_dtype="float32", **tokens
    )
    return out


def read_hf_config(path: str) -> dict[str, Any]:
    with paths.open(path, "rb") as f:
        try:
            hf = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            line = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ValueError(f"{path}: invalid JSON{line}: {getattr(e, 'msg', e)}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object (a Hugging Face config), got a {type(hf).__name__}")
    return hf
