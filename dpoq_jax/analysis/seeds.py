"""One experiment over several seeds: mean and 95% interval per number, tables merged cell-wise.

Every seed runs the whole experiment (its own data, initialisation and sampling) and builds the same
report; `merge_reports` turns the per-seed reports into one whose numeric table cells read
"mean [lo, hi]" and whose verdicts come from those intervals (the experiment's `verdicts` function over
`Report.numbers`). A statistic of held-out items (`Items`) gets the wider of the seed-level t-interval
and the two-level bootstrap, clipped to its range (`wider_interval`); other numbers the t-interval over
seeds (df = seeds − 1).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
WIDER_KIND = (
    "the wider of two 95% intervals, clipped to the statistic's range: the seed-level Student-t interval "
    "(df = seeds − 1) and the percentile interval of a two-level bootstrap (seeds, then items, resampled)"
)
BOOTSTRAP_KIND = (
    "95% percentile interval of a two-level bootstrap (seeds resampled with replacement, then each drawn "
    "seed's items), which stays inside the metric's range"
)


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of n seeds and its 95% t-interval; with one seed lo = hi = mean (a point estimate)."""

    mean: float
    lo: float
    hi: float
    n: int
    # the per-seed values (t_interval, wider_interval): a zero-width interval is written as them
    values: tuple[float, ...] = dataclasses.field(default=(), compare=False)
    # wider_interval: the seed-level t-interval and the two-level bootstrap interval it took the wider of
    parts: tuple[Interval, Interval] | None = dataclasses.field(default=None, compare=False)
    # "max": a `Maximum` merged over seeds: mean = lo = hi = the largest per-seed value, no interval
    kind: str = dataclasses.field(default="mean", compare=False)

    def __str__(self) -> str:
        if self.kind == "max" and self.n > 1:
            return f"{doc.fmt(self.mean)} (largest of {self.n} seeds: {_seed_values(self.values)})"
        if self.n < 2 or not math.isfinite(self.lo):
            return doc.fmt(self.mean)
        if self.lo == self.hi and len(self.values) > 1:  # no spread at all: say so, not "[x, x]"
            return f"{doc.fmt(self.mean)} (each of {len(self.values)} seeds: {_seed_values(self.values)})"
        return f"{doc.fmt(self.mean)} [{doc.fmt(self.lo)}, {doc.fmt(self.hi)}]"

    def detail(self) -> str:
        """The interval and, for a wider_interval, both intervals it came from."""
        if self.parts is None:
            return str(self)
        t, b = self.parts
        return f"{self} (seed t {t.span()}, bootstrap {b.span()})"

    def span(self) -> str:
        """The interval alone, "[lo, hi]"."""
        return f"[{doc.fmt(self.lo)}, {doc.fmt(self.hi)}]"

    def above(self, other: Interval | float) -> bool:
        """The whole interval lies above `other` (a number, or another interval's upper end)."""
        return self.lo > (other.hi if isinstance(other, Interval) else other)

    def below(self, other: Interval | float) -> bool:
        return self.hi < (other.lo if isinstance(other, Interval) else other)

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def _seed_values(values: Sequence[float]) -> str:
    return doc.fmt(values[0]) if len(set(values)) == 1 else ", ".join(doc.fmt(v) for v in values)


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
    return Interval(m, m - half, m + half, int(x.size), values=tuple(float(v) for v in x))


