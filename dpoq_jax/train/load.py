"""One way to load a model, for every command, experiment, precompute and benchmark.

`load_model(path)` takes any of
  - a Hugging Face directory (config.json + *.safetensors), a run's own `WORKDIR/hf` export included;
  - a params checkpoint (`models.params_io.save_params`: params/ + model_config.json);
  - a `dpoq train` run folder, its checkpoints/ directory or one step of it: the newest intact step
    (damaged newer ones are named in a warning and skipped, nothing is moved), or `step`. A LoRA run's
    step holds adapters and a pointer to its base: the base is loaded again from where the pointer says,
    checked against the checksums the run stored, and the adapters are merged into it.
`locate(path)` is its abstract twin: the kind of source and its ModelConfig, no weights read.
With a mesh each parameter is placed straight into its NamedSharding (logical axis rules,
models/sharding.py), so no device ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dpoq_jax import paths
from dpoq_jax.models import hf, params_io
from dpoq_jax.models import lora as lora_lib
from dpoq_jax.models.decoder import Decoder, abstract_split
from dpoq_jax.models.model_config import ModelConfig, config_from_hf, read_hf_config
from dpoq_jax.models.sharding import Rules
from dpoq_jax.train.checkpoint import DamagedCheckpoint, RunCheckpoints, base_checksums, check_base
from dpoq_jax.train.state import init_params, param_shardings

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where a model's weights are and its hyper-parameters (what `locate` finds, no weights read)."""

    kind: str  # "hf" | "params" | "run"
    path: str  # the HF or params directory; for "run", the checkpoints directory
    config: ModelConfig
    step: int | None = None  # "run": the step to read
    lora: dict | None = None  # "run" of a LoRA policy: {"config": run config's model.lora, "base": pointer}
    older: tuple[int, ...] = ()  # "run" without a step asked: older steps to fall back to, newest first


def _run_checkpoints(path: str) -> str | None:
    """The checkpoints directory that `path` (a run folder, its checkpoints/ or a step of it) belongs to."""
    path = paths.absolute(path)
    if paths.isdir(paths.join(path, CHECKPOINT_SUBDIR)):
        return paths.join(path, CHECKPOINT_SUBDIR)
    name = paths.basename(path.rstrip("/"))
    if name == CHECKPOINT_SUBDIR and paths.isdir(path):
        return path
    parent = paths.dirname(path.rstrip("/"))
    if name.isdigit() and paths.basename(parent) == CHECKPOINT_SUBDIR:
        return parent
    return None


def _is_hf(path: str) -> bool:
    return paths.isfile(paths.join(path, "config.json")) and not paths.isdir(
        paths.join(path, CHECKPOINT_SUBDIR)
    )


def locate(path: str, *, step: int | None = None, flag: str = "--model", **overrides: Any) -> ModelFiles:
    """The kind of model source `path` is and its ModelConfig (overrides such as remat="full" replace
    fields). Errors name `flag`, the option or config key the path came from."""
    if not paths.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: not a directory")
    if _is_hf(path) and not params_io.is_params_source(path):
        if step is not None:
            raise ValueError(f"{flag} {path}: a Hugging Face directory has no steps (step {step} asked)")
        where = paths.join(path, "config.json")
        try:
            cfg = config_from_hf(read_hf_config(where), where=where, **overrides)
        except (OSError, ValueError) as e:
            raise type(e)(f"{flag} {path}: {e}") from None
        return ModelFiles("hf", path, cfg)
    ckpt_dir = _run_checkpoints(path)
    if ckpt_dir is None:
        try:
            found = params_io.resolve_params_dir(path, step)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{flag} {path}: neither a Hugging Face directory (no config.json) nor a params checkpoint "
                "(params/ + model_config.json) nor a `dpoq train` run folder (checkpoints/)"
            ) from None
        cfg = params_io.read_model_config(found)
        return ModelFiles("params", found, dataclasses.replace(cfg, **overrides) if overrides else cfg)
    return _locate_run(path, ckpt_dir, step, flag, overrides)


