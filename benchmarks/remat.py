"""Time and memory of the DPO step at SmolLM2-135M's shape for each layout and `model.remat` policy,
with the frozen reference or precomputed reference log-probs.

    python -m benchmarks.remat                                  # SmolLM2 shape, 4 TL;DR-like pairs, CPU
    python -m benchmarks.remat --shape tiny --rounds 1 --steps 1 --out runs/remat_tiny.json   # smoke test

    python -m benchmarks.remat --cases prefix_shared/full,prefix_shared/full/precomputed --rounds 3

Each case (LAYOUT/REMAT[/precomputed], e.g. padded/none, prefix_shared/dots; precomputed: per-token
reference log-probs in the batch, computed once before timing, no reference parameters or forward
in the step, as `dpoq precompute-ref` + reference.mode="precomputed") runs in its own process (a clean peak
RSS), the cases one after another in rounds whose order alternates (load drift hits all alike); a
round gives each case `--steps` timed steps after one untimed. Per case: median step time over all
rounds, XLA's compiled temporaries (what the step needs beyond its arguments), the process's peak RSS,
the loss (the same for every policy: remat changes what is kept, not what is computed). Weights are
random (speed, not quality); the real step (train.step.make_dpo_loss in make_train_step, AdamW,
frozen float32 reference), float32. Results: benchmarks/results/remat_<device>.json and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks import shapes

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
# SmolLM2-135M-Instruct's config.json fields (Llama: 30 layers, width 576, 9 heads / 3 KV heads,
# tied embeddings); "tiny" for smoke tests.
SHAPES = {
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True),
}  # fmt: skip
DEFAULT_CASES = ("padded/none", "padded/dots", "padded/full", "prefix_shared/none", "prefix_shared/dots",
                 "prefix_shared/full")  # fmt: skip


def hf_config(shape: str) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, hidden_act="silu",
                max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, **SHAPES[shape])  # fmt: skip


def run_case(shape: str, case: str, pairs: int, steps: int, seed: int) -> dict:
    """Build, compile and time one case in this process: its numbers as a dict."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dpoq_jax import losses, models
    from dpoq_jax.data import layouts
    from dpoq_jax.train import mesh as mesh_lib
    from dpoq_jax.train import state as state_lib
    from dpoq_jax.train import step as step_lib

    layout, remat, *opts = case.split("/")
    precomputed = opts == ["precomputed"]
    if opts and not precomputed:
        raise SystemExit(f"benchmarks/remat.py: bad case {case!r}: LAYOUT/REMAT[/precomputed]")
    cfg = dataclasses.replace(models.config_from_hf(hf_config(shape)), remat=remat)
    make = lambda: models.Decoder(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)  # noqa: E731
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    graphdef, abstract, _ = models.abstract_split(make)
    p_sh = state_lib.param_shardings(abstract, mesh, mesh_lib.DEFAULT_RULES)
    params, rest = state_lib.init_params(make, p_sh)
    optimizer = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    sh = state_lib.state_shardings(abstract, p_sh, optimizer, mesh, not precomputed)
    state = state_lib.create_train_state(params, optimizer, sh, with_ref=not precomputed)
    dist = shapes.LENGTHS["tldr"]
    items = shapes.synthetic_pairs(pairs, cfg.vocab_size, seed, dist=dist)
    # rows as long as the batch needs, rounded up to 64 (the default data.bucket_step)
    buckets = list(range(64, 2 * dist.row_len + 1, 64))
    S = layouts.bucket_for(items, layout, buckets)
    np_batch = layouts.preference_batch(items, layout, seq_len=S, response_len=dist.response_max)
    fwd = step_lib.Forward.for_layout(layout)
    if precomputed:  # the reference's per-token log-probs (= the initial policy's), once, untimed
        ref = jax.jit(lambda p, b: step_lib.layout_logps(graphdef, rest, p, b, fwd))
        rc, rr = ref(state.params, {k: jnp.asarray(v) for k, v in np_batch.items()})
        np_batch["ref_chosen_logps"], np_batch["ref_rejected_logps"] = np.asarray(rc), np.asarray(rr)
    loss_fn = step_lib.make_dpo_loss(graphdef, rest, losses.LossConfig(beta=0.1), fwd)
    step = step_lib.make_train_step(loss_fn, optimizer, optax.constant_schedule(1e-5))
    batch = {k: jnp.asarray(v[None]) for k, v in np_batch.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t0)
    return {
        "case": case, "layout": layout, "remat": remat, "precomputed": precomputed, "rows": list(np_batch["tokens"].shape),
        "compile_s": compile_s, "step_times_s": times, "loss": float(metrics["loss"]),
        "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
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
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.remat", "--worker", case, "--shape", args.shape,
                   "--pairs", str(args.pairs), "--steps", str(args.steps), "--seed", str(args.seed)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # e.g. killed for memory: recorded, not fatal
                runs[case].append({"case": case, "failed": f"exit {out.returncode}: {out.stderr[-400:]}"})
            else:
                runs[case].append(json.loads(line[len("RESULT ") :]))
            print(f"[remat] round {r + 1} {case}: {runs[case][-1].get('step_times_s', 'failed')}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    results = []
    for case, rs in runs.items():
        ok = [x for x in rs if "failed" not in x]
        if not ok:
            results.append({"case": case, "failed": rs[-1]["failed"]})
            continue
        t = np.concatenate([x["step_times_s"] for x in ok])
        results.append({k: ok[0][k] for k in ("case", "layout", "remat", "precomputed", "rows", "temp_bytes", "argument_bytes", "loss")}
                       | {"step_times_s": t.tolist(), "step_median_s": float(np.median(t)),
                          "peak_rss_bytes": max(x["peak_rss_bytes"] for x in ok), "compile_s": ok[0]["compile_s"]})  # fmt: skip
    report = {
        "command": "python -m benchmarks.remat " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start_end": load},
        "shape": args.shape, "pairs": args.pairs, "lengths": "tldr", "dtype": "float32", "results": results,
    }  # fmt: skip
    path = pathlib.Path(args.out) if args.out else RESULTS_DIR / "remat_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    lines = ["| case | rows | step median s | XLA temporaries GiB | peak RSS GiB | loss |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "failed" in r:
            lines.append(f"| {r['case']} | failed: {r['failed'][:60]} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['rows'][0]} × {r['rows'][1]} | {r['step_median_s']:.2f} | "
                     f"{r['temp_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['loss']:.6f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
