"""The evaluate stage: scores against hand and numpy values, the cache, every output, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import prepare_demo, snakemake
from precip_cvae import baselines, metrics, plots
from precip_cvae.evaluate import compare, names, report
from precip_cvae.evaluate import sample as sampling
from precip_cvae.evaluate import score as scoring
from precip_cvae.config import BootstrapConfig, ConfigError, EvaluateConfig


# ----------------------------------------------------------------------------- unit: scores


def _fields(seed=0, m=5, n=6, h=8, w=9):
    rng = np.random.default_rng(seed)
    obs = rng.gamma(0.5, 6.0, (n, h, w))
    obs[obs < 1.5] = 0.0
    obs[:, 0, :3] = np.nan  # masked pixels
    ens = rng.gamma(0.5, 6.0, (m, n, h, w))
    ens[ens < 1.5] = 0.0
    thr = {"p95": np.full((h, w), 8.0), "p99": np.full((h, w), 14.0)}
    thr["p99"][2:4, 2:4] = 20.0  # a local threshold
    return ens, obs, thr


def _fair_crps(ens, obs):
    """Per-point fair CRPS written out: mean |X - y| - sum |X - X'| / (2 M (M - 1))."""
    m = ens.shape[0]
    skill = np.abs(ens - obs[None]).mean(axis=0)
    spread = np.abs(ens[:, None] - ens[None, :]).sum(axis=(0, 1)) / (2 * m * (m - 1))
    return skill - spread


def _fractions_by_loop(field, valid, w):
    """Window means of ``field`` over the valid pixels of each w x w window (outside = invalid), by loops."""
    n, h, wd = field.shape
    r = w // 2
    out = np.zeros_like(field, dtype=float)
    for d in range(n):
        for i in range(h):
            for j in range(wd):
                win = (d, slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))
                k = valid[win].sum()
                out[d, i, j] = (field[win] * valid[win]).sum() / k if k else 0.0
    return out


def _continuous_case(seed: int, m: int, n: int, h: int, w: int):
    """Gamma truth (three masked cells a day), members and coarse reference (no ties), and the p95/p99 maps."""
    rng = np.random.default_rng(seed)
    obs = rng.gamma(0.5, 6.0, (n, h, w))
    obs[:, 0, :3] = np.nan
    ens = rng.gamma(0.5, 6.0, (m, n, h, w))
    coarse = rng.gamma(2.0, 2.0, (n, h, w))
    return obs, ens, coarse, {"p95": np.full((h, w), 8.0), "p99": np.full((h, w), 14.0)}


def test_score_gives_each_name_its_score_computed_by_hand():
    """scoring.score, what evaluate writes, on 5 members x 6 days of 8 x 9 continuous fields (no ties), each score
    written out again in numpy from its definition in the module docstring; day chunks change nothing."""
    m, n, h, w = 5, 6, 8, 9
    obs, ens, coarse, thr = _continuous_case(4, m, n, h, w)
    thr["p99"][2:4, 2:4] = 20.0
    got, curves = scoring.score(ens, obs, thr, windows=(1, 3), coarse_ref=coarse, rng=0, chunk_days=4)

    v = np.isfinite(obs)
    mean = ens.mean(axis=0)
    err = (mean - obs)[v]
    want = {"n_members": 5.0, "n_days": 6.0, "mae_all": np.abs(err).mean(),
            "corr": np.corrcoef(mean[v], obs[v])[0, 1]}
    want["crps"] = _fair_crps(ens[:, v], obs[v]).mean()
    for name, t in thr.items():
        tb = np.broadcast_to(t, obs.shape)
        ext = v & (obs > tb)
        want[f"mae_tail_{name}"] = np.abs(mean - obs)[ext].mean()
        want[f"rmse_ext_{name}"] = np.sqrt(((mean - obs)[ext] ** 2).mean())
        want[f"freq_bias_{name}"] = np.mean([((e > tb) & v).sum() for e in ens]) / ext.sum()
        want[f"twcrps_{name}"] = _fair_crps(np.maximum(ens, tb)[:, v], np.maximum(obs, tb)[v]).mean()
        po = (obs > tb).astype(float)
        pf = (ens > tb).mean(axis=0)
        for win in (1, 3):
            ff, fo = _fractions_by_loop(pf, v, win), _fractions_by_loop(po, v, win)
            want[f"fss_{name}_w{win}"] = 1 - ((ff - fo) ** 2)[v].sum() / (ff ** 2 + fo ** 2)[v].sum()
        want[f"fss_useful_{name}"] = 0.5 + ext.sum() / v.sum() / 2
    t99 = np.broadcast_to(thr["p99"], obs.shape)
    o99 = v & (obs > t99)
    hits = np.mean([((e > t99) & o99).sum() for e in ens])
    misses = np.mean([(~(e > t99) & o99).sum() for e in ens])
    false_alarms = np.mean([((e > t99) & v & ~o99).sum() for e in ens])
    want |= {"pod_p99": hits / (hits + misses), "far_p99": false_alarms / (hits + false_alarms),
             "csi_p99": hits / (hits + misses + false_alarms)}
    want["spread_skill"] = np.sqrt(6 / 5) * np.sqrt(ens[:, v].var(axis=0, ddof=1).mean()) / np.sqrt((err ** 2).mean())
    ranks = np.bincount((ens[:, v] < obs[v]).sum(axis=0), minlength=m + 1)  # continuous: no ties to break
    expected_count = v.sum() / (m + 1)
    want["rank_flatness"] = ((ranks - expected_count) ** 2 / expected_count).sum() / m
    wet_ens, wet_obs = ens[:, v][ens[:, v] >= 1.0], obs[v][obs[v] >= 1.0]
    for q, key in ((0.99, "q99"), (0.999, "q99.9")):
        want[f"tail_{key}_ens"], want[f"tail_{key}_obs"] = np.quantile(wet_ens, q), np.quantile(wet_obs, q)
    for ref, key in ((obs, "mass_error"), (np.where(v, coarse, np.nan), "mass_error_coarse")):
        ref_mean = np.array([ref[d][v[d]].mean() for d in range(n)])  # (N,)
        ens_mean = np.array([[e[d][v[d]].mean() for d in range(n)] for e in ens])  # (M, N)
        rel = (ens_mean - ref_mean) / np.maximum(ref_mean, 0.1)
        want[f"{key}_mae"], want[f"{key}_bias"] = np.abs(rel).mean(), rel.mean()
        if key == "mass_error":  # the domain means' fair CRPS and spread/skill
            pairs = np.abs(ens_mean[:, None] - ens_mean[None, :]).sum(axis=(0, 1)) / (m * (m - 1))
            want["crps_field"] = (np.abs(ens_mean - ref_mean).mean(axis=0) - pairs / 2).mean()
            want["spread_skill_field"] = np.sqrt((m + 1) / m * ens_mean.var(axis=0, ddof=1).sum()
                                                 / ((ens_mean.mean(axis=0) - ref_mean) ** 2).sum())
    # the spectra themselves are tested by hand in test_metrics; here only that they are the members' and the truth's
    k, p_ens = metrics.mean_rapsd(ens)
    _, p_obs = metrics.mean_rapsd(obs)
    want["rapsd_log_ratio"] = np.log10(p_ens / p_obs).mean()
    want |= metrics.rapsd_band_log_ratios(k, p_ens, p_obs)

    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
    np.testing.assert_array_equal(curves["rank_counts"], ranks)
    np.testing.assert_allclose(curves["qq_obs"], np.quantile(wet_obs, scoring.QQ_LEVELS))
    np.testing.assert_allclose(curves["qq_ens"], np.quantile(wet_ens, scoring.QQ_LEVELS))
    for chunk in (1, 6, 16):
        again, _ = scoring.score(ens, obs, thr, windows=(1, 3), coarse_ref=coarse, rng=0, chunk_days=chunk)
        assert again["crps"] == pytest.approx(got["crps"], rel=1e-12)
        assert again["twcrps_p99"] == pytest.approx(got["twcrps_p99"], rel=1e-12)


