"""Shared fixtures: small realistic data built in the test, and the real data when present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRECIP_CVAE_SHARED", REPO.parent / "shared"))
IBERIA = SHARED / "data" / "real" / "eobs_ncep_iberia"
BOM = SHARED / "data" / "real" / "pysteps_bom_radar"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared beside the repository)")
    return path


@pytest.fixture
def iberia() -> Path:
    return require(IBERIA)


def make_field_da(
    values: np.ndarray,
    times,
    lat=None,
    lon=None,
    name="pr",
    units="mm/day",
    dims=("time", "lat", "lon"),
) -> xr.DataArray:
    """A (time, lat, lon) DataArray with CF-ish coordinates."""
    nt, ny, nx = values.shape
    lat = np.linspace(40, 40 + 0.5 * (ny - 1), ny) if lat is None else lat
    lon = np.linspace(-5, -5 + 0.5 * (nx - 1), nx) if lon is None else lon
    da = xr.DataArray(
        values,
        dims=dims,
        coords={dims[0]: times, dims[1]: lat, dims[2]: lon},
        name=name,
        attrs={"units": units} if units else {},
    )
    return da


def write_nc(da_or_ds, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = da_or_ds.to_dataset() if isinstance(da_or_ds, xr.DataArray) else da_or_ds
    ds.to_netcdf(path, **kwargs)
    return path


@pytest.fixture
def small_inputs(tmp_path):
    """Two yearly target files (kg m-2 s-1, one sea cell) and one predictor file on a coarser grid."""
    rng = np.random.default_rng(0)
    times = pd.date_range("2000-01-01", "2001-12-31", freq="D")
    pr_mm = rng.gamma(0.5, 4.0, size=(len(times), 6, 5)).astype("float32")
    pr_mm[:, 0, 0] = np.nan  # sea
    da = make_field_da(pr_mm / 86400.0, times, units="kg m-2 s-1")
    for year in (2000, 2001):
        write_nc(da.sel(time=str(year)), tmp_path / "target" / f"pr_{year}.nc")
    z = make_field_da(rng.normal(5000, 50, size=(len(times), 3, 3)).astype("float32"), times, name="z500",
                      lat=[40.0, 41.5, 43.0], lon=[-5.0, -3.5, -2.0], units="m")
    write_nc(z, tmp_path / "pred" / "z500.nc")
    return tmp_path, pr_mm, times


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None):
    """Run snakemake (2 cores) in ``workdir`` (``env``: added to the environment); raise with its output
    tail on failure."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole workflow run once on config/tiny.yaml in a temporary copy (shared by the workflow tests)."""
    work = copy_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(work, "--configfile", "config/tiny.yaml")
    return work


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow files (not results or data) to ``dest`` to run snakemake there."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "rules", "workflow", "config", "profiles"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, dest / name)
    return dest


def prepare_demo(root: Path, demo_cfg, events_cfg) -> dict:
    """Write a small demo data set under ``root`` and run preprocess + detect_events on it (paths dict)."""
    from precip_cvae import demo, events, preprocess
    from precip_cvae.config import DataConfig, PreprocessConfig, VariableSource

    demo.write_demo_data(demo_cfg, root / "raw")
    data = DataConfig(
        target=VariableSource(str(root / "raw" / "target" / "*.nc"), "pr"),
        predictors=tuple(VariableSource(str(root / "raw" / "predictors" / "*.nc"), v) for v in ("psl", "hus850")),
    )
    preprocess.run(data, PreprocessConfig(target_coarse_factor=4, chunk_time=64), str(root / "dataset.zarr"))
    events.run(str(root / "dataset.zarr"), events_cfg, str(root / "thresholds.nc"), str(root / "events.csv"))
    return {"root": root, "dataset": str(root / "dataset.zarr"), "thresholds": str(root / "thresholds.nc"),
            "events": str(root / "events.csv")}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A tiny demo data set run through preprocess and detect_events (paths dict)."""
    from precip_cvae.config import DemoConfig, EventsConfig

    return prepare_demo(tmp_path_factory.mktemp("prepared"),
                        DemoConfig(seed=3, years=2, nlat=16, nlon=16, nclat=4, nclon=4, heavy_fraction=0.04),
                        EventsConfig(min_exceed_fraction=0.05))


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """When the tests on the SLURM cluster are selected, start the cluster and their workflow run now, in a
    background thread (tests/test_slurm.py, ClusterRun): it mostly waits for SLURM, and the other tests run
    meanwhile instead of after it."""
    if config.option.collectonly:
        return
    for item in items:
        if "slurm_run" in getattr(item, "fixturenames", ()):
            item.module.start_cluster_run(config._tmp_path_factory.mktemp("cluster"))
            config._cluster_run_module = item.module
            return


def pytest_sessionfinish(session, exitstatus):
    """A cluster run started at collection is ended and the cluster stopped, even when its tests never ran
    (-x, a keyboard interrupt, deselection)."""
    module = getattr(session.config, "_cluster_run_module", None)
    if module is not None:
        module.stop_cluster_run()
