"""One entry point from a config to examples: jsonl | datasets | tldr | hh | synthetic.

`SourceConfig` fields (the run config's data group becomes one at setup: train.inputs; docs/data.md):
  source: "jsonl" | "datasets" | "tldr" | "hh" | "synthetic"
  path: file (jsonl, hh) or manual directory (tldr); datasets: a .parquet / .arrow / .json / .jsonl file,
      a folder written by `Dataset.save_to_disk`, or a Hub dataset name (read from the local cache)
  split: "train" | "validation" | "test"   (tldr, synthetic; datasets: the split of a folder or Hub name)
  data_dir: where the tfds build of TL;DR goes (tldr only)
  task, task_kwargs, num_examples: synthetic task name, its dataclass fields, examples to draw
      (0 or unset: 1000)
  on_error: "fail" | "skip"
  sft_responses: "chosen" | "all"   (synthetic dense_reward SFT data; datasets: the pairs' SFT side)
  tokenizer_path: a local Hugging Face tokenizer directory (synthetic data: its own tokenizer)

Kinds: "preference" (pairs), "sft" (prompt + completion), "outcome" (prompt + completion + label, for
the unpaired losses): a jsonl file or dataset whose rows have "label" is read as such; any other
source's pairs are unpaired into a good (chosen) and a bad (rejected) response (examples.unpair).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from dpoq_jax.data.errors import ErrorPolicy
from dpoq_jax.data.examples import OutcomeExample, PreferenceExample, SFTExample, unpair

log = logging.getLogger(__name__)

SOURCES = ("jsonl", "datasets", "tldr", "hh", "synthetic")
DATASETS_PIN = "datasets==5.2.0"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where one split's examples come from (the fields are described in the module docstring)."""

    source: str
    path: str | None = None
    split: str = "train"
    data_dir: str | None = None
    task: str = "error_injection"
    task_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_examples: int = 0
    on_error: str = "fail"
    sft_responses: str | None = None  # None: the source's default ("all" synthetic, "chosen" datasets)
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {self.source!r}")


KINDS = ("preference", "sft", "outcome")


