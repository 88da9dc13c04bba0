"""The training run: config -> mesh, data, sharded state -> jitted steps, eval, checkpoints, metrics.

`train(config, workdir)` resumes from the newest complete checkpoint in WORKDIR/checkpoints if there
is one (same config assumed), so rerunning the same command after a crash continues the run and
ends with exactly the parameters and metrics of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax import losses, paths
from dpoq_jax.data.loader import Loader, LoaderState
from dpoq_jax.train import inputs
from dpoq_jax.train.checkpoint import RunCheckpoints
from dpoq_jax.train.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated, rules_from_config
from dpoq_jax.train.metrics import MetricsWriter, mfu, read_metrics, step_flops
from dpoq_jax.train.optim import make_optimizer
from dpoq_jax.train.state import (
    TrainState,
    abstract_model,
    abstract_state,
    create_train_state,
    init_params,
    param_shardings,
    split_model,
    state_shardings,
)
from dpoq_jax.train.step import make_dpo_loss, make_eval_step, make_sft_loss, make_train_step

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
TIMING_KEYS = ("pairs_per_s", "tokens_per_s", "mfu", "step_time_s")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class ModelSource:
    make_model: Callable[[], nnx.Module]  # builds the (random-init) module; used abstractly for shapes
    model_config: Any
    load_params: Callable[[Any, Any], Any] | None  # (abstract params, shardings) -> sharded params


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def lora_config(cfg: Any) -> Any:
    """The run's LoraConfig (models/lora.py), or None when model.lora.rank is 0 (full fine-tuning)."""
    from dpoq_jax.models.lora import LoraConfig

    lc = cfg.model.get("lora")
    if lc is None or lc.rank == 0:
        return None
    return LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=tuple(lc.targets), seed=cfg.seed)


def model_source(cfg: Any, mesh: Any, rules: Any) -> ModelSource:
    """How to build the policy: random init from model.config, a Hugging Face dir, or a run's workdir.
    With LoRA, make_model builds base + adapters; load_params loads the base weights only."""
    from dpoq_jax.models.config import ModelConfig
    from dpoq_jax.models.decoder import Decoder

    kw = dict(param_dtype=_dtype(cfg.model.param_dtype), dtype=_dtype(cfg.model.dtype))
    kw["attention"] = cfg.model.attention
    lora = lora_config(cfg)
    over = {"remat": cfg.model.remat} if cfg.model.remat else {}  # rematerialisation policy of the blocks
    if cfg.model.init == "random":
        mcfg = ModelConfig.from_dict({**cfg.model.config.to_dict(), **over})
        return ModelSource(lambda: Decoder(mcfg, rngs=nnx.Rngs(cfg.seed), lora=lora, **kw), mcfg, None)
    if cfg.model.init == "hf":
        from dpoq_jax.models import hf

        def load_hf_params(abstract, shardings):
            del abstract, shardings  # load_hf places each tensor in its sharding from the same rules
            model, _ = hf.load_hf(cfg.model.path, mesh=mesh, rules=rules, **kw, **over)
            return split_model(model)[1]

        mcfg = hf.config_from_hf(hf.read_hf_config(paths.join(cfg.model.path, "config.json")), **over)
        return ModelSource(lambda: Decoder(mcfg, rngs=nnx.Rngs(0), lora=lora, **kw), mcfg, load_hf_params)
    # a previous run's workdir (e.g. the SFT stage): its newest checkpoint's params and model config
    ckpts = RunCheckpoints(paths.join(cfg.model.path, CHECKPOINT_SUBDIR), every_steps=1, keep=1)
    step = ckpts.latest_intact_params_step()
    if step is None:
        raise ValueError(f"config key 'model.path': no intact checkpoint in {cfg.model.path!r}")
    mcfg = ModelConfig.from_dict({**ckpts.read_json(step, "model_config"), **over})

    def load_ckpt_params(abstract, shardings):
        return ckpts.restore_params(step, abstract, shardings, dtype=_dtype(cfg.model.param_dtype))

    return ModelSource(lambda: Decoder(mcfg, rngs=nnx.Rngs(0), lora=lora, **kw), mcfg, load_ckpt_params)


