"""Verifiable constraints (analysis/constraints.py): checkers, exact violating characters, the mapping to
tokens; and the verifiable-constraint experiment end to end on a tiny random chat Llama (issue #23)."""

from __future__ import annotations

import numpy as np
import pytest

from dpoq_jax.analysis import constraints as cons


def viol(name: str, text: str) -> list[str]:
    """The violating substrings of `text`."""
    return [text[a:b] for a, b in cons.constraint(name).violations(text)]


def test_checkers_find_exactly_the_violating_characters() -> None:
    assert viol("no_e", "The tree, é!") == ["e", "e", "e"]
    assert cons.constraint("no_e").check("A cat sat on a mat; Éclat à café")  # é/É are other letters
    assert viol("no_comma", "a, b,c; d.") == [",", ","]
    assert viol("lowercase", "Hello World ÉTÉ é") == ["H", "W", "É", "T", "É"]
    assert viol("no_digits", "in 2024 or ²") == ["2", "0", "2", "4", "²"]
    assert cons.constraint("no_digits").violations("ab3") == [(2, 3)]
    # whole word, case-insensitive: not inside "there" or "breathe", but "The," and "the's"
    text = "The, there breathe the's THE"
    assert cons.constraint("no_word:the").violations(text) == [(0, 3), (19, 22), (25, 28)]
    # words are runs of non-whitespace; the violations are words N+1.. (not the spaces between)
    text = "one  two\nwell-known, four five"
    assert viol("max_words:3", text) == ["four", "five"]
    assert cons.constraint("max_words:5").check(text) and not cons.constraint("max_words:4").check(text)
    assert all(cons.constraint(n).check("") for n in ("no_e", "lowercase", "max_words:1", "no_word:a"))


def test_bad_constraint_names_are_one_line_errors() -> None:
    for bad in ("no_x", "max_words:0", "max_words:two", "no_word:", "no_word:two words", "no_e:1"):
        with pytest.raises(ValueError, match="expected one of") as e:
            cons.constraint(bad)
        assert "\n" not in str(e.value)


