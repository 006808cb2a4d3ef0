"""Cross-validation over years (preprocess.split.method kfold_years): folds, leakage, pooling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import make_field_da
from precip_cvae import io, metrics, preprocess
from precip_cvae.config import EvaluateConfig, EventsConfig, PreprocessConfig, SplitConfig
from precip_cvae.evaluate import pool, score
from precip_cvae.events import wet_day_thresholds
from precip_cvae.io import InputError
from precip_cvae.split import fold_blocks, fold_index, fold_name, fold_roles, season_years, split_labels


def _djf_days(first_winter: int, last_winter: int) -> pd.DatetimeIndex:
    """Every DJF day of the winters first..last (winter Y: Dec Y-1, Jan-Feb Y)."""
    days = pd.date_range(f"{first_winter - 1}-12-01", f"{last_winter}-02-28", freq="D")
    return days[days.month.isin([12, 1, 2])]


def test_folds_are_disjoint_cover_every_day_once_and_keep_djf_winters_whole():
    days = _djf_days(2001, 2010)  # ten winters
    cfg = SplitConfig(method="kfold_years", folds=5, season_year="djf")
    labels = np.array([split_labels(days, cfg, k) for k in range(5)])  # (fold, day)
    # every day is test in exactly one fold and val in exactly one fold
    assert ((labels == "test").sum(axis=0) == 1).all()
    assert ((labels == "val").sum(axis=0) == 1).all()
    assert ((labels == "train").sum(axis=0) == 3).all()
    # fold 0 holds out winters 2001 and 2002 (Dec 2000 .. Feb 2002), validates on 2003-2004
    test0 = days[labels[0] == "test"]
    assert test0.min() == pd.Timestamp("2000-12-01") and test0.max() == pd.Timestamp("2002-02-28")
    val0 = days[labels[0] == "val"]
    assert val0.min() == pd.Timestamp("2002-12-01") and val0.max() == pd.Timestamp("2004-02-29")
    # a winter is never cut: December goes with the next January and February
    winters = season_years(days, "djf")
    for k in range(5):
        for w in np.unique(winters):
            assert len(set(labels[k][winters == w])) == 1
    # the last fold validates on the first block (cyclic)
    assert set(season_years(days[labels[4] == "val"], "djf")) == {2001, 2002}


def test_fold_blocks_split_years_evenly_and_refuse_too_few_years():
    blocks = fold_blocks(np.array([2001] * 3 + [2002, 2003, 2004, 2005, 2006, 2007]), 3)
    assert [b.tolist() for b in blocks] == [[2001, 2002, 2003], [2004, 2005], [2006, 2007]]
    assert fold_roles(3, 2) == {"test": [2], "val": [0], "train": [1]}
    with pytest.raises(InputError, match="folds 5 needs at least 5 distinct"):
        fold_blocks(np.array([2001, 2002, 2003]), 5)
    with pytest.raises(InputError, match="needs a fold"):
        split_labels(_djf_days(2001, 2005), SplitConfig(method="kfold_years", folds=3))
    assert fold_index("iberia/fold3") == 3 and fold_index("iberia") is None and fold_name(2) == "fold2"


def _inputs(n_winters=6, seed=0):
    rng = np.random.default_rng(seed)
    days = _djf_days(2001, 2000 + n_winters)
    pr = rng.gamma(0.6, 5.0, size=(len(days), 6, 5)).astype("float32")
    pr[:, 0, 0] = np.nan
    target = make_field_da(pr, days, units="mm/day")
    z = make_field_da(rng.normal(5000, 50, size=(len(days), 3, 3)).astype("float32"), days, name="z500",
                      lat=[40.0, 41.5, 43.0], lon=[-5.0, -3.5, -2.0], units="m")
    return target, z


def test_held_out_days_change_no_statistic_of_their_fold():
    """Leakage: the values of fold k's test (and val) days reach none of its fitted statistics."""
    cfg = PreprocessConfig(split=SplitConfig(method="kfold_years", folds=3, season_year="djf"), grid_multiple=1,
                           chunk_time=64, min_overlap_days=10)
    target, z = _inputs()
    a = preprocess.build_dataset(target, [z], cfg, fold=1)
    held = np.flatnonzero(a["split"].values.astype(str) != "train")
    target2, z2 = target.copy(deep=True), z.copy(deep=True)
    target2.values[held] = target2.values[held] * 7.0 + 3.0  # other rain (the sea cell stays NaN)
    z2.values[held] = z2.values[held] + 400.0  # another circulation
    b = preprocess.build_dataset(target2, [z2], cfg, fold=1)
    assert a.attrs["fold_test_years"] == json.dumps([2003, 2004]) and a.attrs["fold"] == 1
    np.testing.assert_array_equal(a["split"].values, b["split"].values)
    np.testing.assert_array_equal(a["cond_mean"].values, b["cond_mean"].values)
    np.testing.assert_array_equal(a["cond_std"].values, b["cond_std"].values)
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values)
    assert a.attrs["target_transform_scale"] == b.attrs["target_transform_scale"]
    train = np.flatnonzero(a["split"].values.astype(str) == "train")
    ecfg = EventsConfig(min_wet_days=5)
    thr_a = wet_day_thresholds(a["pr"].isel(time=train), a["mask"], ecfg)
    thr_b = wet_day_thresholds(b["pr"].isel(time=train), b["mask"], ecfg)
    np.testing.assert_array_equal(thr_a.values, thr_b.values)
    # the train days' normalised condition is the same; a held-out day's differs (it was changed)
    np.testing.assert_array_equal(a["condition"].values[train], b["condition"].values[train])
    assert not np.allclose(a["condition"].values[held], b["condition"].values[held])


