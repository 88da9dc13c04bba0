"""Run configs: Python files with `get_config(arg=None)` returning a locked ml_collections ConfigDict.

`load_config("experiments/configs/x.py:arg", ["--config.optim.lr=1e-4"])` imports the file, calls
`get_config(arg)`, applies the overrides with type checking and validates the result. Errors name the
key (and the file) so that a typo never trains the wrong thing silently.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections as mc
from absl import flags as absl_flags
from ml_collections.config_flags import config_path, tuple_parser

from dpoq_jax import losses, paths
from dpoq_jax.data.layouts import LAYOUTS
from dpoq_jax.data.sources import SOURCES
from dpoq_jax.train.schema import RunConfig, from_dict

STAGES = ("sft", "dpo")

# What the entry points (train, setup, precompute, compile) take: a loaded ConfigDict, a run's config.json
# (a dict) or a RunConfig; `typed` turns each into a RunConfig.
ConfigLike = mc.ConfigDict | RunConfig | dict


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key."""


def load_config_file(spec: str) -> mc.ConfigDict:
    """`FILE[:arg]` -> get_config(arg) of that file, locked."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_dpoq_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any error in user code: name the file, keep the cause
        raise ConfigError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: get_config({arg or None!r}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, mc.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


# Text -> value by the field's type: absl's flag parsers and ml_collections' tuple parser, as
# ml_collections.config_flags parses `--config.k=v`; a field that holds None takes a Python literal or text.
_PARSERS = {
    bool: absl_flags.BooleanParser(),
    int: absl_flags.IntegerParser(),
    float: absl_flags.FloatParser(),
    str: absl_flags.ArgumentParser(),
    tuple: tuple_parser.TupleParser(),
}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: mc.ConfigDict, key: str, text: str) -> None:
    """Set dotted `key` (e.g. "optim.lr") to `text` parsed as the field's type (ml_collections'
    config_path finds and sets the field, with its type check); ConfigError naming the key otherwise."""
    try:
        old = config_path.get_value(key, config)
    except (KeyError, AttributeError):
        parts, node = key.split("."), config
        for i, part in enumerate(parts):  # the first missing part, for the message
            if not isinstance(node, mc.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<top level>"
                known = sorted(node.keys()) if isinstance(node, mc.ConfigDict) else []
                msg = f"unknown config key {key!r} (no {part!r} in {where}; known: {known})"
                raise ConfigError(msg) from None
            node = node[part]
        raise
    if isinstance(old, mc.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its keys {sorted(old.keys())}")
    kind = config_path.get_type(key, config)
    if kind is type(None):
        value = _literal(text)
    elif kind in _PARSERS or kind is list:
        try:
            value = _PARSERS[tuple if kind is list else kind].parse(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects {kind.__name__}, got {text!r}") from None
        if kind in (tuple, list) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
            value = tuple(x.strip() for x in value[0].split(",") if x.strip())  # q,k -> ("q", "k")
        value = list(value) if kind is list else value
    else:
        raise ConfigError(
            f"config key {key!r} holds a {kind.__name__}; it cannot be set from the command line"
        )
    try:
        config_path.set_value(key, config, value)
    except TypeError as e:
        raise ConfigError(f"config key {key!r}: {e}") from None


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """`--config.a.b=v` or `--config.a.b v` pairs out of argv; anything else is an error."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --config.key=value)")
        body = arg[len("--config.") :]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value")
            key, value = body, argv[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


# Keys with a fixed set of values: a typo must fail here, not silently pick a default later.
_CHOICES = {
    "data.source": SOURCES,
    "data.chat_divergence": ("warn", "error"),
    "data.sft_responses": ("chosen", "all"),
    "data.layout": ("auto", *LAYOUTS),
    "model.attention": ("auto", "xla", "cudnn", "splash", "splash_interpret"),
    "data.overflow": ("error", "drop"),
    "data.on_error": ("fail", "skip"),
    "optim.name": ("rmsprop", "adamw"),
    "optim.schedule": ("constant", "linear", "cosine"),
}


# Floating dtypes a model, its compute or a frozen reference may take (names as jnp.dtype reads them).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Counts that divide or schedule something: 0 would divide by zero or (keep=0) delete every checkpoint.
_POSITIVE = ("train.batch_size", "train.micro_batches", "train.num_steps", "train.log_every",
             "train.peer_timeout_s",
             "train.max_consecutive_nonfinite", "checkpoint.every_steps", "checkpoint.keep")
_NON_NEGATIVE = ("train.eval_every", "train.eval_batches", "train.logps_chunk", "optim.warmup_steps",
                 "optim.lr", "optim.weight_decay", "optim.end_factor", "optim.eps",
                 "data.num_examples", "data.num_eval")


def _value(config: mc.ConfigDict, key: str) -> Any:
    group, name = key.split(".")
    return config[group][name]


def _check_numbers(config: mc.ConfigDict) -> None:
    """Every float of optim and loss is finite (an inf or nan learning rate trains garbage); counts
    and rates have their signs."""
    for group in ("optim", "loss"):
        for name, v in config[group].items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{group}.{name}' must be a finite number, got {v}")
    for key in _POSITIVE:
        if _value(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {_value(config, key)}")
    for key in _NON_NEGATIVE:
        if _value(config, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {_value(config, key)}")
    for key in ("model.dtype", "model.param_dtype", "reference.dtype"):
        if (v := _value(config, key)) not in FLOAT_DTYPES:
            raise ConfigError(f"config key {key!r} must be one of {FLOAT_DTYPES}, got {v!r}")


def validate(config: mc.ConfigDict) -> None:
    """Check values that types cannot: stage, signs and finiteness, dtypes, existing paths."""
    if config.stage not in STAGES:
        raise ConfigError(f"config key 'stage' must be one of {STAGES}, got {config.stage!r}")
    _check_numbers(config)
    t = config.train
    if t.batch_size % t.micro_batches:
        raise ConfigError(
            f"config key 'train.batch_size' ({t.batch_size}) must be divisible by "
            f"'train.micro_batches' ({t.micro_batches})"
        )
    for key in ("path", "eval_path"):
        path = config.data.get(key, "")
        if path and not paths.exists(path) and config.data.source != "datasets":  # datasets: Hub names too
            raise ConfigError(f"config key 'data.{key}': path {path!r} does not exist")
    if config.data.source in ("jsonl", "datasets", "hh", "tldr") and not config.data.path:
        raise ConfigError(f"config key 'data.path' is required for data.source={config.data.source!r}")
    if config.data.source == "synthetic" and config.data.num_examples <= 0:
        raise ConfigError("config key 'data.num_examples' must be > 0 for data.source='synthetic'")
    if config.stage == "dpo" and config.reference.mode == "precomputed" and config.reference.logps_path:
        if not paths.exists(config.reference.logps_path):
            raise ConfigError(
                f"config key 'reference.logps_path': path {config.reference.logps_path!r} does not exist "
                "(write it with `dpoq precompute-ref`)"
            )
    if config.model.init in ("hf", "checkpoint"):
        if not config.model.path:
            raise ConfigError(
                f"config key 'model.path' is required when model.init={config.model.init!r} "
                "(--config.model.path=DIR, or FILE:DIR for a config that takes the run as its argument)"
            )
        if not paths.exists(config.model.path):
            raise ConfigError(f"config key 'model.path': path {config.model.path!r} does not exist")
    elif config.model.init != "random":
        raise ConfigError(
            f"config key 'model.init' must be 'random', 'hf' or 'checkpoint', got {config.model.init!r}"
        )
    for key, choices in _CHOICES.items():
        group, name = key.split(".")
        if config[group][name] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {choices}, got {config[group][name]!r}")
    _check_lora(config)
    _check_loss(config)
    buckets = tuple(config.data.get("buckets", ()) or ())
    if any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in buckets):
        raise ConfigError(f"config key 'data.buckets' must list row lengths > 0, got {buckets!r}")
    if config.data.seq_len < 0 or config.data.get("bucket_step", 0) < 0:
        raise ConfigError("config keys 'data.seq_len' and 'data.bucket_step' must be >= 0 (0: automatic), "
                          f"got {config.data.seq_len} and {config.data.get('bucket_step', 0)}")
    if config.stage == "dpo" and config.reference.mode not in ("frozen", "precomputed"):
        raise ConfigError(
            f"config key 'reference.mode' must be 'frozen' or 'precomputed', got {config.reference.mode!r}"
        )


def loss_config(config: ConfigLike, token_values: str = "rewards") -> losses.LossConfig:
    """The loss group (of a ConfigDict being validated, or of a RunConfig) as a LossConfig (the token
    cache's path stays in the run config; `token_values`: what the cache holds, which setup reads)."""
    loss = config.loss
    d = dataclasses.asdict(loss) if dataclasses.is_dataclass(loss) else loss.to_dict()
    d.pop("token_weights", None)
    return losses.LossConfig(**d, token_values=token_values)


# LossConfig's errors name a field as "LossConfig.NAME must ..." (or "... has ..."): in a run config that
# field is the key loss.NAME.
_LOSS_FIELD = re.compile(r"^LossConfig\.(\w+) (?=must |has )")


def _check_loss(config: mc.ConfigDict) -> None:
    """The loss's own checks (LossConfig: types, weights, beta, ...) named by config key; then what the
    run adds: the token cache that token-level types read, TDPO's frozen reference, and no precomputed
    reference for a reference-free objective."""
    loss = config.loss
    try:
        loss_cfg = loss_config(config)
    except ValueError as e:
        msg, named = _LOSS_FIELD.subn(r"config key 'loss.\1' ", str(e))
        raise ConfigError(msg if named else f"config group 'loss': {e}") from None
    types = loss_cfg.types
    cached = [t for t in types if t in ("token_weighted", "selective")]
    if cached and not loss.token_weights:
        raise ConfigError(
            f"config key 'loss.token_weights' is required for loss.loss_type {cached}: a token cache of "
            "this run's pairs (`dpoq token-rewards --config ... --policy P --reference R --out DIR`)"
        )
    if loss.token_weights and not cached:
        raise ConfigError(
            f"config key 'loss.token_weights' is set but loss.loss_type={loss.loss_type!r} uses no token "
            "cache (token_weighted, selective)"
        )
    if loss.token_weights and not paths.exists(loss.token_weights):
        raise ConfigError(f"config key 'loss.token_weights': path {loss.token_weights!r} does not exist")
    if "tdpo" in types and config.stage == "dpo" and config.reference.mode != "frozen":
        raise ConfigError("config key 'reference.mode' must be 'frozen' for loss.loss_type tdpo (its "
                          "per-token KL reads the reference's whole next-token distribution)")
    if config.stage == "dpo" and not loss_cfg.needs_reference and config.reference.mode == "precomputed":
        raise ConfigError(
            f"config key 'reference.mode': loss.loss_type={loss.loss_type!r} is reference-free; "
            "'precomputed' reference log-probs would be unused (use 'frozen': no reference is held)"
        )


def _check_lora(config: mc.ConfigDict) -> None:
    from dpoq_jax.models.lora import TARGETS

    lora = config.model.lora
    if lora.rank < 0:
        raise ConfigError(f"config key 'model.lora.rank' must be >= 0, got {lora.rank}")
    if lora.rank == 0:
        return
    bad = sorted(set(lora.targets) - set(TARGETS))
    if bad or not lora.targets:
        what = bad or "empty"
        raise ConfigError(f"config key 'model.lora.targets': unknown {what} (choose from {TARGETS})")
    if not math.isfinite(lora.alpha) or lora.alpha <= 0:
        raise ConfigError(f"config key 'model.lora.alpha' must be a finite number > 0, got {lora.alpha}")
    if config.stage == "dpo" and config.reference.mode != "frozen":
        raise ConfigError(
            "config key 'reference.mode' must be 'frozen' with LoRA (model.lora.rank > 0): the base "
            "weights, held for the policy anyway, are the reference"
        )


def load_config(
    spec: str,
    overrides: Sequence[str] = (),
    *,
    first: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
) -> mc.ConfigDict:
    """Load `FILE[:arg]`, set the values of `first` (dotted keys), apply the `--config.key=value`
    overrides, set those of `last`, validate; returns a locked ConfigDict. Values set by a program go
    through `first`/`last` as values, never through text that is parsed back."""
    config = load_config_file(spec)
    for key, value in (first or {}).items():
        set_value(config, key, value)
    for key, value in parse_overrides(overrides):
        apply_override(config, key, value)
    for key, value in (last or {}).items():
        set_value(config, key, value)
    validate(config)
    resolve_data_shape(config)
    return config


def auto_layout(config: mc.ConfigDict) -> str:
    """data.layout "auto": prefix_shared for preference pairs (the prompt once, both responses after
    it: the fastest exact layout for pairs), padded for SFT and unpaired labelled responses."""
    first = losses.parse_types(config.loss.loss_type)[0]
    paired = config.stage == "dpo" and first not in losses.UNPAIRED_TYPES
    return "prefix_shared" if paired else "padded"


def resolve_data_shape(config: mc.ConfigDict) -> None:
    """Turn the automatic data-shape defaults into values (idempotent; `dpoq train` and setup call it):
    data.layout "auto" (auto_layout); data.seq_len 0 -> the row the longest allowed example needs
    (max_prompt_tokens + response_len, one response more when prefix-shared, twice that packed);
    data.bucket_step > 0 with no data.buckets -> buckets at every multiple of the step up to seq_len,
    so each step's rows are as long as its longest example, rounded up to the step (dynamic padding,
    one compiled shape per bucket used)."""
    d = config.data
    if d.layout == "auto":
        set_value(config, "data.layout", auto_layout(config))
    if d.seq_len == 0:
        one = d.max_prompt_tokens + d.response_len
        n = {"padded": one, "prefix_shared": one + d.response_len, "packed": 2 * (one + d.response_len)}
        set_value(config, "data.seq_len", n[d.layout])
    step = d.get("bucket_step", 0)
    if step and not tuple(d.buckets or ()):
        set_value(config, "data.buckets", tuple(range(step, d.seq_len, step)) + (d.seq_len,))


def set_value(config: mc.ConfigDict, key: str, value: Any) -> None:
    """config[key] = value for a dotted key that the config has (ConfigError naming it otherwise)."""
    *groups, name = key.split(".")
    node = config
    for g in groups:
        if g not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[g]
    if name not in node:
        raise ConfigError(f"unknown config key {key!r}")
    with node.unlocked(), node.ignore_type():
        node[name] = value


def base_config() -> mc.ConfigDict:
    """Every key a run config has, with its default (train/schema.py: the keys, types and comments;
    docs/training.md explains each). Config files start from this and change what they need;
    `load_config_file` locks the result."""
    return mc.ConfigDict(RunConfig().to_dict())


def typed(config: ConfigLike) -> RunConfig:
    """The run config as typed groups (schema.RunConfig), with the automatic data shape resolved
    (resolve_data_shape, on a copy); a RunConfig as it is. Setup and the entry points below the
    command line call this once; everything under them reads the typed groups."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, mc.ConfigDict):
        config = config.copy_and_resolve_references()
        resolve_data_shape(config)
        config = config.to_dict()
    try:
        return from_dict(RunConfig, config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
