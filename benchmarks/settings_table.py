"""Print the issue-28 table of a run: every setting's headline scores beside the analogs, with intervals.

Reads ``results/<run>/experiments/<setting>/evaluate/metrics.csv`` (the bootstrap bounds come from
there) for every setting of the run and prints one markdown table per split and subset:
CRPS and its ratio to the analogs' (90 % paired bootstrap interval), spread/skill, the P99
frequency bias, the pooled P99 of wet values over the observed one, RAPSD log ratios per band,
the mass bias, twCRPS, and the CRPS and spread/skill of the domain mean.  The ``cvae_best_qm`` rows (``evaluate.calibrate: quantile_map``) come
right after their setting.

Usage::

    .venv/bin/python benchmarks/settings_table.py results/iberia_issue28 [--split val] [--subset heavy]
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def _value(part: pd.DataFrame, metric: str) -> str:
    if metric == "q99":
        ens = part.loc[part["metric"] == "tail_q99_ens", "value"]
        obs = part.loc[part["metric"] == "tail_q99_obs", "value"]
        return f"{float(ens.iloc[0]) / float(obs.iloc[0]):.3f}" if len(ens) and len(obs) else "-"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="results/<run>")
    ap.add_argument("--split", nargs="+", default=["val", "test"])
    ap.add_argument("--subset", nargs="+", default=["all", "heavy"])
    args = ap.parse_args()
    for split in args.split:
        for subset in args.subset:
            print(f"\n**{split}, {subset} days** ({args.run})\n")
            print(table(args.run, split, subset))


if __name__ == "__main__":
    main()
