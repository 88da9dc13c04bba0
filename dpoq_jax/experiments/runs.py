"""Training runs as the experiments and `dpoq demo` drive them: configs by prefix, finished runs reused.

A config is named by a prefix PREFIX[:arg] (PREFIX_sft.py and PREFIX_dpo.py) or by one FILE.py[:arg]
whose get_config takes the stage last. The default for a synthetic task is the packaged
dpoq_jax/configs/synthetic.py:<task>:{sft,dpo}. `train_run` goes through `train.loop.train` and records the
resolved settings in <workdir>/experiment_run.json, so a finished run with the same settings is
reused (the experiments on one task share their SFT reference) and one with other settings is
replaced, never resumed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpoq_jax.analysis.document import log

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def default_config(task: str) -> str:
    """The tiny CPU configs of a synthetic task: the packaged synthetic.py with the task as its argument
    (stage_config appends the stage)."""
    return f"{CONFIGS_DIR / 'synthetic.py'}:{task}"


def at_scale(args: Any, task: str) -> bool:
    """True when the user named their own configs: their step counts and eval cadence are kept."""
    return args.config != default_config(task)


def stage_config(config: str, stage: str) -> str:
    """The config spec of one stage: PREFIX_<stage>.py[:arg] if it exists (config = PREFIX[:arg]),
    else FILE.py[:arg]:<stage> (one file whose get_config takes the stage last, e.g. synthetic.py:TASK)."""
    base, _, arg = config.partition(":")
    candidate = Path(f"{base}_{stage}.py")
    if candidate.exists():
        return f"{candidate}:{arg}" if arg else str(candidate)
    if base.endswith(".py") and Path(base).exists():
        return f"{base}:{arg}:{stage}" if arg else f"{base}:{stage}"
    raise FileNotFoundError(f"--config {config!r}: no {base}_{stage}.py and no config file {base!r}")


def peek_config(config: str, stage: str, overrides: Sequence[str] = ()) -> Any:
    """A stage's config with the overrides applied but not validated (paths may not exist yet)."""
    from dpoq_jax.train.config import apply_override, load_config_file, parse_overrides

    cfg = load_config_file(stage_config(config, stage))
    for key, value in parse_overrides(list(overrides)):
        apply_override(cfg, key, value)
    return cfg


