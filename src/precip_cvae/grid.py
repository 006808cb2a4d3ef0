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
#: each cell's own geographic latitude and longitude (2-D, on the fine grid's dims) on a rotated-pole,
#: projected or curvilinear grid; written as the CF auxiliary coordinates ``lat``/``lon`` (cf.grid_names)
CELL_COORDS = ("cell_lat", "cell_lon")


def _axis_weights(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower neighbour, upper neighbour and the upper one's linear weight of each target coordinate
    (clamped to the source range) on an ascending source axis."""
    f = np.clip(dst, src[0], src[-1])
    if src.size == 1:
        zero = np.zeros(f.size, dtype=np.int64)
        return zero, zero, np.zeros(f.size)
    lo = np.clip(np.searchsorted(src, f, side="right") - 1, 0, src.size - 2)
    return lo, lo + 1, (f - src[lo]) / (src[lo + 1] - src[lo])


def fractional_index(axis, values) -> np.ndarray:
    """Fractional index of ``values`` on a monotonic ``axis`` (ascending or descending): linear between its
    points, clamped to its ends; the position :func:`bilinear` weights by."""
    a, v = np.asarray(axis, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if a.size > 1 and a[0] > a[-1]:
        return (a.size - 1) - fractional_index(a[::-1], v)
    lo, _, t = _axis_weights(a, v.ravel())
    return (lo + t).reshape(v.shape)


def bilinear(values, src_lat, src_lon, dst_lat, dst_lon, missing: str = "propagate") -> np.ndarray:
    """Bilinear interpolation of the last two (lat, lon) axes of ``values`` onto (dst_lat, dst_lon).

    The one bilinear of the package: :func:`regrid` (predictors and static fields, lazily) and the
    interpolation baseline (:func:`precip_cvae.baselines.interpolation`) both call it.  Beyond the
    source hull the target coordinates are clamped to it (edge values, linear along the other axis).
    Coordinates may be ascending or descending; longitudes are not wrapped here (``preprocess`` puts
    every grid in one convention first, :func:`wrap_longitudes`).

    The destination is either two 1-D axes (a regular grid of ``len(dst_lat) x len(dst_lon)`` cells)
    or two 2-D arrays of the same shape: each cell's own latitude and longitude (a rotated-pole,
    projected or other curvilinear grid).

    ``missing`` says what a missing (NaN) source value does:

    * ``"propagate"``: a target value with a missing neighbour of non-zero weight is missing
      (plain bilinear; what the strict checks of static fields and predictors count);
    * ``"skip"``: only the finite neighbours combine, their weights renormalised to sum to 1 (the
      plain value when all four are finite); where every neighbour of non-zero weight is missing
      (beside a coast of all-sea blocks) the nearest finite source value of that field, in
      coordinate units; a field with no finite value stays missing.

    Returns float64 of shape ``values.shape[:-2] + (len(dst_lat), len(dst_lon))`` (1-D destination) or
    ``values.shape[:-2] + dst_lat.shape`` (2-D destination).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    v = np.asarray(values, dtype=np.float64)
    slat, slon = np.asarray(src_lat, dtype=np.float64), np.asarray(src_lon, dtype=np.float64)
    dlat, dlon = np.asarray(dst_lat, dtype=np.float64), np.asarray(dst_lon, dtype=np.float64)
    if v.ndim < 2 or v.shape[-2:] != (slat.size, slon.size):
        raise ValueError(f"values must end in ({slat.size}, {slon.size}) to match the coordinates, got {v.shape}")
    if dlat.ndim == 2 or dlon.ndim == 2:
        if dlat.shape != dlon.shape:
            raise ValueError(f"2-D destination coordinates must have one shape, got {dlat.shape} and {dlon.shape}")
        shape, plat, plon = dlat.shape, dlat.ravel(), dlon.ravel()
    else:
        shape = (dlat.size, dlon.size)
        plat, plon = (a.ravel() for a in np.meshgrid(dlat, dlon, indexing="ij"))
    if slat.size > 1 and slat[0] > slat[-1]:
        slat, v = slat[::-1], v[..., ::-1, :]
    if slon.size > 1 and slon[0] > slon[-1]:
        slon, v = slon[::-1], v[..., ::-1]
    i0, i1, t = _axis_weights(slat, plat)
    j0, j1, u = _axis_weights(slon, plon)
    numer = np.zeros(v.shape[:-2] + (plat.size,))
    denom = np.zeros_like(numer)
    hole = np.zeros(numer.shape, dtype=bool)
    for rows, wr in ((i0, 1.0 - t), (i1, t)):
        for cols, wc in ((j0, 1.0 - u), (j1, u)):
            nb = v[..., rows, cols]  # (..., P): each destination point's neighbour
            w = wr * wc
            finite = np.isfinite(nb)
            numer += np.where(finite, nb, 0.0) * w
            denom += (finite & (w > 0)) * w
            hole |= ~finite & (w > 0)
    if missing == "propagate":
        out = numer  # the weights sum to 1
        out[hole] = np.nan
        return out.reshape(v.shape[:-2] + shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 1e-12, numer / denom, np.nan)
    gaps = np.isnan(out)
    if gaps.any():
        _fill_nearest(out, gaps, v, slat, slon, plat, plon)
    return out.reshape(v.shape[:-2] + shape)


