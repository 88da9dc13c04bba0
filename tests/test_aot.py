"""`dpoq compile`: the real train step compiled ahead of time for a TPU topology (libtpu, the `tpu`
extra; no TPU needed). Checks the reported fields against what they must be for a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpoq_jax.commands.compile import compile_main

SYNTHETIC = Path(__file__).resolve().parents[1] / "dpoq_jax" / "configs" / "synthetic.py"  # any cwd

TINY = {
    "family": "gpt_neox",
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 4,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "rotary_dim": 4,
    "parallel_residual": True,
}


@pytest.mark.parametrize(
    "config,layout,reference",
    [
        ("error_injection:sft", "padded", "none"),
        ("error_injection:dpo", "prefix_shared", "frozen"),
        ("error_injection:dpo", "packed", "precomputed"),
    ],
)
def test_compile_tiny_step_for_v5e_2x2(tmp_path, capsys, config, layout, reference):
    model = tmp_path / "model_config.json"
    model.write_text(json.dumps(TINY))
    out = tmp_path / "report.json"
    args = [
        "--config",
        f"{SYNTHETIC}:{config}",
        "--topology",
        "v5e:2x2",
        "--model-config",
        str(model),
        "--json",
        str(out),
        "--config.data.layout=" + layout,
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.model.remat=full",
    ]
    if reference != "none":
        args.append(f"--config.reference.mode={reference}")
    assert compile_main(args) == 0
    r = json.loads(out.read_text())
    assert (r["topology"], r["chips"], r["device_kind"], r["hbm_gib"]) == ("v5e:2x2", 4, "TPU v5 lite", 16)
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert (r["layout"], r["reference"], r["num_layers"]) == (layout, reference, 2)
    assert r["fits"] is True and 0 < r["peak_gib"] < 0.1
    peak = r["argument_gib"] + r["output_gib"] - r["alias_gib"] + r["temp_gib"]
    assert abs(r["peak_gib"] - peak) < 2e-3
    # the train state is donated: its outputs reuse the argument buffers
    assert r["alias_gib"] > 0 and r["alias_gib"] <= r["argument_gib"]
    assert r["flops_per_step"] > 0 and r["xla_flops_per_chip"] > 0 and r["compile_s"] > 0
    text = capsys.readouterr().out
    assert "v5e:2x2: 4 x TPU v5 lite" in text and "fits" in text and "compile" in text


def test_bad_topology_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="--topology 'v9:1x1'"):
        compile_main(["--config", f"{SYNTHETIC}:error_injection:sft", "--topology", "v9:1x1"])


def test_search_batch_doubles_the_per_shard_micro_batch(tmp_path):
    model = tmp_path / "model_config.json"
    model.write_text(json.dumps(TINY))
    out = tmp_path / "search.json"
    args = ["--config", f"{SYNTHETIC}:error_injection:sft", "--topology", "v5e:2x2",
            "--model-config", str(model), "--json", str(out), "--search-batch", "--max-batch", "2",
            "--config.train.micro_batches=2"]  # fmt: skip
    assert compile_main(args) == 0
    runs = json.loads(out.read_text())
    assert [r["per_shard_micro_batch"] for r in runs] == [1, 2]  # both fit: stops at --max-batch
    assert [r["batch_size"] for r in runs] == [1 * 4 * 2, 2 * 4 * 2]  # 4 batch shards, 2 micro-batches
    assert all(r["fits"] for r in runs) and runs[1]["temp_gib"] >= runs[0]["temp_gib"]
