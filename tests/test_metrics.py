"""Metrics checked against numbers computed by hand."""

import numpy as np
import pytest

from precip_cvae import metrics as m


# ----------------------------------------------------------------------------- deterministic


def test_mae_tail_rmse_ext_by_hand():
    obs = np.array([[[0.0, 10.0], [20.0, np.nan]]])  # (1, 2, 2)
    pred = np.array([[[1.0, 7.0], [26.0, 1000.0]]])
    assert m.mae(pred, obs) == pytest.approx((1 + 3 + 6) / 3)
    # obs > 5: pixels 10 and 20 -> errors 3, 6
    assert m.mae_tail(pred, obs, 5.0) == pytest.approx(4.5)
    assert m.rmse_ext(pred, obs, 5.0) == pytest.approx(np.sqrt((9 + 36) / 2))
    # per-pixel threshold map (H, W): only the 20 pixel exceeds 15
    thr = np.array([[0.0, 15.0], [15.0, 0.0]])
    assert m.mae_tail(pred, obs, thr) == pytest.approx(6.0)
    assert np.isnan(m.mae_tail(pred, obs, 100.0))
    assert np.isnan(m.rmse_ext(pred, obs, 100.0))


def test_pearson_pooled():
    obs = np.array([[[1.0, 2.0], [3.0, np.nan]], [[4.0, 5.0], [6.0, np.nan]]])
    assert m.pearson(2 * obs + 1, obs) == pytest.approx(1.0)
    assert m.pearson(-obs, obs) == pytest.approx(-1.0)
    assert np.isnan(m.pearson(np.ones_like(obs), obs))  # zero variance


def test_nan_pixels_ignored_same_as_removed():
    rng = np.random.default_rng(1)
    obs = rng.gamma(0.5, 5.0, size=(3, 4, 5))
    ens = rng.gamma(0.5, 5.0, size=(6, 3, 4, 5))
    mask = rng.random(obs.shape) < 0.3
    obs_nan = np.where(mask, np.nan, obs)
    ens_junk = np.where(mask, 1e6, ens)  # forecast values at masked pixels must not matter
    v = ~mask
    # the same data with the masked pixels removed, as (P,) / (M, P)
    o, e = obs[v], ens[:, v]
    pred = ens_junk.mean(0)
    assert m.mae(pred, obs_nan) == pytest.approx(m.mae(e.mean(0), o))
    assert m.mae_tail(pred, obs_nan, 2.0) == pytest.approx(m.mae_tail(e.mean(0), o, 2.0))
    assert m.pearson(pred, obs_nan) == pytest.approx(m.pearson(e.mean(0), o))
    assert m.frequency_bias(ens_junk, obs_nan, 2.0, member_axis=0) == pytest.approx(
        m.frequency_bias(e, o, 2.0, member_axis=0))
    c = m.crps_ensemble(ens_junk, obs_nan)
    assert np.all(np.isnan(c[mask]))
    assert np.nanmean(c) == pytest.approx(np.mean(m.crps_ensemble(e, o)))
    assert m.spread_skill_ratio(ens_junk, obs_nan) == pytest.approx(m.spread_skill_ratio(e, o))
    np.testing.assert_array_equal(m.rank_histogram(ens_junk, obs_nan, np.random.default_rng(5)),
                                  m.rank_histogram(e, o, np.random.default_rng(5)))
    t1 = m.contingency(ens_junk, obs_nan, 2.0, member_axis=0)
    t2 = m.contingency(e, o, 2.0, member_axis=0)
    assert t1 == t2
    assert sum(t1.values()) == pytest.approx(v.sum())


# ----------------------------------------------------------------------------- categorical


