"""Bad inputs, end to end: each gets a clear error naming the file, the variable and what was expected
(or is handled, with a log line), and nothing half-done is left behind.  The catalogue is docs/robustness.md."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from conftest import copy_workflow, make_field_da, snakemake, write_nc
from precip_cvae import checkpoint, events, generate, io, preprocess, train
from precip_cvae.evaluate import sample as sampling
from precip_cvae.config import (DataConfig, EventsConfig, GenerateConfig, LossConfig, MinSplitDays, ModelConfig,
                                PreprocessConfig, SplitConfig, TrainConfig, VariableSource)
from precip_cvae.data import load_fields
from precip_cvae.io import InputError
from precip_cvae.model import CVAE

TIMES = pd.date_range("2000-01-01", "2001-12-31", freq="D")
PRED_LAT, PRED_LON = [40.0, 41.5, 43.0], [-5.0, -3.5, -2.0]


def _target(values=None, times=TIMES, **kw) -> xr.DataArray:
    """(time, 6, 5) mm/day gamma rain on a 0.5-degree grid."""
    if values is None:
        values = np.random.default_rng(0).gamma(0.5, 4.0, size=(len(times), 6, 5)).astype("float32")
    return make_field_da(values, times, **kw)


def _predictor(times=TIMES, name="z500") -> xr.DataArray:
    values = np.random.default_rng(1).normal(5000, 50, size=(len(times), 3, 3)).astype("float32")
    return make_field_da(values, times, name=name, lat=PRED_LAT, lon=PRED_LON, units="m")


def _run(root: Path, target_glob="target/*.nc", pred_glob="pred/*.nc", pred_var="z500", **cfg):
    """preprocess.run on files under ``root``; writes root/dataset.zarr."""
    data = DataConfig(target=VariableSource(str(root / target_glob), "pr"),
                      predictors=(VariableSource(str(root / pred_glob), pred_var),))
    return preprocess.run(data, PreprocessConfig(**{"grid_multiple": 1, **cfg}), str(root / "dataset.zarr"))


def _case(tmp_path: Path, target: xr.DataArray | None = None, predictor: xr.DataArray | None = None) -> Path:
    write_nc(_target() if target is None else target, tmp_path / "target" / "pr.nc")
    write_nc(_predictor() if predictor is None else predictor, tmp_path / "pred" / "z500.nc")
    return tmp_path


def _refused(root: Path, *patterns: str, **kw) -> str:
    """Run preprocess, expect an InputError matching every pattern, and no dataset written."""
    with pytest.raises(InputError) as err:
        _run(root, **kw)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), f"{pattern!r} not in: {err.value}"
    assert not (root / "dataset.zarr").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    return str(err.value)


# ----------------------------------------------------------------------------- files and variables


def test_empty_glob_names_the_pattern_and_the_variable(tmp_path):
    root = _case(tmp_path)
    _refused(root, r"variable 'z500': no file matches '.*/nothing/\*\.nc'", pred_glob="nothing/*.nc")


def test_missing_predictor_variable_lists_what_is_there(tmp_path):
    root = _case(tmp_path)
    _refused(root, re.escape(str(root / "pred" / "z500.nc")), r"variable 'z700' not found; the files hold \['z500'\]",
             pred_var="z700")


def test_target_without_units_names_file_variable_and_the_config_key(tmp_path):
    root = _case(tmp_path, target=_target(units=None))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"variable 'pr' has no 'units' attribute",
             r"set data\.\*\.units")


@pytest.mark.parametrize("fmt, keep, expected", [
    ("NETCDF4", 0.5, r"cannot be read as NetCDF \(OSError"),
    ("NETCDF3_64BIT", 0.5, r"truncated NetCDF file \(\d+ bytes; its header describes \d+\); expected a complete file"),
    ("NETCDF3_64BIT", 0.001, r"cannot be read as NetCDF \(the NetCDF-3 header ends early"),
])
def test_truncated_netcdf_is_named(tmp_path, fmt, keep, expected):
    """A truncated NetCDF-4 file fails to open; a truncated NetCDF-3 file opens and reads its lost tail as
    zeros, so its header is checked against the file size."""
    root = _case(tmp_path)
    path = root / "target" / "pr.nc"
    write_nc(_target(), path, format=fmt)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    _refused(root, re.escape(str(path)) + ": " + expected)


# ----------------------------------------------------------------------------- values


def test_negative_precipitation_names_file_variable_and_tolerance(tmp_path):
    values = _target().values
    values[100, 2, 2] = -0.004  # within the tolerance: set to 0
    values[200, 3, 3] = -2.5
    root = _case(tmp_path / "bad", target=_target(values))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"target 'pr'",
             r"1 negative precipitation values \(minimum -2\.5 mm/day\); expected >= -0\.01")
    values[200, 3, 3] = 0.0
    ds = _run(_case(tmp_path / "ok", target=_target(values)))
    assert float(ds["pr"].isel(time=100, lat=2, lon=2)) == 0.0


def test_sporadic_nan_is_refused_or_kept_as_missing(tmp_path):
    values = _target().values
    values[:, 0, 0] = np.nan  # a fixed mask (sea): fine under both policies
    values[50, 4, 1] = np.nan  # sporadic
    root = _case(tmp_path, target=_target(values))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"target 'pr'",
             r"1 missing values in cells that are not part of the fixed mask; expected none",
             missing_policy="refuse")
    ds = _run(root, missing_policy="mask")
    assert ds.attrs["n_sporadic_missing"] == 1
    assert int(ds["mask"][4, 1]) == 1 and int(ds["mask"][0, 0]) == 0
    back = xr.open_zarr(root / "dataset.zarr")
    assert np.isnan(back["pr"].values[50, 4, 1]) and np.isfinite(back["pr"].values[51, 4, 1])


# ----------------------------------------------------------------------------- time axes


def test_duplicate_time_stamps_within_a_file_and_across_files(tmp_path):
    da = _target()
    root = _case(tmp_path / "one", target=xr.concat([da.isel(time=slice(0, 400)), da.isel(time=slice(390, None))],
                                                    "time"))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"target 'pr': duplicate time stamps, e\.g\. "
             r"\['2001-01-25 00:00:00'", "expected unique days")
    root = _case(tmp_path / "two")
    (root / "target" / "pr.nc").unlink()
    write_nc(da.sel(time=slice("2000-01-01", "2000-12-31")), root / "target" / "pr_a.nc")
    write_nc(da.sel(time=slice("2000-12-01", "2001-12-31")), root / "target" / "pr_b.nc")
    _refused(root, re.escape(str(root / "target" / "pr_b.nc")) + r": time stamps 2000-12-01 00:00:00 \.\. ",
             re.escape(f"overlap those of {root / 'target' / 'pr_a.nc'}"), "expected each time stamp in one file")


def test_unsorted_time_is_sorted_with_a_log_line(tmp_path, caplog):
    da = _target()
    order = np.random.default_rng(2).permutation(len(TIMES))
    root = _case(tmp_path, target=da.isel(time=order))
    with caplog.at_level(logging.WARNING, logger="precip_cvae.preprocess"):
        _run(root)
    assert re.search(re.escape(str(root / "target" / "pr.nc")) + r": target 'pr': time is not sorted; sorting 731",
                     caplog.text)
    back = xr.open_zarr(root / "dataset.zarr")
    assert back.indexes["time"].equals(TIMES)
    np.testing.assert_allclose(back["pr"].values, da.values, rtol=1e-6)


def test_time_axes_that_do_not_overlap_name_both_files(tmp_path):
    root = _case(tmp_path, predictor=_predictor(times=pd.date_range("2005-01-01", periods=100)))
    _refused(root, r"share 0 time stamps; expected at least 30 \(preprocess\.min_overlap_days\)",
             re.escape(f"pr in {root / 'target' / 'pr.nc'}: 2000-01-01"),
             re.escape(f"z500 in {root / 'pred' / 'z500.nc'}: 2005-01-01"))


def test_overlap_too_short_for_the_split_names_the_data_and_the_split(tmp_path):
    """Enough common days for min_overlap_days, but the year split finds no train or test year in them."""
    root = _case(tmp_path, predictor=_predictor(times=pd.date_range("2001-12-01", periods=40)))
    split = SplitConfig(method="years", train_years=(2000,), val_years=(2001,), test_years=(2002,))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"time stamps shared with the predictors",
             re.escape("leaves no days in ['train', 'test'] (counts {'train': 0, 'val': 31, 'test': 0})"),
             r"check preprocess\.split", min_overlap_days=20, split=split)


# ----------------------------------------------------------------------------- coordinates


def test_files_on_different_grids_are_refused(tmp_path):
    """Combined, they would become a union grid half full of NaN (silently, before this check)."""
    root = _case(tmp_path)
    (root / "target" / "pr.nc").unlink()
    da = _target()
    write_nc(da.sel(time="2000"), root / "target" / "pr_2000.nc")
    write_nc(da.sel(time="2001").assign_coords(lat=da["lat"] + 10.0), root / "target" / "pr_2001.nc")
    _refused(root, re.escape(str(root / "target" / "pr_2001.nc")) + r": coordinate 'lat' \(6 values 50\.0\.\.52\.5\)",
             re.escape(f"differs from {root / 'target' / 'pr_2000.nc'} (6 values 40.0..42.5)"),
             "expected every file matching .* on one grid")


def test_non_monotonic_coordinate_names_file_and_axis(tmp_path):
    root = _case(tmp_path, target=_target(lat=np.array([40.0, 40.5, 41.5, 41.0, 42.0, 42.5])))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"target 'pr': coordinate 'lat' is not monotonic; "
             r"expected a sorted grid axis")


def test_descending_latitude_is_flipped(tmp_path):
    da = _target()
    root = _case(tmp_path, target=da.isel(lat=slice(None, None, -1)))
    _run(root)
    back = xr.open_zarr(root / "dataset.zarr")
    assert np.all(np.diff(back["lat"].values) > 0)
    np.testing.assert_allclose(back["pr"].values, da.values, rtol=1e-6)


# ----------------------------------------------------------------------------- config at dry run


def test_wrong_type_and_unknown_preset_are_rejected_at_dry_run(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    tiny = (work / "config" / "tiny.yaml").read_text()
    cases = {
        "wrong_type.yaml": (tiny.replace("  epochs: 2 ", "  epochs: two "), ["'two' is not of type 'integer'",
                                                                            "['train']['epochs']"]),
        "preset.yaml": (tiny.replace("preset: tiny", "preset: huge"), ["'huge' is not one of ['tiny', 'small', "
                                                                      "'medium', 'seed']", "['model']['preset']"]),
    }
    for name, (text, expected) in cases.items():
        assert text != tiny
        (work / "config" / name).write_text(text)
        proc = snakemake(work, "-n", "--configfile", f"config/{name}", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Error validating config file" in out
        for piece in expected:
            assert piece in out, out[-2000:]
    assert not (work / "results").exists() and not (work / "data").exists()


# ----------------------------------------------------------------------------- training


def test_grid_too_small_for_the_model_depth_names_dataset_grid_and_fix(tmp_path):
    root = _case(tmp_path)
    _run(root)  # 6 x 5, not padded (grid_multiple 1)
    events.run(str(root / "dataset.zarr"), EventsConfig(), str(root / "thr.nc"), str(root / "events.csv"))
    paths = train.TrainPaths.in_dir(str(root / "dataset.zarr"), str(root / "thr.nc"), str(root / "events.csv"),
                             str(root / "train"), str(root / "resume"))
    with pytest.raises(InputError) as err:
        train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, num_threads=1))
    msg = str(err.value)
    assert msg.startswith(f"{root / 'dataset.zarr'}: fine grid shape (6, 5) is not usable with model depth 2")
    assert "multiples of 2**depth = 4" in msg and "preprocess.grid_multiple: 4, or lower model.depth" in msg
    assert not paths.best.exists() and not paths.last.exists()


def test_a_dataset_without_val_days_is_refused_by_training(prepared, tmp_path):
    ds = xr.open_zarr(prepared["dataset"]).load()
    split = ds["split"].values.astype(str)
    ds["split"] = ("time", np.where(split == "val", "train", split))
    io.write_zarr(ds, tmp_path / "no_val.zarr")
    paths = train.TrainPaths.in_dir(str(tmp_path / "no_val.zarr"), prepared["thresholds"], prepared["events"],
                             str(tmp_path / "train"), str(tmp_path / "resume"))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'no_val.zarr'}: the data set has no 'val' days; "
                                                   "expected train and val days (preprocess.split)")):
        train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, num_threads=1))


def test_no_heavy_day_in_train_is_refused_by_default_naming_criterion_threshold_and_closest_day(prepared, tmp_path):
    """events.require_train_events (default true): an error naming the criterion, its threshold and the
    train day that came closest (computed here from the stage's own daily statistics); nothing written."""
    thr, table = tmp_path / "thr.nc", tmp_path / "events.csv"
    ds = xr.open_zarr(prepared["dataset"])
    train_days = ds["split"].values.astype(str) == "train"
    ref = xr.open_dataset(prepared["thresholds"])["threshold"]
    stats = events.daily_statistics(ds["pr"], ref, ds["mask"])
    best = int(np.argmax(np.where(train_days, stats["exceed_fraction"].values, -1.0)))
    day = str(ds.indexes["time"][best])[:10]
    with pytest.raises(InputError) as err:
        events.run(prepared["dataset"], EventsConfig(min_exceed_fraction=1.0), str(thr), str(table))
    msg = str(err.value)
    assert msg.startswith(f"{prepared['dataset']}: no heavy day in the train split: criterion 'exceedance': ")
    assert ">= 100.0% of the valid pixels above their local P99 of wet days (events.min_exceed_fraction)" in msg
    assert f"the closest train day, {day}, has {stats['exceed_fraction'].values[best]:.1%}" in msg
    assert "events.require_train_events: false" in msg
    assert not thr.exists() and not table.exists()


def test_no_heavy_day_in_train_warns_trains_and_generation_refuses(prepared, tmp_path, caplog):
    """events.require_train_events false: a warning; training: runs (plain MAE, no oversampling), with a
    warning naming the table; generate (splits: train): an error naming the table and the splits."""
    thr, table = str(tmp_path / "thr.nc"), str(tmp_path / "events.csv")
    with caplog.at_level(logging.WARNING):
        events.run(prepared["dataset"], EventsConfig(min_exceed_fraction=1.0, require_train_events=False), thr, table)
        assert f"{prepared['dataset']}: no heavy day in the train split: criterion 'exceedance'" in caplog.text
        paths = train.TrainPaths.in_dir(prepared["dataset"], thr, table, str(tmp_path / "train"), str(tmp_path / "resume"))
        history = train.run(paths, ModelConfig(preset="tiny"),
                            TrainConfig(epochs=1, num_threads=1, val_members=2, loss=LossConfig(warmup_epochs=0)))
    assert f"{table}: no heavy-event day in the train split" in caplog.text
    assert [r["epoch"] for r in history] == [0] and np.isfinite(history[0]["train_loss"])
    with pytest.raises(InputError, match=re.escape(f"{table}: no heavy-event day in splits ['train']; nothing to "
                                                   "generate from (check events.criterion or generate.splits)")):
        generate.run(generate.GeneratePaths.in_dir(tmp_path / "generate", str(paths.best), prepared["dataset"],
                                                   thr, table), GenerateConfig(members=2), EventsConfig())
    assert not (tmp_path / "generate" / "augmented.zarr").exists()


def test_resume_state_of_another_config_is_not_used(prepared, tmp_path, caplog):
    paths = train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], prepared["events"], str(tmp_path / "train"),
                             str(tmp_path / "resume"))
    checkpoint.save({"model_state": {}, "config_hash": "0123456789abcdef", "epoch": 7}, paths.resume)
    with caplog.at_level(logging.INFO, logger="precip_cvae.train"):
        history = train.run(paths, ModelConfig(preset="tiny"),
                            TrainConfig(epochs=1, num_threads=1, val_members=2, loss=LossConfig(warmup_epochs=0)))
    assert re.search(re.escape(f"resume state {paths.resume} is from another config (hash 0123456789abcdef, now ")
                     + r"[0-9a-f]+\): starting afresh", caplog.text)
    assert [r["epoch"] for r in history] == [0]
    assert checkpoint.load(paths.last)["epoch"] == 0


