"""Climate-index diagnostics of precipitation ensembles against observations.

Plain functions on numpy arrays; no file I/O.  Values are in mm day-1.

Conventions (as in :mod:`precip_cvae.metrics`)
----------------------------------------------
* ``obs`` : ndarray (N, h, w) -- the truth on N scored days.  **NaN marks a missing
  value**: a masked pixel (sea) is NaN on every day; a pixel may also be NaN on some
  days only (a station missing from a gridded analysis: E-OBS has them on most Iberian
  winter days).  A pixel is scored when it has an observation on at least one day.
* ``ens`` : ndarray (M, N, h, w) -- M members on the same days, member axis first.
  Where ``obs`` is missing the members' values are ignored (that pixel-day is missing in
  every series, so obs and members are compared on the same days).  A NaN in a member
  where ``obs`` is valid is not hidden: the score of that pixel (and any spatial mean
  over it) becomes NaN, so a broken forecast shows up.
* ``dates`` : sequence of N ISO strings 'YYYY-MM-DD', sorted and unique but not
  contiguous (a winter-only record, a set of held-out years).
* ``calendar`` : a CF calendar name ('standard', 'noleap', '360_day', ...).
* ``season_year`` : 'calendar' (a period is a calendar year, freq ``YS``) or
  'djf' (a period is a December-to-November season year, freq ``YS-DEC``, so one
  winter is one period; December 2001 belongs to winter 2002, as in
  :func:`precip_cvae.split.season_years`).

Gaps
----
The days between two scored days that are not in ``dates`` are *missing*: they are
NaN in :func:`daily_series`.  A missing day is neither wet nor dry, so no wet or dry
spell bridges a gap between scored seasons or years, and a missing day never counts
as a wet day or an exceedance.

The index functions are the low-level ``xclim.indices`` ones (``xclim.indicators``
refuse series with missing days).
"""

from __future__ import annotations

import logging
import warnings
from collections import namedtuple
from typing import Sequence

import cftime
import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from .metrics import mean_rapsd, rapsd
from .split import season_years

__all__ = [
    "INDEX_NAMES",
    "INDEX_UNITS",
    "SEASON_YEAR_FREQ",
    "RALSD_DEFINITIONS",
    "period_freq",
    "daily_series",
    "index_maps",
    "ensemble_index_table",
    "wasserstein_map",
    "perkins_skill_score",
    "ralsd",
    "distribution_scores",
    "seasonal_maxima",
    "gev_return_levels",
]

#: the indices of :func:`index_maps`, in table order
INDEX_NAMES = ("rx1day", "sdii", "r95ptot", "r99ptot", "cwd", "cdd", "days_above_p99")

#: units of each index map (per-period values averaged over periods)
INDEX_UNITS = {
    "rx1day": "mm d-1",
    "sdii": "mm d-1",
    "r95ptot": "1",  # a fraction in [0, 1], not a percentage
    "r99ptot": "1",
    "cwd": "days",
    "cdd": "days",
    "days_above_p99": "days",
}

#: the xclim/pandas resampling frequency of each ``season_year`` (pandas 3 no longer accepts
#: the old alias 'AS-DEC'; 'YS-DEC' is accepted by the pandas and xarray-cftime offsets alike)
SEASON_YEAR_FREQ = {"calendar": "YS", "djf": "YS-DEC"}

#: the RALSD variants of :func:`ralsd`
RALSD_DEFINITIONS = ("ml-bench", "harris")

#: most float64 values one xclim call holds in its input (the members are split to stay under
#: it; xclim's temporaries take a few times this)
_VALUES_PER_CALL = 2 ** 23

#: pixels per chunk in the distribution scores (bounds the sorted / histogram copies)
_PIXELS_PER_CHUNK = 2048
#: perkins_skill_score: at most this many (pixel, bin) counts at once.  Its 1 mm/day bins run to the largest value,
#: so a member of 10^5 mm/day (a badly trained model, a radar's sub-daily rates) makes 10^5 bins: pixels are then
#: taken fewer at a time (the same score) instead of allocating bins x 2048 counts (20 GB seen on BoM radar).
_HISTOGRAM_CELLS = 2**23

_UNITS = "mm/d"

_YearMonth = namedtuple("_YearMonth", "year month")


# ----------------------------------------------------------------------------- calendar


def period_freq(season_year: str) -> str:
    """The resampling frequency of one period: 'YS' for 'calendar', 'YS-DEC' for 'djf'.

    Raises ValueError for any other name, listing the valid ones.
    """
    try:
        return SEASON_YEAR_FREQ[season_year]
    except KeyError:
        raise ValueError(
            f"season_year {season_year!r} is not one of {sorted(SEASON_YEAR_FREQ)}"
        ) from None


def _ymd(date: str) -> tuple[int, int, int]:
    try:
        y, m, d = (int(p) for p in str(date).split("-"))
    except ValueError:
        raise ValueError(f"date {date!r} is not an ISO date 'YYYY-MM-DD'") from None
    return y, m, d


