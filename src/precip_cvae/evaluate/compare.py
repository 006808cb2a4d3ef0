"""Rule ``compare_experiments``: every experiment's headline scores beside the baselines, and over seeds."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import io
from ..config import EVALUATE_SPLITS, EvaluateConfig
from .intervals import block_labels, bootstrap, headline_interval_metrics, load_day_components
from .names import AREAL_METRICS, CVAE, NO_CHECKPOINT, SUBSETS, headline_metrics, model_and_checkpoint

log = logging.getLogger(__name__)


def comparison_table(metrics_tables: Mapping[str, pd.DataFrame], cfg: EvaluateConfig,
                     split: str | None = None) -> pd.DataFrame:
    """Headline scores of every experiment's checkpoints beside the baselines (one row each).

    Parameters
    ----------
    metrics_tables : experiment -> its metrics.csv table (METRIC_COLUMNS)
    cfg : EvaluateConfig (headline metric names)
    split : the split scored; default the headline split ('test' when present)

    Returns
    -------
    DataFrame: experiment, model, checkpoint, split, then ``<metric>@<subset>`` columns.
    Baselines come once, from the first experiment (their ensembles do not depend on
    the experiment).
    """
    keys = [k for k, *_ in headline_metrics(cfg)]
    if split is None:  # the headline split of the first experiment, for all
        splits = list(dict.fromkeys(next(iter(metrics_tables.values()))["split"]))
        split = "test" if "test" in splits else splits[-1]
    rows = []
    for i, (experiment, table) in enumerate(metrics_tables.items()):
        t = table[(table["split"] == split) & table["metric"].isin(keys)]
        for (model, ckpt), part in t.groupby(["model", "checkpoint"], sort=False):
            if model != CVAE and i > 0:
                continue
            row = {"experiment": experiment if model == CVAE else NO_CHECKPOINT, "model": model,
                   "checkpoint": ckpt, "split": split}
            for r in part.itertuples(index=False):
                row[f"{r.metric}@{r.subset}"] = r.value
            rows.append(row)
    out = pd.DataFrame(rows)
    cols = ["experiment", "model", "checkpoint", "split"] + [f"{k}@{s}" for s in SUBSETS for k in keys
                                                           if f"{k}@{s}" in out.columns]
    order = out["model"].ne(CVAE).astype(int)  # the experiments first, then the baselines
    return out.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")[cols].reset_index(drop=True)


def compare_experiments(metrics_csvs: Mapping[str, str], cfg: EvaluateConfig, out_csv: str,
                        settings: Mapping[str, Sequence] | None = None, seeds_csv: str | None = None,
                        components: Mapping[str, str] | None = None,
                        differences_csv: str | None = None) -> pd.DataFrame:
    """Run-level ``experiments_comparison.csv`` (headline split) from every experiment's metrics.csv
    (figure: :func:`precip_cvae.plots.comparison`), and with ``seeds_csv`` the mean and spread
    over seeds of each setting on every evaluated split (:func:`seed_summary`; val is the split
    to choose a setting on).  With ``components`` (experiment -> its ``day_components.npz``) and
    ``differences_csv``: :func:`setting_differences`, each setting against the reference one."""
    tables = {name: io.read_csv(path, dtype={"checkpoint": str}) for name, path in metrics_csvs.items()}
    table = comparison_table(tables, cfg)
    io.write_csv(table, out_csv)
    log.info("compared %d experiment(s) and %d baseline(s): %s", len(tables),
             int((table["model"] != CVAE).sum()), out_csv)
    if seeds_csv is not None:
        splits = [s for s in EVALUATE_SPLITS if any((t["split"] == s).any() for t in tables.values())]
        per_split = pd.concat([comparison_table(tables, cfg, split=s) for s in splits], ignore_index=True)
        settings = settings or {name: [name, None] for name in tables}
        seeds = seed_summary(per_split, settings, out_csv=seeds_csv)
        if components is not None and differences_csv is not None:
            diff = setting_differences(components, settings, seeds, cfg)
            io.write_csv(diff, differences_csv)
            for r in diff[diff["subset"].isin(SUBSETS)].itertuples(index=False):
                if r.verdict in ("better", "worse"):
                    log.info("%s %s, %s days: %s %s than %s (difference %.4g, %d%% interval [%.4g, %.4g], seed "
                             "spread %.3g)", r.split, r.metric, r.subset, r.setting, r.verdict, r.reference,
                             r.difference, round(100 * r.confidence), r.lower, r.upper, r.seed_spread)
            log.info("%d setting difference(s) outside both the interval and the seed spread, of %d: %s",
                     int(diff["verdict"].isin(["better", "worse"]).sum()), len(diff), differences_csv)
    return table


def seed_summary(table: pd.DataFrame, settings: Mapping[str, Sequence], out_csv: str | None = None) -> pd.DataFrame:
    """Mean and spread over seeds of every headline score, per setting (``experiments_seeds.csv``).

    Parameters
    ----------
    table : the :func:`comparison_table` (one row per experiment checkpoint and baseline)
    settings : experiment -> (setting, seed); seed None when the run has no ``experiment_seeds``
        (every experiment is then its own setting, with one seed)
    out_csv : written when given

    Returns
    -------
    DataFrame in long form: split, setting, model, checkpoint, metric (``<name>@<subset>``),
    n_seeds, mean, std (ddof 1; NaN for one seed), min, max, seeds (the seeds, ``;``-joined).
    The baselines do not depend on the seed and come once per split, with n_seeds 1.
    """
    metric_cols = [c for c in table.columns if "@" in c]
    rows = []
    frame = table.copy()
    frame["setting"] = [settings[e][0] if m == CVAE else e for e, m in zip(frame["experiment"], frame["model"])]
    frame["seed"] = [settings[e][1] if m == CVAE else None for e, m in zip(frame["experiment"], frame["model"])]
    for (split, setting, model, ckpt), part in frame.groupby(["split", "setting", "model", "checkpoint"], sort=False):
        seeds = ";".join(str(int(s)) for s in part["seed"] if s is not None and s == s)
        for col in metric_cols:
            v = part[col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({"split": split, "setting": setting, "model": model, "checkpoint": ckpt, "metric": col,
                         "n_seeds": int(v.size),
                         "mean": float(v.mean()) if v.size else np.nan,
                         "std": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                         "min": float(v.min()) if v.size else np.nan,
                         "max": float(v.max()) if v.size else np.nan,
                         "seeds": seeds})
    out = pd.DataFrame(rows, columns=["split", "setting", "model", "checkpoint", "metric", "n_seeds", "mean", "std",
                                      "min", "max", "seeds"])
    if out_csv is not None:
        io.write_csv(out, out_csv)
        log.info("scores over seeds of %d setting(s): %s", out["setting"].nunique(), out_csv)
    return out


#: columns of :func:`setting_differences`
DIFFERENCE_COLUMNS = ["split", "subset", "checkpoint", "setting", "reference", "metric", "better", "value",
                      "reference_value", "difference", "lower", "upper", "confidence", "n_blocks", "block",
                      "seed_spread", "n_seeds", "n_seeds_reference", "outside_interval", "outside_seed_spread",
                      "verdict"]


def reference_setting(settings: Mapping[str, Sequence]) -> str:
    """The setting every other is compared with: 'default' when there is one, else the first."""
    names = list(dict.fromkeys(s[0] for s in settings.values()))
    return "default" if "default" in names else names[0]


def _mean_components(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seeds of one setting as one source: each day's components averaged over the seeds, so
    every score is that of the seeds pooled (a CRPS the mean over seeds of their sums over counts)."""
    keys = [m for m in parts[0] if all(m in p for p in parts)]
    return {m: np.mean([p[m] for p in parts], axis=0) for m in keys}


