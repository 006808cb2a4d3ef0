"""CF-1.8 conventions of what the workflow writes (one owner: ``io``'s writers call :func:`conform`).

What the IOOS compliance checker (``compliance-checker --test cf:1.8``) and CDO ask of a file, made
true here once for every NetCDF and zarr store the workflow writes:

* data types are CF types: an ``int64`` variable is stored as ``int32`` (refused when its values do
  not fit), times as ``float64`` with CF units and calendar;
* coordinate variables carry no ``_FillValue`` (CF 2.5.1), integer flag variables neither;
* ``flag_values`` / ``flag_masks`` / ``valid_range`` have the data type of their variable (CF 3.5);
* the global attributes hold ``Conventions`` and a non-empty ``history`` (CF 2.6.2).

Ensembles (synthetic samples, evaluation members) are laid out as CF realizations:
``pr(time, realization, lat, lon)`` with ``realization`` an int32 coordinate of standard_name
``realization`` (:func:`realization_coord`).
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import xarray as xr

from . import __version__

CONVENTIONS = "CF-1.8"
TIME_UNITS = "days since 1970-01-01"  # when a time variable brings no units of its own
#: The fill value of float data in NetCDF files (CMIP's). NaN is not one: NCO's ncwa/ncra average it
#: into every cell instead of skipping it, while CDO, NCO and xarray all honour a numeric _FillValue.
NETCDF_FILL = 1.0e20
_SAME_TYPE_ATTRS = ("flag_values", "flag_masks", "valid_range", "valid_min", "valid_max")


def now_iso() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (history lines, creation times)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_line(stage: str, text: str, when: str | None = None) -> str:
    """One line of the ``history`` attribute: ``<time> precip-cvae <version> <stage>: <text>``."""
    return f"{when or now_iso()} precip-cvae {__version__} {stage}: {text}"


def append_history(attrs: dict, line: str) -> dict:
    """``attrs`` with ``line`` appended to its ``history`` (newest last, one line per step, as NCO does)."""
    old = str(attrs.get("history", "")).strip()
    return {**attrs, "history": f"{old}\n{line}" if old else line}


def realization_coord(n: int) -> xr.DataArray:
    """The CF ensemble axis: ``realization`` 0..n-1, int32, standard_name ``realization``."""
    return xr.DataArray(np.arange(n, dtype="int32"), dims="realization", attrs={
        "standard_name": "realization", "long_name": "ensemble member (sample) index", "units": "1"})


#: CF attributes of the fine grid's axes when the input gave none
COORD_DEFAULTS = {"lat": {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"},
                  "lon": {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}}


def time_variable(time: xr.DataArray, long_name: str) -> xr.Variable:
    """``time`` (a data set's time stamps) as a CF time coordinate: standard_name, axis, ``long_name``,
    and the data set's units and calendar kept as its encoding."""
    t = time.variable.copy()
    t.attrs = {"standard_name": "time", "long_name": long_name, "axis": "T"}
    t.encoding = {k: time.encoding[k] for k in ("units", "calendar") if k in time.encoding}
    return t


def _is_time(var: xr.Variable) -> bool:
    if np.issubdtype(var.dtype, np.datetime64):
        return True
    return var.dtype == object and var.size > 0 and hasattr(np.ravel(var.values)[0], "calendar")


def conform(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with CF data types, attribute types and ``Conventions`` (values unchanged).

    Raises ``ValueError`` naming the variable when an int64 variable does not fit in int32.
    """
    ds = ds.copy()
    for name in list(ds.variables):
        var = ds[name].variable
        if var.dtype == np.int64 or var.dtype == np.uint64:
            values = var.values
            if values.size and (values.min() < np.iinfo("int32").min or values.max() > np.iinfo("int32").max):
                raise ValueError(f"variable {name!r}: int64 values outside the int32 range; CF-1.8 has no int64")
            ds[name] = ds[name].astype("int32")
            var = ds[name].variable
        for key in _SAME_TYPE_ATTRS:
            if key in var.attrs and var.dtype.kind in "iuf":
                ds[name].attrs[key] = np.asarray(var.attrs[key]).astype(var.dtype)
    ds.attrs.setdefault("Conventions", CONVENTIONS)
    return ds


_PROJECTED = {"projection_y_coordinate": ("y", "Y"), "projection_x_coordinate": ("x", "X"),
              "grid_latitude": ("rlat", "Y"), "grid_longitude": ("rlon", "X")}
#: each cell's own latitude/longitude (2-D) in the workflow (grid.CELL_COORDS) -> its name in files for users
_CELL_NAMES = {"cell_lat": "lat", "cell_lon": "lon"}


def drop_dangling_references(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without ``bounds`` / ``grid_mapping`` attributes that name a variable it does not hold
    (carried over from an input file whose bounds were not kept; CDO and the checker look for them)."""
    ds = ds.copy()
    for name in ds.variables:
        for key in ("bounds", "grid_mapping"):
            ref = ds[name].attrs.get(key)
            if isinstance(ref, str) and ref.split(":")[0].strip() not in ds.variables:
                ds[name].attrs.pop(key)
    return ds


def grid_names(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with a projected or rotated-pole grid's axes under their own names in a file for users.

    The workflow calls its fine grid's axes ``lat``/``lon`` (and the condition grid's ``clat``/``clon``)
    whatever the grid; on a projected grid they hold ``projection_y/x_coordinate`` values (km, m), on a
    rotated-pole grid ``grid_latitude/longitude`` (rotated degrees), and CF and the checker refuse a
    coordinate named ``lat`` that is not a latitude. Such an axis gets back its ``original_name`` from
    the input (else ``y``/``x`` or ``rlat``/``rlon``; with a ``c`` before it for the condition grid) and
    an ``axis`` attribute; then each cell's own latitude and longitude (``cell_lat``/``cell_lon``) become
    the CF auxiliary coordinates ``lat``/``lon`` (xarray names them in each variable's ``coordinates``).
    Geographic grids are left as they are.
    """
    renames = {}
    for dim in ("lat", "lon", "clat", "clon"):
        if dim not in ds.dims or dim not in ds.variables:
            continue
        kind = _PROJECTED.get(str(ds[dim].attrs.get("standard_name", "")))
        if kind is None:
            continue
        target = str(ds[dim].attrs.get("original_name") or kind[0])
        if dim.startswith("c") and not ds[dim].attrs.get("original_name"):
            target = "c" + target
        if target in ds.variables or target in ds.dims or target in renames.values():
            continue
        renames[dim] = target
    ds = ds.rename(renames)
    for dim, target in renames.items():
        ds[target].attrs = {**ds[target].attrs, "axis": _PROJECTED[ds[target].attrs["standard_name"]][1]}
        ds[target].attrs.pop("original_name", None)
    cells = {c: n for c, n in _CELL_NAMES.items() if c in ds.variables and n not in ds.variables}
    if len(cells) == len(_CELL_NAMES):
        ds = ds.rename(cells)
    return ds



GRID_MAPPING = "crs"  # the name of the grid-mapping variable in what the workflow writes


def _on_map_grid(ds: xr.Dataset, name: str) -> bool:
    """``name`` lies on a projected or rotated-pole axis (one that needs the grid mapping to be located)."""
    return any(str(ds[d].attrs.get("standard_name", "")) in _PROJECTED for d in ds[name].dims if d in ds.variables)


def attach_grid_mapping(ds: xr.Dataset, grid_mapping_attrs: str, variables, cells: xr.Dataset | None = None
                        ) -> xr.Dataset:
    """``ds`` with the target's CF grid mapping (``crs``) referenced by ``variables``, and each fine cell's
    own latitude and longitude.

    ``grid_mapping_attrs`` is the JSON of the input's grid-mapping variable (``io.open_variable`` keeps
    it as the target's attribute ``grid_mapping_attrs``); empty or absent: no grid mapping. Only
    variables on a projected or rotated-pole grid (an axis of standard_name ``projection_y_coordinate``
    or ``grid_latitude``...) get it, so that CDO can compute cell positions and areas (its ``fldmean``
    refuses a bare projected grid).  ``cells``: a data set whose coordinates ``cell_lat``/``cell_lon``
    (dims lat, lon) cover ``ds``'s fine grid (the preprocessed data set, padded or not): they are added
    for ``ds``'s lat/lon values (written as the auxiliary ``lat``/``lon``, :func:`grid_names`).
    """
    ds = ds.copy()
    if cells is not None and "cell_lat" in cells.coords and "lat" in ds.dims:
        for name in ("cell_lat", "cell_lon"):
            values = cells[name].sel(lat=ds["lat"].values, lon=ds["lon"].values)
            ds = ds.assign_coords({name: (("lat", "lon"), values.values.astype("float64"), dict(cells[name].attrs))})
    if not grid_mapping_attrs:
        return ds
    import json

    tagged = False
    for name in variables:
        if name not in ds:
            continue
        if _on_map_grid(ds, name):
            ds[name].attrs = {**ds[name].attrs, "grid_mapping": GRID_MAPPING}
            tagged = True
    if tagged:
        ds[GRID_MAPPING] = xr.DataArray(np.int32(0), attrs=json.loads(grid_mapping_attrs))
    return ds


def encoding(ds: xr.Dataset, float_fill: float | None = None) -> dict:
    """Per-variable encoding for ``to_netcdf`` / ``to_zarr``: no ``_FillValue`` on coordinates and
    integer or text variables, times as float64 with CF units (the variable's own units/calendar kept),
    and ``float_fill`` (e.g. :data:`NETCDF_FILL`) as the fill value of float data when given."""
    enc: dict[str, dict] = {}
    for name, var in ds.variables.items():
        e: dict = {}
        if name in ds.coords or var.dtype.kind in "iubSUO":
            e["_FillValue"] = None
        elif float_fill is not None and var.dtype.kind == "f":
            e["_FillValue"] = var.dtype.type(float_fill)
        if _is_time(var):
            e["units"] = var.encoding.get("units", TIME_UNITS)
            if "calendar" in var.encoding:
                e["calendar"] = var.encoding["calendar"]
            e["dtype"] = "float64"
        if e:
            enc[name] = e
    return enc