def _calendar_axis(dates: Sequence[str], calendar: str):
    """Every calendar day from the first to the last date, and the position of each date in it.

    Returns
    -------
    days : xarray CFTimeIndex (T,)
    pos : ndarray (N,) of int, strictly increasing
    parsed : list of N cftime datetimes
    """
    dates = [str(d) for d in dates]
    if not dates:
        raise ValueError("dates is empty: need at least one scored day")
    parsed = []
    for d in dates:
        try:
            parsed.append(cftime.datetime(*_ymd(d), calendar=calendar))
        except ValueError as err:
            raise ValueError(f"date {d!r} does not exist in calendar {calendar!r}: {err}") from None
    pos = np.asarray(
        cftime.date2num(parsed, f"days since {dates[0]}", calendar=calendar), dtype=np.float64
    )
    pos = np.rint(pos).astype(np.int64)
    if np.any(np.diff(pos) <= 0):
        raise ValueError("dates must be sorted and unique")
    days = xr.date_range(
        start=dates[0], end=dates[-1], freq="D", calendar=calendar, use_cftime=True
    )
    if len(days) != pos[-1] + 1:  # pragma: no cover - a cftime/xarray disagreement
        raise RuntimeError(f"calendar axis of {len(days)} days does not end at day {pos[-1]}")
    return days, pos, parsed


def daily_series(values, dates: Sequence[str], calendar: str = "standard") -> xr.DataArray:
    """Scored days placed on every calendar day from the first to the last date.

    A day that is not in ``dates`` is NaN: it is *missing*, so neither a wet nor a dry
    spell can bridge a gap between scored seasons or years, and it counts as no wet day
    and no exceedance.

    Parameters
    ----------
    values : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    dates : sequence of N ISO strings 'YYYY-MM-DD', sorted, unique (gaps allowed)
    calendar : str
        CF calendar of the dates ('standard', 'noleap', '360_day', ...); the time
        axis holds cftime datetimes in it whatever the calendar.

    Returns
    -------
    xr.DataArray (time, lat, lon), units 'mm/d'
        T = (last - first) + 1 days; NaN on the days absent from ``dates``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 3 or v.shape[0] != len(dates):
        raise ValueError(f"values {v.shape} must be (N, h, w) with N = len(dates) = {len(dates)}")
    days, pos, _ = _calendar_axis(dates, calendar)
    full = np.full((len(days),) + v.shape[1:], np.nan)
    full[pos] = v
    return xr.DataArray(
        full, dims=("time", "lat", "lon"), coords={"time": days}, name="pr",
        attrs={"units": _UNITS},
    )


def _period_blocks(values: np.ndarray, dates: Sequence[str], calendar: str, season_year: str):
    """The scored days of each period, as one contiguous daily block per period.

    Block k holds the days of period k from its first to its last scored day (the days
    between that are not scored are NaN, exactly as in :func:`daily_series`), padded with
    NaN at the end to the longest block (and to at least 3 days, for xclim to infer the daily
    step).  Every block fits in one calendar year of ``calendar`` (a period is a year), so the
    blocks can be put on a synthetic daily axis starting on 2000-01-01 -- a leap year in the
    calendars that have leap years -- and resampled with 'YS' into one period each.  None of
    the indices of :func:`index_maps` depends on the date of a day (the thresholds are fixed
    maps, not day-of-year ones), so this gives, period by period, what xclim gives on
    :func:`daily_series` with :func:`period_freq` -- with only the scored span of each period
    on the time axis (a DJF record spans 4 times fewer days than its calendar range).

    Parameters
    ----------
    values : ndarray (N, ...) with N = len(dates)

    Returns
    -------
    blocks : ndarray (L, K, ...), NaN-padded
    axis : CFTimeIndex (L,) from 2000-01-01 in ``calendar``
    """
    period_freq(season_year)  # validates the name
    _, pos, parsed = _calendar_axis(dates, calendar)
    years = season_years(parsed, season_year)
    starts = np.flatnonzero(np.r_[True, years[1:] != years[:-1]])
    ends = np.r_[starts[1:], len(years)]
    lengths = pos[ends - 1] - pos[starts] + 1
    length = max(int(lengths.max()), 3)  # xarray infers a daily frequency from 3 steps or more
    blocks = np.full((length, len(starts)) + values.shape[1:], np.nan)
    for k, (a, b) in enumerate(zip(starts, ends)):
        blocks[pos[a:b] - pos[a], k] = values[a:b]
    axis = xr.date_range("2000-01-01", periods=length, freq="D", calendar=calendar, use_cftime=True)
    if axis[-1].year != 2000:  # pragma: no cover - a period longer than a year cannot happen
        raise RuntimeError(f"a period of {length} days does not fit in one year of {calendar!r}")
    return blocks, axis


# ----------------------------------------------------------------------------- indices


def _threshold_map(thr, shape: tuple[int, int], name: str, valid: np.ndarray) -> np.ndarray:
    t = np.broadcast_to(np.asarray(thr, dtype=np.float64), shape)
    if not np.isfinite(t[valid]).all():
        # xclim would silently replace a NaN percentile by the wet-day threshold
        raise ValueError(f"{name} must be finite at every valid pixel (mm day-1 map {shape})")
    return t


def _import_xclim():
    """``xclim`` and ``xclim.indices``, imported without the INFO lines its docstring parser sends to
    the root logger ('Choice not found. Ignoring: ...'), which would fill every stage log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        import xclim
        import xclim.indices as xi
    finally:
        root.setLevel(level)
    return xclim, xi


