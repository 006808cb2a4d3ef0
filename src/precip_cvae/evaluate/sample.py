"""Rule ``sample_ensembles``: ensembles of the checkpoints and the baselines, cached.

On each split of ``cfg.splits``, every checkpoint draws ``cfg.members`` fields per
day **from the prior** p(z|y) (the same noise for every checkpoint: common random
numbers), and each baseline of ``cfg.baselines`` forecasts the same days
(climatology: random train days; analogs: the train days nearest in normalised
condition space; interpolation: the coarse precipitation condition, deterministic,
skipped with a log line when there is none).  Days stream by batches of
``cfg.batch_size`` into ``ensembles.zarr``: of the ensembles, no more than one batch
(members x batch_size fields) is in memory.

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
  member), and with ``calibrate: quantile_map`` ``cvae_<first checkpoint>_qm``: the
  same members mapped pixel by pixel to the observed distribution
  (:mod:`precip_cvae.calibration`), the map fitted on the train days' members
  (drawn with their own noise) and observations, never on a day it is applied to.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from .. import __version__, io
from ..baselines import BaselineInputs, get_baseline
from ..calibration import QuantileMap, QuantileMapFit
from ..checkpoint import check_matches_data, load_model
from ..config import EVALUATE_SAMPLING_KEYS, EvaluateConfig
from ..data import DayFields, FieldData, ZarrFields, block_days_for, day_blocks, held_or_streamed, open_fields
from ..grid import CELL_COORDS, crop_array as crop, crop_to_original, fine_positions
from ..resources import limit_threads, select_device
from ..transform import TargetTransform
from .names import TRUTH, cvae_source

log = logging.getLogger(__name__)


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
    cells: dict = field(default_factory=dict)  # cell_lat/cell_lon: ((h, w) values, attrs), curvilinear grids only
    condition_attrs: dict = field(default_factory=dict)  # CF attributes of the condition grid's clat

    def fine_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """The fine cells in the condition grid's coordinates (:func:`precip_cvae.grid.fine_positions`)."""
        return fine_positions(self.lat, self.lon, {k: v for k, (v, _) in self.cells.items()}, self.condition_attrs)


def read_grid(dataset: str) -> Grid:
    """The fine grid of ``dataset.zarr`` without its padding, and the condition grid."""
    ds = io.open_zarr(dataset)
    fine = crop_to_original(ds[["mask"]], ds.attrs)
    cells = {name: (fine[name].values, dict(fine[name].attrs)) for name in CELL_COORDS if name in fine.coords}
    return Grid(
        lat=fine["lat"].values, lon=fine["lon"].values,
        clat=ds["clat"].values, clon=ds["clon"].values,
        mask=fine["mask"].values.astype(bool),
        attrs={k: [int(v) for v in np.atleast_1d(ds.attrs.get(k, [0, 0]))] for k in ("pad_lat", "pad_lon")},
        coord_attrs={k: dict(ds[k].attrs) for k in ("lat", "lon")},
        calendar=str(ds.attrs.get("calendar", "standard")),
        grid_mapping_attrs=str(ds["pr"].attrs.get("grid_mapping_attrs", "")),
        cells=cells, condition_attrs=dict(ds["clat"].attrs),
    )


def _load_checkpoint(path: str, data: FieldData | ZarrFields, device) -> tuple[torch.nn.Module, TargetTransform, dict]:
    model, state = load_model(path, device)
    check_matches_data(state, data.channels, tuple(data.fine_shape), path)
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
                generator: torch.Generator, device, memory_gb: float | None = None) -> np.ndarray:
    """Prior samples of one batch in mm/day.

    Parameters
    ----------
    model : CVAE in eval mode
    transform : the checkpoint's target transform
    y : Tensor (B, C, h, w), normalised condition
    valid : Tensor (B, 1, H, W) bool
    members : M
    generator : CPU torch.Generator (the noise; same state -> same fields)
    memory_gb : a local model samples a field whose activations exceed this by tiles (the same fields)

    Returns
    -------
    ndarray (M, B, H, W), float32, mm day-1, NaN where not valid (padded grid).
    """
    tile = None if memory_gb is None else model.tile_for(y.shape[0], memory_gb * 1e9)
    s = model.sample(y.to(device), valid.to(device), n_samples=members, generator=generator,
                     tile=tile)  # (M, B, 1, H, W)
    pr = transform.inverse(s[:, :, 0].float()).cpu()  # (M, B, H, W)
    pr = torch.where(valid[None, :, 0].cpu(), pr, torch.full_like(pr, float("nan")))
    return pr.numpy()