def _locate_run(path: str, ckpt_dir: str, step: int | None, flag: str, overrides: dict) -> ModelFiles:
    name = paths.basename(paths.absolute(path).rstrip("/"))
    if step is None and name.isdigit():  # a step directory names its step
        step = int(name)
    ckpts = RunCheckpoints(ckpt_dir, every_steps=1, keep=1, async_save=False)
    try:
        steps = sorted(ckpts.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"{flag} {path}: no checkpoint for step {step} (steps found: {sorted(steps)})"
                )
            steps = [step]
        if not steps:
            raise FileNotFoundError(f"{flag} {path}: no complete checkpoint under {ckpt_dir}")
        damaged = []
        for i, s in enumerate(steps):  # the newest step whose records read (its arrays: read_params)
            try:
                ckpts.integrity_record(s)
                cfg = ModelConfig.from_dict({**ckpts.read_json(s, "model_config"), **overrides})
                lora = None
                if paths.isdir(paths.join(ckpts.step_dir(s), "base")):
                    run_cfg = ckpts.read_json(s, "config")
                    lora = {"config": run_cfg["model"]["lora"], "base": ckpts.read_json(s, "base")}
            except DamagedCheckpoint as e:
                damaged.append(f"step {s}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 (orbax/JSON errors of a cut or edited step)
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                damaged.append(f"step {s} cannot be read ({first})")
                continue
            for why in damaged:
                log.warning("%s %s: checkpoint %s; using step %d", flag, path, why, s)
            return ModelFiles("run", ckpt_dir, cfg, s, lora, tuple(steps[i + 1 :]))
        raise ValueError(f"{flag} {path}: no intact checkpoint under {ckpt_dir} (newest, {damaged[0]})")
    finally:
        ckpts.close()


def decoder_kwargs(dtype: Any = None, param_dtype: Any = jnp.float32, attention: str = "auto") -> dict:
    return {
        "dtype": None if dtype is None else jnp.dtype(dtype),
        "param_dtype": jnp.dtype(param_dtype),
        "attention": attention,
    }


def read_params(
    files: ModelFiles, abs_params: nnx.State, shardings: Any, *, flag: str = "--model"
) -> nnx.State:
    """The base parameters of `files` in the layout of `abs_params` (its dtypes), placed in `shardings`
    (in the tree of `abs_params`: train.state.param_shardings). A LoRA run's adapters come merged in."""
    try:
        if files.kind == "hf":
            try:
                return hf.read_params(files.path, files.config, abs_params, shardings)
            except (OSError, ValueError) as e:  # a damaged or foreign file: name the option
                raise type(e)(f"{flag} {files.path}: {e}") from None
        if files.kind == "params":
            return params_io.read_params(files.path, files.config, abs_params, shardings)
        return _read_run_params(files, abs_params, shardings, flag)
    except KeyError as e:  # tensors missing from the files
        msg = str(e.args[0])
        where = "" if msg.startswith(files.path) else f"{files.path}: "
        raise ValueError(f"{flag} {where}{msg}") from None


def _cast(pure: Any, abs_params: nnx.State) -> Any:
    want = nnx.to_pure_dict(abs_params)
    return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), pure, want)


def _read_run_params(files: ModelFiles, abs_params: nnx.State, shardings: Any, flag: str) -> nnx.State:
    """The step's parameters, verified against its checksums; a damaged step is named in a warning and
    the next older one read instead (unless the step was asked for). Nothing is moved."""
    ckpts = RunCheckpoints(files.path, every_steps=1, keep=1, async_save=False)
    damaged = []
    try:
        for step in (files.step, *files.older):
            try:
                params = _read_run_step(ckpts, step, files, abs_params, shardings, flag)
            except DamagedCheckpoint as e:
                damaged.append(f"step {step}: {e}")
                continue
            for why in damaged:
                log.warning("%s %s: checkpoint %s; using step %d", flag, files.path, why, step)
            return params
    finally:
        ckpts.close()
    raise ValueError(f"{flag} {files.path}: no intact checkpoint under {files.path} (newest, {damaged[0]})")


