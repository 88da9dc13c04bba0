"""Token-level Q-function core: log-probs, implicit rewards, Q, V, advantages (pure array functions).

Shape letters: B batch, T time, V vocabulary, D model width. Logits at position t are the state s_t
and predict targets[:, t] = a_t (the caller aligns them). Everything is jit/vmap/pmap/shard_map-safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Array) -> Array:
    """Upcast to at least float32 (float64 stays float64, so float64 references work)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _ones_like_bt(x_BT: Array, mask_BT: Array | None) -> Array:
    return jnp.ones(x_BT.shape, x_BT.dtype) if mask_BT is None else mask_BT.astype(x_BT.dtype)


def token_logps(logits_BTV: Array, targets_BT: Array, mask_BT: Array | None = None) -> Array:
    """log π(a_t|s_t) of the target tokens; 0 where mask == 0.

    Log-softmax runs in float32 even for bfloat16 logits: bf16 logsumexp over 50k entries loses
    about two decimal digits, which is the size of a typical implicit-reward margin.
    """
    logits_BTV = _f32(logits_BTV)
    targets_BT = jnp.clip(targets_BT, 0, logits_BTV.shape[-1] - 1)  # padding ids may be out of range
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logps_BT = target_BT - lse_BT
    return logps_BT * _ones_like_bt(logps_BT, mask_BT)