def setting_differences(components: Mapping[str, str], settings: Mapping[str, Sequence], seeds: pd.DataFrame,
                        cfg: EvaluateConfig) -> pd.DataFrame:
    """Is a setting better than the reference one by more than chance?  (``experiments_differences.csv``)

    Two sources of chance: *which days were scored* (the paired bootstrap interval of the
    difference, :func:`precip_cvae.evaluate.intervals.bootstrap` with ``contrasts``, over days or
    seasons as ``cfg.bootstrap`` says: both settings on the same resampled days) and *which seed
    trained the model* (the seed spread: the larger of the two settings' standard deviations over
    seeds, from :func:`seed_summary`).  A difference is a result only when it lies outside both: the
    interval excludes 0 and its size exceeds the seed spread.  With one seed of either setting the
    seed spread is unknown and nothing is called (verdict 'one seed').

    Parameters
    ----------
    components : experiment -> its ``day_components.npz`` (written by evaluate)
    settings : experiment -> (setting, seed), as for :func:`seed_summary`
    seeds : :func:`seed_summary`'s table
    cfg : EvaluateConfig (headline metrics, bootstrap)

    Returns
    -------
    DataFrame, :data:`DIFFERENCE_COLUMNS`: per split, subset (all / heavy days), cVAE checkpoint,
    setting other than the reference and headline score: the seed-pooled scores of both, the
    difference setting - reference (for a score whose ideal is 1 -- frequency bias, spread/skill,
    tail_q99_ratio -- the difference of the distances to 1: negative is closer) and its interval,
    the seed spread, and the verdict 'better' / 'worse' / 'within the interval' / 'within the seed
    spread' / 'one seed'.  Empty (with the columns) for a single setting.
    """
    ref = reference_setting(settings)
    by_setting: dict[str, list[str]] = {}
    for e in components:
        by_setting.setdefault(settings[e][0], []).append(e)
    if len(by_setting) < 2 or cfg.bootstrap.samples <= 0:
        return pd.DataFrame(columns=DIFFERENCE_COLUMNS)
    loaded = {e: load_day_components(p) for e, p in components.items()}
    better = ({m: b for m, _, b in headline_metrics(cfg)} | {"tail_q99_ratio": "one"}
              | {m: b for m, _, b in AREAL_METRICS})
    metrics = [m for m in headline_interval_metrics(cfg) if m in better]
    targets = {m: 1.0 for m, b in better.items() if b == "one"}
    season_year = next(iter(loaded.values()))[2]
    spread = seeds[seeds["model"] == CVAE].set_index(["split", "setting", "checkpoint", "metric"])
    rows = []
    splits = [s for s in EVALUATE_SPLITS if all(s in c[0] for c in loaded.values())]
    for split in splits:
        dates, heavy = loaded[by_setting[ref][0]][1][split]
        for e, (_, days, _) in loaded.items():
            if not np.array_equal(days[split][0], dates):
                raise ValueError(f"{components[e]}: experiment {e!r} scored other {split} days than "
                                 f"{by_setting[ref][0]!r}; settings are compared on the same days only")
        ckpts = [model_and_checkpoint(s)[1] for s in loaded[by_setting[ref][0]][0][split] if s.startswith(CVAE + "_")]
        for ckpt in ckpts:
            src = f"{CVAE}_{ckpt}"
            pooled = {name: _mean_components([loaded[e][0][split][src] for e in exps])
                      for name, exps in by_setting.items() if all(src in loaded[e][0][split] for e in exps)}
            if ref not in pooled:
                continue
            pooled = {name: {m: c[m] for m in metrics if m in c} for name, c in pooled.items()}
            blocks = block_labels(dates, cfg.bootstrap.block, season_year)
            for subset in SUBSETS:
                idx = np.arange(len(dates)) if subset == "all" else np.flatnonzero(heavy)
                if idx.size == 0:
                    continue
                comps = {name: {m: a[idx] for m, a in c.items()} for name, c in pooled.items()}
                contrasts = [(name, ref) for name in pooled if name != ref]
                t = bootstrap(comps, blocks[idx], (), cfg.bootstrap.samples, cfg.bootstrap.confidence,
                              cfg.bootstrap.seed, block=cfg.bootstrap.block, contrasts=contrasts, targets=targets)
                value = t[t["statistic"] == "score"].set_index(["source", "metric"])["value"]
                for r in t[t["statistic"] == "difference"].itertuples(index=False):
                    rows.append(_difference_row(split, subset, ckpt, r, value, spread, better[r.metric]))
    out = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    return out


