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


@pytest.mark.parametrize("memory_mb", [None, 0.0], ids=["extremes", "bracketing"])
@pytest.mark.parametrize("percentile", [1.0, 50.0, 95.0, 99.0, 99.9])
def test_streamed_thresholds_equal_numpy_on_both_ends(percentile, memory_mb):
    """The streamed per-pixel and pooled percentiles (top or bottom extreme values, chosen by the percentile;
    or, with no memory for them, the bracketing passes) equal numpy's on chunked input, pooled fallback included;
    values rounded to 0.1 mm as E-OBS's, so with ties."""
    rng = np.random.default_rng(4)
    vals = np.round(rng.gamma(0.4, 6.0, size=(500, 3, 4)), 1).astype("float32")
    vals[rng.random(vals.shape) < 0.05] = np.nan
    pr = xr.DataArray(vals, dims=("time", "lat", "lon"),
                      coords={"time": pd.date_range("2000-01-01", periods=500)}).chunk({"time": 64})
    mask = xr.DataArray(np.ones((3, 4), "int8"), dims=("lat", "lon"))
    thr = events.wet_day_thresholds(pr, mask, EventsConfig(percentile=percentile, min_wet_days=1), memory_mb)
    wet = np.where(vals >= 1.0, vals, np.nan)
    np.testing.assert_allclose(thr.values, np.nanpercentile(wet, percentile, axis=0), rtol=1e-6)
    pooled = events.wet_day_thresholds(pr, mask, EventsConfig(percentile=percentile, min_wet_days=10**6), memory_mb)
    np.testing.assert_allclose(pooled.values, np.percentile(wet[np.isfinite(wet)], percentile), rtol=1e-6)


def test_bracketing_and_extreme_values_give_the_same_thresholds():
    """Both ways read the same two order statistics: the thresholds are equal to the bit (a sea cell, a pixel
    that takes the pooled value, a pixel with no wet day)."""
    rng = np.random.default_rng(5)
    vals = np.round(rng.gamma(0.5, 7.0, size=(700, 6, 5)), 1).astype("float32")
    vals[:, 0, 0] = np.nan
    vals[:680, 2, 3] = 0.0  # few wet days: pooled
    vals[:, 4, 4] = 0.5  # never wet
    pr = xr.DataArray(vals, dims=("time", "lat", "lon")).chunk({"time": 100})
    mask = xr.DataArray(np.isfinite(vals).any(axis=0).astype("int8"), dims=("lat", "lon"))
    for percentile in (90.0, 99.0):
        cfg = EventsConfig(percentile=percentile, min_wet_days=30)
        a, b = (events.wet_day_thresholds(pr, mask, cfg, memory_mb=m) for m in (None, 0.0))
        np.testing.assert_array_equal(a.values, b.values)
        assert a.attrs == b.attrs and a.attrs["n_pooled_pixels"] == 2


