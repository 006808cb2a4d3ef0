"""Unit and stage tests of precip_cvae.preprocess (and the reading half of precip_cvae.io)."""

from __future__ import annotations

import dataclasses
import logging

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import make_field_da, write_nc
from precip_cvae import data as D, grid, io, preprocess
from precip_cvae.config import ConfigError, DataConfig, PreprocessConfig, SplitConfig, StaticSource, VariableSource
from precip_cvae.io import InputError
from precip_cvae.split import split_labels
from precip_cvae.transform import TargetTransform


def _data_cfg(root, target_units=None):
    return DataConfig(
        target=VariableSource(paths=str(root / "target" / "*.nc"), variable="pr", units=target_units),
        predictors=(VariableSource(paths=str(root / "pred" / "*.nc"), variable="z500"),),
    )


def test_stage_writes_a_zarr_that_reopens_with_the_contract(small_inputs):
    root, pr_mm, times = small_inputs
    cfg = PreprocessConfig(grid_multiple=4, chunk_time=100)
    out = root / "dataset.zarr"
    preprocess.run(_data_cfg(root), cfg, str(out))
    ds = xr.open_zarr(out)
    # padded 6x5 -> 8x8, original grid recoverable
    assert (ds.sizes["lat"], ds.sizes["lon"]) == (8, 8)
    assert ds.attrs["pad_lat"] == [1, 1] and ds.attrs["pad_lon"] == [1, 2]
    back = preprocess.crop_to_original(ds["pr"], ds.attrs)
    assert back.shape == (len(times), 6, 5)
    # kg m-2 s-1 -> mm/day: the values come back as written
    np.testing.assert_allclose(back.values[:, 1:, 1:], pr_mm[:, 1:, 1:], rtol=1e-5)
    assert ds["pr"].attrs["units"] == "mm day-1"
    # sea cell and padding are masked and NaN
    mask = preprocess.crop_to_original(ds["mask"], ds.attrs).values
    assert mask[0, 0] == 0 and mask.sum() == 6 * 5 - 1
    assert int(ds["mask"].sum()) == 29
    assert np.isnan(back.values[:, 0, 0]).all()
    # split: contiguous blocks in time order
    split = ds["split"].values.astype(str)
    n = len(times)
    assert (split[: round(0.7 * n)] == "train").all() and (split[-round(0.15 * n):] == "test").all()
    # condition: one channel, normalised with train statistics
    cond = ds["condition"]
    assert cond.dims == ("time", "channel", "clat", "clon") and list(ds["channel"].values) == ["z500"]
    train = cond.isel(time=np.flatnonzero(split == "train")).values
    assert abs(train.mean()) < 1e-4 and abs(train.std() - 1) < 1e-3
    # chunked along time
    assert ds["pr"].encoding["chunks"][0] == 100


def test_opening_is_lazy(small_inputs):
    root, _, _ = small_inputs
    computed = []

    class Spy(dask.callbacks.Callback):
        def _start(self, dsk):
            computed.append(len(dsk))

    with Spy():
        da = io.open_variable(VariableSource(paths=str(root / "target" / "*.nc"), variable="pr"))
        da = preprocess.standardise_coords(da, "target")
        pr = preprocess.convert_target_units(da, 0.01)
    assert computed == [], "reading and converting must not compute anything"
    assert isinstance(pr.data, dask.array.Array)


def test_normalisation_sees_no_val_or_test_day(small_inputs):
    """Changing every val/test value must not change any train statistic."""
    root, _, times = small_inputs
    cfg = PreprocessConfig(grid_multiple=1)
    target = io.open_variable(_data_cfg(root).target)
    pred = io.open_variable(_data_cfg(root).predictors[0])
    a = preprocess.build_dataset(target, [pred], cfg)
    split = a["split"].values
    held_out = xr.DataArray(split != "train", dims="time", coords={"time": a["time"]})
    target2 = target.where(~held_out.reindex_like(target, fill_value=False), target * 50)
    pred2 = pred.where(~held_out.reindex_like(pred, fill_value=False), pred + 1000)
    b = preprocess.build_dataset(target2, [pred2], cfg)
    np.testing.assert_allclose(a["cond_mean"].values, b["cond_mean"].values)
    np.testing.assert_allclose(a["cond_std"].values, b["cond_std"].values)
    assert a.attrs["target_transform_scale"] == b.attrs["target_transform_scale"]
    tr = np.flatnonzero(split == "train")
    np.testing.assert_allclose(a["condition"].values[tr], b["condition"].values[tr], rtol=1e-6)


