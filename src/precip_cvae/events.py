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

from .config import EventsConfig, lookup
from .io import InputError, open_zarr, write_csv, write_netcdf

log = logging.getLogger(__name__)


def wet_day_thresholds(pr: xr.DataArray, mask: xr.DataArray, cfg: EventsConfig) -> xr.DataArray:
    """Per-pixel wet-day percentile thresholds (lat, lon) in mm/day.

    Parameters
    ----------
    pr : xr.DataArray (time, lat, lon), mm day-1 -- the train days only.
    mask : xr.DataArray (lat, lon), 1 = valid cell.

    Returns
    -------
    xr.DataArray (lat, lon), mm day-1; NaN outside the mask.  Attributes record the
    percentile, wet threshold, pooled value and the number of pixels using it.
    """
    q = cfg.percentile / 100.0
    # the percentile needs all of time for a pixel: chunk along space, not time
    wet = pr.where(pr >= cfg.wet_threshold)
    if wet.chunks is not None:
        wet = wet.chunk({"time": -1, "lat": "auto", "lon": -1})
    n_wet = wet.count("time")
    local = wet.quantile(q, dim="time", skipna=True).drop_vars("quantile")
    n_wet, local = (x.compute() for x in (n_wet, local))
    valid = mask.astype(bool).compute()
    values = wet.where(valid).data
    pooled_needed = bool(((n_wet < cfg.min_wet_days) & valid).any())
    pooled = np.nan
    if pooled_needed:
        flat = np.asarray(values.compute() if hasattr(values, "compute") else values).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            raise InputError(
                f"no wet day (pr >= {cfg.wet_threshold} mm/day) in the train split; cannot fit thresholds"
            )
        pooled = float(np.percentile(flat, cfg.percentile))
    use_pooled = (n_wet < cfg.min_wet_days) & valid
    thr = xr.where(use_pooled, pooled, local).where(valid).astype("float32").compute()
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


def daily_statistics(pr: xr.DataArray, thr: xr.DataArray, mask: xr.DataArray) -> pd.DataFrame:
    """Per-day domain mean, domain max and exceedance fraction over valid pixels.

    A pixel is valid on a day when it is in the mask and not missing that day.
    """
    valid = pr.notnull() & mask.astype(bool)
    n_valid = valid.sum(("lat", "lon"))
    exceed = ((pr > thr) & valid).sum(("lat", "lon"))
    mean = pr.where(valid).mean(("lat", "lon"))
    peak = pr.where(valid).max(("lat", "lon"))
    import dask

    n_valid, exceed, mean, peak = dask.compute(n_valid, exceed, mean, peak)
    frac = exceed.values / np.maximum(n_valid.values, 1)
    return pd.DataFrame(
        {
            "domain_mean": mean.values.astype(float),
            "domain_max": peak.values.astype(float),
            "exceed_fraction": frac.astype(float),
            "n_valid": n_valid.values.astype(int),
        }
    )


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
    stats = daily_statistics(ds["pr"], thr, ds["mask"])
    split = ds["split"].values.astype(str)
    flags, info = classify_days(stats, split, cfg)
    dates = format_times(ds.indexes["time"])
    table = pd.DataFrame({"date": dates, "split": split}).join(stats.drop(columns="n_valid"))
    table["is_event"] = flags.astype(bool)
    return table, info


def format_times(index) -> list[str]:
    """ISO strings: 'YYYY-MM-DD' for daily stamps at midnight, else 'YYYY-MM-DDTHH:MM'."""
    stamps = [(t.year, t.month, t.day, t.hour, t.minute) for t in index]
    if all(h == 0 and m == 0 for *_, h, m in stamps):
        return [f"{y:04d}-{mo:02d}-{d:02d}" for y, mo, d, _, _ in stamps]
    return [f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{m:02d}" for y, mo, d, h, m in stamps]


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
    thr = wet_day_thresholds(ds["pr"].isel(time=train), ds["mask"], cfg)
    table, info = event_table(ds, thr, cfg)
    n_train_events = int(table.loc[table["split"] == "train", "is_event"].sum())
    if n_train_events == 0:
        log.warning(
            "%s: no heavy day in the train split under criterion %r; later stages have no event to learn from",
            dataset, cfg.criterion,
        )
    thr.attrs.update({k: v for k, v in info.items()})
    thr.attrs["criterion"] = cfg.criterion
    thr_ds = thr.to_dataset()
    thr_ds["mask"] = ds["mask"]
    thr_ds.attrs = {"title": "precip-cvae heavy-precipitation thresholds", "Conventions": "CF-1.8",
                    "source_dataset": str(dataset), **{k: ds.attrs[k] for k in ("pad_lat", "pad_lon") if k in ds.attrs}}
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
