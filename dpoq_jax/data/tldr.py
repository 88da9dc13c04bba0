"""Reddit TL;DR comparisons (Stiennon et al. 2020) as a tensorflow-datasets builder over manual files.

Place the published comparison files (one JSON object a line:
{"info": {"id", "post", "title", "subreddit", ...}, "summaries": [{"text", ...}, {"text", ...}],
 "choice": 0|1, "split": "train"|"valid1"|"valid2", ...}) in a directory, e.g. the OpenAI
`comparisons/batch*.json` files. Every `*.json` / `*.jsonl` file below `manual_dir` (recursively,
sorted by path) is read; each line goes to the split named by its "split" field:
"train" -> train, "valid1" -> validation, "valid2" -> test. CNN/DM rows (with "article" instead
of "post", mixed into the release) are always skipped and counted as "not_reddit"; other bad rows
are DataErrors that `on_error` fails on or skips with counts.

Configs: "comparisons" (prompt, chosen, rejected) and "sft" (prompt, completion = the chosen
summary, each (post id, summary) once). Prompt format of the DPO / TL;DR papers:
"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:", response " {summary}".

The build writes array_record files and is read back with `builder.as_data_source(split)`: no
TensorFlow is needed. tensorflow_datasets is imported only inside these functions.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample
from dpoq_jax.data.jsonl import check_pair, check_text, iter_json_lines

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}


def format_prompt(info: dict[str, Any]) -> str:
    return (f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:")


def parse_comparison(obj: Any, *, file: str, line: int) -> tuple[str, dict[str, str]]:
    """(split name, {"id", "prompt", "chosen", "rejected"}) of one comparison line."""
    def bad(msg: str, kind: str, key: str | None = None) -> DataError:
        return DataError(msg, kind=kind, file=file, line=line, key=key)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}", "not_object")
    info = obj.get("info")
    if not isinstance(info, dict):
        raise bad("missing or not an object", "missing_key", "info")
    if "post" not in info and "article" in info:
        raise bad("a CNN/DM article, not a Reddit post", "not_reddit", "info.post")
    for k in ("id", "post", "title", "subreddit"):
        if not isinstance(info.get(k), str):
            kind = "missing_key" if info.get(k) is None else "not_string"
            raise bad("missing or not a string (not a Reddit post?)", kind, f"info.{k}")
        check_text(info[k], file=file, line=line, key=f"info.{k}")
    split = obj.get("split")
    if split not in SPLITS:
        raise bad(f"split must be one of {sorted(SPLITS)}, got {split!r}", "bad_split", "split")
    summaries, choice = obj.get("summaries"), obj.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise bad("expected a list of two summaries", "missing_key", "summaries")
    texts = []
    for i, s in enumerate(summaries):
        t = s.get("text") if isinstance(s, dict) else None
        if not isinstance(t, str):
            raise bad("missing or not a string", "not_string", f"summaries[{i}].text")
        check_text(t, file=file, line=line, key=f"summaries[{i}].text")
        if not t.strip():
            raise bad("empty summary", "empty_response", f"summaries[{i}].text")
        texts.append(" " + t.strip())
    if choice not in (0, 1):
        raise bad(f"choice must be 0 or 1, got {choice!r}", "bad_choice", "choice")
    prompt = format_prompt(info)
    chosen, rejected = texts[choice], texts[1 - choice]
    check_pair(prompt, chosen, rejected, file=file, line=line)
    return SPLITS[split], {"id": info["id"], "prompt": prompt, "chosen": chosen, "rejected": rejected}


def manual_files(manual_dir: str | os.PathLike) -> list[Path]:
    d = Path(manual_dir)
    if not d.is_dir():
        raise DataError("TL;DR manual directory does not exist", kind="missing_file", file=str(d))
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not files:
        raise DataError("no *.json or *.jsonl comparison files found", kind="missing_file", file=str(d))
    return files


def read_comparisons(manual_dir: str | os.PathLike, policy: ErrorPolicy) -> dict[str, list[dict[str, str]]]:
    """All comparison rows by split name, in file/line order."""
    out: dict[str, list[dict[str, str]]] = {v: [] for v in SPLITS.values()}
    for path in manual_files(manual_dir):
        for lineno, obj in iter_json_lines(path, policy):
            try:
                split, row = parse_comparison(obj, file=str(path), line=lineno)
            except DataError as e:
                if e.kind == "not_reddit":  # the release mixes CNN/DM rows in: always skipped, counted
                    policy.counts[e.kind] += 1
                else:
                    policy.handle(e)
                continue
            row["source"], row["line"] = str(path), str(lineno)
            out[split].append(row)
            policy.n_ok += 1
    return out


@functools.lru_cache(maxsize=1)
def builder_class() -> type:
    """The tfds builder class, created on first use (tensorflow_datasets is imported lazily)."""
    import tensorflow_datasets as tfds

    class TldrComparisons(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Reddit TL;DR human comparisons, from manually placed JSON-lines files."""

        name = "dpoq_tldr_comparisons"
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Place the TL;DR comparison JSON-lines files (e.g. comparisons/batch*.json from the "
            "OpenAI summarize-from-feedback release) anywhere below manual_dir.")
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name="comparisons", description="prompt, chosen, rejected"),
            tfds.core.BuilderConfig(name="sft", description="prompt, completion (chosen summaries)"),
        ]

        def __init__(self, *, on_error: str = "skip", **kwargs: Any):
            self.on_error = on_error
            super().__init__(**kwargs)

        def _info(self) -> Any:
            text = tfds.features.Text()
            if self.builder_config.name == "sft":
                feats = {"id": text, "prompt": text, "completion": text}
            else:
                feats = {"id": text, "prompt": text, "chosen": text, "rejected": text}
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats),
                                                  supervised_keys=None)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            policy = ErrorPolicy(self.on_error)
            rows = read_comparisons(dl_manager.manual_dir, policy)
            policy.log_summary("TL;DR comparisons")
            self.error_summary = policy.summary()
            return {split: self._generate_examples(r) for split, r in rows.items() if r}

        def _generate_examples(self, rows: list[dict[str, str]]) -> Any:
            if self.builder_config.name == "comparisons":
                keys = ("id", "prompt", "chosen", "rejected")
                for r in rows:
                    yield f"{r['source']}:{r['line']}", {k: r[k] for k in keys}
                return
            seen: set[tuple[str, str]] = set()
            for r in rows:
                if (r["id"], r["chosen"]) not in seen:
                    seen.add((r["id"], r["chosen"]))
                    yield f"{r['id']}:{len(seen)}", {"id": r["id"], "prompt": r["prompt"],
                                                      "completion": r["chosen"]}

    return TldrComparisons


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *, config: str = "comparisons",
          on_error: str = "skip") -> Any:
    """Builds (once; later calls reuse the files in data_dir) and returns the tfds builder."""
    import tensorflow_datasets as tfds

    builder = builder_class()(config=config, data_dir=str(data_dir), file_format="array_record",
                              on_error=on_error)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def load_tldr(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "train", *,
              kind: str = "preference", on_error: str = "skip", policy: ErrorPolicy | None = None
              ) -> list[PreferenceExample] | list[SFTExample]:
    """TL;DR examples of one split ("train", "validation", "test") via `as_data_source`.

    `policy` (optional) receives the skip counts of the build when this call built the dataset.
    """
    config = "comparisons" if kind == "preference" else "sft"
    builder = build(manual_dir, data_dir, config=config, on_error=on_error)
    if policy is not None and hasattr(builder, "error_summary"):
        policy.counts.update(builder.error_summary["by_kind"])
        policy.examples += builder.error_summary["examples"]
    if split not in builder.info.splits:
        raise DataError(f"split {split!r} has no examples; have {sorted(builder.info.splits)}",
                        kind="missing_split", file=str(manual_dir))
    source = builder.as_data_source(split=split)
    out: list[Any] = []
    for i in range(len(source)):
        r = {k: _text(v) for k, v in source[i].items()}
        meta = {"id": r["id"], "source": f"tldr/{split}", "line": i}
        if kind == "preference":
            out.append(PreferenceExample(r["prompt"], r["chosen"], r["rejected"], meta))
        else:
            out.append(SFTExample(r["prompt"], r["completion"], meta))
    if policy is not None:
        policy.n_ok = len(out)
    return out
