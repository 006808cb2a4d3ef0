"""Static fine-grid channels: fitted on train only, by hand on a small data set; user static files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from precip_cvae import data as D
from precip_cvae.conditioning import STATIC_BASE_CHANNELS, fit_static, tail_threshold
from precip_cvae.transform import TargetTransform


def _field_data(seed=0, T=60, H=4, W=5):
    """Gamma rain on a (T, 1, H, W) grid with one sea column, split 40 / 10 / 10 days."""
    rng = np.random.default_rng(seed)
    pr = rng.gamma(0.6, 5.0, size=(T, 1, H, W)).astype("float32")
    valid = np.ones_like(pr, dtype=bool)
    valid[..., 0] = False  # sea
    tf = TargetTransform("log1p", 1.0)
    x = torch.from_numpy(np.where(valid, tf.forward(pr), 0.0).astype("float32"))
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    thr = np.full((1, 1, H, W), 10.0, "float32")
    thr[..., 0] = np.nan
    return D.FieldData(x=x, valid=torch.from_numpy(valid), y=torch.zeros(T, 1, 2, 2), coarse_mm=None,
                       is_event=torch.zeros(T, dtype=torch.bool), split=split, dates=np.arange(T).astype(str),
                       thr_mm=torch.from_numpy(thr), transform=tf, channels=("z",), attrs={},
                       lat=np.linspace(40, 41.5, H), lon=np.linspace(-5, -3, W))


def test_static_channels_are_fitted_on_train_only():
    data = _field_data()
    a = fit_static(data, tail_percentile=90.0, min_wet_days=5)
    assert a.names == STATIC_BASE_CHANNELS and a.values.shape == (7, 4, 5)
    # other val/test values change nothing
    other = data.x.clone()
    other[40:] = other[40:] * 3 + 1
    b = fit_static(dataclasses.replace(data, x=other), tail_percentile=90.0, min_wet_days=5)
    torch.testing.assert_close(a.values, b.values)
    torch.testing.assert_close(a.tail_x, b.tail_x)
    # changing a train day does change the climatology channel
    train_changed = data.x.clone()
    train_changed[0, 0, 1, 1] += 5
    c = fit_static(dataclasses.replace(data, x=train_changed), tail_percentile=90.0, min_wet_days=5)
    assert not torch.allclose(a.values[1], c.values[1])


def test_static_channels_by_hand():
    data = _field_data()
    s = fit_static(data, tail_percentile=90.0, min_wet_days=5)
    x = data.x[:40, 0].double().numpy()
    land = np.ones((4, 5), bool)
    land[:, 0] = False
    clim = x.mean(axis=0)
    expected = (clim - clim[land].mean()) / clim[land].std()
    np.testing.assert_allclose(s.values[1].numpy()[land], expected[land], rtol=1e-5, atol=1e-6)
    assert (s.values[:, ~land] == 0).all()  # no data: 0
    # valid fraction is 1 on every land cell: a constant channel becomes 0
    assert (s.values[0] == 0).all()
    # coordinates scaled to [-1, 1], then standardised: lat increases down the rows
    assert (np.diff(s.values[5, :, 2].numpy()) > 0).all()
    # the tail threshold is the local P90 of the wet train days, in model space
    pr = data.pr_mm[:40, 0].numpy()
    wet = np.where(pr >= 1.0, pr, np.nan)
    p90 = np.nanpercentile(wet[:, 2, 3], 90)
    assert s.tail_x[0, 0, 2, 3].item() == pytest.approx(float(np.log1p(p90)), rel=1e-5)
    assert torch.isinf(s.tail_x[0, 0, :, 0]).all()


def test_user_static_fields_become_channels():
    data = _field_data()
    orog = torch.arange(20, dtype=torch.float32).view(1, 4, 5) * 100
    s = fit_static(dataclasses.replace(data, static=orog, static_names=("orog",)), min_wet_days=5)
    assert s.names[-1] == "static_orog"
    v = s.values[-1].numpy()
    assert (np.diff(v[:, 1:], axis=1) > 0).all() and v[:, 1:].mean() == pytest.approx(0.0, abs=1e-6)


def test_tail_threshold_pools_pixels_with_few_wet_days():
    data = _field_data()
    x = data.x.clone()
    x[:40, 0, 3, 4] = 0.0  # a dry pixel in train
    t = tail_threshold(dataclasses.replace(data, x=x).select("train"), 90.0, min_wet_days=5)
    assert torch.isfinite(t[0, 0, 3, 4])  # the pooled value, not inf
