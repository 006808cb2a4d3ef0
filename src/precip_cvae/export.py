"""Export an evaluated ensemble as a CF-1.8 NetCDF file in the realization layout of the samples.

``evaluate/ensembles.zarr`` caches each source's members as ``{split}/{source}/pr(member, time, lat,
lon)`` for the scores. A user who wants them in their own tools (CDO, NCO, xarray, a downstream
model) exports one source of one split::

    python -m precip_cvae.export results/<run>/experiments/<exp>/evaluate/ensembles.zarr test cvae_best out.nc

and gets ``pr(time, realization, lat, lon)`` (realization int32, standard_name ``realization``), the
observed field ``pr_observed(time, lat, lon)`` and the heavy-day flag of each date, with the
provenance of the evaluation in the global attributes -- the layout of ``generate/augmented.nc``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__, cf, io
from .io import InputError

def cf_time(iso: np.ndarray, calendar: str) -> xr.Variable:
    """ISO dates ('YYYY-MM-DD' or 'YYYY-MM-DDTHH:MM', as the ensemble cache stores them) as a CF time
    variable in ``calendar``: float64 days since 1970-01-01 (360_day and noleap dates included)."""
    import cftime

    stamps = []
    for text in iso:
        date, _, clock = str(text).partition("T")
        y, m, d = (int(v) for v in date.split("-"))
        hh, mm = (int(v) for v in (clock or "00:00").split(":")[:2])
        stamps.append(cftime.datetime(y, m, d, hh, mm, calendar=calendar))
    values = np.asarray(cftime.date2num(stamps, cf.TIME_UNITS, calendar=calendar), dtype="float64")
    return xr.Variable("time", values, {"standard_name": "time", "long_name": "date", "axis": "T",
                                        "units": cf.TIME_UNITS, "calendar": calendar})


def ensemble_dataset(store: str | Path, split: str, source: str) -> xr.Dataset:
    """One source's ensemble of ``split`` from ``ensembles.zarr`` as a CF ensemble (lazy).

    Returns
    -------
    xr.Dataset with ``pr`` (time, realization, lat, lon) float32 mm day-1, ``pr_observed`` (time, lat,
    lon) and ``is_heavy_day`` (time) int8.
    """
    root = io.open_zarr_group(store)
    if "evaluate_meta" not in root.attrs:
        raise InputError(f"{store}: not an evaluate ensembles store (no 'evaluate_meta' attribute)")
    meta = json.loads(root.attrs["evaluate_meta"])
    if split not in meta["splits"]:
        raise InputError(f"{store}: split {split!r} was not evaluated; expected one of {meta['splits']}")
    if source not in meta["sources"]:
        raise InputError(f"{store}: source {source!r} is not in the store; expected one of {meta['sources']}")
    ens = io.open_zarr_group(store, f"{split}/{source}")
    truth = io.open_zarr_group(store, f"{split}/truth")
    coords = {k: (k, root[k].values, {**cf.COORD_DEFAULTS[k], **root[k].attrs}) for k in ("lat", "lon")}
    time = cf_time(ens["time"].values.astype(str), meta.get("calendar", "standard"))
    pr = ens["pr"].data.transpose(1, 0, 2, 3)  # (member, time, lat, lon) -> (time, realization, lat, lon)
    out = xr.Dataset(
        {
            "pr": (("time", "realization", "lat", "lon"), pr, {
                "units": "mm day-1", "standard_name": "lwe_precipitation_rate", "cell_methods": "time: mean",
                "long_name": f"precipitation ensemble of {source}"}),
            "pr_observed": (("time", "lat", "lon"), truth["pr"].data, {
                "units": "mm day-1", "standard_name": "lwe_precipitation_rate", "cell_methods": "time: mean",
                "long_name": "observed precipitation"}),
            "is_heavy_day": (("time",), truth["is_event"].values.astype("int8"), {
                "long_name": "heavy-event day (detect_events)", "flag_values": np.array([0, 1], "int8"),
                "flag_meanings": "ordinary heavy"}),
        },
        coords={"time": time, "realization": cf.realization_coord(ens.sizes["member"]), **coords},
    )
    out = cf.attach_grid_mapping(out, str(root.attrs.get("grid_mapping_attrs", "")), ["pr", "pr_observed"], root)
    checkpoint = meta.get("checkpoints", {}).get(source.removeprefix("cvae_"), {}) if source.startswith("cvae_") \
        else {}
    out.attrs = cf.append_history({
        "Conventions": cf.CONVENTIONS,
        "title": f"precip-cvae evaluated ensemble: {source}, {split} split",
        "institution": "precip-cvae workflow",
        "source": (f"conditional VAE checkpoint {checkpoint.get('path', '')} (epoch {checkpoint.get('epoch', '?')})"
                   if checkpoint else f"baseline {source!r}"),
        "experiment": meta.get("experiment", ""),
        "evaluate_seed": int(meta.get("seed", 0)),
        "package_version": __version__,
        "evaluate_package_version": meta.get("package_version", ""),
    }, cf.history_line("export", f"{split}/{source} of {store}"))
    return out


def export_ensemble(store: str | Path, split: str, source: str, out: str | Path) -> Path:
    """Write :func:`ensemble_dataset` to the NetCDF file ``out`` (atomically)."""
    return io.write_netcdf(ensemble_dataset(store, split, source), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precip_cvae.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="evaluate/ensembles.zarr")
    parser.add_argument("split", help="an evaluated split, e.g. test")
    parser.add_argument("source", help="cvae_best, cvae_last, analogs, climatology or interpolation")
    parser.add_argument("out", help="the NetCDF file to write")
    args = parser.parse_args(argv)
    try:
        path = export_ensemble(args.store, args.split, args.source, args.out)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