def _fold_cache(path, days, obs, ens, fold_sources=("cvae_best", "analogs")):
    meta = {"experiment": "default", "splits": ["test"], "sources": list(fold_sources), "members": ens.shape[0],
            "primary": fold_sources[0], "calendar": "standard", "checkpoints": {"best": {"epoch": 0}}}
    root = xr.Dataset({"mask": (("lat", "lon"), np.isfinite(obs[0]).astype("int8"))},
                      attrs={"evaluate_meta": json.dumps(meta)})
    io.write_zarr_group(root, path)
    times = np.asarray(days, dtype=str)
    io.write_zarr_group(xr.Dataset({"pr": (("time", "lat", "lon"), obs.astype("float32")),
                                    "is_event": ("time", (np.nanmean(obs, axis=(1, 2)) > 4).astype("int8"))},
                                   coords={"time": times}), path, "test/truth")
    for k, source in enumerate(fold_sources):
        io.write_zarr_group(xr.Dataset({"pr": (("member", "time", "lat", "lon"), (ens * (1 + 0.3 * k)).astype("float32"))},
                                       coords={"time": times}), path, f"test/{source}")
    io.consolidate_zarr(path)


def test_pooled_cache_holds_every_day_once_and_its_scores_combine_the_folds(tmp_path):
    rng = np.random.default_rng(3)
    days = [f"2001-01-{d:02d}" for d in range(1, 13)]
    obs = rng.gamma(0.7, 5.0, size=(12, 5, 4))
    obs[:, 0, 0] = np.nan
    ens = rng.gamma(0.7, 5.0, size=(4, 12, 5, 4))
    parts = [np.arange(0, 5), np.arange(5, 12)]  # fold 1 holds the later days; write fold order reversed in time
    caches = []
    for k, idx in enumerate(parts[::-1]):
        caches.append(tmp_path / f"fold{k}.zarr")
        _fold_cache(caches[-1], [days[i] for i in idx], obs[idx], ens[:, idx])
    out = pool.pool_ensembles([str(c) for c in caches], tmp_path / "pooled.zarr")
    truth = io.open_zarr_group(out, "test/truth")
    assert list(truth["time"].values.astype(str)) == days  # sorted, each day once
    assert truth["fold"].values.tolist() == [1] * 5 + [0] * 7
    np.testing.assert_allclose(truth["pr"].values, obs.astype("float32"))
    meta = json.loads(io.open_zarr_group(out).attrs["evaluate_meta"])
    assert meta["pooled"] and len(meta["folds"]) == 2
    # per-fold thresholds: fold 0's and fold 1's maps; each day scored with its own fold's
    thr = [{"p95": np.full((5, 4), 6.0), "p99": np.full((5, 4), 12.0)},
           {"p95": np.full((5, 4), 8.0), "p99": np.full((5, 4), 15.0)}]
    cfg = EvaluateConfig(members=4, fss_windows=(1, 3), splits=("test",), baselines=("analogs",))
    ev = score.score_cache(str(out), thr, cfg)
    pooled_crps = ev.value("cvae_best", "crps", "test")
    pooled_tw = ev.value("cvae_best", "twcrps_p99", "test")
    # the weighted combination of the folds' scores (weights: valid points), each with its thresholds
    e = ens.astype("float32").astype("float64")
    o = obs.astype("float32").astype("float64")
    total_crps = total_tw = count = 0.0
    for k, idx in enumerate(parts[::-1]):
        s, _ = score.score(e[:, idx], o[idx], thr[k], (1, 3))
        n = np.isfinite(o[idx]).sum()
        total_crps += s["crps"] * n
        total_tw += s["twcrps_p99"] * n
        count += n
    assert pooled_crps == pytest.approx(total_crps / count, rel=1e-9)
    assert pooled_tw == pytest.approx(total_tw / count, rel=1e-9)
    # frequency bias with per-day thresholds, by hand
    t = np.where(truth["fold"].values[:, None, None] == 0, 12.0, 15.0)
    v = np.isfinite(o)
    hand = (e > t)[:, v].mean(axis=0).sum() / (o > t)[v].sum()
    assert ev.value("cvae_best", "freq_bias_p99", "test") == pytest.approx(hand, rel=1e-9)
    assert metrics.frequency_bias(e, o, t, member_axis=0) == pytest.approx(hand, rel=1e-9)


