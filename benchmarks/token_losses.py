"""Step time of the token-level losses against the steps they must not exceed, side by side.

    python -m benchmarks.token_losses                                  # SmolLM2 shape, 4 TL;DR-like pairs, CPU
    python -m benchmarks.token_losses --shape tiny --rounds 1 --steps 1 --out runs/token_losses_tiny.json

Cases (each in its own process, the cases one after another in rounds of alternating order):
  simpo           reference-free SimPO (β 2, γ 0.5): no reference anywhere
  selective       SePO at 30% of the tokens, oracle rewards read from a token cache every step
  token_weighted  TIS-DPO weights from a cached oracle, reference log-probs from a precomputed cache
                  (no reference parameters, no reference forward)
  dpo_frozen      sigmoid DPO with the frozen reference (the default DPO step)
  tdpo            TDPO₂ (α 0.5) with the frozen reference: + the per-token KL over the vocabulary
A timed step includes building its batch on the host (for the cached cases: reading each pair's values
from the memory-mapped cache, as `dpoq train` does), the transfer, and the jitted step (AdamW, float32,
prefix-shared rows, model.remat "full": the run config's defaults). Targets: selective and
token_weighted ≤ simpo (plus the cache read, which is in the timed step); tdpo ≤ 1.3 × dpo_frozen.
Results: benchmarks/results/token_losses_<device>.json and a table of per-round paired ratios.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import shapes
from benchmarks.remat import SHAPES, hf_config

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
CASES = ("simpo", "selective", "token_weighted", "dpo_frozen", "tdpo")
RATIOS = (("selective", "simpo", 1.0), ("token_weighted", "simpo", 1.0), ("tdpo", "dpo_frozen", 1.3))
LOSSES = {
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    "selective": dict(loss_type="selective", beta=2.0, simpo_gamma=0.5, select_ratio=0.3),
    "token_weighted": dict(loss_type="token_weighted", beta=0.1),
    "dpo_frozen": dict(loss_type="sigmoid", beta=0.1),
    "tdpo": dict(loss_type="tdpo", beta=0.1, tdpo_variant=2, tdpo_alpha=0.5),
}


def run_case(shape: str, case: str, pairs: int, steps: int, seed: int) -> dict:
    """Build, compile and time one case in this process: its numbers as a dict."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dpoq_jax import losses, models
    from dpoq_jax.data import layouts, token_cache
    from dpoq_jax.train import inputs
    from dpoq_jax.train import mesh as mesh_lib
    from dpoq_jax.train import state as state_lib
    from dpoq_jax.train import step as step_lib

    layout = "prefix_shared"
    cfg = dataclasses.replace(models.config_from_hf(hf_config(shape)), remat="full")
    make = lambda: models.Decoder(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)  # noqa: E731
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    graphdef, abstract, _ = models.abstract_split(make)
    p_sh = state_lib.param_shardings(abstract, mesh, mesh_lib.DEFAULT_RULES)
    params, rest = state_lib.init_params(make, p_sh)
    loss_cfg = losses.LossConfig(**LOSSES[case], token_values="rewards")
    frozen = case in ("dpo_frozen", "tdpo")
    optimizer = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    sh = state_lib.state_shardings(abstract, p_sh, optimizer, mesh, frozen)
    state = state_lib.create_train_state(params, optimizer, sh, with_ref=frozen)
    dist = shapes.LENGTHS["tldr"]
    items = shapes.synthetic_pairs(pairs, cfg.vocab_size, seed, dist=dist)
    buckets = list(range(64, 2 * dist.row_len + 1, 64))
    S = layouts.bucket_for(items, layout, buckets)
    fwd = step_lib.Forward.for_layout(layout)

    def build(its):
        return layouts.preference_batch(its, layout, seq_len=S, response_len=dist.response_max)

    tmp = tempfile.mkdtemp(prefix="dpoq_bench_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # each case runs in its own process
    sides = ("chosen", "rejected")
    if case in ("selective", "token_weighted"):  # the oracle's rewards: a real cache on disk
        rng = np.random.default_rng(seed)
        fields = token_cache.value_fields("token_rewards", sides)
        w = token_cache.CacheWriter(os.path.join(tmp, "oracle"), "token_rewards", fields, {})
        for it in items:
            w.add(inputs.fingerprint(it), {f: rng.normal(size=len(ids)) for f, (_, ids) in
                                           zip(fields, inputs.reference_sides(it), strict=True)})  # fmt: skip
        w.close()
        items = inputs.attach_cache(items, token_cache.TokenCache(os.path.join(tmp, "oracle")), fields, "bench")
    if case == "token_weighted":  # the reference's log-probs (= the initial policy's), once, untimed, cached
        np_batch = build(items)
        ref = jax.jit(lambda p, b: step_lib.layout_logps(graphdef, rest, p, b, fwd))
        rc, rr = jax.device_get(ref(state.params, {k: jnp.asarray(v) for k, v in np_batch.items()}))
        fields = token_cache.value_fields("reference_logps", sides)
        w = token_cache.CacheWriter(os.path.join(tmp, "ref"), "reference_logps", fields, {})
        for p, it in enumerate(items):
            w.add(inputs.fingerprint(it), {fields[0]: rc[p, : len(it.chosen_ids)],
                                           fields[1]: rr[p, : len(it.rejected_ids)]})  # fmt: skip
        w.close()
        items = inputs.attach_cache(items, token_cache.TokenCache(os.path.join(tmp, "ref")), fields, "bench")
    loss_fn = step_lib.make_dpo_loss(graphdef, rest, loss_cfg, fwd)
    step = step_lib.make_train_step(loss_fn, optimizer, optax.constant_schedule(1e-5))
    batch = {k: jnp.asarray(v[None]) for k, v in build(items).items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, build_times = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = {k: jnp.asarray(v[None]) for k, v in build(items).items()}  # the cache read is timed
        t1 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t0)
            build_times.append(t1 - t0)
    return {
        "case": case, "loss_config": LOSSES[case], "rows": list(batch["tokens"].shape[1:]), "compile_s": compile_s,
        "step_times_s": times, "batch_build_s": build_times, "loss": float(metrics["loss"]),
        "temp_bytes": int(mem.temp_size_in_bytes), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case and round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_case(args.shape, args.worker, args.pairs, args.steps, args.seed)))
        return {}
    cases = [c for c in args.cases.split(",") if c]
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load = [os.getloadavg()[0]]
    rounds: list[dict[str, dict]] = []
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    for r in range(args.rounds):
        rounds.append({})
        for case in cases if r % 2 == 0 else cases[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.token_losses", "--worker", case, "--shape", args.shape,
                   "--pairs", str(args.pairs), "--steps", str(args.steps), "--seed", str(args.seed)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                rounds[-1][case] = {"case": case, "failed": f"exit {out.returncode}: {out.stderr[-400:]}"}
            else:
                rounds[-1][case] = json.loads(line[len("RESULT ") :])
            print(f"[token_losses] round {r + 1} {case}: {rounds[-1][case].get('step_times_s', 'failed')}",
                  file=sys.stderr)  # fmt: skip
    load.append(os.getloadavg()[0])
    summary = {}
    for case in cases:
        ok = [rd[case] for rd in rounds if "failed" not in rd[case]]
        if ok:
            t = np.concatenate([x["step_times_s"] for x in ok])
            b = np.concatenate([x["batch_build_s"] for x in ok])
            summary[case] = {"step_median_s": float(np.median(t)), "batch_build_median_s": float(np.median(b)),
                             "temp_gib": ok[0]["temp_bytes"] / 2**30, "peak_rss_gib": max(x["peak_rss_bytes"] for x in ok) / 2**30,
                             "rows": ok[0]["rows"], "loss": ok[0]["loss"]}  # fmt: skip
    ratios = []
    for a, b, target in RATIOS:
        per = [np.median(rd[a]["step_times_s"]) / np.median(rd[b]["step_times_s"]) for rd in rounds
               if a in rd and b in rd and "failed" not in rd[a] and "failed" not in rd[b]]  # fmt: skip
        if per:
            med = float(np.median(per))
            ratios.append({"case": a, "vs": b, "target_max": target, "per_round": per, "median": med,
                           "holds": bool(med <= target)})  # fmt: skip
    report = {
        "command": "python -m benchmarks.token_losses " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start_end": load},
        "shape": args.shape, "pairs": args.pairs, "lengths": "tldr", "layout": "prefix_shared", "remat": "full",
        "dtype": "float32", "summary": summary, "ratios": ratios, "rounds": rounds,
    }  # fmt: skip
    path = pathlib.Path(args.out) if args.out else RESULTS_DIR / "token_losses_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    lines = ["| case | rows | step median s | of it: batch build s | XLA temp GiB | peak RSS GiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for case, s in report["summary"].items():
        lines.append(f"| {case} | {s['rows'][0]} × {s['rows'][1]} | {s['step_median_s']:.3f} | "
                     f"{s['batch_build_median_s']:.4f} | {s['temp_gib']:.2f} | {s['peak_rss_gib']:.2f} |")  # fmt: skip
    lines += ["", "| ratio | per round | median | target | holds |", "|---|---|---|---|---|"]
    for r in report["ratios"]:
        per = ", ".join(f"{x:.3f}" for x in r["per_round"])
        lines.append(f"| {r['case']} / {r['vs']} | {per} | {r['median']:.3f} | ≤ {r['target_max']} | {r['holds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
