"""Every score of an ensemble against the truth (:func:`score`) and of the whole cache (:func:`score_cache`).

Scores (:func:`score`, from the functions of :mod:`precip_cvae.metrics`)
------------------------------------------------------------------------
``pNN`` in a name is the local threshold of that percentile.  CRPS and twCRPS are
fair and averaged over valid points; FSS uses the exceedance probability of the
members; frequency bias and the contingency scores (CSI, POD, FAR at the upper
percentile) pool the members' tables; MAE/RMSE/correlation are those of the
ensemble mean.  Added here: ``n_days``, ``mass_error_bias`` (signed),
``mass_error_coarse_mae`` / ``_bias`` (domain-mean error of each member against the
coarse precipitation condition interpolated to the valid fine pixels),
``rapsd_log_ratio`` (mean over wavenumbers of log10 of member / truth power; < 0:
too little spatial variance); :func:`score` also returns the curves of the figures
(rank counts, RAPSD, Q-Q quantiles).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from .. import io, metrics
from ..baselines import BASELINES, BaselineInputs
from ..config import EvaluateConfig, EventsConfig
from ..events import wet_day_thresholds
from ..grid import crop_to_original
from .intervals import day_components, headline_interval_metrics
from .names import METRIC_COLUMNS, TRUTH, model_and_checkpoint, percentile_names, source_label

log = logging.getLogger(__name__)

TAIL_QUANTILES = (0.99, 0.999)
QQ_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def tail_thresholds(dataset: str, cfg: EvaluateConfig) -> dict[str, np.ndarray]:
    """Local wet-day thresholds of the train split on the original grid.

    Returns
    -------
    dict 'p95' -> ndarray (h, w), mm day-1 (NaN outside the mask), one per
    ``cfg.percentiles``; pixels with fewer than ``cfg.min_wet_days`` wet train days
    take the pooled value (:func:`precip_cvae.events.wet_day_thresholds`).
    """
    ds = io.open_zarr(dataset)
    ds = crop_to_original(ds[["pr", "mask", "split"]], ds.attrs)
    train = np.flatnonzero(ds["split"].values.astype(str) == "train")
    pr = ds["pr"].isel(time=train).load()
    out = {}
    for name, p in zip(percentile_names(cfg), cfg.percentiles):
        ecfg = EventsConfig(percentile=float(p), wet_threshold=cfg.wet_threshold, min_wet_days=cfg.min_wet_days)
        out[name] = wet_day_thresholds(pr, ds["mask"], ecfg).values.astype("float64")
    return out


def _day_slice(thr, obs: np.ndarray, sl: slice):
    """The days ``sl`` of a per-day (N, h, w) threshold; a (h, w) map as it is."""
    thr = np.asarray(thr)
    return thr[sl] if thr.ndim == obs.ndim else thr


def _mean_over_valid(per_point_fn, ens: np.ndarray, obs: np.ndarray, chunk_days: int, thr=None) -> float:
    """Mean of a per-point score over valid points, computed ``chunk_days`` days at a time (memory);
    ``thr`` (a map or per-day maps) is passed on as the third argument, sliced with the days."""
    total, count = 0.0, 0
    for s in range(0, obs.shape[0], chunk_days):
        sl = slice(s, s + chunk_days)
        o = obs[sl]
        v = np.isfinite(o)
        args = () if thr is None else (_day_slice(thr, obs, sl),)
        with np.errstate(invalid="ignore"):  # NaN at excluded pixels (truth, thresholds) is expected
            total += float(np.sum(per_point_fn(ens[:, sl], o, *args)[v]))
        count += int(v.sum())
    return total / count if count else float("nan")


def score(ens, obs, thresholds: Mapping[str, np.ndarray], windows: Sequence[int] = (1, 3, 9, 27),
          wet_threshold: float = 1.0, coarse_ref=None, rng: int | np.random.Generator = 0,
          chunk_days: int = 16) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every score of one ensemble against the truth, and the curves the figures need.

    Built from the metric functions of :mod:`precip_cvae.metrics`; the per-point CRPS and
    twCRPS are averaged day-chunk by day-chunk, because the fair estimator holds an
    (M, M) array per point.

    Parameters
    ----------
    ens : ndarray (M, N, h, w), mm day-1 (member axis first)
    obs : ndarray (N, h, w), mm day-1; NaN = excluded pixel
    thresholds : {'p95': (h, w), 'p99': (h, w)}, mm day-1 -- the (moderate, extreme) pair; or
        per-day maps (N, h, w) (the pooled days of ``kfold_years``, each with its fold's thresholds)
    windows : FSS neighbourhood sides in pixels
    wet_threshold : mm day-1, for the tail quantiles
    coarse_ref : ndarray (N, h, w) or None
        The coarse precipitation condition on the fine grid (mm day-1): adds
        ``mass_error_coarse_mae`` / ``_bias``.
    rng : rank-histogram tie breaking
    chunk_days : days per CRPS chunk

    Returns
    -------
    scores : dict[str, float]
        ``n_members``, ``n_days``; of the ensemble mean: ``mae_all``, ``mae_tail_<p>``,
        ``rmse_ext_<p>``, ``corr``; ``freq_bias_<p>`` (member-mean counts / observed);
        ``crps``, ``twcrps_<p>`` (fair, mean over valid points); ``fss_<p>_w<w>`` (exceedance
        probability of the members), ``fss_useful_<p>``; ``pod_<hi>``, ``far_<hi>``, ``csi_<hi>``
        (member-pooled table at the upper threshold); ``spread_skill``; ``rank_flatness``;
        ``tail_q99_ens`` / ``_obs``, ``tail_q99.9_ens`` / ``_obs`` (wet values, mm day-1);
        ``mass_error_mae`` / ``_bias``, ``mass_error_coarse_mae`` / ``_bias`` (with
        ``coarse_ref``); ``rapsd_log_ratio`` and ``rapsd_log_ratio_<band>``.  ``<p>`` runs over
        the keys of ``thresholds``.
    curves : dict[str, ndarray]
        ``rank_counts`` (M + 1,), ``rapsd_k``, ``rapsd_ens``, ``rapsd_obs``,
        ``qq_levels``, ``qq_ens``, ``qq_obs`` (mm day-1).
    """
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if ens.ndim != 4 or ens.shape[1:] != obs.shape:
        raise ValueError(f"ensemble {ens.shape} must be (M,) + obs shape {obs.shape}")
    (lo, thr_lo), (hi, thr_hi) = thresholds.items()
    v = np.isfinite(obs)
    mean = ens.mean(axis=0)
    out: dict[str, float] = {"n_members": float(ens.shape[0]), "n_days": float(obs.shape[0])}
    out["mae_all"] = metrics.mae(mean, obs)
    for name, thr in thresholds.items():
        out[f"mae_tail_{name}"] = metrics.mae_tail(mean, obs, thr)
        out[f"rmse_ext_{name}"] = metrics.rmse_ext(mean, obs, thr)
    out["corr"] = metrics.pearson(mean, obs)
    for name, thr in thresholds.items():
        out[f"freq_bias_{name}"] = metrics.frequency_bias(ens, obs, thr, member_axis=0)
    out["crps"] = _mean_over_valid(metrics.crps_ensemble, ens, obs, chunk_days)
    for name, thr in thresholds.items():
        out[f"twcrps_{name}"] = _mean_over_valid(metrics.twcrps_ensemble, ens, obs, chunk_days, thr)
    for name, thr in thresholds.items():
        for w in windows:
            out[f"fss_{name}_w{int(w)}"] = metrics.fss_ensemble(ens, obs, thr, int(w))
        out[f"fss_useful_{name}"] = metrics.fss_useful(obs, thr)
    table = metrics.contingency(ens, obs, thr_hi, member_axis=0)
    out[f"pod_{hi}"] = metrics.pod(table)
    out[f"far_{hi}"] = metrics.far(table)
    out[f"csi_{hi}"] = metrics.csi(table)
    out["spread_skill"] = metrics.spread_skill_ratio(ens, obs)
    counts = metrics.rank_histogram(ens, obs, rng)
    out["rank_flatness"] = metrics.rank_histogram_flatness(counts)
    levels = np.unique(np.r_[TAIL_QUANTILES, QQ_LEVELS])  # one pass over the pooled values for both
    all_ens = metrics.tail_quantiles(ens[:, v], levels, wet_threshold)
    all_obs = metrics.tail_quantiles(obs[v], levels, wet_threshold)
    pick = lambda a, qs: a[np.searchsorted(levels, qs)]  # noqa: E731
    q_ens, q_obs = pick(all_ens, TAIL_QUANTILES), pick(all_obs, TAIL_QUANTILES)
    for q, qe, qo in zip(TAIL_QUANTILES, q_ens, q_obs):
        out[f"tail_q{100 * q:g}_ens"] = float(qe)
        out[f"tail_q{100 * q:g}_obs"] = float(qo)
    me = metrics.mass_error(ens, obs)
    out["mass_error_mae"] = float(np.nanmean(np.abs(me))) if np.isfinite(me).any() else float("nan")
    out["mass_error_bias"] = float(np.nanmean(me)) if np.isfinite(me).any() else float("nan")
    if coarse_ref is not None:
        ref = np.where(v, np.asarray(coarse_ref, dtype=np.float64), np.nan)
        mc = metrics.mass_error(ens, ref)
        out["mass_error_coarse_mae"] = float(np.nanmean(np.abs(mc))) if np.isfinite(mc).any() else float("nan")
        out["mass_error_coarse_bias"] = float(np.nanmean(mc)) if np.isfinite(mc).any() else float("nan")
    k, p_ens = metrics.mean_rapsd(ens)
    _, p_obs = metrics.mean_rapsd(obs)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log10(p_ens / p_obs)
    out["rapsd_log_ratio"] = float(np.nanmean(ratio[np.isfinite(ratio)])) if np.isfinite(ratio).any() else float("nan")
    out.update(metrics.rapsd_band_log_ratios(k, p_ens, p_obs))
    curves = {
        "rank_counts": counts,
        "rapsd_k": k, "rapsd_ens": p_ens, "rapsd_obs": p_obs,
        "qq_levels": np.asarray(QQ_LEVELS),
        "qq_ens": pick(all_ens, QQ_LEVELS),
        "qq_obs": pick(all_obs, QQ_LEVELS),
    }
    return out, curves


