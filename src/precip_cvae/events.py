"""The ``detect_events`` stage: per-pixel heavy-precipitation thresholds and heavy days.

Thresholds are the ``percentile`` of wet days (pr >= ``wet_threshold``) per
pixel on the **train split only** (linear interpolation, numpy's default).  A
pixel with fewer than ``min_wet_days`` wet train days falls back to the pooled
value: the same percentile over all wet train values of all valid pixels (and
such pixels are counted in the map's attributes).

A day is a heavy-event day by ``criterion``:

* ``exceedance``: the fraction of its valid pixels above their local threshold
  is >= ``min_exceed_fraction``;
* ``domain_mean``: its domain-mean precipitation is above the
  ``domain_mean_percentile`` of the train days' domain means;
* ``either``: one of the two.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd
import xarray as xr

from . import cf
from .config import EventsConfig, lookup
from .io import InputError, open_zarr, write_csv, write_netcdf
from .split import format_times

log = logging.getLogger(__name__)


def extreme_values(x, k: int, largest: bool = True, split_every: int = 4):
    """The ``k`` largest (or smallest) values along axis 0, sorted from the extreme inwards.

    A tree reduction over the blocks of axis 0 that keeps ``k`` values per position
    and block, so memory is bounded by one block plus ``split_every`` x ``k`` values
    per position, whatever the length of axis 0 (a percentile over time needs no
    rechunking to one time chunk, which would hold all of time in memory).

    Parameters
    ----------
    x : dask or numpy array (N, ...); values that must not count are -inf
        (``largest``) or +inf, and a 1-D ``x`` drops them first (numpy's partition
        is slow on long runs of equal values).
    k : number of values kept (at most N).

    Returns
    -------
    array (min(k, N), ...): lazy (dask) for dask input, numpy for numpy input.
    """
    import dask.array as dsa

    k = int(min(k, x.shape[0]))
    fill = -np.inf if largest else np.inf

    def keep(a, axis=None, keepdims=True):  # (n, ...) -> (min(k, n), ...), a copy (no view of the block)
        if a.ndim == 1:
            a = a[a != fill]
        n = a.shape[0]
        if n <= k:
            return a
        rows = np.ascontiguousarray(a.reshape(n, -1).T)  # (positions, n): selection is fastest on contiguous rows
        rows.partition(n - k if largest else k - 1, axis=-1)
        rows = rows[:, n - k:] if largest else rows[:, :k]
        return np.ascontiguousarray(rows.T).reshape((k, *a.shape[1:]))

    def finish(a, axis=None, keepdims=True):
        a = np.sort(keep(a), axis=0)
        return a[::-1] if largest else a

    if not isinstance(x, dsa.Array):
        return finish(np.asarray(x))
    return dsa.reduction(x, keep, finish, combine=keep, axis=0, keepdims=True, dtype=x.dtype,
                         split_every=split_every, concatenate=True, output_size=k)


def _percentile_ranks(n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, gamma): numpy's 'linear' percentile ``q`` (0..1) of ``n`` sorted values is
    ``x[lo] + gamma * (x[hi] - x[lo])`` (0-based ranks, ascending), computed as numpy does (:func:`_lerp`)."""
    n = np.asarray(n, dtype=np.int64)
    h = q * (np.maximum(n, 1) - 1)
    lo = np.floor(h).astype(np.int64)
    return lo, np.minimum(lo + 1, np.maximum(n - 1, 0)), h - lo


