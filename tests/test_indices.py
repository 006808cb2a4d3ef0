"""precip_cvae.indices: climate indices with gaps, distribution and spectral scores, GEV levels.

Hand-computed values on a small two-winter record with gaps inside each winter; xclim's own
indices on the full daily series as the second reference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats
from scipy.ndimage import uniform_filter

xclim = pytest.importorskip("xclim")
import xclim.indices as xi  # noqa: E402

from precip_cvae import indices  # noqa: E402

# xclim 0.62 reads a pandas offset attribute that pandas 3 deprecates (the reference calls here)
pytestmark = pytest.mark.filterwarnings("ignore:The 'name' property is deprecated")

# Two winters, each with a gap inside it (days absent from the record).
# Winter 2001: dry spells 30-31 Dec and 25-26 Feb on both sides of the gap (joined: 4 days).
# Winter 2002: wet spells 31 Dec-2 Jan and 5-6 Jan on both sides of the gap (joined: 5 days).
RECORD = [
    ("2000-12-28", 3.0), ("2000-12-29", 6.0), ("2000-12-30", 0.0), ("2000-12-31", 0.5),
    ("2001-02-25", 0.2), ("2001-02-26", 0.0), ("2001-02-27", 12.0), ("2001-02-28", 2.0),
    ("2001-12-30", 0.0), ("2001-12-31", 1.0), ("2002-01-01", 4.0), ("2002-01-02", 8.0),
    ("2002-01-05", 20.0), ("2002-01-06", 5.0), ("2002-01-07", 0.0),
]
DATES = [d for d, _ in RECORD]
P95, P99 = 5.0, 10.0


def _record(masked: bool = True) -> np.ndarray:
    """(N, 1, 2): pixel 0 the record, pixel 1 masked (NaN every day)."""
    v = np.full((len(RECORD), 1, 2), np.nan)
    v[:, 0, 0] = [x for _, x in RECORD]
    if not masked:
        v[:, 0, 1] = v[:, 0, 0]
    return v


def _thr(value: float, shape=(1, 2)) -> np.ndarray:
    return np.full(shape, value)


def _xclim_reference(values, dates, calendar, p95, p99, season_year):
    """xclim on the full daily series, mean over the periods with a scored day."""
    pr = indices.daily_series(values, dates, calendar)
    freq = indices.period_freq(season_year)
    t95 = xr.DataArray(p95, dims=("lat", "lon"), attrs={"units": "mm/d"})
    t99 = xr.DataArray(p99, dims=("lat", "lon"), attrs={"units": "mm/d"})
    with xclim.set_options(run_length_ufunc=False), np.errstate(invalid="ignore", divide="ignore"):
        ref = {
            "rx1day": xi.max_1day_precipitation_amount(pr, freq=freq),
            "sdii": xi.daily_pr_intensity(pr, thresh="1 mm/d", freq=freq),
            "r95ptot": xi.fraction_over_precip_thresh(pr, t95, thresh="1 mm/d", freq=freq),
            "r99ptot": xi.fraction_over_precip_thresh(pr, t99, thresh="1 mm/d", freq=freq),
            "cwd": xi.maximum_consecutive_wet_days(pr, thresh="1 mm/d", freq=freq),
            "cdd": xi.maximum_consecutive_dry_days(pr, thresh="1 mm/d", freq=freq),
            "days_above_p99": xi.days_over_precip_thresh(pr, t99, thresh="1 mm/d", freq=freq),
        }
    scored = pr.notnull().any(("lat", "lon")).resample(time=freq).sum() > 0
    masked = ~np.isfinite(values).any(axis=0)
    out = {}
    for name, da in ref.items():
        m = da.astype(float).where(scored).mean("time", skipna=True).values
        m[masked] = np.nan
        out[name] = m
    return out


# ----------------------------------------------------------------------------- daily series


def test_daily_series_fills_every_calendar_day_and_gaps_are_nan():
    pr = indices.daily_series(_record(), DATES, "noleap")
    assert pr.dims == ("time", "lat", "lon")
    assert pr.attrs["units"] == "mm/d"
    # 2000-12-28 .. 2002-01-07 in a 365-day calendar
    assert pr.sizes["time"] == 4 + 365 + 7
    assert pr.time.values[0].calendar == "noleap"
    got = pr.isel(lat=0, lon=0)
    assert int(got.notnull().sum()) == len(RECORD)
    assert np.isnan(got.sel(time="2001-01-15")).all()  # a gap day
    assert got.sel(time="2002-01-05").values.tolist() == [20.0]
    assert np.isnan(pr.isel(lat=0, lon=1)).all()  # the masked pixel


def test_daily_series_rejects_dates_outside_the_calendar_and_unsorted():
    with pytest.raises(ValueError, match="2001-02-30"):
        indices.daily_series(np.zeros((1, 1, 1)), ["2001-02-30"], "standard")
    with pytest.raises(ValueError, match="sorted"):
        indices.daily_series(np.zeros((2, 1, 1)), ["2001-01-02", "2001-01-01"], "standard")


# ----------------------------------------------------------------------------- xclim and gaps


def test_xclim_breaks_spells_at_a_missing_day():
    """The facts index_maps relies on: in xclim a NaN day ends a dry and a wet spell."""
    pr = indices.daily_series(_record(), DATES, "noleap").isel(lat=0, lon=0)
    with xclim.set_options(run_length_ufunc=False):
        cdd = xi.maximum_consecutive_dry_days(pr, thresh="1 mm/d", freq="YS-DEC")
        cwd = xi.maximum_consecutive_wet_days(pr, thresh="1 mm/d", freq="YS-DEC")
    # one value per December-November season year, gap years give 0
    np.testing.assert_array_equal(cdd.values, [2, 1])  # not 4 (30 Dec-26 Feb joined)
    np.testing.assert_array_equal(cwd.values, [2, 3])  # not 5 (31 Dec-6 Jan joined)
    # the 1-D path gives the same
    with xclim.set_options(run_length_ufunc=True):
        np.testing.assert_array_equal(
            xi.maximum_consecutive_dry_days(pr, thresh="1 mm/d", freq="YS-DEC", resample_before_rl=True).values,
            [2, 1])


def test_index_maps_djf_by_hand():
    maps = indices.index_maps(_record(), DATES, "noleap", _thr(P95), _thr(P99), season_year="djf")
    # winter 2001: 3 6 0 0.5 | 0.2 0 12 2      winter 2002: 0 1 4 8 | 20 5 0
    expected = {
        "rx1day": (12 + 20) / 2,
        "sdii": ((3 + 6 + 12 + 2) / 4 + (1 + 4 + 8 + 20 + 5) / 5) / 2,  # wet: >= 1
        "r95ptot": ((6 + 12) / 23 + (8 + 20) / 37) / 2,  # > 5 over wet (> 1; the 1.0 is out)
        "r99ptot": (12 / 23 + 20 / 37) / 2,
        "cwd": (2 + 3) / 2,
        "cdd": (2 + 1) / 2,
        "days_above_p99": (1 + 1) / 2,
    }
    assert set(maps) == set(indices.INDEX_NAMES)
    for name, value in expected.items():
        assert maps[name].shape == (1, 2)
        np.testing.assert_allclose(maps[name][0, 0], value, rtol=1e-12, err_msg=name)
        assert np.isnan(maps[name][0, 1]), name  # masked pixel


def test_index_maps_calendar_years_by_hand():
    maps = indices.index_maps(_record(), DATES, "noleap", _thr(P95), _thr(P99), season_year="calendar")
    # 2000: 3 6 0 0.5     2001: 0.2 0 12 2 | 0 1     2002: 4 8 | 20 5 0
    expected = {
        "rx1day": (6 + 12 + 20) / 3,
        "sdii": ((3 + 6) / 2 + (12 + 2 + 1) / 3 + (4 + 8 + 20 + 5) / 4) / 3,
        "r95ptot": (6 / 9 + 12 / 14 + 28 / 37) / 3,
        "r99ptot": (0 / 9 + 12 / 14 + 20 / 37) / 3,
        "cwd": (2 + 2 + 2) / 3,  # 2002: 1-2 Jan and 5-6 Jan are not joined across the gap
        "cdd": (2 + 2 + 1) / 3,
        "days_above_p99": (0 + 1 + 1) / 3,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(maps[name][0, 0], value, rtol=1e-12, err_msg=name)
        assert np.isnan(maps[name][0, 1]), name


@pytest.mark.parametrize("season_year", ["djf", "calendar"])
def test_index_maps_equal_xclim_on_the_full_daily_series(season_year):
    v = _record()
    got = indices.index_maps(v, DATES, "noleap", _thr(P95), _thr(P99), season_year=season_year)
    ref = _xclim_reference(v, DATES, "noleap", _thr(P95), _thr(P99), season_year)
    for name in indices.INDEX_NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("calendar", ["standard", "360_day"])
@pytest.mark.parametrize("season_year", ["djf", "calendar"])
def test_index_maps_equal_xclim_on_random_winters(calendar, season_year):
    rng = np.random.default_rng(3)
    days = xr.date_range("2000-12-01", "2004-02-28", freq="D", calendar=calendar, use_cftime=True)
    keep = np.array([d.month in (12, 1, 2) for d in days]) & (rng.random(len(days)) > 0.1)
    dates = [f"{d.year:04d}-{d.month:02d}-{d.day:02d}" for d in days[keep]]
    v = rng.gamma(0.6, 5.0, size=(len(dates), 3, 4)) * (rng.random((len(dates), 3, 4)) > 0.3)
    v[:, 2, 3] = np.nan
    p95 = rng.uniform(6, 10, (3, 4))
    p99 = p95 + rng.uniform(3, 6, (3, 4))
    got = indices.index_maps(v, dates, calendar, p95, p99, season_year=season_year)
    ref = _xclim_reference(v, dates, calendar, p95, p99, season_year)
    for name in indices.INDEX_NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, equal_nan=True, err_msg=name)
        assert np.isnan(got[name][2, 3]) and np.isfinite(got[name][:2]).all(), name


def test_index_maps_360_day_calendar():
    dates = ["2001-02-29", "2001-02-30", "2001-12-01"]
    v = np.array([2.0, 3.0, 0.0]).reshape(3, 1, 1)
    maps = indices.index_maps(v, dates, "360_day", _thr(5, (1, 1)), _thr(9, (1, 1)), season_year="djf")
    # winter 2001: 2 3 (wet spell of 2); winter 2002: 0
    np.testing.assert_allclose(maps["rx1day"], [[(3 + 0) / 2]])
    np.testing.assert_allclose(maps["cwd"], [[(2 + 0) / 2]])
    np.testing.assert_allclose(maps["cdd"], [[(0 + 1) / 2]])
    np.testing.assert_allclose(maps["sdii"], [[2.5]])  # winter 2002 has no wet day: undefined
    assert indices.daily_series(v, dates, "360_day").sizes["time"] == 2 + 9 * 30 + 1


def test_index_maps_refuses_a_nan_threshold_at_a_valid_pixel_and_unknown_season_year():
    p95 = _thr(P95)
    p95[0, 0] = np.nan
    with pytest.raises(ValueError, match="p95"):
        indices.index_maps(_record(), DATES, "noleap", p95, _thr(P99))
    with pytest.raises(ValueError, match="calendar.*djf"):
        indices.index_maps(_record(), DATES, "noleap", _thr(P95), _thr(P99), season_year="jja")
    assert indices.period_freq("djf") == "YS-DEC" and indices.period_freq("calendar") == "YS"


# ----------------------------------------------------------------------------- ensemble table


def test_ensemble_index_table_by_hand():
    obs = _record()
    ens = np.stack([obs, 2 * obs])
    ens[:, :, 0, 1] = 7.0  # values at the masked pixel are ignored
    table, bias = indices.ensemble_index_table(ens, obs, DATES, "noleap", _thr(P95), _thr(P99),
                                               season_year="djf")
    assert list(table.columns) == ["index", "obs_mean", "ens_mean", "bias_mean", "abs_bias_mean"]
    assert list(table["index"]) == list(indices.INDEX_NAMES)
    row = table.set_index("index").loc["rx1day"]
    assert row["obs_mean"] == pytest.approx(16.0)
    assert row["ens_mean"] == pytest.approx((16 + 32) / 2)
    assert row["bias_mean"] == pytest.approx(8.0) and row["abs_bias_mean"] == pytest.approx(8.0)
    m_obs = indices.index_maps(obs, DATES, "noleap", _thr(P95), _thr(P99), season_year="djf")
    m_two = indices.index_maps(2 * obs, DATES, "noleap", _thr(P95), _thr(P99), season_year="djf")
    for name in indices.INDEX_NAMES:
        want = (m_obs[name] + m_two[name]) / 2 - m_obs[name]
        np.testing.assert_allclose(bias[name], want, equal_nan=True, err_msg=name)
        assert np.isnan(bias[name][0, 1])
        r = table.set_index("index").loc[name]
        assert r["bias_mean"] == pytest.approx(want[0, 0])
        assert r["abs_bias_mean"] == pytest.approx(abs(want[0, 0]))


def test_ensemble_index_table_members_equal_to_obs_have_no_bias_and_nan_propagates():
    obs = _record(masked=False)
    obs[:, 0, 1] = np.nan
    ens = np.stack([obs, obs, obs])
    table, bias = indices.ensemble_index_table(ens, obs, DATES, "noleap", _thr(P95), _thr(P99))
    np.testing.assert_allclose(table["bias_mean"], 0.0, atol=1e-12)
    np.testing.assert_allclose(table["obs_mean"], table["ens_mean"])
    ens[1, 3, 0, 0] = np.nan  # a broken member at a valid pixel is not hidden
    table, bias = indices.ensemble_index_table(ens, obs, DATES, "noleap", _thr(P95), _thr(P99))
    assert table["bias_mean"].isna().all()
    assert all(np.isnan(b).all() for b in bias.values())


def test_a_missing_observation_is_a_missing_day_for_the_members_too():
    # E-OBS drops stations: a pixel may be NaN on a few days only. It stays scored; on those days
    # the members' values there are ignored, so a member that equals the truth wherever it is
    # observed has no bias, whatever it says on the missing day
    obs = _record(masked=False)
    obs[2, 0, 1] = np.nan
    ens = np.stack([np.nan_to_num(obs, nan=500.0), np.nan_to_num(obs, nan=0.0)])
    table, bias = indices.ensemble_index_table(ens, obs, DATES, "noleap", _thr(P95), _thr(P99))
    np.testing.assert_allclose(table["bias_mean"], 0.0, atol=1e-12)
    assert np.isfinite(bias["rx1day"][0, 1])
    maps = indices.index_maps(obs, DATES, "noleap", _thr(P95), _thr(P99))
    assert table.set_index("index").loc["rx1day", "obs_mean"] == pytest.approx(np.nanmean(maps["rx1day"]))
    rng = np.random.default_rng(1)
    ens = rng.gamma(0.7, 4.0, size=(3, *obs.shape))
    w = indices.wasserstein_map(ens, obs)
    keep = np.isfinite(obs[:, 0, 1])
    assert w[0, 1] == pytest.approx(stats.wasserstein_distance(ens[:, keep, 0, 1].ravel(), obs[keep, 0, 1]))
    pss, _ = indices.perkins_skill_score(np.nan_to_num(obs, nan=999.0)[None], obs)
    assert pss[0, 1] == pytest.approx(1.0)  # the same sample on the observed days
    ens[0, 3, 0, 1] = np.nan  # a member NaN where obs is valid is still a broken forecast
    assert np.isnan(indices.wasserstein_map(ens, obs)[0, 1])


# ----------------------------------------------------------------------------- distributions


def test_wasserstein_map_equals_scipy_and_by_hand():
    rng = np.random.default_rng(0)
    ens = rng.gamma(0.7, 4.0, size=(4, 60, 2, 3))
    obs = rng.gamma(0.7, 5.0, size=(60, 2, 3))
    obs[:, 1, 2] = np.nan
    w = indices.wasserstein_map(ens, obs)
    assert np.isnan(w[1, 2])
    for i, j in [(0, 0), (0, 2), (1, 1)]:
        assert w[i, j] == pytest.approx(stats.wasserstein_distance(ens[:, :, i, j].ravel(), obs[:, i, j]),
                                        rel=1e-12)
    # by hand: obs {0, 1}, members {1, 2}: every quantile one apart
    assert indices.wasserstein_map(np.array([[1.0, 2.0]]).reshape(1, 2, 1, 1),
                                   np.array([0.0, 1.0]).reshape(2, 1, 1))[0, 0] == pytest.approx(1.0)


def test_perkins_skill_score():
    rng = np.random.default_rng(1)
    obs = rng.gamma(0.7, 5.0, size=(200, 2, 2))
    obs[:, 0, 1] = np.nan
    same, mean_same = indices.perkins_skill_score(np.stack([obs, obs]), obs)
    np.testing.assert_allclose(same[np.isfinite(obs[0])], 1.0)
    assert np.isnan(same[0, 1]) and mean_same == pytest.approx(1.0)
    shifted, mean_shifted = indices.perkins_skill_score(np.stack([obs + 3.0]), obs)
    assert np.all(shifted[np.isfinite(obs[0])] < 0.9) and mean_shifted < 0.9
    # by hand, 1 mm bins [0, 1), [1, 2), [2, 3]: obs 1/2 1/2 0, model 1/2 0 1/2
    pss, mean = indices.perkins_skill_score(np.array([0.5, 2.5]).reshape(1, 2, 1, 1),
                                            np.array([0.5, 1.5]).reshape(2, 1, 1))
    assert pss[0, 0] == pytest.approx(0.5) and mean == pytest.approx(0.5)
    # wet days only: obs {1.5}, model {2.5} -> disjoint
    pss, _ = indices.perkins_skill_score(np.array([0.5, 2.5]).reshape(1, 2, 1, 1),
                                         np.array([0.5, 1.5]).reshape(2, 1, 1), wet_threshold=1.0)
    assert pss[0, 0] == pytest.approx(0.0)


def test_perkins_skill_score_bounds_its_counts_when_one_value_is_huge(monkeypatch):
    """A member of 10^6 mm/day makes 10^6 one-mm bins: the pixels are taken fewer at a time, so no more than
    _HISTOGRAM_CELLS counts are held at once, and the scores are those of one pass over all pixels (on BoM radar the
    one pass asked for 20 GB)."""
    rng = np.random.default_rng(3)
    obs = rng.gamma(0.7, 5.0, size=(30, 6, 5))
    ens = rng.gamma(0.7, 5.0, size=(2, 30, 6, 5))
    ens[1, 4, 2, 3] = 1.0e6
    sizes = []
    histograms = indices._histograms
    monkeypatch.setattr(indices, "_histograms", lambda x, e, k: sizes.append(x.shape[1] * (e.size - 1))
                        or histograms(x, e, k))
    monkeypatch.setattr(indices, "_HISTOGRAM_CELLS", 10**13)  # one pass over all 30 pixels
    whole, mean_whole = indices.perkins_skill_score(ens, obs)
    assert max(sizes) == 30 * (10**6 + 1)
    sizes.clear()
    monkeypatch.setattr(indices, "_HISTOGRAM_CELLS", 2 * 10**6 + 100)  # two pixels per chunk
    chunked, mean_chunked = indices.perkins_skill_score(ens, obs)
    assert max(sizes) <= 2 * 10**6 + 100 and len(sizes) == 2 * 15
    np.testing.assert_array_equal(chunked, whole)
    assert mean_chunked == mean_whole and 0 < mean_whole < 1


def _fields(n=6, size=16, seed=2):
    rng = np.random.default_rng(seed)
    f = uniform_filter(rng.gamma(0.5, 8.0, size=(n, size, size)), size=(1, 3, 3))
    f[:, 0, :2] = np.nan  # two masked pixels
    return f


@pytest.mark.parametrize("definition", ["ml-bench", "harris"])
def test_ralsd_zero_for_the_truth_positive_for_a_smoothed_field(definition):
    obs = _fields()
    assert indices.ralsd(np.stack([obs, obs]), obs, definition) == pytest.approx(0.0, abs=1e-12)
    smooth = uniform_filter(np.nan_to_num(obs), size=(1, 5, 5))
    d = indices.ralsd(np.stack([smooth, obs]), obs, definition)
    assert d > 0.1
    broken = np.stack([obs.copy()])
    broken[0, 1, 5, 5] = np.nan
    assert np.isnan(indices.ralsd(broken, obs, definition))


def test_ralsd_ml_bench_by_hand_on_mean_spectra():
    from precip_cvae.metrics import mean_rapsd

    obs = _fields()
    member = 1.7 * obs + 0.3  # every power scaled by 1.7**2 (the mean is removed)
    _, p_obs = mean_rapsd(obs)
    assert np.all(p_obs > 0)
    want = (10 * np.log10(1.7 ** 2)) ** 2  # dB^2, no square root
    assert indices.ralsd(member[None], obs, "ml-bench") == pytest.approx(want, rel=1e-9)
    assert indices.ralsd(member[None], obs, "harris") == pytest.approx(np.sqrt(want), rel=1e-9)
    with pytest.raises(ValueError, match="ml-bench"):
        indices.ralsd(member[None], obs, "nope")


# ----------------------------------------------------------------------------- extremes


def test_seasonal_maxima_of_the_domain_mean():
    v = np.full((len(RECORD), 1, 2), np.nan)
    v[:, 0, 0] = [x for _, x in RECORD]
    v[:, 0, 1] = 0.0  # a dry pixel halves the domain mean
    djf = indices.seasonal_maxima(v, DATES, "djf")
    pd.testing.assert_index_equal(djf.index, pd.Index([2001, 2002], name="season_year"))
    np.testing.assert_allclose(djf.values, [6.0, 10.0])
    cal = indices.seasonal_maxima(v[:, 0, 0], DATES, "calendar")
    np.testing.assert_allclose(cal.values, [6.0, 12.0, 20.0])
    assert list(cal.index) == [2000, 2001, 2002]


def test_gev_return_levels_recover_a_known_gev():
    truth = stats.genextreme(c=-0.1, loc=10.0, scale=3.0)
    sample = truth.rvs(size=2000, random_state=np.random.default_rng(0))
    table = indices.gev_return_levels(sample, n_boot=100, seed=0)
    assert list(table.columns) == ["period", "level", "lower", "upper"]
    np.testing.assert_array_equal(table["period"], [2, 5, 10, 20])
    assert np.all(table["lower"] < table["level"]) and np.all(table["level"] < table["upper"])
    row = table.set_index("period").loc[20]
    true20 = truth.ppf(1 - 1 / 20)
    assert row["level"] == pytest.approx(true20, rel=0.03)
    assert row["lower"] <= true20 <= row["upper"]
    # the same seed gives the same interval, another seed another one
    small = sample[:30]
    first = indices.gev_return_levels(small, n_boot=20, seed=1)
    pd.testing.assert_frame_equal(first, indices.gev_return_levels(small, n_boot=20, seed=1))
    assert not first.equals(indices.gev_return_levels(small, n_boot=20, seed=2))
    pd.testing.assert_series_equal(first["level"], indices.gev_return_levels(small, n_boot=20, seed=2)["level"])


def test_gev_return_levels_refuse_fewer_than_five_maxima():
    with pytest.raises(ValueError, match="at least 5 block maxima, got 4"):
        indices.gev_return_levels([10.0, 12.0, 9.0, 15.0])
    with pytest.raises(ValueError, match="equal"):
        indices.gev_return_levels([3.0] * 6)