@dataclass
class Evaluation:
    """Everything :func:`run` computed (kept for the figures, the summary and tests)."""

    table: pd.DataFrame  # METRIC_COLUMNS, long format
    curves: dict  # (split, subset, source) -> curves of :func:`score`
    meta: dict  # the cache's evaluate_meta
    n_days: dict  # (split, subset) -> days
    thresholds: dict  # 'p95' -> (h, w)
    components: dict = None  # split -> source -> day components (intervals.day_components) of every day
    days: dict = None  # split -> (dates (N,) ISO str, heavy (N,) bool)
    diagnostics: object = None  # diagnostics.Diagnostics of the headline split, set by the report

    def value(self, source: str, metric: str, split: str, subset: str = "all") -> float:
        model, ckpt = model_and_checkpoint(source)
        t = self.table
        hit = t[(t.model == model) & (t.checkpoint == ckpt) & (t.split == split) & (t.subset == subset)
                & (t.metric == metric)]
        return float(hit["value"].iloc[0]) if len(hit) else float("nan")


def _coarse_reference(truth: xr.Dataset, root: xr.Dataset) -> np.ndarray | None:
    if "coarse_pr" not in truth:
        return None
    on_cells = bool(root.attrs.get("condition_on_cells", 0)) and "cell_lat" in root.coords
    lat, lon = (root["cell_lat"].values, root["cell_lon"].values) if on_cells else (truth["lat"].values,
                                                                                     truth["lon"].values)
    return BASELINES["interpolation"](BaselineInputs(
        coarse_pr=truth["coarse_pr"].values, coarse_lat=truth["clat"].values, coarse_lon=truth["clon"].values,
        fine_lat=lat, fine_lon=lon))[0]


