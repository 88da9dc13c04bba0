"""Per-token caches of a run's data (data/token_cache.py has the format): `dpoq precompute-ref` writes the
reference's log-probs, `dpoq token-rewards` an oracle's token rewards β·(log π − log π_ref).

Both go over the train and held-out splits of a config in batches of the run's own layout, so each item is
keyed by the hash of exactly the token ids the run trains on (train.inputs.fingerprint). The manifest
fingerprints the tokenizer (vocabulary, special tokens, chat template), the data (file bytes, or the
synthetic task and its settings) and, for a reference cache, the model (param_checksum). A run refuses a
cache whose fingerprint differs (train/setup.attach_caches; the model at a fresh start, train/loop).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from dpoq_jax.data import token_cache
from dpoq_jax.train import inputs
from dpoq_jax.train.checkpoint import base_checksums
from dpoq_jax.train.config import ConfigLike, typed
from dpoq_jax.train.mesh import replicated
from dpoq_jax.train.schema import RunConfig
from dpoq_jax.train.setup import Run, forward_for, global_batch, kernel_mesh_fn, setup
from dpoq_jax.train.step import layout_logps


def param_checksum(params: Any) -> str:
    """sha256 of a parameter tree's per-array dtypes and exact checksums (train.checkpoint's, computed
    on the devices where the parameters live): a cache names the models it was computed with."""
    return token_cache.sha256_of(base_checksums(params))


def check_reference_model(cache: token_cache.TokenCache, params: Any) -> None:
    """A reference cache must hold the log-probs of the run's initial model (the reference)."""
    fp = cache.manifest["fingerprint"]
    if fp.get("model") and param_checksum(params) != fp["model"]:
        raise token_cache.CacheMismatch(
            f"config key 'reference.logps_path': token cache {cache.path!r} was made for another model "
            f"({fp.get('model_path', '?')}) than this run's initial model; rerun `dpoq precompute-ref`"
        )


