"""Marginal calibration of generated members: per-pixel quantile mapping, fitted out of sample.

A cVAE whose members are too light (or too wet) at a pixel can be corrected toward the
observed distribution of that pixel by a monotone map ``f_i``: the members' quantiles at
pixel ``i`` (pooled over the fit days and members) are sent to the observed quantiles on
the same days.  The map is applied to each member separately, so on every day and at
every pixel the members keep their rank order (ties aside): the spatial and inter-member
dependence of the raw ensemble survives, as in ensemble copula coupling (Schefzik et al.
2013), and only the marginals change.

Rules the code keeps (pinned in ``tests/test_calibration.py``):

* fitted **out of sample**: the evaluation fits on the train split's days and applies the
  map to val and test; generation (which samples train heavy days) fits on the val days.
  A day the map is applied to never enters its fit (changing that day's truth changes
  nothing).
* a member value of 0 (dry) stays 0: the map never makes rain where the member has none;
  a too-wet model is dried by mapping its small amounts to 0.
* between the fitted quantile levels the map is linear; above the highest level it scales
  by the ratio of the top quantiles (clipped to ``[1 / MAX_TAIL_RATIO, MAX_TAIL_RATIO]``), so
  a member beyond anything seen in the fit is still mapped, continuously and monotonically.

Memory (issue 25): :class:`QuantileMapFit` takes the fit days a block at a time.  While the
fit days' members fit :data:`CALIBRATION_EXACT_BYTES` (in float64, :data:`EXACT_COPIES` times)
it keeps them and fits exactly (:func:`fit_quantile_map`).  Beyond, it counts each pixel's
values in :data:`STREAM_BINS` log-spaced bins between :data:`STREAM_LOW` and
:data:`STREAM_HIGH` mm/day (plus exact zeros, an underflow and an overflow bin), which takes
memory bounded by the grid, and reads each quantile from the counts: every order statistic
lies in its own bin, so it is within the bin's width of the exact one, a relative
:data:`STREAM_RATIO` (2.7 %) between the edges and 0.01 mm/day below them.  Values from
:data:`STREAM_HIGH` (10 m of rain a day, not physical) are placed evenly up to the pixel's largest
value, without a bound.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["QuantileMap", "QuantileMapFit", "fit_quantile_map", "LEVELS", "MAX_TAIL_RATIO", "CALIBRATIONS",
           "CALIBRATION_EXACT_BYTES", "STREAM_BINS", "STREAM_LOW", "STREAM_HIGH", "STREAM_RATIO"]

#: Names of ``evaluate.calibrate`` and ``generate.calibrate``.
CALIBRATIONS = ("none", "quantile_map")
#: Quantile levels of the map: every percent, then denser in the upper tail.
LEVELS = np.concatenate([np.linspace(0.01, 0.99, 99), [0.995, 0.998]])
#: Bound of the multiplicative correction above the highest fitted level.
MAX_TAIL_RATIO = 5.0
#: Memory of the exact fit: the fit days' members in float64, held about EXACT_COPIES times (the masked copy,
#: nanquantile's sorted one); beyond CALIBRATION_EXACT_BYTES the fit is streamed
EXACT_COPIES = 3
CALIBRATION_EXACT_BYTES = 1 << 30
#: The streamed fit's bins: 0 exactly, (0, STREAM_LOW), STREAM_BINS log-spaced bins up to STREAM_HIGH, beyond
STREAM_LOW, STREAM_HIGH, STREAM_BINS = 0.01, 1.0e4, 512
STREAM_EDGES = np.geomspace(STREAM_LOW, STREAM_HIGH, STREAM_BINS + 1)
STREAM_EDGES.flags.writeable = False
#: Largest relative width of a log-spaced bin: the bound of a streamed quantile's relative error there
STREAM_RATIO = float(np.max(STREAM_EDGES[1:] / STREAM_EDGES[:-1]) - 1.0)
_NB = STREAM_BINS + 3  # bins of a pixel's histogram
_POSITIONS = 8192  # positions counted or read per step (bincount's int64 result: 34 MB)
_COUNT_VALUES = 2**22  # values binned per step (their bins, mask and flat indices: 32 MB each)


@dataclass(frozen=True)
class QuantileMap:
    """A per-pixel monotone map from member values to observed values (mm/day).

    Attributes
    ----------
    levels : ndarray (L,)
        Quantile levels, increasing in (0, 1).
    model_q, obs_q : ndarray (L, h, w)
        Quantiles of the members and of the observations at each level; NaN at pixels
        without data (masked: values there pass through unchanged).
    n_days : int
        Days the map was fitted on.
    """

    levels: np.ndarray
    model_q: np.ndarray
    obs_q: np.ndarray
    n_days: int

    def apply(self, members: np.ndarray) -> np.ndarray:
        """Map ``members`` (..., h, w), mm/day, pixel by pixel; NaN stays NaN, 0 stays 0.

        Returns
        -------
        ndarray, the shape and dtype of ``members``.
        """
        values = np.asarray(members)
        if values.shape[-2:] != self.model_q.shape[1:]:
            raise ValueError(f"members on a {values.shape[-2:]} grid, the map was fitted on {self.model_q.shape[1:]}")
        flat = values.reshape(-1, values.shape[-2] * values.shape[-1])  # (K, P)
        out = flat.astype("float64", copy=True)
        mq = self.model_q.reshape(len(self.levels), -1)
        oq = self.obs_q.reshape(len(self.levels), -1)
        for p in np.flatnonzero(np.isfinite(mq).all(axis=0) & np.isfinite(oq).all(axis=0)):
            out[:, p] = _map_pixel(flat[:, p].astype("float64"), mq[:, p], oq[:, p])
        return out.reshape(values.shape).astype(values.dtype, copy=False)


def _map_pixel(v: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """The monotone map of one pixel (quantiles ``xq`` -> ``yq``, both non-decreasing)."""
    out = np.interp(v, xq, yq)  # constant below xq[0] and above xq[-1]: both fixed below
    top_x, top_y = xq[-1], yq[-1]
    above = v > top_x
    if above.any():
        if top_x > 0:
            ratio = float(np.clip(top_y / top_x, 1.0 / MAX_TAIL_RATIO, MAX_TAIL_RATIO))
            out[above] = top_y + (v[above] - top_x) * ratio
        else:
            out[above] = top_y + (v[above] - top_x)
    # below the lowest fitted quantile: scale toward 0 (np.interp would hold yq[0])
    below = v < xq[0]
    if below.any():
        out[below] = yq[0] * v[below] / xq[0] if xq[0] > 0 else v[below]
    out[v <= 0] = 0.0
    out[~np.isfinite(v)] = np.nan
    return np.maximum(out, 0.0)


def fit_quantile_map(members: np.ndarray, obs: np.ndarray, levels: np.ndarray = LEVELS) -> QuantileMap:
    """Fit the per-pixel map of ``members`` to ``obs`` on the same days.

    Parameters
    ----------
    members : ndarray (M, T, h, w)
        Members on the fit days, mm/day (NaN where the day has no data at the pixel).
    obs : ndarray (T, h, w)
        Observations on the same days, mm/day, NaN where missing.  A member value at a
        day and pixel whose observation is missing is left out, so both sides describe
        the same days.
    levels : ndarray (L,)

    Returns
    -------
    QuantileMap
        Pixels with fewer than 10 observed days get NaN quantiles (left unchanged by
        :meth:`QuantileMap.apply`).
    """
    members = np.asarray(members, dtype="float64")
    obs = np.asarray(obs, dtype="float64")
    if members.ndim != 4 or members.shape[1:] != obs.shape:
        raise ValueError(f"members (M, T, h, w) and obs (T, h, w) must agree, got {members.shape} and {obs.shape}")
    seen = np.isfinite(obs)  # (T, h, w)
    m = np.where(seen[None] & np.isfinite(members), members, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels (masked) give NaN quantiles
        model_q = np.nanquantile(m.reshape(-1, *obs.shape[1:]), levels, axis=0)  # (L, h, w)
        obs_q = np.nanquantile(obs, levels, axis=0)
    return _finished_map(levels, model_q, obs_q, seen.sum(axis=0), int(obs.shape[0]))


def _finished_map(levels, model_q: np.ndarray, obs_q: np.ndarray, seen: np.ndarray, n_days: int) -> QuantileMap:
    """The map of the quantiles (L, ...) of both sides: NaN where fewer than 10 days were observed (``seen``),
    made non-decreasing (round-off) before np.interp uses them."""
    few = seen < 10
    model_q[:, few] = np.nan
    obs_q[:, few] = np.nan
    model_q = np.maximum.accumulate(model_q, axis=0)
    obs_q = np.maximum.accumulate(obs_q, axis=0)
    return QuantileMap(np.asarray(levels, dtype="float64"), model_q, obs_q, n_days)


def _bins(values: np.ndarray) -> np.ndarray:
    """The streamed fit's bin of each value (any shape): 0 for 0, 1 below STREAM_LOW, 2 + the log-spaced bin,
    STREAM_BINS + 2 from STREAM_HIGH on; -1 for NaN and +-inf (not counted, as the exact fit leaves them out).
    Amounts are >= 0 (the inverse transform clamps); a negative one would count as 0."""
    v = np.asarray(values, dtype=np.float64)
    b = np.searchsorted(STREAM_EDGES, v, side="right") + 1  # 1 below the first edge, ..., NB - 1 from the last
    b[v <= 0] = 0
    b[~np.isfinite(v)] = -1
    return b


class QuantileMapFit:
    """Fits a :class:`QuantileMap` from the fit days given a block at a time (:meth:`add`, then :meth:`finish`).

    Exact (:func:`fit_quantile_map` of every block at once) while ``members x days x pixels`` float64 values
    fit ``exact_bytes`` / :data:`EXACT_COPIES` (default :data:`CALIBRATION_EXACT_BYTES`); else streamed: per-pixel
    counts of the members' and the observations' values (the module docstring; ``4 x (STREAM_BINS + 3)`` bytes
    per pixel and side, whatever the number of days).  ``members``/``days``: the totals :meth:`add` will see.
    """

    def __init__(self, members: int, days: int, shape: tuple[int, int], levels: np.ndarray = LEVELS,
                 exact_bytes: int | None = None):
        budget = CALIBRATION_EXACT_BYTES if exact_bytes is None else exact_bytes
        self.shape, self.levels = tuple(int(x) for x in shape), np.asarray(levels, dtype="float64")
        self.pixels = self.shape[0] * self.shape[1]
        self.exact = EXACT_COPIES * 8 * int(members) * int(days) * self.pixels <= budget
        self.days = 0
        if self.exact:
            self._members, self._obs = [], []
            return
        # counts (int32 while every value of a pixel fits it), and each pixel's largest value (the overflow bin)
        dtype = np.int32 if int(members) * int(days) < 2**31 else np.int64
        self._counts = {side: np.zeros((self.pixels, _NB), dtype) for side in ("model", "obs")}
        self._top = {side: np.full(self.pixels, -np.inf) for side in ("model", "obs")}

    def add(self, members: np.ndarray, obs: np.ndarray) -> None:
        """Members (M, B, h, w) and observations (B, h, w) of B more fit days, mm/day (NaN: no data)."""
        members = np.asarray(members)
        obs = np.asarray(obs)
        if members.ndim != 4 or members.shape[1:] != obs.shape or obs.shape[1:] != self.shape:
            raise ValueError(f"members (M, B, h, w) and obs (B, h, w) on the {self.shape} grid must agree, got "
                             f"{members.shape} and {obs.shape}")
        self.days += obs.shape[0]
        if self.exact:
            self._members.append(members)
            self._obs.append(obs)
            return
        obs = obs.astype("float64").reshape(obs.shape[0], -1)  # (B, P)
        seen = np.isfinite(obs)
        ens = members.reshape(members.shape[0], obs.shape[0], -1)  # (M, B, P)
        ens = np.where(seen[None] & np.isfinite(ens), ens, np.nan)
        self._count("model", ens.reshape(-1, self.pixels))
        self._count("obs", obs)

    def _count(self, side: str, values: np.ndarray) -> None:
        """Count ``values`` (K, P): finite ones only, a few positions at a time (temporaries of about
        :data:`_COUNT_VALUES` values)."""
        counts, top = self._counts[side], self._top[side]
        with np.errstate(invalid="ignore"):
            finite_max = np.fmax.reduce(np.where(np.isfinite(values), values, -np.inf), axis=0, initial=-np.inf)
        np.fmax(top, finite_max, out=top)
        step = max(1, min(_POSITIONS, _COUNT_VALUES // max(1, values.shape[0])))
        for p0 in range(0, self.pixels, step):
            p1 = min(p0 + step, self.pixels)
            b = _bins(values[:, p0:p1])  # (K, n)
            flat = (b + _NB * np.arange(p1 - p0))[b >= 0]
            counts[p0:p1] += np.bincount(flat, minlength=(p1 - p0) * _NB).reshape(p1 - p0, _NB).astype(counts.dtype)

    def finish(self) -> QuantileMap:
        """The fitted map: exactly :func:`fit_quantile_map`'s, or its streamed estimate."""
        if self.days == 0:
            raise ValueError("no fit day was added to the quantile map")
        if self.exact:
            return fit_quantile_map(np.concatenate(self._members, axis=1), np.concatenate(self._obs, axis=0),
                                    self.levels)
        L = len(self.levels)
        q = {side: np.full((L, self.pixels), np.nan) for side in ("model", "obs")}
        for side in q:
            for p0 in range(0, self.pixels, _POSITIONS):
                p1 = min(p0 + _POSITIONS, self.pixels)
                q[side][:, p0:p1] = _hist_quantiles(self._counts[side][p0:p1], self._top[side][p0:p1], self.levels).T
        seen = self._counts["obs"].sum(axis=1).reshape(self.shape)
        return _finished_map(self.levels, q["model"].reshape(L, *self.shape), q["obs"].reshape(L, *self.shape),
                             seen, int(self.days))


