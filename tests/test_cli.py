"""The `dpoq` commands as a user runs them: bad input ends in exactly one line on stderr that names what
and where, exit status 1 or 2, no traceback; every option's --help shows its meaning and default;
`dpoq convert` exports a real `dpoq train` run folder with its tokenizer.

Most cases run the command in this process (`dpoq_jax.cli.main(argv)`, stderr captured, a `SystemExit`
with a message turned into what the interpreter prints: the message and status 1); a few run the real
`python -m dpoq_jax.cli` in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import CLI_CONTEXT as CONTEXT
from helpers import assert_one_error, run, write_jsonl

from dpoq_jax import cli
from dpoq_jax import parser as dpoq_parser
from dpoq_jax.data.synthetic import SyntheticTokenizer, make_task
from dpoq_jax.models.safetensors_dir import SafetensorsDir, write_safetensors
from dpoq_jax.train.load import load_model

REPO = Path(__file__).resolve().parents[1]


def run_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "dpoq_jax.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return p.returncode, p.stderr


# ------------------------------------------------------------------------------------------------
# --help: every option of every subcommand says what it is and its default


class _Stop(Exception):
    pass


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, as its main() builds it (caught at its first parse)."""
    out: dict[str, argparse.ArgumentParser] = {}
    original = argparse.ArgumentParser.parse_known_args
    try:
        for name in cli.COMMANDS:

            def grab(self, args=None, namespace=None, name=name):
                out[name] = self
                raise _Stop

            argparse.ArgumentParser.parse_known_args = grab
            with pytest.raises(_Stop):
                cli.main([name])
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_and_default(name):
    parser = _parsers()[name]
    assert issubclass(parser.formatter_class, dpoq_parser.HelpFormatter), name
    formatter = parser.formatter_class(prog=parser.prog)
    options = [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    assert len(options) >= 3
    for action in options:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        assert action.help and len(action.help) > 8, f"dpoq {name} {flag}: no help text"
        shown = formatter._get_help_string(action) % {"default": action.default}
        says_default = f"(default: {action.default})" in shown or "None:" in shown
        assert says_default or "required" in shown, f"dpoq {name} {flag}: default not shown: {shown!r}"


def test_cli_reference_page_lists_every_option():
    """docs/cli.md has a section per command whose table names each of its options."""
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"### `dpoq ([\w-]+)`\n(.*?)(?=\n### |\Z)", page, flags=re.S))
    assert set(sections) == set(cli.COMMANDS)
    for name, parser in _parsers().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in sections[name], f"docs/cli.md: dpoq {name} {flag} missing"


def test_help_lists_split_default_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--split {train,validation,test}" in out and "(default: test)" in out


# ------------------------------------------------------------------------------------------------
# usage errors: one line, status 2


def test_score_bogus_split_is_one_line_listing_the_splits(tmp_path):
    rc, err = run_subprocess(
        [
            "score",
            "--beta",
            "0.1",
            "--policy",
            "p",
            "--reference",
            "r",
            "--synthetic",
            "error_injection",
            "--split",
            "bogus",
            "--out-dir",
            "out",
        ],
        tmp_path,
    )
    assert rc == 2
    assert_one_error(
        rc,
        err,
        r"^dpoq score: error: argument --split: invalid choice: 'bogus' .*'train', "
        r"'validation', 'test'",
    )


def test_unknown_option_and_missing_required(capsys):
    rc, err = run(["generate", "--model", "m", "--prompts", "p", "--out", "o", "--beems", "3"], capsys)
    assert rc == 2
    assert_one_error(rc, err, r"^dpoq generate: error: unrecognized arguments: --beems 3")
    rc, err = run(["convert", "--to", "x"], capsys)
    assert rc == 2
    assert_one_error(rc, err, r"^dpoq convert: error: the following arguments are required: --from")


# ------------------------------------------------------------------------------------------------
# score / generate: the flag, file and line of what is wrong


def test_score_names_the_missing_model_flag(tmp_path, model_dir, capsys):
    base = ["--beta", "0.1", "--synthetic", "error_injection", "--out-dir", str(tmp_path / "r")]
    rc, err = run(["score", "--policy", str(tmp_path / "nope"), "--reference", str(model_dir), *base], capsys)
    assert_one_error(rc, err, r"^dpoq score: error: --policy .*nope: not a directory$")
    rc, err = run(["score", "--policy", str(model_dir), "--reference", str(tmp_path / "nope"), *base], capsys)
    assert_one_error(rc, err, r"^dpoq score: error: --reference .*nope: not a directory$")
    rc, err = run(
        [
            "score",
            "--beta",
            "0.1",
            "--policy",
            str(model_dir),
            "--reference",
            str(model_dir),
            "--tokenizer",
            str(tmp_path),
            *base,
        ],
        capsys,
    )
    assert_one_error(rc, err, r"^dpoq score: error: --tokenizer .*: no tokenizer files in this directory")


