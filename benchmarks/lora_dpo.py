"""LoRA-DPO against full-parameter DPO on the error_injection synthetic task: held-out preference
accuracy (implicit reward of chosen > rejected) of both, from the same SFT model, on the CPU.

Run:  python benchmarks/lora_dpo.py --workdir DIR [--rank 8 --alpha 16 --lora-lr 1e-2]
SFT (800 steps) once into DIR/sft, then DIR/dpo_full and DIR/dpo_lora (200 steps each, the packaged
synthetic.py:error_injection:dpo config; LoRA changes only model.lora and the learning rate). Writes
benchmarks/results/lora_dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax

from dpoq_jax.train.config import load_config
from dpoq_jax.train.loop import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "dpoq_jax" / "configs"


def _run(spec: str, overrides: list[str], workdir: str) -> tuple[dict, float]:
    cfg = load_config(str(CONFIGS / spec), ["--config.train.progress_bar=false", *overrides])
    t0 = time.perf_counter()
    result = train(cfg, workdir)
    return result.metrics, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "lora_dpo.json"))
    a = ap.parse_args(argv)
    sft = os.path.join(a.workdir, "sft")
    _, sft_s = _run("synthetic.py:error_injection:sft", ["--config.model.hf_export=false"], sft)
    common = [f"--config.model.path={sft}", "--config.model.hf_export=false"]
    full, full_s = _run("synthetic.py:error_injection:dpo", common, os.path.join(a.workdir, "dpo_full"))
    lora_over = [f"--config.model.lora.rank={a.rank}", f"--config.model.lora.alpha={a.alpha}",
                 f"--config.optim.lr={a.lora_lr}"]
    dpo = "synthetic.py:error_injection:dpo"
    lora, lora_s = _run(dpo, common + lora_over, os.path.join(a.workdir, "dpo_lora"))
    keys = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss")
    res = {
        "task": "error_injection (synthetic), tiny Llama (2 layers, D=64), DPO beta=0.1, 200 x 32 pairs",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}",
        "command": f"python benchmarks/lora_dpo.py --workdir DIR --rank {a.rank} --alpha {a.alpha} "
        f"--lora-lr {a.lora_lr}",
        "lora": {"rank": a.rank, "alpha": a.alpha, "lr": a.lora_lr, "targets": "q,k,v,o,gate,up,down"},
        "full": {k: full[k] for k in keys} | {"wall_s": round(full_s, 1)},
        "lora_run": {k: lora[k] for k in keys} | {"wall_s": round(lora_s, 1)},
        "sft_wall_s": round(sft_s, 1),
    }
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
