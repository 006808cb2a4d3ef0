"""The ``generate`` stage: synthetic heavy-rain fields, with provenance and quality checks.

For each heavy-event day of the configured splits, ``members`` fields are drawn
from the prior p(z|y) of a trained checkpoint (``z = mu + z_scale * sigma * eps``),
decoded to mm/day, cropped to the original grid, masked and checked.  With
``filter_heavy`` only samples that are heavy under the same event criterion as the
real days are kept (redrawing up to ``max_rounds`` times per day); the
acceptance rate is reported.  Samples are produced batch by batch and written in
blocks of about ``WRITE_BYTES`` (zarr appends; a writer thread writes one block
while the next batches are sampled), so memory does not grow with their number.

Outputs (see :func:`run`): ``augmented.zarr``, ``augmented_training_set.zarr``,
optionally ``augmented.nc``, and ``generation_report.json`` / ``.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import __version__, cf, checkpoint, indices
from .calibration import QuantileMap, fit_quantile_map
from .config import EventsConfig, GenerateConfig, config_hash
from .data import DayFields, FieldData, held_or_streamed, open_fields
from .events import apply_criterion, field_statistics, wet_day_thresholds
from .grid import crop_array, crop_to_original
from .split import format_times, season_year_rule
from .io import (InputError, atomic_path, consolidate_zarr, open_netcdf, open_zarr, open_zarr_group, write_json,
                 write_netcdf, write_text, write_zarr_group)
from .metrics import relative_mass_error
from .neighbours import nearest_rmse
from .provenance import file_sha256
from .resources import select_device

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Generated samples failed a hard check (NaN or negative values)."""


# ----------------------------------------------------------------------------- checks on arrays


#: A sample is a near-copy when its nearest real train field is closer than this fraction of the
#: distance to the second nearest (the d1/d2 ratio test used for memorisation in generative
#: models, e.g. Yoon et al. 2023): a copy sits next to one field, a novel field between several.
NEAR_COPY_RATIO = 1.0 / 3.0


