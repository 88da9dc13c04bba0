"""Every bad input of issue 4 item 4: a DataError naming file, line and key; or skipped and counted."""

import pytest

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.hh import read_hh_jsonl
from dpoq_jax.data.jsonl import read_preference_jsonl, read_sft_jsonl
from dpoq_jax.data.sources import load_examples
from dpoq_jax.data.synthetic import SyntheticTokenizer
from dpoq_jax.data.tokenize import TokenizeConfig, tokenize_all

GOOD = b'{"prompt": "ab=", "chosen": "1", "rejected": "2"}\n'
# (line bytes, kind, key, message fragment)
BAD = [
    (b'{"prompt": "ab=", "chosen": "1", \n', "malformed_json", None, "malformed JSON"),
    (b'["ab=", "1", "2"]\n', "not_object", None, "expected a JSON object, got list"),
    (b'{"prompt": "ab=", "chosen": "1"}\n', "missing_key", "rejected", "missing key"),
    (
        b'{"prompt": 3, "chosen": "1", "rejected": "2"}\n',
        "not_string",
        "prompt",
        "expected a string, got int",
    ),
    (b'{"prompt": "ab=", "chosen": null, "rejected": "2"}\n', "not_string", "chosen", "got NoneType"),
    (b'{"prompt": "ab=", "chosen": "  ", "rejected": "2"}\n', "empty_response", "chosen", "empty response"),
    (b'{"prompt": "ab=", "chosen": "1", "rejected": "1"}\n', "identical_responses", "rejected", "identical"),
    (
        b'{"prompt": "ab\xff=", "chosen": "1", "rejected": "2"}\n',
        "invalid_utf8",
        None,
        "invalid UTF-8 at byte 14",
    ),
]


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n" + b"".join(line for line, *_ in BAD) + GOOD)
    return path


@pytest.mark.parametrize("case", range(len(BAD)))
def test_each_bad_line_fails_with_file_line_key(tmp_path, case):
    line, kind, key, fragment = BAD[case]
    path = tmp_path / "one.jsonl"
    path.write_bytes(GOOD + line)
    with pytest.raises(DataError) as info:
        read_preference_jsonl(path, ErrorPolicy("fail"))
    err = info.value
    assert (err.kind, err.file, err.line, err.key) == (kind, str(path), 2, key)
    assert str(err).startswith(f"{path}:2: ") and fragment in str(err)
    if key is not None:
        assert f"key {key!r}" in str(err)


def test_skip_counts_every_kind(bad_file):
    policy = ErrorPolicy("skip")
    exs = read_preference_jsonl(bad_file, policy)
    assert [e.meta["line"] for e in exs] == [1, 3 + len(BAD)]  # blank line 2 is ignored
    s = policy.summary()
    assert s["kept"] == 2 and s["skipped"] == len(BAD)
    assert s["by_kind"] == {
        "malformed_json": 1,
        "not_object": 1,
        "missing_key": 1,
        "not_string": 2,
        "empty_response": 1,
        "identical_responses": 1,
        "invalid_utf8": 1,
    }
    assert "skipped 8" in policy.log_summary("test")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file does not exist"):
        read_preference_jsonl(tmp_path / "nope.jsonl")
    policy = ErrorPolicy("skip")
    assert read_sft_jsonl(tmp_path / "nope.jsonl", policy) == [] and policy.counts["missing_file"] == 1
    with pytest.raises(DataError, match="file does not exist"):
        load_examples({"source": "hh", "path": str(tmp_path / "nope.jsonl")})


def test_prompt_longer_than_limit(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD + b'{"prompt": "abcdefghij=", "chosen": "1", "rejected": "2"}\n')
    exs = read_preference_jsonl(path)
    cfg = TokenizeConfig(max_prompt_tokens=5, truncate_prompt=False)
    with pytest.raises(DataError, match=r"p.jsonl:2: key 'prompt': prompt has 11 tokens"):
        tokenize_all(exs, SyntheticTokenizer(), cfg)
    policy = ErrorPolicy("skip")
    pairs, _ = tokenize_all(exs, SyntheticTokenizer(), cfg, policy)
    assert len(pairs) == 1 and policy.counts == {"prompt_too_long": 1}


def test_sft_and_hh_bad_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": ""}\n')
    with pytest.raises(DataError, match=r"s.jsonl:1: key 'completion': empty response"):
        read_sft_jsonl(path)
    hh = tmp_path / "hh.jsonl"
    hh.write_bytes(
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: x"}\n'
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: b"}\n'
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant:", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
    )
    with pytest.raises(DataError, match=r"hh.jsonl:1: key 'chosen': no common"):
        read_hh_jsonl(hh)
    policy = ErrorPolicy("skip")
    assert read_hh_jsonl(hh, policy) == []
    assert policy.counts == {"no_assistant_turn": 1, "identical_responses": 1, "empty_response": 1}


def test_bad_policy_choice():
    with pytest.raises(ValueError, match="on_error must be one of"):
        ErrorPolicy("ignore")
