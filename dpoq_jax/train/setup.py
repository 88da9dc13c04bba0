"""What a training run is built from: config -> mesh, data, model source, shardings, loss.

`setup(cfg)` returns a `Run` (everything `train`, `precompute-ref`, `dpoq compile` and the benchmarks
need); the loop itself is train/loop.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpoq_jax import losses, paths
from dpoq_jax.data import token_cache
from dpoq_jax.models.attention import kernel_mesh
from dpoq_jax.models.decoder import Decoder, abstract_split, split_params
from dpoq_jax.models.lora import LoraConfig, split_adapters
from dpoq_jax.models.model_config import ModelConfig
from dpoq_jax.train import inputs, load
from dpoq_jax.train.checkpoint import base_checksums
from dpoq_jax.train.config import ConfigLike, loss_config, typed
from dpoq_jax.train.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated, rules_from_config
from dpoq_jax.train.optim import make_optimizer
from dpoq_jax.train.schema import RunConfig
from dpoq_jax.train.state import (
    TrainState,
    abstract_state,
    create_train_state,
    init_params,
    param_shardings,
    state_shardings,
)
from dpoq_jax.train.step import (
    Forward,
    make_dpo_loss,
    make_eval_step,
    make_outcome_loss,
    make_sft_loss,
    make_train_step,
)


@dataclasses.dataclass
class ModelSource:
    make_model: Callable[[], nnx.Module]  # builds the (random-init) module; used abstractly for shapes
    model_config: ModelConfig
    load_params: Callable[[Any, Any], Any] | None  # (abstract params, shardings) -> sharded params


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def lora_config(cfg: RunConfig) -> LoraConfig | None:
    """The run's LoraConfig (models/lora.py), or None when model.lora.rank is 0 (full fine-tuning)."""
    lc = cfg.model.lora
    if lc.rank == 0:
        return None
    return LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=tuple(lc.targets), seed=cfg.seed)


def model_source(cfg: RunConfig) -> ModelSource:
    """How to build the policy: random init from model.config, or the weights at model.path (anything
    `load.load_model` takes: an HF directory, a params checkpoint, a run folder). With LoRA, make_model
    builds base + adapters and load_params loads the base weights only (the shardings come with each
    call of load_params)."""
    kw = dict(param_dtype=_dtype(cfg.model.param_dtype), dtype=_dtype(cfg.model.dtype))
    kw["attention"] = cfg.model.attention
    lora = lora_config(cfg)
    over = {"remat": cfg.model.remat} if cfg.model.remat else {}  # rematerialisation policy of the blocks
    if cfg.model.init == "random":
        mcfg = ModelConfig.from_dict({**cfg.model.config, **over})
        return ModelSource(lambda: Decoder(mcfg, rngs=nnx.Rngs(cfg.seed), lora=lora, **kw), mcfg, None)
    flag = "config key 'model.path':"
    files = load.locate(cfg.model.path, flag=flag, **over)

    def load_params(abstract: Any, shardings: Any) -> Any:
        return load.read_params(files, abstract, shardings, flag=flag)

    make = lambda: Decoder(files.config, rngs=nnx.Rngs(0), lora=lora, **kw)  # noqa: E731
    return ModelSource(make, files.config, load_params)


def check_vocab(dataset: inputs.Dataset, vocab_size: int, cfg: RunConfig) -> None:
    """The model must have a row for every token id the tokenizer can produce (an id past the
    embedding reads NaN and trains garbage): refused before the first step."""
    tok = dataset.tokenizer
    n_tok = len(tok) if hasattr(tok, "__len__") else int(tok.vocab_size)
    top = max((max(ids) for ex in dataset.train + dataset.eval for ids in _token_ids(ex) if ids), default=-1)
    if n_tok > vocab_size or top >= vocab_size:
        where = cfg.data.tokenizer_path or cfg.model.path or f"the {cfg.data.source} tokenizer"
        raise ValueError(
            f"model vocab_size={vocab_size} is smaller than the tokenizer's vocabulary ({n_tok} tokens, "
            f"largest id in the data {top}; tokenizer: {where}); set model.config.vocab_size >= {n_tok}"
        )


