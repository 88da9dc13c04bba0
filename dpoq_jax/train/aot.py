"""`dpoq compile`: the real train step of a config, compiled ahead of time for a TPU topology.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs with their
NamedShardings on a mesh of the topology's devices (libtpu describes them on a CPU-only host, the
`tpu` extra installs it). The compiled executable's memory and cost analyses say, per chip, whether
the run fits before anyone pays for a TPU.

    dpoq compile --config experiments/configs/tldr_pythia2p8b_dpo.py --topology v4-8 \
        --model-config experiments/configs/pythia-2.8b.json [--search-batch] [--config.k=v ...]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

from dpoq_jax.train.config import ConfigLike, typed
from dpoq_jax.train.schema import RunConfig

log = logging.getLogger(__name__)

GiB = 1 << 30
# HBM per chip (GiB) by device_kind; public Cloud TPU figures.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}
# Cloud TPU accelerator types -> topology names (v4/v5p count TensorCores, v5e/v6e chips).
ALIASES = {
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1",
    "v5p-16": "v5p:2x2x2",
    "v5e-4": "v5e:2x2",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4",
}
# chips one host holds, per generation (bounds of chips_per_host_bounds)
_HOST_BOUNDS = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 4, 1), "v6e": (2, 4, 1)}


def topology_devices(name: str, chip_config: str | None = None) -> tuple[str, list[Any]]:
    """(topology name, its TPU devices) for "v5e:2x4" or an accelerator type such as "v5e-8".
    chip_config: libtpu's chip configuration; default "megacore" on v4 (one device per chip, as JAX
    runs a v4 VM) and "default" elsewhere ("default" on v4 gives one device per TensorCore)."""
    # describing a topology loads libtpu; without this it takes a machine-wide lock file and fails
    # while another process (a training run on a TPU VM, a second compile) holds it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = ALIASES.get(name, name)
    gen, _, dims_s = topo.partition(":")
    try:
        dims = tuple(int(d) for d in dims_s.split("x"))
    except ValueError:
        dims = ()
    if gen not in _HOST_BOUNDS or len(dims) not in (2, 3):
        raise ValueError(
            f"--topology {name!r}: expected GEN:AxB[xC] with GEN in {sorted(_HOST_BOUNDS)} "
            f"(e.g. v5e:2x4) or one of {sorted(ALIASES)}"
        )
    dims3 = dims + (1,) * (3 - len(dims))
    bounds = tuple(min(d, b) for d, b in zip(dims3, _HOST_BOUNDS[gen], strict=True))
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo,
        chip_config_name=chip_config or ("megacore" if gen == "v4" else "default"),
        chips_per_host_bounds=bounds,
        num_slices=1,
    )
    return topo, list(desc.devices)


def model_config_for(cfg: RunConfig, model_config_path: str | None) -> Any:
    """The ModelConfig the run would build: --model-config (an HF config.json or our model_config.json)
    when given, else the config's own source (model.config, the HF dir's or the checkpoint's)."""
    from dpoq_jax.models.model_config import ModelConfig, config_from_hf, read_hf_config

    over = {"remat": cfg.model.remat} if cfg.model.remat else {}
    if model_config_path:
        d = read_hf_config(model_config_path)
        if "model_type" in d:
            return config_from_hf(d, where=model_config_path, **over)
        return ModelConfig.from_dict({**d, **over})
    if cfg.model.init == "random":
        return ModelConfig.from_dict({**cfg.model.config, **over})
    from dpoq_jax.train.load import locate

    try:
        return locate(cfg.model.path, flag="config key 'model.path':", **over).config
    except FileNotFoundError as e:
        raise ValueError(f"{e}; give --model-config FILE (a config.json)") from None


def abstract_batch(cfg: RunConfig, shardings_of: Any) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of one step's batch [M, ...], built from dummy examples."""
    import jax
    import numpy as np

    from dpoq_jax.train import inputs

    tc = cfg.train
    micro = tc.batch_size // tc.micro_batches
    example = inputs.stack_micro([None] * tc.batch_size, inputs.micro_batch_fn(cfg, micro), tc.micro_batches)
    if cfg.stage == "dpo" and cfg.reference.mode == "precomputed":
        for side in inputs.response_sides(cfg):
            example[f"ref_{side}_logps"] = np.zeros_like(example[f"{side}_mask"])
    if cfg.stage == "dpo" and cfg.loss.token_weights:  # token_weighted / selective: a token cache
        for side in inputs.response_sides(cfg):
            example[f"{side}_token_values"] = np.zeros_like(example[f"{side}_mask"])
    sh = shardings_of(example)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in example.items()}


