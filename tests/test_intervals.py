"""Bootstrap intervals: per-day components that sum to score's values, histogram quantiles, coverage, blocks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate import intervals as iv
from precip_cvae.evaluate import names
from precip_cvae.evaluate import score as scoring

WINDOWS = (1, 3)


def _rain(seed=0, m=4, n=12, h=8, w=8):
    """Gamma rain with dry pixels, one masked pixel, and thresholds with a local patch."""
    rng = np.random.default_rng(seed)
    obs = rng.gamma(0.5, 6.0, (n, h, w))
    obs[obs < 1.0] = 0.0
    obs[:, 0, 0] = np.nan
    ens = rng.gamma(0.5, 6.0, (m, n, h, w))
    ens[ens < 1.0] = 0.0
    thr = {"p95": np.full((h, w), 8.0), "p99": np.full((h, w), 14.0)}
    thr["p99"][2:4, 2:4] = 20.0
    return ens, obs, thr


def _check_against_score(comp, ens, obs, thr, days):
    want, _ = scoring.score(ens[:, days], obs[days], {k: (t[days] if t.ndim == 3 else t) for k, t in thr.items()},
                            windows=WINDOWS)
    for metric, a in comp.items():
        if metric == "tail_q99_ratio":
            continue
        got = iv.finish(metric, a[days].sum(axis=0))
        assert np.isfinite(want[metric]), metric
        np.testing.assert_allclose(got, want[metric], rtol=1e-10, atol=0, err_msg=metric)


def test_components_summed_over_days_give_the_scores_of_score():
    """Every decomposed score, on all 12 days and on 5 of them, equals score.score's value (components in
    chunks of 5 days, score in one)."""
    ens, obs, thr = _rain()
    comp = iv.day_components(ens, obs, thr, windows=WINDOWS, chunk_days=5)
    assert set(comp) == set(iv.available_metrics(list(thr), WINDOWS))
    assert all(a.shape[0] == 12 for a in comp.values())
    _check_against_score(comp, ens, obs, thr, np.arange(12))
    _check_against_score(comp, ens, obs, thr, np.array([0, 3, 4, 7, 11]))


def test_domain_mean_scores_by_hand():
    """crps_field and spread_skill_field: the fair CRPS and the spread/skill of the domain means over each day's
    valid points, written out here without the package's CRPS."""
    ens, obs, thr = _rain(seed=3)
    obs[4] = np.nan  # a day without any valid point counts for nothing
    m = ens.shape[0]
    comp = iv.day_components(ens, obs, thr, windows=WINDOWS, chunk_days=5, which=["crps_field", "spread_skill_field"])
    days = [d for d in range(obs.shape[0]) if d != 4]
    crps, var, err = [], [], []
    for d in days:
        v = np.isfinite(obs[d])
        y = obs[d][v].mean()
        x = np.array([ens[k, d][v].mean() for k in range(m)])
        pairs = np.abs(x[:, None] - x[None, :]).sum() / (m * (m - 1))
        crps.append(np.abs(x - y).mean() - pairs / 2)
        var.append((m + 1) / m * x.var(ddof=1))
        err.append((x.mean() - y) ** 2)
    assert comp["crps_field"][4].tolist() == [0.0, 0.0]
    assert iv.finish("crps_field", comp["crps_field"].sum(axis=0)) == pytest.approx(np.mean(crps), rel=1e-10)
    assert iv.finish("spread_skill_field", comp["spread_skill_field"].sum(axis=0)) == pytest.approx(
        np.sqrt(np.sum(var) / np.sum(err)), rel=1e-10)
    # independent pixels average out: members that keep each value but shuffle it over the cells have as much
    # spread per point and less for the domain than members that move together
    rng = np.random.default_rng(0)
    common = rng.normal(0.0, 1.0, (8, 50, 1, 1))
    together = 5.0 + common + 0.3 * rng.normal(size=(8, 50, 6, 6))
    truth = 5.0 + rng.normal(0.0, 1.0, (50, 1, 1)) + 0.3 * rng.normal(size=(50, 6, 6))
    scattered = 5.0 + np.sqrt(1.09) * rng.normal(size=(8, 50, 6, 6))
    ss = {}
    for name, e in (("together", together), ("scattered", scattered)):
        c = iv.day_components(e, truth, {"p95": np.full((6, 6), 8.0), "p99": np.full((6, 6), 14.0)},
                              windows=WINDOWS, which=["spread_skill", "spread_skill_field"])
        ss[name] = {k: iv.finish(k, a.sum(axis=0)) for k, a in c.items()}
    assert ss["together"]["spread_skill"] == pytest.approx(ss["scattered"]["spread_skill"], rel=0.1)
    assert ss["together"]["spread_skill_field"] > 0.8 and ss["scattered"]["spread_skill_field"] < 0.3


