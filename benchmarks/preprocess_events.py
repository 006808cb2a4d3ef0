"""preprocess + detect_events on a multi-GB input, against a plain netCDF4 read of the same files.

Goal (issue): wall time of ``preprocess.run`` + ``events.run`` <= 2 x a plain sequential read
of the same files with netCDF4, measured in the same run; peak RSS bounded by the chunk size,
not by the data size (flat when the input doubles).

    python benchmarks/preprocess_events.py                         # 20 years of 256x256 and 40 years
    python benchmarks/preprocess_events.py --years 20 --size 256 --no-double
    python benchmarks/preprocess_events.py --smoke                 # seconds; used by the tests

Inputs (generated under ``--root``, /tmp/bench_preprocess by default, and removed at the end
unless ``--keep``): one NetCDF file per year, written with netCDF4 directly (contiguous, not
compressed): ``pr`` (time, lat, lon) float32 in kg m-2 s-1 on the fine grid (20 x 366 x 256 x 256
x 4 bytes = 1.9 GB for the default), and ``psl``/``hus850`` on a grid 8 times coarser.  The rain is
rolled copies of a small bank of power-law random fields, thresholded and scaled per day (cheap
to make, spatially correlated, intermittent); a 4x4 corner is missing (masked) and an 8x8 corner
is nearly dry, so fewer than ``min_wet_days`` wet days there send the threshold to the pooled
fallback -- the path that used to load every wet value.

Each measured part runs in its own subprocess (peak RSS of that process alone):
``read``: netCDF4 reads every variable of every file, one file at a time (the baseline), before
and after the pipeline (the faster counts); ``preprocess``: ``preprocess.run`` with the package
defaults (``chunk_time`` 128) to a zarr store under ``--root``; ``events``: ``events.run`` on it.
The pipeline time is preprocess + events; its peak RSS the larger of the two.  By default the
files are in the page cache (just written, or read by the step before), which makes the read
a memory copy; ``--cold`` evicts them (``posix_fadvise`` DONTNEED on these files only) before each
step, so every step reads from disk.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import add_child_argument, emit, free_disk_gb, machine, run_as_child, run_child, table, verdict

TIME_GOAL = 2.0  # pipeline / plain read
RSS_FLAT = 1.25  # peak RSS at 2x input / at 1x input counts as flat below this


# ----------------------------------------------------------------------------- inputs


def write_inputs(root: Path, years: int, size: int, seed: int = 0, start_year: int = 2001) -> dict:
    """Write ``years`` yearly target and predictor files of a ``size`` x ``size`` grid; return their sizes."""
    import pandas as pd

    from precip_cvae.demo import cell_centres, power_law_fields

    rng = np.random.default_rng(seed)
    csize = max(size // 8, 2)
    lat, lon = cell_centres(36.0, 44.0, size), cell_centres(-8.0, 0.0, size)
    clat, clon = cell_centres(36.0, 44.0, csize), cell_centres(-8.0, 0.0, csize)
    bank = power_law_fields(rng, 16, size, size, beta=3.0).astype("float32")  # (16, size, size), unit variance
    dry = max(size // 32, 2)
    sea = max(size // 64, 1)
    (root / "target").mkdir(parents=True, exist_ok=True)
    (root / "predictors").mkdir(parents=True, exist_ok=True)
    nbytes = 0
    for year in range(start_year, start_year + years):
        days = pd.date_range(f"{year}-01-01", f"{year}-12-31", freq="D")
        n = len(days)
        a = rng.standard_normal(n).astype("float32")  # daily storm strength
        pick = rng.integers(0, len(bank), n)
        shift = rng.integers(0, size, (n, 2))
        rain = np.empty((n, size, size), "float32")
        for d in range(n):
            rain[d] = np.roll(bank[pick[d]], tuple(shift[d]), axis=(0, 1))
        rain -= (0.9 - 0.5 * a)[:, None, None]  # wet where the field exceeds a strength-dependent level
        np.maximum(rain, 0.0, out=rain)
        rain *= np.sqrt(rain)  # x ** 1.5: heavy-tailed intensities
        rain *= (4.0 * np.exp(0.5 * a))[:, None, None]  # mm/day
        rain[:, :dry, :dry] *= 0.01  # nearly dry corner: pooled threshold
        rain[:, -sea:, -sea:] = np.nan  # no data: masked
        rain /= 86400.0  # kg m-2 s-1
        psl = 101000.0 - 800.0 * a[:, None, None] + 100.0 * rng.standard_normal((n, csize, csize))
        hus = 0.006 + 0.001 * np.tanh(a)[:, None, None] + 0.0002 * rng.standard_normal((n, csize, csize))
        t = (days - pd.Timestamp("1970-01-01")).days.values.astype("float64")
        nbytes += _write_nc(root / "target" / f"pr_{year}.nc", t, lat, lon, {"pr": (rain, "kg m-2 s-1")})
        nbytes += _write_nc(root / "predictors" / f"predictors_{year}.nc", t, clat, clon,
                            {"psl": (psl.astype("float32"), "Pa"), "hus850": (hus.astype("float32"), "kg kg-1")})
    return {"files": 2 * years, "gb": nbytes / 1e9}


def _write_nc(path: Path, t, lat, lon, variables: dict) -> int:
    import netCDF4

    with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
        nc.createDimension("time", None)
        nc.createDimension("lat", len(lat))
        nc.createDimension("lon", len(lon))
        tv = nc.createVariable("time", "f8", ("time",))
        tv.units, tv.calendar = "days since 1970-01-01", "standard"
        tv[:] = t
        for name, values, units in (("lat", lat, "degrees_north"), ("lon", lon, "degrees_east")):
            v = nc.createVariable(name, "f8", (name,))
            v.units = units
            v[:] = values
        for name, (values, units) in variables.items():
            v = nc.createVariable(name, "f4", ("time", "lat", "lon"), contiguous=False,
                                  chunksizes=(len(t), len(lat), len(lon)))  # one chunk per file (per year)
            v.units = units
            v.set_auto_maskandscale(False)
            v[:] = values
    return path.stat().st_size


def evict(path: Path) -> None:
    """Drop the files under ``path`` from the page cache (only these files; POSIX_FADV_DONTNEED)."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- children