# ----------------------------------------------------------------------------- checkpoints


def _foreign_checkpoint(path: Path, channels: list[str], fine: tuple[int, int]) -> Path:
    """A valid checkpoint of a tiny model trained (notionally) on other data."""
    cfg = ModelConfig(preset="tiny")
    model = CVAE(cfg, len(channels), fine, (4, 4))
    return checkpoint.save({
        "model_config": dataclasses.asdict(cfg), "model_state": model.state_dict(), "epoch": 0,
        "model_args": {"n_channels": len(channels), "fine_shape": list(fine), "coarse_shape": [4, 4]},
        "data": {"channels": channels, "transform": {"target_transform": "log1p", "target_transform_scale": 1.0}},
    }, path)


def test_checkpoint_of_other_data_is_refused_by_generate_and_evaluate(prepared, tmp_path):
    other = _foreign_checkpoint(tmp_path / "other.pt", ["z500"], (16, 16))
    expected = re.escape(f"{other}: trained on condition channels ['z500'], the data has "
                         "['psl', 'hus850', 'pr_block4']")
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        generate.run(generate.GeneratePaths.in_dir(tmp_path / "generate", str(other), prepared["dataset"],
                                                   prepared["thresholds"], prepared["events"]),
                     GenerateConfig(members=2), EventsConfig())
    data = load_fields(prepared["dataset"], prepared["thresholds"], prepared["events"])
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        sampling._load_checkpoint(str(other), data, "cpu")
    bigger = _foreign_checkpoint(tmp_path / "bigger.pt", ["psl", "hus850", "pr_block4"], (32, 32))
    with pytest.raises(checkpoint.CheckpointError,
                       match=re.escape(f"{bigger}: trained on a (32, 32) grid, the data has (16, 16)")):
        sampling._load_checkpoint(str(bigger), data, "cpu")


