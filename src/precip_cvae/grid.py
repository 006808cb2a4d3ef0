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


MISSING_POLICIES = ("propagate", "skip")


def _axis_weights(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower neighbour, upper neighbour and the upper one's linear weight of each target coordinate
    (clamped to the source range) on an ascending source axis."""
    f = np.clip(dst, src[0], src[-1])
    if src.size == 1:
        zero = np.zeros(f.size, dtype=np.int64)
        return zero, zero, np.zeros(f.size)
    lo = np.clip(np.searchsorted(src, f, side="right") - 1, 0, src.size - 2)
    return lo, lo + 1, (f - src[lo]) / (src[lo + 1] - src[lo])


def bilinear(values, src_lat, src_lon, dst_lat, dst_lon, missing: str = "propagate") -> np.ndarray:
    """Bilinear interpolation of the last two (lat, lon) axes of ``values`` onto (dst_lat, dst_lon).

    The one bilinear of the package: :func:`regrid` (predictors and static fields, lazily) and the
    interpolation baseline (:func:`precip_cvae.baselines.interpolation`) both call it.  Beyond the
    source hull the target coordinates are clamped to it (edge values, linear along the other axis).
    Coordinates may be ascending or descending; longitudes are not wrapped (regional grids).

    ``missing`` says what a missing (NaN) source value does:

    * ``"propagate"``: a target value with a missing neighbour of non-zero weight is missing
      (plain bilinear; what the strict checks of static fields and predictors count);
    * ``"skip"``: only the finite neighbours combine, their weights renormalised to sum to 1 (the
      plain value when all four are finite); where every neighbour of non-zero weight is missing
      (beside a coast of all-sea blocks) the nearest finite source value of that field, in
      coordinate units; a field with no finite value stays missing.

    Returns float64 of shape ``values.shape[:-2] + (len(dst_lat), len(dst_lon))``.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    v = np.asarray(values, dtype=np.float64)
    slat, slon = np.asarray(src_lat, dtype=np.float64), np.asarray(src_lon, dtype=np.float64)
    dlat, dlon = np.asarray(dst_lat, dtype=np.float64), np.asarray(dst_lon, dtype=np.float64)
    if v.ndim < 2 or v.shape[-2:] != (slat.size, slon.size):
        raise ValueError(f"values must end in ({slat.size}, {slon.size}) to match the coordinates, got {v.shape}")
    if slat.size > 1 and slat[0] > slat[-1]:
        slat, v = slat[::-1], v[..., ::-1, :]
    if slon.size > 1 and slon[0] > slon[-1]:
        slon, v = slon[::-1], v[..., ::-1]
    i0, i1, t = _axis_weights(slat, dlat)
    j0, j1, u = _axis_weights(slon, dlon)
    numer = np.zeros(v.shape[:-2] + (dlat.size, dlon.size))
    denom = np.zeros_like(numer)
    hole = np.zeros(numer.shape, dtype=bool)
    for rows, wr in ((i0, 1.0 - t), (i1, t)):
        for cols, wc in ((j0, 1.0 - u), (j1, u)):
            nb = v[..., rows, :][..., cols]  # (..., H, W)
            w = wr[:, None] * wc[None, :]
            finite = np.isfinite(nb)
            numer += np.where(finite, nb, 0.0) * w
            denom += (finite & (w > 0)) * w
            hole |= ~finite & (w > 0)
    if missing == "propagate":
        out = numer  # the weights sum to 1
        out[hole] = np.nan
        return out
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 1e-12, numer / denom, np.nan)
    gaps = np.isnan(out)
    if gaps.any():
        _fill_nearest(out, gaps, v, slat, slon, dlat, dlon)
    return out


def _fill_nearest(out, gaps, v, slat, slon, dlat, dlon) -> None:
    """Fill ``out[gaps]`` with the nearest finite source value of the same field (in place)."""
    from scipy.spatial import cKDTree

    la, lo = np.meshgrid(slat, slon, indexing="ij")
    src_xy = np.stack([la.ravel(), lo.ravel()], axis=-1)
    fla, flo = np.meshgrid(np.clip(dlat, slat[0], slat[-1]), np.clip(dlon, slon[0], slon[-1]), indexing="ij")
    dst_xy = np.stack([fla.ravel(), flo.ravel()], axis=-1)
    fields = v.reshape(-1, slat.size * slon.size)
    flat_out, flat_gaps = out.reshape(-1, dlat.size * dlon.size), gaps.reshape(-1, dlat.size * dlon.size)
    trees: dict[bytes, cKDTree] = {}
    for n in np.flatnonzero(flat_gaps.any(axis=1)):
        valid = np.isfinite(fields[n])
        if not valid.any():
            continue
        key = np.packbits(valid).tobytes()
        if key not in trees:
            trees[key] = cKDTree(src_xy[valid])
        where = np.flatnonzero(flat_gaps[n])
        _, nearest = trees[key].query(dst_xy[where])
        flat_out[n, where] = fields[n][valid][nearest]


def regrid(da: xr.DataArray, lat: xr.DataArray, lon: xr.DataArray) -> xr.DataArray:
    """:func:`bilinear` (``missing="propagate"``) of a DataArray with (lat, lon) dims onto (lat, lon),
    lazily (dask, chunk by chunk along the other dims) when ``da`` is; the dims keep their order and a
    float32 input stays float32."""
    lat_v, lon_v = np.asarray(lat.values, float), np.asarray(lon.values, float)
    if da.sizes["lat"] == lat_v.size and da.sizes["lon"] == lon_v.size:
        if np.allclose(da["lat"].values, lat_v) and np.allclose(da["lon"].values, lon_v):
            return da.assign_coords(lat=lat_v, lon=lon_v)
    dtype = da.dtype if np.issubdtype(da.dtype, np.floating) else np.dtype("float64")
    src_lat, src_lon = da["lat"].values, da["lon"].values
    if da.chunks is not None:
        da = da.chunk({"lat": -1, "lon": -1})  # the core dims in one chunk
    out = xr.apply_ufunc(
        lambda a: bilinear(a, src_lat, src_lon, lat_v, lon_v).astype(dtype, copy=False),
        da.drop_vars(["lat", "lon"], errors="ignore"),
        input_core_dims=[["lat", "lon"]],
        output_core_dims=[["lat", "lon"]],
        exclude_dims={"lat", "lon"},
        dask="parallelized",
        output_dtypes=[dtype],
        dask_gufunc_kwargs={"output_sizes": {"lat": lat_v.size, "lon": lon_v.size}},
        keep_attrs=True,
    )
    return out.transpose(*da.dims).assign_coords(lat=lat_v, lon=lon_v)


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
