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
# Two xdist workers share 2 cores with each other and with the workflow runs' own processes: OpenMP threads (torch's,
# BLAS's) that spin while they wait, the default, take the cores the others need (a generate test of 6 s alone took
# 181 s beside the other worker). Let them sleep; inherited by every subprocess. Numerics are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
def tiny_run(request, tmp_path_factory):
    """The whole workflow run once on config/tiny.yaml in a temporary copy (shared by the workflow tests); the
    SLURM tests' cluster run, when they are selected, starts beside it (they are in this process: see
    pytest_collection_modifyitems)."""
    start_cluster_run(request.session)
    work = copy_workflow(tmp_path_factory.mktemp("wf"))
    proc = snakemake(work, "--configfile", "config/tiny.yaml")
    # what the run said and left, before later tests add to it (test_slurm compares its SLURM run with them)
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    (work / "results.tree").write_text("\n".join(sorted(results_tree(work / "results"))) + "\n")
    return work


def results_tree(root: Path) -> set[str]:
    """Files under ``root`` relative to it; a zarr store counts as its arrays and metadata files."""
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        zarr = next((i for i, part in enumerate(rel.parts) if part.endswith(".zarr")), None)
        if zarr is not None:
            if len(rel.parts) == zarr + 2:  # an array folder or a metadata file of the store
                out.add(str(rel))
        elif path.is_file():
            out.add(str(rel))
    return out


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


def pytest_configure(config):
    """Under pytest-xdist with ``--dist loadgroup`` (as `make test` runs), a file for the workers to tell the
    scheduler the test groups (:func:`pytest_collection_modifyitems`, :func:`pytest_xdist_make_scheduler`)."""
    if not hasattr(config, "workerinput") and getattr(config.option, "dist", "no") == "loadgroup":
        import tempfile

        fd, path = tempfile.mkstemp(prefix="precip-cvae-test-groups-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_ENV] = config._test_groups = path  # the workers start after this and inherit it


def pytest_unconfigure(config):
    path = getattr(config, "_test_groups", None)
    if path:
        Path(path).unlink(missing_ok=True)


GROUPS_ENV = "PRECIP_CVAE_TEST_GROUPS"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """How `make test` shares the tests between pytest-xdist's workers (``-n 2 --dist loadgroup``): the tests
    of the session's tiny workflow run, and the SLURM tests that compare with it, go to one worker, and the
    tests that share a module fixture to one worker, so none of these is built twice; every other test goes
    where there is room.  The SLURM tests go last: they wait for their cluster run (:func:`tiny_run`).

    The groups reach the scheduler in the controller process through a file (xdist's own ``xdist_group``
    marks rename the items' node ids, which pytest 9 no longer reads)."""
    groups = {}
    for item in items:
        names = getattr(item, "fixturenames", ())
        mark = item.get_closest_marker("xdist_group")
        if mark is not None:  # a test's own group
            groups[item.nodeid] = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        elif "tiny_run" in names or "slurm_run" in names:
            groups[item.nodeid] = "tiny_run"
        elif any(d.scope == "module" for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
                 .values() for d in defs):
            groups[item.nodeid] = item.nodeid.split("::")[0]
    items.sort(key=lambda item: "slurm_run" in getattr(item, "fixturenames", ()))  # stable
    path = os.environ.get(GROUPS_ENV)
    if path and hasattr(config, "workerinput"):  # every worker collects the same tests and writes the same groups
        import json

        tmp = f"{path}.{config.workerinput['workerid']}"
        Path(tmp).write_text(json.dumps(groups))
        os.replace(tmp, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: xdist's scheduling by scopes, the scopes being the groups the workers wrote."""
    if config.getvalue("dist") != "loadgroup":
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # written before the workers report their collections (none where the
                text = Path(config._test_groups).read_text()  # workers did not inherit the environment)
                self.groups = json.loads(text) if text.strip() else {}
            return self.groups.get(nodeid, nodeid)

    return Groups(config, log)


def start_cluster_run(session) -> None:
    """Start the SLURM cluster and its workflow run in a background thread (tests/test_slurm.py, ClusterRun), when
    the SLURM tests are selected and it was not started: it mostly waits for SLURM, and the other tests of this
    process run meanwhile."""
    config = session.config
    if getattr(config, "_cluster_run_module", None) is not None:
        return
    if hasattr(config, "workerinput") and not os.environ.get(GROUPS_ENV):  # xdist without the groups: the SLURM
        return  # tests may be in another worker (they start the run themselves, test_slurm.slurm_run)
    for item in session.items:
        if "slurm_run" in getattr(item, "fixturenames", ()):
            item.module.start_cluster_run(config._tmp_path_factory.mktemp("cluster"))
            config._cluster_run_module = item.module
            return


def pytest_sessionfinish(session, exitstatus):
    """A cluster run started by :func:`start_cluster_run` is ended and the cluster stopped, even when its tests
    never ran (-x, a keyboard interrupt)."""
    module = getattr(session.config, "_cluster_run_module", None)
    if module is not None:
        module.stop_cluster_run()