def test_checkpoint_of_another_package_version_loads_with_a_log_line_another_format_is_refused(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save({"model_state": {}, "format": checkpoint.CHECKPOINT_FORMAT, "package_version": "0.0.1"}, path)
    with caplog.at_level(logging.WARNING, logger="precip_cvae.checkpoint"):
        assert checkpoint.load(path)["package_version"] == "0.0.1"
    assert f"{path} was written by precip-cvae 0.0.1; this is" in caplog.text
    torch.save({"model_state": {}, "format": checkpoint.CHECKPOINT_FORMAT + 1, "package_version": "9.0"}, path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=re.escape(f"{path}: checkpoint format {checkpoint.CHECKPOINT_FORMAT + 1} (package 9.0) is "
                                       f"not this package's format {checkpoint.CHECKPOINT_FORMAT}") + r".*retrain"):
        checkpoint.load(path)


def test_truncated_or_pickled_checkpoints_are_refused_by_name(tmp_path):
    good = checkpoint.save({"model_state": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "good.pt")
    raw = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{cut}: unreadable or truncated checkpoint")):
        checkpoint.load(cut)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "format": checkpoint.CHECKPOINT_FORMAT, "x": Payload()}, evil)
    refused = re.escape(f"{evil}: refused to load") + r".*weights_only=True"
    with pytest.raises(checkpoint.CheckpointError, match=refused):
        checkpoint.load(evil)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- runs side by side


