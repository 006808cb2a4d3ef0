"""Quantile mapping of members (issue 28 item 5): monotone per pixel, rank order kept, fitted out of sample."""

from __future__ import annotations

import numpy as np
import pytest

from precip_cvae.calibration import MAX_TAIL_RATIO, fit_quantile_map


def _gamma_fields(rng, n_members, n_days, shape, p_wet, scale):
    """Members or observations: Bernoulli(p_wet) x Gamma(0.8, scale) per pixel, (n_members, n_days, h, w)."""
    wet = rng.random((n_members, n_days, *shape)) < p_wet
    return np.where(wet, rng.gamma(0.8, scale, size=(n_members, n_days, *shape)), 0.0)


def test_map_corrects_a_too_light_model_toward_the_observed_distribution():
    rng = np.random.default_rng(0)
    obs = _gamma_fields(rng, 1, 3000, (2, 3), 0.4, 10.0)[0]  # the truth: mean 0.4 * 0.8 * 10 = 3.2
    members = _gamma_fields(rng, 4, 3000, (2, 3), 0.4, 5.0)  # half as intense
    qmap = fit_quantile_map(members, obs)
    new = _gamma_fields(rng, 4, 3000, (2, 3), 0.4, 5.0)  # other days of the same model
    mapped = qmap.apply(new)
    truth = _gamma_fields(rng, 1, 3000, (2, 3), 0.4, 10.0)[0]
    for q in (0.8, 0.9, 0.99):  # the median is 0 (60 % dry)
        want = np.quantile(truth, q)
        assert np.quantile(mapped, q) == pytest.approx(want, rel=0.1)
        assert np.quantile(new, q) < 0.7 * want  # the raw model is clearly off
    assert mapped.mean() == pytest.approx(truth.mean(), rel=0.06)


def test_map_is_monotone_keeps_rank_order_zero_nan_and_the_tail():
    rng = np.random.default_rng(1)
    obs = _gamma_fields(rng, 1, 500, (3, 3), 0.5, 8.0)[0]
    obs[:, 0, 0] = np.nan  # a masked pixel: its values pass through
    members = _gamma_fields(rng, 3, 500, (3, 3), 0.6, 4.0)
    qmap = fit_quantile_map(members, obs)
    # monotone per pixel, including far beyond the fitted range (tail extrapolation is continuous)
    grid = np.linspace(0, 400, 2001)
    values = np.broadcast_to(grid[:, None, None], (grid.size, 3, 3)).copy()
    out = qmap.apply(values)
    assert (np.diff(out[:, 1:, 1:], axis=0) >= -1e-12).all()
    np.testing.assert_array_equal(out[:, 0, 0], grid)  # the masked pixel: unchanged
    assert (out[0] == 0).all()  # 0 stays 0
    top_x, top_y = qmap.model_q[-1, 1, 1], qmap.obs_q[-1, 1, 1]
    ratio = np.clip(top_y / top_x, 1 / MAX_TAIL_RATIO, MAX_TAIL_RATIO)
    assert qmap.apply(np.full((1, 3, 3), top_x + 10.0))[0, 1, 1] == pytest.approx(top_y + 10.0 * ratio)
    # each day's members keep their rank order at every pixel (ECC): ties only where the map is flat at 0
    ens = _gamma_fields(rng, 6, 20, (3, 3), 0.6, 4.0)
    ens[0, 0] = np.nan
    mapped = qmap.apply(ens)
    assert np.isnan(mapped[0, 0]).all() and np.isfinite(mapped[1:]).all()
    order = np.argsort(ens[:, 1:], axis=0, kind="stable")
    ranked = np.take_along_axis(mapped[:, 1:], order, axis=0)
    assert (np.diff(ranked, axis=0) >= 0).all()
    assert mapped.dtype == ens.dtype


def test_map_is_fitted_without_the_days_it_is_applied_to():
    """Changing the truth of the days the map is applied to changes nothing: only the fit days' truth enters."""
    rng = np.random.default_rng(2)
    fit_obs = _gamma_fields(rng, 1, 400, (2, 2), 0.5, 6.0)[0]
    fit_members = _gamma_fields(rng, 4, 400, (2, 2), 0.5, 3.0)
    apply_members = _gamma_fields(rng, 4, 50, (2, 2), 0.5, 3.0)
    a = fit_quantile_map(fit_members, fit_obs).apply(apply_members)
    b = fit_quantile_map(fit_members, fit_obs).apply(apply_members)
    np.testing.assert_array_equal(a, b)
    # and a fit day's truth does move it
    fit_obs2 = fit_obs.copy()
    fit_obs2[fit_obs2 > 0] *= 3
    c = fit_quantile_map(fit_members, fit_obs2).apply(apply_members)
    assert not np.allclose(a, c)


def test_fit_leaves_out_member_values_where_the_truth_is_missing_and_checks_shapes():
    rng = np.random.default_rng(3)
    obs = _gamma_fields(rng, 1, 300, (1, 2), 0.5, 6.0)[0]
    members = _gamma_fields(rng, 2, 300, (1, 2), 0.5, 6.0)
    obs2 = obs.copy()
    obs2[:100, 0, 0] = np.nan
    members2 = members.copy()
    members2[:, :100, 0, 0] = 1e6  # never seen: the truth is missing on those days
    q = fit_quantile_map(members2, obs2)
    ref = fit_quantile_map(members[:, 100:], obs[100:])
    np.testing.assert_allclose(q.model_q[:, 0, 0], ref.model_q[:, 0, 0])
    with pytest.raises(ValueError, match="must agree"):
        fit_quantile_map(members[:, :10], obs)
    with pytest.raises(ValueError, match="grid"):
        q.apply(np.zeros((2, 3, 3)))
