"""Chat-format data (data/chat.py): TRL 1.16's token ids, the row formats, and every bad-input error."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from dpoq_jax.data import chat, jsonl
from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample
from dpoq_jax.data.tokenize import TokenizeConfig, TokenizeStats, tokenize_all, tokenize_pair, tokenize_sft

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TOK_DIR = os.path.join(FIX, "chat_tokenizer")


def m(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def trl_fixture():
    with open(os.path.join(FIX, "trl_chat_ids.json")) as f:
        return json.load(f)


@pytest.fixture()
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOK_DIR, local_files_only=True)


BIG = TokenizeConfig(max_prompt_tokens=10_000, max_response_tokens=10_000)


def test_ids_equal_trl(trl_fixture, tok, caplog):
    """Every row x template of tests/fixtures/make_chat_fixture.py (TRL's DPOTrainer preprocessing):
    the same prompt, chosen and rejected ids, including the template whose prompt diverges."""
    chat._warned = False
    n_div = 0
    for case in trl_fixture["cases"]:
        tok.chat_template = trl_fixture["templates"][case["template"]]
        row = trl_fixture["rows"][case["row_index"]]
        ex = jsonl.preference_from_row(row, file="fixture", line=case["row_index"] + 1)
        stats = TokenizeStats()
        with caplog.at_level(logging.WARNING, logger="dpoq_jax.data.chat"):
            t = tokenize_pair(ex, tok, BIG, stats)
        got = {"prompt_ids": t.prompt_ids, "chosen_ids": t.chosen_ids, "rejected_ids": t.rejected_ids}
        assert got == {k: case[k] for k in got}, (case["template"], case["row_index"])
        n_div += stats.chat_divergences
    assert n_div == 4  # the "think" template, on every row
    warnings = [r for r in caplog.records if "not a prefix" in r.getMessage()]
    assert len(warnings) == 1 and "<think>" in warnings[0].getMessage()


def test_sft_ids_equal_trl(trl_fixture, tok):
    """Prompt-completion SFT rows: TRL's SFTTrainer preprocessing (prompt = the label-masked part)."""
    chat._warned = True  # the divergence warning is tested above
    for case in trl_fixture["sft_cases"]:
        tok.chat_template = trl_fixture["templates"][case["template"]]
        ex = jsonl.sft_from_row(trl_fixture["sft_rows"][case["row_index"]], file="f", line=1)
        t = tokenize_sft(ex, tok, BIG)
        assert (t.prompt_ids, t.completion_ids) == (case["prompt_ids"], case["completion_ids"]), case


def test_chatml_response_ends_with_end_of_turn(tok):
    ex = jsonl.preference_from_row(
        {"prompt": [m("user", "Hi")], "chosen": [m("assistant", "Hello.")],
         "rejected": [m("assistant", "Go.")]}, file="f", line=1)
    t = tokenize_pair(ex, tok, BIG)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(t.chosen_ids) == "Hello.<|im_end|>\n"  # ChatML writes a newline after the end of turn
    assert im_end in t.chosen_ids and im_end in t.rejected_ids


def test_divergence_error_switch(trl_fixture, tok):
    tok.chat_template = trl_fixture["templates"]["think"]
    ex = jsonl.preference_from_row(trl_fixture["rows"][0], file="data.jsonl", line=3)
    cfg = TokenizeConfig(chat_divergence="error")
    with pytest.raises(DataError, match=r"data\.jsonl:3: .*not a prefix") as e:
        tokenize_pair(ex, tok, cfg)
    assert e.value.kind == "template_divergence"
    pol = ErrorPolicy("skip")
    out, _ = tokenize_all([ex, ex], tok, cfg, pol)
    assert out == [] and pol.counts["template_divergence"] == 2


def test_truncation_keeps_prompt_end_and_response_start(tok):
    row = {"prompt": trl_rows()[1]["prompt"], "chosen": [m("assistant", "Yes, it is blue.")],
           "rejected": [m("assistant", "No, the sky is green.")]}
    ex = jsonl.preference_from_row(row, file="f", line=1)
    full = tokenize_pair(ex, tok, BIG)
    cut = tokenize_pair(ex, tok, TokenizeConfig(max_prompt_tokens=5, max_response_tokens=3))
    assert cut.prompt_ids == full.prompt_ids[-5:]
    assert cut.chosen_ids == full.chosen_ids[:3]  # no EOS added: the template's end of turn is cut
    with pytest.raises(DataError, match="response_len|max_response_tokens"):
        tokenize_pair(ex, tok, TokenizeConfig(max_response_tokens=3, truncate_responses=False))


def trl_rows():
    with open(os.path.join(FIX, "trl_chat_ids.json")) as f:
        return json.load(f)["rows"]


def test_sft_rows(tok):
    conv = [m("system", "S."), m("user", "Q1"), m("assistant", "A1"), m("user", "Q2"), m("assistant", "A2")]
    a = jsonl.sft_from_row({"messages": conv, "id": 7}, file="f", line=1)
    assert a.prompt == conv[:-1] and a.completion == conv[-1:] and a.meta["id"] == 7
    b = jsonl.sft_from_row({"prompt": conv[:-1], "completion": conv[-1:]}, file="f", line=2)
    ta, tb = tokenize_sft(a, tok, BIG), tokenize_sft(b, tok, BIG)
    assert (ta.prompt_ids, ta.completion_ids) == (tb.prompt_ids, tb.completion_ids)
    whole = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert ta.prompt_ids + ta.completion_ids == list(whole)
    assert tok.decode(ta.completion_ids) == "A2<|im_end|>\n"


def test_labelled_chat_rows_tokenise_like_sft_rows_and_keep_the_label(tok):
    """TRL's KTO conversational format: {"prompt": [...], "completion": [...], "label": bool}."""
    conv = [m("user", "Q1"), m("assistant", "A1")]
    row = {"prompt": conv[:1], "completion": conv[1:], "label": False}
    ex = jsonl.outcome_from_row(row, file="f", line=1)
    t = tokenize_sft(ex, tok, BIG)
    sft = tokenize_sft(jsonl.sft_from_row({"messages": conv}, file="f", line=1), tok, BIG)
    assert (t.prompt_ids, t.completion_ids, t.label) == (sft.prompt_ids, sft.completion_ids, 0.0)


def test_implicit_prompt_is_common_prefix():
    c = [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d")]
    r = [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "e")]
    p, cc, rr = chat.split_preference({"chosen": c, "rejected": r}, file="f", line=1)
    assert p == c[:3] and cc == c[3:] and rr == r[3:]
    # responses that differ in an earlier turn: the prompt stops there (TRL's extract_prompt)
    r2 = [m("user", "a"), m("assistant", "x"), m("user", "c"), m("assistant", "e")]
    p, cc, rr = chat.split_preference({"chosen": c, "rejected": r2}, file="f", line=1)
    assert p == c[:1] and cc == c[1:]


def test_standard_rows_unchanged():
    row = {"prompt": "P", "chosen": " a", "rejected": " b", "x": 1}
    ex = jsonl.preference_from_row(row, file="f", line=1)
    assert ex == PreferenceExample("P", " a", " b", {"x": 1, "source": "f", "line": 1})
    assert jsonl.sft_from_row({"prompt": "P", "completion": " a"}, file="f", line=2) == SFTExample(
        "P", " a", {"source": "f", "line": 2})


U, A = m("user", "q"), m("assistant", "a")
BAD_ROWS = [
    ({"prompt": [{"content": "q"}], "chosen": [A], "rejected": [m("assistant", "b")]}, "bad_message",
     r"key 'prompt': message 0: no 'role'"),
    ({"prompt": [{"role": "user"}], "chosen": [A], "rejected": [m("assistant", "b")]}, "bad_message",
     r"message 0: no 'content'"),
    ({"prompt": [m("wizard", "q")], "chosen": [A], "rejected": [m("assistant", "b")]}, "unknown_role",
     r"unknown role 'wizard'"),
    ({"prompt": [U], "chosen": [A, m("user", "more?")], "rejected": [m("assistant", "b")]},
     "last_not_assistant", r"key 'chosen': .*must end with the assistant's message, ends with 'user'"),
    ({"chosen": [U, A], "rejected": [m("user", "other"), m("assistant", "b")]}, "no_shared_prompt",
     "share no prompt"),
    ({"prompt": [U], "chosen": [A], "rejected": [A]}, "identical_responses", "identical"),
    ({"prompt": [U], "chosen": "a", "rejected": [A]}, "not_messages", "expected a list of messages"),
    ({"prompt": [U], "chosen": [], "rejected": [A]}, "empty_messages", "no messages"),
]


@pytest.mark.parametrize("row,kind,msg", BAD_ROWS)
def test_bad_rows_name_file_line_key(tmp_path, row, kind, msg):
    p = tmp_path / "d.jsonl"
    good = {"prompt": [U], "chosen": [A], "rejected": [m("assistant", "b")]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=msg) as e:
        jsonl.read_preference_jsonl(p)
    assert e.value.kind == kind and str(e.value).startswith(f"{p}:2: ")
    pol = ErrorPolicy("skip")
    assert len(jsonl.read_preference_jsonl(p, pol)) == 1 and pol.counts == {kind: 1}


def test_template_that_raises_and_empty_response(tok, tmp_path):
    tok.chat_template = "{% for x in messages %}{{ raise_exception('no ' + x['role']) }}{% endfor %}"
    ex = jsonl.preference_from_row({"prompt": [U], "chosen": [A], "rejected": [m("assistant", "b")]},
                                   file="d.jsonl", line=4)
    with pytest.raises(DataError, match=r"d\.jsonl:4: key 'prompt': the chat template raised .*no user") as e:
        tokenize_pair(ex, tok, BIG)
    assert e.value.kind == "template_error"
    tok.chat_template = ("{% for x in messages %}{% if x['role'] != 'assistant' %}{{ x['content'] }}"
                         "{% endif %}{% endfor %}")  # drops the assistant's words: nothing after the prompt
    with pytest.raises(DataError, match=r"d\.jsonl:4: key 'chosen': empty response after the chat template"):
        tokenize_pair(ex, tok, BIG)
    pol = ErrorPolicy("skip")
    out, _ = tokenize_all([ex], tok, BIG, pol)
    assert out == [] and pol.counts == {"empty_response": 1}


def test_tokenizer_without_template(tok):
    tok.chat_template = None
    ex = jsonl.preference_from_row({"prompt": [U], "chosen": [A], "rejected": [m("assistant", "b")]},
                                   file="f", line=1)
    with pytest.raises(ValueError, match="needs a chat template"):
        tokenize_pair(ex, tok, BIG)


# --- Hugging Face `datasets` input (parquet, arrow, save_to_disk folders) -----------------------------

def _rows():
    rows = trl_rows()
    return [rows[0], rows[2], {"prompt": "Plain text prompt:", "chosen": " yes", "rejected": " no"}]


def test_parquet_rows_equal_jsonl_rows(tmp_path, tok):
    import datasets  # noqa: F401  (the test extra has it: missing, the test fails)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpoq_jax.data.sources import SourceConfig, load_examples

    conv = _rows()[:2]  # one table holds one format (a column is either strings or messages)
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "d.parquet")
    jsonl.write_jsonl(tmp_path / "d.jsonl", conv)
    a, pa_pol = load_examples(SourceConfig(source="datasets", path=str(tmp_path / "d.parquet")))
    b, _ = load_examples(SourceConfig(source="jsonl", path=str(tmp_path / "d.jsonl")))
    assert pa_pol.n_ok == 2
    assert [(e.prompt, e.chosen, e.rejected) for e in a] == [(e.prompt, e.chosen, e.rejected) for e in b]
    ta, _ = tokenize_all(a, tok, BIG)
    tb, _ = tokenize_all(b, tok, BIG)
    assert [(t.prompt_ids, t.chosen_ids) for t in ta] == [(t.prompt_ids, t.chosen_ids) for t in tb]


