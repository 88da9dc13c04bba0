"""The same DPO step in dpoq, TRL's DPOTrainer and Tunix's DPOTrainer: same model, same batch, one run.

    python -m benchmarks.peers                          # small random Llama, TL;DR-like batch, CPU
    python -m benchmarks.peers --model smollm2 --model-dir DIR   # SmolLM2-135M-Instruct (HF folder)
    python -m benchmarks.peers --peers none --shape tiny --lengths short   # dpoq only (CI)
    bash benchmarks/peers.sh                            # the full CPU run, results committed

What it does, in order:
1. writes WORKDIR/policy (an HF Llama folder: random weights from transformers' LlamaForCausalLM for
   --model random; a copy of --model-dir for smollm2), WORKDIR/reference (the policy with seeded
   noise added to every weight: a reference that differs, so the loss checks something; with
   policy = reference every DPO loss is log 2) and WORKDIR/batch.json (TL;DR-like pairs of token
   ids, benchmarks/shapes.py; beta 0.1, lr, row lengths, buckets);
2. creates (once) the peers' virtualenvs under --venvs (default runs/peers_venvs in the working
   directory, or env DPOQ_PEERS_VENVS): trl==1.16.0 with torch==2.13.0 (CPU wheel from the local wheel folder when
   pip finds one), google-tunix==0.1.7 with the jax it needs; never the project's environment;
3. agreement: each framework's worker (benchmarks/peers_{dpoq,trl,tunix}.py, own process) computes
   the summed log-probs of every chosen and rejected response under the policy and the DPO loss
   against the reference; every dpoq layout is compared with TRL and Tunix; a difference above
   1e-4 (relative to max(1, |value|)) stops the run with the numbers;
4. timing: one worker process per case, all started and compiled first, then steps interleaved
   (A B C ... A B C ...) after --warmup rounds; per case the median step time and its spread, pairs/s
   and tokens/s, the worker's peak host memory (ru_maxrss), ratios dpoq/TRL and dpoq/Tunix;
5. writes benchmarks/results/peers_<device>.json and .png with the machine, versions and command.

float32 on CPU; --dtype bfloat16 (what benchmarks/gpu_run.sh passes on a GPU) runs every framework in
bfloat16: that path has not been measured (no GPU lent to the session that wrote it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import shapes

HERE = pathlib.Path(__file__).parent
RESULTS_DIR = HERE / "results"
# name -> Llama config.json fields. "tiny": CI; "small": the CPU benchmark (a few seconds a step on 2
# cores at the TL;DR-like shape); smollm2: SmolLM2-135M's published shape (weights from --model-dir).
LLAMA_SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=8192),
}  # fmt: skip
PEERS = {
    "trl": {"requirements": ["trl==1.16.0", "torch==2.13.0", "safetensors"], "worker": "peers_trl.py"},
    "tunix": {"requirements": ["google-tunix==0.1.7", "safetensors"], "worker": "peers_tunix.py"},
}
TOL = 1e-4


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Model and batch files


def write_random_llama(path: pathlib.Path, shape: str, seed: int) -> dict:
    """A random Llama in HF format. rope_theta is 1e6 because Tunix 0.1.7's Llama3 attention calls
    apply_rope without the config's rope_theta (its default, 1e6, is always used): with any other
    base Tunix computes another function and the agreement check stops the run (seen: 3e-4 relative
    on the summed log-probs, 5e-3 on the loss, with base 1e4)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                      tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=2,
                      eos_token_id=0, pad_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, safe_serialization=True)
    return json.loads((path / "config.json").read_text())


def write_reference(policy: pathlib.Path, reference: pathlib.Path, seed: int, scale: float) -> None:
    """The policy's weights with N(0, (scale * std of the tensor)^2) noise added, seeded."""
    from safetensors.numpy import load_file, save_file

    reference.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for f in policy.iterdir():
        if f.suffix == ".safetensors":
            out = {}
            for k, v in sorted(load_file(f).items()):
                noise = rng.standard_normal(v.shape).astype(np.float32) * scale * float(np.std(v) or 1.0)
                out[k] = (v.astype(np.float32) + noise).astype(v.dtype)
            save_file(out, reference / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, reference / f.name)


