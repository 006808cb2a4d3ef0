"""The ``preprocess`` stage: raw NetCDF -> ``dataset.zarr``.

Data contract of ``dataset.zarr`` (read by every later stage through
:mod:`precip_cvae.data`):

* ``pr`` (time, lat, lon) float32, mm day-1, CF attributes; NaN where a pixel is
  masked (``mask`` False), padded, or sporadically missing (kept as NaN by the
  ``mask`` missing-value policy and excluded from losses and metrics by the
  per-sample validity ``mask & isfinite(pr)``).
* ``condition`` (time, channel, clat, clon) float32, normalised with train-only
  mean/std per channel; missing values are 0 (the train mean): all-sea blocks of the
  block-mean channel, a few predictor cells under ``predictor_missing_cells``, and whole
  days under ``predictor_missing_policy: fill_climatology`` (counted in the log and in
  ``n_condition_filled``; the default policy ``refuse`` stops on a missing predictor day).
* ``coarse_pr`` (time, clat, clon) float32 mm day-1, only when a condition
  channel is precipitation (a predictor flagged ``precipitation: true`` or the
  block-averaged target); used by the mass-conservation checks and the
  interpolation baseline.
* ``mask`` (lat, lon) int8: 1 = a cell with data (land / radar coverage).
* ``split`` (time) str: 'train' | 'val' | 'test'.
* ``cond_mean``, ``cond_std`` (channel): the normalisation statistics.
* ``static`` (static_channel, lat, lon) float32, only with ``data.static``: the user's
  time-invariant fields bilinearly regridded to the target grid (raw units; the
  training stage standardises them), NaN outside the valid cells.
* ``channel`` (channel) str coordinate: predictor names.
* attributes: ``target_transform``/``target_transform_scale`` (fitted on train),
  ``pad_lat``/``pad_lon`` (cells added before/after on each axis) and
  ``orig_nlat``/``orig_nlon`` so :func:`crop_to_original` can return to the input
  grid, ``preprocess_config`` (JSON), ``source_*`` file lists,
  ``predictor_missing_policy``, ``n_predictor_missing_days_{train,val,test}`` (days with a
  missing predictor field: left out under ``drop_days``, filled under ``fill_climatology``),
  ``n_predictor_partial_cells``.

Time steps: a target finer than ``time_step`` is averaged as a rate over each interval
[t + offset, t + offset + step) (an amount was divided by its own step on reading, so this is
the interval's total per day); predictors finer than the target are reduced over the same
intervals by ``predictor_aggregation``; only complete intervals are kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from . import __version__, cf
from .config import DataConfig, PreprocessConfig, parse_step
from .coords import (LAT_NAMES, LON_NAMES, cell_points, check_coverage, lon_centre,  # noqa: F401 (API)
                     select_region, standardise_coords, to_lon_convention, wrap_target_longitudes)
from .io import InputError, median_step_seconds, open_static, open_variable, source_files, write_zarr
from .grid import bilinear, block_mean, crop_to_original, pad_grid, regrid  # noqa: F401 (crop_to_original: API)
from .split import SPLITS, season_years, split_labels
from .transform import TargetTransform
from .units import MM_PER_DAY, SECONDS_PER_DAY, UnitsError, factor_to_mm_per_day

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- time


def calendar_of(da: xr.DataArray) -> str:
    """The CF calendar of ``da``'s time axis ('standard' for numpy datetimes)."""
    index = da.indexes["time"]
    if isinstance(index, pd.DatetimeIndex):
        return "standard"
    return str(getattr(index, "calendar", "standard"))


def time_step_seconds(da: xr.DataArray) -> float:
    """Median time step in seconds (works for numpy and cftime axes)."""
    if da.sizes["time"] < 2:
        raise InputError(f"{source_files(da)}: {da.name!r} has fewer than 2 time steps; cannot infer the time step")
    return median_step_seconds(da.indexes["time"])


def convert_target_units(da: xr.DataArray, negative_tolerance: float) -> xr.DataArray:
    """Convert precipitation to mm/day (lazy) and set CF attributes.

    Negative values within ``-negative_tolerance`` mm/day are set to 0; the
    check for larger negatives happens in :func:`scan_target`.
    """
    units = da.attrs.get("units")
    where = f"{source_files(da)}: variable {da.name!r}"
    if units is None:
        raise InputError(f"{where} has no 'units' attribute; set data.*.units in the config (e.g. 'kg m-2 s-1')")
    try:
        dt = time_step_seconds(da)
        factor = factor_to_mm_per_day(units, dt)
    except UnitsError as exc:
        raise InputError(f"{where}: units {units!r} not convertible to mm/day ({exc})") from exc
    attrs = {k: v for k, v in da.attrs.items() if k not in ("units", "scale_factor", "add_offset")}
    out = da.astype("float32") * np.float32(factor) if factor != 1 else da.astype("float32")
    out = out.where(~((out < 0) & (out >= -negative_tolerance)), 0.0)
    out.attrs = attrs | {
        "units": MM_PER_DAY,
        "standard_name": "lwe_precipitation_rate",
        "long_name": "precipitation",
        "original_units": str(units),
        "conversion_factor_to_mm_day": float(factor),
    }
    out.name = "pr"
    if factor != 1:
        log.info("%s: converted %s -> mm/day (x %.6g, time step %.0f s)", where, units, factor, dt)
    return out


def check_calendars(target: xr.DataArray, predictors: Sequence[xr.DataArray]) -> None:
    """Refuse predictors whose calendar differs from the target's (standard/gregorian/proleptic are one)."""
    cal = calendar_of(target)
    for p in predictors:
        pcal = calendar_of(p)
        if pcal != cal and {pcal, cal} - {"standard", "gregorian", "proleptic_gregorian"}:
            raise InputError(
                f"{source_files(p)}: predictor {p.name!r} uses calendar {pcal!r} but the target "
                f"({source_files(target)}) uses {cal!r}; expected one calendar"
            )


def align_time(target: xr.DataArray, predictors: Sequence[xr.DataArray], min_days: int):
    """Restrict target and predictors to their common time stamps.

    Raises
    ------
    InputError
        Calendars differ, or the intersection is empty / shorter than ``min_days``.
    """
    check_calendars(target, predictors)
    common = target.indexes["time"]
    for p in predictors:
        common = common.intersection(p.indexes["time"])
    n = len(common)
    if n < max(min_days, 1):
        spans = [
            f"{x.name} in {source_files(x)}: {x.indexes['time'][0]} .. {x.indexes['time'][-1]} "
            f"({x.sizes['time']} steps)"
            for x in [target, *predictors]
        ]
        raise InputError(
            f"target and predictors share {n} time stamps; expected at least {max(min_days, 1)} "
            f"(preprocess.min_overlap_days). Spans: {'; '.join(spans)}"
        )
    dropped = target.sizes["time"] - n
    if dropped:
        log.info("time alignment: kept %d common steps, dropped %d target steps", n, dropped)
    return target.sel(time=common), [p.sel(time=common) for p in predictors]


