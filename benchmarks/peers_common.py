"""What benchmarks/peers.py and its workers share (standard library only: the peers' workers run it
in their own virtualenvs, where dpoq_jax is not installed)."""

from __future__ import annotations

import json
import pathlib
import resource
import sys


def emit(tag: str, obj) -> None:
    """One result line for the parent: TAG {json}."""
    print(f"{tag} {json.dumps(obj)}", flush=True)


def read_batch(workdir: pathlib.Path) -> dict:
    """batch.json: pairs (prompt_ids, chosen_ids, rejected_ids), beta, lr, row_len, response_len,
    buckets, dtype, vocab_size, eos/pad ids."""
    return json.loads((pathlib.Path(workdir) / "batch.json").read_text())


def case_options(case: str, framework: str, allowed: set[str]) -> set[str]:
    """The options of a peer case string FRAMEWORK[/OPTION...] (e.g. "trl/ckpt/precomputed");
    an unknown framework or option is an error that names the allowed ones."""
    parts = case.split("/")
    opts = set(parts[1:])
    if parts[0] != framework or not opts <= allowed:
        raise SystemExit(f"{framework} worker: bad case {case!r} (expected {framework}[/OPTION...], "
                         f"options {sorted(allowed)})")  # fmt: skip
    return opts


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(tag_ready: dict, step, done) -> None:
    """The bench protocol: READY, then one STEP per "step" line on stdin, DONE at "quit"."""
    emit("READY", tag_ready)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            emit("STEP", {"s": step()})
        elif cmd == "quit":
            break
    emit("DONE", done())
