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


def day_statistics(fields: np.ndarray, thr99, min_exceed: float) -> tuple[np.ndarray, np.ndarray]:
    """Domain mean and detect_events' exceedance criterion (``events.field_statistics``: the share of a day's
    valid cells above their local P99 >= min_exceed) of each of the N fields (N, h, w); ``thr99`` one map or
    per-day maps (an array or ``FoldMaps``)."""
    n = fields.shape[0]
    mean, heavy = np.zeros(n), np.zeros(n, bool)
    for s in range(0, n, 256):
        stop = min(s + 256, n)
        st = field_statistics(fields[s:stop], day_slice(thr99, n, s, stop))
        mean[s:stop] = st["domain_mean"].to_numpy()
        heavy[s:stop] = st["exceed_fraction"].to_numpy() >= min_exceed
    return mean, heavy


def rain_ratios(truth_mean: np.ndarray, heavy: np.ndarray, member_mean: np.ndarray,
                member_heavy: np.ndarray) -> dict:
    """``generate``'s rain goal on the truth's heavy days: the members' mean domain-mean rain over the truth's,
    (a) every member (``filter_heavy`` off) and (b) only the members that are heavy themselves (on), over the
    days where some member is; member_* are (M, N)."""
    d = np.flatnonzero(heavy)
    out = {"rain_all": member_mean[:, d].mean() / truth_mean[d].mean()}
    some = member_heavy[:, d].any(axis=0)
    if some.any():
        kept = np.where(member_heavy[:, d[some]], member_mean[:, d[some]], np.nan)
        out["rain_filtered"] = np.nanmean(kept, axis=0).mean() / truth_mean[d[some]].mean()
        out["filtered_days"] = some.mean()
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
    obs_mean, check = day_statistics(obs, thr["p99"], args.min_exceed)
    stats = [day_statistics(np.where(np.isfinite(obs), ens[k].astype("float64"), np.nan), thr["p99"],
                            args.min_exceed) for k in range(m)]
    means, heavies = np.stack([a for a, _ in stats]), np.stack([b for _, b in stats])  # (M, N)
    print(f"{store} ({args.split}): {m} members, {obs.shape[0]} days; the criterion finds {int(check.sum())} heavy "
          f"days in the truth, detect_events found {int(real_heavy.sum())} ({int((check == real_heavy).sum())} agree)")
    rows = []
    others = ens[1:]
    parts = day_parts(others, obs, thr, windows=(1,))
    rows.append({"truth": "observed", "heavy_days": int(real_heavy.sum()),
                 **rain_ratios(obs_mean, real_heavy, means[1:], heavies[1:]),
                 **{f"all_{k}": v for k, v in _row(scores_of(parts)[0]).items()},
                 **{f"heavy_{k}": v for k, v in _row(scores_of(parts, np.flatnonzero(real_heavy))[0]).items()}})
    for k in range(m):
        t = np.where(np.isfinite(obs), ens[k].astype("float64"), np.nan)
        heavy = heavies[k]
        parts = day_parts(np.delete(ens, k, axis=0), t, thr, windows=(1,))
        rest = np.arange(m) != k
        rows.append({"truth": f"member {k}", "heavy_days": int(heavy.sum()),
                     **(rain_ratios(means[k], heavy, means[rest], heavies[rest]) if heavy.any() else {}),
                     **{f"all_{key}": v for key, v in _row(scores_of(parts)[0]).items()},
                     **({f"heavy_{key}": v for key, v in _row(scores_of(parts, np.flatnonzero(heavy))[0]).items()}
                        if heavy.any() else {})})
    table = pd.DataFrame(rows)
    members = table[table["truth"] != "observed"]
    summaries = [members.mean(numeric_only=True), members.min(numeric_only=True), members.max(numeric_only=True)]
    summary = pd.DataFrame([{**table.iloc[0].to_dict(), "truth": "observed truth, real heavy days"},
                            *({**s_.to_dict(), "truth": f"perfect model ({name})"}
                              for s_, name in zip(summaries, ("mean over members", "min", "max")))])
    cols = ["truth", "heavy_days"] + [f"{s}_{k}" for s in ("all", "heavy") for k, _ in KEYS]
    print(summary[cols].to_markdown(index=False, floatfmt=".3g"))
    print("\ngenerated rain on the heavy days / the truth's: every member (filter_heavy off), only the members "
          "heavy themselves (on), and the share of heavy days where some member is")
    print(summary[["truth", "rain_all", "rain_filtered", "filtered_days"]].to_markdown(index=False, floatfmt=".3g"))
    print(json.dumps({"members_as_truth": m, "ensemble_members": m - 1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