def _seed(cfg: EvaluateConfig, split: str, salt: int) -> int:
    return int(cfg.seed) * 1_000_003 + 7919 * ("val", "test", "train").index(split) + salt


def _has_coarse(data: FieldData | ZarrFields) -> bool:
    return data.has_coarse if isinstance(data, ZarrFields) else data.coarse_mm is not None


def _batches(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def fit_calibration(fit: FieldData | ZarrFields, loaded, cfg: EvaluateConfig, grid: Grid, device) -> QuantileMap:
    """The quantile map of one checkpoint, fitted on the days of ``fit`` (members drawn with that split's noise),
    read a block of days at a time: exact while the members fit, else streamed (:class:`QuantileMapFit`)."""
    model, transform, _ = loaded
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(_seed(cfg, "train", 0))
    acc = None
    for _, block in day_blocks(fit, block_days_for(fit, cfg.batch_size)):  # whole batches: the same draws
        obs = crop(block.pr_mm[:, 0].numpy(), grid.attrs)  # (B, h, w)
        for idx in _batches(len(block), cfg.batch_size):
            ens = crop(sample_cvae(model, transform, block.y[idx], block.valid[idx], cfg.members, g, device,
                                   cfg.inference_memory_gb), grid.attrs)  # (M, b, h, w)
            if acc is None:
                acc = QuantileMapFit(cfg.members, len(fit), obs.shape[1:])
            acc.add(ens, obs[idx])
    qmap = acc.finish()
    log.info("quantile map fitted on %d train days x %d members (%s) in %.1f s", len(fit), cfg.members,
             "exact" if acc.exact else "streamed, per-pixel histograms", time.perf_counter() - t0)
    return qmap


def calibrated_label(label: str) -> str:
    """The checkpoint label of a calibrated source: 'best' -> 'best_qm'."""
    return f"{label}_qm"


class _SplitWriter:
    """Writes one split of the cache batch by batch: the truth, each checkpoint's members (and the calibrated
    ones), each baseline.  Every source keeps its own noise across batches (a generator per checkpoint seeded
    alike: common random numbers; one per baseline), so the cache does not depend on how the days are read."""

    def __init__(self, store, split: str, models: dict, baselines: tuple, train: dict, cfg: EvaluateConfig,
                 grid: Grid, device, qmap: QuantileMap | None):
        self.store, self.split, self.models, self.baselines = store, split, models, baselines
        self.train, self.cfg, self.grid, self.device, self.qmap = train, cfg, grid, device, qmap
        self.gens = {label: torch.Generator(device="cpu").manual_seed(_seed(cfg, split, 0)) for label in models}
        self.rngs = {name: np.random.default_rng(_seed(cfg, split, 1 + k)) for k, name in enumerate(baselines)}
        self.seconds = dict.fromkeys([*models, *baselines], 0.0)
        self.days = 0
        self.fine = grid.fine_positions()

    def write(self, ev: FieldData, times: np.ndarray) -> None:
        """Days ``ev`` (at most one batch), dated ``times``, appended to every group of the split."""
        cfg, grid, split = self.cfg, self.grid, self.split
        io.append_zarr(_truth_dataset(ev, times, grid), self.store, f"{split}/{TRUTH}")
        for k, (label, (model, transform, _)) in enumerate(self.models.items()):
            t0 = time.perf_counter()
            ens = crop(sample_cvae(model, transform, ev.y, ev.valid, cfg.members, self.gens[label], self.device,
                                   cfg.inference_memory_gb), grid.attrs)
            io.append_zarr(_fields_dataset(ens, times, grid), self.store, f"{split}/{cvae_source(label)}")
            if k == 0 and self.qmap is not None:
                io.append_zarr(_fields_dataset(self.qmap.apply(ens), times, grid), self.store,
                               f"{split}/{cvae_source(calibrated_label(label))}")
            self.seconds[label] += time.perf_counter() - t0
        obs = crop(ev.pr_mm[:, 0], grid.attrs)  # (B, h, w), NaN invalid
        for name in self.baselines:
            t0 = time.perf_counter()
            n = len(ev)
            inputs = BaselineInputs(
                train_pr=self.train["pr"], n_members=cfg.members, n_days=n, rng=self.rngs[name],
                train_cond=self.train["cond"], target_cond=ev.y.reshape(n, -1).numpy(),
                coarse_pr=None if ev.coarse_mm is None else ev.coarse_mm.numpy(),
                coarse_lat=grid.clat, coarse_lon=grid.clon, fine_lat=self.fine[0], fine_lon=self.fine[1],
            )
            ens = get_baseline(name)(inputs)  # (M, B, h, w) mm/day
            # masked like the truth; the interpolation's round-off (-1e-16) clipped to 0
            ens = np.where(np.isfinite(obs)[None], np.maximum(ens, 0.0), np.nan)
            io.append_zarr(_fields_dataset(ens, times, grid), self.store, f"{split}/{name}")
            self.seconds[name] += time.perf_counter() - t0
        self.days += len(ev)

    def report(self) -> None:
        for label in self.models:
            seconds = self.seconds[label]
            log.info("%s: sampled cVAE %s, %d days x %d members in %.1f s (%.0f fields/s)", self.split, label,
                     self.days, self.cfg.members, seconds, self.days * self.cfg.members / max(seconds, 1e-9))
        for name in self.baselines:
            log.info("%s: baseline %s in %.1f s", self.split, name, self.seconds[name])


#: Fields of the data set (train and the sampled splits, bytes as tensors) held in memory; larger ones are read
#: from the store a block of days at a time, and the train fields of the baselines day by day as they are taken.
SAMPLE_MEMORY_BYTES = 2 * 2**30


def sample_ensembles(paths: SamplePaths, cfg: EvaluateConfig, threads: int = 1, experiment: str = "default") -> Path:
    """Step 1: sample the checkpoints and build the baselines on ``cfg.splits``; write the cache.

    Reads the sampling keys of ``cfg`` only (``config.EVALUATE_SAMPLING_KEYS``).  Memory: the data set's
    fields when they fit :data:`SAMPLE_MEMORY_BYTES`, else one block of days (about a time chunk) and the
    train condition, plus one batch of ``members x batch_size`` fields.

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
    data = held_or_streamed(open_fields(paths.dataset, paths.thresholds, paths.events, splits=("train", *cfg.splits)),
                            SAMPLE_MEMORY_BYTES, "train and sampled days")
    held = isinstance(data, FieldData)
    grid = read_grid(paths.dataset)
    train_days = data.select("train")
    skipped = {}
    if "interpolation" in baselines and not _has_coarse(data):
        log.info("baseline 'interpolation' skipped: the condition has no precipitation channel "
                 "(set a predictor's precipitation: true or preprocess.target_coarse_factor)")
        skipped["interpolation"] = "no coarse precipitation in the condition"
        baselines = tuple(b for b in baselines if b != "interpolation")
    if "analogs" in baselines and cfg.members > len(train_days):
        raise ValueError(f"evaluate.members = {cfg.members} exceeds the {len(train_days)} train days of the analogs")
    finish = lambda pr: np.nan_to_num(crop(pr, grid.attrs), nan=0.0)  # noqa: E731 -- (T, h, w) mm/day
    train = {
        "pr": finish(train_days.fields_mm(np.arange(len(train_days)))) if held else DayFields(train_days, finish),
        "cond": train_days.condition(np.arange(len(train_days))).reshape(len(train_days), -1).numpy(),
    }
    models = {label: _load_checkpoint(path, data, device) for label, path in paths.checkpoints.items()}
    for label, (_, _, info) in models.items():
        log.info("checkpoint %s: %s (epoch %d)", label, info["path"], info["epoch"] + 1)
    qmap, calibrated = None, []
    if cfg.calibrate == "quantile_map":
        first = next(iter(models))
        qmap = fit_calibration(train_days, models[first], cfg, grid, device)
        calibrated = [cvae_source(calibrated_label(first))]
    sources = [cvae_source(label) for label in models] + calibrated + list(baselines)
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
                      coords={**{k: (k, getattr(grid, k), grid.coord_attrs.get(k, {})) for k in ("lat", "lon")},
                              **{k: (("lat", "lon"), v, a) for k, (v, a) in grid.cells.items()}},
                      attrs={"title": "precip-cvae evaluated ensembles", "evaluate_meta": json.dumps(meta),
                             "grid_mapping_attrs": grid.grid_mapping_attrs,
                             "condition_on_cells": int(grid.fine_positions()[0].ndim == 2)})
    with io.atomic_path(paths.out) as store:
        io.write_zarr_group(root, store)
        for split in cfg.splits:
            ev = data.select(split)
            times = np.asarray(ev.dates, dtype=str)  # ISO strings: any calendar
            writer = _SplitWriter(store, split, models, baselines, train, cfg, grid, device, qmap)
            for index, block in day_blocks(ev, block_days_for(ev, cfg.batch_size)):
                for idx in _batches(len(block), cfg.batch_size):
                    writer.write(block.subset(np.arange(idx.start, idx.stop)), times[index[idx]])
            writer.report()
        io.consolidate_zarr(store)
    log.info("wrote %s: splits %s, sources %s", paths.out, list(cfg.splits), sources)
    return Path(paths.out)
