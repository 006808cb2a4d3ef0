"""Scores of areal rain that do not condition on the outcome: how often the members make a heavy day.

The heavy-day rows of the evaluation choose days by the truth, which penalises a calibrated ensemble (the
forecaster's dilemma; ``benchmarks/perfect_model.py``).  This script reads a run's pooled ensembles and
scores what every day shows, whatever it turned out to be:

- ``heavy_freq``: the days on which a member meets detect_events' criterion (at least ``--min-exceed`` of the
  valid cells above their local P99), averaged over the members, divided by the days on which the truth does.
  A calibrated ensemble has 1 whatever its skill.
- ``crps_field``: the fair CRPS of the domain-mean rain (mm/day), averaged over the days.
- ``crps_block<k>``: the fair CRPS of the means of non-overlapping k x k blocks (half of their cells valid),
  averaged over the blocks of each day, then over the days.
- ``crps_area``: the fair CRPS of the share of valid cells above their local P99.
- ``ss_cell``, ``ss_block<k>``, ``ss_field``: the spread/skill of single cells, of the block means and of the
  domain mean, ``sqrt((M + 1) / M * sum of the members' variance / sum of the squared error of their mean)``
  over every counted block of the days: members that scatter their rain over the cells keep it near 1 per
  cell and fall short over areas.

Seeds are pooled: each day's scores are averaged over a setting's seeds.  For every setting after the first, the
paired difference against the first, with a 90 % bootstrap interval over days (``--draws`` resamples, the same
days for both settings; ratios are resampled as ratios), and the seed spread: the standard deviation over the
first setting's seeds of each score (where it has more than one), the size a difference must exceed.

Usage (a pooled k-fold run)::

    .venv/bin/python benchmarks/areal_scores.py results/iberia_issue28q default pool03 pool1
    .venv/bin/python benchmarks/areal_scores.py results/iberia_issue28q default --source analogs --seeds 0
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from precip_cvae import io, losses, metrics
from precip_cvae.config import EvaluateConfig
from precip_cvae.evaluate.intervals import day_slice
from precip_cvae.evaluate.score import day_thresholds, tail_thresholds
from precip_cvae.events import field_statistics


def block_means(fields: np.ndarray, valid: np.ndarray, size: int, min_fraction: float = 0.5) -> np.ndarray:
    """:func:`precip_cvae.losses.block_means` (the pooled loss term's) of (..., N, H, W) numpy fields, ``valid``
    (N, H, W); NaN where a block does not count.  Returns (..., N, h, w)."""
    x = torch.from_numpy(np.ascontiguousarray(fields, dtype=np.float64))[..., None, :, :]  # (..., N, 1, H, W)
    means, counted = losses.block_means(x, torch.from_numpy(np.asarray(valid, bool))[:, None], size, min_fraction)
    return np.where(counted.numpy()[:, 0], means.numpy()[..., 0, :, :], np.nan)


def day_scores(ens: np.ndarray, obs: np.ndarray, thr99, min_exceed: float, blocks=(4, 8),
               chunk: int = 128) -> pd.DataFrame:
    """Per-day areal scores of one ensemble (M, N, H, W) against (N, H, W) (NaN outside the data)."""
    n = obs.shape[0]
    rows = []
    for s in range(0, n, chunk):
        stop = min(s + chunk, n)
        o = np.asarray(obs[s:stop], np.float64)
        e = np.asarray(ens[:, s:stop], np.float64)
        v = np.isfinite(o)
        e = np.where(v, e, np.nan)  # the members on the truth's valid cells
        t = day_slice(thr99, n, s, stop)
        # events.field_statistics: detect_events' one definition of a day's exceedance share
        area_o = field_statistics(o, t)["exceed_fraction"].to_numpy()  # (c,)
        area_e = np.stack([field_statistics(member, t)["exceed_fraction"].to_numpy() for member in e])  # (M, c)
        part = {"heavy_obs": (area_o >= min_exceed).astype(float),
                "heavy_ens": (area_e >= min_exceed).mean(axis=0),
                "crps_area": metrics.crps_ensemble(area_e[:, :, None, None], area_o[:, None, None])[:, 0, 0]}
        for size in (0, *blocks):
            bo, be = block_means(o, v, size), block_means(e, v, size)
            c = metrics.crps_ensemble(be, bo)  # NaN where the block does not count
            name = "field" if size == 0 else f"block{size}"
            with np.errstate(invalid="ignore"):
                part[f"crps_{name}"] = np.nanmean(c.reshape(c.shape[0], -1), axis=1)
            _spread_parts(part, name, be, bo)
        _spread_parts(part, "cell", e, o)
        rows.append(pd.DataFrame(part))
    return pd.concat(rows, ignore_index=True)


def _spread_parts(part: dict, name: str, ens: np.ndarray, obs: np.ndarray) -> None:
    """Per-day sums of (M + 1) / M x the members' variance and of the squared error of their mean over the
    blocks (cells) where ``obs`` is finite: ``var_<name>``, ``err_<name>``."""
    m = ens.shape[0]
    ok = np.isfinite(obs)
    with np.errstate(invalid="ignore"):
        var = (m + 1) / m * np.var(ens, axis=0, ddof=1)
        err = (ens.mean(axis=0) - obs) ** 2
    part[f"var_{name}"] = np.where(ok, var, 0.0).reshape(len(obs), -1).sum(axis=1)
    part[f"err_{name}"] = np.where(ok, err, 0.0).reshape(len(obs), -1).sum(axis=1)


def summary(days: pd.DataFrame, idx: np.ndarray) -> dict[str, float]:
    d = days.iloc[idx]
    out = {"heavy_freq": float(d["heavy_ens"].sum() / d["heavy_obs"].sum()) if d["heavy_obs"].sum() else np.nan,
           "heavy_days_obs": float(d["heavy_obs"].sum()), "heavy_days_member": float(d["heavy_ens"].sum())}
    for col in d.columns:
        if col.startswith("crps"):
            out[col] = float(d[col].mean())
        elif col.startswith("var_"):
            name, err = col[4:], d[f"err_{col[4:]}"].sum()
            out[f"ss_{name}"] = float(np.sqrt(d[col].sum() / err)) if err > 0 else np.nan
    return out


def paired_interval(a: pd.DataFrame, b: pd.DataFrame, draws: int, seed: int = 0) -> dict[str, tuple]:
    """b - a for every summary score (heavy_freq: the ratio's difference), 90 % percentile bootstrap over days."""
    rng = np.random.default_rng(seed)
    n = len(a)
    point = {k: summary(b, np.arange(n))[k] - summary(a, np.arange(n))[k] for k in summary(a, np.arange(n))}
    samples = {k: [] for k in point}
    for _ in range(draws):
        i = rng.integers(0, n, n)
        sa, sb = summary(a, i), summary(b, i)
        for k in point:
            samples[k].append(sb[k] - sa[k])
    return {k: (point[k], *np.nanpercentile(samples[k], [5, 95])) for k in point}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="results/<run> (a pooled k-fold run or a fixed split)")
    ap.add_argument("settings", nargs="+", help="experiments (their cvae_best members); the first is the reference")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--min-exceed", type=float, default=0.05, help="events.min_exceed_fraction of the run")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--source", default="cvae_best",
                    help="the ensemble of each store to score: cvae_best, or a baseline such as analogs")
    ap.add_argument("--seeds", nargs="+", default=None,
                    help="seed suffixes to pool (default: every <setting>_seed* the run has)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    folds = sorted(glob.glob(str(run / "fold*" / "preprocess" / "dataset.zarr")))
    datasets = folds or [str(run / "preprocess" / "dataset.zarr")]
    maps = [tail_thresholds(d, EvaluateConfig()) for d in datasets]
    table, diffs = [], []
    for split in args.splits:
        per_setting, spread = {}, {}
        for setting in args.settings:
            seeds = args.seeds or sorted(p.name.split("_seed")[-1]
                                         for p in (run / "experiments").glob(f"{setting}_seed*"))
            frames, per_seed = [], []
            for seed in seeds:
                store = run / "experiments" / f"{setting}_seed{seed}" / "evaluate" / "ensembles.zarr"
                truth = io.open_zarr_group(str(store), f"{split}/truth")
                thr = day_thresholds(maps if folds else maps[0], truth)
                ens = io.open_zarr_group(str(store), f"{split}/{args.source}")["pr"].values
                frames.append(day_scores(ens, truth["pr"].values, thr["p99"], args.min_exceed))
                per_seed.append(summary(frames[-1], np.arange(len(frames[-1]))))
            # seeds pooled: each day's scores averaged over the seeds (the days are the same)
            days = sum(frames) / len(frames)
            days["heavy_obs"] = frames[0]["heavy_obs"]
            per_setting[setting] = days
            spread[setting] = pd.DataFrame(per_seed).std(ddof=1) if len(per_seed) > 1 else None
            table.append({"split": split, "setting": setting, "seeds": len(seeds), "days": len(days),
                          **summary(days, np.arange(len(days)))})
        ref = args.settings[0]
        for setting in args.settings[1:]:
            for key, (d, lo, hi) in paired_interval(per_setting[ref], per_setting[setting], args.draws).items():
                if key.startswith("heavy_days"):
                    continue
                sd = float(spread[ref][key]) if spread[ref] is not None else np.nan
                diffs.append({"split": split, "setting": setting, "score": key, "difference": d,
                              "lo90": lo, "hi90": hi, "seed_sd": sd,
                              "verdict": ("within the interval" if lo <= 0 <= hi else
                                          "within the seed spread" if abs(d) <= sd else "outside both")})
    print(pd.DataFrame(table).to_markdown(index=False, floatfmt=".4g"))
    print()
    if diffs:
        print(f"Paired against {args.settings[0]} (b - a, 90 % bootstrap over days, {args.draws} draws):")
        print(pd.DataFrame(diffs).to_markdown(index=False, floatfmt=".4g"))
    print(json.dumps({"run": str(run), "settings": args.settings, "min_exceed": args.min_exceed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