def check_vocab(dataset: inputs.Dataset, vocab_size: int, cfg: Any) -> None:
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


def _attn_width(mcfg: Any) -> int:
    return int(mcfg.num_heads * mcfg.head_dim)


def causal_rows(layout: str) -> bool:
    """The "padded" layout holds one right-padded sequence per row: plain causal attention is exact
    there (and lets the model take the cuDNN kernel on GPU)."""
    return layout == "padded"


def one_segment_rows(layout: str) -> bool:
    """"prefix_shared" rows hold one right-padded pair (or SFT sequence) each: on GPU the fused layout
    attention can then take cuDNN's causal kernel (models/attention.py)."""
    return layout == "prefix_shared"


def logps_chunk_positions(cfg: Any, rows: int) -> int:
    """train.logps_chunk counts time steps per chunk; the lean log-probs count positions (responses x
    steps), so scale by the responses per forward (pairs or sequences of one micro-batch, global)."""
    return max(1, cfg.train.logps_chunk) * max(1, rows)


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

    cfg: Any
    mesh: Any
    dataset: inputs.Dataset | None
    source: ModelSource
    graphdef: Any
    rest: Any
    abs_params: Any
    p_shardings: Any
    optimizer: Any
    schedule: Any
    shardings: TrainState
    abstract: TrainState
    loss_fn: Any
    lora: Any = None  # LoraConfig: TrainState.params are adapters, ref_params the frozen base

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
        from dpoq_jax.models.lora import split_adapters

        if self.source.load_params is None:
            return split_adapters(init_params(self.source.make_model, self.p_shardings)[0])[1]
        abs_base, sh_base = split_adapters(self.abs_params)[1], split_adapters(self.p_shardings)[1]
        return self.source.load_params(abs_base, sh_base)

    def base_pointer(self, base: Any) -> dict:
        """What a LoRA checkpoint stores instead of the base: where it comes from and its checksums."""
        from dpoq_jax.train.checkpoint import array_checks

        c = self.cfg.model
        return {
            "init": c.init,
            "path": paths.absolute(c.path) if c.path else "",
            "seed": self.cfg.seed,
            "param_dtype": c.param_dtype,
            "arrays": {k: [d, *sums] for k, (d, sums, _) in array_checks(nnx.to_pure_dict(base)).items()},
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
    from dpoq_jax.models.attention import kernel_mesh

    def traced(*args):
        with kernel_mesh(mesh, BATCH_AXES, "tensor"):
            return fn(*args)

    return traced


def setup(cfg: Any, devices: Any = None, *, source: ModelSource | None = None, with_data: bool = True) -> Run:
    """Mesh, data, model source, shardings and loss of a config (`devices`: default all).

    with_data=False skips reading data (Run.dataset is None) and `source` replaces the config's model
    source: `dpoq compile` builds the step this way from shapes alone, for devices it does not have."""
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_from_config(cfg.sharding.rules)
    dataset = inputs.load_dataset(cfg) if with_data else None
    dpo = cfg.stage == "dpo"
    if dpo and cfg.reference.mode == "precomputed" and with_data:
        if not cfg.reference.logps_path:
            raise ValueError(
                "config key 'reference.logps_path' is required when reference.mode='precomputed'"
            )
        dataset.train = inputs.attach_reference(dataset.train, cfg.reference.logps_path)
        dataset.eval = inputs.attach_reference(dataset.eval, cfg.reference.logps_path)
    source = source or model_source(cfg, mesh, rules)
    if with_data:
        check_vocab(dataset, source.model_config.vocab_size, cfg)
    graphdef, abs_params, rest = abstract_model(source.make_model)
    if jax.tree.leaves(rest):  # non-parameter variables: small, built once, replicated, closed over
        rest = jax.jit(lambda: split_model(source.make_model())[2], out_shardings=replicated(mesh))()
    p_sh = param_shardings(abs_params, mesh, rules)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
    loss_cfg = losses.LossConfig(**cfg.loss.to_dict()) if dpo else None
    # a reference-free objective (SimPO, ORPO) holds no reference parameters and runs no reference forward
    with_ref = dpo and cfg.reference.mode == "frozen" and loss_cfg.needs_reference
    lora = lora_config(cfg)
    if lora is not None:  # train the adapters; the base rides in ref_params (frozen, the reference)
        from dpoq_jax.models.lora import split_adapters

        (abs_train, abs_base), (sh_train, sh_base) = split_adapters(abs_params), split_adapters(p_sh)
    else:
        abs_train, abs_base, sh_train, sh_base = abs_params, None, p_sh, None
    shardings = state_shardings(abs_train, sh_train, optimizer, mesh, with_ref, sh_base)
    abstract = abstract_state(abs_train, optimizer, with_ref, _dtype(cfg.reference.dtype), abs_base)
    chunk = logps_chunk_positions(cfg, cfg.train.batch_size // cfg.train.micro_batches)
    causal, one = causal_rows(cfg.data.layout), one_segment_rows(cfg.data.layout)
    if dpo:
        loss_fn = make_dpo_loss(
            graphdef, rest, loss_cfg, chunk, causal, one, lora=lora is not None
        )
    else:
        loss_fn = make_sft_loss(graphdef, rest, chunk, causal, one, lora=lora is not None)
    return Run(
        cfg,
        mesh,
        dataset,
        source,
        graphdef,
        rest,
        abs_params,
        p_sh,
        optimizer,
        schedule,
        shardings,
        abstract,
        loss_fn,
        lora,
    )


def _count_params(abs_params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abs_params)))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(run: Run, state: TrainState, eval_fn: Callable, make_batch: Callable, shardings: dict) -> dict:
    """Metrics over the held-out split (weighted by real pairs, or real tokens for SFT)."""
    cfg = run.cfg
    items = run.dataset.eval
    loader = Loader(
        len(items),
        cfg.train.batch_size,
        shuffle=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    n_batches = loader.steps_per_epoch
    if cfg.train.eval_batches:
        n_batches = min(n_batches, cfg.train.eval_batches)
    sums: dict[str, float] = {}
    total_w = 0.0
    for _ in range(n_batches):
        idx = loader.next_indices()
        local = inputs.stack_micro(
            [items[i] if i >= 0 else None for i in idx], make_batch, cfg.train.micro_batches
        )
        m = _scalars(eval_fn(state, global_batch(local, shardings)))
        w = m.pop("weight")
        total_w += w
        for k, v in m.items():
            if k.endswith("_min"):
                sums[k] = min(sums.get(k, np.inf), v)
            elif k == "tokens":
                sums[k] = sums.get(k, 0.0) + v
            else:
                sums[k] = sums.get(k, 0.0) + v * w
    keep = lambda k: k.endswith("_min") or k == "tokens"  # noqa: E731
    return {k: (v if keep(k) else v / max(total_w, 1e-12)) for k, v in sums.items()}


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, float]  # the last step's metrics and the final eval's (prefixed "eval/")
    state: TrainState  # the final train state (sharded)