def test_empty_prompt_names_file_and_line(tmp_path, model_dir, capsys):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        {"prompt": "<bos>c:1=", "chosen": "1", "rejected": "2"},
        {"prompt": "", "chosen": "1", "rejected": "2"},
    )
    m = str(model_dir)
    rc, err = run(
        ["score", "--beta", "0.1", "--policy", m, "--reference", m, "--pairs", str(pairs),
         "--out-dir", str(tmp_path / "r")],
        capsys,
    )
    assert_one_error(rc, err, r"^dpoq score: error: .*pairs.jsonl:2, key 'prompt': the prompt is empty")
    rc, err = run(
        ["generate", "--model", m, "--prompts", str(pairs), "--out", str(tmp_path / "g.jsonl")], capsys
    )
    assert_one_error(rc, err, r"^dpoq generate: error: .*pairs.jsonl:2: the prompt is empty")


def test_score_refuses_sequences_longer_than_the_context(tmp_path, model_dir, capsys):
    long = "1" * 40  # 40 tokens + EOS after a 5-token prompt: 46 > 16 positions
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        {"prompt": "<bos>c:1=", "response": "1"},
        {"prompt": "<bos>c:1=", "response": long},
    )
    m = str(model_dir)
    argv = ["score", "--beta", "0.1", "--policy", m, "--reference", m, "--pairs", str(pairs),
            "--out-dir", str(tmp_path / "r")]
    rc, err = run(argv, capsys)
    assert_one_error(
        rc,
        err,
        rf"pairs.jsonl:2, key 'response': prompt 5 \+ response 41 tokens exceed the "
        rf"models' context of {CONTEXT} positions.*--truncate",
    )
    assert not (tmp_path / "r" / "scores.json").exists()
    rc, err = run([*argv, "--truncate"], capsys)
    assert rc == 0, err
    items = json.loads((tmp_path / "r" / "scores.json").read_text())["items"]
    assert len(items[0]["responses"]["response"]["rewards"]) == 2  # "1" + EOS, untouched
    assert len(items[1]["responses"]["response"]["rewards"]) == CONTEXT - 5  # cut to the context
    assert "1 responses cut to the context of 16 positions" in err


def test_generate_refuses_prompts_that_leave_no_room(tmp_path, model_dir, capsys):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", {"prompt": "<bos>c:1="}, {"prompt": "<bos>c:" + "1" * 12 + "="}
    )
    m, out = str(model_dir), str(tmp_path / "g.jsonl")
    base = ["generate", "--model", m, "--prompts", str(prompts), "--out", out]
    rc, err = run([*base, "--max-new-tokens", "4"], capsys)
    assert_one_error(
        rc,
        err,
        r"p.jsonl:2: prompt of 16 tokens \+ --max-new-tokens 4 exceed the model's context "
        r"of 16 positions; lower --max-new-tokens or pass --truncate-prompt",
    )
    rc, err = run([*base, "--max-new-tokens", "16"], capsys)
    assert_one_error(rc, err, r"^dpoq generate: error: --max-new-tokens 16 leaves no room for a prompt")
    rc, err = run([*base, "--max-new-tokens", "4", "--truncate-prompt"], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in Path(out).read_text().splitlines()]
    assert len(lines) == 2 and all(1 <= o["length"] <= 4 for x in lines for o in x["outputs"])
    assert "1 prompts cut from the left" in err
    # no --max-new-tokens: as many as the context leaves after the longest prompt (16 - 5 here)
    short = write_jsonl(tmp_path / "s.jsonl", {"prompt": "<bos>c:1="})
    rc, err = run(["generate", "--model", m, "--prompts", str(short), "--out", out], capsys)
    assert rc == 0, err
    assert "--max-new-tokens 11 (what the model's context of 16 positions leaves" in err
    (line,) = [json.loads(x) for x in Path(out).read_text().splitlines()]
    assert 1 <= line["outputs"][0]["length"] <= 11
    # ... and a prompt that fills the context is still refused with its file and line
    rc, err = run(["generate", "--model", m, "--prompts", str(prompts), "--out", out], capsys)
    assert_one_error(rc, err, r"p.jsonl:2: prompt of 16 tokens \+ --max-new-tokens 1 exceed the model's")


def test_guided_without_reference(tmp_path, model_dir, capsys):
    rc, err = run(
        [
            "generate",
            "--model",
            str(model_dir),
            "--synthetic",
            "error_injection",
            "--mode",
            "guided",
            "--out",
            str(tmp_path / "g.jsonl"),
        ],
        capsys,
    )
    assert_one_error(rc, err, r"--mode guided needs --reference")


