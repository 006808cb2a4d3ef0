"""All file access: NetCDF reading, zarr/NetCDF/CSV/JSON writing.

Writes are atomic: a stage writes into a temporary sibling and renames it into
place only when complete, so a killed job never leaves a half-written store that
a later stage could take for a finished one, and a failed write leaves the
previous result untouched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import cf
from .config import VariableSource

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input data: the message names the file(s), the variable and the expectation."""


# ----------------------------------------------------------------------------- reading


def expand_glob(pattern: str, what: str = "input") -> list[str]:
    """Sorted files matching ``pattern``; an error naming the pattern when none do."""
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise InputError(f"{what}: no file matches {pattern!r} (working directory {os.getcwd()})")
    return files


TIME_NAMES = ("time", "valid_time", "t")


def _cf_time_names(ds: xr.Dataset) -> list[str]:
    """Names of the time variable: the usual names, then any variable with CF ``standard_name: time`` or ``axis: T``."""
    names = [n for n in TIME_NAMES if n in ds.variables or n in ds.dims]
    for name, var in ds.variables.items():
        attrs = {**var.attrs, **var.encoding}
        cf_time = attrs.get("standard_name") == "time" or str(attrs.get("axis", "")).upper() == "T"
        if str(name) not in names and cf_time:
            names.append(str(name))
    return names


def _ensure_time_dim(ds: xr.Dataset) -> xr.Dataset:
    """Name the time dimension ``time``; give a single-time-step file (e.g. a radar scan) a length-1 one.

    Raises
    ------
    InputError
        The file has no time coordinate at all (named by its source).
    """
    if "time" in ds.dims:
        return ds
    for name in _cf_time_names(ds):
        if name in ds.variables and ds[name].ndim == 0:
            value = ds[name].values
            ds = ds.drop_vars(name)
            return ds.expand_dims(time=[value])
        if name in ds.dims:
            return ds.rename({name: "time"})
    raise InputError(f"{ds.encoding.get('source', '<file>')}: no time coordinate; expected a CF time variable "
                     "(standard_name time or axis T)")


def _describe(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"


_NC3_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}


