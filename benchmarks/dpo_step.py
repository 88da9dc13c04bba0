"""Measure the DPO train step for each layout and option, against the PyTorch/transformers step.

    python -m benchmarks.dpo_step --shapes pythia-14m --pairs 4            # CPU, a few minutes
    bash benchmarks/gpu_run.sh                                             # H100: Pythia-1B and 2.8B

A case is LAYOUT/REFERENCE/LOGPS:
  layout     padded | prefix_shared | packed   (dpoq_jax.data.layouts)
  reference  frozen_fp32 | frozen_bf16 (frozen reference parameters, forward in the step)
             | precomputed (per-token reference log-probs in the batch, computed once beforehand)
             | none (SimPO, reference-free: no reference parameters, no reference forward; not in
               `--cases all`, e.g. --interleave --cases padded/frozen_fp32/lean,padded/none/lean)
  logps      lean (dpoq_jax.train.step: hidden states gathered at response positions, chunked
             unembedding, no B×T×V array) | full (logits at every row position, float32
             log-softmax over all of them: what a straightforward implementation does)
The step is the real one (`train.step.make_train_step` on a `TrainState`, AdamW, one micro-batch);
only `full` swaps in a loss function that builds the full logits. Each case runs in its own process
(clean peak-memory numbers; JAX and torch never share a GPU) unless --no-isolate.
Results: benchmarks/results/<device>.json (+ .png), a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks import shapes

LAYOUTS = ("padded", "prefix_shared", "packed")
REFERENCES = ("frozen_fp32", "frozen_bf16", "precomputed")
REFERENCE_FREE = "none"  # a reference-free objective (SimPO) in place of sigmoid DPO
LOGPS = ("lean", "full")
# What each option costs, one change at a time from padded/frozen_fp32/lean, then every layout with
# the cheapest reference.
DEFAULT_CASES = (
    "padded/frozen_fp32/full",
    "padded/frozen_fp32/lean",
    "padded/frozen_bf16/lean",
    "padded/precomputed/lean",
    "prefix_shared/frozen_fp32/lean",
    "packed/frozen_fp32/lean",
    "prefix_shared/precomputed/lean",
    "packed/precomputed/lean",
)
RESULTS_DIR = pathlib.Path(__file__).parent / "results"
RESULT_PREFIX = "BENCHMARK_RESULT "


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str
    reference: str
    logps: str

    @property
    def name(self) -> str:
        return f"{self.layout}/{self.reference}/{self.logps}"

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split("/")
        refs = REFERENCES + (REFERENCE_FREE,)
        if len(parts) != 3 or parts[0] not in LAYOUTS or parts[1] not in refs or parts[2] not in LOGPS:
            raise ValueError(
                f"benchmarks/dpo_step.py: bad case {text!r}; expected LAYOUT/REFERENCE/LOGPS with "
                f"LAYOUT in {LAYOUTS}, REFERENCE in {refs}, LOGPS in {LOGPS}"
            )
        return cls(*parts)


def all_cases() -> list[str]:
    return [Case(a, b, c).name for a in LAYOUTS for b in REFERENCES for c in LOGPS]


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a case needs besides the case itself (JSON round-trips to the worker process)."""

    shape: str
    pairs: int
    seed: int = 0
    steps: int = 3
    warmup: int = 1
    lengths: str = "tldr"  # shapes.LENGTHS: "tldr" (the benchmark) or "short" (smoke tests)
    packed_row_len: int = 0  # 0: twice the padded row length
    param_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU (like the torch step), float32 on CPU
    compute_dtype: str = "auto"
    chunk_size: int = 512
    remat: str = "none"  # ModelConfig.remat: none | full | dots
    attention: str = "auto"  # Decoder(attention=...): auto | xla (masked reference) | cudnn | splash
    beta: float = 0.1
    lr: float = 1e-6

    @property
    def dist(self) -> shapes.LengthDistribution:
        return shapes.LENGTHS[self.lengths]

    @property
    def row_len(self) -> int:
        return self.dist.row_len

    @property
    def packed_len(self) -> int:
        return self.packed_row_len or 2 * self.row_len

    def pairs_list(self):
        return shapes.synthetic_pairs(
            self.pairs, shapes.hf_config(self.shape)["vocab_size"], self.seed, dist=self.dist
        )

    def dtypes(self, platform_name: str) -> tuple[str, str]:
        accel = platform_name != "cpu"
        pd = self.param_dtype if self.param_dtype != "auto" else ("bfloat16" if accel else "float32")
        cd = self.compute_dtype if self.compute_dtype != "auto" else ("bfloat16" if accel else "float32")
        return pd, cd


