"""The real E-OBS/NCEP Iberia files: preprocess + detect_events, and every stage of config/iberia.yaml
(skipped when ../shared is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from precip_cvae import events, preprocess
from precip_cvae.config import DataConfig, EventsConfig, PreprocessConfig, SplitConfig, VariableSource

pytestmark = pytest.mark.realdata


def test_iberia_preprocess_and_events(iberia, tmp_path, capsys):
    data = DataConfig(
        target=VariableSource(str(iberia / "eobs_rr_*.nc"), "rr"),
        predictors=(
            *(VariableSource(str(iberia / "ncep_predictors_*.nc"), v) for v in ("psl", "hus850", "ta850")),
            VariableSource(str(iberia / "ncep_surface_*.nc"), "pr", precipitation=True),
        ),
    )
    split = SplitConfig(method="years", season_year="djf", train_years=tuple(range(1983, 1997)),
                        val_years=(1997, 1998, 1999), test_years=(2000, 2001, 2002))
    preprocess.run(data, PreprocessConfig(split=split), str(tmp_path / "d.zarr"))
    ds = xr.open_zarr(tmp_path / "d.zarr")
    raw = xr.open_dataset(next(iberia.glob("eobs_rr_*.nc")))["rr"]
    # NaN sea stays out, units stay mm/day, values come through unchanged on the original grid
    crop = preprocess.crop_to_original(ds["pr"], ds.attrs)
    assert crop.shape == raw.shape == (1805, 19, 29)
    assert float(crop.mean()) == pytest.approx(float(raw.mean()), rel=1e-4)
    mask = preprocess.crop_to_original(ds["mask"], ds.attrs).values.astype(bool)
    always_valid = raw.notnull().all("time").values
    assert mask[always_valid].all() and not mask[raw.isnull().all("time").values].any()
    # the NCEP pr channel arrived in mm/day (kg m-2 s-1 * 86400): mean of a few mm/day
    assert 0.5 < float(ds["coarse_pr"].mean()) < 5.0
    # DJF days: 14 train winters x 90 + 4 leap Februaries (1984/88/92/96); 3 x 90; 3 x 90 + 1 (2000)
    assert (ds.attrs["n_train"], ds.attrs["n_val"], ds.attrs["n_test"]) == (1264, 270, 271)

    table = events.run(str(tmp_path / "d.zarr"), EventsConfig(), str(tmp_path / "t.nc"), str(tmp_path / "e.csv"))
    n, m = int(table["is_event"].sum()), len(table)
    with capsys.disabled():
        print(f"\nIberia: {n} heavy days of {m} ({100 * n / m:.1f} %); " + "; ".join(events.summarise(table)[:3]))
    assert 0.01 <= n / m <= 0.03
    thr = xr.open_dataset(tmp_path / "t.nc")["threshold"]
    assert np.isnan(thr.values[~ds["mask"].values.astype(bool)]).all()


def test_iberia_config_runs_every_stage(iberia, tmp_path):
    """config/iberia.yaml with a tiny model and two epochs, through every stage (the guard of issue 8):
    mask, units and grids come through to the evaluation and the generated samples."""
    import yaml

    from conftest import REPO, copy_workflow, snakemake

    work = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((REPO / "config" / "iberia.yaml").read_text())
    for source in (cfg["data"]["target"], *cfg["data"]["predictors"]):
        source["paths"] = str(iberia / Path(source["paths"]).name)
    cfg["model"] = {"preset": "tiny"}
    cfg["train"].update(epochs=2, patience=2, val_members=2, loss={"warmup_epochs": 1})
    cfg["evaluate"].update(members=4, n_map_days=1)
    cfg["generate"].update(members=2, experiments=[], filter_heavy=False)  # a 2-epoch tiny model
    cfg["downstream"].update(seeds=1, epochs=1, losses=["quantile"], bootstrap=50)
    cfg["experiment_seeds"] = []
    cfg["experiments"] = {"default": {}}
    (work / "config" / "guard.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(work, "--configfile", "config/guard.yaml")

    res = work / "results" / "iberia"
    raw = xr.open_dataset(next(iberia.glob("eobs_rr_*.nc")))["rr"]
    sea = raw.isnull().all("time").values
    # the preprocessed target: mm/day unchanged, mean as in the raw file
    ds = xr.open_zarr(res / "preprocess" / "dataset.zarr")
    crop = preprocess.crop_to_original(ds["pr"], ds.attrs)
    assert float(crop.mean()) == pytest.approx(float(raw.mean()), rel=0.01)
    # the evaluation's truth is on the original 19x29 grid with the sea masked
    exp = res / "experiments" / "default"
    truth = xr.open_zarr(exp / "evaluate" / "ensembles.zarr", group="test/truth")["pr"]
    np.testing.assert_allclose(truth["lat"].values, np.sort(raw["lat"].values))
    np.testing.assert_allclose(truth["lon"].values, np.sort(raw["lon"].values))
    assert np.isnan(truth.values[:, sea]).all()
    # generated samples: nothing over the sea, non-negative mm/day of a plausible size on land
    gen = xr.open_zarr(exp / "generate" / "augmented.zarr")
    pr = gen["pr"].values  # (time, realization, lat, lon) on the original (unpadded) grid
    assert pr.shape[2:] == (19, 29) and gen["pr"].attrs["units"] in ("mm day-1", "mm/day")
    assert np.isnan(pr[..., sea]).all()
    land = pr[..., ~sea]
    assert np.isfinite(land).any() and np.nanmin(land) >= 0 and np.nanmax(land) < 2000
    for name in ("metrics.csv", "summary.md"):
        assert (exp / "evaluate" / name).exists()
    assert (exp / "downstream" / "comparison.csv").exists()
    assert (res / "experiments_seeds.csv").exists()


def test_iberia_30_days_are_refused_and_6_hourly_predictors_aggregated(iberia, capsys):
    """Issue 18 on the real files: 30 days of E-OBS with the NCEP predictors pass min_overlap_days but are
    refused by min_split_days; the same predictors given 6-hourly (each daily mean at 06, 12, 18 UTC and
    00 UTC of the next day, E-OBS days running 06-06 UTC) are refused without an aggregation, and with
    predictor_aggregation mean / aggregation_offset 6h give back the daily condition exactly."""
    import pandas as pd

    from precip_cvae.io import InputError, open_variable

    rr = open_variable(VariableSource(str(iberia / "eobs_rr_*.nc"), "rr"))
    psl = open_variable(VariableSource(str(iberia / "ncep_predictors_*.nc"), "psl"))
    first = slice(0, 30)
    with pytest.raises(InputError) as err:
        preprocess.build_dataset(rr.isel(time=first), [psl.isel(time=first)], PreprocessConfig())
    msg = str(err.value)
    assert "eobs_rr_iberia_djf_1983-2002.nc: target 'rr' (time stamps shared with the predictors)" in msg
    assert "split 'train' holds 21 time steps; expected at least 30 (preprocess.min_split_days.train)" in msg
    with capsys.disabled():
        print(f"\nIberia, 30 days: {msg}")

    # two winters (180 days: train 126, val 27, test 27) given 6-hourly
    days = slice(0, 180)
    daily = psl.isel(time=days).load()
    stamps = pd.DatetimeIndex(daily["time"].values)
    six = xr.concat([daily.assign_coords(time=stamps + pd.Timedelta(hours=h)) for h in (6, 12, 18, 24)], "time")
    six = six.sortby("time")
    six.attrs = dict(psl.attrs)
    target = rr.isel(time=days)
    with pytest.raises(InputError, match=r"predictor 'psl' has a time step of 6 h but the target .* has 1 day"):
        preprocess.build_dataset(target, [six], PreprocessConfig())
    got = preprocess.build_dataset(target, [six], PreprocessConfig(predictor_aggregation="mean",
                                                                   aggregation_offset="6h"))
    ref = preprocess.build_dataset(target, [daily], PreprocessConfig())
    # every day's four stamps lie in its own 06-06 interval, the last day of a winter too (00 UTC of 1 March)
    assert got.sizes["time"] == ref.sizes["time"] == 180
    np.testing.assert_allclose(got["condition"].values, ref["condition"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["cond_mean"].values, ref["cond_mean"].values, rtol=1e-6)


POLE = {"grid_mapping_name": "rotated_latitude_longitude", "grid_north_pole_latitude": 39.25,
        "grid_north_pole_longitude": -162.0}  # EURO-CORDEX's


def rotated_iberia(iberia: Path, path: Path) -> Path:
    """The E-OBS Iberia target on a EURO-CORDEX-like rotated-pole grid (0.44 deg, 19 x 21 cells around
    Iberia), laid out as CORDEX files are: 1-D ``rlat``/``rlon`` axes, 2-D ``lat``/``lon`` auxiliary coordinates
    and a ``rotated_pole`` grid-mapping variable; each cell takes the E-OBS value of the cell it falls in (NaN
    over the sea and outside E-OBS)."""
    from precip_cvae.grid import rotated_pole_to_geographic

    from conftest import write_nc

    eobs = xr.open_dataset(next(iberia.glob("eobs_rr_*.nc")))
    rlat = -8.75 + np.arange(-4.0, 4.0, 0.44)
    rlon = -16.0 + np.arange(-4.62, 4.6, 0.44)
    lat, lon = rotated_pole_to_geographic(rlat, rlon, POLE)
    elat, elon = eobs["lat"].values, eobs["lon"].values
    i = np.rint((lat - elat[0]) / 0.5).astype(int)
    j = np.rint((lon - elon[0]) / 0.5).astype(int)
    inside = (i >= 0) & (i < elat.size) & (j >= 0) & (j < elon.size)
    rr = eobs["rr"].values[:, np.clip(i, 0, elat.size - 1), np.clip(j, 0, elon.size - 1)]
    rr[:, ~inside] = np.nan
    ds = xr.Dataset(
        {"rr": (("time", "rlat", "rlon"), rr.astype("float32"),
                {**eobs["rr"].attrs, "grid_mapping": "rotated_pole", "coordinates": "lat lon"}),
         "rotated_pole": ((), np.int32(0), POLE)},
        coords={"time": eobs["time"],
                "rlat": ("rlat", rlat, {"standard_name": "grid_latitude", "units": "degrees", "axis": "Y"}),
                "rlon": ("rlon", rlon, {"standard_name": "grid_longitude", "units": "degrees", "axis": "X"}),
                "lat": (("rlat", "rlon"), lat, {"standard_name": "latitude", "units": "degrees_north"}),
                "lon": (("rlat", "rlon"), lon, {"standard_name": "longitude", "units": "degrees_east"})},
        attrs={"title": "E-OBS Iberia on a rotated-pole grid (test data)", "Conventions": "CF-1.8"})
    return write_nc(ds, path)


def test_a_rotated_pole_target_runs_through_every_stage(iberia, tmp_path):
    """Issue 26: E-OBS Iberia on a EURO-CORDEX rotated-pole grid, the NCEP predictors on their lat/lon grid, through
    preprocess, detect_events, training, evaluation and generate: the predictors are read at each cell's own lat/lon
    (the interpolation baseline on land is finite), and thresholds.nc, augmented.nc and an exported ensemble carry
    rlat/rlon, the 2-D lat/lon and the rotated pole, and pass the CF checker and CDO."""
    import subprocess

    import yaml

    from conftest import REPO, copy_workflow, snakemake
    from precip_cvae import export
    from test_cf import assert_cf_clean

    work = copy_workflow(tmp_path / "wf")
    target = rotated_iberia(iberia, tmp_path / "rr_rotated.nc")
    cfg = yaml.safe_load((REPO / "config" / "iberia.yaml").read_text())
    cfg["run"] = "rotated"
    cfg["data"]["target"]["paths"] = str(target)
    for source in cfg["data"]["predictors"]:
        source["paths"] = str(iberia / Path(source["paths"]).name)
    cfg["model"] = {"preset": "tiny", "condition_interpolation": "geographic"}
    cfg["train"].update(epochs=2, patience=2, val_members=2, loss={"warmup_epochs": 1})
    cfg["evaluate"].update(members=2, n_map_days=1, splits=["test"])
    cfg["generate"].update(members=2, experiments=["default"], filter_heavy=False)  # a 2-epoch tiny model
    cfg["downstream"] = {"enabled": False}
    cfg["experiment_seeds"] = []
    cfg["experiments"] = {"default": {}}
    (work / "config" / "rotated.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(work, "--configfile", "config/rotated.yaml")

    res, raw = work / "results" / "rotated", xr.open_dataset(target)
    land = raw["rr"].notnull().any("time").values
    ds = xr.open_zarr(res / "preprocess" / "dataset.zarr")
    crop = preprocess.crop_to_original(ds["pr"], ds.attrs)
    assert crop.shape[1:] == (19, 21) and float(crop.mean()) == pytest.approx(float(raw["rr"].mean()), rel=1e-4)
    np.testing.assert_allclose(preprocess.crop_to_original(ds["cell_lat"], ds.attrs).values, raw["lat"].values)
    exp = res / "experiments" / "default"
    from precip_cvae import checkpoint
    from precip_cvae.conditioning import condition_sampling_grid
    from precip_cvae.data import load_fields

    best = checkpoint.load(exp / "train" / "best.pt")  # the predictors sampled at each cell's own lat/lon
    fields = load_fields(str(res / "preprocess" / "dataset.zarr"), str(res / "events" / "thresholds.nc"))
    np.testing.assert_allclose(best["model_state"]["cond_grid"][0].numpy(), condition_sampling_grid(fields))
    interp = xr.open_zarr(exp / "evaluate" / "ensembles.zarr", group="test/interpolation")["pr"].values
    assert np.isfinite(interp[..., land]).all() and np.isnan(interp[..., ~land]).all()

    store = exp / "evaluate" / "ensembles.zarr"
    exported = export.export_ensemble(store, "test", "cvae_best", tmp_path / "ensemble.nc")
    for path, name in ((res / "events" / "thresholds.nc", "threshold"), (exp / "generate" / "augmented.nc", "pr"),
                       (exported, "pr")):
        out = xr.open_dataset(path)
        assert out[name].dims[-2:] == ("rlat", "rlon"), path
        (a, b), (c, d) = (out.attrs.get(k, [0, 0]) for k in ("pad_lat", "pad_lon"))  # thresholds.nc is padded
        out = out.isel(rlat=slice(a, out.sizes["rlat"] - b), rlon=slice(c, out.sizes["rlon"] - d))
        np.testing.assert_allclose(out["rlat"].values, raw["rlat"].values)
        np.testing.assert_allclose(out["lat"].values, raw["lat"].values)
        np.testing.assert_allclose(out["lon"].values, raw["lon"].values)
        assert out[name].attrs["grid_mapping"] == "crs" and out["crs"].attrs["grid_north_pole_latitude"] == 39.25
        assert set(out[name].encoding["coordinates"].split()) >= {"lat", "lon"}, path
        assert_cf_clean(path)
        if shutil.which("cdo"):
            grid = subprocess.run(["cdo", "-s", "griddes", f"-selname,{name}", str(path)], capture_output=True,
                                  text=True, check=True).stdout
            assert "gridtype  = projection" in grid and "rotated_latitude_longitude" in grid, grid
            mean = subprocess.run(["cdo", "-s", "outputtab,value", "-timmean", "-fldmean", f"-selname,{name}",
                                   str(path)], capture_output=True, text=True, check=True).stdout.split()
            assert np.isfinite(float(mean[-1])), path