def test_pooling_refuses_a_day_held_out_twice(tmp_path):
    rng = np.random.default_rng(0)
    obs = rng.gamma(0.7, 5.0, size=(3, 4, 4))
    ens = rng.gamma(0.7, 5.0, size=(2, 3, 4, 4))
    for k in range(2):
        _fold_cache(tmp_path / f"f{k}.zarr", ["2001-01-01", "2001-01-02", "2001-01-03"], obs, ens)
    with pytest.raises(InputError, match="held out by more than one fold"):
        pool.pool_ensembles([str(tmp_path / "f0.zarr"), str(tmp_path / "f1.zarr")], tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.workflow
def test_kfold_config_plans_one_branch_per_fold_and_one_pooled_evaluation(tmp_path):
    """Dry run: preprocess, events, train and sampling once per fold; the pool and evaluate once per experiment."""
    import yaml
    from conftest import copy_workflow, snakemake
    from test_workflow import planned_jobs

    work = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
    cfg["preprocess"]["split"] = {"method": "kfold_years", "folds": 3}
    cfg["downstream"]["enabled"] = False
    cfg["experiments"] = {"default": {}, "wide": {"model": {"base_filters": 8}}}
    (work / "kfold.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, "-n", "--configfile", "kfold.yaml"))
    assert jobs["preprocess"] == 3 and jobs["detect_events"] == 3
    assert jobs["train_cvae"] == 6 and jobs["sample_ensembles"] == 6
    assert jobs["pool_ensembles"] == 2 and jobs["evaluate"] == 2 and jobs["compare_experiments"] == 1
    assert jobs["generate"] == 2  # from fold 0's models
    text = snakemake(work, "-n", "--configfile", "kfold.yaml").stdout
    assert "results/tiny/fold2/experiments/wide/train/best.pt" in text
    assert "results/tiny/experiments/wide/evaluate/ensembles.zarr" in text
