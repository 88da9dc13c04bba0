"""Peak memory of full vs. memory-lean token log-probs (value and gradient), from XLA's compiled
memory analysis (no execution, so it runs on a laptop CPU).

Run:  python benchmarks/lean_logps_memory.py [--B 8 --T 512 --V 50304 --D 512 --chunk 256]
Writes benchmarks/results/lean_logps_memory_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

from dpoq_jax import tokenq


def _peak_bytes(fn, *args) -> dict[str, int]:
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    # Peak live = arguments + outputs + temporaries (aliased buffers counted once).
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "peak_bytes": int(peak),
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--V", type=int, default=50304)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256, help="positions (rows of logits) per chunk")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    h = jax.ShapeDtypeStruct((a.B, a.T, a.D), jnp.float32)
    w = jax.ShapeDtypeStruct((a.D, a.V), jnp.float32)
    t = jax.ShapeDtypeStruct((a.B, a.T), jnp.int32)
    m = jax.ShapeDtypeStruct((a.B, a.T), jnp.float32)

    def full(h, w, t, m):
        return tokenq.token_logps(jnp.einsum("btd,dv->btv", h, w), t, m).sum()

    def lean(h, w, t, m):
        return tokenq.lean_token_logps(h, w, t, m, chunk_size=a.chunk).sum()

    res = {
        "platform": jax.devices()[0].platform,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "shape": {"B": a.B, "T": a.T, "V": a.V, "D": a.D},
        "chunk": a.chunk,
        "btv_float32_bytes": a.B * a.T * a.V * 4,
    }
    for name, fn in (("full", full), ("lean", lean)):
        res[f"{name}_forward"] = _peak_bytes(fn, h, w, t, m)
        res[f"{name}_grad"] = _peak_bytes(jax.grad(fn, argnums=(0, 1)), h, w, t, m)
    for kind in ("forward", "grad"):
        res[f"ratio_{kind}"] = res[f"lean_{kind}"]["peak_bytes"] / res[f"full_{kind}"]["peak_bytes"]

    default_out = pathlib.Path(__file__).parent / "results" / f"lean_logps_memory_{res['platform']}.json"
    out = pathlib.Path(a.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    mib = 2**20
    print(f"B={a.B} T={a.T} V={a.V} D={a.D} chunk={a.chunk} on {res['device']} (jax {jax.__version__})")
    for kind in ("forward", "grad"):
        f, l = res[f"full_{kind}"]["peak_bytes"], res[f"lean_{kind}"]["peak_bytes"]
        print(f"{kind:8s} full {f / mib:9.1f} MiB   lean {l / mib:9.1f} MiB   lean/full {l / f:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
