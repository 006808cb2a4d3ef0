"""Independent re-computation of the evaluation's headline scores from the cached ensembles.

What it checks
--------------
The ``evaluate`` rule writes ``headline.csv``: for the primary cVAE checkpoint and every baseline,
on the headline split ('test'), for all days and for heavy days alone, CRPS, twCRPS Pxx, FSS Pxx
(w px), frequency bias Pxx, MAE_tail Pxx, CSI Pxx and the spread/skill ratio.  This script
recomputes every one of them from ``ensembles.zarr`` and the preprocess ``dataset.zarr`` with its
own numpy code -- nothing is imported from ``precip_cvae`` (neither ``metrics``, ``evaluate`` nor
``indices``, not even ``io``) -- and compares.  With ``--metrics`` (the ``metrics.csv`` beside the
headline) it also checks the sources the headline leaves out (e.g. ``cvae_last``) and the lower
percentile (P95) of twCRPS, frequency bias, FSS and MAE_tail.

Definitions (read from the project's documentation and source, re-implemented here)
-----------------------------------------------------------------------------------
* Valid point: a (day, pixel) where the truth is finite (NaN = not scored).
* Thresholds: per pixel, the linear ('numpy') percentile of the *wet* train days
  (pr >= wet_threshold, 1 mm/day) of the fold's ``dataset.zarr`` (padding cropped); pixels of the
  mask with fewer than ``min_wet_days`` (30) wet train days take the pooled percentile of all wet
  values of the valid pixels; NaN outside the mask; stored as float32.  In a pooled k-fold cache
  each day is scored with the thresholds of its fold (``truth/fold``; ``--datasets`` in fold order).
* CRPS: fair estimator per point, mean|x_i - y| - sum_{i,j}|x_i - x_j| / (2 M (M - 1)), averaged
  over valid points; M = 1 (interpolation): the absolute error.
* twCRPS: the same fair CRPS of max(X, t) against max(y, t) (chaining function v(x) = max(x, t)).
* Frequency bias: (member-mean count of ens > t) / (count of obs > t), over valid points.
* Contingency / CSI: member-pooled table (each count the mean over members), CSI = H / (H + M + F).
* FSS: forecast field = fraction of members > t; fractions over a w x w window, zero outside the
  domain, each divided by the valid share of its window; sums of (Pf - Po)^2 and Pf^2 + Po^2 over
  the valid points of all days; FSS = 1 - ratio.
* MAE_tail: MAE of the ensemble mean over the valid points with obs > t (improper; reported only).
* Spread/skill: sqrt((M + 1) / M) sqrt(mean over valid points of the member variance, ddof 1)
  / RMSE of the ensemble mean; NaN for M < 2.

Run
---
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_headline.py \\
        --ensembles results/tiny_kfold/experiments/default/evaluate/ensembles.zarr \\
        --datasets results/tiny_kfold/fold{0,1,2}/preprocess/dataset.zarr \\
        --headline results/tiny_kfold/experiments/default/evaluate/headline.csv \\
        [--metrics results/tiny_kfold/experiments/default/evaluate/metrics.csv] [--split test]

Prints one line per (source, subset, metric) -- project value, independent value, relative
difference -- then the largest relative difference per metric.  Exit status 1 when any value
differs by more than ``TOLERANCE`` (relative), or is NaN on one side only; 0 otherwise.
Memory: the truth and one source's ensemble (float64) at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings

import numpy as np
import pandas as pd
import xarray as xr

#: largest accepted relative difference |project - independent| / |project|
TOLERANCE = 1e-3
#: days per chunk of the per-point CRPS (the sorted members of a chunk are held in memory)
CHUNK_DAYS = 64


# ----------------------------------------------------------------------------- inputs


def open_group(path: str, group: str | None = None) -> xr.Dataset:
    try:
        return xr.open_zarr(path, group=group, consolidated=True)
    except (KeyError, ValueError, FileNotFoundError):
        return xr.open_zarr(path, group=group, consolidated=False)


def source_label(source: str) -> str:
    """The headline's display name of a cache source: 'cvae_best' -> 'cVAE (best)'."""
    return f"cVAE ({source[len('cvae_'):]})" if source.startswith("cvae_") else source


