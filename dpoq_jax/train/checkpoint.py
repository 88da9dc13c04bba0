"""Orbax checkpoints of a training run: asynchronous saves every N steps, keep the last K, and every
restore verified.

Each step directory WORKDIR/checkpoints/<step>/ holds the items
  params        policy parameters as a plain nested dict (the format `dpoq convert` reads)
  train_state   the rest of the TrainState (optimizer state, frozen reference, counters)
  loader        the data position (LoaderState, JSON)
  config        the run config (JSON), model_config: the model's hyper-parameters (JSON)
  integrity     per array of params and train_state: dtype and two 32-bit checksums of its bytes,
                computed on device at save time; and a copy of the loader position (JSON)
  base          LoRA runs only: params holds the adapters and train_state no reference; this JSON
                points at the frozen base (model.init, path, seed) with the checksums of its arrays,
                which a resume compares with the base it loads again (check_base)
Orbax writes a step into a temporary directory and renames it when every item is complete, so a save
cut short (kill -9) leaves no step directory and `latest_step` never sees it; the integrity record
is an item of the same step, so it exists exactly when the step does.

Orbax itself restores whatever bytes it finds (a flipped byte in a data file comes back as a wrong
number without complaint), so `restore` recomputes the checksums of what it read and compares them,
checks that every floating array is finite, and that the loader position is well formed and equals
its copy. `restore_latest_intact` walks back from the newest step to the newest intact one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpoq_jax import paths
from dpoq_jax.train.state import TrainState

log = logging.getLogger(__name__)

INTEGRITY_VERSION = 1
DAMAGED_SUFFIX = ".damaged"  # WORKDIR/checkpoints.damaged/<step>: damaged steps set aside, not deleted


class DamagedCheckpoint(ValueError):
    """A checkpoint step that cannot be used; the message says what is wrong, in one line."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (so a restore lands sharded)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def params_to_pure(params: nnx.State) -> dict:
    return params.to_pure_dict()


def pure_to_params(pure: dict, template: nnx.State) -> nnx.State:
    """Nested dict of arrays -> nnx.State shaped like `template` (template left untouched)."""
    out = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(out, pure)
    return out


# ---- checksums ----------------------------------------------------------------------------------


def _bits_u32(x: jax.Array) -> jax.Array:
    """The bytes of `x` as uint32 words (8-bit and 16-bit elements widened, 64-bit ones split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


def _leaf_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the words, sum of word * (2 * position + 1)), both mod 2**32, and "all finite".
    Integer sums are exact in any order, so the result does not depend on sharding or device; a
    change confined to one element always changes the first sum, a moved element the second."""
    w = _bits_u32(x)
    pos, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for d in reversed(range(w.ndim)):  # linear position without reshaping (keeps the sharding)
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    sums = jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * pos + 1), dtype=jnp.uint32)])
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return sums, finite