def write_inputs(workdir: pathlib.Path, args) -> dict:
    policy = workdir / "policy"
    if args.model == "random":
        hf = write_random_llama(policy, args.shape, args.seed)
    else:
        if not args.model_dir or not (pathlib.Path(args.model_dir) / "config.json").is_file():
            raise SystemExit(
                "benchmarks/peers.py: --model smollm2 needs --model-dir DIR, an HF folder of "
                "SmolLM2-135M-Instruct (config.json + model.safetensors), e.g. converted from its GGUF"
            )
        shutil.copytree(args.model_dir, policy)
        hf = json.loads((policy / "config.json").read_text())
    write_reference(policy, workdir / "reference", args.seed + 1, args.ref_noise)
    dist = shapes.LENGTHS[args.lengths]
    pairs = shapes.synthetic_pairs(args.pairs, hf["vocab_size"], args.seed, dist=dist)
    step = 16 if dist.row_len <= 64 else 64
    spec = {
        "pairs": [
            {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            for p in pairs
        ],  # fmt: skip
        "beta": args.beta,
        "lr": args.lr,
        "row_len": dist.row_len,
        "response_len": dist.response_max,
        "buckets": list(range(step, 2 * dist.row_len + 1, step)),
        "dtype": args.dtype,
        "vocab_size": hf["vocab_size"],
        "eos_id": 0,
        "pad_id": 1,
        "real_tokens": shapes.real_tokens(pairs),
        "lengths": dist.describe(),
    }
    (workdir / "batch.json").write_text(json.dumps(spec))
    return spec


# ----------------------------------------------------------------------------------------------
# Virtualenvs and workers


def ensure_venv(root: pathlib.Path, name: str) -> pathlib.Path:
    """root/name/bin/python with PEERS[name]'s pinned requirements, created once (a marker file
    records what was installed; a venv without it, or with other pins, is rebuilt)."""
    req = PEERS[name]["requirements"]
    venv = root / name
    marker = venv / "dpoq_peers.json"
    py = venv / "bin" / "python"
    if py.exists() and marker.exists() and json.loads(marker.read_text()).get("requirements") == req:
        return py
    log(f"creating the {name} virtualenv in {venv} ({' '.join(req)}); several minutes")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *req], check=True)
    marker.write_text(json.dumps({"requirements": req}))
    return py


def worker_cmd(
    name: str, pythons: dict, workdir: pathlib.Path, mode: str, case: str | None = None
) -> list[str]:
    if name == "dpoq":
        cmd = [sys.executable, "-m", "benchmarks.peers_dpoq", str(workdir), mode]
    else:
        cmd = [str(pythons[name]), str(HERE / PEERS[name]["worker"]), str(workdir), mode]
    return cmd + ([case] if case else [])


def worker_env(name: str) -> dict:
    env = dict(os.environ)
    if name == "dpoq":
        env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    else:  # the peer's venv alone: no project path, no JAX settings of ours beyond the platform
        env.pop("PYTHONPATH", None)
    env.setdefault("JAX_PLATFORMS", "cpu" if not _has_gpu() else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _tagged(stdout: str, tag: str) -> Any:
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    return None


def run_check(name: str, pythons: dict, workdir: pathlib.Path, timeout: float, cases=()) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(worker_cmd(name, pythons, workdir, "check") + list(cases), capture_output=True, text=True,
                       env=worker_env(name), timeout=timeout, cwd=HERE.parent)  # fmt: skip
    out = _tagged(p.stdout, "CHECK")
    if p.returncode != 0 or out is None:
        raise SystemExit(
            f"benchmarks/peers.py: the {name} check failed (exit {p.returncode}):\n{p.stderr[-4000:]}"
        )
    log(f"{name} check done in {time.perf_counter() - t0:.0f} s")
    return out


class Worker:
    """One bench process: READY after loading (and, for dpoq, compiling), then one STEP per "step"."""

    def __init__(self, name: str, case: str | None, pythons: dict, workdir: pathlib.Path):
        self.name, self.case = name, case
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(worker_cmd(name, pythons, workdir, "bench", case), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1,
                                     env=worker_env(name), cwd=HERE.parent)  # fmt: skip
        self.times: list[float] = []
        self.ready = self._read("READY")
        self.label = self.ready.get("case", name)

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        self.err.seek(0)
        raise SystemExit(f"benchmarks/peers.py: worker {self.name} {self.case or ''} ended before {tag}:\n"
                         f"{self.err.read()[-4000:]}")  # fmt: skip

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read("STEP")["s"])

    def finish(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        done = self._read("DONE")
        self.proc.wait(timeout=120)
        return done


# ----------------------------------------------------------------------------------------------
# Agreement


def agreement(checks: dict[str, dict]) -> dict:
    """Largest |difference| / max(1, |value|) of the per-response log-probs and of the loss, for each
    dpoq layout against each peer (and between the peers)."""
    dpoq = checks["dpoq"]
    peers = [k for k in checks if k != "dpoq"]

    def diff(a: dict, b: dict) -> dict:
        out = {}
        for key in ("logps_chosen", "logps_rejected", "loss"):
            x, y = (
                np.atleast_1d(np.asarray(a[key], np.float64)),
                np.atleast_1d(np.asarray(b[key], np.float64)),
            )
            out[key] = float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))))
            out[key + "_abs"] = float(np.max(np.abs(x - y)))
        return out

    rows = {}
    base = next(iter(dpoq))
    for layout, vals in dpoq.items():  # the layouts against each other (the first, padded)
        if layout != base:
            rows[f"dpoq {layout} vs dpoq {base}"] = diff(vals, dpoq[base])
    for layout, vals in dpoq.items():
        for peer in peers:
            rows[f"dpoq {layout} vs {peer}"] = diff(vals, checks[peer])
    if len(peers) == 2:
        rows[f"{peers[0]} vs {peers[1]}"] = diff(checks[peers[0]], checks[peers[1]])
    return rows


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("random", "smollm2"), default="random")
    p.add_argument("--model-dir", default="", help="smollm2: an HF folder of SmolLM2-135M-Instruct")
    p.add_argument("--shape", choices=sorted(LLAMA_SHAPES), default="small", help="--model random: size")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lengths", choices=sorted(shapes.LENGTHS), default="tldr")
    p.add_argument("--peers", default="trl,tunix", help="comma list of trl, tunix; or none")
    p.add_argument("--cases", default=",".join(_dpoq_cases()), help="dpoq cases (benchmarks/peers_dpoq.py)")
    p.add_argument("--steps", type=int, default=7, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation, caches)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--ref-noise", type=float, default=0.5, help="reference = policy + this x std noise")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--venvs", default=os.environ.get("DPOQ_PEERS_VENVS", "runs/peers_venvs")
    )
    p.add_argument("--workdir", default="", help="where the model and batch files go (default: a temp dir)")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/peers_<device>.json)")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check (not for results)")
    p.add_argument("--check-only", action="store_true", help="the agreement check alone, printed")
    p.add_argument("--timeout", type=float, default=900, help="seconds for each check process")
    return p.parse_args(argv)


