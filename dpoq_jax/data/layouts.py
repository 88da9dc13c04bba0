"""Batch layouts: TokenizedPairs -> the numpy arrays of CONTRACTS.md §2 (pure numpy, no JAX).

All layouts have static shapes (rows N × S tokens, P pairs × R response tokens) so one jitted step
serves every batch. The loss never sees rows: it gathers per-response values through
`*_pred_idx` (flat row index n * S + s of the position whose logits predict response token r).

* "padded": row 2p = prompt + chosen, row 2p + 1 = prompt + rejected (N = 2P), right padded.
* "prefix_shared": row p = prompt | chosen (branch 1) | rejected (branch 2) (N = P); the rejected
  response's positions continue from the prompt's end, like the chosen one's.
* "packed": prefix-shared groups packed first-fit-decreasing into N rows, told apart by segment ids.

SFT examples and labelled single responses (`outcome_batch`) take one sequence per row ("padded",
"prefix_shared") or are packed.

Attention rule (all layouts): token i sees token j iff j <= i, segment_ids equal and non-zero, and
branch_ids[j] == 0 or branch_ids[j] == branch_ids[i].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dpoq_jax.data.examples import TokenizedOutcome, TokenizedPair, TokenizedSFT

LAYOUTS = ("padded", "prefix_shared", "packed")
# Responses of a batch, named in its keys (`{side}_pred_idx`, `{side}_targets`, `{side}_mask`): the two
# of a preference batch, the one of an SFT or outcome batch.
PAIR_SIDES = ("chosen", "rejected")
SINGLE_SIDES = ("completion",)
OVERFLOW_CHOICES = ("error", "drop")


class _Rows:
    """Row storage being filled: tokens, positions, segment ids, branch ids [N, S]."""

    def __init__(self, n_rows: int, seq_len: int):
        self.S = seq_len
        self.tokens = np.zeros((n_rows, seq_len), np.int32)
        self.positions = np.zeros((n_rows, seq_len), np.int32)
        self.segment_ids = np.zeros((n_rows, seq_len), np.int32)
        self.branch_ids = np.zeros((n_rows, seq_len), np.int32)

    def put(self, n: int, s: int, ids: Sequence[int], pos0: int, segment: int, branch: int) -> int:
        """Writes `ids` into row n from column s; returns the flat index of its first token."""
        k = len(ids)
        self.tokens[n, s : s + k] = ids
        self.positions[n, s : s + k] = np.arange(pos0, pos0 + k)
        self.segment_ids[n, s : s + k] = segment
        self.branch_ids[n, s : s + k] = branch
        return n * self.S + s

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "positions": self.positions,
                "segment_ids": self.segment_ids, "branch_ids": self.branch_ids}


def _where(i: int, meta: dict[str, Any]) -> str:
    src = meta.get("source")
    line = meta.get("line")
    return f"pair {i}" + (f" ({src}:{line})" if src is not None else "")


def _check_pair(i: int, pair: TokenizedPair, R: int) -> None:
    if len(pair.prompt_ids) == 0:
        raise ValueError(f"{_where(i, pair.meta)}: empty prompt; at least one token (e.g. BOS) must "
                         "precede the response so that its first token has a predicting position")
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        if len(ids) == 0:
            raise ValueError(f"{_where(i, pair.meta)}: empty {name} response")
        if len(ids) > R:
            raise ValueError(f"{_where(i, pair.meta)}: {name} response has {len(ids)} tokens > "
                             f"response_len R={R}")


def group_len(pair: TokenizedPair, layout: str) -> int:
    """Row tokens one pair needs: per row for "padded", in total for prefix-shared groups."""
    lp, lc, lr = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    return lp + max(lc, lr) if layout == "padded" else lp + lc + lr


def first_fit_decreasing(lengths: Sequence[int], n_rows: int, seq_len: int) -> list[tuple[int, int] | None]:
    """Assigns items to rows: (row, start column) per item, None where it does not fit.

    Longest first (ties by index, so the result is deterministic), each into the first row with room.
    """
    free = [0] * n_rows
    placement: list[tuple[int, int] | None] = [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for n in range(n_rows):
            if free[n] + lengths[i] <= seq_len:
                placement[i] = (n, free[n])
                free[n] += lengths[i]
                break
    return placement


def rows_needed(pairs: Sequence[TokenizedPair], seq_len: int) -> int:
    """Fewest rows first-fit-decreasing needs to pack `pairs` (for choosing num_rows)."""
    lengths = [group_len(p, "packed") for p in pairs]
    for n in range(1, len(pairs) + 1):
        if all(x is not None for x in first_fit_decreasing(lengths, n, seq_len)):
            return n
    return max(len(pairs), 1)


def needed_len(item: TokenizedPair | TokenizedSFT, layout: str) -> int:
    """Row tokens one example needs in `layout` (a pair: per row when padded, in total otherwise)."""
    if isinstance(item, TokenizedSFT):
        return len(item.prompt_ids) + len(item.completion_ids)
    return group_len(item, layout)


def bucket_for(
    items: Sequence[TokenizedPair | TokenizedSFT | None],
    layout: str,
    buckets: Sequence[int],
    num_rows: int | None = None,
) -> int:
    """The smallest row length in `buckets` that holds every real item of one step (packed: all of
    them in `num_rows` rows, first-fit-decreasing). None entries (dummies) need nothing. When even
    the largest bucket is too short, the largest: the batch then fails or drops as data.overflow says."""
    lengths = [needed_len(x, layout) for x in items if x is not None]
    ordered = sorted(int(b) for b in buckets)
    for b in ordered:
        if layout == "packed" and num_rows is not None:
            if all(x is not None for x in first_fit_decreasing(lengths, num_rows, b)):
                return b
        elif all(n <= b for n in lengths):
            return b
    return ordered[-1]


def _num_rows(layout: str, P: int, num_rows: int | None) -> int:
    if layout == "padded":
        return 2 * P
    if layout == "prefix_shared":
        return P
    if layout == "packed":
        if num_rows is None:
            raise ValueError('layout "packed" needs num_rows')
        return num_rows
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def preference_batch(
    pairs: Sequence[TokenizedPair | None],
    layout: str,
    *,
    seq_len: int,
    response_len: int,
    num_pairs: int | None = None,
    num_rows: int | None = None,
    overflow: str = "error",
    stats: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Lays out up to `num_pairs` pairs (None entries and missing ones become masked dummies).

    overflow: what to do when a pair does not fit its row(s): "error" raises; "drop" masks the pair
    (pair_mask 0) so that the batch keeps its static shape; `stats["n_dropped"]` counts them.
    Optional per-pair meta "ref_chosen_logps"/"ref_rejected_logps" (per token) or
    "ref_chosen_sum"/"ref_rejected_sum", and a token cache's "chosen_token_values"/"rejected_token_values",
    are copied into the batch when every real pair has them.
    """
    P = len(pairs) if num_pairs is None else num_pairs
    if len(pairs) > P:
        raise ValueError(f"{len(pairs)} pairs given for num_pairs={P}")
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    S, R = seq_len, response_len
    N = _num_rows(layout, P, num_rows)
    rows = _Rows(N, S)
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_pred_idx"] = np.zeros((P, R), np.int32)
        out[f"{side}_targets"] = np.zeros((P, R), np.int32)
        out[f"{side}_mask"] = np.zeros((P, R), np.float32)
    out["pair_mask"] = np.zeros((P,), np.float32)

    real = [(i, p) for i, p in enumerate(pairs) if p is not None]
    for i, p in real:
        _check_pair(i, p, R)
    if layout == "packed":
        placement = first_fit_decreasing([group_len(p, layout) for _, p in real], N, S)
    elif layout == "padded":
        placement = [(2 * i, 0) if group_len(p, layout) <= S else None for i, p in real]
    else:
        placement = [(i, 0) if group_len(p, layout) <= S else None for i, p in real]

    n_dropped = 0
    next_segment = np.ones(N, np.int32)  # segment ids restart at 1 in each row
    for (i, p), place in zip(real, placement, strict=True):
        if place is None:
            if overflow == "error":
                raise ValueError(f"{_where(i, p.meta)}: needs {group_len(p, layout)} tokens, does not fit "
                                 f"layout {layout!r} with seq_len={S}" +
                                 (f", num_rows={N}" if layout == "packed" else ""))
            n_dropped += 1
            continue
        n, s = place
        lp, lc = len(p.prompt_ids), len(p.chosen_ids)
        if layout == "padded":
            for row, side, ids in ((n, "chosen", p.chosen_ids), (n + 1, "rejected", p.rejected_ids)):
                rows.put(row, 0, p.prompt_ids, 0, 1, 0)
                rows.put(row, lp, ids, lp, 1, 0)
                # logits at the position before each response token predict it
                out[f"{side}_pred_idx"][i, : len(ids)] = row * S + lp - 1 + np.arange(len(ids))
        else:
            seg = int(next_segment[n])
            next_segment[n] += 1
            f_prompt = rows.put(n, s, p.prompt_ids, 0, seg, 0)
            f_chosen = rows.put(n, s + lp, p.chosen_ids, lp, seg, 1)
            f_rej = rows.put(n, s + lp + lc, p.rejected_ids, lp, seg, 2)
            last_prompt = f_prompt + lp - 1
            out["chosen_pred_idx"][i, :lc] = f_chosen - 1 + np.arange(lc)  # f_chosen - 1 == last_prompt
            lr = len(p.rejected_ids)
            out["rejected_pred_idx"][i, :lr] = np.concatenate([[last_prompt], f_rej + np.arange(lr - 1)])
        for side, ids in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            out[f"{side}_targets"][i, : len(ids)] = ids
            out[f"{side}_mask"][i, : len(ids)] = 1.0
        out["pair_mask"][i] = 1.0

    out.update(rows.arrays())
    _copy_reference(out, pairs, P, R)
    if stats is not None:
        stats["n_dropped"] = stats.get("n_dropped", 0) + n_dropped
    return out