@dataclasses.dataclass
class CompileReport:
    topology: str
    device_kind: str
    chips: int
    mesh: dict[str, int]
    stage: str
    layout: str
    reference: str
    num_layers: int
    attention: str
    batch_size: int
    micro_batches: int
    seq_len: int
    argument_gib: float  # per chip
    output_gib: float
    alias_gib: float  # outputs that reuse donated argument buffers
    temp_gib: float
    peak_gib: float  # arguments + outputs - aliased + temporaries
    hbm_gib: float | None
    fits: bool | None
    flops_per_step: float  # all chips: the model FLOPs that MFU counts (train.metrics.step_flops)
    xla_flops_per_chip: float  # XLA's cost analysis; it counts a loop body (layer scan) once
    compile_s: float
    lora_rank: int = 0  # > 0: a LoRA step (adapters train; the base is frozen and is the reference)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_step(
    cfg: ConfigLike, topology: str, model_config_path: str | None = None, chip_config: str | None = None
) -> CompileReport:
    """Lower and compile the config's train step for `topology`; memory and cost of the result."""
    import jax
    from flax import nnx

    from dpoq_jax.models.decoder import Decoder
    from dpoq_jax.train.metrics import step_flops
    from dpoq_jax.train.setup import ModelSource, lora_config, setup

    cfg = typed(cfg)
    topo, devices = topology_devices(topology, chip_config)
    mcfg = model_config_for(cfg, model_config_path)
    kw = dict(
        param_dtype=jax.numpy.dtype(cfg.model.param_dtype),
        dtype=jax.numpy.dtype(cfg.model.dtype),
        # "auto" means the TPU's kernel here: the compile targets a TPU from a CPU host
        attention="splash" if cfg.model.attention == "auto" else cfg.model.attention,
        lora=lora_config(cfg),
    )
    source = ModelSource(lambda: Decoder(mcfg, rngs=nnx.Rngs(0), **kw), mcfg, None)
    run = setup(cfg, devices, source=source, with_data=False)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), run.abstract, run.shardings
    )
    batch = abstract_batch(cfg, run.batch_shardings)
    step_fn, _ = run.compile({k: v.sharding for k, v in batch.items()})
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    peak = arg + out - alias + temp
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    rows = math.prod(batch["tokens"].shape)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abs_params))
    flops = step_flops(
        n_params,
        rows,
        num_layers=mcfg.num_layers,
        attn_width=mcfg.num_heads * mcfg.head_dim,
        row_len=cfg.data.seq_len,
        tokens_ref=rows if cfg.stage == "dpo" and run.shardings.ref_params is not None else 0,
    )
    return CompileReport(
        topology=topo,
        device_kind=kind,
        chips=len(devices),
        mesh=dict(run.mesh.shape),
        stage=cfg.stage,
        layout=cfg.data.layout,
        reference=cfg.reference.mode if cfg.stage == "dpo" else "none",
        num_layers=mcfg.num_layers,
        attention=kw["attention"],
        batch_size=cfg.train.batch_size,
        micro_batches=cfg.train.micro_batches,
        seq_len=cfg.data.seq_len,
        argument_gib=round(arg / GiB, 3),
        output_gib=round(out / GiB, 3),
        alias_gib=round(alias / GiB, 3),
        temp_gib=round(temp / GiB, 3),
        peak_gib=round(peak / GiB, 3),
        hbm_gib=hbm,
        fits=None if hbm is None else peak <= hbm * GiB,
        flops_per_step=flops,
        xla_flops_per_chip=float(cost.get("flops", 0.0)),
        compile_s=round(compile_s, 1),
        lora_rank=cfg.model.lora.rank,
    )


def _with_micro_size(cfg: RunConfig, per_chip: int, batch_shards: int) -> RunConfig:
    """A copy of cfg whose micro-batch holds `per_chip` examples (pairs) per batch shard."""
    batch_size = per_chip * batch_shards * cfg.train.micro_batches
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))


def search_batch(
    cfg: ConfigLike,
    topology: str,
    model_config_path: str | None,
    chip_config: str | None = None,
    limit: int = 256,
) -> list[dict]:
    """Compiles with 1, 2, 4, ... examples per batch shard and micro-batch until one does not fit."""
    from dpoq_jax.train.mesh import MESH_AXES, mesh_shape

    cfg = typed(cfg)
    _, devices = topology_devices(topology, chip_config)
    sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, len(devices)), strict=True))
    shards = sizes["data"] * sizes["fsdp"]
    tried = []
    per_shard = 1
    while per_shard <= limit:
        r = compile_step(_with_micro_size(cfg, per_shard, shards), topology, model_config_path, chip_config)
        tried.append(dict(r.to_dict(), per_shard_micro_batch=per_shard))
        print(report_line(r, per_shard), flush=True)
        if not r.fits:
            break
        per_shard *= 2
    return tried


def report_line(r: CompileReport, per_shard: int | None = None) -> str:
    fits = {True: "fits", False: "DOES NOT FIT", None: "HBM unknown"}[r.fits]
    extra = f" per-shard micro-batch {per_shard}" if per_shard is not None else ""
    return (
        f"{r.topology} ({r.chips} x {r.device_kind}) mesh {r.mesh}{extra}: peak {r.peak_gib:.2f} GiB "
        f"of {r.hbm_gib} GiB per chip ({fits}); compile {r.compile_s:.1f} s"
    )
