"""Evaluation diagnostics on a wide grid: the store read once per band of rows against once per block.

The per-pixel diagnostics (climate indices, Wasserstein, Perkins) of one source run by blocks of grid rows
whose float64 working memory fits ``DIAGNOSTIC_BLOCK_BYTES``: at E-OBS-Europe width (705 cells), 4 members
and a test split of 274 days that is one row per block. The ensembles cache is chunked by days over the whole
grid, so a block that reads its rows from the store decompresses every chunk. The baseline (``band_rows`` equal
to the block, what evaluate did before) reads the store once per block; the default reads a band of rows
(``DIAGNOSTIC_BAND_BYTES`` of the store's values) once and cuts the blocks from it.

    python benchmarks/diagnostics_bands.py                       # 4 members, 274 days, 120 x 705 cells
    python benchmarks/diagnostics_bands.py --rows 465            # the whole E-OBS-Europe grid (minutes)
    python benchmarks/diagnostics_bands.py --smoke               # seconds

Synthetic data (gamma amounts, 30 % wet, a DJF calendar) written as the cache is: float32, chunks of
(members, 16 days, whole grid). Each arm runs in its own subprocess (its peak RSS alone); both give the same
table (checked).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import add_child_argument, emit, machine, run_as_child, run_child

CHUNK_DAYS = 16


def _dates(n: int) -> list[str]:
    import pandas as pd

    days = pd.date_range("1990-12-01", periods=8 * n)
    return [str(d.date()) for d in days if d.month in (12, 1, 2)][:n]


def child_write(path: str, members: str, days: str, rows: str, cols: str) -> None:
    import numpy as np
    import xarray as xr

    from precip_cvae import io

    m, n, h, w = int(members), int(days), int(rows), int(cols)
    rng = np.random.default_rng(0)
    obs = (rng.gamma(0.5, 8.0, (n, h, w)) * (rng.random((n, h, w)) < 0.3)).astype("float32")
    obs[:, :, : w // 10] = np.nan  # a strip of sea
    ens = np.empty((m, n, h, w), dtype="float32")
    for j in range(m):
        ens[j] = rng.gamma(0.5, 8.0, (n, h, w)) * (rng.random((n, h, w)) < 0.3)
    ens[:, np.isnan(obs)] = np.nan
    dims = ("member", "time", "lat", "lon")
    xr.Dataset({"pr": (dims, ens)}).chunk({"member": m, "time": CHUNK_DAYS}).to_zarr(
        Path(path) / "ens.zarr", mode="w", zarr_format=2, consolidated=False)
    io.consolidate_zarr(Path(path) / "ens.zarr")
    np.save(Path(path) / "obs.npy", obs)
    emit({"bytes": ens.nbytes})


def child_diagnose(path: str, band: str) -> None:
    import numpy as np

    from precip_cvae import io
    from precip_cvae.config import EvaluateConfig
    from precip_cvae.evaluate import diagnostics

    obs = np.load(Path(path) / "obs.npy").astype("float64")
    ens = io.open_zarr_group(Path(path) / "ens.zarr")["pr"].data
    m, n, h, w = ens.shape
    cfg = EvaluateConfig()
    pct = diagnostics.observed_percentiles(obs, cfg)
    rows = diagnostics.rows_per_block(m, n, w)
    band_rows = rows if band == "block" else None
    t0 = time.perf_counter()
    res = diagnostics.source_diagnostics(ens, obs, _dates(n), "standard", pct, cfg, "djf", True,
                                         band_rows=band_rows)
    seconds = time.perf_counter() - t0
    used = min(h, band_rows or diagnostics.rows_per_band(m, n, w, 4, rows))
    emit({"seconds": seconds, "rows_per_block": rows, "rows_per_band": used,
          "table": res.table.round(10).to_json(), "dist": res.distribution})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--days", type=int, default=274)
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--cols", type=int, default=705)
    ap.add_argument("--workdir", default=None, help="where the store is written (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    add_child_argument(ap)
    args = ap.parse_args(argv)
    if run_as_child(args, {"write": child_write, "diagnose": child_diagnose}):
        return 0
    me = str(Path(__file__).resolve())
    m, n, h, w = (2, 40, 4, 60) if args.smoke else (args.members, args.days, args.rows, args.cols)
    with tempfile.TemporaryDirectory(prefix="bench_bands_", dir=args.workdir) as tmp:
        size = run_child([me, "--child", "write", tmp, str(m), str(n), str(h), str(w)])["bytes"]
        print(f"diagnostics of one source: {m} members x {n} days x {h} x {w} cells ({size / 2**20:.0f} MiB of "
              f"float32, chunks of {CHUNK_DAYS} days over the whole grid); {machine()}", flush=True)
        res = {arm: run_child([me, "--child", "diagnose", tmp, arm]) for arm in ("block", "band")}
    for arm, label in (("block", "a read per block (before)"), ("band", "a read per band (now)")):
        r = res[arm]
        print(f"  {label:<26} rows/block {r['rows_per_block']:>3}, rows/read {r['rows_per_band']:>4}: "
              f"{r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:6.0f} MB")
    same = res["block"]["table"] == res["band"]["table"] and res["block"]["dist"] == res["band"]["dist"]
    print(f"  speed-up x{res['block']['seconds'] / res['band']['seconds']:.2f}; the same tables: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