def test_score_of_one_member_crps_is_mae_and_no_spread():
    ens, obs, thr = _fields()
    s, curves = scoring.score(ens[:1], obs, thr, windows=(1,))
    assert s["n_members"] == 1.0 and s["crps"] == pytest.approx(s["mae_all"])
    assert math.isnan(s["spread_skill"]) and curves["rank_counts"].shape == (2,)
    assert curves["rank_counts"].sum() == np.isfinite(obs).sum()


def test_a_perfect_ensemble_scores_perfectly():
    _, obs, thr = _fields()
    ens = np.repeat(obs[None], 4, axis=0)
    s, curves = scoring.score(ens, obs, thr, windows=(1, 3), coarse_ref=np.nan_to_num(obs))
    for key in ("crps", "twcrps_p95", "twcrps_p99", "mae_all", "mass_error_mae", "mass_error_bias",
                "mass_error_coarse_mae", "rapsd_log_ratio"):
        assert s[key] == pytest.approx(0.0, abs=1e-12), key
    for key in ("fss_p95_w1", "fss_p99_w3", "freq_bias_p99", "csi_p99", "pod_p99", "corr"):
        assert s[key] == pytest.approx(1.0), key
    # pooled members = the wet truth values repeated (quantiles differ only by interpolation)
    wet = obs[np.isfinite(obs) & (obs >= 1.0)]
    np.testing.assert_allclose(curves["qq_ens"], np.quantile(np.repeat(wet, 4), scoring.QQ_LEVELS))
    np.testing.assert_allclose(curves["qq_obs"], np.quantile(wet, scoring.QQ_LEVELS))
    assert s["far_p99"] == 0.0 and s["tail_q99_ens"] == pytest.approx(s["tail_q99_obs"], rel=0.01)


def test_hand_values_of_the_added_scores():
    # one day, 1 x 2 pixels, two members
    obs = np.array([[[0.0, 4.0]]])
    ens = np.array([[[[1.0, 6.0]]], [[[3.0, 8.0]]]])
    thr = {"p95": np.array([[3.0, 3.0]]), "p99": np.array([[5.0, 5.0]])}
    s, _ = scoring.score(ens, obs, thr, windows=(1,), coarse_ref=np.array([[[3.0, 3.0]]]))
    # fair CRPS of two members above y is min(x) - y: pixels 1 - 0 = 1 and 6 - 4 = 2
    assert s["crps"] == pytest.approx(1.5)
    # twCRPS: the same on max(., thr): at 5 -> 0 and 6 - 5 = 1; at 3 -> 0 and 6 - 4 = 2
    assert s["twcrps_p99"] == pytest.approx(0.5)
    assert s["twcrps_p95"] == pytest.approx(1.0)
    # mass: member means 3.5 and 5.5 against 2 -> 0.75, 1.75; against the coarse 3 -> 1/6, 5/6
    assert s["mass_error_mae"] == pytest.approx(1.25) and s["mass_error_bias"] == pytest.approx(1.25)
    assert s["mass_error_coarse_mae"] == pytest.approx(0.5) and s["mass_error_coarse_bias"] == pytest.approx(0.5)
    # above 3: truth 1 pixel, each member 1 -> 1; above 5: nothing observed -> undefined
    assert s["freq_bias_p95"] == pytest.approx(1.0)
    assert math.isnan(s["freq_bias_p99"])


# ----------------------------------------------------------------------------- unit: names, config, tables


def test_config_checks_and_checkpoint_labels():
    cfg = EvaluateConfig.from_dict({"checkpoints": ["best", "runs/a/epoch10.pt", "b/epoch10.pt"]})
    assert cfg.checkpoint_labels() == ("best", "epoch10", "epoch10_2")
    with pytest.raises(ConfigError, match=r"valid names are \['val', 'test'\]"):
        EvaluateConfig(splits=("train",))
    with pytest.raises(ConfigError, match="two increasing numbers"):
        EvaluateConfig(percentiles=(99.0, 95.0))
    with pytest.raises(ConfigError, match=r"evaluate.checkpoints\[0\]: 'final' does not match .*paths to other "
                                          r"\.pt files"):
        EvaluateConfig(checkpoints=("final",))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['member'\]"):
        EvaluateConfig.from_dict({"member": 3})


def test_schema_section_matches_the_dataclass():
    import dataclasses

    import yaml

    from conftest import REPO

    schema = yaml.safe_load((REPO / "src" / "precip_cvae" / "config.schema.yaml").read_text())
    props = schema["properties"]["evaluate"]["properties"]
    assert schema["properties"]["evaluate"]["additionalProperties"] is False
    assert set(props) == {f.name for f in dataclasses.fields(EvaluateConfig)}
    defaults = EvaluateConfig()
    for key, prop in props.items():
        value = tuple(prop["default"]) if isinstance(prop["default"], list) else prop["default"]
        if prop.get("type") == "object":  # a nested section: its own defaults
            value = type(getattr(defaults, key)).from_dict(value)
        assert value == getattr(defaults, key), key
        assert prop.get("description"), key
    assert props["baselines"]["items"]["enum"] == sorted(baselines.BASELINES, key=list(baselines.BASELINES).index)