def _read_run_step(
    ckpts: RunCheckpoints, step: int, files: ModelFiles, abs_params: nnx.State, shardings: Any, flag: str
) -> nnx.State:
    if files.lora is None:
        params = ckpts.restore_params(step, abs_params, shardings)
        return _state(_cast(nnx.to_pure_dict(params), abs_params), abs_params)
    lc = lora_lib.LoraConfig(
        rank=int(files.lora["config"]["rank"]),
        alpha=float(files.lora["config"]["alpha"]),
        targets=tuple(files.lora["config"]["targets"]),
        seed=int(files.lora["base"]["seed"]),
    )
    base = _lora_base(files, lc, flag)
    _, abs_lora, _ = abstract_split(lambda: Decoder(files.config, rngs=nnx.Rngs(0), lora=lc))
    abs_adapters = lora_lib.split_adapters(abs_lora)[0]
    adapters = ckpts.restore_params(step, abs_adapters, param_shardings(abs_adapters, None))
    merged = jax.jit(lambda b, a: lora_lib.merged_params(b, a, lc.scale))(base, adapters)
    return _place(_cast(nnx.to_pure_dict(merged), abs_params), abs_params, shardings)


def _place(pure: dict, abs_params: nnx.State, shardings: Any) -> nnx.State:
    return jax.device_put(_state(pure, abs_params), shardings)


def _state(pure: dict, abs_params: nnx.State) -> nnx.State:
    params = jax.tree.map(lambda x: x, abs_params)
    nnx.replace_by_pure_dict(params, pure)
    return params


def _lora_base(files: ModelFiles, lc: lora_lib.LoraConfig, flag: str) -> nnx.State:
    """The frozen base a LoRA run's adapters were trained on, built or loaded again as training did,
    and checked against the checksums the run stored with its adapters."""
    pointer = files.lora["base"]
    dtype = jnp.dtype(pointer.get("param_dtype", "float32"))
    make = lambda: Decoder(files.config, rngs=nnx.Rngs(pointer["seed"]), lora=lc, param_dtype=dtype)  # noqa: E731
    _, abs_lora, _ = abstract_split(make)
    abs_base = lora_lib.split_adapters(abs_lora)[1]
    if pointer["init"] == "random":  # initialised under jit, as training does (same numbers)
        base = lora_lib.split_adapters(init_params(make, param_shardings(abs_lora, None))[0])[1]
    else:
        src = locate(pointer["path"], flag=f"{flag} {files.path}: base model")
        base = read_params(src, abs_base, param_shardings(abs_base, None), flag=flag)
    where = f"{flag} {paths.join(files.path, str(files.step))}"
    check_base(pointer, {"arrays": base_checksums(base)}, where)
    return base


def load_model(
    path: str | ModelFiles,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    attention: str = "auto",
    flag: str = "--model",
    **overrides: Any,
) -> Decoder:
    """The Decoder stored at `path` (see the module docstring for what `path` may be); its ModelConfig
    is `model.cfg`. dtype: compute dtype (None: the parameters'); param_dtype: storage dtype;
    overrides replace ModelConfig fields (e.g. remat="full"); errors name `flag`. `path` may also be
    what `locate` returned for it."""
    files = path if isinstance(path, ModelFiles) else locate(path, step=step, flag=flag, **overrides)
    kw = decoder_kwargs(dtype, param_dtype, attention)
    graphdef, abs_params, rest = abstract_split(lambda: Decoder(files.config, rngs=nnx.Rngs(0), **kw))
    params = read_params(files, abs_params, param_shardings(abs_params, mesh, rules), flag=flag)
    return nnx.merge(graphdef, params, rest)


def run_config(path: str) -> dict | None:
    """The config.json of the `dpoq train` run that `path` is (or is the checkpoints dir / a step / the
    hf export of); None when `path` is not part of a run."""
    here = paths.absolute(path).rstrip("/")
    for cand in (here, paths.dirname(here), paths.dirname(paths.dirname(here))):
        f = paths.join(cand, "config.json")
        if paths.isdir(paths.join(cand, CHECKPOINT_SUBDIR)) and paths.isfile(f):
            try:
                return json.loads(paths.read_text(f))
            except ValueError as e:
                raise ValueError(f"{f}: not a run config ({e})") from None
    return None
