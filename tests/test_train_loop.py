"""Training loop: exact resume after a crash (and past an interrupted checkpoint write), the
non-finite stop with the last good checkpoint intact, precomputed == frozen reference."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from test_train_step import tiny_config

from dpoq_jax.train.checkpoint import RunCheckpoints
from dpoq_jax.train.loop import TIMING_KEYS, NonFiniteError, setup, train
from dpoq_jax.train.metrics import read_metrics
from dpoq_jax.train.precompute import precompute_reference


def loop_config(stage: str, steps: int = 6):
    c = tiny_config(stage, data=-1, fsdp=1, tensor=1)  # data parallel over the 8 CPU devices
    c.train.num_steps = steps
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.eval_batches = 1
    c.train.progress_bar = False
    c.checkpoint.every_steps = 2
    c.model.hf_export = False
    return c


def params_np(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def rows_without_timing(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(workdir)]


class Crash(Exception):
    pass


def test_resume_after_crash_is_bitwise_exact(tmp_path):
    cfg = loop_config("sft")
    full = train(cfg, str(tmp_path / "full"))

    def crash_at_5(step, batch):
        if step == 4:  # after the checkpoint of step 4 and the eval of step 3
            raise Crash
        return batch

    work = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(cfg, work, batch_hook=crash_at_5)
    ckpt_dir = os.path.join(work, "checkpoints")
    assert RunCheckpoints(ckpt_dir, every_steps=1, keep=3).all_steps() == [2, 4]
    # a save cut short leaves only orbax's temporary directory: it must be ignored
    os.makedirs(os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1234567", "params"))
    assert max(read_metrics(work), key=lambda r: r["step"])["step"] == 4
    resumed = train(cfg, work)

    for a, b in zip(params_np(full.state), params_np(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert rows_without_timing(work) == rows_without_timing(str(tmp_path / "full"))
    rows = read_metrics(work)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
    with open(os.path.join(work, "config.json")) as f:
        assert json.load(f)["stage"] == "sft"
    assert os.listdir(os.path.join(work, "tb"))  # TensorBoard event file


def test_nonfinite_steps_are_skipped_then_stop_with_good_checkpoint(tmp_path):
    cfg = loop_config("sft", steps=8)
    cfg.checkpoint.every_steps = 1
    cfg.train.max_consecutive_nonfinite = 2

    def nan_batches(step, batch):
        if step == 1 or step >= 3:  # one isolated NaN batch, then NaNs for good
            batch = dict(batch, completion_mask=np.full_like(batch["completion_mask"], np.nan))
        return batch

    work = str(tmp_path / "nan")
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        train(cfg, work, batch_hook=nan_batches)
    rows = {r["step"]: r for r in read_metrics(work, "train")}
    assert rows[2]["finite"] == 0 and rows[2]["skipped"] == 1  # skipped, training went on
    assert rows[3]["finite"] == 1 and rows[3]["nonfinite_streak"] == 0
    assert rows[5]["nonfinite_streak"] == 2 and rows[5]["skipped"] == 3
    ckpts = RunCheckpoints(os.path.join(work, "checkpoints"), every_steps=1, keep=3)
    assert ckpts.latest_step() == 4  # the stop (step 5) wrote nothing
    run = setup(cfg, devices=jax.devices()[:1])
    s3, _ = ckpts.restore(3, run.abstract, run.shardings)
    s4, _ = ckpts.restore(4, run.abstract, run.shardings)
    for a, b in zip(params_np(s3), params_np(s4), strict=True):
        assert np.isfinite(b).all()
        np.testing.assert_array_equal(a, b)  # the skipped step 4 did not touch the parameters
    ckpts.close()


def test_precomputed_reference_equals_frozen(tmp_path):
    cfg = loop_config("dpo", steps=3)
    cfg.train.eval_every = 0
    out = str(tmp_path / "ref.jsonl")
    n = precompute_reference(cfg, out)
    assert n == cfg.data.num_examples + cfg.data.num_eval
    with open(out) as f:
        row = json.loads(f.readline())
    assert set(row) == {"fingerprint", "split", "ref_chosen_logps", "ref_rejected_logps"}
    frozen = train(cfg, str(tmp_path / "frozen"))
    cfg.reference.mode = "precomputed"
    cfg.reference.logps_path = out
    pre = train(cfg, str(tmp_path / "pre"))
    assert pre.state.ref_params is None
    for key in ("loss", "rewards/margins", "token_rewards/chosen_mean", "eval/rewards/accuracies"):
        np.testing.assert_allclose(pre.metrics[key], frozen.metrics[key], rtol=1e-5, atol=1e-6)


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    """orbax refuses relative checkpoint paths; `dpoq train --workdir runs/x` must still work."""
    from dpoq_jax.train.checkpoint import RunCheckpoints

    monkeypatch.chdir(tmp_path)
    ckpts = RunCheckpoints("runs/x/checkpoints", every_steps=1, keep=1, async_save=False)
    assert ckpts.directory == str(tmp_path / "runs/x/checkpoints")
    assert ckpts.latest_step() is None