def test_unknown_baseline_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"unknown baseline 'persistence'; valid names are "
                                          r"\['analogs', 'climatology', 'interpolation'\]"):
        sampling.check_baselines(["analogs", "persistence"])


def test_headline_keeps_mae_tail_next_to_the_frequency_bias():
    cfg = EvaluateConfig(percentiles=(90.0, 99.5), fss_windows=(1, 5, 11, 21, 41))
    keys = [k for k, *_ in names.headline_metrics(cfg)]
    assert keys == ["crps", "twcrps_p99.5", "fss_p99.5_w11", "freq_bias_p99.5", "mae_tail_p99.5", "csi_p99.5",
                    "spread_skill"]
    assert names.headline_window(EvaluateConfig(fss_windows=(27, 1, 9, 3))) == 9


def test_best_source_and_verdicts():
    assert report.best_source({"a": 1.2, "b": 0.7, "c": float("nan")}, "one") == "a"
    assert report.best_source({"a": 1.2, "b": 0.7}, "lower") == "b"
    assert report.best_source({"a": 1.2, "b": 0.7}, "higher") == "a"
    assert report.best_source({"a": float("nan")}, "lower") is None
    cfg = EvaluateConfig()
    labels = [label for _, label, _ in names.headline_metrics(cfg)]
    head = pd.DataFrame([
        {"source": "cVAE (best)", "subset": "all", **dict(zip(labels, [1.0, 0.1, 0.6, 1.1, 9.0, 0.3, 0.9]))},
        {"source": "analogs", "subset": "all", **dict(zip(labels, [1.2, 0.2, 0.4, 0.5, 8.0, 0.2, 0.5]))},
    ])
    lines = report.verdicts(head, cfg, "all")
    assert lines[0] == "- CRPS: **cVAE (best)** is best (lowest: 1), ahead of analogs (1.2)."
    assert "**analogs**" in lines[4] and "read it with the frequency bias" in lines[4]
    assert "**cVAE (best)** is best (closest to 1: 1.1)" in lines[3]
    assert not any("dilemma" in line for line in lines)  # analogs' freq. bias 0.5: no over-forecasting
    head.loc[1, labels[3]] = 4.0  # analogs now forecast P99 exceedances 4 times too often
    lines = report.verdicts(head, cfg, "all")
    assert lines[5].startswith("  Forecaster's dilemma: analogs forecasts exceedances 4 times as often")


def test_heaviest_days_and_crop():
    obs = np.zeros((4, 2, 2))
    obs[2] = 5.0
    obs[0, 0, 0] = 8.0
    obs[3, :, :] = np.nan
    np.testing.assert_array_equal(plots.heaviest_days(obs, 3), [2, 0, 1])
    a = np.arange(2 * 6 * 5).reshape(2, 6, 5)
    out = sampling.crop(a, {"pad_lat": [1, 2], "pad_lon": [0, 1]})
    np.testing.assert_array_equal(out, a[:, 1:4, 0:4])


def test_comparison_table_lists_experiments_then_baselines_once():
    cfg = EvaluateConfig(fss_windows=(1, 3, 9))
    rows = []
    for model, ckpt, crps in (("cvae", "best", 1.0), ("cvae", "last", 1.1), ("analogs", "-", 1.3)):
        for subset in ("all", "heavy"):
            rows += [(model, ckpt, "test", subset, "crps", crps), (model, ckpt, "val", subset, "crps", 9.0)]
    table = pd.DataFrame(rows, columns=names.METRIC_COLUMNS)
    other = table.assign(value=table["value"] + (table["model"] == "cvae") * 0.5)
    out = compare.comparison_table({"default": table, "big": other}, cfg)
    assert list(out["experiment"]) == ["default", "default", "big", "big", "-"]
    assert list(out["crps@all"]) == [1.0, 1.1, 1.5, 1.6, 1.3]
    assert set(out["split"]) == {"test"}
    fig = plots.comparison(out, names.headline_metrics(cfg))
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(names.headline_metrics(cfg))


def test_seed_summary_gives_mean_and_spread_over_seeds():
    table = pd.DataFrame({
        "experiment": ["a_seed0", "a_seed1", "a_seed2", "b_seed0", "b_seed1", "b_seed2", "-"],
        "model": ["cvae"] * 6 + ["analogs"], "checkpoint": ["best"] * 6 + ["-"], "split": ["test"] * 7,
        "crps@all": [1.0, 2.0, 4.0, 3.0, np.nan, 5.0, 0.8]})
    settings = {f"{s}_seed{n}": [s, n] for s in "ab" for n in range(3)}
    out = compare.seed_summary(table, settings).set_index("setting")
    # a: mean 7/3, sample std sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2) = sqrt(7/3)
    assert out.loc["a", "mean"] == pytest.approx(7 / 3) and out.loc["a", "std"] == pytest.approx((7 / 3) ** 0.5)
    assert (out.loc["a", "min"], out.loc["a", "max"], out.loc["a", "n_seeds"]) == (1.0, 4.0, 3)
    # b: the NaN seed is left out of the mean and counted out
    assert (out.loc["b", "mean"], out.loc["b", "n_seeds"]) == (4.0, 2)
    assert out.loc["b", "std"] == pytest.approx(2 ** 0.5)
    # the baseline: one value, no spread
    base = out.loc["-"]
    assert (base["model"], base["mean"], base["n_seeds"]) == ("analogs", 0.8, 1) and np.isnan(base["std"])
    # without experiment_seeds every experiment is its own setting
    single = compare.seed_summary(table.iloc[[0, 6]], {"a_seed0": ["a_seed0", None]})
    assert list(single["setting"]) == ["a_seed0", "-"] and list(single["n_seeds"]) == [1, 1]


