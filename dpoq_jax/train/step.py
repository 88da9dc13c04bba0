"""Pure train steps `(state, batch) -> (state, metrics)` for DPO and SFT.

The model is used functionally: `graphdef` and the non-parameter variables are closed over, the
parameters travel in the state, and `nnx.merge` rebuilds the module inside the traced function.
Batches carry a leading micro-batch axis M (gradient accumulation by lax.scan over it). A step whose
loss or gradient is not finite leaves parameters and optimizer state untouched and is counted.

No ml_collections / tensorflow import here: this module runs on the GPU machine too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpoq_jax import losses, tokenq
from dpoq_jax.data import layouts
from dpoq_jax.models import lora as lora_lib
from dpoq_jax.train.state import TrainState

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Any, Batch], tuple[Array, tuple[Array, dict[str, Array]]]]

ROW_KEYS = ("tokens", "positions", "segment_ids", "branch_ids")


@dataclasses.dataclass(frozen=True)
class Forward:
    """How the rows of a layout batch go through the model; built once from the run config
    (train/setup.forward_for) and passed whole to every loss and log-prob function.

    chunk_size: response positions per chunk of the lean log-probs (tokenq.lean_token_logps).
    causal_rows: each row is one right-padded sequence (the "padded" layout), so plain causal
      attention gives every real token exactly what the segment mask would; the model then builds no
      [N, S, S] mask and can take the cuDNN kernel on GPU.
    one_segment_per_row: one right-padded segment per row ("prefix_shared"), which lets the GPU's
      fused layout attention take cuDNN (models/attention.py).
    lora: params are LoRA adapters on the frozen base held in ref_params (model_states).
    """

    chunk_size: int = 512
    causal_rows: bool = False
    one_segment_per_row: bool = False
    lora: bool = False

    @classmethod
    def for_layout(cls, layout: str, chunk_size: int = 512, lora: bool = False) -> Forward:
        """"padded" rows hold one right-padded sequence each, "prefix_shared" rows one right-padded
        pair (or SFT sequence) each; "packed" rows several segments (the full layout mask)."""
        return cls(chunk_size, layout == "padded", layout == "prefix_shared", lora)


def _hidden_and_unembed(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: Batch, fwd: Forward):
    """Forward the layout rows -> flat hidden [N*S, D], unembedding [D, V] and the final-logit soft-cap
    (Gemma 2) or None."""
    model = nnx.merge(graphdef, *(params if isinstance(params, tuple) else (params,)), rest)
    seg, br = (None, None) if fwd.causal_rows else (batch["segment_ids"], batch["branch_ids"])
    tokens, positions = batch["tokens"], batch["positions"]
    one = fwd.one_segment_per_row
    hidden_NSD = model(tokens, positions, seg, br, return_hidden=True, one_segment_per_row=one)
    N, S, D = hidden_NSD.shape
    return hidden_NSD.reshape(N * S, D), model.unembedding(), model.cfg.final_softcap


def response_logps(
    hidden_XD: Array,
    unembed_DV: Array,
    pred_idx_PR: Array,
    targets_PR: Array,
    mask_PR: Array,
    chunk_size: int,
    softcap: float | None = None,
) -> Array:
    """Per-token log-probs [P, R] of responses, gathered from flat row positions (CONTRACTS §2)."""
    h_PRD = jnp.take(hidden_XD, pred_idx_PR, axis=0)
    return tokenq.lean_token_logps(
        h_PRD, unembed_DV, targets_PR, mask_PR, chunk_size=chunk_size, softcap=softcap
    )


PAIR, SINGLE = layouts.PAIR_SIDES, layouts.SINGLE_SIDES  # a preference batch's responses; an SFT/outcome one


def layout_logps(
    graphdef: nnx.GraphDef,
    rest: Any,
    params: Any,
    batch: Batch,
    fwd: Forward,
    log_sum_sq: bool = False,
    sides: tuple[str, ...] = PAIR,
) -> tuple[Array, ...]:
    """Per-token log-probs [P, R] of the responses of a layout batch (`sides`: the chosen and rejected of
    pairs, or SINGLE: the one completion of an SFT or outcome batch); with log_sum_sq also their
    log Σ_v π(v)² [P, R] (WPO's weights; no gradient), from the same forward."""
    h, w, cap = _hidden_and_unembed(graphdef, params, rest, batch, fwd)
    out, extra = [], []
    for side in sides:
        idx, mask = batch[f"{side}_pred_idx"], batch[f"{side}_mask"]
        out.append(response_logps(h, w, idx, batch[f"{side}_targets"], mask, fwd.chunk_size, cap))
        if log_sum_sq:
            h_PRD = jnp.take(h, idx, axis=0)
            extra.append(tokenq.lean_log_sum_sq_probs(h_PRD, w, mask, chunk_size=fwd.chunk_size, softcap=cap))
    return (*out, *extra)


def model_states(params: Any, ref_params: Any, lora: bool) -> tuple[tuple, tuple | None]:
    """(parameter states of the policy, of the reference or None) for nnx.merge. LoRA: params are the
    adapters and ref_params the frozen base; the reference is that base with the adapters zeroed,
    which computes exactly the base model (x W + s (x A) 0 = x W)."""
    if lora:
        return (ref_params, params), (ref_params, lora_lib.disable(params))
    return (params,), (None if ref_params is None else (ref_params,))


def reference_logps(
    graphdef: nnx.GraphDef,
    rest: Any,
    params: Any,
    ref_params: Any | None,
    batch: Batch,
    fwd: Forward,
    sides: tuple[str, ...] = PAIR,
) -> tuple[Array, ...]:
    """The reference's log-probs of each side: from frozen parameters (no gradient) when given (LoRA: the
    base, adapters off), else from the batch: per-token `ref_<side>_logps` [P, R] or per-response
    `ref_<side>_sum` [P]."""
    _, reference = model_states(params, ref_params, fwd.lora)
    if reference is not None:
        return jax.lax.stop_gradient(layout_logps(graphdef, rest, reference, batch, fwd, sides=sides))
    for kind in ("logps", "sum"):
        if all(f"ref_{side}_{kind}" in batch for side in sides):
            return tuple(batch[f"ref_{side}_{kind}"] for side in sides)
    raise ValueError(
        "DPO step: no reference. Give frozen reference parameters or precomputed "
        f"ref_<side>_logps (or ref_<side>_sum) for {sides} in the batch (`dpoq precompute-ref`)."
    )


def make_dpo_loss(
    graphdef: nnx.GraphDef, rest: Any, loss_config: losses.LossConfig, fwd: Forward = Forward()
) -> LossFn:
    """loss_fn(params, ref_params, micro_batch) -> (loss, (weight, metrics)); weight = real pairs.
    A reference-free objective (SimPO, ORPO) runs the policy forward only; WPO's weights (log Σ p²)
    come from that same forward."""

    def loss_fn(params, ref_params, batch):
        policy, _ = model_states(params, ref_params, fwd.lora)
        weighting = loss_config.use_weighting
        kl = {}
        if loss_config.needs_token_kl:  # TDPO: log-probs and the per-token KL from the same forwards
            pc, pr, rc, rr, kl_c, kl_r = tdpo_inputs(graphdef, rest, params, ref_params, batch, fwd)
            kl, lsq = {"kl_chosen_BT": kl_c, "kl_rejected_BT": kl_r}, []
            if weighting:
                raise ValueError("DPO step: loss.use_weighting (WPO) does not combine with tdpo")
        else:
            pc, pr, *lsq = layout_logps(graphdef, rest, policy, batch, fwd, log_sum_sq=weighting)
            rc, rr = (None, None)
            if loss_config.needs_reference:
                rc, rr = reference_logps(graphdef, rest, params, ref_params, batch, fwd)
        loss, metrics = losses.preference_loss(
            pc,
            pr,
            rc,
            rr,
            batch["chosen_mask"],
            batch["rejected_mask"],
            config=loss_config,
            pair_mask_B=batch["pair_mask"],
            chosen_log_sum_sq_BT=lsq[0] if lsq else None,
            rejected_log_sum_sq_BT=lsq[1] if lsq else None,
            **kl,
            **cached_token_inputs(batch, loss_config),
        )
        return loss, (jnp.sum(batch["pair_mask"]), metrics)

    return loss_fn


def cached_token_inputs(batch: Batch, loss_config: losses.LossConfig) -> dict[str, Array]:
    """token_weighted's weights and selective's oracle rewards from a token cache's values in the batch
    (`<side>_token_values`): rewards become TIS-DPO weights (losses.tis_weights with the config's μ,
    lower, upper), a cache of weights is used as it is."""
    out: dict[str, Array] = {}
    if not (loss_config.needs_token_weights or loss_config.needs_oracle_rewards):
        return out
    if "chosen_token_values" not in batch:
        raise ValueError("DPO step: loss_type token_weighted / selective needs chosen_token_values and "
                         "rejected_token_values in the batch (config key loss.token_weights: a token cache)")
    vc, vr = batch["chosen_token_values"], batch["rejected_token_values"]
    if loss_config.needs_oracle_rewards:
        out.update(chosen_oracle_BT=vc, rejected_oracle_BT=vr)
    if loss_config.needs_token_weights:
        if loss_config.token_values == "weights":
            out.update(chosen_weights_BT=vc, rejected_weights_BT=vr)
        else:
            kw = dict(lower=loss_config.tis_lower, upper=loss_config.tis_upper, mu=loss_config.tis_mu)
            out["chosen_weights_BT"] = losses.tis_weights(vc, batch["chosen_mask"], chosen=True, **kw)
            out["rejected_weights_BT"] = losses.tis_weights(vr, batch["rejected_mask"], chosen=False, **kw)
    return out


def tdpo_inputs(
    graphdef: nnx.GraphDef, rest: Any, params: Any, ref_params: Any, batch: Batch, fwd: Forward
) -> tuple[Array, ...]:
    """Per-token policy and reference log-probs [P, R] of chosen and rejected, and the per-token
    KL(π_ref(·|s_t) ‖ π(·|s_t)) [P, R] of each (tokenq.lean_token_kl: chunked over the vocabulary from
    the hidden states, never a [P, R, V] array). Needs the frozen reference (LoRA: the base): the KL
    reads its whole next-token distribution, which precomputed log-probs do not hold."""
    policy, reference = model_states(params, ref_params, fwd.lora)
    if reference is None:
        raise ValueError("DPO step: loss_type tdpo needs frozen reference parameters (reference.mode "
                         "frozen): its per-token KL reads the reference's whole distribution")
    h, w, cap = _hidden_and_unembed(graphdef, policy, rest, batch, fwd)
    hr, wr, _ = jax.lax.stop_gradient(_hidden_and_unembed(graphdef, reference, rest, batch, fwd))
    out, kls = [], []
    for side in PAIR:
        idx, mask, targets = batch[f"{side}_pred_idx"], batch[f"{side}_mask"], batch[f"{side}_targets"]
        out.append(response_logps(h, w, idx, targets, mask, fwd.chunk_size, cap))
        out.append(response_logps(hr, wr, idx, targets, mask, fwd.chunk_size, cap))
        h_PRD, hr_PRD = jnp.take(h, idx, axis=0), jnp.take(hr, idx, axis=0)
        kls.append(tokenq.lean_token_kl(h_PRD, hr_PRD, w, wr, mask, chunk_size=fwd.chunk_size, softcap=cap))
    pc, rc, pr, rr = out
    return pc, pr, rc, rr, kls[0], kls[1]


def make_outcome_loss(
    graphdef: nnx.GraphDef, rest: Any, loss_config: losses.LossConfig, fwd: Forward = Forward()
) -> LossFn:
    """Unpaired outcome-label loss (losses.outcome_loss) on an `outcome_batch`: one policy and one
    reference forward of each labelled response; weight = real responses."""
    (loss_type,) = loss_config.types

    def loss_fn(params, ref_params, batch):
        policy, _ = model_states(params, ref_params, fwd.lora)
        (logps,) = layout_logps(graphdef, rest, policy, batch, fwd, sides=SINGLE)
        (ref,) = reference_logps(graphdef, rest, params, ref_params, batch, fwd, sides=SINGLE)
        loss, metrics = losses.outcome_loss(
            logps,
            ref,
            batch["completion_mask"],
            batch["label"],
            beta=loss_config.beta,
            loss_type=loss_type,
            desirable_weight=loss_config.desirable_weight,
            undesirable_weight=loss_config.undesirable_weight,
            example_mask_B=batch["example_mask"],
        )
        return loss, (jnp.sum(batch["example_mask"]), metrics)

    return loss_fn


def make_sft_loss(graphdef: nnx.GraphDef, rest: Any, fwd: Forward = Forward()) -> LossFn:
    """NLL of completion tokens; weight = real tokens (the loss is a per-token mean)."""

    def loss_fn(params, ref_params, batch):
        policy, _ = model_states(params, ref_params, fwd.lora)  # LoRA: ref_params is the base
        (logps,) = layout_logps(graphdef, rest, policy, batch, fwd, sides=SINGLE)
        loss, metrics = losses.sft_loss(logps, batch["completion_mask"], pair_mask_B=batch["example_mask"])
        return loss, (metrics["tokens"], metrics)

    return loss_fn


def _combine(name: str, values_M: Array, w_M: Array) -> Array:
    """Reduce one metric over micro-batches: min/max as such, counts summed, the rest weighted means."""
    if name.endswith("_min"):
        return jnp.min(values_M)
    if name.endswith("_max"):
        return jnp.max(values_M)
    if name == "tokens":
        return jnp.sum(values_M)
    return jnp.sum(values_M * w_M) / jnp.maximum(jnp.sum(w_M), 1e-12)


def accumulate_grads(
    loss_fn: LossFn, params: Any, ref_params: Any, batch_M: Batch
) -> tuple[Any, dict[str, Array]]:
    """Gradient of the weighted mean of micro-batch losses (weights: real pairs or tokens), by a
    lax.scan over the leading micro-batch axis; with one micro-batch it is the plain gradient."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(g_sum, micro):
        (loss, (w, metrics)), g = grad_fn(params, ref_params, micro)
        g_sum = jax.tree.map(lambda a, b: a + w * b, g_sum, g)
        return g_sum, (w, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    g_sum, (w_M, metrics_M) = jax.lax.scan(body, zeros, batch_M)
    total = jnp.maximum(jnp.sum(w_M), 1e-12)
    grads = jax.tree.map(lambda g: g / total, g_sum)
    metrics = {k: _combine(k, v, w_M) for k, v in metrics_M.items()}
    return grads, metrics


def all_finite(tree: Any) -> Array:
    """One boolean: every floating leaf of `tree` is free of NaN and Inf (exact: no sum that could
    overflow)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """The pure step. Non-finite loss, gradient or updated parameters: no update, `skipped` and
    `nonfinite_streak` grow (so a checkpoint never holds a NaN/Inf that a step produced)."""

    def step(state: TrainState, batch_M: Batch) -> tuple[TrainState, dict[str, Array]]:
        grads, metrics = accumulate_grads(loss_fn, state.params, state.ref_params, batch_M)
        grad_norm = optax.tree.norm(grads)
        grads_ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = (state.params, state.opt_state)

        def apply(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # finite gradients can still give a non-finite update (e.g. an infinite learning rate,
            # an overflow); one elementwise pass over the new parameters catches it
            ok = all_finite(params)
            return jax.lax.cond(ok, lambda: (params, opt_state), lambda: keep) + (ok,)

        # lax.cond skips the optimizer entirely on a bad gradient (no NaN reaches the moments).
        params, opt_state, finite = jax.lax.cond(grads_ok, apply, lambda _: keep + (jnp.bool_(False),), None)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        metrics = dict(metrics)
        metrics.update(
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),  # optax counts from the update's own step
            skipped=new_state.skipped,
            nonfinite_streak=new_state.nonfinite_streak,
            finite=finite,
        )
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """Metrics of the loss on a (micro-batched) batch without an update."""

    def eval_step(state: TrainState, batch_M: Batch) -> dict[str, Array]:
        def body(_, micro):
            _, (w, metrics) = loss_fn(state.params, state.ref_params, micro)
            return None, (w, metrics)

        _, (w_M, metrics_M) = jax.lax.scan(body, None, batch_M)
        return {k: _combine(k, v, w_M) for k, v in metrics_M.items()}

    return eval_step
