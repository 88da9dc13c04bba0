"""Attention memory per layout at Pythia-2.8B shapes, from TPU ahead-of-time compiles (no TPU needed).

One layer's attention, forward and backward (gradient of a weighted sum w.r.t. q, k, v), compiled for
one TPU chip: the masked XLA path (the reference; what prefix_shared/packed ran before the fused path)
against the fused path (`models/attention.py`, Pallas splash). Reports the compiled temporaries.

    JAX_PLATFORMS=cpu python -m benchmarks.attention_aot --out benchmarks/results/attention_aot.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpoq_jax.models import attention as A
from dpoq_jax.train.aot import GiB, topology_devices

H, F = 32, 80  # Pythia-2.8B: 32 heads of 80


def layout_ids(layout: str, N: int, S: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Segment/branch ids of full rows: prefix_shared one pair per row (prompt 60%, responses 20% each),
    packed two such pairs per row, padded one sequence per row (no ids: plain causal)."""
    if layout == "padded":
        return None, None
    seg, br = np.zeros((N, S), np.int32), np.zeros((N, S), np.int32)
    groups = 1 if layout == "prefix_shared" else 2
    g = S // groups
    for n in range(N):
        for i in range(groups):
            s = i * g
            lp, lr = int(0.6 * g), int(0.2 * g)
            seg[n, s : s + g] = i + 1
            br[n, s + lp : s + lp + lr] = 1
            br[n, s + lp + lr : s + g] = 2
    return seg, br


def measure(layout: str, S: int, impl: str, N: int, device) -> dict:
    seg, br = layout_ids(layout, N, S)
    sh = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((N, S, H, F), jnp.bfloat16, sharding=sh)

    def attend(q, k, v):
        if seg is None:
            if impl == "xla":
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
            return A.causal_segments(q, k, v, None, impl, True)
        s, b = jnp.asarray(seg), jnp.asarray(br)
        if impl == "xla":
            return A.masked_attention(q, k, v, s, b)
        return A.layout_attention(q, k, v, s, b, impl)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32))

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    mem = compiled.memory_analysis()
    return {
        "layout": layout,
        "seq_len": S,
        "rows": N,
        "attention": impl,
        "temp_gib": round(mem.temp_size_in_bytes / GiB, 4),
        "argument_gib": round(mem.argument_size_in_bytes / GiB, 4),
        "compile_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5e:1x1")
    p.add_argument("--rows", type=int, default=8, help="rows per chip")
    p.add_argument("--out", default="benchmarks/results/attention_aot.json")
    args = p.parse_args()
    _, devices = topology_devices(args.topology)
    rows = []
    for S in (512, 2048):
        for layout in ("padded", "prefix_shared", "packed"):
            for impl in ("xla", "splash"):
                r = measure(layout, S, impl, args.rows, devices[0])
                print(json.dumps(r), flush=True)
                rows.append(r)
    meta = {"command": "JAX_PLATFORMS=cpu python -m benchmarks.attention_aot", "topology": args.topology,
            "device_kind": devices[0].device_kind, "heads": H, "head_dim": F, "dtype": "bfloat16"}
    with open(args.out, "w") as f:
        json.dump({**meta, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
