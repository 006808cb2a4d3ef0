"""What a perfectly calibrated ensemble scores on its heavy days: each member in turn plays the truth.

A perfect-model test of the heavy-day goals of issue 28.  Heavy days are chosen by the truth (the
observed field exceeds its local P99 on at least ``--min-exceed`` of the valid cells, detect_events'
``exceedance`` criterion).  Conditioning on the outcome is the forecaster's dilemma: even an ensemble
whose truth is one more draw from it (exchangeable, calibrated by construction) then looks too dry,
too narrow and too light-tailed on those days.  This script measures by how much, on a run's own
members: member k is the truth, the other M - 1 members the ensemble, the heavy days are those of
member k; the scores are averaged over k.  Beside it, the same M - 1 members against the real truth
on the real heavy days.  A goal that the perfect model misses is not a goal any calibrated ensemble
can meet.

Usage (a pooled k-fold run; the fold data sets give each day its fold's thresholds)::

    .venv/bin/python benchmarks/perfect_model.py results/iberia_issue28e default
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd

from precip_cvae import io
from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate.intervals import day_slice
from precip_cvae.evaluate.score import day_parts, day_thresholds, scores_of, tail_thresholds
from precip_cvae.events import field_statistics

KEYS = [("crps", "CRPS"), ("spread_skill", "spread/skill"), ("freq_bias_p99", "P99 freq. bias"),
        ("q99", "P99 wet / truth"), ("mass_error_bias", "mass bias"), ("rapsd_log_ratio", "RAPSD log ratio")]


def heavy_days(truth: np.ndarray, thr99, min_exceed: float) -> np.ndarray:
    """detect_events' exceedance criterion (``events.field_statistics``): the share of a day's valid cells above
    their local P99 >= min_exceed; ``thr99`` one map or per-day maps (an array or ``FoldMaps``)."""
    n = truth.shape[0]
    out = np.zeros(n, bool)
    for s in range(0, n, 256):
        stop = min(s + 256, n)
        stats = field_statistics(truth[s:stop], day_slice(thr99, n, s, stop))
        out[s:stop] = stats["exceed_fraction"].to_numpy() >= min_exceed
    return out


def _row(scores: dict) -> dict:
    row = {k: scores[k] for k, _ in KEYS if k in scores}
    row["q99"] = scores["tail_q99_ens"] / scores["tail_q99_obs"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="results/<run> (a pooled k-fold run or a fixed split)")
    ap.add_argument("experiment", help="the setting whose cvae_best members are used")
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-exceed", type=float, default=0.05, help="events.min_exceed_fraction of the run")
    args = ap.parse_args(argv)
    run = Path(args.run)
    store = run / "experiments" / args.experiment / "evaluate" / "ensembles.zarr"
    cfg = EvaluateConfig()
    folds = sorted(glob.glob(str(run / "fold*" / "preprocess" / "dataset.zarr")))
    datasets = folds or [str(run / "preprocess" / "dataset.zarr")]
    maps = [tail_thresholds(d, cfg) for d in datasets]
    truth = io.open_zarr_group(str(store), f"{args.split}/truth")
    thr = day_thresholds(maps if folds else maps[0], truth)
    obs = truth["pr"].values.astype("float64")
    real_heavy = truth["is_event"].values.astype(bool)
    ens = io.open_zarr_group(str(store), f"{args.split}/cvae_best")["pr"].values  # (M, N, h, w) float32
    m = ens.shape[0]
    check = heavy_days(obs, thr["p99"], args.min_exceed)
    print(f"{store} ({args.split}): {m} members, {obs.shape[0]} days; the criterion finds {int(check.sum())} heavy "
          f"days in the truth, detect_events found {int(real_heavy.sum())} ({int((check == real_heavy).sum())} agree)")
    rows = []
    others = ens[1:]
    parts = day_parts(others, obs, thr, windows=(1,))
    rows.append({"truth": "observed", "heavy_days": int(real_heavy.sum()),
                 **{f"all_{k}": v for k, v in _row(scores_of(parts)[0]).items()},
                 **{f"heavy_{k}": v for k, v in _row(scores_of(parts, np.flatnonzero(real_heavy))[0]).items()}})
    for k in range(m):
        t = np.where(np.isfinite(obs), ens[k].astype("float64"), np.nan)
        heavy = heavy_days(t, thr["p99"], args.min_exceed)
        parts = day_parts(np.delete(ens, k, axis=0), t, thr, windows=(1,))
        rows.append({"truth": f"member {k}", "heavy_days": int(heavy.sum()),
                     **{f"all_{key}": v for key, v in _row(scores_of(parts)[0]).items()},
                     **({f"heavy_{key}": v for key, v in _row(scores_of(parts, np.flatnonzero(heavy))[0]).items()}
                        if heavy.any() else {})})
    table = pd.DataFrame(rows)
    members = table[table["truth"] != "observed"]
    stats = [members.mean(numeric_only=True), members.min(numeric_only=True), members.max(numeric_only=True)]
    summary = pd.DataFrame([{**table.iloc[0].to_dict(), "truth": "observed truth, real heavy days"},
                            *({**s_.to_dict(), "truth": f"perfect model ({name})"}
                              for s_, name in zip(stats, ("mean over members", "min", "max")))])
    cols = ["truth", "heavy_days"] + [f"{s}_{k}" for s in ("all", "heavy") for k, _ in KEYS]
    print(summary[cols].to_markdown(index=False, floatfmt=".3g"))
    print(json.dumps({"members_as_truth": m, "ensemble_members": m - 1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
