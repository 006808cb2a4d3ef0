"""Thresholds and heavy-day criteria against numpy computations on hand-made fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import make_field_da
from precip_cvae import events, io
from precip_cvae.config import ConfigError, EventsConfig


def _mask(ny, nx, sea=()):
    m = np.ones((ny, nx), "int8")
    for (i, j) in sea:
        m[i, j] = 0
    return xr.DataArray(m, dims=("lat", "lon"))


def test_thresholds_equal_numpy_percentile_of_wet_days():
    rng = np.random.default_rng(3)
    nt, ny, nx = 400, 3, 4
    vals = rng.gamma(0.4, 6.0, size=(nt, ny, nx)).astype("float32")
    pr = make_field_da(vals, pd.date_range("2000-01-01", periods=nt)).chunk({"time": 50})
    cfg = EventsConfig(wet_threshold=1.0, percentile=95.0, min_wet_days=10)
    thr = events.wet_day_thresholds(pr, _mask(ny, nx, sea=[(0, 0)]), cfg)
    expected = np.nanpercentile(np.where(vals >= 1.0, vals, np.nan), 95.0, axis=0)
    expected[0, 0] = np.nan
    np.testing.assert_allclose(thr.values, expected, rtol=1e-5)
    assert thr.attrs["units"] == "mm day-1" and thr.attrs["n_pooled_pixels"] == 0


def test_pixels_with_few_wet_days_use_the_pooled_value():
    nt = 100
    vals = np.zeros((nt, 1, 3), "float32")
    vals[:, 0, 0] = np.arange(nt)  # 99 wet days: 1..99
    vals[:, 0, 1] = np.arange(nt) * 2.0  # 99 wet days: 2..198
    vals[:5, 0, 2] = [1.0, 2.0, 3.0, 4.0, 5.0]  # only 5 wet days -> pooled
    pr = make_field_da(vals, pd.date_range("2000-01-01", periods=nt))
    cfg = EventsConfig(percentile=50.0, min_wet_days=20)
    thr = events.wet_day_thresholds(pr, _mask(1, 3), cfg)
    wet = vals[vals >= 1.0]
    assert thr.values[0, 0] == pytest.approx(50.0)  # median of 1..99
    assert thr.values[0, 1] == pytest.approx(100.0)  # median of 2..198
    assert thr.values[0, 2] == pytest.approx(np.percentile(wet, 50.0))
    assert thr.attrs["n_pooled_pixels"] == 1


def _stats(means, fracs):
    return pd.DataFrame({"domain_mean": means, "domain_max": means, "exceed_fraction": fracs, "n_valid": 10})


def test_exceedance_criterion_on_hand_made_days():
    stats = _stats([1, 2, 3, 4], [0.0, 0.049, 0.05, 0.5])
    flags, _ = events.classify_days(stats, np.array(["train"] * 4), EventsConfig(min_exceed_fraction=0.05))
    assert flags.tolist() == [False, False, True, True]


def test_domain_mean_criterion_is_fitted_on_train_days_only():
    means = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0]
    split = np.array(["train"] * 4 + ["test"] * 2)
    cfg = EventsConfig(criterion="domain_mean", domain_mean_percentile=50.0)
    flags, info = events.classify_days(_stats(means, [0.0] * 6), split, cfg)
    assert info["domain_mean_threshold_mm_day"] == pytest.approx(2.5)  # median of train 1..4
    assert flags.tolist() == [False, False, True, True, True, True]
    flags, _ = events.classify_days(_stats(means, [0.0, 0.0, 0.0, 0.0, 0.0, 0.9]), split,
                                    EventsConfig(criterion="either", domain_mean_percentile=99.0))
    # train P99 of [1, 2, 3, 4] is 3.97: day 4 qualifies by its mean, day 6 by its exceedance
    assert flags.tolist() == [False, False, False, True, True, True]


def test_daily_statistics_by_hand():
    vals = np.array([[[0.0, 10.0], [5.0, np.nan]], [[1.0, 1.0], [1.0, 50.0]]], "float32")
    pr = make_field_da(vals, pd.date_range("2000-01-01", periods=2))
    thr = xr.DataArray(np.array([[4.0, 4.0], [4.0, 4.0]]), dims=("lat", "lon"))
    mask = _mask(2, 2)
    stats = events.daily_statistics(pr, thr, mask)
    # day 1: 3 valid pixels (one sporadic NaN), 2 above 4 mm
    assert stats["exceed_fraction"].tolist() == pytest.approx([2 / 3, 1 / 4])
    assert stats["domain_mean"].tolist() == pytest.approx([5.0, 13.25])
    assert stats["domain_max"].tolist() == pytest.approx([10.0, 50.0])


def test_field_statistics_by_hand_and_the_same_for_chunked_days():
    """One definition for real days and samples: the numpy function by hand, and daily_statistics over a
    dask-chunked field (chunk boundaries inside the record) equal to it."""
    vals = np.array([[[0.0, 10.0], [5.0, np.nan]], [[1.0, 1.0], [0.5, 50.0]], [[np.nan] * 2] * 2], "float32")
    thr = np.array([[4.0, 4.0], [4.0, np.nan]])
    mask = np.array([[True, True], [True, False]])  # the last cell is masked: never valid
    st = events.field_statistics(vals, thr, wet_threshold=1.0, mask=mask)
    assert st["n_valid"].tolist() == [3, 3, 0]
    assert st["domain_mean"].tolist()[:2] == pytest.approx([5.0, 2.5 / 3]) and np.isnan(st["domain_mean"][2])
    assert st["domain_max"].tolist()[:2] == [10.0, 1.0] and np.isnan(st["domain_max"][2])
    assert st["exceed_fraction"].tolist() == pytest.approx([2 / 3, 0.0, 0.0])
    assert st["wet_fraction"].tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])  # 0 mm and 0.5 mm are dry
    rng = np.random.default_rng(0)
    many = rng.gamma(0.5, 6.0, size=(23, 3, 4)).astype("float32")
    many[5, 1, 1] = np.nan
    pr = make_field_da(many, pd.date_range("2000-01-01", periods=23)).chunk({"time": 7})
    thr_da = xr.DataArray(rng.uniform(2, 8, size=(3, 4)), dims=("lat", "lon"))
    mask_da = xr.DataArray(np.ones((3, 4), "int8"), dims=("lat", "lon"))
    chunked = events.daily_statistics(pr, thr_da, mask_da, wet_threshold=1.0)
    whole = events.field_statistics(many, thr_da.values, 1.0, np.ones((3, 4), bool))
    pd.testing.assert_frame_equal(chunked, whole)


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(ConfigError, match=r"valid names are \['exceedance', 'domain_mean', 'either'\]"):
        EventsConfig(criterion="peaks")


def test_stage_writes_map_and_table(small_inputs):
    from precip_cvae import preprocess
    from precip_cvae.config import DataConfig, PreprocessConfig, VariableSource

    root, pr_mm, times = small_inputs
    data = DataConfig(target=VariableSource(str(root / "target" / "*.nc"), "pr"),
                      predictors=(VariableSource(str(root / "pred" / "*.nc"), "z500"),))
    preprocess.run(data, PreprocessConfig(grid_multiple=1), str(root / "d.zarr"))
    table = events.run(str(root / "d.zarr"), EventsConfig(percentile=50, min_exceed_fraction=0.3),
                       str(root / "thr.nc"), str(root / "events.csv"))
    thr = io.open_netcdf(root / "thr.nc")
    assert thr["threshold"].dims == ("lat", "lon") and thr["threshold"].attrs["units"] == "mm day-1"
    assert np.isnan(thr["threshold"].values[0, 0])  # the sea cell
    back = pd.read_csv(root / "events.csv")
    assert list(back.columns) == ["date", "split", "domain_mean", "domain_max", "exceed_fraction", "is_event"]
    assert len(back) == len(times) and back["date"].iloc[0] == "2000-01-01"
    # recompute the flags by hand from the raw field
    train = back["split"].values == "train"
    wet = np.where(pr_mm[train] >= 1.0, pr_mm[train], np.nan)
    local = np.nanpercentile(wet, 50, axis=0)
    frac = np.nansum(pr_mm > local, axis=(1, 2)) / 29.0
    np.testing.assert_array_equal(back["is_event"].values, frac >= 0.3)
    assert back["is_event"].sum() == table["is_event"].sum() > 0
    lines = events.summarise(table)
    assert lines[-1].startswith(f"all: {int(table['is_event'].sum())} heavy days of {len(times)}")


@pytest.mark.parametrize("percentile", [1.0, 50.0, 95.0, 99.0, 99.9])
def test_streamed_thresholds_equal_numpy_on_both_ends(percentile):
    """The streamed per-pixel and pooled percentiles (top or bottom
    extreme values, chosen by the percentile) equal numpy's on chunked input, pooled fallback included."""
    rng = np.random.default_rng(4)
    vals = rng.gamma(0.4, 6.0, size=(500, 3, 4)).astype("float32")
    vals[rng.random(vals.shape) < 0.05] = np.nan
    pr = xr.DataArray(vals, dims=("time", "lat", "lon"),
                      coords={"time": pd.date_range("2000-01-01", periods=500)}).chunk({"time": 64})
    mask = xr.DataArray(np.ones((3, 4), "int8"), dims=("lat", "lon"))
    thr = events.wet_day_thresholds(pr, mask, EventsConfig(percentile=percentile, min_wet_days=1))
    wet = np.where(vals >= 1.0, vals, np.nan)
    np.testing.assert_allclose(thr.values, np.nanpercentile(wet, percentile, axis=0), rtol=1e-6)
    pooled = events.wet_day_thresholds(pr, mask, EventsConfig(percentile=percentile, min_wet_days=10**6))
    np.testing.assert_allclose(pooled.values, np.percentile(wet[np.isfinite(wet)], percentile), rtol=1e-6)


def test_closest_to_heavy_names_the_criterion_its_threshold_and_the_closest_train_day():
    table = pd.DataFrame({"date": ["2001-01-01", "2001-01-02", "2001-01-03", "2001-01-04"],
                          "split": ["train", "train", "train", "val"],
                          "domain_mean": [1.0, 4.5, 2.0, 9.0], "exceed_fraction": [0.01, 0.02, 0.031, 0.5]})
    limits = {"domain_mean_threshold_mm_day": 5.0}
    text = events.closest_to_heavy(table, EventsConfig(criterion="either", min_exceed_fraction=0.05), limits)
    # the val day is closer on both counts but is not a train day
    assert text == ("criterion 'either': exceedance needs >= 5.0% of the valid pixels above their local P99 of wet "
                    "days (events.min_exceed_fraction); the closest train day, 2001-01-03, has 3.1%; domain_mean "
                    "needs a domain mean above 5 mm/day (train P99, events.domain_mean_percentile); the closest "
                    "train day, 2001-01-02, has 4.5 mm/day")
