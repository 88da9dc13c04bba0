"""Run configs: Python files with `get_config(arg=None)` returning a locked ml_collections ConfigDict.

`load_config("experiments/configs/x.py:arg", ["--config.optim.lr=1e-4"])` imports the file, calls
`get_config(arg)`, applies the overrides with type checking and validates the result. Errors name the
key (and the file) so that a typo never trains the wrong thing silently.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections as mc

STAGES = ("sft", "dpo")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key."""


def load_config_file(spec: str) -> mc.ConfigDict:
    """`FILE[:arg]` -> get_config(arg) of that file, locked."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_dpoq_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    config = module.get_config(arg or None)
    if not isinstance(config, mc.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


def _parse_value(key: str, text: str, old: Any) -> Any:
    """Parse `text` into the type of the current value `old`; ConfigError naming key and type if not."""
    if isinstance(old, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} expects bool, got {text!r}")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects int, got {text!r}") from None
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects float, got {text!r}") from None
    if isinstance(old, str):
        return text
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(x.strip() for x in text.split(",") if x.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(old)(value)
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigError(
        f"config key {key!r} holds a {type(old).__name__}; it cannot be set from the command line"
    )


def apply_override(config: mc.ConfigDict, key: str, text: str) -> None:
    """Set dotted `key` (e.g. "optim.lr") to `text` parsed as the existing value's type."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, mc.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "<top level>"
            known = sorted(node.keys()) if isinstance(node, mc.ConfigDict) else []
            raise ConfigError(f"unknown config key {key!r} (no {part!r} in {where}; known: {known})")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, mc.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its keys {sorted(old.keys())}")
    value = _parse_value(key, text, old)
    with node.unlocked():  # type already checked above; unlocked so None fields can take any type
        node[parts[-1]] = value


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


def validate(config: mc.ConfigDict) -> None:
    """Check values that types cannot: stage, positive sizes, existing paths."""
    if config.stage not in STAGES:
        raise ConfigError(f"config key 'stage' must be one of {STAGES}, got {config.stage!r}")
    t = config.train
    for key in ("batch_size", "micro_batches", "num_steps"):
        if t[key] <= 0:
            raise ConfigError(f"config key 'train.{key}' must be > 0, got {t[key]}")
    if t.batch_size % t.micro_batches:
        raise ConfigError(
            f"config key 'train.batch_size' ({t.batch_size}) must be divisible by "
            f"'train.micro_batches' ({t.micro_batches})"
        )
    for key in ("path", "eval_path"):
        path = config.data.get(key, "")
        if path and not os.path.exists(path):
            raise ConfigError(f"config key 'data.{key}': path {path!r} does not exist")
    if config.model.init in ("hf", "checkpoint"):
        if not config.model.path:
            raise ConfigError(f"config key 'model.path' is required when model.init={config.model.init!r}")
        if not os.path.exists(config.model.path):
            raise ConfigError(f"config key 'model.path': path {config.model.path!r} does not exist")
    elif config.model.init != "random":
        raise ConfigError(
            f"config key 'model.init' must be 'random', 'hf' or 'checkpoint', got {config.model.init!r}"
        )
    if config.stage == "dpo" and config.reference.mode not in ("frozen", "precomputed"):
        raise ConfigError(
            f"config key 'reference.mode' must be 'frozen' or 'precomputed', got {config.reference.mode!r}"
        )


def load_config(spec: str, overrides: Sequence[str] = ()) -> mc.ConfigDict:
    """Load `FILE[:arg]`, apply `--config.key=value` overrides, validate; returns a locked ConfigDict."""
    config = load_config_file(spec)
    for key, value in parse_overrides(overrides):
        apply_override(config, key, value)
    validate(config)
    return config