def child_read(root: str) -> None:
    """Baseline: read every variable of every file fully with netCDF4, one file at a time."""
    import netCDF4

    t0 = time.perf_counter()
    nbytes = 0
    for f in sorted(glob.glob(f"{root}/target/*.nc")) + sorted(glob.glob(f"{root}/predictors/*.nc")):
        with netCDF4.Dataset(f) as nc:
            for name, v in nc.variables.items():
                v.set_auto_maskandscale(False)
                a = v[:]
                nbytes += a.nbytes
                del a
    emit({"seconds": time.perf_counter() - t0, "gb_read": nbytes / 1e9})


def child_preprocess(root: str, out: str) -> None:
    """preprocess.run with the package defaults (what rule preprocess runs)."""
    from precip_cvae import preprocess
    from precip_cvae.config import DataConfig, PreprocessConfig, VariableSource
    from precip_cvae.logs import setup

    setup(None)
    data = DataConfig(
        target=VariableSource(f"{root}/target/pr_*.nc", "pr"),
        predictors=tuple(VariableSource(f"{root}/predictors/predictors_*.nc", v) for v in ("psl", "hus850")),
    )
    out_dir = Path(out)
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    preprocess.run(data, PreprocessConfig(), str(out_dir / "dataset.zarr"))
    emit({"seconds": time.perf_counter() - t0})


def child_events(out: str) -> None:
    """events.run with the package defaults on the store child_preprocess wrote."""
    import xarray as xr

    from precip_cvae import events
    from precip_cvae.config import EventsConfig
    from precip_cvae.logs import setup

    setup(None)
    out_dir = Path(out)
    t0 = time.perf_counter()
    table_ = events.run(str(out_dir / "dataset.zarr"), EventsConfig(), str(out_dir / "thresholds.nc"),
                        str(out_dir / "events.csv"))
    seconds = time.perf_counter() - t0
    with xr.open_dataset(out_dir / "thresholds.nc") as thr:
        pooled = int(thr["threshold"].attrs["n_pooled_pixels"])
    emit({"seconds": seconds, "days": len(table_), "heavy_days": int(table_["is_event"].sum()),
          "pooled_pixels": pooled})


# ----------------------------------------------------------------------------- parent


