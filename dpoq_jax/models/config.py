"""Model hyper-parameters (frozen dataclass) and their translation from / to a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

FAMILIES = ("gpt_neox", "llama", "qwen2", "gpt2")
# config.json model_type -> our family. Mistral is the Llama shape (sliding window unsupported, see below).
_MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
}
_ARCHITECTURES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder; `family` fixes the block shape and the HF tensor names.

    rotary_dim: leading dims of each head that get rotary embeddings (0 = learned positions, GPT-2).
    rope_scaling: sorted (key, value) pairs of the HF rope parameters besides rope_type/theta.
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

    @property
    def learned_positions(self) -> bool:
        return self.rotary_dim == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
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


def _rope(hf: dict[str, Any], default_theta: float, where: str) -> tuple[float, str, tuple, float]:
    """(theta, rope_type, scaling pairs, partial_rotary_factor) from old (rope_theta/rope_scaling) or
    transformers-5 (rope_parameters) keys."""
    params = dict(hf.get("rope_parameters") or {})
    old = hf.get("rope_scaling") or {}
    params = {**old, **params}
    theta = float(params.get("rope_theta", _get(hf, "rope_theta", "rotary_emb_base", default=default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    partial = float(
        params.pop("partial_rotary_factor", _get(hf, "partial_rotary_factor", "rotary_pct", default=1.0))
    )
    return theta, rope_type, _freeze_rope(params), partial


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (GPT-NeoX/Pythia, Llama/Mistral, Qwen2, GPT-2)."""
    model_type = hf.get("model_type")
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
        theta, rope_type, scaling, partial = _rope(hf, 10000.0, where)
        act = hf.get("hidden_act", "gelu" if family == "gpt_neox" else "silu")
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
            if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
                raise ValueError(f"{where}: sliding-window attention is not supported")
            kw.update(
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                gated_mlp=True,
                qkv_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
                out_bias=False if family == "qwen2" else bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
    if kw["activation"] not in ("gelu", "gelu_new", "silu"):
        raise ValueError(f"{where}: activation {kw['activation']!r} is not supported")
    return ModelConfig(**{"family": family, **kw, **common, **overrides})  # overrides win, not collide


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
            if cfg.family == "llama":
                out["attention_bias"] = cfg.qkv_bias
            else:
                out.update(use_sliding_window=False)
        out["rope_parameters"] = rope
        if cfg.rope_type != "default":
            out["rope_scaling"] = dict(rope)
    out.update(
        model_type=cfg.family, architectures=[_ARCHITECTURES[cfg.family]], torch_dtype="float32", **tokens
    )
    return out


def read_hf_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        try:
            hf = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            line = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ValueError(f"{path}: invalid JSON{line}: {getattr(e, 'msg', e)}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object (a Hugging Face config), got a {type(hf).__name__}")
    return hf