def _day_keys(index) -> list[tuple[int, int, int]]:
    """(year, month, day) of each stamp (numpy or cftime)."""
    return [(t.year, t.month, t.day) for t in index]


def _clock(index) -> str:
    hours = sorted({f"{t.hour:02d}:{t.minute:02d}" for t in index})
    return hours[0] if len(hours) == 1 else f"{len(hours)} times of day ({hours[0]} .. {hours[-1]})"


def match_days(pr: xr.DataArray, preds: Sequence[xr.DataArray], cfg: PreprocessConfig) -> list[xr.DataArray]:
    """``preprocess.time_match: day``: a daily predictor stamped at other hours than the daily target (CMIP
    ``day`` files at 12:00, reanalysis at 00:00) is matched by calendar day and given the target's stamps,
    with a log line naming both; sub-daily or multi-day data, and ``exact``, are left to exact matching."""
    if cfg.time_match != "day" or not preds or pr.sizes["time"] < 2:
        return list(preds)
    if abs(time_step_seconds(pr) - SECONDS_PER_DAY) > 1.0:
        return list(preds)
    target_index = pr.indexes["time"]
    by_day = {k: i for i, k in enumerate(_day_keys(target_index))}  # calendar day -> position of its stamp
    out = []
    for p in preds:
        index = p.indexes["time"]
        if p.sizes["time"] < 2 or abs(time_step_seconds(p) - SECONDS_PER_DAY) > 1.0 or index.isin(target_index).all():
            out.append(p)
            continue
        keys = _day_keys(index)
        if len(set(keys)) != len(keys):
            out.append(p)  # two stamps on one day: not a daily record; exact matching decides
            continue
        keep = [i for i, k in enumerate(keys) if k in by_day]
        if not keep:  # no day in common: align_time names both spans
            out.append(p)
            continue
        log.info("%s: predictor %r stamped at %s, the target (%s) at %s: matched by calendar day "
                 "(preprocess.time_match: day); %d common days", source_files(p), p.name, _clock(index),
                 source_files(pr), _clock(target_index), len(keep))
        matched = p.isel(time=keep)
        stamps = target_index[[by_day[keys[i]] for i in keep]]
        out.append(matched.assign_coords(time=("time", stamps, matched["time"].attrs)))
    return out


# ----------------------------------------------------------------------------- time steps


