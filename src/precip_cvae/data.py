"""``dataset.zarr`` + thresholds + events -> tensors; samplers and augmentations.

The training, evaluation and generation stages meet the data here.  Fields are
held in memory as float32 tensors (on the training device when it fits): the
demo data set is 60 MB, E-OBS Iberia 6 MB.  Dims and units:

* ``x`` (T, 1, H, W): target in model space (``TargetTransform.forward`` of mm/day),
  0 where invalid;
* ``valid`` (T, 1, H, W) bool: in the mask and not missing that day;
* ``y`` (T, C, h, w): normalised condition;
* ``coarse_mm`` (T, h, w): the raw coarse precipitation condition in mm/day, or None;
* ``thr_x`` (1, 1, H, W): the per-pixel heavy threshold in model space (+inf where
  there is none), so ``extreme = (x > thr_x) & valid``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from .config import ConfigError, lookup
from .io import InputError, open_netcdf, open_zarr, read_csv
from .split import format_times
from .transform import TargetTransform

log = logging.getLogger(__name__)


@dataclass
class FieldData:
    """Tensors of one data set (or one split of it); see the module docstring for dims."""

    x: torch.Tensor
    valid: torch.Tensor
    y: torch.Tensor
    coarse_mm: torch.Tensor | None
    is_event: torch.Tensor  # (T,) bool
    split: np.ndarray  # (T,) str
    dates: np.ndarray  # (T,) str
    thr_mm: torch.Tensor  # (1, 1, H, W) mm/day, NaN where none
    transform: TargetTransform
    channels: tuple[str, ...]
    attrs: dict
    lat: np.ndarray | None = None  # (H,) fine-grid coordinate (padded)
    lon: np.ndarray | None = None  # (W,)
    static: torch.Tensor | None = None  # (S, H, W) user static fields (data.static), NaN-free
    static_names: tuple[str, ...] = ()
    thr_attrs: dict | None = None  # attributes of the thresholds map (wet threshold, min_wet_days)
    clat: np.ndarray | None = None  # (h,) condition-grid coordinates
    clon: np.ndarray | None = None  # (w,)
    condition_attrs: dict | None = None  # CF attributes of clat (geographic or the target's own axes)
    cells: dict | None = None  # cell_lat / cell_lon (H, W), each fine cell's lat/lon on curvilinear grids

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def thr_x(self) -> torch.Tensor:
        thr = self.transform.forward(torch.nan_to_num(self.thr_mm, nan=float("inf")))
        return torch.where(torch.isnan(self.thr_mm), torch.full_like(thr, float("inf")), thr)

    def subset(self, index) -> "FieldData":
        index = np.asarray(index)
        t = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            x=self.x[t],
            valid=self.valid[t],
            y=self.y[t],
            coarse_mm=None if self.coarse_mm is None else self.coarse_mm[t],
            is_event=self.is_event[t],
            split=self.split[index],
            dates=self.dates[index],
        )

    def select(self, split: str) -> "FieldData":
        idx = np.flatnonzero(self.split == split)
        if idx.size == 0:
            raise InputError(f"the data set has no {split!r} days")
        return self.subset(idx)

    def to(self, device) -> "FieldData":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, x=mv(self.x), valid=mv(self.valid), y=mv(self.y), coarse_mm=mv(self.coarse_mm),
                       is_event=mv(self.is_event), thr_mm=mv(self.thr_mm))

    @property
    def pr_mm(self) -> torch.Tensor:
        """(T, 1, H, W) mm/day with NaN where invalid."""
        pr = self.transform.inverse(self.x)
        return torch.where(self.valid, pr, torch.full_like(pr, float("nan")))


def load_fields(dataset: str, thresholds: str, events: str | None = None, splits=None) -> FieldData:
    """Load ``dataset.zarr`` (+ thresholds map, + events table) into tensors.

    Parameters
    ----------
    dataset, thresholds, events : paths written by ``preprocess`` / ``detect_events``
    splits : iterable of split names to keep (None: all)
    """
    ds = open_zarr(dataset)
    for name in ("pr", "condition", "mask", "split"):
        if name not in ds:
            raise InputError(f"{dataset}: variable {name!r} missing; expected a dataset written by preprocess")
    split = ds["split"].values.astype(str)
    keep = np.ones(len(split), bool) if splits is None else np.isin(split, list(splits))
    idx = np.flatnonzero(keep)
    transform = TargetTransform.from_attrs(ds.attrs)
    pr = ds["pr"].isel(time=idx).values.astype("float32")  # (T, H, W) mm/day
    mask = ds["mask"].values.astype(bool)
    valid = np.isfinite(pr) & mask[None]
    x = transform.forward(np.where(valid, pr, 0.0)).astype("float32")
    y = ds["condition"].isel(time=idx).values.astype("float32")
    coarse = ds["coarse_pr"].isel(time=idx).values.astype("float32") if "coarse_pr" in ds else None
    thr_ds = open_netcdf(thresholds)
    thr = thr_ds["threshold"].values.astype("float32")
    if thr.shape != mask.shape:
        raise InputError(f"{thresholds}: threshold map shape {thr.shape} does not match the dataset grid {mask.shape}")
    thr_attrs = dict(thr_ds["threshold"].attrs)
    static, static_names = None, ()
    if "static" in ds:
        static = torch.from_numpy(np.nan_to_num(ds["static"].values.astype("float32"), nan=0.0))
        static_names = tuple(str(c) for c in ds["static_channel"].values)
    dates = np.array(_format_dates(ds.indexes["time"][idx]))
    if events is not None:
        table = read_csv(events, dtype={"date": str})
        if len(table) != len(split) or list(table["date"].astype(str)) != _format_dates(ds.indexes["time"]):
            raise InputError(f"{events}: the events table does not match {dataset} (dates differ); rerun detect_events")
        is_event = table["is_event"].to_numpy(bool)[idx]
    else:
        is_event = np.zeros(len(idx), bool)
    return FieldData(
        x=torch.from_numpy(x[:, None]),
        valid=torch.from_numpy(valid[:, None]),
        y=torch.from_numpy(y),
        coarse_mm=None if coarse is None else torch.from_numpy(coarse),
        is_event=torch.from_numpy(is_event),
        split=split[idx],
        dates=dates,
        thr_mm=torch.from_numpy(thr[None, None]),
        transform=transform,
        channels=tuple(str(c) for c in ds["channel"].values),
        attrs=dict(ds.attrs),
        lat=np.asarray(ds["lat"].values, dtype=float),
        lon=np.asarray(ds["lon"].values, dtype=float),
        static=static,
        static_names=static_names,
        thr_attrs=thr_attrs,
        clat=np.asarray(ds["clat"].values, dtype=float),
        clon=np.asarray(ds["clon"].values, dtype=float),
        condition_attrs=dict(ds["clat"].attrs),
        cells={name: np.asarray(ds[name].values, dtype=float) for name in ("cell_lat", "cell_lon") if name in ds.coords},
    )


def _format_dates(index) -> list[str]:
    return format_times(index)


# ----------------------------------------------------------------------------- sampling


def epoch_indices(is_event: torch.Tensor, oversample: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one epoch (length = number of days).

    ``oversample == 1``: a permutation.  Otherwise days are drawn with replacement
    with heavy days weighted ``oversample`` times the others.
    """
    n = is_event.shape[0]
    if oversample == 1.0 or not bool(is_event.any()):
        return torch.randperm(n, generator=generator)
    weights = torch.where(is_event.cpu(), float(oversample), 1.0).double()
    return torch.multinomial(weights, n, replacement=True, generator=generator)


