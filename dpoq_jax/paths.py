"""Run paths: a local directory or `gs://bucket/...`, through one abstraction (etils.epath).

Why epath: orbax already goes through it for checkpoint directories (tensorstore writes the arrays), so
checkpoints and every other file of a run share one path library. Without TensorFlow installed epath
serves `gs://` with fsspec's gcsfs (the `gcs` extra), which honours STORAGE_EMULATOR_HOST for a local
server; with TensorFlow it would take tf.io.gfile instead (set EPATH_USE_TF=0 to keep gcsfs).

Cloud Storage has no append, no rename and no directories: an object is written whole when its file
is closed (so a plain write is already atomic), a "directory" is a name prefix, and a move is copy
then delete. Functions here take and return strings so that call sites read like os.path.
"""

from __future__ import annotations

import atexit
import builtins
import os
import shutil
import tempfile
from typing import IO, Any

import fsspec
from etils import epath

GS = "gs://"
# No listing cache: other processes (the other hosts, tensorstore's writes of checkpoint arrays) change
# the bucket behind gcsfs's back, so a cached listing would hide their new steps and files.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_gcs(p: str | os.PathLike) -> bool:
    return os.fspath(p).startswith(GS)


def absolute(p: str | os.PathLike) -> str:
    """Local paths made absolute (orbax refuses relative ones); gs:// paths as they are."""
    s = os.fspath(p)
    return s.rstrip("/") if is_gcs(s) else os.path.abspath(s)


def join(p: str | os.PathLike, *parts: str) -> str:
    s = os.fspath(p)
    if is_gcs(s):
        return "/".join([s.rstrip("/"), *(x.strip("/") for x in parts)])
    return os.path.join(s, *parts)


def dirname(p: str | os.PathLike) -> str:
    s = os.fspath(p).rstrip("/")
    return s.rsplit("/", 1)[0] if is_gcs(s) else os.path.dirname(s)


def basename(p: str | os.PathLike) -> str:
    return os.fspath(p).rstrip("/").rsplit("/", 1)[-1]


def path(p: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(p))


def _fs() -> Any:
    """The gcsfs filesystem (for what epath does not offer: recursive copy and move)."""
    return fsspec.filesystem("gcs")


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists() if is_gcs(p) else os.path.exists(p)


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir() if is_gcs(p) else os.path.isdir(p)


def isfile(p: str | os.PathLike) -> bool:
    return path(p).is_file() if is_gcs(p) else os.path.isfile(p)


def listdir(p: str | os.PathLike) -> list[str]:
    return sorted(x.name for x in path(p).iterdir()) if is_gcs(p) else sorted(os.listdir(p))


def getsize(p: str | os.PathLike) -> int:
    return path(p).stat().length if is_gcs(p) else os.path.getsize(p)


def makedirs(p: str | os.PathLike) -> None:
    """Nothing to do on Cloud Storage (a directory exists when an object is under it)."""
    if not is_gcs(p):
        os.makedirs(p, exist_ok=True)


def open(p: str | os.PathLike, mode: str = "r", **kw: Any) -> IO:  # noqa: A001 - the os-like name
    """A file object; on gs:// an object is written when the file closes ("a" is refused there)."""
    if is_gcs(p):
        if "a" in mode:
            raise ValueError(f"{p}: Cloud Storage objects cannot be appended to")
        return path(p).open(mode, **kw)
    return builtins.open(p, mode, **kw)


def read_text(p: str | os.PathLike) -> str:
    with open(p, "r", encoding="utf-8") as f:
        return f.read()


def read_bytes(p: str | os.PathLike) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes the whole file atomically: locally a temporary file renamed over it (a reader never
    sees half a file), on gs:// one object upload (atomic by nature)."""
    write_bytes(p, text.encode("utf-8"))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    if is_gcs(p):
        path(p).write_bytes(data)
        return
    makedirs(os.path.dirname(os.path.abspath(p)))
    tmp = f"{p}.tmp"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)


def remove_tree(p: str | os.PathLike) -> None:
    if is_gcs(p):
        path(p).rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def move(src: str, dst: str) -> None:
    """Moves a file or directory (on gs://: copies each object, then deletes the originals)."""
    if is_gcs(src) != is_gcs(dst):
        raise ValueError(f"cannot move {src} to {dst} (one is on Cloud Storage, the other is not)")
    if is_gcs(src):
        _fs().mv(src, dst, recursive=True)
    else:
        makedirs(os.path.dirname(dst))
        shutil.move(src, dst)


def copy_file(src: str, dst: str) -> None:
    """Copies one file between any two places (local or gs://)."""
    write_bytes(dst, read_bytes(src))


def upload_dir(local: str, dst: str) -> None:
    """Copies the files under local directory `local` (with subfolders) into `dst`."""
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        for name in sorted(files):
            copy_file(os.path.join(root, name), join(dst, *([] if rel == "." else rel.split(os.sep)), name))


_staging: list[str] = []


def staging_dir() -> str:
    """A fresh local directory (under $TMPDIR) removed when the process ends: where a gs:// folder is
    copied for a library that reads only local files (transformers' tokenizers, memory-mapped
    safetensors), or written before it is uploaded."""
    d = tempfile.mkdtemp(prefix="dpoq_gcs_")
    if not _staging:
        atexit.register(lambda: [shutil.rmtree(x, ignore_errors=True) for x in _staging])
    _staging.append(d)
    return d


def local_dir(p: str) -> str:
    """`p` itself when local; for gs://, a local copy of the files directly in it (not recursive)."""
    if not is_gcs(p):
        return p
    d = staging_dir()
    for name in listdir(p):
        if isfile(join(p, name)):
            with builtins.open(os.path.join(d, name), "wb") as f:
                f.write(read_bytes(join(p, name)))
    return d
