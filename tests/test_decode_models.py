"""Decoding with the real Decoder: cached decoding == uncached forward, and the CLI commands end to end."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpoq_jax.analysis import report as rep
from dpoq_jax.commands.generate import generate_main
from dpoq_jax.commands.score import score_main
from dpoq_jax.data.synthetic import SyntheticTokenizer
from dpoq_jax.decode.beam import BeamConfig, beam_search
from dpoq_jax.decode.core import full_rows, pack_prompts
from dpoq_jax.decode.guided import reward_guided_search
from dpoq_jax.decode.sampling import SampleConfig, generate
from dpoq_jax.models import Decoder, ModelConfig
from dpoq_jax.models.decoder import abstract_split
from dpoq_jax.models.hf import save_hf

EOS, PAD = 2, 0
CFG = ModelConfig(
    family="llama",
    vocab_size=SyntheticTokenizer.vocab_size,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    rotary_dim=8,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
PROMPTS = [[1, 16, 29, 5, 3, 30], [1, 29, 30], [1, 13, 4, 7, 9, 30, 3]]


def make_decoders() -> tuple[Decoder, Decoder]:
    """Two random decoders (reference = policy with a perturbed unembedding).

    Parameters come from numpy on an abstract model: eager random initialisation costs ~15 s on CPU.
    Weights N(0, 0.4) give peaked next-token distributions (no near-ties between beams).
    """
    graphdef, abstract, rest = abstract_split(lambda: Decoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32))
    rng = np.random.default_rng(0)
    init = lambda x: jnp.asarray(rng.normal(0, 0.4, x.shape) if x.ndim > 1 else np.ones(x.shape), x.dtype)  # noqa: E731
    pol = nnx.merge(graphdef, jax.tree.map(init, abstract), rest)
    ref = nnx.clone(pol)
    ref.lm_head[...] = ref.lm_head[...] + jnp.asarray(rng.normal(0, 0.3, ref.lm_head.shape), jnp.float32)
    return pol, ref


@pytest.fixture(scope="module")
def decoders():
    return make_decoders()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, rows):
    model = nnx.merge(graphdef, state)
    return model(rows, jnp.broadcast_to(jnp.arange(rows.shape[1]), rows.shape))


def uncached_logps(model, rows):
    logits = _forward(*nnx.split(model), jnp.asarray(rows))
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return np.asarray(jnp.take_along_axis(lp, jnp.asarray(rows[:, 1:, None]), axis=-1)[..., 0])


def test_cached_decoding_equals_uncached_forward(decoders):
    pol, ref = decoders
    prompts = pack_prompts(PROMPTS)
    gen = generate(pol, PROMPTS, SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=EOS), seed=1)
    beams = beam_search(
        pol, PROMPTS, BeamConfig(num_beams=3, max_new_tokens=6, eos_id=EOS), ref_model=ref, beta=0.2
    )
    for toks, mask, lps in [
        (gen.tokens, gen.mask, gen.logps),
        (beams.tokens.reshape(9, -1), beams.mask.reshape(9, -1), beams.logps.reshape(9, -1)),
    ]:
        rows = full_rows(prompts, toks, PAD)
        ulp = uncached_logps(pol, rows)
        K = rows.shape[0] // 3
        for n in range(rows.shape[0]):
            L, m = prompts.lens_B[n // K], int(mask[n].sum())
            assert m >= 1
            np.testing.assert_allclose(lps[n, :m], ulp[n, L - 1 : L - 1 + m], atol=2e-4)
    rows = full_rows(prompts, beams.tokens.reshape(9, -1), PAD)
    rlp = uncached_logps(ref, rows)
    for n in range(9):
        L, m = prompts.lens_B[n // 3], int(beams.mask.reshape(9, -1)[n].sum())
        want = 0.2 * (beams.logps.reshape(9, -1)[n, :m] - rlp[n, L - 1 : L - 1 + m])
        np.testing.assert_allclose(beams.rewards.reshape(9, -1)[n, :m], want, atol=2e-4)
    # reward-guided search with both KV caches finds the same beams
    guided = reward_guided_search(
        pol, ref, PROMPTS, BeamConfig(num_beams=3, max_new_tokens=6, eos_id=EOS), beta=0.2
    )
    np.testing.assert_array_equal(guided.tokens, beams.tokens)
    np.testing.assert_allclose(guided.rewards, beams.rewards, atol=2e-4)


@pytest.mark.slow
def test_generate_and_score_commands(decoders, tmp_path):
    pol, ref = decoders
    save_hf(pol, CFG, str(tmp_path / "pol"))
    save_hf(ref, CFG, str(tmp_path / "ref"))
    out = tmp_path / "gen.jsonl"
    rc = generate_main(
        [
            "--beta",
            "0.1",
            "--model",
            str(tmp_path / "pol"),
            "--reference",
            str(tmp_path / "ref"),
            "--tokenizer",
            "synthetic",
            "--synthetic",
            "error_injection",
            "--n",
            "3",
            "--mode",
            "beam",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "5",
            "--beta",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    for x in lines:
        assert len(x["outputs"]) == 2 and x["outputs"][0]["score"] >= x["outputs"][1]["score"]
        o = x["outputs"][0]
        assert len(o["ids"]) == o["length"] == len(o["token_rewards"]) and 1 <= o["length"] <= 5
        assert o["reward"] == pytest.approx(sum(o["token_rewards"]), abs=1e-5)

    prompts_txt = tmp_path / "p.txt"
    prompts_txt.write_text("<bos>c:12=\n\n<bos>r:345=\n")
    rc = generate_main(
        [
            "--model",
            str(tmp_path / "pol"),
            "--tokenizer",
            "synthetic",
            "--prompts",
            str(prompts_txt),
            "--mode",
            "sample",
            "--top-k",
            "5",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and len(out.read_text().splitlines()) == 2
    prompts_txt.write_text("<bos>c:12=\n<bos>x:#=\n")
    with pytest.raises(SystemExit, match=r"dpoq generate: error: .*p.txt:2: character '#'"):
        generate_main(
            [
                "--model",
                str(tmp_path / "pol"),
                "--tokenizer",
                "synthetic",
                "--prompts",
                str(prompts_txt),
                "--out",
                str(out),
            ]
        )

    rc = score_main(
        [
            "--beta",
            "0.1",
            "--policy",
            str(tmp_path / "pol"),
            "--reference",
            str(tmp_path / "ref"),
            "--tokenizer",
            "synthetic",
            "--synthetic",
            "error_injection",
            "--n",
            "4",
            "--with-qv",
            "--max-png",
            "2",
            "--out-dir",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 0
    report = rep.load_json(tmp_path / "rep" / "scores.json")
    assert len(report["items"]) == 4 and set(report["items"][0]["responses"]) == {"chosen", "rejected"}
    assert {"q", "v", "rewards"} <= set(report["items"][0]["responses"]["chosen"])
    credit = json.loads((tmp_path / "rep" / "credit.json").read_text())
    # Independent values: a plain uncached forward of each model over prompt + response, log_softmax,
    # r_t = β (log π − log π_ref) with the default β = 0.1 (swapped models would flip the sign).
    tok = SyntheticTokenizer()
    want = {}
    for i, item in enumerate(report["items"]):
        for k, resp in item["responses"].items():
            prompt = tok.encode(item["prompt"])
            row = np.asarray([prompt + resp["ids"]], np.int32)
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(resp["ids"]))
            lp, lr = uncached_logps(pol, row)[0, span], uncached_logps(ref, row)[0, span]
            np.testing.assert_allclose(resp["logps"], lp, atol=2e-4)
            np.testing.assert_allclose(resp["ref_logps"], lr, atol=2e-4)
            want[i, k] = 0.1 * (lp - lr)
            np.testing.assert_allclose(resp["rewards"], want[i, k], atol=2e-5)
            assert np.abs(want[i, k]).max() > 1e-2  # the two models differ: the check can tell them apart
    assert report["beta"] == 0.1 and credit["n_responses"] == 4 and credit["beta"] == 0.1
    hits = [
        float(int(np.argmin(want[i, "rejected"])) in it["meta"]["error_positions"])
        for i, it in enumerate(report["items"])
    ]
    assert credit["top1"] == pytest.approx(np.mean(hits))
    # --beta scales every reward (same items: the task seed is the same).
    rc = score_main(
        ["--policy", str(tmp_path / "pol"), "--reference", str(tmp_path / "ref"), "--tokenizer", "synthetic",
         "--synthetic", "error_injection", "--n", "4", "--beta", "0.3", "--max-png", "0",
         "--out-dir", str(tmp_path / "rep3")]
    )  # fmt: skip
    assert rc == 0
    report3 = rep.load_json(tmp_path / "rep3" / "scores.json")
    assert report3["beta"] == 0.3
    for i, item in enumerate(report3["items"]):
        for k, resp in item["responses"].items():
            np.testing.assert_allclose(resp["rewards"], 3 * want[i, k], atol=6e-5)
    assert sorted(p.name for p in (tmp_path / "rep" / "png").iterdir()) == ["item_0.png", "item_1.png"]
    assert "</html>" in (tmp_path / "rep" / "report.html").read_text()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "<bos>c:1=", "response": "1"}\n{"prompt": "<bos>c:1=", "chosen": "1"}\n')
    with pytest.raises(SystemExit, match=r"dpoq score: error: .*pairs.jsonl:2: key 'rejected': missing key"):
        score_main(
            [
                "--beta",
                "0.1",
                "--policy",
                str(tmp_path / "pol"),
                "--reference",
                str(tmp_path / "ref"),
                "--tokenizer",
                "synthetic",
                "--pairs",
                str(pairs),
                "--out-dir",
                str(tmp_path / "rep2"),
            ]
        )


def test_cli_dispatch_and_model_errors(tmp_path, capsys):
    from dpoq_jax import cli
    from dpoq_jax.train.load import load_model

    for name in ("generate", "score"):
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0 and f"dpoq {name}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_matches_transformers(decoders, tmp_path, early_stopping):
    """The same beams and scores as transformers' `generate(num_beams=K, length_penalty=α)` on the same
    weights, prompt by prompt (transformers needs one prompt length per batch), for α in {0, 0.5, 1}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pol, _ = decoders
    pol = nnx.clone(pol)
    # EOS likely enough that hypotheses finish at different lengths, so the penalty changes the ranking
    pol.lm_head[...] = pol.lm_head[...].at[:, EOS].add(1.5)
    save_hf(pol, CFG, str(tmp_path / "pol"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pol"), torch_dtype=torch.float32)
    K, R = 4, 8
    seen = {}
    for alpha in (0.0, 0.5, 1.0):
        cfg = BeamConfig(num_beams=K, max_new_tokens=R, length_penalty=alpha, early_stopping=early_stopping,
                         eos_id=EOS, pad_id=PAD)  # fmt: skip
        ours = beam_search(pol, PROMPTS, cfg)
        for b, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                out = hf.generate(
                    torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    num_beams=K, num_return_sequences=K, length_penalty=alpha, early_stopping=early_stopping,
                    max_new_tokens=R, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                    output_scores=True, return_dict_in_generate=True,
                )  # fmt: skip
            want = []
            for row in out.sequences[:, len(prompt) :].tolist():
                want.append(row[: row.index(EOS) + 1] if EOS in row else row)
            got = [[int(x) for x in ours.tokens[b, k][ours.mask[b, k] > 0]] for k in range(K)]
            assert got == want, (alpha, b)
            np.testing.assert_allclose(ours.score[b], out.sequences_scores.numpy(), atol=2e-4)
            seen[alpha, b] = got
    # the penalty mattered somewhere: some prompt's beams differ between α = 0 and α = 1
    assert any(seen[0.0, b] != seen[1.0, b] for b in range(len(PROMPTS)))