def describe_step(seconds: float) -> str:
    """A time step for messages: '1 day', '6 h', '30 min', '600 s'."""
    for unit, size in (("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and abs(seconds / size - round(seconds / size)) < 1e-9:
            n = int(round(seconds / size))
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
    return f"{seconds:g} s"


def _seconds_since(index, ref) -> np.ndarray:
    """Seconds from ``ref`` to each stamp of a time index (numpy or cftime; any calendar)."""
    if isinstance(index, pd.DatetimeIndex):
        return np.asarray((index - pd.Timestamp(ref)).total_seconds(), dtype=np.float64)
    return np.array([(t - ref).total_seconds() for t in index], dtype=np.float64)


def _stamps_after(ref, seconds: np.ndarray, like):
    """The time index ``ref + seconds`` of the same kind (numpy or cftime) as ``like``."""
    if isinstance(like, pd.DatetimeIndex):
        return pd.DatetimeIndex(pd.Timestamp(ref) + pd.to_timedelta(np.round(seconds).astype(np.int64), unit="s"))
    import datetime

    return xr.CFTimeIndex([ref + datetime.timedelta(seconds=float(x)) for x in seconds])


def aggregate_intervals(da: xr.DataArray, labels, step: float, offset: float, how: str, chunk_time: int,
                        what: str) -> xr.DataArray:
    """Reduce ``da`` over the interval [t + offset, t + offset + step) of each label ``t`` (lazy).

    Only complete intervals are kept (every step of ``da``'s own time step present); the others
    (the record's ends, gaps) are dropped with a log line.  A missing value inside an interval
    makes the reduction missing there (no NaN is skipped), so a policy downstream sees it.

    Parameters
    ----------
    da : xr.DataArray (time, lat, lon) at a regular step finer than ``step``
    labels : time index of the same kind as ``da``'s (numpy or cftime, one calendar)
    step, offset : seconds
    how : 'mean', 'min', 'max' or 'sum'
    what : for messages, e.g. "<file>: predictor 'z500'"

    Returns
    -------
    xr.DataArray (time, lat, lon) with time = the labels of the complete intervals.
    """
    index = da.indexes["time"]
    native = time_step_seconds(da)
    per = int(round(step / native))
    if per < 1 or abs(per * native - step) > 1e-6 * step:
        raise InputError(f"{what}: its time step ({describe_step(native)}) does not divide the target interval "
                         f"({describe_step(step)}); expected a step that fits a whole number of times")
    ref = labels[0]
    s = _seconds_since(index, ref)
    starts = _seconds_since(labels, ref) + offset
    k = np.searchsorted(starts, s, side="right") - 1
    inside = (k >= 0) & (s < starts[np.maximum(k, 0)] + step - 1e-6)
    counts = np.bincount(k[inside], minlength=len(labels))
    complete = counts == per
    take = np.flatnonzero(inside & complete[np.maximum(k, 0)])
    if take.size == 0:
        raise InputError(f"{what}: no complete {describe_step(step)} interval (offset {describe_step(offset)}) "
                         f"of {per} steps of {describe_step(native)} in {index[0]} .. {index[-1]}")
    partial = int(((counts > 0) & ~complete).sum())
    if partial or (~inside).any():
        log.info("%s: %d incomplete %s intervals and %d steps outside every interval dropped", what, partial,
                 describe_step(step), int((~inside).sum()))
    contiguous = take[-1] - take[0] + 1 == take.size
    sub = da.isel(time=slice(int(take[0]), int(take[-1]) + 1) if contiguous else take)
    if sub.chunks is not None:
        sub = sub.chunk({"time": per * max(1, chunk_time // per)})
    windows = sub.drop_vars("time").coarsen(time=per).construct(time=("time", "step"))  # (interval, step, ...)
    out = getattr(windows, how)("step", skipna=False)
    out = out.assign_coords(time=labels[np.flatnonzero(complete)])
    out.attrs = dict(da.attrs)
    out.name = da.name
    log.info("%s: %s over %d steps of %s per %s interval (offset %s): %d intervals", what, how, per,
             describe_step(native), describe_step(step), describe_step(offset), out.sizes["time"])
    return out


def aggregate_target(pr: xr.DataArray, cfg: PreprocessConfig, where: str) -> xr.DataArray:
    """Sum a finer target to ``cfg.time_step`` (lazy); the input is a rate in mm/day.

    Amounts were divided by their own step on reading (:func:`convert_target_units`), so the
    mean of the rates over an interval is its total amount divided by the interval: a sum of
    amounts and a mean of rates are one operation.  Labels: midnight of the first day plus
    whole steps; the interval of label ``t`` is [t + offset, t + offset + step).
    """
    step = parse_step(cfg.time_step, "preprocess.time_step")
    offset = parse_step(cfg.aggregation_offset, "preprocess.aggregation_offset")
    native = time_step_seconds(pr)
    if abs(native - step) <= 1e-6 * step:
        return pr
    if native > step:
        raise InputError(f"{where}: its time step ({describe_step(native)}) is longer than preprocess.time_step "
                         f"{cfg.time_step!r}; expected a finer target to sum (or time_step: null)")
    index = pr.indexes["time"]
    origin = index[0].replace(hour=0, minute=0, second=0, microsecond=0)
    s = _seconds_since(index, origin)
    first, last = np.floor((s[[0, -1]] - offset) / step)
    labels = _stamps_after(origin, np.arange(first, last + 1) * step, index)
    out = aggregate_intervals(pr, labels, step, offset, "mean", cfg.chunk_time, where)
    out.attrs = dict(pr.attrs) | {
        "aggregated_from_step_seconds": float(native),
        "aggregation": f"mean rate over [t + {cfg.aggregation_offset}, t + {cfg.aggregation_offset} + {cfg.time_step})",
    }
    return out


def match_predictor_steps(pr: xr.DataArray, preds: Sequence[xr.DataArray], flags: Sequence[bool],
                          cfg: PreprocessConfig) -> list[xr.DataArray]:
    """Bring predictors finer in time than the target to the target's stamps (``predictor_aggregation``).

    A predictor at the target's step is unchanged.  A finer one is reduced over each target
    interval [t + offset, t + offset + step) with ``cfg.predictor_aggregation`` (a precipitation
    predictor, a rate by then, always with the mean); with no aggregation configured it is an
    error naming both steps and the keys, since the time intersection would silently keep one
    predictor field per target step.  A coarser predictor is an error.
    """
    if not preds:
        return list(preds)
    target_step = time_step_seconds(pr)
    offset = parse_step(cfg.aggregation_offset, "preprocess.aggregation_offset")
    out = []
    for p, is_pr in zip(preds, flags):
        step = time_step_seconds(p)
        what = f"{source_files(p)}: predictor {p.name!r}"
        if abs(step - target_step) <= 1e-6 * target_step:
            out.append(p)
            continue
        if step > target_step:
            raise InputError(
                f"{what} has a time step of {describe_step(step)}, longer than the target's "
                f"({source_files(pr)}: {describe_step(target_step)}); expected predictors at the target's step or "
                "finer (preprocess.time_step sums a finer target)")
        if cfg.predictor_aggregation is None:
            raise InputError(
                f"{what} has a time step of {describe_step(step)} but the target ({source_files(pr)}) has "
                f"{describe_step(target_step)}; matching their time stamps would keep 1 in "
                f"{int(round(target_step / step))} predictor fields. Set preprocess.predictor_aggregation (mean, min, "
                "max or sum over each target interval) and preprocess.aggregation_offset (where the interval starts, "
                "e.g. '6h' for E-OBS days that run 06-06 UTC), or preprocess.time_step to sum a finer target")
        how = "mean" if is_pr else cfg.predictor_aggregation
        if is_pr and cfg.predictor_aggregation != "mean":
            log.info("%s: a precipitation rate; averaged over the interval (not %s)", what, cfg.predictor_aggregation)
        out.append(aggregate_intervals(p, pr.indexes["time"], target_step, offset, how, cfg.chunk_time, what))
    return out


# ----------------------------------------------------------------------------- split


# ----------------------------------------------------------------------------- grids


def static_on_target(fields: dict, target: xr.DataArray, mask: xr.DataArray, centre: float | None = None
                     ) -> xr.DataArray:
    """User static fields on the target grid: (static_channel, lat, lon), float32.

    Each field is a (lat, lon) array on its own grid (any names :func:`standardise_coords`
    knows; a length-1 time or level axis is dropped), its longitudes brought to the target's
    convention (``centre``), interpolated bilinearly to each target cell's own latitude and
    longitude (:func:`precip_cvae.coords.cell_points`; on a projected target without them, on the
    target's axes, which the field must share).  A field whose grid does not cover the target
    (beyond half a cell of its own spacing), or that is missing at a valid target cell, is refused
    with the file and variable named.
    """
    points = cell_points(target)
    if points is None:  # a projected target without each cell's lat/lon: the fields must be on its axes
        points = tuple(np.meshgrid(np.asarray(target["lat"].values, float), np.asarray(target["lon"].values, float),
                                   indexing="ij"))
    out = []
    for name, da in fields.items():
        where = f"{source_files(da)}: static variable {name!r}"
        if "time" not in da.dims:
            da = da.expand_dims(time=[0])
        da = to_lon_convention(standardise_coords(da, f"static field {name!r}"), centre, "static field")
        if da.sizes["time"] != 1:
            raise InputError(f"{where}: has {da.sizes['time']} time steps; expected a time-invariant field")
        da = da.isel(time=0, drop=True).astype("float64")
        for dim, t in (("lat", points[0]), ("lon", points[1])):
            src = np.asarray(da[dim].values, float)
            half = 0.5 * float(np.median(np.diff(src))) if src.size > 1 else 0.0
            if t.min() < src.min() - half - 1e-9 or t.max() > src.max() + half + 1e-9:
                raise InputError(
                    f"{where}: its {dim} {src.min():g}..{src.max():g} does not cover the target grid's "
                    f"{t.min():g}..{t.max():g}; expected a field over the whole target domain"
                )
        values = bilinear(da.values, da["lat"].values, da["lon"].values, *points)
        on = xr.DataArray(values, dims=("lat", "lon"), coords={"lat": target["lat"], "lon": target["lon"]})
        gaps = int((on.isnull() & mask.astype(bool)).sum())
        if gaps:
            raise InputError(f"{where}: missing at {gaps} valid target cells after regridding; expected values over "
                             "every cell of the target's mask")
        out.append(on.where(mask.astype(bool)).astype("float32"))
    return xr.concat(out, dim="static_channel").assign_coords(static_channel=("static_channel", list(fields)))


# ----------------------------------------------------------------------------- masks and values


def apply_value_policy(counts: dict, cfg: PreprocessConfig, where: str) -> dict:
    """Raise on negatives beyond the tolerance and (policy ``refuse``) on sporadic NaN; return ``counts``."""
    if counts["negative"]:
        raise InputError(
            f"{where}: {counts['negative']} negative precipitation values (minimum {counts['minimum']:.4g} mm/day); "
            f"expected >= -{cfg.negative_tolerance} (preprocess.negative_tolerance)"
        )
    if counts.get("above_max"):
        step = "" if counts["max_rate"] == cfg.max_rain_mm_day else (
            f" ({counts['max_rate']:.4g} mm/day as a rate at this time step, the world-record envelope)")
        raise InputError(
            f"{where}: {counts['above_max']} values above {counts['max_rate']:.4g} mm/day (maximum "
            f"{counts['maximum']:.4g} mm/day; first on {counts['first_above']}); expected at most "
            f"preprocess.max_rain_mm_day = {cfg.max_rain_mm_day:g} mm in a day{step}, above the largest daily total "
            "ever measured: a fill value written as data (give the file its _FillValue or missing_value attribute), "
            "wrong units (data.target.units), or a corrupt file"
        )
    if counts["sporadic_missing"] and cfg.missing_policy == "refuse":
        raise InputError(
            f"{where}: {counts['sporadic_missing']} missing values in cells that are not part of the fixed mask; "
            "expected none (preprocess.missing_policy: refuse; use 'mask' to keep them as NaN)"
        )
    return counts


def channel_stats(cond: xr.DataArray, train: np.ndarray):
    """Per-channel train mean and std (NaN skipped) and missing counts, in one dask pass.

    Parameters
    ----------
    cond : xr.DataArray (time, channel, clat, clon)
    train : bool (time,)

    Returns
    -------
    mean, std : float64 (channel,); a std of 0 becomes 1
    n_missing : int (channel,): NaN values over all days and cells
    n_always : int (channel,): cells missing on every day (a fixed mask, e.g. all-sea blocks)
    """
    import dask

    sub = cond.isel(time=np.flatnonzero(train))
    nan = cond.isnull()
    mean, std, n_missing, n_always = dask.compute(
        sub.mean(("time", "clat", "clon"), skipna=True), sub.std(("time", "clat", "clon"), skipna=True),
        nan.sum(("time", "clat", "clon")), nan.all("time").sum(("clat", "clon")))
    mean, std = mean.values.astype("float64"), std.values.astype("float64")
    std = np.where(std > 0, std, 1.0)
    return mean, std, n_missing.values.astype(int), n_always.values.astype(int)


def transform_moments(pr: xr.DataArray, train: np.ndarray, kind: str) -> tuple:
    """Per-cell (count, sum, sum of squares) of f(pr) over train days, NaN skipped; lazy for dask input.

    Parameters
    ----------
    pr : xr.DataArray (time, lat, lon), mm day-1
    train : bool (time,)
    kind : the transform ``f`` ('log1p', 'sqrt', 'none')

    Returns
    -------
    three arrays (lat, lon): int count, float64 sum, float64 sum of squares.
    """
    on_train = xr.DataArray(np.asarray(train, bool), dims="time", coords={"time": pr["time"]})
    raw = TargetTransform(kind=kind, scale=1.0).raw(pr.where(on_train).transpose("time", "lat", "lon").data)
    return (~np.isnan(raw)).sum(axis=0), np.nansum(raw, axis=0, dtype=np.float64), \
        np.nansum(raw * raw, axis=0, dtype=np.float64)


def transform_from_moments(kind: str, moments: tuple, cells: np.ndarray | None = None) -> TargetTransform:
    """The transform with scale = std of f(pr) pooled over ``cells`` (bool (lat, lon); None: all)."""
    n, s1, s2 = (np.asarray(m, dtype=np.float64) for m in moments)
    if cells is not None:
        n, s1, s2 = n[cells], s1[cells], s2[cells]
    total = n.sum()
    mean = s1.sum() / total if total else np.nan
    scale = float(np.sqrt(max(s2.sum() / total - mean * mean, 0.0))) if total else np.nan
    if not scale > 0:
        raise InputError("target is constant (or all missing) on the train split; cannot fit the transform")
    return TargetTransform(kind=kind, scale=scale)


#: the world-record point rainfall grows with the duration D about as D**0.475 (Jennings 1950, the envelope the
#: WMO keeps): it scales preprocess.max_rain_mm_day, a daily total, to the rate a step of another length may reach
RECORD_EXPONENT = 0.475


def max_rate_mm_day(max_daily_mm: float, step_seconds: float) -> float:
    """The largest plausible rate (mm/day) over a step of ``step_seconds``: ``max_daily_mm`` in a day, scaled
    by the world-record envelope (a 10-minute step may reach 13.5 times the daily limit as a rate)."""
    days = float(step_seconds) / SECONDS_PER_DAY
    return float(max_daily_mm) * days ** (RECORD_EXPONENT - 1.0)


#: physically possible values of a predictor, by its units (after lower-casing and removing spaces, '^' and
#: '**'); any units: |value| below FILL_LIKE (1e20 is the usual fill value, written as data when the file
#: lacks its _FillValue attribute)
PHYSICAL_RANGES = {
    "k": (150.0, 350.0, "a temperature"), "kelvin": (150.0, 350.0, "a temperature"),
    "degc": (-125.0, 75.0, "a temperature"), "celsius": (-125.0, 75.0, "a temperature"),
    "deg_c": (-125.0, 75.0, "a temperature"), "degreec": (-125.0, 75.0, "a temperature"),
    "degrees_celsius": (-125.0, 75.0, "a temperature"),
    "pa": (0.0, 1.2e5, "a pressure"), "hpa": (0.0, 1200.0, "a pressure"), "mbar": (0.0, 1200.0, "a pressure"),
    "kgkg-1": (0.0, 0.1, "a specific humidity"), "kg/kg": (0.0, 0.1, "a specific humidity"),
}
FILL_LIKE = 1e15


def _physical_range(units: str) -> tuple[float, float, str]:
    key = str(units).strip().lower().replace(" ", "").replace("**", "").replace("^", "")
    return PHYSICAL_RANGES.get(key, (-FILL_LIKE, FILL_LIKE, "any quantity"))


def _first_stamp(flags: np.ndarray, da: xr.DataArray) -> str:
    """The first time stamp where ``flags`` (time,) is set, as text."""
    return _format_stamps(da.indexes["time"][[int(np.flatnonzero(flags)[0])]])[0]


def check_predictor_values(preds: Sequence[xr.DataArray]) -> None:
    """Refuse a predictor holding values no such quantity can take (by its units; a fill value written as data
    in any units), naming its files, the count, the extreme value and the first date."""
    import dask

    for p in preds:
        lo, hi, what = _physical_range(p.attrs.get("units", ""))
        bad = ~((p >= lo) & (p <= hi)) & p.notnull()
        count, low, high, days = dask.compute(bad.sum(), p.min(), p.max(), bad.any(("lat", "lon")))
        if int(count):
            raise InputError(
                f"{source_files(p)}: predictor {p.name!r} ({p.attrs.get('units', 'no units')}) holds {int(count)} "
                f"values outside {lo:g} to {hi:g}, the range of {what} (minimum {float(low):.4g}, maximum "
                f"{float(high):.4g}; first on {_first_stamp(np.asarray(days), p)}); a fill value written as data "
                "(give the file its _FillValue or missing_value attribute), or wrong units (data.predictors[].units)")


#: bytes of the target read by one step of :func:`scan_target`: its reductions are computed a slice of days at a
#: time, because one dask graph of them over a whole continental record held most of it at once (465 x 705 cells:
#: peak 4.0 GB for 5 years and 6.8 GB for 10, docs/benchmarks.md section 1)
SCAN_BYTES = 512 * 2**20


def scan_slices(pr: xr.DataArray, budget: int | None = None) -> list[tuple[int, int]]:
    """The (start, stop) days of the slices of :func:`scan_target`: runs of whole time chunks of ``pr`` (however
    irregular; numpy input is one chunk) holding at most ``budget`` bytes (default :data:`SCAN_BYTES`), at least
    one chunk each, so no chunk is read twice."""
    budget = SCAN_BYTES if budget is None else budget
    chunks = pr.chunks[pr.get_axis_num("time")] if pr.chunks else (pr.sizes["time"],)
    per_day = max(1, int(np.prod([n for d, n in pr.sizes.items() if d != "time"])) * pr.dtype.itemsize)
    slices, start, size = [], 0, 0
    for c in (int(c) for c in chunks):
        if size and (size + c) * per_day > budget:
            slices.append((start, start + size))
            start, size = start + size, 0
        size += c
    if size:
        slices.append((start, start + size))
    return slices


def scan_target(pr: xr.DataArray, train: np.ndarray, cfg: PreprocessConfig, where: str,
                max_rate: float = float("inf")):
    """One pass over the target for the mask, the value checks and the transform.

    Parameters
    ----------
    pr : xr.DataArray (time, lat, lon), mm day-1, dask-backed
    train : bool (time,)
    max_rate : the largest plausible value (mm day-1, :func:`max_rate_mm_day`)

    Returns
    -------
    mask : xr.DataArray (lat, lon) int8: 1 where the cell is missing on at most
        ``cfg.mask_missing_fraction`` of days
    counts : dict for the log: cells, masked_cells, sporadic_missing (NaN inside the mask),
        negative (below ``-cfg.negative_tolerance``), minimum (mm day-1), above_max (above
        ``max_rate``), maximum, first_above (its first time stamp); the policy of
        :func:`apply_value_policy` is applied to them
    transform : TargetTransform whose scale is the std of f(pr) over the train days of the
        mask's cells
    """
    import dask

    train = np.asarray(train, bool)
    missing = negative = n_above = 0
    minimum, maximum, days_above, moments = np.nan, np.nan, [], None
    for start, stop in scan_slices(pr):  # a slice of days at a time: memory flat in the record's length
        part = pr.isel(time=slice(start, stop))
        above = part > max_rate
        miss, neg, low, n_hi, high, days, *mom = dask.compute(
            part.isnull().sum("time"), (part < -cfg.negative_tolerance).sum(), part.min(), above.sum(), part.max(),
            above.any(("lat", "lon")), *transform_moments(part, train[start:stop], cfg.transform))
        missing, negative, n_above = missing + miss, negative + int(neg), n_above + int(n_hi)
        minimum, maximum = np.fmin(minimum, float(low)), np.fmax(maximum, float(high))
        days_above.append(np.asarray(days))
        moments = mom if moments is None else [a + b for a, b in zip(moments, mom)]
    days_above = np.concatenate(days_above)
    mask = (missing / pr.sizes["time"] <= cfg.mask_missing_fraction).astype("int8").rename("mask")
    valid_cell = mask.values.astype(bool)
    if not valid_cell.any():
        raise InputError(f"{where}: every cell is missing on more than {cfg.mask_missing_fraction:.0%} of days")
    counts = {
        "cells": int(valid_cell.sum()),
        "masked_cells": int((~valid_cell).sum()),
        "sporadic_missing": int(missing.values[valid_cell].sum()),
        "negative": int(negative),
        "minimum": float(minimum),
        "above_max": int(n_above),
        "maximum": float(maximum),
        "max_rate": float(max_rate),
        "first_above": _first_stamp(np.asarray(days_above), pr) if int(n_above) else None,
    }
    apply_value_policy(counts, cfg, where)
    return mask, counts, transform_from_moments(cfg.transform, moments, valid_cell)


def _format_stamps(index) -> list[str]:
    """ISO stamps for messages: a date, with the time of day when one is not midnight."""
    return [f"{t.year:04d}-{t.month:02d}-{t.day:02d}" + (f"T{t.hour:02d}:{t.minute:02d}" if t.hour or t.minute else "")
            for t in index]


def check_split_sizes(labels: np.ndarray, index, cfg: PreprocessConfig, where: str) -> None:
    """Refuse a split with fewer than ``cfg.min_split_days`` time steps (per split)."""
    counts = {s: int((labels == s).sum()) for s in SPLITS}
    for name in SPLITS:
        need = getattr(cfg.min_split_days, name)
        if counts[name] < need:
            raise InputError(
                f"{where}: split {name!r} holds {counts[name]} time steps; expected at least {need} "
                f"(preprocess.min_split_days.{name}) to learn from or score (counts {counts}; data span "
                f"{index[0]} .. {index[-1]}); give a longer record or change preprocess.split")


def predictor_missing_days(preds: Sequence[xr.DataArray], keep: np.ndarray, cfg: PreprocessConfig):
    """Per predictor, which days count as missing (one dask pass over the predictors).

    A day is missing for a predictor when more than ``cfg.predictor_missing_cells`` of its
    cells are NaN; on the other days, NaN cells are few and are later filled with the
    train mean.

    Parameters
    ----------
    preds : predictors (time, lat, lon) on their own grids, on the common time stamps
    keep : bool (time,): the days in a split (the others are ignored)

    Returns
    -------
    missing : bool (predictor, time), False where ``keep`` is False
    partial_cells : int (predictor,): NaN cells on the days that are not missing
    """
    import dask

    if not preds:
        return np.zeros((0, keep.size), bool), np.zeros(0, int)
    frac, count = zip(*dask.compute(*[(p.isnull().mean(("lat", "lon")), p.isnull().sum(("lat", "lon")))
                                      for p in preds]))
    frac = np.stack([np.asarray(f.values, float) for f in frac])
    count = np.stack([np.asarray(c.values, int) for c in count])
    missing = (frac > cfg.predictor_missing_cells) & keep[None]
    partial = np.where(~missing & keep[None], count, 0).sum(axis=1)
    return missing, partial


def apply_predictor_policy(preds: Sequence[xr.DataArray], missing: np.ndarray, labels: np.ndarray, dates: list[str],
                           cfg: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """Apply ``cfg.predictor_missing_policy`` to the missing predictor days.

    Returns
    -------
    drop : bool (time,): days to leave out (``drop_days``), else all False
    counts : dict split -> number of days with a missing predictor field

    Raises
    ------
    InputError
        ``refuse``: names the file, the variable, the number of days and the first dates.
    """
    any_missing = missing.any(axis=0) if missing.size else np.zeros(labels.size, bool)
    counts = {s: int((any_missing & (labels == s)).sum()) for s in SPLITS}
    if cfg.predictor_missing_policy == "refuse":
        for p, row in zip(preds, missing):
            if row.any():
                first = [dates[i] for i in np.flatnonzero(row)[:5]]
                raise InputError(
                    f"{source_files(p)}: predictor {p.name!r} is missing on {int(row.sum())} day(s) (more than "
                    f"{cfg.predictor_missing_cells:.0%} of its cells NaN), first {first}; expected complete fields "
                    "(preprocess.predictor_missing_policy: refuse; 'drop_days' leaves those days out, "
                    "'fill_climatology' fills them with the train mean; preprocess.predictor_missing_cells sets "
                    "the fraction of cells that may be missing)")
        return np.zeros(labels.size, bool), counts
    for p, row in zip(preds, missing):
        if row.any():
            log.warning("%s: predictor %r is missing on %d days (%s), first %s: %s", source_files(p), p.name,
                        int(row.sum()), ", ".join(f"{s} {int((row & (labels == s)).sum())}" for s in SPLITS),
                        [dates[i] for i in np.flatnonzero(row)[:5]],
                        "left out (drop_days)" if cfg.predictor_missing_policy == "drop_days"
                        else "filled with the train mean (fill_climatology)")
    if cfg.predictor_missing_policy == "drop_days":
        return any_missing, counts
    return np.zeros(labels.size, bool), counts


# ----------------------------------------------------------------------------- the stage


def condition_transform(on_grid: xr.DataArray, kind: str, source: xr.DataArray) -> xr.DataArray:
    """A predictor channel before normalisation: itself (``'none'``) or ``log1p`` of it (``'log1p'``).

    Raises
    ------
    InputError
        ``log1p`` of a predictor with values below 0 (named with its files, its minimum and the first day).
    """
    if kind == "none":
        return on_grid
    if kind != "log1p":
        raise ValueError(f"unknown condition transform {kind!r}")
    low = on_grid.min(dim=("lat", "lon"), skipna=True)
    bad = np.flatnonzero(np.asarray((low < 0).values))
    if bad.size:
        raise InputError(
            f"{source_files(source)}: predictor {str(source.name)!r} has values below 0 on {bad.size} day(s) "
            f"(minimum {float(low.min()):.4g} {source.attrs.get('units', '')}, first "
            f"{str(np.asarray(on_grid['time'].values)[bad[0]])[:19]}); condition_transform 'log1p' needs a "
            "non-negative field (precipitation, humidity): set it to 'none' for this predictor"
        )
    out = np.log1p(on_grid)
    out.name = on_grid.name
    return out


@dataclass(frozen=True)
class Condition:
    """The condition of :func:`build_dataset` on its grid: normalised channels and what they came from."""

    values: xr.DataArray  # (time, channel, clat, clon), normalised, missing values 0
    names: list  # channel names
    mean: np.ndarray  # (channel,) train mean
    std: np.ndarray  # (channel,) train standard deviation
    coarse_pr: xr.DataArray | None  # (time, lat, lon) mm/day on the condition grid, the first precipitation channel
    clat: xr.DataArray
    clon: xr.DataArray
    n_filled: np.ndarray  # (channel,) missing values set to the train mean


def read_grids(target: xr.DataArray, predictors: Sequence[xr.DataArray], cfg: PreprocessConfig
               ) -> tuple[xr.DataArray, list[xr.DataArray], float | None]:
    """Step 1, coordinates (:mod:`precip_cvae.coords`): axes named and sorted, each cell's lat/lon kept, the
    target's longitudes contiguous and its region cut, every predictor in the target's longitude convention and
    covering it.  Returns the target, the predictors and the target's centre longitude (None if unknown)."""
    target = wrap_target_longitudes(standardise_coords(target, "target"), "target")
    if cfg.region:
        target = select_region(target, cfg.region)
    centre = lon_centre(target)
    predictors = [to_lon_convention(standardise_coords(p, "predictor"), centre, "predictor") for p in predictors]
    check_coverage(target, predictors)
    return target, predictors, centre


def common_time(target: xr.DataArray, predictors: Sequence[xr.DataArray], flags: Sequence[bool],
                cfg: PreprocessConfig, where: str) -> tuple[xr.DataArray, list[xr.DataArray]]:
    """Step 2, units and time: precipitation in mm/day, one calendar, the target's time step (aggregated),
    predictors on its stamps (aggregated, matched by day), their common days; predictor values checked."""
    pr = convert_target_units(target, cfg.negative_tolerance)
    preds = []
    for p, is_pr in zip(predictors, flags):
        if is_pr:
            name = p.name
            p = convert_target_units(p, cfg.negative_tolerance).rename(name)
        preds.append(p)
    check_calendars(pr, preds)
    if cfg.time_step is not None:
        pr = aggregate_target(pr, cfg, where)
    preds = match_predictor_steps(pr, preds, flags, cfg)
    preds = match_days(pr, preds, cfg)
    pr, preds = align_time(pr, preds, cfg.min_overlap_days)
    pr = pr.chunk({"time": cfg.chunk_time, "lat": -1, "lon": -1})
    check_predictor_values([p for p, is_pr in zip(preds, flags) if not is_pr])
    return pr, preds


def split_days(pr: xr.DataArray, preds: list[xr.DataArray], cfg: PreprocessConfig, fold: int | None, where: str):
    """Step 3, the split: train/val/test labels, the predictor missing-day policy (days dropped, counted per
    split), split sizes checked.  Returns (pr, preds, labels, missing days per split, partial cells)."""
    try:
        labels = split_labels(pr.indexes["time"], cfg.split, fold)
    except InputError as exc:  # name the data: the split sees the target/predictor time intersection
        raise InputError(f"{where} (time stamps shared with the predictors): {exc}") from exc
    missing, partial_cells = predictor_missing_days(preds, labels != "", cfg)
    drop, missing_days = apply_predictor_policy(preds, missing, labels, _format_stamps(pr.indexes["time"]), cfg)
    for p, n in zip(preds, partial_cells):
        if n:
            log.warning("%s: predictor %r has %d missing cells on days with at most %.0f%% of its cells missing "
                        "(preprocess.predictor_missing_cells); filled with the train mean", source_files(p), p.name,
                        int(n), 100 * cfg.predictor_missing_cells)
    if drop.any():
        log.info("predictor_missing_policy drop_days: %d days left out (%s)", int(drop.sum()),
                 ", ".join(f"{s} {missing_days[s]}" for s in SPLITS))
        pr = pr.isel(time=np.flatnonzero(~drop))
        preds = [p.isel(time=np.flatnonzero(~drop)) for p in preds]
        labels = labels[~drop]
    check_split_sizes(labels, pr.indexes["time"], cfg, f"{where} (time stamps shared with the predictors)")
    return pr, preds, labels, missing_days, partial_cells


def mask_target(pr: xr.DataArray, preds: list[xr.DataArray], labels: np.ndarray, cfg: PreprocessConfig, where: str):
    """Step 4, the target: one pass for its mask, value checks and the transform's train statistics; masked
    cells NaN; days in no split dropped.  Returns (pr, preds, labels, mask, counts, transform)."""
    mask, counts, transform = scan_target(pr, labels == "train", cfg, where,
                                          max_rate_mm_day(cfg.max_rain_mm_day, time_step_seconds(pr)))
    log.info(
        "target: %d valid cells, %d masked, %d sporadic missing values (%s), minimum %.3g mm/day",
        counts["cells"], counts["masked_cells"], counts["sporadic_missing"], cfg.missing_policy, counts["minimum"],
    )
    pr = pr.where(mask.astype(bool))
    keep = labels != ""
    if not keep.all():
        log.info("split: %d days are in no split and are dropped", int((~keep).sum()))
        pr = pr.isel(time=np.flatnonzero(keep))
        preds = [p.isel(time=np.flatnonzero(keep)) for p in preds]
        labels = labels[keep]
    return pr, preds, labels, mask, counts, transform


def build_condition(pr: xr.DataArray, preds: list[xr.DataArray], flags: Sequence[bool], transforms: Sequence[str],
                    train: np.ndarray, cfg: PreprocessConfig) -> Condition:
    """Step 5, the condition: every predictor (and the target's block means) on the condition grid, transformed,
    normalised with train statistics; missing values the train mean (0), counted."""
    blocks = None
    if cfg.target_coarse_factor and cfg.target_coarse_factor > 1:
        blocks = block_mean(pr, cfg.target_coarse_factor)
    if cfg.condition_grid == "target_blocks" or (cfg.condition_grid == "first" and not preds):
        if blocks is None:
            raise InputError("preprocess.condition_grid 'target_blocks' needs target_coarse_factor > 1")
        grid_src = blocks
    elif cfg.condition_grid == "first":
        grid_src = preds[0]
    else:
        names = [str(p.name) for p in preds]
        if cfg.condition_grid not in names:
            raise InputError(
                f"preprocess.condition_grid {cfg.condition_grid!r} is not a predictor; "
                f"valid: {['first', 'target_blocks', *names]}"
            )
        grid_src = preds[names.index(cfg.condition_grid)]
    clat, clon = grid_src["lat"], grid_src["lon"]
    channels, names, coarse_pr = [], [], None
    for p, is_pr, kind in zip(preds, flags, transforms):
        on_grid = regrid(p.astype("float32"), clat, clon)
        channels.append(condition_transform(on_grid, kind, p))
        names.append(str(p.name))
        if is_pr and coarse_pr is None:
            coarse_pr = on_grid
    if blocks is not None:
        blocks = regrid(blocks, clat, clon)
        channels.append(blocks)
        names.append(f"pr_block{cfg.target_coarse_factor}")
        if coarse_pr is None:
            coarse_pr = blocks
    cond = xr.concat([c.drop_attrs() if hasattr(c, "drop_attrs") else c for c in channels], dim="channel")
    cond = cond.assign_coords(channel=("channel", names)).rename({"lat": "clat", "lon": "clon"})
    cond = cond.transpose("time", "channel", "clat", "clon")
    mean, std, n_filled, n_fixed = channel_stats(cond, train)
    mean_da = xr.DataArray(mean, dims="channel", coords={"channel": names})
    std_da = xr.DataArray(std, dims="channel", coords={"channel": names})
    # the missing values left (a fixed mask such as all-sea blocks, a few cells under predictor_missing_cells,
    # whole days under fill_climatology) become the train mean: 0 after normalisation; counted, never silent
    cond_n = ((cond - mean_da) / std_da).fillna(0.0).astype("float32")
    cond_n.attrs = {"long_name": "normalised condition (train mean/std per channel); missing values are 0 (the "
                    "train mean)", "units": "1"}
    if n_filled.any():
        log.info("condition: missing values set to the train mean per channel %s (cells missing on every day: %s)",
                 dict(zip(names, n_filled.tolist())), dict(zip(names, n_fixed.tolist())))
    log.info("condition: channels %s on a %dx%d grid; train mean %s std %s", names, clat.size, clon.size,
             np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return Condition(cond_n, names, mean, std, coarse_pr, clat, clon, n_filled)


def build_dataset(
    target: xr.DataArray,
    predictors: Sequence[xr.DataArray],
    cfg: PreprocessConfig,
    precipitation_predictors: Sequence[bool] | None = None,
    static: dict | None = None,
    fold: int | None = None,
    condition_transforms: Sequence[str] | None = None,
) -> xr.Dataset:
    """Checked, aligned, split and normalised dataset (lazy where it matters).

    Parameters
    ----------
    target : xr.DataArray (time, lat, lon), any precipitation units
    predictors : list of xr.DataArray (time, lat, lon) on their own grids
    cfg : PreprocessConfig
    precipitation_predictors : which predictors are precipitation (converted to
        mm/day and also stored raw as ``coarse_pr``)
    static : dict name -> xr.DataArray (lat, lon), optional
        Time-invariant fields (``data.static``), regridded to the target grid.
    fold : int, optional
        The fold of ``split.method: kfold_years``: its held-out block is ``test``, the next
        block ``val`` and every statistic (mask aside) is fitted on its ``train`` years only.
    condition_transforms : list of {'none', 'log1p'}, optional
        Per predictor (``data.predictors[i].condition_transform``): ``log1p`` of the
        predictor on the condition grid before normalisation; a negative value is refused.
    """
    flags = list(precipitation_predictors or [False] * len(predictors))
    transforms = list(condition_transforms or ["none"] * len(predictors))
    if len(transforms) != len(predictors):
        raise ValueError(f"{len(transforms)} condition transforms for {len(predictors)} predictors")
    if not predictors and not (cfg.target_coarse_factor and cfg.target_coarse_factor > 1):
        raise InputError(
            "no predictors and no block-averaged target (preprocess.target_coarse_factor): the condition would be "
            "empty; give data.predictors or set target_coarse_factor > 1"
        )
    target, predictors, centre = read_grids(target, predictors, cfg)
    where = f"{source_files(target)}: target {target.name!r}"
    pr, preds = common_time(target, predictors, flags, cfg, where)
    pr, preds, labels, missing_days, partial_cells = split_days(pr, preds, cfg, fold, where)
    pr, preds, labels, mask, counts, transform = mask_target(pr, preds, labels, cfg, where)
    train = labels == "train"
    cond = build_condition(pr, preds, flags, transforms, train, cfg)
    log.info("target transform %s, scale %.4f (fitted on %d train days)", transform.kind, transform.scale, int(train.sum()))

    ds = xr.Dataset(
        {
            "pr": pr.astype("float32"),
            "condition": cond.values,
            "mask": mask,
            "split": ("time", labels),
            "cond_mean": xr.DataArray(cond.mean, dims="channel", coords={"channel": cond.names}).astype("float64"),
            "cond_std": xr.DataArray(cond.std, dims="channel", coords={"channel": cond.names}).astype("float64"),
        }
    )
    if static:
        ds["static"] = static_on_target(static, pr, mask, centre)
        ds["static"].attrs = {"long_name": "user static fields on the target grid (data.static)"}
        log.info("static fields %s regridded to the target grid", list(static))
    if cond.coarse_pr is not None:
        ds["coarse_pr"] = cond.coarse_pr.rename({"lat": "clat", "lon": "clon"}).astype("float32")
        ds["coarse_pr"].attrs = {"units": MM_PER_DAY, "long_name": "coarse precipitation condition (raw)"}
    ds["pr"].attrs = pr.attrs
    ds["mask"].attrs = {"long_name": "cell has data (1) or is masked/padded (0)", "flag_values": [0, 1]}
    ds["split"].attrs = {"long_name": "train/val/test split label"}
    ds["clat"].attrs = dict(cond.clat.attrs)
    ds["clon"].attrs = dict(cond.clon.attrs)
    ds = pad_grid(ds, cfg.grid_multiple)
    ds.attrs.update(
        {
            "title": "precip-cvae preprocessed dataset",
            "Conventions": "CF-1.8",
            "calendar": calendar_of(pr),
            "preprocess_config": json.dumps(asdict(cfg), sort_keys=True),
            "package_version": __version__,
            "n_sporadic_missing": counts["sporadic_missing"],
            "predictor_missing_policy": cfg.predictor_missing_policy,
            **{f"n_predictor_missing_days_{s}": missing_days[s] for s in SPLITS},
            "n_predictor_partial_cells": int(np.sum(partial_cells)),
            "n_condition_filled": json.dumps(dict(zip(cond.names, cond.n_filled.tolist()))),
            "source_target": target.attrs.get("source_files", ""),
            "source_predictors": json.dumps([p.attrs.get("source_files", "") for p in predictors]),
            **transform.to_attrs(),
        }
    )
    for s in SPLITS:
        ds.attrs[f"n_{s}"] = int((labels == s).sum())
    if fold is not None:
        years = season_years(pr.indexes["time"], cfg.split.season_year)
        ds.attrs["fold"] = int(fold)
        ds.attrs["folds"] = int(cfg.split.folds)
        for s in SPLITS:
            chosen = sorted({int(y) for y in years[labels == s]})
            ds.attrs[f"fold_{s}_years"] = json.dumps(chosen)
        log.info("fold %d of %d: test years %s, val years %s, train years %s", fold, cfg.split.folds,
                 ds.attrs["fold_test_years"], ds.attrs["fold_val_years"], ds.attrs["fold_train_years"])
    return ds


def run(data: DataConfig, cfg: PreprocessConfig, out: str, fold: int | None = None) -> xr.Dataset:
    """Read the configured NetCDF inputs, build the dataset (of ``fold`` under ``kfold_years``), write ``out``."""
    target = open_variable(data.target, precipitation=True)
    predictors = [open_variable(p) for p in data.predictors]
    flags = [bool(getattr(p, "precipitation", False)) for p in data.predictors]
    transforms = [str(getattr(p, "condition_transform", "none")) for p in data.predictors]
    static = open_static(data.static.paths, data.static.variables) if data.static is not None else None
    if (cfg.split.method == "kfold_years") != (fold is not None):
        raise InputError(f"preprocess.split.method {cfg.split.method!r} with fold {fold}: a fold is given exactly "
                         "when the method is kfold_years (its data set lives in results/<run>/fold<k>/)")
    ds = build_dataset(target, predictors, cfg, flags, static, fold, transforms)
    ds = ds.chunk({"time": cfg.chunk_time, "lat": -1, "lon": -1, "channel": -1})
    ds.attrs = cf.append_history(ds.attrs, cf.history_line(
        "preprocess", f"target {data.target.variable!r} from {data.target.paths}, "
        f"{len(data.predictors)} predictor(s); split, transform and normalisation fitted on train"))
    write_zarr(ds, out)
    log.info(
        "wrote %s: %d time steps (train %d, val %d, test %d), fine grid %dx%d, condition %s",
        out, ds.sizes["time"], ds.attrs["n_train"], ds.attrs["n_val"], ds.attrs["n_test"],
        ds.sizes["lat"], ds.sizes["lon"], dict(ds["condition"].sizes),
    )
    return ds
