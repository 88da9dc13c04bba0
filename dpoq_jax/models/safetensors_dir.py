"""safetensors files through the `safetensors` library (memory-mapped reads; bfloat16 as ml_dtypes'),
and the Hugging Face layout of a folder: model.safetensors, or model-0000i-of-0000N.safetensors shards
named by model.safetensors.index.json, written to temporary names and renamed (index last)."""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16", which safetensors' numpy reader asks for
import numpy as np
import safetensors
import safetensors.numpy

from dpoq_jax import paths

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default (5.x)
# Names of the files an export writes (or, ending in .tmp, left behind when killed while writing).
_EXPORT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?(\.tmp)?")
# Tensor types read as numpy arrays for a model (complex and 8-bit floats are not).
_READABLE = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class SafetensorsDir:
    """Every tensor of a directory's *.safetensors files (those the index names, if there is one), by
    name. get() memory-maps the tensor's file and copies out that one tensor. A gs:// directory is copied
    to local disk first."""

    def __init__(self, path: str):
        self.path = path
        local = paths.local_dir(path)
        index = os.path.join(local, INDEX)
        if os.path.isfile(index):  # sharded checkpoint: only the files the index names
            try:
                with open(index, "rb") as fh:
                    files = sorted(set(json.loads(fh.read())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            absent = [f for f in files if not os.path.isfile(os.path.join(local, f))]
            if absent:
                raise FileNotFoundError(f"{index}: lists files that are missing: {absent}")
        else:
            files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
        self.where: dict[str, tuple[str, str, list[int]]] = {}  # name -> (file, dtype code, shape)
        for f in files:
            full = os.path.join(local, f)
            try:
                with safetensors.safe_open(full, framework="numpy") as handle:
                    for name in handle.keys():
                        if name in self.where:
                            raise ValueError(f"{full}: tensor {name!r} is also in {self.where[name][0]}")
                        part = handle.get_slice(name)
                        self.where[name] = (full, part.get_dtype(), part.get_shape())
            except safetensors.SafetensorError as e:
                raise _damage(full, e) from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: str) -> str:
        return self.where[name][0]

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"{self.path}: tensor {name!r} is missing from the safetensors files")
        full, dtype, _ = self.where[name]
        if dtype not in _READABLE:
            raise ValueError(f"{full}: tensor {name!r} has unsupported dtype {dtype}")
        # A mapping per call, dropped on return: the pages read stay in the page cache, not in this
        # process (a mapping kept open would count every tensor read so far in its resident memory).
        with safetensors.safe_open(full, framework="numpy") as handle:
            return handle.get_tensor(name)