def _copy_reference(
    out: dict[str, np.ndarray],
    items: Sequence[Any],
    P: int,
    R: int,
    sides: tuple[str, ...] = PAIR_SIDES,
    mask_key: str = "pair_mask",
) -> None:
    """Per-item values from meta -> batch arrays, each group when every real item has it: the reference's
    "ref_{side}_logps" (per token) or "ref_{side}_sum", and a token cache's "{side}_token_values" (per
    token; token_weighted / selective). Per-token values may be lists, arrays or token_cache.CachedValues
    (read from the cache here, batch by batch)."""
    real = [(i, p) for i, p in enumerate(items) if p is not None and out[mask_key][i] > 0]
    if not real:
        return
    for template, shape in (("ref_{}_logps", (P, R)), ("ref_{}_sum", (P,)), ("{}_token_values", (P, R))):
        keys = [template.format(side) for side in sides]
        if all(k in p.meta for _, p in real for k in keys):
            for k in keys:
                arr = np.zeros(shape, np.float32)
                for i, p in real:
                    v = np.asarray(p.meta[k], np.float32)
                    if len(shape) == 2:
                        arr[i, : len(v)] = v
                    else:
                        arr[i] = v
                out[k] = arr


def sft_batch(
    examples: Sequence[TokenizedSFT | None],
    layout: str,
    *,
    seq_len: int,
    response_len: int,
    batch_size: int | None = None,
    num_rows: int | None = None,
    overflow: str = "error",
    stats: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """SFT equivalent: one sequence per row ("padded"/"prefix_shared") or packed into num_rows rows."""
    B = len(examples) if batch_size is None else batch_size
    if len(examples) > B:
        raise ValueError(f"{len(examples)} examples given for batch_size={B}")
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    S, R = seq_len, response_len
    N = num_rows if layout == "packed" else B
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if N is None:
        raise ValueError('layout "packed" needs num_rows')
    rows = _Rows(N, S)
    out = {"completion_pred_idx": np.zeros((B, R), np.int32),
           "completion_targets": np.zeros((B, R), np.int32),
           "completion_mask": np.zeros((B, R), np.float32),
           "example_mask": np.zeros((B,), np.float32)}
    real = [(i, e) for i, e in enumerate(examples) if e is not None]
    for i, e in real:
        if not e.prompt_ids or not e.completion_ids or len(e.completion_ids) > R:
            raise ValueError(f"{_where(i, e.meta)}: needs a non-empty prompt and 1..{R} completion "
                             f"tokens, got {len(e.prompt_ids)} and {len(e.completion_ids)}")
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for _, e in real]
    if layout == "packed":
        placement = first_fit_decreasing(lengths, N, S)
    else:
        placement = [(i, 0) if n <= S else None for (i, _), n in zip(real, lengths, strict=True)]
    n_dropped = 0
    next_segment = np.ones(N, np.int32)
    for (i, e), place in zip(real, placement, strict=True):
        if place is None:
            if overflow == "error":
                raise ValueError(f"{_where(i, e.meta)}: {len(e.prompt_ids) + len(e.completion_ids)} tokens "
                                 f"do not fit layout {layout!r} with seq_len={S}")
            n_dropped += 1
            continue
        n, s = place
        seg = int(next_segment[n])
        next_segment[n] += 1
        lp, lc = len(e.prompt_ids), len(e.completion_ids)
        rows.put(n, s, e.prompt_ids, 0, seg, 0)
        f_c = rows.put(n, s + lp, e.completion_ids, lp, seg, 0)
        out["completion_pred_idx"][i, :lc] = f_c - 1 + np.arange(lc)
        out["completion_targets"][i, :lc] = e.completion_ids
        out["completion_mask"][i, :lc] = 1.0
        out["example_mask"][i] = 1.0
    out.update(rows.arrays())
    if stats is not None:
        stats["n_dropped"] = stats.get("n_dropped", 0) + n_dropped
    return out


