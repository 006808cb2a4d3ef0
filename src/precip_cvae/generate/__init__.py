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

The stage is this module; the outputs it writes (:mod:`.outputs`), the memorisation check
(:mod:`.memorisation`), the report (:mod:`.report`) and the training-set assembly (:mod:`.training_set`)
are its parts.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__, cf, checkpoint
from ..calibration import QuantileMap, QuantileMapFit
from ..config import EventsConfig, GenerateConfig, config_hash
from ..data import block_days_for, day_blocks, held_or_streamed, open_fields
from ..events import apply_criterion, field_statistics
from ..grid import crop_array, crop_to_original
from ..io import (InputError, atomic_path, consolidate_zarr, open_netcdf, open_zarr, open_zarr_group, write_json,
                  write_netcdf, write_text, write_zarr_group)
from ..metrics import relative_mass_error
from ..provenance import file_sha256
from ..resources import select_device
from .memorisation import NEAR_COPY_RATIO, memorisation_check, samples_to_check
from .outputs import CONDITION_GROUP, condition_dataset, hand_over, samples_dataset
from .report import build_report, index_diagnostics, report_markdown
from .training_set import write_training_set

__all__ = ["run", "GeneratePaths", "GenerationError", "memorisation_check", "NEAR_COPY_RATIO", "CONDITION_GROUP",
           "samples_dataset", "condition_dataset", "GENERATE_MEMORY_BYTES"]

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Generated samples failed a hard check (NaN or negative values)."""


WRITE_BYTES = 16 * 2**20  # batches are written in blocks of about this many bytes of fields


#: The data set's tensors (every split) held in memory; larger ones are read from the store as needed: the
#: heavy days' conditions and fields, the memorisation reference a block at a time.
GENERATE_MEMORY_BYTES = 2 * 2**30


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
    fit = setup.data.subset(days)  # read a block of days at a time (whole batches: the same draws)
    g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 17)
    acc = None
    for _, block in day_blocks(fit, block_days_for(fit, cfg.batch_days)):
        obs = crop_array(block.pr_mm[:, 0].numpy(), setup.pads)  # (B, h, w)
        for start in range(0, len(block), cfg.batch_days):
            idx = np.arange(start, min(start + cfg.batch_days, len(block)))
            valid = block.valid[idx].to(setup.device)
            ens = _sample_mm(setup, block.y[idx].to(setup.device), valid, cfg, g)
            if acc is None:
                acc = QuantileMapFit(cfg.members, days.size, obs.shape[1:])
            acc.add(ens, obs[idx])
    qmap = acc.finish()
    log.info("quantile map fitted on the %d %s days x %d members (%s)", days.size, free[0], cfg.members,
             "exact" if acc.exact else "streamed, per-pixel histograms")
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
        s = setup.model.sample(y, valid, n_samples=cfg.members, z_scale=cfg.z_scale, generator=g,
                               tile=setup.model.tile_for(y.shape[0], cfg.inference_memory_gb * 1e9))
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
    budget = samples_to_check(cfg.memorisation_max_samples, mask.size) - sum(f.shape[0] for f in tally.memo_fields)
    if budget > 0:
        tally.memo_fields.append(fields[:budget].copy())  # not a view that holds the whole block
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
                pending = hand_over(writer, pending, pieces, tmp, n_queued == 0, (
                    "written %d samples (%d of %d heavy days)", tally.written,
                    min(start + len(days), chosen.size), chosen.size))
                pieces, n_queued = [], tally.days_written
        if pieces:
            pending = hand_over(writer, pending, pieces, tmp, n_queued == 0, (
                "written %d samples (%d of %d heavy days)", tally.written, chosen.size, chosen.size))
        if pending is not None:
            pending.result()
        if tally.bad["nan"] or tally.bad["negative"]:
            raise GenerationError(
                f"generated samples contain {tally.bad['nan']} NaN and {tally.bad['negative']} negative values "
                "inside the mask; nothing was written"
            )
        if tally.written == 0:
            raise GenerationError(
                f"no sample was accepted: none of the {tally.drawn} drawn for {setup.chosen.size} heavy days is heavy "
                f"under events.criterion ({events_cfg.criterion}); the model ({setup.attrs['checkpoint']}) rarely makes "
                "heavy fields. Raise generate.max_rounds, or set generate.filter_heavy: false to keep every sample; "
                "nothing was written")
        write_zarr_group(condition_dataset(setup.data, np.asarray(tally.source_days), setup.ds, setup.attrs), tmp,
                         CONDITION_GROUP)
        consolidate_zarr(tmp)
    return tally


def _finish(setup: _Setup, tally: _Tally, paths: GeneratePaths, cfg: GenerateConfig,
            events_cfg: EventsConfig) -> dict:
    """The report, the augmented training set and the NetCDF copies."""
    report = build_report(setup, tally, cfg, events_cfg)
    store = Path(paths.augmented)
    write_training_set(setup.ds, store, Path(paths.training_set), cfg, setup.attrs)
    if paths.netcdf:
        write_netcdf(open_zarr(store), paths.netcdf)  # dask writes it chunk by chunk: memory flat in samples
    if paths.condition_netcdf:
        write_netcdf(open_zarr_group(store, CONDITION_GROUP), paths.condition_netcdf)
    report["indices"] = index_diagnostics(setup, store, events_cfg)
    write_json(report, paths.report)
    write_text(report_markdown(report), paths.report_md)
    return report
