"""Optimizers: optax AdamW or RMSprop behind global-norm clipping, with warm-up then a decay schedule."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from dpoq_jax.train.schema import OptimGroup

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "rmsprop")


def make_schedule(
    lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant", end_factor: float = 0.0
) -> optax.Schedule:
    """Linear warm-up, lr·min(1, (step+1)/(warmup_steps+1)) as in the original DPO code (so the first
    update is not wasted at lr 0), then constant, linear or cosine decay to `end_factor * lr` at
    `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")

    def warmup(count):
        return lr * jnp.minimum(1.0, (count + 1.0) / (warmup_steps + 1.0))

    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, lr * end_factor, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(cfg: OptimGroup, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Optimizer and schedule from the run's `optim` group (schema.OptimGroup, or a ConfigDict group):
    name, lr, warmup_steps, schedule, end_factor, clip_norm (<= 0: no clipping), weight_decay,
    b1, b2, eps (AdamW) and decay, eps (RMSprop)."""
    schedule = make_schedule(cfg.lr, cfg.warmup_steps, total_steps, cfg.schedule, cfg.end_factor)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "rmsprop":
        # torch.optim.RMSprop (the DPO reference code) adds eps outside the square root: eps_in_sqrt=False.
        opt = optax.rmsprop(schedule, decay=cfg.decay, eps=cfg.eps, eps_in_sqrt=False)
        if cfg.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    else:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule
