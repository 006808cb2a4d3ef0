"""``generation_report.json`` / ``.md``: counts, mass error, memorisation, distributions and climate indices of
the samples against the real heavy days they were drawn for."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from .. import indices
from ..config import EventsConfig, GenerateConfig
from ..data import DayFields, FieldData
from ..events import field_statistics, wet_day_thresholds
from ..grid import crop_array, crop_to_original
from ..io import open_zarr
from ..metrics import relative_mass_error
from ..split import format_times, season_year_rule
from ..evaluate.diagnostics import rows_per_block
from .memorisation import memorisation_check

if TYPE_CHECKING:
    from . import _Setup, _Tally

log = logging.getLogger(__name__)


def summary(values: np.ndarray) -> dict:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    return {"n": int(values.size), "mean": float(values.mean()), "p10": float(np.percentile(values, 10)),
            "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}


#: the statistics of a sample compared with its real day's in :func:`paired_with_real_days`
PAIRED_STATISTICS = ("domain_mean", "domain_max", "exceed_fraction")


def ratio_of_means(samples: np.ndarray, real: np.ndarray, confidence: float = 0.9, n_resamples: int = 2000,
                   seed: int = 0) -> dict:
    """mean(samples) / mean(real) over days, paired, with a percentile bootstrap interval over days
    (``scipy.stats.bootstrap``; none below 3 days)."""
    samples, real = np.asarray(samples, float), np.asarray(real, float)
    out = {"days": int(samples.size), "ratio": float(samples.mean() / real.mean()) if samples.size else None,
           "ci_low": None, "ci_high": None, "confidence": confidence}
    if samples.size >= 3:
        res = stats.bootstrap((samples, real), lambda s, r, axis: s.mean(axis) / r.mean(axis), paired=True,
                              vectorized=True, confidence_level=confidence, method="percentile",
                              n_resamples=n_resamples, random_state=np.random.default_rng(seed))
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def paired_with_real_days(synth: pd.DataFrame, real_stats: pd.DataFrame, real_dates) -> dict:
    """Each day's samples against the real day they were drawn for: per statistic, the mean over the samples of
    a day, then :func:`ratio_of_means` over the days that have samples (the goal "rain of generated heavy-day
    samples / real heavy days" is the ``domain_mean`` ratio); days without a sample are counted."""
    real = real_stats[list(PAIRED_STATISTICS)].set_axis(np.asarray(real_dates))  # one row per heavy day
    per_day = synth.groupby("source_date")[list(PAIRED_STATISTICS)].mean().reindex(real.index)
    have = per_day.notna().all(axis=1).to_numpy()
    return {"days_without_samples": int((~have).sum()),
            **{name: ratio_of_means(per_day[name].to_numpy()[have], real[name].to_numpy()[have])
               for name in PAIRED_STATISTICS}}


#: at most this many values (float64: 400 MB) of samples are held for :func:`index_diagnostics`
MAX_INDEX_VALUES = 50_000_000


#: the indices of :data:`precip_cvae.indices.INDEX_NAMES` that mean something on isolated heavy days
#: (a wet or dry spell cannot be measured on days that are not consecutive)
SAMPLE_INDICES = ("rx1day", "sdii", "r95ptot", "r99ptot", "days_above_p99")


def index_diagnostics(setup: _Setup, store: Path, events_cfg: EventsConfig) -> dict:
    """Climate indices of the samples against the real fields of the heavy days they were drawn for.

    Each realization is one daily series over the sampled heavy days (as the evaluation treats a
    member over the scored days: :func:`precip_cvae.indices.ensemble_index_table`, xclim's
    indices), compared with the real fields of the same days.  R95pTOT, R99pTOT and the days above
    the local P99 use the wet-day P95 / P99 of the *train* days at each pixel (``events.wet_threshold``,
    ``events.min_wet_days`` with the pooled fallback), so they say how much of the heavy days' rain
    comes from values that are extreme for the climate.  CWD and CDD are left out: the heavy days are
    not consecutive, so no spell can be measured.  Beside them: the Wasserstein distance, Perkins
    skill score and RALSD of the samples.  Realizations 0 .. R-1 where every day holds R (the
    filter may leave a day short), at most :data:`MAX_INDEX_VALUES` values.

    Returns
    -------
    dict: ``realizations`` used, ``days``, ``threshold_days`` (train days), ``table`` (records: index,
    units, real_mean, samples_mean, bias_mean, abs_bias_mean; spatial means over the valid pixels)
    and ``note``.
    """
    aug = open_zarr(store)
    counts = aug["n_realizations"].values.astype(int)
    d, h, w = counts.size, aug.sizes["lat"], aug.sizes["lon"]
    n_real = int(min(counts.min(), max(1, MAX_INDEX_VALUES // max(d * h * w, 1))))
    dates = format_times(aug.indexes["time"])
    position = {str(x): i for i, x in enumerate(setup.data.dates)}
    src = np.array([position[x] for x in dates])
    fine = crop_to_original(setup.ds[["pr", "mask"]], setup.pads)  # the original grid, lazily
    real = fine["pr"].isel(time=src).values.astype("float64")  # (D, h, w), NaN where unobserved
    real[:, ~setup.mask] = np.nan
    ens = aug["pr"].isel(realization=slice(0, n_real)).values.astype("float64").transpose(1, 0, 2, 3)
    train = np.flatnonzero(setup.data.split == "train")
    da = fine["pr"].isel(time=train)  # dask: wet_day_thresholds streams over time
    mask = xr.DataArray(setup.mask.astype("int8"), dims=("lat", "lon"))
    thr = {p: wet_day_thresholds(da, mask, dataclasses.replace(events_cfg, percentile=p)).values.astype("float64")
           for p in (95.0, 99.0)}
    season_year = season_year_rule(setup.ds.attrs)
    calendar = str(setup.ds.attrs.get("calendar", "standard"))
    daily = all(len(x) == 10 for x in dates)  # 'YYYY-MM-DD': the indices are defined on daily series
    note = ("each realization is a daily series over the sampled heavy days (not consecutive: CWD and CDD are not "
            "defined); P95/P99 are the train days' wet-day percentiles")
    if daily:
        # by blocks of grid rows (each pixel's indices depend on its own series): xclim's working memory is
        # many times the values it is given, a continental grid's would not fit
        rows_per = rows_per_block(n_real + 1, d, w)
        obs_maps, ens_maps = {}, {}
        for r0 in range(0, h, rows_per):
            r1 = min(r0 + rows_per, h)
            om, em = indices.ensemble_index_maps(ens[..., r0:r1, :], real[:, r0:r1], dates, calendar,
                                                 thr[95.0][r0:r1], thr[99.0][r0:r1], events_cfg.wet_threshold,
                                                 season_year)
            for name in om:
                obs_maps.setdefault(name, []).append(om[name])
                ens_maps.setdefault(name, []).append(em[name])
        table, _ = indices.index_table({k: np.concatenate(v) for k, v in obs_maps.items()},
                                       {k: np.concatenate(v) for k, v in ens_maps.items()},
                                       np.isfinite(real).any(axis=0))
        table = table[table["index"].isin(SAMPLE_INDICES)]
    else:
        table = pd.DataFrame(columns=["index", "obs_mean", "ens_mean", "bias_mean", "abs_bias_mean"])
        note = ("the samples are of sub-daily steps: the daily climate indices are not computed (sum the steps to "
                "days with preprocess.time_step: 1D to get them); the distribution distances use every step")
    rows = [{"index": r.index, "units": indices.INDEX_UNITS[r.index], "real_mean": r.obs_mean,
             "samples_mean": r.ens_mean, "bias_mean": r.bias_mean, "abs_bias_mean": r.abs_bias_mean}
            for r in table.itertuples(index=False)]
    units = {"wasserstein": "mm d-1", "perkins_skill_score": "1", "ralsd": "dB2"}
    rows += [{"index": k, "units": units[k], "real_mean": None, "samples_mean": v, "bias_mean": None,
              "abs_bias_mean": None} for k, v in indices.distribution_scores(ens, real).items()]
    log.info("indices of %d realizations x %d heavy days against the real fields: %s", n_real, d,
             ", ".join(f"{r['index']} {r['samples_mean']:.3g} (real {r['real_mean']:.3g})"
                       for r in rows if r["real_mean"] is not None))
    return {"realizations": n_real, "days": d, "threshold_days": int(train.size), "season_year": season_year,
            "table": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                      for r in rows],
            "note": note}


def real_mass_error(data, chosen, real_stats) -> dict:
    """The same relative domain-mean error for the real fields of the sampled days: the reference for
    the samples' (the fine target and the coarse channel can be different products, e.g. E-OBS and NCEP)."""
    cmean = np.nanmean(data.coarse(chosen).numpy(), axis=(1, 2))
    rel = relative_mass_error(real_stats["domain_mean"].values, cmean)
    return {"mean_abs": float(np.mean(np.abs(rel))), **summary(rel)}


def build_report(setup: _Setup, tally: _Tally, cfg: GenerateConfig, events_cfg: EventsConfig) -> dict:
    """generation_report.json without its climate indices: counts, mass error, memorisation, distributions."""
    data, chosen, thr, pads = setup.data, setup.chosen, setup.thr, setup.pads
    synth = pd.concat(tally.stats, ignore_index=True)
    n_written, short_days, n_bad = tally.written, tally.short_days, tally.bad
    acceptance = tally.written / max(tally.drawn, 1)
    train_idx = np.flatnonzero(data.split == "train")
    finish = lambda pr: crop_array(pr, pads)  # noqa: E731 -- the original grid
    real_events = finish(data.fields_mm(chosen))
    real_stats = field_statistics(real_events, thr, events_cfg.wet_threshold)
    if train_idx.size > cfg.memorisation_max_reference:
        pick = np.random.default_rng(cfg.seed).choice(train_idx.size, cfg.memorisation_max_reference, replace=False)
        reference_idx = train_idx[np.sort(pick)]
    else:
        reference_idx = train_idx
    # the reference train fields: in memory with the data set, else read a block at a time as they are compared
    reference = (finish(data.fields_mm(reference_idx)) if isinstance(data, FieldData)
                 else DayFields(data.subset(reference_idx), finish))
    # the anchors: the real fields of the sampled days; each is skipped in its own distance
    position = {int(day): k for k, day in enumerate(reference_idx)}
    anchor_index = np.array([position.get(int(day), -1) for day in chosen], dtype=int)
    memo = memorisation_check(
        np.concatenate(tally.memo_fields) if tally.memo_fields else np.zeros((0, *real_events.shape[1:])),
        reference, cfg.memorisation_warn_fraction, anchors=real_events, anchor_index=anchor_index)
    if memo["warning"]:
        log.warning("memorisation: %.1f %% of samples are near-copies of a real training field (nearest closer "
                    "than 1/3 of the second nearest; warning above %.1f %%)",
                    100 * memo["fraction_near_copies"], 100 * cfg.memorisation_warn_fraction)
    memo.pop("per_sample_nn_rmse")
    memo.pop("per_sample_nn_ratio")
    mass = np.concatenate(tally.mass) if tally.mass else np.array([])
    report = {
        "provenance": setup.attrs,
        "samples": n_written,
        "heavy_days": int(chosen.size),
        "members_per_day": cfg.members,
        "acceptance_rate": acceptance,
        "days_short_of_members": short_days,
        "nan_values": n_bad["nan"],
        "negative_values": n_bad["negative"],
        "mass_error_vs_coarse_condition": (
            {"available": True, "mean_abs": float(np.mean(np.abs(mass))), **summary(mass),
             "real_event_days": real_mass_error(data, chosen, real_stats)}
            if mass.size else {"available": False, "reason": "no precipitation channel in the condition"}
        ),
        "memorisation": memo,
        "distributions": {
            name: {"synthetic": summary(synth[name].values), "real_event_days": summary(real_stats[name].values)}
            for name in ("domain_max", "domain_mean", "exceed_fraction", "wet_fraction")
        },
        "paired_with_real_days": paired_with_real_days(synth, real_stats, data.dates[chosen]),
    }
    log.info("generation: %d samples, acceptance %.2f, memorisation fraction %.3f, mass error %s",
             n_written, acceptance, memo["fraction_near_copies"],
             f"{report['mass_error_vs_coarse_condition'].get('mean_abs', float('nan')):.3f}"
             if mass.size else "n/a")
    return report


def report_markdown(r: dict) -> str:
    d = r["distributions"]
    lines = [
        "# Generation report",
        "",
        f"- samples: **{r['samples']}** from {r['heavy_days']} heavy days x {r['members_per_day']} members "
        f"(acceptance rate {r['acceptance_rate']:.2f}, days short of members: {r['days_short_of_members']})",
        f"- NaN values: {r['nan_values']}, negative values: {r['negative_values']}",
        f"- checkpoint SHA-256 `{r['provenance']['checkpoint_sha256'][:16]}...`, seed {r['provenance']['seed']}, "
        f"package {r['provenance']['package_version']}",
    ]
    m = r["mass_error_vs_coarse_condition"]
    lines.append(
        f"- mass error vs the coarse precipitation condition: mean |rel. error| {m['mean_abs']:.3f} "
        f"(median {m['p50']:+.3f}); the real fields of the same days: {m['real_event_days']['mean_abs']:.3f} "
        f"(median {m['real_event_days']['p50']:+.3f})"
        if m.get("available") else f"- mass error vs the coarse condition: n/a ({m['reason']})"
    )
    mm = r["memorisation"]
    lines += [
        f"- memorisation: {100 * mm['fraction_near_copies']:.1f} % of samples are near-copies of a real training "
        f"field (nearest closer than 1/3 of the second nearest; median ratio {mm['sample_nn_ratio_median']:.2f}; "
        f"{mm.get('samples_checked', '?')} samples against {mm['reference_fields']} train fields){' **WARNING**' if mm['warning'] else ''}. Nearest-field RMSE: "
        f"samples' median {mm['sample_nn_rmse_median']:.2f} mm/day; real heavy days to other train fields: median "
        f"{mm['real_nn_rmse_median']:.2f}, 5th percentile {mm['real_nn_rmse_p5']:.2f}",
    ]
    pr = r.get("paired_with_real_days")
    if pr:
        def ratio(v):
            ci = "" if v["ci_low"] is None else f" [{v['ci_low']:.2f}, {v['ci_high']:.2f}]"
            return "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}{ci}"
        lines.append(
            f"- samples against the real day they were drawn for (mean over a day's samples, ratio of the means over "
            f"the {pr['domain_mean']['days']} days with samples, {100 * pr['domain_mean']['confidence']:.0f} % "
            f"bootstrap over days; {pr['days_without_samples']} days without a sample): rain (domain mean) "
            f"{ratio(pr['domain_mean'])}, peak (domain max) {ratio(pr['domain_max'])}, area above the local "
            f"threshold {ratio(pr['exceed_fraction'])}")
    lines += [
        "",
        "| statistic | synthetic p10 / p50 / p90 | real heavy days p10 / p50 / p90 |",
        "|---|---|---|",
    ]
    for name, v in d.items():
        s, t = v["synthetic"], v["real_event_days"]
        fmt = lambda x: f"{x.get('p10', float('nan')):.3g} / {x.get('p50', float('nan')):.3g} / {x.get('p90', float('nan')):.3g}"  # noqa: E731
        lines.append(f"| {name} | {fmt(s)} | {fmt(t)} |")
    ix = r.get("indices")
    if ix:
        num = lambda x: "" if x is None else f"{x:.3g}"  # noqa: E731
        lines += ["", f"Climate indices: {ix['realizations']} realizations x {ix['days']} heavy days against the "
                  f"real fields of those days; {ix['note']}.", "",
                  "| index | units | real heavy days | samples | bias | mean abs. bias |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['index']} | {t['units']} | {num(t['real_mean'])} | {num(t['samples_mean'])} | "
                  f"{num(t['bias_mean'])} | {num(t['abs_bias_mean'])} |" for t in ix["table"]]
    return "\n".join(lines) + "\n"