def _mesh_of(tree: Any) -> Any:
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def _all_sums(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    return [_leaf_sums(x) for x in leaves]


@functools.lru_cache(maxsize=8)
def _checks_fn(mesh: Any) -> Any:
    """One jitted function per mesh (jit then caches one executable per tree of shapes, so a run
    compiles the checks of its state once, not at every save and restore)."""
    out_sh = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.jit(_all_sums, out_shardings=out_sh)


def array_checks(tree: Any) -> dict[str, tuple[str, list[int], bool]]:
    """{path: (dtype, [sum, weighted sum], finite)} of every array leaf, computed on device (one jit,
    replicated scalar outputs: fine on several processes)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not paths_leaves:
        return {}
    leaves = [leaf for _, leaf in paths_leaves]
    results = jax.device_get(_checks_fn(_mesh_of(leaves))(leaves))
    return {
        jax.tree_util.keystr(p): (str(leaf.dtype), [int(v) for v in np.asarray(s)], bool(f))
        for (p, leaf), (s, f) in zip(paths_leaves, results, strict=True)
    }


def integrity_record(pure_params: dict, rest: TrainState, loader: dict) -> dict:
    arrays = {}
    for item, tree in (("params", pure_params), ("train_state", rest)):
        for path, (dtype, sums, _) in array_checks(tree).items():
            arrays[f"{item}{path}"] = [dtype, *sums]
    return {"version": INTEGRITY_VERSION, "arrays": arrays, "loader": loader}


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silences a logger for a restore: on a damaged file tensorstore's futures log the whole
    multi-line spec through asyncio besides raising; the raised error is reported in one line."""
    logger = logging.getLogger(name)
    old, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = old


def _closed_loop_error(exc_type: type, exc: BaseException, tb: Any) -> bool:
    """RuntimeError("Event loop is closed") raised in asyncio's call_soon_threadsafe: a tensorstore
    future finishing after the checkpoint library closed the event loop of a failed read or write."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name in ("call_soon_threadsafe", "_check_closed")


class _QuietClosedLoops:
    """sys.unraisablehook that drops the "Event loop is closed" tracebacks that tensorstore's threads
    report (as unraisable exceptions, without a header line) after a failed restore or save: dozens
    of them, during and after the checkpoint library's close, between the one-line report of the
    failure and the rest of the run. Installed once per process by the first RunCheckpoints and kept
    (the threads may finish at exit); anything else goes on to the previous hook."""

    def __init__(self, prev: Any) -> None:
        self._prev = prev

    def __call__(self, unraisable: Any) -> None:
        if not _closed_loop_error(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
            self._prev(unraisable)

    @classmethod
    def install(cls) -> None:
        import sys

        if not isinstance(sys.unraisablehook, cls):
            sys.unraisablehook = cls(sys.unraisablehook)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0] or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def verify_arrays(record: dict | None, item: str, tree: Any) -> None:
    """DamagedCheckpoint unless every array of `tree` (item "params" or "train_state") matches the
    record's dtype and checksums and every floating one is finite (record None: finiteness only)."""
    got = array_checks(tree)
    if record is not None:
        expected = {k[len(item):]: v for k, v in record["arrays"].items() if k.startswith(item)}
        if set(got) != set(expected):
            missing = sorted(set(expected) ^ set(got))
            raise DamagedCheckpoint(f"{item}: arrays differ from the integrity record ({missing[:3]})")
    for path, (dtype, sums, finite) in got.items():
        if record is not None and [dtype, *sums] != expected[path]:
            raise DamagedCheckpoint(f"checksum mismatch in {item}{path} (the data on disk changed)")
        if not finite:
            raise DamagedCheckpoint(f"non-finite values in {item}{path}")


def check_loader(loader: Any, record: dict | None) -> None:
    ok = (isinstance(loader, dict) and set(loader) == {"epoch", "index"}
          and all(isinstance(v, int) and v >= 0 for v in loader.values()))
    if not ok or (record is not None and loader != record.get("loader")):
        raise DamagedCheckpoint(f"loader position {loader!r} is malformed or differs from its copy")


class RunCheckpoints:
    """Checkpoint manager for one workdir's run."""

    def __init__(
        self,
        directory: str,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        cleanup_tmp: bool = False,
    ):
        """cleanup_tmp: remove the temporary directories of saves that never finished (kill -9, disk
        full); only for the run that writes here (a reader could delete a save in progress)."""
        if every_steps < 1 or keep < 1:
            raise ValueError(f"checkpoint every_steps and keep must be >= 1, got {every_steps}, {keep}")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        self.directory = paths.absolute(directory)  # orbax refuses relative paths; gs:// as it is
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        _QuietClosedLoops.install()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        loader: dict,
        config: dict,
        model_config: dict,
        force: bool = False,
        base: dict | None = None,
    ) -> bool:
        """Starts an (asynchronous) save if `step` is due (or force); returns whether it saves. The
        checksums are computed first, on device, from the same arrays. base: a LoRA run's pointer to
        its frozen base (stored instead of state.ref_params, which holds that base)."""
        if not (force or self.manager.should_save(step)):
            return False
        pure, rest = params_to_pure(state.params), state.replace(params=None)
        extra = {}
        if base is not None:
            rest = rest.replace(ref_params=None)
            extra["base"] = ocp.args.JsonSave(base)
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(pure),
                train_state=ocp.args.StandardSave(rest),
                loader=ocp.args.JsonSave(loader),
                config=ocp.args.JsonSave(config),
                model_config=ocp.args.JsonSave(model_config),
                integrity=ocp.args.JsonSave(integrity_record(pure, rest, loader)),
                **extra,
            ),
            force=force,
        )

    def _integrity(self, step: int) -> dict | None:
        """The step's integrity record; None for a step written before records existed (its
        orbax metadata lists no "integrity" item: it is checked for finiteness only, with a warning)."""
        try:
            record = self.read_json(step, "integrity")
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds; all mean unusable
            if self._legacy(step):
                log.warning("checkpoint %s has no integrity record (written by an older dpoq_jax): "
                            "checked for finiteness only", self.step_dir(step))
                return None
            raise DamagedCheckpoint(f"no readable integrity record ({_one_line(e)})") from None
        if not (isinstance(record, dict) and record.get("version") == INTEGRITY_VERSION
                and isinstance(record.get("arrays"), dict)):
            raise DamagedCheckpoint("the integrity record is malformed")
        return record

    def integrity_record(self, step: int) -> dict | None:
        """The step's integrity record (None: written before records existed); DamagedCheckpoint if it
        is missing or malformed."""
        return self._integrity(step)

    def _legacy(self, step: int) -> bool:
        try:
            meta = paths.read_text(paths.join(self.step_dir(step), "_CHECKPOINT_METADATA"))
            items = json.loads(meta)["item_handlers"]
        except (OSError, ValueError, KeyError, TypeError):
            return False  # unreadable step metadata is damage, not age
        return isinstance(items, dict) and "params" in items and "integrity" not in items

    def restore(
        self, step: int, abstract_state: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict]:
        """(TrainState placed in `shardings`, loader position) of checkpoint `step`, verified:
        DamagedCheckpoint (one line) if any item is missing, unreadable, changed or non-finite."""
        record = self._integrity(step)
        target = abstract_with_shardings(abstract_state, shardings)
        items = {
            "params": ocp.args.StandardRestore(params_to_pure(target.params)),
            "train_state": ocp.args.StandardRestore(target.replace(params=None)),
            "loader": ocp.args.JsonRestore(),
        }
        got = {}
        for name, args in items.items():  # one at a time, so that the message names the item
            try:
                with _quiet("asyncio"):
                    got[name] = getattr(self.manager.restore(step, args=ocp.args.Composite(**{name: args})),
                                        name)
            except Exception as e:  # noqa: BLE001 - a cut file, a missing item, an emptied JSON file, ...
                raise DamagedCheckpoint(f"item {name!r} cannot be read ({_one_line(e)})") from None
        verify_arrays(record, "params", got["params"])
        verify_arrays(record, "train_state", got["train_state"])
        check_loader(got["loader"], record)
        params = pure_to_params(got["params"], abstract_state.params)
        return got["train_state"].replace(params=params), got["loader"]

    def restore_latest_intact(
        self, abstract_state: TrainState, shardings: TrainState
    ) -> tuple[int, TrainState, dict] | None:
        """(step, state, loader) of the newest intact checkpoint, None if there is none at all. Each
        damaged newer step gets a one-line warning and is moved to DIR.damaged/ (kept for
        inspection; it would block the next save of that step); no intact step: ValueError."""
        problems = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, loader = self.restore(step, abstract_state, shardings)
            except DamagedCheckpoint as e:
                problems.append((step, str(e)))
                continue
            for (bad, why), moved in zip(problems, self._set_aside([s for s, _ in problems]), strict=True):
                log.warning("checkpoint %s is damaged: %s; not used (moved to %s), resuming from step %d",
                            self.step_dir(bad), why, moved, step)
            return step, state, loader
        if problems:
            raise ValueError(f"{self.directory}: no intact checkpoint (newest, step {problems[0][0]}: "
                             f"{problems[0][1]}; {len(problems)} damaged); move it away to start over")
        return None

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Moves damaged steps to DIR.damaged/<step> (process 0); returns where each went. On gs://
        a move is a copy of each object and then its deletion (no rename there)."""
        if not steps:
            return []
        dest = self.directory.rstrip("/") + DAMAGED_SUFFIX
        targets = []
        for s in steps:
            target, n = paths.join(dest, str(s)), 1
            while paths.exists(target):
                target, n = paths.join(dest, f"{s}.{n}"), n + 1
            targets.append(target)
            if jax.process_index() == 0:
                paths.move(self.step_dir(s), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dpoq_set_aside_damaged_checkpoints")
        self.manager.reload()
        return targets

    def read_json(self, step: int, item: str) -> Any:
        """One JSON item ("loader", "config", "model_config", "integrity", "base") of checkpoint `step`."""
        return getattr(
            self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})), item
        )

    def restore_params(
        self, step: int, abstract_params: nnx.State, shardings: Any, dtype: Any = None
    ) -> nnx.State:
        """Only the policy parameters of checkpoint `step` (e.g. the SFT run a DPO run starts from),
        placed in `shardings`, verified against the integrity record, then cast to `dtype` if given."""
        record = self._integrity(step)
        target = params_to_pure(abstract_with_shardings(abstract_params, shardings))
        if record is not None:
            saved = {k[len("params"):]: v[0] for k, v in record["arrays"].items() if k.startswith("params")}
            paths, treedef = jax.tree_util.tree_flatten_with_path(target)
            if set(saved) != {jax.tree_util.keystr(p) for p, _ in paths}:
                raise DamagedCheckpoint(f"step {step}: its parameters do not match this model's")
            target = jax.tree_util.tree_unflatten(treedef, [  # read in the saved dtype: checksums are of it
                jax.ShapeDtypeStruct(a.shape, jnp.dtype(saved[jax.tree_util.keystr(p)]), sharding=a.sharding)
                for p, a in paths
            ])
        try:
            with _quiet("asyncio"):
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
                )
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(f"step {step} cannot be read ({_one_line(e)})") from None
        try:
            verify_arrays(record, "params", restored.params)
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(f"{self.step_dir(step)}: {e}") from None
        pure = restored.params
        if dtype is not None:
            pure = jax.tree.map(lambda x: x.astype(dtype), pure)
        return pure_to_params(pure, abstract_params)

    def latest_intact_params_step(self) -> int | None:
        """The newest step whose integrity record reads (for starting from a run's parameters); the
        parameters themselves are verified by `restore_params`."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self._integrity(step)
                return step
            except DamagedCheckpoint as e:
                log.warning("checkpoint %s is damaged, not used: %s", self.step_dir(step), e)
        return None

    def committed_steps(self) -> list[int]:
        """The steps whose directories are complete on disk, oldest first (read from the directory,
        not the manager's memory: a save that failed or is still running has no step directory)."""
        try:
            names = paths.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def base_checksums(base: Any) -> dict[str, list]:
    """A LoRA run's record of its frozen base: per array, dtype and checksums (checked on resume and load)."""
    return {k: [d, *sums] for k, (d, sums, _) in array_checks(nnx.to_pure_dict(base)).items()}


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
