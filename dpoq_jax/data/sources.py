"""One entry point from a config to examples: jsonl | tldr | hh | synthetic.

Config keys (a dict or ml_collections ConfigDict; see docs/data.md):
  source: "jsonl" | "tldr" | "hh" | "synthetic"
  path: file (jsonl, hh) or manual directory (tldr)
  data_dir: where the tfds build of TL;DR goes (tldr only)
  split: "train" | "validation" | "test"   (tldr, synthetic)
  task, task_kwargs, num_examples: synthetic task name, its dataclass fields, examples to draw
      (0 or unset: 1000)
  on_error: "fail" | "skip"
  sft_responses: "chosen" | "all"   (synthetic dense_reward SFT data)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from dpoq_jax.data.errors import ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample

log = logging.getLogger(__name__)

SOURCES = ("jsonl", "tldr", "hh", "synthetic")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    try:
        v = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if v is None else v


def load_examples(cfg: Mapping[str, Any], kind: str = "preference"
                  ) -> tuple[list[PreferenceExample] | list[SFTExample], ErrorPolicy]:
    """Examples of `kind` ("preference" or "sft") and the error policy with its skip counts."""
    if kind not in ("preference", "sft"):
        raise ValueError(f"kind must be 'preference' or 'sft', got {kind!r}")
    source = _get(cfg, "source")
    if source not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
    policy = ErrorPolicy(_get(cfg, "on_error", "fail"))
    split = _get(cfg, "split", "train")
    path = _get(cfg, "path")
    if source in ("jsonl", "hh", "tldr") and path is None:
        raise ValueError(f"data source {source!r} needs a path")
    if source == "jsonl":
        from dpoq_jax.data import jsonl

        out = (jsonl.read_preference_jsonl(path, policy) if kind == "preference"
               else jsonl.read_sft_jsonl(path, policy))
    elif source == "hh":
        from dpoq_jax.data import hh

        pairs = hh.read_hh_jsonl(path, policy)
        out = pairs if kind == "preference" else [SFTExample(e.prompt, e.chosen, e.meta) for e in pairs]
    elif source == "tldr":
        from dpoq_jax.data import tldr

        data_dir = _get(cfg, "data_dir")
        if data_dir is None:
            raise ValueError("data source 'tldr' needs data_dir (where the tfds build is written)")
        out = tldr.load_tldr(path, data_dir, split, kind=kind, on_error=policy.on_error, policy=policy)
    else:
        from dpoq_jax.data import synthetic

        task = synthetic.make_task(_get(cfg, "task", "error_injection"), **dict(_get(cfg, "task_kwargs", {})))
        n = int(_get(cfg, "num_examples", 0)) or 1000  # 0 / None: the default size
        if kind == "preference":
            out = task.preference_examples(n, split)
        elif isinstance(task, synthetic.DenseRewardTask):
            out = task.sft_examples(n, split, responses=_get(cfg, "sft_responses", "all"))
        else:
            out = task.sft_examples(n, split)
        policy.n_ok = len(out)
    # read counts; the examples used are counted again after tokenisation (train.inputs)
    policy.log_summary(f"{source} {kind} data read", level=logging.DEBUG)
    return out, policy


def load_tokenizer(cfg: Mapping[str, Any]) -> Any:
    """The synthetic tokenizer for synthetic data, else a HF tokenizer from cfg["tokenizer_path"]."""
    if _get(cfg, "source") == "synthetic" and _get(cfg, "tokenizer_path") is None:
        from dpoq_jax.data.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    from dpoq_jax.data.tokenize import load_hf_tokenizer

    path = _get(cfg, "tokenizer_path")
    if path is None:
        raise ValueError("data config needs tokenizer_path (a local Hugging Face tokenizer directory)")
    return load_hf_tokenizer(path)