def _xclim_periods(blocks: np.ndarray, axis, p95: np.ndarray, p99: np.ndarray,
                   wet_threshold: float) -> dict[str, np.ndarray]:
    """xclim's indices of NaN-padded daily blocks (L, C) -> name -> (C,), one period per block.

    ``p95``, ``p99`` : (C,) thresholds of each column.  The columns are flat (period x series x
    pixel) on purpose: xclim's unit check formats its input with ``str()``, which costs
    seconds on a 5-D array and nothing on a 2-D one.
    """
    xclim, xi = _import_xclim()

    pr = xr.DataArray(blocks, dims=("time", "cell"), coords={"time": axis}, attrs={"units": _UNITS})
    t95 = xr.DataArray(p95, dims=("cell",), attrs={"units": _UNITS})
    t99 = xr.DataArray(p99, dims=("cell",), attrs={"units": _UNITS})
    wet = f"{float(wet_threshold)!r} {_UNITS}"
    # run_length_ufunc=False: the vectorised run-length path (the per-point 1-D path is a
    # Python loop over pixels, ~10x slower here)
    with xclim.set_options(run_length_ufunc=False), warnings.catch_warnings(), \
            np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        # xclim 0.62 reads a pandas offset attribute that pandas 3 deprecates; not ours to fix
        warnings.filterwarnings("ignore", message="The 'name' property is deprecated")
        out = {
            "rx1day": xi.max_1day_precipitation_amount(pr, freq="YS"),
            "sdii": xi.daily_pr_intensity(pr, thresh=wet, freq="YS", op=">="),
            "r95ptot": xi.fraction_over_precip_thresh(pr, t95, thresh=wet, freq="YS", op=">"),
            "r99ptot": xi.fraction_over_precip_thresh(pr, t99, thresh=wet, freq="YS", op=">"),
            "cwd": xi.maximum_consecutive_wet_days(pr, thresh=wet, op=">=", freq="YS"),
            "cdd": xi.maximum_consecutive_dry_days(pr, thresh=wet, op="<", freq="YS"),
            "days_above_p99": xi.days_over_precip_thresh(pr, t99, thresh=wet, freq="YS", op=">"),
        }
    res = {}
    for name, da in out.items():
        if da.sizes["time"] != 1:  # pragma: no cover - guarded by _period_blocks
            raise RuntimeError(f"{name}: a block spans {da.sizes['time']} periods, expected 1")
        res[name] = np.asarray(da.isel(time=0), dtype=np.float64)
    return res


