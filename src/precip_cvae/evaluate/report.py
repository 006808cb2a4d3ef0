"""Rule ``evaluate``: the scores of the cache written as ``metrics.csv``/``.json``, ``headline.csv`` and ``summary.md``.

:func:`run` fits the local wet-day tail thresholds (``cfg.percentiles``, P95 and P99
by default) on the train split, scores every ensemble on all days and on heavy-event
days alone (:func:`precip_cvae.evaluate.score.score_cache`) and writes the tables and
the summary; the same rule then draws the PNG figures with
:func:`precip_cvae.plots.write_figures` (plots imports this module, never the
reverse).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import io, metrics
from ..config import EVALUATE_SAMPLING_KEYS, EvaluateConfig
from .names import (CVAE, EVALUATE_OUTPUT_FILES, METRIC_COLUMNS, SUBSETS, headline_metrics, headline_split,
                    headline_window, model_and_checkpoint, percentile_names, source_label)
from .diagnostics import diagnose, diagnostics_markdown
from ..split import season_year_rule
from .intervals import block_labels, bootstrap, save_day_components
from .score import Evaluation, score_cache, tail_thresholds

log = logging.getLogger(__name__)

OVERFORECAST_BIAS = 1.5  # a frequency bias above this voids a low MAE_tail (named in summary.md)
OUTPUT_FILES = EVALUATE_OUTPUT_FILES  # key -> file name of every output of the evaluate rule


@dataclass(frozen=True)
class ScorePaths:
    """Inputs of :func:`run` and the path of each of its outputs and figures.

    ``outputs`` maps every key of :data:`OUTPUT_FILES` to a path: the rule passes its
    ``output`` (the one place the file names are defined); :meth:`in_dir` puts the
    default names in one directory (tests, benchmarks).
    """

    ensembles: str
    dataset: str | Sequence[str]  # a list: one per fold of a pooled kfold_years cache (fold order)
    train_log: str | Sequence[str]
    outputs: Mapping[str, str]

    def __post_init__(self):
        missing = sorted(set(OUTPUT_FILES) - set(self.outputs))
        if missing:
            raise ValueError(f"ScorePaths.outputs lacks {missing}; expected a path for each of {list(OUTPUT_FILES)}")

    @classmethod
    def in_dir(cls, ensembles: str, dataset: str, train_log: str, out_dir: str) -> "ScorePaths":
        return cls(ensembles, dataset, train_log, {k: str(Path(out_dir) / name) for k, name in OUTPUT_FILES.items()})

    def output(self, key: str) -> Path:
        return Path(self.outputs[key])


RATIO_TAG = "_ratio_"  # metrics.csv: '<metric>_ratio_<baseline>' is a source's score over the baseline's


def one_or_list(files) -> str | list[str]:
    """A rule's input as :class:`ScorePaths` takes it: one path, or the list of the folds' paths
    (a pooled ``kfold_years`` run)."""
    files = [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]
    return files[0] if len(files) == 1 else files


def season_year_of(dataset: str) -> str:
    """The season-year rule of the data set's split ('djf' or 'calendar'), for season blocks."""
    return season_year_rule(io.open_zarr(dataset).attrs)


def interval_table(ev: Evaluation, cfg: EvaluateConfig, season_year: str = "calendar") -> pd.DataFrame:
    """Paired bootstrap intervals (``cfg.bootstrap``) of the headline scores of every source and of each
    source / baseline ratio, per split and subset (all days, heavy days).

    Returns
    -------
    DataFrame: split, subset and :data:`precip_cvae.evaluate.intervals.INTERVAL_COLUMNS`; empty
    with ``bootstrap.samples`` 0.
    """
    b = cfg.bootstrap
    frames = []
    if b.samples <= 0 or not ev.components:
        return pd.DataFrame()
    for split, by_source in ev.components.items():
        if not by_source:
            continue
        dates, heavy = ev.days[split]
        blocks = block_labels(dates, b.block, season_year)
        baselines = [s for s in by_source if not s.startswith(CVAE + "_")]
        for subset in SUBSETS:
            if (split, subset) not in ev.n_days:
                continue
            idx = np.arange(len(dates)) if subset == "all" else np.flatnonzero(heavy)
            comps = {src: {m: c[idx] for m, c in parts.items()} for src, parts in by_source.items()}
            t = bootstrap(comps, blocks[idx], baselines, b.samples, b.confidence, b.seed, block=b.block)
            frames.append(t.assign(split=split, subset=subset))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["split", "subset", *[c for c in out.columns if c not in ("split", "subset")]]]