def parse_headline_columns(columns) -> dict:
    """Metric key -> column label, and the percentile / FSS window the labels name."""
    out, pct, window = {}, None, None
    for col in columns:
        if col == "CRPS":
            out["crps"] = col
        elif col == "spread/skill":
            out["spread_skill"] = col
        elif m := re.fullmatch(r"twCRPS P([\d.]+)", col):
            pct = m.group(1)
            out[f"twcrps_p{pct}"] = col
        elif m := re.fullmatch(r"FSS P([\d.]+) \((\d+) px\)", col):
            window = int(m.group(2))
            out[f"fss_p{m.group(1)}_w{window}"] = col
        elif m := re.fullmatch(r"freq\. bias P([\d.]+)", col):
            out[f"freq_bias_p{m.group(1)}"] = col
        elif m := re.fullmatch(r"MAE_tail P([\d.]+) \(improper\)", col):
            out[f"mae_tail_p{m.group(1)}"] = col
        elif m := re.fullmatch(r"CSI P([\d.]+)", col):
            out[f"csi_p{m.group(1)}"] = col
        elif col not in ("source", "subset"):
            print(f"note: headline column {col!r} is not reproduced")
    if pct is None:
        raise SystemExit("headline.csv has no 'twCRPS P..' column: cannot tell the percentile")
    return {"columns": out, "percentile": pct, "window": window}


def fold_thresholds(dataset: str, percentile: float, wet_threshold: float, min_wet_days: int) -> np.ndarray:
    """Per-pixel wet-day percentile of the train days of ``dataset`` (h, w), mm/day, NaN off the mask."""
    ds = open_group(dataset)
    units = ds["pr"].attrs.get("units", "mm day-1")
    if units not in ("mm day-1", "mm/day", "mm d-1"):
        raise SystemExit(f"{dataset}: pr is in {units!r}, expected mm day-1")
    plat = [int(v) for v in np.atleast_1d(ds.attrs.get("pad_lat", [0, 0]))]
    plon = [int(v) for v in np.atleast_1d(ds.attrs.get("pad_lon", [0, 0]))]
    crop = dict(lat=slice(plat[0], ds.sizes["lat"] - plat[1]), lon=slice(plon[0], ds.sizes["lon"] - plon[1]))
    train = np.flatnonzero(ds["split"].values.astype(str) == "train")
    pr = ds["pr"].isel(time=train, **crop).transpose("time", "lat", "lon").values.astype(np.float64)
    mask = ds["mask"].isel(**crop).values.astype(bool)
    wet = pr >= wet_threshold  # NaN is not wet
    n_wet = wet.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels (no wet day) give NaN
        local = np.nanpercentile(np.where(wet, pr, np.nan), percentile, axis=0)
    use_pooled = (n_wet < min_wet_days) & mask
    thr = local
    if use_pooled.any():
        pooled = np.percentile(pr[wet & mask[None]], percentile)
        thr = np.where(use_pooled, pooled, local)
    thr = np.where(mask, thr, np.nan)
    return thr.astype(np.float32).astype(np.float64)  # the project stores the maps as float32


# ----------------------------------------------------------------------------- scores


