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
