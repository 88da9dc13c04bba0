"""End-to-end runs of `dpoq train` in subprocesses (slow): kill -9 and resume bit for bit, a real
two-process jax.distributed run == one process, and SFT then DPO on error_injection to > 0.9
held-out preference accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    DPO,
    DPO_TINY,
    SFT,
    SFT_REFERENCE_ARGS,
    SFT_TINY,
    TWO_PROCESS_ARGS,
    dpoq_train,
    finish,
    kill_when,
    without_timing,
)

from dpoq_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_kill9_and_resume_bitwise(tmp_path, sft_reference):
    args = [*SFT_REFERENCE_ARGS, "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=true"]

    work = tmp_path / "killed"
    ckpt = work / "checkpoints"

    def saving() -> bool:  # orbax writes a step into a temporary directory, renamed when complete
        return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())

    def mid_run() -> bool:
        steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
        return bool(steps) and max(steps) >= 20 and (work / "metrics.jsonl").stat().st_size > 0

    killed_saving = kill_when(dpoq_train(SFT_TINY, work, *args), saving)
    killed_mid = kill_when(dpoq_train(SFT_TINY, work, *args), mid_run)
    assert killed_saving or killed_mid, "the run finished before it could be killed"
    finish(dpoq_train(SFT_TINY, work, *args))

    ref_bytes = (sft_reference / "hf" / "model.safetensors").read_bytes()
    assert (work / "hf" / "model.safetensors").read_bytes() == ref_bytes
    assert without_timing(work) == without_timing(sft_reference)


def test_two_processes_equal_one(tmp_path, two_process_reference):
    """conftest's two_process_reference (a real two-process jax.distributed run) == one process with two
    devices, same settings."""
    finish(dpoq_train(DPO_TINY, tmp_path / "one", *TWO_PROCESS_ARGS, devices=2))
    two = two_process_reference
    one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(two))
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at {a['step']}")
    assert (two_process_reference / "hf" / "model.safetensors").exists()


def test_sft_then_dpo_error_injection_accuracy(tmp_path):
    """The documented CPU workflow: SFT, then DPO from it; held-out preference accuracy > 0.9."""
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    finish(
        dpoq_train(SFT, sft, "--config.train.progress_bar=false", devices=1), timeout=600
    )
    out = finish(
        dpoq_train(
            DPO,
            dpo,
            "--config.train.progress_bar=false",
            f"--config.model.path={sft}",
            devices=1,
        ),
        timeout=600,
    )
    evals = read_metrics(str(dpo), "eval")
    assert [e["step"] for e in evals] == [50, 100, 150, 200]
    assert evals[-1]["rewards/accuracies"] > 0.9, out[-2000:]
    assert (dpo / "hf" / "config.json").exists()


def test_hf_export_starts_a_dpo_run(tmp_path):
    """SFT exports WORKDIR/hf; DPO with model.init=hf starts from it (policy == reference: loss log 2)."""
    finish(
        dpoq_train(SFT_TINY, tmp_path / "sft", "--config.train.num_steps=3", devices=1)
    )
    finish(
        dpoq_train(
            DPO_TINY,
            tmp_path / "dpo",
            "--config.model.init=hf",
            f"--config.model.path={tmp_path / 'sft' / 'hf'}",
            "--config.train.num_steps=1",
            "--config.model.hf_export=false",
            devices=1,
        )
    )
    (first,) = read_metrics(str(tmp_path / "dpo"), "train")
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)
    assert first["rewards/margins"] == 0.0
    assert not (tmp_path / "dpo" / "hf").exists()
