"""Print the issue-28 table of a run: every setting's headline scores beside the analogs, with intervals.

Reads ``results/<run>/experiments/<setting>/evaluate/metrics.csv`` (the bootstrap bounds come from
there) for every setting of the run and prints one markdown table per split and subset:
CRPS and its ratio to the analogs' (90 % paired bootstrap interval), spread/skill, the P99
frequency bias, the pooled P99 of wet values over the observed one, RAPSD log ratios per band,
the mass bias, twCRPS, and the CRPS and spread/skill of the domain mean.  The ``cvae_best_qm`` rows (``evaluate.calibrate: quantile_map``) come
right after their setting.  ``--over-seeds`` adds a table of each setting's mean ± standard deviation over
its experiments ``<setting>_seed<N>`` (named so by ``experiment_seeds`` or by hand), the seed spread that a
difference between settings has to beat.

Usage::

    .venv/bin/python benchmarks/settings_table.py results/iberia_issue28 [--split val] [--subset heavy] [--over-seeds]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    ("crps", "CRPS"),
    ("crps_ratio_analogs", "CRPS / analogs [90 %]"),
    ("spread_skill", "spread/skill"),
    ("freq_bias_p99", "freq. bias P99"),
    ("q99", "P99 wet / obs"),
    ("rapsd_log_ratio_gt8px", "RAPSD >8 px"),
    ("rapsd_log_ratio_4to8px", "4-8 px"),
    ("rapsd_log_ratio_2to4px", "2-4 px"),
    ("mass_error_bias", "mass bias"),
    ("twcrps_p99", "twCRPS P99"),
    ("crps_field", "CRPS domain mean"),
    ("spread_skill_field", "spread/skill domain mean"),
]


def _number(part: pd.DataFrame, metric: str) -> float:
    if metric == "q99":
        ens = part.loc[part["metric"] == "tail_q99_ens", "value"]
        obs = part.loc[part["metric"] == "tail_q99_obs", "value"]
        return float(ens.iloc[0]) / float(obs.iloc[0]) if len(ens) and len(obs) else np.nan
    row = part.loc[part["metric"] == metric, "value"]
    return float(row.iloc[0]) if len(row) else np.nan


def _value(part: pd.DataFrame, metric: str) -> str:
    if metric == "q99":
        ratio = _number(part, metric)
        return "-" if np.isnan(ratio) else f"{ratio:.3f}"
    row = part[part["metric"] == metric]
    if row.empty:
        return "-"
    r = row.iloc[0]
    text = f"{r['value']:.3g}" if abs(r["value"]) >= 0.01 else f"{r['value']:.2g}"
    if metric.endswith("_ratio_analogs") and pd.notna(r.get("lower")):
        text = f"{r['value']:.3f} [{r['lower']:.3f}, {r['upper']:.3f}]"
    return text


def table(run: Path, split: str, subset: str) -> str:
    rows, baselines = [], None
    for metrics in sorted(run.glob("experiments/*/evaluate/metrics.csv")):
        setting = metrics.parent.parent.name
        t = pd.read_csv(metrics)
        t = t[(t["split"] == split) & (t["subset"] == subset)]
        for (model, ckpt), part in t[t["model"] == "cvae"].groupby(["model", "checkpoint"], sort=False):
            if ckpt not in ("best", "best_qm"):
                continue
            name = setting if ckpt == "best" else f"{setting} + quantile map"
            rows.append([name] + [_value(part, m) for m, _ in COLUMNS])
        if baselines is None:
            baselines = [[model] + [_value(part, m) for m, _ in COLUMNS]
                         for model, part in t[t["model"] != "cvae"].groupby("model", sort=False)]
    head = "| setting | " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    body = ["| " + " | ".join(r) + " |" for r in rows + (baselines or [])]
    return "\n".join([head, sep, *body])


def seed_values(run: Path, split: str, subset: str) -> pd.DataFrame:
    """One row per experiment ``<setting>_seed<N>`` (best checkpoint): setting, seed and every column's number."""
    rows = []
    for metrics in sorted(run.glob("experiments/*/evaluate/metrics.csv")):
        match = re.fullmatch(r"(.+)_seed(\d+)", metrics.parent.parent.name)
        if match is None:
            continue
        t = pd.read_csv(metrics)
        part = t[(t["split"] == split) & (t["subset"] == subset) & (t["model"] == "cvae") & (t["checkpoint"] == "best")]
        rows.append({"setting": match[1], "seed": int(match[2]), **{m: _number(part, m) for m, _ in COLUMNS}})
    return pd.DataFrame(rows, columns=["setting", "seed", *(m for m, _ in COLUMNS)])


def seeds_table(run: Path, split: str, subset: str) -> str:
    """Mean ± standard deviation (ddof 1) over each setting's seeds; the ratio column without its interval."""
    values = seed_values(run, split, subset)
    head = "| setting | seeds | " + " | ".join(label.replace(" [90 %]", "") for _, label in COLUMNS) + " |"
    body = []
    for setting, group in values.groupby("setting", sort=False):
        cells = []
        for metric, _ in COLUMNS:
            x = group[metric].dropna()
            cells.append("-" if x.empty else f"{x.mean():.3g}" if len(x) == 1 else f"{x.mean():.3g} ± {x.std(ddof=1):.2g}")
        body.append(f"| {setting} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join([head, "|" + "---|" * (len(COLUMNS) + 2), *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="results/<run>")
    ap.add_argument("--split", nargs="+", default=["val", "test"])
    ap.add_argument("--subset", nargs="+", default=["all", "heavy"])
    ap.add_argument("--over-seeds", action="store_true", help="also each setting's mean ± sd over its seeds")
    args = ap.parse_args()
    for split in args.split:
        for subset in args.subset:
            print(f"\n**{split}, {subset} days** ({args.run})\n")
            print(table(args.run, split, subset))
            if args.over_seeds:
                print(f"\n**{split}, {subset} days, over seeds** ({args.run})\n")
                print(seeds_table(args.run, split, subset))


if __name__ == "__main__":
    main()
