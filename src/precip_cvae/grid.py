"""The fine grid's geometry, one owner each: padding to a multiple and its undoing (crop), bilinear
regridding, and block means.

``preprocess`` pads the target grid to ``preprocess.grid_multiple`` (NaN, masked) and records the
padding in the attributes ``pad_lat`` / ``pad_lon`` (cells added before, after); every later stage
crops with :func:`crop_to_original` (xarray) or :func:`crop_array` (numpy / torch arrays).
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import xarray as xr

log = logging.getLogger(__name__)


def regrid(da: xr.DataArray, lat: xr.DataArray, lon: xr.DataArray) -> xr.DataArray:
    """Bilinear interpolation onto (lat, lon); beyond the source hull the target
    coordinates are clamped to it (edge values, linear along the other axis)."""
    lat_v, lon_v = np.asarray(lat.values, float), np.asarray(lon.values, float)
    if da.sizes["lat"] == lat_v.size and da.sizes["lon"] == lon_v.size:
        if np.allclose(da["lat"].values, lat_v) and np.allclose(da["lon"].values, lon_v):
            return da.assign_coords(lat=lat_v, lon=lon_v)
    src_lat, src_lon = da["lat"].values, da["lon"].values
    clamped_lat = np.clip(lat_v, src_lat.min(), src_lat.max())
    clamped_lon = np.clip(lon_v, src_lon.min(), src_lon.max())
    out = da.interp(lat=clamped_lat, lon=clamped_lon, method="linear")
    return out.assign_coords(lat=lat_v, lon=lon_v)


def block_mean(da: xr.DataArray, factor: int) -> xr.DataArray:
    """Block-average a (time, lat, lon) field by ``factor``: the mean over the valid (finite) cells of
    each block, NaN where a block has none (all sea); ragged edges trimmed."""
    return da.coarsen(lat=factor, lon=factor, boundary="trim").mean()  # skips NaN (floats' default)


def pad_amount(n: int, multiple: int) -> tuple[int, int]:
    """Cells to add (before, after) so that ``n`` becomes a multiple of ``multiple``."""
    total = (-n) % multiple
    return total // 2, total - total // 2


def _extend_coord(values: np.ndarray, before: int, after: int) -> np.ndarray:
    step = float(np.median(np.diff(values))) if len(values) > 1 else 1.0
    head = values[0] - step * np.arange(before, 0, -1)
    tail = values[-1] + step * np.arange(1, after + 1)
    return np.concatenate([head, values, tail])


def pad_grid(ds: xr.Dataset, multiple: int) -> xr.Dataset:
    """Pad the fine (lat, lon) grid with NaN / masked cells to a multiple of ``multiple``."""
    plat = pad_amount(ds.sizes["lat"], multiple)
    plon = pad_amount(ds.sizes["lon"], multiple)
    attrs = dict(ds.attrs) | {
        "pad_lat": list(plat),
        "pad_lon": list(plon),
        "orig_nlat": int(ds.sizes["lat"]),
        "orig_nlon": int(ds.sizes["lon"]),
    }
    if plat == (0, 0) and plon == (0, 0):
        return ds.assign_attrs(attrs)
    lat = _extend_coord(ds["lat"].values, *plat)
    lon = _extend_coord(ds["lon"].values, *plon)
    out = ds.pad(lat=plat, lon=plon)  # NaN for floats
    out = out.assign_coords(lat=("lat", lat, ds["lat"].attrs), lon=("lon", lon, ds["lon"].attrs))
    if "mask" in out:
        out["mask"] = out["mask"].fillna(0).astype("int8")
    log.info("padded fine grid %s -> %s (lat %s, lon %s)", (ds.sizes["lat"], ds.sizes["lon"]), (lat.size, lon.size), plat, plon)
    return out.assign_attrs(attrs)


def crop_to_original(obj, attrs: dict | None = None):
    """Undo :func:`pad_grid` on a Dataset/DataArray with (lat, lon) dims."""
    attrs = attrs if attrs is not None else obj.attrs
    plat = list(attrs.get("pad_lat", [0, 0]))
    plon = list(attrs.get("pad_lon", [0, 0]))
    return obj.isel(
        lat=slice(plat[0], obj.sizes["lat"] - plat[1]),
        lon=slice(plon[0], obj.sizes["lon"] - plon[1]),
    )


def crop_array(a, attrs: Mapping) -> np.ndarray:
    """Undo :func:`pad_grid` on the last two (lat, lon) axes of an array (numpy or torch)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    plat = [int(v) for v in np.atleast_1d(attrs.get("pad_lat", [0, 0]))]
    plon = [int(v) for v in np.atleast_1d(attrs.get("pad_lon", [0, 0]))]
    return a[..., plat[0] : a.shape[-2] - plat[1], plon[0] : a.shape[-1] - plon[1]]