def test_compare_experiments_summarises_seeds_on_val_and_test(tmp_path):
    cfg = EvaluateConfig(fss_windows=(1, 3, 9))
    csvs = {}
    for seed, crps in ((0, 1.0), (1, 3.0)):
        rows = []
        for model, ckpt, value in (("cvae", "best", crps), ("analogs", "-", 0.5)):
            rows += [(model, ckpt, "val", "all", "crps", value + 10), (model, ckpt, "test", "all", "crps", value)]
        path = tmp_path / f"m{seed}.csv"
        pd.DataFrame(rows, columns=names.METRIC_COLUMNS).to_csv(path, index=False)
        csvs[f"x_seed{seed}"] = str(path)
    table = compare.compare_experiments(csvs, cfg, str(tmp_path / "c.csv"),
                                  settings={"x_seed0": ["x", 0], "x_seed1": ["x", 1]}, seeds_csv=str(tmp_path / "s.csv"))
    assert set(table["split"]) == {"test"}  # the comparison: the headline split
    seeds = pd.read_csv(tmp_path / "s.csv").set_index(["split", "setting"])
    assert seeds.loc[("val", "x"), "mean"] == 12.0 and seeds.loc[("test", "x"), "mean"] == 2.0
    assert seeds.loc[("test", "x"), "std"] == pytest.approx(2 ** 0.5) and seeds.loc[("test", "x"), "seeds"] == "0;1"
    assert seeds.loc[("val", "-"), "mean"] == 10.5
    from precip_cvae import sweep

    fig = sweep.seeds_figure(pd.read_csv(tmp_path / "s.csv", dtype={"checkpoint": str}), names.headline_metrics(cfg))
    crps = fig.axes[0]
    assert [t.get_text() for t in crps.get_yticklabels()] == ["x", "analogs"]
    # the val/all-days series of x: mean 12 at the marker, the seeds' range 11..13 as the bar
    marker = [ln for ln in crps.get_lines() if ln.get_label() == "val, all days"][0]
    assert marker.get_xdata()[0] == 12.0
    bars = crps.collections[0].get_segments()[0]
    assert (bars[0][0], bars[1][0]) == (11.0, 13.0)


def test_setting_differences_call_a_result_only_outside_interval_and_seed_spread(tmp_path):
    from precip_cvae.evaluate.intervals import save_day_components

    cfg = EvaluateConfig(fss_windows=(1, 3, 9))
    rng = np.random.default_rng(3)
    n = 60
    dates = pd.date_range("2000-01-01", periods=n).strftime("%Y-%m-%d").to_numpy()
    heavy = np.zeros(n, bool)
    heavy[::6] = True
    base = rng.gamma(2.0, 1.0, n)  # each day's CRPS of the reference; hard days are hard for all
    count = np.full(n, 100.0)
    seed_factor = {0: 1.0, 1: 1.06}  # the two seeds of a setting differ by 6 %
    per_day = {f"default_seed{k}": base * f for k, f in seed_factor.items()}
    per_day |= {f"good_seed{k}": 0.8 * base * f for k, f in seed_factor.items()}  # 20 % better
    per_day |= {f"same_seed{k}": 1.001 * base * f for k, f in seed_factor.items()}  # 0.1 % worse on every day
    per_day |= {f"copy_seed{k}": base * f for k, f in seed_factor.items()}
    per_day |= {"one_seed0": 0.8 * base}
    settings = {e: [e.rsplit("_seed", 1)[0], int(e[-1])] for e in per_day}
    paths, rows = {}, []
    for e, v in per_day.items():
        comp = {"test": {"cvae_best": {"crps": np.stack([v * count, count], axis=1)}}}
        paths[e] = str(tmp_path / f"{e}.npz")
        save_day_components(paths[e], comp, {"test": (dates, heavy)})
        rows.append({"experiment": e, "model": "cvae", "checkpoint": "best", "split": "test",
                     "crps@all": v.mean(), "crps@heavy": v[heavy].mean()})
    seeds = compare.seed_summary(pd.DataFrame(rows), settings)
    out = compare.setting_differences(paths, settings, seeds, cfg)
    assert list(out.columns) == compare.DIFFERENCE_COLUMNS
    assert set(out["reference"]) == {"default"} and set(out["metric"]) == {"crps"}
    t = out.set_index(["setting", "subset"])
    # the pooled score of a setting: its seeds' day sums averaged, over the counts
    pooled_default = (base * 1.03).mean()
    assert t.loc[("good", "all"), "reference_value"] == pytest.approx(pooled_default, rel=1e-12)
    assert t.loc[("good", "all"), "difference"] == pytest.approx(-0.2 * pooled_default, rel=1e-12)
    # the seed spread: the larger std over seeds of the two settings' scores
    assert t.loc[("good", "all"), "seed_spread"] == pytest.approx(np.std([base.mean(), 1.06 * base.mean()], ddof=1))
    assert t.loc[("good", "all"), "verdict"] == "better" and t.loc[("good", "heavy"), "verdict"] == "better"
    # worse on every day, so outside the interval, but by far less than the seed spread: no result
    assert t.loc[("same", "all"), "outside_interval"] and t.loc[("same", "all"), "verdict"] == "within the seed spread"
    assert t.loc[("copy", "all"), "verdict"] == "within the interval" and t.loc[("copy", "all"), "difference"] == 0
    assert t.loc[("one", "all"), "verdict"] == "one seed" and np.isnan(t.loc[("one", "all"), "seed_spread"])
    # one setting: nothing to compare
    assert compare.setting_differences({"default_seed0": paths["default_seed0"]}, settings, seeds, cfg).empty
    # settings scored on other days are refused
    save_day_components(tmp_path / "other.npz", {"test": {"cvae_best": {"crps": np.ones((n, 2))}}},
                        {"test": (dates[::-1], heavy)})
    with pytest.raises(ValueError, match="scored other test days"):
        compare.setting_differences({"default_seed0": paths["default_seed0"], "good_seed0": str(tmp_path / "other.npz")},
                                    settings, seeds, cfg)