def test_datasets_folder_splits_sft_and_bad_row(tmp_path):
    import datasets

    from dpoq_jax.data.sources import SourceConfig, load_examples

    conv = [m("user", "q"), m("assistant", "a")]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"messages": conv}, {"messages": conv + [m("user", "x")]}]),
        "test": datasets.Dataset.from_list([{"messages": conv}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = SourceConfig(source="datasets", path=str(tmp_path / "ds"), split="test")
    out, _ = load_examples(cfg, "sft")
    assert len(out) == 1 and out[0].prompt == conv[:1] and out[0].completion == conv[1:]
    with pytest.raises(DataError, match=rf"{tmp_path / 'ds'}:2: key 'messages': .*ends with 'user'"):
        load_examples(dataclasses.replace(cfg, split="train"), "sft")
    out, pol = load_examples(dataclasses.replace(cfg, split="train", on_error="skip"), "sft")
    assert len(out) == 1 and pol.counts == {"last_not_assistant": 1}
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_examples(dataclasses.replace(cfg, split="dev"), "sft")
    with pytest.raises(FileNotFoundError, match="no dataset there"):
        load_examples(SourceConfig(source="datasets", path=str(tmp_path / "nothing_here")))


def test_datasets_labelled_rows_and_unpaired_pairs(tmp_path):
    import datasets

    from dpoq_jax.data.examples import OutcomeExample
    from dpoq_jax.data.sources import SourceConfig, load_examples

    labelled = datasets.Dataset.from_list([{"prompt": "a", "completion": " b", "label": True},
                                           {"prompt": "a", "completion": " c", "label": False}])
    labelled.to_parquet(str(tmp_path / "kto.parquet"))
    out, _ = load_examples(SourceConfig(source="datasets", path=str(tmp_path / "kto.parquet")), "outcome")
    assert [(type(e), e.completion, e.label) for e in out] == [(OutcomeExample, " b", 1.0),
                                                               (OutcomeExample, " c", 0.0)]  # fmt: skip
    pairs = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    pairs.to_parquet(str(tmp_path / "dpo.parquet"))
    out, _ = load_examples(SourceConfig(source="datasets", path=str(tmp_path / "dpo.parquet")), "outcome")
    assert [(e.completion, e.label) for e in out] == [(" b", 1.0), (" c", 0.0)]
    sft = datasets.Dataset.from_list([{"prompt": "a", "completion": " b"}])
    sft.to_parquet(str(tmp_path / "sft.parquet"))
    with pytest.raises(DataError, match=r"sft.parquet:1: key 'label': missing key"):
        load_examples(SourceConfig(source="datasets", path=str(tmp_path / "sft.parquet")), "outcome")


def test_generate_and_score_inputs_take_chat_rows(tmp_path, tok):
    from dpoq_jax.commands.prompts import encode_all, read_prompts
    from dpoq_jax.commands.score import read_pairs

    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": [U]}) + "\n" + json.dumps({"messages": [m("system", "s"), U]}) + "\n"
                 + json.dumps({"prompt": "plain"}) + "\n")
    recs = read_prompts(str(p))
    assert recs[1]["prompt"] == [m("system", "s"), U] and recs[2]["prompt"] == "plain"
    ids = encode_all(tok, [r["prompt"] for r in recs], [r["where"] for r in recs])
    assert tok.decode(ids[0]).endswith("q<|im_end|>\n<|im_start|>assistant\n")
    p.write_text(json.dumps({"prompt": [U]}) + "\n" + json.dumps({"prompt": [m("bot", "x")]}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: key 'prompt': message 0: unknown role 'bot'"):
        read_prompts(str(p))
    q = tmp_path / "pairs.jsonl"
    q.write_text(json.dumps({"chosen": [U, A], "rejected": [U, m("assistant", "b")]}) + "\n"
                 + json.dumps({"prompt": [U], "response": [A]}) + "\n")
    pairs = read_pairs(str(q))
    assert pairs[0]["prompt"] == [U] and pairs[0]["chosen"] == [A] and pairs[1]["response"] == [A]
    q.write_text(json.dumps({"chosen": [U, A], "rejected": [m("user", "z"), A]}) + "\n")
    with pytest.raises(DataError, match=rf"{q}:1: .*share no prompt"):
        read_pairs(str(q))