@dataclasses.dataclass(frozen=True, eq=False)
class Items:
    """One seed's statistic of its items (held-out prompts or responses), kept whole so that
    `merge_reports` gives it a two-level bootstrap interval over seeds and items (`bootstrap_interval`):
    an accuracy, a win rate or an AUROC keeps its interval inside [0, 1], and a paired difference
    (`a - b`, both over the same items) gets its own interval. A table cell or a `Report.numbers`
    value; `float(items)` is the statistic itself (all weights one).

    kinds: "mean" (parts = (values,), one per item; NaN = not applicable, skipped); "auroc" (parts =
    (scores, labels, item of each scored unit): AUROC of the pooled units, each weighted by its item's
    multiplicity, e.g. the tokens of a response); "pearson" (parts = (x, y, item of each unit): the
    weighted Pearson correlation of the pooled units); "diff" (parts = (a, b): a − b under the same
    weights).
    """

    kind: str
    parts: tuple
    n: int

    @classmethod
    def mean(cls, values: Sequence[float]) -> Items:
        x = np.asarray(values, np.float64).ravel()
        if x.size == 0:
            raise ValueError("Items.mean: no items")
        return cls("mean", (x,), int(x.size))

    @classmethod
    def auroc(cls, scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]]) -> Items:
        """AUROC of `scores` detecting `labels`, pooled over items (one score/label array per item)."""
        if len(scores) != len(labels) or not scores:
            raise ValueError(f"Items.auroc: {len(scores)} score arrays and {len(labels)} label arrays")
        s = np.concatenate([np.asarray(x, np.float64).ravel() for x in scores])
        y = np.concatenate([np.asarray(x, bool).ravel() for x in labels])
        item = np.repeat(np.arange(len(scores)), [np.size(x) for x in scores])
        if s.shape != y.shape:
            raise ValueError(f"Items.auroc: {s.size} scores but {y.size} labels")
        _, rank = np.unique(s, return_inverse=True)  # equal scores share a rank: ties count one half
        return cls("auroc", (rank.ravel(), y, item), len(scores))

    @classmethod
    def pearson(
        cls,
        xs: Sequence[Sequence[float]],
        ys: Sequence[Sequence[float]],
        item_of: Sequence[int] | None = None,
    ) -> Items:
        """Pearson correlation of the pooled units (e.g. tokens) of xs and ys, one array pair per group;
        item_of[g] is group g's item (default: each group its own item), so e.g. both responses of a
        pair resample together."""
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"Items.pearson: {len(xs)} x arrays and {len(ys)} y arrays")
        x = np.concatenate([np.asarray(a, np.float64).ravel() for a in xs])
        y = np.concatenate([np.asarray(b, np.float64).ravel() for b in ys])
        if x.shape != y.shape:
            raise ValueError(f"Items.pearson: {x.size} x values but {y.size} y values")
        owner = np.arange(len(xs)) if item_of is None else np.asarray(item_of, np.int64)
        item = np.repeat(owner, [np.size(a) for a in xs])
        return cls("pearson", (x, y, item), int(owner.max()) + 1)

    def bounds(self) -> tuple[float, float]:
        """The values the statistic can take under any item weights: a mean stays inside its items'
        range, an AUROC inside [0, 1], a correlation inside [−1, 1], a difference between its parts'
        ends (an interval for it is clipped to these)."""
        if self.kind == "mean":
            (x,) = self.parts
            x = x[np.isfinite(x)]
            return (float(x.min()), float(x.max())) if x.size else (float("nan"), float("nan"))
        if self.kind == "auroc":
            return 0.0, 1.0
        if self.kind == "pearson":
            return -1.0, 1.0
        if self.kind == "diff":
            (alo, ahi), (blo, bhi) = (p.bounds() for p in self.parts)
            return alo - bhi, ahi - blo
        raise ValueError(f"Items: unknown kind {self.kind!r}")

    def __sub__(self, other: Items) -> Items:
        if not isinstance(other, Items) or other.n != self.n:
            raise ValueError(f"a paired difference needs two Items over the same {self.n} items")
        return Items("diff", (self, other), self.n)

    def stat(self, W: np.ndarray) -> np.ndarray:
        """The statistic under K rows of item weights W [K, n] -> [K]."""
        W = np.asarray(W, np.float64)
        with np.errstate(all="ignore"):
            if self.kind == "mean":
                (x,) = self.parts
                ok = np.isfinite(x)
                return (W[:, ok] @ x[ok]) / W[:, ok].sum(axis=1)
            if self.kind == "auroc":
                rank, y, item = self.parts
                G, out = int(rank.max()) + 1, np.empty(len(W))
                for k, w in enumerate(W):
                    wu = w[item]
                    pos, neg = np.bincount(rank, wu * y, G), np.bincount(rank, wu * ~y, G)
                    tot = pos.sum() * neg.sum()
                    out[k] = np.sum(pos * (np.cumsum(neg) - 0.5 * neg)) / tot if tot > 0 else np.nan
                return out
            if self.kind == "pearson":
                x, y, item = self.parts
                wu = W[:, item]  # [K, units]
                tot = wu.sum(axis=1, keepdims=True)
                dx = x - (wu @ x)[:, None] / tot
                dy = y - (wu @ y)[:, None] / tot
                return np.sum(wu * dx * dy, 1) / np.sqrt(np.sum(wu * dx * dx, 1) * np.sum(wu * dy * dy, 1))
            if self.kind == "diff":
                a, b = self.parts
                return a.stat(W) - b.stat(W)
        raise ValueError(f"Items: unknown kind {self.kind!r}")

    def __float__(self) -> float:
        return float(self.stat(np.ones((1, self.n)))[0])

    def __str__(self) -> str:
        return doc.fmt(float(self))


