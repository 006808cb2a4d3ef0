"""The downstream check: budgets, bootstrap intervals, and a toy case where synthetic samples carry information."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precip_cvae import downstream
from precip_cvae.config import ConfigError, DownstreamConfig
from precip_cvae.data import FieldData
from precip_cvae.transform import TargetTransform


def _fields(y_level: np.ndarray, rng, events=None) -> FieldData:
    """Toy data: the field is a plateau whose height is 3 * the condition level (model space)."""
    n = len(y_level)
    y = np.repeat(y_level[:, None, None, None], 2, axis=1) * np.ones((n, 2, 4, 4))
    y = y + 0.01 * rng.standard_normal(y.shape)
    x = 3.0 * np.repeat(y_level[:, None, None, None], 1, axis=1) * np.ones((n, 1, 8, 8))
    return FieldData(
        x=torch.tensor(x, dtype=torch.float32), valid=torch.ones(n, 1, 8, 8, dtype=torch.bool),
        y=torch.tensor(y, dtype=torch.float32), coarse_mm=None,
        is_event=torch.tensor(events if events is not None else y_level > 1.0),
        split=np.array(["train"] * n), dates=np.array([str(i) for i in range(n)]),
        thr_mm=torch.full((1, 1, 8, 8), float(np.expm1(3.0 * 1.0))), transform=TargetTransform("log1p", 1.0),
        channels=("a", "b"), attrs={},
    )


def test_synthetic_samples_that_carry_missing_information_help():
    rng = np.random.default_rng(0)
    real = _fields(rng.uniform(0.0, 0.8, 200), rng)  # the real set never sees strong conditions
    synthetic = _fields(rng.uniform(0.8, 1.6, 100), rng)  # synthetic samples do, with the true relation
    augmented = FieldData(**{**real.__dict__,
                             "x": torch.cat([real.x, synthetic.x]), "y": torch.cat([real.y, synthetic.y]),
                             "valid": torch.cat([real.valid, synthetic.valid]),
                             "is_event": torch.cat([real.is_event, synthetic.is_event]),
                             "split": np.r_[real.split, synthetic.split], "dates": np.r_[real.dates, synthetic.dates]})
    test = _fields(rng.uniform(0.0, 1.6, 120), rng)
    cfg = DownstreamConfig(losses=("mae",), seeds=1, epochs=15, lr=3e-3, filters=8, bootstrap=200)
    table = downstream.compare(real, augmented, torch.ones(len(augmented)), test, cfg)
    diff = table[(table.training_set == "augmented_minus_real") & (table.subset == "heavy")].set_index("metric")
    # augmentation lowers the heavy-day error, and the interval excludes 0
    assert diff.loc["MAE_all", "value"] < 0 and diff.loc["MAE_all", "ci_high"] < 0


def test_bootstrap_interval_of_identical_models_contains_zero():
    """Two models of identical skill (same error distribution, independent errors): the interval of the
    difference contains 0; a clearly better model's interval does not."""
    rng = np.random.default_rng(1)
    obs = rng.gamma(0.5, 5, size=(60, 6, 6))
    thr = np.full((6, 6), 8.0)
    a = downstream.day_scores(obs + rng.normal(0, 1, size=obs.shape), obs, thr, 0.9)
    b = downstream.day_scores(obs + rng.normal(0, 1, size=obs.shape), obs, thr, 0.9)
    lo, hi = downstream.bootstrap(a, b, 500, 0)["MAE_all"]
    assert lo < 0 < hi
    better = downstream.day_scores(obs + rng.normal(0, 0.5, size=obs.shape), obs, thr, 0.9)
    lo, hi = downstream.bootstrap(a, better, 500, 0)["MAE_all"]
    assert hi < 0


def test_scores_by_hand():
    obs = np.array([[[0.0, 10.0], [2.0, np.nan]]])
    pred = np.array([[[1.0, 4.0], [2.0, 5.0]]])
    thr = np.full((2, 2), 5.0)
    s = downstream.aggregate(downstream.day_scores(pred, obs, thr, 0.9))
    assert s["MAE_all"] == pytest.approx((1 + 6 + 0) / 3)
    assert s["MAE_tail"] == pytest.approx(6.0)
    assert s["freq_bias_p99"] == pytest.approx(0.0) and s["POD_p99"] == pytest.approx(0.0)
    # pinball at 0.9: under-prediction of 6 costs 5.4, over-prediction of 1 costs 0.1
    assert s["quantile_loss"] == pytest.approx((0.1 + 5.4 + 0.0) / 3)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError, match=r"valid names are \['mae', 'quantile'\]"):
        DownstreamConfig(losses=("mse",))
