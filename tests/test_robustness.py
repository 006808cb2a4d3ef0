"""Faults: killed writers, killed training, full disks, side-by-side runs. Nothing half-written is read as complete."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from precip_cvae import io, preprocess
from precip_cvae.config import DataConfig, PreprocessConfig, VariableSource


def _data(root):
    return DataConfig(target=VariableSource(str(root / "target" / "*.nc"), "pr"),
                      predictors=(VariableSource(str(root / "pred" / "*.nc"), "z500"),))


def test_sigkill_during_zarr_write_leaves_no_store_and_a_rerun_rebuilds(small_inputs):
    root, _, times = small_inputs
    out = root / "dataset.zarr"
    script = textwrap.dedent(f"""
        import time, xarray as xr
        from precip_cvae import io, preprocess
        from precip_cvae.config import DataConfig, PreprocessConfig, VariableSource
        real_to_zarr = xr.Dataset.to_zarr
        def slow_to_zarr(self, store, *a, **k):
            r = real_to_zarr(self, store, *a, **k)
            print("WRITTEN", flush=True)
            time.sleep(60)  # killed here: the store is complete but not yet renamed into place
            return r
        xr.Dataset.to_zarr = slow_to_zarr
        data = DataConfig(target=VariableSource({str(root / 'target' / '*.nc')!r}, "pr"),
                          predictors=(VariableSource({str(root / 'pred' / '*.nc')!r}, "z500"),))
        preprocess.run(data, PreprocessConfig(grid_multiple=1), {str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WRITTEN" not in line:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "WRITTEN" in line
    assert not out.exists(), "a killed write must never leave the final path behind"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".dataset.zarr.tmp")]
    assert leftovers, "the half-finished write lives in a temporary sibling"
    preprocess.run(_data(root), PreprocessConfig(grid_multiple=1), str(out))
    assert xr.open_zarr(out).sizes["time"] == len(times)


def test_disk_full_keeps_the_previous_result(small_inputs, monkeypatch):
    root, _, _ = small_inputs
    out = root / "dataset.zarr"
    preprocess.run(_data(root), PreprocessConfig(grid_multiple=1), str(out))
    before = xr.open_zarr(out)["pr"].values.copy()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    with pytest.raises(OSError, match="No space left"):
        preprocess.run(_data(root), PreprocessConfig(grid_multiple=1, chunk_time=7), str(out))
    monkeypatch.undo()
    np.testing.assert_array_equal(xr.open_zarr(out)["pr"].values, before)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_unwritable_output_directory_is_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "locked" / "x.json"
    target.parent.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        io.write_json({"a": 1}, target)
    assert not target.exists()


def test_sigkill_during_training_resumes_with_no_missing_or_duplicate_epoch(prepared, tmp_path):
    out = tmp_path / "t"
    script = textwrap.dedent(f"""
        from precip_cvae import train
        from precip_cvae.config import LossConfig, ModelConfig, TrainConfig
        paths = train.TrainPaths.in_dir({prepared['dataset']!r}, {prepared['thresholds']!r}, {prepared['events']!r},
                                 {str(out / 'train')!r}, {str(out / 'resume')!r})
        train.run(paths, ModelConfig(preset="tiny"),
                  TrainConfig(epochs=6, lr=1e-3, val_members=2, num_threads=1, loss=LossConfig(warmup_epochs=1)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    log_csv = out / "train" / "train_log.csv"
    deadline = time.time() + 180
    while time.time() < deadline:
        if log_csv.exists() and len(log_csv.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "resume" / "resume.pt").exists()
    from precip_cvae import checkpoint, train
    from precip_cvae.config import LossConfig, ModelConfig, TrainConfig

    done = checkpoint.load(out / "resume" / "resume.pt")["epoch"]
    assert done >= 1
    paths = train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], prepared["events"], str(out / "train"),
                             str(out / "resume"))
    train.run(paths, ModelConfig(preset="tiny"),
              TrainConfig(epochs=6, lr=1e-3, val_members=2, num_threads=1, loss=LossConfig(warmup_epochs=1)))
    assert pd.read_csv(log_csv)["epoch"].tolist() == [0, 1, 2, 3, 4, 5]


def test_two_runs_side_by_side_share_nothing_writable(tmp_path):
    """Every output path of a run is under results/<run>/ (or its own demo directory)."""
    import yaml

    from conftest import REPO

    for name in ("config.yaml", "tiny.yaml"):
        cfg = yaml.safe_load((REPO / "config" / name).read_text())
        assert cfg["demo"]["outdir"] != "results"
    demo_dirs = {yaml.safe_load((REPO / "config" / n).read_text())["demo"]["outdir"] for n in ("config.yaml", "tiny.yaml")}
    assert len(demo_dirs) == 2
    rules = "\n".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    outputs = [line.strip() for line in rules.splitlines() if "run_dir(" in line or "exp_dir(" in line]
    assert outputs and all("run_dir(" in o or "exp_dir(" in o for o in outputs)


def test_unwritable_output_directory_keeps_the_previous_result(tmp_path, monkeypatch):
    target = tmp_path / "out" / "report.json"
    io.write_json({"run": 1}, target)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"{target.parent}: output directory is not writable"):
        io.write_json({"run": 2}, target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"run": 1}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from precip_cvae import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save({"model_state": {"w": torch.zeros(4)}, "epoch": 3}, path)
    real_save = torch.save

    def full(obj, f, *a, **k):  # half a file, then the disk is full
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save({"model_state": {"w": torch.ones(4)}, "epoch": 4}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
