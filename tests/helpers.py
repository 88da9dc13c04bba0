"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path). Fixtures
shared by several modules (`gcs`, `model_dir`) are in tests/conftest.py. A test module imports what it
shares from here, never from another test module.

- gradients: `central_difference`
- in-process training on tiny models: `TINY_MODEL`, `tiny_config`, `loop_config`, `local_batches`,
  `run_steps`
- `dpoq train` in subprocesses: `REPO`, `CONFIGS`, `SYNTHETIC`, `SFT(_TINY)`, `DPO(_TINY)`, `dpoq_train`,
  `two_processes`, `finish`, `free_port`, `kill_when`, `without_timing`, `steps_on_disk`; `BUCKET` (the
  `gcs` fixture's bucket); `SFT_REFERENCE_ARGS`, `TWO_PROCESS_ARGS` (the shared reference runs' settings)
- `dpoq` commands in this process: `run`, `assert_one_error`, `write_jsonl`, `save_tiny_model` (a tiny
  random decoder of `CLI_MODEL`, `CLI_CONTEXT` positions, with the synthetic tokenizer)
- a tiny random Hugging Face chat model: `tiny_chat_model`
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax import cli, paths
from dpoq_jax.configs.synthetic import synthetic_config
from dpoq_jax.data.synthetic import SyntheticTokenizer
from dpoq_jax.models import ModelConfig
from dpoq_jax.models.decoder import Decoder, abstract_split
from dpoq_jax.models.hf import save_hf
from dpoq_jax.train import inputs
from dpoq_jax.train.loop import TIMING_KEYS
from dpoq_jax.train.metrics import read_metrics
from dpoq_jax.train.setup import global_batch

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "tests"
CONFIGS = REPO / "dpoq_jax" / "configs"
SYNTHETIC = CONFIGS / "synthetic.py"
BUCKET = "gs://test-bucket"  # the bucket the `gcs` fixture (tests/conftest.py) creates


def central_difference(f_np, args, i: int, h: float = 1e-6) -> np.ndarray:
    """Central differences of the float64 formula f_np(*args) (a scalar) with respect to args[i]."""
    a64 = [np.asarray(x, np.float64) for x in args]
    num = np.zeros_like(a64[i])
    for idx in np.ndindex(a64[i].shape):
        plus, minus = list(a64), list(a64)
        plus[i], minus[i] = a64[i].copy(), a64[i].copy()
        plus[i][idx] += h
        minus[i][idx] -= h
        num[idx] = (f_np(*plus) - f_np(*minus)) / (2 * h)
    return num


# ---- in-process training on a tiny model ----------------------------------------------------------

TINY_MODEL = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "rotary_dim": 8,
}


def tiny_config(stage: str = "dpo", **mesh):
    c = synthetic_config("error_injection", stage)
    c.model.init = "random"
    c.model.path = ""
    c.model.config.update(TINY_MODEL)
    c.data.num_examples = 64
    c.data.num_eval = 16
    c.data.seq_len = 32
    c.data.response_len = 12
    c.train.batch_size = 8
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.mesh.update(mesh or {"data": 1, "fsdp": 1, "tensor": 1})
    return c


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