def with_intervals(table: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv: the score table with ``lower`` / ``upper`` columns (NaN where not bootstrapped) and a
    row ``<metric>_ratio_<baseline>`` per source, baseline and bootstrapped score."""
    out = table.assign(lower=np.nan, upper=np.nan)
    if intervals.empty:
        return out
    rows = []
    for r in intervals.itertuples(index=False):
        model, ckpt = model_and_checkpoint(r.source)
        if r.statistic == "difference":
            continue
        metric = r.metric if r.statistic == "score" else f"{r.metric}{RATIO_TAG}{r.baseline}"
        rows.append((model, ckpt, r.split, r.subset, metric, float(r.value), float(r.lower), float(r.upper)))
    extra = pd.DataFrame(rows, columns=[*METRIC_COLUMNS, "lower", "upper"])
    keys = METRIC_COLUMNS[:5]
    bounds = extra.set_index(keys)[["lower", "upper"]]
    out = out.set_index(keys)
    hit = out.index.intersection(bounds.index)
    out.loc[hit, ["lower", "upper"]] = bounds.loc[hit].values
    out = out.reset_index()
    ratios = extra[extra["metric"].str.contains(RATIO_TAG, regex=False)]
    return pd.concat([out, ratios], ignore_index=True)[[*METRIC_COLUMNS, "lower", "upper"]]


def interval_markdown(intervals: pd.DataFrame, ev: Evaluation, cfg: EvaluateConfig) -> list[str]:
    """summary.md lines: the primary checkpoint's headline scores with intervals and its ratio to each baseline."""
    if intervals.empty:
        return ["## Intervals", "", "No bootstrap intervals (evaluate.bootstrap.samples is 0).", ""]
    split = headline_split(ev.meta)
    primary = ev.meta["primary"]
    b = cfg.bootstrap
    labels = {k: label for k, label, _ in headline_metrics(cfg)}
    labels["tail_q99_ratio"] = "P99 of wet values / truth's"
    text = [f"## Intervals ({split} split, {b.confidence:.0%}, paired bootstrap over {b.block}s, {b.samples} "
            "replicates)", "",
            f"{source_label(primary)}'s score and its ratio to each baseline's (below 1: lower than the baseline's; "
            "for CRPS and twCRPS that is better). A ratio whose interval contains 1 is no evidence of a difference.", ""]
    for subset in SUBSETS:
        part = intervals[(intervals["split"] == split) & (intervals["subset"] == subset)
                         & (intervals["source"] == primary)]
        if part.empty:
            continue
        baselines = [x for x in dict.fromkeys(part["baseline"]) if x]
        rows = []
        for metric in dict.fromkeys(part["metric"]):
            row = {"score": labels.get(metric, metric)}
            for base in ["", *baselines]:
                hit = part[(part["metric"] == metric) & (part["baseline"] == base)]
                if len(hit):
                    h = hit.iloc[0]
                    row["value" if not base else f"/ {base}"] = f"{h.value:.3g} [{h.lower:.3g}, {h.upper:.3g}]"
            rows.append(row)
        n_blocks = int(part["n_blocks"].iloc[0])
        text += [f"### {'All days' if subset == 'all' else 'Heavy-event days'} ({n_blocks} {b.block} blocks)", "",
                 pd.DataFrame(rows).to_markdown(index=False), ""]
    return text


def headline_table(ev: Evaluation, cfg: EvaluateConfig) -> pd.DataFrame:
    """Headline scores of the primary checkpoint and the baselines on the headline split.

    Returns
    -------
    DataFrame with columns source, subset and one per :func:`headline_metrics` label.
    """
    return pd.DataFrame(_headline_rows(ev, [(key, label) for key, label, _ in headline_metrics(cfg)]))


def _headline_rows(ev: Evaluation, columns) -> list[dict]:
    """One row per (subset, source) of the headline split: the primary checkpoint and the baselines,
    with ``label: value`` for each ``(metric key, label)`` of ``columns``."""
    split = headline_split(ev.meta)
    sources = [ev.meta["primary"]] + [s for s in ev.meta["sources"] if not s.startswith(CVAE + "_")]
    rows = []
    for subset in SUBSETS:
        if (split, subset) not in ev.n_days:
            continue
        for source in sources:
            row = {"source": source_label(source), "subset": subset}
            row.update({label: ev.value(source, key, split, subset) for key, label in columns})
            rows.append(row)
    return rows


def best_source(values: Mapping[str, float], better: str) -> str | None:
    """The key with the best finite value: lowest, highest, or closest to one."""
    finite = {k: v for k, v in values.items() if np.isfinite(v)}
    if not finite:
        return None
    key = {"lower": lambda k: finite[k], "higher": lambda k: -finite[k], "one": lambda k: abs(finite[k] - 1.0)}[better]
    return min(finite, key=key)


def verdicts(headline: pd.DataFrame, cfg: EvaluateConfig, subset: str) -> list[str]:
    """One sentence per headline metric: which source is better, and by how much."""
    part = headline[headline["subset"] == subset].set_index("source")
    freq_label = next(label for key, label, _ in headline_metrics(cfg) if key.startswith("freq_bias"))
    lines = []
    for key, label, better in headline_metrics(cfg):
        values = part[label].to_dict()
        winner = best_source(values, better)
        if winner is None:
            lines.append(f"- {label}: not defined on these days.")
            continue
        others = sorted(((k, v) for k, v in values.items() if k != winner and np.isfinite(v)),
                        key=lambda kv: {"lower": kv[1], "higher": -kv[1], "one": abs(kv[1] - 1)}[better])
        runner = f", ahead of {others[0][0]} ({others[0][1]:.3g})" if others else ""
        goal = {"lower": "lowest", "higher": "highest", "one": "closest to 1"}[better]
        note = " (improper on its own: read it with the frequency bias)" if key.startswith("mae_tail") else ""
        lines.append(f"- {label}: **{winner}** is best ({goal}: {values[winner]:.3g}){runner}{note}.")
        if key.startswith("mae_tail"):
            bias = part[freq_label].get(winner, float("nan"))
            if np.isfinite(bias) and bias > OVERFORECAST_BIAS:
                lines.append(f"  Forecaster's dilemma: {winner} forecasts exceedances {bias:.2g} times as often as "
                             f"they occur ({freq_label}), so its low MAE_tail comes from over-forecasting, not skill.")
    return lines


def summary_markdown(ev: Evaluation, headline: pd.DataFrame, cfg: EvaluateConfig) -> str:
    """``summary.md``: the headline tables, which source is better, and how to read them."""
    split = headline_split(ev.meta)
    lo, hi = percentile_names(cfg)
    primary = source_label(ev.meta["primary"])
    ckpts = ", ".join(f"{k} (epoch {v['epoch'] + 1})" for k, v in ev.meta["checkpoints"].items())
    splits = ", ".join(f"{s} ({ev.n_days[(s, 'all')]} days, {ev.n_days.get((s, 'heavy'), 0)} heavy)"
                       for s in ev.meta["splits"])
    text = [
        f"# Evaluation of experiment `{ev.meta['experiment']}`",
        "",
        f"Ensembles of {ev.meta['members']} members per day drawn from the prior of each checkpoint ({ckpts}) "
        f"and the baselines ({', '.join(s for s in ev.meta['sources'] if not s.startswith(CVAE))}) on the same days, "
        f"in mm/day on the original grid, masked pixels excluded. Thresholds: local wet-day (>= "
        f"{cfg.wet_threshold:g} mm/day) {lo.upper()} and {hi.upper()} of the train split. "
        f"Splits: {splits}.",
        "",
    ]
    if ev.meta.get("pooled"):
        text += [f"Cross-validated over years ({len(ev.meta['folds'])} folds, `preprocess.split.method: "
                 "kfold_years`): every day of each split is scored once, by the model of the fold that held it out, "
                 "with that fold's train-only thresholds, normalisation and transform.", ""]
    for name, why in ev.meta.get("skipped_baselines", {}).items():
        text += [f"Baseline `{name}` skipped: {why}.", ""]
    arrows = {"lower": "↓", "higher": "↑", "one": "→1"}
    fmt = headline.rename(columns={label: f"{label} {arrows[b]}" for _, label, b in headline_metrics(cfg)})
    for subset, title in (("all", "All days"), ("heavy", "Heavy-event days")):
        if (split, subset) not in ev.n_days:
            text += [f"## {title}", "", f"No heavy-event day in the {split} split.", ""]
            continue
        part = fmt[fmt["subset"] == subset].drop(columns="subset")
        text += [f"## {title} ({split} split, {ev.n_days[(split, subset)]} days)", "",
                 part.to_markdown(index=False, floatfmt=".3g"), "", "Which is better:", ""]
        text += verdicts(headline, cfg, subset) + [""]
        part_h = headline[headline["subset"] == subset].set_index("source")
        proper = [(label, b) for key, label, b in headline_metrics(cfg) if not key.startswith("mae_tail")]
        wins = sum(best_source(part_h[label].to_dict(), b) == primary for label, b in proper)
        text += [f"{primary} is best on {wins} of {len(proper)} proper / two-sided headline scores on "
                 f"{title.lower()}.", ""]
    text += spectrum_table(ev)
    w = headline_window(cfg)
    text += [
        "## How to read this",
        "",
        f"- CRPS and twCRPS (threshold-weighted at the local {hi.upper()}, chaining max(x, thr)) are fair ensemble "
        "scores in mm/day, lower is better.",
        f"- FSS uses the members' exceedance probability of the local {hi.upper()} over {w}x{w}-pixel neighbourhoods "
        f"(higher is better; 'useful' above 0.5 + base rate / 2). All windows {list(cfg.fss_windows)} are in "
        "metrics.csv and fss_scale.png.",
        "- Frequency bias is forecast / observed exceedance counts (1 is unbiased); CSI pools the members' "
        "contingency tables; spread/skill is about 1 for a calibrated ensemble, below 1 when under-dispersed.",
        f"- MAE_tail (error of the ensemble mean where the truth exceeds {hi.upper()}) rewards forecasting extremes "
        "everywhere (the forecaster's dilemma): it is shown only next to the frequency bias, and a low MAE_tail with "
        "a frequency bias well above 1 is no skill.",
        "- The interpolation baseline is deterministic (one member): its CRPS is its MAE and spread/skill is "
        "undefined.",
        "",
        "Every score, for every checkpoint, split and subset: `metrics.csv` / `metrics.json`.",
        "",
    ]
    return "\n".join(text)


def generated_markdown(generated: str | None) -> list[str]:
    """summary.md lines: the generate stage's samples (maps and report), when the experiment is generated."""
    if not generated:
        return []
    folder = generated.rstrip("/")
    return ["## Generated samples", "",
            "The generate stage's samples for the heaviest heavy days it sampled, beside the real day (the fields "
            f"that go into the augmented training set; statistics in [{folder}/generation_report.md]"
            f"({folder}/generation_report.md)):", "",
            f"![generated samples]({folder}/generated_maps.png)", ""]


def spectrum_table(ev: Evaluation) -> list[str]:
    """Markdown lines: the RAPSD log ratio (members vs truth) per wavelength band, per source and subset."""
    split = headline_split(ev.meta)
    bands = [(f"rapsd_log_ratio_{name}", f"{name} (wavelength)") for name, _, _ in metrics.RAPSD_BANDS]
    rows = _headline_rows(ev, bands)
    if not rows:
        return []
    return [f"## Power spectrum of the members against the truth ({split} split)", "",
            "log10 of the members' mean RAPSD over the truth's, averaged over each band of wavelengths in pixels "
            "(0: the truth's power; < 0: too smooth; > 0: too rough).", "",
            pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"), ""]


def metrics_json(ev: Evaluation, cfg: EvaluateConfig) -> dict:
    """Nested scores model -> checkpoint -> split -> subset -> metric, plus metadata and curves."""
    nested: dict = {}
    for r in ev.table.itertuples(index=False):
        value = r.value if math.isfinite(r.value) else None
        nested.setdefault(r.model, {}).setdefault(r.checkpoint, {}).setdefault(r.split, {}).setdefault(
            r.subset, {})[r.metric] = value
    curves = {}
    for (split, subset, source), c in ev.curves.items():
        curves.setdefault(split, {}).setdefault(subset, {})[source] = {
            k: [None if not np.isfinite(x) else float(x) for x in np.asarray(v, dtype=float)] for k, v in c.items()}
    return {
        "scores": nested,
        "curves": curves,
        "meta": ev.meta,
        "n_days": {f"{s}/{sub}": n for (s, sub), n in ev.n_days.items()},
        "thresholds": {k: {"percentile": p, "median_mm_day": float(np.nanmedian(ev.thresholds[k]))}
                       for k, p in zip(percentile_names(cfg), cfg.percentiles)},
        "headline_metrics": [k for k, *_ in headline_metrics(cfg)],
        "scoring_config": {k: v for k, v in asdict(cfg).items() if k not in EVALUATE_SAMPLING_KEYS},
    }


def run(paths: ScorePaths, cfg: EvaluateConfig, experiment: str = "default", generated: str | None = None) -> Evaluation:
    """Step 2: score the cached ensembles; write metrics.csv/json, headline.csv and summary.md.

    The figures are :func:`precip_cvae.plots.write_figures` of the returned
    :class:`Evaluation` (kept out of this module, so that editing a figure does not
    change the code fingerprint of the sampling rule).

    Reads the scoring keys of ``cfg`` only (not ``config.EVALUATE_SAMPLING_KEYS``: what
    was sampled is described by the cache itself).

    Parameters
    ----------
    paths : ScorePaths (cache, dataset for the train thresholds, train_log.csv, output paths)
    cfg : EvaluateConfig
    experiment : checked against the cache's experiment (a mismatch is logged)
    generated : the generate stage's folder of the experiment, relative to the outputs' folder, when it
        is generated: summary.md shows its ``generated_maps.png`` and points to its report
    """
    t0 = time.perf_counter()
    if isinstance(paths.dataset, str):
        thresholds = tail_thresholds(paths.dataset, cfg)
        fold_maps = [thresholds]
    else:  # kfold_years: each fold's thresholds, fitted on its own train days, score that fold's days
        thresholds = fold_maps = [tail_thresholds(d, cfg) for d in paths.dataset]
    for k, maps in enumerate(fold_maps):
        for name, thr in maps.items():
            log.info("threshold %s%s: median %.2f mm/day over the valid pixels", name,
                     "" if len(fold_maps) == 1 else f" (fold {k})", float(np.nanmedian(thr)))
    ev = score_cache(paths.ensembles, thresholds, cfg)
    if ev.meta.get("experiment") != experiment:
        log.warning("the cache %s was sampled for experiment %r, scoring it as %r", paths.ensembles,
                    ev.meta.get("experiment"), experiment)
    first = paths.dataset if isinstance(paths.dataset, str) else paths.dataset[0]
    t1 = time.perf_counter()
    intervals = interval_table(ev, cfg, season_year_of(first))
    if not intervals.empty:
        log.info("bootstrap intervals (%d replicates over %ss): %.1f s", cfg.bootstrap.samples, cfg.bootstrap.block,
                 time.perf_counter() - t1)
    ev.diagnostics = diagnose(paths.ensembles, ev.meta, cfg, season_year_of(first))
    io.write_csv(ev.diagnostics.indices, paths.output("indices"))
    io.write_csv(ev.diagnostics.return_levels, paths.output("return_levels"))
    io.write_csv(with_intervals(ev.table, intervals), paths.output("metrics_csv"))
    save_day_components(paths.output("day_components"), ev.components or {}, ev.days or {}, season_year_of(first))
    io.write_json(metrics_json(ev, cfg), paths.output("metrics_json"))
    headline = headline_table(ev, cfg)
    io.write_csv(headline, paths.output("headline"))
    io.write_text(summary_markdown(ev, headline, cfg) + "\n".join(
        interval_markdown(intervals, ev, cfg) + diagnostics_markdown(ev.diagnostics, ev.meta)
        + generated_markdown(generated)) + "\n",
        paths.output("summary"))
    for line in verdicts(headline, cfg, "all"):
        log.info("headline (%s, all days) %s", headline_split(ev.meta), line[2:])
    log.info("evaluation written to %s in %.1f s", paths.output("summary").parent, time.perf_counter() - t0)
    return ev
