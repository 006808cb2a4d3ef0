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
from .intervals import FoldMaps, day_slice, day_components, finish, headline_interval_metrics, hist_quantile
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
    pr = ds["pr"].isel(time=train)  # lazy: wet_day_thresholds streams over time (a decade of a continental grid
    # is several GB of float32)
    out = {}
    for name, p in zip(percentile_names(cfg), cfg.percentiles):
        ecfg = EventsConfig(percentile=float(p), wet_threshold=cfg.wet_threshold, min_wet_days=cfg.min_wet_days)
        out[name] = wet_day_thresholds(pr, ds["mask"], ecfg).values.astype("float64")
    return out


#: working memory (bytes) of scoring one chunk of days: the chunk's members in float64 and the arrays made from
#: them (about :data:`SCORE_COPIES` of its size: the contingency, FSS, rank and spectrum computations)
SCORE_CHUNK_BYTES = 128 * 2**20
SCORE_COPIES = 6
#: pooled quantiles (``tail_q*``, the Q-Q curve) are exact (``np.quantile`` of every wet value) while the values
#: of one ensemble take at most this many bytes; beyond, from the wet-value histograms of
#: :mod:`precip_cvae.evaluate.intervals` (each quantile within a factor 1 + 0.213 % of the exact one)
EXACT_QUANTILE_BYTES = 64 * 2**20


