"""The generate stage: shapes, units, provenance, determinism, mask, memorisation check, training-set layout."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from precip_cvae import generate, train
from precip_cvae.config import EventsConfig, GenerateConfig, LossConfig, ModelConfig, TrainConfig
from precip_cvae.data import load_fields
from precip_cvae.io import InputError
from precip_cvae.neighbours import nearest_rmse


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    paths = train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], prepared["events"], str(out / "train"),
                             str(out / "resume"))
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, lr=2e-3, val_members=2, num_threads=1,
                                                             loss=LossConfig(warmup_epochs=0)))
    return str(paths.best)


def _run(prepared, trained, out, **kw):
    # a one-epoch model makes no heavy field: every sample is kept (the heavy filter has its own tests below)
    cfg = GenerateConfig(**{"members": 3, "batch_days": 2, "seed": 5, "filter_heavy": False, **kw})
    paths = generate.GeneratePaths.in_dir(out, trained, prepared["dataset"], prepared["thresholds"],
                                          prepared["events"], netcdf=cfg.netcdf)
    return generate.run(paths, cfg, EventsConfig(min_exceed_fraction=0.05))


def test_outputs_units_provenance_mask(prepared, trained, tmp_path):
    report = _run(prepared, trained, tmp_path, netcdf=True)
    aug = xr.open_zarr(tmp_path / "augmented.zarr")
    events = pd.read_csv(prepared["events"], dtype={"date": str})
    heavy_dates = events.loc[(events["split"] == "train") & events["is_event"], "date"].tolist()
    assert len(heavy_dates) > 0 and report["samples"] == 3 * len(heavy_dates)
    # a CF ensemble: pr(time, realization, lat, lon), time the condition's date, realization int32
    assert aug["pr"].dims == ("time", "realization", "lat", "lon") and aug.sizes["lat"] == 16
    assert [str(t)[:10] for t in aug["time"].values.astype("datetime64[D]")] == heavy_dates
    assert aug["realization"].dtype == np.int32 and aug["realization"].values.tolist() == [0, 1, 2]
    assert aug["realization"].attrs["standard_name"] == "realization"
    assert aug["n_realizations"].values.tolist() == [3] * len(heavy_dates)
    assert aug["pr"].attrs["units"] == "mm day-1" and aug["pr"].attrs["standard_name"] == "lwe_precipitation_rate"
    for key in ("checkpoint_sha256", "config_hash", "package_version", "seed", "creation_time", "history"):
        assert key in aug.attrs, key
    assert len(aug.attrs["checkpoint_sha256"]) == 64
    assert aug.attrs["history"].splitlines()[-1].split(" ", 3)[1:3] == ["precip-cvae", aug.attrs["package_version"]]
    assert "preprocess:" in aug.attrs["history"] and "generate:" in aug.attrs["history"]
    pr = aug["pr"].values
    ds = xr.open_zarr(prepared["dataset"])
    mask = ds["mask"].values.astype(bool)
    assert np.isnan(pr[..., ~mask]).all() and (pr[..., mask] >= 0).all() and np.isfinite(pr[..., mask]).all()
    assert report["nan_values"] == 0 and report["negative_values"] == 0
    # each day's samples against its real day: the domain mean of the stored samples by hand
    paired = report["paired_with_real_days"]
    assert paired["days_without_samples"] == 0 and paired["domain_mean"]["days"] == len(heavy_dates)
    samples_mean = np.nanmean(np.where(mask, pr, np.nan), axis=(2, 3)).mean(axis=1)  # (days,) mean over samples
    real_mean = events.set_index("date").loc[heavy_dates, "domain_mean"].to_numpy()
    assert paired["domain_mean"]["ratio"] == pytest.approx(samples_mean.mean() / real_mean.mean(), rel=1e-5)
    assert paired["domain_mean"]["ci_low"] <= paired["domain_mean"]["ratio"] <= paired["domain_mean"]["ci_high"]
    mass = report["mass_error_vs_coarse_condition"]
    assert mass["available"]  # the tiny set has a pr_block4 channel
    # the real heavy fields against their own 4x block means: the same domain mean, no error
    assert mass["real_event_days"]["mean_abs"] == pytest.approx(0.0, abs=1e-3)
    back = json.loads((tmp_path / "generation_report.json").read_text())
    assert back["samples"] == report["samples"] and "memorisation" in back
    assert (tmp_path / "generation_report.md").read_text().startswith("# Generation report")
    nc = xr.open_dataset(tmp_path / "augmented.nc")
    np.testing.assert_allclose(nc["pr"].values, pr)
    assert "condition" not in nc and "sample" not in nc.dims
    # the conditions: one variable per channel on the predictor grid, equal to the data set's on those days
    days = [ds.indexes["time"].get_loc(pd.Timestamp(d)) for d in heavy_dates]
    for cond in (xr.open_zarr(tmp_path / "augmented.zarr", group="condition"),
                 xr.open_dataset(tmp_path / "augmented_condition.nc")):
        for c, name in enumerate(ds["channel"].values.astype(str)):
            assert cond[name].dims == ("time", "clat", "clon")
            np.testing.assert_array_equal(cond[name].values, ds["condition"].values[days, c])
            assert cond[name].attrs["normalisation_std"] == pytest.approx(float(ds["cond_std"].values[c]))


def test_deterministic_per_seed(prepared, trained, tmp_path):
    _run(prepared, trained, tmp_path / "a")
    _run(prepared, trained, tmp_path / "b")
    _run(prepared, trained, tmp_path / "c", seed=6)
    a, b, c = (xr.open_zarr(tmp_path / n / "augmented.zarr")["pr"].values for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.nan_to_num(a), np.nan_to_num(c))


def test_filter_keeps_only_heavy_samples(prepared, trained, tmp_path):
    def run(min_frac, out, thresholds=prepared["thresholds"]):
        cfg = GenerateConfig(members=3, batch_days=2, seed=5, filter_heavy=True, max_rounds=2)
        paths = generate.GeneratePaths.in_dir(out, trained, prepared["dataset"], thresholds, prepared["events"])
        return generate.run(paths, cfg, EventsConfig(min_exceed_fraction=min_frac))

    everything = run(0.0, tmp_path / "all")  # every sample qualifies: nothing redrawn
    assert everything["acceptance_rate"] == 1.0 and everything["days_short_of_members"] == 0
    unfiltered = xr.open_zarr(tmp_path / "all" / "augmented.zarr")["pr"].values  # (T, R, h, w)
    # a one-epoch model never reaches the real P99: judge the samples against their own per-pixel median
    # instead (a thresholds file of the same layout), so that about half the pixels of a sample exceed it
    thr_ds = xr.open_dataset(prepared["thresholds"]).load()
    thr_ds["threshold"].values = np.where(np.isfinite(thr_ds["threshold"].values),
                                          np.nanmedian(unfiltered, axis=(0, 1)), np.nan).astype("float32")
    thr_ds.to_netcdf(tmp_path / "median_thresholds.nc")
    thr = thr_ds["threshold"].values
    valid = np.isfinite(thr)

    def exceed_fraction(fields):  # by hand: share of the valid pixels above the local threshold
        return (fields[..., valid] > thr[valid]).mean(axis=-1)

    fractions = exceed_fraction(unfiltered).ravel()
    never = thr_ds.copy(deep=True)
    never["threshold"].values = np.where(valid, np.float32(1e9), np.nan).astype("float32")
    never.to_netcdf(tmp_path / "never_thresholds.nc")
    with pytest.raises(generate.GenerationError, match=r"no sample was accepted: none of the \d+ drawn for \d+ heavy days "
                                                        rf".*the model \({re.escape(trained)}\).*generate.filter_heavy: false"):
        run(0.01, tmp_path / "none", str(tmp_path / "never_thresholds.nc"))  # impossible: fails, writes nothing
    assert not (tmp_path / "none" / "augmented.zarr").exists()
    cut = float(np.median(fractions))
    assert 0 < cut < fractions.max()
    some = run(cut, tmp_path / "some", str(tmp_path / "median_thresholds.nc"))
    kept = xr.open_zarr(tmp_path / "some" / "augmented.zarr")
    counts = kept["n_realizations"].values
    pr = kept["pr"].values
    filled = np.arange(pr.shape[1])[None, :] < counts[:, None]
    assert np.isnan(pr[~filled]).all()  # realizations past a day's count are fill values
    assert (exceed_fraction(pr[filled]) >= cut).all() and some["samples"] == counts.sum()
    assert some["acceptance_rate"] < 1.0


def test_samples_paired_with_their_real_days_by_hand():
    """generation_report's paired ratios: a day's statistic is the mean over its samples, the ratio is of the means
    over the days that have samples, and a day the filter left empty is counted, not scored."""
    from precip_cvae.generate.report import paired_with_real_days, ratio_of_means

    synth = pd.DataFrame({"source_date": ["d1", "d1", "d2", "d3", "d3", "d3"],
                          "domain_mean": [4.0, 8.0, 3.0, 1.0, 2.0, 3.0],
                          "domain_max": [40.0, 60.0, 30.0, 10.0, 20.0, 30.0],
                          "exceed_fraction": [0.05, 0.07, 0.06, 0.1, 0.1, 0.1]})
    real = pd.DataFrame({"domain_mean": [10.0, 5.0, 2.0, 9.0], "domain_max": [50.0, 40.0, 20.0, 70.0],
                         "exceed_fraction": [0.1, 0.05, 0.1, 0.2]})
    out = paired_with_real_days(synth, real, np.array(["d1", "d2", "d3", "d4"]))
    assert out["days_without_samples"] == 1  # d4
    # per day: d1 (4 + 8) / 2 = 6, d2 3, d3 2 against 10, 5, 2
    assert out["domain_mean"]["days"] == 3 and out["domain_mean"]["ratio"] == pytest.approx(11.0 / 17.0)
    assert out["domain_max"]["ratio"] == pytest.approx((50.0 + 30.0 + 20.0) / (50.0 + 40.0 + 20.0))
    assert out["exceed_fraction"]["ratio"] == pytest.approx((0.06 + 0.06 + 0.1) / (0.1 + 0.05 + 0.1))
    assert out["domain_mean"]["ci_low"] <= out["domain_mean"]["ratio"] <= out["domain_mean"]["ci_high"]
    # the interval resamples days: identical days give a point interval; fewer than 3 days give none
    same = ratio_of_means(np.full(5, 2.0), np.full(5, 4.0))
    assert same["ratio"] == 0.5 and same["ci_low"] == pytest.approx(0.5) and same["ci_high"] == pytest.approx(0.5)
    assert ratio_of_means(np.array([1.0, 2.0]), np.array([2.0, 2.0]))["ci_low"] is None


def test_memorisation_flags_a_copy_and_passes_independent_fields():
    rng = np.random.default_rng(0)
    real = rng.gamma(0.6, 5.0, size=(60, 8, 8))
    real[:, 0, 0] = np.nan  # masked pixel, ignored
    independent = rng.gamma(0.6, 5.0, size=(10, 8, 8))
    ok = generate.memorisation_check(independent, real, warn_fraction=0.05)
    assert ok["fraction_near_copies"] == 0.0 and not ok["warning"]
    copies = np.concatenate([real[:3], independent[:7]])
    flagged = generate.memorisation_check(copies, real, warn_fraction=0.05)
    assert flagged["per_sample_nn_rmse"][:3] == pytest.approx([0, 0, 0], abs=1e-6)
    assert flagged["per_sample_nn_ratio"][:3] == pytest.approx([0, 0, 0], abs=1e-6)
    assert flagged["fraction_near_copies"] == pytest.approx(0.3) and flagged["warning"]


def test_memorisation_does_not_mistake_smooth_or_dry_fields_for_copies():
    rng = np.random.default_rng(1)
    real = rng.gamma(4.0, 5.0, size=(60, 8, 8))
    real[:20] = 0.0  # 20 identical dry days
    heavy = np.arange(50, 60)
    # smooth samples: means of 8 real fields each; a dry sample (equal to 20 fields); a copy of a heavy day
    smooth = np.stack([real[rng.choice(np.arange(20, 60), 8, replace=False)].mean(0) for _ in range(8)])
    samples = np.concatenate([smooth, np.zeros((1, 8, 8)), real[heavy[:1]] + 0.01])
    memo = generate.memorisation_check(samples, real, 0.05, anchors=real[heavy], anchor_index=heavy)
    # the smooth means are closer (RMSE) to real fields than real heavy days are to each other ...
    assert memo["fraction_closer_than_real_p5"] >= 0.5
    # ... but sit between several fields (d1/d2 near 1): only the copy is a near-copy
    ratio = memo["per_sample_nn_ratio"]
    assert (ratio[:8] > 0.5).all() and ratio[8] == 1.0 and ratio[9] < 0.01
    assert memo["fraction_near_copies"] == pytest.approx(0.1) and memo["warning"]
    # over all train days the real-to-real 5th percentile is 0 (dry pairs): no RMSE threshold could flag
    assert generate.memorisation_check(samples, real, 0.05)["real_nn_rmse_p5"] == 0.0
    # anchors skip their own copy in the reference
    assert nearest_rmse(real[heavy].reshape(10, -1), real.reshape(60, -1), exclude=heavy).min() > 0


def test_augmented_training_set_opens_with_the_training_loader(prepared, trained, tmp_path):
    report = _run(prepared, trained, tmp_path, synthetic_weight=0.5)
    path = tmp_path / "augmented_training_set.zarr"
    fields = load_fields(str(path), prepared["thresholds"], None)
    ds = xr.open_zarr(path)
    real = load_fields(prepared["dataset"], prepared["thresholds"], prepared["events"], splits=("train",))
    assert len(fields) == len(real) + report["samples"]
    assert ds["synthetic"].values.sum() == report["samples"]
    assert set(np.unique(ds["sample_weight"].values[ds["synthetic"].values == 1])) == {0.5}
    np.testing.assert_array_equal(fields.x[: len(real)].numpy(), real.x.numpy())
    assert (fields.split == "train").all() and fields.y.shape[1:] == real.y.shape[1:]
    # each synthetic entry is realization r of day t in augmented.zarr, paired with day t's condition
    aug = xr.open_zarr(tmp_path / "augmented.zarr")
    data = xr.open_zarr(prepared["dataset"])
    syn = np.flatnonzero(ds["synthetic"].values == 1)
    for k in (0, len(syn) // 2, len(syn) - 1):
        row = syn[k]
        t, r = k // 3, int(ds["realization"].values[row])  # 3 members, none filtered out
        assert r == k % 3
        np.testing.assert_array_equal(ds["pr"].values[row], aug["pr"].values[t, r])
        day = data.indexes["time"].get_loc(aug.indexes["time"][t])
        np.testing.assert_array_equal(ds["condition"].values[row], data["condition"].values[day])
        assert ds["time"].values[row] == aug["time"].values[t]


def test_no_heavy_day_is_a_clear_error(prepared, trained, tmp_path):
    with pytest.raises(Exception, match="no heavy-event day in splits"):
        _no_events(prepared, trained, tmp_path)


def _no_events(prepared, trained, tmp_path):
    import pandas as pd

    table = pd.read_csv(prepared["events"], dtype={"date": str})
    table["is_event"] = False
    path = tmp_path / "events.csv"
    table.to_csv(path, index=False)
    generate.run(generate.GeneratePaths.in_dir(tmp_path / "out", trained, prepared["dataset"],
                                               prepared["thresholds"], str(path)),
                 GenerateConfig(members=2), EventsConfig())


def test_padded_grid_is_cropped_in_samples_and_padded_in_the_training_set(tmp_path):
    """A 12 x 14 grid padded to 16 x 16: samples on the original grid, the training set on the padded one."""
    from conftest import prepare_demo
    from precip_cvae.config import DemoConfig

    prep = prepare_demo(tmp_path / "d", DemoConfig(seed=5, years=2, nlat=12, nlon=14, nclat=4, nclon=4,
                                                     heavy_fraction=0.05), EventsConfig(min_exceed_fraction=0.05))
    paths = train.TrainPaths.in_dir(prep["dataset"], prep["thresholds"], prep["events"], str(tmp_path / "train"),
                             str(tmp_path / "resume"))
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, val_members=2, num_threads=1,
                                                             loss=LossConfig(warmup_epochs=0)))
    report = generate.run(generate.GeneratePaths.in_dir(tmp_path / "out", str(paths.best), prep["dataset"],
                                                        prep["thresholds"], prep["events"]),
                          GenerateConfig(members=2, batch_days=3, filter_heavy=False),
                          EventsConfig(min_exceed_fraction=0.05))
    aug = xr.open_zarr(tmp_path / "out" / "augmented.zarr")
    assert (aug.sizes["lat"], aug.sizes["lon"]) == (12, 14) and int(aug["n_realizations"].sum()) == report["samples"]
    ts = load_fields(str(tmp_path / "out" / "augmented_training_set.zarr"), prep["thresholds"], None)
    assert tuple(ts.x.shape[-2:]) == (16, 16)
    assert not ts.valid[:, :, 0, :].any()  # the padding row is invalid for real and synthetic fields alike


def test_a_gap_in_the_source_days_observations_is_generated(prepared, trained, tmp_path):
    # E-OBS drops stations: a heavy day may lack a few cells inside the static mask. The new fields for that
    # condition cover the whole mask (the seed run on Iberia refused to write: '60 NaN inside the mask').
    events = pd.read_csv(prepared["events"], dtype={"date": str})
    day = events.loc[(events["split"] == "train") & events["is_event"], "date"].iloc[0]
    ds = xr.open_zarr(prepared["dataset"]).load()
    mask = ds["mask"].values.astype(bool)
    cells = np.argwhere(mask)[:3]
    t = ds.indexes["time"].get_loc(pd.Timestamp(day))
    pr = ds["pr"].values.copy()
    pr[t, cells[:, 0], cells[:, 1]] = np.nan
    ds["pr"] = ds["pr"].copy(data=pr)
    for v in ds.variables.values():
        v.encoding = {}
    gappy = tmp_path / "gappy.zarr"
    ds.to_zarr(gappy)
    cfg = GenerateConfig(members=3, batch_days=2, seed=5, filter_heavy=False)
    paths = generate.GeneratePaths.in_dir(tmp_path / "out", trained, str(gappy), prepared["thresholds"],
                                          prepared["events"])
    report = generate.run(paths, cfg, EventsConfig(min_exceed_fraction=0.05))
    assert report["nan_values"] == 0
    aug = xr.open_zarr(tmp_path / "out" / "augmented.zarr")
    field = aug["pr"].sel(time=day).values  # (R, h, w)
    assert np.isfinite(field[:, cells[:, 0], cells[:, 1]]).all() and (field[:, mask] >= 0).all()


def test_report_has_climate_indices_of_the_samples_against_their_heavy_days(prepared, trained, tmp_path):
    from precip_cvae.split import season_year_rule

    report = _run(prepared, trained, tmp_path)
    ix = report["indices"]
    table = {r["index"]: r for r in ix["table"]}
    assert set(table) == {"rx1day", "sdii", "r95ptot", "r99ptot", "days_above_p99", "wasserstein",
                          "perkins_skill_score", "ralsd"}  # no spell lengths on isolated days
    assert ix["realizations"] == 3 and ix["days"] == report["heavy_days"]
    # Rx1day by hand: per realization and pixel the largest value of each period, averaged over the
    # periods, then over the realizations, then over the valid pixels
    aug = xr.open_zarr(tmp_path / "augmented.zarr")
    ds = xr.open_zarr(prepared["dataset"])
    assert season_year_rule(ds.attrs) == "calendar"
    years = pd.DatetimeIndex(aug["time"].values).year.to_numpy()
    pr = aug["pr"].values.astype("float64")  # (D, R, h, w)
    per_year = np.stack([np.nanmax(pr[years == y], axis=0) for y in np.unique(years)])  # (Y, R, h, w)
    mask = ds["mask"].values.astype(bool)
    by_hand = per_year.mean(axis=0).mean(axis=0)[mask].mean()
    assert table["rx1day"]["samples_mean"] == pytest.approx(by_hand, rel=1e-9)
    real = ds["pr"].sel(time=aug["time"]).values.astype("float64")
    real_by_hand = np.stack([np.nanmax(real[years == y], axis=0) for y in np.unique(years)]).mean(axis=0)[mask].mean()
    assert table["rx1day"]["real_mean"] == pytest.approx(real_by_hand, rel=1e-9)
    assert table["rx1day"]["bias_mean"] == pytest.approx(by_hand - real_by_hand, rel=1e-9)
    assert 0 <= table["perkins_skill_score"]["samples_mean"] <= 1
    assert "Climate indices" in (tmp_path / "generation_report.md").read_text()


def test_calibrated_samples_are_the_raw_samples_mapped_and_fitted_on_val(prepared, trained, tmp_path):
    """generate.calibrate quantile_map: the same draws (same seed) mapped by a per-pixel monotone map fitted on
    the val days, which generate does not sample; generating every split leaves nothing to fit on."""
    _run(prepared, trained, tmp_path / "raw")
    _run(prepared, trained, tmp_path / "qm", calibrate="quantile_map")
    raw = xr.open_zarr(tmp_path / "raw" / "augmented.zarr")["pr"].values
    qm = xr.open_zarr(tmp_path / "qm" / "augmented.zarr")
    cal = qm["pr"].values
    assert "quantile_map" in qm.attrs["calibration"] and "val days" in qm.attrs["calibration"]
    np.testing.assert_array_equal(np.isnan(raw), np.isnan(cal))
    assert not np.allclose(np.nan_to_num(raw), np.nan_to_num(cal))
    r = raw.reshape(-1, *raw.shape[2:])
    c = cal.reshape(r.shape)
    for i, j in zip(*np.nonzero(np.isfinite(r[0]))):
        order = np.argsort(r[:, i, j], kind="stable")
        assert (np.diff(c[order, i, j]) >= -1e-5).all()
    with pytest.raises(InputError, match="needs a split that generate does not sample"):
        _run(prepared, trained, tmp_path / "all", calibrate="quantile_map", splits=("train", "val", "test"))


def test_generated_maps_show_the_heaviest_sampled_days_beside_their_samples(prepared, trained, tmp_path):
    from precip_cvae import plots

    _run(prepared, trained, tmp_path)
    aug = xr.open_zarr(tmp_path / "augmented.zarr")
    ds = xr.open_zarr(prepared["dataset"])
    mask = ds["mask"].values.astype(bool)
    real = ds["pr"].sel(time=aug["time"].values).values
    means = np.array([day[mask].mean() for day in real])
    order = np.argsort(-means)[:2]  # the two heaviest sampled days, by the real field's domain mean
    f = plots.generated_map_fields(str(tmp_path / "augmented.zarr"), prepared["dataset"], n_days=2, n_samples=2)
    assert f.dates == [str(t)[:10] for t in aug["time"].values[order].astype("datetime64[D]")]
    assert f.samples.shape == (2, 2, 16, 16) and f.truth.shape == (2, 16, 16)
    np.testing.assert_allclose(f.truth[:, mask], real[order][:, mask])
    np.testing.assert_allclose(f.samples[:, :, mask], aug["pr"].values[order][:, :2][:, :, mask].transpose(1, 0, 2))
    assert np.isnan(f.truth[:, ~mask]).all() and np.isnan(f.samples[..., ~mask]).all()
    png = plots.write_generated_maps(str(tmp_path / "augmented.zarr"), prepared["dataset"], str(tmp_path / "g.png"))
    assert png.stat().st_size > 10_000


def test_generating_from_the_store_equals_generating_in_memory(prepared, trained, tmp_path, monkeypatch):
    """Above GENERATE_MEMORY_BYTES the heavy days' conditions and fields are read from the store as needed and
    the memorisation reference a block of 7 fields at a time: the samples, the training set and the report are
    the same as with the data set in memory (calibration on: its val days are read too)."""
    from precip_cvae import neighbours

    held = _run(prepared, trained, tmp_path / "held", calibrate="quantile_map")
    monkeypatch.setattr(generate, "GENERATE_MEMORY_BYTES", 0)
    monkeypatch.setattr(neighbours, "B_BLOCK_BYTES", 7 * 16 * 16 * 8)
    streamed = _run(prepared, trained, tmp_path / "streamed", calibrate="quantile_map")
    timed = ("creation_time", "history", "generation_creation_time")  # the times of the two runs differ
    for name in ("augmented.zarr", "augmented_training_set.zarr"):
        a, b = (xr.open_zarr(tmp_path / run / name).load() for run in ("held", "streamed"))
        xr.testing.assert_equal(a, b)
        assert {k: v for k, v in a.attrs.items() if k not in timed} == {k: v for k, v in b.attrs.items()
                                                                        if k not in timed}
    strip = lambda r: {k: v for k, v in r.items() if k != "provenance"}  # noqa: E731
    assert json.dumps(strip(held), sort_keys=True, default=str) == json.dumps(strip(streamed), sort_keys=True,
                                                                             default=str)
    assert held["memorisation"]["reference_fields"] > 7


def test_the_memorisation_check_keeps_samples_within_its_byte_budget(prepared, trained, tmp_path, monkeypatch):
    """memorisation_max_samples counts fields; the fields kept are also bounded in bytes: with room for 7 fields of
    16 x 16 float32 (7 x 1024 bytes) the check compares 7 samples, and the report says how many."""
    from precip_cvae.generate import memorisation

    assert memorisation.samples_to_check(5000, 465 * 705) == 2**30 // (4 * 465 * 705) == 818
    assert memorisation.samples_to_check(10, 16 * 16) == 10 and memorisation.samples_to_check(5000, 10**10) == 1
    monkeypatch.setattr(memorisation, "MEMORISATION_SAMPLE_BYTES", 7 * 16 * 16 * 4)
    report = _run(prepared, trained, tmp_path)
    assert report["samples"] > 7 and report["memorisation"]["samples_checked"] == 7
    assert "7 samples against" in (tmp_path / "generation_report.md").read_text()
    full = _run(prepared, trained, tmp_path / "all", memorisation_max_samples=5)
    assert full["memorisation"]["samples_checked"] == 5