def _fill_nearest(out, gaps, v, slat, slon, plat, plon) -> None:
    """Fill ``out[gaps]`` (``(..., P)``) with the nearest finite source value of the same field (in place)."""
    from scipy.spatial import cKDTree

    la, lo = np.meshgrid(slat, slon, indexing="ij")
    src_xy = np.stack([la.ravel(), lo.ravel()], axis=-1)
    dst_xy = np.stack([np.clip(plat, slat[0], slat[-1]), np.clip(plon, slon[0], slon[-1])], axis=-1)
    fields = v.reshape(-1, slat.size * slon.size)
    flat_out, flat_gaps = out.reshape(-1, plat.size), gaps.reshape(-1, plat.size)
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


def geographic(attrs: Mapping) -> bool:
    """Whether coordinate attributes describe a geographic axis (not rotated-pole ``grid_*`` degrees, not a
    ``projection_*`` axis in metres or km)."""
    std = str(attrs.get("standard_name", ""))
    return not std.startswith(("grid_", "projection_")) and \
        str(attrs.get("units", "degrees")).lower().startswith("degree")


def fine_positions(lat, lon, cells: Mapping, condition_attrs: Mapping):
    """Where the fine cells lie in the condition grid's coordinates, for interpolating it onto them:
    each cell's own ``cell_lat``/``cell_lon`` (2-D) when the fine grid has them and the condition grid is
    geographic (predictors on a lat/lon grid under a rotated-pole or projected target), else the fine
    axes (a geographic target, or a condition grid of the target's own blocks)."""
    if "cell_lat" in cells and geographic(condition_attrs):
        return np.asarray(cells["cell_lat"], float), np.asarray(cells["cell_lon"], float)
    return np.asarray(lat, float), np.asarray(lon, float)


def wrap_longitudes(lon, centre: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes (degrees) in one convention, contiguous: ``(values, order)`` with ``values`` ascending
    and ``order`` the permutation of the axis that puts the cells in that order.

    ``centre`` given: every value is moved by a multiple of 360 into ``[centre - 180, centre + 180)``
    (the convention of a grid centred on ``centre``: a predictor brought to the target's).  ``centre``
    None: the axis is cut at its largest gap on the circle, so that a regional grid stored split at
    the meridian (``0.25 ... 4.25, 350.25 ... 359.75``) or at the dateline becomes one run
    (``-9.75 ... 4.25``); the first value is put in ``[-180, 180)`` and the rest follow it upwards
    (a grid across the dateline may end above 180).  An axis that is contiguous already is returned
    unchanged.
    """
    lon = np.asarray(lon, dtype=np.float64)
    if lon.size < 2:
        return lon.copy(), np.arange(lon.size)
    if centre is not None:
        wrapped = centre + np.mod(lon - centre + 180.0, 360.0) - 180.0
        order = np.argsort(wrapped, kind="stable")
        return wrapped[order], order
    if np.all(np.diff(lon) > 0) and lon[-1] - lon[0] < 360.0:
        step = np.diff(lon)
        if step.max() <= 1.5 * np.median(step):
            return lon.copy(), np.arange(lon.size)  # contiguous already: unchanged
    mod = np.mod(lon, 360.0)
    order = np.argsort(mod, kind="stable")
    ring = mod[order]
    gaps = np.diff(np.concatenate([ring, ring[:1] + 360.0]))
    cut = int(np.argmax(gaps))  # the largest gap is between ring[cut] and the next value: start after it
    order = np.roll(order, -(cut + 1))
    start = float(np.mod(lon[order[0]] + 180.0, 360.0) - 180.0)
    values = start + np.mod(lon[order] - start, 360.0)
    return values, order


def rotated_pole_to_geographic(rlat, rlon, grid_mapping: dict) -> tuple[np.ndarray, np.ndarray]:
    """Geographic latitude and longitude (2-D, degrees) of the cells of a CF ``rotated_latitude_longitude``
    grid with axes ``rlat``, ``rlon`` (degrees in the rotated frame).

    The standard rotation (as CDO and CORDEX): the rotated north pole lies at the geographic
    ``grid_north_pole_latitude``, ``grid_north_pole_longitude``; ``north_pole_grid_longitude`` must be 0
    (the CORDEX grids' value; another is refused).
    """
    try:
        plat = float(grid_mapping["grid_north_pole_latitude"])
        plon = float(grid_mapping["grid_north_pole_longitude"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("a rotated_latitude_longitude grid mapping needs grid_north_pole_latitude and "
                         f"grid_north_pole_longitude; got {dict(grid_mapping)}") from exc
    if float(grid_mapping.get("north_pole_grid_longitude", 0.0)) != 0.0:
        raise ValueError(f"north_pole_grid_longitude {grid_mapping['north_pole_grid_longitude']} is not supported "
                         "(only 0); give the file's 2-D lat/lon coordinates instead")
    pr, lr = np.meshgrid(np.radians(np.asarray(rlat, float)), np.radians(np.asarray(rlon, float)), indexing="ij")
    pp = np.radians(plat)
    lat = np.degrees(np.arcsin(np.clip(np.sin(pr) * np.sin(pp) + np.cos(pr) * np.cos(lr) * np.cos(pp), -1.0, 1.0)))
    lon = plon - 180.0 + np.degrees(np.arctan2(np.cos(pr) * np.sin(lr),
                                               np.sin(pp) * np.cos(pr) * np.cos(lr) - np.cos(pp) * np.sin(pr)))
    return lat, np.mod(lon + 180.0, 360.0) - 180.0


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
    for name in CELL_COORDS:  # each cell's own lat/lon (curvilinear grids): extended linearly along both axes
        if name in ds.coords:
            cells = np.apply_along_axis(_extend_coord, 0, ds[name].values.astype(float), *plat)
            cells = np.apply_along_axis(_extend_coord, 1, cells, *plon)
            out = out.assign_coords({name: (("lat", "lon"), cells, ds[name].attrs)})
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
