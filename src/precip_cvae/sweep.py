"""Run-level figure of an experiment sweep over seeds (``experiments_seeds.png``).

One panel per headline score; one row per setting (the mean over its seeds, with the
range of the seeds as a bar) and per baseline; val and test side by side, all days and
heavy days in two colours.  The table behind it is ``experiments_seeds.csv``
(:func:`precip_cvae.evaluate.compare.seed_summary`); choose a setting on val, read test once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import io
from .config import EvaluateConfig
from .evaluate.names import CVAE, SUBSETS, headline_metrics
from .plots import hide_unused, score_panel

SPLIT_MARKERS = {"val": "o", "test": "s"}
SUBSET_COLOURS = {"all": "tab:blue", "heavy": "tab:red"}


def seeds_figure(seeds: pd.DataFrame, metrics: Sequence[tuple[str, str, str]], checkpoint: str = "best") -> Figure:
    """Mean over seeds (marker) and min-max over seeds (bar) of each setting's headline scores.

    Parameters
    ----------
    seeds : ``experiments_seeds.csv`` (split, setting, model, checkpoint, metric, n_seeds, mean, min, max)
    metrics : :func:`precip_cvae.evaluate.names.headline_metrics` (key, label, better)
    checkpoint : the cVAE checkpoint shown (baselines have none)
    """
    keep = seeds[(seeds["model"] != CVAE) | (seeds["checkpoint"] == checkpoint)]
    rows = list(dict.fromkeys(
        (s if m == CVAE else m) for s, m in zip(keep["setting"], keep["model"])))
    name = np.where(keep["model"] == CVAE, keep["setting"], keep["model"])
    keep = keep.assign(row=name)
    splits = [s for s in SPLIT_MARKERS if (keep["split"] == s).any()]
    series = [(sp, sub) for sp in splits for sub in SUBSETS]
    n = len(metrics)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.6 * ncols, (0.32 * len(rows) + 1.4) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    y = np.arange(len(rows))
    step = 0.8 / max(len(series), 1)
    for ax, (key, label, better) in zip(axes, metrics):
        for k, (split, subset) in enumerate(series):
            part = keep[(keep["split"] == split) & (keep["metric"] == f"{key}@{subset}")].set_index("row")
            part = part.reindex(rows)
            off = y - 0.4 + step * (k + 0.5)
            mean, lo, hi = (part[c].to_numpy(float) for c in ("mean", "min", "max"))
            ax.hlines(off, lo, hi, color=SUBSET_COLOURS[subset], lw=1.2)
            ax.plot(mean, off, SPLIT_MARKERS[split], ms=4, color=SUBSET_COLOURS[subset],
                    mfc="white" if split == "val" else SUBSET_COLOURS[subset],
                    label=f"{split}, {subset} days", ls="none")
        ax.set_yticks(y, rows, fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        score_panel(ax, label, better)
    hide_unused(axes, n)
    fig.suptitle(f"Settings over seeds ({checkpoint} checkpoint): mean (marker) and min-max (bar); "
                 "choose on val (open), read test (filled)", fontsize=10)
    return fig


def write_seeds_figure(seeds: pd.DataFrame, cfg: EvaluateConfig, out_png: str) -> None:
    io.save_figure(seeds_figure(seeds, headline_metrics(cfg)), out_png)
