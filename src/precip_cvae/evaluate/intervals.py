"""Paired bootstrap intervals of the headline scores, and of the ratios source / baseline.

Every headline score is a function of sums over days (the CRPS is a sum of per-point scores
over a count of points, the FSS one minus a ratio of two sums, the frequency bias and CSI
ratios of contingency counts, ...).  So a bootstrap over days, or over blocks of days, only
needs each day's *additive components*: :func:`day_components` computes them once per source
(an (N, k) array per score), :func:`bootstrap` sums them per block, resamples the blocks and
applies :func:`finish` to the resampled sums.  Summing the components over any set of days and
applying :func:`finish` gives what :func:`precip_cvae.evaluate.score.score` returns on those
days (to rounding), so the point value and the bootstrap replicates are the same scores that
``metrics.csv`` reports.

Components (per day, columns of the (N, k) array)
-------------------------------------------------
========================== ======================================================================
score                      components
========================== ======================================================================
``crps``, ``twcrps_<p>``   sum of the per-point (fair) score over valid points, count of valid points
``mae_all``                sum of abs. error of the ensemble mean over valid points, count
``mae_tail_<p>``           sum of abs. error of the ensemble mean over the valid pixels where the
                           truth is above the threshold, count of those pixels (``metrics.mae_tail``
                           pools the extreme pixels of all days: one mean over all of them)
``mass_error_mae`` /       sum over members of abs. (signed) relative mass error where it is
``mass_error_bias``        defined, count of such members (``score`` takes a NaN-mean over members
                           and days)
``fss_<p>_w<w>``           sum over valid pixels of (Pf - Po)^2, of Pf^2 + Po^2 (FSS = 1 - ratio)
``freq_bias_<p>``          member-mean count of forecast exceedances, count of observed ones
``csi_<hi>``, ``pod_<hi>``, hits, misses, false alarms of the member-pooled table (each the mean over
``far_<hi>``               members of that member's count), at the upper threshold only
``spread_skill``           (M+1)/M x sum of the member variance (ddof=1), sum of squared error of the
                           ensemble mean, count of valid points (ratio = sqrt(first / second))
``crps_field``             the (fair) CRPS of the domain mean (mean over the valid points), 1 (0 on a
                           day without valid point): the rain over the whole domain
``spread_skill_field``     as ``spread_skill`` for the domain means, count 1: members that scatter
                           their rain independently over the cells have the right spread per point
                           and too little for the domain
``tail_q99_ratio``         histograms of the wet values (>= the wet threshold) on :data:`WET_EDGES`:
                           the members' (pooled over members), then the truth's, each
                           ``WET_BINS + 1`` columns (the last counts values beyond the top edge)
========================== ======================================================================

``tail_q99_ratio`` (P99 of the members' wet values / that of the truth, i.e. ``tail_q99_ens /
tail_q99_obs`` of ``score``) is not additive: it is taken from the summed histograms.  Each of
the two order statistics ``np.quantile`` interpolates between is placed inside its bin (linear
in rank), so it lies in the same bin as the exact one and is off by less than the bin's relative
width ``r`` (:data:`WET_BIN_WIDTH`, 0.213 % for 4000 bins over a factor 5000); the interpolated
quantile is then within a factor ``1 + r`` of ``np.quantile``'s and the ratio within a factor
``(1 + r)^2``: relative error below :data:`TAIL_RATIO_TOLERANCE` (0.43 %).  A quantile beyond the
top edge (5000 times the wet threshold: 5000 mm day-1 for 1 mm day-1, far beyond any observed
daily total) is NaN.

Blocks
------
``block='day'`` resamples days; ``block='season'`` resamples whole meteorological seasons (DJF,
MAM, JJA, SON of each year, :func:`block_labels`): the days of a season stay together, which keeps
the day-to-day persistence of rain (a wet spell is one draw, not several independent ones) and
each season's own mix of days.  Meteorological seasons rather than whole years because a test
period of five years would give five blocks, far too few for a bootstrap; its twenty seasons are
usable, and a season is much longer than the few days over which precipitation stays correlated.
"""

from __future__ import annotations

import logging
import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from .. import metrics
from ..config import EvaluateConfig
from .names import AREAL_METRICS, headline_metrics

log = logging.getLogger(__name__)

#: number of log-spaced bins of the wet-value histograms of ``tail_q99_ratio``
WET_BINS = 4000
#: top edge of the histograms, in multiples of the wet threshold (5000 mm day-1 for 1 mm day-1)
WET_TOP = 5000.0
#: bin edges of the wet-value histograms, in multiples of the wet threshold: (WET_BINS + 1,)
WET_EDGES = np.geomspace(1.0, WET_TOP, WET_BINS + 1)
WET_EDGES.flags.writeable = False
#: relative width of one bin, upper / lower edge - 1 (the same for every bin)
WET_BIN_WIDTH = float(np.max(WET_EDGES[1:] / WET_EDGES[:-1]) - 1.0)
#: bound on |tail_q99_ratio from the histograms / exact ratio - 1|: (1 + r)^2 - 1
TAIL_RATIO_TOLERANCE = (1.0 + WET_BIN_WIDTH) ** 2 - 1.0
#: quantile level of ``tail_q99_ratio`` (``score``'s ``tail_q99_ens`` / ``tail_q99_obs``)
TAIL_LEVEL = 0.99

