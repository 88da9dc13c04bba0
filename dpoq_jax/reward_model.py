"""Explicit reward models trained on preference pairs: the baseline for DPO's implicit token rewards.

The network is a decoder (an SFT run's, fully fine-tuned) with a scalar linear head on its final hidden
states: v_s = w · h_s + b at every row position s. Response token t (0-based) of a response y to prompt x
sits at row position |x| + t; its value is read *there*, after the model has read the token, so v at
that position is a function of (x, y_≤t), the state and action of token t (analysis/credit.py's r_t =
β log π/π_ref of token t is a function of the same prefix, read from the logits at |x| + t − 1).

  token model:   r_t = v_{|x|+t},  R(y) = Σ_t r_t over response tokens (prompt and padding masked);
                 its per-token credit is r_t.
  outcome model: o(y_≤t) = v_{|x|+t} (a prefix score; the network is causal, so every prefix's score
                 comes from one forward pass), R(y) = o(y) = v at the last response token; its credit is
                 c_t = o(y_≤t) − o(y_≤t−1) with o(y_≤0) = v_{|x|−1} (the last prompt token), so
                 Σ_t c_t = o(y) − o(x) (telescoping).
  loss (both):   Bradley–Terry, mean over pairs of −log σ(R(y_w) − R(y_l)).

The head starts at zero (R = 0 for every response, loss log 2). Rows are right-padded (pad id 0) and run
with plain causal attention, so padding after a token never changes its value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpoq_jax.models.decoder import Decoder

Array = jax.Array
KINDS = ("token", "outcome")
CACHE_FORMAT = 1
log = logging.getLogger(__name__)


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")


# ---- pure losses ------------------------------------------------------------------------------------


def sequence_reward(values_NS: Array, mask_NS: Array, kind: str) -> Array:
    """R [N] from head values [N, S] and the response mask [N, S]: "token": Σ_s mask_s v_s; "outcome":
    v at the row's last masked position (0 for a row without a masked position). float32 at least."""
    _check_kind(kind, "sequence_reward")
    v_NS = values_NS.astype(jnp.promote_types(values_NS.dtype, jnp.float32))
    m_NS = mask_NS.astype(bool)
    if kind == "token":
        return jnp.sum(jnp.where(m_NS, v_NS, 0.0), axis=-1)
    last_N = jnp.max(jnp.where(m_NS, jnp.arange(v_NS.shape[-1]), -1), axis=-1)
    at_N = jnp.take_along_axis(v_NS, jnp.maximum(last_N, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(last_N >= 0, at_N, 0.0)


def bt_loss(values_w_NS: Array, mask_w_NS: Array, values_l_NS: Array, mask_l_NS: Array, kind: str) -> Array:
    """Bradley–Terry loss mean_n −log σ(R(y_w)_n − R(y_l)_n), R = sequence_reward(·, kind) (a scalar)."""
    margin_N = sequence_reward(values_w_NS, mask_w_NS, kind) - sequence_reward(values_l_NS, mask_l_NS, kind)
    return jnp.mean(-jax.nn.log_sigmoid(margin_N))


@jax.jit
def token_bt_loss(r_w_NS: Array, mask_w_NS: Array, r_l_NS: Array, mask_l_NS: Array) -> Array:
    """bt_loss of the token model: R = Σ_t r_t over the masked (response) positions."""
    return bt_loss(r_w_NS, mask_w_NS, r_l_NS, mask_l_NS, "token")


@jax.jit
def outcome_bt_loss(v_w_NS: Array, mask_w_NS: Array, v_l_NS: Array, mask_l_NS: Array) -> Array:
    """bt_loss of the outcome model: R = v at the last masked (response) position."""
    return bt_loss(v_w_NS, mask_w_NS, v_l_NS, mask_l_NS, "outcome")


# ---- the network ------------------------------------------------------------------------------------


class RewardNet(nnx.Module):
    """A decoder and a scalar head: v_NS = h_NSD · w_D + b in float32 (h: final hidden states after the
    final norm, positions 0..S−1, plain causal attention). The head starts at zero."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.head_w = nnx.Param(jnp.zeros((decoder.cfg.hidden_size,), jnp.float32))
        self.head_b = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, tokens_NS: Array) -> Array:
        N, S = tokens_NS.shape
        positions_NS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (N, S))
        h_NSD = self.decoder(tokens_NS, positions_NS, segment_ids=None, return_hidden=True)
        return jnp.einsum("nsd,d->ns", h_NSD.astype(jnp.float32), self.head_w[...]) + self.head_b[...]


@dataclasses.dataclass
class RewardModel:
    """A trained (or loaded) reward model. `trained`: False when the weights came from the cache;
    `losses`: the BT loss of each training step's minibatch; `settings`: what the weights depend on."""

    net: RewardNet
    kind: str
    trained: bool = False
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _decoder(init: str | os.PathLike | Decoder) -> Decoder:
    """A fresh Decoder object over `init`'s parameters (a given Decoder is never modified)."""
    if isinstance(init, Decoder):
        graphdef, state = nnx.split(init)
        return nnx.merge(graphdef, state)
    from dpoq_jax.train.load import load_model

    return load_model(os.fspath(init), flag="init")


def init_reward_model(init: str | os.PathLike | Decoder, kind: str) -> RewardModel:
    """An untrained reward model: `init`'s decoder (an SFT run / model folder, or a Decoder) with a zero
    head (R = 0 for every response)."""
    _check_kind(kind, "init_reward_model")
    return RewardModel(RewardNet(_decoder(init)), kind)


# ---- rows -------------------------------------------------------------------------------------------


def _rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows prompt + response [N, length] int32 and their response mask [N, length]."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for n, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[n, : len(p) + len(r)] = list(p) + list(r)
        mask[n, len(p) : len(p) + len(r)] = True
    return tokens, mask


def _check_ids(prompts, responses, vocab: int, where: str) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{where}: {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if len(p) == 0 or len(r) == 0:
            raise ValueError(f"{where}: item {i} has an empty {'prompt' if len(p) == 0 else 'response'}")
        bad = [int(t) for t in (*p, *r) if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"{where}: item {i} has token ids {bad} outside the vocabulary of size {vocab}")


# ---- training ---------------------------------------------------------------------------------------


def _flat_params(net: RewardNet) -> dict[str, np.ndarray]:
    """The parameters as {"a/b/c": numpy array}."""
    pure = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _pairs_digest(pairs: Sequence[Any]) -> str:
    ids = [[list(map(int, p.prompt_ids)), list(map(int, p.chosen_ids)), list(map(int, p.rejected_ids))]
           for p in pairs]  # fmt: skip
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] pair indices: consecutive chunks of a stream of permutations of range(n)
    drawn from numpy's Generator(seed), one permutation per pass over the pairs."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    passes = [rng.permutation(n) for _ in range(-(-need // n))]
    stream = np.concatenate(passes) if passes else np.zeros(0, np.int64)
    return stream[:need].reshape(steps, batch_size)


def _cache_paths(cache_dir: str, settings: dict) -> tuple[str, str]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.join(cache_dir, f"reward_model-{settings['kind']}-{key}")
    return stem + ".npz", stem + ".json"


def _write_atomic(path: str, write) -> None:
    """write(file) into a temporary file beside `path`, then os.replace it there: whole or absent."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save(npz: str, sidecar: str, rm: RewardModel, extra: dict) -> None:
    """The parameters (flattened, one .npz holding the settings and losses too), then a JSON of them."""
    arrays = {f"param/{k}": v for k, v in _flat_params(rm.net).items()}
    arrays["__settings__"] = np.array(json.dumps(rm.settings, sort_keys=True))
    arrays["__losses__"] = np.asarray(rm.losses, np.float64)
    _write_atomic(npz, lambda f: np.savez(f, **arrays))
    text = json.dumps({"settings": rm.settings, **extra}, indent=1, sort_keys=True)
    _write_atomic(sidecar, lambda f: f.write(text.encode()))


def _load(npz: str, rm: RewardModel) -> bool:
    """Read the cached parameters into rm.net if `npz` holds weights of rm.settings; False if not."""
    try:
        with np.load(npz) as z:
            if json.loads(str(z["__settings__"])) != json.loads(json.dumps(rm.settings)):
                return False
            stored = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
            losses = np.asarray(z["__losses__"], np.float64)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        log.warning("reward model cache %s unreadable (%s); training again", npz, e)
        return False
    params = nnx.state(rm.net, nnx.Param)
    pure = nnx.to_pure_dict(params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new = []
    for path, x in leaves:
        k = "/".join(str(getattr(p, "key", p)) for p in path)
        if k not in stored or stored[k].shape != x.shape:
            log.warning("reward model cache %s does not fit the model (%s); training again", npz, k)
            return False
        new.append(jnp.asarray(stored[k], x.dtype))
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(rm.net, params)
    rm.losses = losses
    return True


def train_reward_model(
    init: str | os.PathLike | Decoder,
    pairs: Sequence[Any],
    *,
    kind: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> RewardModel:
    """A reward model of `kind` ("token" | "outcome", see the module docstring) trained from `init` (an
    SFT run / model folder for load_model, or a Decoder, which is not modified) on `pairs` (objects with
    .prompt_ids, .chosen_ids, .rejected_ids) by `steps` AdamW steps (global-norm clipping at
    `max_grad_norm`) of `batch_size` pairs in numpy Generator(seed) order; all parameters are trained.

    With `cache_dir` the weights are saved there (a .npz, written whole or not at all, and a JSON of the
    settings, named by a hash of the settings); a later call whose settings, initial weights and pairs
    match loads them instead of training (`trained` False)."""
    _check_kind(kind, "train_reward_model")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("train_reward_model: pairs is empty; need at least one preference pair")
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"train_reward_model: need steps >= 0, batch_size >= 1 and lr > 0; got steps={steps}, "
            f"batch_size={batch_size}, lr={lr}"
        )
    rm = init_reward_model(init, kind)
    V = rm.net.decoder.cfg.vocab_size
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    _check_ids(prompts, responses, V, "train_reward_model: pairs")
    rm.settings = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "steps": int(steps),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "weight_decay": float(weight_decay),
        "max_grad_norm": float(max_grad_norm),
        "num_pairs": len(pairs),
        "pairs_sha256": _pairs_digest(pairs),
        "init_sha256": _digest(_flat_params(rm.net)),
    }
    npz = sidecar = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        npz, sidecar = _cache_paths(os.fspath(cache_dir), rm.settings)
        if os.path.exists(npz) and _load(npz, rm):
            return rm

    S = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    tokens, mask = _rows(prompts, responses, 0, S)
    P = len(pairs)
    graphdef, params, rest = nnx.split(rm.net, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr, weight_decay=weight_decay))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rest, tokens_NS, mask_NS):
        def loss_fn(params):
            values_NS = nnx.merge(graphdef, params, rest)(tokens_NS)
            B = tokens_NS.shape[0] // 2
            return bt_loss(values_NS[:B], mask_NS[:B], values_NS[B:], mask_NS[B:], kind)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for idx in _batch_order(P, steps, batch_size, seed):
        rows = np.concatenate([idx, idx + P])  # the chosen rows, then their rejected rows
        params, opt_state, loss = step(params, opt_state, rest, tokens[rows], mask[rows])
        losses.append(loss)
    rm.net = nnx.merge(graphdef, params, rest)
    rm.losses = np.asarray([float(x) for x in losses], np.float64)
    rm.trained = True
    if npz is not None:
        init_name = "a Decoder object" if isinstance(init, Decoder) else os.fspath(init)
        _save(npz, sidecar, rm, {"init": init_name, "final_loss": float(rm.losses[-1]) if steps else None})
    return rm


# ---- scoring ----------------------------------------------------------------------------------------


def _values(graphdef: nnx.GraphDef, state: nnx.State, tokens_NS: Array) -> Array:
    return nnx.merge(graphdef, state)(tokens_NS)


_values_jit = jax.jit(_values, static_argnums=0)


def head_values(
    rm: RewardModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    pad_id: int = 0,
) -> list[np.ndarray]:
    """Per response, the head's values (float64) at row positions |x| − 1 .. |x| + |y| − 1: the last
    prompt token, then each response token (|y| + 1 values). `batch_size` rows per jitted call (the last
    chunk padded with copies of its first row, so one compiled shape)."""
    if batch_size < 1:
        raise ValueError(f"head_values: batch_size must be >= 1, got {batch_size}")
    _check_ids(prompts, responses, rm.net.decoder.cfg.vocab_size, "head_values")
    S = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    tokens, _ = _rows(prompts, responses, pad_id, S)
    graphdef, state = nnx.split(rm.net)
    N, bs = len(tokens), min(batch_size, len(tokens))
    chunks = []
    for s in range(0, N, bs):
        chunk = tokens[s : s + bs]
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - len(chunk), axis=0)])
        chunks.append(np.asarray(_values_jit(graphdef, state, jnp.asarray(chunk)), np.float64))
    values = np.concatenate(chunks)[:N]
    spans = [(len(p) - 1, len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)]
    return [values[n, a:b] for n, (a, b) in enumerate(spans)]


def token_credit(
    rm: RewardModel, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], **kwargs: Any
) -> list[np.ndarray]:
    """Per-token credit of each response (float64, one value per response token): r_t for the token
    model, c_t = o(y_≤t) − o(y_≤t−1) for the outcome model (kwargs: head_values')."""
    vals = head_values(rm, prompts, responses, **kwargs)
    return [v[1:].copy() if rm.kind == "token" else np.diff(v) for v in vals]


def sequence_rewards(
    rm: RewardModel, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], **kwargs: Any
) -> np.ndarray:
    """R(y) of each response (float64 [N]): Σ_t r_t (token model) or o(y) (outcome model)."""
    vals = head_values(rm, prompts, responses, **kwargs)
    return np.array([v[1:].sum() if rm.kind == "token" else v[-1] for v in vals], np.float64)