# ----------------------------------------------------------------------------- the stage on tiny data


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A tiny demo on a 12 x 14 grid (padded to 16 x 16), through preprocess + events, with a 2-epoch model."""
    from precip_cvae import train
    from precip_cvae.config import DemoConfig, EventsConfig, LossConfig, ModelConfig, TrainConfig

    root = tmp_path_factory.mktemp("evaluate")
    prepare_demo(root, DemoConfig(seed=5, years=2, nlat=12, nlon=14, nclat=4, nclon=4, heavy_fraction=0.05),
                 EventsConfig(percentile=95.0, min_exceed_fraction=0.05))
    paths = train.TrainPaths.in_dir(str(root / "dataset.zarr"), str(root / "thresholds.nc"), str(root / "events.csv"),
                             str(root / "train"), str(root / "resume"))
    train.run(paths, ModelConfig(preset="tiny"),
              TrainConfig(epochs=2, batch_size=32, lr=2e-3, val_members=2, loss=LossConfig(warmup_epochs=1),
                          num_threads=1))
    return root


CFG = EvaluateConfig(members=6, splits=("val", "test"), fss_windows=(1, 3, 5), batch_size=24, n_map_days=2,
                     device="cpu", min_wet_days=5)


@pytest.fixture(scope="module")
def evaluated(padded):
    root = padded
    sample = sampling.SamplePaths(str(root / "dataset.zarr"), str(root / "thresholds.nc"), str(root / "events.csv"),
                           {"best": str(root / "train" / "best.pt"), "last": str(root / "train" / "last.pt")},
                           str(root / "out" / "ensembles.zarr"))
    sampling.sample_ensembles(sample, CFG, threads=1, experiment="default")
    paths = report.ScorePaths.in_dir(sample.out, str(root / "dataset.zarr"), str(root / "train" / "train_log.csv"),
                                  str(root / "out"))
    ev = report.run(paths, CFG, experiment="default")
    plots.write_figures(ev, paths, CFG)
    return paths, ev


def test_the_cache_holds_cropped_masked_ensembles(evaluated, padded):
    paths, ev = evaluated
    truth = xr.open_zarr(paths.ensembles, group="test/truth")
    assert truth["pr"].shape[1:] == (12, 14)  # the padding (16 x 16) is cropped
    assert truth["pr"].attrs["units"] == "mm day-1"
    meta = json.loads(xr.open_zarr(paths.ensembles).attrs["evaluate_meta"])
    assert meta["sources"] == ["cvae_best", "cvae_last", "climatology", "analogs", "interpolation"]
    invalid = np.isnan(truth["pr"].values)
    for source in meta["sources"]:
        ens = xr.open_zarr(paths.ensembles, group=f"test/{source}")["pr"].values
        members = 1 if source == "interpolation" else 6
        assert ens.shape == (members, truth.sizes["time"], 12, 14), source
        np.testing.assert_array_equal(np.isnan(ens), np.broadcast_to(invalid, ens.shape))
        assert np.nanmin(ens) >= 0.0
    cv = xr.open_zarr(paths.ensembles, group="test/cvae_best")["pr"].values
    assert np.nanstd(cv, axis=0).mean() > 0  # members differ
    # the climatology and analog members are train fields: every one equals some train day
    ds = xr.open_zarr(padded / "dataset.zarr")
    train_pr = ds["pr"].isel(time=np.flatnonzero(ds["split"].values == "train")).values[:, 2:14, 1:15]
    field = xr.open_zarr(paths.ensembles, group="test/analogs")["pr"].values[0, 0]
    assert np.any(np.all(np.isclose(np.nan_to_num(train_pr), np.nan_to_num(field)), axis=(1, 2)))


def test_best_and_last_of_the_same_epoch_sample_the_same_fields(evaluated, padded):
    from precip_cvae import checkpoint

    paths, _ = evaluated
    epochs = [checkpoint.load(padded / "train" / f"{name}.pt")["epoch"] for name in ("best", "last")]
    same = epochs[0] == epochs[1]
    a = xr.open_zarr(paths.ensembles, group="val/cvae_best")["pr"].values
    b = xr.open_zarr(paths.ensembles, group="val/cvae_last")["pr"].values
    assert np.array_equal(a, b, equal_nan=True) == same  # common random numbers


def test_every_output_is_written_and_sane(evaluated):
    paths, ev = evaluated
    for key in report.OUTPUT_FILES:
        assert paths.output(key).stat().st_size > 0, key
    table = pd.read_csv(paths.output("metrics_csv"), dtype={"checkpoint": str})
    assert list(table.columns) == names.METRIC_COLUMNS + ["lower", "upper"]
    # bootstrap bounds on the headline scores and a ratio row per source and baseline
    crps_b = table[(table.metric == "crps") & (table.model == "cvae") & (table.checkpoint == "best")]
    assert (crps_b["lower"] <= crps_b["value"]).all() and (crps_b["value"] <= crps_b["upper"]).all()
    ratio = table[(table.metric == "crps_ratio_analogs") & (table.model == "cvae") & (table.checkpoint == "best")
                  & (table.split == "test") & (table.subset == "all")].iloc[0]
    assert ratio["value"] == pytest.approx(ev.value("cvae_best", "crps", "test") / ev.value("analogs", "crps", "test"))
    assert ratio["lower"] < ratio["value"] < ratio["upper"]
    self_ratio = table[(table.metric == "crps_ratio_analogs") & (table.model == "analogs")]
    assert self_ratio.empty  # a baseline is not divided by itself
    table = table[~table["metric"].str.contains("_ratio_")]
    assert set(table["subset"]) == {"all", "heavy"} and set(table["split"]) == {"val", "test"}
    assert set(zip(table["model"], table["checkpoint"])) == {("cvae", "best"), ("cvae", "last"),
                                                              ("climatology", "-"), ("analogs", "-"),
                                                              ("interpolation", "-")}
    crps = table[(table.metric == "crps") & (table.split == "test") & (table.subset == "all")].set_index("model")
    assert (crps["value"] > 0).all()
    # on the demo's learnable relation the condition helps: analogs beat climatology on both splits
    for split in ("val", "test"):
        assert ev.value("analogs", "crps", split) < 0.9 * ev.value("climatology", "crps", split)
        assert ev.value("analogs", "fss_p99_w3", split) > ev.value("climatology", "fss_p99_w3", split) + 0.2
    # the interpolation baseline is the coarse condition itself: no mass error against it
    assert ev.value("interpolation", "mass_error_coarse_mae", "test") == pytest.approx(0.0, abs=1e-6)
    assert ev.value("climatology", "mass_error_coarse_mae", "test") > 0.5
    doc = json.loads(paths.output("metrics_json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["scores"]["cvae"]["best"]["test"]["all"]["crps"] == pytest.approx(crps.loc["cvae", "value"].iloc[0])
    assert doc["scores"]["interpolation"]["-"]["test"]["all"]["spread_skill"] is None  # one member
    assert len(doc["curves"]["test"]["all"]["cvae_best"]["rank_counts"]) == 7
    summary = paths.output("summary").read_text()
    assert "| source" in summary and "cVAE (best)" in summary and "is best" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| source"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols.index("MAE_tail P99 (improper) ↓") == cols.index("freq. bias P99 →1") + 1
    # one number per wavelength band for the spectrum, as in metrics.csv
    assert "## Power spectrum of the members against the truth" in summary and "2to4px (wavelength)" in summary
    band = ev.value(ev.meta["primary"], "rapsd_log_ratio_2to4px", "test")
    assert np.isfinite(band) and f"{band:.2f}" in summary
    head = pd.read_csv(paths.output("headline"))
    assert list(head["source"][:4]) == ["cVAE (best)", "climatology", "analogs", "interpolation"]


def test_scores_are_recomputed_from_the_cache_without_sampling(evaluated, padded, tmp_path, monkeypatch):
    paths, ev = evaluated
    monkeypatch.setattr(sampling, "sample_cvae", lambda *a, **k: pytest.fail("sampled again"))
    again = report.ScorePaths.in_dir(paths.ensembles, paths.dataset, paths.train_log, str(tmp_path))
    other = report.run(again, EvaluateConfig(fss_windows=(3, 7), n_map_days=1, min_wet_days=5), experiment="default")
    for metric in ("crps", "twcrps_p99", "fss_p99_w3", "csi_p99"):
        assert other.value("cvae_best", metric, "test", "heavy") == pytest.approx(
            ev.value("cvae_best", metric, "test", "heavy")), metric
    assert "fss_p99_w7" in set(other.table["metric"]) and "fss_p99_w5" not in set(other.table["metric"])


def test_missing_coarse_precipitation_skips_interpolation_with_a_log_line(padded, tmp_path, caplog, monkeypatch):
    import dataclasses

    real = sampling.open_fields

    def without_coarse(*a, **k):
        return dataclasses.replace(real(*a, **k), has_coarse=False)

    monkeypatch.setattr(sampling, "open_fields", without_coarse)
    sample = sampling.SamplePaths(str(padded / "dataset.zarr"), str(padded / "thresholds.nc"), str(padded / "events.csv"),
                           {"best": str(padded / "train" / "best.pt")}, str(tmp_path / "ens.zarr"))
    with caplog.at_level("INFO"):
        sampling.sample_ensembles(sample, EvaluateConfig(members=2, splits=("test",), baselines=("interpolation",)))
    assert "baseline 'interpolation' skipped" in caplog.text
    meta = json.loads(xr.open_zarr(tmp_path / "ens.zarr").attrs["evaluate_meta"])
    assert meta["sources"] == ["cvae_best"] and "interpolation" in meta["skipped_baselines"]
    assert "coarse_pr" not in xr.open_zarr(tmp_path / "ens.zarr", group="test/truth")


def test_a_cache_sampled_from_the_store_block_by_block_equals_the_one_sampled_in_memory(padded, tmp_path,
                                                                                         monkeypatch):
    """Above SAMPLE_MEMORY_BYTES the days are read a block at a time and the baselines' train fields day by day as
    they are taken: every group of the cache is the same, value for value (the same batches, the same noise)."""
    import dataclasses

    cfg = dataclasses.replace(CFG, calibrate="quantile_map", batch_size=20)  # blocks of 80 days: 4 batches
    ckpts = {"best": str(padded / "train" / "best.pt"), "last": str(padded / "train" / "last.pt")}
    out = {}
    for name, budget in (("held", sampling.SAMPLE_MEMORY_BYTES), ("streamed", 0)):
        monkeypatch.setattr(sampling, "SAMPLE_MEMORY_BYTES", budget)
        sample = sampling.SamplePaths(str(padded / "dataset.zarr"), str(padded / "thresholds.nc"),
                                      str(padded / "events.csv"), ckpts, str(tmp_path / f"{name}.zarr"))
        sampling.sample_ensembles(sample, cfg, threads=1, experiment="default")
        out[name] = sample.out
    meta = json.loads(xr.open_zarr(out["held"]).attrs["evaluate_meta"])
    assert meta == json.loads(xr.open_zarr(out["streamed"]).attrs["evaluate_meta"])
    assert meta["sources"] == ["cvae_best", "cvae_last", "cvae_best_qm", "climatology", "analogs", "interpolation"]
    for split in cfg.splits:
        for group in ["truth", *meta["sources"]]:
            a = xr.open_zarr(out["held"], group=f"{split}/{group}")
            b = xr.open_zarr(out["streamed"], group=f"{split}/{group}")
            xr.testing.assert_identical(a.load(), b.load())
            assert a["pr"].encoding["chunks"] == b["pr"].encoding["chunks"], (split, group)


# ----------------------------------------------------------------------------- the workflow and its report


@pytest.mark.workflow
def test_tiny_workflow_evaluates_and_builds_the_report(tiny_run):
    snakemake(tiny_run, "--configfile", "config/tiny.yaml", "--report", "report.html")
    out = tiny_run / "results" / "tiny" / "experiments" / "default" / "evaluate"
    for name in report.OUTPUT_FILES.values():
        assert (out / name).stat().st_size > 0, name
    assert (tiny_run / "results" / "tiny" / "experiments_comparison.csv").exists()
    html = (tiny_run / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "maps.png" in html and "fss_scale.png" in html


def test_calibrated_source_is_a_monotone_map_of_the_members_fitted_on_train(padded, tmp_path):
    """evaluate.calibrate quantile_map: cvae_best_qm holds the best checkpoint's members, mapped pixel by pixel
    (the same rank order on every day), and is scored beside the raw members."""
    import dataclasses

    root = padded
    cfg = dataclasses.replace(CFG, calibrate="quantile_map", checkpoints=("best",),
                              bootstrap=BootstrapConfig(samples=0))  # intervals are tested elsewhere
    sample = sampling.SamplePaths(str(root / "dataset.zarr"), str(root / "thresholds.nc"), str(root / "events.csv"),
                                  {"best": str(root / "train" / "best.pt")}, str(tmp_path / "ensembles.zarr"))
    sampling.sample_ensembles(sample, cfg, threads=1, experiment="default")
    meta = json.loads(xr.open_zarr(sample.out).attrs["evaluate_meta"])
    assert meta["sources"][:2] == ["cvae_best", "cvae_best_qm"] and meta["primary"] == "cvae_best"
    raw = xr.open_zarr(sample.out, group="test/cvae_best")["pr"].values
    cal = xr.open_zarr(sample.out, group="test/cvae_best_qm")["pr"].values
    np.testing.assert_array_equal(np.isnan(raw), np.isnan(cal))
    assert np.nanmin(cal) >= 0 and not np.allclose(np.nan_to_num(raw), np.nan_to_num(cal))
    # per pixel, the map is one non-decreasing function over every day and member
    flat_r = raw.transpose(2, 3, 0, 1).reshape(raw.shape[2] * raw.shape[3], -1)
    flat_c = cal.transpose(2, 3, 0, 1).reshape(flat_r.shape)
    for r, c in zip(flat_r, flat_c):
        ok = np.isfinite(r)
        order = np.argsort(r[ok], kind="stable")
        assert (np.diff(c[ok][order]) >= -1e-5).all()
    paths = report.ScorePaths.in_dir(sample.out, str(root / "dataset.zarr"), str(root / "train" / "train_log.csv"),
                                     str(tmp_path / "out"))
    report.run(paths, cfg, experiment="default")
    scored = pd.read_csv(paths.output("metrics_csv"))
    assert {"best", "best_qm"} <= set(scored.loc[scored["model"] == "cvae", "checkpoint"])


def test_sub_daily_steps_skip_the_daily_climate_indices_with_a_note(tmp_path):
    """Ten-minute radar steps (BoM): Rx1day, spells and return levels are defined on daily series, so they are
    skipped with a note that says why and how to get them; the distribution distances still use every step."""
    from precip_cvae import io
    from precip_cvae.evaluate.diagnostics import diagnose, diagnostics_markdown

    rng = np.random.default_rng(0)
    times = pd.date_range("2020-10-31T00:00", periods=12, freq="10min")
    obs = rng.gamma(0.5, 4.0, size=(12, 6, 7))
    store = tmp_path / "ensembles.zarr"
    io.write_zarr_group(xr.Dataset({"pr": (("time", "lat", "lon"), obs.astype("float32"))},
                                   coords={"time": times}), store, "test/truth")
    ens = rng.gamma(0.5, 4.0, size=(3, 12, 6, 7))
    io.write_zarr_group(xr.Dataset({"pr": (("member", "time", "lat", "lon"), ens.astype("float32"))},
                                   coords={"time": times}), store, "test/cvae_best")
    meta = {"splits": ["test"], "sources": ["cvae_best"], "primary": "cvae_best"}
    diag = diagnose(str(store), meta, EvaluateConfig(splits=("test",), min_wet_days=1))
    assert set(diag.indices["index"]) == {"wasserstein", "perkins_skill_score", "ralsd"}
    assert diag.bias_maps == {} and diag.return_levels.empty
    text = "\n".join(diagnostics_markdown(diag, meta))
    assert "12 time steps on 1 day(s)" in text and "time_step: 1D" in text


@pytest.mark.parametrize("rows, chunk, band", [(None, None, None), (1, 7, None), (3, 400, None), (1, 50, 3),
                                               (2, None, 3)])
def test_diagnostics_by_blocks_of_rows_and_chunks_of_days_equal_the_whole_array_functions(rows, chunk, band):
    """Issue 25: one source's diagnostics read lazily (dask) by blocks of grid rows and chunks of days give the
    index table, the distribution scores and the domain-mean series of the whole-array functions, also with a
    member NaN where the truth is valid (the NaN reaches the same scores)."""
    import dask.array as da

    from precip_cvae import indices
    from precip_cvae.config import EvaluateConfig
    from precip_cvae.evaluate import diagnostics

    rng = np.random.default_rng(1)
    m, n, h, w = 3, 400, 7, 6
    dates = [str(d.date()) for d in pd.date_range("2001-01-01", periods=n)]
    obs = rng.gamma(0.4, 5.0, (n, h, w))
    obs[rng.random((n, h, w)) < 0.4] = 0.0
    obs[:, 0, :2] = np.nan
    obs[5, 3, 3] = np.nan
    ens = rng.gamma(0.4, 5.0, (m, n, h, w))
    ens[rng.random((m, n, h, w)) < 0.4] = 0.0
    ens[:, :, 0, :2] = np.nan
    cfg = EvaluateConfig()
    pct = diagnostics.observed_percentiles(obs, cfg)
    for members in (ens, np.where(np.arange(h)[:, None] == 4, np.where(np.arange(n)[:, None, None] == 9, np.nan,
                                                                        ens), ens)):
        got = diagnostics.source_diagnostics(da.from_array(members, chunks=(m, 50, h, w)), obs, dates, "standard",
                                             pct, cfg, "calendar", True, rows, chunk, band)
        table, bias = indices.ensemble_index_table(members, obs, dates, "standard", *pct.values(), cfg.wet_threshold,
                                                   "calendar")
        pd.testing.assert_frame_equal(got.table, table)
        for name in bias:
            np.testing.assert_array_equal(got.bias_maps[name], bias[name])
        for key, value in indices.distribution_scores(members, obs).items():
            assert got.distribution[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
        for j in range(m):
            np.testing.assert_allclose(indices.seasonal_maxima(got.domain_means[j], dates).to_numpy(),
                                       indices.seasonal_maxima(members[j], dates).to_numpy(), rtol=1e-12)
    assert math.isnan(got.distribution["ralsd"]) and math.isnan(got.distribution["wasserstein"]) is False


class _CountingStore:
    """An array that records the grid rows of every read (a store chunked by days reads the whole grid's chunks)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []
        self.row_axis = a.ndim - 2  # (member,) time, lat, lon

    def __len__(self):
        return len(self.a)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = key[self.row_axis] if len(key) > self.row_axis else slice(None)
        self.reads.append((rows.start or 0, self.shape[self.row_axis] if rows.stop is None else rows.stop))
        return self.a[key]


def test_diagnostics_read_the_store_once_per_band_of_rows_not_once_per_block():
    """Issue 25: at continental size a block is one grid row; the blocks are cut from bands read at once, so the
    store is read once by the whole-field pass (its chunks of days) and once per band, with the band's rows."""
    from precip_cvae import indices
    from precip_cvae.config import EvaluateConfig
    from precip_cvae.evaluate import diagnostics

    rng = np.random.default_rng(2)
    m, n, h, w = 2, 60, 7, 5
    dates = [str(d.date()) for d in pd.date_range("2001-01-01", periods=n)]
    obs = rng.gamma(0.4, 5.0, (n, h, w))
    obs[:, 0] = np.nan  # a sea row: its block reads nothing
    ens = rng.gamma(0.4, 5.0, (m, n, h, w)).astype(np.float32)
    cfg = EvaluateConfig()
    pct = diagnostics.observed_percentiles(obs, cfg)
    store, truth = _CountingStore(ens), _CountingStore(obs.astype(np.float32))
    got = diagnostics.source_diagnostics(store, truth, dates, "standard", pct, cfg, "calendar", True, rows=1,
                                         chunk_days=30, band_rows=4)
    whole_field = [(0, h)] * 2  # two chunks of 30 days
    assert store.reads == whole_field + [(1, 5), (5, 7)]
    assert truth.reads == store.reads  # the truth too is read by those chunks and bands, never whole
    obs = obs.astype(np.float32).astype(np.float64)
    # the bands' values are the store's float32 ones, taken in float64 as before
    table, _ = indices.ensemble_index_table(ens.astype(np.float64), obs, dates, "standard", *pct.values(),
                                            cfg.wet_threshold, "calendar")
    pd.testing.assert_frame_equal(got.table, table)
    # the default band: every row whose float32 members fit DIAGNOSTIC_BAND_BYTES, whole blocks of rows
    assert diagnostics.rows_per_band(4, 274, 705, 4, rows=1) == 173  # 512 MiB / (4 x 274 x 705 x 4 B)
    assert diagnostics.rows_per_band(4, 274, 705, 4, rows=10) == 170
    assert diagnostics.rows_per_band(64, 5000, 705, 4, rows=1) == 1  # never less than one block


def test_diagnose_streams_the_truth_and_equals_the_whole_array_diagnostics(tmp_path, monkeypatch):
    """Issue 25: diagnose reads the headline truth lazily (its percentiles streamed by events.wet_day_thresholds,
    its domain means and bands by chunks), and gives what the whole-array functions give: the index table of
    indices.ensemble_index_table with numpy's percentiles of the whole array, and the GEV fits of the observed and
    the members' seasonal maxima of the whole arrays (the fit itself is recorded, not run: it is tested in
    test_indices)."""
    from precip_cvae import indices, io
    from precip_cvae.evaluate.diagnostics import diagnose, domain_mean_series

    fitted = []

    def record(maxima, periods):
        fitted.append(np.asarray(maxima, dtype=np.float64))
        return pd.DataFrame({"period": list(periods), "level": float(np.max(maxima)), "lower": 0.0, "upper": 0.0})

    monkeypatch.setattr(indices, "gev_return_levels", record)
    rng = np.random.default_rng(3)
    m, n, h, w = 2, 5 * 365, 4, 3
    times = pd.date_range("2001-01-01", periods=n)
    dates = [str(t.date()) for t in times]
    obs = rng.gamma(0.4, 6.0, (n, h, w)).astype("float32")
    obs[rng.random((n, h, w)) < 0.5] = 0.0
    obs[:, 0, 0] = np.nan
    ens = rng.gamma(0.4, 6.0, (m, n, h, w)).astype("float32")
    ens[:, :, 0, 0] = np.nan
    store = tmp_path / "ensembles.zarr"
    truth = xr.Dataset({"pr": (("time", "lat", "lon"), obs)}, coords={"time": times})
    io.write_zarr_group(truth.chunk({"time": 100}), store, "test/truth")
    io.write_zarr_group(xr.Dataset({"pr": (("member", "time", "lat", "lon"), ens)}, coords={"time": times}),
                        store, "test/cvae_best")
    meta = {"splits": ["test"], "sources": ["cvae_best"], "primary": "cvae_best"}
    cfg = EvaluateConfig(splits=("test",))
    diag = diagnose(str(store), meta, cfg)
    o64, e64 = obs.astype(np.float64), ens.astype(np.float64)
    wet = np.where(o64 >= cfg.wet_threshold, o64, np.nan)  # every valid pixel has more than min_wet_days wet days
    pct = [np.nanpercentile(wet, p, axis=0) for p in cfg.percentiles]
    table, _ = indices.ensemble_index_table(e64, o64, dates, "standard", *pct, cfg.wet_threshold, "calendar")
    got = diag.indices[diag.indices["index"].isin(table["index"])].drop(columns="source").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[table.columns], table, rtol=1e-9)
    np.testing.assert_allclose(domain_mean_series(obs, chunk_days=7), np.nanmean(o64, axis=(1, 2)), rtol=1e-12)
    observed, members = fitted
    np.testing.assert_allclose(observed, indices.seasonal_maxima(o64, dates).to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(members, np.concatenate([indices.seasonal_maxima(e, dates) for e in e64]), rtol=1e-12)
    assert len(observed) == 5 and list(diag.return_levels.source.unique()) == ["observed", "cvae_best"]


def test_scores_from_one_pass_of_day_parts_equal_score_on_each_subset_and_read_lazily():
    """Issue 25: the parts of one pass over the days, summed over a subset, give score() on that subset (every
    score; the rank counts on tie-free fields); a dask ensemble read chunk by chunk gives the numpy result; without
    the exact wet values the pooled quantiles come from the histograms within their stated bound."""
    import dask.array as da

    from precip_cvae.evaluate import intervals as iv

    m, n, h, w = 4, 30, 8, 9
    obs, ens, coarse, thr = _continuous_case(7, m, n, h, w)
    parts = scoring.day_parts(da.from_array(ens, chunks=(m, 7, h, w)), da.from_array(obs, chunks=(7, h, w)), thr,
                              windows=(1, 3), coarse_ref=coarse, rng=0, chunk_days=4)
    subset = np.array([0, 3, 4, 11, 17, 29])
    for days in (np.arange(n), subset):
        got, curves = scoring.scores_of(parts, days)
        want, want_curves = scoring.score(ens[:, days], obs[days], thr, windows=(1, 3), coarse_ref=coarse[days], rng=0)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
        np.testing.assert_array_equal(curves["rank_counts"], want_curves["rank_counts"])
        np.testing.assert_allclose(curves["qq_ens"], want_curves["qq_ens"], rtol=1e-12)
    hist = scoring.day_parts(ens, obs, thr, windows=(1, 3), exact_quantiles=False)
    assert hist.wet_ens is None
    got, curves = scoring.scores_of(hist)
    want, want_curves = scoring.score(ens, obs, thr, windows=(1, 3))
    for key in ("tail_q99_ens", "tail_q99_obs", "tail_q99.9_ens", "tail_q99.9_obs"):
        assert abs(got[key] / want[key] - 1) < iv.WET_BIN_WIDTH, key
    assert np.all(np.abs(curves["qq_ens"] / want_curves["qq_ens"] - 1) < iv.WET_BIN_WIDTH)
    assert got["crps"] == pytest.approx(want["crps"], rel=1e-12)
    assert scoring.chunk_days_for(16, 465, 705) == 1 and scoring.chunk_days_for(4, 8, 9) == 256
    assert scoring.chunk_days_for(16, 64, 64) == 128 * 2**20 // (6 * 16 * 64 * 64 * 8)
