"""The ``evaluate`` stage: ensembles of the cVAE checkpoints and of the baselines, scored.

Two steps, one rule each, joined by a zarr cache of the ensembles, so that scores
and plots are recomputed without sampling again (a change of the percentiles, FSS
windows or plots reruns only the second):

1. :func:`sample_ensembles` (rule ``sample_ensembles``).  On each split of
   ``cfg.splits``, every checkpoint draws ``cfg.members`` fields per day **from the
   prior** p(z|y) (the same noise for every checkpoint: common random numbers), and
   each baseline of ``cfg.baselines`` forecasts the same days (climatology:
   random train days; analogs: the train days nearest in normalised condition
   space; interpolation: the coarse precipitation condition, deterministic, skipped
   with a log line when there is none).  Days stream by batches of
   ``cfg.batch_size`` into ``ensembles.zarr``: of the ensembles, no more than one
   batch (members x batch_size fields) is in memory.
2. :func:`run` (rule ``evaluate``).  Fits the local wet-day tail thresholds
   (``cfg.percentiles``, P95 and P99 by default) on the train split, scores every
   ensemble on all days and on heavy-event days alone, and writes ``metrics.csv``,
   ``metrics.json``, ``headline.csv`` and ``summary.md``; the same rule then draws
   the PNG figures with :func:`precip_cvae.plots.write_figures` (plots imports this
   module, never the reverse, so editing a figure does not resample).

Everything is in mm day-1 on the **original grid** (the padding added by
``preprocess`` is cropped); pixels that are masked or missing in the truth are NaN
in every ensemble and excluded from every score.

Cache layout (``ensembles.zarr``, zarr format 2, consolidated)
--------------------------------------------------------------
* root: ``mask`` (lat, lon); attribute ``evaluate_meta`` (JSON: splits, sources,
  members, checkpoints with path/epoch/config hash, skipped baselines, experiment,
  seed, sampling config);
* ``{split}/truth``: ``pr`` (time, lat, lon), ``is_event`` (time) and, when the
  condition holds precipitation, ``coarse_pr`` (time, clat, clon), mm day-1; the
  ``time`` coordinate holds ISO date strings (so any calendar fits);
* ``{split}/{source}``: ``pr`` (member, time, lat, lon) float32, mm day-1, where
  ``source`` is ``cvae_<checkpoint>`` or a baseline name (interpolation has one
  member).

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

The forecaster's dilemma
------------------------
``mae_tail`` (error where the truth is extreme) rewards forecasting extremes
everywhere.  The headline tail scores are proper or two-sided: twCRPS, FSS,
frequency bias and CSI; ``mae_tail`` is only ever shown beside the frequency
bias (see :func:`headline_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import __version__, io, metrics
from .baselines import BASELINES, BaselineInputs, get_baseline
from .checkpoint import check_matches_data, load_model
from .config import EVALUATE_SAMPLING_KEYS, EVALUATE_SPLITS, EvaluateConfig, EventsConfig
from .data import FieldData, load_fields
from .events import wet_day_thresholds
from .grid import crop_array as crop, crop_to_original
from .resources import limit_threads, select_device
from .transform import TargetTransform

log = logging.getLogger(__name__)

CVAE = "cvae"
TRUTH = "truth"
NO_CHECKPOINT = "-"
METRIC_COLUMNS = ["model", "checkpoint", "split", "subset", "metric", "value"]
SUBSETS = ("all", "heavy")
OVERFORECAST_BIAS = 1.5  # a frequency bias above this voids a low MAE_tail (named in summary.md)
TAIL_QUANTILES = (0.99, 0.999)
QQ_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
OUTPUT_FILES = {
    "metrics_csv": "metrics.csv",
    "metrics_json": "metrics.json",
    "headline": "headline.csv",
    "summary": "summary.md",
    "training_curves": "training_curves.png",
    "maps": "maps.png",
    "tail_qq": "tail_qq.png",
    "rank_histogram": "rank_histogram.png",
    "rapsd": "rapsd.png",
    "fss_scale": "fss_scale.png",
}


# ----------------------------------------------------------------------------- paths and names


@dataclass(frozen=True)
class SamplePaths:
    """Inputs and output of :func:`sample_ensembles`.

    ``checkpoints`` maps a label ('best', 'last', a file stem) to a ``.pt`` path, in
    the order of ``evaluate.checkpoints`` (the first is the one the figures and the
    headline table show).
    """

    dataset: str
    thresholds: str
    events: str
    checkpoints: Mapping[str, str]
    out: str  # ensembles.zarr


@dataclass(frozen=True)
class ScorePaths:
    """Inputs of :func:`run` and the directory its outputs (:data:`OUTPUT_FILES`) go to."""

    ensembles: str
    dataset: str
    train_log: str
    out_dir: str

    def output(self, key: str) -> Path:
        return Path(self.out_dir) / OUTPUT_FILES[key]


def cvae_source(label: str) -> str:
    """Cache group / source name of a checkpoint label: 'best' -> 'cvae_best'."""
    return f"{CVAE}_{label}"


def model_and_checkpoint(source: str) -> tuple[str, str]:
    """('cvae', 'best') for 'cvae_best'; ('analogs', '-') for a baseline."""
    if source.startswith(CVAE + "_"):
        return CVAE, source[len(CVAE) + 1:]
    return source, NO_CHECKPOINT


def source_label(source: str) -> str:
    """Display name: 'cVAE (best)', 'analogs'."""
    model, ckpt = model_and_checkpoint(source)
    return f"cVAE ({ckpt})" if model == CVAE else model


def percentile_names(cfg: EvaluateConfig) -> tuple[str, str]:
    """Metric-name tags of the two percentiles: ('p95', 'p99')."""
    return tuple(f"p{p:g}" for p in cfg.percentiles)  # type: ignore[return-value]


def headline_window(cfg: EvaluateConfig) -> int:
    """The FSS window of the headline table: the middle of ``fss_windows`` (upper middle if even)."""
    windows = sorted(int(w) for w in cfg.fss_windows)
    return windows[len(windows) // 2]


def headline_metrics(cfg: EvaluateConfig) -> list[tuple[str, str, str]]:
    """(metric, label, better) of the headline table, in order; better is 'lower', 'higher' or 'one'.

    The proper tail scores come first; ``mae_tail`` sits right after the frequency
    bias, never alone (forecaster's dilemma).
    """
    hi = percentile_names(cfg)[1]
    w = headline_window(cfg)
    up = hi.upper()
    return [
        ("crps", "CRPS", "lower"),
        (f"twcrps_{hi}", f"twCRPS {up}", "lower"),
        (f"fss_{hi}_w{w}", f"FSS {up} ({w} px)", "higher"),
        (f"freq_bias_{hi}", f"freq. bias {up}", "one"),
        (f"mae_tail_{hi}", f"MAE_tail {up} (improper)", "lower"),
        (f"csi_{hi}", f"CSI {up}", "higher"),
        ("spread_skill", "spread/skill", "one"),
    ]


def check_baselines(names: Sequence[str]) -> tuple[str, ...]:
    """The baseline names, each checked against the registry.

    Raises
    ------
    precip_cvae.config.ConfigError
        For an unknown name; the message lists the valid ones.
    """
    for name in names:
        get_baseline(name)
    return tuple(names)


# ----------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """Coordinates of the original (cropped) fine grid and of the condition grid."""

    lat: np.ndarray  # (h,)
    lon: np.ndarray  # (w,)
    clat: np.ndarray
    clon: np.ndarray
    mask: np.ndarray  # (h, w) bool
    attrs: dict = field(default_factory=dict)  # pad_lat / pad_lon of the padded grid
    coord_attrs: dict = field(default_factory=dict)  # CF attributes of lat, lon (units, standard_name, ...)
    calendar: str = "standard"  # of the time axis (the cache stores dates as ISO strings)
    grid_mapping_attrs: str = ""  # JSON of a projected target grid's CF grid mapping (io.open_variable)


def read_grid(dataset: str) -> Grid:
    """The fine grid of ``dataset.zarr`` without its padding, and the condition grid."""
    ds = io.open_zarr(dataset)
    fine = crop_to_original(ds[["mask"]], ds.attrs)
    return Grid(
        lat=fine["lat"].values, lon=fine["lon"].values,
        clat=ds["clat"].values, clon=ds["clon"].values,
        mask=fine["mask"].values.astype(bool),
        attrs={k: [int(v) for v in np.atleast_1d(ds.attrs.get(k, [0, 0]))] for k in ("pad_lat", "pad_lon")},
        coord_attrs={k: dict(ds[k].attrs) for k in ("lat", "lon")},
        calendar=str(ds.attrs.get("calendar", "standard")),
        grid_mapping_attrs=str(ds["pr"].attrs.get("grid_mapping_attrs", "")),
    )


# ----------------------------------------------------------------------------- step 1: sampling


def _load_checkpoint(path: str, data: FieldData, device) -> tuple[torch.nn.Module, TargetTransform, dict]:
    model, state = load_model(path, device)
    check_matches_data(state, data.channels, tuple(data.x.shape[-2:]), path)
    transform = TargetTransform.from_attrs(state["data"]["transform"])
    if transform != data.transform:
        log.warning("%s was trained with target transform %s, the data set has %s; sampling with the checkpoint's",
                    path, transform, data.transform)
    info = {"path": str(path), "epoch": int(state.get("epoch", -1)), "config_hash": state.get("config_hash", ""),
            "experiment": state.get("experiment", ""), "parameter_count": int(state.get("parameter_count", 0))}
    return model, transform, info


def _fields_dataset(values: np.ndarray, times: np.ndarray, grid: Grid) -> xr.Dataset:
    """(member, time, lat, lon) float32 mm/day as a Dataset for the cache."""
    da = xr.DataArray(values.astype("float32"), dims=("member", "time", "lat", "lon"),
                      coords={"time": times, "lat": grid.lat, "lon": grid.lon},
                      attrs={"units": "mm day-1", "long_name": "precipitation ensemble"})
    return da.to_dataset(name="pr")


def _truth_dataset(split: FieldData, times: np.ndarray, grid: Grid) -> xr.Dataset:
    obs = crop(split.pr_mm[:, 0], grid.attrs)  # (N, h, w) NaN invalid
    ds = xr.Dataset(
        {
            "pr": xr.DataArray(obs.astype("float32"), dims=("time", "lat", "lon"),
                               attrs={"units": "mm day-1", "long_name": "observed precipitation"}),
            "is_event": xr.DataArray(split.is_event.cpu().numpy().astype("int8"), dims="time",
                                     attrs={"long_name": "heavy-event day (detect_events)"}),
        },
        coords={"time": times, "lat": grid.lat, "lon": grid.lon},
    )
    if split.coarse_mm is not None:
        ds["coarse_pr"] = xr.DataArray(split.coarse_mm.cpu().numpy().astype("float32"), dims=("time", "clat", "clon"),
                                       coords={"clat": grid.clat, "clon": grid.clon},
                                       attrs={"units": "mm day-1", "long_name": "coarse precipitation condition"})
    return ds


@torch.no_grad()
def sample_cvae(model, transform: TargetTransform, y: torch.Tensor, valid: torch.Tensor, members: int,
                generator: torch.Generator, device) -> np.ndarray:
    """Prior samples of one batch in mm/day.

    Parameters
    ----------
    model : CVAE in eval mode
    transform : the checkpoint's target transform
    y : Tensor (B, C, h, w), normalised condition
    valid : Tensor (B, 1, H, W) bool
    members : M
    generator : CPU torch.Generator (the noise; same state -> same fields)

    Returns
    -------
    ndarray (M, B, H, W), float32, mm day-1, NaN where not valid (padded grid).
    """
    s = model.sample(y.to(device), valid.to(device), n_samples=members, generator=generator)  # (M, B, 1, H, W)
    pr = transform.inverse(s[:, :, 0].float()).cpu()  # (M, B, H, W)
    pr = torch.where(valid[None, :, 0].cpu(), pr, torch.full_like(pr, float("nan")))
    return pr.numpy()


def _seed(cfg: EvaluateConfig, split: str, salt: int) -> int:
    return int(cfg.seed) * 1_000_003 + 7919 * ("val", "test", "train").index(split) + salt


def _batches(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _write_cvae(store, split: str, ev: FieldData, times: np.ndarray, label: str, loaded, cfg: EvaluateConfig,
                grid: Grid, device) -> None:
    """Prior samples of one checkpoint on one split, appended batch by batch to ``{split}/cvae_<label>``."""
    model, transform, _ = loaded
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(_seed(cfg, split, 0))  # the same noise for every checkpoint
    for idx in _batches(len(ev), cfg.batch_size):
        ens = sample_cvae(model, transform, ev.y[idx], ev.valid[idx], cfg.members, g, device)  # (M, B, H, W)
        io.append_zarr(_fields_dataset(crop(ens, grid.attrs), times[idx], grid), store, f"{split}/{cvae_source(label)}")
    seconds = time.perf_counter() - t0
    log.info("%s: sampled cVAE %s, %d days x %d members in %.1f s (%.0f fields/s)", split, label, len(ev),
             cfg.members, seconds, len(ev) * cfg.members / max(seconds, 1e-9))


def _write_baseline(store, split: str, ev: FieldData, times: np.ndarray, name: str, train: dict, cfg: EvaluateConfig,
                    grid: Grid, rng: np.random.Generator) -> None:
    """One baseline on one split, appended batch by batch to ``{split}/<name>`` (masked like the truth)."""
    t0 = time.perf_counter()
    obs = crop(ev.pr_mm[:, 0], grid.attrs)  # (N, h, w), NaN invalid
    for idx in _batches(len(ev), cfg.batch_size):
        n = idx.stop - idx.start
        inputs = BaselineInputs(
            train_pr=train["pr"], n_members=cfg.members, n_days=n, rng=rng,
            train_cond=train["cond"], target_cond=ev.y[idx].reshape(n, -1).numpy(),
            coarse_pr=None if ev.coarse_mm is None else ev.coarse_mm[idx].numpy(),
            coarse_lat=grid.clat, coarse_lon=grid.clon, fine_lat=grid.lat, fine_lon=grid.lon,
        )
        ens = get_baseline(name)(inputs)  # (M, B, h, w) mm/day
        # masked like the truth; the interpolation's round-off (-1e-16) clipped to 0
        ens = np.where(np.isfinite(obs[idx])[None], np.maximum(ens, 0.0), np.nan)
        io.append_zarr(_fields_dataset(ens, times[idx], grid), store, f"{split}/{name}")
    log.info("%s: baseline %s in %.1f s", split, name, time.perf_counter() - t0)


def sample_ensembles(paths: SamplePaths, cfg: EvaluateConfig, threads: int = 1, experiment: str = "default") -> Path:
    """Step 1: sample the checkpoints and build the baselines on ``cfg.splits``; write the cache.

    Reads the sampling keys of ``cfg`` only (``config.EVALUATE_SAMPLING_KEYS``).  Memory:
    the data set's fields plus one batch of ``members x batch_size`` fields.

    Parameters
    ----------
    paths : SamplePaths
    cfg : EvaluateConfig
    threads : the rule's threads, for dask, torch and BLAS (:func:`precip_cvae.resources.limit_threads`)
    experiment : name recorded in the cache

    Returns
    -------
    Path of ``ensembles.zarr`` (written atomically; layout in the module docstring).

    Raises
    ------
    precip_cvae.config.ConfigError
        An unknown baseline name (the message lists the valid ones).
    precip_cvae.checkpoint.CheckpointError
        A checkpoint that is unreadable or trained on other channels or another grid.
    """
    baselines = check_baselines(cfg.baselines)
    with limit_threads(max(1, int(threads))):
        return _sample_ensembles(paths, cfg, baselines, select_device(cfg.device, "evaluate.device"), experiment)


def _sample_ensembles(paths: SamplePaths, cfg: EvaluateConfig, baselines: tuple[str, ...], device,
                      experiment: str) -> Path:
    data = load_fields(paths.dataset, paths.thresholds, paths.events, splits=("train", *cfg.splits))
    grid = read_grid(paths.dataset)
    train_days = data.select("train")
    skipped = {}
    if "interpolation" in baselines and data.coarse_mm is None:
        log.info("baseline 'interpolation' skipped: the condition has no precipitation channel "
                 "(set a predictor's precipitation: true or preprocess.target_coarse_factor)")
        skipped["interpolation"] = "no coarse precipitation in the condition"
        baselines = tuple(b for b in baselines if b != "interpolation")
    if "analogs" in baselines and cfg.members > len(train_days):
        raise ValueError(f"evaluate.members = {cfg.members} exceeds the {len(train_days)} train days of the analogs")
    train = {
        "pr": np.nan_to_num(crop(train_days.pr_mm[:, 0], grid.attrs), nan=0.0),  # (T, h, w) mm/day
        "cond": train_days.y.reshape(len(train_days), -1).numpy(),  # (T, F) normalised
    }
    models = {label: _load_checkpoint(path, data, device) for label, path in paths.checkpoints.items()}
    for label, (_, _, info) in models.items():
        log.info("checkpoint %s: %s (epoch %d)", label, info["path"], info["epoch"] + 1)
    sources = [cvae_source(label) for label in models] + list(baselines)
    meta = {
        "experiment": experiment, "splits": list(cfg.splits), "sources": sources, "members": cfg.members,
        "primary": sources[0], "seed": cfg.seed, "skipped_baselines": skipped,
        "checkpoints": {label: m[2] for label, m in models.items()},
        "sampling_config": {k: v for k, v in asdict(cfg).items() if k in EVALUATE_SAMPLING_KEYS},
        "package_version": __version__, "units": "mm day-1", "calendar": grid.calendar,
    }
    root = xr.Dataset({"mask": (("lat", "lon"), grid.mask.astype("int8"), {
                          "long_name": "cell has data (1) or is masked (0)", "flag_values": np.array([0, 1], "int8"),
                          "flag_meanings": "masked valid"})},
                      coords={k: (k, getattr(grid, k), grid.coord_attrs.get(k, {})) for k in ("lat", "lon")},
                      attrs={"title": "precip-cvae evaluated ensembles", "evaluate_meta": json.dumps(meta),
                             "grid_mapping_attrs": grid.grid_mapping_attrs})
    with io.atomic_path(paths.out) as store:
        io.write_zarr_group(root, store)
        for split in cfg.splits:
            ev = data.select(split)
            times = np.asarray(ev.dates, dtype=str)  # ISO strings: any calendar
            io.write_zarr_group(_truth_dataset(ev, times, grid).chunk({"time": cfg.batch_size}), store,
                                f"{split}/{TRUTH}")
            for label, loaded in models.items():
                _write_cvae(store, split, ev, times, label, loaded, cfg, grid, device)
            for k, name in enumerate(baselines):
                rng = np.random.default_rng(_seed(cfg, split, 1 + k))
                _write_baseline(store, split, ev, times, name, train, cfg, grid, rng)
        io.consolidate_zarr(store)
    log.info("wrote %s: splits %s, sources %s", paths.out, list(cfg.splits), sources)
    return Path(paths.out)


# ----------------------------------------------------------------------------- step 2: scores


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


def _mean_over_valid(per_point_fn, ens: np.ndarray, obs: np.ndarray, chunk_days: int) -> float:
    """Mean of a per-point score over valid points, computed ``chunk_days`` days at a time (memory)."""
    total, count = 0.0, 0
    for s in range(0, obs.shape[0], chunk_days):
        o = obs[s:s + chunk_days]
        v = np.isfinite(o)
        with np.errstate(invalid="ignore"):  # NaN at excluded pixels (truth, thresholds) is expected
            total += float(np.sum(per_point_fn(ens[:, s:s + chunk_days], o)[v]))
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
    thresholds : {'p95': (h, w), 'p99': (h, w)}, mm day-1 -- the (moderate, extreme) pair
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
        out[f"twcrps_{name}"] = _mean_over_valid(lambda e, o, t=thr: metrics.twcrps_ensemble(e, o, t), ens, obs,
                                                 chunk_days)
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

    def value(self, source: str, metric: str, split: str, subset: str = "all") -> float:
        model, ckpt = model_and_checkpoint(source)
        t = self.table
        hit = t[(t.model == model) & (t.checkpoint == ckpt) & (t.split == split) & (t.subset == subset)
                & (t.metric == metric)]
        return float(hit["value"].iloc[0]) if len(hit) else float("nan")


def _coarse_reference(truth: xr.Dataset) -> np.ndarray | None:
    if "coarse_pr" not in truth:
        return None
    return BASELINES["interpolation"](BaselineInputs(
        coarse_pr=truth["coarse_pr"].values, coarse_lat=truth["clat"].values, coarse_lon=truth["clon"].values,
        fine_lat=truth["lat"].values, fine_lon=truth["lon"].values))[0]


def score_cache(ensembles: str, thresholds: Mapping[str, np.ndarray], cfg: EvaluateConfig) -> Evaluation:
    """Score every source of the cache on every split, for all days and heavy days alone.

    Reads one (split, source) ensemble into memory at a time: M x N x h x w x 8 bytes.
    """
    meta = json.loads(io.open_zarr_group(ensembles).attrs["evaluate_meta"])
    rows, curves, n_days = [], {}, {}
    for split in meta["splits"]:
        truth = io.open_zarr_group(ensembles, f"{split}/{TRUTH}").load()
        obs = truth["pr"].values.astype("float64")
        heavy = truth["is_event"].values.astype(bool)
        coarse_ref = _coarse_reference(truth)
        subsets = {"all": np.arange(len(obs)), "heavy": np.flatnonzero(heavy)}
        if not heavy.any():
            log.info("%s: no heavy-event day; scores for all days only", split)
            del subsets["heavy"]
        for subset, idx in subsets.items():
            n_days[(split, subset)] = int(idx.size)
        for source in meta["sources"]:
            t0 = time.perf_counter()
            ens = io.open_zarr_group(ensembles, f"{split}/{source}")["pr"].values.astype("float64")
            model, ckpt = model_and_checkpoint(source)
            for subset, idx in subsets.items():
                scores, c = score(ens[:, idx], obs[idx], thresholds, cfg.fss_windows, cfg.wet_threshold,
                                  None if coarse_ref is None else coarse_ref[idx], rng=cfg.seed)
                rows.extend((model, ckpt, split, subset, k, float(val)) for k, val in scores.items())
                curves[(split, subset, source)] = c
            log.info("%s: scored %s in %.1f s (CRPS all days %.3f)", split, source_label(source),
                     time.perf_counter() - t0, next(r[5] for r in reversed(rows) if r[4] == "crps" and r[3] == "all"))
            del ens
    return Evaluation(pd.DataFrame(rows, columns=METRIC_COLUMNS), curves, meta, n_days, dict(thresholds))


def headline_split(meta: Mapping) -> str:
    """'test' when evaluated, else the last evaluated split."""
    return "test" if "test" in meta["splits"] else meta["splits"][-1]


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


def heaviest_days(obs: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` days with the largest domain-mean precipitation, heaviest first.

    Parameters
    ----------
    obs : ndarray (N, h, w), mm day-1, NaN ignored
    """
    flat = np.asarray(obs, dtype=np.float64).reshape(len(obs), -1)
    valid = np.isfinite(flat)
    count = valid.sum(axis=1)
    means = np.where(count > 0, np.where(valid, flat, 0.0).sum(axis=1) / np.maximum(count, 1), -np.inf)
    return np.argsort(-means, kind="stable")[: min(n, len(obs))]


def run(paths: ScorePaths, cfg: EvaluateConfig, experiment: str = "default") -> Evaluation:
    """Step 2: score the cached ensembles; write metrics.csv/json, headline.csv and summary.md.

    The figures are :func:`precip_cvae.plots.write_figures` of the returned
    :class:`Evaluation` (kept out of this module, so that editing a figure does not
    change the code fingerprint of the sampling rule).

    Reads the scoring keys of ``cfg`` only (not ``config.EVALUATE_SAMPLING_KEYS``: what
    was sampled is described by the cache itself).

    Parameters
    ----------
    paths : ScorePaths (cache, dataset for the train thresholds, train_log.csv, out_dir)
    cfg : EvaluateConfig
    experiment : checked against the cache's experiment (a mismatch is logged)
    """
    t0 = time.perf_counter()
    thresholds = tail_thresholds(paths.dataset, cfg)
    for name, thr in thresholds.items():
        log.info("threshold %s: median %.2f mm/day over the valid pixels", name, float(np.nanmedian(thr)))
    ev = score_cache(paths.ensembles, thresholds, cfg)
    if ev.meta.get("experiment") != experiment:
        log.warning("the cache %s was sampled for experiment %r, scoring it as %r", paths.ensembles,
                    ev.meta.get("experiment"), experiment)
    io.write_csv(ev.table, paths.output("metrics_csv"))
    io.write_json(metrics_json(ev, cfg), paths.output("metrics_json"))
    headline = headline_table(ev, cfg)
    io.write_csv(headline, paths.output("headline"))
    io.write_text(summary_markdown(ev, headline, cfg), paths.output("summary"))
    for line in verdicts(headline, cfg, "all"):
        log.info("headline (%s, all days) %s", headline_split(ev.meta), line[2:])
    log.info("evaluation written to %s in %.1f s", paths.out_dir, time.perf_counter() - t0)
    return ev


# ----------------------------------------------------------------------------- run level


def comparison_table(metrics_tables: Mapping[str, pd.DataFrame], cfg: EvaluateConfig,
                     split: str | None = None) -> pd.DataFrame:
    """Headline scores of every experiment's checkpoints beside the baselines (one row each).

    Parameters
    ----------
    metrics_tables : experiment -> its metrics.csv table (METRIC_COLUMNS)
    cfg : EvaluateConfig (headline metric names)
    split : the split scored; default the headline split ('test' when present)

    Returns
    -------
    DataFrame: experiment, model, checkpoint, split, then ``<metric>@<subset>`` columns.
    Baselines come once, from the first experiment (their ensembles do not depend on
    the experiment).
    """
    keys = [k for k, *_ in headline_metrics(cfg)]
    if split is None:  # the headline split of the first experiment, for all
        splits = list(dict.fromkeys(next(iter(metrics_tables.values()))["split"]))
        split = "test" if "test" in splits else splits[-1]
    rows = []
    for i, (experiment, table) in enumerate(metrics_tables.items()):
        t = table[(table["split"] == split) & table["metric"].isin(keys)]
        for (model, ckpt), part in t.groupby(["model", "checkpoint"], sort=False):
            if model != CVAE and i > 0:
                continue
            row = {"experiment": experiment if model == CVAE else NO_CHECKPOINT, "model": model,
                   "checkpoint": ckpt, "split": split}
            for r in part.itertuples(index=False):
                row[f"{r.metric}@{r.subset}"] = r.value
            rows.append(row)
    out = pd.DataFrame(rows)
    cols = ["experiment", "model", "checkpoint", "split"] + [f"{k}@{s}" for s in SUBSETS for k in keys
                                                           if f"{k}@{s}" in out.columns]
    order = out["model"].ne(CVAE).astype(int)  # the experiments first, then the baselines
    return out.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")[cols].reset_index(drop=True)


def compare_experiments(metrics_csvs: Mapping[str, str], cfg: EvaluateConfig, out_csv: str,
                        settings: Mapping[str, Sequence] | None = None, seeds_csv: str | None = None) -> pd.DataFrame:
    """Run-level ``experiments_comparison.csv`` (headline split) from every experiment's metrics.csv
    (figure: :func:`precip_cvae.plots.comparison`), and with ``seeds_csv`` the mean and spread
    over seeds of each setting on every evaluated split (:func:`seed_summary`; val is the split
    to choose a setting on)."""
    tables = {name: io.read_csv(path, dtype={"checkpoint": str}) for name, path in metrics_csvs.items()}
    table = comparison_table(tables, cfg)
    io.write_csv(table, out_csv)
    log.info("compared %d experiment(s) and %d baseline(s): %s", len(tables),
             int((table["model"] != CVAE).sum()), out_csv)
    if seeds_csv is not None:
        splits = [s for s in EVALUATE_SPLITS if any((t["split"] == s).any() for t in tables.values())]
        per_split = pd.concat([comparison_table(tables, cfg, split=s) for s in splits], ignore_index=True)
        settings = settings or {name: [name, None] for name in tables}
        seed_summary(per_split, settings, out_csv=seeds_csv)
    return table


def seed_summary(table: pd.DataFrame, settings: Mapping[str, Sequence], out_csv: str | None = None) -> pd.DataFrame:
    """Mean and spread over seeds of every headline score, per setting (``experiments_seeds.csv``).

    Parameters
    ----------
    table : the :func:`comparison_table` (one row per experiment checkpoint and baseline)
    settings : experiment -> (setting, seed); seed None when the run has no ``experiment_seeds``
        (every experiment is then its own setting, with one seed)
    out_csv : written when given

    Returns
    -------
    DataFrame in long form: split, setting, model, checkpoint, metric (``<name>@<subset>``),
    n_seeds, mean, std (ddof 1; NaN for one seed), min, max, seeds (the seeds, ``;``-joined).
    The baselines do not depend on the seed and come once per split, with n_seeds 1.
    """
    metric_cols = [c for c in table.columns if "@" in c]
    rows = []
    frame = table.copy()
    frame["setting"] = [settings[e][0] if m == CVAE else e for e, m in zip(frame["experiment"], frame["model"])]
    frame["seed"] = [settings[e][1] if m == CVAE else None for e, m in zip(frame["experiment"], frame["model"])]
    for (split, setting, model, ckpt), part in frame.groupby(["split", "setting", "model", "checkpoint"], sort=False):
        seeds = ";".join(str(int(s)) for s in part["seed"] if s is not None and s == s)
        for col in metric_cols:
            v = part[col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({"split": split, "setting": setting, "model": model, "checkpoint": ckpt, "metric": col,
                         "n_seeds": int(v.size),
                         "mean": float(v.mean()) if v.size else np.nan,
                         "std": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                         "min": float(v.min()) if v.size else np.nan,
                         "max": float(v.max()) if v.size else np.nan,
                         "seeds": seeds})
    out = pd.DataFrame(rows, columns=["split", "setting", "model", "checkpoint", "metric", "n_seeds", "mean", "std",
                                      "min", "max", "seeds"])
    if out_csv is not None:
        io.write_csv(out, out_csv)
        log.info("scores over seeds of %d setting(s): %s", out["setting"].nunique(), out_csv)
    return out