def test_components_with_per_day_thresholds():
    """Thresholds given per day (N, h, w) are sliced with the day chunks."""
    ens, obs, thr = _rain(seed=1)
    scale = np.linspace(0.7, 1.3, obs.shape[0])[:, None, None]
    per_day = {k: t[None] * scale for k, t in thr.items()}
    comp = iv.day_components(ens, obs, per_day, windows=WINDOWS, chunk_days=5)
    _check_against_score(comp, ens, obs, per_day, np.arange(12))
    _check_against_score(comp, ens, obs, per_day, np.array([1, 2, 8]))


def test_one_member_has_no_spread_skill():
    ens, obs, thr = _rain()
    comp = iv.day_components(ens[:1], obs, thr, windows=WINDOWS, which=["spread_skill", "crps"])
    assert set(comp) == {"spread_skill", "crps"}
    assert np.isnan(iv.finish("spread_skill", comp["spread_skill"].sum(axis=0)))
    with pytest.raises(ValueError, match="valid"):
        iv.day_components(ens, obs, thr, windows=WINDOWS, which=["crps", "fss_p99_w5"])
    with pytest.raises(ValueError, match="known forms"):
        iv.finish("rank_flatness", np.ones(2))


def test_tail_ratio_from_histograms_is_within_the_stated_bound():
    """tail_q99_ratio from the summed histograms vs score's tail_q99_ens / tail_q99_obs (np.quantile), and each
    histogram quantile vs np.quantile on continuous values, within the bin's relative width."""
    ens, obs, thr = _rain(seed=2)
    comp = iv.day_components(ens, obs, thr, windows=WINDOWS, chunk_days=5, which=["tail_q99_ratio"])
    for days in (np.arange(12), np.array([2, 5, 6, 9])):
        want, _ = scoring.score(ens[:, days], obs[days], thr, windows=WINDOWS)
        exact = want["tail_q99_ens"] / want["tail_q99_obs"]
        got = iv.finish("tail_q99_ratio", comp["tail_q99_ratio"][days].sum(axis=0))
        assert abs(got / exact - 1) < iv.TAIL_RATIO_TOLERANCE
    assert iv.TAIL_RATIO_TOLERANCE < 0.005 and iv.WET_BIN_WIDTH == pytest.approx(5000 ** (1 / 4000) - 1)

    rng = np.random.default_rng(3)
    x = 1.0 + rng.lognormal(1.0, 1.2, 20000)  # wet values, wet threshold 1
    hist = np.bincount(np.searchsorted(iv.WET_EDGES, x, side="right") - 1, minlength=iv.WET_BINS + 1)
    for q in (0.5, 0.9, 0.99, 0.999, 1.0):
        est = iv.hist_quantile(hist, q)
        assert abs(est / np.quantile(x, q) - 1) < iv.WET_BIN_WIDTH, q


def test_resampled_histogram_quantile_equals_the_full_one_and_overflow_is_nan():
    """The coarse-to-fine quantile of the bootstrap is the same number as the quantile of the resampled
    histograms; an order statistic beyond the top edge gives NaN."""
    rng = np.random.default_rng(4)
    b = 30
    h = np.zeros((b, iv.WET_BINS + 1), dtype=np.int32)
    h[:, :3000] = rng.poisson(0.05, (b, 3000))
    h[4, iv.WET_BINS] = 3  # values beyond the top edge on block 4
    counts = rng.multinomial(b, np.ones(b) / b, size=100).astype(float)
    for q in (0.5, 0.99, 1.0):
        full = iv.hist_quantile(counts @ h, q)
        fast = iv._resampled_hist_quantile(counts, h, iv._coarse(h), q)
        np.testing.assert_array_equal(fast, full)
    top = iv.hist_quantile(counts @ h, 1.0)
    assert np.isnan(top[counts[:, 4] > 0]).all() and np.isfinite(top[counts[:, 4] == 0]).all()


def _coverage(draw, truth, reps=300, days=40, samples=500):
    """Share of ``reps`` 90 % intervals (day blocks) that contain ``truth``; ``draw(rng, days)`` -> components."""
    rng = np.random.default_rng(11)
    hit = []
    for r in range(reps):
        comp = draw(rng, days)
        base = [k for k in comp if k != "a"]
        t = iv.bootstrap(comp, np.arange(days), baselines=base, samples=samples, confidence=0.9, seed=r)
        row = t.iloc[-1]
        hit.append(row.lower <= truth <= row.upper)
    return float(np.mean(hit))