@dataclasses.dataclass(frozen=True)
class Maximum:
    """One seed's largest value of something (e.g. the largest exact value over tokens, which must not
    be positive): merged as the largest over seeds, with the per-seed values, not as a mean with an
    interval (a t-interval around a mean of maxima says nothing about the largest)."""

    value: float

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        return doc.fmt(float(self))


def maximum_over_seeds(per_seed: Sequence[Maximum]) -> Interval:
    x = [float(v) for v in per_seed]
    m = max(x)
    return Interval(m, m, m, len(x), values=tuple(x), kind="max")


def items_interval(per_seed: Sequence[Items], n_boot: int = 1000) -> Interval:
    """The two-level bootstrap interval of one statistic over seeds (one Items per seed)."""
    return bootstrap_interval(lambda s, W: per_seed[s].stat(W), [c.n for c in per_seed], n_boot=n_boot)


def wider_interval(per_seed: Sequence[Items], n_boot: int = 1000) -> Interval:
    """A held-out statistic over seeds as verdicts read it: the wider of its two-level bootstrap interval
    and the seed-level t-interval of the per-seed statistics, clipped to the statistic's range
    (Items.bounds). The percentile bootstrap alone under-covers when seed-to-seed variance dominates
    (simulated at 36 items a seed: 79–83% at 3 seeds, 86–88% at 5, for a nominal 95%); the t-interval
    alone can leave the range. One seed: the bootstrap over its items."""
    ends = np.array([x.bounds() for x in per_seed])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo_end, hi_end = np.nanmin(ends[:, 0]), np.nanmax(ends[:, 1])
    return widen(items_interval(per_seed, n_boot), [float(x) for x in per_seed], (lo_end, hi_end))


def wider_stat_interval(
    stat: Callable[[int, np.ndarray], np.ndarray],
    n_items: Sequence[int],
    bounds: tuple[float, float] = (math.nan, math.nan),
    n_boot: int = 1000,
) -> Interval:
    """wider_interval for a bootstrap statistic (bootstrap_interval's stat(s, W)): the wider of its
    two-level bootstrap interval and the seed-level t-interval of the per-seed values stat(s, ones),
    clipped to bounds (NaN: that end unbounded), e.g. (0, 1) for a rate, (−1, 1) for their difference."""
    with warnings.catch_warnings():  # a seed without positives (say) is NaN and left out, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        per_seed = [float(stat(s, np.ones((1, n)))[0]) for s, n in enumerate(n_items)]
    return widen(bootstrap_interval(stat, n_items, n_boot=n_boot), per_seed, bounds)


def widen(boot: Interval, per_seed: Sequence[float], bounds: tuple[float, float]) -> Interval:
    """The wider of a bootstrap interval and the seed-level t-interval of per_seed, clipped to bounds
    (a non-finite end: not clipped); `parts` keeps both. Fewer than two finite seeds: boot."""
    t = t_interval(per_seed)
    if t.n < 2 or not (math.isfinite(boot.lo) and math.isfinite(t.lo)):
        return boot
    lo, hi = min(boot.lo, t.lo), max(boot.hi, t.hi)
    if math.isfinite(bounds[0]):
        lo = max(lo, float(bounds[0]))
    if math.isfinite(bounds[1]):
        hi = min(hi, float(bounds[1]))
    return Interval(boot.mean, lo, hi, boot.n, values=t.values, parts=(t, boot))


def _numeric(c: object) -> bool:
    return isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))


MISSING = "–"  # a table cell with no value in this seed (not applicable)


def merge_tables(tables: Sequence[doc.Table], where: str = "") -> doc.Table:
    """Cell-wise merge of the same table from several seeds: numbers that differ become intervals;
    cells equal in every seed (settings, text) stay as they are; text must agree. A column of Items
    with MISSING in some seeds merges the seeds that have a value."""
    first = tables[0]
    for k, t in enumerate(tables[1:], 1):
        if t.headers != first.headers or len(t.rows) != len(first.rows):
            raise ValueError(f"{where}: table of seed #{k} has another shape than seed #0's")
    rows = []
    for i, row in enumerate(first.rows):
        cells = []
        for j, c in enumerate(row):
            column = [t.rows[i][j] for t in tables]
            if all(isinstance(x, Items) for x in column):
                cells.append(wider_interval(column))
            elif any(isinstance(x, Items) for x in column) and all(
                isinstance(x, Items) or (isinstance(x, str) and x == MISSING) for x in column
            ):
                # not applicable in some seeds (e.g. no pair of a kind formed): the seeds that have it
                cells.append(wider_interval([x for x in column if isinstance(x, Items)]))
            elif all(isinstance(x, Maximum) for x in column):
                cells.append(maximum_over_seeds(column))
            elif all(x == c for x in column):  # a setting (β, a count) or text: the same in every seed
                cells.append(c)
            elif all(_numeric(x) for x in column):
                cells.append(t_interval(column))
            else:
                raise ValueError(f"{where}: row {i} column {first.headers[j]!r} differs between seeds")
        rows.append(cells)
    return doc.Table(first.headers, rows, first.caption)


