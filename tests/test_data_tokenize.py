"""Tokenization: prompt ids prefix the sequence, EOS, truncation, boundary mismatches (real HF tokenizer)."""

import pytest

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample
from dpoq_jax.data.synthetic import SyntheticTokenizer
from dpoq_jax.data.tokenize import (
    TokenizeConfig,
    encode,
    tokenize_all,
    tokenize_pair,
    tokenize_sft,
)
from dpoq_jax.models.hf import load_tokenizer

CORPUS = [
    "SUBREDDIT: r/relationships\nTITLE: My friend forgot my birthday\nPOST: We have been friends for years.",
    " My friend forgot my birthday and I feel sad.",
    " I am fine with it, we talked.",
    "TL;DR: the quick brown fox jumps over the lazy dog",
] * 5


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained offline on fixture text, saved and loaded like Pythia's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(path)
    return load_tokenizer(path)


def _pair(prompt, chosen, rejected):
    return PreferenceExample(prompt, chosen, rejected, {"source": "x.jsonl", "line": 7})


def test_prefix_property_and_eos(hf_tok):
    ex = _pair(CORPUS[0] + "\nTL;DR:", " My friend forgot my birthday.", " I am fine with it.")
    tp = tokenize_pair(ex, hf_tok, TokenizeConfig())
    assert tp.chosen_ids[-1] == hf_tok.eos_token_id and tp.rejected_ids[-1] == hf_tok.eos_token_id
    assert tp.prompt_ids == encode(hf_tok, ex.prompt)
    for resp, ids in ((ex.chosen, tp.chosen_ids), (ex.rejected, tp.rejected_ids)):
        seq = tp.prompt_ids + ids[:-1]
        assert hf_tok.decode(seq) == ex.prompt + resp  # the joined ids spell the joined text
        assert seq[: len(tp.prompt_ids)] == tp.prompt_ids
        # a space-led response after "TL;DR:" tokenizes the same jointly: no mismatch
        assert encode(hf_tok, ex.prompt + resp) == seq
    assert "boundary_mismatch" not in tp.meta


def test_boundary_mismatch_counted(hf_tok):
    # "brown fox" split as "bro" | "wn fox": BPE merges "brown" when encoded jointly
    ex = _pair("the quick bro", "wn fox", " dog")
    pairs, stats = tokenize_all([ex], hf_tok, TokenizeConfig())
    assert encode(hf_tok, "the quick brown fox") != encode(hf_tok, "the quick bro") + encode(hf_tok, "wn fox")
    assert stats.boundary_mismatches == 1 and pairs[0].meta["boundary_mismatch"]
    # the separate encoding is kept: prompt ids still prefix the sequence
    assert pairs[0].prompt_ids == encode(hf_tok, "the quick bro")


def test_truncation_keeps_prompt_end_and_response_start():
    tok = SyntheticTokenizer()
    ex = _pair("<bos>c:0123456789=", "9876543210", "1111")
    cfg = TokenizeConfig(max_prompt_tokens=5, max_response_tokens=4)
    pairs, stats = tokenize_all([ex], tok, cfg)
    tp = pairs[0]
    assert tok.decode(tp.prompt_ids) == "6789="
    assert tok.decode(tp.chosen_ids) == "987<eos>"
    assert tok.decode(tp.rejected_ids) == "111<eos>"
    assert stats.prompt_truncated == 1 and stats.response_truncated == 2
    with pytest.raises(
        DataError, match=r"x.jsonl:7: key 'prompt': prompt has 14 tokens > max_prompt_tokens=5"
    ):
        tokenize_pair(ex, tok, TokenizeConfig(max_prompt_tokens=5, truncate_prompt=False))
    with pytest.raises(DataError, match="response_tokens"):
        tokenize_pair(ex, tok, TokenizeConfig(max_response_tokens=4, truncate_responses=False))


def test_too_long_prompts_skipped_with_counts():
    tok = SyntheticTokenizer()
    exs = [_pair("<bos>c:01=", "01", "02"), _pair("<bos>c:0123456789=", "0123456789", "1")]
    policy = ErrorPolicy("skip")
    pairs, _ = tokenize_all(exs, tok, TokenizeConfig(max_prompt_tokens=8, truncate_prompt=False), policy)
    assert len(pairs) == 1 and policy.summary()["by_kind"] == {"prompt_too_long": 1}


def test_identical_after_truncation_and_bos():
    tok = SyntheticTokenizer()
    with pytest.raises(DataError, match="identical"):
        tokenize_pair(_pair("ab=", "0123", "0124"), tok, TokenizeConfig(max_response_tokens=3))
    tp = tokenize_pair(_pair("ab=", "1", "2"), tok, TokenizeConfig(add_bos=True))
    assert tp.prompt_ids[0] == tok.bos_token_id
    tp = tokenize_pair(_pair("abcdef=", "1", "2"), tok, TokenizeConfig(add_bos=True, max_prompt_tokens=3))
    assert tok.decode(tp.prompt_ids) == "<bos>f="  # BOS kept, then the prompt's end
    with pytest.raises(DataError, match="prompt has no tokens"):
        tokenize_pair(_pair("", "1", "2"), tok, TokenizeConfig())


def test_sft(hf_tok):
    ex = SFTExample("TL;DR:", " the quick brown fox", {})
    t = tokenize_sft(ex, hf_tok, TokenizeConfig())
    assert hf_tok.decode(t.prompt_ids + t.completion_ids[:-1]) == "TL;DR: the quick brown fox"
    assert t.completion_ids[-1] == hf_tok.eos_token_id


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory does not exist"):
        load_tokenizer(tmp_path / "nope")
