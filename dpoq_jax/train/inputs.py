"""From the `data` config to tokenized train/eval examples and layout micro-batches (numpy)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpoq_jax import losses, paths
from dpoq_jax.data import layouts, token_cache
from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample, TokenizedOutcome, TokenizedPair
from dpoq_jax.data.jsonl import first_record, iter_json_lines
from dpoq_jax.data.sources import SourceConfig, load_examples, load_tokenizer
from dpoq_jax.data.tokenize import TokenizeConfig, tokenize_all
from dpoq_jax.train.schema import RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Dataset:
    train: list  # TokenizedPair (dpo) or TokenizedSFT (sft)
    eval: list
    tokenizer: Any
    stats: dict[str, Any]


def _to_sft(examples: Sequence[PreferenceExample], responses: str) -> list[SFTExample]:
    out = []
    for e in examples:
        out.append(SFTExample(e.prompt, e.chosen, dict(e.meta)))
        if responses == "all":
            out.append(SFTExample(e.prompt, e.rejected, dict(e.meta)))
    return out


def _source_cfg(cfg: RunConfig, split: str) -> SourceConfig | None:
    """The data package's source config (data.sources.load_examples) for "train" or "eval"; None if
    there is no held-out split (a jsonl/hh source without data.eval_path)."""
    d = cfg.data
    src = SourceConfig(
        source=d.source,
        path=d.path or None,
        data_dir=d.data_dir or None,
        split="train",
        task=d.task,
        task_kwargs=dict(d.task_kwargs),
        num_examples=d.num_examples,
        on_error=d.on_error,
        sft_responses=d.sft_responses,
        tokenizer_path=d.tokenizer_path or None,
    )
    if split == "eval":
        if d.source in ("jsonl", "hh", "datasets"):
            if not d.eval_path:
                return None
            split_name = d.eval_split if d.source == "datasets" else "train"
            src = dataclasses.replace(src, path=d.eval_path, split=split_name)
        else:  # tldr and synthetic tasks have their own held-out split
            src = dataclasses.replace(src, split=d.eval_split)
        src = dataclasses.replace(src, num_examples=d.num_eval)
    return src


def unpaired(cfg: RunConfig) -> bool:
    """A DPO-stage run with an unpaired outcome-label loss (losses.UNPAIRED_TYPES): labelled responses."""
    types = losses.parse_types(cfg.loss.loss_type)
    return cfg.stage == "dpo" and bool(types) and types[0] in losses.UNPAIRED_TYPES


def example_kind(cfg: RunConfig) -> str:
    """What the run trains on: "sft" examples, "outcome" (labelled responses) or "preference" pairs."""
    return "sft" if cfg.stage == "sft" else "outcome" if unpaired(cfg) else "preference"


def response_sides(cfg: RunConfig) -> tuple[str, ...]:
    """The responses of the run's DPO-stage batches: chosen and rejected, or the completion of a
    labelled response (what reference log-probs are computed and stored for)."""
    return layouts.SINGLE_SIDES if unpaired(cfg) else layouts.PAIR_SIDES


def _raw_examples(cfg: RunConfig, split: str) -> tuple[list, Any]:
    """Untokenized examples of `split` for the config's stage, and the error policy with its counts."""
    src = _source_cfg(cfg, split)
    if src is None:
        return [], ErrorPolicy(cfg.data.on_error)
    kind = example_kind(cfg)
    if kind == "sft" and cfg.data.source in ("jsonl", "hh", "tldr"):
        # an SFT file has "completion"; a preference file is used via its pairs. Only the first JSON
        # object decides; the read itself reports every bad line (file:line: key) under on_error.
        first = first_record(src.path) if cfg.data.source == "jsonl" else None
        if not (first and ("completion" in first or "messages" in first)):
            pairs, policy = load_examples(src, "preference")
            return _to_sft(pairs, cfg.data.sft_responses), policy
    return load_examples(src, kind)


