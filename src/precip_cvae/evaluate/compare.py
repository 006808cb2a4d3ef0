"""Rule ``compare_experiments``: every experiment's headline scores beside the baselines, and over seeds."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import io
from ..config import EVALUATE_SPLITS, EvaluateConfig
from .names import CVAE, NO_CHECKPOINT, SUBSETS, headline_metrics

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
                        settings: Mapping[str, Sequence] | None = None, seeds_csv: str | None = None) -> pd.DataFrame:
    """Run-level ``experiments_comparison.csv`` (headline split) from every experiment's metrics.csv
    (figure: :func:`precip_cvae.plots.comparison`), and with ``seeds_csv`` the mean and spread
    over seeds of each setting on every evaluated split (:func:`seed_summary`; val is the split
    to choose a setting on)."""
    tables = {name: io.read_csv(path, dtype={"checkpoint": str}) for name, path in metrics_csvs.items()}
    table = comparison_table(tables, cfg)
    io.write_csv(table, out_csv)
    log.info("compared %d experiment(s) and %d baseline(s): %s", len(tables),
             int((table["model"] != CVAE).sum()), out_csv)
    if seeds_csv is not None:
        splits = [s for s in EVALUATE_SPLITS if any((t["split"] == s).any() for t in tables.values())]
        per_split = pd.concat([comparison_table(tables, cfg, split=s) for s in splits], ignore_index=True)
        settings = settings or {name: [name, None] for name in tables}
        seed_summary(per_split, settings, out_csv=seeds_csv)
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