# ------------------------------------------------------------------------------------------------
# convert


def test_convert_tokenizer_argument_is_checked(tmp_path, model_dir, capsys):
    base = ["convert", "--from", str(model_dir), "--to", str(tmp_path / "out")]
    rc, err = run([*base, "--tokenizer", str(tmp_path / "nonexistent")], capsys)
    assert_one_error(
        rc, err, r"^dpoq convert: error: --tokenizer .*nonexistent: tokenizer directory does not exist"
    )
    rc, err = run([*base, "--tokenizer", str(tmp_path)], capsys)
    assert_one_error(rc, err, r"^dpoq convert: error: --tokenizer .*: no tokenizer files in this directory")
    assert not (tmp_path / "out").exists()
    rc, err = run([*base, "--tokenizer", "synthetic"], capsys)
    assert rc == 0, err
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))


@pytest.mark.parametrize(
    "damage, pattern",
    [
        ("random", r"model.safetensors: not a safetensors file \(header length \d+, file size 4096 bytes\)"),
        ("truncated", r"model.safetensors: tensor '.*': bytes \[\d+, \d+\) do not fit its shape"),
        ("header_list", r"model.safetensors: not a safetensors file \(header is a JSON list\)"),
        ("config_array", r"config.json: expected a JSON object \(a Hugging Face config\), got a list"),
        ("config_garbage", r"config.json: invalid JSON"),
        ("missing_tensor", r"safetensors files lack tensors \['model.norm.weight'\] \(1 missing\)"),
    ],
)
def test_convert_damaged_hf_directory_is_one_line(tmp_path, model_dir, damage, pattern, capsys):
    """One damage kind runs the real command in a subprocess, the others in this process (faster)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    config, weights = (model_dir / "config.json").read_bytes(), (model_dir / "model.safetensors").read_bytes()
    if damage == "random":
        weights = np.random.default_rng(0).bytes(4096)
    elif damage == "truncated":
        weights = weights[: len(weights) // 2]
    elif damage == "header_list":
        weights = (8).to_bytes(8, "little") + b"[1,2,3] "
    elif damage == "missing_tensor":
        st = SafetensorsDir(str(model_dir))
        tensors = {n: np.asarray(st.get(n)) for n in st.where if n != "model.norm.weight"}
        write_safetensors(str(bad / "model.safetensors"), tensors)
        weights = (bad / "model.safetensors").read_bytes()
    elif damage == "config_array":
        config = b"[1, 2]"
    else:
        config = b"\x00\xff{"
    (bad / "config.json").write_bytes(config)
    (bad / "model.safetensors").write_bytes(weights)
    argv = ["convert", "--from", str(bad), "--to", str(tmp_path / "out")]
    rc, err = run_subprocess(argv, tmp_path) if damage == "random" else run(argv, capsys)
    assert_one_error(rc, err, r"^dpoq convert: error: .*" + pattern)
    if damage in ("truncated", "missing_tensor"):  # the same directory as a model of `dpoq score`
        rc, err = run(
            [
                "score",
                "--beta",
                "0.1",
                "--policy",
                str(bad),
                "--tokenizer",
                "synthetic",
                "--reference",
                str(model_dir),
                "--synthetic",
                "error_injection",
                "--out-dir",
                str(tmp_path / "r"),
            ],
            capsys,
        )
        assert_one_error(rc, err, r"^dpoq score: error: --policy .*bad: .*" + pattern)


def test_dpo_config_without_sft_run_names_the_key(tmp_path):
    rc, err = run_subprocess(
        [
            "train",
            "--config",
            f"{REPO}/dpoq_jax/configs/synthetic.py:error_injection:dpo",
            "--workdir",
            str(tmp_path / "w"),
        ],
        tmp_path,
    )
    assert_one_error(
        rc, err, r"^config error: config key 'model.path' is required when model.init='checkpoint'"
    )
    assert not (tmp_path / "w").exists()


def test_no_shipped_default_points_at_a_machine_path():
    """No file of the project names a fixed /tmp or home-directory path as a default or a test location
    (the DPO configs once defaulted to /tmp/dpoq/..., so a test passed only where a run had been made).
    Exceptions: paths on the remote TPU VM (`~/` in the gcloud ssh/scp commands of tpu_scripts/)."""
    pattern = re.compile(r"""["'=\s(]/tmp\b|\$HOME\b|expanduser|Path\.home|gettempdir|["'=\s]~/""")
    hits = []
    for sub in ("dpoq_jax", "experiments", "benchmarks", "tpu_scripts", "tests", ".ci"):
        for f in sorted((REPO / sub).rglob("*")):
            if f.suffix not in (".py", ".sh", ".toml", ".cfg", "") or not f.is_file() or f == Path(__file__):
                continue
            for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pattern.search(line) and not (sub == "tpu_scripts" and "~/dpoq" in line):
                    if not (sub == "tests" and "~/dpoq" in line and "tpu" in f.name):
                        hits.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ------------------------------------------------------------------------------------------------
# the synthetic tokenizer as Hugging Face files


def test_synthetic_tokenizer_files_encode_and_decode_the_same(tmp_path):
    from transformers import AutoTokenizer

    ours = SyntheticTokenizer()
    files = ours.save_pretrained(str(tmp_path))
    assert "tokenizer.json" in files
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (0, 1, 2)
    assert len(theirs) == ours.vocab_size
    texts = []
    for task in ("error_injection", "dense_reward"):
        for e in make_task(task, seed=1).preference_examples(200, "test"):
            texts += [e.prompt, e.chosen, e.rejected, e.prompt + e.chosen + "<eos><pad>"]
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
    with pytest.raises(Exception, match="UNK|unk|Unk"):  # a character outside the vocabulary
        theirs.encode("#", add_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# a real `dpoq train` run folder: convert, then the export is usable on its own (slow: trains)


@pytest.mark.slow
def test_convert_a_real_train_run(tmp_path, capsys):
    from transformers import AutoTokenizer


    run_dir = tmp_path / "sft"
    rc, err = run(
        [
            "train",
            "--config",
            f"{REPO}/dpoq_jax/configs/synthetic.py:error_injection:sft",
            "--workdir",
            str(run_dir),
            "--config.train.num_steps=2",
            "--config.train.eval_every=2",
            "--config.train.log_every=1",
            "--config.checkpoint.every_steps=1",
            "--config.data.num_examples=64",
            "--config.data.num_eval=8",
            "--config.model.hf_export=false",
            "--config.loss.beta=0.37",  # read back by `dpoq score` below when --beta is not given
        ],
        capsys,
    )
    assert rc == 0, err
    # a run folder has its own (non-HF) config.json beside checkpoints/
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoints").is_dir()

    out = tmp_path / "export"
    rc, err = run_subprocess(["convert", "--from", str(run_dir), "--to", str(out)], tmp_path)
    assert rc == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    exported = load_model(str(out))
    cfg = exported.cfg
    restored = load_model(str(run_dir))
    cfg2 = restored.cfg
    assert cfg == cfg2
    jax.tree.map(
        np.testing.assert_array_equal, nnx.state(exported, nnx.Param), nnx.state(restored, nnx.Param)
    )
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode("<bos>c:12=", add_special_tokens=False) == SyntheticTokenizer().encode("<bos>c:12=")
    # an earlier step, and the step that does not exist
    rc, err = run(["convert", "--from", str(run_dir), "--to", str(tmp_path / "step1"), "--step", "1"], capsys)
    assert rc == 0, err
    rc, err = run(["convert", "--from", str(run_dir), "--to", str(tmp_path / "step9"), "--step", "9"], capsys)
    assert_one_error(rc, err, r"^dpoq convert: error: .*no checkpoint for step 9 \(steps found: \[1, 2\]\)")

    # the exported folder is self-contained: generate and score find its tokenizer themselves
    rc, err = run(
        [
            "generate",
            "--model",
            str(out),
            "--synthetic",
            "error_injection",
            "--n",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "g.jsonl"),
        ],
        capsys,
    )
    assert rc == 0, err
    rc, err = run(
        [
            "score",
            "--beta",
            "0.1",
            "--policy",
            str(out),
            "--reference",
            str(run_dir),
            "--synthetic",
            "error_injection",
            "--n",
            "4",
            "--out-dir",
            str(tmp_path / "score"),
        ],
        capsys,
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "score" / "scores.json").read_text())
    credit = json.loads((tmp_path / "score" / "credit.json").read_text())
    assert report["split"] == credit["split"] == "test"
    # without --beta: the policy's own run says which β it trained with; an HF folder cannot say
    args = ["--synthetic", "error_injection", "--n", "4", "--out-dir", str(tmp_path / "score_run")]
    rc, err = run(["score", "--policy", str(run_dir), "--reference", str(out), *args], capsys)
    assert rc == 0, err
    by_run = json.loads((tmp_path / "score_run" / "scores.json").read_text())
    assert by_run["beta"] == 0.37
    rc, err = run(["score", "--policy", str(out), "--reference", str(run_dir), *args], capsys)
    assert_one_error(rc, err, r"^dpoq score: error: --policy .*export: not a `dpoq train` run.*pass --beta$")

    # `tensorboard --logdir WORKDIR` reads the run's event files (tensorboard is in the test extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 2