def chunk_days_for(members: int, h: int, w: int, budget: int | None = None) -> int:
    """Days per scoring chunk: as many as keep a chunk's working memory (:data:`SCORE_COPIES` float64 copies of
    its members) within ``budget`` (default :data:`SCORE_CHUNK_BYTES`), at least 1 and at most 256."""
    budget = SCORE_CHUNK_BYTES if budget is None else budget
    return int(max(1, min(256, budget // max(1, SCORE_COPIES * members * h * w * 8))))


@dataclass
class DayParts:
    """Per-day additive parts of every score of one ensemble, from one pass over its days (:func:`day_parts`).

    Any score on any set of days is its parts summed over those days, finished (:func:`scores_of`): the
    all-days and heavy-day scores and the bootstrap's components come from the same pass, and memory holds
    one chunk of days at a time plus these (N, k) arrays.
    """

    n_members: int
    comps: dict  # intervals.day_components of every score: metric -> (N, k)
    sums: dict  # rmse_ext_<p> (N, 2), fss_useful_<p> (N, 2), corr (N, 6), mass_error_coarse (N, 3) -> (N, k)
    ranks: np.ndarray  # (N, M + 1) rank counts of each day
    k: np.ndarray  # (K,) RAPSD wavenumbers
    rapsd_ens: np.ndarray  # (N, K): member-mean power of each day
    rapsd_obs: np.ndarray  # (N, K)
    wet_ens: list | None  # per day, the members' wet values (exact quantiles), or None (histograms)
    wet_obs: list | None
    names: tuple  # the (moderate, extreme) threshold names
    windows: tuple
    wet_threshold: float


def _day_ranks(e: np.ndarray, o: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank counts per day (c, M + 1), ties broken at random (:func:`precip_cvae.metrics.rank_histogram`)."""
    m = e.shape[0]
    day = np.nonzero(v)[0]
    ev, ov = e[:, v], o[v]
    ranks = np.sum(ev < ov, axis=0) + rng.integers(0, np.sum(ev == ov, axis=0) + 1)
    return np.bincount(day * (m + 1) + ranks, minlength=o.shape[0] * (m + 1)).reshape(o.shape[0], m + 1)


def day_parts(ens, obs, thresholds: Mapping[str, np.ndarray], windows: Sequence[int] = (1, 3, 9, 27),
              wet_threshold: float = 1.0, coarse_ref=None, rng: int | np.random.Generator = 0,
              chunk_days: int | None = None, exact_quantiles: bool | None = None) -> DayParts:
    """The per-day parts of every score of one ensemble, one chunk of days at a time.

    ``ens`` (M, N, h, w) and ``obs`` (N, h, w) may be numpy, dask or zarr arrays (a store read lazily):
    only ``chunk_days`` days are in memory at once, in float64 (default :func:`chunk_days_for`).
    ``coarse_ref``: an (N, h, w) array, or a function ``(start, stop) -> (c, h, w)`` (computed per chunk).
    ``exact_quantiles``: keep every wet value for exact pooled quantiles (default: when they fit in
    :data:`EXACT_QUANTILE_BYTES`).  Other arguments as :func:`score`.
    """
    m, n = int(ens.shape[0]), int(ens.shape[1])
    if ens.ndim != 4 or tuple(ens.shape[1:]) != tuple(obs.shape):
        raise ValueError(f"ensemble {tuple(ens.shape)} must be (M,) + obs shape {tuple(obs.shape)}")
    h, w = int(obs.shape[-2]), int(obs.shape[-1])
    chunk = chunk_days or chunk_days_for(m, h, w)
    item = np.dtype(getattr(ens, "dtype", np.float64)).itemsize
    exact = exact_quantiles if exact_quantiles is not None else m * n * h * w * item <= EXACT_QUANTILE_BYTES
    rng = np.random.default_rng(rng)
    names = tuple(thresholds)
    comps, sums = [], {}
    ranks, pe, po, wet_e, wet_o = [], [], [], [], []
    k = None
    for s in range(0, n, chunk):
        stop = min(s + chunk, n)
        raw = np.asarray(ens[:, s:stop])
        e = raw.astype(np.float64)
        o = np.asarray(obs[s:stop], dtype=np.float64)
        v = np.isfinite(o)
        thr = {p: day_slice(t, n, s, stop) for p, t in thresholds.items()}
        comps.append(day_components(e, o, thr, windows, wet_threshold, chunk_days=stop - s))
        mean = e.mean(axis=0)
        extra = {"corr": metrics.pearson_parts(mean, o, v)}
        with np.errstate(invalid="ignore"):
            for p, t in thr.items():
                ext = v & (o > np.broadcast_to(t, o.shape))
                extra[f"rmse_ext_{p}"] = np.stack([np.where(ext, (mean - o) ** 2, 0.0).sum(axis=(1, 2)),
                                                   ext.sum(axis=(1, 2))], -1)
                extra[f"fss_useful_{p}"] = np.stack([ext.sum(axis=(1, 2)), v.sum(axis=(1, 2))], -1).astype(float)
            if coarse_ref is not None:
                ref = coarse_ref(s, stop) if callable(coarse_ref) else np.asarray(coarse_ref[s:stop], np.float64)
                mc = metrics.mass_error(e, np.where(v, np.asarray(ref, np.float64), np.nan))  # (M, c)
                ok = np.isfinite(mc)
                extra["mass_error_coarse"] = np.stack([np.where(ok, np.abs(mc), 0.0).sum(axis=0),
                                                       np.where(ok, mc, 0.0).sum(axis=0), ok.sum(axis=0)], -1)
        for key, val in extra.items():
            sums.setdefault(key, []).append(val)
        ranks.append(_day_ranks(e, o, v, rng))
        for d in range(stop - s):
            k, p_e = metrics.mean_rapsd(e[:, d])
            pe.append(p_e)
            po.append(metrics.rapsd(o[d])[1])
            if exact:
                x = raw[:, d][:, v[d]]
                wet_e.append(x[np.isfinite(x) & (x >= wet_threshold)])
                y = o[d][v[d]]
                wet_o.append(y[y >= wet_threshold])
    join = lambda parts: {key: np.concatenate([c[key] for c in parts]) for key in parts[0]}  # noqa: E731
    return DayParts(
        n_members=m, comps=join(comps), sums={key: np.concatenate(v_) for key, v_ in sums.items()},
        ranks=np.concatenate(ranks), k=k, rapsd_ens=np.stack(pe), rapsd_obs=np.stack(po),
        wet_ens=wet_e if exact else None, wet_obs=wet_o if exact else None, names=names,
        windows=tuple(int(x) for x in windows), wet_threshold=float(wet_threshold))


def _pooled_quantiles(parts: DayParts, days: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles ``levels`` of the pooled wet values of the members and of the truth on ``days``: exact, or
    from the summed wet-value histograms (within a factor 1 + WET_BIN_WIDTH of the exact ones)."""
    if parts.wet_ens is not None:
        out = []
        for values in (parts.wet_ens, parts.wet_obs):
            x = np.concatenate([np.asarray(values[d], np.float64).ravel() for d in days]) if len(days) else np.array([])
            out.append(np.quantile(x, levels) if x.size else np.full(levels.shape, np.nan))
        return out[0], out[1]
    hist = parts.comps["tail_q99_ratio"][days].sum(axis=0).astype(np.float64)
    nb = hist.size // 2
    ens_q, obs_q = (np.array([hist_quantile(hist[sl], float(q)) for q in levels]) * parts.wet_threshold
                    for sl in (slice(0, nb), slice(nb, None)))
    return ens_q, obs_q


def scores_of(parts: DayParts, days=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The scores and curves of :func:`score` on ``days`` (indices; None: all) from :func:`day_parts`."""
    n_all = parts.ranks.shape[0]
    days = np.arange(n_all) if days is None else np.asarray(days, dtype=int)
    total = lambda a: np.asarray(a)[days].sum(axis=0)  # noqa: E731
    fin = lambda name: float(finish(name, total(parts.comps[name])))  # noqa: E731
    lo, hi = parts.names
    out: dict[str, float] = {"n_members": float(parts.n_members), "n_days": float(days.size)}
    out["mae_all"] = fin("mae_all")
    for p in parts.names:
        out[f"mae_tail_{p}"] = fin(f"mae_tail_{p}")
        sq, cnt = total(parts.sums[f"rmse_ext_{p}"])
        out[f"rmse_ext_{p}"] = float(np.sqrt(sq / cnt)) if cnt > 0 else float("nan")
    out["corr"] = metrics.pearson_of_parts(parts.sums["corr"][days])
    for p in parts.names:
        out[f"freq_bias_{p}"] = fin(f"freq_bias_{p}")
    out["crps"] = fin("crps")
    for p in parts.names:
        out[f"twcrps_{p}"] = fin(f"twcrps_{p}")
    for p in parts.names:
        for w in parts.windows:
            out[f"fss_{p}_w{w}"] = fin(f"fss_{p}_w{w}")
        ext, valid = total(parts.sums[f"fss_useful_{p}"])
        out[f"fss_useful_{p}"] = float(0.5 + ext / valid / 2.0) if valid > 0 else float("nan")
    for name in (f"pod_{hi}", f"far_{hi}", f"csi_{hi}"):
        out[name] = fin(name)
    out["spread_skill"] = fin("spread_skill") if parts.n_members > 1 else float("nan")
    out["crps_field"] = fin("crps_field")
    out["spread_skill_field"] = fin("spread_skill_field") if parts.n_members > 1 else float("nan")
    counts = total(parts.ranks)
    out["rank_flatness"] = metrics.rank_histogram_flatness(counts)
    levels = np.unique(np.r_[TAIL_QUANTILES, QQ_LEVELS])
    all_ens, all_obs = _pooled_quantiles(parts, days, levels)
    pick = lambda a, qs: a[np.searchsorted(levels, qs)]  # noqa: E731
    for q, qe, qo in zip(TAIL_QUANTILES, pick(all_ens, TAIL_QUANTILES), pick(all_obs, TAIL_QUANTILES)):
        out[f"tail_q{100 * q:g}_ens"] = float(qe)
        out[f"tail_q{100 * q:g}_obs"] = float(qo)
    out["mass_error_mae"] = fin("mass_error_mae")
    out["mass_error_bias"] = fin("mass_error_bias")
    if "mass_error_coarse" in parts.sums:
        a, b, c = total(parts.sums["mass_error_coarse"])
        out["mass_error_coarse_mae"] = float(a / c) if c > 0 else float("nan")
        out["mass_error_coarse_bias"] = float(b / c) if c > 0 else float("nan")
    p_ens = parts.rapsd_ens[days].mean(axis=0) if days.size else np.full(parts.k.shape, np.nan)
    p_obs = parts.rapsd_obs[days].mean(axis=0) if days.size else np.full(parts.k.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log10(p_ens / p_obs)
    out["rapsd_log_ratio"] = float(np.nanmean(ratio[np.isfinite(ratio)])) if np.isfinite(ratio).any() else float("nan")
    out.update(metrics.rapsd_band_log_ratios(parts.k, p_ens, p_obs))
    curves = {
        "rank_counts": counts,
        "rapsd_k": parts.k, "rapsd_ens": p_ens, "rapsd_obs": p_obs,
        "qq_levels": np.asarray(QQ_LEVELS),
        "qq_ens": pick(all_ens, QQ_LEVELS),
        "qq_obs": pick(all_obs, QQ_LEVELS),
    }
    return out, curves


def score(ens, obs, thresholds: Mapping[str, np.ndarray], windows: Sequence[int] = (1, 3, 9, 27),
          wet_threshold: float = 1.0, coarse_ref=None, rng: int | np.random.Generator = 0,
          chunk_days: int | None = None, exact_quantiles: bool | None = None
          ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every score of one ensemble against the truth, and the curves the figures need.

    Built from the metric functions of :mod:`precip_cvae.metrics`, one chunk of days at a time
    (:func:`day_parts`, then :func:`scores_of`): each score is finished from per-day sums, so memory
    holds one chunk of the ensemble, whatever the number of days and members.

    Parameters
    ----------
    ens : array (M, N, h, w), mm day-1 (member axis first); numpy, dask or zarr
    obs : array (N, h, w), mm day-1; NaN = excluded pixel
    thresholds : {'p95': (h, w), 'p99': (h, w)}, mm day-1 -- the (moderate, extreme) pair; or
        per-day maps (N, h, w) (the pooled days of ``kfold_years``, each with its fold's thresholds)
    windows : FSS neighbourhood sides in pixels
    wet_threshold : mm day-1, for the tail quantiles
    coarse_ref : ndarray (N, h, w), a function ``(start, stop) -> (c, h, w)``, or None
        The coarse precipitation condition on the fine grid (mm day-1): adds
        ``mass_error_coarse_mae`` / ``_bias``.
    rng : rank-histogram tie breaking
    chunk_days : days per chunk (default: :func:`chunk_days_for`, about 64 MB of float64 members)
    exact_quantiles : exact pooled quantiles (default: when the wet values fit in
        :data:`EXACT_QUANTILE_BYTES`; else from histograms, within 0.213 %)

    Returns
    -------
    scores : dict[str, float]
        ``n_members``, ``n_days``; of the ensemble mean: ``mae_all``, ``mae_tail_<p>``,
        ``rmse_ext_<p>``, ``corr``; ``freq_bias_<p>`` (member-mean counts / observed);
        ``crps``, ``twcrps_<p>`` (fair, mean over valid points); ``fss_<p>_w<w>`` (exceedance
        probability of the members), ``fss_useful_<p>``; ``pod_<hi>``, ``far_<hi>``, ``csi_<hi>``
        (member-pooled table at the upper threshold); ``spread_skill``; ``crps_field`` and
        ``spread_skill_field`` (of the domain mean over the valid points); ``rank_flatness``;
        ``tail_q99_ens`` / ``_obs``, ``tail_q99.9_ens`` / ``_obs`` (wet values, mm day-1);
        ``mass_error_mae`` / ``_bias``, ``mass_error_coarse_mae`` / ``_bias`` (with
        ``coarse_ref``); ``rapsd_log_ratio`` and ``rapsd_log_ratio_<band>``.  ``<p>`` runs over
        the keys of ``thresholds``.
    curves : dict[str, ndarray]
        ``rank_counts`` (M + 1,), ``rapsd_k``, ``rapsd_ens``, ``rapsd_obs``,
        ``qq_levels``, ``qq_ens``, ``qq_obs`` (mm day-1).
    """
    if len(thresholds) != 2:
        raise ValueError(f"thresholds must hold the (moderate, extreme) pair, got {list(thresholds)}")
    return scores_of(day_parts(ens, obs, thresholds, windows, wet_threshold, coarse_ref, rng, chunk_days,
                               exact_quantiles))


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


def _coarse_reference(truth: xr.Dataset, root: xr.Dataset):
    """The coarse precipitation condition interpolated to the fine cells, as a function of a day range
    (computed chunk by chunk with the scores); None without one."""
    if "coarse_pr" not in truth:
        return None
    on_cells = bool(root.attrs.get("condition_on_cells", 0)) and "cell_lat" in root.coords
    lat, lon = (root["cell_lat"].values, root["cell_lon"].values) if on_cells else (truth["lat"].values,
                                                                                     truth["lon"].values)
    clat, clon, coarse = truth["clat"].values, truth["clon"].values, truth["coarse_pr"]

    def days(start: int, stop: int) -> np.ndarray:
        return BASELINES["interpolation"](BaselineInputs(
            coarse_pr=coarse.isel(time=slice(start, stop)).values, coarse_lat=clat, coarse_lon=clon,
            fine_lat=lat, fine_lon=lon))[0]
    return days


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
    return {name: FoldMaps(np.stack([t[name] for t in thresholds]), fold) for name in thresholds[0]}


def score_cache(ensembles: str, thresholds, cfg: EvaluateConfig) -> Evaluation:
    """Score every source of the cache on every split, for all days and heavy days alone.

    ``thresholds``: one dict of maps, or (pooled ``kfold_years`` cache) one per fold, fold k's
    fitted on fold k's train days only (:func:`day_thresholds`).  Each (split, source) ensemble is
    read lazily and scored in one pass over chunks of days (:func:`day_parts`); the all-days and
    heavy-day scores and the bootstrap's per-day components are finished from the same parts, so
    memory holds one chunk of days of one ensemble (plus the per-day parts), whatever the number
    of days and members.
    """
    root = io.open_zarr_group(ensembles)
    meta = json.loads(root.attrs["evaluate_meta"])
    rows, curves, n_days, components, days = [], {}, {}, {}, {}
    which = headline_interval_metrics(cfg)
    for split in meta["splits"]:
        truth = io.open_zarr_group(ensembles, f"{split}/{TRUTH}")
        obs = truth["pr"].data  # lazy: read chunk by chunk with the members
        heavy = truth["is_event"].values.astype(bool)
        coarse_ref = _coarse_reference(truth, root)
        thr_days = day_thresholds(thresholds, truth)
        subsets = {"all": np.arange(heavy.size), "heavy": np.flatnonzero(heavy)}
        if not heavy.any():
            log.info("%s: no heavy-event day; scores for all days only", split)
            del subsets["heavy"]
        for subset, idx in subsets.items():
            n_days[(split, subset)] = int(idx.size)
        days[split] = (truth["time"].values.astype(str), heavy)
        components[split] = {}
        for source in meta["sources"]:
            t0 = time.perf_counter()
            ens = io.open_zarr_group(ensembles, f"{split}/{source}")["pr"].data  # (member, time, lat, lon), lazy
            parts = day_parts(ens, obs, thr_days, cfg.fss_windows, cfg.wet_threshold, coarse_ref, rng=cfg.seed)
            model, ckpt = model_and_checkpoint(source)
            for subset, idx in subsets.items():
                scores, c = scores_of(parts, idx)
                rows.extend((model, ckpt, split, subset, k, float(val)) for k, val in scores.items())
                curves[(split, subset, source)] = c
            if cfg.bootstrap.samples > 0:  # per-day sums of the headline scores, for the intervals
                components[split][source] = {m: parts.comps[m] for m in which}
            log.info("%s: scored %s in %.1f s (CRPS all days %.3f)", split, source_label(source),
                     time.perf_counter() - t0, next(r[5] for r in reversed(rows) if r[4] == "crps" and r[3] == "all"))
            del parts
    first = thresholds if isinstance(thresholds, Mapping) else thresholds[0]
    return Evaluation(pd.DataFrame(rows, columns=METRIC_COLUMNS), curves, meta, n_days, dict(first), components, days)
