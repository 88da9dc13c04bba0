"""Soak run: the tiny model for thousands of steps with frequent checkpoints, evals and TensorBoard
writes; host memory (RSS), step time, open file descriptors and the checkpoint count must stay flat.

Run:  python benchmarks/soak.py [--steps 3000 --checkpoint-every 20 --eval-every 50 --keep 3]
Every step (through train()'s batch_hook, in the training thread) records RSS (/proc/self/statm),
open descriptors (/proc/self/fd) and the wall time; every 10 steps the number of step directories
in WORKDIR/checkpoints. The report gives least-squares slopes over the run after a warm-up (the first
20 %: compilation, allocator growth), per 1000 steps, and writes benchmarks/results/soak_cpu.json +
.png. tests/test_soak.py runs a short version (a few hundred steps) with the same checks.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "dpoq_jax" / "configs"
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# The tests' tiny config (synthetic.py's `tiny` size: a metrics.jsonl line and TensorBoard scalars at
# every step) plus the soak's own overrides.
CONFIG = f"{CONFIGS / 'synthetic.py'}:error_injection:sft:tiny"
TINY = [
    "--config.train.eval_batches=2",
    "--config.model.hf_export=false",
    "--config.checkpoint.async_save=true",
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak(workdir: str, steps: int, checkpoint_every: int, eval_every: int, keep: int) -> dict[str, Any]:
    """Trains and samples; returns the raw samples (lists by step)."""
    from dpoq_jax.train.config import load_config
    from dpoq_jax.train.loop import train

    cfg = load_config(
        CONFIG,
        [
            *TINY,
            f"--config.train.num_steps={steps}",
            f"--config.checkpoint.every_steps={checkpoint_every}",
            f"--config.checkpoint.keep={keep}",
            f"--config.train.eval_every={eval_every}",
        ],
    )
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    s: dict[str, list] = {"step": [], "t": [], "rss": [], "fds": [], "ckpt_step": [], "ckpts": []}

    def hook(step: int, batch: dict) -> dict:
        s["step"].append(step)
        s["t"].append(time.perf_counter())
        s["rss"].append(rss_bytes())
        s["fds"].append(open_fds())
        if step % 10 == 0 and ckpt_dir.is_dir():
            s["ckpt_step"].append(step)
            s["ckpts"].append(sum(p.name.isdigit() for p in ckpt_dir.iterdir()))
        return batch

    t0 = time.perf_counter()
    train(cfg, workdir, batch_hook=hook)
    s["wall_s"] = time.perf_counter() - t0
    s["ckpts_final"] = sum(p.name.isdigit() for p in ckpt_dir.iterdir())
    from dpoq_jax.train.metrics import read_metrics

    rows = read_metrics(workdir, "train")
    s["step_time_s"] = [r["step_time_s"] for r in rows]  # the jitted step alone, by step
    return s


def slope_per_1k(y: Any, x: Any) -> float:
    """Least-squares slope of y against x, per 1000 x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0] * 1000)


def analyze(s: dict[str, Any], warmup: float = 0.2) -> dict[str, Any]:
    steps = np.asarray(s["step"])
    n = len(steps)
    k = int(n * warmup)
    x = steps[k:]
    wall = np.diff(np.asarray(s["t"]))  # hook to hook: step + metrics + eval + checkpoint work
    rss_mb = np.asarray(s["rss"]) / 2**20
    fds = np.asarray(s["fds"])
    st = np.asarray(s["step_time_s"]) * 1000
    half = len(x) // 2
    return {
        "steps": n,
        "warmup_steps": int(k),
        "wall_s": round(s["wall_s"], 1),
        "rss_mb": {
            "start": round(float(rss_mb[k]), 1),
            "end": round(float(rss_mb[-1]), 1),
            "max": round(float(rss_mb.max()), 1),
            "slope_mb_per_1k_steps": round(slope_per_1k(rss_mb[k:], x), 3),
        },
        "step_time_ms": {
            "median": round(float(np.median(st[k:])), 3),
            "median_first_half": round(float(np.median(st[k : k + half])), 3),
            "median_second_half": round(float(np.median(st[k + half :])), 3),
            "slope_ms_per_1k_steps": round(slope_per_1k(st[k:], steps[k : len(st)]), 4),
        },
        "wall_per_step_ms": {
            "median": round(float(np.median(wall[k:]) * 1000), 3),
            "slope_ms_per_1k_steps": round(slope_per_1k(wall[k:] * 1000, x[1:]), 4),
        },
        "open_fds": {
            "after_warmup": int(fds[k]),
            "max_after_warmup": int(fds[k:].max()),
            "end": int(fds[-1]),
            "first_half_max": int(fds[k : k + half].max()),
            "second_half_max": int(fds[k + half :].max()),
            # the floor: descriptors held between the checkpoint threads' transient opens (a leak raises it)
            "first_half_min": int(fds[k : k + half].min()),
            "second_half_min": int(fds[k + half :].min()),
        },
        "checkpoints": {"max_seen": int(max(s["ckpts"], default=0)), "final": int(s["ckpts_final"])},
    }


