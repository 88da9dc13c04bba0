"""Collects `dpoq compile` reports of the Llama-3-8B DPO step (benchmarks/tpu_aot_8b.sh) into one table:
per-chip memory, fit, the largest per-chip micro-batch that fits (linear in the batch from two
compiled sizes where both exist: arguments stay, temporaries grow), model FLOPs per step and the
MFU that a given step time would mean (FLOPs / (time x chips x the chip's bf16 peak)).

    python -m benchmarks.tpu_aot_8b DIR_OF_REPORT_JSONS OUT_JSON
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from dpoq_jax.train.metrics import peak_flops

STEP_TIMES_S = (2.0, 5.0, 10.0)
# bf16 peak per chip where train.metrics.peak_flops has no entry for libtpu's device_kind
# (a v5p reports "TPU v5"); public Cloud TPU figures.
PEAK_BY_KIND = {"TPU v5": 459e12, "TPU v4": 275e12}


def summarise(name: str, r: dict) -> dict:
    chips = r["chips"]
    peak = PEAK_BY_KIND.get(r["device_kind"]) or peak_flops(r["device_kind"])
    per_chip_micro = r["batch_size"] // r["micro_batches"] // chips
    row = {
        "name": name, "topology": r["topology"], "device_kind": r["device_kind"], "chips": chips,
        "mesh": r["mesh"], "lora_rank": r.get("lora_rank", 0), "batch_size": r["batch_size"],
        "micro_batches": r["micro_batches"], "per_chip_micro_batch": per_chip_micro, "seq_len": r["seq_len"],
        "peak_gib_per_chip": r["peak_gib"], "argument_gib": r["argument_gib"], "temp_gib": r["temp_gib"],
        "hbm_gib": r["hbm_gib"], "fits": r["fits"], "model_flops_per_step": r["flops_per_step"],
        "chip_peak_flops": peak, "compile_s": r["compile_s"],
    }  # fmt: skip
    if peak:
        total = chips * peak
        row["mfu_at_step_s"] = {f"{t:g}": r["flops_per_step"] / (t * total) for t in STEP_TIMES_S}
        row["step_s_at_mfu"] = {f"{m:g}": r["flops_per_step"] / (m * total) for m in (0.3, 0.5)}
    return row


def largest_fit(rows: list[dict]) -> dict:
    """Per topology and LoRA rank: from two compiled per-chip sizes, peak = a + b * size; the
    largest power-of-two size under the chip's HBM (an estimate where it was not compiled)."""
    out = {}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["topology"], r["lora_rank"]), []).append(r)
    for (topo, rank), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["per_chip_micro_batch"])
        key = f"{topo} lora{rank}" if rank else f"{topo} full"
        fitting = [r["per_chip_micro_batch"] for r in rs if r["fits"]]
        entry = {
            "compiled_sizes": [r["per_chip_micro_batch"] for r in rs],
            "largest_compiled_fit": max(fitting, default=None),
        }
        if len(rs) >= 2 and rs[-1]["per_chip_micro_batch"] != rs[0]["per_chip_micro_batch"]:
            a, b = rs[0], rs[-1]
            slope = (b["peak_gib_per_chip"] - a["peak_gib_per_chip"]) / (
                b["per_chip_micro_batch"] - a["per_chip_micro_batch"]
            )
            base = a["peak_gib_per_chip"] - slope * a["per_chip_micro_batch"]
            n = 1
            while base + slope * 2 * n <= a["hbm_gib"] * 0.95:
                n *= 2
            entry.update(gib_per_example=slope, fixed_gib=base, estimated_largest_power_of_two=n,
                         note="linear fit of two compiled sizes, 5% HBM margin; not compiled")  # fmt: skip
        out[key] = entry
    return out


def main(argv: list[str]) -> None:
    src, out = argv
    rows = [
        summarise(os.path.basename(p)[:-5], json.load(open(p))) for p in sorted(glob.glob(f"{src}/*.json"))
    ]
    rows = [r for rep in rows for r in (rep if isinstance(rep, list) else [rep])]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    doc = {"command": "bash benchmarks/tpu_aot_8b.sh", "commit": commit, "model": "benchmarks/llama3-8b.json",
           "config": "experiments/configs/tldr_pythia2p8b_dpo.py (prefix_shared rows of 768, bf16 compute, f32 "
                     "params, remat full, frozen bf16 reference, RMSprop, fsdp over all chips)",
           "runs": rows, "largest_fit": largest_fit(rows)}  # fmt: skip
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in rows:
        print(f"{r['name']}: {r['topology']} {r['chips']} chips lora={r['lora_rank']} batch {r['batch_size']} "
              f"peak {r['peak_gib_per_chip']:.2f}/{r['hbm_gib']} GiB fits={r['fits']} flops {r['model_flops_per_step']:.3g}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