@pytest.mark.workflow
def test_two_runs_side_by_side_share_nothing_writable(tiny_run):
    """Two more runs (other ``run`` names and demo directories) started at once in the finished tiny run's
    work directory: both finish (Snakemake's lock allows processes with disjoint outputs), and no file of the
    tiny run is touched, added or removed; the tiny run stays up to date."""

    def files(*tops):
        return {str(p.relative_to(tiny_run)): (p.stat().st_mtime_ns, p.stat().st_size)
                for top in tops for p in (tiny_run / top).rglob("*") if p.is_file()}

    before = files("results/tiny", "data/tiny")
    text = (tiny_run / "config" / "tiny.yaml").read_text()
    procs = []
    for name in ("side_a", "side_b"):
        changed = text.replace("run: tiny", f"run: {name}").replace("data/tiny", f"data/{name}")
        (tiny_run / "config" / f"{name}.yaml").write_text(changed)
        cmd = [sys.executable, "-m", "snakemake", "--cores", "1", f"results/{name}/preprocess/dataset.zarr",
               "--configfile", f"config/{name}.yaml"]
        procs.append(subprocess.Popen(cmd, cwd=tiny_run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    for name in ("side_a", "side_b"):
        assert xr.open_zarr(tiny_run / "results" / name / "preprocess" / "dataset.zarr").sizes["lat"] == 32
        assert (tiny_run / "data" / name / "target").is_dir()
    assert files("results/tiny", "data/tiny") == before
    # by file times the tiny run is still complete (code edits made meanwhile would trigger reruns by provenance)
    proc = snakemake(tiny_run, "-n", "--rerun-triggers", "mtime", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- issue 18: never silent

# 731 days split 0.7/0.15/0.15: train 0..511 (to 2001-05-26), val 512..620, test 621..730
MISSING_DATES = ["2000-03-01", "2000-03-02", "2001-06-01"]  # two train days, one val day


def _gappy_predictor() -> xr.DataArray:
    z = _predictor()
    z.loc[{"time": MISSING_DATES}] = np.nan
    return z


def test_file_without_a_time_coordinate_says_so(tmp_path):
    """An HDF5 radar composite with no time at all (it was 'cannot be combined along time')."""
    root = _case(tmp_path)
    (root / "target" / "pr.nc").unlink()
    for k in range(2):
        field = xr.DataArray(np.ones((6, 5), "float32"), dims=("y", "x"),
                             coords={"y": np.arange(6.0), "x": np.arange(5.0)}, name="pr", attrs={"units": "mm/h"})
        write_nc(field, root / "target" / f"scan_{k}.nc", format="NETCDF4")  # HDF5-based
    _refused(root, re.escape(f"{root / 'target' / 'scan_0.nc'}: no time coordinate; expected a CF time variable "
                             "(standard_name time or axis T)"))


def test_a_predictor_missing_on_some_days_is_refused_by_default(tmp_path):
    root = _case(tmp_path, predictor=_gappy_predictor())
    _refused(root, re.escape(f"{root / 'pred' / 'z500.nc'}: predictor 'z500' is missing on 3 day(s) (more than 0% "
                             f"of its cells NaN), first {MISSING_DATES}"),
             r"preprocess\.predictor_missing_policy: refuse; 'drop_days' .* 'fill_climatology'")


def test_predictor_missing_days_dropped_are_counted_per_split(tmp_path, caplog):
    root = _case(tmp_path, predictor=_gappy_predictor())
    with caplog.at_level(logging.INFO):
        ds = _run(root, predictor_missing_policy="drop_days")
    assert (ds.attrs["n_train"], ds.attrs["n_val"], ds.attrs["n_test"]) == (512 - 2, 109 - 1, 110)
    assert [ds.attrs[f"n_predictor_missing_days_{s}"] for s in ("train", "val", "test")] == [2, 1, 0]
    back = xr.open_zarr(root / "dataset.zarr")
    assert back.attrs["n_predictor_missing_days_train"] == 2 and back.attrs["predictor_missing_policy"] == "drop_days"
    assert not back.indexes["time"].isin(pd.to_datetime(MISSING_DATES)).any()
    assert back.sizes["time"] == 731 - 3
    assert "predictor_missing_policy drop_days: 3 days left out (train 2, val 1, test 0)" in caplog.text
    assert "first ['2000-03-01', '2000-03-02', '2001-06-01']" in caplog.text


def test_predictor_missing_days_filled_with_the_train_mean_are_counted(tmp_path, caplog):
    root = _case(tmp_path, predictor=_gappy_predictor())
    with caplog.at_level(logging.WARNING):
        ds = _run(root, predictor_missing_policy="fill_climatology")
    assert "predictor 'z500' is missing on 3 days (train 2, val 1, test 0)" in caplog.text
    assert "filled with the train mean (fill_climatology)" in caplog.text
    assert ds.sizes["time"] == 731 and ds.attrs["n_predictor_missing_days_val"] == 1
    cond = ds["condition"].sel(channel="z500")
    assert (cond.sel(time=MISSING_DATES).values == 0).all()  # 0 = the train mean after normalisation
    # the train mean and std skip the missing days: by hand from the file's values
    z = _gappy_predictor().values[:512]
    assert float(ds["cond_mean"].sel(channel="z500")) == pytest.approx(np.nanmean(z), rel=1e-6)
    assert float(ds["cond_std"].sel(channel="z500")) == pytest.approx(np.nanstd(z), rel=1e-4)
    assert json_loads(ds.attrs["n_condition_filled"]) == {"z500": 3 * 9}


def test_a_few_missing_predictor_cells_follow_the_threshold(tmp_path, caplog):
    """One cell of nine missing on one day: a missing day under the default threshold (0), a filled
    cell under predictor_missing_cells 0.2 (counted in the log and the attributes)."""
    z = _predictor()
    z[10, 1, 2] = np.nan  # 2000-01-11, a train day
    root = _case(tmp_path, predictor=z)
    _refused(root, r"missing on 1 day\(s\) \(more than 0% of its cells NaN\), first \['2000-01-11'\]")
    with caplog.at_level(logging.WARNING):
        ds = _run(root, predictor_missing_cells=0.2)
    assert "predictor 'z500' has 1 missing cells on days with at most 20% of its cells missing" in caplog.text
    assert ds.attrs["n_predictor_partial_cells"] == 1 and ds.attrs["n_predictor_missing_days_train"] == 0
    cond = ds["condition"].sel(channel="z500").values
    assert cond[10, 1, 2] == 0.0
    zv = z.values
    mean, std = np.nanmean(zv[:512]), np.nanstd(zv[:512])
    np.testing.assert_allclose(cond[10, 0, 0], (zv[10, 0, 0] - mean) / std, rtol=1e-4)


def json_loads(text):
    import json

    return json.loads(text)


def test_splits_too_short_to_learn_from_are_refused(tmp_path):
    """30 days pass min_overlap_days (30) and split 21/5/4: each split is checked against min_split_days."""
    days = pd.date_range("2000-01-01", periods=30)
    root = _case(tmp_path, target=_target(times=days), predictor=_predictor(times=days))
    counts = "(counts {'train': 21, 'val': 5, 'test': 4}"
    _refused(root, re.escape(f"{root / 'target' / 'pr.nc'}: target 'pr' (time stamps shared with the predictors): "
                             "split 'train' holds 21 time steps; expected at least 30 "
                             "(preprocess.min_split_days.train)"),
             re.escape(counts), r"data span 2000-01-01 00:00:00 \.\. 2000-01-30")
    _refused(root, re.escape("split 'val' holds 5 time steps; expected at least 10 (preprocess.min_split_days.val)"),
             min_split_days=MinSplitDays(train=20))
    _refused(root, re.escape("split 'test' holds 4 time steps; expected at least 5 (preprocess.min_split_days.test)"),
             min_split_days=MinSplitDays(train=20, val=5, test=5))
    ds = _run(root, min_split_days=MinSplitDays(train=21, val=5, test=4))
    assert (ds.attrs["n_train"], ds.attrs["n_val"], ds.attrs["n_test"]) == (21, 5, 4)


def _six_hourly(days, calendar: str | None = None) -> xr.DataArray:
    """z500 every 6 h from the first day 00 UTC to the day after the last, 00 UTC; the value at step k
    is 5000 + k + 0.1 * (cell number), so the mean over any interval is known by hand."""
    n = 4 * len(days) + 1
    if calendar is None:
        times = pd.date_range(days[0], periods=n, freq="6h")
    else:
        times = xr.date_range(str(days[0])[:10], periods=n, freq="6h", calendar=calendar, use_cftime=True)
    k = np.arange(n, dtype="float32")[:, None, None]
    values = 5000.0 + k + 0.1 * np.arange(9, dtype="float32").reshape(1, 3, 3)
    return make_field_da(values.astype("float32"), times, name="z500", lat=PRED_LAT, lon=PRED_LON, units="m")


def _raw_condition(ds: xr.Dataset, channel: str) -> np.ndarray:
    c = ds["condition"].sel(channel=channel)
    return (c * ds["cond_std"].sel(channel=channel) + ds["cond_mean"].sel(channel=channel)).values


def test_finer_predictors_are_refused_without_an_aggregation(tmp_path):
    days = pd.date_range("2000-01-01", periods=100)
    root = _case(tmp_path, target=_target(times=days), predictor=_six_hourly(days))
    _refused(root, re.escape(f"{root / 'pred' / 'z500.nc'}: predictor 'z500' has a time step of 6 h but the target "
                             f"({root / 'target' / 'pr.nc'}) has 1 day; matching their time stamps would keep 1 in 4 "
                             "predictor fields"),
             r"Set preprocess\.predictor_aggregation \(mean, min, max or sum", r"preprocess\.aggregation_offset",
             r"preprocess\.time_step")


@pytest.mark.parametrize("how, offset, expect", [
    ("mean", "6h", 2.5),   # day d: steps 4d+1 .. 4d+4 (06, 12, 18 UTC and 00 UTC of the next day)
    ("mean", "0h", 1.5),   # steps 4d .. 4d+3
    ("max", "6h", 4.0),
    ("min", "0h", 0.0),
])
@pytest.mark.parametrize("calendar", [None, "360_day"])
def test_six_hourly_predictors_are_aggregated_over_each_target_day(tmp_path, how, offset, expect, calendar):
    if calendar is None:
        days = pd.date_range("2000-01-01", periods=100)
    else:
        days = xr.date_range("2000-01-01", periods=100, freq="D", calendar=calendar, use_cftime=True)
    root = _case(tmp_path, target=_target(times=days), predictor=_six_hourly(days, calendar))
    ds = _run(root, predictor_aggregation=how, aggregation_offset=offset)
    # complete intervals only: with offset 0 the step at the day after the last is left over, with 6h it completes it
    assert ds.sizes["time"] == 100
    d = np.arange(100, dtype=float)[:, None, None]
    cells = 0.1 * np.arange(9).reshape(1, 3, 3)
    np.testing.assert_allclose(_raw_condition(ds, "z500"), 5000.0 + 4 * d + expect + cells, rtol=1e-6)


def test_an_incomplete_predictor_interval_drops_that_day(tmp_path, caplog):
    days = pd.date_range("2000-01-01", periods=100)
    z = _six_hourly(days)
    z = z.isel(time=[i for i in range(z.sizes["time"]) if i != 4 * 50 + 2])  # 2000-02-20 12 UTC is missing
    root = _case(tmp_path, target=_target(times=days), predictor=z)
    with caplog.at_level(logging.INFO):
        ds = _run(root, predictor_aggregation="mean", aggregation_offset="6h")
    assert ds.sizes["time"] == 99 and np.datetime64("2000-02-20") not in ds["time"].values
    assert "1 incomplete 1 day intervals" in caplog.text


@pytest.mark.parametrize("units, scale", [("mm", 1.0), ("mm/h", 1.0), ("kg m-2 s-1", 1.0 / 3600.0)])
def test_hourly_rain_is_summed_to_a_daily_step(tmp_path, units, scale):
    """Hourly rain summed to days (preprocess.time_step 1D, offset 6h: days run 06-06 UTC), given as
    amounts per hour (mm), as rates (mm/h), or as SI rates: the daily total in mm/day either way."""
    hours = pd.date_range("2000-01-01", periods=24 * 102, freq="h")
    rng = np.random.default_rng(3)
    mm_per_hour = (rng.gamma(0.3, 1.0, size=(len(hours), 6, 5)) * (rng.random((len(hours), 1, 1)) < 0.3)).astype(
        "float32")
    root = _case(tmp_path, target=_target(values=mm_per_hour * np.float32(scale), times=hours, units=units),
                 predictor=_predictor(times=pd.date_range("2000-01-01", periods=102)))
    ds = _run(root, time_step="1D", aggregation_offset="6h")
    # day d runs from 06 UTC of day d to 06 UTC of day d + 1; the first 6 hours and the last 18 are left over
    assert ds.sizes["time"] == 101
    assert ds.indexes["time"][0] == pd.Timestamp("2000-01-01") and ds.indexes["time"][-1] == pd.Timestamp("2000-04-10")
    expect = mm_per_hour[6:6 + 24 * 101].reshape(101, 24, 6, 5).sum(axis=1)
    np.testing.assert_allclose(ds["pr"].values, expect, rtol=1e-5, atol=1e-5)
    assert ds["pr"].attrs["units"] == "mm day-1" and ds["pr"].attrs["aggregated_from_step_seconds"] == 3600.0


def test_aggregation_stays_lazy(tmp_path):
    days = pd.date_range("2000-01-01", periods=40)
    z = _six_hourly(days).chunk({"time": 16})
    out = preprocess.aggregate_intervals(z, pd.DatetimeIndex(days), 86400.0, 6 * 3600.0, "mean", 8, "z500")
    import dask.array as dsa

    assert isinstance(out.data, dsa.Array)
    np.testing.assert_allclose(out.values[:, 0, 0], 5000.0 + 4 * np.arange(40) + 2.5)  # computed only here


# ----------------------------------------------------------------------------- values no rain can take, coverage


def test_a_fill_value_written_as_rain_is_refused_with_file_count_and_first_date(tmp_path):
    """1e20 over three cells of one day, in a file without a _FillValue for it: refused, not a mean of 4e19."""
    values = _target().values.copy()
    values[5, :1, :3] = 1e20
    root = _case(tmp_path, target=_target(values))
    _refused(root, re.escape(str(root / "target" / "pr.nc")), r"target 'pr'", r"3 values above 2000 mm/day",
             r"first on 2000-01-06", r"max_rain_mm_day = 2000", r"_FillValue")


def test_the_rain_limit_scales_with_the_time_step_by_the_world_record_envelope():
    """2000 mm in a day; a 10-minute step may reach 2000 * 144**0.525 = 27,180 mm/day as a rate; a 5-day step
    2000 * 5**-0.525 = 859 mm/day (by hand: 144**0.525 = exp(0.525 ln 144) = 13.59)."""
    assert preprocess.max_rate_mm_day(2000.0, 86400.0) == pytest.approx(2000.0)
    assert preprocess.max_rate_mm_day(2000.0, 600.0) == pytest.approx(2000.0 * np.exp(0.525 * np.log(144.0)))
    assert preprocess.max_rate_mm_day(2000.0, 600.0) == pytest.approx(27180, rel=1e-3)
    assert preprocess.max_rate_mm_day(2000.0, 5 * 86400.0) == pytest.approx(859.2, rel=1e-3)


def test_heavy_but_possible_rain_passes(tmp_path):
    values = _target().values.copy()
    values[5, 0, 0] = 1500.0  # a record-class day, not impossible
    ds = _run(_case(tmp_path, target=_target(values)))
    assert float(ds["pr"].max()) == pytest.approx(1500.0)


@pytest.mark.parametrize("units, bad, expected", [
    ("m", 1e20, r"outside -1e\+15 to 1e\+15, the range of any quantity"),
    ("K", 5.0, r"outside 150 to 350, the range of a temperature"),  # degC labelled K
    ("Pa", -3.0, r"outside 0 to 120000, the range of a pressure"),
])
def test_a_predictor_value_no_such_quantity_can_take_is_refused(tmp_path, units, bad, expected):
    pred = _predictor()
    base = {"m": 5000.0, "K": 275.0, "Pa": 101000.0}[units]
    values = np.full(pred.shape, base, "float32")
    values[3, 1, 1] = bad
    pred = make_field_da(values, TIMES, name="z500", lat=PRED_LAT, lon=PRED_LON, units=units)
    root = _case(tmp_path, predictor=pred)
    _refused(root, re.escape(str(root / "pred" / "z500.nc")), r"predictor 'z500'", r"holds 1 values", expected,
             r"first on 2000-01-04")


def test_predictors_that_cover_part_of_the_target_are_refused_naming_both_extents(tmp_path):
    """The predictor's cells reach lat 39.25 to 43.75; a target from 38 to 40.5 sticks out to the south."""
    target = _target(lat=np.linspace(38.0, 40.5, 6))
    root = _case(tmp_path, target=target)
    _refused(root, re.escape(str(root / "pred" / "z500.nc")), r"predictor 'z500' covers lat 40 to 43",
             r"reach 39.25 to 43.75", r"target's cells span 38 to 40.5", r"preprocess.region")


def test_real_predictors_cut_short_of_the_iberian_target_are_refused(iberia, tmp_path):
    """E-OBS Iberia (9.75W-4.25E) against the NCEP 2.5-degree predictors cut to 5W and east: refused, with the
    longitudes named; the files as they are pass the same check."""
    ncep = xr.open_dataset(iberia / "ncep_predictors_iberia_2.5deg_djf_1983-2002.nc")
    write_nc(ncep.sel(lon=ncep["lon"] >= -5.0), tmp_path / "cut.nc")
    target = VariableSource(str(iberia / "eobs_rr_iberia_djf_1983-2002.nc"), "rr")
    data = DataConfig(target=target, predictors=(VariableSource(str(tmp_path / "cut.nc"), "psl"),))
    with pytest.raises(InputError, match=r"cut.nc: predictor 'psl' covers lon -5 to 5 .* target's cells span "
                                         r"-9.75 to 4.25\. Every target cell"):
        preprocess.run(data, PreprocessConfig(), str(tmp_path / "dataset.zarr"))
    assert not (tmp_path / "dataset.zarr").exists()
    full = io.open_variable(VariableSource(str(iberia / "ncep_predictors_iberia_2.5deg_djf_1983-2002.nc"), "psl"))
    preprocess.check_coverage(preprocess.standardise_coords(io.open_variable(target), "target"),
                              [preprocess.standardise_coords(full, "predictor")])


def test_longitudes_in_either_convention_give_the_reference_data_set(iberia, tmp_path, caplog):
    """NCEP as downloaded (longitudes 0..357.5, the Iberian columns 350..357.5 after 0..5) against the E-OBS target
    in -180..180; the E-OBS target in 0..360 (stored split at the meridian: 0.25..4.25 before 350.25..359.75)
    against -180..180 predictors; and both in 0..360: each gives the data set of the files as they are (the same
    grid, target values and condition), with the wrap in the log."""
    eobs_path = iberia / "eobs_rr_iberia_djf_1983-2002.nc"
    ncep_path = iberia / "ncep_predictors_iberia_2.5deg_djf_1983-2002.nc"
    east = lambda ds: ds.assign_coords(lon=np.mod(ds["lon"], 360.0)).sortby("lon")  # noqa: E731
    write_nc(east(xr.open_dataset(ncep_path)), tmp_path / "ncep360.nc")
    write_nc(east(xr.open_dataset(eobs_path)), tmp_path / "eobs360.nc")
    assert xr.open_dataset(tmp_path / "eobs360.nc")["lon"].values[0] == 0.25  # split at the meridian

    def run(target, preds, name):
        data = DataConfig(VariableSource(str(target), "rr"), tuple(VariableSource(str(preds), v)
                                                                  for v in ("psl", "hus850")))
        return preprocess.run(data, PreprocessConfig(split=SplitConfig(method="contiguous")), str(tmp_path / name))

    ref = run(eobs_path, ncep_path, "ref.zarr")
    for target, preds in ((eobs_path, tmp_path / "ncep360.nc"), (tmp_path / "eobs360.nc", ncep_path),
                          (tmp_path / "eobs360.nc", tmp_path / "ncep360.nc")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="precip_cvae.coords"):
            got = run(target, preds, "got.zarr")
        assert "wrapped" in caplog.text, (target, preds)
        for name in ("lat", "lon", "clat", "clon", "time"):
            np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)
        np.testing.assert_array_equal(got["pr"].values, ref["pr"].values)
        np.testing.assert_array_equal(got["condition"].values, ref["condition"].values)


def test_values_outside_the_cf_valid_range_are_missing(iberia, tmp_path, caplog):
    """E-OBS Iberia with its sea written as -999 and no _FillValue, flagged only by valid_min 0 (CF 2.5.1; xarray does
    not apply it): the data set of the file as it is (the same mask and values); packed int16 with valid_range in
    packed units the same; an inverted valid_range is refused by name."""
    eobs = xr.open_dataset(iberia / "eobs_rr_iberia_djf_1983-2002.nc")
    preds = (VariableSource(str(iberia / "ncep_predictors_iberia_2.5deg_djf_1983-2002.nc"), "psl"),)
    cfg = PreprocessConfig(split=SplitConfig(method="contiguous"))
    ref = preprocess.run(DataConfig(VariableSource(str(iberia / "eobs_rr_iberia_djf_1983-2002.nc"), "rr"), preds),
                         cfg, str(tmp_path / "ref.zarr"))
    flagged = eobs.copy()
    flagged["rr"] = eobs["rr"].fillna(-999.0)
    flagged["rr"].attrs = {**eobs["rr"].attrs, "valid_min": 0.0}
    write_nc(flagged, tmp_path / "flagged.nc", encoding={"rr": {"_FillValue": None}})
    assert np.isfinite(xr.open_dataset(tmp_path / "flagged.nc")["rr"].values).all()  # -999 reads as data
    with caplog.at_level(logging.INFO, logger="precip_cvae.io"):
        got = preprocess.run(DataConfig(VariableSource(str(tmp_path / "flagged.nc"), "rr"), preds), cfg,
                             str(tmp_path / "flagged.zarr"))
    assert "values outside its valid range [0, inf]" in caplog.text
    np.testing.assert_array_equal(got["mask"].values, ref["mask"].values)
    np.testing.assert_array_equal(got["pr"].values, ref["pr"].values)
    packed = eobs.copy()
    packed["rr"] = eobs["rr"].fillna(-99.9)
    packed["rr"].attrs = {**eobs["rr"].attrs, "valid_range": np.array([0, 30000], "int16")}
    write_nc(packed, tmp_path / "packed.nc",
             encoding={"rr": {"dtype": "int16", "scale_factor": 0.1, "_FillValue": None}})
    got = preprocess.run(DataConfig(VariableSource(str(tmp_path / "packed.nc"), "rr"), preds), cfg,
                         str(tmp_path / "packed.zarr"))
    np.testing.assert_array_equal(got["mask"].values, ref["mask"].values)
    np.testing.assert_allclose(got["pr"].values, ref["pr"].values, atol=0.05 + 1e-6)
    flagged["rr"].attrs = {**eobs["rr"].attrs, "valid_range": [10.0, 0.0]}
    write_nc(flagged, tmp_path / "inverted.nc", encoding={"rr": {"_FillValue": None}})
    with pytest.raises(InputError, match=r"inverted.nc: variable 'rr' has valid_range \[10.0, 0.0\]; expected two"):
        preprocess.run(DataConfig(VariableSource(str(tmp_path / "inverted.nc"), "rr"), preds), cfg,
                       str(tmp_path / "inverted.zarr"))
    assert not (tmp_path / "inverted.zarr").exists()


def test_a_daily_target_stamped_at_noon_matches_predictors_at_midnight_by_day(iberia, tmp_path, caplog):
    """E-OBS Iberia rewritten with its stamps at 12:00 (as CMIP day files are), NCEP at 00:00: the same data set
    as the files as they are (the same days, target values and condition), with the target's stamps kept and a log
    line; preprocess.time_match: exact refuses it as before."""
    eobs = xr.open_dataset(iberia / "eobs_rr_iberia_djf_1983-2002.nc")
    noon = eobs.assign_coords(time=eobs["time"] + np.timedelta64(12, "h"))
    write_nc(noon, tmp_path / "noon.nc")
    preds = tuple(VariableSource(str(iberia / "ncep_predictors_iberia_2.5deg_djf_1983-2002.nc"), v)
                  for v in ("psl", "hus850"))
    cfg = PreprocessConfig(split=SplitConfig(method="contiguous"))
    ref = preprocess.run(DataConfig(VariableSource(str(iberia / "eobs_rr_iberia_djf_1983-2002.nc"), "rr"), preds),
                         cfg, str(tmp_path / "ref.zarr"))
    with caplog.at_level(logging.INFO, logger="precip_cvae.preprocess"):
        got = preprocess.run(DataConfig(VariableSource(str(tmp_path / "noon.nc"), "rr"), preds), cfg,
                             str(tmp_path / "noon.zarr"))
    assert "stamped at 00:00, the target" in caplog.text and "at 12:00: matched by calendar day" in caplog.text
    assert got.sizes["time"] == ref.sizes["time"] == 1805
    np.testing.assert_array_equal(got["time"].values, ref["time"].values + np.timedelta64(12, "h"))
    np.testing.assert_array_equal(got["condition"].values, ref["condition"].values)
    np.testing.assert_array_equal(got["pr"].values, ref["pr"].values)
    with pytest.raises(InputError, match="share 0 time stamps"):
        preprocess.run(DataConfig(VariableSource(str(tmp_path / "noon.nc"), "rr"), preds),
                       dataclasses.replace(cfg, time_match="exact"), str(tmp_path / "exact.zarr"))


def test_files_in_different_units_are_each_converted_by_their_own(iberia, tmp_path, caplog):
    """E-OBS Iberia split in two files, the second rewritten in kg m-2 s-1: the same target as the single file
    (each file read in its own units, not the first file's); a file without units among them is refused by name,
    and a non-precipitation predictor in two units too."""
    eobs = xr.open_dataset(iberia / "eobs_rr_iberia_djf_1983-2002.nc")
    first, second = eobs.isel(time=slice(0, 900)), eobs.isel(time=slice(900, None))
    flux = second.copy()
    flux["rr"] = second["rr"] / 86400.0
    flux["rr"].attrs = {**second["rr"].attrs, "units": "kg m-2 s-1"}
    write_nc(first, tmp_path / "mixed" / "a.nc")
    write_nc(flux, tmp_path / "mixed" / "b.nc")
    with caplog.at_level(logging.INFO, logger="precip_cvae.io"):
        got = io.open_variable(VariableSource(str(tmp_path / "mixed" / "*.nc"), "rr"), precipitation=True)
    assert "the files state different units" in caplog.text and "each file converted by its own" in caplog.text
    ref = io.open_variable(VariableSource(str(iberia / "eobs_rr_iberia_djf_1983-2002.nc"), "rr"))
    assert got.attrs["units"] == ref.attrs["units"]
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-6)
    bare = second.copy()
    bare["rr"].attrs = {k: v for k, v in second["rr"].attrs.items() if k != "units"}
    write_nc(first, tmp_path / "bare" / "a.nc")
    write_nc(bare, tmp_path / "bare" / "b.nc")
    with pytest.raises(InputError, match=r"b.nc: variable 'rr' has no 'units' attribute, while .*a.nc states"):
        io.open_variable(VariableSource(str(tmp_path / "bare" / "*.nc"), "rr"), precipitation=True)
    with pytest.raises(InputError, match=r"b.nc: variable 'rr' is in 'kg m-2 s-1' but .*a.nc is in"):
        io.open_variable(VariableSource(str(tmp_path / "mixed" / "*.nc"), "rr"), precipitation=False)