def load_dataset(cfg: RunConfig) -> Dataset:
    """Tokenized train and eval examples for the config's stage, plus skip/truncation stats."""
    src = _source_cfg(cfg, "train")
    if src.tokenizer_path is None and cfg.data.source != "synthetic":
        src = dataclasses.replace(src, tokenizer_path=cfg.model.path or None)  # an HF model folder has one
    tok = load_tokenizer(src)
    tcfg = TokenizeConfig(
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.response_len,
        truncate_prompt=cfg.data.truncate_prompt,
        truncate_responses=cfg.data.truncate_responses,
        add_bos=cfg.data.add_bos,
        chat_divergence=cfg.data.chat_divergence,
    )
    out, stats = {}, {}
    for split in ("train", "eval"):
        raw, policy = _raw_examples(cfg, split)
        limit = cfg.data.num_examples if split == "train" else cfg.data.num_eval
        if limit:
            raw = raw[:limit]
        items, tstats = tokenize_all(raw, tok, tcfg, policy)
        out[split] = items
        stats[split] = {"read": policy.summary(), "tokenize": tstats.summary()}
        policy.log_summary(split)  # kept = the examples used, after tokenisation and the limit
        log.info("%s: %d examples (%s)", split, len(items), tstats.summary())
    if not out["train"]:
        raise ValueError(
            f"no training examples from data.source={cfg.data.source!r} (data.path={cfg.data.path!r})"
        )
    return Dataset(out["train"], out["eval"], tok, stats)


@dataclasses.dataclass(frozen=True)
class Bucketed:
    """A micro-batch function whose row length is the smallest of `buckets` holding the step's
    examples (data.buckets): a few compiled shapes instead of one long row for every batch."""

    make: Callable[..., dict[str, np.ndarray]]  # layouts.preference_batch / sft_batch, partially applied
    buckets: tuple[int, ...]
    layout: str
    num_rows: int | None

    def seq_len_for(self, items: Sequence[Any]) -> int:
        return layouts.bucket_for(items, self.layout, self.buckets, self.num_rows)

    def __call__(self, items: list, seq_len: int | None = None) -> dict[str, np.ndarray]:
        return self.make(items, seq_len=seq_len or self.seq_len_for(items))


def micro_batch_fn(cfg: RunConfig, micro_size: int) -> Callable[[list], dict[str, np.ndarray]]:
    """list of (tokenized example | None) of length micro_size -> one layout batch (numpy).
    With data.buckets, a `Bucketed` function (row length chosen per step, see `stack_micro`)."""
    d = cfg.data
    kw = dict(seq_len=d.seq_len, response_len=d.response_len, overflow=d.overflow)
    if d.layout == "packed":
        kw["num_rows"] = d.num_rows or micro_size
    fn, size = {"sft": (layouts.sft_batch, "batch_size"), "outcome": (layouts.outcome_batch, "batch_size"),
                "preference": (layouts.preference_batch, "num_pairs")}[example_kind(cfg)]  # fmt: skip
    make = functools.partial(fn, layout=d.layout, **{size: micro_size}, **kw)
    buckets = tuple(d.buckets)
    if not buckets:
        return make
    return Bucketed(make, buckets, d.layout, kw.get("num_rows"))


def stack_micro(
    items: Sequence[Any], make_batch: Callable[[list], dict], micro_batches: int
) -> dict[str, np.ndarray]:
    """This process's examples of one step (None = dummy) -> arrays with a leading micro axis [M, ...].
    A `Bucketed` make_batch pads every micro-batch of the step to one bucket (the step's shape)."""
    if len(items) % micro_batches:
        raise ValueError(f"{len(items)} local examples do not split into {micro_batches} micro-batches")
    k = len(items) // micro_batches
    kw = {}
    if isinstance(make_batch, Bucketed):
        # one bucket for the whole step; packed: each micro-batch's own rows must fit it
        kw["seq_len"] = max(
            make_batch.seq_len_for(list(items[m * k : (m + 1) * k])) for m in range(micro_batches)
        )
    parts = [make_batch(list(items[m * k : (m + 1) * k]), **kw) for m in range(micro_batches)]
    return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


# ---- precomputed reference log-probs, stored beside the data -------------------------------------