def test_transform_scale_is_std_of_log1p_on_train_days_of_the_mask_cells():
    """scan_target (what build_dataset calls) fits the scale on the train days of the cells in the mask:
    the cell missing on 7 of 10 days is out of the mask, so its huge values on train days do not count."""
    times = pd.date_range("2000-01-01", periods=10)
    vals = np.arange(10 * 4, dtype="float32").reshape(10, 2, 2)
    vals[:3, 1, 1] = 1e6  # on train days
    vals[3:, 1, 1] = np.nan
    pr = make_field_da(vals, times)
    train = np.array([True] * 6 + [False] * 4)
    mask, _, t = preprocess.scan_target(pr, train, PreprocessConfig(transform="log1p"), "t.nc")
    assert mask.values.tolist() == [[1, 1], [1, 0]]
    kept = np.arange(24.0).reshape(6, 4)[:, :3]  # train days x the three cells of the mask
    assert t.kind == "log1p" and t.scale == pytest.approx(np.log1p(kept).std())
    x = t.forward(np.array([0.0, 10.0]))
    np.testing.assert_allclose(t.inverse(x), [0.0, 10.0], rtol=1e-6)
    _, _, t = preprocess.scan_target(pr, train, PreprocessConfig(transform="sqrt"), "t.nc")
    assert t.scale == pytest.approx(np.sqrt(kept).std())