def test_frequency_bias_everywhere():
    obs = np.zeros((1, 4, 5))
    obs[0, 0, 0] = np.nan  # 19 valid pixels
    obs[0, 1, 1] = obs[0, 2, 2] = obs[0, 3, 3] = 50.0  # 3 observed exceedances
    obs[0, 0, 1] = 10.0  # equal to the threshold: not an exceedance (strict >)
    pred = np.full_like(obs, 100.0)  # exceeds everywhere (also at the NaN pixel)
    assert m.frequency_bias(pred, obs, 10.0) == pytest.approx(19 / 3)
    ens = np.stack([pred, np.zeros_like(pred)])  # 19 and 0 exceedances
    assert m.frequency_bias(ens, obs, 10.0, member_axis=0) == pytest.approx(9.5 / 3)
    # member axis anywhere
    assert m.frequency_bias(np.moveaxis(ens, 0, -1), obs, 10.0, member_axis=-1) == pytest.approx(9.5 / 3)
    assert np.isnan(m.frequency_bias(pred, obs, 1000.0))


def test_contingency_pod_far_csi_by_hand():
    obs = np.array([[20.0, 20.0, 20.0, 0.0], [0.0, 0.0, 0.0, np.nan]])
    pred = np.array([[20.0, 20.0, 0.0, 20.0], [0.0, 0.0, 0.0, 20.0]])
    t = m.contingency(pred, obs, 10.0)
    assert t == {"hits": 2.0, "misses": 1.0, "false_alarms": 1.0, "correct_negatives": 3.0}
    assert m.pod(t) == pytest.approx(2 / 3)
    assert m.far(t) == pytest.approx(1 / 3)
    assert m.csi(t) == pytest.approx(2 / 4)
    # member-pooled table of an ensemble: mean counts over members
    ens = np.stack([pred, np.zeros_like(pred)])  # second member: 0 hits, 3 misses, 4 cn
    te = m.contingency(ens, obs, 10.0, member_axis=0)
    assert te == {"hits": 1.0, "misses": 2.0, "false_alarms": 0.5, "correct_negatives": 3.5}
    assert m.csi(te) == pytest.approx(1 / 3.5)
    assert np.isnan(m.pod({"hits": 0, "misses": 0, "false_alarms": 0, "correct_negatives": 5}))


# ----------------------------------------------------------------------------- CRPS


def test_crps_fair_hand_values():
    # members [0, 2], obs 1: E|X-y| = 1, E|X-X'| (fair, M(M-1)) = 4/2 = 2 -> 1 - 1 = 0
    assert m.crps_ensemble(np.array([0.0, 2.0]), np.array(1.0)) == pytest.approx(0.0)
    # members [0, 1, 3], obs 2: E|X-y| = 4/3, sum_{i!=j}|xi-xj| = 12, /6 = 2 -> 4/3 - 1 = 1/3
    # (the non-fair estimator would give 2/3)
    ens = np.array([0.0, 1.0, 3.0])[:, None, None, None] * np.ones((3, 2, 1, 1))
    c = m.crps_ensemble(ens, np.full((2, 1, 1), 2.0))
    np.testing.assert_allclose(c, 1 / 3)


def test_crps_one_member_is_absolute_error():
    rng = np.random.default_rng(0)
    pred = rng.gamma(0.5, 4.0, size=(2, 3, 4))
    obs = rng.gamma(0.5, 4.0, size=(2, 3, 4))
    obs[0, 0, 0] = np.nan
    c = m.crps_ensemble(pred[None], obs)
    np.testing.assert_allclose(c, np.abs(pred - obs))
    assert np.isnan(c[0, 0, 0])


