"""`dpoq precompute-ref`: reference log-probs of every pair, computed once and stored beside the data.

The output is JSON lines, one per pair of the train and held-out splits:
  {"fingerprint": sha1 of the pair's token ids, "split": "train"|"eval",
   "ref_chosen_logps": [per-token float32 ...], "ref_rejected_logps": [...]}
A DPO run with reference.mode="precomputed" and reference.logps_path=FILE looks each pair up by its
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
from dpoq_jax.train.step import pair_logps


def precompute_reference(cfg: Any, output: str) -> int:
    """Writes the log-probs of the config's initial model (the reference) for all pairs; returns the count."""
    run = setup(cfg)
    state = run.new_state()
    G = cfg.train.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    make_batch = inputs.micro_batch_fn(cfg, G // pc)
    example = inputs.stack_micro(run.dataset.train[:1] * (G // pc), make_batch, 1)
    b_sh = run.batch_shardings(example)
    rep = replicated(run.mesh)

    def fn(params, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        return pair_logps(run.graphdef, run.rest, params, micro, forward_for(cfg, G))

    shardings = dict(in_shardings=(run.shardings.params, b_sh), out_shardings=(rep, rep))
    logps_fn = jax.jit(kernel_mesh_fn(fn, run.mesh), **shardings)  # fused attention kernels: on the mesh
    rows = []
    for split, items in (("train", run.dataset.train), ("eval", run.dataset.eval)):
        for start in range(0, len(items), G):
            gidx = np.arange(start, start + G)
            lidx = gidx[pi * (G // pc) : (pi + 1) * (G // pc)]
            local = inputs.stack_micro([items[i] if i < len(items) else None for i in lidx], make_batch, 1)
            chosen, rejected = jax.device_get(logps_fn(state.params, global_batch(local, b_sh)))
            for p, i in enumerate(gidx):
                if i >= len(items):
                    continue
                pair = items[i]
                rows.append(
                    {
                        "fingerprint": inputs.pair_fingerprint(pair),
                        "split": split,
                        "ref_chosen_logps": [float(x) for x in chosen[p, : len(pair.chosen_ids)]],
                        "ref_rejected_logps": [float(x) for x in rejected[p, : len(pair.rejected_ids)]],
                    }
                )
    if pi == 0:
        paths.write_text(output, "".join(json.dumps(row) + "\n" for row in rows))  # atomic, local or gs://
    return len(rows)
