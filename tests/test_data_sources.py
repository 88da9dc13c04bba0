"""Round trips of every source on fixture files the tests write themselves, and the config entry point."""

import json

import pytest

from dpoq_jax.data.hh import read_hh_jsonl, split_dialogues
from dpoq_jax.data.jsonl import read_preference_jsonl, read_sft_jsonl, write_jsonl
from dpoq_jax.data.sources import SourceConfig, load_examples, load_tokenizer
from dpoq_jax.data.synthetic import SyntheticTokenizer


def test_jsonl_round_trip(tmp_path):
    rows = [
        {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "id": 1},
        {"prompt": "Über", "chosen": " ja ✓", "rejected": " nein", "id": 2},
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    exs = read_preference_jsonl(tmp_path / "p.jsonl")
    assert [(e.prompt, e.chosen, e.rejected) for e in exs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert exs[1].meta == {"id": 2, "source": str(tmp_path / "p.jsonl"), "line": 2}
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": " b"}])
    (sft,) = read_sft_jsonl(tmp_path / "s.jsonl")
    assert (sft.prompt, sft.completion) == ("a", " b")


def test_hh_split():
    c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken..."
    r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."
    prompt, cr, rr = split_dialogues(c, r)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    assert (cr, rr) == (" Why did the chicken...", " No.")
    # responses that share a start still split at the last assistant marker
    prompt, cr, rr = split_dialogues(
        "\n\nHuman: x\n\nAssistant: Sure, a", "\n\nHuman: x\n\nAssistant: Sure, b"
    )
    assert (prompt, cr, rr) == ("\n\nHuman: x\n\nAssistant:", " Sure, a", " Sure, b")


def test_hh_file_round_trip(tmp_path):
    rows = [{"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}]
    write_jsonl(tmp_path / "hh.jsonl", rows)
    (e,) = read_hh_jsonl(tmp_path / "hh.jsonl")
    assert (e.prompt + e.chosen, e.prompt + e.rejected) == (rows[0]["chosen"], rows[0]["rejected"])


def _tldr_row(i, split, choice=0, **info):
    base = {"id": f"t3_{i}", "post": f"Post {i} text.", "title": f"Title {i}", "subreddit": "AskReddit"}
    base.update(info)
    return {
        "info": base,
        "summaries": [{"text": f"first {i}", "policy": "a"}, {"text": f"second {i}", "policy": "b"}],
        "choice": choice,
        "split": split,
        "worker": "w1",
        "batch": "b1",
    }


@pytest.fixture(scope="module")
def tldr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tldr")
    (d / "comparisons").mkdir()
    rows = [
        _tldr_row(0, "train", 0),
        _tldr_row(1, "train", 1),
        _tldr_row(1, "train", 0),
        _tldr_row(2, "valid1"),
        _tldr_row(3, "valid2", 1),
    ]
    write_jsonl(d / "comparisons" / "batch1.json", rows[:3])
    cnn = {
        "info": {"id": "c", "article": "news", "title": "t"},
        "summaries": [],
        "choice": 0,
        "split": "train",
    }
    with open(d / "comparisons" / "batch2.json", "w") as f:
        for r in rows[3:] + [cnn]:
            f.write(json.dumps(r) + "\n")
    return d


def test_tldr_builder_round_trip(tldr_dir, tmp_path):
    from dpoq_jax.data.tldr import load_tldr

    train = load_tldr(tldr_dir, tmp_path, "train")
    assert len(train) == 3
    got = sorted((e.meta["id"], e.chosen, e.rejected) for e in train)
    assert got == [
        ("t3_0", " first 0", " second 0"),
        ("t3_1", " first 1", " second 1"),
        ("t3_1", " second 1", " first 1"),
    ]
    e = next(e for e in train if e.meta["id"] == "t3_0")
    assert e.prompt == "SUBREDDIT: r/AskReddit\nTITLE: Title 0\nPOST: Post 0 text.\nTL;DR:"
    (test,) = load_tldr(tldr_dir, tmp_path, "test")
    assert (test.chosen, test.rejected) == (" second 3", " first 3")
    assert len(load_tldr(tldr_dir, tmp_path, "validation")) == 1
    sft = load_tldr(tldr_dir, tmp_path, "train", kind="sft")
    assert sorted((s.meta["id"], s.completion) for s in sft) == [
        ("t3_0", " first 0"),
        ("t3_1", " first 1"),
        ("t3_1", " second 1"),
    ]
    import sys

    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_tldr_bad_rows_fail_or_skip(tldr_dir, tmp_path):
    from dpoq_jax.data.errors import DataError, ErrorPolicy
    from dpoq_jax.data.tldr import read_comparisons

    policy = ErrorPolicy("skip")
    rows = read_comparisons(tldr_dir, policy)
    assert {k: len(v) for k, v in rows.items()} == {"train": 3, "validation": 1, "test": 1}
    assert policy.summary()["by_kind"] == {"not_reddit": 1}
    assert len(read_comparisons(tldr_dir, ErrorPolicy("fail"))["train"]) == 3  # CNN/DM rows: always skipped
    bad = tmp_path / "bad"
    bad.mkdir()
    row = _tldr_row(5, "train")
    del row["info"]["title"]
    write_jsonl(
        bad / "batch9.json",
        [_tldr_row(4, "train"), row, {**_tldr_row(6, "train"), "choice": 2}, {**_tldr_row(7, "valid3")}],
    )
    with pytest.raises(DataError, match=r"batch9.json:2: key 'info.title'"):
        read_comparisons(bad, ErrorPolicy("fail"))
    policy = ErrorPolicy("skip")
    assert len(read_comparisons(bad, policy)["train"]) == 1
    assert policy.summary()["by_kind"] == {"missing_key": 1, "bad_choice": 1, "bad_split": 1}
    with pytest.raises(DataError, match="does not exist"):
        read_comparisons(tmp_path / "nope", ErrorPolicy("skip"))


def test_config_entry_point(tmp_path, tldr_dir):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    exs, policy = load_examples(SourceConfig(source="jsonl", path=str(tmp_path / "p.jsonl")))
    assert len(exs) == 1 and policy.summary()["kept"] == 1
    exs, _ = load_examples(SourceConfig(source="synthetic", task="dense_reward", num_examples=4), kind="sft")
    assert len(exs) == 8
    exs, _ = load_examples(
        SourceConfig(source="synthetic", task="error_injection", num_examples=3, task_kwargs={"seed": 2},
                     split="validation")  # fmt: skip
    )
    assert len(exs) == 3 and exs[0].meta["split"] == "validation"
    exs, policy = load_examples(
        SourceConfig(source="tldr", path=str(tldr_dir), data_dir=str(tmp_path / "tfds"), split="test")
    )
    assert len(exs) == 1 and policy.summary()["by_kind"] == {"not_reddit": 1}
    assert isinstance(load_tokenizer(SourceConfig(source="synthetic")), SyntheticTokenizer)
    with pytest.raises(ValueError, match="data source must be one of"):
        load_examples(SourceConfig(source="csv"))
    with pytest.raises(ValueError, match="needs a path"):
        load_examples(SourceConfig(source="jsonl"))


def test_package_import_is_light():
    """The GPU machine has no tensorflow_datasets: importing the data package must not need it (or JAX)."""
    import subprocess
    import sys

    heavy = "('jax', 'tensorflow_datasets', 'transformers')"
    code = f"import sys, dpoq_jax.data; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
