"""Per-token values of preference pairs as an artifact: safetensors shards and a fingerprinted manifest.

A token cache holds, for every pair (or labelled response) of a run's data, one float per response token
of each of its fields, keyed by the hash of the pair's token ids (train.inputs.fingerprint). Three kinds:

  reference_logps  fields ref_<side>_logps         `dpoq precompute-ref`: the reference's log-probs
  token_rewards    fields <side>_token_values      `dpoq token-rewards`: an oracle's β·log π/π_ref
  token_weights    fields <side>_token_values      weights w_t >= 0 written by other tools

DIR/manifest.json (written last: a cache without it is not a cache):
  {"format": "dpoq-token-cache", "version": 1, "kind": ..., "fields": [...], "dtype": "float32"|"bfloat16",
   "items": N, "fingerprint": {"tokenizer": sha, "data": sha, "model": checksum|null, ...},
   "shards": [{"file": "shard-00000.safetensors", "items": n, "bytes": size}, ...]}
DIR/shard-XXXXX.safetensors: "keys" uint8 [n, 8] (the 16-hex-digit pair hashes), and per field the
values of its n items end to end, "<field>" [Σ tokens], with "<field>.offsets" int64 [n + 1].

Why safetensors: the reader memory-maps a shard and slices out the tokens of one pair (the run holds
the keys and offsets, 8 bytes an item a field, never the values: the OS page cache does); the header
carries dtype and shape (bfloat16 too), the format is a dependency already, and any safetensors tool
opens the files. npz cannot be memory-mapped and ArrayRecord would be a new dependency for records we
never read sequentially. A gs:// cache is copied to local disk shard by shard first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" for safetensors' numpy reader
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from dpoq_jax import paths

FORMAT, VERSION = "dpoq-token-cache", 1
MANIFEST = "manifest.json"
KINDS = ("reference_logps", "token_rewards", "token_weights")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SHARD_ITEMS = 4096  # items a shard: ~4 MB of float32 at 2 × 128 tokens a pair


class CacheMismatch(ValueError):
    """A cache made for other data, another tokenizer or another model than the run."""


def value_fields(kind: str, sides: Iterable[str]) -> list[str]:
    """The field names a cache of `kind` holds for the response sides (chosen, rejected | completion)."""
    if kind not in KINDS:
        raise ValueError(f"token cache kind must be one of {KINDS}, got {kind!r}")
    return [f"ref_{s}_logps" if kind == "reference_logps" else f"{s}_token_values" for s in sides]


def _key_bytes(key: str) -> np.ndarray:
    if len(key) != 16:
        raise ValueError(f"token cache key must be 16 hex digits, got {key!r}")
    return np.frombuffer(bytes.fromhex(key), np.uint8)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class CacheWriter:
    """Writes a cache to `out` (local or gs://): shards to a staging folder (local: OUT.partial beside
    it), then moved into place, the manifest last. Local output appears whole (a renamed folder) or not
    at all; an existing cache at `out` is replaced only when the new one is complete."""

    def __init__(self, out: str, kind: str, fields: list[str], fingerprint: Mapping[str, Any],
                 dtype: str = "float32", shard_items: int = SHARD_ITEMS):  # fmt: skip
        if dtype not in DTYPES:
            raise ValueError(f"token cache dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if kind not in KINDS:
            raise ValueError(f"token cache kind must be one of {KINDS}, got {kind!r}")
        self.out, self.kind, self.fields, self.dtype = out, kind, list(fields), dtype
        self.fingerprint = dict(fingerprint)
        self.shard_items = shard_items
        if paths.is_gcs(out):
            self.stage = paths.staging_dir()  # local files first, uploaded at close
        else:  # beside the output (same file system): renamed into place at close
            self.stage = f"{os.path.abspath(out)}.partial"
            shutil.rmtree(self.stage, ignore_errors=True)
            os.makedirs(self.stage)
        self.shards: list[dict[str, Any]] = []
        self.keys: set[str] = set()
        self._pending: list[tuple[str, dict[str, np.ndarray]]] = []

    def add(self, key: str, values: Mapping[str, Any]) -> None:
        """One item: its key (train.inputs.fingerprint) and a 1-D array of finite floats per field.
        A key seen before is skipped (the same tokens have the same values)."""
        if key in self.keys:
            return
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise ValueError(f"token cache item {key}: no values for fields {missing}")
        row = {}
        for f in self.fields:
            v = np.asarray(values[f], np.float32).reshape(-1)
            if not np.all(np.isfinite(v)):
                raise ValueError(f"token cache item {key}: non-finite value in field {f!r}")
            if self.kind == "token_weights" and np.any(v < 0):
                raise ValueError(f"token cache item {key}: negative weight in field {f!r}")
            row[f] = v
        _key_bytes(key)
        self.keys.add(key)
        self._pending.append((key, row))
        if len(self._pending) >= self.shard_items:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = {"keys": np.stack([_key_bytes(k) for k, _ in self._pending])}
        for f in self.fields:
            vals = [row[f] for _, row in self._pending]
            tensors[f] = np.concatenate(vals).astype(DTYPES[self.dtype]) if vals else np.zeros(0)
            ends = np.cumsum([len(v) for v in vals])
            tensors[f"{f}.offsets"] = np.concatenate([[0], ends]).astype(np.int64)
        name = _shard_name(len(self.shards))
        local = os.path.join(self.stage, name)
        safetensors.numpy.save_file(tensors, local)
        self.shards.append({"file": name, "items": len(self._pending), "bytes": os.path.getsize(local)})
        self._pending = []

    def close(self) -> dict[str, Any]:
        """Writes the last shard and the manifest; returns the manifest."""
        self._flush()
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "fields": self.fields,
                    "dtype": self.dtype, "items": len(self.keys), "fingerprint": self.fingerprint,
                    "shards": self.shards}  # fmt: skip
        text = json.dumps(manifest, indent=1, sort_keys=True)
        if paths.is_gcs(self.out):
            paths.remove_tree(self.out)  # no shard of an older cache survives beside the new manifest
            for s in self.shards:
                paths.copy_file(os.path.join(self.stage, s["file"]), paths.join(self.out, s["file"]))
            paths.write_text(paths.join(self.out, MANIFEST), text)  # last: the cache is whole
        else:
            with open(os.path.join(self.stage, MANIFEST), "w") as fh:
                fh.write(text)
            if os.path.exists(self.out):
                old = f"{os.path.abspath(self.out)}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.out, old)
                os.replace(self.stage, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.stage, self.out)
        shutil.rmtree(self.stage, ignore_errors=True)
        return manifest


def is_cache(path: str) -> bool:
    """Whether `path` is a finished token cache (a folder holding its manifest, which is written last)."""
    return bool(path) and paths.isdir(path) and paths.exists(paths.join(path, MANIFEST))


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the cache at `path`, checked: format, version, kind, fields, shards."""
    mpath = paths.join(path, MANIFEST)
    if not paths.exists(mpath):
        raise ValueError(f"{path}: not a token cache (no {MANIFEST}; a cut-short write leaves none)")
    try:
        m = json.loads(paths.read_text(mpath))
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{mpath}: key 'format' is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"{mpath}: key 'version' is {m.get('version')!r}; this dpoq reads version {VERSION}")
    for key, ok in (("kind", m.get("kind") in KINDS), ("dtype", m.get("dtype") in DTYPES),
                    ("fields", isinstance(m.get("fields"), list) and m["fields"]),
                    ("shards", isinstance(m.get("shards"), list)),
                    ("fingerprint", isinstance(m.get("fingerprint"), dict))):  # fmt: skip
        if not ok:
            raise ValueError(f"{mpath}: key {key!r} is missing or invalid ({m.get(key)!r})")
    return m


