"""Training: warm-up and early stopping, resume equivalence, signals, NaN, sampling, augmentations, checkpoints."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from precip_cvae import checkpoint, data as D, train
from precip_cvae.config import ConfigError, LossConfig, ModelConfig, TrainConfig

TINY = ModelConfig(preset="tiny", dropout_encoder=0.1, dropout_decoder=0.1)


def _cfg(**kw):
    base = dict(epochs=4, batch_size=32, lr=2e-3, val_members=2, loss=LossConfig(warmup_epochs=1), seed=1,
                num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _paths(prepared, out):
    return train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], prepared["events"],
                            str(out / "train"), str(out / "resume"))


def test_early_stopping_cannot_select_before_warmup_ends():
    es = train.EarlyStopping("MAE_all", patience=2, warmup_epochs=3)
    # very good values during warm-up (epochs 0..2) are never selected and never count
    assert [es.update(e, v) for e, v in enumerate([0.1, 0.05, 0.01])] == [(False, False)] * 3
    assert es.best_epoch == -1
    assert es.update(3, 1.0) == (True, False) and es.best_epoch == 3
    assert es.update(4, 1.1) == (False, False)
    assert es.update(5, 0.9) == (True, False)
    assert es.update(6, 1.0) == (False, False) and es.update(7, 1.0) == (False, True)


def test_training_writes_log_and_checkpoints_and_resumes_exactly(prepared, tmp_path, monkeypatch):
    cfg = _cfg()
    full = train.run(_paths(prepared, tmp_path / "full"), TINY, cfg)
    assert [r["epoch"] for r in full] == [0, 1, 2, 3]
    log = pd.read_csv(tmp_path / "full" / "train" / "train_log.csv")
    assert list(log["epoch"]) == [0, 1, 2, 3]
    assert log["beta"].tolist() == pytest.approx([0.0, 0.05, 0.05, 0.05])  # the default preset's beta_kl
    assert (log["train_crps"] > 0).all() and (log["train_tail"] == 0).all()  # afCRPS on, twCRPS off by default
    assert not log["is_best"].iloc[0]  # warm-up epoch is never best
    for col in ("val_MAE_all", "val_MAE_tail", "val_RMSE_ext", "val_corr", "val_freq_ratio", "val_CRPS", "samples_per_s"):
        assert np.isfinite(log[col]).all(), col
    best = checkpoint.load(tmp_path / "full" / "train" / "best.pt")
    assert best["epoch"] == int(log.loc[log["is_best"], "epoch"].iloc[-1]) >= 1
    assert best["parameter_count"] > 0 and best["data"]["channels"] == ["psl", "hus850", "pr_block4"]
    # the static channels fitted on train travel with the weights
    assert best["data"]["static_channels"][:3] == ["valid_fraction", "clim_x", "wet_frequency"]
    assert best["model_state"]["static"].shape == (1, best["model_args"]["n_static"], 16, 16)
    assert best["model_state"]["static"].abs().sum() > 0
    assert not (tmp_path / "full" / "resume" / "resume.pt").exists()  # cleaned after success

    # interrupted mid-epoch 2 by SIGTERM, then rerun: the same 4 epochs, the same weights
    calls = {"n": 0}
    real = train.augment  # called once per training step (not in validation)
    steps_per_epoch = -(-int((np.array(pd.read_csv(prepared["events"])["split"]) == "train").sum()) // 32)

    def kill_mid_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "augment", kill_mid_epoch_2)
    paths = _paths(prepared, tmp_path / "cut")
    with pytest.raises(train.TrainingInterrupted, match="epoch 2 step 2"):
        train.run(paths, TINY, cfg)
    assert len(pd.read_csv(paths.log_csv)) == 2 and paths.resume.exists()
    monkeypatch.setattr(train, "augment", real)
    paths.best.unlink()  # Snakemake deletes the declared outputs of a failed job
    paths.last.unlink()
    resumed = train.run(paths, TINY, cfg)
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    a = checkpoint.load(tmp_path / "full" / "train" / "last.pt")["model_state"]
    b = checkpoint.load(paths.last)["model_state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert checkpoint.load(paths.best)["epoch"] == best["epoch"]
    np.testing.assert_allclose(pd.read_csv(paths.log_csv)["val_MAE_all"], log["val_MAE_all"], rtol=1e-5)


def test_non_finite_loss_names_epoch_and_step(prepared, tmp_path, monkeypatch):
    real = train.compute_loss
    n = {"calls": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        n["calls"] += 1
        if n["calls"] == 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="epoch 0 step 2"):
        train.run(_paths(prepared, tmp_path), TINY, _cfg(epochs=1))


def test_oversampling_draws_heavy_days_more_often():
    is_event = torch.zeros(1000, dtype=torch.bool)
    is_event[:10] = True  # 1 % heavy days
    g = torch.Generator().manual_seed(0)
    plain = D.epoch_indices(is_event, 1.0, g)
    assert sorted(plain.tolist()) == list(range(1000))  # a permutation
    draws = torch.cat([D.epoch_indices(is_event, 10.0, g) for _ in range(20)])
    share = (draws < 10).float().mean().item()
    assert share == pytest.approx(100 / 1090, rel=0.15)  # 10 x 10 / (10 x 10 + 990)


def _batch(b=2):
    """A batch whose every field has distinct values, so any flip or rotation of it shows."""
    x = torch.arange(b * 4 * 4, dtype=torch.float32).reshape(b, 1, 4, 4)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, :, 0, 0] = False
    valid[1 % b, :, 0, 1] = False  # the second day also misses the pixel next to the corner
    g = torch.Generator().manual_seed(3)
    y = torch.randn(b, 3, 2, 2, generator=g)  # no day an affine copy of another (mixup reads lam back from y)
    coarse_mm = 10 * torch.rand(b, 2, 2, generator=g)
    thr = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) + 0.5
    tail = -torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    return D.Batch(x * valid, valid, y, coarse_mm, thr, tail)


_FIELDS = ("x", "valid", "y", "coarse_mm", "thr_x", "tail_x")


def _geometric_candidates(name):
    """The transforms ``name`` may draw, written with numpy on the last two axes."""
    if name == "flip":
        return {"none": lambda a: a, "lat": lambda a: np.flip(a, -2), "lon": lambda a: np.flip(a, -1),
                "both": lambda a: np.flip(a, (-2, -1))}
    return {f"k={k}": (lambda a, k=k: np.rot90(a, k, axes=(-2, -1))) for k in range(4)}


@pytest.mark.parametrize("name", ["flip", "rot90"])
def test_flip_and_rot90_move_field_mask_condition_and_thresholds_together(name):
    """Each draw applies one and the same flip (rotation) to x, valid, the coarse condition y, the coarse
    rain and both threshold maps: the one that x shows, found among the numpy candidates; over 40 draws
    every candidate occurs."""
    b = _batch()
    before = {f: getattr(b, f).numpy() for f in _FIELDS}
    candidates = _geometric_candidates(name)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        out = D.augment(b, [name], g, _cfg())
        after = {f: getattr(out, f).numpy() for f in _FIELDS}
        which = [k for k, t in candidates.items() if np.array_equal(after["x"], t(before["x"]))]
        assert len(which) == 1, which  # x has distinct values: exactly one candidate matches
        t = candidates[which[0]]
        for f in _FIELDS:
            np.testing.assert_array_equal(after[f], t(before[f]), err_msg=f"{name} {which[0]}: {f}")
        # the same pixels stay extreme, moved with the field
        np.testing.assert_array_equal(out.extreme.numpy(), t(b.extreme.numpy()))
        seen.add(which[0])
    assert seen == set(candidates)


def test_noise_perturbs_only_the_condition():
    b = _batch()
    g = torch.Generator().manual_seed(0)
    out = D.augment(b, ["noise"], g, _cfg(noise_std=0.5))
    assert torch.equal(out.x, b.x) and torch.equal(out.valid, b.valid)
    assert 0.2 < (out.y - b.y).std().item() < 0.8


def test_mixup_is_the_documented_convex_combination_of_pairs():
    """For each draw, lam and each day's partner are read back from the mixed condition y: a day left
    unchanged drew itself; otherwise y[i] -> lam y[i] + (1 - lam) y[j] fits one j != i only (random
    values).  Then, with that lam and pairing: x (model space) = (lam x[i] + (1 - lam) x[j]) * valid,
    valid = valid[i] & valid[j], the coarse rain mixes the same way, the threshold maps are kept, and
    the pairing is a permutation.  Over 300 draws lam has the mean and variance of Beta(alpha, alpha).
    alpha = 2 keeps lam away from 0 and 1, where the read-back would be ill-conditioned."""
    alpha, n = 2.0, 4
    b = _batch(n)
    x, valid, y, cmm = b.x.double().numpy(), b.valid.numpy(), b.y.double().numpy(), b.coarse_mm.double().numpy()
    g = torch.Generator().manual_seed(0)
    lams, pairs_seen = [], set()
    for _ in range(300):
        out = D.augment(b, ["mixup"], g, _cfg(mixup_alpha=alpha))
        oy = out.y.double().numpy()
        partner, lam = [], None
        for i in range(n):
            if np.allclose(oy[i], y[i], atol=1e-6):
                partner.append(i)
                continue
            fits = []
            for j in set(range(n)) - {i}:
                d = (y[i] - y[j]).ravel()
                lj = float(d @ (oy[i] - y[j]).ravel() / (d @ d))
                if np.allclose(oy[i], lj * y[i] + (1 - lj) * y[j], atol=1e-5):
                    fits.append((j, lj))
            assert len(fits) == 1, (i, fits)
            j, lj = fits[0]
            assert 0 < lj < 1 and (lam is None or lj == pytest.approx(lam, abs=1e-5)), (lj, lam)
            partner.append(j)
            lam = lj
        if lam is None:  # every day drew itself: nothing mixed, lam unseen
            torch.testing.assert_close(out.x, b.x)
            assert torch.equal(out.valid, b.valid)
            continue
        assert sorted(partner) == list(range(n)), partner  # a permutation of the batch
        pairs_seen.update((i, j) for i, j in enumerate(partner) if i != j)
        lams.append(lam)
        v = valid & valid[partner]
        np.testing.assert_array_equal(out.valid.numpy(), v)
        np.testing.assert_allclose(out.x.numpy(), (lam * x + (1 - lam) * x[partner]) * v, atol=1e-4)
        np.testing.assert_allclose(out.coarse_mm.numpy(), lam * cmm + (1 - lam) * cmm[partner], atol=1e-5)
        assert out.thr_x is b.thr_x and out.tail_x is b.tail_x
    assert len(lams) > 250 and len(pairs_seen) == n * (n - 1)
    lams = np.array(lams)
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.2)  # Beta(a, a): 1 / (4 (2a + 1))


def test_unknown_augmentation_lists_valid_names():
    with pytest.raises(ConfigError, match=r"valid names are \['flip', 'rot90', 'noise', 'mixup'\]"):
        TrainConfig(augment=("shear",))
    with pytest.raises(ConfigError, match="valid names are"):
        TrainConfig(early_stopping_metric="accuracy")


def test_checkpoint_refuses_pickles_truncation_and_other_formats(tmp_path):
    good = {"model_state": {"w": torch.ones(2)}, "epoch": 1}
    checkpoint.save(good, tmp_path / "ok.pt")
    assert checkpoint.load(tmp_path / "ok.pt")["epoch"] == 1

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state": {}, "format": checkpoint.CHECKPOINT_FORMAT, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.load(tmp_path / "evil.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable or truncated"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"model_state": {}, "format": 999, "package_version": "9.9"}, tmp_path / "future.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format 999"):
        checkpoint.load(tmp_path / "future.pt")
    # a checkpoint of the vector-latent cVAE before the map latent (format 1, package 0.1.0) is refused clearly
    torch.save({"model_state": {}, "format": 1, "package_version": "0.1.0"}, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"format 1 \(package 0.1.0\) is not this package's format 2 "
                                                         r"\(package .*\); retrain"):
        checkpoint.load(tmp_path / "old.pt")


def test_flip_with_fine_conditioning_is_refused(prepared, tmp_path):
    from precip_cvae.io import InputError

    with pytest.raises(InputError, match=r"train.augment \['flip'\]: flip/rot90 would move the fields against the "
                                         "static fine-grid channels"):
        train.run(_paths(prepared, tmp_path), TINY, _cfg(epochs=1, augment=("flip",)))
    assert not (tmp_path / "train" / "best.pt").exists()


@pytest.mark.parametrize("hierarchical", [False, True])
def test_checkpoint_rebuilds_the_model_alone(prepared, tmp_path, hierarchical):
    model_cfg = dataclasses.replace(TINY, hierarchical_prior=True) if hierarchical else TINY
    train.run(_paths(prepared, tmp_path), model_cfg, _cfg(epochs=1, loss=LossConfig(warmup_epochs=0)))
    model, state = checkpoint.load_model(tmp_path / "train" / "best.pt")
    y = torch.zeros(3, 3, 4, 4)
    out = model.sample(y, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 1, 16, 16) and (out >= 0).all()
    with pytest.raises(checkpoint.CheckpointError, match="condition channels"):
        checkpoint.check_matches_data(state, ["psl"], (16, 16), "best.pt")


def test_ddp_two_gloo_processes_match_one_process(prepared, tmp_path):
    """gpus: 2 on CPU runs two gloo processes; same global batch -> the same loss trajectory within tolerance.

    With lambda_ext = 0 every loss term is a mean over samples, so the DDP average of the two
    half-batch gradients is the full-batch gradient; only the posterior noise differs.
    """
    base = dict(epochs=2, batch_size=32, lr=1e-3, val_members=2, seed=3, num_threads=2,
                loss=LossConfig(warmup_epochs=1, lambda_ext=0.0), device="cpu")
    model = ModelConfig(preset="tiny", dropout_encoder=0.0, dropout_decoder=0.0)
    from precip_cvae.logs import stage_logging

    one = train.run(_paths(prepared, tmp_path / "one"), model, TrainConfig(gpus=1, **base))
    with stage_logging(tmp_path / "two.log", "train_cvae"):
        two = train.run(_paths(prepared, tmp_path / "two"), model, TrainConfig(gpus=2, **base))
    assert [r["epoch"] for r in two] == [0, 1]
    # the launcher's lines and rank 0's share the rule's log, none written over
    text = (tmp_path / "two.log").read_text()
    for line in ("stage train_cvae", "DDP: 2 processes", "epoch   1/2", "epoch   2/2", "training done",
                 "stage train_cvae finished"):
        assert line in text, line
    a = np.array([r["train_loss"] for r in one])
    b = np.array([r["train_loss"] for r in two])
    np.testing.assert_allclose(b, a, rtol=0.05)
    # only rank 0 wrote: one log with two rows, one set of checkpoints
    assert len(pd.read_csv(tmp_path / "two" / "train" / "train_log.csv")) == 2
    assert sorted(p.name for p in (tmp_path / "two" / "train").iterdir()) == ["best.pt", "last.pt", "train_log.csv"]
    assert checkpoint.load(tmp_path / "two" / "train" / "last.pt")["epoch"] == 1


def test_two_torchrun_processes_report_how_they_ended(prepared, tmp_path):
    """The DDP entry point as a user starts it under srun (torchrun, two gloo ranks): each rank reports its
    outcome in a status file, and launch() turns a non-finite loss on the ranks into NonFiniteLoss."""
    import subprocess

    from precip_cvae import distributed

    paths = _paths(prepared, tmp_path / "ok")
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, val_members=2, seed=3, gpus=2, device="cpu",
                      loss=LossConfig(warmup_epochs=1))
    spec = distributed.write_spec(tmp_path / "status", distributed.RankJob(
        "precip_cvae.train:train_process", dict(paths=paths, model_cfg=TINY, cfg=cfg, threads=1, experiment="default")))
    proc = subprocess.run(distributed.torchrun_command(2, spec), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert distributed.read_statuses(tmp_path / "status") == [{"rank": 0, "outcome": "ok"}, {"rank": 1, "outcome": "ok"}]
    assert pd.read_csv(paths.log_csv)["epoch"].tolist() == [0, 1]
    assert checkpoint.load(paths.last)["epoch"] == 1
    # a learning rate that overflows the weights: every rank stops at the same step, no rank hangs
    bad = _paths(prepared, tmp_path / "bad")
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite loss at epoch 0 step \d+"):
        train.run(bad, TINY, dataclasses.replace(cfg, lr=1e30, grad_clip=0.0))
    statuses = distributed.read_statuses(tmp_path / "bad" / "resume" / "ddp")
    assert [s["outcome"] for s in statuses] == ["non_finite", "non_finite"]


def test_a_signal_to_torchrun_and_its_ranks_stops_every_rank_at_a_step(prepared, tmp_path):
    """SIGUSR1 to the process group of torchrun (what SLURM's --signal=USR1 does): both ranks stop at their next
    step, report 'interrupted' with the signal, and the resume state of the last complete epoch is on disk."""
    import subprocess
    import time

    from precip_cvae import distributed

    paths = _paths(prepared, tmp_path / "run")
    cfg = TrainConfig(epochs=200, batch_size=32, lr=1e-3, val_members=2, seed=3, gpus=2, device="cpu",
                      loss=LossConfig(warmup_epochs=1))
    spec = distributed.write_spec(tmp_path / "status", distributed.RankJob(
        "precip_cvae.train:train_process", dict(paths=paths, model_cfg=TINY, cfg=cfg, threads=1, experiment="default")))
    proc = subprocess.Popen(distributed.torchrun_command(2, spec), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (paths.log_csv.exists() and len(pd.read_csv(paths.log_csv)) >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) != 0
    statuses = distributed.read_statuses(tmp_path / "status")
    assert [(s["outcome"], s["signum"]) for s in statuses] == [("interrupted", signal.SIGUSR1)] * 2
    state = checkpoint.load(paths.resume)
    assert 0 <= state["epoch"] < 199 and len(pd.read_csv(paths.log_csv)) == state["epoch"] + 1


def test_the_log_holds_the_learning_rate_each_epoch_trained_with(prepared, tmp_path):
    """Cosine schedule over 2 epochs from 2e-3: epoch 0 trains at 2e-3, epoch 1 at 2e-3 (1 + cos(pi / 2)) / 2."""
    rows = train.run(_paths(prepared, tmp_path), TINY, _cfg(epochs=2, scheduler="cosine"))
    assert [r["lr"] for r in rows] == pytest.approx([2e-3, 1e-3])


def test_crps_heavy_is_the_mean_crps_over_the_heavy_val_days(prepared, tmp_path, monkeypatch):
    from precip_cvae import metrics

    data = D.load_fields(prepared["dataset"], prepared["thresholds"], prepared["events"], splits=("val",))
    val = data.select("val")
    heavy = val.is_event.numpy()
    assert 0 < heavy.sum() < len(heavy)  # the fixture's val split holds both kinds of day
    history = train.run(_paths(prepared, tmp_path), TINY, _cfg(epochs=2, early_stopping_metric="CRPS_heavy"))
    assert np.isfinite(history[-1]["val_CRPS_heavy"])
    seen = {}
    real = metrics.crps_ensemble

    def spy(ens, obs):
        seen["crps"] = real(ens, obs)
        return seen["crps"]

    monkeypatch.setattr(metrics, "crps_ensemble", spy)
    model, _ = checkpoint.load_model(tmp_path / "train" / "best.pt")
    scores = train.validate(model, val, _cfg(), 0, torch.device("cpu"), 64)
    crps = seen["crps"]  # (N, H, W), NaN outside the mask
    by_day = np.array([np.nanmean(c) for c in crps])
    per_pixel_heavy = np.nansum(crps[heavy]) / np.isfinite(crps[heavy]).sum()
    assert scores["val_CRPS_heavy"] == pytest.approx(per_pixel_heavy, rel=1e-6)
    assert scores["val_CRPS_heavy"] > by_day[~heavy].mean()  # heavy days are the harder ones
    assert scores["val_CRPS"] == pytest.approx(np.nanmean(crps), rel=1e-6)


def test_crps_heavy_without_a_heavy_val_day_is_refused(prepared, tmp_path):
    events = tmp_path / "events.csv"
    table = pd.read_csv(prepared["events"], dtype={"date": str})
    table["is_event"] = table["is_event"] & (table["split"] != "val")
    table.to_csv(events, index=False)
    paths = train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], str(events),
                                    str(tmp_path / "train"), str(tmp_path / "resume"))
    with pytest.raises(D.InputError, match=r"events.csv: no heavy-event day in the val split.*CRPS_heavy"):
        train.run(paths, TINY, _cfg(early_stopping_metric="CRPS_heavy"))
    assert not (tmp_path / "train" / "best.pt").exists()


def test_weight_ema_is_what_is_validated_saved_and_resumed(prepared, tmp_path, monkeypatch):
    """train.ema_decay: after every step the average w <- d w + (1 - d) theta; best.pt and last.pt hold it (what
    evaluate and generate sample), the raw weights travel in train_model_state, and a run cut mid-epoch resumes to
    the same averaged and raw weights."""
    cfg = _cfg(epochs=3, ema_decay=0.9)
    steps = []
    real_step = train.train_step

    def record(model, *a, **k):
        out = real_step(model, *a, **k)
        steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    monkeypatch.setattr(train, "train_step", record)
    train.run(_paths(prepared, tmp_path / "full"), TINY, cfg)
    last = checkpoint.load(tmp_path / "full" / "train" / "last.pt")
    name = next(iter(steps[0]))
    expected = steps[0][name]  # the average starts at the first step's weights
    for step in steps[1:]:
        expected = 0.9 * expected + 0.1 * step[name]
    torch.testing.assert_close(last["model_state"][name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last["train_model_state"][name], steps[-1][name])
    assert not torch.equal(last["model_state"][name], last["train_model_state"][name])

    monkeypatch.setattr(train, "train_step", real_step)
    calls = {"n": 0}
    real = train.augment

    def kill_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == len(steps) // 3 * 2 + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "augment", kill_in_epoch_2)
    paths = _paths(prepared, tmp_path / "cut")
    with pytest.raises(train.TrainingInterrupted):
        train.run(paths, TINY, cfg)
    monkeypatch.setattr(train, "augment", real)
    paths.best.unlink(missing_ok=True)
    paths.last.unlink(missing_ok=True)
    train.run(paths, TINY, cfg)
    again = checkpoint.load(paths.last)
    for key in ("model_state", "train_model_state"):
        for k in last[key]:
            torch.testing.assert_close(again[key][k], last[key][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expr, hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("gpu[01,03-04],login2", ["gpu01", "gpu03", "gpu04", "login2"]),
    ("n[8-10]-ib", ["n8-ib", "n9-ib", "n10-ib"]),
    ("a[1-2],b[001-002]", ["a1", "a2", "b001", "b002"]),
])
def test_a_slurm_host_list_expands_as_scontrol_shows_it(expr, hosts):
    from precip_cvae import distributed

    assert distributed.expand_hostlist(expr) == hosts


def test_the_multi_node_rendezvous_comes_from_the_slurm_job():
    from precip_cvae import distributed

    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    r = distributed.Rendezvous.from_slurm(2, env)
    assert r == distributed.Rendezvous(nodes=2, host="gpu07", port=29500 + 456, job_id="123456")
    assert distributed.Rendezvous.from_slurm(2, {**env, "MASTER_PORT": "41000"}).port == 41000
    cmd = distributed.torchrun_command(4, "spec.pkl", r)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[5:8] == [sys.executable, "-m", "torch.distributed.run"]
    for arg in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29956",
                "--rdzv-id=123456"):
        assert arg in cmd, arg
    assert "--standalone" not in cmd and cmd[-3:] == ["-m", "precip_cvae.distributed", "spec.pkl"]
    assert "--standalone" in distributed.torchrun_command(2, "spec.pkl")  # one node: as before
    with pytest.raises(RuntimeError, match=r"train.nodes 2: multi-node training runs inside a SLURM job \(SLURM_JOB_ID"):
        distributed.Rendezvous.from_slurm(2, {})
    with pytest.raises(RuntimeError, match=r"SLURM job 123456 has 1 node\(s\) \(gpu07\); ask for 2"):
        distributed.Rendezvous.from_slurm(2, {**env, "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_NUM_NODES": "1"})


FAKE_SRUN = """#!/bin/bash
# srun on one machine: --nodes=N starts the command N times (one "node" each), fails if any fails
n=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) n="${1#--nodes=}";; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
code=0
for p in "${pids[@]}"; do wait "$p" || code=$?; done
exit $code
"""


def test_two_nodes_under_srun_train_as_one_job(prepared, tmp_path, monkeypatch):
    """train.nodes 2 inside a (faked) two-node SLURM job: launch() runs srun, which starts one torchrun per node;
    the two agents meet at the c10d rendezvous on the job's first node and train two gloo ranks as one job.
    (The fake srun starts both 'nodes' on this machine; a real srun places one on each node.)"""
    import socket

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost,localhost")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("MASTER_PORT", str(port))
    paths = _paths(prepared, tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, val_members=2, seed=3, gpus=1, nodes=2, device="cpu",
                      loss=LossConfig(warmup_epochs=1))
    history = train.run(paths, TINY, cfg)
    assert [r["epoch"] for r in history] == [0, 1]
    from precip_cvae import distributed

    assert distributed.read_statuses(tmp_path / "resume" / "ddp") == [{"rank": 0, "outcome": "ok"},
                                                                        {"rank": 1, "outcome": "ok"}]
    assert checkpoint.load(paths.last)["epoch"] == 1


def test_a_failed_write_of_the_training_log_leaves_the_last_log_whole(tmp_path, monkeypatch):
    """The log is rewritten every epoch. A write interrupted half-way (here a signal at the fsync) leaves the last
    complete log in place, so a kill or a reader polling the file never sees it truncated or empty."""
    path = tmp_path / "train_log.csv"
    train._write_log([{"epoch": 0, "train_loss": 1.5}], path)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train._write_log([{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 1.2}], path)
    log = pd.read_csv(path)
    assert log["epoch"].tolist() == [0] and log["train_loss"].tolist() == [1.5]
    assert [p.name for p in tmp_path.iterdir()] == ["train_log.csv"]  # no temporary left behind
