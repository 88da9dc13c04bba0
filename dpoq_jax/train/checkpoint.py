"""Orbax checkpoints of a training run: asynchronous saves every N steps, keep the last K.

Each step directory WORKDIR/checkpoints/<step>/ holds the items
  params        policy parameters as a plain nested dict (the format `dpoq convert` reads)
  train_state   the rest of the TrainState (optimizer state, frozen reference, counters)
  loader        the data position (LoaderState, JSON)
  config        the run config (JSON), model_config: the model's hyper-parameters (JSON)
Orbax writes a step into a temporary directory and renames it when complete, so a save cut short
(kill -9) leaves no step directory and `latest_step` never sees it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dpoq_jax.train.state import TrainState


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


class RunCheckpoints:
    """Checkpoint manager for one workdir's run."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)  # orbax refuses relative paths
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        loader: dict,
        config: dict,
        model_config: dict,
        force: bool = False,
    ) -> bool:
        """Starts an (asynchronous) save if `step` is due (or force); returns whether it saves."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params_to_pure(state.params)),
                train_state=ocp.args.StandardSave(state.replace(params=None)),
                loader=ocp.args.JsonSave(loader),
                config=ocp.args.JsonSave(config),
                model_config=ocp.args.JsonSave(model_config),
            ),
            force=force,
        )

    def restore(
        self, step: int, abstract_state: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict]:
        """(TrainState placed in `shardings`, loader position) of checkpoint `step`."""
        target = abstract_with_shardings(abstract_state, shardings)
        params_target = params_to_pure(target.params)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target),
                train_state=ocp.args.StandardRestore(target.replace(params=None)),
                loader=ocp.args.JsonRestore(),
            ),
        )
        params = pure_to_params(restored.params, abstract_state.params)
        return restored.train_state.replace(params=params), restored.loader

    def read_json(self, step: int, item: str) -> Any:
        """One JSON item ("loader", "config", "model_config") of checkpoint `step`."""
        return getattr(
            self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})), item
        )

    def restore_params(
        self, step: int, abstract_params: nnx.State, shardings: Any, dtype: Any = None
    ) -> nnx.State:
        """Only the policy parameters of checkpoint `step` (e.g. the SFT run a DPO run starts from),
        placed in `shardings` and cast to `dtype` if given."""
        target = abstract_with_shardings(abstract_params, shardings)
        if dtype is not None:
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params_to_pure(target)))
        )
        return pure_to_params(restored.params, abstract_params)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
