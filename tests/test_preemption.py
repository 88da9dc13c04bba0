"""Preemption (SIGTERM / SIGINT) of `dpoq train` in subprocesses: every process stops after the same
step with a committed checkpoint of it and exit status 75; rerunning resumes bit for bit (metrics
rows, final parameters, HF export equal to an uninterrupted run). One process, stopped three times
(once during an asynchronous save), and a real two-process jax.distributed (gloo) run where only one
process gets the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    SFT_REFERENCE_ARGS,
    SFT_TINY,
    TWO_PROCESS_ARGS,
    dpoq_train,
    finish,
    steps_on_disk,
    two_processes,
    without_timing,
)

from dpoq_jax.train.faults import EXIT_PREEMPTED

slow = pytest.mark.slow


def rows(workdir: Path) -> list[dict]:  # none before the run's first row (polled while it starts)
    return without_timing(workdir, missing_ok=True)


def signal_when(procs: list[subprocess.Popen], ready, sig=signal.SIGTERM, timeout: float = 240) -> bool:
    """Sends `sig` to procs[0] as soon as ready() holds (polled every 2 ms); False if it ended first."""
    end = time.time() + timeout
    while time.time() < end and procs[0].poll() is None:
        if ready():
            procs[0].send_signal(sig)
            return True
        time.sleep(0.002)
    return False


def train_rows_after(workdir: Path, n: int):
    path = workdir / "metrics.jsonl"
    return lambda: path.exists() and path.read_text().count('"split": "train"') >= n


def check_stopped(out: str, workdir: Path, ref: list[dict], signame: str = "SIGTERM") -> int:
    """The run stopped after the step of its newest train row, with a checkpoint of exactly that step,
    and everything it wrote so far equals the uninterrupted run's start."""
    assert f"stopped by {signame} after step" in out, out[-2000:]
    got = rows(workdir)
    last = max(r["step"] for r in got if r["split"] == "train")
    assert steps_on_disk(workdir)[-1] == last  # nothing after the agreed step lost, nothing more run
    assert got == ref[: len(got)]
    assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())  # the save committed
    return last


# conftest's sft_reference, checkpointed asynchronously
ARGS = [*SFT_REFERENCE_ARGS, "--config.checkpoint.every_steps=8", "--config.checkpoint.keep=3",
        "--config.checkpoint.async_save=true"]  # fmt: skip


@slow
def test_sigterm_three_times_then_resume_bitwise(tmp_path, sft_reference):
    ref = rows(sft_reference)
    work = tmp_path / "spot"

    def saving() -> bool:  # an asynchronous save in flight (orbax's temporary step directory)
        ckpt = work / "checkpoints"
        return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir()) and len(rows(work)) > 14

    stopped = []
    for ready, sig in (
        (train_rows_after(work, 3), signal.SIGTERM),
        (saving, signal.SIGTERM),
        (train_rows_after(work, 27), signal.SIGINT),
    ):
        proc = dpoq_train(SFT_TINY, work, *ARGS)
        assert signal_when([proc], ready, sig), "the run ended before the signal"
        out = finish(proc, EXIT_PREEMPTED)
        stopped.append(check_stopped(out, work, ref, signal.Signals(sig).name))
    assert stopped == sorted(stopped) and stopped[-1] < 40, stopped
    finish(dpoq_train(SFT_TINY, work, *ARGS))

    assert rows(work) == ref
    assert (work / "hf" / "model.safetensors").read_bytes() == (
        sft_reference / "hf" / "model.safetensors"
    ).read_bytes()
    assert len(steps_on_disk(work)) <= 3  # checkpoint.keep holds with the extra preemption steps


SIGNALLED_FIRST = (1, 0)  # two_processes' procs[0] is process 1: the one that gets the signal


ARGS2 = [*TWO_PROCESS_ARGS, "--config.checkpoint.every_steps=10"]  # conftest's two_process_reference


@slow
def test_two_processes_sigterm_one_both_stop_at_the_same_step(tmp_path, two_process_reference):
    ref = rows(two_process_reference)
    work = tmp_path / "spot"
    procs = two_processes(work, *ARGS2, ids=SIGNALLED_FIRST)
    assert signal_when(procs, train_rows_after(work, 5)), "the run ended before the signal"
    outs = [finish(p, EXIT_PREEMPTED) for p in procs]
    assert "SIGTERM received" in outs[0] and "SIGTERM received" not in outs[1]
    assert "stopped by a signal on another process" in outs[1] or "stopped by SIGTERM" in outs[1]
    check_stopped(outs[0], work, ref)
    for p in two_processes(work, *ARGS2, ids=SIGNALLED_FIRST):
        finish(p)
    assert rows(work) == ref
    assert (work / "hf" / "model.safetensors").read_bytes() == (
        two_process_reference / "hf" / "model.safetensors"
    ).read_bytes()


def test_stop_signals_flag_the_first_signal_and_restore_the_handlers():
    from dpoq_jax.train.faults import StopSignals, agree_stop

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested and not agree_stop(stop.requested)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signame == "SIGTERM" and agree_stop(stop.requested)
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: still finishing the step
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before
