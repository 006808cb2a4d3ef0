"""How heavy the generated heavy-day samples are, day by day against the real day they were conditioned on.

Issue 28's goal "rain of generated heavy-day samples / real heavy days" (0.95-1.05).  ``generate``'s report
compares the pooled medians of the two sets; this script pairs them: for each heavy day with samples, the mean
over its samples of a statistic (domain mean, domain maximum, the share of cells above their local P99) against
the real day's, the ratio of the means over days and its 90 % paired bootstrap interval over days
(``precip_cvae.generate.report.paired_with_real_days``, as ``generation_report`` gives it for one run).  Days left
without a sample (``generate.filter_heavy`` can leave some) are counted, not scored.

The real days are chosen by their outcome (heavy under ``events.criterion``), so unfiltered samples, drawn from
p(field | predictors), are lighter even from a perfect model (the forecaster's dilemma; the perfect-model test in
docs/results-iberia.md finds 0.85 (0.78-0.87) there).  With ``generate.filter_heavy`` the samples are drawn from
p(field | predictors, heavy) by the same criterion, the distribution the real heavy day is one draw of, so a
calibrated model gives a ratio of 1 in expectation.

Usage (each run's experiments with a ``generate/augmented.zarr``; several runs, e.g. with and without the
filter, are printed in one table)::

    .venv/bin/python benchmarks/generated_rain.py results/iberia_issue28f results/iberia_issue28g
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from precip_cvae.events import field_statistics
from precip_cvae.generate.report import paired_with_real_days
from precip_cvae.grid import crop_to_original

STATS = [("domain_mean", "rain"), ("domain_max", "peak"), ("exceed_fraction", "area > P99")]


def samples_and_real_days(generate_dir: Path, run: Path, splits: list[str]) -> dict:
    """The statistics of every stored sample (with its ``source_date``) and of the real heavy days of generate's
    splits (events.csv), as ``generation_report`` computes them, from a run's outputs."""
    report = json.loads((generate_dir / "generation_report.json").read_text())
    with xr.open_zarr(generate_dir / "augmented.zarr") as aug, xr.open_dataset(run / "events" / "thresholds.nc") as t:
        thr = crop_to_original(t["threshold"], t.attrs).values
        pr = aug["pr"].values  # (D, R, h, w), NaN past a day's accepted count and outside the mask
        counts = aug["n_realizations"].values
        dates = pd.DatetimeIndex(aug["time"].values).strftime("%Y-%m-%d")
        filtered = int(aug.attrs.get("filter_heavy", 0))
    if thr.shape != pr.shape[-2:]:
        raise SystemExit(f"{run}/events/thresholds.nc: grid {thr.shape} is not the samples' {pr.shape[-2:]}")
    events = pd.read_csv(run / "events" / "events.csv", dtype={"date": str})
    heavy = events[events["is_event"] & events["split"].isin(splits)]
    if len(heavy) != report["heavy_days"]:
        raise SystemExit(f"{run}: {len(heavy)} heavy days of {splits} in events.csv, the report says "
                         f"{report['heavy_days']}")
    filled = np.arange(pr.shape[1])[None, :] < counts[:, None]  # (D, R) realizations that hold a sample
    synth = field_statistics(pr[filled], thr).assign(source_date=np.repeat(dates, counts))
    return {"synth": synth, "real": heavy.reset_index(drop=True), "filter": filtered,
            "acceptance": report["acceptance_rate"]}


def summarise(s: dict) -> dict:
    paired = paired_with_real_days(s["synth"], s["real"], s["real"]["date"].to_numpy())
    row = {"filter": s["filter"], "heavy days": len(s["real"]), "without samples": paired["days_without_samples"],
           "samples": len(s["synth"]), "acceptance": s["acceptance"]}
    for k, name in STATS:
        r = paired[k]
        row[f"{name} ratio"] = r["ratio"]
        row[f"{name} 90 %"] = "" if r["ci_low"] is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    # generate's report: the median over all samples against the median over the real heavy days
    row["rain ratio, pooled medians"] = float(s["synth"]["domain_mean"].median() / s["real"]["domain_mean"].median())
    return row


DOWNSTREAM = ["MAE_all", "MAE_tail", "quantile_loss", "freq_bias_p99"]


def downstream_rows(run: Path, experiment: str) -> list[dict]:
    """issue 11's downstream check beside the samples: augmented - real over the downscalers' seeds, with the
    check's own 95 % bootstrap interval over test days, for each loss and subset."""
    path = run / "experiments" / experiment / "downstream" / "comparison.csv"
    if not path.exists():
        return []
    d = pd.read_csv(path, dtype={"seed": str})
    d = d[(d["training_set"] == "augmented_minus_real") & (d["seed"] == "all") & d["metric"].isin(DOWNSTREAM)]
    rows = []
    for (loss, subset), g in d.groupby(["loss", "subset"], sort=False):
        row = {"run": run.name, "experiment": experiment, "downscaler loss": loss, "days": subset}
        for _, r in g.iterrows():
            row[r["metric"]] = f"{r['value']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="results/<run> directories")
    ap.add_argument("--splits", nargs="+", default=["train"], help="generate.splits of the runs")
    args = ap.parse_args(argv)
    rows, down = [], []
    for r in args.runs:
        run = Path(r)
        for gdir in sorted(run.glob("experiments/*/generate")):
            if not (gdir / "augmented.zarr").exists():
                continue
            rows.append({"run": run.name, "experiment": gdir.parent.name, **summarise(samples_and_real_days(gdir, run, args.splits))})
            down.extend(downstream_rows(run, gdir.parent.name))
    if not rows:
        raise SystemExit(f"no generate/augmented.zarr under {args.runs}")
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3g"))
    num = [c for c in table.columns if c.endswith("ratio") or c in ("acceptance", "without samples")]
    print()
    print(table.groupby(["run", "filter"])[num].agg(["mean", "std"]).T.to_markdown(floatfmt=".3g"))
    if down:
        print("\ndownstream check, augmented - real [95 %]:")
        print(pd.DataFrame(down).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