def local_batches(run, n: int, micro: int = 1):
    """n consecutive local micro-stacked batches of the training set, in order."""
    items, B = run.dataset.train, run.cfg.train.batch_size
    make = inputs.micro_batch_fn(run.cfg, B // micro)
    return [inputs.stack_micro(items[i * B : (i + 1) * B], make, micro) for i in range(n)]


def run_steps(run, batches):
    b_sh = run.batch_shardings(batches[0])
    step_fn, _ = run.compile(b_sh)
    state = run.new_state()
    losses = []
    for b in batches:
        state, m = step_fn(state, global_batch(b, b_sh))
        losses.append(float(m["loss"]))
    return state, np.array(losses)


# ---- `dpoq train` in subprocesses -------------------------------------------------------------------

# arguments of dpoq_jax/configs/synthetic.py (dpoq_train's `config`): the tiny CPU configs of the
# error_injection task, and their `tiny` size (one layer, 512 examples, batch 8, a metrics row every step),
# which benchmarks/soak.py trains too
SFT, DPO = "error_injection:sft", "error_injection:dpo"
SFT_TINY, DPO_TINY = "error_injection:sft:tiny", "error_injection:dpo:tiny"

# What the numbers of the two uninterrupted runs that tests compare against depend on (conftest's
# `sft_reference` and `two_process_reference`, each trained once per session). Checkpoint settings change
# no number (a resumed run equals an uninterrupted one, which these tests check), so each test adds its own.
SFT_REFERENCE_ARGS = ("--config.train.num_steps=40", "--config.train.eval_every=10")  # of SFT_TINY
TWO_PROCESS_ARGS = (  # of DPO_TINY from a random init, two processes (or one with two devices)
    "--config.model.init=random",
    "--config.model.path=",
    "--config.train.num_steps=12",
    "--config.train.eval_every=6",
    "--config.train.eval_batches=2",
)


def dpoq_train(
    config: str, workdir: Path | str, *args: str, devices: int = 2, extra_env=None, preexec_fn=None
) -> subprocess.Popen:
    """`dpoq train --config dpoq_jax/configs/synthetic.py:CONFIG --workdir WORKDIR ARGS` on `devices` CPU
    devices, output (stdout and stderr together) piped; `extra_env` is added to its environment, `preexec_fn`
    runs in the child before it starts (tests/test_faults.py: ignore SIGXFSZ)."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    env.update(extra_env or {})
    cmd = [
        sys.executable,
        "-m",
        "dpoq_jax.cli",
        "train",
        "--config",
        f"{SYNTHETIC}:{config}",
        "--workdir",
        str(workdir),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(
    workdir: Path, *args: str, config: str = DPO_TINY, ids=(0, 1), **kwargs
) -> list[subprocess.Popen]:
    """A real two-process jax.distributed run of `config` (one CPU device each), started in the order
    of process ids `ids`; `kwargs` go to dpoq_train."""
    port = free_port()
    return [
        dpoq_train(
            config,
            workdir,
            *args,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            devices=1,
            **kwargs,
        )
        for i in ids
    ]


def finish(proc: subprocess.Popen, rc: int = 0, timeout: float = 300) -> str:
    """The process's output, once it has ended with exit status `rc`."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == rc, out[-3000:]
    return out


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


def without_timing(workdir: Path | str, *, missing_ok: bool = False) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (local or gs://) without their timings; with `missing_ok`, none
    if the file is not there yet."""
    workdir = str(workdir)
    if missing_ok and not paths.exists(paths.join(workdir, "metrics.jsonl")):
        return []
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(workdir)]


def steps_on_disk(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


# ---- `dpoq` commands in this process ----------------------------------------------------------------

CLI_CONTEXT = 16
CLI_MODEL = ModelConfig(
    family="llama",
    vocab_size=SyntheticTokenizer.vocab_size,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    intermediate_size=32,
    max_position_embeddings=CLI_CONTEXT,
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    rotary_dim=8,
    eos_token_id=2,
    pad_token_id=0,
)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `dpoq ARGV` run in this process, as the interpreter would report it."""
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # the interpreter prints the message and exits with 1
            print(e.code, file=sys.stderr)
            rc = 1
        else:
            rc = e.code or 0
    return rc, capsys.readouterr().err


def assert_one_error(rc: int, err: str, pattern: str) -> str:
    """Status 1 or 2, no traceback, exactly one line on stderr, and it matches `pattern`."""
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def save_tiny_model(d: Path, seed: int) -> Path:
    """A random tiny decoder (CLI_MODEL; parameters from numpy's `seed`, drawn on an abstract model: no
    eager init cost) saved in folder `d` as a Hugging Face directory with the synthetic tokenizer's files."""
    graphdef, abstract, rest = abstract_split(lambda: Decoder(CLI_MODEL, rngs=nnx.Rngs(0), dtype=jnp.float32))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), abstract)
    save_hf(nnx.merge(graphdef, params, rest), CLI_MODEL, str(d))
    SyntheticTokenizer().save_pretrained(str(d))
    return d


def write_jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- a tiny random Hugging Face chat model ----------------------------------------------------------

CHAT_TEMPLATE = (  # ChatML, as SmolLM2-Instruct writes it
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_model(d: str) -> None:
    """A tiny random Llama (transformers) with the fixture chat tokenizer and CHAT_TEMPLATE, saved in `d`."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok_dir = os.path.join(HERE, "fixtures", "chat_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), d)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
