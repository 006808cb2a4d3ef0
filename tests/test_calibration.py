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


# ----------------------------------------------------------------------------- fitted a block of days at a time


def _fit_case(seed: int):
    """Members and observations with dry days, tiny amounts (< 0.01 mm), a masked pixel, a missing day and a
    pixel with 9 observed days (too few: NaN quantiles)."""
    rng = np.random.default_rng(seed)
    obs = _gamma_fields(rng, 1, 300, (6, 7), 0.4, 6.0)[0]
    members = _gamma_fields(rng, 4, 300, (6, 7), 0.5, 7.0)
    obs[:, 0, 0] = np.nan
    members[:, :, 0, 0] = np.nan
    obs[5, 2, 2] = np.nan
    obs[9:, 3, 3] = np.nan
    obs[obs < 0.3] *= 0.01  # amounts below STREAM_LOW
    return members, obs


def _fit_in_blocks(members, obs, exact_bytes=None, block=64):
    from precip_cvae.calibration import QuantileMapFit

    fit = QuantileMapFit(members.shape[0], obs.shape[0], obs.shape[1:], exact_bytes=exact_bytes)
    for s in range(0, obs.shape[0], block):
        fit.add(members[:, s:s + block], obs[s:s + block])
    return fit, fit.finish()


def test_the_fit_in_blocks_is_exact_while_the_members_fit_its_budget():
    members, obs = _fit_case(0)
    fit, qmap = _fit_in_blocks(members, obs)
    ref = fit_quantile_map(members, obs)
    assert fit.exact and qmap.n_days == 300
    np.testing.assert_array_equal(qmap.model_q, ref.model_q)
    np.testing.assert_array_equal(qmap.obs_q, ref.obs_q)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_streamed_fit_is_within_a_bin_of_the_exact_quantiles(seed):
    """Beyond the budget each pixel's values are counted in log-spaced bins: every order statistic lies in its own
    bin, so each quantile is within max(STREAM_RATIO x the upper order statistic, 0.01 mm/day) of the exact one;
    zeros stay exact, the masked and the too-rarely observed pixels stay NaN, and the map's members keep the
    exact map's values within the same tolerance."""
    from precip_cvae.calibration import STREAM_BINS, STREAM_RATIO

    members, obs = _fit_case(seed)
    fit, qmap = _fit_in_blocks(members, obs, exact_bytes=0)
    ref = fit_quantile_map(members, obs)
    assert not fit.exact and STREAM_RATIO == pytest.approx(10 ** (6 / 512) - 1)
    seen = np.where(np.isfinite(obs)[None], members, np.nan).reshape(-1, *obs.shape[1:])
    for got, want, values in ((qmap.model_q, ref.model_q, seen), (qmap.obs_q, ref.obs_q, obs)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[:, 0, 0]).all() and np.isnan(got[:, 3, 3]).all()
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
            upper = np.maximum.accumulate(np.nanquantile(values, ref.levels, axis=0, method="higher"), axis=0)
        ok = np.isfinite(want)
        assert (np.abs(got - want)[ok] <= np.maximum(STREAM_RATIO * upper[ok], 0.01) + 1e-12).all()
        assert (got[ok][want[ok] == 0] == 0).all() and (want[ok] == 0).sum() > 100
        assert np.median(np.abs(got - want)[ok & (want > 1)] / want[ok & (want > 1)]) < 0.005
    # memory: two histograms per pixel, whatever the number of days
    assert sum(c.nbytes for c in fit._counts.values()) == 2 * 42 * (STREAM_BINS + 3) * 4
    new = _gamma_fields(np.random.default_rng(9), 3, 50, (6, 7), 0.5, 7.0)
    np.testing.assert_allclose(qmap.apply(new), ref.apply(new), rtol=0.06, atol=0.05)


def test_the_streamed_fit_leaves_out_members_where_the_observation_is_missing():
    members, obs = _fit_case(3)
    other = members.copy()
    other[:, 5, 2, 2] = 1e3  # obs[5, 2, 2] is missing: that member value is not part of the fit
    a = _fit_in_blocks(members, obs, exact_bytes=0)[1]
    b = _fit_in_blocks(other, obs, exact_bytes=0, block=7)[1]
    np.testing.assert_array_equal(a.model_q, b.model_q)
    np.testing.assert_array_equal(a.obs_q, b.obs_q)
    with pytest.raises(ValueError, match="no fit day"):
        _fit_in_blocks(members[:, :0], obs[:0], exact_bytes=0)


def test_the_streamed_fit_leaves_out_infinite_members_as_the_exact_fit_does():
    """A member value of +inf (expm1 of a runaway model value) is left out by both fits, so the top quantiles stay
    finite (counted, it set the overflow bin's top to inf and the pixel's map to NaN)."""
    members, obs = _fit_case(4)
    members[1, 20, 4, 4] = np.inf
    exact = fit_quantile_map(members, obs)
    streamed = _fit_in_blocks(members, obs, exact_bytes=0)[1]
    assert np.isfinite(exact.model_q[:, 4, 4]).all() and np.isfinite(streamed.model_q[:, 4, 4]).all()
    finite = members.copy()
    finite[1, 20, 4, 4] = np.nan
    np.testing.assert_array_equal(streamed.model_q, _fit_in_blocks(finite, obs, exact_bytes=0)[1].model_q)