def _lerp(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, n: np.ndarray) -> np.ndarray:
    """numpy's interpolation between the order statistics ``a`` and ``b``; NaN where ``n`` is 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = b - a
        out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
    return np.where(np.asarray(n) > 0, out, np.nan)


def _linear_percentile(ext: np.ndarray, n: np.ndarray, q: float, largest: bool) -> np.ndarray:
    """numpy's 'linear' percentile ``q`` (0..1) of ``n`` values from their extreme values.

    ``ext`` (k, ...) holds, per position, the ``k`` largest values in decreasing order
    (``largest``) or the smallest in increasing order; ``k`` covers the two order
    statistics the percentile reads (:func:`_extremes_needed`).  NaN where ``n`` is 0.
    """
    n = np.asarray(n, dtype=np.int64)
    lo, hi, gamma = _percentile_ranks(n, q)
    if largest:  # ascending position i is position n - 1 - i of the decreasing list
        lo, hi = np.maximum(n - 1 - lo, 0), np.maximum(n - 1 - hi, 0)
    a = np.take_along_axis(ext, lo[None], axis=0)[0]
    b = np.take_along_axis(ext, hi[None], axis=0)[0]
    return _lerp(a, b, gamma, n)


def _extremes_needed(n: int, q: float) -> tuple[int, bool]:
    """(k, largest): how many extreme values of ``n`` hold the linear percentile ``q``, from which end."""
    lo = int(np.floor(q * (n - 1)))
    top, bottom = n - lo + 1, lo + 3  # one spare against round-off in q * (n - 1)
    return (top, True) if top <= bottom else (bottom, False)


# Percentiles from the k extreme values per pixel when those fit this budget; beyond it (k grows with the
# record: a P90 keeps a tenth of every pixel's wet days), from bracketing histograms in memory bounded by the grid
EXTREMES_MEMORY_MB = 256.0
BRACKET_BINS = 64  # bins of one histogram pass
BRACKET_COLLECT = 64  # a rank this near the low end of its bracket is read from the bracket's values
_REFINE, _COLLECT, _DONE = 0, 1, 2


def _bin_edge(lo: np.ndarray, hi: np.ndarray, b: np.ndarray, bins: int) -> np.ndarray:
    """The lower edge of bin ``b`` of [lo, hi) cut in ``bins`` equal bins; bin ``bins`` starts at ``hi``.  Values
    are binned by these same edges (:func:`_bin_of`), so a bracket holds exactly the values counted in its bin."""
    return np.where(b >= bins, hi, lo + (hi - lo) * (b / bins))


def _bin_of(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each value ``v`` in [lo, hi) (the arrays matched element by element)."""
    b = np.clip(np.floor((v - lo) / (hi - lo) * bins), 0, bins - 1).astype(np.int64)
    for _ in range(bins):  # round-off in the division: the edges decide (in a bracket a few ulps wide, edges
        down = (v < _bin_edge(lo, hi, b, bins)) & (b > 0)  # coincide and the estimate can be bins away)
        up = (v >= _bin_edge(lo, hi, b + 1, bins)) & (b < bins - 1)
        if not (down.any() or up.any()):
            break
        b = b - down + up
    return b


BRACKET_SLAB_VALUES = 2**22  # values binned at a time (the index arrays of a slab's wet values stay small)


