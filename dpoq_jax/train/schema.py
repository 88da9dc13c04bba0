"""The run config's keys, defaults and types: one frozen dataclass per group (docs/training.md explains
each key).

A config file edits the ConfigDict of `train.config.base_config()` (made from `RunConfig()`) and the
command line overrides it (`--config.k=v`); `typed(config)` turns the result into a `RunConfig` once, at
setup, and everything below setup reads those typed groups. `dataclasses.asdict(run_config)` is what a
run writes to its workdir (config.json) and `typed` reads it back.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoraGroup:
    """model.lora (models/lora.py): rank 0 trains every weight; rank > 0 trains only adapters on `targets`,
    the loaded weights stay frozen and, adapters off, are the DPO reference (reference.mode "frozen")."""

    rank: int = 0
    alpha: float = 16.0  # adapter scale alpha / rank (as PEFT's lora_alpha)
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # attention and MLP projections


@dataclass(frozen=True)
class ModelGroup:
    init: str = "random"  # "random" (from model.config), "hf" (HF dir), "checkpoint" (a run's workdir)
    path: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for init="random"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    # "" keeps the model config's; "none" | "full" | "dots" (recompute blocks in the backward pass). "full":
    # on CPU as fast as "none" or faster (memory traffic dominates) in half the memory or less
    # (benchmarks/results/remat_cpu.json); on an accelerator, set "none" where the activations fit
    remat: str = "full"
    attention: str = "auto"  # auto (TPU splash, GPU cuDNN where exact, else XLA) | xla | cudnn | splash
    hf_export: bool = True  # write WORKDIR/hf at the end (models.hf.save_hf)
    lora: LoraGroup = field(default_factory=LoraGroup)


@dataclass(frozen=True)
class ReferenceGroup:
    mode: str = "frozen"  # "frozen": copy of the initial policy; "precomputed": from the data
    dtype: str = "float32"  # frozen reference parameters (bfloat16 halves their memory)
    logps_path: str = ""  # precomputed: file written by `dpoq precompute-ref`


@dataclass(frozen=True)
class DataGroup:
    """Keys of data.sources.load_examples (SourceConfig), plus the held-out split and the layout."""

    source: str = "synthetic"  # synthetic | jsonl | datasets | hh | tldr
    path: str = ""  # jsonl/hh file, tldr manual dir; datasets: parquet/arrow/json file, folder or Hub name
    data_dir: str = ""  # tldr: where the tfds dataset is prepared
    eval_path: str = ""  # jsonl/hh/datasets: held-out file ("" = no periodic eval)
    eval_split: str = "validation"  # tldr and synthetic: held-out split
    task: str = "error_injection"  # synthetic: error_injection | dense_reward | ...
    task_kwargs: dict[str, Any] = field(default_factory=lambda: {"seed": 0})  # synthetic: task fields
    num_examples: int = 0  # training examples (synthetic: drawn; files: first n, 0 = all)
    num_eval: int = 256  # held-out examples (0 = all of a file)
    tokenizer_path: str = ""  # HF tokenizer dir (default: model.path); synthetic tasks bring their own
    sft_responses: str = "chosen"  # SFT stage on preference data: "chosen" or "all" responses
    # auto: prefix_shared for preference pairs, padded for SFT and labelled responses | padded |
    # prefix_shared | packed (docs/training.md: which to pick)
    layout: str = "auto"
    # S: tokens per row; 0: what the longest allowed example needs in the layout (resolve_data_shape)
    seq_len: int = 0
    # row-length buckets, e.g. (128, 256, 512): each step's rows padded to the smallest bucket that
    # holds its examples (one compiled shape per bucket used); () with bucket_step > 0: every multiple
    # of bucket_step up to seq_len; () with bucket_step 0: always data.seq_len
    buckets: tuple[int, ...] = ()
    bucket_step: int = 64
    response_len: int = 16  # R: tokens per response (EOS included)
    max_prompt_tokens: int = 48
    truncate_prompt: bool = True  # False: a longer prompt is bad input (data.on_error: fail or skip)
    truncate_responses: bool = True  # False: a response over data.response_len is bad input
    add_bos: bool = False  # prepend the tokenizer's BOS to each prompt
    num_rows: int = 0  # packed layout: rows per micro-batch (0: one per pair)
    overflow: str = "error"  # "error" or "drop" pairs that do not fit their rows
    on_error: str = "fail"  # bad examples: "fail" or "skip"
    chat_divergence: str = "warn"  # chat template whose prompt is not a prefix: "warn" once or "error"
    shuffle: bool = True


@dataclass(frozen=True)
class LossGroup:
    """losses.LossConfig's fields (train.config.loss_config), plus the run's token cache."""

    beta: float = 0.1
    # losses.LOSS_TYPES (TRL's names); "sigmoid,bco_pair,sft": a mixture; outcome_ce / apo_zero_unpaired:
    # unpaired, on {"prompt", "completion", "label"} rows (or pairs unpaired)
    loss_type: str = "sigmoid"
    loss_weights: tuple[float, ...] = ()  # one per loss type (default: all 1), e.g. 0.8,0.2,1
    label_smoothing: float = 0.0
    ipo_average: bool = True
    sft_weight: float = 0.0
    ld_alpha: float = 1.0  # LD-DPO: weight of response tokens past the shorter response's length
    use_weighting: bool = False  # WPO pair weights (the step computes log Σ p² per token)
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5  # SimPO's target margin γ
    tdpo_variant: int = 2  # TDPO1 or TDPO2 (Zeng et al. 2024; the chosen side's KL under stop-gradient)
    tdpo_alpha: float = 0.5  # TDPO2's weight of the sequential-KL difference
    select_ratio: float = 0.3  # SePO's token fraction (loss_type selective)
    # token_weighted / selective: a token cache of the run's pairs (`dpoq token-rewards`: an oracle's token
    # rewards; or a cache of weights). token_weighted turns rewards into TIS-DPO weights
    # w = exp(±μ·clamp(r, lower, upper)) (+ for chosen, − for rejected tokens).
    token_weights: str = ""
    tis_mu: float = 1.0
    tis_lower: float = -1.0
    tis_upper: float = 1.0
    # unpaired losses (loss_type outcome_ce | apo_zero_unpaired, data: labelled responses): KTO's λ_D, λ_U
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(frozen=True)
class OptimGroup:
    name: str = "rmsprop"  # rmsprop | adamw
    lr: float = 5e-7
    warmup_steps: int = 150
    schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    end_factor: float = 0.0  # linear/cosine: final lr = end_factor * lr
    clip_norm: float = 10.0  # global gradient-norm clip; <= 0 disables
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay: float = 0.99  # RMSprop second-moment decay (torch default alpha)


@dataclass(frozen=True)
class TrainGroup:
    batch_size: int = 32  # pairs (DPO) or sequences (SFT) per step, global
    micro_batches: int = 1  # gradient accumulation: batch_size / micro_batches per forward
    num_steps: int = 100
    log_every: int = 10
    eval_every: int = 100  # 0: no periodic eval (a final eval still runs if there is eval data)
    eval_batches: int = 0  # 0: the whole held-out split
    max_consecutive_nonfinite: int = 5
    logps_chunk: int = 32  # time steps per chunk of the lean log-probs
    progress_bar: bool = True
    peer_timeout_s: int = 120  # multi-process: a process silent this long is lost; the others stop


@dataclass(frozen=True)
class CheckpointGroup:
    every_steps: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class ShardingGroup:
    rules: tuple[Any, ...] = ()  # ((logical, mesh axes), ...); empty: mesh.DEFAULT_RULES


@dataclass(frozen=True)
class RunConfig:
    stage: str = "dpo"  # "sft" or "dpo"
    seed: int = 0
    model: ModelGroup = field(default_factory=ModelGroup)
    reference: ReferenceGroup = field(default_factory=ReferenceGroup)
    data: DataGroup = field(default_factory=DataGroup)
    loss: LossGroup = field(default_factory=LossGroup)
    optim: OptimGroup = field(default_factory=OptimGroup)
    train: TrainGroup = field(default_factory=TrainGroup)
    checkpoint: CheckpointGroup = field(default_factory=CheckpointGroup)
    mesh: dict[str, int] = field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})  # -1: the rest
    sharding: ShardingGroup = field(default_factory=ShardingGroup)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """`cls` (a group) from a plain mapping: groups recursively, lists into tuples; an unknown key is a
    ValueError naming it (`where`: the group's dotted prefix)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key {where + unknown[0]!r} (known: {sorted(hints)})")
    kw = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, dict(value), f"{where}{name}.")
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        elif typing.get_origin(hint) is dict:
            value = _plain(value)
        kw[name] = value
    return cls(**kw)


def _plain(value: Any) -> Any:
    """Nested mappings as plain dicts (a copy: the RunConfig shares nothing with what it was made from)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in dict(value).items()}
    return value