@pytest.mark.parametrize("calendar", ["noleap", "360_day"])
def test_non_standard_calendars(tmp_path, calendar):
    n_days = 365 * 3 if calendar == "noleap" else 360 * 3
    times = xr.date_range("2001-01-01", periods=n_days, freq="D", calendar=calendar, use_cftime=True)
    rng = np.random.default_rng(1)
    pr = make_field_da(rng.gamma(0.5, 3, (n_days, 4, 4)).astype("float32"), times)
    z = make_field_da(rng.normal(size=(n_days, 2, 2)).astype("float32"), times, name="z", units="1",
                      lat=[40.0, 41.5], lon=[-5.0, -3.5])
    write_nc(pr, tmp_path / "t" / "pr.nc")
    write_nc(z, tmp_path / "p" / "z.nc")
    data = DataConfig(target=VariableSource(str(tmp_path / "t" / "*.nc"), "pr"),
                      predictors=(VariableSource(str(tmp_path / "p" / "*.nc"), "z"),))
    cfg = PreprocessConfig(grid_multiple=1, split=SplitConfig(method="years", train_years=(2001,),
                                                              val_years=(2002,), test_years=(2003,)))
    target = io.open_variable(data.target)
    assert preprocess.calendar_of(target) == calendar
    assert preprocess.time_step_seconds(target) == 86400.0
    ds = preprocess.build_dataset(target, [io.open_variable(data.predictors[0])], cfg)
    per_year = n_days // 3
    assert ds.attrs["calendar"] == calendar
    assert (ds.attrs["n_train"], ds.attrs["n_val"], ds.attrs["n_test"]) == (per_year, per_year, per_year)
    io.write_zarr(ds, tmp_path / "d.zarr")
    back = xr.open_zarr(tmp_path / "d.zarr", decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    assert back.indexes["time"].calendar == calendar


def test_mixed_calendars_are_refused():
    t1 = pd.date_range("2001-01-01", periods=60)
    t2 = xr.date_range("2001-01-01", periods=60, calendar="360_day", use_cftime=True)
    a = make_field_da(np.ones((60, 2, 2), "float32"), t1)
    b = make_field_da(np.ones((60, 2, 2), "float32"), t2, name="z")
    with pytest.raises(InputError, match="360_day"):
        preprocess.align_time(a, [b], 10)


def test_split_by_djf_years_and_dates():
    times = pd.date_range("1999-12-01", "2002-02-28", freq="D")
    times = times[times.month.isin([12, 1, 2])]
    cfg = SplitConfig(method="years", season_year="djf", train_years=(2000,), val_years=(2001,), test_years=(2002,))
    labels = split_labels(times, cfg)
    # December 1999 belongs to winter 2000
    assert labels[0] == "train" and labels[list(times).index(pd.Timestamp("2000-12-01"))] == "val"
    assert (labels == "train").sum() == 31 + 31 + 29
    cfg = SplitConfig(method="dates", train_dates=("1999-12-01", "2000-12-31"), val_dates=("2001-01-01", "2001-12-31"),
                      test_dates=("2002-01-01", "2002-12-31"))
    labels = split_labels(times, cfg)
    assert (labels == "test").sum() == 31 + 28


def test_split_by_date_times_within_a_day():
    times = pd.date_range("2020-10-31T00:00", "2020-10-31T23:50", freq="10min")  # 144 steps
    cfg = SplitConfig(method="dates", train_dates=("2020-10-31", "2020-10-31T05:50"),
                      val_dates=("2020-10-31T06:00", "2020-10-31T07:50"), test_dates=("2020-10-31T08:00", "2020-10-31"))
    labels = split_labels(times, cfg)
    # 00:00-05:50: 36 steps; 06:00-07:50: 12; 08:00 to the end of the day (a date-only end): 96
    assert [(labels == s).sum() for s in ("train", "val", "test")] == [36, 12, 96]
    assert labels[35] == "train" and labels[36] == "val" and labels[-1] == "test"
    # a 360_day calendar (30 February) splits by dates too
    import cftime

    days = [cftime.Datetime360Day(2001, 2, d) for d in range(1, 31)]
    cfg360 = SplitConfig(method="dates", train_dates=("2001-02-01", "2001-02-20"), val_dates=("2001-02-21", "2001-02-25"),
                         test_dates=("2001-02-26", "2001-02-30"))
    assert [(split_labels(days, cfg360) == s).sum() for s in ("train", "val", "test")] == [20, 5, 5]
    with pytest.raises(InputError, match=r"preprocess.split.val_dates: 'noon' is not an ISO date"):
        split_labels(times, SplitConfig(method="dates", train_dates=("2020-10-31", "2020-10-31"),
                                                   val_dates=("noon", "2020-10-31"), test_dates=("2020-10-31", "2020-10-31")))


def test_split_with_an_empty_part_is_an_error():
    times = pd.date_range("2000-01-01", periods=100)
    cfg = SplitConfig(method="years", train_years=(2000,), val_years=(2001,), test_years=(2002,))
    with pytest.raises(InputError, match=r"no days in \['val', 'test'\]"):
        split_labels(times, cfg)


def test_descending_latitude_is_flipped_and_unsorted_time_sorted(caplog):
    times = pd.date_range("2000-01-01", periods=5)
    vals = np.arange(5 * 3 * 2, dtype="float32").reshape(5, 3, 2)
    da = make_field_da(vals, times, lat=[42.0, 41.0, 40.0])
    shuffled = da.isel(time=[3, 0, 4, 1, 2])
    with caplog.at_level(logging.INFO):
        out = preprocess.standardise_coords(shuffled, "target")
    assert list(out["lat"].values) == [40.0, 41.0, 42.0]
    np.testing.assert_array_equal(out.values, vals[:, ::-1, :])
    assert "not sorted" in caplog.text and "descending" in caplog.text


def test_projected_grid_dims_are_renamed():
    times = pd.date_range("2000-01-01", periods=3)
    da = make_field_da(np.zeros((3, 4, 5), "float32"), times, dims=("time", "y", "x"),
                       lat=np.arange(4.0), lon=np.arange(5.0))
    out = preprocess.standardise_coords(da, "target")
    assert out.dims == ("time", "lat", "lon") and out["lat"].attrs["original_name"] == "y"


def test_duplicate_times_and_bad_coordinates_are_errors():
    times = pd.DatetimeIndex(["2000-01-01", "2000-01-02", "2000-01-02"])
    da = make_field_da(np.zeros((3, 2, 2), "float32"), times)
    with pytest.raises(InputError, match="duplicate time stamps"):
        preprocess.standardise_coords(da, "target")
    times = pd.date_range("2000-01-01", periods=3)
    da = make_field_da(np.zeros((3, 3, 2), "float32"), times, lat=[40.0, 42.0, 41.0])
    with pytest.raises(InputError, match="'lat' is not monotonic"):
        preprocess.standardise_coords(da, "target")
    da = make_field_da(np.zeros((3, 3, 2), "float32"), times, dims=("time", "row", "col"))
    with pytest.raises(InputError, match="no lat dimension"):
        preprocess.standardise_coords(da, "target")


def test_time_overlap_too_small():
    a = make_field_da(np.ones((40, 2, 2), "float32"), pd.date_range("2000-01-01", periods=40))
    b = make_field_da(np.ones((40, 2, 2), "float32"), pd.date_range("2000-01-31", periods=40), name="z")
    with pytest.raises(InputError, match="share 10 time stamps; expected at least 30"):
        preprocess.align_time(a, [b], 30)
    t, (p,) = preprocess.align_time(a, [b], 5)
    assert t.sizes["time"] == 10 and p.sizes["time"] == 10


def test_negative_precipitation_beyond_tolerance(small_inputs):
    times = pd.date_range("2000-01-01", periods=4)
    vals = np.ones((4, 2, 2), "float32")
    vals[0, 0, 0] = -0.005  # within tolerance -> 0
    pr = preprocess.convert_target_units(make_field_da(vals, times), 0.01)
    assert float(pr.values[0, 0, 0]) == 0.0
    vals[1, 1, 1] = -3.0
    pr = preprocess.convert_target_units(make_field_da(vals, times), 0.01)
    with pytest.raises(InputError, match=r"target.nc: 1 negative precipitation values \(minimum -3"):
        preprocess.scan_target(pr, np.ones(4, bool), PreprocessConfig(), "target.nc")


def test_missing_values_mask_and_policy():
    """scan_target: a cell missing on more than mask_missing_fraction of days leaves the mask; a sporadic
    NaN inside it is counted (policy mask) or refused (policy refuse); NaN in masked cells count for neither."""
    times = pd.date_range("2000-01-01", periods=10)
    vals = np.ones((10, 2, 3), "float32")
    vals[:8, 0, 0] = np.nan  # missing on 80 % of days -> masked
    vals[:5, 0, 2] = np.nan  # missing on 50 % of days: still in the mask at 0.5, 5 sporadic NaN
    vals[2, 1, 1] = np.nan  # sporadic
    vals[3, 1, 2] = 2.0
    pr = make_field_da(vals, times)
    train = np.ones(10, bool)
    mask, counts, _ = preprocess.scan_target(pr, train, PreprocessConfig(missing_policy="mask"), "t.nc")
    assert mask.values.tolist() == [[0, 1, 1], [1, 1, 1]] and mask.dtype == np.int8
    assert counts == {"cells": 5, "masked_cells": 1, "sporadic_missing": 6, "negative": 0, "minimum": 1.0,
                      "above_max": 0, "maximum": 2.0, "max_rate": float("inf"), "first_above": None}
    mask, counts, _ = preprocess.scan_target(pr, train, PreprocessConfig(mask_missing_fraction=0.4), "t.nc")
    assert mask.values.tolist() == [[0, 1, 0], [1, 1, 1]] and counts["sporadic_missing"] == 1
    with pytest.raises(InputError, match="t.nc: 6 missing values in cells that are not part of the fixed mask"):
        preprocess.scan_target(pr, train, PreprocessConfig(missing_policy="refuse"), "t.nc")
    vals[:, :, :] = np.nan
    vals[:4] = 1.0
    with pytest.raises(InputError, match="t.nc: every cell is missing on more than 50% of days"):
        preprocess.scan_target(make_field_da(vals, times), train, PreprocessConfig(), "t.nc")


def test_scan_by_slices_of_days_equals_one_scan_of_the_whole_record(monkeypatch):
    """Issue 25: scan_target reduces a slice of whole time chunks at a time (memory flat in the record's length); the
    mask, the counts (missing, negatives within tolerance, values above the plausible rate and the first day of
    one, minimum, maximum) and the transform equal one pass over the whole record, slices of one chunk or of all."""
    rng = np.random.default_rng(5)
    times = pd.date_range("2000-01-01", periods=23)
    vals = rng.gamma(0.5, 4.0, (23, 3, 4)).astype("float32")
    vals[:20, 0, 0] = np.nan  # masked
    vals[[4, 17], 2, 3] = np.nan  # sporadic, in two slices
    vals[9, 1, 1] = -0.001  # within the negative tolerance
    vals[15, 2, 0] = 900.0  # above the plausible rate, in the third slice of 5 days
    vals[21, 0, 1] = 950.0
    pr = make_field_da(vals, times).chunk({"time": 5})
    train = np.arange(23) < 15
    cfg = PreprocessConfig()
    assert preprocess.scan_slices(pr, budget=1) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert preprocess.scan_slices(pr, budget=10 * 12 * 4) == [(0, 10), (10, 20), (20, 23)]
    # irregular chunks (days left out by isel): the slices still end at chunk boundaries
    assert preprocess.scan_slices(pr.chunk({"time": (3, 10, 10)}), budget=12 * 12 * 4) == [(0, 3), (3, 13), (13, 23)]
    assert preprocess.scan_slices(pr.compute(), budget=1) == [(0, 23)]  # numpy: one chunk
    results = []
    for budget in (1, 10 * 12 * 4, 2**30):  # slices of 1 chunk, 2 chunks, the whole record
        monkeypatch.setattr(preprocess, "SCAN_BYTES", budget)
        with pytest.raises(InputError, match=r"t.nc: 2 values above 800 mm/day \(maximum 950 mm/day; first on "
                                             r"2000-01-16\)"):
            preprocess.scan_target(pr, train, cfg, "t.nc", max_rate=800.0)
        results.append(preprocess.scan_target(pr, train, cfg, "t.nc"))
    mask, counts, t = results[-1]
    assert counts["sporadic_missing"] == 2 and counts["above_max"] == 0 and counts["maximum"] == 950.0
    assert counts["minimum"] == pytest.approx(-0.001) and mask.values.sum() == 11
    valid = np.isfinite(vals[:15]) & (mask.values.astype(bool))[None]
    f = np.log1p(np.clip(vals[:15][valid].astype(np.float64), 0, None))
    assert t.scale == pytest.approx(f.std(), rel=1e-5)
    for m, c, tr in results[:-1]:
        np.testing.assert_array_equal(m.values, mask.values)
        assert c == counts and tr.scale == pytest.approx(t.scale, rel=1e-12)


def test_units_are_checked_with_file_and_variable_named(small_inputs):
    root, _, _ = small_inputs
    with pytest.raises(InputError, match=r"pr_2000.nc.*'pr'.*'K' not convertible to mm/day"):
        preprocess.run(_data_cfg(root, target_units="K"), PreprocessConfig(), str(root / "x.zarr"))
    assert not (root / "x.zarr").exists()


def test_bad_inputs_name_file_and_variable(small_inputs):
    root, _, _ = small_inputs
    with pytest.raises(InputError, match=r"no file matches .*nothing"):
        io.open_variable(VariableSource(paths=str(root / "nothing" / "*.nc"), variable="pr"))
    with pytest.raises(InputError, match=r"variable 'precip' not found; the files hold \['pr'\]"):
        io.open_variable(VariableSource(paths=str(root / "target" / "*.nc"), variable="precip"))
    bad = root / "target" / "pr_2002.nc"
    bad.write_bytes(b"CDF\x01 truncated")
    with pytest.raises(InputError, match=r"pr_2002.nc: cannot be read as NetCDF"):
        io.open_variable(VariableSource(paths=str(root / "target" / "*.nc"), variable="pr"))


def test_regrid_and_block_mean_by_hand():
    times = pd.date_range("2000-01-01", periods=1)
    da = make_field_da(np.array([[[0.0, 2.0], [4.0, 6.0]]]), times, lat=[0.0, 1.0], lon=[0.0, 1.0])
    out = grid.regrid(da, xr.DataArray([0.5, 2.0]), xr.DataArray([0.5]))
    # bilinear at the centre = 3; beyond the hull: nearest-value fill along lat (row lat=1: 4..6 -> 5)
    np.testing.assert_allclose(out.values[0, :, 0], [3.0, 5.0])
    bm = grid.block_mean(make_field_da(np.arange(16.0).reshape(1, 4, 4), times), 2)
    np.testing.assert_allclose(bm.values[0], [[2.5, 4.5], [10.5, 12.5]])


def test_pad_amount():
    assert grid.pad_amount(19, 8) == (2, 3)
    assert grid.pad_amount(64, 8) == (0, 0)
    assert grid.pad_amount(29, 8) == (1, 2)


def test_target_transform_roundtrip_torch():
    torch = pytest.importorskip("torch")
    t = TargetTransform("sqrt", 2.0)
    x = t.forward(torch.tensor([0.0, 4.0, 16.0]))
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(t.inverse(torch.tensor([-1.0, 1.0])), torch.tensor([0.0, 4.0]))


def _static_file(path, lat, lon, values=None, name="orog", with_time=False):
    values = np.add.outer(np.asarray(lat) * 100.0, np.asarray(lon) * 10.0) if values is None else values
    da = xr.DataArray(values.astype("float32"), dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, name=name,
                      attrs={"units": "m"})
    if with_time:
        da = da.expand_dims(time=pd.to_datetime(["2000-01-01"]))
    return write_nc(da, path)


def test_static_fields_are_regridded_to_the_target_grid(small_inputs):
    root, _, _ = small_inputs
    # a finer static grid (0.25 deg) over the 6 x 5 target (lat 40..42.5, lon -5..-3): bilinear is exact
    # on a field linear in lat and lon
    lat, lon = np.arange(39.5, 43.01, 0.25), np.arange(-5.5, -2.49, 0.25)
    _static_file(root / "static" / "orog.nc", lat, lon, with_time=True)
    data = dataclasses.replace(_data_cfg(root), static=StaticSource(str(root / "static" / "*.nc"), ("orog",)))
    out = root / "dataset.zarr"
    preprocess.run(data, PreprocessConfig(grid_multiple=4, chunk_time=100), str(out))
    ds = xr.open_zarr(out)
    st = preprocess.crop_to_original(ds["static"], ds.attrs).sel(static_channel="orog")
    expected = np.add.outer(st["lat"].values * 100.0, st["lon"].values * 10.0)
    land = preprocess.crop_to_original(ds["mask"], ds.attrs).values.astype(bool)
    np.testing.assert_allclose(st.values[land], expected[land], rtol=1e-5)
    assert np.isnan(st.values[~land]).all()  # the sea cell
    fields = D.load_fields(str(out), _thresholds_for(ds, root))
    assert fields.static_names == ("orog",) and fields.static.shape == (1, 8, 8)


def _thresholds_for(ds, root):
    thr = xr.DataArray(np.full((ds.sizes["lat"], ds.sizes["lon"]), 5.0, "float32"), dims=("lat", "lon"),
                       coords={"lat": ds["lat"].values, "lon": ds["lon"].values}, name="threshold")
    return str(write_nc(thr, root / "thresholds.nc"))


def test_static_field_that_does_not_cover_the_target_is_refused(small_inputs):
    root, _, _ = small_inputs
    lat, lon = np.arange(40.0, 41.01, 0.5), np.arange(-5.0, -2.99, 0.5)  # stops at 41 N: target reaches 42.5 N
    path = _static_file(root / "static" / "orog.nc", lat, lon)
    data = dataclasses.replace(_data_cfg(root), static=StaticSource(str(path), ("orog",)))
    with pytest.raises(InputError, match=r"orog.nc: static variable 'orog'.*lat 40\.\.41 does not cover"):
        preprocess.run(data, PreprocessConfig(grid_multiple=4), str(root / "dataset.zarr"))
    assert not (root / "dataset.zarr").exists()
    data = dataclasses.replace(_data_cfg(root), static=StaticSource(str(path), ("orog", "sftlf")))
    with pytest.raises(InputError, match=r"\['sftlf'\] not found.*hold \['orog'\]"):
        preprocess.run(data, PreprocessConfig(grid_multiple=4), str(root / "dataset.zarr"))
    # a field with a hole over land
    values = np.ones((6, 5), "float32")
    values[2, 2] = np.nan
    hole = _static_file(root / "static" / "holey.nc", np.linspace(40, 42.5, 6), np.linspace(-5, -3, 5), values,
                        name="sftlf")
    data = dataclasses.replace(_data_cfg(root), static=StaticSource(str(hole), ("sftlf",)))
    with pytest.raises(InputError, match="missing at 1 valid target cells"):
        preprocess.run(data, PreprocessConfig(grid_multiple=4), str(root / "dataset.zarr"))


def test_bilinear_one_implementation_two_missing_policies():
    """grid.bilinear by hand on a 2x2 field with one missing corner: 'propagate' loses every target
    cell that leans on it, 'skip' renormalises the finite neighbours' weights."""
    v = np.array([[0.0, 2.0], [4.0, np.nan]])
    lat, lon = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    dlat, dlon = np.array([0.0, 0.5]), np.array([0.0, 0.5])
    prop = grid.bilinear(v, lat, lon, dlat, dlon, missing="propagate")
    # (0, 0) is the corner itself (weight 1 on 0.0); (0, 0.5) = (0 + 2) / 2; (0.5, 0) = (0 + 4) / 2
    np.testing.assert_allclose(prop, [[0.0, 1.0], [2.0, np.nan]])
    skip = grid.bilinear(v, lat, lon, dlat, dlon, missing="skip")
    np.testing.assert_allclose(skip, [[0.0, 1.0], [2.0, (0.0 + 2.0 + 4.0) / 3.0]])
    with pytest.raises(ValueError, match="missing must be one of"):
        grid.bilinear(v, lat, lon, dlat, dlon, missing="zero")


def test_regrid_is_lazy_keeps_dims_and_dtype_and_equals_xarray_interp():
    rng = np.random.default_rng(0)
    times = pd.date_range("2000-01-01", periods=6)
    values = rng.gamma(2.0, 1.0, (6, 4, 5)).astype("float32")
    da = make_field_da(values, times, lat=[43.0, 42.0, 41.0, 40.0], lon=[-9.0, -8.0, -7.0, -6.0, -5.0])
    lazy = da.chunk({"time": 2})
    lat, lon = xr.DataArray(np.linspace(40.2, 42.8, 7)), xr.DataArray(np.linspace(-8.7, -5.3, 9))
    out = grid.regrid(lazy, lat, lon)
    assert out.chunks is not None and out.dims == da.dims and out.dtype == np.float32
    expected = da.astype("float64").interp(lat=lat.values, lon=lon.values, method="linear")
    np.testing.assert_allclose(out.values, expected.values, rtol=1e-6)
    # a missing source cell spreads to the target cells that lean on it (the strict checks count them)
    holed = da.copy(data=np.where(np.arange(5) == 2, np.nan, values))
    assert np.isnan(grid.regrid(holed, lat, lon).values).any()


def test_condition_transform_log1p_of_a_predictor(small_inputs):
    """data.predictors[i].condition_transform 'log1p': the channel is log1p of the predictor on the condition
    grid, normalised with the train mean and std of that log1p; a negative predictor is refused by name."""
    root, _, _ = small_inputs
    cfg = PreprocessConfig(grid_multiple=1)
    target = io.open_variable(_data_cfg(root).target)
    pred = io.open_variable(_data_cfg(root).predictors[0])  # z500 around 5000: positive
    plain = preprocess.build_dataset(target, [pred], cfg)
    logged = preprocess.build_dataset(target, [pred], cfg, condition_transforms=["log1p"])
    raw = plain["condition"].values[:, 0] * plain["cond_std"].values[0] + plain["cond_mean"].values[0]
    train = plain["split"].values == "train"
    lg = np.log1p(raw.astype("float64"))
    mean, std = lg[train].mean(), lg[train].std()
    assert float(logged["cond_mean"].values[0]) == pytest.approx(mean, rel=1e-5)
    np.testing.assert_allclose(logged["condition"].values[:, 0], (lg - mean) / std, atol=2e-3)
    with pytest.raises(InputError, match=r"z500.*below 0.*condition_transform"):
        preprocess.build_dataset(target, [pred - 6000.0], cfg, condition_transforms=["log1p"])
    with pytest.raises(ConfigError, match="only predictors"):
        DataConfig(target=VariableSource(paths="x.nc", variable="pr", condition_transform="log1p"))