#: the block kinds of :func:`block_labels`
BLOCKS = ("day", "season")
#: how a December is assigned a year in :func:`block_labels` (block='season')
SEASON_YEARS = ("djf", "calendar")
#: bootstrap interval methods accepted by :func:`bootstrap` (passed to ``scipy.stats.bootstrap``)
METHODS = ("percentile", "BCa")
#: columns of the table :func:`bootstrap` returns
INTERVAL_COLUMNS = ["source", "baseline", "metric", "statistic", "value", "lower", "upper", "n_blocks", "block",
                    "confidence"]
#: the ``statistic`` column: the score itself, score(source) / score(baseline), or the paired
#: difference of :func:`bootstrap`'s ``contrasts`` (source minus baseline)
STATISTICS = ("score", "ratio", "difference")

_SEASON_OF_MONTH = {12: "DJF", 1: "DJF", 2: "DJF", 3: "MAM", 4: "MAM", 5: "MAM",
                    6: "JJA", 7: "JJA", 8: "JJA", 9: "SON", 10: "SON", 11: "SON"}
_METRIC_FORMS = ("crps", "twcrps_<p>", "mae_all", "mae_tail_<p>", "mass_error_mae", "mass_error_bias",
                 "fss_<p>_w<w>", "freq_bias_<p>", "csi_<p>", "pod_<p>", "far_<p>", "spread_skill", "crps_field",
                 "spread_skill_field", "tail_q99_ratio")


# ----------------------------------------------------------------------------- names


def headline_interval_metrics(cfg: EvaluateConfig) -> list[str]:
    """The scores to bootstrap: the headline ones (:func:`.names.headline_metrics`), ``tail_q99_ratio`` and the
    domain mean's CRPS and spread/skill (:data:`.names.AREAL_METRICS`)."""
    return [m for m, _, _ in headline_metrics(cfg)] + ["tail_q99_ratio"] + [m for m, _, _ in AREAL_METRICS]


def available_metrics(percentiles: Sequence[str], windows: Sequence[int]) -> list[str]:
    """Every score :func:`day_components` can decompose, for threshold names ``(lo, hi)`` and FSS windows."""
    hi = percentiles[-1]
    out = ["crps", *(f"twcrps_{p}" for p in percentiles), "mae_all", *(f"mae_tail_{p}" for p in percentiles),
           "mass_error_mae", "mass_error_bias"]
    out += [f"fss_{p}_w{int(w)}" for p in percentiles for w in windows]
    out += [f"freq_bias_{p}" for p in percentiles] + [f"csi_{hi}", f"pod_{hi}", f"far_{hi}"]
    return out + ["spread_skill", "crps_field", "spread_skill_field", "tail_q99_ratio"]


def _kind(metric: str) -> str:
    """Which :func:`finish` formula a score name takes."""
    if metric in ("crps", "mae_all", "mass_error_mae", "mass_error_bias", "crps_field") or metric.startswith(
            ("twcrps_", "mae_tail_")):
        return "mean"
    for prefix in ("fss_", "freq_bias_", "csi_", "pod_", "far_"):
        if metric.startswith(prefix):
            return prefix[:-1]
    if metric in ("spread_skill", "tail_q99_ratio"):
        return metric
    if metric == "spread_skill_field":
        return "spread_skill"
    raise ValueError(f"no day components for metric {metric!r}; known forms: {', '.join(_METRIC_FORMS)}")


# ----------------------------------------------------------------------------- components


class FoldMaps:
    """Per-day threshold maps of a pooled ``kfold_years`` cache without an (N, h, w) copy: each day's map is
    its fold's, looked up when a range of days is sliced (``maps[fold[start:stop]]``)."""

    def __init__(self, maps: np.ndarray, fold: np.ndarray):
        self.maps, self.fold = np.asarray(maps, dtype=np.float64), np.asarray(fold, dtype=int)
        self.ndim, self.shape = 3, (self.fold.size,) + self.maps.shape[1:]

    def __getitem__(self, days) -> np.ndarray:
        return self.maps[self.fold[days]]


def day_slice(thr, n_days: int, start: int, stop: int) -> np.ndarray:
    """Days ``start:stop`` of per-day (N, h, w) thresholds (an array or :class:`FoldMaps`); a (h, w) map (or a
    scalar) as it is."""
    if getattr(thr, "ndim", None) == 3:
        if thr.shape[0] != n_days:
            raise ValueError(f"per-day thresholds {tuple(thr.shape)} must have one map per day ({n_days})")
        return np.asarray(thr[start:stop], dtype=np.float64)
    return np.asarray(thr, dtype=np.float64)