def measure(root: Path, years: int, size: int, keep: bool, reads: int = 2, cold: bool = False) -> dict:
    inputs = root / f"in_{years}y_{size}"
    t0 = time.perf_counter()
    if keep and len(glob.glob(f"{inputs}/*/*.nc")) == 2 * years:  # reuse what a --keep run left
        info = {"files": 2 * years, "gb": sum(p.stat().st_size for p in inputs.glob("*/*.nc")) / 1e9}
    else:
        info = write_inputs(inputs, years, size)
    gen_s = time.perf_counter() - t0
    print(f"  {years} years of {size}x{size}: {info['files']} files, {info['gb']:.2f} GB ready in {gen_s:.0f} s",
          flush=True)
    me = str(Path(__file__).resolve())
    out = str(root / f"out_{years}y_{size}")
    cache = (lambda p: evict(Path(p))) if cold else (lambda p: None)  # noqa: E731
    cache(inputs)
    read1 = run_child([me, "--child", "read", str(inputs)])
    cache(inputs)
    prep = run_child([me, "--child", "preprocess", str(inputs), out])
    cache(out)
    ev = run_child([me, "--child", "events", out])
    cache(inputs)
    read2 = run_child([me, "--child", "read", str(inputs)]) if reads > 1 else read1
    pipe = {"seconds": prep["seconds"] + ev["seconds"], "preprocess_s": prep["seconds"], "events_s": ev["seconds"],
            "preprocess_rss": prep["peak_rss_mb"], "events_rss": ev["peak_rss_mb"],
            "peak_rss_mb": max(prep["peak_rss_mb"], ev["peak_rss_mb"]), **{k: ev[k] for k in ("pooled_pixels",
                                                                                           "heavy_days", "days")}}
    if not keep:
        shutil.rmtree(inputs, ignore_errors=True)
        shutil.rmtree(root / f"out_{years}y_{size}", ignore_errors=True)
    read_s = min(read1["seconds"], read2["seconds"])
    return {
        "input": f"{years}y x {size}^2", "gb": info["gb"], "read_s": read_s,
        "read_s_before_after": (read1["seconds"], read2["seconds"]), "read_rss_mb": max(read1["peak_rss_mb"],
                                                                                          read2["peak_rss_mb"]),
        "pipeline_s": pipe["seconds"], "preprocess_s": pipe["preprocess_s"], "events_s": pipe["events_s"],
        "ratio": pipe["seconds"] / read_s, "rss_mb": pipe["peak_rss_mb"], "pooled": pipe["pooled_pixels"],
        "preprocess_rss": pipe["preprocess_rss"], "events_rss": pipe["events_rss"],
        "heavy": pipe["heavy_days"], "days": pipe["days"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--years", type=int, default=20, help="years of daily fields (one file per year)")
    ap.add_argument("--size", type=int, default=256, help="fine grid side (cells)")
    ap.add_argument("--no-double", action="store_true", help="skip the run on twice the years (RSS flatness)")
    ap.add_argument("--root", default="/tmp/bench_preprocess", help="inputs and outputs (removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs and outputs")
    ap.add_argument("--cold", action="store_true", help="drop the inputs (and the zarr store before events) from "
                                                        "the page cache before each step: disk-bound reads")
    ap.add_argument("--smoke", action="store_true", help="2 and 4 years of 32x32 (seconds; the tests)")
    add_child_argument(ap)
    args = ap.parse_args(argv)
    if run_as_child(args, {"read": child_read, "preprocess": child_preprocess, "events": child_events}):
        return 0
    years, size = (2, 32) if args.smoke else (args.years, args.size)
    root = Path(args.root)
    need_gb = years * size * size * 366 * 4 / 1e9 * (3 if args.no_double else 9)  # inputs + zarr, both sizes
    if free_disk_gb(root) < need_gb:
        print(f"not enough free disk under {root}: need about {need_gb:.1f} GB", file=sys.stderr)
        return 2
    print(f"preprocess + detect_events vs a plain netCDF4 read, {'cold' if args.cold else 'warm'} page cache "
          f"({machine()})", flush=True)
    rows = []
    try:
        for y in ([years] if args.no_double else [years, 2 * years]):
            rows.append(measure(root, y, size, args.keep, reads=1 if args.smoke else 2, cold=args.cold))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows, [("input", "input", ""), ("gb", "GB", ".2f"), ("read_s", "read s", ".1f"),
                       ("preprocess_s", "preprocess s", ".1f"), ("events_s", "events s", ".1f"),
                       ("pipeline_s", "pipeline s", ".1f"), ("ratio", "x read", ".2f"),
                       ("preprocess_rss", "prep. RSS MB", ".0f"), ("events_rss", "events RSS MB", ".0f"),
                       ("read_rss_mb", "read RSS MB", ".0f"),
                       ("pooled", "pooled px", "d"), ("heavy", "heavy days", "d")]))
    worst = max(r["ratio"] for r in rows)
    print(f"time: pipeline / plain read = {worst:.2f} (worst; goal <= {TIME_GOAL}) -> {verdict(worst <= TIME_GOAL)}")
    if len(rows) == 2:
        growth = rows[1]["rss_mb"] / rows[0]["rss_mb"]
        print(f"memory: peak RSS {rows[0]['rss_mb']:.0f} MB -> {rows[1]['rss_mb']:.0f} MB when the input doubles "
              f"(x{growth:.2f}; flat means <= x{RSS_FLAT}) -> {verdict(growth <= RSS_FLAT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