def outcome_batch(
    examples: Sequence[TokenizedOutcome | None],
    layout: str,
    *,
    seq_len: int,
    response_len: int,
    batch_size: int | None = None,
    num_rows: int | None = None,
    overflow: str = "error",
    stats: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Labelled single responses (unpaired losses): the `sft_batch` arrays of each response, `label` [B],
    and `ref_completion_logps` [B, R] (or `ref_completion_sum` [B]) when every real example's meta has
    them (`dpoq precompute-ref`)."""
    out = sft_batch(examples, layout, seq_len=seq_len, response_len=response_len, batch_size=batch_size,
                    num_rows=num_rows, overflow=overflow, stats=stats)  # fmt: skip
    B = out["example_mask"].shape[0]
    out["label"] = np.array([0.0 if e is None else e.label for e in examples] + [0.0] * (B - len(examples)),
                            np.float32)  # fmt: skip
    _copy_reference(out, examples, B, response_len, sides=SINGLE_SIDES, mask_key="example_mask")
    return out


def attention_allowed(segment_ids_NS: np.ndarray, branch_ids_NS: np.ndarray) -> np.ndarray:
    """The §2 attention rule as a boolean [N, S, S] array (i attends j), a reference for tests."""
    seg, br = np.asarray(segment_ids_NS), np.asarray(branch_ids_NS)
    S = seg.shape[-1]
    causal = np.tril(np.ones((S, S), bool))
    same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    branch_ok = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    return causal[None] & same_seg & branch_ok


def gather_flat(x_NS: Any, idx_PR: Any, out_sharding: Any = None) -> Any:
    """x[n, s, ...] at flat indices n * S + s -> [P, R, ...]; works for numpy and jax arrays.

    On a mesh with Explicit axes (the default of `jax.make_mesh`) JAX needs the gather's output
    sharding: pass `out_sharding` (e.g. PartitionSpec("data")); with Auto axes it may stay None.
    """
    flat = x_NS.reshape((-1,) + tuple(x_NS.shape[2:]))
    if out_sharding is not None:
        return flat.at[idx_PR].get(out_sharding=out_sharding)
    return flat[idx_PR]
