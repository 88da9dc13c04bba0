"""Deterministic, resumable, per-process input: which examples form each batch (their global arrays:
train.setup.global_batch).

The order of epoch e is a permutation drawn from (seed, e); it is cut into global batches of
`global_batch_size` examples (the last one filled with -1 = dummy, masked by the layouts, so every
example is seen exactly once per epoch). Process i of n reads only its slice
[i * G/n, (i + 1) * G/n) of each global batch. `LoaderState(epoch, index)` (index = examples of
the epoch's order already consumed, the same on every process) is a small JSON-serialisable record
stored with checkpoints; a loader built with it continues exactly where the saved one stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoaderState:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> LoaderState:
        return cls.from_dict(json.loads(s))


class Loader:
    """Yields this process's example indices for each global batch, in a seeded order."""

    def __init__(
        self,
        n_examples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        state: LoaderState | None = None,
    ):
        if n_examples <= 0:
            raise ValueError("the loader needs at least one example")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.n, self.G, self.seed, self.shuffle = n_examples, global_batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = global_batch_size // process_count
        self.state = state or LoaderState()
        if self.state.index % self.G or self.state.index > self.n:
            raise ValueError(f"{self.state} does not fit {n_examples} examples in batches of {self.G}")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.G)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global order of epoch `epoch`, padded with -1 to a whole number of batches."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        pad = self.steps_per_epoch * self.G - self.n
        return np.concatenate([order, np.full(pad, -1, order.dtype)])

    def next_indices(self) -> np.ndarray:
        """This process's indices of the next global batch (-1 = dummy); advances the state."""
        st = self.state
        if st.index >= self.n:
            st = LoaderState(st.epoch + 1, 0)
        order = self.epoch_order(st.epoch)
        start = st.index + self.process_index * self.local_batch_size
        local = order[start : start + self.local_batch_size]
        self.state = LoaderState(st.epoch, st.index + self.G)
        return local

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_indices()