def test_twcrps_zero_below_threshold_and_hand_value():
    rng = np.random.default_rng(0)
    ens = rng.uniform(0, 5, size=(4, 2, 3, 3))
    obs = rng.uniform(0, 5, size=(2, 3, 3))
    np.testing.assert_allclose(m.twcrps_ensemble(ens, obs, 10.0), 0.0, atol=1e-12)
    # members [0, 3, 6], obs 1, thr 2: v -> [2, 3, 6], y -> 2:
    # E|v(X)-v(y)| = 5/3, sum_{i!=j} = 16, /6 = 8/3, half = 4/3 -> 1/3 (plain CRPS: 2/3)
    # second pixel has thr 10: all censored -> 0
    ens = np.array([0.0, 3.0, 6.0])[:, None, None, None] * np.ones((3, 1, 1, 2))
    obs = np.ones((1, 1, 2))
    thr = np.array([[2.0, 10.0]])  # per-pixel (H, W) map
    np.testing.assert_allclose(m.twcrps_ensemble(ens, obs, thr), [[[1 / 3, 0.0]]], atol=1e-12)
    np.testing.assert_allclose(m.crps_ensemble(ens, obs), [[[2 / 3, 2 / 3]]])
    # one member: |max(x, thr) - max(y, thr)|
    np.testing.assert_allclose(m.twcrps_ensemble(np.full((1, 1, 1, 2), 5.0), obs, thr),
                               [[[3.0, 0.0]]])


# ----------------------------------------------------------------------------- FSS


def test_fss_perfect_and_no_overlap():
    obs = np.zeros((20, 20))
    obs[2:4, 2:4] = 30.0
    assert m.fss(obs, obs, 10.0, 1) == pytest.approx(1.0)
    assert m.fss(obs, obs, 10.0, 5) == pytest.approx(1.0)
    far_away = np.zeros((20, 20))
    far_away[15:17, 15:17] = 30.0
    assert m.fss(far_away, obs, 10.0, 1) == pytest.approx(0.0)
    assert m.fss(far_away, obs, 10.0, 41) > 0.9  # whole-domain window: same coverage
    assert np.isnan(m.fss(np.zeros((20, 20)), np.zeros((20, 20)), 10.0, 3))


def test_fss_hand_window_1():
    # obs exceeds at A, B; forecast at B, C: MSE sum 2, reference 2 + 2 -> 0.5
    obs = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    fc = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert m.fss(fc, obs, 0.5, 1) == pytest.approx(0.5)


def test_fss_hand_window_3_with_boundary_normalisation():
    # 3x3 grid, obs exceeds at the centre, forecast at the corner (0, 0).
    # Fractions are divided by the number of in-domain pixels of each window:
    # corners 4, edges 6, centre 9.
    # Po = 1/4 at corners, 1/6 at edges, 1/9 at centre.
    # Pf = 1/4 at (0,0), 1/6 at (0,1),(1,0), 1/9 at (1,1), else 0.
    # MSE sum = 3*(1/16) + 2*(1/36) = 35/144; ref = 169/1296 + 484/1296 = 653/1296
    # FSS = 1 - 315/653 = 338/653
    obs = np.zeros((3, 3))
    obs[1, 1] = 1.0
    fc = np.zeros((3, 3))
    fc[0, 0] = 1.0
    assert m.fss(fc, obs, 0.5, 3) == pytest.approx(338 / 653)
    # (N, H, W): sums aggregated over days -> identical days give the same value
    assert m.fss(np.stack([fc, fc]), np.stack([obs, obs]), 0.5, 3) == pytest.approx(338 / 653)
    # plus a perfect day (MSE 0, reference 2 * 484/1296): 1 - 315 / (653 + 968)
    both = m.fss(np.stack([fc, obs]), np.stack([obs, obs]), 0.5, 3)
    assert both == pytest.approx(1 - 315 / (653 + 2 * 484))


def test_fss_nan_border_equals_cropping():
    rng = np.random.default_rng(3)
    obs = rng.gamma(0.5, 5.0, size=(2, 12, 10))
    fc = rng.gamma(0.5, 5.0, size=(2, 12, 10))
    obs_nan = obs.copy()
    obs_nan[:, :, -2:] = np.nan  # two NaN columns at the edge
    obs_nan[:, 0, :] = np.nan    # and one NaN row
    fc_junk = fc.copy()
    fc_junk[:, :, -2:] = 99.0
    fc_junk[:, 0, :] = 99.0
    for w in (1, 3, 5):
        assert m.fss(fc_junk, obs_nan, 3.0, w) == pytest.approx(
            m.fss(fc[:, 1:, :-2], obs[:, 1:, :-2], 3.0, w))
        ens = np.stack([fc_junk, fc_junk * 0.5])
        assert m.fss_ensemble(ens, obs_nan, 3.0, w) == pytest.approx(
            m.fss_ensemble(ens[:, :, 1:, :-2], obs[:, 1:, :-2], 3.0, w))


