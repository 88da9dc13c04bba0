"""A short soak (benchmarks/soak.py, a few hundred steps with a checkpoint every 10 steps, an eval
every 25 and metrics + TensorBoard every step): RSS, open descriptors and the checkpoint count stay
flat. The long run's numbers are in benchmarks/results/soak_cpu.json."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level directory, not part of the package
    sys.path.insert(0, str(ROOT))

from benchmarks import soak  # noqa: E402


def test_checks_flag_what_is_not_flat():
    flat = {
        "rss_mb": {"slope_mb_per_1k_steps": 1.0},
        "open_fds": {"first_half_min": 30, "second_half_min": 31,
                     "first_half_max": 36, "second_half_max": 44},  # a peak alone moves: flat
        "checkpoints": {"max_seen": 4, "final": 3},
        "step_time_ms": {"median_first_half": 6.0, "median_second_half": 7.0},
    }
    assert soak.check(flat, 3, rss_slope_mb=20, fd_growth=4) == []
    leaky = {
        **flat,
        "rss_mb": {"slope_mb_per_1k_steps": 500.0},
        "open_fds": {"first_half_min": 30, "second_half_min": 90,
                     "first_half_max": 36, "second_half_max": 96},
    }
    assert len(soak.check(leaky, 3, rss_slope_mb=20, fd_growth=4)) == 2
    assert soak.check({**flat, "checkpoints": {"max_seen": 9, "final": 9}}, 3, rss_slope_mb=20, fd_growth=4)
    assert soak.slope_per_1k([0, 1, 2, 3], [0, 1000, 2000, 3000]) == pytest.approx(1.0)


@pytest.mark.slow
def test_short_soak_stays_flat(tmp_path):
    s = soak.soak(str(tmp_path / "soak"), steps=300, checkpoint_every=10, eval_every=25, keep=2)
    report = soak.analyze(s)
    # generous limits (a short run on a shared machine): a leak of 1 kB per step in RSS is 1 MB per
    # 1000 steps and passes; one of a batch per step (~100 kB) or a descriptor per checkpoint fails
    assert soak.check(report, 2, rss_slope_mb=60, fd_growth=4, step_time_ratio=3.0) == [], report
    assert report["checkpoints"]["final"] == 2