def _parts(slabs, positions: int):
    """The (t, P) arrays of one pass of ``slabs()``, cut into parts of about :data:`BRACKET_SLAB_VALUES` values."""
    step = max(1, BRACKET_SLAB_VALUES // max(positions, 1))
    for slab in slabs():
        for i in range(0, slab.shape[0], step):
            yield slab[i:i + step]


def _histogram_pass(slabs, lo, hi, active, bins):
    """Counts per position and bin of [lo, hi) (``active`` positions only), and each bracket's smallest and
    largest value, over one pass of ``slabs``."""
    R, P = lo.shape
    # ranks whose brackets are the same (the two ranks of a percentile start so, and often stay so) share counts
    first = [next(j for j in range(r + 1) if np.array_equal(lo[j], lo[r]) and np.array_equal(hi[j], hi[r])
                  and np.array_equal(active[j], active[r])) for r in range(R)]
    # a pixel's counts are at most its days; one position pooling a grid's values can pass 2**31
    counts = np.zeros((R, P * bins), np.int32 if P > 4096 else np.int64)
    vmin, vmax = np.full((R, P), np.inf), np.full((R, P), -np.inf)
    one = np.int32(1)
    for part in _parts(slabs, P):
        for r in (r for r in range(R) if first[r] == r):
            inside = (part >= lo[r]) & (part < hi[r]) & active[r]  # NaN is never inside
            t, p = np.nonzero(inside)
            if not p.size:
                continue
            b = _bin_of(part[t, p].astype(np.float64), lo[r, p], hi[r, p], bins)
            np.add.at(counts[r], p * bins + b, one)
            vmin[r] = np.minimum(vmin[r], np.where(inside, part, np.inf).min(axis=0))
            vmax[r] = np.maximum(vmax[r], np.where(inside, part, -np.inf).max(axis=0))
    for r in range(R):
        if first[r] != r:
            counts[r], vmin[r], vmax[r] = counts[first[r]], vmin[first[r]], vmax[first[r]]
    return counts.reshape(R, P, bins), vmin, vmax


def order_statistics(slabs, ranks: np.ndarray, top: np.ndarray, floor: float, bins: int = BRACKET_BINS,
                     collect: int = BRACKET_COLLECT, max_rounds: int = 8) -> np.ndarray:
    """Exact order statistics per position, in memory bounded by the number of positions, not of values.

    Each pass over the values (``slabs()``: a fresh iterator of (t, P) arrays) counts them in ``bins`` bins of
    every wanted rank's bracket [lo, hi) and narrows the bracket to the bin that holds the rank (the values
    below it counted).  A bracket whose values are all equal gives the rank's value; once a bracket holds at
    most ``collect`` values, one last pass reads them and the rank is picked among them.  Memory: a slab,
    ``bins`` counts per position and rank (4 bytes each), and in the last pass up to ``collect`` values and their
    positions per position and rank, sorted.  Round-off cannot lose a value: values are
    binned by the edges that become the brackets.  A bracket still fuller after ``max_rounds`` (values that
    differ by round-off only) is read whole.

    Parameters
    ----------
    slabs : callable returning an iterable of (t, P) arrays; the values counted are the finite ones >= ``floor``
    ranks : (R, P) int, 0-based ranks in ascending order among each position's counted values; -1: none wanted
    top : (P,), the largest counted value of each position (any value where no rank is wanted)
    floor : the smallest value counted

    Returns
    -------
    (R, P) float64, NaN where no rank is wanted.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    R, P = ranks.shape
    lo = np.full((R, P), float(floor))
    hi = np.broadcast_to(np.nextafter(np.asarray(top, dtype=np.float64), np.inf), (R, P)).copy()
    below = np.zeros((R, P), np.int64)  # counted values under lo
    value = np.full((R, P), np.nan)
    state = np.where(ranks < 0, _DONE, _REFINE)
    for rounds in range(max_rounds):
        refine = state == _REFINE
        if not refine.any():
            break
        counts, vmin, vmax = _histogram_pass(slabs, lo, hi, refine, bins)
        same = refine & (vmin == vmax)  # one value left in the bracket: the rank's
        value[same], state[same] = vmin[same], _DONE
        refine &= ~same
        b, first, held = np.zeros((R, P), np.int64), np.zeros((R, P), np.int64), np.zeros((R, P), np.int64)
        for r in range(R):  # one rank at a time, the counts made cumulative in place (memory)
            cum = np.cumsum(counts[r], axis=-1, out=counts[r])
            b[r] = np.minimum((cum <= (ranks[r] - below[r])[:, None]).sum(axis=-1), bins - 1)  # the bin of the rank
            upto = np.take_along_axis(cum, b[r][:, None], axis=-1)[:, 0]
            first[r] = np.where(b[r] > 0, np.take_along_axis(cum, np.maximum(b[r] - 1, 0)[:, None], axis=-1)[:, 0], 0)
            held[r] = upto - first[r]
        del counts
        new_lo, new_hi = _bin_edge(lo, hi, b, bins), _bin_edge(lo, hi, b + 1, bins)
        lo, hi = np.where(refine, new_lo, lo), np.where(refine, new_hi, hi)
        below = np.where(refine, below + first, below)
        state[refine & (held <= collect)] = _COLLECT
    log.debug("order statistics: %d histogram passes", rounds + 1)
    pending = state != _DONE  # in a bracket of at most ``collect`` values, or after max_rounds
    if pending.any():
        need = np.where(pending, ranks - below, 0)
        vals: list[list] = [[] for _ in range(R)]
        where: list[list] = [[] for _ in range(R)]
        for part in _parts(slabs, P):
            for r in range(R):
                t, p = np.nonzero((part >= lo[r]) & (part < hi[r]) & pending[r])
                vals[r].append(part[t, p])
                where[r].append(p.astype(np.int32))
        for r in range(R):
            v, p = np.concatenate(vals[r]), np.concatenate(where[r])
            order = np.lexsort((v, p))  # by position, then value
            v, p = v[order], p[order]
            idx = np.searchsorted(p, np.arange(P)) + need[r]
            got = v[np.minimum(idx, max(v.size - 1, 0))] if v.size else np.full(P, np.nan)
            value[r] = np.where(pending[r], got, value[r])
    return value


def _time_slabs(data, flatten: np.ndarray | None = None):
    """A function returning an iterator over the time chunks of ``data`` (dask, (T, H, W)) as numpy (t, H * W)
    arrays; with ``flatten`` (a (H, W) mask), the masked cells of each chunk as one column (t * cells, 1)."""
    def slabs():
        start = 0
        for size in data.chunks[0]:
            a = np.asarray(data[start:start + size].compute())
            start += size
            a = a.reshape(a.shape[0], -1)
            yield a if flatten is None else a[:, flatten.reshape(-1)].reshape(-1, 1)
    return slabs


def _bracketed_percentile(data, floor: float, n: np.ndarray, top: np.ndarray, q: float,
                          flatten: np.ndarray | None = None) -> np.ndarray:
    """numpy's linear percentile ``q`` of each position's values >= ``floor`` (``n`` of them, the largest
    ``top``) by :func:`order_statistics`: per pixel, or over the ``flatten`` cells as one position."""
    if np.issubdtype(data.dtype, np.floating):  # ``data >= floor`` compares in the data's precision (float32:
        floor = float(np.asarray(floor, dtype=data.dtype))  # 0.7 is 0.69999999), so must the brackets
    lo, hi, gamma = _percentile_ranks(n, q)
    wanted = np.asarray(n).reshape(-1) > 0
    ranks = np.where(wanted, np.stack([lo.reshape(-1), hi.reshape(-1)]), -1)
    top = np.where(wanted, np.asarray(top, dtype=np.float64).reshape(-1), floor)
    a, b = order_statistics(_time_slabs(data, flatten), ranks, top, floor)
    return _lerp(a, b, gamma.reshape(-1), np.asarray(n).reshape(-1)).reshape(np.shape(n))


def wet_day_thresholds(pr: xr.DataArray, mask: xr.DataArray, cfg: EventsConfig,
                       memory_mb: float | None = None) -> xr.DataArray:
    """Per-pixel wet-day percentile thresholds (lat, lon) in mm/day.

    Streams over time (dask or numpy input): a first pass counts the wet days per
    pixel; a second keeps, per pixel, the wet values nearer to the percentile's end
    of the distribution (the top ``1 - q`` share of the most wet days of a pixel:
    1 % for P99); when a valid pixel has fewer than ``min_wet_days`` wet days, a
    third keeps the same share of all wet values of the valid pixels for the
    pooled fallback.  Memory: a few time chunks plus those shares, never all of
    time at once.  Where the shares would pass ``memory_mb`` (default
    :data:`EXTREMES_MEMORY_MB`; they grow with the record), the second and third
    passes are replaced by bracketing passes (:func:`order_statistics`) whose memory
    is bounded by the grid alone.  Values equal numpy's ``nanpercentile``
    ('linear') of the wet days either way.

    Parameters
    ----------
    pr : xr.DataArray (time, lat, lon), mm day-1 -- the train days only.
    mask : xr.DataArray (lat, lon), 1 = valid cell.
    memory_mb : the budget of the extreme values kept per pixel (see above).

    Returns
    -------
    xr.DataArray (lat, lon), mm day-1; NaN outside the mask.  Attributes record the
    percentile, wet threshold, pooled value and the number of pixels using it.
    """
    import dask
    import dask.array as dsa

    q = cfg.percentile / 100.0
    pr = pr.transpose("time", "lat", "lon")
    data = pr.data  # (T, H, W), dask or numpy
    if not isinstance(data, dsa.Array):
        data = dsa.from_array(np.asarray(data), chunks=(256, -1, -1))
    wet = data >= cfg.wet_threshold  # NaN is not wet
    coords = {c: pr[c] for c in ("lat", "lon") if c in pr.coords}
    # pass 1: wet days per pixel, which say how many extreme values the percentile needs, and the wettest
    n_wet, top = dask.compute(wet.sum(axis=0), dsa.where(wet, data, -np.inf).max(axis=0))
    n_wet = xr.DataArray(n_wet, dims=("lat", "lon"), coords=coords)
    if np.isposinf(top).any():
        source = pr.encoding.get("source")
        raise InputError(f"{source + ': ' if source else ''}{pr.name or 'precipitation'}: +inf on a wet day at "
                         f"{int(np.isposinf(top).sum())} cells; expected finite values (mm/day) to fit the wet-day "
                         "percentiles")
    valid = mask.astype(bool).compute()
    use_pooled = (n_wet < cfg.min_wet_days) & valid
    n_all = int(n_wet.where(valid, 0).sum())
    if bool(use_pooled.any()) and n_all == 0:
        raise InputError(f"no wet day (pr >= {cfg.wet_threshold} mm/day) in the train split; cannot fit thresholds")
    budget = EXTREMES_MEMORY_MB if memory_mb is None else memory_mb
    item = np.dtype(data.dtype).itemsize
    # pass 2: the extreme wet values per pixel (or, beyond the budget, the bracketing passes)
    k, largest = _extremes_needed(max(int(n_wet.max()), 1), q)
    if 3 * k * int(np.prod(data.shape[1:])) * item / 2**20 <= budget:  # a combine holds 2 x k, plus its result
        (ext,) = dask.compute(extreme_values(dsa.where(wet, data, -np.inf if largest else np.inf), k, largest,
                                             split_every=2))
        local = _linear_percentile(ext, n_wet.values, q, largest)
    else:
        log.info("wet-day P%g from bracketing histograms (%d extreme values a pixel exceed %g MB)",
                 cfg.percentile, k, budget)
        local = _bracketed_percentile(data, cfg.wet_threshold, n_wet.values, top, q)
    local = xr.DataArray(local, dims=("lat", "lon"), coords=coords)
    pooled = np.nan
    if bool(use_pooled.any()):  # pass 3 (a pass of its own: together with pass 2 the peak memory is higher)
        k_all, largest_all = _extremes_needed(n_all, q)
        if 3 * k_all * item / 2**20 <= budget:
            pooled_values = dsa.where(wet & np.asarray(valid.values)[None], data, -np.inf if largest_all else np.inf)
            (ext_all,) = dask.compute(extreme_values(pooled_values.reshape(-1), k_all, largest_all))
            pooled = float(_linear_percentile(ext_all, np.array(n_all), q, largest_all))
        else:
            top_all = float(np.max(np.where(valid.values, top, -np.inf)))
            pooled = float(_bracketed_percentile(data, cfg.wet_threshold, np.array([n_all]), np.array([top_all]), q,
                                                 flatten=np.asarray(valid.values))[0])
    thr = xr.where(use_pooled, pooled, local).where(valid).astype("float32")
    thr.name = "threshold"
    thr.attrs = {
        "units": "mm day-1",
        "long_name": f"P{cfg.percentile:g} of wet-day precipitation (train split)",
        "percentile": float(cfg.percentile),
        "wet_threshold_mm_day": float(cfg.wet_threshold),
        "min_wet_days": int(cfg.min_wet_days),
        "pooled_value": float(pooled) if np.isfinite(pooled) else "none",
        "n_pooled_pixels": int(use_pooled.sum()),
    }
    return thr


def field_statistics(fields: np.ndarray, thr: np.ndarray, wet_threshold: float = 1.0,
                     mask: np.ndarray | None = None) -> pd.DataFrame:
    """Per-field domain mean, domain max, exceedance and wet fractions over the valid pixels.

    The one definition of a day's statistics: real days (:func:`daily_statistics`, the events table)
    and generated samples (``generate``'s heavy filter and report) are judged by this code.

    Parameters
    ----------
    fields : ndarray (N, H, W), mm day-1, NaN where missing
    thr : ndarray (H, W), mm day-1, the local heavy threshold (NaN where masked)
    wet_threshold : a pixel is wet at >= this (mm day-1)
    mask : ndarray (H, W) bool, optional; a pixel is valid where it is in the mask and not missing

    Returns
    -------
    DataFrame with domain_mean, domain_max (NaN for a field without valid pixel), exceed_fraction,
    wet_fraction and n_valid.
    """
    fields = np.asarray(fields)
    valid = np.isfinite(fields)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    n_valid = valid.sum(axis=(1, 2))
    per = np.maximum(n_valid, 1)
    with np.errstate(invalid="ignore"):
        exceed = ((fields > thr) & valid).sum(axis=(1, 2)) / per
        wet = ((fields >= wet_threshold) & valid).sum(axis=(1, 2)) / per
    inside = np.where(valid, fields, 0.0).astype(np.float64)
    total = inside.sum(axis=(1, 2))
    peak = np.where(valid, fields, -np.inf).max(axis=(1, 2)) if fields.size else np.zeros(len(fields))
    some = n_valid > 0
    return pd.DataFrame(
        {
            "domain_mean": np.where(some, total / per, np.nan),
            "domain_max": np.where(some, peak, np.nan).astype(float),
            "exceed_fraction": exceed.astype(float),
            "wet_fraction": wet.astype(float),
            "n_valid": n_valid.astype(int),
        }
    )


def daily_statistics(pr: xr.DataArray, thr: xr.DataArray, mask: xr.DataArray, wet_threshold: float = 1.0
                     ) -> pd.DataFrame:
    """:func:`field_statistics` of every day of ``pr`` (time, lat, lon), chunk by chunk along time
    (dask computes the chunks in parallel; memory is one chunk per worker).

    A pixel is valid on a day when it is in the mask and not missing that day.
    """
    import dask

    pr = pr.transpose("time", "lat", "lon")
    thr_v = np.asarray(thr.transpose("lat", "lon").values)
    mask_v = np.asarray(mask.transpose("lat", "lon").values).astype(bool)
    sizes = pr.chunksizes.get("time", (pr.sizes["time"],)) if pr.chunks is not None else (pr.sizes["time"],)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [dask.delayed(field_statistics)(pr.data[a:b], thr_v, wet_threshold, mask_v)
             for a, b in zip(starts[:-1], starts[1:])]
    return pd.concat(dask.compute(*parts), ignore_index=True)


def _by_exceedance(stats: pd.DataFrame, cfg: EventsConfig, limits: dict) -> np.ndarray:
    return stats["exceed_fraction"].values >= cfg.min_exceed_fraction


def _by_domain_mean(stats: pd.DataFrame, cfg: EventsConfig, limits: dict) -> np.ndarray:
    return stats["domain_mean"].values > limits["domain_mean_threshold_mm_day"]


def _by_either(stats: pd.DataFrame, cfg: EventsConfig, limits: dict) -> np.ndarray:
    return _by_exceedance(stats, cfg, limits) | _by_domain_mean(stats, cfg, limits)


EVENT_CRITERIA: dict[str, Callable] = {
    "exceedance": _by_exceedance,
    "domain_mean": _by_domain_mean,
    "either": _by_either,
}


def fit_limits(stats: pd.DataFrame, train: np.ndarray, cfg: EventsConfig) -> dict:
    """Day-level limits fitted on train days: the domain-mean percentile (mm/day)."""
    train_means = stats["domain_mean"].values[np.asarray(train, bool)]
    return {"domain_mean_threshold_mm_day": float(np.nanpercentile(train_means, cfg.domain_mean_percentile))}


def apply_criterion(stats: pd.DataFrame, cfg: EventsConfig, limits: dict) -> np.ndarray:
    """Heavy flag per row of ``stats`` under ``cfg.criterion`` with given (train-fitted) limits.

    Used for real days and for generated samples alike, so both are judged the same way.
    """
    return lookup(EVENT_CRITERIA, cfg.criterion, "event criterion")(stats, cfg, limits)


def classify_days(stats: pd.DataFrame, split: np.ndarray, cfg: EventsConfig) -> tuple[np.ndarray, dict]:
    """Boolean heavy-day flag per day under ``cfg.criterion`` (limits fitted on train days)."""
    limits = fit_limits(stats, np.asarray(split) == "train", cfg)
    return apply_criterion(stats, cfg, limits), limits


def event_table(ds: xr.Dataset, thr: xr.DataArray, cfg: EventsConfig) -> tuple[pd.DataFrame, dict]:
    """The events table: date, split, domain_mean, domain_max, exceed_fraction, is_event."""
    stats = daily_statistics(ds["pr"], thr, ds["mask"], cfg.wet_threshold)
    split = ds["split"].values.astype(str)
    flags, info = classify_days(stats, split, cfg)
    dates = format_times(ds.indexes["time"])
    table = pd.DataFrame({"date": dates, "split": split}).join(stats.drop(columns=["n_valid", "wet_fraction"]))
    table["is_event"] = flags.astype(bool)
    return table, info


def closest_to_heavy(table: pd.DataFrame, cfg: EventsConfig, limits: dict) -> str:
    """The criterion, its threshold and the train day that came closest to it, in words."""
    train = table[table["split"] == "train"]
    parts = []
    if cfg.criterion in ("exceedance", "either"):
        day = train.loc[train["exceed_fraction"].idxmax()]
        parts.append(f"exceedance needs >= {cfg.min_exceed_fraction:.1%} of the valid pixels above their local "
                     f"P{cfg.percentile:g} of wet days (events.min_exceed_fraction); the closest train day, "
                     f"{day['date']}, has {day['exceed_fraction']:.1%}")
    if cfg.criterion in ("domain_mean", "either"):
        day = train.loc[train["domain_mean"].idxmax()]
        parts.append(f"domain_mean needs a domain mean above {limits['domain_mean_threshold_mm_day']:.3g} mm/day "
                     f"(train P{cfg.domain_mean_percentile:g}, events.domain_mean_percentile); the closest train day, "
                     f"{day['date']}, has {day['domain_mean']:.3g} mm/day")
    return f"criterion {cfg.criterion!r}: " + "; ".join(parts)


def summarise(table: pd.DataFrame) -> list[str]:
    """'split: N heavy days of M (x.x %)' per split and overall."""
    lines = []
    for name, part in [*table.groupby("split", sort=False), ("all", table)]:
        n, m = int(part["is_event"].sum()), len(part)
        lines.append(f"{name}: {n} heavy days of {m} ({100.0 * n / max(m, 1):.1f} %)")
    return lines


def run(dataset: str, cfg: EventsConfig, thresholds_out: str, events_out: str) -> pd.DataFrame:
    """Fit thresholds on the train split of ``dataset`` and write the map and the table."""
    ds = open_zarr(dataset)
    train = np.flatnonzero(ds["split"].values.astype(str) == "train")
    if train.size == 0:
        raise InputError(f"{dataset}: no train days; cannot fit thresholds")
    n_train = int(train.size)
    if train[-1] - train[0] + 1 == train.size:  # contiguous: a slice keeps the store's chunks (an index array copies)
        train = slice(int(train[0]), int(train[-1]) + 1)
    thr = wet_day_thresholds(ds["pr"].isel(time=train), ds["mask"], cfg)
    table, info = event_table(ds, thr, cfg)
    n_train_events = int(table.loc[table["split"] == "train", "is_event"].sum())
    if n_train_events == 0:
        message = f"{dataset}: no heavy day in the train split: {closest_to_heavy(table, cfg, info)}"
        if cfg.require_train_events:
            raise InputError(f"{message}; expected at least one to learn from (a longer record, a lower "
                             "events.min_exceed_fraction or percentile, or events.require_train_events: false)")
        log.warning("%s; later stages have no event to learn from (events.require_train_events: false)", message)
    thr.attrs.update({k: v for k, v in info.items()})
    thr.attrs["criterion"] = cfg.criterion
    thr_ds = thr.to_dataset()
    thr_ds["mask"] = ds["mask"]
    thr_ds.attrs = cf.append_history(
        {"title": "precip-cvae heavy-precipitation thresholds", "Conventions": cf.CONVENTIONS,
         "source_dataset": str(dataset), "history": ds.attrs.get("history", ""),
         **{k: ds.attrs[k] for k in ("pad_lat", "pad_lon") if k in ds.attrs}},
        cf.history_line("detect_events", f"local P{cfg.percentile:g} of wet days (>= {cfg.wet_threshold:g} mm/day) "
                        f"fitted on the {n_train} train days of {dataset}"))
    thr_ds = cf.attach_grid_mapping(thr_ds, ds["pr"].attrs.get("grid_mapping_attrs", ""), ["threshold", "mask"], ds)
    for k in ("pad_lat", "pad_lon"):
        if k in thr_ds.attrs:
            thr_ds.attrs[k] = np.asarray(thr_ds.attrs[k], dtype="int32")
    write_netcdf(thr_ds, thresholds_out)
    write_csv(table, events_out)
    log.info(
        "thresholds: P%g of wet days (>= %g mm/day), median %.2f mm/day, %d pixels pooled (%s)",
        cfg.percentile, cfg.wet_threshold, float(thr.median()), thr.attrs["n_pooled_pixels"], thr.attrs["pooled_value"],
    )
    for line in summarise(table):
        log.info("heavy days (%s) %s", cfg.criterion, line)
    return table
