"""Parity with TRL 1.16's own DPOTrainer: loss and metrics of every loss type, mixture, ld_alpha,
use_weighting and f-divergence on one fixed batch of a tiny Llama whose reference differs from the
policy. The fixture (per-token log-probs and TRL's numbers) is written by benchmarks/trl_loss_fixture.py
in a TRL virtualenv; here our losses see the same per-token arrays, in float32."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax import losses

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "trl_losses.json"
DATA = json.loads(FIXTURE.read_text())
RTOL = 1e-5


def _arr(name: str) -> jnp.ndarray:
    return jnp.asarray(np.asarray(DATA[name], np.float32))


def _config(case: dict) -> losses.LossConfig:
    kw = dict(case)
    kw["loss_type"] = tuple(kw["loss_type"])
    if "loss_weights" in kw:
        kw["loss_weights"] = tuple(kw["loss_weights"])
    return losses.LossConfig(beta=DATA["beta"], **kw)


def _ours(cfg: losses.LossConfig, pair_mask=None, pad: int = 0):
    a = {k: _arr(k) for k in ("policy_chosen_PR", "policy_rejected_PR", "ref_chosen_PR", "ref_rejected_PR",
                              "chosen_mask_PR", "rejected_mask_PR", "policy_log_sum_sq_probs_chosen_PR",
                              "policy_log_sum_sq_probs_rejected_PR")}  # fmt: skip
    if pad:  # dummy pairs appended (garbage values, pair_mask 0) must not change anything
        a = {
            k: jnp.concatenate([v, jnp.full((pad, v.shape[1]), -3.0 if "mask" not in k else 1.0)])
            for k, v in a.items()
        }
    fn = jax.jit(lambda a, pm: losses.preference_loss(
        a["policy_chosen_PR"], a["policy_rejected_PR"], a["ref_chosen_PR"], a["ref_rejected_PR"],
        a["chosen_mask_PR"], a["rejected_mask_PR"], config=cfg, pair_mask_B=pm,
        chosen_log_sum_sq_BT=a["policy_log_sum_sq_probs_chosen_PR"],
        rejected_log_sum_sq_BT=a["policy_log_sum_sq_probs_rejected_PR"],
    ))  # fmt: skip
    return fn(a, pair_mask)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_fixture_is_trl_1_16_with_distinct_reference():
    assert DATA["trl_version"] == "1.16.0"
    pc, rc = np.asarray(DATA["policy_chosen_PR"]), np.asarray(DATA["ref_chosen_PR"])
    assert np.abs(pc - rc).max() > 0.5  # policy != reference: pairwise losses are not constants
    types = {t for c in DATA["cases"] for t in c["config"]["loss_type"]}
    assert types == set(losses.TRL_LOSS_TYPES)  # every TRL loss type is pinned
    assert {c["config"].get("f_divergence_type", "reverse_kl") for c in DATA["cases"]} == set(
        losses.F_DIVERGENCES
    )


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: json.dumps(c["config"], separators=(",", ":")))
def test_matches_trl(case):
    cfg = _config(case["config"])
    loss, metrics = _ours(cfg)
    worst = _rel(float(loss), case["loss"])
    assert worst <= RTOL, (float(loss), case["loss"])
    for name, want in case["metrics"].items():
        got = float(metrics[name])
        assert abs(got - want) <= RTOL * max(abs(want), 1.0), (name, got, want)


@pytest.mark.parametrize("idx", [0, 2, 8, 9, 19, 21, 25])
def test_dummy_pairs_change_nothing(idx):
    case = DATA["cases"][idx]
    cfg = _config(case["config"])
    P = len(DATA["pairs"])
    pm = jnp.concatenate([jnp.ones(P), jnp.zeros(3)])
    loss, _ = _ours(cfg, pair_mask=pm, pad=3)
    assert _rel(float(loss), case["loss"]) <= RTOL
