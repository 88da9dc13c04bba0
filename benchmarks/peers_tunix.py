"""Tunix worker of benchmarks/peers.py: runs in its own virtualenv (google-tunix==0.1.7 and the jax it
pulls in).

    python peers_tunix.py WORKDIR check        # per-pair summed log-probs (tunix compute_logps) and loss
    python peers_tunix.py WORKDIR bench CASE   # DPOTrainer.train(), one step per "step" line on stdin

A case is tunix[/remat]: remat sets the policy's ModelConfig.remat_config to RematConfig.DECODER
(tunix.models.llama3.model: nnx.remat over each whole decoder layer, the counterpart of dpoq's
remat "full" and TRL's gradient checkpointing); the reference only runs forward and keeps NONE.
Tunix 0.1.7's DPOTrainer has no precomputed-reference option (its _prepare_inputs always runs the
reference model when one is given), so there is no tunix/precomputed row.

The models come through Tunix's own loader: tunix.models.llama3.params.create_model_from_safe_tensors
reads WORKDIR/policy and WORKDIR/reference (HF safetensors) into its Llama3 model, the ModelConfig
written from config.json. The batch is Tunix's TrainingInput: prompts left-padded to the batch's
longest prompt, responses right-padded to its longest response (what its own tokenizing path
builds); its _prepare_inputs runs the reference forward, its jitted train step does policy forward +
backward + the optax AdamW update (torch's defaults, weight decay 0.01, no clipping).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from peers_common import case_options, emit, peak_rss_bytes, read_batch  # noqa: E402

OPTIONS = {"remat"}


def model_config(hf: dict, remat: bool = False):
    from tunix.models.llama3 import model as llama

    heads = hf["num_attention_heads"]
    return llama.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        rope_theta=int(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
        remat_config=llama.RematConfig.DECODER if remat else llama.RematConfig.NONE,
    )


def load(path: pathlib.Path, dtype, remat: bool = False):
    from tunix.models.llama3 import params

    cfg = model_config(json.loads((path / "config.json").read_text()), remat)
    return params.create_model_from_safe_tensors(str(path), cfg, mesh=None, dtype=dtype)


def training_input(spec: dict):
    import numpy as np
    from tunix.sft.dpo import dpo_trainer

    pairs, pad = spec["pairs"], spec["pad_id"]
    P = len(pairs)
    Lp = max(len(p["prompt_ids"]) for p in pairs)
    Lr = max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    arr = {k: np.full((P, n), pad, np.int32) for k, n in (("prompt", Lp), ("chosen", Lr), ("rejected", Lr))}
    mask = {k: np.zeros_like(v) for k, v in arr.items()}
    for i, p in enumerate(pairs):
        n = len(p["prompt_ids"])
        arr["prompt"][i, Lp - n :] = p["prompt_ids"]  # left-padded
        mask["prompt"][i, Lp - n :] = 1
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_ids"]
            arr[side][i, : len(ids)] = ids
            mask[side][i, : len(ids)] = 1
    return dpo_trainer.TrainingInput(
        prompt_ids=arr["prompt"], prompt_mask=mask["prompt"],
        chosen_ids=arr["chosen"], chosen_mask=mask["chosen"],
        rejected_ids=arr["rejected"], rejected_mask=mask["rejected"],
    )  # fmt: skip


def build(workdir: pathlib.Path, spec: dict, tmp: str, case: str = "tunix"):
    import jax.numpy as jnp
    import optax
    from tunix.sft import metrics_logger
    from tunix.sft.dpo import dpo_trainer

    # one dtype for parameters and compute in Tunix's loader: bfloat16 parameters with "bfloat16"
    dtype = jnp.bfloat16 if spec.get("dtype") == "bfloat16" else jnp.float32
    remat = "remat" in case_options(case, "tunix", OPTIONS)
    policy, ref = load(workdir / "policy", dtype, remat), load(workdir / "reference", dtype)
    cfg = dpo_trainer.DPOTrainingConfig(
        eval_every_n_steps=1_000_000,
        max_steps=100_000,
        beta=spec["beta"],
        max_inflight_computations=1,
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=tmp, flush_every_n_steps=1_000_000
        ),
        pbar_description=None,
    )
    opt = optax.adamw(spec["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    return dpo_trainer.DPOTrainer(model=policy, ref_model=ref, optimizer=opt, training_config=cfg)


def check(workdir: pathlib.Path, spec: dict) -> dict:
    import numpy as np
    from tunix.sft.dpo import dpo_trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(workdir, spec, tmp)
        ex = trainer._prepare_inputs(training_input(spec))
        pc, pr = dpo_trainer.compute_logps(trainer.model, ex.input_ids, ex.positions, ex.attention_mask,
                                           ex.logits_to_keep, ex.completion_mask)  # fmt: skip
        loss, _ = dpo_trainer.dpo_loss_fn(trainer.model, ex, beta=spec["beta"])
        return {"logps_chosen": np.asarray(pc, np.float64).tolist(),
                "logps_rejected": np.asarray(pr, np.float64).tolist(), "loss": float(loss),
                "rows": list(ex.input_ids.shape)}  # fmt: skip


def bench(workdir: pathlib.Path, spec: dict, case: str) -> None:
    import importlib.metadata as md

    import jax
    from flax import nnx

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(workdir, spec, tmp, case)
        example = training_input(spec)
        remat = "remat" in case_options(case, "tunix", OPTIONS)
        versions = {k: md.version(k) for k in ("google-tunix", "jax", "flax", "optax")}

        def batches():
            """One batch per "step" line; the time from handing it out to the next request (input
            preparation with the reference forward, the jitted step, the update) goes back as STEP."""
            emit(
                "READY",
                {
                    "case": "Tunix DPOTrainer" + (", remat (decoder layer)" if remat else ""),
                    "versions": versions,
                    "remat_config": "DECODER" if remat else "NONE",
                },
            )
            for line in sys.stdin:
                if line.strip() != "step":
                    return
                t0 = time.perf_counter()
                yield example
                # the trainer asks for the next batch once this step has run
                jax.block_until_ready(nnx.state(trainer.model))
                emit("STEP", {"s": time.perf_counter() - t0})

        trainer.train(batches())
    emit("DONE", {"peak_rss_bytes": peak_rss_bytes()})


def main(argv: list[str]) -> None:
    workdir, mode = pathlib.Path(argv[0]), argv[1]
    spec = read_batch(workdir)
    if mode == "check":
        emit("CHECK", check(workdir, spec))
    else:
        bench(workdir, spec, argv[2] if len(argv) > 2 else "tunix")


if __name__ == "__main__":
    main(sys.argv[1:])
