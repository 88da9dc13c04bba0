"""Shared pieces of decoding: the model protocol, prompt packing, cache reordering, uncached scoring.

Model protocol (CONTRACTS §3/§5): any Flax NNX module with
    cache = model.init_cache(batch, max_len, dtype)
    logits_BTV, cache = model.decode(tokens_BT, positions_BT, cache)
where `decode` attends causally over everything written to the cache so far.

Prompts of different lengths. The protocol has no attention mask, so nothing that is not a real
token may ever be written to the cache. We therefore never pad inside the cache: every row holds
its own sequence at positions 0, 1, 2, ... The shortest prompt length is prefilled at once; after
that, one token a step is fed to all rows, and a row whose prompt is not finished yet is fed its
next prompt token (teacher forcing) instead of a generated one. Each row thus starts generating
right after its own prompt, positions are the same for all rows (no left padding, no position
offsets), and the cost is (longest − shortest prompt) extra single-token steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


class DecodeModel(Protocol):
    def init_cache(self, batch: int, max_len: int, dtype: Any) -> Any: ...

    def decode(self, tokens_BT: Array, positions_BT: Array, cache: Any) -> tuple[Array, Any]: ...


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Right-padded prompt ids [B, P] (numpy int32) and their lengths [B]."""

    ids_BP: np.ndarray
    lens_B: np.ndarray

    @property
    def min_len(self) -> int:
        return int(self.lens_B.min())


def pack_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, vocab_size: int | None = None) -> Prompts:
    """Lists of token ids -> right-padded Prompts; rejects empty prompts and out-of-vocabulary ids."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lens = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: decoding needs at least one token (e.g. BOS)")
        if vocab_size is not None:
            bad = [int(t) for t in p if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} has token ids {bad} outside the vocabulary of size {vocab_size}"
                )
        lens.append(len(p))
    ids = np.full((len(prompts), max(lens)), pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = np.asarray(p, np.int32)
    return Prompts(ids, np.asarray(lens, np.int32))


def as_dtype(x: Any) -> Any:
    """None stays None (the model picks its own cache dtype); anything else becomes a jnp.dtype."""
    return None if x is None else jnp.dtype(x)


def cache_batch_axes(model: DecodeModel, dtype: Any = None) -> tuple[int | None, ...]:
    """For each cache leaf (flatten order), the axis that indexes the batch, or None.

    Found by comparing the abstract caches of batch 1 and batch 2, so any cache layout works
    (e.g. [B, S, K, F] per layer or [L, B, S, K, F] stacked).
    """
    c1 = jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(1, 4, dtype)))
    c2 = jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(2, 4, dtype)))
    axes = []
    for a, b in zip(c1, c2, strict=True):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        axes.append(diff[0] if diff else None)
    return tuple(axes)


def reorder_cache(cache: Any, idx_N: Array, axes: tuple[int | None, ...]) -> Any:
    """Gather rows idx_N of every cache leaf along its batch axis (beam reordering)."""
    leaves, treedef = jax.tree.flatten(cache)
    out = [x if ax is None else jnp.take(x, idx_N, axis=ax) for x, ax in zip(leaves, axes, strict=True)]
    return jax.tree.unflatten(treedef, out)


def log_softmax32(logits: Array) -> Array:
    # float32: bf16 log-softmax over a large vocabulary loses the precision that rewards need.
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def split(model: nnx.Module) -> tuple[Any, Any]:
    """graphdef (static, hashable) and state (pytree) for use across a jax.jit boundary."""
    return nnx.split(model)


def forward_logits(model: DecodeModel, tokens_BT: Array, cache_dtype: Any = None) -> Array:
    """Uncached scoring: one prefill call over whole (right-padded) sequences -> logits [B, T, V].

    Right padding is safe here: attention is causal, so padding after a token never changes it.
    """
    B, T = tokens_BT.shape
    cache = model.init_cache(B, T, cache_dtype)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, _ = model.decode(tokens_BT, positions_BT, cache)
    return logits_BTV


def model_vocab_size(model: DecodeModel) -> int:
    """Number of logits the model produces (abstract evaluation of one decode step, no compute)."""
    one = jnp.zeros((1, 1), jnp.int32)
    return int(
        jax.eval_shape(lambda: model.decode(one, one, model.init_cache(1, 1, jnp.float32)))[0].shape[-1]
    )


def check_same_vocab(policy_V: int, ref_V: int) -> None:
    if policy_V != ref_V:
        raise ValueError(
            f"policy and reference vocabularies differ: policy logits have {policy_V} entries, "
            f"reference logits {ref_V}; implicit rewards need the same tokenizer and vocabulary"
        )


@dataclasses.dataclass
class Generation:
    """Decoded responses (numpy). Leading dims: [B] for sampling, [B, K] for beam search (best first).

    tokens: response ids (pad after EOS); mask: 1.0 for real response tokens (EOS included);
    logps: log π(token | prefix) under the untempered policy; score: what the search ranked by
    (sum of log-probs, or reward-guided score, length-penalised if asked); ref_logps / rewards:
    log π_ref and the implicit reward β(log π − log π_ref) per token when a reference was given.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logps: np.ndarray
    score: np.ndarray
    ref_logps: np.ndarray | None = None
    rewards: np.ndarray | None = None
    valid: np.ndarray | None = None  # beams: False where fewer than K distinct sequences exist

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(-1).astype(np.int32)

    @property
    def logp_sum(self) -> np.ndarray:
        return self.logps.sum(-1)

    @property
    def reward_sum(self) -> np.ndarray | None:
        return None if self.rewards is None else self.rewards.sum(-1)