def check(
    report: dict[str, Any], keep: int, *, rss_slope_mb: float, fd_growth: int, step_time_ratio: float = 1.5
) -> list[str]:
    """What is not flat (empty: all flat)."""
    bad = []
    a = report
    if a["rss_mb"]["slope_mb_per_1k_steps"] > rss_slope_mb:
        bad.append(f"RSS grows {a['rss_mb']['slope_mb_per_1k_steps']} MB per 1000 steps (> {rss_slope_mb})")
    # the floor, not the peak: an asynchronous save holds a few files open for a moment, so peaks of a short
    # run vary by more than fd_growth (seen: 60 then 65 on CI, with fewer held at the end than after warm-up)
    if a["open_fds"]["second_half_min"] > a["open_fds"]["first_half_min"] + fd_growth:
        bad.append(f"open descriptors grow: {a['open_fds']}")
    # an asynchronous save commits the new step before the oldest is deleted: keep + 1 for a moment
    if a["checkpoints"]["max_seen"] > keep + 1 or a["checkpoints"]["final"] != keep:
        bad.append(f"more checkpoints than keep={keep} (+1 while a save commits): {a['checkpoints']}")
    st = a["step_time_ms"]
    if st["median_second_half"] > step_time_ratio * st["median_first_half"] + 1.0:
        bad.append(f"step time grows: {st}")
    return bad


def plot(s: dict[str, Any], report: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps = np.asarray(s["step"])
    ax[0].plot(steps, np.asarray(s["rss"]) / 2**20, lw=0.8)
    ax[0].set(
        title=f"RSS (slope {report['rss_mb']['slope_mb_per_1k_steps']} MB / 1k steps)",
        xlabel="step",
        ylabel="MB",
    )
    st = np.asarray(s["step_time_s"]) * 1000
    ax[1].plot(np.arange(1, len(st) + 1), st, lw=0.5, alpha=0.6)
    ax[1].set(
        title=f"step time (slope {report['step_time_ms']['slope_ms_per_1k_steps']} ms / 1k steps)",
        xlabel="step",
        ylabel="ms",
        ylim=(0, float(np.percentile(st, 99)) * 1.5),
    )
    ax[2].plot(steps, s["fds"], label="open fds")
    ax[2].step(s["ckpt_step"], s["ckpts"], where="post", label="checkpoints on disk")
    ax[2].set(title="descriptors and checkpoints", xlabel="step")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="(None: a temporary directory, removed after)")
    ap.add_argument(
        "--out", default=str(RESULTS / "soak_cpu.json"), help="JSON report; the PNG goes beside it"
    )
    ap.add_argument("--rss-slope-mb", type=float, default=20.0, help="limit: MB per 1000 steps")
    ap.add_argument("--fd-growth", type=int, default=4, help="limit: more descriptors in the second half")
    ap.add_argument(
        "--step-time-ratio",
        type=float,
        default=1.5,
        help="limit: median step time of the second half / the first half",
    )
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        s = soak(a.workdir or os.path.join(tmp, "soak"), a.steps, a.checkpoint_every, a.eval_every, a.keep)
    import jax

    report = {
        "what": "tiny Llama (1 layer, D=32), error_injection SFT, batch 8; metrics + TensorBoard every step, "
        f"checkpoint every {a.checkpoint_every} steps (async, keep {a.keep}), eval every {a.eval_every}",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__} (shared)",
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **analyze(s),
    }
    report["not_flat"] = check(
        report, a.keep, rss_slope_mb=a.rss_slope_mb, fd_growth=a.fd_growth, step_time_ratio=a.step_time_ratio
    )
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(s, report, out.with_suffix(".png"))
    print(json.dumps(report, indent=1))
    return 1 if report["not_flat"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
