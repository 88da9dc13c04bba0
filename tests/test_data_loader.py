"""Loader: seeded order, exact resume, per-process slices cover each epoch once; its batches as global
arrays (train.setup.global_batch)."""

import functools
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpoq_jax.data.examples import TokenizedPair
from dpoq_jax.data.layouts import preference_batch
from dpoq_jax.data.loader import Loader, LoaderState
from dpoq_jax.train.setup import global_batch


def test_order_depends_on_seed_and_epoch_only():
    a, b = Loader(10, 4, seed=1), Loader(10, 4, seed=1)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), Loader(10, 4, seed=2).epoch_order(0))
    assert sorted(a.epoch_order(3)[:10]) == list(range(10)) and list(a.epoch_order(3)[10:]) == [-1, -1]
    np.testing.assert_array_equal(Loader(5, 5, shuffle=False).epoch_order(0), np.arange(5))


def test_resume_equals_uninterrupted():
    full = Loader(11, 4, seed=7)
    want = [full.next_indices() for _ in range(10)]  # crosses two epoch boundaries
    first = Loader(11, 4, seed=7)
    got = [first.next_indices() for _ in range(4)]
    saved = json.loads(json.dumps(first.state.to_dict()))  # what a checkpoint stores
    resumed = Loader(11, 4, seed=7, state=LoaderState.from_dict(saved))
    got += [resumed.next_indices() for _ in range(6)]
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)
    assert LoaderState.from_json(first.state.to_json()) == first.state == LoaderState(1, 4)


@pytest.mark.parametrize("n,G,procs", [(13, 4, 2), (16, 8, 4), (7, 6, 3)])
def test_process_slices_cover_each_epoch_once(n, G, procs):
    loaders = [Loader(n, G, seed=3, process_index=i, process_count=procs) for i in range(procs)]
    for epoch in range(2):
        seen = []
        for _ in range(loaders[0].steps_per_epoch):
            parts = [ld.next_indices() for ld in loaders]
            assert all(len(p) == G // procs for p in parts)
            seen += [int(i) for p in parts for i in p if i >= 0]
        assert sorted(seen) == list(range(n)), epoch
        assert len({ld.state for ld in loaders}) == 1  # all processes agree on the position


def test_bad_loader_args():
    with pytest.raises(ValueError, match="not divisible"):
        Loader(10, 5, process_count=2)
    with pytest.raises(ValueError, match="does not fit"):
        Loader(10, 4, state=LoaderState(0, 3))


def _pairs(n):
    rng = np.random.default_rng(0)
    return [
        TokenizedPair(
            [int(x) for x in rng.integers(3, 40, rng.integers(1, 6))],
            [int(x) for x in rng.integers(3, 40, rng.integers(1, 4))],
            [int(x) for x in rng.integers(3, 40, rng.integers(1, 4))],
            {"i": i},
        )
        for i in range(n)
    ]


def test_batches_and_global_arrays():
    pairs = _pairs(10)
    make = functools.partial(
        preference_batch, layout="prefix_shared", seq_len=16, response_len=4, num_pairs=8
    )
    loader = Loader(len(pairs), 8, seed=0)
    (b1, s1), (b2, s2) = [
        (make([pairs[i] if i >= 0 else None for i in loader.next_indices()]), loader.state) for _ in range(2)
    ]
    assert s1 == LoaderState(0, 8) and s2 == LoaderState(0, 16)
    assert b1["pair_mask"].sum() == 8 and b2["pair_mask"].sum() == 2  # last batch: 6 dummies
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    b1_M = {k: v[None] for k, v in b1.items()}  # one micro-batch
    g = global_batch(b1_M, {k: NamedSharding(mesh, PartitionSpec(None, "data")) for k in b1_M})
    assert g["tokens"].shape == (1, 8, 16) and len(g["tokens"].sharding.device_set) == 8
    for k, v in b1_M.items():
        np.testing.assert_array_equal(np.asarray(g[k]), v)


_WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from dpoq_jax.data.examples import TokenizedPair
from dpoq_jax.data.layouts import gather_flat, preference_batch
from dpoq_jax.data.loader import Loader
from dpoq_jax.train.setup import global_batch
rng = np.random.default_rng(0)
pairs = [TokenizedPair([int(x) for x in rng.integers(3, 40, rng.integers(1, 5))],
                       [int(x) for x in rng.integers(3, 40, rng.integers(1, 4))],
                       [int(x) for x in rng.integers(3, 40, rng.integers(1, 4))], {}) for _ in range(10)]
make = functools.partial(preference_batch, layout="prefix_shared", seq_len=12, response_len=4, num_pairs=2)
ld = Loader(10, 4, seed=1, process_index=jax.process_index(), process_count=jax.process_count())
idx = ld.next_indices()
local = {k: v[None] for k, v in make([pairs[i] if i >= 0 else None for i in idx]).items()}  # M = 1
mesh = jax.make_mesh((4,), ("data",))
g = global_batch(local, {k: NamedSharding(mesh, PartitionSpec(None, "data")) for k in local})
rep = NamedSharding(mesh, PartitionSpec())
data = NamedSharding(mesh, PartitionSpec("data"))
got = jax.jit(lambda t, i: gather_flat(t[0], i[0], data), out_shardings=rep)(
    g["tokens"], g["chosen_pred_idx"])
# expected: each process's layout of its own slice, gathered locally, in process order
order = Loader(10, 4, seed=1).next_indices()
want = np.concatenate([gather_flat(b["tokens"], b["chosen_pred_idx"])
                       for b in (make([pairs[i] for i in order[k:k + 2]]) for k in (0, 2))])
np.testing.assert_array_equal(np.asarray(got), want)
assert g["tokens"].shape == (1, 4, 12) and g["pair_mask"].shape == (1, 4)
print("OK", pid, flush=True)
"""


@pytest.mark.slow
def test_two_processes_build_global_arrays(tmp_path):
    """Real 2-process run (jax.distributed on localhost, gloo): pred_idx index the global rows."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
