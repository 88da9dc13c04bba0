"""One experiment over several seeds: mean and 95% Student-t interval per number, tables merged cell-wise.

Every seed runs the whole experiment (its own data, initialisation and sampling) and builds the same
report; `merge_reports` turns the per-seed reports into one whose numeric table cells read
"mean [lo, hi]" (the 95% t-interval over seeds, df = seeds − 1) and whose verdicts come from those
intervals (the experiment's `verdicts` function over `Report.numbers`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dpoq_jax.analysis import document as doc

# 97.5% quantiles of Student's t with df degrees of freedom (two-sided 95% interval); df > 30: normal-ish.
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
    19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052,
    28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip
INTERVAL_KIND = "95% Student-t interval over seeds (df = seeds − 1)"


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of n seeds and its 95% t-interval; with one seed lo = hi = mean (a point estimate)."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        if self.n < 2 or not math.isfinite(self.lo):
            return doc.fmt(self.mean)
        return f"{doc.fmt(self.mean)} [{doc.fmt(self.lo)}, {doc.fmt(self.hi)}]"

    def above(self, other: Interval | float) -> bool:
        """The whole interval lies above `other` (a number, or another interval's upper end)."""
        return self.lo > (other.hi if isinstance(other, Interval) else other)

    def below(self, other: Interval | float) -> bool:
        return self.hi < (other.lo if isinstance(other, Interval) else other)

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval of per-seed values (NaNs dropped)."""
    x = np.asarray([float(v) for v in values], np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    m = float(x.mean())
    if x.size == 1:
        return Interval(m, m, m, 1)
    half = T975.get(x.size - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(m, m - half, m + half, int(x.size))


def _numeric(c: object) -> bool:
    return isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))


def merge_tables(tables: Sequence[doc.Table], where: str = "") -> doc.Table:
    """Cell-wise merge of the same table from several seeds: numbers that differ become intervals;
    cells equal in every seed (settings, text) stay as they are; text must agree."""
    first = tables[0]
    for k, t in enumerate(tables[1:], 1):
        if t.headers != first.headers or len(t.rows) != len(first.rows):
            raise ValueError(f"{where}: table of seed #{k} has another shape than seed #0's")
    rows = []
    for i, row in enumerate(first.rows):
        cells = []
        for j, c in enumerate(row):
            column = [t.rows[i][j] for t in tables]
            if all(x == c for x in column):  # a setting (β, a count) or text: the same in every seed
                cells.append(c)
            elif all(_numeric(x) for x in column):
                cells.append(t_interval(column))
            else:
                raise ValueError(f"{where}: row {i} column {first.headers[j]!r} differs between seeds")
        rows.append(cells)
    return doc.Table(first.headers, rows, first.caption)


def merge_reports(
    reports: Sequence[doc.Report],
    seeds: Sequence[int],
    verdicts: Callable[[Mapping[str, Interval]], dict[str, doc.Verdict]],
) -> doc.Report:
    """One report from per-seed reports of one experiment (same sections and tables).

    Tables: mean [95% t-interval]; figures and text: the first seed's (captions say which seed);
    numbers: intervals; verdicts: `verdicts(numbers)` maps a section title to the verdict that ends it
    (the first entry is the report's own verdict).
    """
    first = reports[0]
    if len(seeds) > 1:
        note = (
            f"Seeds {', '.join(map(str, seeds))}: every number is the mean over the {len(seeds)} seeds and "
            f"its {INTERVAL_KIND}, written mean [lo, hi]. Verdicts are computed from these intervals; "
            "figures show the first seed."
        )
    else:
        note = f"One seed ({seeds[0]}): point estimates, no intervals; verdicts read them as exact."
    out = doc.Report(first.title, intro=f"{first.intro}\n\n{note}", meta=dict(first.meta))
    out.run_dirs = dict(first.run_dirs)
    for n, sec in enumerate(first.sections):
        items: list[doc.Table | doc.Figure | str] = []
        for m, it in enumerate(sec.items):
            if isinstance(it, doc.Table):
                items.append(merge_tables([r.sections[n].items[m] for r in reports], where=sec.title))
            elif isinstance(it, doc.Figure):
                items.append(dataclasses.replace(it, caption=f"{it.caption} (seed {seeds[0]})"))
            else:
                items.append(it)
        out.sections.append(doc.Section(sec.title, sec.text, items, sec.level))
    keys = set().union(*(r.numbers for r in reports))
    out.numbers = {k: t_interval([r.numbers.get(k, float("nan")) for r in reports]) for k in sorted(keys)}
    found = verdicts(out.numbers)
    titles = {s.title: s for s in out.sections}
    for title, v in found.items():
        if title not in titles:
            raise ValueError(f"verdict for unknown section {title!r}; sections: {list(titles)}")
        titles[title].verdict = v
    out.verdict = next(iter(found.values()), None)
    out.meta["seeds"] = ", ".join(map(str, seeds))
    out.meta.pop("seed", None)
    return out


BOOTSTRAP_KIND = (
    "95% percentile interval of a two-level bootstrap (seeds resampled with replacement, then each drawn "
    "seed's items), which stays inside the metric's range"
)


def bootstrap_interval(
    stat: Callable[[int, np.ndarray], np.ndarray],
    n_items: Sequence[int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean over seeds of a per-seed statistic of weighted items, and its two-level bootstrap interval.

    stat(s, W_KI) -> [K]: seed s's statistic under K rows of item weights (multiplicities) over its
    n_items[s] items (prompts); all-ones weights give the point estimate. Each bootstrap draw resamples
    the seeds with replacement, then every drawn seed's items (multinomial counts), and averages the
    seeds' statistics; the interval is the (1 − level)/2 and (1 + level)/2 percentiles of the draws.
    A statistic bounded in [0, 1] (accuracy, AUROC) keeps its interval in [0, 1]; a paired difference
    is a statistic of its own (both arms under the same weights). `Interval.n` is the number of items
    over all seeds (so one seed still shows its item interval). NaN draws (e.g. no positive item) drop.
    """
    S = len(n_items)
    if S == 0 or min(n_items) < 1:
        raise ValueError(f"bootstrap_interval: need seeds with items, got {list(n_items)}")
    with warnings.catch_warnings():  # a seed without positives (say) is NaN and left out, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        point = float(np.nanmean([stat(s, np.ones((1, n)))[0] for s, n in enumerate(n_items)]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), np.int64)
    vals = np.empty(picks.shape, np.float64)
    for s, n in enumerate(n_items):
        rows, cols = np.nonzero(picks == s)
        if rows.size:
            W = rng.multinomial(n, np.full(n, 1.0 / n), size=rows.size).astype(np.float64)
            vals[rows, cols] = np.asarray(stat(s, W), np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        draws = np.nanmean(vals, axis=1)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0 or not math.isfinite(point):
        return Interval(point, float("nan"), float("nan"), int(sum(n_items)))
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return Interval(point, float(lo), float(hi), int(sum(n_items)))


def weighted_mean_stat(values: Sequence[np.ndarray]) -> Callable[[int, np.ndarray], np.ndarray]:
    """stat for `bootstrap_interval`: seed s's weighted mean of its per-item values (NaN items skipped)."""
    xs = [np.asarray(v, np.float64) for v in values]

    def stat(s: int, W: np.ndarray) -> np.ndarray:
        x = xs[s]
        ok = np.isfinite(x)
        with np.errstate(all="ignore"):
            return (W[:, ok] @ x[ok]) / W[:, ok].sum(axis=1)

    return stat