def fingerprint(item: TokenizedPair | TokenizedOutcome) -> str:
    """Hash of a pair's (or a labelled response's) token ids: a stored reference log-prob must belong
    to exactly these tokens."""
    h = hashlib.sha1()
    for _, ids in _token_parts(item):
        h.update(np.asarray(ids, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _token_parts(item: TokenizedPair | TokenizedOutcome) -> list[tuple[str, list[int]]]:
    if isinstance(item, TokenizedOutcome):
        return [("prompt", item.prompt_ids), ("completion", item.completion_ids)]
    return [("prompt", item.prompt_ids), ("chosen", item.chosen_ids), ("rejected", item.rejected_ids)]


def reference_sides(item: TokenizedPair | TokenizedOutcome) -> list[tuple[str, list[int]]]:
    """(side, response ids) whose reference log-probs a precomputed file holds: chosen and rejected of a
    pair, completion of a labelled response."""
    return _token_parts(item)[1:]


def _reference_row(obj: Any, path: str, line: int) -> dict:
    """One line of a `dpoq precompute-ref` file, checked: fingerprint and lists of finite floats."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=line)
    if not isinstance(obj.get("fingerprint"), str):
        raise DataError("missing or not a string", file=path, line=line, key="fingerprint")
    keys = [k for k in obj if k.startswith("ref_") and k.endswith("_logps")]
    for k in keys or ["ref_chosen_logps"]:
        v = obj.get(k)
        ok = isinstance(v, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        if not ok:
            raise DataError("missing or not a list of numbers", file=path, line=line, key=k)
        if not np.all(np.isfinite(np.asarray(v, np.float64))):
            raise DataError("holds a non-finite log-prob", file=path, line=line, key=k)
    return {**obj, "line": line}


def attach_cache(items: list, cache: token_cache.TokenCache, fields: list[str], what: str) -> list:
    """Items with meta[field] = the cache's values of each field (token_cache.CachedValues: read when a
    batch is built). An item the cache lacks, or whose values do not fit its token counts, is an error
    naming the item (a value on the wrong token would train silently wrong)."""
    out = []
    for i, p in enumerate(items):
        vals = cache.values(fingerprint(p))
        if vals is None:
            kind = "labelled response" if isinstance(p, TokenizedOutcome) else "pair"
            raise ValueError(
                f"{what} {cache.path!r}: no values for {kind} {i} ({p.meta.get('source', '')}:"
                f"{p.meta.get('line', '')}); the cache was made for other data or tokenization"
            )
        meta = dict(p.meta)
        for field, (_, ids) in zip(fields, reference_sides(p), strict=True):
            if len(vals[field]) != len(ids):
                raise ValueError(f"{what} {cache.path!r}: {len(vals[field])} values of {field!r} for a "
                                 f"response of {len(ids)} tokens (item {i})")  # fmt: skip
            meta[field] = vals[field]
        out.append(dataclasses.replace(p, meta=meta))
    return out


def attach_reference(items: list, path: str) -> list:
    """Pairs (or labelled responses) with meta["ref_<side>_logps"] from a JSON-lines file of an earlier
    `dpoq precompute-ref` (today's writes a token cache; train/setup opens it). A malformed line, or one
    whose log-probs do not fit its example's token counts, is an error naming the file and line."""
    if not paths.exists(path):
        raise ValueError(f"config key 'reference.logps_path': file {path!r} does not exist")
    table = {}
    for line, obj in iter_json_lines(path, ErrorPolicy("fail")):
        row = _reference_row(obj, path, line)
        table[row["fingerprint"]] = row
    out = []
    for i, p in enumerate(items):
        row = table.get(fingerprint(p))
        if row is None:
            what = "labelled response" if isinstance(p, TokenizedOutcome) else "pair"
            raise ValueError(
                f"{path}: no reference log-probs for {what} {i} "
                f"({p.meta.get('source', '')}:{p.meta.get('line', '')}); "
                "rerun `dpoq precompute-ref` with this data config"
            )
        meta = dict(p.meta)
        for side, ids in reference_sides(p):
            k = f"ref_{side}_logps"
            if k not in row:
                raise DataError("missing: the file was written for other data", file=path,
                                line=row["line"], key=k)  # fmt: skip
            if len(row[k]) != len(ids):
                raise DataError(f"{len(row[k])} log-probs for a response of {len(ids)} tokens", file=path,
                                line=row["line"], key=k)  # fmt: skip
            meta[k] = row[k]
        out.append(dataclasses.replace(p, meta=meta))
    return out


def data_fingerprint(cfg: RunConfig) -> str:
    """sha256 of what the data are: the source, the bytes of its files (data.path, data.eval_path,
    data.data_dir) or a Hub name, and for a synthetic task its name and settings (seed included)."""
    d = cfg.data
    parts: dict[str, Any] = {"source": d.source}
    for key in ("path", "eval_path", "data_dir"):
        p = getattr(d, key)
        if p:
            parts[key] = token_cache.file_sha256(p) if paths.exists(p) else p
    if d.source == "synthetic":
        parts.update(task=d.task, task_kwargs=dict(d.task_kwargs), sft_responses=d.sft_responses)
    return token_cache.sha256_of(parts)


def run_fingerprint(cfg: RunConfig, tokenizer: Any) -> dict[str, str]:
    """The fingerprint keys every cache of this run's data must match: tokenizer and data."""
    return {"tokenizer": token_cache.tokenizer_fingerprint(tokenizer), "data": data_fingerprint(cfg)}
