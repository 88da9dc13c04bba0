"""Metrics out: TensorBoard event files + metrics.jsonl in the workdir, and the FLOPs / MFU estimate."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from dpoq_jax import paths

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, by substring of jax's device_kind (lower case). Unknown -> None.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100 pcie", 756e12),  # before the plain "h100" (SXM) entry: first match wins
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def step_flops(
    num_params: int,
    tokens_trained: int,
    *,
    num_layers: int,
    attn_width: int,
    row_len: int,
    tokens_ref: int = 0,
) -> float:
    """FLOPs of one step: 6·N per trained token (forward + backward) plus 2·N per token of a live
    reference forward, plus attention scores and values, 12·L·(H·F)·S per trained token and 4·L·(H·F)·S
    per reference token (PaLM appendix B; padding tokens count since they are computed)."""
    attn = num_layers * attn_width * row_len
    return (
        6.0 * num_params * tokens_trained
        + 12.0 * attn * tokens_trained
        + (2.0 * num_params + 4.0 * attn) * tokens_ref
    )


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the peak is unknown (CPU)."""
    peak = peak_flops(device_kind)
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * num_devices)


def _jsonable(x: Any) -> Any:
    x = float(x) if hasattr(x, "__float__") and not isinstance(x, (int, bool)) else x
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x


class MetricsWriter:
    """Appends {"step", "split", metrics...} lines to WORKDIR/metrics.jsonl and scalars to TensorBoard
    (WORKDIR/tb). Only the main process writes. `truncate_after(step)` drops lines past a restored
    checkpoint so that a resumed run's log equals an uninterrupted one.

    On gs:// (no appends there) the writer keeps the file's text and uploads it whole at every write:
    each upload replaces the object atomically, so a reader never sees a torn line. TensorBoard
    events go to gs:// through tensorboardX's own Cloud Storage writer (google-cloud-storage)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = paths.join(workdir, "metrics.jsonl")
        self._text: str | None = None  # gs:// only: the whole file, uploaded at each write
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(paths.join(workdir, "tb"))

    def truncate_after(self, step: int) -> None:
        """Keeps the lines up to `step` (a torn last line, from a process killed mid-write, is dropped
        with a warning naming the file)."""
        if not self.enabled:
            return
        if not paths.exists(self.path):
            self._text = "" if paths.is_gcs(self.path) else None
            return
        rows = _read_rows(self.path, torn_last_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
        paths.write_text(self.path, text)
        self._text = text if paths.is_gcs(self.path) else None

    def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split}
        row.update({k: _jsonable(v) for k, v in sorted(metrics.items())})
        if paths.is_gcs(self.path):
            if self._text is None:  # first write without truncate_after: keep what is there
                self._text = paths.read_text(self.path) if paths.exists(self.path) else ""
            self._text += json.dumps(row) + "\n"
            paths.write_text(self.path, self._text)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is None:
            return
        try:
            self._tb.close()
        except OSError:  # a full disk: stop its writer threads, so that exit does not retry and print
            self._abandon_tensorboard()
            raise
        self._tb = None

    def _abandon_tensorboard(self) -> None:
        """Marks tensorboardX's event writers closed after a failed write: its worker thread stopped,
        no retry from its atexit hook (which would print the same OSError again at exit)."""
        tb, self._tb = self._tb, None
        all_writers = getattr(tb, "all_writers", None)
        for fw in list(all_writers.values()) if all_writers else [getattr(tb, "file_writer", None)]:
            ew = getattr(fw, "event_writer", None)
            if ew is None or getattr(ew, "_closed", True):
                continue
            try:
                ew._worker.stop()
            except Exception:  # noqa: BLE001 - its thread may have died on the same error
                pass
            ew._closed = True


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl (optionally of one split)."""
    rows = _read_rows(paths.join(workdir, "metrics.jsonl"), torn_last_ok=True)
    return [r for r in rows if split is None or r["split"] == split]


def _read_rows(path: str, *, torn_last_ok: bool) -> list[dict[str, Any]]:
    """The JSON rows of a metrics file. Appends are fsynced one line at a time, so only the last line
    can be torn (the process died mid-write): it is dropped with a warning. Any other bad line is
    damage, not a crash: a ValueError naming file and line."""
    with paths.open(path, "rb") as f:
        raw = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(raw):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if torn_last_ok and k == len(raw) - 1:
                log.warning("%s:%d: dropping a torn last line (a run stopped mid-write)", path, lineno)
                break
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}:{lineno}: not a metrics line ({msg})") from None
        rows.append(row)
    return rows


def eval_curve(workdir: str, keys: Sequence[str]) -> list[dict[str, float]]:
    """The run's held-out metrics by step (metrics.jsonl, split "eval"); errors name missing keys."""
    rows = read_metrics(str(workdir), split="eval")
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no eval rows (is train.eval_every > 0?)")
    out = []
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"{workdir}/metrics.jsonl step {r['step']}: eval row lacks {missing}")
        out.append({"step": r["step"], **{k: float(r[k]) for k in keys}})
    return out