def _dpoq_cases() -> tuple[str, ...]:
    from benchmarks.peers_dpoq import CASES

    return CASES


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg()}  # fmt: skip
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if _has_gpu():
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["gpu"] = q.stdout.strip()
    return info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    peers = [] if args.peers in ("", "none") else args.peers.split(",")
    for name in peers:
        if name not in PEERS:
            raise SystemExit(f"benchmarks/peers.py: unknown peer {name!r}; choose from {sorted(PEERS)}")
    cases = [c for c in args.cases.split(",") if c]
    started = datetime.datetime.now(datetime.UTC)
    tmp = None
    if args.workdir:
        workdir = pathlib.Path(args.workdir)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dpoq_peers_")
        workdir = pathlib.Path(tmp.name)
    try:
        spec = write_inputs(workdir, args)
        log(f"model and batch in {workdir}: {args.pairs} pairs, {spec['real_tokens']} real tokens")
        pythons = {name: ensure_venv(pathlib.Path(args.venvs), name) for name in peers}

        checks, agree = {}, {}
        if not args.no_check:
            checks["dpoq"] = run_check("dpoq", pythons, workdir, args.timeout, cases)
            for name in peers:
                checks[name] = run_check(name, pythons, workdir, args.timeout)
            agree = agreement(checks)
            worst = max((v[k] for v in agree.values() for k in v if not k.endswith("_abs")), default=0.0)
            log(f"agreement: largest relative difference {worst:.2e} (tolerance {TOL:g})")
            if worst > TOL:
                print(json.dumps({"checks": checks, "agreement": agree}, indent=1))
                raise SystemExit(f"benchmarks/peers.py: the frameworks disagree by {worst:.2e} > {TOL:g}; "
                                 "numbers above; no timing done")  # fmt: skip

        if args.check_only:
            print(json.dumps({"checks": checks, "agreement": agree}, indent=1))
            return {"checks": checks, "agreement": agree}
        workers = [Worker("dpoq", c, pythons, workdir) for c in cases]
        workers += [Worker(name, None, pythons, workdir) for name in peers]
        log("all workers ready: " + ", ".join(w.label for w in workers))
        load = []
        for r in range(args.warmup + args.steps):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                t = w.step()
                if r >= args.warmup:
                    w.times.append(t)
            load.append(os.getloadavg()[0])
            log(
                f"round {r + 1}/{args.warmup + args.steps}: "
                + " ".join(f"{w.times[-1]:.2f}" if w.times else "-" for w in workers)
            )
        results = []
        for w in workers:
            done = w.finish()
            t = np.asarray(w.times)
            med = float(np.median(t))
            results.append({
                "case": w.label, "framework": w.name, **{k: v for k, v in w.ready.items() if k != "case"},
                "step_times_s": w.times, "step_median_s": med,
                "step_q25_s": float(np.quantile(t, 0.25)), "step_q75_s": float(np.quantile(t, 0.75)),
                "step_min_s": float(t.min()), "step_max_s": float(t.max()),
                "pairs_per_s": args.pairs / med, "tokens_per_s": spec["real_tokens"] / med,
                "pairs_per_s_spread": [args.pairs / float(t.max()), args.pairs / float(t.min())],
                "peak_rss_bytes": done.get("peak_rss_bytes"), "loss_last": done.get("loss_last"),
            })  # fmt: skip
        by_fw = {r["framework"]: r for r in results if r["framework"] != "dpoq"}
        for r in results:
            if r["framework"] == "dpoq":
                for name, peer in by_fw.items():
                    r[f"ratio_vs_{name}"] = r["pairs_per_s"] / peer["pairs_per_s"]
        versions = {r["framework"]: r.get("versions") for r in results if r.get("versions")}
        out = {
            "command": "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"),
            "machine": machine() | {"load_avg_per_round": load, "shared": "loaded by other processes (several "
                                    "agents on 2 cores): medians over interleaved rounds, spread given"},
            "versions": versions | {"dpoq_jax": _dpoq_versions()},
            "model": {"kind": args.model, "shape": args.shape if args.model == "random" else "smollm2",
                      "config": json.loads((workdir / "policy" / "config.json").read_text())},
            "batch": {"pairs": args.pairs, "real_tokens": spec["real_tokens"], "lengths": spec["lengths"],
                      "prompt_lens": [len(p["prompt_ids"]) for p in spec["pairs"]],
                      "response_lens": [[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in spec["pairs"]],
                      "buckets": spec["buckets"], "row_len": spec["row_len"]},
            "step": {"beta": args.beta, "lr": args.lr, "optimizer": "AdamW (0.9, 0.999, 1e-8, wd 0.01), no clipping",
                     "loss": "sigmoid", "dtype": args.dtype, "warmup_rounds": args.warmup, "timed_rounds": args.steps},
            "checks": checks,
            "agreement": agree,
            "tolerance": TOL,
            "results": results,
        }  # fmt: skip
        path = (
            pathlib.Path(args.out)
            if args.out
            else RESULTS_DIR / f"peers_{'gpu' if _has_gpu() else 'cpu'}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        try:
            chart(out, path.with_suffix(".png"))
        except ImportError:
            log("matplotlib missing: no chart")
        print(table(out))
        log(f"wrote {path}")
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def _dpoq_versions() -> dict:
    import importlib.metadata as md

    return {k: md.version(k) for k in ("jax", "flax", "optax")}


def table(out: dict) -> str:
    peers = [r["framework"] for r in out["results"] if r["framework"] != "dpoq"]
    head = "| case | step median s [q25, q75] | pairs/s | tokens/s | peak RSS GiB |" + "".join(
        f" vs {p} |" for p in peers
    )
    lines = [head, "|" + "---|" * (5 + len(peers))]
    for r in out["results"]:
        ratios = "".join(f" {r[f'ratio_vs_{p}']:.2f}x |" if f"ratio_vs_{p}" in r else " |" for p in peers)
        rss = (r["peak_rss_bytes"] or 0) / 2**30
        lines.append(f"| {r['case']} | {r['step_median_s']:.2f} [{r['step_q25_s']:.2f}, {r['step_q75_s']:.2f}] | "
                     f"{r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {rss:.2f} |{ratios}")  # fmt: skip
    return "\n".join(lines)


def chart(out: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = out["results"]
    names = [r["case"] for r in rs]
    med = [r["pairs_per_s"] for r in rs]
    lo = [m - r["pairs_per_s_spread"][0] for m, r in zip(med, rs, strict=True)]
    hi = [r["pairs_per_s_spread"][1] - m for m, r in zip(med, rs, strict=True)]
    colors = ["tab:blue" if r["framework"] == "dpoq" else "tab:orange" for r in rs]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rs) + 1.6))
    ax.barh(names[::-1], med[::-1], xerr=[lo[::-1], hi[::-1]], color=colors[::-1], capsize=3)
    ax.set_xlabel("pairs/s (median of interleaved steps; bars: slowest to fastest step)")
    m = out["model"]
    ax.set_title(f"DPO step, {out['batch']['pairs']} TL;DR-like pairs, Llama {m['shape']}, "
                 f"{out['step']['dtype']}\n{out['machine'].get('cpu', '')} ({out['machine']['cpus']} cores, loaded)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
