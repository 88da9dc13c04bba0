"""Every bad input of issue 4 item 4: a DataError naming file, line and key; or skipped and counted."""

import numpy as np
import pytest

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.hh import read_hh_jsonl
from dpoq_jax.data.jsonl import read_preference_jsonl, read_sft_jsonl
from dpoq_jax.data.sources import SourceConfig, load_examples
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
        load_examples(SourceConfig(source="hh", path=str(tmp_path / "nope.jsonl")))


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


# ---- the bad-input corpus through `dpoq train` (issue 16): one case per kind --------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "dpoq_jax" / "configs" / "synthetic.py"
PAIR = b'{"prompt": "a b", "chosen": " c", "rejected": " d"}\n'
SFT = b'{"prompt": "a b", "completion": " c"}\n'
BOM = b"\xef\xbb\xbf"
LABELLED = b'{"prompt": "a b", "completion": " c", "label": true}\n'
# (id, stage, good line, bad line, bad line's position (1 or 2), kind, key, message fragment)
CORPUS = [
    ("malformed_json", "dpo", PAIR, b'{"prompt": "a", \n', 2, "malformed_json", None, "malformed JSON"),
    ("not_object", "dpo", PAIR, b"[1, 2]\n", 2, "not_object", None, "expected a JSON object, got list"),
    ("missing_key", "dpo", PAIR, b'{"prompt": "a", "chosen": " c"}\n', 2, "missing_key", "rejected",
     "missing key"),
    ("not_string", "dpo", PAIR, b'{"prompt": 3, "chosen": " c", "rejected": " d"}\n', 2, "not_string",
     "prompt", "expected a string, got int"),
    ("empty_response", "dpo", PAIR, b'{"prompt": "a", "chosen": " ", "rejected": " d"}\n', 2,
     "empty_response", "chosen", "empty response"),
    ("identical", "dpo", PAIR, b'{"prompt": "a", "chosen": " c", "rejected": " c"}\n', 2,
     "identical_responses", "rejected", "identical"),
    ("invalid_utf8", "dpo", PAIR, b'{"prompt": "a\xff", "chosen": " c", "rejected": " d"}\n', 2,
     "invalid_utf8", None, "invalid UTF-8 at byte 13"),
    ("surrogate_prompt", "dpo", PAIR, b'{"prompt": "a\\ud800", "chosen": " c", "rejected": " d"}\n', 2,
     "invalid_unicode", "prompt", "lone surrogate '\\ud800' at character 1"),
    ("surrogate_chosen", "dpo", PAIR, b'{"prompt": "a", "chosen": " \\udfff", "rejected": " d"}\n', 2,
     "invalid_unicode", "chosen", "lone surrogate"),
    ("empty_prompt", "dpo", PAIR, b'{"prompt": "", "chosen": " c", "rejected": " d"}\n', 2, "empty_prompt",
     "prompt", "prompt has no tokens"),
    ("outcome_label_string", "outcome", LABELLED, b'{"prompt": "a", "completion": " c", "label": "yes"}\n',
     2, "bad_label", "label", "expected true/false or a number in [0, 1], got 'yes'"),
    ("outcome_label_range", "outcome", LABELLED, b'{"prompt": "a", "completion": " c", "label": 1.5}\n',
     2, "bad_label", "label", "got 1.5"),
    ("outcome_label_missing", "outcome", LABELLED, b'{"prompt": "a", "completion": " c"}\n', 1,
     "missing_key", "label", "missing key"),
    ("outcome_empty_completion", "outcome", LABELLED, b'{"prompt": "a", "completion": "", "label": 0}\n',
     2, "empty_response", "completion", "empty response"),
    ("sft_first_not_object", "sft", PAIR, b"7\n", 1, "not_object", None, "got int"),
    ("sft_first_malformed", "sft", PAIR, b'{"prompt": \n', 1, "malformed_json", None, "malformed JSON"),
    ("sft_first_invalid_utf8", "sft", PAIR, b'{"prompt": "\xfe"}\n', 1, "invalid_utf8", None,
     "invalid UTF-8"),
    ("sft_file_first_not_object", "sft", SFT, b'"text"\n', 1, "not_object", None, "got str"),
    ("sft_file_empty_completion", "sft", SFT, b'{"prompt": "a", "completion": ""}\n', 2, "empty_response",
     "completion", "empty response"),
    ("sft_file_surrogate", "sft", SFT, b'{"prompt": "a", "completion": " \\ud834"}\n', 2, "invalid_unicode",
     "completion", "lone surrogate"),
]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A whitespace word-level HF tokenizer over the corpus words (fits the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("wordtok")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    return str(path)


def train_argv(stage, data, tok, workdir, *extra):
    """`dpoq train` arguments; stage "outcome" is DPO with the unpaired loss on labelled responses."""
    cfg = f"{SYNTHETIC}:error_injection:{'sft' if stage == 'sft' else 'dpo'}"
    if stage == "outcome":
        extra = ("--config.loss.loss_type=outcome_ce", *extra)
    return ["--config", str(cfg), "--workdir", str(workdir), "--config.model.init=random",
            "--config.model.path=", "--config.data.source=jsonl", f"--config.data.path={data}",
            f"--config.data.tokenizer_path={tok}", "--config.data.num_eval=0",
            "--config.train.progress_bar=false", "--config.model.hf_export=false", *extra]


def corpus_file(tmp_path, case):
    _, _, good, bad, pos, *_ = case
    path = tmp_path / f"{case[0]}.jsonl"
    path.write_bytes(bad + good + good if pos == 1 else good + bad + good)
    return path


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_fail_one_line_naming_file_line_key(tmp_path, word_tokenizer, case):
    from dpoq_jax.commands.train import train_main

    _, stage, _, _, pos, _, key, fragment = case
    path = corpus_file(tmp_path, case)
    with pytest.raises(SystemExit) as info:
        train_main(train_argv(stage, path, word_tokenizer, tmp_path / "w"))
    msg = info.value.code
    assert isinstance(msg, str)  # SystemExit(str): the interpreter prints it and exits with status 1
    where = f"dpoq train: error: {path}:{pos}: " + (f"key {key!r}: " if key else "")
    assert msg.startswith(where) and fragment in msg, msg
    assert "\n" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_skip_counts_and_uses_the_good_records(tmp_path, word_tokenizer, case):
    from dpoq_jax.train.config import load_config
    from dpoq_jax.train.inputs import load_dataset

    _, stage, _, _, pos, kind, *_ = case
    path = corpus_file(tmp_path, case)
    argv = train_argv(stage, path, word_tokenizer, tmp_path / "w", "--config.data.on_error=skip")
    ds = load_dataset(load_config(argv[1], argv[4:]))
    read = ds.stats["train"]["read"]
    assert (read["kept"], read["skipped"], read["by_kind"]) == (2, 1, {kind: 1})
    good_lines = [2, 3] if pos == 1 else [1, 3]
    assert [ex.meta["line"] for ex in ds.train] == good_lines
    assert all(ex.prompt_ids == [3, 4] for ex in ds.train)  # "a b": the good records' tokens


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_bom_at_file_start_is_accepted(tmp_path, word_tokenizer, on_error):
    from dpoq_jax.train.config import load_config
    from dpoq_jax.train.inputs import load_dataset

    path = tmp_path / "bom.jsonl"
    path.write_bytes(BOM + PAIR + PAIR)
    argv = train_argv("dpo", path, word_tokenizer, tmp_path / "w", f"--config.data.on_error={on_error}")
    ds = load_dataset(load_config(argv[1], argv[4:]))
    assert [ex.meta["line"] for ex in ds.train] == [1, 2]
    assert ds.stats["train"]["read"]["skipped"] == 0
    policy = ErrorPolicy(on_error)
    assert len(read_hh_jsonl(_hh_with_bom(tmp_path), policy)) == 1 and policy.n_skipped == 0


def _hh_with_bom(tmp_path):
    p = tmp_path / "hh_bom.jsonl"
    p.write_bytes(BOM + b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
                  b'"rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n')
    return p


def test_vocab_smaller_than_tokenizer_refused_before_training(tmp_path, word_tokenizer):
    from dpoq_jax.commands.train import train_main

    path = tmp_path / "ok.jsonl"
    path.write_bytes(PAIR * 2)
    argv = train_argv("dpo", path, word_tokenizer, tmp_path / "w", "--config.model.config.vocab_size=5")
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    msg = info.value.code
    assert msg.startswith("dpoq train: error: model vocab_size=5 is smaller than the tokenizer's vocabulary "
                          "(7 tokens, largest id in the data 6") and "\n" not in msg
    assert not (tmp_path / "w" / "checkpoints").exists()  # refused before any training


@pytest.mark.slow
def test_corpus_skip_trains_on_exactly_the_good_records(tmp_path, word_tokenizer):
    """One real `dpoq train` subprocess over the whole corpus (BOM first) with on_error=skip: exit 0,
    the log counts every kind once and keeps exactly the good records."""
    import os
    import subprocess
    import sys

    dpo = [c for c in CORPUS if c[1] == "dpo"]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(BOM + PAIR + b"".join(c[3] for c in dpo) + PAIR)
    tiny = ["--config.model.config.hidden_size=32", "--config.model.config.num_layers=1",
            "--config.model.config.intermediate_size=64", "--config.model.config.head_dim=8",
            "--config.model.config.rotary_dim=8", "--config.train.batch_size=2", "--config.train.num_steps=1",
            "--config.data.on_error=skip"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "dpoq_jax.cli", "train",
                           *train_argv("dpo", path, word_tokenizer, tmp_path / "w", *tiny)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = sorted({c[5] for c in dpo})
    counts = ", ".join(f"{k}: {sum(c[5] == k for c in dpo)}" for k in kinds)
    assert f"train: kept 2, skipped {len(dpo)} ({counts})" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_one_line_and_exit_1_in_a_real_process(tmp_path, word_tokenizer):
    import os
    import subprocess
    import sys

    case = CORPUS[7]  # a lone surrogate: used to end in a TypeError traceback
    path = corpus_file(tmp_path, case)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "dpoq_jax.cli", "train",
                           *train_argv("dpo", path, word_tokenizer, tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"dpoq train: error: {path}:2: key 'prompt': lone surrogate '\\ud800' at character 1 "
        "(not valid Unicode text)"]


# ---- precomputed reference log-probs (`dpoq precompute-ref` output read by reference.mode=precomputed)


def _ref_file(tmp_path, edit=None):
    """Two pairs and a valid reference file for them; `edit(rows)` damages the rows before writing."""
    import json

    from dpoq_jax.data.examples import TokenizedPair
    from dpoq_jax.train.inputs import fingerprint

    pairs = [TokenizedPair([1, 2], [3, 4, 0], [5, 0]), TokenizedPair([1], [6, 0], [7, 8, 9, 0])]
    rows = [{"fingerprint": fingerprint(p), "split": "train",
             "ref_chosen_logps": [-1.0] * len(p.chosen_ids),
             "ref_rejected_logps": [-2.0] * len(p.rejected_ids)} for p in pairs]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    if edit is not None:
        lines = edit(rows, lines)
    path = tmp_path / "ref.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return pairs, str(path)


REF_DAMAGE = {  # kind -> (edit, line, message fragment)
    "torn_json": (lambda rows, lines: [lines[0], lines[1][:20]], 2, "malformed JSON"),
    "not_an_object": (lambda rows, lines: [lines[0], "[1, 2]"], 2, "expected a JSON object, got list"),
    "fingerprint_missing": (lambda rows, lines: [lines[0], lines[1].replace('"fingerprint"', '"fp"')], 2,
                            "key 'fingerprint': missing or not a string"),
    "string_in_logps": (lambda rows, lines: [lines[0].replace("-1.0", '"-1.0"', 1), lines[1]], 1,
                        "key 'ref_chosen_logps': missing or not a list of numbers"),
    "nan_logp": (lambda rows, lines: [lines[0], lines[1].replace("-2.0", "NaN", 1)], 2,
                 "key 'ref_rejected_logps': holds a non-finite log-prob"),
    "wrong_length": (lambda rows, lines: [lines[0].replace("[-1.0, ", "[", 1), lines[1]], 1,
                     "key 'ref_chosen_logps': 2 log-probs for a response of 3 tokens"),
}


@pytest.mark.parametrize("kind", list(REF_DAMAGE))
def test_precomputed_reference_file_errors_name_file_and_line(tmp_path, kind):
    from dpoq_jax.train.inputs import attach_reference

    edit, line, fragment = REF_DAMAGE[kind]
    pairs, path = _ref_file(tmp_path, edit)
    with pytest.raises(DataError) as e:
        attach_reference(pairs, path)
    assert str(e.value).startswith(f"{path}:{line}: ") and fragment in str(e.value), str(e.value)


def test_precomputed_reference_file_attaches_per_token_logps(tmp_path):
    from dpoq_jax.train.inputs import attach_reference

    pairs, path = _ref_file(tmp_path)
    out = attach_reference(pairs, path)
    assert [p.meta["ref_chosen_logps"] for p in out] == [[-1.0] * 3, [-1.0] * 2]
    assert [p.meta["ref_rejected_logps"] for p in out] == [[-2.0] * 2, [-2.0] * 4]


def test_labelled_rows_train_end_to_end(tmp_path, word_tokenizer):
    """{"prompt", "completion", "label"} rows through `dpoq train` (unpaired loss, packed rows)."""
    from dpoq_jax.commands.train import train_main
    from dpoq_jax.train.metrics import read_metrics

    path = tmp_path / "labels.jsonl"
    path.write_bytes(LABELLED + b'{"prompt": "a", "completion": " d c", "label": 0}\n' * 2 + LABELLED)
    tiny = ["--config.model.config.hidden_size=32", "--config.model.config.num_layers=1",
            "--config.model.config.intermediate_size=64", "--config.model.config.head_dim=8",
            "--config.model.config.rotary_dim=8", "--config.train.batch_size=8", "--config.train.num_steps=3",
            "--config.train.log_every=1", "--config.data.layout=packed", "--config.data.num_rows=8"]
    assert train_main(train_argv("outcome", path, word_tokenizer, tmp_path / "w", *tiny)) == 0
    rows = read_metrics(str(tmp_path / "w"), "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["loss"] - np.log(2.0)) < 1e-5  # π = π_ref at the first step
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