def test_intervals_cover_a_known_mean_about_90_percent_of_the_time():
    """iid normal per-day scores of count 1 (mean 2): the interval of the mean covers 2 in 84-96 % of 300
    repetitions of 40 days."""
    def draw(rng, days):
        return {"a": {"crps": np.column_stack([rng.normal(2.0, 1.0, days), np.ones(days)])}}

    assert 0.84 <= _coverage(draw, 2.0) <= 0.96


def test_ratio_intervals_cover_a_known_ratio_of_means_about_90_percent_of_the_time():
    """Paired skewed scores, source = 0.8 x baseline x independent noise of mean 1, counts varying per day:
    the ratio interval covers 0.8 in 84-96 % of 300 repetitions of 40 days."""
    def draw(rng, days):
        count = rng.integers(50, 60, days).astype(float)
        base = rng.gamma(2.0, 1.0, days) * count
        src = 0.8 * base * rng.gamma(20.0, 1 / 20.0, days)
        return {"a": {"crps": np.column_stack([src, count])}, "b": {"crps": np.column_stack([base, count])}}

    assert 0.84 <= _coverage(draw, 0.8) <= 0.96


def test_season_blocks_keep_a_winter_together():
    dates = ["2001-11-30", "2001-12-01", "2002-01-15", "2002-02-28", "2002-03-01", "2002-12-31"]
    np.testing.assert_array_equal(iv.block_labels(dates, "season"),
                                  ["2001-SON", "2002-DJF", "2002-DJF", "2002-DJF", "2002-MAM", "2003-DJF"])
    np.testing.assert_array_equal(iv.block_labels(dates, "season", season_year="calendar"),
                                  ["2001-SON", "2001-DJF", "2002-DJF", "2002-DJF", "2002-MAM", "2002-DJF"])
    np.testing.assert_array_equal(iv.block_labels(dates, "day"), dates)
    with pytest.raises(ValueError, match="valid: day, season"):
        iv.block_labels(dates, "week")


def test_season_bootstrap_resamples_whole_seasons():
    """Bootstrapping days labelled by season is bootstrapping the season sums."""
    dates = np.datetime_as_string(np.datetime64("2000-12-01") + np.arange(730), unit="D")
    labels = iv.block_labels(dates, "season")
    rng = np.random.default_rng(5)
    comp = {"a": {"crps": np.column_stack([rng.gamma(2.0, 1.0, 730), np.ones(730)])}}
    seasons, inverse = np.unique(labels, return_inverse=True)
    summed = {"a": {"crps": np.stack([comp["a"]["crps"][inverse == i].sum(axis=0) for i in range(len(seasons))])}}
    by_day = iv.bootstrap(comp, labels, samples=200, seed=3, block="season")
    by_season = iv.bootstrap(summed, seasons, samples=200, seed=3, block="season")
    assert by_day.n_blocks.iloc[0] == 8 and by_day.block.iloc[0] == "season"
    np.testing.assert_allclose(by_day[["value", "lower", "upper"]].to_numpy(),
                               by_season[["value", "lower", "upper"]].to_numpy(), rtol=1e-12)


def _sources(seed=6):
    """Components of a close ensemble, the same ensemble again, and a far one, on the same days."""
    rng = np.random.default_rng(seed)
    _, obs, thr = _rain(seed=seed, n=20)
    valid_obs = np.nan_to_num(obs)
    good = valid_obs[None] * rng.lognormal(0.0, 0.1, (4,) + obs.shape)
    bad = valid_obs[None] * rng.lognormal(0.0, 0.8, (4,) + obs.shape) + rng.gamma(0.3, 3.0, (4,) + obs.shape)
    which = ["crps", "twcrps_p99", "fss_p99_w3", "freq_bias_p99", "csi_p99", "spread_skill", "tail_q99_ratio"]
    comp = {name: iv.day_components(e, obs, thr, windows=WINDOWS, which=which)
            for name, e in (("good", good), ("bad", bad))}
    comp["copy"] = {k: a.copy() for k, a in comp["good"].items()}
    return comp


def test_paired_ratios_of_a_source_to_itself_and_to_a_worse_one():
    comp = _sources()
    t = iv.bootstrap(comp, np.arange(20), baselines=["good", "bad"], samples=300, seed=1)
    assert list(t.columns) == iv.INTERVAL_COLUMNS
    plain = t[t.baseline == ""]
    assert len(plain) == 3 * 7 and (plain.lower <= plain.value).all() and (plain.value <= plain.upper).all()
    same = t[(t.source == "copy") & (t.baseline == "good")]
    assert len(same) == 7
    assert (same.value == 1.0).all() and (same.lower == 1.0).all() and (same.upper == 1.0).all()
    crps = comp["good"]["crps"][:, 0] / comp["good"]["crps"][:, 1]
    assert (crps < comp["bad"]["crps"][:, 0] / comp["bad"]["crps"][:, 1]).all()  # better on every day
    row = t[(t.source == "good") & (t.baseline == "bad") & (t.metric == "crps")].iloc[0]
    assert row.lower <= row.value <= row.upper < 1.0
    value = plain[(plain.source == "good") & (plain.metric == "crps")].value.iloc[0]
    assert value == pytest.approx(comp["good"]["crps"][:, 0].sum() / comp["good"]["crps"][:, 1].sum(), rel=1e-12)
    assert not (t.baseline == t.source).any()


