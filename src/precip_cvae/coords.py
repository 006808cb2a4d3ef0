"""Spatial coordinates of the inputs, one owner: axis names, order, longitude conventions, each cell's
own latitude and longitude on rotated-pole, projected and curvilinear grids, coverage and regions.

Every grid the workflow reads becomes ``(time, lat, lon)`` with ascending 1-D axes
(:func:`standardise_coords`).  The axes keep what they were: geographic degrees, rotated-pole degrees
(``grid_latitude``/``grid_longitude``) or projected metres/km (``projection_y/x_coordinate``); the input's
axis names are kept in the attribute ``original_name`` and given back in the files for users
(:func:`precip_cvae.cf.grid_names`).

A grid whose axes are not geographic carries each cell's own geographic position as the 2-D coordinates
``cell_lat``/``cell_lon`` (:data:`precip_cvae.grid.CELL_COORDS`): taken from the file's 2-D ``lat``/``lon``
auxiliary coordinates (any CF grid mapping: rotated pole, Lambert, polar stereographic...) or, for a
``rotated_latitude_longitude`` grid mapping without them, computed from the pole.  Predictors and static
fields are interpolated to, and coverage is checked at, those positions.

Longitudes (degrees) are put in one convention: the target's axis is made contiguous (a regional grid
stored split at the meridian or the dateline becomes one run, :func:`precip_cvae.grid.wrap_longitudes`)
and every predictor and static field is brought within 180 degrees of the target's centre, so that a
0..360 predictor and a -180..180 target (or the reverse) meet on the same numbers.  Each wrap is logged.
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import numpy as np
import xarray as xr

from .grid import CELL_COORDS, geographic, rotated_pole_to_geographic, wrap_longitudes
from .io import InputError, source_files

__all__ = ["LAT_NAMES", "LON_NAMES", "standardise_coords", "wrap_target_longitudes", "lon_centre",
           "to_lon_convention", "cell_points", "check_coverage", "select_region", "in_degrees"]

log = logging.getLogger(__name__)

LAT_NAMES = ("lat", "latitude", "y", "rlat", "nav_lat", "grid_latitude")
LON_NAMES = ("lon", "longitude", "x", "rlon", "nav_lon", "grid_longitude")
_GEO = {"latitude": "cell_lat", "longitude": "cell_lon"}  # standard_name -> internal 2-D name
_GEO_NAMES = {"lat": "cell_lat", "latitude": "cell_lat", "nav_lat": "cell_lat",
              "lon": "cell_lon", "longitude": "cell_lon", "nav_lon": "cell_lon"}


def in_degrees(coord: xr.DataArray) -> bool:
    """Whether an axis is in degrees (geographic or rotated), not metres or km (no units: degrees)."""
    return str(coord.attrs.get("units", "degrees")).lower().startswith("degree")


def _geographic_axis(coord: xr.DataArray) -> bool:
    """A geographic latitude/longitude axis (degrees, not a rotated pole's grid_latitude/longitude)."""
    return geographic(coord.attrs)


def _cell_kind(name: str, coord: xr.DataArray) -> str | None:
    std = str(coord.attrs.get("standard_name", ""))
    if std in _GEO:
        return _GEO[std]
    return _GEO_NAMES.get(str(name).lower())


def _grid_mapping(da: xr.DataArray) -> dict:
    text = da.attrs.get("grid_mapping_attrs")
    return json.loads(text) if isinstance(text, str) and text else {}


def standardise_coords(da: xr.DataArray, what: str) -> xr.DataArray:
    """Rename spatial dims to (lat, lon), sort both ascending, keep each cell's lat/lon, check time.

    Projected (y/x in km) and rotated (rlat/rlon) axes are renamed too; the original names are kept in
    the coordinate attribute ``original_name``.  2-D geographic coordinates on the two grid dims (the
    CF auxiliary ``lat``/``lon`` of a rotated-pole or projected grid) become ``cell_lat``/``cell_lon``;
    a ``rotated_latitude_longitude`` grid without them gets them computed from its pole.  Descending
    axes are flipped (lazily).  Unsorted time is sorted with a log line; duplicate time stamps,
    non-monotonic or non-unique spatial axes, axes without coordinate values and missing cell
    coordinates are errors.

    Parameters
    ----------
    da : xr.DataArray (time, <lat>, <lon>)
    what : str
        'target' or 'predictor X', for messages.
    """
    where = f"{source_files(da)}: {what} {da.name!r}"
    cells = {str(n): _cell_kind(str(n), c) for n, c in da.coords.items()
             if n not in da.dims and c.ndim == 2 and _cell_kind(str(n), c)}
    if len(set(cells.values())) != len(cells) or (cells and len(cells) != 2):
        raise InputError(f"{where}: 2-D coordinates {sorted(cells)} are not one latitude and one longitude; "
                         "expected the CF auxiliary coordinates lat(y, x) and lon(y, x)")
    da = da.drop_vars([n for n, c in da.coords.items() if n not in da.dims and n not in cells and c.ndim >= 1
                       and {"time"} != set(c.dims)])
    if cells:
        da = da.rename(cells)
    rename = {}
    for std, names in (("lat", LAT_NAMES), ("lon", LON_NAMES)):
        found = [d for d in da.dims if str(d).lower() in names]
        if not found:
            raise InputError(f"{where}: no {std} dimension; expected one of {list(names)}, got dims {da.dims}")
        if found[0] not in da.coords:
            raise InputError(f"{where}: dimension {found[0]!r} has no coordinate values (a grid of bare indices); "
                             "expected a 1-D axis coordinate (degrees, or metres/km with a CF grid mapping)")
        if found[0] != std:
            rename[found[0]] = std
    extra = [d for d in da.dims if d not in ("time", *rename, "lat", "lon")]
    for d in extra:
        if da.sizes[d] == 1:
            da = da.isel({d: 0}, drop=True)
        else:
            raise InputError(f"{where}: unexpected dimension {d!r} of size {da.sizes[d]}; expected (time, lat, lon)")
    if rename:
        da = da.rename(rename)
        for old, new in rename.items():
            da[new].attrs["original_name"] = old
    da = da.transpose("time", "lat", "lon")
    for name in CELL_COORDS:
        if name in da.coords:
            if set(da[name].dims) != {"lat", "lon"}:
                raise InputError(f"{where}: coordinate {name.removeprefix('cell_')!r} has dims {da[name].dims}; "
                                 "expected the grid's two dims")
            if not np.all(np.isfinite(np.asarray(da[name].values, float))):
                raise InputError(f"{where}: coordinate {name.removeprefix('cell_')!r} has missing values; expected "
                                 "a latitude/longitude for every cell")
            da = da.assign_coords({name: da[name].transpose("lat", "lon")})
    for dim in ("lat", "lon"):
        values = np.asarray(da[dim].values, dtype=float)
        if not np.all(np.isfinite(values)):
            raise InputError(f"{where}: coordinate {dim!r} has missing values")
        if len(np.unique(values)) != len(values):
            raise InputError(f"{where}: coordinate {dim!r} has repeated values; expected a unique 1-D axis")
        diffs = np.diff(values)
        if np.all(diffs < 0):
            log.info("%s: %s is descending; flipped to ascending", where, dim)
            da = da.isel({dim: slice(None, None, -1)})
        elif not np.all(diffs > 0):
            raise InputError(f"{where}: coordinate {dim!r} is not monotonic; expected a sorted grid axis")
    mapping = _grid_mapping(da)
    if not cells and mapping.get("grid_mapping_name") == "rotated_latitude_longitude":
        try:
            clat, clon = rotated_pole_to_geographic(da["lat"].values, da["lon"].values, mapping)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from exc
        da = da.assign_coords(cell_lat=(("lat", "lon"), clat), cell_lon=(("lat", "lon"), clon))
        log.info("%s: rotated-pole grid without 2-D lat/lon: each cell's position computed from the pole", where)
    for name, std, units in (("cell_lat", "latitude", "degrees_north"), ("cell_lon", "longitude", "degrees_east")):
        if name in da.coords:
            da[name].attrs = {"standard_name": std, "units": units, "long_name": f"{std} of the cell centre"}
    times = da["time"].values
    index = da.indexes["time"]
    if index.has_duplicates:
        dup = index[index.duplicated()][:5]
        raise InputError(f"{where}: duplicate time stamps, e.g. {[str(t) for t in dup]}; expected unique days")
    if not index.is_monotonic_increasing:
        log.warning("%s: time is not sorted; sorting %d steps", where, len(times))
        da = da.sortby("time")
    return da


def cell_points(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each cell's geographic (lat, lon), 2-D: the cell coordinates, or the axes of a geographic grid;
    None on a projected grid without cell coordinates."""
    if "cell_lat" in da.coords:
        return np.asarray(da["cell_lat"].values, float), np.asarray(da["cell_lon"].values, float)
    if _geographic_axis(da["lat"]) and _geographic_axis(da["lon"]):
        lat, lon = np.meshgrid(np.asarray(da["lat"].values, float), np.asarray(da["lon"].values, float), indexing="ij")
        return lat, lon
    return None


def lon_centre(da: xr.DataArray) -> float | None:
    """The centre longitude of a grid (the circular mean of its cells' longitudes); None without them."""
    points = cell_points(da)
    if points is None:
        return None
    rad = np.radians(points[1])
    return float(np.degrees(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())))


def _reorder_lon(da: xr.DataArray, values: np.ndarray, order: np.ndarray) -> xr.DataArray:
    if not np.array_equal(order, np.arange(order.size)):
        da = da.isel(lon=order)
    return da.assign_coords(lon=("lon", values, da["lon"].attrs))


def wrap_target_longitudes(da: xr.DataArray, what: str) -> xr.DataArray:
    """The target with a contiguous longitude axis (degrees) and cell longitudes within 180 degrees of
    its centre; logged when anything moved."""
    where = f"{source_files(da)}: {what} {da.name!r}"
    if in_degrees(da["lon"]):
        old = np.asarray(da["lon"].values, float)
        values, order = wrap_longitudes(old)
        if not np.array_equal(values, old):
            log.info("%s: longitudes %g..%g wrapped to one contiguous run %g..%g", where, old.min(), old.max(),
                     values[0], values[-1])
            da = _reorder_lon(da, values, order)
    if "cell_lon" in da.coords:
        centre = lon_centre(da)
        cells = np.asarray(da["cell_lon"].values, float)
        moved = centre + np.mod(cells - centre + 180.0, 360.0) - 180.0
        if not np.allclose(moved, cells):
            log.info("%s: cell longitudes brought within 180 degrees of the grid's centre %g", where, centre)
            da = da.assign_coords(cell_lon=(("lat", "lon"), moved, da["cell_lon"].attrs))
    return da


def to_lon_convention(da: xr.DataArray, centre: float | None, what: str) -> xr.DataArray:
    """A predictor or static field with its longitudes within 180 degrees of ``centre`` (the target's),
    ascending; or, with no centre (a projected target without cell coordinates), made contiguous.
    Only geographic axes move; logged when they do."""
    if not _geographic_axis(da["lon"]):
        return da
    old = np.asarray(da["lon"].values, float)
    values, order = wrap_longitudes(old, centre)
    if np.array_equal(values, old):
        return da
    log.info("%s: %s %r: longitudes %g..%g wrapped to %g..%g (the target's convention)", source_files(da), what,
             da.name, old.min(), old.max(), values[0], values[-1])
    if len(np.unique(values)) != len(values):
        raise InputError(f"{source_files(da)}: {what} {da.name!r}: longitudes {old.min():g}..{old.max():g} repeat "
                         "a cell after wrapping (a global grid with both -180 and 180, or 0 and 360); expected each "
                         "longitude once")
    return _reorder_lon(da, values, order)


def _extent(values: np.ndarray, axis: np.ndarray) -> tuple[float, float]:
    half = 0.5 * float(np.median(np.diff(axis))) if axis.size > 1 else 0.0
    return float(axis.min()) - half, float(axis.max()) + half


def check_coverage(target: xr.DataArray, preds: Sequence[xr.DataArray]) -> None:
    """Every target cell lies inside each predictor's domain, within half a predictor cell; else refuse,
    naming the predictor, its extent and the target's.  The target's cells are taken at their own
    latitude and longitude (cell coordinates on rotated and projected grids); a projected target
    without them is not compared (logged)."""
    points = cell_points(target)
    for p in preds:
        if points is None or not (_geographic_axis(p["lat"]) and _geographic_axis(p["lon"])):
            log.info("%s: predictor %r: its domain not compared with the target's (a projected grid without "
                     "each cell's lat/lon)", source_files(p), p.name)
            continue
        for axis, t in (("lat", points[0]), ("lon", points[1])):
            c = np.asarray(p[axis].values, dtype=float)
            lo, hi = _extent(t, c)
            tol = 1e-6 * max(1.0, abs(lo), abs(hi))
            if t.min() < lo - tol or t.max() > hi + tol:
                raise InputError(
                    f"{source_files(p)}: predictor {p.name!r} covers {axis} {c.min():g} to {c.max():g} (its cells "
                    f"reach {lo:g} to {hi:g}); the target's cells span {t.min():g} to {t.max():g}. Every target "
                    "cell must lie inside each predictor's domain, within half a predictor cell: give predictors that "
                    "cover the target, or cut the target with preprocess.region")


def select_region(da: xr.DataArray, region) -> xr.DataArray:
    """Cut ``[lat_min, lat_max, lon_min, lon_max]`` in the target's axis units (geographic degrees; on a
    rotated-pole grid its rotated degrees, on a projected grid its metres/km).  Longitudes in degrees
    are compared in the target's convention (``-10`` and ``350`` are the same meridian)."""
    if len(region) != 4:
        raise InputError(f"preprocess.region must be [lat_min, lat_max, lon_min, lon_max], got {list(region)}")
    lat0, lat1, lon0, lon1 = (float(v) for v in region)
    if in_degrees(da["lon"]) and da.sizes["lon"]:  # the region's west edge nearest the grid, its east edge after it
        centre = 0.5 * (float(da["lon"].values[0]) + float(da["lon"].values[-1]))
        span = 360.0 if lon1 - lon0 >= 360.0 else float(np.mod(lon1 - lon0, 360.0))
        lon0 = centre + float(np.mod(lon0 - centre + 180.0, 360.0)) - 180.0
        lon1 = lon0 + span
    out = da.sel(lat=slice(lat0, lat1), lon=slice(lon0, lon1))
    if out.sizes["lat"] == 0 or out.sizes["lon"] == 0:
        raise InputError(
            f"{source_files(da)}: preprocess.region {list(region)} selects no cell of the grid "
            f"(lat {float(da.lat.min()):g}..{float(da.lat.max()):g}, lon {float(da.lon.min()):g}..{float(da.lon.max()):g})"
        )
    log.info("region %s: %dx%d of %dx%d cells", list(region), out.sizes["lat"], out.sizes["lon"],
             da.sizes["lat"], da.sizes["lon"])
    return out