class CharTok:
    """A tokenizer whose tokens are given strings; id 0 is the special end of turn "<|im_end|>", and a
    token may hold part of a UTF-8 character (bytes), as byte-level BPE does."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b"<|im_end|>", *pieces]
        self.all_special_ids = [0]

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_tokens_of_violations_straddling_and_multibyte() -> None:
    # "the cat" split as "th" | "e␣c" | "at": the token straddling the word boundary holds the "e"
    tok = CharTok([b"th", b"e c", b"at", b"\n"])
    ids = [1, 2, 3, 0, 4]  # content, then the template's "<|im_end|>\n"
    text, spans = cons.token_spans(tok, ids)
    assert text == "the cat<|im_end|>\n" and spans == [(0, 2), (2, 5), (5, 7), (7, 17), (17, 18)]
    c = cons.constraint("no_e")
    assert cons.token_violations(tok, ids, "the cat", c.violations("the cat")) == [1]
    # a forbidden word: every token holding one of its characters, straddling ones included
    w = cons.constraint("no_word:the")
    assert cons.token_violations(tok, ids, "the cat", w.violations("the cat")) == [0, 1]
    # at most one word: word 2 ("cat") starts inside the straddling token
    m = cons.constraint("max_words:1")
    assert cons.token_violations(tok, ids, "the cat", m.violations("the cat")) == [1, 2]
    # tokens after the content (the template's) never violate: lowercase-only with a capital after it
    up = cons.constraint("lowercase")
    tok2 = CharTok([b"ok", b"X"])
    assert cons.token_violations(tok2, [1, 0, 2], "ok", up.violations("ok")) == []
    # "É" (2 bytes) split over two tokens: the first holds half a character (an empty span), the one
    # that completes it takes it
    e = "É".encode()
    tok3 = CharTok([b"a", e[:1], e[1:] + b"t"])
    text, spans = cons.token_spans(tok3, [1, 2, 3])
    assert text == "aÉt" and spans == [(0, 1), (1, 1), (1, 3)]
    assert cons.token_violations(tok3, [1, 2, 3], "aÉt", up.violations("aÉt")) == [2]
    with pytest.raises(ValueError, match="does not contain its message content"):
        cons.token_violations(tok, ids, "dog", [])
    # a template that renders a character before the content (the prompt's newline merged into the
    # first token): that token still holds content, the content's spans are shifted by the offset
    tok4 = CharTok([b"\nA", b"b", b"C", b"\n"])
    assert cons.content_tokens(tok4, [1, 2, 3, 0, 4], "AbC") == (1, [0, 1, 2])
    assert cons.token_violations(tok4, [1, 2, 3, 0, 4], "AbC", up.violations("AbC")) == [0, 2]


def test_prompt_splits_are_disjoint_balanced_and_seeded() -> None:
    from dpoq_jax.experiments.constraint_prefs import TOPICS, split_prompts

    names = ["no_e", "lowercase"]
    a = split_prompts(TOPICS[:10], names, 2, 3, seed=1)
    assert (
        a
        == split_prompts(TOPICS[:10], names, 2, 3, seed=1)
        != split_prompts(TOPICS[:10], names, 2, 3, seed=2)
    )
    assert [len(a[s]) for s in ("train", "validation", "test")] == [10, 4, 6]
    assert not set(a["train"]) & (set(a["validation"]) | set(a["test"])) and not set(a["validation"]) & set(
        a["test"]
    )
    assert sorted(n for _, n in a["test"]) == ["lowercase"] * 3 + ["no_e"] * 3
    with pytest.raises(ValueError, match="leave none"):
        split_prompts(TOPICS[:5], names, 2, 3, seed=0)


TINY = dict(
    constraints=("no_digits", "lowercase", "max_words:2"),  # a random model's answers keep and break these
    n_topics=8,
    n_val_topics=2,
    n_test_topics=3,
    n_samples=6,
    max_new_tokens=6,
    batch=32,
    pairs_per_prompt=2,
    max_dwords=6,  # a random model's answers vary in length: pairs within 6 words exist on every seed
    beta=0.1,
    batch_size=8,  # the tests run on 8 fake CPU devices
    eval_every=1,
    dpo=dict(steps=2, lr=1e-3),
    n_gen_samples=2,
    n_test_samples=6,
)
TINY_DATA = ["--config.data.seq_len=56", "--config.data.max_prompt_tokens=40", "--config.data.response_len=8",
             "--config.optim.warmup_steps=0"]  # fmt: skip


@pytest.mark.slow
def test_experiment_end_to_end_on_a_tiny_chat_model(tmp_path, monkeypatch) -> None:
    """The experiment's main on a tiny random Llama with a ChatML template (helpers.tiny_chat_model):
    samples, pairs, both DPO runs, held-out tables, heatmap and verdicts. The constraints and sampling
    sizes are ones where a random model's answers both keep and break each constraint (checked over seeds
    0-4: every seed forms pairs)."""
    from helpers import tiny_chat_model

    from dpoq_jax.experiments import constraint_prefs as cp

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    model = tmp_path / "model"
    tiny_chat_model(str(model))
    results = tmp_path / "results" / "constraint_prefs.md"
    argv = ["--model", str(model), "--seeds", "0", "--workdir", str(tmp_path / "runs"),
            "--results", str(results), "--heatmap-pairs", "2", *TINY_DATA]  # fmt: skip
    assert cp.main(argv, {"full": TINY, "quick": TINY}, tmp_path / "results") == 0
    md = results.read_text()
    for title in (
        *cp.SECTION.values(),
        *(cp.credit_title(m) for m in cp.MODES),
        *(cp.help_title(m) for m in cp.MODES),
    ):
        assert title in md, title
    assert md.count("**Verdict: ") == 2 * len(cp.MODES) + 1  # credit and help per arm, beyond length
    assert "| instruction contrast (log π_ref(y|with) − log π_ref(y|without)) |" in md.replace("\\|", "|")
    assert "Credit assignment per constraint" in md and "| split | arm | constraint |" in md
    assert "| DPO implicit reward (−r_t) |" in md and "| reference (the model) | greedy |" in md
    assert "| position (later = more suspicious) |" in md
    assert "| DPO implicit reward − position (paired) |" in md
    assert "| share kept |" in md
    figures = sorted(p.name for p in (results.parent).rglob("*.png"))
    assert any("heatmap" in f for f in figures) and any("loglik" in f for f in figures), figures
    rows = sorted((tmp_path / "runs" / "seed0" / "data").glob("train_*.jsonl"))
    assert [r.name[:8] for r in rows] == ["train_A_", "train_B_", "train_C_"]  # one file an arm
    assert all('"chosen": [{"role": "assistant"' in r.read_text() for r in rows)
    # arms B and C leave the length constraint out; C pairs as many answers a prompt as B
    length_instruction = cons.constraint("max_words:2").instruction
    assert length_instruction in rows[0].read_text()
    assert length_instruction not in rows[1].read_text() + rows[2].read_text()
    assert 0 < len(rows[2].read_text().splitlines()) <= len(rows[1].read_text().splitlines())
    assert len(list((tmp_path / "runs" / "seed0" / "data").glob("samples_train_*.json"))) == 1


def test_missing_model_and_template_are_one_line_errors(tmp_path) -> None:
    from dpoq_jax.experiments.constraint_prefs import Chat

    with pytest.raises(SystemExit, match="not a Hugging Face model folder") as e:
        Chat(str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)
    import shutil
    from pathlib import Path

    folder = tmp_path / "no_template"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the chat fixture without its chat_template.jinja
        shutil.copy(Path(__file__).parent / "fixtures" / "chat_tokenizer" / f, folder)
    with pytest.raises(SystemExit, match="needs a chat template") as e:
        Chat(str(folder))
    assert "\n" not in str(e.value)


def test_verdict_rules() -> None:
    """docs/experiments.md §6 (three arms, rules of 2026-12-07): credit assignment holds when DPO beats
    the reference alone and the position on AUROC and top-1, partly on one metric; DPO helps iff the
    paired greedy difference lies above 0; beyond length needs B − reference and B − C above 0 with the
    words difference inside (−3, 3)."""
    from dpoq_jax.analysis.seeds import Interval
    from dpoq_jax.experiments.constraint_prefs import MODES, SECTION, credit_title, help_title, verdicts

    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 3)  # noqa: E731
    up, flat = iv(0.01, 0.1), iv(-0.1, 0.1)
    n = {"chance": iv(0.1, 0.2), "ref/top1": iv(0.1, 0.3), "ref/auroc": iv(0.5, 0.6),
         "ref/greedy": iv(0.2, 0.4)}  # fmt: skip
    arms = {"A": (up, up, up), "B": (up, flat, flat), "C": (flat, flat, flat)}  # (AUROC diffs, top-1, help)
    for m, (auroc_d, top1_d, helps) in arms.items():
        n |= {f"{m}/top1": iv(0.3, 0.5), f"{m}/auroc": iv(0.6, 0.7), f"{m}/greedy": iv(0.3, 0.5),
              f"{m}/auroc_minus_ref": auroc_d, f"{m}/auroc_minus_pos": auroc_d,
              f"{m}/top1_minus_ref": top1_d, f"{m}/top1_minus_pos": top1_d,
              f"{m}/auroc_minus_contrast": flat, f"{m}/greedy_diff": helps}  # fmt: skip
    n |= {"beyond/B_minus_ref": up, "beyond/B_minus_C": up, "beyond/words_B_minus_ref": iv(-2.5, 1.0)}
    v = verdicts(n, {})
    assert list(v) == [*(credit_title(m) for m in MODES), SECTION["beyond"], *(help_title(m) for m in MODES)]
    assert [x.status for x in v.values()] == ["holds", "partly", "does not hold", "holds", "holds",
                                              "does not hold", "does not hold"]  # fmt: skip
    n["A/top1_minus_pos"] = flat  # the position not beaten on top-1: one metric only
    assert verdicts(n, {})[credit_title("A")].status == "partly"
    n["beyond/words_B_minus_ref"] = iv(-4.0, -1.0)  # B gained by getting shorter: not beyond length
    assert verdicts(n, {})[SECTION["beyond"]].status == "partly"
    n["beyond/B_minus_ref"] = flat
    assert verdicts(n, {})[SECTION["beyond"]].status == "does not hold"
    del n["beyond/B_minus_ref"]  # no non-length test prompt: no such verdict
    assert SECTION["beyond"] not in verdicts(n, {})


@pytest.mark.slow
def test_token_training_real_on_a_tiny_chat_model(tmp_path, monkeypatch) -> None:
    """The real-model token-training run end to end on the tiny chat model: the oracle on its own half of
    the training prompts, its token cache on the policy's pairs, every arm trained, the held-out table
    with a time per step for each arm and the paired differences against DPO and the model."""
    from helpers import tiny_chat_model

    from dpoq_jax.data.token_cache import is_cache
    from dpoq_jax.experiments import token_training_real as ttr

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    model = tmp_path / "model"
    tiny_chat_model(str(model))
    results = tmp_path / "results" / "token_training_real.md"
    scale = {k: v for k, v in TINY.items() if k not in ("full", "lora", "n_test_samples")} | {
        "steps": 2,
        "lr": 1e-3,
        "n_topics": 10,
    }
    argv = ["--model", str(model), "--seeds", "0", "--workdir", str(tmp_path / "runs"),
            "--results", str(results), *TINY_DATA]  # fmt: skip
    assert ttr.main(argv, {"full": scale, "quick": scale}, tmp_path / "results") == 0
    md = results.read_text()
    seed = tmp_path / "runs" / "seed0"
    assert is_cache(str(seed / "oracle_rewards"))
    for arm in ttr.ARMS:
        assert (seed / arm / "experiment_run.json").exists(), arm
        assert f"| {ttr.MODELS[arm]} | greedy |" in md, arm
        if arm != "dpo":
            assert f"| {ttr.MODELS[arm]} − DPO | greedy |" in md, arm
    data = {p.name.split("_")[0] for p in (seed / "data").glob("*.jsonl")}
    assert data == {"oracle", "policy", "validation"}, data
    with pytest.raises(SystemExit, match="not dpo first"):
        ttr.main([*argv, "--arms", "tdpo2,dpo"], {"full": scale, "quick": scale}, tmp_path / "results")


def test_oracle_and_policy_prompts_are_disjoint_halves() -> None:
    from dpoq_jax.experiments.constraint_prefs import TOPICS, split_prompts
    from dpoq_jax.experiments.token_training_real import halves

    train = split_prompts(TOPICS, ("no_e", "lowercase"), 3, 6, seed=0)["train"]
    h = halves(train)
    assert not set(h["oracle"]) & set(h["policy"])
    assert sorted(h["oracle"] + h["policy"]) == sorted(train)
    for name in ("no_e", "lowercase"):
        n = [sum(p[1] == name for p in h[k]) for k in ("oracle", "policy")]
        assert abs(n[0] - n[1]) <= 1 and min(n) > 0, n


def test_arm_pairs_hand_solved() -> None:
    """Arm B pairs a kept answer with the unused broken answer of the nearest word count, within
    max_dwords; arm C pairs (shorter, longer) answers of different word counts; both leave length
    constraints out, and C forms as many pairs a prompt as B."""
    from dpoq_jax.experiments.constraint_prefs import length_pairs, matched_pairs, pair_rows

    good, bad = ["a b c", "a b c d e f g h"], ["x y", "x y z w v u t s r q p"]
    assert matched_pairs(good, bad, 5, 2) == [("a b c", "x y")]  # 8 words: no partner within 2
    assert matched_pairs(good, bad, 5, 3) == [("a b c", "x y"), ("a b c d e f g h", "x y z w v u t s r q p")]
    assert matched_pairs(good, bad, 1, 3) == [("a b c", "x y")]
    rng = np.random.default_rng(0)
    pairs = length_pairs(["one", "two words", "also two", "three words here"], 10, rng)
    assert len(pairs) == 5 and all(len(a.split()) < len(b.split()) for a, b in pairs)  # 6 pairs, 1 tie
    prompts = [("cats", "no_digits"), ("owls", "max_words:2")]
    samples = [[("a b", True), ("a 1", True), ("c d e", True), ("x 2 y", True)],
               [("one two", True), ("one two three", True)]]  # fmt: skip
    rows_a, _ = pair_rows(prompts, samples, 2, 0, "train", "A", 2)
    rows_b, counts_b = pair_rows(prompts, samples, 2, 0, "train", "B", 2)
    rows_c, _ = pair_rows(prompts, samples, 2, 0, "train", "C", 2)
    assert len(rows_a) == 3 and len(rows_b) == 2 and len(rows_c) == 2  # A: 2 + 1 (max_words:2)
    assert counts_b["max_words:2"]["pairs"] == 0 and counts_b["no_digits"]["chosen_words"]
    for r in rows_c:
        assert len(r["chosen"][0]["content"].split()) < len(r["rejected"][0]["content"].split())
