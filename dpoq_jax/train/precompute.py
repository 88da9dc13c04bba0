"""`dpoq precompute-ref`: reference log-probs of every pair, computed once and stored beside the data.

The output is JSON lines, one per pair of the train and held-out splits:
  {"fingerprint": sha1 of the pair's token ids, "split": "train"|"eval",
   "ref_chosen_logps": [per-token float32 ...], "ref_rejected_logps": [...]}
or, for a run with an unpaired loss (labelled responses), one per response with "ref_completion_logps".
A DPO run with reference.mode="precomputed" and reference.logps_path=FILE looks each example up by its
fingerprint (so a changed tokenizer or data file is caught) and then needs no reference forward pass.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from dpoq_jax import paths
from dpoq_jax.train import inputs
from dpoq_jax.train.mesh import replicated
from dpoq_jax.train.setup import forward_for, global_batch, kernel_mesh_fn, setup
from dpoq_jax.train.step import layout_logps


def precompute_reference(cfg: Any, output: str) -> int:
    """Writes the log-probs of the config's initial model (the reference) for every pair or labelled
    response; returns the count."""
    run = setup(cfg)
    state = run.new_state()
    G = cfg.train.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    make_batch = inputs.micro_batch_fn(cfg, G // pc)
    example = inputs.stack_micro(run.dataset.train[:1] * (G // pc), make_batch, 1)
    b_sh = run.batch_shardings(example)
    rep = replicated(run.mesh)

    sides = inputs.response_sides(cfg)

    def fn(params, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        return layout_logps(run.graphdef, run.rest, params, micro, forward_for(cfg, G), sides=sides)

    shardings = dict(in_shardings=(run.shardings.params, b_sh), out_shardings=(rep,) * len(sides))
    logps_fn = jax.jit(kernel_mesh_fn(fn, run.mesh), **shardings)  # fused attention kernels: on the mesh
    rows = []
    for split, items in (("train", run.dataset.train), ("eval", run.dataset.eval)):
        for start in range(0, len(items), G):
            gidx = np.arange(start, start + G)
            lidx = gidx[pi * (G // pc) : (pi + 1) * (G // pc)]
            local = inputs.stack_micro([items[i] if i < len(items) else None for i in lidx], make_batch, 1)
            out = jax.device_get(logps_fn(state.params, global_batch(local, b_sh)))
            logps = dict(zip(sides, out, strict=True))
            for p, i in enumerate(gidx):
                if i >= len(items):
                    continue
                row = {"fingerprint": inputs.fingerprint(items[i]), "split": split}
                for side, ids in inputs.reference_sides(items[i]):
                    row[f"ref_{side}_logps"] = [float(x) for x in logps[side][p, : len(ids)]]
                rows.append(row)
    if pi == 0:
        paths.write_text(output, "".join(json.dumps(row) + "\n" for row in rows))  # atomic, local or gs://
    return len(rows)
