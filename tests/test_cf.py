"""CF conventions of what the workflow writes: by hand on small data sets, and the tiny run's outputs
through the tools users open them with (the IOOS compliance checker, CDO, cf_xarray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from precip_cvae import cf, io

#: The one checker warning the ensemble layout keeps on purpose: CF's *recommended* order puts extra
#: dimensions left of T, while the issue (and CDO, which reads realization as a level axis) want
#: pr(time, realization, lat, lon).
ALLOWED_WARNING = "further dimensions are not located left of T, Z, Y, X"


def check_cf(path) -> dict:
    """Run ``compliance-checker --test cf:1.8`` on ``path``; the errors and warnings it reports."""
    from compliance_checker.runner import CheckSuite, ComplianceChecker

    CheckSuite.load_all_available_checkers()
    out = f"{path}.cf.json"
    ComplianceChecker.run_checker(str(path), ["cf:1.8"], 0, "normal", output_filename=out, output_format="json")
    report = json.loads(open(out).read())["cf:1.8"]
    msgs = lambda level: [m for r in report[f"{level}_priorities"] for m in r["msgs"]]  # noqa: E731
    return {"errors": msgs("high"), "warnings": msgs("medium"), "high_count": report["high_count"]}


def assert_cf_clean(path):
    result = check_cf(path)
    assert result["high_count"] == 0 and result["errors"] == [], (path, result["errors"])
    unexpected = [w for w in result["warnings"] if ALLOWED_WARNING not in w]
    assert unexpected == [], (path, unexpected)


# ----------------------------------------------------------------------------- by hand


def _small() -> xr.Dataset:
    return xr.Dataset(
        {
            "pr": (("time", "lat"), np.array([[1.0, np.nan], [2.0, 3.0]], "float32"), {"units": "mm day-1"}),
            "count": (("time",), np.array([3, 4], "int64")),
            "flag": (("lat",), np.array([0, 1], "int8"), {"flag_values": [0, 1], "flag_meanings": "no yes"}),
        },
        coords={"time": pd.date_range("2001-01-01", periods=2), "lat": ("lat", [40.0, 41.0], {"units": "degrees_north"}),
                "sample": ("time", np.array([0, 1], "int64"))},
    )


def test_conform_gives_cf_types_and_keeps_values():
    ds = cf.conform(_small())
    assert ds["count"].dtype == np.int32 and ds["count"].values.tolist() == [3, 4]
    assert ds["sample"].dtype == np.int32
    assert ds["flag"].attrs["flag_values"].dtype == np.int8
    assert ds.attrs["Conventions"] == "CF-1.8"
    big = _small().assign(count=("time", np.array([0, 2**40], "int64")))
    with pytest.raises(ValueError, match="'count': int64 values outside the int32 range"):
        cf.conform(big)


def test_written_netcdf_has_no_fill_value_on_coordinates_and_float_times(tmp_path):
    io.write_netcdf(_small(), tmp_path / "a.nc")
    import netCDF4

    with netCDF4.Dataset(tmp_path / "a.nc") as nc:
        assert "_FillValue" not in nc["lat"].ncattrs() and "_FillValue" not in nc["time"].ncattrs()
        assert "_FillValue" not in nc["count"].ncattrs() and "_FillValue" not in nc["flag"].ncattrs()
        assert nc["pr"]._FillValue == np.float32(1e20)  # numeric, not NaN: NCO's averages skip it
        assert nc["time"].dtype == np.float64 and nc["time"].units == "days since 1970-01-01"
        assert nc["count"].dtype == np.int32
        np.testing.assert_array_equal(nc["time"][:], [11323.0, 11324.0])  # 2001-01-01 is day 11323
    back = xr.open_dataset(tmp_path / "a.nc")
    np.testing.assert_array_equal(back["time"].values, _small()["time"].values)


def test_a_noleap_calendar_survives(tmp_path):
    import cftime

    times = [cftime.DatetimeNoLeap(2001, 2, 28), cftime.DatetimeNoLeap(2001, 3, 1)]
    ds = _small().assign_coords(time=times)
    ds["time"].encoding = {"units": "days since 2001-01-01", "calendar": "noleap"}
    io.write_netcdf(ds, tmp_path / "n.nc")
    back = xr.open_dataset(tmp_path / "n.nc", decode_times=False)
    assert back["time"].attrs["calendar"] == "noleap"
    np.testing.assert_array_equal(back["time"].values, [58.0, 59.0])  # no Feb 29 in between


def test_history_lines_append_newest_last():
    attrs = cf.append_history({}, cf.history_line("preprocess", "a", when="2026-01-01T00:00:00Z"))
    attrs = cf.append_history(attrs, cf.history_line("generate", "b", when="2026-01-02T00:00:00Z"))
    lines = attrs["history"].splitlines()
    assert len(lines) == 2 and lines[0].startswith("2026-01-01T00:00:00Z precip-cvae ")
    assert lines[0].endswith(" preprocess: a") and lines[1].endswith(" generate: b")


def test_realization_coordinate():
    r = cf.realization_coord(3)
    assert r.dtype == np.int32 and r.values.tolist() == [0, 1, 2] and r.attrs["standard_name"] == "realization"


# ----------------------------------------------------------------------------- the tiny run's outputs


@pytest.fixture(scope="module")
def outputs(tiny_run):
    res = tiny_run / "results" / "tiny"
    gen = res / "experiments" / "default" / "generate"
    return {"thresholds": res / "events" / "thresholds.nc", "augmented": gen / "augmented.nc",
            "condition": gen / "augmented_condition.nc", "store": gen / "augmented.zarr"}


@pytest.mark.workflow
def test_netcdf_outputs_pass_the_cf_checker(outputs):
    for name in ("thresholds", "augmented", "condition"):
        assert_cf_clean(outputs[name])


@pytest.mark.workflow
def test_zarr_stores_carry_the_same_cf_attributes(outputs, tmp_path):
    io.write_netcdf(io.open_zarr(outputs["store"]), tmp_path / "root.nc")
    io.write_netcdf(io.open_zarr_group(outputs["store"], "condition"), tmp_path / "condition.nc")
    for path in (tmp_path / "root.nc", tmp_path / "condition.nc"):
        assert_cf_clean(path)


@pytest.mark.workflow
def test_cf_xarray_finds_the_axes_by_their_attributes(outputs):
    pytest.importorskip("cf_xarray")
    ds = xr.open_dataset(outputs["augmented"])
    assert ds.cf["latitude"].name == "lat" and ds.cf["longitude"].name == "lon"
    assert ds.cf["T"].name == "time" and ds.cf["realization"].name == "realization"
    assert ds.cf["lwe_precipitation_rate"].dims == ("time", "realization", "lat", "lon")
    cond = xr.open_dataset(outputs["condition"])
    assert cond.cf["latitude"].name == "clat" and cond.cf["T"].name == "time"


@pytest.mark.workflow
def test_cdo_field_means_equal_xarray(outputs, tmp_path):
    _require("cdo", "cdo")
    path = outputs["augmented"]
    proc = subprocess.run(["cdo", "-s", "outputtab,date,lev,value", "-fldmean", "-selname,pr", str(path)],
                          capture_output=True, text=True, check=True)
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")]
    ds = xr.open_dataset(path)
    # CDO weights cells by their area; on a regular lat/lon grid that is proportional to cos(lat)
    weights = np.cos(np.deg2rad(ds["lat"])).broadcast_like(ds["pr"].isel(time=0, realization=0))
    expected = ds["pr"].weighted(weights.where(np.isfinite(ds["pr"].isel(time=0, realization=0)), 0.0)).mean(
        ("lat", "lon"))
    filled = (ds["realization"] < ds["n_realizations"]).transpose("time", "realization").values  # hold a sample
    n = int(filled.sum())
    assert n > 0
    got = {(d, int(r)): float(v) for d, r, v in rows}
    checked = 0
    for t, day in enumerate(pd.DatetimeIndex(ds["time"].values).strftime("%Y-%m-%d")):
        for r in range(ds.sizes["realization"]):
            if filled[t, r]:
                assert got[(day, r)] == pytest.approx(float(expected[t, r]), abs=1e-4, rel=1e-5)
                checked += 1
    assert checked == n
    info = subprocess.run(["cdo", "-s", "sinfon", str(path)], capture_output=True, text=True, check=True).stdout
    assert f"time : {ds.sizes['time']} steps" in " ".join(info.split())


@pytest.mark.workflow
def test_evaluated_ensembles_export_in_the_realization_layout(tiny_run, tmp_path):
    from precip_cvae import export

    store = tiny_run / "results" / "tiny" / "experiments" / "default" / "evaluate" / "ensembles.zarr"
    out = tmp_path / "cvae_best.nc"
    assert export.main([str(store), "test", "cvae_best", str(out)]) == 0
    assert_cf_clean(out)
    ds = xr.open_dataset(out)
    cached = xr.open_zarr(store, group="test/cvae_best")["pr"].values  # (member, time, lat, lon)
    assert ds["pr"].dims == ("time", "realization", "lat", "lon") and ds["realization"].dtype == np.int32
    np.testing.assert_array_equal(ds["pr"].values[5, 2], cached[2, 5])
    truth = xr.open_zarr(store, group="test/truth")
    np.testing.assert_array_equal(ds["pr_observed"].values, truth["pr"].values)
    assert ds["is_heavy_day"].values.tolist() == truth["is_event"].values.tolist()
    assert "best.pt" in ds.attrs["source"] and "export:" in ds.attrs["history"]
    assert export.main([str(store), "test", "nosuch", str(tmp_path / "x.nc")]) == 2
    assert not (tmp_path / "x.nc").exists()
    with pytest.raises(io.InputError, match="split 'train' was not evaluated; expected one of \\["):
        export.ensemble_dataset(store, "train", "cvae_best")


def test_cache_dates_become_cf_times_in_their_calendar():
    from precip_cvae.export import cf_time

    t = cf_time(np.array(["2001-02-29", "2001-02-30", "2001-03-01T06:00"]), "360_day")
    # 360_day: 2001-01-01 is 31 years x 360 days after 1970-01-01; Feb 29 is day 58 of the year
    np.testing.assert_allclose(t.values, [31 * 360 + 58, 31 * 360 + 59, 31 * 360 + 60.25])
    assert t.attrs["calendar"] == "360_day" and t.attrs["units"] == "days since 1970-01-01"
    std = cf_time(np.array(["2001-01-01"]), "standard")
    assert std.values.tolist() == [11323.0]


def _require(tool: str, package: str):
    if shutil.which(tool) is None:
        if os.environ.get("PRECIP_CVAE_REQUIRE_CDO"):
            pytest.fail(f"{tool} is not installed but PRECIP_CVAE_REQUIRE_CDO is set (.ci/run installs {package})")
        pytest.skip(f"{tool} not installed (Debian package {package}; .ci/run installs it)")


@pytest.mark.workflow
def test_nco_ensemble_mean_skips_missing_realizations_and_masked_cells(outputs, tmp_path):
    _require("ncwa", "nco")
    ds = xr.open_dataset(outputs["augmented"]).load()
    ds["pr"][0, -1] = np.nan  # a day short of one sample (as the heavy filter leaves it)
    ds["pr"][:, :, 0, 0] = np.nan  # a masked cell
    io.write_netcdf(ds, tmp_path / "a.nc")
    subprocess.run(["ncwa", "-O", "-a", "realization", "-v", "pr", str(tmp_path / "a.nc"), str(tmp_path / "m.nc")],
                   check=True, capture_output=True)
    got = xr.open_dataset(tmp_path / "m.nc")["pr"].values
    expected = np.nanmean(ds["pr"].values, axis=1)  # NaN only at the masked cell
    assert np.isnan(got[:, 0, 0]).all() and np.isfinite(got[:, 1:, 1:]).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, equal_nan=True)


def test_a_projected_grid_is_written_under_its_own_axis_names(tmp_path):
    """lat/lon that hold projection_y/x_coordinate values (a radar grid in km) leave as y/x in a NetCDF
    file; a bounds attribute whose variable was not kept is dropped; geographic axes keep their names."""
    ds = xr.Dataset(
        {"pr": (("lat", "lon"), np.ones((2, 3), "float32"), {"units": "mm day-1", "long_name": "rain"})},
        coords={"lat": ("lat", [-0.25, 0.25], {"standard_name": "projection_y_coordinate", "units": "km",
                                               "original_name": "y", "bounds": "y_bounds"}),
                "lon": ("lon", [-0.5, 0.0, 0.5], {"standard_name": "projection_x_coordinate", "units": "km"})},
        attrs={"title": "radar", "history": cf.history_line("test", "projected grid")})
    io.write_netcdf(ds, tmp_path / "p.nc")
    back = xr.open_dataset(tmp_path / "p.nc")
    assert back["pr"].dims == ("y", "x") and back["y"].attrs["axis"] == "Y" and back["x"].attrs["axis"] == "X"
    assert "bounds" not in back["y"].attrs and "original_name" not in back["y"].attrs
    assert_cf_clean(tmp_path / "p.nc")
    geo = ds.assign_coords(lat=("lat", [40.0, 40.5], {"standard_name": "latitude", "units": "degrees_north"}),
                           lon=("lon", [0.0, 0.5, 1.0], {"standard_name": "longitude", "units": "degrees_east"}))
    io.write_netcdf(geo, tmp_path / "g.nc")
    assert xr.open_dataset(tmp_path / "g.nc")["pr"].dims == ("lat", "lon")


def test_a_projected_target_keeps_its_grid_mapping_so_cdo_can_average_it(tmp_path):
    """An equal-area radar grid (x/y in km with a CF grid-mapping variable) through preprocess and
    detect_events: thresholds.nc carries the mapping as ``crs``, passes the checker, and CDO's field mean
    of the threshold map is the plain mean over valid cells (equal-area: constant cell weights)."""
    from conftest import write_nc
    from precip_cvae import events, preprocess
    from precip_cvae.config import DataConfig, EventsConfig, PreprocessConfig, VariableSource

    rng = np.random.default_rng(3)
    times = pd.date_range("2001-01-01", periods=400, freq="D")
    values = rng.gamma(0.6, 6.0, size=(400, 8, 8)).astype("float32")
    values[:, 0, :2] = np.nan  # outside the radar's range
    proj = {"grid_mapping_name": "albers_conical_equal_area", "standard_parallel": [-26.2, -29.3],
            "longitude_of_central_meridian": 153.24, "latitude_of_projection_origin": -27.7,
            "false_easting": 0.0, "false_northing": 0.0}
    src = xr.Dataset(
        {"rain": (("time", "y", "x"), values, {"units": "mm/day", "grid_mapping": "proj"}),
         "proj": ((), np.int8(0), proj)},
        coords={"time": times,
                "y": ("y", np.arange(8) * 2.0, {"standard_name": "projection_y_coordinate", "units": "km"}),
                "x": ("x", np.arange(8) * 2.0, {"standard_name": "projection_x_coordinate", "units": "km"})})
    write_nc(src, tmp_path / "radar.nc")
    data = DataConfig(target=VariableSource(str(tmp_path / "radar.nc"), "rain"), predictors=())
    preprocess.run(data, PreprocessConfig(target_coarse_factor=2, condition_grid="target_blocks"),
                   str(tmp_path / "dataset.zarr"))
    events.run(str(tmp_path / "dataset.zarr"), EventsConfig(min_exceed_fraction=0.02), str(tmp_path / "thr.nc"),
               str(tmp_path / "events.csv"))
    thr = xr.open_dataset(tmp_path / "thr.nc")
    assert thr["threshold"].dims == ("y", "x") and thr["threshold"].attrs["grid_mapping"] == "crs"
    assert thr["crs"].attrs["grid_mapping_name"] == "albers_conical_equal_area"
    assert_cf_clean(tmp_path / "thr.nc")
    _require("cdo", "cdo")
    out = subprocess.run(["cdo", "-s", "outputtab,value", "-fldmean", "-selname,threshold", str(tmp_path / "thr.nc")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert float(out[-1]) == pytest.approx(float(np.nanmean(thr["threshold"].values)), rel=1e-5)