@dataclass
class Batch:
    """One batch; dims as in the module docstring with T -> B."""

    x: torch.Tensor
    valid: torch.Tensor
    y: torch.Tensor
    coarse_mm: torch.Tensor | None
    thr_x: torch.Tensor  # (1 or B, 1, H, W)
    tail_x: torch.Tensor | None = None  # (1 or B, 1, H, W): the twCRPS threshold, model space

    @property
    def extreme(self) -> torch.Tensor:
        return (self.x > self.thr_x) & self.valid


def make_batch(data: FieldData, index: torch.Tensor, thr_x: torch.Tensor, device,
               tail_x: torch.Tensor | None = None) -> Batch:
    index = index.to(data.x.device)
    return Batch(
        x=data.x[index].to(device, non_blocking=True),
        valid=data.valid[index].to(device, non_blocking=True),
        y=data.y[index].to(device, non_blocking=True),
        coarse_mm=None if data.coarse_mm is None else data.coarse_mm[index].to(device, non_blocking=True),
        thr_x=thr_x.to(device),
        tail_x=None if tail_x is None else tail_x.to(device),
    )


# ----------------------------------------------------------------------------- augmentations


def _flip(batch: Batch, g: torch.Generator, settings) -> Batch:
    dims = [d for d, on in zip((-2, -1), torch.rand(2, generator=g).tolist()) if on < 0.5]
    if not dims:
        return batch
    f = lambda t: None if t is None else torch.flip(t, dims)  # noqa: E731
    return Batch(f(batch.x), f(batch.valid), f(batch.y), f(batch.coarse_mm), f(batch.thr_x), f(batch.tail_x))


def _rot90(batch: Batch, g: torch.Generator, settings) -> Batch:
    k = int(torch.randint(0, 4, (1,), generator=g))
    if k == 0:
        return batch
    if batch.x.shape[-1] != batch.x.shape[-2] or batch.y.shape[-1] != batch.y.shape[-2]:
        raise ConfigError("augmentation 'rot90' needs square fine and coarse grids; use 'flip' instead")
    r = lambda t: None if t is None else torch.rot90(t, k, (-2, -1))  # noqa: E731
    return Batch(r(batch.x), r(batch.valid), r(batch.y), r(batch.coarse_mm), r(batch.thr_x), r(batch.tail_x))


def _noise(batch: Batch, g: torch.Generator, settings) -> Batch:
    eps = torch.randn(batch.y.shape, generator=g).to(batch.y.device)
    return replace(batch, y=batch.y + settings.noise_std * eps)


def _mixup(batch: Batch, g: torch.Generator, settings) -> Batch:
    """Convex combination of pairs (x in model space, y, coarse); valid = both valid."""
    b = batch.x.shape[0]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(settings.mixup_alpha, settings.mixup_alpha))
    perm = torch.randperm(b, generator=g).to(batch.x.device)
    mix = lambda t: None if t is None else lam * t + (1 - lam) * t[perm]  # noqa: E731
    valid = batch.valid & batch.valid[perm]
    return Batch(mix(batch.x) * valid, valid, mix(batch.y), mix(batch.coarse_mm), batch.thr_x, batch.tail_x)


AUGMENTATIONS: dict[str, Callable] = {"flip": _flip, "rot90": _rot90, "noise": _noise, "mixup": _mixup}


def check_augmentations(names) -> None:
    for name in names:
        lookup(AUGMENTATIONS, name, "augmentation")


def augment(batch: Batch, names, g: torch.Generator, settings) -> Batch:
    """Apply the named augmentations in order (``settings`` has noise_std, mixup_alpha)."""
    for name in names:
        batch = lookup(AUGMENTATIONS, name, "augmentation")(batch, g, settings)
    return batch