def response_lists(tokens_BR: np.ndarray, mask_BR: np.ndarray) -> list[list[int]]:
    """The real tokens of each response (EOS included when emitted) as Python lists."""
    return [
        [int(t) for t, m in zip(row, mrow, strict=True) if m > 0]
        for row, mrow in zip(np.asarray(tokens_BR), np.asarray(mask_BR), strict=True)
    ]


def strip_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The tokens before the first EOS (all of them if there is none)."""
    ids = [int(t) for t in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def response_index(lens_B: Array, R: int) -> Array:
    """[B, R] indices of the response slots right after each prompt."""
    return lens_B[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]


def sequence_logps(model: DecodeModel, tokens_BT: Array, cache_dtype: Any = None) -> tuple[Array, int]:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1 (column 0 is 0), uncached; also the logits' V."""
    logits_BTV = forward_logits(model, tokens_BT, cache_dtype)
    lp_BTV = log_softmax32(logits_BTV[:, :-1])
    targets = jnp.clip(tokens_BT[:, 1:], 0, lp_BTV.shape[-1] - 1)
    lp_BT = jnp.take_along_axis(lp_BTV, targets[..., None], axis=-1)[..., 0]
    return jnp.pad(lp_BT, ((0, 0), (1, 0))), logits_BTV.shape[-1]


def _score_rows(graphdef: Any, state: Any, tokens_BT: Array, cache_dtype: Any) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, state)
    lp, V = sequence_logps(model, tokens_BT, cache_dtype)
    return lp, jnp.asarray(V)


_score_rows_jit = jax.jit(_score_rows, static_argnums=(0, 3))


def score_rows(model: DecodeModel, tokens_BT: np.ndarray, cache_dtype: Any = None) -> tuple[np.ndarray, int]:
    """Jitted uncached per-token log-probs of whole rows -> (logps [B, T] numpy, vocabulary size)."""
    graphdef, state = nnx.split(model)
    lp, V = _score_rows_jit(graphdef, state, jnp.asarray(tokens_BT, jnp.int32), as_dtype(cache_dtype))
    return np.asarray(lp), int(V)


def full_rows(prompts: Prompts, responses_NR: np.ndarray, pad_id: int) -> np.ndarray:
    """Prompt (its own length) followed by the response tokens, right padded -> [N, P + R].

    responses_NR may have more rows than prompts (K beams per prompt, rows b*K + k).
    """
    N, R = responses_NR.shape
    K = N // len(prompts.lens_B)
    ids = np.repeat(prompts.ids_BP, K, axis=0)
    lens = np.repeat(prompts.lens_B, K)
    out = np.full((N, ids.shape[1] + R), pad_id, np.int32)
    for n in range(N):
        out[n, : lens[n]] = ids[n, : lens[n]]
        out[n, lens[n] : lens[n] + R] = responses_NR[n]
    return out


def reference_scores(
    ref_model: DecodeModel,
    prompts: Prompts,
    gen_tokens: np.ndarray,
    gen_mask: np.ndarray,
    policy_logps: np.ndarray,
    beta: float,
    pad_id: int,
    policy_V: int,
    cache_dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score generated responses (any leading dims [B, ...]) with the reference, uncached.

    Returns (ref_logps, rewards) with the responses' shape; rewards = β(log π − log π_ref) · mask.
    """
    lead, R = gen_tokens.shape[:-1], gen_tokens.shape[-1]
    rows = full_rows(prompts, gen_tokens.reshape(-1, R), pad_id)
    lp, V = score_rows(ref_model, rows, cache_dtype)
    check_same_vocab(policy_V, V)
    K = rows.shape[0] // len(prompts.lens_B)
    lens = np.repeat(prompts.lens_B, K)
    ref_lp = np.stack([lp[n, lens[n] : lens[n] + R] for n in range(rows.shape[0])]).reshape(*lead, R)
    ref_lp = ref_lp * gen_mask
    return ref_lp, beta * (policy_logps - ref_lp) * gen_mask
