"""Run configs: every file in experiments/configs loads; overrides are typed; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpoq_jax.commands.train import train_main
from dpoq_jax.train.config import ConfigError, apply_override, base_config, load_config, load_config_file

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"  # the real-model configs
FILES = sorted(p.name for p in CONFIGS.glob("*.py"))
SYNTHETIC = Path(__file__).resolve().parents[1] / "dpoq_jax" / "configs" / "synthetic.py"


@pytest.mark.parametrize("name", FILES)
def test_every_config_loads_locked_and_documents_its_launch(name):
    path = CONFIGS / name
    assert f"--config experiments/configs/{name}" in path.read_text()  # launch command in the docstring
    cfg = load_config_file(str(path))
    assert cfg.is_locked and cfg.stage in ("sft", "dpo")
    assert set(cfg.keys()) == set(base_config().keys())  # no config invents its own top-level keys
    with pytest.raises(AttributeError):
        cfg.new_key = 1


def test_paper_setting():
    c = load_config_file(str(CONFIGS / "tldr_pythia2p8b_dpo.py"))
    assert (c.loss.beta, c.optim.lr, c.optim.warmup_steps, c.train.batch_size, c.optim.clip_norm) == (
        0.1,
        5e-7,
        150,
        32,
        10.0,
    )
    assert c.optim.name == "rmsprop"
    assert load_config_file(str(CONFIGS / "tldr_pythia2p8b_dpo.py") + ":1gpu").train.micro_batches == 8
    with pytest.raises(ValueError, match="unknown variant 'tpu9'"):
        load_config_file(str(CONFIGS / "tldr_pythia2p8b_dpo.py") + ":tpu9")


def test_typed_overrides():
    spec = f"{SYNTHETIC}:error_injection:sft"
    c = load_config(
        spec,
        [
            "--config.optim.lr=1e-4",
            "--config.train.num_steps",
            "7",
            "--config.train.progress_bar=false",
            "--config.sharding.rules=[['embed', 'fsdp']]",
            "--config.optim.clip_norm=3",
            "--config.model.lora.targets=q,v",
            "--config.data.buckets=(64, 128)",
        ],
    )
    assert c.model.lora.targets == ("q", "v") and c.data.buckets == (64, 128)
    import ml_collections as mc

    user = mc.ConfigDict({"g": {"rules": [["embed", "fsdp"]], "opt": None}})  # a user config's list field
    user.lock()
    apply_override(user, "g.rules", "[['mlp', 'tensor']]")
    apply_override(user, "g.opt", "(1, 2)")
    assert user.g.rules == [["mlp", "tensor"]] and user.g.opt == (1, 2)
    assert (c.optim.lr, c.train.num_steps, c.train.progress_bar, c.optim.clip_norm) == (1e-4, 7, False, 3.0)
    assert isinstance(c.optim.clip_norm, float)
    assert c.sharding.rules == (["embed", "fsdp"],)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--config.optim.learning_rate=1"],
            r"unknown config key 'optim.learning_rate' .*no 'learning_rate' in optim",
        ),
        (["--config.nope.x=1"], r"unknown config key 'nope.x'"),
        (["--config.train.batch_size=big"], r"config key 'train.batch_size' expects int, got 'big'"),
        (["--config.optim.lr=fast"], r"config key 'optim.lr' expects float, got 'fast'"),
        (["--config.train.progress_bar=maybe"], r"config key 'train.progress_bar' expects bool"),
        (["--config.optim=1"], r"config key 'optim' is a group"),
        (["--config.stage=rlhf"], r"config key 'stage' must be one of"),
        (["--config.data.sft_responses=al"], r"config key 'data.sft_responses' must be one of .*got 'al'"),
        (["--config.loss.loss_type=dpo"], r"config key 'loss.loss_type' must be one of"),
        (
            ["--config.train.micro_batches=5"],
            r"'train.batch_size' \(32\) must be divisible by 'train.micro_batches'",
        ),
        (
            ["--config.data.source=jsonl", "--config.data.path=/no/such/file.jsonl"],
            r"config key 'data.path': path '/no/such/file.jsonl' does not exist",
        ),
        (["--config.data.source=jsonl"], r"config key 'data.path' is required for data.source='jsonl'"),
        (["--config.model.init=hf"], r"config key 'model.path' is required when model.init='hf'"),
        (
            ["--config.model.init=hf", "--config.model.path=/no/model"],
            r"'model.path': path '/no/model' does not exist",
        ),
        (["--lr=1"], r"unexpected argument '--lr=1'"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(f"{SYNTHETIC}:error_injection:sft", overrides)


def test_missing_sft_workdir_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.path.*error_injection_sft.*does not exist"):
        load_config(
            f"{SYNTHETIC}:error_injection:dpo",
            [f"--config.model.path={tmp_path / 'error_injection_sft'}"],
        )
    # No machine-path default: the DPO configs need the SFT run, as their argument or as model.path.
    for task in ("error_injection", "dense_reward"):
        with pytest.raises(ConfigError, match=r"^config key 'model.path' is required .*FILE:DIR"):
            load_config(f"{SYNTHETIC}:{task}:dpo")
        (tmp_path / task).mkdir()
        spec = f"{SYNTHETIC}:{task}:dpo:{tmp_path / task}"
        assert load_config(spec).model.path == str(tmp_path / task)
    with pytest.raises(ConfigError, match="config file '/no/cfg.py' does not exist"):
        load_config("/no/cfg.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        load_config(str(bad))
    c = base_config()
    c.lock()
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        apply_override(c, "model.widht", "3")


# bad config values (issue 16): each was a ZeroDivisionError, a TypeError, every checkpoint deleted,
# or a run that trains on inf/nan; now one line naming the key at load, exit status 2
BAD_VALUES = [
    ("checkpoint.every_steps=0", "config key 'checkpoint.every_steps' must be > 0, got 0"),
    ("train.log_every=0", "config key 'train.log_every' must be > 0, got 0"),
    ("checkpoint.keep=0", "config key 'checkpoint.keep' must be > 0, got 0"),
    ("model.dtype=float33", "config key 'model.dtype' must be one of ('float32', 'bfloat16', 'float16'), "
     "got 'float33'"),
    ("reference.dtype=int99", "config key 'reference.dtype' must be one of"),
    ("model.param_dtype=int8", "config key 'model.param_dtype' must be one of"),
    ("optim.lr=-1e-3", "config key 'optim.lr' must be >= 0, got -0.001"),
    ("optim.lr=inf", "config key 'optim.lr' must be a finite number, got inf"),
    ("optim.lr=nan", "config key 'optim.lr' must be a finite number, got nan"),
    ("loss.beta=0", "config key 'loss.beta' must be > 0, got 0.0"),
    ("train.max_consecutive_nonfinite=0", "config key 'train.max_consecutive_nonfinite' must be > 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_config_values_one_line_exit_2(tmp_path, capsys, override, message):
    argv = ["--config", f"{SYNTHETIC}:error_injection:sft", "--workdir", str(tmp_path / "w"),
            f"--config.{override}"]
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_cli_reports_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(
            [
                "--config",
                f"{SYNTHETIC}:error_injection:sft",
                "--workdir",
                str(tmp_path / "w"),
                "--config.train.steps=3",
            ]
        )
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("config error: unknown config key 'train.steps'")


def test_cli_reports_bad_config_file_and_bad_data_without_traceback(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return 1 +\n")
    with pytest.raises(SystemExit) as info:
        train_main(["--config", str(broken), "--workdir", str(tmp_path / "w")])
    assert info.value.code == 2
    assert "config error: config file " in capsys.readouterr().err
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    argv = ["--config", f"{SYNTHETIC}:error_injection:dpo", "--workdir", str(tmp_path / "w"),
            "--config.data.source=jsonl", f"--config.data.path={data}", "--config.model.init=random",
            f"--config.data.tokenizer_path={tmp_path / 'no_tokenizer'}"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"dpoq train: error: .*no_tokenizer: tokenizer directory does not"):
        train_main(argv)


def test_over_long_prompts_truncate_fail_or_skip(tmp_path):
    """data.truncate_prompt=False turns prompts over data.max_prompt_tokens into bad input."""
    from dpoq_jax.data.errors import DataError
    from dpoq_jax.train.inputs import load_dataset

    # load_dataset reads no model: the SFT run only has to exist for the config to validate.
    (tmp_path / "sft").mkdir()
    spec = f"{SYNTHETIC}:error_injection:dpo:{tmp_path / 'sft'}"
    common = [
        "--config.data.num_examples=20",
        "--config.data.num_eval=4",
        "--config.data.max_prompt_tokens=9",
    ]
    truncated = load_dataset(load_config(spec, common))
    assert len(truncated.train) == 20
    assert all(len(p.prompt_ids) <= 9 for p in truncated.train)
    assert truncated.stats["train"]["tokenize"]["prompt_truncated"] > 0

    with pytest.raises(DataError, match="prompt"):
        load_dataset(load_config(spec, [*common, "--config.data.truncate_prompt=false"]))

    skipped = load_dataset(
        load_config(spec, [*common, "--config.data.truncate_prompt=false", "--config.data.on_error=skip"])
    )
    assert 0 < len(skipped.train) < 20
    assert skipped.stats["train"]["read"]["by_kind"] == {"prompt_too_long": 20 - len(skipped.train)}
    assert all(len(p.prompt_ids) <= 9 for p in skipped.train)


def test_data_shape_defaults_resolve_to_the_fastest_exact_layout():
    """layout "auto": prefix-shared rows for pairs, padded for SFT and labelled responses; seq_len 0:
    the row the longest allowed example needs; bucket_step: buckets up to seq_len (dynamic padding)."""
    from dpoq_jax.train.config import resolve_data_shape

    def resolved(**values):
        c = base_config()
        for key, v in values.items():
            *group, name = key.split("__")
            (c[group[0]] if group else c)[name] = v
        resolve_data_shape(c)
        return c.data.layout, c.data.seq_len, tuple(c.data.buckets)

    # base: max_prompt_tokens 48, response_len 16, bucket_step 64
    assert resolved() == ("prefix_shared", 80, (64, 80))
    assert resolved(stage="sft") == ("padded", 64, (64,))
    assert resolved(loss__loss_type="outcome_ce") == ("padded", 64, (64,))
    assert resolved(data__layout="packed", data__bucket_step=0) == ("packed", 160, ())
    assert resolved(data__max_prompt_tokens=300, data__response_len=60) == (
        "prefix_shared", 420, (64, 128, 192, 256, 320, 384, 420))  # fmt: skip
    # explicit values are kept, and resolving twice changes nothing
    c = base_config()
    c.data.layout, c.data.seq_len, c.data.buckets = "padded", 100, (50, 100)
    resolve_data_shape(c)
    resolve_data_shape(c)
    assert (c.data.layout, c.data.seq_len, tuple(c.data.buckets)) == ("padded", 100, (50, 100))


def test_bad_data_shape_and_token_level_losses_are_one_line_errors(tmp_path):
    cfg = f"{SYNTHETIC}:error_injection:dpo:{tmp_path}"  # the SFT run's folder
    with pytest.raises(ConfigError, match="'data.seq_len' and 'data.bucket_step' must be >= 0"):
        load_config(cfg, ["--config.data.bucket_step=-1"])
    with pytest.raises(ConfigError, match=r"'loss.token_weights' is required for loss.loss_type \['token_w"):
        load_config(cfg, ["--config.loss.loss_type=token_weighted"])
    with pytest.raises(ConfigError, match="^config key 'loss.tis_lower' must be <= tis_upper"):
        load_config(cfg, ["--config.loss.loss_type=token_weighted", f"--config.loss.token_weights={tmp_path}",
                          "--config.loss.tis_lower=2"])
    with pytest.raises(ConfigError, match="'reference.mode' must be 'frozen' for loss.loss_type tdpo"):
        load_config(cfg, ["--config.loss.loss_type=tdpo", "--config.reference.mode=precomputed"])
    load_config(cfg, ["--config.loss.loss_type=tdpo", "--config.loss.tdpo_alpha=0.3"])


@pytest.mark.parametrize("task", ["error_injection", "dense_reward", "arithmetic_chain"])
def test_synthetic_config_file_takes_task_stage_tiny_and_the_sft_run(task, tmp_path):
    """One file for the synthetic tasks: `synthetic.py:TASK:STAGE[:tiny][:SFT_WORKDIR]`, locked, with
    synthetic_config's values (arithmetic_chain: its longer rows), the tests' tiny size on top."""
    from dpoq_jax.configs import synthetic
    from dpoq_jax.configs.synthetic import synthetic_config

    for stage in ("sft", "dpo"):
        cfg = load_config_file(f"{SYNTHETIC}:{task}:{stage}")
        assert cfg.is_locked and cfg.stage == stage and cfg.data.task == task
        want = synthetic_config(task, stage)
        if task == "arithmetic_chain":
            assert (cfg.data.seq_len, cfg.data.response_len, cfg.data.max_prompt_tokens) == (48, 38, 12)
        else:
            assert cfg.to_dict() == want.to_dict()
        tiny = load_config_file(f"{SYNTHETIC}:{task}:{stage}:tiny")
        for key, value in synthetic.TINY.items():
            node = tiny
            for part in key.split("."):
                node = node[part]
            assert node == value, key
        assert tiny.data.task == task and tiny.optim.lr == cfg.optim.lr  # only the size changes
    run = tmp_path / "sft_run"
    assert load_config_file(f"{SYNTHETIC}:{task}:dpo:{run}").model.path == str(run)
    assert load_config_file(f"{SYNTHETIC}:{task}:dpo:tiny:gs://b/sft").model.path == "gs://b/sft"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("", "want TASK:STAGE"),
        ("nope:sft", "TASK one of error_injection, dense_reward, arithmetic_chain"),
        ("error_injection:train", "STAGE one of sft, dpo"),
        ("error_injection:sft:runs/x", "for the dpo stage only"),
    ],
)
def test_synthetic_config_bad_arguments_are_one_line_errors(arg, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config_file(f"{SYNTHETIC}:{arg}" if arg else str(SYNTHETIC))
    assert "\n" not in str(e.value)


def test_typed_run_config_is_frozen_resolved_and_round_trips_through_config_json():
    """setup's typed config: every group a frozen dataclass, the data shape resolved on a copy (the
    ConfigDict is left as it was), config.json (asdict) read back to an equal RunConfig, unknown keys
    named."""
    import dataclasses
    import json

    from dpoq_jax.train.config import typed
    from dpoq_jax.train.schema import RunConfig

    c = load_config_file(f"{SYNTHETIC}:error_injection:dpo:tiny")
    with c.unlocked():
        c.data.layout, c.data.seq_len = "auto", 0
    r = typed(c)
    assert (c.data.layout, c.data.seq_len) == ("auto", 0)
    assert r.data.layout == "prefix_shared"
    assert r.data.seq_len == c.data.max_prompt_tokens + 2 * c.data.response_len
    assert isinstance(r.optim.lr, float) and r.model.lora.targets == tuple(c.model.lora.targets)
    assert r.loss.beta == c.loss.beta and r.train.batch_size == c.train.batch_size
    assert typed(r) is r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.optim.lr = 1.0
    back = typed(json.loads(json.dumps(r.to_dict())))
    assert back == r and isinstance(back.data.buckets, tuple)
    assert set(base_config().keys()) == {f.name for f in dataclasses.fields(RunConfig)}
    bad = r.to_dict()
    bad["optim"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        typed(bad)


def test_initial_policy_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    from dpoq_jax.train.setup import initial_policy

    with pytest.raises(ValueError, match=r"not a `dpoq train` run \(no config.json beside its checkpoints\)"):
        initial_policy(str(tmp_path))