def netcdf3_sizes(path: str) -> tuple[int, int] | None:
    """(bytes the header of a NetCDF-3 file says its data needs, bytes on disk); None for other formats.

    The netCDF library reads the missing tail of a truncated NetCDF-3 file as zeros
    without an error (HDF5-based NetCDF-4 files fail to open instead), so this reads
    the header (classic, 64-bit offset and CDF-5 layouts) and compares.

    Raises
    ------
    EOFError
        The header itself ends early (a corrupt or cut file).
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic[:3] != b"CDF" or magic[3:] not in (b"\x01", b"\x02", b"\x05"):
            return None
        wide = 8 if magic[3] == 5 else 4  # NON_NEG and nelems: 8 bytes in CDF-5

        def num(n=wide):
            raw = fh.read(n)
            if len(raw) < n:
                raise EOFError(f"{path}: the NetCDF-3 header ends early")
            return int.from_bytes(raw, "big")

        def skip_name():
            n = num()
            fh.seek(n + (-n) % 4, 1)

        def skip_attributes():
            fh.seek(4, 1)  # tag (0 when absent)
            for _ in range(num()):
                skip_name()
                kind = num(4)
                n = num() * _NC3_TYPE_BYTES.get(kind, 1)
                fh.seek(n + (-n) % 4, 1)

        numrecs = num()
        fh.seek(4, 1)
        dims = []
        for _ in range(num()):
            skip_name()
            dims.append(num())
        skip_attributes()
        fh.seek(4, 1)
        fixed_end, records = 0, []
        for _ in range(num()):
            skip_name()
            shape = [dims[num()] for _ in range(num())]
            skip_attributes()
            nbytes = _NC3_TYPE_BYTES.get(num(4), 1)
            vsize = num()
            begin = num(4 if magic[3] == 1 else 8)
            if shape and shape[0] == 0:  # record variable: the unlimited dimension has length 0 here
                records.append((begin, vsize, nbytes * int(np.prod(shape[1:]))))
            else:
                fixed_end = max(fixed_end, begin + nbytes * int(np.prod(shape)))
        need = fixed_end
        if records and 0 < numrecs < 2**32 - 1:  # 0xFFFFFFFF: streaming, count unknown
            recsize = sum(v for _, v, _ in records) if len(records) > 1 else records[0][2]
            need = max(need, *(b + (numrecs - 1) * recsize + one for b, _, one in records))
    return need, os.path.getsize(path)


def open_variable(source: VariableSource, precipitation: bool | None = None) -> xr.DataArray:
    """Open one variable lazily from all files matching ``source.paths``.

    Returns a dask-backed DataArray with a ``time`` dimension, in the files' own chunks (one per
    file for unchunked NetCDF; the caller rechunks); nothing is loaded.
    The DataArray's ``attrs['source_files']`` names the files for later messages,
    and ``attrs['units']`` is ``source.units`` when given (override).

    Files that state different units: a precipitation variable (``precipitation``, default
    ``source.precipitation``; the target is one) has each file's values converted by its own units
    to the first file's (lazily, a factor per time step); any other variable is refused naming two
    files and their units.  A file without units among files with units is refused by name.

    Raises
    ------
    InputError
        Empty glob, unreadable/truncated file (named), variable missing (lists the
        variables that are there), no time dimension.
    """
    files = expand_glob(source.paths, f"variable {source.variable!r}")
    for f in files:
        try:
            sizes = netcdf3_sizes(f)
        except EOFError as exc:
            raise InputError(f"{f}: cannot be read as NetCDF (the NetCDF-3 header ends early: a cut or corrupt file)") \
                from exc
        except OSError:
            sizes = None  # unreadable: the opening below names it
        if sizes and sizes[1] < sizes[0]:
            raise InputError(
                f"{f}: truncated NetCDF file ({sizes[1]} bytes; its header describes {sizes[0]}); "
                "expected a complete file (copy or download it again)"
            )
    grids: dict[str, tuple] = {}  # file -> (spatial coordinates, first and last time stamp)
    file_units: dict[str, str | None] = {}  # file -> the units attribute of the variable in it

    def record(ds: xr.Dataset) -> xr.Dataset:
        ds = _ensure_time_dim(ds)
        coords = {str(d): ds[d].values for d in ds.dims if d != "time" and d in ds.coords}
        span = (ds["time"].values.min(), ds["time"].values.max()) if "time" in ds.coords and ds.sizes["time"] else None
        name = ds.encoding.get("source", f"file {len(grids) + 1}")
        grids[name] = (coords, span)
        if source.variable in ds:
            file_units[name] = ds[source.variable].attrs.get("units")
        return ds

    try:
        ds = xr.open_mfdataset(
            files,
            combine="by_coords",
            preprocess=record,
            chunks={},  # the files' own chunks (one per file for unchunked NetCDF); rechunked later
            data_vars="minimal",
            coords="minimal",
            compat="override",
            join="outer",
            parallel=False,
            decode_timedelta=False,
        )
    except InputError:
        raise
    except Exception as exc:  # find which file is at fault and say so
        for f in files:
            try:
                with xr.open_dataset(f, decode_timedelta=False) as one:
                    one.attrs
            except Exception as inner:
                raise InputError(f"{f}: cannot be read as NetCDF ({type(inner).__name__}: {inner})") from inner
        _check_combinable(grids, source.paths)
        raise InputError(
            f"{_describe(files)}: files matching {source.paths!r} cannot be combined along time "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    _check_combinable(grids, source.paths)
    if source.variable not in ds.data_vars:
        raise InputError(
            f"{_describe(files)}: variable {source.variable!r} not found; the files hold "
            f"{sorted(map(str, ds.data_vars))}"
        )
    da = ds[source.variable]
    if "time" not in da.dims:
        raise InputError(f"{_describe(files)}: variable {source.variable!r} has no time dimension (dims {da.dims})")
    da.attrs = dict(da.attrs)
    da = _mask_outside_valid_range(da, source)
    mapping = da.attrs.get("grid_mapping")
    if isinstance(mapping, str) and mapping in ds.variables:  # a projected grid: keep its CF grid mapping
        da.attrs["grid_mapping_attrs"] = json.dumps(
            {str(k): (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in ds[mapping].attrs.items()},
            default=str)
    if source.units is not None:
        da.attrs["units"] = source.units
    else:
        is_pr = source.precipitation if precipitation is None else precipitation
        da = _units_per_file(da, file_units, {f: g[1] for f, g in grids.items()}, source, bool(is_pr))
    da.attrs["source_files"] = json.dumps(files)
    da.attrs["source_pattern"] = source.paths
    da.name = source.variable
    return da


def _mask_outside_valid_range(da: xr.DataArray, source: VariableSource) -> xr.DataArray:
    """``da`` with the values outside its CF ``valid_range`` / ``valid_min`` / ``valid_max`` missing (CF 2.5.1:
    they are not data; xarray decodes ``_FillValue`` and ``missing_value`` only), lazily, with a log line.
    The bounds are in the packed representation when the variable is packed (``scale_factor``,
    ``add_offset``), as CF says; the attributes are dropped once applied."""
    attrs = da.attrs
    lo = hi = None
    if "valid_range" in attrs:
        bounds = np.asarray(attrs["valid_range"], dtype=float).ravel()
        if bounds.size != 2 or not bounds[0] <= bounds[1]:
            raise InputError(f"{source.paths}: variable {source.variable!r} has valid_range {bounds.tolist()}; "
                             "expected two values, the smallest first (CF 2.5.1)")
        lo, hi = float(bounds[0]), float(bounds[1])
    if "valid_min" in attrs:
        lo = float(np.asarray(attrs["valid_min"], dtype=float).ravel()[0])
    if "valid_max" in attrs:
        hi = float(np.asarray(attrs["valid_max"], dtype=float).ravel()[0])
    if lo is None and hi is None:
        return da
    scale = float(da.encoding.get("scale_factor", 1.0))
    offset = float(da.encoding.get("add_offset", 0.0))
    lo, hi = (None if v is None else v * scale + offset for v in (lo, hi))
    if scale < 0:
        lo, hi = hi, lo
    keep = xr.ones_like(da, dtype=bool)
    if lo is not None:
        keep = keep & (da >= lo)
    if hi is not None:
        keep = keep & (da <= hi)
    out = da.where(keep)
    out.attrs = {k: v for k, v in attrs.items() if k not in ("valid_range", "valid_min", "valid_max")}
    out.encoding = dict(da.encoding)
    log.info("%s: variable %r: values outside its valid range [%s, %s] (CF valid_range/valid_min/valid_max) are "
             "read as missing", source.paths, source.variable, "-inf" if lo is None else f"{lo:g}",
             "inf" if hi is None else f"{hi:g}")
    return out.rename(da.name)


def median_step_seconds(index) -> float | None:
    """The median step of a time index in seconds (numpy or cftime); None for fewer than 2 stamps."""
    if len(index) < 2:
        return None
    if isinstance(index, pd.DatetimeIndex):
        steps = np.diff(index.values).astype("timedelta64[s]").astype(float)
    else:
        steps = np.array([(b - a).total_seconds() for a, b in zip(index[:-1], index[1:])])
    return float(np.median(steps))


def _units_per_file(da: xr.DataArray, file_units: dict, spans: dict, source: VariableSource,
                    precipitation: bool) -> xr.DataArray:
    """``da`` with one units across its files (see :func:`open_variable`)."""
    from .units import UnitsError, factor_to_mm_per_day

    stated = {f: u for f, u in file_units.items() if u not in (None, "")}
    if len(set(stated.values())) <= 1 and (not stated or len(stated) == len(file_units)):
        return da
    first, units = next(iter(stated.items()))
    bare = [f for f in file_units if f not in stated]
    if bare:
        raise InputError(f"{bare[0]}: variable {source.variable!r} has no 'units' attribute, while {first} states "
                         f"{units!r}; expected every file matching {source.paths!r} to state its units (or "
                         "data.*.units, which applies to all of them)")
    other = next(f for f, u in stated.items() if u != units)
    if not precipitation:
        raise InputError(f"{other}: variable {source.variable!r} is in {stated[other]!r} but {first} is in {units!r}; "
                         f"expected one units across the files matching {source.paths!r} (convert them to one)")
    index = da.indexes["time"]
    dt = median_step_seconds(index)  # amounts (mm per step) need it
    factors = np.ones(len(index))
    times = da["time"].values
    try:
        base = factor_to_mm_per_day(units, dt)
        for f, u in stated.items():
            if u != units and spans.get(f) is not None:
                lo, hi = spans[f]
                factors[(times >= lo) & (times <= hi)] = factor_to_mm_per_day(u, dt) / base
    except UnitsError as exc:
        raise InputError(f"{other}: variable {source.variable!r}: files in {units!r} and {stated[other]!r}: {exc}") \
            from exc
    log.info("%s: variable %r: the files state different units (%s); each file converted by its own to %r",
             source.paths, source.variable, sorted(set(stated.values())), units)
    attrs = dict(da.attrs, units=units)
    out = da * xr.DataArray(factors.astype(da.dtype), dims="time", coords={"time": da["time"]})
    out.attrs = attrs
    return out.rename(da.name)


def open_static(paths: str, variables) -> dict[str, xr.DataArray]:
    """Read time-invariant fields (``data.static``): name -> DataArray (loaded; small).

    Raises
    ------
    InputError
        Empty glob, unreadable file, or a variable that is in none of the files
        (the message lists what the files hold).
    """
    files = expand_glob(paths, "data.static")
    found: dict[str, xr.DataArray] = {}
    held: set[str] = set()
    for f in files:
        try:
            with xr.open_dataset(f, decode_timedelta=False) as ds:
                held |= {str(v) for v in ds.data_vars}
                for name in variables:
                    if name in ds.data_vars and name not in found:
                        da = ds[name].load()
                        da.attrs = dict(da.attrs) | {"source_files": json.dumps([f])}
                        found[name] = da
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{f}: cannot be read as NetCDF ({type(exc).__name__}: {exc})") from exc
    missing = [v for v in variables if v not in found]
    if missing:
        raise InputError(f"{_describe(files)}: static variable(s) {missing} not found (data.static.variables); "
                         f"the files hold {sorted(held)}")
    return {name: found[name] for name in variables}


def _check_combinable(grids: dict[str, tuple], pattern: str) -> None:
    """Refuse files of one glob on different grids (combined, they would make a union grid
    full of NaN) or with overlapping time stamps; the message names the two files."""
    items = list(grids.items())
    if not items:
        return
    first, (ref, _) = items[0]
    for f, (coords, _) in items[1:]:
        for dim in sorted(set(ref) | set(coords)):
            a, b = ref.get(dim), coords.get(dim)
            if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                span = lambda v: "absent" if v is None else f"{v.size} values {v.min()}..{v.max()}"  # noqa: E731
                raise InputError(
                    f"{f}: coordinate {dim!r} ({span(b)}) differs from {first} ({span(a)}); "
                    f"expected every file matching {pattern!r} on one grid"
                )
    spans = sorted((s, f) for f, (_, s) in items if s is not None)
    show = lambda t: str(pd.Timestamp(t)) if isinstance(t, np.datetime64) else str(t)  # noqa: E731
    for (a, fa), (b, fb) in zip(spans, spans[1:]):
        if b[0] <= a[1]:
            raise InputError(
                f"{fb}: time stamps {show(b[0])} .. {show(b[1])} overlap those of {fa} ({show(a[0])} .. {show(a[1])}); "
                f"expected each time stamp in one file matching {pattern!r} (duplicate time stamps)"
            )


def source_files(da: xr.DataArray) -> str:
    """A short 'which files' description of a DataArray opened by :func:`open_variable`."""
    try:
        return _describe(json.loads(da.attrs.get("source_files", "[]")) or ["<memory>"])
    except (TypeError, ValueError):
        return "<memory>"


def open_zarr(path: str | Path) -> xr.Dataset:
    """Open a zarr store written by this package (lazily)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: zarr store not found")
    return xr.open_zarr(path, decode_timedelta=False)