def _sum_valid(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-day sum of ``x`` (c, h, w) over ``mask``; a NaN inside the mask propagates."""
    return np.where(mask, x, 0.0).sum(axis=(-2, -1))


def _wet_histograms(values: np.ndarray, mask: np.ndarray, wet_threshold: float) -> np.ndarray:
    """Per-day counts of the wet values on :data:`WET_EDGES` (+ overflow), pooled over leading axes.

    values : (..., c, h, w), mm day-1; mask : broadcastable, the pixels to pool.
    Returns int32 (c, WET_BINS + 1).
    """
    c = values.shape[-3]
    day = np.broadcast_to(np.arange(c)[:, None, None], values.shape)
    keep = mask & np.isfinite(values) & (values >= wet_threshold)
    rel = values[keep] / wet_threshold  # >= 1 exactly when value >= wet_threshold
    b = np.searchsorted(WET_EDGES, rel, side="right") - 1  # 0..WET_BINS; WET_BINS = beyond the top
    nb = WET_BINS + 1
    return np.bincount(day[keep] * nb + b, minlength=c * nb).reshape(c, nb).astype(np.int32)


def day_components(ens, obs, thresholds: Mapping[str, np.ndarray], windows: Sequence[int] = (1, 3, 9, 27),
                   wet_threshold: float = 1.0, chunk_days: int = 16,
                   which: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-day additive components of the scores of one ensemble (see the module docstring).

    Summing the rows over any set of days and applying :func:`finish` gives the score
    :func:`precip_cvae.evaluate.score.score` returns on those days.  Computed ``chunk_days``
    days at a time, like ``score``'s CRPS (the fair estimator holds an (M, M) array per point).

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1 (member axis first)
    obs : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    thresholds : {'p95': map, 'p99': map}, mm day-1 -- the (moderate, extreme) pair, each a
        (h, w) map, a scalar, or per-day maps (N, h, w)
    windows : FSS neighbourhood sides in pixels
    wet_threshold : mm day-1 (> 0), wet values for ``tail_q99_ratio``
    chunk_days : days per chunk (memory)
    which : the scores to decompose (names of :func:`available_metrics`); None = all of them

    Returns
    -------
    dict metric -> ndarray (N, k)
        float64 sums and counts; int32 histograms (N, 2 * (WET_BINS + 1)) for ``tail_q99_ratio``.
    """
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if ens.ndim != 4 or ens.shape[1:] != obs.shape:
        raise ValueError(f"ensemble {ens.shape} must be (M,) + obs shape {obs.shape} (obs (N, h, w))")
    if len(thresholds) != 2:
        raise ValueError(f"thresholds must hold the (moderate, extreme) pair, got {list(thresholds)}")
    if not wet_threshold > 0:
        raise ValueError(f"wet_threshold must be > 0 mm day-1, got {wet_threshold!r}")
    names = list(thresholds)
    hi = names[1]
    windows = [int(w) for w in windows]
    known = available_metrics(names, windows)
    wanted = known if which is None else list(dict.fromkeys(which))
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ValueError(f"day_components: unknown metrics {unknown}; valid: {', '.join(known)}")
    want = set(wanted)
    m, n = ens.shape[:2]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in wanted}

    def put(name, *cols):
        if name in want:
            parts[name].append(np.stack([np.asarray(c_, dtype=np.float64) for c_ in cols], axis=-1))

    for s in range(0, n, chunk_days):
        e = ens[:, s:s + chunk_days]  # (M, c, h, w)
        o = obs[s:s + chunk_days]  # (c, h, w)
        v = np.isfinite(o)
        cnt = v.sum(axis=(1, 2))
        thr = {p: day_slice(t, n, s, s + o.shape[0]) for p, t in thresholds.items()}
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN at excluded pixels is expected
            if "crps" in want:
                put("crps", _sum_valid(metrics.crps_ensemble(e, o), v), cnt)
            mean = e.mean(axis=0)
            err = np.abs(mean - o)
            put("mae_all", _sum_valid(err, v), cnt)
            for p, t in thr.items():
                if f"twcrps_{p}" in want:
                    put(f"twcrps_{p}", _sum_valid(metrics.twcrps_ensemble(e, o, t), v), cnt)
                tb = np.broadcast_to(t, o.shape)
                ext = v & (o > tb)  # observed exceedances on valid pixels
                fe = e > tb  # (M, c, h, w) forecast exceedances
                put(f"mae_tail_{p}", _sum_valid(err, ext), ext.sum(axis=(1, 2)))
                put(f"freq_bias_{p}", (fe & v).sum(axis=(2, 3)).mean(axis=0), ext.sum(axis=(1, 2)))
                if p == hi and want & {f"csi_{hi}", f"pod_{hi}", f"far_{hi}"}:
                    table = ((fe & ext).sum(axis=(2, 3)).mean(axis=0), (~fe & ext).sum(axis=(2, 3)).mean(axis=0),
                             (fe & ~ext & v).sum(axis=(2, 3)).mean(axis=0))
                    for name in (f"csi_{hi}", f"pod_{hi}", f"far_{hi}"):
                        put(name, *table)
                fss_names = [f"fss_{p}_w{w}" for w in windows]
                if want.intersection(fss_names):
                    pf = np.where(v, fe.mean(axis=0), 0.0)  # exceedance probability, as fss_ensemble
                    po = np.where(v, (o > tb).astype(np.float64), 0.0)
                    for w, name in zip(windows, fss_names):
                        if name in want:
                            ff = metrics._fractions(pf, v, w)
                            fo = metrics._fractions(po, v, w)
                            put(name, _sum_valid((ff - fo) ** 2, v), _sum_valid(ff ** 2 + fo ** 2, v))
            if "spread_skill" in want:
                if m >= 2:
                    var = np.var(e, axis=0, ddof=1)
                    put("spread_skill", (m + 1) / m * _sum_valid(var, v), _sum_valid((mean - o) ** 2, v), cnt)
                else:  # undefined for one member, as metrics.spread_skill_ratio
                    nan = np.full(o.shape[0], np.nan)
                    put("spread_skill", nan, nan, cnt)
            if want & {"crps_field", "spread_skill_field"}:
                some = cnt > 0
                per = np.maximum(cnt, 1)
                dm_o = np.where(some, _sum_valid(o, v) / per, 0.0)  # (c,)
                dm_e = np.where(some, _sum_valid(e, v[None]) / per, 0.0)  # (M, c)
                one = some.astype(np.float64)
                if "crps_field" in want:
                    put("crps_field", np.where(some, metrics.crps_ensemble(dm_e, dm_o), 0.0), one)
                if "spread_skill_field" in want:
                    if m >= 2:
                        put("spread_skill_field", (m + 1) / m * np.var(dm_e, axis=0, ddof=1),
                            (dm_e.mean(axis=0) - dm_o) ** 2, one)
                    else:
                        nan = np.full(o.shape[0], np.nan)
                        put("spread_skill_field", nan, nan, one)
            if want & {"mass_error_mae", "mass_error_bias"}:
                me = metrics.mass_error(e, o)  # (M, c)
                ok = np.isfinite(me)
                put("mass_error_mae", np.where(ok, np.abs(me), 0.0).sum(axis=0), ok.sum(axis=0))
                put("mass_error_bias", np.where(ok, me, 0.0).sum(axis=0), ok.sum(axis=0))
            if "tail_q99_ratio" in want:
                parts["tail_q99_ratio"].append(np.concatenate(
                    [_wet_histograms(e, v[None], wet_threshold), _wet_histograms(o, v, wet_threshold)], axis=1))
    return {k: np.concatenate(p, axis=0) for k, p in parts.items()}


