"""The training loop: a Run (train/setup.py) -> jitted steps, eval, checkpoints, metrics, HF export.

`train(config, workdir)` resumes from the newest complete checkpoint in WORKDIR/checkpoints if there
is one (same config assumed), so rerunning the same command after a crash continues the run and
ends with exactly the parameters and metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from dpoq_jax import paths
from dpoq_jax.data.loader import Loader, LoaderState
from dpoq_jax.models import lora
from dpoq_jax.models.hf import save_hf, save_peft
from dpoq_jax.models.model_config import ModelConfig
from dpoq_jax.train import faults, inputs
from dpoq_jax.train.checkpoint import RunCheckpoints, check_base
from dpoq_jax.train.config import ConfigLike, typed
from dpoq_jax.train.load import CHECKPOINT_SUBDIR
from dpoq_jax.train.metrics import MetricsWriter, mfu, read_metrics, step_flops
from dpoq_jax.train.precompute import check_reference_model
from dpoq_jax.train.schema import RunConfig
from dpoq_jax.train.setup import Run, global_batch, setup
from dpoq_jax.train.state import TrainState

log = logging.getLogger(__name__)

TIMING_KEYS = ("pairs_per_s", "tokens_per_s", "mfu", "step_time_s")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


def _attn_width(mcfg: ModelConfig) -> int:
    return int(mcfg.num_heads * mcfg.head_dim)


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


def train(
    cfg: ConfigLike, workdir: str, *, batch_hook: Callable[[int, dict], dict] | None = None
) -> TrainResult:
    """Run (or resume) training to cfg.train.num_steps (`cfg`: anything config.typed takes).

    batch_hook(step, local_batch) -> local_batch lets tests alter a batch (e.g. inject a NaN)."""
    paths.makedirs(workdir)
    is_main = jax.process_index() == 0
    cfg = typed(cfg)
    run = setup(cfg)
    ckpts = RunCheckpoints(
        paths.join(workdir, CHECKPOINT_SUBDIR),
        every_steps=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
        cleanup_tmp=True,  # a save cut short (kill -9, a full disk) left its temporary directory
    )
    writer = MetricsWriter(workdir, enabled=is_main)
    state, loader_state, base_pointer = _restore(cfg, workdir, run, ckpts, writer)
    start = int(jax.device_get(state.step))
    loop = _compile(cfg, run, ckpts, writer, loader_state, base_pointer)
    with contextlib.ExitStack() as stack:
        # undone last to first: the progress bar closed, then the checkpoints and the metrics writer
        # (with the failed-write filter on until they are closed, or for good after a failed write)
        stack.enter_context(_closing(ckpts, writer))
        bar = _progress_bar(cfg, start) if is_main and cfg.train.progress_bar else None
        if bar is not None:
            stack.callback(bar.close)
        with faults.StopSignals() as stop:  # until the last checkpoint is committed
            state, last = _steps(loop, state, start, stop, bar, batch_hook)
        # the final eval and export: signals act as usual again (the checkpoint is in)
        last = _finish(loop, state, start, workdir, last)
    return TrainResult(last, state)


# ---- restore, steps, finish ----------------------------------------------------------------------


def _restore(
    cfg: RunConfig, workdir: str, run: Run, ckpts: RunCheckpoints, writer: MetricsWriter
) -> tuple[TrainState, LoaderState, dict | None]:
    """(state, loader state, LoRA base pointer or None) from the newest checkpoint that passes every
    check (damaged newer ones: a warning each, set aside), or new ones; the metrics file is cut back
    to the step the run goes on from."""
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
        return state, loader_state, base_pointer
    state = run.new_state()
    if "reference" in run.caches:  # the precomputed reference must be this run's initial model
        check_reference_model(run.caches["reference"], state.params)
    if run.lora is not None:
        base_pointer = run.base_pointer(state.ref_params)
    writer.truncate_after(0)  # lines of an earlier attempt that died before its first checkpoint
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
    return state, LoaderState(), base_pointer


@dataclasses.dataclass
class _Loop:
    """What the steps need besides the train state: the run's jitted steps for its batches, its loader,
    checkpoints and metrics writer."""

    cfg: RunConfig
    run: Run
    ckpts: RunCheckpoints
    writer: MetricsWriter
    loader: Loader
    make_batch: Callable
    batch_shardings: dict
    step_fn: Callable
    eval_fn: Callable
    flops: float  # of one step, for the MFU
    device_kind: str
    saved_with: dict  # config, model config and LoRA base pointer, saved with every checkpoint

    def evaluate(self, state: TrainState) -> dict:
        return evaluate(self.run, state, self.eval_fn, self.make_batch, self.batch_shardings)

    def save(self, done: int, state: TrainState) -> None:
        with _writes(self.ckpts, "checkpoint", f"of step {done} (or an earlier asynchronous one)"):
            self.ckpts.save(done, state, loader=self.loader.state.to_dict(), force=True, **self.saved_with)


def _compile(
    cfg: RunConfig,
    run: Run,
    ckpts: RunCheckpoints,
    writer: MetricsWriter,
    loader_state: LoaderState,
    base_pointer: dict | None,
) -> _Loop:
    """The loader (from `loader_state`), the batch shardings and the jitted steps (shaped by the first
    training example), and a step's FLOPs."""
    tc = cfg.train
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
    example = inputs.stack_micro(
        [run.dataset.train[0]] * (tc.batch_size // jax.process_count()), make_batch, tc.micro_batches
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
        row_len=example["tokens"].shape[-1],  # data.buckets: the first example's bucket
        tokens_ref=row_tokens if cfg.stage == "dpo" and run.shardings.ref_params is not None else 0,
    )
    return _Loop(
        cfg=cfg,
        run=run,
        ckpts=ckpts,
        writer=writer,
        loader=loader,
        make_batch=make_batch,
        batch_shardings=b_sh,
        step_fn=step_fn,
        eval_fn=eval_fn,
        flops=flops,
        device_kind=jax.devices()[0].device_kind,
        saved_with=dict(
            config=json.loads(json.dumps(cfg.to_dict())), model_config=mcfg.to_dict(), base=base_pointer
        ),
    )


def _progress_bar(cfg: RunConfig, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=cfg.train.num_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)


def _steps(
    loop: _Loop,
    state: TrainState,
    start: int,
    stop: faults.StopSignals,
    bar: Any,
    batch_hook: Callable[[int, dict], dict] | None,
) -> tuple[TrainState, dict[str, float]]:
    """Steps `start` to num_steps, each followed by its metrics row, eval and checkpoint when due,
    then the last checkpoint committed; (final state, last step's metrics). A stop requested on any
    process ends the run after the current step (faults.Preempted)."""
    cfg, tc, writer = loop.cfg, loop.cfg.train, loop.writer
    last: dict[str, float] = {}
    for step in range(start, tc.num_steps):
        state, m = _step(loop, state, step, batch_hook)
        done = step + 1
        last = m
        _check_finite(loop, done, m)
        if done % tc.log_every == 0 or done == tc.num_steps:
            with _writes(loop.ckpts, "metrics row of step", f"{done} to {writer.path}"):
                writer.write(done, m)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", **_bar_extras(m))
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.num_steps and loop.run.dataset.eval:
            ev = loop.evaluate(state)
            with _writes(loop.ckpts, "eval row of step", f"{done} to {writer.path}"):
                writer.write(done, ev, split="eval")
        saved = done % cfg.checkpoint.every_steps == 0 or done == tc.num_steps
        if saved:
            loop.save(done, state)
        if faults.agree_stop(stop.requested):  # the same step on every process
            _stop_after(loop, state, done, saved, stop.signame or "a signal on another process")
    with _writes(loop.ckpts, "checkpoint", f"of step {tc.num_steps}"):
        loop.ckpts.wait()
    return state, last


def _step(
    loop: _Loop, state: TrainState, step: int, batch_hook: Callable[[int, dict], dict] | None
) -> tuple[TrainState, dict[str, float]]:
    """One jitted step on the loader's next batch: (new state, the step's scalars and throughput)."""
    tc = loop.cfg.train
    items = loop.run.dataset.train
    t0 = time.perf_counter()
    idx = loop.loader.next_indices()
    local = inputs.stack_micro([items[i] if i >= 0 else None for i in idx], loop.make_batch, tc.micro_batches)
    if batch_hook is not None:
        local = batch_hook(step, local)
    state, metrics = loop.step_fn(state, global_batch(local, loop.batch_shardings))
    m = _scalars(metrics)
    dt = time.perf_counter() - t0
    # throughput of real (non-padding) tokens and pairs: this process's, times the process count
    real_tokens = float(np.count_nonzero(local["segment_ids"])) * jax.process_count()
    m.update(
        step_time_s=dt,
        tokens_per_s=real_tokens / dt,
        mfu=mfu(loop.flops, dt, jax.device_count(), loop.device_kind),
    )
    if "pair_mask" in local:
        m["pairs_per_s"] = float(np.sum(local["pair_mask"])) * jax.process_count() / dt
    return state, m


def _check_finite(loop: _Loop, done: int, m: dict[str, float]) -> None:
    """A non-finite step (its update skipped) -> a warning; too many in a row -> their metrics row,
    then NonFiniteError."""
    if m["finite"]:
        return
    tc = loop.cfg.train
    log.warning(
        "step %d: non-finite loss, gradient or update; update skipped (%d in a row)",
        done,
        int(m["nonfinite_streak"]),
    )
    if m["nonfinite_streak"] >= tc.max_consecutive_nonfinite:
        loop.writer.write(done, m)
        raise NonFiniteError(
            f"stopping at step {done}: {int(m['nonfinite_streak'])} non-finite steps in a row "
            f"(train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite}); their updates "
            f"were skipped; last good checkpoint: step {loop.ckpts.latest_step()} in {loop.ckpts.directory}"
        )


def _finish(loop: _Loop, state: TrainState, start: int, workdir: str, last: dict[str, float]) -> dict:
    """The final eval (its row written unless an already finished run has it) and the Hugging Face
    export; returns `last` with the eval's metrics added, prefixed "eval/"."""
    tc = loop.cfg.train
    if loop.run.dataset.eval:
        ev = loop.evaluate(state)
        if start < tc.num_steps or not _has_final_eval(workdir, tc.num_steps):
            with _writes(loop.ckpts, "final eval row to", loop.writer.path):
                loop.writer.write(tc.num_steps, ev, split="eval")
        last.update({f"eval/{k}": v for k, v in ev.items()})
    if loop.cfg.model.hf_export:
        export_hf(loop.run, state, paths.join(workdir, "hf"))
    return last


# ---- stopping on a signal, failed writes (train/faults.py) ---------------------------------------


def _stop_after(loop: _Loop, state: TrainState, done: int, saved: bool, signame: str) -> None:
    """Every process agreed to stop after step `done`: its checkpoint (unless this step just saved
    one), committed, then Preempted (`dpoq train` exits with faults.EXIT_PREEMPTED)."""
    if not saved:
        loop.save(done, state)
    with _writes(loop.ckpts, "checkpoint", f"of step {done}"):
        loop.ckpts.wait()
    log.info("stopped by %s after step %d (checkpoint committed)", signame, done)
    raise faults.Preempted(done, signame, loop.ckpts.directory)


@contextlib.contextmanager
def _writes(ckpts: RunCheckpoints, what: str, where: str) -> Iterator[None]:
    """A failed write (disk full, file too large, read-only) -> faults.WriteFailed in one line that
    names the newest committed checkpoint (the one a rerun resumes from)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of its writer threads
        if isinstance(e, faults.WriteFailed) or not faults.is_write_error(e):
            raise
        intact = ckpts.committed_steps()
        resume = f"step {intact[-1]} in {ckpts.directory}" if intact else "none (a rerun starts over)"
        why = faults.write_error_text(e) or faults.short(e, 160)
        raise faults.WriteFailed(
            f"writing the {what} {where} failed ({why}); last intact checkpoint: {resume}; "
            f"free space or fix permissions, then rerun the same command to resume"
        ) from None


@contextlib.contextmanager
def _closing(ckpts: RunCheckpoints, writer: MetricsWriter) -> Iterator[None]:
    """Closes the checkpoints and the metrics writer on the way out; until then the checkpoint
    library's logs of a failed write are dropped (faults.DropWriteErrors): the run reports it in one
    line (faults.WriteFailed)."""
    quiet = faults.DropWriteErrors()
    for name in ("absl", "asyncio"):  # the checkpoint library's threads log a failed write at length
        logging.getLogger(name).addFilter(quiet)
    write_failed = False
    try:
        yield
    except faults.WriteFailed:
        write_failed = True
        raise
    finally:
        try:
            _close_quietly(ckpts, writer)
        finally:
            # After a failed write the filter stays: an asynchronous save still in flight fails too, and
            # the library's writer threads log it after this returns. (asyncio's stays in any case: its
            # futures report at exit.)
            if not write_failed:
                logging.getLogger("absl").removeFilter(quiet)


def _close_quietly(ckpts: RunCheckpoints, writer: MetricsWriter) -> None:
    """Closes both even when a write failed (the error already raised is the one reported)."""
    for close in (ckpts.close, writer.close):
        try:
            close()
        except Exception as e:  # noqa: BLE001
            if not faults.is_write_error(e):
                raise
            log.debug("closing after a failed write: %s", faults.short(e))


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


def export_hf(run: Run, state: TrainState, path: str) -> None:
    """Writes the policy as a Hugging Face directory (config.json + safetensors, plus the tokenizer
    when it is a Hugging Face one) from process 0."""
    from jax.experimental import multihost_utils

    params, adapters = state.params, None
    if run.lora is not None:  # LoRA: the base with W + (alpha/r) A B merged in, a full checkpoint
        adapters = params
        params = jax.jit(lambda b, a: lora.merged_params(b, a, run.lora.scale))(state.ref_params, adapters)
    if jax.process_count() > 1:  # save_hf reads whole arrays: gather them first
        params = multihost_utils.process_allgather(params, tiled=True)
        adapters = multihost_utils.process_allgather(adapters, tiled=True) if adapters is not None else None
    if jax.process_index() != 0:
        return
    tok = run.dataset.tokenizer
    mcfg = run.source.model_config
    save_hf(params, mcfg, path, tokenizer=tok if hasattr(tok, "save_pretrained") else None)
    if adapters is not None and mcfg.family in lora.PEFT_FAMILIES:  # and the adapters alone, for peft
        base = paths.absolute(run.cfg.model.path) if run.cfg.model.init == "hf" else None
        save_peft(adapters, mcfg, run.lora, path + "_adapter", base_model=base)