def merge_number(per_seed: Sequence[object]) -> Interval:
    """Items in every seed: wider_interval (bootstrap and seed-t); Maximum: the largest over seeds;
    plain numbers: the t-interval."""
    if all(isinstance(x, Items) for x in per_seed):
        return wider_interval(per_seed)
    if all(isinstance(x, Maximum) for x in per_seed):
        return maximum_over_seeds(per_seed)
    for kind in (Items, Maximum):
        if any(isinstance(x, kind) for x in per_seed):
            raise ValueError(f"a number is {kind.__name__} in some seeds and a plain number in others")
    return t_interval(per_seed)


def merge_reports(
    reports: Sequence[doc.Report],
    seeds: Sequence[int],
    verdicts: Callable[[Mapping[str, Interval]], dict[str, doc.Verdict]],
) -> doc.Report:
    """One report from per-seed reports of one experiment (same sections and tables).

    Tables: statistics of held-out items (`Items` cells: accuracies, AUROCs, win rates, paired
    differences) get the two-level bootstrap interval over seeds and items, other numbers (training-curve
    means, settings that vary) the 95% t-interval over seeds; figures and text: the first seed's (captions
    say which seed); numbers: intervals the same way; verdicts: `verdicts(numbers)` maps a section title
    to the verdict that ends it (the first entry is the report's own verdict).
    """
    first = reports[0]
    has_items = any(isinstance(v, Items) for v in first.numbers.values()) or any(
        isinstance(c, Items)
        for sec in first.sections
        for it in sec.items
        if isinstance(it, doc.Table)
        for row in it.rows
        for c in row
    )
    if len(seeds) > 1 and has_items:
        note = (
            f"Seeds {', '.join(map(str, seeds))}: every number is the mean over the {len(seeds)} seeds, "
            "written mean [lo, hi]; statistics of held-out items (accuracies, AUROCs, win rates, gold scores "
            f"and their paired differences) with {WIDER_KIND}; the others (training-curve "
            f"values) with the {INTERVAL_KIND}. Verdicts are computed from these intervals; a number with no "
            "spread at all is written as the seeds' value; figures show the first seed."
        )
    elif len(seeds) > 1:
        note = (
            f"Seeds {', '.join(map(str, seeds))}: every number is the mean over the {len(seeds)} seeds and "
            f"its {INTERVAL_KIND}, written mean [lo, hi]. Verdicts are computed from these intervals; "
            "figures show the first seed."
        )
    elif has_items:
        note = (
            f"One seed ({seeds[0]}): statistics of held-out items carry their item-level bootstrap interval "
            "(prompts resampled); other numbers are point estimates."
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
    out.numbers = {k: merge_number([r.numbers.get(k, float("nan")) for r in reports]) for k in sorted(keys)}
    found, out.inputs = judge(verdicts, out.numbers)
    titles = {s.title: s for s in out.sections}
    for title, v in found.items():
        if title not in titles:
            raise ValueError(f"verdict for unknown section {title!r}; sections: {list(titles)}")
        titles[title].verdict = v
    out.verdict = next(iter(found.values()), None)
    out.meta["seeds"] = ", ".join(map(str, seeds))
    out.meta.pop("seed", None)
    return out




class _Reads(dict):
    """A dict that remembers which keys were read (n[k] or n.get(k)), in order."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if key not in self.read:
            self.read.append(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


def judge(
    verdicts: Callable[[Mapping[str, Any]], dict[str, doc.Verdict]], numbers: Mapping[str, Any]
) -> tuple[dict[str, doc.Verdict], doc.Table]:
    """verdicts(numbers), and a table of every number it read (in the order read): as judged, and the
    seed-level t and two-level bootstrap intervals of a wider_interval ("—" for a number without both)."""
    seen = _Reads(numbers)
    found = verdicts(seen)
    rows = []
    for k in seen.read:
        v = numbers[k]
        parts = v.parts if isinstance(v, Interval) else None
        rows.append([k, str(v), *((parts[0].span(), parts[1].span()) if parts else ("—", "—"))])
    return found, doc.Table(["number", "as judged", "seed-level t", "two-level bootstrap"], rows)


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