def memorisation_check(samples: np.ndarray, reference: np.ndarray, warn_fraction: float,
                       anchors: np.ndarray | None = None, anchor_index: np.ndarray | None = None) -> dict:
    """Are the samples near-copies of real training fields?

    A sample is a near-copy when its nearest train field is closer than
    ``NEAR_COPY_RATIO`` times the second nearest (d1/d2 < 1/3); ``warning`` when more
    than ``warn_fraction`` of the samples are.  The ratio is scale-free: a smooth sample
    lies close (in RMSE) to many real fields, with d1/d2 near 1, and is not mistaken for
    a copy; a copy has d1 near 0 and a real d2.

    For context, the sample-to-nearest RMSE is also compared with the nearest-neighbour
    RMSE of real fields like the samples (``anchors``: the real fields of the sampled
    days; default every train field) to the other train fields.  That comparison alone
    is no memorisation test: on Iberia pairs of dry days made its 5th percentile 0 over
    all train days (nothing could be flagged), and against the heavy days it flagged
    37 % of smooth samples that were not nearest to their own day (d1/d2 median 0.95).

    Parameters
    ----------
    samples : (Ns, ...) synthetic fields; reference : (Nr, ...) real train fields (NaN = masked), an ndarray or
        fields read from the store as they are indexed (:class:`precip_cvae.data.DayFields`; compared a block
        at a time, :func:`precip_cvae.neighbours.nearest_rmse`)
    anchors : (Na, ...) real fields like the samples, optional
    anchor_index : (Na,) int, the position of each anchor in ``reference`` (-1: not in it);
        that pair is skipped
    """
    s = samples.reshape(samples.shape[0], -1)
    r = reference.reshape(reference.shape[0], -1) if isinstance(reference, np.ndarray) else reference
    n_ref = len(r)
    two = nearest_rmse(s, r, k=2) if n_ref > 1 else np.repeat(nearest_rmse(s, r)[:, None], 2, 1)
    d_sample = two[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(two[:, 1] > 0, two[:, 0] / two[:, 1], 1.0)  # d1 = d2 = 0: several identical fields
    if anchors is None:
        r = np.asarray(r[np.arange(n_ref)]).reshape(n_ref, -1) if not isinstance(r, np.ndarray) else r
        d_real = nearest_rmse(r, r, exclude_self=True)
    else:
        a = anchors.reshape(anchors.shape[0], -1)
        index = np.full(a.shape[0], -1) if anchor_index is None else np.asarray(anchor_index)
        d_real = nearest_rmse(a, r, exclude=index)
    p5 = float(np.percentile(d_real, 5)) if d_real.size else float("nan")
    frac_copy = float((ratio < NEAR_COPY_RATIO).mean()) if ratio.size else 0.0
    return {
        "fraction_near_copies": frac_copy,
        "near_copy_ratio": NEAR_COPY_RATIO,
        "sample_nn_ratio_median": float(np.median(ratio)) if ratio.size else float("nan"),
        "sample_nn_rmse_median": float(np.median(d_sample)) if d_sample.size else float("nan"),
        "real_nn_rmse_p5": p5,
        "real_nn_rmse_median": float(np.median(d_real)) if d_real.size else float("nan"),
        "fraction_closer_than_real_p5": float((d_sample < p5).mean()) if d_sample.size else 0.0,
        "reference_fields": int(n_ref),
        "warn_fraction": warn_fraction,
        "warning": frac_copy > warn_fraction,
        "per_sample_nn_rmse": d_sample,
        "per_sample_nn_ratio": ratio,
    }


def _summary(values: np.ndarray) -> dict:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    return {"n": int(values.size), "mean": float(values.mean()), "p10": float(np.percentile(values, 10)),
            "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}


# ----------------------------------------------------------------------------- the stage


WRITE_BYTES = 16 * 2**20  # batches are written in blocks of about this many bytes of fields
CHUNK_BYTES = 4 * 2**20  # zarr chunks of augmented.zarr along `time`: about this many bytes of fields


CONDITION_GROUP = "condition"  # the group of augmented.zarr that holds the conditions (own grid: clat, clon)


def samples_dataset(block: np.ndarray, counts: np.ndarray, time: xr.DataArray, lat: np.ndarray, lon: np.ndarray,
                    ds: xr.Dataset, attrs: dict) -> xr.Dataset:
    """Samples of some days as a CF ensemble.

    Parameters
    ----------
    block : ndarray (D, R, h, w) float32, mm day-1; NaN past each day's count and outside the mask
    counts : ndarray (D,) int32, the realizations of each day that hold data
    time : xr.DataArray (D,), the days' time stamps in the data set (their CF encoding is kept)
    """
    t = cf.time_variable(time, "date of the condition the samples were drawn for")
    out = xr.Dataset(
        {
            "pr": (("time", "realization", "lat", "lon"), block, {
                "units": "mm day-1", "standard_name": "lwe_precipitation_rate", "cell_methods": "time: mean",
                "long_name": "synthetic precipitation (one field per realization)"}),
            "n_realizations": (("time",), counts.astype("int32"), {
                "long_name": "number of realizations of the date that hold a sample (the first n; the rest are "
                             "fill values)", "units": "1"}),
        },
        coords={
            "time": t,
            "realization": cf.realization_coord(block.shape[1]),
            "lat": ("lat", lat, dict(ds["lat"].attrs) or cf.COORD_DEFAULTS["lat"]),
            "lon": ("lon", lon, dict(ds["lon"].attrs) or cf.COORD_DEFAULTS["lon"]),
        },
        attrs=attrs,
    )
    return cf.attach_grid_mapping(out, ds["pr"].attrs.get("grid_mapping_attrs", ""), ["pr"], ds)


def condition_dataset(data, days: np.ndarray, ds: xr.Dataset, attrs: dict) -> xr.Dataset:
    """The normalised condition of each sampled day, one variable per channel on the predictor grid
    (``<channel>(time, clat, clon)``, dimensionless; ``value * normalisation_std + normalisation_mean``
    gives the channel back in its units)."""
    time = ds["time"].isel(time=days)
    t = cf.time_variable(time, "date of the condition")
    y = data.condition(days).numpy()  # (D, C, clat, clon)
    mean, std = ds["cond_mean"].values, ds["cond_std"].values
    variables = {}
    for c, name in enumerate(data.channels):
        if name in ("time", "clat", "clon"):
            raise InputError(f"condition channel {name!r} has the name of a coordinate; rename the variable")
        variables[str(name)] = (("time", "clat", "clon"), y[:, c], {
            "long_name": f"{name}, normalised with its train mean and standard deviation", "units": "1",
            "normalisation_mean": float(mean[c]), "normalisation_std": float(std[c])})
    # a condition grid made of target blocks may have lost its coordinates' attributes: the fine grid's apply
    cattrs = {c: dict(ds[c].attrs) or {k: v for k, v in ds[f].attrs.items() if k not in ("bounds", "original_name")}
              for c, f in (("clat", "lat"), ("clon", "lon"))}
    out = xr.Dataset(variables, coords={
        "time": t,
        "clat": ("clat", ds["clat"].values, cattrs["clat"]),
        "clon": ("clon", ds["clon"].values, cattrs["clon"]),
    }, attrs={**attrs, "title": "precip-cvae conditions of the synthetic samples"})
    return cf.attach_grid_mapping(out, ds["pr"].attrs.get("grid_mapping_attrs", ""), list(variables))


def _hand_over(writer: ThreadPoolExecutor, pending, pieces: list, store: Path, first: bool, message: tuple):
    """Queue ``pieces`` (batches of days) as one block for the writer thread, once the block
    before it is on disk (its error is raised here); return the new block's future."""
    if pending is not None:
        pending.result()
    block = pieces[0] if len(pieces) == 1 else xr.concat(pieces, dim="time", data_vars="minimal", coords="minimal",
                                                         compat="override")
    return writer.submit(_append, block, store, first, message)


def _append(piece: xr.Dataset, store: Path, first: bool, message: tuple) -> None:
    """Write one block of days to ``store`` (the first creates it; metadata consolidated at the end), then log."""
    if first:
        per_chunk = max(1, CHUNK_BYTES // piece["pr"][0].nbytes)  # readers (the training set, users) load little
        encoding = cf.encoding(piece)
        encoding["pr"] = {"chunks": (per_chunk, *piece["pr"].shape[1:])}
        encoding["n_realizations"] = {**encoding.get("n_realizations", {}), "chunks": (per_chunk,)}
        piece.to_zarr(store, mode="w", consolidated=False, zarr_format=2, encoding=encoding)
    else:
        piece.drop_vars(["lat", "lon", "realization"]).to_zarr(
            store, append_dim="time", consolidated=False, zarr_format=2)
    log.info(*message)


@dataclasses.dataclass(frozen=True)
class GeneratePaths:
    """Inputs and outputs of the generate stage; the rule passes its ``input`` and ``output`` paths.

    ``netcdf`` / ``condition_netcdf`` are written when given (the rule declares them when
    ``generate.netcdf`` is true).
    """

    checkpoint: str
    dataset: str
    thresholds: str
    events: str
    augmented: str
    training_set: str
    report: str
    report_md: str
    netcdf: str | None = None
    condition_netcdf: str | None = None

    @classmethod
    def in_dir(cls, out_dir, checkpoint: str, dataset: str, thresholds: str, events: str,
               netcdf: bool = False) -> "GeneratePaths":
        """The workflow's file names under ``out_dir`` (tests and benchmarks; the rule passes its own)."""
        out = Path(out_dir)
        return cls(str(checkpoint), str(dataset), str(thresholds), str(events),
                   augmented=str(out / "augmented.zarr"), training_set=str(out / "augmented_training_set.zarr"),
                   report=str(out / "generation_report.json"), report_md=str(out / "generation_report.md"),
                   netcdf=str(out / "augmented.nc") if netcdf else None,
                   condition_netcdf=str(out / "augmented_condition.nc") if netcdf else None)


@dataclasses.dataclass
class _Setup:
    """What every step of the stage reads: the model, the data and the original grid."""

    device: torch.device
    model: torch.nn.Module
    state: dict
    data: object  # precip_cvae.data.FieldData, or ZarrFields above GENERATE_MEMORY_BYTES
    ds: xr.Dataset
    pads: dict  # pad_lat / pad_lon of the padded grid
    lat: np.ndarray
    lon: np.ndarray
    mask: np.ndarray  # (h, w) bool, the original grid
    field_mask: torch.Tensor  # (1, 1, H, W) bool, the padded grid: where every sample is generated
    thr: np.ndarray  # (h, w) the local P99 thresholds
    limits: dict  # of the event criterion
    chosen: np.ndarray  # data-set indices of the heavy days to sample for
    attrs: dict  # global attributes (provenance) of every output
    qmap: QuantileMap | None = None  # generate.calibrate quantile_map: fitted on days never sampled here


@dataclasses.dataclass
class _Tally:
    """Counts and statistics gathered while the samples are written."""

    written: int = 0
    days_written: int = 0
    drawn: int = 0
    short_days: int = 0
    bad: dict = dataclasses.field(default_factory=lambda: {"nan": 0, "negative": 0})
    source_days: list = dataclasses.field(default_factory=list)  # data-set index of each day written, in order
    stats: list = dataclasses.field(default_factory=list)
    mass: list = dataclasses.field(default_factory=list)
    memo_fields: list = dataclasses.field(default_factory=list)


def run(paths: GeneratePaths, cfg: GenerateConfig, events_cfg: EventsConfig) -> dict:
    """Generate samples for the heavy days of ``cfg.splits`` and write the outputs named in ``paths``.

    Samples on ``cfg.device`` (:func:`precip_cvae.resources.select_device`: CUDA when present
    for ``auto``); the noise comes from a CPU generator, so a seed gives the same draws
    on either device up to floating point.  Steps: :func:`_set_up`, then per batch of days
    :func:`_draw` and :func:`_assemble` (written by a background thread), then :func:`_finish`.
    """
    for out in (paths.augmented, paths.training_set, paths.report, paths.report_md, paths.netcdf,
                paths.condition_netcdf):
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    setup = _set_up(paths, cfg, events_cfg)
    log.info("generating %d members for each of %d heavy days (splits %s, z_scale %g, filter %s) from %s "
             "on device %s", cfg.members, setup.chosen.size, list(cfg.splits), cfg.z_scale, cfg.filter_heavy,
             paths.checkpoint, setup.device)
    tally = _write_samples(setup, cfg, events_cfg, Path(paths.augmented))
    return _finish(setup, tally, paths, cfg, events_cfg)


def _set_up(paths: GeneratePaths, cfg: GenerateConfig, events_cfg: EventsConfig) -> _Setup:
    """Load the checkpoint and the data, check they match, pick the heavy days, build the provenance."""
    device = select_device(cfg.device, "generate.device")
    model, state = checkpoint.load_model(paths.checkpoint, device)
    data = held_or_streamed(open_fields(paths.dataset, paths.thresholds, paths.events), GENERATE_MEMORY_BYTES,
                            "generate")
    checkpoint.check_matches_data(state, data.channels, tuple(data.fine_shape), paths.checkpoint)
    ds = open_zarr(paths.dataset)
    thr_ds = open_netcdf(paths.thresholds)
    limits = {"domain_mean_threshold_mm_day": float(thr_ds["threshold"].attrs.get("domain_mean_threshold_mm_day",
                                                                                     np.inf))}
    pads = dict(ds.attrs)
    fine = crop_to_original(ds[["mask"]], pads)  # the original grid
    chosen = np.flatnonzero(np.isin(data.split, list(cfg.splits)) & data.is_event.numpy())
    if chosen.size == 0:
        raise InputError(
            f"{paths.events}: no heavy-event day in splits {list(cfg.splits)}; nothing to generate from "
            "(check events.criterion or generate.splits)"
        )
    setup = _Setup(device=device, model=model, state=state, data=data, ds=ds, pads=pads, lat=fine["lat"].values,
                   lon=fine["lon"].values, mask=fine["mask"].values.astype(bool),
                   field_mask=torch.from_numpy(ds["mask"].values.astype(bool))[None, None],
                   thr=crop_array(data.thr_mm[0, 0].numpy(), pads), limits=limits, chosen=chosen,
                   attrs=_provenance(paths.checkpoint, state, ds, cfg, events_cfg))
    if cfg.calibrate == "quantile_map":
        setup.qmap, fit_split = _fit_calibration(setup, cfg, paths.dataset)
        setup.attrs["calibration"] = (f"quantile_map: every sample mapped pixel by pixel to the observed distribution "
                                      f"of the {fit_split} days ({setup.qmap.n_days}), which are not sampled here "
                                      "(precip_cvae.calibration); members keep their rank order")
    return setup


def _fit_calibration(setup: _Setup, cfg: GenerateConfig, dataset: str) -> tuple[QuantileMap, str]:
    """The quantile map fitted on the first split of val, test, train that ``cfg.splits`` does not sample."""
    free = [s for s in ("val", "test", "train") if s not in cfg.splits and np.any(setup.data.split == s)]
    if not free:
        raise InputError(f"{dataset}: generate.calibrate 'quantile_map' needs a split that generate does not sample "
                         f"to fit on (generate.splits is {list(cfg.splits)}); drop one split or set calibrate 'none'")
    days = np.flatnonzero(setup.data.split == free[0])
    fit = setup.data.subset(days)
    fit = fit if isinstance(fit, FieldData) else fit.read()  # the fitting split in memory
    g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 17)
    ens = []
    for start in range(0, days.size, cfg.batch_days):
        idx = np.arange(start, min(start + cfg.batch_days, days.size))
        valid = fit.valid[idx].to(setup.device)
        ens.append(_sample_mm(setup, fit.y[idx].to(setup.device), valid, cfg, g))
    obs = crop_array(fit.pr_mm[:, 0].numpy(), setup.pads)
    qmap = fit_quantile_map(np.concatenate(ens, axis=1), obs)
    log.info("quantile map fitted on the %d %s days x %d members", days.size, free[0], cfg.members)
    return qmap, free[0]


def _provenance(checkpoint_path: str, state: dict, ds: xr.Dataset, cfg: GenerateConfig,
                events_cfg: EventsConfig) -> dict:
    """The global attributes of every output: CF, the checkpoint and its hash, the settings, the history."""
    chash = config_hash({"generate": dataclasses.asdict(cfg), "checkpoint": state.get("config_hash"),
                         "events": dataclasses.asdict(events_cfg)})
    now = cf.now_iso()
    return cf.append_history({
        "Conventions": cf.CONVENTIONS,
        "title": "precip-cvae synthetic heavy-precipitation samples",
        "institution": "precip-cvae workflow",
        "source": f"conditional VAE ({state['model_config']['preset']} preset, epoch {state['epoch']}) sampled "
                  f"from its prior p(z|y)",
        "comment": "pr(time, realization, lat, lon): time is the date of the condition (a real heavy day), each "
                   "realization one synthetic field drawn for it; n_realizations(time) counts those that hold data "
                   "(the rest are fill values). The conditions are in the group 'condition' (augmented_condition.nc).",
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "config_hash": chash,
        "package_version": __version__,
        "seed": int(cfg.seed),
        "z_scale": float(cfg.z_scale),
        "members_per_condition": int(cfg.members),
        "filter_heavy": int(cfg.filter_heavy),
        "creation_time": now,
        "history": str(ds.attrs.get("history", "")),
    }, cf.history_line("generate", f"{cfg.members} members per heavy day of splits {list(cfg.splits)} from "
                                   f"{checkpoint_path}", when=now))


def _sample_mm(setup: _Setup, y: torch.Tensor, valid: torch.Tensor, cfg: GenerateConfig,
               g: torch.Generator) -> np.ndarray:
    """``cfg.members`` prior samples of each condition in ``y``: (K, B, h, w) mm/day on the original grid, NaN
    outside ``valid``."""
    with torch.no_grad():
        s = setup.model.sample(y, valid, n_samples=cfg.members, z_scale=cfg.z_scale, generator=g)
    mm = setup.data.transform.inverse(s[:, :, 0].float()).cpu().numpy()  # (K, B, H, W)
    return crop_array(np.where(valid[:, 0].cpu().numpy()[None], mm, np.nan), setup.pads)


def _draw(setup: _Setup, days: np.ndarray, cfg: GenerateConfig, events_cfg: EventsConfig, g: torch.Generator,
          tally: _Tally) -> list[list[np.ndarray]]:
    """Up to ``cfg.members`` accepted samples (h, w) per day of ``days``, in mm day-1 on the original grid.

    With ``filter_heavy`` a sample is accepted only when it meets the event criterion, judged by
    :func:`precip_cvae.events.field_statistics` like the real days; up to ``max_rounds`` rounds.
    """
    data, device = setup.data, setup.device
    y = data.condition(days).to(device)
    # the whole static mask, not the source day's observed cells: a gap in the observations of that day
    # (a station missing) is no gap in a new field
    valid = setup.field_mask.expand(len(days), -1, -1, -1).to(device)
    accepted: list[list[np.ndarray]] = [[] for _ in days]
    for _ in range(cfg.max_rounds if cfg.filter_heavy else 1):
        need = [cfg.members - len(a) for a in accepted]
        if max(need) <= 0:
            break
        mm = _sample_mm(setup, y, valid, cfg, g)  # (K, B, h, w)
        if setup.qmap is not None:
            mm = setup.qmap.apply(mm)
        tally.drawn += int(sum(max(n, 0) for n in need))
        for j in range(len(days)):
            if need[j] <= 0:
                continue
            cand = mm[:, j]  # (K, H, W)
            if cfg.filter_heavy:
                st = field_statistics(cand, setup.thr, events_cfg.wet_threshold)
                cand = cand[apply_criterion(st, events_cfg, setup.limits)]
            accepted[j].extend(list(cand[: need[j]]))
    tally.short_days += sum(len(a) < cfg.members for a in accepted)
    return accepted


def _assemble(setup: _Setup, days: np.ndarray, accepted: list[list[np.ndarray]], cfg: GenerateConfig,
              events_cfg: EventsConfig, tally: _Tally) -> xr.Dataset | None:
    """The accepted samples of ``days`` as a CF ensemble block (None when no day has one); counts,
    statistics, mass errors and fields for the memorisation check go to ``tally``."""
    kept = [j for j in range(len(days)) if accepted[j]]
    if not kept:
        return None
    mask = setup.mask
    # (D, R, h, w): realization r of day d; fill (NaN) past the day's accepted count
    block = np.full((len(kept), cfg.members, *mask.shape), np.nan, dtype="float32")
    for k, j in enumerate(kept):
        block[k, : len(accepted[j])] = np.stack(accepted[j])
    counts = np.array([len(accepted[j]) for j in kept], dtype="int32")
    filled = np.arange(cfg.members)[None, :] < counts[:, None]  # (D, R) realizations that hold data
    inside = block[filled][:, mask]
    tally.bad["nan"] += int(np.isnan(inside).sum())
    tally.bad["negative"] += int((inside < 0).sum())
    block[:, :, ~mask] = np.nan
    src = days[kept]
    fields = block[filled]  # (S, h, w) the accepted samples, day by day
    st = field_statistics(fields, setup.thr, events_cfg.wet_threshold)
    st["source_date"] = np.repeat(setup.data.dates[src], counts)
    tally.stats.append(st)
    coarse = setup.data.coarse(src)
    if coarse is not None:
        cmean = np.repeat(np.nanmean(coarse.numpy(), axis=(1, 2)), counts)
        tally.mass.append(relative_mass_error(st["domain_mean"].values, cmean))
    budget = cfg.memorisation_max_samples - sum(f.shape[0] for f in tally.memo_fields)
    if budget > 0:
        tally.memo_fields.append(fields[:budget])
    tally.source_days.extend(src.tolist())
    tally.written += int(counts.sum())
    tally.days_written += len(src)
    return samples_dataset(block, counts, setup.ds["time"].isel(time=src), setup.lat, setup.lon, setup.ds,
                           setup.attrs)


def _write_samples(setup: _Setup, cfg: GenerateConfig, events_cfg: EventsConfig, store: Path) -> _Tally:
    """Draw and assemble batch after batch while a writer thread appends the blocks to ``store``
    (all or nothing: ``store`` appears complete, with its condition group, or not at all)."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    tally, chosen = _Tally(), setup.chosen
    with atomic_path(store) as tmp, ThreadPoolExecutor(max_workers=1) as writer:
        pending, pieces, n_queued = None, [], 0  # the block being written while the next batches are sampled
        for start in range(0, chosen.size, cfg.batch_days):
            days = chosen[start : start + cfg.batch_days]
            piece = _assemble(setup, days, _draw(setup, days, cfg, events_cfg, g, tally), cfg, events_cfg, tally)
            if piece is None:
                continue
            pieces.append(piece)
            if (tally.days_written - n_queued) * piece["pr"][0].nbytes >= WRITE_BYTES:  # few large appends
                pending = _hand_over(writer, pending, pieces, tmp, n_queued == 0, (
                    "written %d samples (%d of %d heavy days)", tally.written,
                    min(start + len(days), chosen.size), chosen.size))
                pieces, n_queued = [], tally.days_written
        if pieces:
            pending = _hand_over(writer, pending, pieces, tmp, n_queued == 0, (
                "written %d samples (%d of %d heavy days)", tally.written, chosen.size, chosen.size))
        if pending is not None:
            pending.result()
        if tally.bad["nan"] or tally.bad["negative"]:
            raise GenerationError(
                f"generated samples contain {tally.bad['nan']} NaN and {tally.bad['negative']} negative values "
                "inside the mask; nothing was written"
            )
        if tally.written == 0:
            raise GenerationError("no sample was accepted; lower the filter's demands or raise generate.max_rounds")
        write_zarr_group(condition_dataset(setup.data, np.asarray(tally.source_days), setup.ds, setup.attrs), tmp,
                         CONDITION_GROUP)
        consolidate_zarr(tmp)
    return tally


def _finish(setup: _Setup, tally: _Tally, paths: GeneratePaths, cfg: GenerateConfig,
            events_cfg: EventsConfig) -> dict:
    """The report, the augmented training set and the NetCDF copies."""
    report = _report(setup, tally, cfg, events_cfg)
    store = Path(paths.augmented)
    _write_training_set(setup.ds, store, Path(paths.training_set), cfg, setup.attrs)
    if paths.netcdf:
        write_netcdf(open_zarr(store), paths.netcdf)  # dask writes it chunk by chunk: memory flat in samples
    if paths.condition_netcdf:
        write_netcdf(open_zarr_group(store, CONDITION_GROUP), paths.condition_netcdf)
    report["indices"] = index_diagnostics(setup, store, events_cfg)
    write_json(report, paths.report)
    write_text(_report_md(report), paths.report_md)
    return report


#: The data set's tensors (every split) held in memory; larger ones are read from the store as needed: the
#: heavy days' conditions and fields, the memorisation reference a block at a time.
GENERATE_MEMORY_BYTES = 2 * 2**30
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
        table, _ = indices.ensemble_index_table(ens, real, dates, calendar, thr[95.0], thr[99.0],
                                                events_cfg.wet_threshold, season_year)
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


def _real_mass_error(data, chosen, real_stats) -> dict:
    """The same relative domain-mean error for the real fields of the sampled days: the reference for
    the samples' (the fine target and the coarse channel can be different products, e.g. E-OBS and NCEP)."""
    cmean = np.nanmean(data.coarse(chosen).numpy(), axis=(1, 2))
    rel = relative_mass_error(real_stats["domain_mean"].values, cmean)
    return {"mean_abs": float(np.mean(np.abs(rel))), **_summary(rel)}


def _report(setup: _Setup, tally: _Tally, cfg: GenerateConfig, events_cfg: EventsConfig) -> dict:
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
            {"available": True, "mean_abs": float(np.mean(np.abs(mass))), **_summary(mass),
             "real_event_days": _real_mass_error(data, chosen, real_stats)}
            if mass.size else {"available": False, "reason": "no precipitation channel in the condition"}
        ),
        "memorisation": memo,
        "distributions": {
            name: {"synthetic": _summary(synth[name].values), "real_event_days": _summary(real_stats[name].values)}
            for name in ("domain_max", "domain_mean", "exceed_fraction", "wet_fraction")
        },
    }
    log.info("generation: %d samples, acceptance %.2f, memorisation fraction %.3f, mass error %s",
             n_written, acceptance, memo["fraction_near_copies"],
             f"{report['mass_error_vs_coarse_condition'].get('mean_abs', float('nan')):.3f}"
             if mass.size else "n/a")
    return report