def require_synthetic(config: str, overrides: Sequence[str], task: str, experiment: str) -> None:
    """Experiments that need a gold judge or known error positions run on the synthetic task only."""
    cfg = peek_config(config, "dpo", overrides)
    if cfg.data.source != "synthetic" or cfg.data.task != task:
        raise SystemExit(
            f"{experiment} needs the synthetic {task!r} task (its gold judge / known answers); config "
            f"{config!r} trains on data.source={cfg.data.source!r}. At scale use dpoq train + "
            "dpoq score / dpoq generate (docs: experiments)."
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [prefix or "<root>"] if a != b else []
    out = []
    for k in sorted(set(a) | set(b)):
        out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return out


def train_run(
    config: str,
    stage: str,
    workdir: Path | str,
    *,
    steps: int | None,
    seed: int,
    beta: float | None = None,
    lr: float | None = None,
    init_from: Path | str | None = None,
    sft_responses: str | None = None,
    eval_every: int | None = None,
    overrides: Sequence[str] = (),
    task_kwargs: dict[str, Any] | None = None,
) -> Path:
    """One SFT or DPO run through dpoq_jax.train.loop.train; returns its workdir.

    task_kwargs: fields of the synthetic task's dataclass set on top of the config's (e.g. the fluent
    errors of error_injection, the labeller's length bias of dense_reward).

    init_from: a finished run's workdir to start from (policy and frozen reference); None = the SFT
    stage's own starting point (random init for the synthetic configs, the base model at scale).
    A workdir holding a finished run with exactly these settings is reused (so scripts and the demo
    share runs); one holding different settings is removed first, so the loop never resumes a stranger.
    """
    from dpoq_jax.train.config import load_config
    from dpoq_jax.train.loop import train

    workdir = Path(workdir).resolve()  # orbax wants absolute checkpoint paths
    # the experiment's settings as values (the user's --config overrides come after them) ...
    first: dict[str, Any] = {"stage": stage, "seed": seed, "train.progress_bar": False,
                             "checkpoint.async_save": False}
    if steps is not None:  # None: the config's own num_steps (e.g. one epoch at scale)
        first["train.num_steps"] = steps
    if beta is not None:
        first["loss.beta"] = beta
    if lr is not None:  # None: the config's optim.lr
        first["optim.lr"] = lr
    if sft_responses is not None:
        first["data.sft_responses"] = sft_responses
    if eval_every is not None:
        first["train.eval_every"] = eval_every
    # ... and its starting point, which comes last
    last: dict[str, Any] = {}
    if init_from is not None:
        last = {"model.init": "checkpoint", "model.path": str(init_from)}
    elif stage == "dpo":  # no SFT: start from what the SFT stage starts from (random init, or a base model)
        sft = peek_config(config, "sft", overrides)
        last = {"model.init": sft.model.init, **({"model.path": sft.model.path} if sft.model.path else {})}
    spec = stage_config(config, stage)
    cfg = load_config(spec, overrides, first=first, last=last)
    if cfg.data.source == "synthetic" or task_kwargs:  # not overrides: the config declares only the seed
        with cfg.data.task_kwargs.unlocked():
            if cfg.data.source == "synthetic":
                cfg.data.task_kwargs.seed = seed  # the task's data seed follows --seed too
            cfg.data.task_kwargs.update(dict(task_kwargs or {}))
    # The resolved config, not just its file name: a config file edited since is a different run.
    settings = {"config": spec, "overrides": list(overrides), "resolved": json.loads(cfg.to_json())}
    if init_from is not None:  # a retrained starting run makes this one stale too
        init_marker = Path(init_from) / "experiment_run.json"
        settings["init_from"] = json.loads(init_marker.read_text()) if init_marker.exists() else None
    marker = workdir / "experiment_run.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        log(f"  reusing finished run {workdir}")
        return workdir
    if workdir.exists():
        old = json.loads(marker.read_text()) if marker.exists() else None
        if old is None:
            why = "unfinished run"
        else:
            changed = sorted(_diff_keys(old.get("resolved", {}), settings["resolved"]))
            why = f"settings changed: {', '.join(changed) or 'overrides'}"
        log(f"  replacing {workdir}: {why}")
        shutil.rmtree(workdir)
    t0 = dt.datetime.now()
    metrics = train(cfg, str(workdir)).metrics
    secs = (dt.datetime.now() - t0).total_seconds()
    shown = {k: v for k, v in metrics.items() if k in ("loss", "eval/loss", "eval/rewards/accuracies")}
    log(f"  {stage} run done in {secs:.0f}s: " + ", ".join(f"{k} {float(v):.4f}" for k, v in shown.items()))
    marker.write_text(json.dumps(settings, indent=1))
    return workdir


def train_sft(args: argparse.Namespace, responses: str, steps: int | None) -> Path:
    """An experiment's SFT reference, trained on the task's `responses` ("chosen" or "all") in
    <args.workdir>/sft_<responses>."""
    return train_run(
        args.config,
        "sft",
        Path(args.workdir) / f"sft_{responses}",
        steps=steps,
        seed=args.seed,
        sft_responses=responses,
        overrides=args.overrides,
        task_kwargs=getattr(args, "task_kwargs", None),
    )


def train_dpo(
    args: argparse.Namespace,
    beta: float,
    steps: int | None,
    init_from: Path | None,
    eval_every: int | None = None,
    task_kwargs: dict[str, Any] | None = None,
    tag: str = "",
    lr: float | None = None,
) -> Path:
    """A DPO run from a finished SFT run (None: from the SFT stage's own starting point) in
    <args.workdir>/dpo_beta<β>_<SFT run's folder name, or "random">[_lr<lr>_steps<steps>]<tag>: one
    naming for all experiments, so those sharing a workdir share their finished runs (an lr other than
    the config's names the run by lr and steps, so the runs of an lr/steps sweep live side by side).
    task_kwargs are added to args.task_kwargs for this run only (e.g. a labeller setting that the SFT
    data does not see)."""
    start = "random" if init_from is None else Path(init_from).name
    kwargs = {**(getattr(args, "task_kwargs", None) or {}), **(task_kwargs or {})}
    regime = "" if lr is None else f"_lr{lr:g}_steps{steps}"
    return train_run(
        args.config,
        "dpo",
        Path(args.workdir) / f"dpo_beta{beta}_{start}{regime}{tag}",
        steps=steps,
        seed=args.seed,
        beta=beta,
        lr=lr,
        init_from=init_from,
        eval_every=eval_every,
        overrides=args.overrides,
        task_kwargs=kwargs,
    )


def heldout_prompts(
    config: str, overrides: Sequence[str], task: str, n: int, seed: int
) -> tuple[list[list[int]], int]:
    """(prompt ids, generation limit) of n held-out prompts: the synthetic task's test split for the
    default configs (never seen in training), else the DPO config's held-out split (e.g. TL;DR)."""
    if config == default_config(task):
        from dpoq_jax.data.synthetic import make_task

        t = make_task(task, seed=seed)
        pairs = t.preference_examples(n, split="test")
        # A generation limit that no correct response of the task exceeds (EOS included).
        limit = int(getattr(t, "max_len", getattr(t, "max_digits", 32))) + 1
        return [t.tokenizer.encode(p.prompt) for p in pairs], limit
    from dpoq_jax.train.inputs import load_dataset

    cfg = peek_config(config, "dpo", overrides)
    data = load_dataset(cfg)
    if not data.eval:
        raise ValueError(f"config {config!r}: no held-out split (data.eval_path / data.eval_split)")
    return [list(p.prompt_ids) for p in data.eval[:n]], int(cfg.data.response_len)