def _index_cells(series: np.ndarray, dates, calendar, p95: np.ndarray, p99: np.ndarray,
                 wet_threshold, season_year) -> dict[str, np.ndarray]:
    """Index values of S daily series at P pixels: (N, S, P) -> name -> (S, P).

    ``p95``, ``p99`` : (P,).  NaN where a series has no finite value at a pixel.
    """
    n, s, p = series.shape
    out = {name: np.full((s, p), np.nan) for name in INDEX_NAMES}
    if p == 0:
        return out
    blocks, axis = _period_blocks(series, dates, calendar, season_year)  # (L, K, S, P)
    length, k = blocks.shape[:2]
    step = max(1, _VALUES_PER_CALL // (length * k * p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of no defined period
        for i in range(0, s, step):
            part = blocks[:, :, i:i + step]
            shape = part.shape[1:]  # (K, s_i, P)
            res = _xclim_periods(part.reshape(length, -1), axis,
                                 np.broadcast_to(p95, shape).reshape(-1),
                                 np.broadcast_to(p99, shape).reshape(-1), wet_threshold)
            for name in INDEX_NAMES:
                out[name][i:i + step] = np.nanmean(res[name].reshape(shape), axis=0)
    empty = ~np.isfinite(series).any(axis=0)  # (S, P): no scored value at the pixel
    for name in INDEX_NAMES:
        out[name][empty] = np.nan
    return out


def _scatter(cells: np.ndarray, idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(P,) values at the flat pixel positions ``idx`` -> (h, w) map, NaN elsewhere."""
    m = np.full(shape[0] * shape[1], np.nan)
    m[idx] = cells
    return m.reshape(shape)


def index_maps(values, dates: Sequence[str], calendar: str, p95, p99,
               wet_threshold: float = 1.0, season_year: str = "calendar") -> dict[str, np.ndarray]:
    """Per-pixel climate indices, each the mean over periods of its per-period value.

    Each index is computed per period (a calendar year, or with ``season_year='djf'`` a
    December-November season year so that one winter is one period) with the low-level
    ``xclim.indices`` functions on the daily series of :func:`daily_series`, then averaged
    over the periods that hold at least one scored day.  Where a per-period value is
    undefined (``sdii``, ``r95ptot``, ``r99ptot`` in a period without a wet day) the mean
    runs over the periods where it is defined; NaN when there is none.

    Indices, and how each treats a gap (missing, NaN) day -- verified on xclim 0.62
    (tests/test_indices.py):

    * ``rx1day`` -- ``max_1day_precipitation_amount``: the highest daily value of the
      period (mm day-1); missing days are skipped.
    * ``sdii`` -- ``daily_pr_intensity``: mean over wet days (``pr >= wet_threshold``)
      of pr (mm day-1); a missing day is not a wet day.
    * ``r95ptot``, ``r99ptot`` -- ``fraction_over_precip_thresh``: the precipitation of
      the days with ``pr > max(p95, wet_threshold)`` (resp. p99) divided by that of the wet
      days; xclim applies its one ``op`` to both comparisons, so here a wet day is
      ``pr > wet_threshold`` (strict).  A fraction in [0, 1] (not a percentage); missing
      days add nothing to either sum.
    * ``cwd`` -- ``maximum_consecutive_wet_days``: the longest run of days with
      ``pr >= wet_threshold`` (days); a missing day ends the run (NaN >= t is False), so a
      wet spell never bridges a gap.
    * ``cdd`` -- ``maximum_consecutive_dry_days``: the longest run of days with
      ``pr < wet_threshold`` (days); a missing day ends the run, so a dry spell never
      bridges a gap (it is not counted as dry either).
    * ``days_above_p99`` -- ``days_over_precip_thresh``: the number of days with
      ``pr > max(p99, wet_threshold)`` (days per period); missing days are not counted.

    Spells are cut at period boundaries (xclim resamples before the run-length step), so a
    December-to-February winter is one spell domain with ``season_year='djf'`` but is cut at
    1 January with ``'calendar'``.  Computed on one contiguous block per period (the span
    from its first to its last scored day; see ``_period_blocks``), which gives what xclim
    gives on the full :func:`daily_series` with ``freq=period_freq(season_year)``.

    Parameters
    ----------
    values : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    dates : sequence of N ISO strings 'YYYY-MM-DD', sorted, unique
    calendar : str, CF calendar name
    p95, p99 : ndarray (h, w) (or broadcastable), mm day-1
        Per-pixel thresholds, e.g. the observed wet-day 95th / 99th percentiles; must be
        finite at every pixel where ``values`` has data.
    wet_threshold : float
        Wet-day threshold, mm day-1 (1 by default, ETCCDI).
    season_year : {'calendar', 'djf'}
        The period: calendar year (xclim freq 'YS') or December-November (freq 'YS-DEC').

    Returns
    -------
    dict[str, ndarray (h, w)]
        The keys of :data:`INDEX_NAMES`, in the units of :data:`INDEX_UNITS`; NaN at
        pixels without any finite value (masked pixels).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 3 or v.shape[0] != len(dates):
        raise ValueError(f"values {v.shape} must be (N, h, w) with N = len(dates) = {len(dates)}")
    n, h, w = v.shape
    valid = np.isfinite(v).any(axis=0)
    idx = np.flatnonzero(valid)
    t95 = _threshold_map(p95, (h, w), "p95", valid).reshape(-1)[idx]
    t99 = _threshold_map(p99, (h, w), "p99", valid).reshape(-1)[idx]
    cells = _index_cells(v.reshape(n, 1, -1)[:, :, idx], dates, calendar, t95, t99,
                         wet_threshold, season_year)
    return {name: _scatter(c[0], idx, (h, w)) for name, c in cells.items()}


def _valid_pixels(obs: np.ndarray) -> np.ndarray:
    """(h, w) mask of the scored pixels: those with an observation on at least one day."""
    return np.isfinite(obs).any(axis=0)


def _where_observed(ens: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The members with NaN wherever ``obs`` is missing, and the (h, w) pixels where a member is
    NaN although ``obs`` is valid (a broken forecast)."""
    observed = np.isfinite(obs)
    broken = (observed[None] & ~np.isfinite(ens)).any(axis=(0, 1))
    return np.where(observed[None], ens, np.nan), broken


def _check_ens_obs(ens, obs) -> tuple[np.ndarray, np.ndarray]:
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if obs.ndim != 3 or ens.ndim != 4 or ens.shape[1:] != obs.shape:
        raise ValueError(f"ensemble {ens.shape} must be (M, N, h, w) and obs {obs.shape} (N, h, w)")
    return ens, obs


def ensemble_index_maps(ens, obs, dates: Sequence[str], calendar: str, p95, p99, wet_threshold: float = 1.0,
                        season_year: str = "calendar") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The observed and the ensemble index maps of :func:`ensemble_index_table` (name -> (h, w)).

    Each pixel's value depends on that pixel's series only, so the maps of a block of rows are the
    rows of the maps of the whole grid (``diagnostics`` computes them block by block).  The ensemble
    map is NaN at a pixel where a member is NaN although the observation is valid.
    """
    ens, obs = _check_ens_obs(ens, obs)
    if obs.shape[0] != len(dates):
        raise ValueError(f"obs has {obs.shape[0]} days but dates {len(dates)}")
    m, n, h, w = ens.shape
    valid = _valid_pixels(obs)
    idx = np.flatnonzero(valid)
    t95 = _threshold_map(p95, (h, w), "p95", valid).reshape(-1)[idx]
    t99 = _threshold_map(p99, (h, w), "p99", valid).reshape(-1)[idx]
    ens, broken_map = _where_observed(ens, obs)  # a missing observation is a missing day of every member
    e = ens.reshape(m, n, -1)[:, :, idx]  # (M, N, P): the valid pixels only
    broken = broken_map.reshape(-1)[idx]  # (P,) a member NaN where obs is valid
    # one stack: series 0 is obs, 1..M the members
    series = np.concatenate([obs.reshape(n, 1, -1)[:, :, idx], e.transpose(1, 0, 2)], axis=1)
    cells = _index_cells(series, dates, calendar, t95, t99, wet_threshold, season_year)
    del series, e
    obs_maps, ens_maps = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in INDEX_NAMES:
            c_ens = np.nanmean(cells[name][1:], axis=0)
            c_ens[broken] = np.nan
            obs_maps[name] = _scatter(cells[name][0], idx, (h, w))
            ens_maps[name] = _scatter(c_ens, idx, (h, w))
    return obs_maps, ens_maps


def index_table(obs_maps: dict, ens_maps: dict, valid: np.ndarray) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The table and bias maps of :func:`ensemble_index_table` from its maps; ``valid``: the (h, w) pixels with
    an observation on some day."""
    rows, bias_maps = [], {}
    for name in INDEX_NAMES:
        o, e = obs_maps[name], ens_maps[name]
        bias = e - o
        bias_maps[name] = bias
        pick = valid & np.isfinite(o)
        rows.append({
            "index": name,
            "obs_mean": float(np.mean(o[pick])) if pick.any() else float("nan"),
            "ens_mean": float(np.mean(e[pick])) if pick.any() else float("nan"),
            "bias_mean": float(np.mean(bias[pick])) if pick.any() else float("nan"),
            "abs_bias_mean": float(np.mean(np.abs(bias[pick]))) if pick.any() else float("nan"),
        })
    table = pd.DataFrame(rows, columns=["index", "obs_mean", "ens_mean", "bias_mean", "abs_bias_mean"])
    return table, bias_maps


def ensemble_index_table(ens, obs, dates: Sequence[str], calendar: str, p95, p99,
                         wet_threshold: float = 1.0, season_year: str = "calendar"
                         ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Index maps of the observations and of the members, their bias and its spatial means.

    Each member is treated as its own daily series (:func:`index_maps`); the ensemble map
    of an index is the mean over members of the member maps (over the members where it is
    defined).  The bias map is ensemble map minus observed map.  Spatial means run over the
    pixels where ``obs`` is valid and the observed index is defined; a member NaN at such a
    pixel makes that pixel's ensemble map, bias and every spatial mean NaN.

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1 (member axis first); values at masked pixels
        are ignored
    obs : ndarray (N, h, w), mm day-1; NaN = missing (a masked pixel every day, or a missing
        observation on some days: that day is missing for the members too)
    dates, calendar, p95, p99, wet_threshold, season_year
        As in :func:`index_maps` (``p95``/``p99``: the observed wet-day percentiles).

    Returns
    -------
    table : pandas.DataFrame
        One row per index of :data:`INDEX_NAMES`; columns ``index``, ``obs_mean``,
        ``ens_mean`` (spatial means of the maps), ``bias_mean`` (spatial mean of the bias)
        and ``abs_bias_mean`` (spatial mean of its absolute value), in the units of
        :data:`INDEX_UNITS`.
    bias_maps : dict[str, ndarray (h, w)]
        Ensemble map minus observed map; NaN at masked pixels.
    """
    obs_maps, ens_maps = ensemble_index_maps(ens, obs, dates, calendar, p95, p99, wet_threshold, season_year)
    return index_table(obs_maps, ens_maps, _valid_pixels(np.asarray(obs, dtype=np.float64)))


# ----------------------------------------------------------------------------- distributions


def wasserstein_map(ens, obs) -> np.ndarray:
    """Per-pixel 1-Wasserstein distance between the pooled member values and the observed ones.

    At each pixel, W1 between the empirical distribution of the M N member values and that
    of the N observed values (what ``scipy.stats.wasserstein_distance`` returns).  Computed
    from sorted samples: with A = M N member values u_(0) <= ... <= u_(A-1) and N observed
    v_(0) <= ... <= v_(N-1), the quantile function of the observations is constant on each
    interval (i/A, (i+1)/A], equal to v_(i // M), so W1 = mean_i |u_(i) - v_(i // M)|
    exactly (the integral of the absolute difference of the quantile functions).

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1
    obs : ndarray (N, h, w), mm day-1; NaN = excluded pixel

    Returns
    -------
    ndarray (h, w)
        mm day-1; NaN at masked pixels and where a member is NaN at a valid pixel.
    """
    ens, obs = _check_ens_obs(ens, obs)
    m, n = ens.shape[:2]
    valid = _valid_pixels(obs)
    idx = np.flatnonzero(valid)
    ens, broken = _where_observed(ens, obs)
    e = ens.reshape(m * n, -1)
    o = obs.reshape(n, -1)
    out = np.full(valid.size, np.nan)
    for a in range(0, idx.size, _PIXELS_PER_CHUNK):
        cols = idx[a:a + _PIXELS_PER_CHUNK]
        # NaN sort last: at a pixel with n_p observed days the first M n_p rows of both are the
        # sorted values (each observation repeated M times), the rest NaN
        u = np.sort(e[:, cols], axis=0)  # (M N, p)
        v = np.repeat(np.sort(o[:, cols], axis=0), m, axis=0)  # (M N, p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[cols] = np.nanmean(np.abs(u - v), axis=0)
    out[broken.reshape(-1)] = np.nan
    return out.reshape(valid.shape)


def _bin_edges(bins, lo: float, hi: float) -> np.ndarray:
    if np.ndim(bins) == 0:
        width = float(bins)
        if not width > 0:
            raise ValueError(f"bins: a bin width must be > 0 mm day-1, got {bins!r}")
        start = np.floor(min(lo, 0.0) / width) * width
        nb = max(1, int(np.floor((hi - start) / width)) + 1)
        return start + width * np.arange(nb + 1)
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bins: give a bin width or increasing bin edges (at least two)")
    return edges


def _histograms(x: np.ndarray, edges: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Counts per bin of each column of x (K, p) over the entries where ``keep`` -> (p, nb)."""
    nb = edges.size - 1
    b = np.searchsorted(edges, x, side="right") - 1
    b[x == edges[-1]] = nb - 1  # the last bin includes its right edge, as np.histogram
    inside = keep & (b >= 0) & (b < nb)
    flat = (b + nb * np.arange(x.shape[1])[None, :])[inside]
    return np.bincount(flat, minlength=nb * x.shape[1]).reshape(x.shape[1], nb)


def perkins_skill_score(ens, obs, bins=1.0, wet_threshold: float | None = None
                        ) -> tuple[np.ndarray, float]:
    """Perkins skill score (Perkins et al. 2007) of the pooled members at each pixel.

    PSS = sum over bins of min(f_model, f_obs), where f is the fraction of a sample in each
    bin: 1 for identical histograms, 0 for disjoint ones.  The model sample of a pixel is
    the M N member values pooled, the observed one its N values.  By default all days count
    (dry days fill the first bin, so the dry-day frequency is part of the score) and the bins
    are 1 mm day-1 wide, common to all pixels, from min(0, smallest value) to past the
    largest value of either sample over the valid pixels.  (CORDEX-ML-Bench has no PSS; these
    are the choices of Perkins et al. for daily precipitation, with 1 mm bins.)

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1
    obs : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    bins : float or 1-D array
        A bin width in mm day-1, or explicit increasing edges (the last bin includes its
        right edge; values outside the edges fall in no bin but still count in the sample
        size, so edges that miss data lower the score).
    wet_threshold : float or None
        With a value, only the days with ``value >= wet_threshold`` enter either sample
        (each normalised by its own wet count); NaN at a pixel where a sample has none.

    Returns
    -------
    pss : ndarray (h, w)
        Dimensionless in [0, 1]; NaN at masked pixels and where a member is NaN at a valid
        pixel.
    mean : float
        Spatial mean over the valid pixels where the observed sample is not empty; NaN if a
        member NaN reaches one of them.
    """
    ens, obs = _check_ens_obs(ens, obs)
    m, n = ens.shape[:2]
    valid = _valid_pixels(obs)
    idx = np.flatnonzero(valid)
    out = np.full(valid.size, np.nan)
    if idx.size == 0:
        return out.reshape(valid.shape), float("nan")
    ens, broken_map = _where_observed(ens, obs)  # a missing observation: a missing day for the members
    e = ens.reshape(m * n, -1)
    o = obs.reshape(n, -1)
    ev, ov = e[:, idx], o[:, idx]
    fin, ofin = np.isfinite(ev), np.isfinite(ov)
    both = np.r_[ev[fin], ov[ofin]]
    edges = _bin_edges(bins, float(both.min()), float(both.max()))
    broken = broken_map.reshape(-1)[idx]
    defined_obs = np.ones(idx.size, dtype=bool)
    step = max(1, min(_PIXELS_PER_CHUNK, _HISTOGRAM_CELLS // (edges.size - 1)))  # bounded counts per chunk
    for a in range(0, idx.size, step):
        sl = slice(a, a + step)
        eu, ou = ev[:, sl], ov[:, sl]
        ke = np.isfinite(eu) if wet_threshold is None else np.isfinite(eu) & (eu >= wet_threshold)
        ko = ofin[:, sl] if wet_threshold is None else ofin[:, sl] & (ou >= wet_threshold)
        ne, no = ke.sum(axis=0), ko.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fe = _histograms(np.where(np.isfinite(eu), eu, 0.0), edges, ke) / ne[:, None]
            fo = _histograms(np.where(ofin[:, sl], ou, 0.0), edges, ko) / no[:, None]
            score = np.sum(np.minimum(fe, fo), axis=1)
        score[(ne == 0) | (no == 0)] = np.nan
        defined_obs[sl] = no > 0
        out[idx[sl]] = score
    out[idx[broken]] = np.nan
    pick = defined_obs
    mean = float(np.mean(out[idx[pick]])) if pick.any() else float("nan")
    return out.reshape(valid.shape), mean


# ----------------------------------------------------------------------------- spectra


def _log_spectral_distance_sq(p_model: np.ndarray, p_obs: np.ndarray) -> float:
    """mean over wavenumbers of (10 log10(p_model / p_obs))^2, over bins where both are > 0."""
    keep = np.isfinite(p_model) & np.isfinite(p_obs) & (p_model > 0) & (p_obs > 0)
    if not keep.any():
        return float("nan")
    db = 10.0 * np.log10(p_model[keep] / p_obs[keep])
    return float(np.mean(db ** 2))


def ralsd_of_mean_spectra(p_members: np.ndarray, p_obs: np.ndarray) -> float:
    """The ``'ml-bench'`` :func:`ralsd` from each member's day-mean spectrum (M, K) and the truth's (K,)."""
    d = [_log_spectral_distance_sq(p, p_obs) for p in p_members]
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def ralsd(ens, obs, definition: str = "ml-bench") -> float:
    """Radially averaged log spectral distance of the members to the truth.

    Spectra are :func:`precip_cvae.metrics.rapsd` (mean over valid pixels removed, NaN
    pixels then set to 0, power per radial wavenumber bin k = 1 .. L // 2).  The members
    are given the NaN of ``obs`` first, so both spectra are of the same valid pixels (the
    way :func:`precip_cvae.metrics.mean_rapsd` treats them).  Only wavenumber bins where
    both powers are > 0 enter a distance.

    ``definition``:

    * ``'ml-bench'`` (default) -- CORDEX-ML-Bench's ``evaluation/diagnostics.ralsd``: the
      spectra are first averaged over days (:func:`~precip_cvae.metrics.mean_rapsd`), then
      RALSD = mean over k of (10 log10(P_member(k) / P_obs(k)))^2 -- with *no* square root,
      so in dB^2 -- computed for each member and averaged over members.  This differs from
      Harris et al. (2022) in both the square root and the order of averaging; it is kept so
      the numbers compare with the benchmark's.
    * ``'harris'`` -- Harris et al. (2022): for each member and day,
      sqrt(mean over k of (10 log10(P_member,day(k) / P_obs,day(k)))^2) in dB, averaged over
      members and days.  Days whose observed field is constant over the valid pixels
      (e.g. dry everywhere: zero power) have no spectrum and are skipped.

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1
    obs : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    definition : {'ml-bench', 'harris'}

    Returns
    -------
    float
        0 when every member equals the truth; dB^2 ('ml-bench') or dB ('harris').  NaN when a
        member is NaN at a valid pixel, or when no wavenumber bin (no day) qualifies.
    """
    if definition not in RALSD_DEFINITIONS:
        raise ValueError(f"definition {definition!r} is not one of {list(RALSD_DEFINITIONS)}")
    ens, obs = _check_ens_obs(ens, obs)
    valid = np.isfinite(obs)
    if not valid.any(axis=(1, 2)).all():
        raise ValueError("ralsd: every obs day needs at least one valid pixel")
    if (valid & ~np.isfinite(ens)).any():
        return float("nan")
    ens = np.where(valid, ens, np.nan)
    if definition == "ml-bench":
        return ralsd_of_mean_spectra(np.stack([mean_rapsd(member)[1] for member in ens]), mean_rapsd(obs)[1])
    spectra_obs = [rapsd(day)[1] for day in obs]
    dist = []
    for member in ens:
        for day, p_obs in zip(member, spectra_obs):
            if not np.any(p_obs > 0):
                continue
            dist.append(np.sqrt(_log_spectral_distance_sq(rapsd(day)[1], p_obs)))
    return float(np.nanmean(dist)) if np.isfinite(dist).any() else float("nan")


def distribution_scores(ens, obs) -> dict[str, float]:
    """Spatial mean of :func:`wasserstein_map` (mm day-1) and of :func:`perkins_skill_score`, and
    :func:`ralsd` (dB^2), of the members against the observations."""
    w = wasserstein_map(ens, obs)
    _, pss = perkins_skill_score(ens, obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w_mean = float(np.nanmean(w)) if np.isfinite(w).any() else float("nan")
    return {"wasserstein": w_mean, "perkins_skill_score": float(pss), "ralsd": ralsd(ens, obs)}


# ----------------------------------------------------------------------------- extremes


def seasonal_maxima(values, dates: Sequence[str], season_year: str = "calendar") -> pd.Series:
    """Per-season (or per-year) maximum of the domain-mean daily precipitation.

    The domain mean of a day is its mean over the finite pixels (NaN = excluded pixel).
    Seasons as in :func:`precip_cvae.split.season_years`: the calendar year, or with
    ``'djf'`` the year of the season's January.

    Parameters
    ----------
    values : ndarray (N, h, w) or (N,), mm day-1
    dates : sequence of N ISO strings 'YYYY-MM-DD' (any calendar: only year and month
        are read)
    season_year : {'calendar', 'djf'}

    Returns
    -------
    pandas.Series
        mm day-1, indexed by season year (``season_year``), one value per season that
        holds at least one day with a finite domain mean, in increasing order.
    """
    period_freq(season_year)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim not in (1, 3) or v.shape[0] != len(dates):
        raise ValueError(f"values {v.shape} must be (N,) or (N, h, w) with N = len(dates) = {len(dates)}")
    if v.ndim == 3:
        fin = np.isfinite(v)
        cnt = fin.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            daily = np.where(fin, v, 0.0).sum(axis=(1, 2)) / cnt
        daily[cnt == 0] = np.nan
    else:
        daily = v
    years = season_years([_YearMonth(*_ymd(d)[:2]) for d in dates], season_year)
    s = pd.Series(daily, index=pd.Index(years, name="season_year"))
    return s.dropna().groupby(level=0).max().rename("max_domain_mean")


def gev_return_levels(maxima, periods: Sequence[float] = (2, 5, 10, 20), confidence: float = 0.9,
                      n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """GEV return levels of block maxima with parametric-bootstrap intervals.

    ``scipy.stats.genextreme`` is fitted by maximum likelihood.  Mind its sign convention:
    scipy's shape ``c`` is minus the usual GEV shape xi (c = -xi), so c < 0 is a heavy
    (Frechet) upper tail and c > 0 a bounded (Weibull) one.  The T-period return level is the
    1 - 1/T quantile of the fitted GEV.  The interval is a parametric bootstrap: ``n_boot``
    samples of the same size are drawn from the fitted GEV (``numpy.random.default_rng(seed)``),
    each is refitted (starting from the fitted parameters) and its return levels taken; the
    bounds are the (1 -+ confidence) / 2 quantiles of those.  Refits that fail (non-finite) are
    dropped.

    Parameters
    ----------
    maxima : array (n,), e.g. mm day-1 (:func:`seasonal_maxima`)
    periods : sequence of float > 1, return periods in blocks (seasons / years)
    confidence : float in (0, 1)
    n_boot : int >= 1
    seed : int

    Returns
    -------
    pandas.DataFrame
        Columns ``period``, ``level``, ``lower``, ``upper`` (units of ``maxima``), one row per
        period.

    Raises
    ------
    ValueError
        Fewer than 5 maxima (the count is named), non-finite maxima, maxima all equal, a
        period <= 1 or a confidence outside (0, 1).
    """
    x = np.asarray(maxima, dtype=np.float64).ravel()
    if x.size < 5:
        raise ValueError(f"gev_return_levels needs at least 5 block maxima, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"gev_return_levels: {int((~np.isfinite(x)).sum())} of {x.size} maxima are not finite")
    if np.ptp(x) == 0:
        raise ValueError(f"gev_return_levels: all {x.size} maxima are equal ({x[0]!r}); no GEV to fit")
    t = np.asarray(periods, dtype=np.float64)
    if np.any(t <= 1):
        raise ValueError(f"return periods must be > 1 block, got {list(periods)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    gev = stats.genextreme
    q = 1.0 - 1.0 / t
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        c, loc, scale = gev.fit(x)
        level = gev.ppf(q, c, loc=loc, scale=scale)
        rng = np.random.default_rng(seed)
        boot = np.full((int(n_boot), t.size), np.nan)
        for b in range(int(n_boot)):
            sample = gev.rvs(c, loc=loc, scale=scale, size=x.size, random_state=rng)
            cb, lb, sb = gev.fit(sample, c, loc=loc, scale=scale)
            boot[b] = gev.ppf(q, cb, loc=lb, scale=sb)
    ok = np.isfinite(boot).all(axis=1)
    if not ok.any():
        raise ValueError("gev_return_levels: every bootstrap refit failed")
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(boot[ok], [alpha, 1.0 - alpha], axis=0)
    return pd.DataFrame({"period": t, "level": level, "lower": lower, "upper": upper})
