"""What a run does when the world around it fails: a preemption notice, a dead peer, a failed write.

Exit codes of `dpoq train` (documented in docs/training.md; tpu_scripts/keep_running.sh relaunches on
the first two):
  EXIT_PREEMPTED = 75  SIGTERM or SIGINT: every process finished the same step, a checkpoint of that
                       step is committed; rerun the same command to resume (EX_TEMPFAIL)
  EXIT_PEER_LOST = 76  another process of a multi-process run stopped responding; this one stopped
                       too; relaunch all processes to resume from the last checkpoint
  EXIT_WRITE_FAILED = 74  a checkpoint or metrics write failed (disk full, file too large,
                       read-only); the previous checkpoint is intact (EX_IOERR)

Preemption: `StopSignals` turns the first SIGTERM/SIGINT into a flag (a second SIGINT interrupts at
once); after every step `agree_stop` combines the flags of all processes (an all-gather of one
integer), so every process stops after the same step even when the notices arrive at different times.

A dead peer: `PeerWatch` (multi-process runs) is a thread that bumps this process's counter in the
jax.distributed key-value store every second and watches the others'; a counter that stops moving
for `timeout_s` (or a coordination service that stops answering) ends this process with one line
naming the lost one. The same check runs at once when a collective raises (gloo reports a closed
connection immediately; a TPU collective may instead wait, which the thread bounds).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_WRITE_FAILED = 74
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76

_WRITE_TEXTS = ("No space left", "File too large", "Read-only file system", "Permission denied", "Disk quota")
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """The run stopped at `step` on a signal, with a committed checkpoint of that step."""

    def __init__(self, step: int, signame: str, directory: str):
        self.step, self.signame, self.directory = step, signame, directory
        super().__init__(
            f"stopped by {signame} after step {step}; checkpoint {directory}/{step} committed; "
            f"rerun the same command to resume (exit status {EXIT_PREEMPTED})"
        )


class WriteFailed(OSError):
    """A checkpoint or metrics write failed; the message names what, where, and the intact step."""


class StopSignals:
    """Context manager: while inside, the first SIGTERM or SIGINT sets `requested` (the run stops
    after the current step); a second SIGINT raises KeyboardInterrupt. Only in the main thread
    (elsewhere signals cannot be caught: a no-op). The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signame = name
        print(f"dpoq train: {name} received: finishing the current step, then saving a checkpoint",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():  # (None: a handler installed outside Python, not restorable)
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()


def agree_stop(local: bool) -> bool:
    """True on every process if any process asked to stop (a collective: all processes call it
    after the same step)."""
    import jax

    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(bool(local)))
    return bool(np.any(np.asarray(flags)))


def is_write_error(e: BaseException) -> bool:
    """An OSError (or one wrapped by the checkpoint library) of a failed write: disk full, file too
    large, read-only, permission."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return True
        text = str(e)
        if any(s in text for s in _WRITE_TEXTS):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


_TS_WRITE = re.compile(r'Failed writing: "([^"]+)": (?:[^\[]*?: )?([^:\[]+?) \[os_error_code=.?(\d+)')


def write_error_text(e: BaseException) -> str:
    """The short reason of a failed write: "File too large (errno 27): PATH" out of tensorstore's
    long message, or the OSError's own text."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return f"{e.strerror} (errno {e.errno}): {e.filename or ''}".rstrip(": ")
        m = _TS_WRITE.search(str(e))
        if m:
            return f"{m.group(2).strip()} (errno {m.group(3)}): {m.group(1)}"
        e = e.__cause__ or e.__context__
    return ""


class DropWriteErrors(logging.Filter):
    """On the checkpoint library's logger (absl): drops the ERROR records and tracebacks its writer
    threads log for a failed write; the run reports that failure itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not is_write_error(exc)
        return not any(s in record.getMessage() for s in _WRITE_TEXTS)


def short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


# ---- dead peers --------------------------------------------------------------------------------


class PeerWatch:
    """Heartbeats of every process through the jax.distributed key-value store (see module doc)."""

    PREFIX = "dpoq_alive/"

    def __init__(self, timeout_s: float, *, interval_s: float = 1.0, exit_fn=None):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.pid, self.n = jax.process_index(), jax.process_count()
        self.timeout_s = float(timeout_s)
        self.interval_s = min(interval_s, self.timeout_s / 4)
        self._exit = exit_fn or exit_now
        self._seen: dict[int, tuple[str, float]] = {}  # process -> (its counter, when it last changed)
        self._service_ok = time.monotonic()
        self._count = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpoq-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        self._count += 1
        self.client.key_value_set(f"{self.PREFIX}{self.pid}", str(self._count), allow_overwrite=True)
        now = time.monotonic()
        for key, value in self.client.key_value_dir_get(self.PREFIX):
            p = int(key.rsplit("/", 1)[-1])
            if p != self.pid and self._seen.get(p, ("", 0.0))[0] != value:
                self._seen[p] = (value, now)
        self._service_ok = now

    def lost(self, stale_s: float) -> list[int] | None:
        """Processes whose counter has not moved for stale_s (None: the coordination service, i.e.
        process 0, is the one that stopped answering)."""
        now = time.monotonic()
        if now - self._service_ok > stale_s:
            return None
        return [p for p in range(self.n) if p != self.pid
                and now - self._seen.get(p, ("", self._started))[1] > stale_s]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the service is gone or unreachable: lost() says so
                pass
            gone = self.lost(self.timeout_s)
            if gone is None or gone:
                self._exit(self.message(gone, f"no heartbeat for {self.timeout_s:g} s"))
                return

    def message(self, gone: list[int] | None, why: str) -> str:
        who = ("process 0 (the coordinator)" if gone is None
               else ", ".join(f"process {p}" for p in gone))
        return (f"dpoq train: lost {who} of {self.n} ({why}; train.peer_timeout_s={self.timeout_s:g}); "
                f"process {self.pid} stops too (exit status {EXIT_PEER_LOST}); relaunch all processes "
                f"to resume from the last checkpoint")

    def explain(self, e: BaseException) -> str | None:
        """After a collective raised: the lost-peer line if a peer is gone (waits up to a few
        heartbeats for its counter to go stale), None if every peer is alive (a local error)."""
        stale = max(3 * self.interval_s, 2.0)
        end = time.monotonic() + min(self.timeout_s, stale + 2 * self.interval_s + 1.0)
        while time.monotonic() < end:
            gone = self.lost(stale)
            if gone is None or gone:
                return self.message(gone, f"a collective failed: {short(e, 120)}")
            time.sleep(self.interval_s / 2)
        return None


def exit_now(line: str) -> None:
    """One line, then exit without jax.distributed's shutdown barrier (it would wait for the lost
    process until its own timeout and then abort with a page of C++ log)."""
    print(line, file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


def initialize_distributed(peer_timeout_s: float, **kwargs: Any) -> None:
    """jax.distributed.initialize(**kwargs) with the service's heartbeat timeout 30 s past
    peer_timeout_s: PeerWatch reports a lost peer first, in one line; the service is the backstop.
    (When process 0 dies, the coordination service goes with it and jax's client in every other
    process aborts at once with its own log: jaxlib's client takes an error callback,
    missed_heartbeat_callback, but cannot call a Python one with its status (std::bad_cast), so
    that case ends by SIGABRT, exit status 134, within a second.)"""
    import jax

    jax.distributed.initialize(heartbeat_timeout_seconds=int(peer_timeout_s) + 30, **kwargs)