def _hist_quantiles(counts: np.ndarray, top: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """numpy's linear quantiles (n, L) of each row's values from its counts (n, NB) on the streamed fit's bins:
    each order statistic placed inside its bin by its rank among the bin's values; NaN where a row is empty."""
    counts = counts.astype(np.int64)
    n_rows = counts.shape[0]
    total = counts.sum(axis=1)  # (n,)
    cum = np.cumsum(counts, axis=1)  # (n, NB)
    h = (np.maximum(total, 1) - 1)[:, None] * levels[None, :]  # (n, L)
    k0 = np.floor(h).astype(np.int64)
    k1 = np.minimum(k0 + 1, np.maximum(total, 1)[:, None] - 1)
    gamma = h - k0
    # the bin of rank k in every row at once: one search in the rows' cumulative counts laid end to end
    stride = int(total.max(initial=0)) + 1
    offset = (np.arange(n_rows, dtype=np.int64) * stride)[:, None]
    flat = (cum + offset).ravel()
    left = np.concatenate([[0.0, 0.0], STREAM_EDGES])  # (NB,): 0 | (0, LOW) | the log bins | [HIGH, top]
    right = np.concatenate([[0.0], STREAM_EDGES, [np.nan]])

    def order_statistic(k):
        j = np.searchsorted(flat, k + offset, side="right") - np.arange(n_rows)[:, None] * _NB  # the row's bin
        j = np.minimum(j, _NB - 1)  # an empty row (NaN below) finds the next row's start
        before = np.where(j > 0, np.take_along_axis(cum, np.maximum(j - 1, 0), axis=1), 0)
        held = np.take_along_axis(counts, j, axis=1)
        lo = left[j]
        hi = np.where(j == _NB - 1, np.maximum(top, STREAM_HIGH)[:, None], right[j])
        return lo + (hi - lo) * (k - before + 0.5) / np.maximum(held, 1)

    a, b = order_statistic(k0), order_statistic(k1)
    out = a + gamma * (b - a)
    out[total == 0] = np.nan
    return out
