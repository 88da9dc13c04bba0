"""End-to-end runs of `dpoq train` in subprocesses (slow): kill -9 and resume bit for bit, a real
two-process jax.distributed run == one process, and SFT then DPO on error_injection to > 0.9
held-out preference accuracy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpoq_jax.train.loop import TIMING_KEYS
from dpoq_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
TINY = [
    "--config.model.config.hidden_size=32",
    "--config.model.config.num_layers=1",
    "--config.model.config.intermediate_size=64",
    "--config.model.config.head_dim=8",
    "--config.model.config.rotary_dim=8",
    "--config.data.num_examples=512",
    "--config.data.num_eval=32",
    "--config.train.batch_size=8",
    "--config.train.progress_bar=false",
    "--config.train.log_every=1",
]


def dpoq_train(config: str, workdir: Path, *args: str, devices: int = 2, extra_env=None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.update(extra_env or {})
    cmd = [
        sys.executable,
        "-m",
        "dpoq_jax.cli",
        "train",
        "--config",
        str(CONFIGS / config),
        "--workdir",
        str(workdir),
        *args,
    ]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def without_timing(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """kill -9 `proc` as soon as ready() holds (polled every 2 ms); False if it ended first."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.communicate()
    return False


def test_kill9_and_resume_bitwise(tmp_path):
    args = [
        *TINY,
        "--config.train.num_steps=60",
        "--config.checkpoint.every_steps=4",
        "--config.train.eval_every=10",
        "--config.checkpoint.async_save=true",
    ]
    finish(dpoq_train("error_injection_sft.py", tmp_path / "ref", *args))

    work = tmp_path / "killed"
    ckpt = work / "checkpoints"

    def saving() -> bool:  # orbax writes a step into a temporary directory, renamed when complete
        return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())

    def mid_run() -> bool:
        steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
        return bool(steps) and max(steps) >= 24 and (work / "metrics.jsonl").stat().st_size > 0

    killed_saving = kill_when(dpoq_train("error_injection_sft.py", work, *args), saving)
    killed_mid = kill_when(dpoq_train("error_injection_sft.py", work, *args), mid_run)
    assert killed_saving or killed_mid, "the run finished before it could be killed"
    finish(dpoq_train("error_injection_sft.py", work, *args))

    ref_bytes = (tmp_path / "ref" / "hf" / "model.safetensors").read_bytes()
    assert (work / "hf" / "model.safetensors").read_bytes() == ref_bytes
    assert without_timing(work) == without_timing(tmp_path / "ref")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    args = [
        *TINY,
        "--config.model.init=random",
        "--config.model.path=",
        "--config.train.num_steps=4",
        "--config.train.eval_every=2",
        "--config.train.eval_batches=2",
        "--config.checkpoint.every_steps=2",
    ]
    finish(dpoq_train("error_injection_dpo.py", tmp_path / "one", *args, devices=2))
    port = free_port()
    procs = [
        dpoq_train(
            "error_injection_dpo.py",
            tmp_path / "two",
            *args,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            devices=1,
        )
        for i in range(2)
    ]
    for p in procs:
        finish(p)
    one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at {a['step']}")
    assert (tmp_path / "two" / "hf" / "model.safetensors").exists()


def test_sft_then_dpo_error_injection_accuracy(tmp_path):
    """The documented CPU workflow: SFT, then DPO from it; held-out preference accuracy > 0.9."""
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    finish(dpoq_train("error_injection_sft.py", sft, "--config.train.progress_bar=false", devices=1), 600)
    out = finish(
        dpoq_train(
            "error_injection_dpo.py",
            dpo,
            "--config.train.progress_bar=false",
            f"--config.model.path={sft}",
            devices=1,
        ),
        600,
    )
    evals = read_metrics(str(dpo), "eval")
    assert [e["step"] for e in evals] == [50, 100, 150, 200]
    assert evals[-1]["rewards/accuracies"] > 0.9, out[-2000:]
    assert (dpo / "hf" / "config.json").exists()


def test_hf_export_starts_a_dpo_run(tmp_path):
    """SFT exports WORKDIR/hf; DPO with model.init=hf starts from it (policy == reference: loss log 2)."""
    finish(
        dpoq_train("error_injection_sft.py", tmp_path / "sft", *TINY, "--config.train.num_steps=3", devices=1)
    )
    finish(
        dpoq_train(
            "error_injection_dpo.py",
            tmp_path / "dpo",
            *TINY,
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