def _difference_row(split, subset, ckpt, r, value, spread, better: str) -> dict:
    """One row of :func:`setting_differences`: the bootstrapped difference r and its verdict."""
    def seed_stats(setting):
        key = (split, setting, ckpt, f"{r.metric}@{subset}")
        if key not in spread.index:
            return np.nan, 0
        hit = spread.loc[key]
        hit = hit.iloc[0] if isinstance(hit, pd.DataFrame) else hit
        return float(hit["std"]), int(hit["n_seeds"])

    (sd, n), (sd_ref, n_ref) = seed_stats(r.source), seed_stats(r.baseline)
    seed_spread = max(sd, sd_ref) if n > 1 and n_ref > 1 else np.nan
    sign = -1.0 if better == "higher" else 1.0  # oriented: negative is better
    oriented = sign * r.value
    lo, hi = sorted((sign * r.lower, sign * r.upper))
    outside_interval = bool(hi < 0 or lo > 0)
    outside_spread = bool(np.isfinite(seed_spread) and abs(r.value) > seed_spread)
    if not outside_interval:
        verdict = "within the interval"
    elif not np.isfinite(seed_spread):
        verdict = "one seed"
    elif not outside_spread:
        verdict = "within the seed spread"
    else:
        verdict = "better" if oriented < 0 else "worse"
    return {"split": split, "subset": subset, "checkpoint": ckpt, "setting": r.source, "reference": r.baseline,
            "metric": r.metric, "better": better, "value": float(value[(r.source, r.metric)]),
            "reference_value": float(value[(r.baseline, r.metric)]), "difference": float(r.value),
            "lower": float(r.lower), "upper": float(r.upper), "confidence": float(r.confidence),
            "n_blocks": int(r.n_blocks), "block": r.block, "seed_spread": seed_spread, "n_seeds": n,
            "n_seeds_reference": n_ref, "outside_interval": outside_interval,
            "outside_seed_spread": outside_spread, "verdict": verdict}
