"""DPO-family preference losses and the SFT term, with TRL-named metrics (pure array functions).

Inputs are per-token log-probs [B, T] of the chosen and rejected responses (0 where masked), so
per-token implicit rewards come for free. Means are over real pairs of the *global* batch: under
jax.jit with sharded inputs an ordinary mean already is; under shard_map/pmap pass `axis_name` and
the sums are psum-ed over that axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpoq_jax import tokenq

Array = jax.Array
LOSS_TYPES = ("sigmoid", "cdpo", "ipo", "hinge", "robust")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """beta: KL strength β. loss_type: one of LOSS_TYPES. label_smoothing: ε of cdpo/robust.
    ipo_average: IPO on per-token averaged log-ratios (as in TRL) instead of summed ones.
    sft_weight: weight of the NLL (mean over chosen tokens) added to the loss."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ipo_average: bool = True
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"LossConfig.loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
        if not self.beta > 0:
            raise ValueError(f"LossConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"LossConfig.sft_weight must be >= 0, got {self.sft_weight}")


def _psum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_mean(x_B: Array, w_B: Array, axis_name: str | None) -> Array:
    """Weighted mean over the global batch; 0 if it has no real entries."""
    num = _psum(jnp.sum(x_B * w_B), axis_name)
    den = _psum(jnp.sum(w_B), axis_name)
    return num / jnp.maximum(den, 1e-12)


def _global_min(x: Array, axis_name: str | None) -> Array:
    m = jnp.min(x)
    return m if axis_name is None else jax.lax.pmin(m, axis_name)


def _ref_sum(ref: Array, mask_BT: Array, name: str) -> Array:
    if ref.ndim == 2:
        return tokenq.masked_sum(ref.astype(jnp.float32), mask_BT)
    if ref.ndim == 1:
        return ref.astype(jnp.float32)
    raise ValueError(
        f"preference_loss: {name} must be per-token [B, T] or per-response sums [B], got {ref.shape}"
    )


def pair_losses(h_B: Array, config: LossConfig) -> Array:
    """Per-pair loss of the (β-free) log-ratio margin h = (log π/π_ref)(chosen) − (log π/π_ref)(rejected)."""
    beta, eps = config.beta, config.label_smoothing
    z = beta * h_B
    if config.loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(z)
    if config.loss_type == "cdpo":  # labels flipped with probability ε
        return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if config.loss_type == "robust":  # unbiased under label noise ε (Chowdhury et al. 2024)
        return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    if config.loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    if config.loss_type == "ipo":
        return (h_B - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown loss_type {config.loss_type!r}")


def preference_loss(
    policy_chosen_BT: Array,
    policy_rejected_BT: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    chosen_mask_BT: Array,
    rejected_mask_BT: Array,
    *,
    config: LossConfig,
    pair_mask_B: Array | None = None,
    axis_name: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """DPO-family loss over a batch of pairs -> (scalar loss, metrics).

    policy_*_BT: per-token policy log-probs; ref_*: per-token reference log-probs [B, T] or their
    per-response sums [B]. pair_mask_B: 1 for real pairs, 0 for dummy ones (non-negative weights
    also work: the loss is the weighted mean). Token-level metrics need per-token refs.
    """
    if policy_chosen_BT.ndim != 2 or policy_rejected_BT.ndim != 2:
        raise ValueError(
            f"preference_loss: policy log-probs must be [B, T], got {policy_chosen_BT.shape} "
            f"and {policy_rejected_BT.shape}"
        )
    for name, x, m in (
        ("chosen", policy_chosen_BT, chosen_mask_BT),
        ("rejected", policy_rejected_BT, rejected_mask_BT),
    ):
        if m.shape != x.shape:
            raise ValueError(
                f"preference_loss: {name}_mask_BT has shape {m.shape}, policy log-probs {x.shape}"
            )
    cm_BT = chosen_mask_BT.astype(jnp.float32)
    rm_BT = rejected_mask_BT.astype(jnp.float32)
    B = policy_chosen_BT.shape[0]
    pm_B = jnp.ones((B,), jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
    beta = config.beta

    pc_B = tokenq.masked_sum(policy_chosen_BT.astype(jnp.float32), cm_BT)
    pr_B = tokenq.masked_sum(policy_rejected_BT.astype(jnp.float32), rm_BT)
    rc_B = _ref_sum(ref_chosen, cm_BT, "ref_chosen")
    rr_B = _ref_sum(ref_rejected, rm_BT, "ref_rejected")
    n_c_B = jnp.maximum(jnp.sum(cm_BT, -1), 1.0)
    n_r_B = jnp.maximum(jnp.sum(rm_BT, -1), 1.0)

    if config.loss_type == "ipo" and config.ipo_average:
        h_B = (pc_B - rc_B) / n_c_B - (pr_B - rr_B) / n_r_B
    else:
        h_B = (pc_B - rc_B) - (pr_B - rr_B)
    loss = _global_mean(pair_losses(h_B, config), pm_B, axis_name)

    reward_c_B = beta * (pc_B - rc_B)
    reward_r_B = beta * (pr_B - rr_B)
    mean = lambda x_B: _global_mean(x_B, pm_B, axis_name)  # noqa: E731
    metrics = {
        "rewards/chosen": mean(reward_c_B),
        "rewards/rejected": mean(reward_r_B),
        "rewards/margins": mean(reward_c_B - reward_r_B),
        "rewards/accuracies": mean((reward_c_B > reward_r_B).astype(jnp.float32)),
        "logps/chosen": mean(pc_B),
        "logps/rejected": mean(pr_B),
        # Mean per-token log-prob of the response tokens. Not TRL's `logits/*` (the mean raw logit over
        # the vocabulary), which the loss never sees and so is not reported.
        "logps_mean/chosen": mean(pc_B / n_c_B),
        "logps_mean/rejected": mean(pr_B / n_r_B),
    }
    if config.sft_weight > 0:
        nll = _token_mean(-policy_chosen_BT.astype(jnp.float32), cm_BT, pm_B, axis_name)
        metrics["sft/nll"] = nll
        loss = loss + config.sft_weight * nll
    metrics["loss"] = loss

    if ref_chosen.ndim == 2 and ref_rejected.ndim == 2:
        for name, logps_BT, ref_BT, m_BT in (
            ("chosen", policy_chosen_BT, ref_chosen, cm_BT),
            ("rejected", policy_rejected_BT, ref_rejected, rm_BT),
        ):
            r_BT = tokenq.implicit_rewards(logps_BT, ref_BT, m_BT, beta)
            metrics[f"token_rewards/{name}_mean"] = _token_mean(r_BT, m_BT, pm_B, axis_name)
            real_BT = (m_BT * pm_B[:, None]) > 0
            metrics[f"token_rewards/{name}_min"] = _global_min(jnp.where(real_BT, r_BT, jnp.inf), axis_name)
    return loss, metrics


def _token_mean(x_BT: Array, mask_BT: Array, pm_B: Array, axis_name: str | None) -> Array:
    """Mean over all real tokens of real pairs in the global batch."""
    w_BT = mask_BT * pm_B[:, None]
    num = _psum(jnp.sum(x_BT * w_BT), axis_name)
    den = _psum(jnp.sum(w_BT), axis_name)
    return num / jnp.maximum(den, 1e-12)


def sft_loss(
    logps_BT: Array,
    mask_BT: Array,
    *,
    pair_mask_B: Array | None = None,
    axis_name: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Negative log-likelihood per real token of the global batch -> (loss, {"loss", "nll", "tokens"})."""
    if logps_BT.ndim != 2:
        raise ValueError(f"sft_loss: logps_BT must be [B, T], got {logps_BT.shape}")
    m_BT = mask_BT.astype(jnp.float32)
    B = logps_BT.shape[0]
    pm_B = jnp.ones((B,), jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
    nll = _token_mean(-logps_BT.astype(jnp.float32), m_BT, pm_B, axis_name)
    tokens = _psum(jnp.sum(m_BT * pm_B[:, None]), axis_name)
    return nll, {"loss": nll, "nll": nll, "tokens": tokens}