def test_bca_falls_back_to_percentile_where_it_is_undefined(caplog):
    comp = _sources()
    with caplog.at_level(logging.WARNING, logger="precip_cvae.evaluate.intervals"):
        t = iv.bootstrap(comp, np.arange(20), baselines=["good"], samples=300, seed=1, method="BCa")
    same = t[(t.source == "copy") & (t.baseline == "good")]
    assert (same.lower == 1.0).all() and (same.upper == 1.0).all()
    assert "percentile interval used instead" in caplog.text
    assert np.isfinite(t[t.baseline == ""][["lower", "upper"]].to_numpy()).all()


def test_fewer_than_two_blocks_gives_nan_bounds():
    comp = _sources()
    t = iv.bootstrap(comp, np.zeros(20, dtype=int), baselines=["bad"], samples=100, block="season")
    assert (t.n_blocks == 1).all() and t.lower.isna().all() and t.upper.isna().all()
    assert np.isfinite(t.value).all()
    one = iv.bootstrap({k: {m: a[:1] for m, a in c.items()} for k, c in comp.items()}, ["2001-01-01"],
                       baselines=["bad"])
    assert one.lower.isna().all() and one.upper.isna().all()


def test_undefined_replicates_are_left_out():
    """Observed exceedances on 3 days of 40 only: replicates drawing none have no frequency bias; the
    interval comes from the others."""
    n_fc = np.full(40, 2.0)
    n_obs = np.zeros(40)
    n_obs[[3, 17, 30]] = 3.0
    t = iv.bootstrap({"a": {"freq_bias_p99": np.column_stack([n_fc, n_obs])}}, np.arange(40), samples=500)
    row = t.iloc[0]
    assert row.value == pytest.approx(80 / 9) and np.isfinite(row.lower) and row.lower <= row.value <= row.upper


def test_headline_interval_metrics_are_all_decomposed():
    cfg = EvaluateConfig()
    wanted = iv.headline_interval_metrics(cfg)
    n_head = len(names.headline_metrics(cfg))
    assert wanted[:n_head] == [m for m, _, _ in names.headline_metrics(cfg)]
    assert wanted[n_head:] == ["tail_q99_ratio", "crps_field", "spread_skill_field"]
    ens, obs, thr = _rain()
    comp = iv.day_components(ens, obs, dict(zip(names.percentile_names(cfg), thr.values())), cfg.fss_windows,
                             which=wanted)
    assert list(comp) == wanted


def test_paired_differences_between_settings():
    comp = _sources()
    t = iv.bootstrap(comp, np.arange(20), contrasts=[("good", "bad"), ("copy", "good")], samples=300, seed=1,
                     targets={"freq_bias_p99": 1.0, "spread_skill": 1.0, "tail_q99_ratio": 1.0})
    d = t[t.statistic == "difference"].set_index(["source", "baseline", "metric"])
    plain = t[t.statistic == "score"].set_index(["source", "metric"])["value"]
    assert len(d) == 2 * 7 and set(t.statistic) == {"score", "difference"}
    # a copy differs by exactly 0 in every replicate
    same = d.loc[("copy", "good")]
    assert (same.value == 0).all() and (same.lower == 0).all() and (same.upper == 0).all()
    # CRPS: plain difference, by hand; better on every day, so the whole interval is below 0
    good_crps = comp["good"]["crps"][:, 0].sum() / comp["good"]["crps"][:, 1].sum()
    bad_crps = comp["bad"]["crps"][:, 0].sum() / comp["bad"]["crps"][:, 1].sum()
    row = d.loc[("good", "bad", "crps")]
    assert row.value == pytest.approx(good_crps - bad_crps, rel=1e-12) and row.upper < 0
    # a target score: the difference of the distances to 1
    fb = d.loc[("good", "bad", "freq_bias_p99")].value
    assert fb == pytest.approx(abs(plain[("good", "freq_bias_p99")] - 1) - abs(plain[("bad", "freq_bias_p99")] - 1))
    with pytest.raises(ValueError, match="contrasts name sources without components"):
        iv.bootstrap(comp, np.arange(20), contrasts=[("good", "nope")], samples=10)