def _damage(full: str, err: Exception) -> ValueError:
    """The one-line error for a file the library refused: what is wrong with its header when that can
    be said (a foreign file, a truncated one), else the library's own words."""
    size = os.path.getsize(full)
    with open(full, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or not 2 <= n <= size - 8:
            return ValueError(f"{full}: not a safetensors file (header length {n}, file size {size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return ValueError(f"{full}: not a safetensors file (header is not JSON: {e})")
    if not isinstance(header, dict):
        return ValueError(f"{full}: not a safetensors file (header is a JSON {type(header).__name__})")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape, dtype = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            return ValueError(f"{full}: tensor {name!r} has a malformed header entry {info!r}")
        if not 0 <= start <= end <= size - 8 - n:
            return ValueError(
                f"{full}: tensor {name!r}: bytes [{start}, {end}) do not fit its shape {shape} {dtype} "
                f"and the file's {size - 8 - n} data bytes (truncated or damaged file?)"
            )
    return ValueError(f"{full}: not a safetensors file ({err})")


def check_storable(where: str, tensors: dict[str, np.ndarray]) -> None:
    """A clear error before anything is written: the library's would not say which tensor."""
    known: set[np.dtype] = set()
    for name, a in tensors.items():
        if a.dtype not in known:
            try:
                safetensors.numpy.save({"t": np.zeros(0, a.dtype)})
            except Exception:  # noqa: BLE001 - SafetensorError, or numpy's for object arrays
                raise ValueError(f"{where}: cannot store tensor {name!r} of dtype {a.dtype}") from None
            known.add(a.dtype)


def _write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file at `path`, written in place (callers write to a temporary name)."""
    arrays = {n: np.require(a, requirements="C") for n, a in tensors.items()}  # keeps 0-d arrays 0-d
    safetensors.numpy.save_file(arrays, path, metadata=metadata or {"format": "pt"})


def write_safetensors(
    path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """One safetensors file, written under a temporary name and renamed into place (never half a file)."""
    check_storable(path, tensors)
    tmp = f"{path}.tmp"
    try:
        _write_file(tmp, tensors, metadata)
    except BaseException:
        _unlink(tmp)
        raise
    os.replace(tmp, path)


def parse_size(size: int | str) -> int:
    """Bytes from an int or "5GB" / "200MB" / "20KB" (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    s = str(size).strip().upper()
    try:
        return int(float(s[:-2]) * units[s[-2:]])
    except (KeyError, ValueError):
        raise ValueError(
            f"max_shard_size {size!r}: expected bytes or a size like '5GB' (KB/MB/GB/TB)"
        ) from None


def shard_plan(
    tensors: dict[str, np.ndarray], max_shard_size: int | str = MAX_SHARD_SIZE
) -> dict[str, list[str]]:
    """{file name: tensor names} as transformers shards: tensors in order, a new shard when the next
    one would go over max_shard_size (a tensor larger than that alone in its shard); one file: WEIGHTS."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    if len(shards) == 1:
        return {WEIGHTS: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}


def save_safetensors_dir(
    path: str, tensors: dict[str, np.ndarray], *, max_shard_size: int | str = MAX_SHARD_SIZE
) -> list[str]:
    """Writes `tensors` as Hugging Face weights into folder `path` (local or gs://): WEIGHTS alone,
    or shards + INDEX. Every file is written whole first (locally under a temporary name), then the
    shards are put in place, the index last, and the weight files of an earlier export that the new
    one does not name are removed: a failed write leaves the earlier export as it was. Returns the
    file names written."""
    plan = shard_plan(tensors, max_shard_size)
    check_storable(path, tensors)
    gcs = paths.is_gcs(path)
    work = paths.staging_dir() if gcs else path
    os.makedirs(work, exist_ok=True)
    files = list(plan)
    if len(plan) > 1:
        files.append(INDEX)
    staged = {f: os.path.join(work, f if gcs else f + ".tmp") for f in files}
    try:
        for f, names in plan.items():
            _write_file(staged[f], {n: tensors[n] for n in names})
        if len(plan) > 1:
            index = {
                "metadata": {"total_size": sum(int(a.nbytes) for a in tensors.values())},
                "weight_map": {n: f for f, names in plan.items() for n in names},
            }
            with open(staged[INDEX], "w") as fh:
                json.dump(index, fh, indent=2, sort_keys=True)
                fh.write("\n")
    except BaseException:
        for p in staged.values():
            _unlink(p)
        raise
    for f in files:  # the index last
        _publish(staged[f], paths.join(path, f))
    stale = [f for f in paths.listdir(path) if _EXPORT_FILE.fullmatch(f) and f not in files]
    for f in sorted(stale, key=lambda f: f != INDEX):  # an old index first: it names the old shards
        _unlink(paths.join(path, f))
    return files


def _publish(staged: str, dest: str) -> None:
    if not paths.is_gcs(dest):
        os.replace(staged, dest)
        return
    with open(staged, "rb") as src, paths.open(dest, "wb") as dst:  # streamed: shards can be GBs
        shutil.copyfileobj(src, dst, 64 << 20)
    os.remove(staged)


def _unlink(p: str) -> None:
    if paths.is_gcs(p):
        paths.path(p).unlink(missing_ok=True)
    elif os.path.lexists(p):
        os.remove(p)