def _split_batches(run: Run, params_sets: list[Any]) -> Iterator[tuple[Any, list[dict[str, np.ndarray]]]]:
    """(item, [per-side log-probs of the item's responses under each parameter set]) for every train and
    held-out item, computed in batches of the run's layout on its mesh."""
    cfg = run.cfg
    G = cfg.train.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    make_batch = inputs.micro_batch_fn(cfg, G // pc)
    example = inputs.stack_micro(run.dataset.train[:1] * (G // pc), make_batch, 1)
    b_sh = run.batch_shardings(example)
    sides = inputs.response_sides(cfg)

    def fn(params, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        return layout_logps(run.graphdef, run.rest, params, micro, forward_for(cfg, G), sides=sides)

    rep = replicated(run.mesh)
    shardings = dict(in_shardings=(run.shardings.params, b_sh), out_shardings=(rep,) * len(sides))
    logps_fn = jax.jit(kernel_mesh_fn(fn, run.mesh), **shardings)  # fused attention kernels: on the mesh
    for items in (run.dataset.train, run.dataset.eval):
        for start in range(0, len(items), G):
            gidx = np.arange(start, start + G)
            lidx = gidx[pi * (G // pc) : (pi + 1) * (G // pc)]
            local = inputs.stack_micro([items[i] if i < len(items) else None for i in lidx], make_batch, 1)
            batch = global_batch(local, b_sh)
            outs = [dict(zip(sides, jax.device_get(logps_fn(p, batch)), strict=True)) for p in params_sets]
            for p, i in enumerate(gidx):
                if i < len(items):
                    yield items[i], [{s: o[s][p] for s in sides} for o in outs]


def _write(run: Run, out: str, kind: str, fingerprint: dict, dtype: str, params_sets: list[Any],
           values: Callable[[list[dict[str, np.ndarray]], str], np.ndarray]) -> int:  # fmt: skip
    sides = inputs.response_sides(run.cfg)
    fields = token_cache.value_fields(kind, sides)
    main = jax.process_index() == 0  # every process computes (the batches are global), one writes
    writer = token_cache.CacheWriter(out, kind, fields, fingerprint, dtype=dtype) if main else None
    n = 0
    for item, logps in _split_batches(run, params_sets):
        n += 1
        if writer is not None:
            row = {}
            for (side, ids), field in zip(inputs.reference_sides(item), fields, strict=True):
                row[field] = values(logps, side)[: len(ids)]
            writer.add(inputs.fingerprint(item), row)
    if writer is not None:
        writer.close()
    return n


def _provenance(cfg: RunConfig) -> dict[str, Any]:
    return {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "layout": cfg.data.layout}


def precompute_reference(cfg: ConfigLike, output: str, dtype: str = "float32") -> int:
    """Writes the token cache of the config's initial model's (the reference's) log-probs of every pair
    or labelled response; returns the item count."""
    cfg = typed(cfg)
    run = setup(cfg)
    state = run.new_state()
    fp = {**inputs.run_fingerprint(cfg, run.dataset.tokenizer), "model": param_checksum(state.params),
          **_provenance(cfg), "model_path": cfg.model.path or f"random init, seed {cfg.seed}"}  # fmt: skip
    return _write(run, output, "reference_logps", fp, dtype, [state.params], lambda lp, side: lp[0][side])


def token_rewards(cfg: ConfigLike, policy: str, reference: str, output: str, beta: float,
                  dtype: str = "float32") -> int:  # fmt: skip
    """Writes the token cache of an oracle's per-token rewards β·(log π(y_t) − log π_ref(y_t)) of every
    pair of the config's data, `policy` and `reference` being anything `load.load_model` reads (same
    architecture); returns the item count. With β = 1 the values are TIS-DPO's d_t of the contrastive
    pair (policy = π+, reference = π−)."""
    from dpoq_jax.train import load

    if not beta > 0:
        raise ValueError(f"token-rewards: beta must be > 0, got {beta}")
    cfg = typed(cfg)
    data = cfg.data  # the config's data and tokenizer; the models are the oracle's two
    if not data.tokenizer_path and data.source != "synthetic":
        data = replace(data, tokenizer_path=cfg.model.path)  # the tokenizer stays the config's model folder's
    lora = replace(cfg.model.lora, rank=0)
    model = replace(cfg.model, init="checkpoint", path=policy, lora=lora)
    run = setup(replace(cfg, data=data, model=model, reference=replace(cfg.reference, mode="frozen")))
    params = []
    for path, flag in ((policy, "--policy"), (reference, "--reference")):
        files = load.locate(path, flag=flag)
        params.append(load.read_params(files, run.abs_params, run.p_shardings, flag=flag))
    fp = {**inputs.run_fingerprint(cfg, run.dataset.tokenizer), "beta": float(beta), **_provenance(cfg),
          "policy": param_checksum(params[0]), "reference": param_checksum(params[1]),
          "policy_path": policy, "reference_path": reference}  # fmt: skip
    return _write(run, output, "token_rewards", fp, dtype, params,
                  lambda lp, side: beta * (lp[0][side].astype(np.float64) - lp[1][side]))  # fmt: skip


def write_values_cache(cfg: ConfigLike, output: str, kind: str,
                       values: Callable[[Any, str, list[int]], Any], dtype: str = "float32",
                       provenance: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Writes a token cache of any per-token values of the config's pairs: values(item, side, ids) -> one
    value per response token (e.g. a synthetic task's true token rewards, kind "token_rewards", or
    weights, kind "token_weights"), keyed and fingerprinted like the caches above; returns the count.
    Needs no model: it reads and tokenizes the data only."""
    cfg = typed(cfg)
    dataset = inputs.load_dataset(cfg)
    sides = inputs.response_sides(cfg)
    fields = token_cache.value_fields(kind, sides)
    fp = {**inputs.run_fingerprint(cfg, dataset.tokenizer), **_provenance(cfg), **(provenance or {})}
    if jax.process_index() != 0:  # one process writes
        return len(dataset.train) + len(dataset.eval)
    writer = token_cache.CacheWriter(output, kind, fields, fp, dtype=dtype)
    n = 0
    for item in dataset.train + dataset.eval:
        writer.add(inputs.fingerprint(item),
                   {f: values(item, side, ids) for (side, ids), f in zip(inputs.reference_sides(item), fields,
                                                                          strict=True)})  # fmt: skip
        n += 1
    writer.close()
    return n
