"""What ``generate`` writes: the CF samples and conditions of ``augmented.zarr``, appended block by block."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xarray as xr

from .. import cf
from ..io import InputError

log = logging.getLogger(__name__)


CHUNK_BYTES = 4 * 2**20  # zarr chunks of augmented.zarr along `time`: about this many bytes of fields


CONDITION_GROUP = "condition"  # the group of augmented.zarr that holds the conditions (own grid: clat, clon)


def samples_dataset(block: np.ndarray, counts: np.ndarray, time: xr.DataArray, lat: np.ndarray, lon: np.ndarray,
                    ds: xr.Dataset, attrs: dict) -> xr.Dataset:
    """Samples of some days as a CF ensemble.

    Parameters
    ----------
    block : ndarray (D, R, h, w) float32, mm day-1; NaN past each day's count and outside the mask
    counts : ndarray (D,) int32, the realizations of each day that hold data
    time : xr.DataArray (D,), the days' time stamps in the data set (their CF encoding is kept)
    """
    t = cf.time_variable(time, "date of the condition the samples were drawn for")
    out = xr.Dataset(
        {
            "pr": (("time", "realization", "lat", "lon"), block, {
                "units": "mm day-1", "standard_name": "lwe_precipitation_rate", "cell_methods": "time: mean",
                "long_name": "synthetic precipitation (one field per realization)"}),
            "n_realizations": (("time",), counts.astype("int32"), {
                "long_name": "number of realizations of the date that hold a sample (the first n; the rest are "
                             "fill values)", "units": "1"}),
        },
        coords={
            "time": t,
            "realization": cf.realization_coord(block.shape[1]),
            "lat": ("lat", lat, dict(ds["lat"].attrs) or cf.COORD_DEFAULTS["lat"]),
            "lon": ("lon", lon, dict(ds["lon"].attrs) or cf.COORD_DEFAULTS["lon"]),
        },
        attrs=attrs,
    )
    return cf.attach_grid_mapping(out, ds["pr"].attrs.get("grid_mapping_attrs", ""), ["pr"], ds)


def condition_dataset(data, days: np.ndarray, ds: xr.Dataset, attrs: dict) -> xr.Dataset:
    """The normalised condition of each sampled day, one variable per channel on the predictor grid
    (``<channel>(time, clat, clon)``, dimensionless; ``value * normalisation_std + normalisation_mean``
    gives the channel back in its units)."""
    time = ds["time"].isel(time=days)
    t = cf.time_variable(time, "date of the condition")
    y = data.condition(days).numpy()  # (D, C, clat, clon)
    mean, std = ds["cond_mean"].values, ds["cond_std"].values
    variables = {}
    for c, name in enumerate(data.channels):
        if name in ("time", "clat", "clon"):
            raise InputError(f"condition channel {name!r} has the name of a coordinate; rename the variable")
        variables[str(name)] = (("time", "clat", "clon"), y[:, c], {
            "long_name": f"{name}, normalised with its train mean and standard deviation", "units": "1",
            "normalisation_mean": float(mean[c]), "normalisation_std": float(std[c])})
    # a condition grid made of target blocks may have lost its coordinates' attributes: the fine grid's apply
    cattrs = {c: dict(ds[c].attrs) or {k: v for k, v in ds[f].attrs.items() if k not in ("bounds", "original_name")}
              for c, f in (("clat", "lat"), ("clon", "lon"))}
    out = xr.Dataset(variables, coords={
        "time": t,
        "clat": ("clat", ds["clat"].values, cattrs["clat"]),
        "clon": ("clon", ds["clon"].values, cattrs["clon"]),
    }, attrs={**attrs, "title": "precip-cvae conditions of the synthetic samples"})
    return cf.attach_grid_mapping(out, ds["pr"].attrs.get("grid_mapping_attrs", ""), list(variables))


def hand_over(writer: ThreadPoolExecutor, pending, pieces: list, store: Path, first: bool, message: tuple):
    """Queue ``pieces`` (batches of days) as one block for the writer thread, once the block
    before it is on disk (its error is raised here); return the new block's future."""
    if pending is not None:
        pending.result()
    block = pieces[0] if len(pieces) == 1 else xr.concat(pieces, dim="time", data_vars="minimal", coords="minimal",
                                                         compat="override")
    return writer.submit(append_block, block, store, first, message)


def append_block(piece: xr.Dataset, store: Path, first: bool, message: tuple) -> None:
    """Write one block of days to ``store`` (the first creates it; metadata consolidated at the end), then log."""
    if first:
        per_chunk = max(1, CHUNK_BYTES // piece["pr"][0].nbytes)  # readers (the training set, users) load little
        encoding = cf.encoding(piece)
        encoding["pr"] = {"chunks": (per_chunk, *piece["pr"].shape[1:])}
        encoding["n_realizations"] = {**encoding.get("n_realizations", {}), "chunks": (per_chunk,)}
        piece.to_zarr(store, mode="w", consolidated=False, zarr_format=2, encoding=encoding)
    else:
        piece.drop_vars(["lat", "lon", "realization"]).to_zarr(
            store, append_dim="time", consolidated=False, zarr_format=2)
    log.info(*message)