def _token_ids(ex: Any) -> list[list[int]]:
    return [getattr(ex, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
            if hasattr(ex, k)]


def forward_for(cfg: RunConfig, rows: int) -> Forward:
    """How the config's layout runs forward (train/step.Forward). train.logps_chunk counts time steps
    per chunk; the lean log-probs count positions (responses x steps), so it is scaled by the responses
    per forward (`rows`: pairs or sequences of one micro-batch, global)."""
    chunk = max(1, cfg.train.logps_chunk) * max(1, rows)
    return Forward.for_layout(cfg.data.layout, chunk, lora=lora_config(cfg) is not None)


def global_batch(local_M: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Global arrays [M, global batch, ...] from this process's micro-stacked local batch. Flat row
    indices are shifted so that they index this process's rows of the global batch."""
    pc, pi = jax.process_count(), jax.process_index()
    N, S = local_M["tokens"].shape[1:3]
    out = {}
    for k, v in local_M.items():
        if k.endswith("_pred_idx"):
            v = v + pi * N * S
        shape = (v.shape[0], v.shape[1] * pc) + v.shape[2:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, shape)
    return out


@dataclasses.dataclass
class Run:
    """Everything `train` and `precompute_ref` build from a config (exposed for tests and tools)."""

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    dataset: inputs.Dataset | None
    source: ModelSource
    graphdef: nnx.GraphDef
    rest: nnx.State  # the model's non-parameter variables (replicated)
    abs_params: nnx.State  # ShapeDtypeStructs of the parameters
    p_shardings: nnx.State  # NamedSharding per parameter (state.param_shardings)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    abstract: TrainState
    loss_fn: Callable[..., Any]  # (params, ref_params, batch) -> (loss, (weight, metrics)): make_*_loss
    forward: Forward  # how the layout rows run forward (chunking, causal rows, one segment, LoRA)
    lora: LoraConfig | None = None  # TrainState.params are adapters, ref_params the frozen base
    # token caches by role ("reference", "token_values"), opened by attach_caches
    caches: dict[str, token_cache.TokenCache] = dataclasses.field(default_factory=dict)

    def new_state(self) -> TrainState:
        if self.lora is not None:
            adapters = init_params(self.source.make_model, self.p_shardings, adapters_only=True)
            return create_train_state(
                adapters, self.optimizer, self.shardings, with_ref=False, base=self.load_base()
            )
        if self.source.load_params is None:
            params, _ = init_params(self.source.make_model, self.p_shardings)
        else:
            params = self.source.load_params(self.abs_params, self.p_shardings)
        return create_train_state(
            params,
            self.optimizer,
            self.shardings,
            with_ref=self.shardings.ref_params is not None,
            ref_dtype=_dtype(self.cfg.reference.dtype),
        )

    def load_base(self) -> Any:
        """LoRA: the frozen base weights (random init, HF dir or a run's checkpoint), sharded."""
        if self.source.load_params is None:
            return split_adapters(init_params(self.source.make_model, self.p_shardings)[0])[1]
        abs_base, sh_base = split_adapters(self.abs_params)[1], split_adapters(self.p_shardings)[1]
        return self.source.load_params(abs_base, sh_base)

    def base_pointer(self, base: Any) -> dict:
        """What a LoRA checkpoint stores instead of the base: where it comes from and its checksums."""
        c = self.cfg.model
        return {
            "init": c.init,
            "path": paths.absolute(c.path) if c.path else "",
            "seed": self.cfg.seed,
            "param_dtype": c.param_dtype,
            "arrays": base_checksums(base),
        }

    def checkpoint_layout(self) -> tuple[TrainState, TrainState]:
        """(abstract state, shardings) of what a checkpoint holds: LoRA leaves the base out."""
        if self.lora is None:
            return self.abstract, self.shardings
        return self.abstract.replace(ref_params=None), self.shardings.replace(ref_params=None)

    def batch_shardings(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: batch_sharding(self.mesh, v.ndim) for k, v in example.items()}

    def compile(self, b_sh: dict[str, Any]) -> tuple[Callable, Callable]:
        """(train step, eval step), each jitted once with explicit shardings; the step donates the state."""
        rep = replicated(self.mesh)
        step_fn = jax.jit(
            self._on_mesh(make_train_step(self.loss_fn, self.optimizer, self.schedule)),
            in_shardings=(self.shardings, b_sh),
            out_shardings=(self.shardings, rep),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            self._on_mesh(_weighted(make_eval_step(self.loss_fn), self.cfg.stage)),
            in_shardings=(self.shardings, b_sh),
            out_shardings=rep,
        )
        return step_fn, eval_fn

    def _on_mesh(self, fn: Callable) -> Callable:
        return kernel_mesh_fn(fn, self.mesh)


def kernel_mesh_fn(fn: Callable, mesh: Any) -> Callable:
    """fn traced with the mesh the fused attention kernels are shard_mapped over (models/attention.py)."""
    def traced(*args):
        with kernel_mesh(mesh, BATCH_AXES, "tensor"):
            return fn(*args)

    return traced


def _weighted(eval_step: Callable, stage: str) -> Callable:
    """Eval metrics plus their weight (real pairs or labelled responses, or real tokens for SFT) for
    averaging over batches."""

    def fn(state, batch):
        m = eval_step(state, batch)
        if stage == "sft":
            w = m["tokens"]
        else:
            w = jnp.sum(batch["pair_mask"] if "pair_mask" in batch else batch["example_mask"])
        return dict(m, weight=w)

    return fn


def check_batch_split(cfg: RunConfig, mesh: Any) -> None:
    """Every array of a micro-batch is split over the data-parallel devices (mesh axes data × fsdp):
    its examples (and packed rows) must divide evenly, or the first step fails deep inside JAX."""
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    micro = cfg.train.batch_size // cfg.train.micro_batches
    if micro % shards:
        raise ValueError(
            f"config key 'train.batch_size': {micro} examples per micro-batch (batch_size "
            f"{cfg.train.batch_size} / micro_batches {cfg.train.micro_batches}) do not split over the "
            f"{shards} data-parallel devices (mesh data x fsdp); use a multiple of {shards}"
        )
    if cfg.data.layout == "packed" and cfg.data.num_rows and cfg.data.num_rows % shards:
        raise ValueError(
            f"config key 'data.num_rows': {cfg.data.num_rows} packed rows do not split over the {shards} "
            "data-parallel devices (mesh data x fsdp)"
        )


def attach_caches(cfg: RunConfig, dataset: inputs.Dataset) -> dict[str, token_cache.TokenCache]:
    """Opens the run's token caches, refuses one made for another tokenizer or other data (one line),
    and puts each pair's cached values in its meta (read batch by batch): "reference" (reference.mode
    precomputed; a JSON-lines file of an earlier dpoq still loads, without a fingerprint) and
    "token_values" (loss.token_weights)."""
    sides = inputs.response_sides(cfg)
    caches: dict[str, token_cache.TokenCache] = {}
    expected: dict[str, str] = {}

    def attach(key: str, path: str, kinds: tuple[str, ...]) -> token_cache.TokenCache:
        expected.update(expected or inputs.run_fingerprint(cfg, dataset.tokenizer))
        cache = token_cache.TokenCache(path)
        fields = token_cache.value_fields(kinds[0], sides)
        what = f"config key {key!r}: token cache"
        cache.check(expected, kinds, fields, what)
        dataset.train = inputs.attach_cache(dataset.train, cache, fields, what)
        dataset.eval = inputs.attach_cache(dataset.eval, cache, fields, what)
        return cache

    if cfg.reference.mode == "precomputed":
        path = cfg.reference.logps_path
        if not path:
            raise ValueError("config key 'reference.logps_path' is required for reference.mode='precomputed'")
        if token_cache.is_cache(path):
            caches["reference"] = attach("reference.logps_path", path, ("reference_logps",))
        else:
            dataset.train = inputs.attach_reference(dataset.train, path)
            dataset.eval = inputs.attach_reference(dataset.eval, path)
    if cfg.loss.token_weights:
        selective = "selective" in losses.parse_types(cfg.loss.loss_type)
        kinds = ("token_rewards",) if selective else ("token_rewards", "token_weights")
        caches["token_values"] = attach("loss.token_weights", cfg.loss.token_weights, kinds)
    return caches


def setup(
    cfg: ConfigLike, devices: Any = None, *, source: ModelSource | None = None, with_data: bool = True
) -> Run:
    """Mesh, data, model source, shardings and loss of a config (`devices`: default all; `cfg`: anything
    config.typed takes).

    with_data=False skips reading data (Run.dataset is None) and `source` replaces the config's model
    source: `dpoq compile` builds the step this way from shapes alone, for devices it does not have."""
    cfg = typed(cfg)  # a ConfigDict (data shape resolved on a copy), a config.json dict, or a RunConfig
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_split(cfg, mesh)
    rules = rules_from_config(cfg.sharding.rules)
    dataset = inputs.load_dataset(cfg) if with_data else None
    dpo = cfg.stage == "dpo"
    caches = attach_caches(cfg, dataset) if dpo and with_data else {}
    source = source or model_source(cfg)
    if with_data:
        check_vocab(dataset, source.model_config.vocab_size, cfg)
    graphdef, abs_params, rest = abstract_split(source.make_model)
    if jax.tree.leaves(rest):  # non-parameter variables: small, built once, replicated, closed over
        rest = jax.jit(lambda: split_params(source.make_model())[2], out_shardings=replicated(mesh))()
    p_sh = param_shardings(abs_params, mesh, rules)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
    tv = caches.get("token_values")
    values = "weights" if tv is not None and tv.kind == "token_weights" else "rewards"
    loss_cfg = loss_config(cfg, values) if dpo else None
    # a reference-free objective (SimPO, ORPO) holds no reference parameters and runs no reference forward
    with_ref = dpo and cfg.reference.mode == "frozen" and loss_cfg.needs_reference
    lora = lora_config(cfg)
    if lora is not None:  # train the adapters; the base rides in ref_params (frozen, the reference)
        (abs_train, abs_base), (sh_train, sh_base) = split_adapters(abs_params), split_adapters(p_sh)
    else:
        abs_train, abs_base, sh_train, sh_base = abs_params, None, p_sh, None
    shardings = state_shardings(abs_train, sh_train, optimizer, mesh, with_ref, sh_base)
    abstract = abstract_state(abs_train, optimizer, with_ref, _dtype(cfg.reference.dtype), abs_base)
    fwd = forward_for(cfg, cfg.train.batch_size // cfg.train.micro_batches)
    if dpo:
        make_loss = make_outcome_loss if loss_cfg.unpaired else make_dpo_loss
        loss_fn = make_loss(graphdef, rest, loss_cfg, fwd)
    else:
        loss_fn = make_sft_loss(graphdef, rest, fwd)
    return Run(cfg, mesh, dataset, source, graphdef, rest, abs_params, p_sh, optimizer, schedule, shardings,
               abstract, loss_fn, fwd, lora, caches)




def initial_policy(workdir: str) -> nnx.Module:
    """The policy a finished `dpoq train` run started from (for a DPO run: its frozen reference),
    rebuilt from the run's config.json: the model at model.path, or the random init of model.config."""
    raw = load.run_config(workdir)
    if raw is None:
        raise ValueError(f"{workdir}: not a `dpoq train` run (no config.json beside its checkpoints)")
    cfg = typed(raw)
    if cfg.model.init == "random":
        return model_source(cfg).make_model()
    return load.load_model(cfg.model.path, flag=f"{workdir}/config.json model.path")
