"""Figures of the evaluation, built with matplotlib's object API on the Agg canvas.

Each figure function takes arrays / tables and returns a ``matplotlib.figure.Figure``
(no pyplot, no global state, no files); :func:`write_figures` and
:func:`write_comparison` build them from an :class:`~precip_cvae.evaluate.score.Evaluation`
and save them through :func:`precip_cvae.io.save_figure`.  Precipitation in mm day-1.

This module imports :mod:`precip_cvae.evaluate`, never the reverse: editing a
figure changes the code fingerprint of the ``evaluate`` rule only, not that of
``sample_ensembles``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from . import io
from .config import EvaluateConfig
from .evaluate.diagnostics import domain_mean_series
from .evaluate.names import CVAE, SUBSETS, TRUTH, headline_metrics, headline_split, percentile_names, source_label
from .evaluate.score import Evaluation

SUBSET_TITLES = {"all": "all days", "heavy": "heavy-event days"}
PRECIP_CMAP = "YlGnBu"


def _colours(labels: Sequence[str]) -> dict[str, str]:
    """cVAE sources in reds/oranges, baselines in fixed colours, the truth black."""
    fixed = {"climatology": "tab:gray", "analogs": "tab:blue", "interpolation": "tab:green", "truth": "black"}
    warm = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink"]
    out, k = {}, 0
    for label in labels:
        if label in fixed:
            out[label] = fixed[label]
        else:
            out[label] = warm[k % len(warm)]
            k += 1
    return out


# ----------------------------------------------------------------------------- figures


def training_curves(log: pd.DataFrame) -> Figure:
    """Training and validation curves from ``train_log.csv`` (one row per epoch).

    Panels: losses; MAE_all and CRPS; twCRPS; the extreme-frequency ratio (1 is
    unbiased) with MAE_tail beside it on a second axis (improper alone).  The KL
    warm-up is shaded; the selected (best) epoch is a dashed line.
    """
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    epoch = log["epoch"].to_numpy() + 1
    panels = [
        ("loss", [("train_loss", "train loss"), ("val_L_rec", "val L_rec (prior sample)")]),
        ("mm/day", [("val_MAE_all", "val MAE_all (ens. mean)"), ("val_CRPS", "val CRPS"),
                    ("val_post_MAE_all", "val MAE_all (posterior, reference)")]),
        ("mm/day", [("val_twCRPS", "val twCRPS")]),
        ("ratio", [("val_freq_ratio", "val extreme-frequency ratio")]),
    ]
    warm = log["warmup_done"].astype(str).str.lower().eq("false").to_numpy() if "warmup_done" in log else None
    best = log.loc[log["is_best"].astype(str).str.lower().eq("true"), "epoch"] if "is_best" in log else []

    def series(ax, col, label, **kw):
        values = pd.to_numeric(log[col], errors="coerce") if col in log else None
        if values is not None and np.isfinite(values).any():
            ax.plot(epoch, values, marker="o", ms=3, label=label, **kw)

    for ax, (unit, cols) in zip(axes, panels):
        for col, label in cols:
            series(ax, col, label)
        if warm is not None and warm.any():
            ax.axvspan(0.5, epoch[warm].max() + 0.5, color="0.9", zorder=0, label="KL warm-up")
        if len(best):
            ax.axvline(int(best.iloc[-1]) + 1, color="k", ls="--", lw=1, label="best.pt")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].axhline(1.0, color="0.5", lw=0.8)
    twin = axes[3].twinx()
    series(twin, "val_MAE_tail", "val MAE_tail (improper alone), right axis", color="tab:orange")
    twin.set_ylabel("MAE_tail (mm/day)")
    handles = [h for ax in (axes[3], twin) for h in ax.get_legend_handles_labels()[0]]
    axes[3].legend(handles, [h.get_label() for h in handles], fontsize=7)
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    fig.suptitle("Training curves (validation on prior samples, mm/day)")
    return fig


def maps(truth: np.ndarray, members: np.ndarray, analog: np.ndarray | None, dates: Sequence[str],
         lat: np.ndarray, lon: np.ndarray, model_label: str, title: str | None = None) -> Figure:
    """Truth, four members and the best analog for a few days (one row per day).

    Parameters
    ----------
    truth : ndarray (D, h, w), mm day-1, NaN masked
    members : ndarray (m, D, h, w), m <= 4, mm day-1
    analog : ndarray (D, h, w) or None -- the nearest train day in condition space
    dates : D labels
    lat, lon : ndarray (h,), (w,)
    model_label : e.g. 'cVAE (best)'
    title : the figure's title (default: the evaluation's heaviest days)
    """
    suptitle = title or f"Heaviest days of the split (domain mean): truth, {model_label} prior samples, best analog"
    n_days = truth.shape[0]
    cols = 1 + members.shape[0] + (analog is not None)
    fig = Figure(figsize=(2.3 * cols + 0.8, 2.2 * max(n_days, 1) + 0.4), layout="constrained")
    if n_days == 0:
        fig.text(0.5, 0.5, "no day to show", ha="center")
        return fig
    axes = np.atleast_2d(fig.subplots(n_days, cols, sharex=True, sharey=True, squeeze=False))
    for d in range(n_days):
        panels = [("truth", truth[d])] + [(f"{model_label} #{i + 1}", members[i, d]) for i in range(members.shape[0])]
        if analog is not None:
            panels.append(("best analog", analog[d]))
        vmax = float(np.nanmax([np.nanmax(p) if np.isfinite(p).any() else 0.0 for _, p in panels])) or 1.0
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=vmax)
        for ax, (label, field) in zip(axes[d], panels):
            mesh = ax.pcolormesh(lon, lat, np.ma.masked_invalid(field), cmap=PRECIP_CMAP, norm=norm, shading="auto")
            ax.set_facecolor("0.85")
            ax.set_title(label if d == 0 else "", fontsize=9)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
        axes[d, 0].set_ylabel(f"{dates[d]}\nlat", fontsize=8)
        fig.colorbar(mesh, ax=axes[d, -1], label="mm/day", shrink=0.9)
    fig.suptitle(suptitle)
    return fig


@dataclass(frozen=True)
class GeneratedMapFields:
    """What ``generated_maps.png`` shows: the heaviest sampled days, their real fields and samples."""

    truth: np.ndarray    # (D, h, w) mm day-1, NaN masked
    samples: np.ndarray  # (k, D, h, w) mm day-1, NaN masked and past each day's n_realizations
    dates: list[str]
    lat: np.ndarray
    lon: np.ndarray


def generated_map_fields(augmented: str, dataset: str, n_days: int = 4, n_samples: int = 4) -> GeneratedMapFields:
    """The ``n_days`` heaviest (domain mean of the real field) of the days that have samples in
    ``augmented`` (``augmented.zarr``: pr(time, realization, lat, lon), mm day-1), their real fields
    from ``dataset`` (``dataset.zarr``: pr in mm day-1 on the padded grid, cropped here, and its mask)
    and their first ``n_samples`` realizations."""
    aug, ds = io.open_zarr(augmented), io.open_zarr(dataset)
    (t0, t1), (l0, l1) = ds.attrs.get("pad_lat", [0, 0]), ds.attrs.get("pad_lon", [0, 0])
    crop = dict(lat=slice(t0, ds.sizes["lat"] - t1), lon=slice(l0, ds.sizes["lon"] - l1))
    mask = ds["mask"].isel(crop)
    valid = mask.values.astype(bool)
    real = ds["pr"].isel(crop).sel(time=aug["time"].values).where(mask.astype(bool))
    means = real.mean(("lat", "lon")).fillna(-np.inf).values  # streamed: one number per sampled day
    days = np.argsort(-means, kind="stable")[: min(n_days, means.size)]  # heaviest first, as heaviest_days
    truth = real.isel(time=days).values
    k = min(n_samples, aug.sizes["realization"])
    samples = aug["pr"].isel(time=days, realization=slice(0, k)).values.astype(np.float64)  # (D, k, h, w)
    samples = np.where(valid, samples, np.nan).transpose(1, 0, 2, 3)
    for d, n in enumerate(aug["n_realizations"].isel(time=days).values):  # past a day's count: fill values
        samples[int(n):, d] = np.nan
    dates = [str(t)[:10] for t in aug["time"].values[days].astype("datetime64[D]")]
    return GeneratedMapFields(truth, samples, dates, aug["lat"].values, aug["lon"].values)


def write_generated_maps(augmented: str, dataset: str, out_png: str, n_days: int = 4, n_samples: int = 4,
                         splits: Sequence[str] = ("train",)) -> Path:
    """``generated_maps.png``: the generate stage's samples beside the real day they were drawn for.

    One row per day (:func:`generated_map_fields`): the real field, then the first ``n_samples``
    realizations, in mm/day on one colour scale per row. ``splits``: the sampled splits
    (generate.splits), for the title.
    """
    f = generated_map_fields(augmented, dataset, n_days, n_samples)
    fig = maps(f.truth, f.samples, None, f.dates, f.lat, f.lon, "sample",
               title=f"Generated samples of the heaviest {'/'.join(splits)} heavy days (generate stage): "
                     "the real day, then its first realizations")
    return io.save_figure(fig, out_png)


def tail_qq(curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], split: str) -> Figure:
    """Q-Q of pooled wet values (members vs truth), one panel per subset.

    Parameters
    ----------
    curves : subset -> source label -> curves with ``qq_levels``, ``qq_ens``, ``qq_obs`` (mm day-1)
    """
    subsets = list(curves)
    fig = Figure(figsize=(5 * len(subsets), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(subsets), squeeze=False)[0])
    for ax, subset in zip(axes, subsets):
        colours = _colours(list(curves[subset]))
        top = 1.0
        for label, c in curves[subset].items():
            ax.plot(c["qq_obs"], c["qq_ens"], marker="o", ms=4, color=colours[label], label=label)
            top = max(top, np.nanmax(np.r_[c["qq_obs"], c["qq_ens"], 1.0]))
        ax.plot([0, top], [0, top], color="0.4", lw=1, ls="--", label="1:1")
        first = next(iter(curves[subset].values()))
        for q, x in zip(first["qq_levels"], first["qq_obs"]):
            if np.isfinite(x) and q >= 0.99:
                ax.annotate(f"q{100 * q:g}", (x, x), fontsize=7, color="0.4", xytext=(3, -10),
                            textcoords="offset points")
        ax.set_xlabel("truth quantile (mm/day)")
        ax.set_ylabel("members' quantile (mm/day)")
        ax.set_title(f"wet values, {SUBSET_TITLES.get(subset, subset)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Tail Q-Q of pooled wet-pixel values ({split} split)")
    return fig


def rank_histograms(counts: Mapping[str, Mapping[str, np.ndarray]], split: str) -> Figure:
    """Rank histograms (relative frequency; flat = calibrated), one panel per source.

    Parameters
    ----------
    counts : subset -> source label -> counts (M + 1,)
    """
    subsets = list(counts)
    labels = list(next(iter(counts.values()))) if counts else []
    fig = Figure(figsize=(3.2 * max(len(labels), 1), 3.4), layout="constrained")
    if not labels:
        return fig
    axes = np.atleast_1d(fig.subplots(1, len(labels), squeeze=False)[0])
    for ax, label in zip(axes, labels):
        for subset, style in zip(subsets, ({"color": "tab:blue", "alpha": 0.7}, {"color": "tab:red", "alpha": 0.9})):
            c = np.asarray(counts[subset][label], dtype=float)
            freq = c / max(c.sum(), 1.0)
            x = np.arange(c.size)
            if subset == "all":
                ax.bar(x, freq, width=0.9, label=SUBSET_TITLES["all"], **style)
            else:
                ax.step(x, freq, where="mid", lw=1.5, label=SUBSET_TITLES.get(subset, subset), **style)
            ax.axhline(1.0 / c.size, color="k", lw=0.8, ls="--")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("rank of the truth")
    axes[0].set_ylabel("relative frequency")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Rank histograms ({split} split; dashed: flat)")
    return fig


def rapsd(curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], split: str) -> Figure:
    """Radially averaged power spectra of the members vs the truth (log-log), one panel per subset."""
    subsets = list(curves)
    fig = Figure(figsize=(5 * len(subsets), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(subsets), squeeze=False)[0])
    for ax, subset in zip(axes, subsets):
        colours = _colours(list(curves[subset]))
        first = next(iter(curves[subset].values()))
        ax.loglog(first["rapsd_k"], first["rapsd_obs"], color="black", lw=2.2, label="truth")
        for label, c in curves[subset].items():
            ax.loglog(c["rapsd_k"], c["rapsd_ens"], color=colours[label], lw=1.3, label=label)
        ax.set_xlabel("wavenumber (cycles / pixel)")
        ax.set_ylabel("power ((mm/day)²)")
        ax.set_title(SUBSET_TITLES.get(subset, subset))
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        inverse = (lambda k: 1 / np.maximum(k, 1e-9), lambda p: 1 / np.maximum(p, 1e-9))  # wavenumber <-> wavelength
        top = ax.secondary_xaxis("top", functions=inverse)
        k = np.asarray(first["rapsd_k"], dtype=float)
        if k.size:
            lengths = [2.0 ** n for n in range(1, 12) if 1 / k.max() <= 2.0 ** n <= 1 / k.min()]
            top.set_xticks(lengths, [f"{x:g}" for x in lengths])
        top.xaxis.set_minor_formatter(NullFormatter())
        top.set_xlabel("wavelength (pixels)")
    fig.suptitle(f"RAPSD of members vs truth ({split} split)")
    return fig


def fss_scale(fss: Mapping[tuple[str, str], Mapping[str, object]], windows: Sequence[int], split: str) -> Figure:
    """FSS against the neighbourhood size; rows: subsets, columns: thresholds.

    Parameters
    ----------
    fss : (subset, 'p99') -> {source label: [FSS per window], '_useful': useful level}
    windows : window sides in pixels
    """
    subsets = list(dict.fromkeys(k[0] for k in fss))
    names = list(dict.fromkeys(k[1] for k in fss))
    fig = Figure(figsize=(4.8 * len(names), 3.8 * len(subsets)), layout="constrained")
    axes = fig.subplots(len(subsets), len(names), squeeze=False, sharex=True, sharey=True)
    for i, subset in enumerate(subsets):
        for j, name in enumerate(names):
            ax = axes[i, j]
            entry = dict(fss[(subset, name)])
            useful = entry.pop("_useful", np.nan)
            colours = _colours(list(entry))
            for label, values in entry.items():
                ax.plot(windows, values, marker="o", color=colours[label], label=label)
            if np.isfinite(useful):
                ax.axhline(useful, color="0.4", ls="--", lw=1, label="useful (0.5 + f0/2)")
            ax.set_xscale("log")
            ax.set_xticks(list(windows), [str(w) for w in windows])
            ax.set_ylim(0, 1)
            ax.set_title(f"local {name.upper()}, {SUBSET_TITLES.get(subset, subset)}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(subsets) - 1:
                ax.set_xlabel("neighbourhood (pixels)")
            if j == 0:
                ax.set_ylabel("FSS")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Fractions skill score against scale ({split} split)")
    return fig


def score_panel(ax, label: str, better: str) -> None:
    """Title (with which way is better), grid, and the line at 1 for scores best at 1."""
    if better == "one":
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
    goal = {"lower": "lower", "higher": "higher", "one": "closer to 1"}[better]
    ax.set_title(f"{label} ({goal} is better)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def hide_unused(axes, n: int) -> None:
    """Hide the panels after the first ``n``; the legend goes on the first."""
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)


def comparison(table: pd.DataFrame, metrics: Sequence[tuple[str, str, str]]) -> Figure:
    """Headline scores of every experiment and baseline side by side (one panel per metric).

    Parameters
    ----------
    table : :func:`precip_cvae.evaluate.compare.comparison_table`
    metrics : :func:`precip_cvae.evaluate.names.headline_metrics`
    """
    rows = [f"{r.experiment} ({r.checkpoint})" if r.model == CVAE else r.model for r in table.itertuples()]
    subsets = [s for s in SUBSETS if any(c.endswith(f"@{s}") for c in table.columns)]
    n = len(metrics)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.6 * ncols, 0.45 * len(rows) * nrows + 1.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    y = np.arange(len(rows))
    height = 0.8 / max(len(subsets), 1)
    for ax, (key, label, better) in zip(axes, metrics):
        for k, subset in enumerate(subsets):
            col = f"{key}@{subset}"
            values = table[col].to_numpy(float) if col in table else np.full(len(rows), np.nan)
            ax.barh(y + k * height, np.nan_to_num(values), height=height,
                    color=("tab:blue", "tab:red")[k % 2], label=SUBSET_TITLES.get(subset, subset))
        ax.set_yticks(y + height * (len(subsets) - 1) / 2, rows, fontsize=8)
        ax.invert_yaxis()
        score_panel(ax, label, better)
    hide_unused(axes, n)
    split = table["split"].iloc[0] if len(table) else ""
    fig.suptitle(f"Experiments and baselines, headline scores ({split} split)")
    return fig


# ----------------------------------------------------------------------------- writing


#: days of the truth read at once to rank the days (a continental grid's test split does not fit in memory)
HEAVIEST_CHUNK_DAYS = 64


def heaviest_days(obs, n: int) -> np.ndarray:
    """Indices of the ``n`` days with the largest domain-mean precipitation, heaviest first.

    Parameters
    ----------
    obs : array (N, h, w), mm day-1, NaN ignored; numpy or dask (read :data:`HEAVIEST_CHUNK_DAYS` days at a time)
    """
    means = np.nan_to_num(domain_mean_series(obs, HEAVIEST_CHUNK_DAYS), nan=-np.inf)  # a day without data: last
    return np.argsort(-means, kind="stable")[: min(n, len(obs))]


def index_bias(bias: Mapping[str, np.ndarray], lat: np.ndarray, lon: np.ndarray, model_label: str,
               split: str) -> Figure:
    """Maps of the bias (member-mean index - observed) of each climate index (diverging, centred on 0)."""
    names = list(bias)
    cols = min(4, max(1, len(names)))
    rows = int(np.ceil(len(names) / cols)) if names else 1
    fig = Figure(figsize=(3.0 * cols + 0.6, 2.6 * rows + 0.6), layout="constrained")
    if not names:
        fig.text(0.5, 0.5, "no index", ha="center")
        return fig
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        field = np.asarray(bias[name], dtype=float)
        vmax = float(np.nanmax(np.abs(field))) if np.isfinite(field).any() else 1.0
        mesh = ax.pcolormesh(lon, lat, np.ma.masked_invalid(field), cmap="RdBu", vmin=-(vmax or 1.0),
                             vmax=vmax or 1.0, shading="auto")
        ax.set_facecolor("0.85")
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        fig.colorbar(mesh, ax=ax, shrink=0.8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{model_label}: index bias, member mean - observed ({split} split; blue: above the observed "
                 "index, red: below)", fontsize=9)
    return fig


class FigurePaths(Protocol):
    """What :func:`write_figures` reads of :class:`precip_cvae.evaluate.report.ScorePaths` (not imported
    here, so that a change of the report does not rerun the rules that draw figures without it)."""

    ensembles: str
    train_log: object  # a path, or one per fold (kfold_years: the curves of fold 0 are drawn)

    def output(self, key: str) -> Path: ...


def write_figures(ev: Evaluation, paths: FigurePaths, cfg: EvaluateConfig) -> None:
    """Write the PNG figures of an evaluation (training curves, maps, Q-Q, rank histograms, RAPSD, FSS)."""
    split = headline_split(ev.meta)
    sources = [ev.meta["primary"]] + [s for s in ev.meta["sources"] if not s.startswith(CVAE + "_")]
    labels = {s: source_label(s) for s in ev.meta["sources"]}
    train_log = paths.train_log if isinstance(paths.train_log, str) else list(paths.train_log)[0]
    io.save_figure(training_curves(io.read_csv(train_log)), paths.output("training_curves"))

    truth = io.open_zarr_group(paths.ensembles, f"{split}/{TRUTH}")
    days = heaviest_days(truth["pr"].data, cfg.n_map_days)  # lazy: read by chunks of days
    primary = io.open_zarr_group(paths.ensembles, f"{split}/{ev.meta['primary']}")["pr"]
    analog = (io.open_zarr_group(paths.ensembles, f"{split}/analogs")["pr"].isel(member=0, time=days).values
              if "analogs" in ev.meta["sources"] else None)
    fig = maps(truth["pr"].isel(time=days).values, primary.isel(member=slice(0, 4), time=days).values, analog,
               [str(t) for t in truth["time"].values[days]], truth["lat"].values, truth["lon"].values,
               labels[ev.meta["primary"]])
    io.save_figure(fig, paths.output("maps"))

    subsets = [s for s in SUBSETS if (split, s) in ev.n_days]
    by_subset = {sub: {labels[s]: ev.curves[(split, sub, s)] for s in ev.meta["sources"]} for sub in subsets}
    io.save_figure(tail_qq(by_subset, split), paths.output("tail_qq"))
    io.save_figure(rapsd(by_subset, split), paths.output("rapsd"))
    counts = {sub: {labels[s]: ev.curves[(split, sub, s)]["rank_counts"] for s in sources} for sub in subsets}
    io.save_figure(rank_histograms(counts, split), paths.output("rank_histogram"))
    fss = {}
    for sub in subsets:
        for name in percentile_names(cfg):
            entry: dict[str, object] = {
                labels[s]: [ev.value(s, f"fss_{name}_w{int(w)}", split, sub) for w in cfg.fss_windows] for s in sources}
            entry["_useful"] = ev.value(sources[0], f"fss_useful_{name}", split, sub)
            fss[(sub, name)] = entry
    io.save_figure(fss_scale(fss, [int(w) for w in cfg.fss_windows], split), paths.output("fss_scale"))
    diag = getattr(ev, "diagnostics", None)
    io.save_figure(index_bias(diag.bias_maps if diag is not None else {}, truth["lat"].values, truth["lon"].values,
                              labels[ev.meta["primary"]], split), paths.output("index_bias"))


def write_comparison(table: pd.DataFrame, cfg: EvaluateConfig, out_png: str) -> None:
    """The run-level comparison figure of :func:`precip_cvae.evaluate.compare.comparison_table`."""
    io.save_figure(comparison(table, headline_metrics(cfg)), out_png)


def downstream_comparison(table: pd.DataFrame) -> Figure:
    """Augmented - real differences with 95 % bootstrap intervals, per loss, metric and subset."""
    diff = table[table["training_set"] == "augmented_minus_real"]
    metrics_ = list(dict.fromkeys(diff["metric"]))
    losses = list(dict.fromkeys(diff["loss"]))
    fig = Figure(figsize=(3.0 * len(metrics_), 3.2))
    axes = fig.subplots(1, len(metrics_), squeeze=False)[0]
    for ax, metric in zip(axes, metrics_):
        part = diff[diff["metric"] == metric]
        for i, loss in enumerate(losses):
            for j, subset in enumerate(("all", "heavy")):
                row = part[(part["loss"] == loss) & (part["subset"] == subset)]
                if row.empty:
                    continue
                x = i + 0.2 * (j - 0.5)
                v, lo, hi = (float(row[c].iloc[0]) for c in ("value", "ci_low", "ci_high"))
                ax.errorbar([x], [v], yerr=[[v - lo], [hi - v]], fmt="o" if subset == "all" else "s",
                            color="C0" if subset == "all" else "C3", label=f"{subset} days" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(losses)), losses)
        ax.set_title(metric, fontsize=9)
    axes[0].set_ylabel("augmented - real")
    axes[0].legend(fontsize=7)
    fig.suptitle("Downstream downscaler trained on real + synthetic vs real only (95 % bootstrap CI over days)",
                 fontsize=9)
    return fig


def write_downstream(table: pd.DataFrame, out_png: str) -> None:
    io.save_figure(downstream_comparison(table), out_png)