# ----------------------------------------------------------------------------- finish


def _ratio(num, den):
    """num / den where den > 0, else NaN (as metrics._safe_ratio), elementwise."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ranks(total: np.ndarray, q: float):
    """0-based ranks of the two order statistics ``np.quantile`` (linear) interpolates, and the weight."""
    pos = np.maximum(total - 1.0, 0.0) * q
    lo = np.floor(pos)
    return lo, np.minimum(lo + 1.0, np.maximum(total - 1.0, 0.0)), pos - lo


def _in_bin(j: np.ndarray, c_j: np.ndarray, before: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The value of ``rank`` in bin ``j`` (``c_j`` values, ``before`` in lower bins), in edge units.

    The k-th of the c values of a bin is put at (k + 0.5) / c of its width; NaN beyond the top edge.
    """
    jc = np.minimum(j, WET_BINS - 1)
    left, right = WET_EDGES[jc], WET_EDGES[jc + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = left + (right - left) * (rank - before + 0.5) / c_j
    return np.where(j >= WET_BINS, np.nan, x)


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """``np.quantile(values, q)`` (linear) from counts on :data:`WET_EDGES` (+ overflow), in edge units.

    hist : (..., WET_BINS + 1) counts.  Each of the two order statistics is placed inside its bin
    (:func:`_in_bin`), so it is off by less than the bin's relative width; NaN without values or
    when an order statistic lies beyond the top edge.
    """
    h = np.asarray(hist, dtype=np.float64)
    cum = np.cumsum(h, axis=-1)
    total = cum[..., -1]
    lo, hi, frac = _ranks(total, q)

    def order_stat(rank):
        j = np.sum(cum <= rank[..., None], axis=-1)  # the bin holding the value of this rank
        jc = np.minimum(j, WET_BINS)[..., None]
        c_j = np.take_along_axis(h, jc, axis=-1)[..., 0]
        return _in_bin(j, c_j, np.take_along_axis(cum, jc, axis=-1)[..., 0] - c_j, rank)

    with np.errstate(invalid="ignore"):
        out = order_stat(lo) * (1.0 - frac) + order_stat(hi) * frac
    return np.where(total > 0, out, np.nan)


#: fine bins per coarse group in :func:`_resampled_hist_quantile`
_GROUP = 64


def _coarse(h: np.ndarray) -> np.ndarray:
    """Block histograms (B, WET_BINS + 1) summed over groups of :data:`_GROUP` bins: float64 (B, G)."""
    return np.add.reduceat(h, np.arange(0, h.shape[1], _GROUP), axis=1, dtype=np.float64)


def _resampled_hist_quantile(counts: np.ndarray, h: np.ndarray, coarse: np.ndarray, q: float) -> np.ndarray:
    """``hist_quantile(counts @ h, q)`` without forming ``counts @ h`` (R, WET_BINS + 1).

    The coarse cumulative counts (``counts @ coarse``) find the group of bins holding each order
    statistic; only that group's fine bins are then resampled (one small product per distinct
    group, a handful since the quantile barely moves between replicates).  Same integers, same
    formula: the same numbers as :func:`hist_quantile`, at a fraction of the cost.

    counts : (R, B) block counts of the replicates; h : (B, WET_BINS + 1) block histograms;
    coarse : :func:`_coarse` of ``h``.  Returns (R,), in edge units.
    """
    cc = counts @ coarse  # (R, G)
    cum_c = np.cumsum(cc, axis=1)
    total = cum_c[:, -1]
    lo, hi, frac = _ranks(total, q)
    n_groups, nb = coarse.shape[1], h.shape[1]

    def order_stat(rank):
        g = np.minimum(np.sum(cum_c <= rank[:, None], axis=1), n_groups - 1)  # group holding the rank
        rows_all = np.arange(len(rank))
        start_g = cum_c[rows_all, g] - cc[rows_all, g]  # values below group g
        out = np.full(len(rank), np.nan)
        for gi in np.unique(g):
            rows = np.flatnonzero(g == gi)
            cols = slice(gi * _GROUP, min((gi + 1) * _GROUP, nb))
            fine = counts[rows] @ np.asarray(h[:, cols], dtype=np.float64)  # (r, <= _GROUP)
            cum_f = start_g[rows, None] + np.cumsum(fine, axis=1)
            local = np.minimum(np.sum(cum_f <= rank[rows, None], axis=1), fine.shape[1] - 1)
            c_j = fine[np.arange(len(rows)), local]
            before = cum_f[np.arange(len(rows)), local] - c_j
            out[rows] = _in_bin(gi * _GROUP + local, c_j, before, rank[rows])
        return out

    with np.errstate(invalid="ignore"):
        out = order_stat(lo) * (1.0 - frac) + order_stat(hi) * frac
    return np.where(total > 0, out, np.nan)


def finish(metric: str, summed) -> float | np.ndarray:
    """A score from its components summed over a set of days (:func:`day_components`).

    Parameters
    ----------
    metric : a name of :func:`available_metrics`
    summed : ndarray (..., k) -- the components summed over days; leading axes are kept (a
        (n_resamples, k) array of resampled sums gives n_resamples scores)

    Returns
    -------
    float for (k,) input, else ndarray (...,); in the units of the score (mm day-1 for CRPS,
    twCRPS and the MAEs, dimensionless otherwise); NaN where the score is undefined.
    """
    s = np.asarray(summed, dtype=np.float64)
    kind = _kind(metric)
    c = lambda i: s[..., i]  # noqa: E731
    if kind == "mean":
        out = _ratio(c(0), c(1))
    elif kind == "fss":
        out = 1.0 - _ratio(c(0), c(1))
    elif kind == "freq_bias":
        out = _ratio(c(0), c(1))
    elif kind == "csi":
        out = _ratio(c(0), c(0) + c(1) + c(2))
    elif kind == "pod":
        out = _ratio(c(0), c(0) + c(1))
    elif kind == "far":
        out = _ratio(c(2), c(0) + c(2))
    elif kind == "spread_skill":
        with np.errstate(invalid="ignore"):
            out = np.where(c(2) > 0, np.sqrt(_ratio(c(0), c(1))), np.nan)
    else:  # tail_q99_ratio
        nb = WET_BINS + 1
        if s.shape[-1] != 2 * nb:
            raise ValueError(f"tail_q99_ratio needs 2 x {nb} histogram columns, got {s.shape[-1]}")
        out = _ratio(hist_quantile(s[..., :nb], TAIL_LEVEL), hist_quantile(s[..., nb:], TAIL_LEVEL))
    out = np.asarray(out, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- blocks


def block_labels(dates, block: str = "day", season_year: str = "djf") -> np.ndarray:
    """The bootstrap block of each day.

    Parameters
    ----------
    dates : sequence (N,) of ISO 'YYYY-MM-DD' strings (or datetime64)
    block : 'day' (one block per day) or 'season' (one per meteorological season: DJF, MAM,
        JJA, SON of a year)
    season_year : which year a December belongs to with ``block='season'``: 'djf' (the winter
        it opens: Dec 2001 and Jan/Feb 2002 are one block, '2002-DJF') or 'calendar' (its own
        year: Jan/Feb 2002 and Dec 2002 are '2002-DJF', so a winter is split in two)

    Returns
    -------
    ndarray (N,) of str
        'YYYY-MM-DD' per day, or 'YYYY-SSS' ('2002-DJF') per season.
    """
    if block not in BLOCKS:
        raise ValueError(f"unknown bootstrap block {block!r}; valid: {', '.join(BLOCKS)}")
    if season_year not in SEASON_YEARS:
        raise ValueError(f"unknown season_year {season_year!r}; valid: {', '.join(SEASON_YEARS)}")
    try:
        t = pd.DatetimeIndex(pd.to_datetime(np.asarray(dates)))
    except (ValueError, TypeError) as err:
        raise ValueError(f"block_labels: dates must be ISO 'YYYY-MM-DD' strings ({err})") from err
    if block == "day":
        return np.asarray(t.strftime("%Y-%m-%d"), dtype=str)
    month = np.asarray(t.month)
    year = np.asarray(t.year) + ((month == 12) if season_year == "djf" else 0)
    return np.array([f"{y:04d}-{_SEASON_OF_MONTH[mo]}" for y, mo in zip(year, month)], dtype=str)


def _block_sums(a: np.ndarray, inverse: np.ndarray, n_blocks: int) -> np.ndarray:
    """Rows of ``a`` (N, k) summed per block (``inverse``: block index 0..B-1 of each day): (B, k).

    float64 for float input; counts stay integers (int32 where they fit: the tail histograms are
    the one large component, B x 8002).
    """
    order = np.argsort(inverse, kind="stable")
    integer = np.issubdtype(a.dtype, np.integer)
    if n_blocks == len(inverse):  # one day per block: a reordering (none for sorted dates)
        out = a if np.array_equal(order, np.arange(len(order))) else a[order]
        out = out if integer else np.asarray(out, dtype=np.float64)
    else:
        starts = np.searchsorted(inverse[order], np.arange(n_blocks))
        out = np.add.reduceat(a[order], starts, axis=0, dtype=np.int64 if integer else np.float64)
    if integer:
        out = out.astype(np.int32 if out.max(initial=0) < 2 ** 31 else np.int64, copy=False)
    return out


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(components: Mapping[str, Mapping[str, np.ndarray]], blocks, baselines: Sequence[str] = (),
              samples: int = 1000, confidence: float = 0.9, seed: int = 0, *, block: str = "day",
              method: str = "percentile", contrasts: Sequence[tuple[str, str]] = (),
              targets: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Paired block-bootstrap intervals of each score of each source and of each ratio source / baseline.

    Paired: one replicate draws B blocks with replacement (B = the number of distinct labels in
    ``blocks``) and every source and every score of that replicate is computed on those same
    blocks, so a ratio source / baseline keeps the day-to-day correlation of the two (both are
    bad on the same hard days) and its interval is that of the ratio, not of two independent
    scores.  The components are summed per block first; a replicate is then a vector of block
    counts, and every resampled sum a matrix product.  For the heavy days, call it with the
    components and labels of those days alone.

    Resampling is ``scipy.stats.bootstrap``: the block indices 0..B-1 are its one sample and the
    (vectorised, multi-output) statistic gathers the block sums of every (source, score) and
    ratio at once -- which is what pairs them (``paired=True`` would only matter with several
    samples).  Method ``'percentile'`` by default: the scores are ratios of sums (and ratios of
    those), for which the percentile interval is transformation-respecting (the interval of
    baseline / source is the inverse of that of source / baseline), cannot leave the range of the
    replicates, and gives exactly [1, 1] for two identical sources; BCa's acceleration comes from a
    jackknife over the blocks, which with season blocks (a few tens) is itself noisy, and it turns
    NaN on degenerate replicates.  ``method='BCa'`` is accepted; where it gives NaN the percentile
    interval of the same replicates is used, with a logged warning.

    Parameters
    ----------
    components : {source: {metric: ndarray (N, k)}} -- :func:`day_components` of each source on
        the same N days
    blocks : (N,) block label of each day (:func:`block_labels`)
    baselines : sources to divide by: a ratio row for every other source and every metric both have
    contrasts : (source, reference) pairs: a ``difference`` row per metric both have, the paired
        difference score(source) - score(reference); for a metric in ``targets`` (a score whose ideal
        value is a target, such as a frequency bias of 1) the difference of the distances to it,
        ``|score(source) - t| - |score(reference) - t|``, so that negative is always closer to ideal
        for a 'lower' or a target score
    targets : metric -> its ideal value (see ``contrasts``)
    samples : bootstrap replicates
    confidence : two-sided level of the intervals (0.9: the 5 % and 95 % percentiles)
    seed : seed of the resampling
    block : the block kind, written to the ``block`` column
    method : 'percentile' or 'BCa'

    Returns
    -------
    pandas.DataFrame, columns :data:`INTERVAL_COLUMNS`
        One row per (source, metric) with ``baseline`` '' (``value`` = the score on all N days),
        then one per (source, baseline, metric) with ``value`` = score(source) / score(baseline)
        (``statistic`` 'ratio'), then one per contrast and metric (``statistic`` 'difference',
        ``baseline`` the reference).
        ``lower`` / ``upper``: the interval.  Replicates where a score is undefined (e.g. no
        observed exceedance among the drawn heavy days) are left out of its interval (logged);
        the bounds are NaN when no replicate is defined, and for fewer than 2 blocks (nothing to
        resample).  A ratio is NaN where the baseline's score is 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown bootstrap method {method!r}; valid: {', '.join(METHODS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    sources = list(components)
    missing = [b for b in baselines if b not in components]
    if missing:
        raise ValueError(f"baselines {missing} have no components; sources: {', '.join(sources)}")
    blocks = np.asarray(blocks)
    labels, inverse = np.unique(blocks, return_inverse=True)
    n_blocks = len(labels)
    for src, comp in components.items():
        for metric, a in comp.items():
            if len(a) != len(blocks):
                raise ValueError(f"components[{src!r}][{metric!r}] has {len(a)} days, blocks {len(blocks)}")

    plain = [(src, metric) for src in sources for metric in components[src]]
    if not plain:
        return pd.DataFrame(columns=INTERVAL_COLUMNS)
    ratios = [(src, base, metric) for base in baselines for src in sources if src != base
              for metric in components[src] if metric in components[base]]
    unknown = [c for pair in contrasts for c in pair if c not in components]
    if unknown:
        raise ValueError(f"contrasts name sources without components: {unknown}; sources: {', '.join(sources)}")
    diffs = [(src, ref, metric) for src, ref in contrasts for metric in components[src] if metric in components[ref]]
    targets = dict(targets or {})
    sums = {key: _block_sums(np.asarray(components[key[0]][key[1]]), inverse, n_blocks) for key in plain}
    # tail_q99_ratio: split into the members' and the truth's histograms, each with its coarse groups
    # (:func:`_resampled_hist_quantile`); the truth's are the same for every source (paired, one
    # truth), so its quantile is computed once per replicate and shared
    nb = WET_BINS + 1
    truths: list[tuple[np.ndarray, np.ndarray]] = []
    for key in plain:
        if key[1] == "tail_q99_ratio":
            h = sums[key]
            if h.shape[1] != 2 * nb:
                raise ValueError(f"components[{key[0]!r}]['tail_q99_ratio'] needs 2 x {nb} columns, got {h.shape[1]}")
            obs_part = next((t for t in truths if np.array_equal(t[0], h[:, nb:])), None)
            if obs_part is None:
                obs_part = (h[:, nb:], _coarse(h[:, nb:]))
                truths.append(obs_part)
            sums[key] = ((h[:, :nb], _coarse(h[:, :nb])), obs_part)
    pos = {key: i for i, key in enumerate(plain)}

    def score_of(src: str, metric: str, counts: np.ndarray, truth_q: dict) -> np.ndarray:
        """(R,) scores of (src, metric) for replicates given as block counts (R, B); = finish."""
        if metric != "tail_q99_ratio":
            return np.atleast_1d(finish(metric, counts @ np.asarray(sums[(src, metric)], dtype=np.float64)))
        ens_part, obs_part = sums[(src, metric)]
        if id(obs_part) not in truth_q:
            truth_q[id(obs_part)] = _resampled_hist_quantile(counts, *obs_part, TAIL_LEVEL)
        return _ratio(_resampled_hist_quantile(counts, *ens_part, TAIL_LEVEL), truth_q[id(obs_part)])

    def evaluate(counts: np.ndarray) -> np.ndarray:
        """(n_plain + n_ratio + n_difference, R) scores of R replicates given as block counts (R, B)."""
        truth_q: dict = {}
        vals = np.stack([score_of(src, metric, counts, truth_q) for src, metric in plain])
        with np.errstate(invalid="ignore", divide="ignore"):
            rat = [np.where(vals[pos[(b, m)]] != 0, vals[pos[(s, m)]] / vals[pos[(b, m)]], np.nan)
                   for s, b, m in ratios]
        dif = [vals[pos[(s, m)]] - vals[pos[(r, m)]] if m not in targets
               else np.abs(vals[pos[(s, m)]] - targets[m]) - np.abs(vals[pos[(r, m)]] - targets[m])
               for s, r, m in diffs]
        return np.concatenate([vals, np.asarray(rat).reshape(-1, vals.shape[1]),
                               np.asarray(dif).reshape(-1, vals.shape[1])])

    value = evaluate(np.ones((1, n_blocks)))[:, 0]
    lower = np.full(value.shape, np.nan)
    upper = np.full(value.shape, np.nan)
    if n_blocks >= 2 and len(value):
        def statistic(idx, axis=-1):
            idx = np.moveaxis(np.asarray(idx), axis, -1)
            lead, n = idx.shape[:-1], idx.shape[-1]
            flat = idx.reshape(-1, n)
            r = len(flat)
            counts = np.bincount((flat + n_blocks * np.arange(r)[:, None]).ravel(),
                                 minlength=r * n_blocks).reshape(r, n_blocks).astype(np.float64)
            return evaluate(counts).reshape((-1,) + lead)

        scipy_method = "BCa" if method == "BCa" else "percentile"
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
            res = scipy.stats.bootstrap((np.arange(n_blocks),), statistic, n_resamples=int(samples),
                                        vectorized=True, confidence_level=confidence, method=scipy_method,
                                        rng=np.random.default_rng(seed))
            lower, upper = (np.array(x, dtype=np.float64).reshape(-1) for x in res.confidence_interval)
            dist = np.asarray(res.bootstrap_distribution).reshape(len(value), -1)
            if method == "BCa" and np.isnan(lower + upper).any():
                bad = np.isnan(lower + upper)
                pct = scipy.stats.bootstrap((np.arange(n_blocks),), statistic, n_resamples=0,
                                            bootstrap_result=res, vectorized=True, confidence_level=confidence,
                                            method="percentile")
                pl, pu = (np.array(x, dtype=np.float64).reshape(-1) for x in pct.confidence_interval)
                lower[bad], upper[bad] = pl[bad], pu[bad]
                log.warning("BCa interval undefined for %d of %d scores; percentile interval used instead",
                            int(bad.sum()), len(bad))
        undefined = ~np.isfinite(dist)
        patch = np.flatnonzero(undefined.any(axis=1) & ~undefined.all(axis=1) & np.isnan(lower + upper))
        if patch.size:  # scipy's quantile propagates NaN: take the percentiles of the defined replicates
            alpha = (1.0 - confidence) / 2.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q = np.nanquantile(np.where(undefined[patch], np.nan, dist[patch]), [alpha, 1.0 - alpha], axis=1)
            lower[patch], upper[patch] = q
            log.info("bootstrap: %d scores undefined in some replicates (at most %d of %d), left out of their "
                     "intervals", patch.size, int(undefined[patch].sum(axis=1).max()), dist.shape[1])
    elif len(value):
        log.info("bootstrap: %d block(s), nothing to resample; intervals are NaN", n_blocks)

    rows = ([(s, "", m, "score") for s, m in plain] + [(*r, "ratio") for r in ratios]
            + [(*d, "difference") for d in diffs])
    out = pd.DataFrame(rows, columns=["source", "baseline", "metric", "statistic"])
    out["value"], out["lower"], out["upper"] = value, lower, upper
    out["n_blocks"], out["block"], out["confidence"] = n_blocks, block, float(confidence)
    return out[INTERVAL_COLUMNS]


# ----------------------------------------------------------------------------- on disk


def save_day_components(path, components: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                        days: Mapping[str, tuple], season_year: str = "calendar") -> None:
    """Write every split's day components (``{split: {source: {metric: (N, k)}}}``) with the days' dates
    and heavy flags to ``path`` (compressed ``.npz``, atomically), for paired comparisons between
    experiments (:func:`precip_cvae.evaluate.compare.setting_differences`).  The wet-value histograms
    of ``tail_q99_ratio`` are stored as float32 (exact for counts below 2^24)."""
    from ..io import atomic_path

    arrays = {"season_year": np.array(season_year)}
    for split, by_source in components.items():
        if split not in days:
            continue
        dates, heavy = days[split]
        arrays[f"{split}/dates"] = np.asarray(dates).astype(str)
        arrays[f"{split}/heavy"] = np.asarray(heavy, dtype=bool)
        for src, parts in by_source.items():
            for metric, a in parts.items():
                dtype = np.float32 if metric == "tail_q99_ratio" else np.float64
                arrays[f"{split}/{src}/{metric}"] = np.asarray(a, dtype=dtype)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_day_components(path) -> tuple[dict, dict, str]:
    """``(components, days, season_year)`` as :func:`save_day_components` wrote them."""
    components: dict = {}
    days: dict = {}
    with np.load(path, allow_pickle=False) as z:
        season_year = str(z["season_year"]) if "season_year" in z.files else "calendar"
        for key in z.files:
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == "dates":
                days[parts[0]] = (z[key], z[f"{parts[0]}/heavy"])
            elif len(parts) == 3:
                split, src, metric = parts
                components.setdefault(split, {}).setdefault(src, {})[metric] = z[key].astype(np.float64)
    return components, days, season_year