def open_netcdf(path: str | Path) -> xr.Dataset:
    return xr.open_dataset(path, decode_timedelta=False)


# ----------------------------------------------------------------------------- writing


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success.

    On error the temporary is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{path.parent}: output directory is not writable")
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = _tmp_sibling(path)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def _clean_encoding(ds: xr.Dataset, float_fill: float | None = None) -> xr.Dataset:
    """Drop encodings inherited from NetCDF sources that zarr cannot take, and give the data set the
    CF types and encoding of :mod:`precip_cvae.cf` (no fill value on coordinates, float64 times)."""
    ds = cf.conform(ds)
    for name in ds.variables:
        enc = ds[name].encoding
        keep = {k: enc[k] for k in ("units", "calendar", "dtype", "_FillValue") if k in enc}
        if "dtype" in keep and ds[name].dtype.kind == "f":
            keep.pop("dtype")
        ds[name].encoding = keep
    for name, enc in cf.encoding(ds, float_fill).items():
        ds[name].encoding.update(enc)
    return ds


def write_zarr(ds: xr.Dataset, path: str | Path, chunks: dict | None = None) -> Path:
    """Write ``ds`` to a zarr store atomically (dask computes chunk by chunk)."""
    ds = _clean_encoding(ds)
    if chunks:
        ds = ds.chunk({k: v for k, v in chunks.items() if k in ds.dims})
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
    return Path(path)


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a CF-1.8 netCDF4 file atomically (float data filled with ``cf.NETCDF_FILL``; a
    projected or rotated grid's axes under their own names, see :func:`precip_cvae.cf.grid_names`)."""
    ds = _clean_encoding(cf.grid_names(cf.drop_dangling_references(ds)), cf.NETCDF_FILL)
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_yearly_netcdf(ds: xr.Dataset, outdir: str | Path, prefix: str, encoding: dict | None = None) -> list[Path]:
    """Write ``ds`` as one NetCDF file per calendar year: ``{outdir}/{prefix}_{year}.nc``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    years = np.unique(ds["time"].dt.year.values)
    for year in years:
        part = ds.sel(time=ds["time"].dt.year == year)
        path = outdir / f"{prefix}_{int(year)}.nc"
        with atomic_path(path) as tmp:
            part.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        written.append(path)
    return written


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    return pd.read_csv(path, **kwargs)


def append_zarr(ds: xr.Dataset, path: str | Path, group: str | None = None, dim: str = "time") -> Path:
    """Write ``ds`` to ``group`` of the zarr store at ``path``, appending along ``dim``.

    The first call for a group creates it (chunks: the sizes of ``ds``, so that each
    later batch of the same size fills whole chunks); later calls append.  Used to
    stream large arrays (ensembles) batch by batch; wrap the whole writing in
    :func:`atomic_path` so that a killed job leaves no half-written store behind, and
    call :func:`consolidate_zarr` at the end.
    """
    path = Path(path)
    ds = _clean_encoding(ds)
    exists = (path / (group or "") / ".zgroup").exists()
    if exists:
        ds.to_zarr(path, group=group, mode="a", append_dim=dim, consolidated=False, zarr_format=2)
    else:
        ds.to_zarr(path, group=group, mode="w", consolidated=False, zarr_format=2)
    return path


def write_zarr_group(ds: xr.Dataset, path: str | Path, group: str | None = None) -> Path:
    """Write ``ds`` (small, in memory) as ``group`` of the store at ``path`` (not atomic by itself)."""
    _clean_encoding(ds).to_zarr(Path(path), group=group, mode="w", consolidated=False, zarr_format=2)
    return Path(path)


def consolidate_zarr(path: str | Path) -> Path:
    """Consolidate the metadata of a store written group by group (faster, safer reopening)."""
    import zarr

    zarr.consolidate_metadata(str(path))
    return Path(path)


def open_zarr_group(path: str | Path, group: str | None = None) -> xr.Dataset:
    """Open one group of a zarr store lazily; an error names the store and the missing group."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: zarr store not found")
    try:
        return xr.open_zarr(path, group=group, decode_timedelta=False)
    except (FileNotFoundError, KeyError) as exc:
        raise InputError(f"{path}: group {group!r} not found ({type(exc).__name__}: {exc})") from exc


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a ``matplotlib.figure.Figure`` as PNG atomically (Agg canvas; no pyplot state)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return Path(path)