def day_thresholds(thresholds, truth: xr.Dataset) -> dict[str, np.ndarray]:
    """The thresholds of each day of ``truth``: the maps as they are, or, for a pooled ``kfold_years``
    cache (``truth`` has ``fold``) and one dict of maps per fold, each day's fold's maps (N, h, w)."""
    if isinstance(thresholds, Mapping):
        return dict(thresholds)
    if "fold" not in truth:
        raise ValueError("per-fold thresholds need a pooled cache (truth without 'fold')")
    fold = truth["fold"].values.astype(int)
    if fold.size and fold.max() >= len(thresholds):
        raise ValueError(f"the cache holds fold {fold.max()} but thresholds were given for {len(thresholds)} folds")
    return {name: np.stack([t[name] for t in thresholds])[fold] for name in thresholds[0]}


def score_cache(ensembles: str, thresholds, cfg: EvaluateConfig) -> Evaluation:
    """Score every source of the cache on every split, for all days and heavy days alone.

    ``thresholds``: one dict of maps, or (pooled ``kfold_years`` cache) one per fold, fold k's
    fitted on fold k's train days only (:func:`day_thresholds`).  Reads one (split, source)
    ensemble into memory at a time: M x N x h x w x 8 bytes.
    """
    root = io.open_zarr_group(ensembles)
    meta = json.loads(root.attrs["evaluate_meta"])
    rows, curves, n_days, components, days = [], {}, {}, {}, {}
    which = headline_interval_metrics(cfg)
    for split in meta["splits"]:
        truth = io.open_zarr_group(ensembles, f"{split}/{TRUTH}").load()
        obs = truth["pr"].values.astype("float64")
        heavy = truth["is_event"].values.astype(bool)
        coarse_ref = _coarse_reference(truth, root)
        thr_days = day_thresholds(thresholds, truth)
        subsets = {"all": np.arange(len(obs)), "heavy": np.flatnonzero(heavy)}
        if not heavy.any():
            log.info("%s: no heavy-event day; scores for all days only", split)
            del subsets["heavy"]
        for subset, idx in subsets.items():
            n_days[(split, subset)] = int(idx.size)
        days[split] = (truth["time"].values.astype(str), heavy)
        components[split] = {}
        for source in meta["sources"]:
            t0 = time.perf_counter()
            ens = io.open_zarr_group(ensembles, f"{split}/{source}")["pr"].values.astype("float64")
            model, ckpt = model_and_checkpoint(source)
            for subset, idx in subsets.items():
                thr = {k: (t[idx] if t.ndim == 3 else t) for k, t in thr_days.items()}
                scores, c = score(ens[:, idx], obs[idx], thr, cfg.fss_windows, cfg.wet_threshold,
                                  None if coarse_ref is None else coarse_ref[idx], rng=cfg.seed)
                rows.extend((model, ckpt, split, subset, k, float(val)) for k, val in scores.items())
                curves[(split, subset, source)] = c
            if cfg.bootstrap.samples > 0:  # per-day sums of the headline scores, for the intervals
                components[split][source] = day_components(ens, obs, thr_days, cfg.fss_windows, cfg.wet_threshold,
                                                            which=which)
            log.info("%s: scored %s in %.1f s (CRPS all days %.3f)", split, source_label(source),
                     time.perf_counter() - t0, next(r[5] for r in reversed(rows) if r[4] == "crps" and r[3] == "all"))
            del ens
    first = thresholds if isinstance(thresholds, Mapping) else thresholds[0]
    return Evaluation(pd.DataFrame(rows, columns=METRIC_COLUMNS), curves, meta, n_days, dict(first), components, days)
