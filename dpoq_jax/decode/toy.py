"""A tiny tabular language model with the decoding protocol, for tests and examples.

The next-token logits depend on the last two tokens only: logits = table[prev2, prev1]. Its cache
holds those two tokens per row, so beam reordering bugs change its outputs, and with a small
vocabulary every sequence can be enumerated by brute force.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TabularLM(nnx.Module):
    def __init__(self, table_VVV: np.ndarray):
        V = table_VVV.shape[0]
        if table_VVV.shape != (V, V, V):
            raise ValueError(f"table must be [V, V, V], got {table_VVV.shape}")
        self.table = nnx.Param(jnp.asarray(table_VVV, jnp.float32))

    @classmethod
    def random(cls, vocab_size: int, seed: int = 0, scale: float = 2.0) -> TabularLM:
        rng = np.random.default_rng(seed)
        return cls(rng.normal(0.0, scale, (vocab_size,) * 3))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
        del max_len, dtype  # the table needs only the last two tokens
        return {"prev_B2": jnp.zeros((batch, 2), jnp.int32)}

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        del positions_BT
        prev_B2 = cache["prev_B2"]
        table = self.table[...]
        out = []
        for t in range(tokens_BT.shape[1]):  # T is static and tiny
            prev_B2 = jnp.stack([prev_B2[:, 1], tokens_BT[:, t]], axis=1)
            out.append(table[prev_B2[:, 0], prev_B2[:, 1]])
        return jnp.stack(out, axis=1), {"prev_B2": prev_B2}

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, *args, **kwargs) -> jax.Array:
        """Uncached forward over whole rows (the model signature of CONTRACTS §3, no masks)."""
        logits, _ = self.decode(
            tokens_BT, positions_BT, self.init_cache(tokens_BT.shape[0], tokens_BT.shape[1])
        )
        return logits