def _report_md(r: dict) -> str:
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
        f"{mm['reference_fields']} train fields){' **WARNING**' if mm['warning'] else ''}. Nearest-field RMSE: "
        f"samples' median {mm['sample_nn_rmse_median']:.2f} mm/day; real heavy days to other train fields: median "
        f"{mm['real_nn_rmse_median']:.2f}, 5th percentile {mm['real_nn_rmse_p5']:.2f}",
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


def _write_training_set(ds: xr.Dataset, augmented: Path, path: Path, cfg: GenerateConfig, attrs: dict) -> None:
    """Real train days + synthetic samples in the layout of ``dataset.zarr``, which the training loader reads.

    One entry of ``time`` per field: the real train days first, then every realization that holds a
    sample (day by day), stamped with its condition's date and paired with that day's condition; the
    grid is padded as in ``dataset.zarr``. ``synthetic`` (0 real, 1 synthetic) and ``sample_weight``
    (1 for real days, ``generate.synthetic_weight`` for samples) tell them apart; ``realization`` is
    the sample's index in ``augmented.zarr`` (-1 for real days).
    """
    train = ds.isel(time=np.flatnonzero(ds["split"].values.astype(str) == "train"))
    aug = open_zarr(augmented)
    pad_lat, pad_lon = list(ds.attrs.get("pad_lat", [0, 0])), list(ds.attrs.get("pad_lon", [0, 0]))
    counts = aug["n_realizations"].values.astype(int)
    day_of_row = np.repeat(np.arange(counts.size), counts)  # (S,) the realizations that hold data, day by day
    real_of_row = np.concatenate([np.arange(n) for n in counts]).astype("int32")
    pr = aug["pr"].data.reshape(-1, *aug["pr"].shape[2:])  # (T * R, h, w) dask
    synth = xr.DataArray(pr[day_of_row * aug.sizes["realization"] + real_of_row], dims=("time", "lat", "lon"))
    synth_pr = synth.pad(lat=tuple(pad_lat), lon=tuple(pad_lon)).data  # NaN padding, dask
    position = {d: i for i, d in enumerate(format_times(ds.indexes["time"]))}
    src_index = np.array([position[d] for d in format_times(aug.indexes["time"])])[day_of_row]
    synth_time = ds["time"].values[src_index]
    n_syn = int(counts.sum())
    synthetic = xr.Dataset(
        {
            "pr": (("time", "lat", "lon"), synth_pr),
            "condition": (("time", "channel", "clat", "clon"), ds["condition"].values[src_index]),
            "split": (("time",), np.full(n_syn, "train")),
        },
        coords={"time": synth_time, "lat": train["lat"].values, "lon": train["lon"].values,
                "channel": train["channel"].values, "clat": train["clat"].values, "clon": train["clon"].values},
    )
    if "coarse_pr" in train:
        synthetic["coarse_pr"] = (("time", "clat", "clon"), ds["coarse_pr"].values[src_index])
    real = train[[v for v in ("pr", "condition", "split", "coarse_pr") if v in train]]
    combined = xr.concat([real, synthetic], dim="time", data_vars="all", coords="minimal", compat="override",
                         join="override")
    n_real = real.sizes["time"]
    combined["synthetic"] = (("time",), np.r_[np.zeros(n_real, "int8"), np.ones(n_syn, "int8")],
                             {"long_name": "field is synthetic", "flag_values": np.array([0, 1], "int8"),
                              "flag_meanings": "real synthetic"})
    combined["realization"] = (("time",), np.r_[np.full(n_real, -1, "int32"), real_of_row], {
        "long_name": "realization of the sample in augmented.zarr (-1: a real day)"})
    combined["sample_weight"] = (("time",), np.r_[np.ones(n_real), np.full(n_syn, cfg.synthetic_weight)].astype(
        "float32"), {"long_name": "suggested training weight"})
    combined["mask"] = ds["mask"]
    for name in ("cond_mean", "cond_std"):
        combined[name] = ds[name]
    combined["pr"].attrs = dict(ds["pr"].attrs)
    combined.attrs = cf.append_history(
        {**dict(ds.attrs), **{f"generation_{k}": v for k, v in attrs.items() if k != "history"},
         "title": "precip-cvae augmented training set (real train days + synthetic samples)",
         "history": attrs.get("history", "")},
        cf.history_line("generate", f"training set: {n_real} real train days + {n_syn} synthetic samples from "
                                    f"{augmented}"))
    # one chunk along space: the padding of the synthetic fields must not leave ragged spatial chunks
    combined = combined.chunk({"time": 256, "lat": -1, "lon": -1, "channel": -1, "clat": -1, "clon": -1})
    from .io import write_zarr

    write_zarr(combined, path)