def fair_crps(ens: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Per-point fair CRPS (M, ...) vs (...); the absolute error for M = 1.

    sum_{i,j} |x_i - x_j| = 2 sum_k (2k - M + 1) x_(k) over the sorted members x_(0) <= ... (k from 0).
    """
    m = ens.shape[0]
    skill = np.mean(np.abs(ens - obs[None]), axis=0)
    if m == 1:
        return skill
    xs = np.sort(ens, axis=0)
    w = (2.0 * np.arange(m) - m + 1).reshape((m,) + (1,) * obs.ndim)
    spread = np.sum(w * xs, axis=0) / (m * (m - 1))  # = sum_{i,j}|x_i - x_j| / (2 M (M - 1))
    return skill - spread


def mean_over_valid(per_point, ens, obs, thr=None) -> float:
    total, count = 0.0, 0
    for s in range(0, obs.shape[0], CHUNK_DAYS):
        sl = slice(s, s + CHUNK_DAYS)
        o = obs[sl]
        v = np.isfinite(o)
        if thr is None:
            vals = per_point(ens[:, sl], o)
        else:
            t = thr[sl]
            vals = per_point(np.maximum(ens[:, sl], t[None]), np.maximum(o, t))
        total += float(vals[v].sum())
        count += int(v.sum())
    return total / count if count else math.nan


def ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def frequency_bias(ens, obs, thr) -> float:
    v = np.isfinite(obs)
    n_obs = np.count_nonzero(obs[v] > thr[v])
    n_fc = np.mean([np.count_nonzero(member[v] > thr[v]) for member in ens])
    return ratio(n_fc, n_obs)


def csi(ens, obs, thr) -> float:
    v = np.isfinite(obs)
    o = obs[v] > thr[v]
    hits = np.mean([np.count_nonzero((member[v] > thr[v]) & o) for member in ens])
    false_alarms = np.mean([np.count_nonzero((member[v] > thr[v]) & ~o) for member in ens])
    misses = np.count_nonzero(o) - hits  # the same for every member
    return ratio(hits, hits + misses + false_alarms)


def mae_tail(ens, obs, thr) -> float:
    v = np.isfinite(obs)
    sel = v & (obs > np.where(v, thr, np.inf))
    if not sel.any():
        return math.nan
    return float(np.mean(np.abs(ens.mean(axis=0)[sel] - obs[sel])))


def spread_skill(ens, obs) -> float:
    m = ens.shape[0]
    v = np.isfinite(obs)
    if m < 2 or not v.any():
        return math.nan
    e = ens[:, v]
    mean = e.mean(axis=0)
    var = np.sum((e - mean) ** 2, axis=0) / (m - 1)
    rmse = math.sqrt(float(np.mean((mean - obs[v]) ** 2)))
    return ratio(math.sqrt((m + 1) / m) * math.sqrt(float(var.mean())), rmse)


def box_sum(a: np.ndarray, w: int) -> np.ndarray:
    """Sum over the w x w window of each pixel of the last two axes, zero outside (integral image).

    The window of pixel i spans i - w//2 .. i - w//2 + w - 1 (centred for odd w).
    """
    lo, hi = w // 2, w - 1 - w // 2
    pad = [(0, 0)] * (a.ndim - 2) + [(lo + 1, hi), (lo + 1, hi)]  # one extra leading zero for the differences
    c = np.pad(a, pad).cumsum(axis=-2).cumsum(axis=-1)
    h, wd = a.shape[-2:]
    return c[..., w:w + h, w:w + wd] - c[..., :h, w:w + wd] - c[..., w:w + h, :wd] + c[..., :h, :wd]


def fss(ens, obs, thr, window: int) -> float:
    v = np.isfinite(obs)
    t = np.where(v, thr, np.inf)
    pf = np.where(v, np.mean(ens > t[None], axis=0), 0.0)
    po = np.where(v, obs > t, False).astype(np.float64)
    n_valid = box_sum(v.astype(np.float64), window)
    with np.errstate(invalid="ignore", divide="ignore"):
        ff = np.where(n_valid > 0, box_sum(pf, window) / n_valid, 0.0)
        fo = np.where(n_valid > 0, box_sum(po, window) / n_valid, 0.0)
    num = float(np.sum(((ff - fo) ** 2)[v]))
    den = float(np.sum((ff ** 2 + fo ** 2)[v]))
    return 1.0 - num / den if den > 0 else math.nan


def all_scores(ens, obs, thr: dict, window: int | None) -> dict[str, float]:
    """The reproduced scores of one ensemble (M, N, h, w) against obs (N, h, w); thr: name -> (N, h, w)."""
    out = {"crps": mean_over_valid(fair_crps, ens, obs), "spread_skill": spread_skill(ens, obs)}
    for name, t in thr.items():
        out[f"twcrps_{name}"] = mean_over_valid(fair_crps, ens, obs, t)
        out[f"freq_bias_{name}"] = frequency_bias(ens, obs, t)
        out[f"csi_{name}"] = csi(ens, obs, t)
        out[f"mae_tail_{name}"] = mae_tail(ens, obs, t)
        if window is not None:
            out[f"fss_{name}_w{window}"] = fss(ens, obs, t, window)
    return out


# ----------------------------------------------------------------------------- comparison


def rel_diff(project: float, mine: float) -> float:
    if math.isnan(project) and math.isnan(mine):
        return 0.0
    if math.isnan(project) or math.isnan(mine):
        return math.inf
    if project == mine:
        return 0.0
    return abs(project - mine) / max(abs(project), 1e-300)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ensembles", required=True, help="ensembles.zarr (a fixed split's or a pooled k-fold cache)")
    ap.add_argument("--datasets", required=True, nargs="+", help="dataset.zarr, one per fold in fold order")
    ap.add_argument("--headline", required=True, help="headline.csv written by evaluate")
    ap.add_argument("--metrics", help="metrics.csv written by evaluate: also check every source and the P95 scores")
    ap.add_argument("--split", default="test")
    ap.add_argument("--wet-threshold", type=float, default=1.0, help="evaluate.wet_threshold, mm/day")
    ap.add_argument("--min-wet-days", type=int, default=30, help="evaluate.min_wet_days")
    args = ap.parse_args(argv)

    headline = pd.read_csv(args.headline)
    spec = parse_headline_columns(headline.columns)
    hi = spec["percentile"]
    percentiles = {f"p{hi}": float(hi)}
    metrics = None
    if args.metrics:
        metrics = pd.read_csv(args.metrics)
        metrics = metrics[metrics.split == args.split]
        for name in sorted(set(re.findall(r"^twcrps_p([\d.]+)$", "\n".join(metrics.metric.unique()), re.M))):
            percentiles[f"p{name}"] = float(name)

    meta = json.loads(open_group(args.ensembles).attrs["evaluate_meta"])
    if args.split not in meta["splits"]:
        raise SystemExit(f"split {args.split!r} is not in the cache ({meta['splits']})")

    # thresholds: one map per fold and percentile, then each day's fold's map
    maps = {name: [fold_thresholds(d, p, args.wet_threshold, args.min_wet_days) for d in args.datasets]
            for name, p in percentiles.items()}
    for k, d in enumerate(args.datasets):
        attr_fold = open_group(d).attrs.get("fold")
        if attr_fold is not None and int(attr_fold) != k:
            raise SystemExit(f"{d} is fold {attr_fold} but was given at position {k}: give --datasets in fold order")
        print(f"thresholds fold {k}: " + ", ".join(f"{n} median {np.nanmedian(m[k]):.2f}" for n, m in maps.items())
              + " mm/day")
    truth = open_group(args.ensembles, f"{args.split}/truth").load()
    obs = truth["pr"].transpose("time", "lat", "lon").values.astype(np.float64)
    heavy = truth["is_event"].values.astype(bool)
    if "fold" in truth:
        fold = truth["fold"].values.astype(int)
    else:
        if len(args.datasets) != 1:
            raise SystemExit("the cache is not pooled (truth has no 'fold'): give one --datasets")
        fold = np.zeros(obs.shape[0], dtype=int)
    if fold.max() >= len(args.datasets):
        raise SystemExit(f"the cache holds fold {fold.max()} but {len(args.datasets)} datasets were given")
    thr_days = {name: np.stack(m)[fold] for name, m in maps.items()}  # (N, h, w)
    subsets = {"all": np.arange(obs.shape[0]), "heavy": np.flatnonzero(heavy)}
    print(f"split {args.split}: {obs.shape[0]} days ({heavy.sum()} heavy), grid {obs.shape[1:]}, "
          f"{int(np.isfinite(obs).sum())} valid points, folds {np.bincount(fold).tolist()}")

    label_to_source = {source_label(s): s for s in meta["sources"]}
    sources = [label_to_source[lab] for lab in headline.source.unique() if lab in label_to_source]
    missing = [lab for lab in headline.source.unique() if lab not in label_to_source]
    if missing:
        print(f"note: headline sources {missing} are not in the cache")
    if metrics is not None:
        sources += [s for s in meta["sources"] if s not in sources]

    rows = []
    for source in sources:
        ens = open_group(args.ensembles, f"{args.split}/{source}")["pr"].transpose(
            "member", "time", "lat", "lon").values.astype(np.float64)
        for subset, idx in subsets.items():
            if idx.size == 0:
                continue
            mine = all_scores(ens[:, idx], obs[idx], {n: t[idx] for n, t in thr_days.items()}, spec["window"])
            row = headline[(headline.source == source_label(source)) & (headline.subset == subset)]
            for key, col in spec["columns"].items():
                if len(row):
                    rows.append((source, subset, key, "headline", float(row[col].iloc[0]), mine[key]))
            if metrics is not None:
                model, ckpt = (("cvae", source[5:]) if source.startswith("cvae_") else (source, "-"))
                part = metrics[(metrics.model == model) & (metrics.checkpoint == ckpt) & (metrics.subset == subset)]
                for key, value in mine.items():
                    if len(row) and key in spec["columns"]:
                        continue  # already compared against the headline
                    hit = part[part.metric == key]
                    if len(hit):
                        rows.append((source, subset, key, "metrics", float(hit.value.iloc[0]), value))
        del ens

    table = pd.DataFrame(rows, columns=["source", "subset", "metric", "from", "project", "independent"])
    table["rel_diff"] = [rel_diff(p, m) for p, m in zip(table.project, table.independent)]
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.6g}".format):
        print(table.to_string(index=False))
        print(f"\nlargest relative difference per metric (tolerance {TOLERANCE:g}):")
        print(table.groupby("metric", sort=False)["rel_diff"].max().to_string())
    bad = table[table.rel_diff > TOLERANCE]
    if len(bad):
        print(f"\nFAIL: {len(bad)} value(s) differ by more than {TOLERANCE:g} (relative):")
        print(bad.to_string(index=False))
        return 1
    print(f"\nOK: all {len(table)} values reproduced within {TOLERANCE:g} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