def test_fss_ensemble_probability_field():
    obs = np.array([[1.0, 1.0, 0.0, 0.0]])
    ens = np.array([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 0.0]]])  # P = [1, .5, .5, 0]
    # window 1: MSE = 0 + .25 + .25 + 0 = .5; ref = (1 + .25 + .25) + 2 = 3.5
    assert m.fss_ensemble(ens, obs, 0.5, 1) == pytest.approx(1 - 0.5 / 3.5)
    assert m.fss_ensemble(obs[None], obs, 0.5, 3) == pytest.approx(1.0)


def test_fss_useful():
    obs = np.zeros((2, 5, 5))
    obs[0, 0, :] = 20.0  # 5 of 50 pixels
    assert m.fss_useful(obs, 10.0) == pytest.approx(0.5 + 0.1 / 2)
    obs[1, 4, 4] = np.nan  # 5 of 49
    assert m.fss_useful(obs, 10.0) == pytest.approx(0.5 + 5 / 49 / 2)


# ----------------------------------------------------------------------------- ensemble shape


def test_rank_histogram_flat_for_exchangeable_u_for_underdispersed():
    rng = np.random.default_rng(42)
    M, P = 9, 20000
    ens = rng.normal(size=(M, P))
    obs = rng.normal(size=P)
    c = m.rank_histogram(ens, obs, rng)
    assert c.shape == (M + 1,) and c.sum() == P
    np.testing.assert_allclose(c / P, 1 / (M + 1), atol=0.012)
    assert m.rank_histogram_flatness(c) < 3.0  # expected 1 (chi2 / dof)
    c_u = m.rank_histogram(0.3 * ens, obs, rng)
    assert c_u[0] > 2.5 * P / (M + 1) and c_u[-1] > 2.5 * P / (M + 1)
    assert c_u[M // 2] < 0.5 * P / (M + 1)
    assert m.rank_histogram_flatness(c_u) > 100.0


def test_rank_histogram_random_tie_breaking():
    # all zeros (dry): without tie breaking every rank would be 0
    c = m.rank_histogram(np.zeros((4, 5000)), np.zeros(5000), np.random.default_rng(0))
    np.testing.assert_allclose(c / 5000, 0.2, atol=0.025)


def test_rank_histogram_flatness_hand():
    assert m.rank_histogram_flatness([10, 10, 10, 10]) == 0.0
    # E = 10; chi2 = (100 + 100 + 100 + 100) / 10 = 40; / 3
    assert m.rank_histogram_flatness([20, 0, 0, 20]) == pytest.approx(40 / 3)


def test_spread_skill():
    rng = np.random.default_rng(7)
    ens = rng.normal(size=(5, 40000))
    obs = rng.normal(size=40000)
    assert m.spread_skill_ratio(ens, obs) == pytest.approx(1.0, abs=0.03)
    assert m.spread_skill_ratio(0.3 * ens, obs) < 0.5
    # hand case, M = 2: members [0, 2] and [0, 2], obs [1, 3]
    # var (ddof=1) = 2 at both; mean 1; RMSE = sqrt((0 + 4) / 2) = sqrt 2
    e = np.array([[0.0, 0.0], [2.0, 2.0]])
    assert m.spread_skill_ratio(e, np.array([1.0, 3.0])) == pytest.approx(np.sqrt(1.5))
    assert np.isnan(m.spread_skill_ratio(e[:1], np.array([1.0, 3.0])))


# ----------------------------------------------------------------------------- spectra & distributions


def test_rapsd_sinusoid_peak():
    n = 64
    x = np.arange(n)
    field = np.sin(2 * np.pi * 8 * x / n)[None, :] * np.ones((n, 1))
    k, p = m.rapsd(field)
    assert k.shape == p.shape == (n // 2,)
    assert k[np.nanargmax(p)] == pytest.approx(8 / n)
    # all the power sits in that one bin
    others = np.delete(p, np.nanargmax(p))
    assert np.nanmax(others) < 1e-20 * p.max()
    field2 = np.sin(2 * np.pi * 5 * x / n)[:, None] * np.ones((1, n)) + 3.0
    k2, p2 = m.rapsd(field2, spacing=2.0)  # cycles per 2-unit pixel
    assert k2[np.nanargmax(p2)] == pytest.approx(5 / (n * 2.0))
    kk, pm = m.mean_rapsd(np.stack([field, field, field]))
    np.testing.assert_allclose(pm, p)


def test_rapsd_band_log_ratios_by_hand():
    k = 1.0 / np.array([32.0, 16.0, 8.0, 6.0, 4.0, 3.0, 2.0])  # wavelengths in pixels
    p_obs = np.ones(7)
    p_ens = np.array([10.0, 10.0, 1.0, 0.1, 0.1, 0.01, 0.001])  # log10 ratios 1, 1, 0, -1, -1, -2, -3
    out = m.rapsd_band_log_ratios(k, p_ens, p_obs)
    assert out["rapsd_log_ratio_gt8px"] == pytest.approx(1.0)  # wavelengths 32, 16
    assert out["rapsd_log_ratio_4to8px"] == pytest.approx((0 - 1) / 2)  # 8, 6 (4 < wavelength <= 8)
    assert out["rapsd_log_ratio_2to4px"] == pytest.approx((-1 - 2 - 3) / 3)  # 4, 3, 2
    assert np.isnan(m.rapsd_band_log_ratios(k[:2], p_ens[:2], p_obs[:2])["rapsd_log_ratio_2to4px"])


def test_tail_quantiles():
    vals = np.concatenate([np.zeros(500), np.arange(1.0, 102.0), [np.nan]])  # wet: 1..101
    q = m.tail_quantiles(vals, (0.5, 0.99))
    np.testing.assert_allclose(q, [51.0, 100.0])
    assert np.all(np.isnan(m.tail_quantiles(np.zeros(10))))


def test_mass_error():
    ref = np.ones((2, 3, 3))
    ref[1] = 0.0  # dry day -> denominator floored at 0.1
    ref[:, 0, 0] = np.nan
    pred = np.full((2, 3, 3), 2.0)
    pred[:, 0, 0] = 1000.0  # ignored
    np.testing.assert_allclose(m.mass_error(pred, ref), [1.0, 2.0 / 0.1])
    ens = np.stack([pred, pred * 0.5])
    np.testing.assert_allclose(m.mass_error(ens, ref), [[1.0, 20.0], [0.0, 10.0]])


def test_relative_mass_error_is_one_formula_for_numpy_and_torch():
    torch = pytest.importorskip("torch")
    pred, ref = np.array([2.0, 2.0, 0.5]), np.array([1.0, 0.0, 1.0])
    expected = [1.0, 2.0 / 0.1, -0.5]  # (2 - 1) / 1; a dry reference floored at 0.1; (0.5 - 1) / 1
    np.testing.assert_allclose(m.relative_mass_error(pred, ref), expected)
    np.testing.assert_allclose(m.relative_mass_error(torch.tensor(pred), torch.tensor(ref)).numpy(), expected)
    # the training loss's mass term is its absolute value, averaged over the samples
    from precip_cvae.losses import mass_loss

    p = torch.tensor(pred).view(3, 1, 1, 1)
    t = torch.tensor(ref).view(3, 1, 1, 1)
    loss = mass_loss(p, t, torch.ones(3, 1, 1, 1, dtype=torch.bool))
    assert float(loss) == pytest.approx(np.mean(np.abs(expected)))