@dataclasses.dataclass(frozen=True)
class CachedValues:
    """The values of one item's field, read from the memory-mapped shard when asked for
    (np.asarray(x)); len(x) is its token count, known without reading."""

    cache: TokenCache
    shard: int
    field: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        v = self.cache.handle(self.shard).get_slice(self.field)[self.start : self.stop]
        return np.asarray(v, dtype or np.float32)


class TokenCache:
    """A token cache opened for reading: the keys and offsets of every shard in memory, the values
    memory-mapped. `values(key)` -> {field: CachedValues} or None."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        self.kind, self.fields = self.manifest["kind"], list(self.manifest["fields"])
        self.local = paths.local_dir(path)  # gs://: copied to local disk file by file
        self._handles: dict[int, Any] = {}
        keys, where = [], []
        self._offsets: list[dict[str, np.ndarray]] = []
        for i, s in enumerate(self.manifest["shards"]):
            file = os.path.join(self.local, s["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != s["bytes"]:
                raise ValueError(f"{path}: shard {s['file']} is missing or not {s['bytes']} bytes")
            h = self.handle(i)
            k = h.get_tensor("keys")
            if k.shape != (s["items"], 8):
                raise ValueError(f"{path}: shard {s['file']}: keys of shape {k.shape}, manifest says "
                                 f"{s['items']} items")
            offs = {f: h.get_tensor(f"{f}.offsets") for f in self.fields}
            self._offsets.append(offs)
            keys.append(k.view(">u8").reshape(-1))
            where.append(np.stack([np.full(len(k), i), np.arange(len(k))], 1))
        keys_K = np.concatenate(keys) if keys else np.zeros(0, ">u8")
        where_K2 = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
        order = np.argsort(keys_K, kind="stable")
        self._keys, self._where = keys_K[order].astype(np.uint64), where_K2[order]

    def handle(self, shard: int) -> Any:
        if shard not in self._handles:
            file = os.path.join(self.local, self.manifest["shards"][shard]["file"])
            self._handles[shard] = safe_open(file, framework="numpy")
        return self._handles[shard]

    def __len__(self) -> int:
        return len(self._keys)

    def values(self, key: str) -> dict[str, CachedValues] | None:
        k = np.uint64(int(key, 16))
        j = int(np.searchsorted(self._keys, k))
        if j >= len(self._keys) or self._keys[j] != k:
            return None
        shard, row = (int(x) for x in self._where[j])
        out = {}
        for f in self.fields:
            o = self._offsets[shard][f]
            out[f] = CachedValues(self, shard, f, int(o[row]), int(o[row + 1]))
        return out

    def check(
        self, expected: Mapping[str, Any], kinds: Iterable[str], fields: Iterable[str], what: str
    ) -> None:
        """Refuses (CacheMismatch, one line) a cache of another kind, without the fields the run needs, or
        whose fingerprint differs from `expected` in any key `expected` gives (None values: unknown)."""
        kinds = tuple(kinds)
        if self.kind not in kinds:
            need = " or ".join(kinds)
            raise CacheMismatch(f"{what} {self.path!r} is a {self.kind!r} cache; this run needs {need}")
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise CacheMismatch(f"{what} {self.path!r} has fields {self.fields}, lacks {missing}")
        fp = self.manifest["fingerprint"]
        for k, v in expected.items():
            if v is not None and fp.get(k) != v:
                raise CacheMismatch(
                    f"{what} {self.path!r} was made for another {k}: cache {str(fp.get(k))[:16]}, this run "
                    f"{str(v)[:16]} (recompute it for this run's {k})"
                )


def sha256_of(obj: Any) -> str:
    """SHA-256 of a JSON-able object (keys sorted, anything else by its str): a fingerprint value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what decides token ids: the tokenizer's class, vocabulary, special tokens and chat
    template."""
    vocab = sorted(tok.get_vocab().items())
    special = getattr(tok, "all_special_tokens", None)
    return sha256_of({"class": type(tok).__name__, "vocab": vocab, "special": special,
                      "chat_template": getattr(tok, "chat_template", None)})  # fmt: skip


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes, sorted), local or gs://."""
    h = hashlib.sha256()
    if paths.isdir(path):
        for name in sorted(paths.listdir(path)):
            h.update(name.encode() + b"\0" + file_sha256(paths.join(path, name)).encode())
        return h.hexdigest()
    with paths.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