def load_examples(src: SourceConfig, kind: str = "preference"
                  ) -> tuple[list[PreferenceExample] | list[SFTExample] | list[OutcomeExample], ErrorPolicy]:
    """Examples of `kind` (KINDS) and the error policy with its skip counts."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    source, split, path = src.source, src.split, src.path
    policy = ErrorPolicy(src.on_error)
    if source in ("jsonl", "datasets", "hh", "tldr") and path is None:
        raise ValueError(f"data source {source!r} needs a path")
    if kind == "outcome" and source != "datasets" and not _outcome_rows(source, path):
        pairs, policy = load_examples(src, "preference")
        return unpair(pairs), policy
    if source == "jsonl":
        from dpoq_jax.data import jsonl

        from_row = {"preference": jsonl.preference_from_row, "sft": jsonl.sft_from_row,
                    "outcome": jsonl.outcome_from_row}[kind]
        out = jsonl.read_jsonl(path, from_row, policy)
    elif source == "datasets":
        out = read_hf_dataset(path, split, kind, policy, sft_responses=src.sft_responses or "chosen")
    elif source == "hh":
        from dpoq_jax.data import hh

        pairs = hh.read_hh_jsonl(path, policy)
        out = pairs if kind == "preference" else [SFTExample(e.prompt, e.chosen, e.meta) for e in pairs]
    elif source == "tldr":
        from dpoq_jax.data import tldr

        data_dir = src.data_dir
        if data_dir is None:
            raise ValueError("data source 'tldr' needs data_dir (where the tfds build is written)")
        out = tldr.load_tldr(path, data_dir, split, kind=kind, on_error=policy.on_error, policy=policy)
    else:
        from dpoq_jax.data import synthetic

        task = synthetic.make_task(src.task, **dict(src.task_kwargs))
        n = int(src.num_examples or 0) or 1000  # 0 / None: the default size
        if kind == "preference":
            out = task.preference_examples(n, split)
        elif isinstance(task, synthetic.DenseRewardTask):
            out = task.sft_examples(n, split, responses=src.sft_responses or "all")
        else:
            out = task.sft_examples(n, split)
        policy.n_ok = len(out)
    # read counts; the examples used are counted again after tokenisation (train.inputs)
    policy.log_summary(f"{source} {kind} data read", level=logging.DEBUG)
    return out, policy


def _outcome_rows(source: str, path: str | None) -> bool:
    """Is this a jsonl file of single responses (to be read as outcome rows, each with its "label")
    rather than of pairs? Its first JSON object decides; the read itself then reports every bad line
    (a missing label included) under the error policy."""
    if source != "jsonl":
        return False
    from dpoq_jax.data.jsonl import first_record  # noqa: PLC0415

    first = first_record(path) or {}
    return any(k in first for k in ("label", "completion", "messages"))


def _open_hf_dataset(path: str, split: str) -> Any:
    """A `datasets.Dataset` from a data file, a save_to_disk folder or a (cached) Hub name."""
    try:
        import datasets  # noqa: PLC0415 (optional: the `chat` extra)
    except ImportError:
        raise ImportError(f"data.source='datasets' needs the datasets package: pip install 'dpoq_jax[chat]' "
                          f"(or pip install {DATASETS_PIN})") from None
    import os  # noqa: PLC0415

    builders = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isfile(path):
            if ext not in builders:
                raise ValueError(f"{path}: unknown data file type {ext!r} (expected one of "
                                 f"{', '.join(builders)})")
            return datasets.load_dataset(builders[ext], data_files=path, split="train")
        if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_info.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json"))):
            ds = datasets.load_from_disk(path)
        else:  # a folder of data files, or a Hub name: datasets finds it (offline: only what is cached)
            ds = datasets.load_dataset(path)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise FileNotFoundError(f"{path}: no dataset there, nor in the Hugging Face cache "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


def read_hf_dataset(path: str, split: str, kind: str, policy: ErrorPolicy, *, sft_responses: str = "chosen"
                    ) -> list[PreferenceExample] | list[SFTExample]:
    """Rows of a Hugging Face dataset in the JSONL row formats (standard or conversational; data/jsonl.py),
    read whole into memory (no streaming: a dataset larger than memory does not fit). A bad row is named
    as `path:N` with N its row number counted from 1. For kind "sft", preference rows give their chosen
    (sft_responses "chosen") or both responses ("all"); for kind "outcome", rows with a "label" column
    are outcome rows and preference rows are unpaired."""
    from dpoq_jax.data.errors import DataError  # noqa: PLC0415
    from dpoq_jax.data.jsonl import outcome_from_row, preference_from_row, sft_from_row  # noqa: PLC0415

    ds = _open_hf_dataset(str(path), split)
    cols = ds.column_names
    pair_rows = "chosen" in cols and "completion" not in cols and "messages" not in cols
    if kind == "outcome" and not pair_rows:
        from_row = outcome_from_row  # a row without "label" is an error naming it
    elif kind == "preference" or pair_rows:
        from_row = preference_from_row
    else:
        from_row = sft_from_row
    out: list = []
    for i, row in enumerate(ds, 1):
        try:
            ex = from_row(row, file=str(path), line=i)
        except DataError as e:
            policy.handle(e)
            continue
        if from_row is preference_from_row and kind == "sft":
            out.append(SFTExample(ex.prompt, ex.chosen, dict(ex.meta)))
            if sft_responses == "all":
                out.append(SFTExample(ex.prompt, ex.rejected, dict(ex.meta)))
        elif from_row is preference_from_row and kind == "outcome":
            out.extend(unpair([ex]))
        else:
            out.append(ex)
        policy.n_ok += 1
    return out


def load_tokenizer(src: SourceConfig) -> Any:
    """The synthetic tokenizer for synthetic data, else a HF tokenizer from src.tokenizer_path."""
    if src.source == "synthetic" and src.tokenizer_path is None:
        from dpoq_jax.data.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    from dpoq_jax.models.hf import load_tokenizer as load_hf

    path = src.tokenizer_path
    if path is None:
        raise ValueError("data config needs tokenizer_path (a local Hugging Face tokenizer directory)")
    return load_hf(path)