# ----------------------------------------------------------------------------------------------
# Batches and FLOPs


def layout_batch(setup: Setup, case: Case, pairs) -> dict[str, np.ndarray]:
    """The layout's numpy batch for `pairs` (packed: as few rows of packed_len as fit)."""
    from dpoq_jax.data import layouts

    R = setup.dist.response_max
    if case.layout == "packed":
        S = setup.packed_len
        return layouts.preference_batch(
            pairs, "packed", seq_len=S, response_len=R, num_rows=layouts.rows_needed(pairs, S)
        )
    return layouts.preference_batch(pairs, case.layout, seq_len=setup.row_len, response_len=R)


def step_flops(shape: str, case: Case | None, batch_shape: dict[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one step (shapes.forward_flops): policy 3 forward passes, frozen reference 1.
    `case=None` is the torch step (padded rows, full logits, frozen reference)."""
    N, S = batch_shape["tokens"]
    P, R = batch_shape["chosen_targets"]
    full = case is None or case.logps == "full"
    fwd = shapes.forward_flops(shape, N, S, unembedded=None if full else 2 * P * R)
    passes = 3 + (case is None or case.reference not in ("precomputed", REFERENCE_FREE))
    return passes * fwd


def padded_equiv_flops(shape: str, pairs: int, row_len: int) -> float:
    """FLOPs of the plain DPO step on the same pairs: padded rows, full logits, frozen reference
    (what the torch step computes). MFU on this is proportional to pairs/s across all cases."""
    return 4 * shapes.forward_flops(shape, 2 * pairs, row_len)


# ----------------------------------------------------------------------------------------------
# One JAX case


def _full_logps_loss(graphdef, rest, loss_config, causal_rows: bool):
    """The DPO loss with full logits: every row position's logits, float32 log-softmax over all of
    them (B×T×V float32), then gathered. Only for measuring what the lean log-probs save."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dpoq_jax import losses

    def logps(params, batch):
        model = nnx.merge(graphdef, params, rest)
        seg, br = (None, None) if causal_rows else (batch["segment_ids"], batch["branch_ids"])
        logits_NSV = model(batch["tokens"], batch["positions"], seg, br)
        logp_XV = jax.nn.log_softmax(logits_NSV.astype(jnp.float32), axis=-1)
        logp_XV = logp_XV.reshape(-1, logp_XV.shape[-1])
        out = []
        for side in ("chosen", "rejected"):
            lp = logp_XV[batch[f"{side}_pred_idx"], batch[f"{side}_targets"]]
            out.append(lp * batch[f"{side}_mask"])
        return out

    def loss_fn(params, ref_params, batch):
        pc, pr = logps(params, batch)
        if not loss_config.needs_reference:
            rc = rr = None
        elif ref_params is not None:
            rc, rr = jax.lax.stop_gradient(logps(ref_params, batch))
        else:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        loss, metrics = losses.preference_loss(
            pc, pr, rc, rr, batch["chosen_mask"], batch["rejected_mask"],
            config=loss_config, pair_mask_B=batch["pair_mask"],
        )  # fmt: skip
        return loss, (jnp.sum(batch["pair_mask"]), metrics)

    return loss_fn


def build_step(setup: Setup, case: Case, *, model_seed: int | None = None):
    """(jitted train step, initial TrainState, graphdef, rest, optimizer) for a case, on one device."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dpoq_jax import losses, models
    from dpoq_jax.train import mesh as mesh_lib
    from dpoq_jax.train import state as state_lib
    from dpoq_jax.train import step as step_lib

    pd, cd = setup.dtypes(jax.devices()[0].platform)
    cfg = shapes.model_config(setup.shape, remat=setup.remat)
    seed = setup.seed if model_seed is None else model_seed

    def make_model():
        dtypes = dict(param_dtype=jnp.dtype(pd), dtype=jnp.dtype(cd))
        return models.Decoder(cfg, rngs=nnx.Rngs(seed), attention=setup.attention, **dtypes)

    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    graphdef, abs_params, _ = models.abstract_split(make_model)
    p_sh = state_lib.param_shardings(abs_params, mesh, mesh_lib.DEFAULT_RULES)
    params, rest = state_lib.init_params(make_model, p_sh)
    # torch.optim.AdamW's defaults, no clipping: the same update as the torch step.
    optimizer = optax.adamw(setup.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    with_ref = case.reference not in ("precomputed", REFERENCE_FREE)
    ref_dtype = jnp.bfloat16 if case.reference == "frozen_bf16" else jnp.float32
    sh = state_lib.state_shardings(abs_params, p_sh, optimizer, mesh, with_ref)
    state = state_lib.create_train_state(params, optimizer, sh, with_ref=with_ref, ref_dtype=ref_dtype)
    # SimPO at its usual β = 2: the same work per step whatever β is
    free = case.reference == REFERENCE_FREE
    loss_config = losses.LossConfig(
        beta=2.0 if free else setup.beta, loss_type="simpo" if free else "sigmoid"
    )
    fwd = step_lib.Forward.for_layout(case.layout, setup.chunk_size)  # the attention path training takes
    if case.logps == "lean":
        loss_fn = step_lib.make_dpo_loss(graphdef, rest, loss_config, fwd)
    else:
        loss_fn = _full_logps_loss(graphdef, rest, loss_config, fwd.causal_rows)
    train_step = step_lib.make_train_step(loss_fn, optimizer, optax.constant_schedule(setup.lr))
    return jax.jit(train_step, donate_argnums=0), state, graphdef, rest, mesh


def device_batch(np_batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Numpy layout batch -> device arrays with a leading micro-batch axis of 1."""
    import jax

    from dpoq_jax.train import mesh as mesh_lib

    return {
        k: jax.device_put(v[None], mesh_lib.batch_sharding(mesh, v.ndim + 1)) for k, v in np_batch.items()
    }


def add_precomputed_reference(np_batch, params, graphdef, rest, setup: Setup) -> None:
    """Per-token reference log-probs of the initial policy, as `dpoq precompute-ref` stores them."""
    import jax

    from dpoq_jax.train import step as step_lib

    fwd = step_lib.Forward(chunk_size=setup.chunk_size)
    fn = jax.jit(lambda p, b: step_lib.layout_logps(graphdef, rest, p, b, fwd))
    rc, rr = fn(params, {k: jax.numpy.asarray(v) for k, v in np_batch.items()})
    np_batch["ref_chosen_logps"] = np.asarray(rc, np.float32)
    np_batch["ref_rejected_logps"] = np.asarray(rr, np.float32)


def prepare_jax_case(setup: Setup, case: Case) -> dict[str, Any]:
    """Build, compile and warm up one case: {"compiled", "state", "batch", "info"}."""
    import jax

    pairs = setup.pairs_list()
    np_batch = layout_batch(setup, case, pairs)
    t0 = time.perf_counter()
    jit_step, state, graphdef, rest, mesh = build_step(setup, case)
    if case.reference == "precomputed":
        add_precomputed_reference(np_batch, state.params, graphdef, rest, setup)
    init_s = time.perf_counter() - t0
    batch = device_batch(np_batch, mesh)
    t0 = time.perf_counter()
    compiled = jit_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(setup.warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    pd, cd = setup.dtypes(jax.devices()[0].platform)
    info = {
        "kind": "jax",
        "shape": setup.shape,
        "case": case.name,
        **dataclasses.asdict(case),
        "param_dtype": pd,
        "compute_dtype": cd,
        "reference_dtype": {"frozen_bf16": "bfloat16", "frozen_fp32": "float32"}.get(case.reference),
        "batch_shape": {k: list(v.shape) for k, v in np_batch.items()},
        "pairs": setup.pairs,
        "real_tokens": shapes.real_tokens(pairs),
        "init_s": init_s,
        "compile_s": compile_s,
        "memory": compiled_memory(compiled),
    }
    return {"compiled": compiled, "state": state, "batch": batch, "info": info, "times": []}


def time_steps(prep: dict[str, Any], n: int) -> None:
    """n timed steps, each ended by block_until_ready; times appended to prep["times"]."""
    import jax

    for _ in range(n):
        t0 = time.perf_counter()
        prep["state"], prep["metrics"] = prep["compiled"](prep["state"], prep["batch"])
        jax.block_until_ready((prep["state"], prep["metrics"]))
        prep["times"].append(time.perf_counter() - t0)


def finish_jax_case(prep: dict[str, Any]) -> dict[str, Any]:
    import jax

    times, metrics, memory = prep["times"], prep["metrics"], prep["info"]["memory"]
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    memory["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return prep["info"] | {
        "step_times_s": times,
        # the fastest step: on a shared machine other processes only ever add time
        "step_s": float(np.min(times)),
        "step_median_s": float(np.median(times)),
        "loss": float(metrics["loss"]),
        "finite": bool(metrics["finite"]),
    }


def run_jax_case(setup: Setup, case: Case) -> dict[str, Any]:
    """Compile, warm up and time one case; raw numbers (derived ones come from `derive`)."""
    prep = prepare_jax_case(setup, case)
    time_steps(prep, setup.steps)
    return finish_jax_case(prep)


def run_interleaved(setup: Setup, cases: list[str]) -> list[dict[str, Any]]:
    """All cases in this process, their timed steps alternated (A B C C B A ...): load drift on a
    shared machine then hits every case alike. Peak RSS is the process's, shared by all cases."""
    preps = [prepare_jax_case(setup, Case.parse(c)) for c in cases]
    for k in range(setup.steps):
        for prep in preps if k % 2 == 0 else preps[::-1]:
            time_steps(prep, 1)
    return [finish_jax_case(p) | {"interleaved": True} for p in preps]


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's memory analysis of the compiled step: arguments + outputs + temporaries − donated."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["compiled_peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def run_torch_case(setup: Setup) -> dict[str, Any]:
    from benchmarks import torch_reference

    pairs = setup.pairs_list()
    out = torch_reference.run(
        setup.shape, pairs, row_len=setup.row_len, steps=setup.steps, warmup=setup.warmup,
        beta=setup.beta, lr=setup.lr, seed=setup.seed,
    )  # fmt: skip
    out.update(
        kind="torch",
        shape=setup.shape,
        case="torch",
        pairs=setup.pairs,
        real_tokens=shapes.real_tokens(pairs),
    )
    if "skipped" not in out:
        out["batch_shape"] = {"tokens": [out["rows"], setup.row_len], "chosen_targets": [setup.pairs, 0]}
        out["memory"] = {"process_peak_rss_bytes": out.pop("peak_rss_bytes")}
        if "peak_bytes" in out:
            out["memory"]["device_peak_bytes"] = out.pop("peak_bytes")
    return out


# ----------------------------------------------------------------------------------------------
# Derived numbers, isolation, output


def derive(r: dict[str, Any], setup: Setup, device_kind: str) -> dict[str, Any]:
    """pairs/s, tokens/s, MFU on computed and padded-equivalent FLOPs, one peak-memory figure."""
    from dpoq_jax.train.metrics import peak_flops

    if "step_s" not in r:
        return r
    case = None if r["kind"] == "torch" else Case.parse(r["case"])
    flops = step_flops(r["shape"], case, r["batch_shape"])
    flops_eq = padded_equiv_flops(r["shape"], r["pairs"], setup.row_len)
    peak = peak_flops(device_kind)
    s = r["step_s"]
    N, S = r["batch_shape"]["tokens"]
    mem = r.get("memory", {})
    r.update(
        pairs_per_s=r["pairs"] / s,
        tokens_per_s=r["real_tokens"] / s,
        row_tokens_per_s=N * S / s,
        flops_step=flops,
        flops_padded_equiv=flops_eq,
        peak_flops=peak,
        mfu=None if peak is None else flops / s / peak,
        mfu_padded_equiv=None if peak is None else flops_eq / s / peak,
        # device peak where the device reports one, else XLA's compiled estimate, else process RSS
        peak_memory_bytes=mem.get("device_peak_bytes")
        or mem.get("compiled_peak_bytes")
        or mem.get("process_peak_rss_bytes"),
    )
    return r


def merge_rounds(r: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One case measured again: its step times pooled (the fastest step counts), its largest memory."""
    if "step_times_s" not in new:
        return r
    if "step_times_s" not in r:
        return new
    times = r["step_times_s"] + new["step_times_s"]
    r = dict(r, step_times_s=times, step_s=float(np.min(times)), step_median_s=float(np.median(times)))
    r["rounds"] = r.get("rounds", 1) + 1
    for k, v in new.get("memory", {}).items():
        r["memory"][k] = max(v, r["memory"].get(k, 0))
    return r


def run_isolated(what: str, setup: Setup, timeout_s: float | None) -> dict[str, Any]:
    """Run one case in a fresh Python process; its result comes back as one JSON line."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.dpo_step",
        "--worker",
        what,
        "--setup",
        json.dumps(dataclasses.asdict(setup)),
    ]
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"case": what, "shape": setup.shape, "error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"case": what, "shape": setup.shape, "error": f"exit code {proc.returncode}: {tail}"}


def run_one(what: str, setup: Setup) -> dict[str, Any]:
    try:
        return run_torch_case(setup) if what == "torch" else run_jax_case(setup, Case.parse(what))
    except Exception as e:  # one broken case must not lose the others' numbers
        import traceback

        return {
            "case": what,
            "shape": setup.shape,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-3000:],
        }


def device_name(kind: str) -> str:
    """jax device_kind -> a file name: lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def environment() -> dict[str, Any]:
    import jax

    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    dev = jax.devices()[0]
    return {
        "load_average_1m_at_start": os.getloadavg()[0],
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "versions": versions,
    }


def _fmt_bytes(b: int | None) -> str:
    return "–" if not b else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per case: speed, ratio to the torch step, MFU, peak memory, first-steps loss."""
    head = (
        "| shape | step | pairs/s | tokens/s | × torch | MFU computed | MFU padded-eq. "
        "| peak memory | process RSS | loss |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    torch_pps = {
        r["shape"]: r["pairs_per_s"]
        for r in report["results"]
        if r.get("kind") == "torch" and "pairs_per_s" in r
    }
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for r in report["results"]:
        if "pairs_per_s" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(
                f"| {r['shape']} | {r['case']} | {why.splitlines()[0][:80] if why else '–'} ||||||||"
            )
            continue
        ratio = r["pairs_per_s"] / torch_pps[r["shape"]] if r["shape"] in torch_pps else None
        lines.append(
            f"| {r['shape']} | {r['case']} | {r['pairs_per_s']:.3g} | {r['tokens_per_s']:.4g} | "
            f"{'–' if ratio is None else f'{ratio:.2f}'} | {pct(r['mfu'])} | {pct(r['mfu_padded_equiv'])} | "
            f"{_fmt_bytes(r['peak_memory_bytes'])} | {_fmt_bytes(r['memory'].get('process_peak_rss_bytes'))} "
            f"| {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
    """Horizontal bars of pairs/s per case, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "pairs_per_s" in r]
    shapes_ = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes_:
        return
    fig, axes = plt.subplots(
        len(shapes_), 1, figsize=(7, 0.45 * len(rows) + 1.5 * len(shapes_)), squeeze=False
    )
    for ax, shape in zip(axes[:, 0], shapes_, strict=True):
        rs = [r for r in rows if r["shape"] == shape]
        colors = ["tab:gray" if r["kind"] == "torch" else f"C{LAYOUTS.index(r['layout'])}" for r in rs]
        ax.barh([r["case"] for r in rs], [r["pairs_per_s"] for r in rs], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("pairs / s")
        ax.set_title(
            f"{shape}, {rs[0]['pairs']} pairs/step — {report['environment']['device_kind']}", fontsize=9
        )
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="pythia-14m", help=f"comma list of {list(shapes.PYTHIA_SHAPES)}")
    ap.add_argument("--pairs", default="4", help="pairs per step, one per shape or one for all (comma list)")
    ap.add_argument(
        "--cases", default="default", help="'default', 'all' or a comma list of LAYOUT/REFERENCE/LOGPS"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch/transformers step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case, >= 1 (fastest reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    ap.add_argument("--rounds", type=int, default=1, help="measure every case this often, order alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lengths", default="tldr", choices=tuple(shapes.LENGTHS), help="pair length distribution"
    )
    ap.add_argument(
        "--packed-row-len", type=int, default=0, help="row length of 'packed' (0: 2x the padded one)"
    )
    ap.add_argument("--param-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "xla", "cudnn", "splash"),
        help="attention path (auto: TPU splash, GPU cuDNN where exact, CPU XLA; xla: the masked reference)",
    )
    ap.add_argument(
        "--interleave", action="store_true",
        help="JAX cases of a shape in one process with their steps alternated (noisy shared CPUs)",
    )  # fmt: skip
    ap.add_argument("--no-isolate", action="store_true", help="run cases in this process (smoke tests)")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per isolated case")
    ap.add_argument(
        "--time-budget", type=float, default=None, help="stop starting cases after this many seconds"
    )
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>.json)")
    ap.add_argument("--append", action="store_true", help="add to the results already in --out")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker is not None:  # child process: one case, result as one JSON line
        print(RESULT_PREFIX + json.dumps(run_one(a.worker, Setup(**json.loads(a.setup)))), flush=True)
        return 0

    # The parent only names the device; with preallocation it would hold 75% of a GPU's memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax  # noqa: F401  (after the environment variable)

    shape_list = [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in shape_list:
        shapes.hf_config(s)  # unknown shape: clear error before any work
    pairs_list = [int(x) for x in a.pairs.split(",")]
    if len(pairs_list) == 1:
        pairs_list *= len(shape_list)
    if len(pairs_list) != len(shape_list):
        ap.error(f"--pairs has {len(pairs_list)} entries for {len(shape_list)} shapes")
    cases = {"default": list(DEFAULT_CASES), "all": all_cases()}.get(a.cases) or [
        c.strip() for c in a.cases.split(",") if c.strip()
    ]
    for c in cases:
        Case.parse(c)
    if a.steps < 1 or a.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    env = environment()
    kind = env["device_kind"]
    out = pathlib.Path(a.out) if a.out else RESULTS_DIR / f"{device_name(kind)}.json"
    report = {
        "device": device_name(kind),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.dpo_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "distribution": shapes.LENGTHS[a.lengths].describe(),
        "flop_formula": shapes.forward_flops.__doc__,
        "shapes": {s: shapes.hf_config(s) for s in shape_list},
        "peak_flops_source": "dpoq_jax.train.metrics.PEAK_FLOPS (dense bf16 datasheet); null on CPU",
        "results": [],
    }
    if a.append and out.exists():  # keep an earlier run's cases on the same device (gpu_run.sh)
        old = json.loads(out.read_text())
        report["results"] = old["results"]
        report["shapes"] = old["shapes"] | report["shapes"]
        report["earlier_commands"] = old.get("earlier_commands", []) + [f"{old['command']}  ({old['date']})"]
    start = time.perf_counter()
    for shape, n_pairs in zip(shape_list, pairs_list, strict=True):
        setup = Setup(
            shape=shape, pairs=n_pairs, seed=a.seed, steps=a.steps, warmup=a.warmup, lengths=a.lengths,
            packed_row_len=a.packed_row_len, param_dtype=a.param_dtype, compute_dtype=a.compute_dtype,
            remat=a.remat, attention=a.attention,
        )  # fmt: skip
        if a.interleave:  # torch first (its own process), then all JAX cases together
            for what in ["torch"] if not a.no_torch else []:
                r = run_one(what, setup) if a.no_isolate else run_isolated(what, setup, a.case_timeout)
                report["results"].append(derive(r | {"setup": dataclasses.asdict(setup)}, setup, kind))
            for r in run_interleaved(setup, cases):
                report["results"].append(derive(r | {"setup": dataclasses.asdict(setup)}, setup, kind))
                print(f"{shape} {r['case']}: {report['results'][-1]['pairs_per_s']:.3g} pairs/s", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            continue
        order = (["torch"] if not a.no_torch else []) + cases
        first = len(report["results"])
        for rnd in range(a.rounds):
            # Alternate the order: on a shared machine the load drifts, and no case should always go last.
            for i, what in enumerate(order if rnd % 2 == 0 else order[::-1]):
                slot = first + (i if rnd % 2 == 0 else len(order) - 1 - i)
                if a.time_budget is not None and time.perf_counter() - start > a.time_budget:
                    if rnd == 0:
                        report["results"].append(
                            {"case": what, "shape": shape, "skipped": "time budget spent"}
                        )
                    continue
                t0 = time.perf_counter()
                r = run_one(what, setup) if a.no_isolate else run_isolated(what, setup, a.case_timeout)
                r["setup"] = dataclasses.asdict(setup)
                r["wall_s"] = time.perf_counter() - t0
                if rnd == 0:
                    report["results"].append(derive(r, setup, kind))
                else:
                    report["results"][slot] = derive(merge_rounds(report["results"][slot], r), setup, kind)
                r = report["results"][slot]
                msg = (
                    f"{r['pairs_per_s']:.3g} pairs/s"
                    if "pairs_per_s" in r
                    else (r.get("skipped") or r.get("error", ""))[:300]
                )
                print(f"[{time.perf_counter() - start:6.0f}s] round {rnd} {shape} {what}: {msg}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(
                    json.dumps(report, indent=1) + "\n"
                )  # after each case: a timeout keeps the rest
    report["environment"]["load_average_1m_at_end"] = os.getloadavg()[0]
    table = markdown_table(report)
    report["markdown"] = table
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not a.no_plot:
        plot(report, out.with_suffix(".png"))
    print(f"\n{kind}, {report['date']}\n\n{table}\n\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
