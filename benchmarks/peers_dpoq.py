"""dpoq worker of benchmarks/peers.py (runs in the project's environment, one process per case).

    python -m benchmarks.peers_dpoq WORKDIR check            # log-probs and loss of every case
    python -m benchmarks.peers_dpoq WORKDIR bench CASE       # then "step"/"quit" lines on stdin

WORKDIR holds what benchmarks/peers.py wrote: policy/ and reference/ (HF folders), batch.json.
A case is LAYOUT[/OPTION...]: layout padded | prefix_shared | packed; options: bucketed (rows of
the smallest of batch.json's buckets that holds the batch, else batch.json's row_len), precomputed
(reference log-probs computed once beforehand and carried in the batch, not timed), full (logits at
every row position instead of the lean log-probs), remat (the policy loaded with ModelConfig remat
"full": each decoder layer recomputed in the backward pass, the counterpart of TRL's gradient
checkpointing and Tunix's RematConfig.DECODER). The step is the real one: train.step.make_dpo_loss (or the
full-logits loss of benchmarks/dpo_step.py) in train.step.make_train_step, optax AdamW
(torch's defaults, weight decay 0.01, no clipping, constant lr), float32 on CPU. With batch.json dtype
"bfloat16": float32 parameters and optimizer state, bfloat16 compute (dpoq's mixed precision, as TRL's
bf16=True autocast over float32 weights; make_train_step does not take bfloat16 parameters: its
gradient accumulator is float32).
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from benchmarks.peers_common import emit, peak_rss_bytes, read_batch

CASES = (
    "padded",
    "padded/bucketed",
    "padded/full",
    "prefix_shared/bucketed",
    "packed/bucketed",
    "prefix_shared/bucketed/precomputed",
    "padded/remat",
    "prefix_shared/bucketed/remat",
)
OPTIONS = {"bucketed", "precomputed", "full", "remat"}
LAYOUTS = {"padded", "prefix_shared", "packed"}


def parse_case(case: str) -> tuple[str, set[str]]:
    """LAYOUT[/OPTION...] -> (layout, options); an unknown layout or option is an error."""
    layout, opts = case.split("/")[0], set(case.split("/")[1:])
    if layout not in LAYOUTS or not opts <= OPTIONS:
        raise SystemExit(
            f"peers_dpoq: bad case {case!r} (layouts {sorted(LAYOUTS)}, options {sorted(OPTIONS)})"
        )
    return layout, opts


def layout_batch(spec: dict, case: str) -> dict[str, np.ndarray]:
    """The case's numpy batch. Fixed rows: spec row_len (packed: twice that, as few rows as the pairs
    need); bucketed: the smallest bucket that holds the batch (packed: in those rows)."""
    from dpoq_jax.data import layouts
    from dpoq_jax.data.examples import TokenizedPair

    layout, opts = parse_case(case)
    pairs = [TokenizedPair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in spec["pairs"]]
    S, R = spec["row_len"], spec["response_len"]
    kw = {}
    if layout == "packed":
        S = 2 * S
        kw["num_rows"] = layouts.rows_needed(pairs, S)
    if "bucketed" in opts:
        S = layouts.bucket_for(pairs, layout, spec["buckets"], num_rows=kw.get("num_rows"))
    return layouts.preference_batch(pairs, layout, seq_len=S, response_len=R, **kw)


class DpoqCase:
    def __init__(self, workdir: pathlib.Path, case: str, spec: dict, dtype: str):
        import jax
        import jax.numpy as jnp
        import optax

        from dpoq_jax import losses
        from dpoq_jax.models.decoder import split_params
        from dpoq_jax.train import mesh as mesh_lib
        from dpoq_jax.train import state as state_lib
        from dpoq_jax.train import step as step_lib
        from dpoq_jax.train.load import load_model

        self.case = case
        layout, opts = parse_case(case)
        cd = jnp.dtype(dtype)  # compute; parameters stay float32 (the docstring says why)
        self.remat = "full" if "remat" in opts else "none"
        policy = load_model(str(workdir / "policy"), param_dtype=jnp.float32, dtype=cd, remat=self.remat)
        reference = load_model(str(workdir / "reference"), param_dtype=jnp.float32, dtype=cd)
        self.graphdef, params, self.rest = split_params(policy)
        _, ref_params, _ = split_params(reference)
        self.fwd = step_lib.Forward.for_layout(layout, spec.get("chunk_size", 512))
        self.np_batch = layout_batch(spec, case)
        self.precomputed = "precomputed" in opts
        if self.precomputed:  # what `dpoq precompute-ref` stores: per-token reference log-probs
            fn = jax.jit(lambda p, b: step_lib.layout_logps(self.graphdef, self.rest, p, b, self.fwd))
            rc, rr = fn(ref_params, {k: jnp.asarray(v) for k, v in self.np_batch.items()})
            self.np_batch["ref_chosen_logps"] = np.asarray(rc, np.float32)
            self.np_batch["ref_rejected_logps"] = np.asarray(rr, np.float32)
        loss_config = losses.LossConfig(beta=spec["beta"])
        if "full" in opts:
            from benchmarks.dpo_step import _full_logps_loss

            self.loss_fn = _full_logps_loss(self.graphdef, self.rest, loss_config, self.fwd.causal_rows)
        else:
            self.loss_fn = step_lib.make_dpo_loss(self.graphdef, self.rest, loss_config, self.fwd)
        lr = spec["lr"]
        self.optimizer = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        with_ref = not self.precomputed
        abs_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        p_sh = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
        sh = state_lib.state_shardings(abs_params, p_sh, self.optimizer, mesh, with_ref)
        state = state_lib.create_train_state(params, self.optimizer, sh, with_ref=with_ref)
        if with_ref:
            state = state.replace(ref_params=ref_params)
        self.state = state
        self.train_step = step_lib.make_train_step(self.loss_fn, self.optimizer, optax.constant_schedule(lr))
        self.batch = {k: jnp.asarray(v[None]) for k, v in self.np_batch.items()}  # micro axis of 1
        self.compile_s = None

    def compile(self) -> None:
        import jax

        t0 = time.perf_counter()
        self.step_fn = jax.jit(self.train_step, donate_argnums=0).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0

    def check(self) -> dict:
        """Summed policy log-probs per response, the loss with the reference, before any update."""
        import jax
        import jax.numpy as jnp

        from dpoq_jax.train import step as step_lib

        b = {k: jnp.asarray(v) for k, v in self.np_batch.items()}
        pc, pr = jax.jit(lambda p: step_lib.layout_logps(self.graphdef, self.rest, p, b, self.fwd))(
            self.state.params
        )
        loss, _ = jax.jit(self.loss_fn)(self.state.params, self.state.ref_params, b)
        return {
            "logps_chosen": np.asarray(jnp.sum(pc * b["chosen_mask"], -1), np.float64).tolist(),
            "logps_rejected": np.asarray(jnp.sum(pr * b["rejected_mask"], -1), np.float64).tolist(),
            "loss": float(loss),
        }

    def step(self) -> float:
        import jax

        t0 = time.perf_counter()
        self.state, self.metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0

    def info(self) -> dict:
        return {
            "case": "dpoq " + self.case,
            "rows": list(self.np_batch["tokens"].shape),
            "row_tokens": int(np.prod(self.np_batch["tokens"].shape)),
            "compile_s": self.compile_s,
            "remat": self.remat,
            "precomputed_ref": self.precomputed,
        }


def main(argv: list[str]) -> None:
    workdir, mode = pathlib.Path(argv[0]), argv[1]
    spec = read_batch(workdir)
    dtype = spec.get("dtype", "float32")
    if mode == "check":
        out = {}
        for case in argv[2:] or CASES:
            out[case] = DpoqCase(workdir, case, spec, dtype).check()
        emit("CHECK", out)
        return
    c = DpoqCase(workdir, argv[2], spec, dtype)
    c.compile()
    emit("READY", c.info())
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            emit("STEP", {"s": c.step()})
        elif cmd == "quit":
            break
    emit("DONE", {
        "loss_last": float(c.metrics["loss"]) if hasattr(c, "metrics") else None,
        "peak_rss_bytes": peak_rss_bytes(),
    })  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