def _time_chunks(x_BT: Array, chunk_size: int) -> Array:
    """[B, T, ...] -> [K, B, C, ...] with C = chunk_size // B time steps (1 to T), T zero-padded to K·C:
    the lean functions lax.scan over the K chunks, so at most ~chunk_size positions meet the
    vocabulary at once."""
    B, T = x_BT.shape[:2]
    c = min(max(1, chunk_size // B), T)
    k = -(-T // c)
    pad = [(0, 0), (0, k * c - T)] + [(0, 0)] * (x_BT.ndim - 2)
    return jnp.pad(x_BT, pad).reshape(B, k, c, *x_BT.shape[2:]).swapaxes(0, 1)


def _from_time_chunks(x_KBC: Array, T: int) -> Array:
    """[K, B, C] -> [B, T], the padding cut: the inverse of _time_chunks."""
    K, B, C = x_KBC.shape
    return x_KBC.swapaxes(0, 1).reshape(B, K * C)[:, :T]


def _chunk_logits(h_BCD: Array, unembed_DV: Array, softcap: float | None) -> Array:
    """Logits of one chunk, then the soft-cap. The matmul accumulates in (at least) float32
    without upcasting the whole unembedding matrix."""
    acc = jnp.promote_types(jnp.result_type(h_BCD, unembed_DV), jnp.float32)
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=acc)
    if softcap is not None:  # Gemma 2's final-logit soft-capping
        logits_BCV = softcap * jnp.tanh(logits_BCV / softcap)
    return logits_BCV


def _chunk_logps(h_BCD: Array, unembed_DV: Array, targets_BC: Array, softcap: float | None = None) -> Array:
    logits_BCV = _chunk_logits(h_BCD, unembed_DV, softcap)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    return jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0] - lse_BC


def lean_token_logps(
    hidden_BTD: Array,
    unembed_DV: Array,
    targets_BT: Array,
    mask_BT: Array | None = None,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> Array:
    """Same as token_logps(hidden @ unembed, ...) without ever holding B×T×V in float32
    (softcap: logits -> softcap * tanh(logits / softcap) first, as Gemma 2's model does).

    `chunk_size` is the number of positions (rows of logits) per chunk: time is cut into chunks of
    C = max(1, chunk_size // B) steps, processed by lax.scan; each chunk is wrapped in
    jax.checkpoint, so the backward pass recomputes that chunk's [B, C, V] logits instead of storing
    them. Peak extra memory is O(B · C · V) ≈ O(chunk_size · V), not O(B · T · V). Chunking time (not
    the flattened B·T) keeps the batch axis intact, so a batch-sharded input stays sharded.
    Gradients flow to hidden and unembed.
    """
    B, T, D = hidden_BTD.shape
    if unembed_DV.ndim != 2 or unembed_DV.shape[0] != D:
        raise ValueError(
            f"lean_token_logps: unembed_DV has shape {unembed_DV.shape}, expected ({D}, V) "
            f"to match hidden_BTD {hidden_BTD.shape}"
        )
    V = unembed_DV.shape[1]
    if targets_BT.shape != (B, T):
        raise ValueError(f"lean_token_logps: targets_BT has shape {targets_BT.shape}, expected {(B, T)}")
    if chunk_size <= 0:
        raise ValueError(f"lean_token_logps: chunk_size must be positive, got {chunk_size}")
    h_KBCD = _time_chunks(hidden_BTD, chunk_size)
    t_KBC = _time_chunks(jnp.clip(targets_BT, 0, V - 1), chunk_size)

    @jax.checkpoint
    def one_chunk(h_BCD: Array, t_BC: Array, w_DV: Array) -> Array:
        return _chunk_logps(h_BCD, w_DV, t_BC, softcap)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, Array]:
        h_BCD, t_BC = xs
        return carry, one_chunk(h_BCD, t_BC, unembed_DV)

    _, logps_KBC = jax.lax.scan(body, None, (h_KBCD, t_KBC))
    logps_BT = _from_time_chunks(logps_KBC, T)
    return logps_BT * _ones_like_bt(logps_BT, mask_BT)


def masked_sum(x_BT: Array, mask_BT: Array) -> Array:
    """Sum over time of the real (mask == 1) positions -> [B]."""
    return jnp.sum(x_BT * mask_BT.astype(x_BT.dtype), axis=-1)


def implicit_rewards(logps_BT: Array, ref_logps_BT: Array, mask_BT: Array, beta: float) -> Array:
    """Per-token implicit reward r_t = β(log π − log π_ref) (Eq. 10 with Q = β log π); 0 where masked."""
    return beta * (_f32(logps_BT) - _f32(ref_logps_BT)) * mask_BT.astype(jnp.float32)


def implicit_q(logits_BTV: Array, beta: float) -> Array:
    """Q(s_t, ·) = β·logits. Defined up to a per-state shift, which the softmax ignores."""
    return beta * _f32(logits_BTV)


def implicit_v(logits_BTV: Array, beta: float) -> Array:
    """V(s_t) = β log Σ_a exp(Q(s_t, a)/β) = β·logsumexp(logits) -> [B, T]."""
    return beta * jax.nn.logsumexp(_f32(logits_BTV), axis=-1)


def advantages(logits_BTV: Array, beta: float) -> Array:
    """A(s_t, ·) = Q − V = β log π(·|s_t) -> [B, T, V] (shift-invariant)."""
    return beta * jax.nn.log_softmax(_f32(logits_BTV), axis=-1)


def bellman_rewards(
    logits_BTV: Array, targets_BT: Array, ref_logps_BT: Array, mask_BT: Array, beta: float
) -> Array:
    """Invert the soft Bellman equation: r(s_t,a_t) = Q(s_t,a_t) − β log π_ref(a_t|s_t) − V(s_{t+1}).

    Q = β·logits, V = β·logsumexp(logits); V(s_{t+1}) = 0 after the last real token (EOS: terminal).
    A response cut before EOS is treated as if it ended there. Summed over a response this
    telescopes to Σ_t β log π/π_ref + V(s_0). 0 where mask == 0.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    logits_BTV = _f32(logits_BTV)
    targets_BT = jnp.clip(targets_BT, 0, logits_BTV.shape[-1] - 1)
    q_BT = beta * jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    v_BT = implicit_v(logits_BTV, beta)
    # V(s_{t+1}) is the value at the next position, counted only if that position is a real token.
    v_next_BT = jnp.pad(v_BT[:, 1:] * mask_BT[:, 1:], ((0, 0), (0, 1)))
    return (q_BT - beta * _f32(ref_logps_BT) - v_next_BT) * mask_BT


def expected_ref_reward(logits_BTV: Array, ref_logits_BTV: Array, beta: float) -> Array:
    """E_{a~π_ref(·|s_t)}[β log π(a|s_t)/π_ref(a|s_t)] = −β KL(π_ref ‖ π) ≤ 0 per state (§5.4) -> [B, T]."""
    logp_BTV = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
    ref_logp_BTV = jax.nn.log_softmax(_f32(ref_logits_BTV), axis=-1)
    return beta * jnp.sum(jnp.exp(ref_logp_BTV) * (logp_BTV - ref_logp_BTV), axis=-1)


def log_sum_sq_probs(logits_BTV: Array) -> Array:
    """log Σ_v π(v|s_t)² = logsumexp(2·logits) − 2·logsumexp(logits) -> [B, T] (WPO's alignment term)."""
    logits_BTV = _f32(logits_BTV)
    return jax.nn.logsumexp(2.0 * logits_BTV, axis=-1) - 2.0 * jax.nn.logsumexp(logits_BTV, axis=-1)


def lean_log_sum_sq_probs(
    hidden_BTD: Array,
    unembed_DV: Array,
    mask_BT: Array | None = None,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> Array:
    """log_sum_sq_probs(hidden @ unembed) chunked over time like lean_token_logps (peak extra
    memory O(chunk_size · V)), without gradient (WPO's weights are constants); 0 where masked."""
    B, T, D = hidden_BTD.shape
    if unembed_DV.ndim != 2 or unembed_DV.shape[0] != D:
        raise ValueError(
            f"lean_log_sum_sq_probs: unembed_DV has shape {unembed_DV.shape}, expected ({D}, V) "
            f"to match hidden_BTD {hidden_BTD.shape}"
        )
    if chunk_size <= 0:
        raise ValueError(f"lean_log_sum_sq_probs: chunk_size must be positive, got {chunk_size}")
    hidden_BTD, unembed_DV = jax.lax.stop_gradient(hidden_BTD), jax.lax.stop_gradient(unembed_DV)
    def body(carry: None, h_BCD: Array) -> tuple[None, Array]:
        return carry, log_sum_sq_probs(_chunk_logits(h_BCD, unembed_DV, softcap))

    _, out_KBC = jax.lax.scan(body, None, _time_chunks(hidden_BTD, chunk_size))
    out_BT = _from_time_chunks(out_KBC, T)
    return out_BT * _ones_like_bt(out_BT, mask_BT)


def token_kl(logits_BTV: Array, ref_logits_BTV: Array, mask_BT: Array | None = None) -> Array:
    """KL(π_ref(·|s_t) ‖ π(·|s_t)) = Σ_v π_ref(v)(log π_ref(v) − log π(v)) per state -> [B, T]
    (TDPO's per-token sequential KL; log-softmax in ≥ float32); 0 where mask == 0."""
    logp_BTV = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
    ref_logp_BTV = jax.nn.log_softmax(_f32(ref_logits_BTV), axis=-1)
    kl_BT = jnp.sum(jnp.exp(ref_logp_BTV) * (ref_logp_BTV - logp_BTV), axis=-1)
    return kl_BT * _ones_like_bt(kl_BT, mask_BT)


def lean_token_kl(
    h_policy_PRD: Array,
    h_ref_PRD: Array,
    unembed_policy_DV: Array,
    unembed_ref_DV: Array,
    mask_PR: Array | None = None,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> Array:
    """token_kl(h_policy @ unembed_policy, h_ref @ unembed_ref, mask) over the
    whole vocabulary without ever holding a [P, R, V] float32 array -> kl_PR (0 where masked).

    Chunked over response positions exactly like lean_token_logps: C = max(1, chunk_size // P) steps
    per chunk, lax.scan over the chunks, each chunk under jax.checkpoint, so the backward pass
    recomputes that chunk's two [P, C, V] logits instead of storing them (peak extra memory
    O(chunk_size · V)). `softcap` applies to both models' logits (the same architecture). The policy
    and reference may differ in width (D, D') but not in vocabulary. Differentiable in every input;
    gradients flow wherever the caller lets them (TDPO: policy side only, the reference inputs wrapped
    in jax.lax.stop_gradient by the caller; the loss decides which KL terms are stop-gradient).
    """
    P, R, D = h_policy_PRD.shape
    if h_ref_PRD.ndim != 3 or h_ref_PRD.shape[:2] != (P, R):
        raise ValueError(
            f"lean_token_kl: h_ref_PRD has shape {h_ref_PRD.shape}, expected ({P}, {R}, D') to match "
            f"h_policy_PRD {h_policy_PRD.shape}"
        )
    Dr = h_ref_PRD.shape[2]
    if unembed_policy_DV.ndim != 2 or unembed_policy_DV.shape[0] != D:
        raise ValueError(
            f"lean_token_kl: unembed_policy_DV has shape {unembed_policy_DV.shape}, expected ({D}, V)"
        )
    V = unembed_policy_DV.shape[1]
    if unembed_ref_DV.shape != (Dr, V):
        raise ValueError(
            f"lean_token_kl: unembed_ref_DV has shape {unembed_ref_DV.shape}, expected {(Dr, V)}"
        )
    if mask_PR is not None and mask_PR.shape != (P, R):
        raise ValueError(f"lean_token_kl: mask_PR has shape {mask_PR.shape}, expected {(P, R)}")
    if chunk_size <= 0:
        raise ValueError(f"lean_token_kl: chunk_size must be positive, got {chunk_size}")
    @jax.checkpoint
    def one_chunk(hp_PCD: Array, hr_PCD: Array, wp_DV: Array, wr_DV: Array) -> Array:
        logits_PCV = _chunk_logits(hp_PCD, wp_DV, softcap)
        ref_logits_PCV = _chunk_logits(hr_PCD, wr_DV, softcap)
        return token_kl(logits_PCV, ref_logits_PCV)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, Array]:
        hp_PCD, hr_PCD = xs
        return carry, one_chunk(hp_PCD, hr_PCD, unembed_policy_DV, unembed_ref_DV)

    chunks = (_time_chunks(h_policy_PRD, chunk_size), _time_chunks(h_ref_PRD, chunk_size))
    _, kl_KPC = jax.lax.scan(body, None, chunks)
    kl_PR = _from_time_chunks(kl_KPC, R)
    return kl_PR * _ones_like_bt(kl_PR, mask_PR)