def test_bracketing_compares_with_the_wet_threshold_as_the_data_see_it():
    """0.7 mm is 0.69999999 in float32, and E-OBS's 0.1 mm steps hold that value: it is wet in both ways (and in
    numpy's), so the ranks of the bracketing passes count it."""
    rng = np.random.default_rng(8)
    vals = np.round(rng.gamma(0.5, 4.0, size=(300, 2, 2)), 1).astype("float32")
    assert (vals == np.float32(0.7)).any()
    pr = xr.DataArray(vals, dims=("time", "lat", "lon")).chunk({"time": 64})
    cfg = EventsConfig(percentile=50.0, wet_threshold=0.7, min_wet_days=1)
    a, b = (events.wet_day_thresholds(pr, _mask(2, 2), cfg, memory_mb=m).values for m in (None, 0.0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(b, np.nanpercentile(np.where(vals >= np.float32(0.7), vals, np.nan), 50.0, axis=0))


def test_float64_values_a_few_ulps_apart_are_binned_by_the_edges():
    """Values 1 + k ulp (float64): the brackets shrink to a few ulps, where bin edges coincide and the division's
    estimate of a bin is several bins off; the edges still decide, and every rank comes out."""
    rng = np.random.default_rng(9)
    vals = 1.0 + rng.integers(0, 8, size=(400, 1, 2)) * np.spacing(1.0)
    pr = xr.DataArray(vals, dims=("time", "lat", "lon")).chunk({"time": 64})
    for percentile in (10.0, 50.0, 90.0):
        cfg = EventsConfig(percentile=percentile, wet_threshold=1.0, min_wet_days=1)
        a, b = (events.wet_day_thresholds(pr, _mask(1, 2), cfg, memory_mb=m).values for m in (None, 0.0))
        np.testing.assert_array_equal(a, b)


def test_an_infinite_wet_value_is_refused_by_name():
    vals = np.full((40, 1, 2), 3.0, dtype="float32")
    vals[5, 0, 1] = np.inf
    pr = xr.DataArray(vals, dims=("time", "lat", "lon"), name="rr").chunk({"time": 16})
    pr.encoding["source"] = "/data/eobs_rr.nc"  # as xarray records the file it read
    for memory_mb in (None, 0.0):
        with pytest.raises(io.InputError,
                           match=r"/data/eobs_rr.nc: rr: \+inf on a wet day at 1 cells; expected finite"):
            events.wet_day_thresholds(pr, _mask(1, 2), EventsConfig(min_wet_days=1), memory_mb=memory_mb)


def _slab_source(columns, rows=3):
    """slabs() over the (n, P) array ``columns`` in slabs of ``rows`` rows, counting the passes."""
    passes = []

    def slabs():
        passes.append(1)
        for i in range(0, columns.shape[0], rows):
            yield columns[i:i + rows]
    return slabs, passes


def test_order_statistics_by_hand():
    """Ranks among the values >= 1 (NaN and values below the floor not counted), read by hand."""
    x = np.array([[5.0, 0.2], [1.0, 7.0], [np.nan, 7.0], [3.0, 2.0], [9.0, 0.0], [4.0, 7.0], [2.0, 1.5]])
    # column 0 counted: 1 2 3 4 5 9; column 1: 1.5 2 7 7 7
    slabs, passes = _slab_source(x)
    got = events.order_statistics(slabs, np.array([[0, 4], [5, 2], [3, -1]]), np.array([9.0, 7.0]), 1.0,
                                  bins=2, collect=1)
    np.testing.assert_array_equal(got, [[1.0, 7.0], [9.0, 7.0], [4.0, np.nan]])
    assert len(passes) >= 3  # histogram passes narrowed the brackets before the values were read


@pytest.mark.parametrize("bins, collect, max_rounds", [(2, 1, 8), (4, 3, 8), (64, 64, 8), (2, 1, 1)])
def test_order_statistics_equal_sorting_with_ties_and_round_off_neighbours(bins, collect, max_rounds):
    """Every rank of every column equals the sorted column's, whatever the bins, the collect size and the rounds
    (one round: brackets still full are read whole); columns of ties and of 1.0 beside the next float32 above
    it included."""
    rng = np.random.default_rng(6)
    cols = [np.round(rng.gamma(0.6, 8.0, 300), 1), np.full(300, 12.5),
            np.where(rng.random(300) < 0.5, np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2.0))),
            np.where(rng.random(300) < 0.3, np.nan, rng.exponential(20.0, 300))]
    x = np.stack(cols, axis=1).astype("float32")
    counted = [np.sort(c[np.isfinite(c) & (c >= 1.0)]) for c in x.T]
    n = np.array([len(c) for c in counted])
    ranks = np.stack([np.arange(r, r + 4) % n for r in (0, 37, 150, 299)])
    ranks = np.concatenate([ranks, (n - 1)[None]])
    top = np.array([c[-1] for c in counted], dtype=np.float64)
    slabs, passes = _slab_source(x, rows=64)
    got = events.order_statistics(slabs, ranks, top, 1.0, bins=bins, collect=collect, max_rounds=max_rounds)
    expected = np.stack([[counted[p][r[p]] for p in range(4)] for r in ranks])
    np.testing.assert_array_equal(got, expected)
    assert len(passes) <= max_rounds + 1  # histogram passes and one that reads the brackets


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