def train(cfg: Any, workdir: str, *, batch_hook: Callable[[int, dict], dict] | None = None) -> TrainResult:
    """Run (or resume) training to cfg.train.num_steps.

    batch_hook(step, local_batch) -> local_batch lets tests alter a batch (e.g. inject a NaN)."""
    paths.makedirs(workdir)
    is_main = jax.process_index() == 0
    run = setup(cfg)
    tc = cfg.train
    ckpts = RunCheckpoints(
        paths.join(workdir, CHECKPOINT_SUBDIR),
        every_steps=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    writer = MetricsWriter(workdir, enabled=is_main)
    # the newest checkpoint that passes every check (damaged newer ones: a warning each, set aside)
    restored = ckpts.restore_latest_intact(*run.checkpoint_layout())
    base_pointer = None
    if restored is not None:
        latest, state, loader_dict = restored
        if run.lora is not None:  # adapters-only checkpoint: reload the base it points at, check it
            base = run.load_base()
            base_pointer = ckpts.read_json(latest, "base")
            check_base(base_pointer, run.base_pointer(base), ckpts.step_dir(latest))
            state = state.replace(ref_params=base)
        loader_state = LoaderState.from_dict(loader_dict)
        writer.truncate_after(latest)
        log.info("resuming from %s at step %d", ckpts.directory, latest)
    else:
        state, loader_state = run.new_state(), LoaderState()
        if run.lora is not None:
            base_pointer = run.base_pointer(state.ref_params)
        writer.truncate_after(0)  # lines of an earlier attempt that died before its first checkpoint
        if is_main:
            paths.write_text(paths.join(workdir, "config.json"), cfg.to_json(indent=2))
    start = int(jax.device_get(state.step))

    micro_size = tc.batch_size // tc.micro_batches // jax.process_count()
    make_batch = inputs.micro_batch_fn(cfg, micro_size)
    loader = Loader(
        len(run.dataset.train),
        tc.batch_size,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=loader_state,
    )
    items = run.dataset.train
    example = inputs.stack_micro(
        [items[0]] * (tc.batch_size // jax.process_count()), make_batch, tc.micro_batches
    )
    b_sh = run.batch_shardings(example)
    step_fn, eval_fn = run.compile(b_sh)

    n_params = _count_params(run.abs_params)
    mcfg = run.source.model_config
    row_tokens = int(np.prod(example["tokens"].shape)) * jax.process_count()
    flops = step_flops(
        n_params,
        row_tokens,
        num_layers=mcfg.num_layers,
        attn_width=_attn_width(mcfg),
        row_len=cfg.data.seq_len,
        tokens_ref=row_tokens if cfg.stage == "dpo" and run.shardings.ref_params is not None else 0,
    )
    device_kind = jax.devices()[0].device_kind
    config_json = json.loads(cfg.to_json())
    model_json = mcfg.to_dict()

    bar = None
    if is_main and tc.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.num_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    last: dict[str, float] = {}
    try:
        for step in range(start, tc.num_steps):
            t0 = time.perf_counter()
            idx = loader.next_indices()
            local = inputs.stack_micro(
                [items[i] if i >= 0 else None for i in idx], make_batch, tc.micro_batches
            )
            if batch_hook is not None:
                local = batch_hook(step, local)
            state, metrics = step_fn(state, global_batch(local, b_sh))
            m = _scalars(metrics)
            dt = time.perf_counter() - t0
            done = step + 1
            # throughput of real (non-padding) tokens and pairs: this process's, times the process count
            real_tokens = float(np.count_nonzero(local["segment_ids"])) * jax.process_count()
            m.update(
                step_time_s=dt,
                tokens_per_s=real_tokens / dt,
                mfu=mfu(flops, dt, jax.device_count(), device_kind),
            )
            if cfg.stage == "dpo":
                m["pairs_per_s"] = float(np.sum(local["pair_mask"])) * jax.process_count() / dt
            last = m
            if not m["finite"]:
                log.warning(
                    "step %d: non-finite loss, gradient or update; update skipped (%d in a row)",
                    done,
                    int(m["nonfinite_streak"]),
                )
                if m["nonfinite_streak"] >= tc.max_consecutive_nonfinite:
                    writer.write(done, m)
                    raise NonFiniteError(
                        f"stopping at step {done}: {int(m['nonfinite_streak'])} non-finite steps in a row "
                        f"(train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite}); their updates "
                        f"were skipped; last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}"
                    )
            if done % tc.log_every == 0 or done == tc.num_steps:
                writer.write(done, m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", **_bar_extras(m))
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.num_steps and run.dataset.eval:
                writer.write(done, evaluate(run, state, eval_fn, make_batch, b_sh), split="eval")
            if done % cfg.checkpoint.every_steps == 0 or done == tc.num_steps:
                ckpts.save(
                    done,
                    state,
                    loader=loader.state.to_dict(),
                    config=config_json,
                    model_config=model_json,
                    force=True,
                    base=base_pointer,
                )
        ckpts.wait()
        if run.dataset.eval:
            ev = evaluate(run, state, eval_fn, make_batch, b_sh)
            if start < tc.num_steps or not _has_final_eval(workdir, tc.num_steps):
                writer.write(tc.num_steps, ev, split="eval")
            last.update({f"eval/{k}": v for k, v in ev.items()})
        if cfg.model.hf_export:
            export_hf(run, state, paths.join(workdir, "hf"))
    finally:
        if bar is not None:
            bar.close()
        ckpts.close()
        writer.close()
    return TrainResult(last, state)


def check_base(saved: dict, now: dict, where: str) -> None:
    """The base weights loaded for a LoRA resume must be those the checkpoint's adapters were trained on."""
    changed = sorted(k for k in set(saved["arrays"]) | set(now["arrays"])
                     if saved["arrays"].get(k) != now["arrays"].get(k))
    if changed:
        raise ValueError(
            f"{where}: the base model ({saved['init']} {saved['path'] or 'seed ' + str(saved['seed'])}) "
            f"differs from the one these LoRA adapters were trained on ({len(changed)} arrays, e.g. "
            f"{changed[0]}); restore that base or start a new workdir"
        )


def _has_final_eval(workdir: str, step: int) -> bool:
    if not paths.exists(paths.join(workdir, "metrics.jsonl")):
        return False
    return any(r["step"] == step for r in read_metrics(workdir, "eval"))


def _bar_extras(m: dict[str, float]) -> dict[str, str]:
    out = {}
    if "rewards/accuracies" in m:
        out["acc"] = f"{m['rewards/accuracies']:.3f}"
        out["margin"] = f"{m['rewards/margins']:.3f}"
    if m.get("skipped"):
        out["skipped"] = str(int(m["skipped"]))
    return out


def _weighted(eval_step: Callable, stage: str) -> Callable:
    """Eval metrics plus their weight (real pairs, or real tokens for SFT) for averaging over batches."""

    def fn(state, batch):
        m = eval_step(state, batch)
        w = jnp.sum(batch["pair_mask"]) if stage == "dpo" else m["tokens"]
        return dict(m, weight=w)

    return fn


def export_hf(run: Run, state: TrainState, path: str) -> None:
    """Writes the policy as a Hugging Face directory (config.json + safetensors, plus the tokenizer
    when it is a Hugging Face one) from process 0."""
    from jax.experimental import multihost_utils

    from dpoq_jax.models import hf

    params, adapters = state.params, None
    if run.lora is not None:  # LoRA: the base with W + (alpha/r) A B merged in, a full checkpoint
        from dpoq_jax.models import lora

        adapters = params
        params = jax.jit(lambda b, a: lora.merged_params(b, a, run.lora.scale))(state.ref_params, adapters)
    if jax.process_count() > 1:  # save_hf reads whole arrays: gather them first
        params = multihost_utils.process_allgather(params, tiled=True)
        adapters = multihost_utils.process_allgather(adapters, tiled=True) if adapters is not None else None
    if jax.process_index() != 0:
        return
    tok = run.dataset.tokenizer
    mcfg = run.source.model_config
    hf.save_hf(params, mcfg, path, tokenizer=tok if hasattr(tok, "save_pretrained") else None)
    if adapters is not None and mcfg.family in lora.PEFT_FAMILIES:  # and the adapters alone, for peft
        base = paths.absolute(run.cfg.model.path) if run.cfg.model.init == "hf" else None
        lora.save_peft(adapters, mcfg, run.lora, path + "_adapter", base_model=base)
