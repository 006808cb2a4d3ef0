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
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

import numpy as np
import torch
import xarray as xr

from .config import ConfigError, lookup
from .io import InputError, open_netcdf, open_zarr, read_csv
from .split import format_times
from .model import Window
from .transform import TargetTransform

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FieldMeta:
    """What a data set's days share (grid, thresholds, transform, channels) and their labels (split, date, heavy)."""

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
        return len(self.dates)

    @property
    def thr_x(self) -> torch.Tensor:
        thr = self.transform.forward(torch.nan_to_num(self.thr_mm, nan=float("inf")))
        return torch.where(torch.isnan(self.thr_mm), torch.full_like(thr, float("inf")), thr)

    def _labels(self, index) -> dict:
        """The per-day labels of the days ``index`` (positions)."""
        index = np.asarray(index)
        return dict(is_event=self.is_event[torch.as_tensor(index, dtype=torch.long)], split=self.split[index],
                    dates=self.dates[index])

    def subset(self, index):
        raise NotImplementedError

    def select(self, split: str):
        """The days of one split (same type)."""
        idx = np.flatnonzero(self.split == split)
        if idx.size == 0:
            raise InputError(f"the data set has no {split!r} days")
        return self.subset(idx)


@dataclass(kw_only=True)
class FieldData(FieldMeta):
    """Tensors of one data set (or one split of it) in memory; see the module docstring for dims."""

    x: torch.Tensor
    valid: torch.Tensor
    y: torch.Tensor
    coarse_mm: torch.Tensor | None

    @property
    def fine_shape(self) -> tuple[int, int]:
        return tuple(self.x.shape[-2:])

    @property
    def coarse_shape(self) -> tuple[int, int]:
        return tuple(self.y.shape[-2:])

    @property
    def n_channels(self) -> int:
        return int(self.y.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.valid, self.y, self.coarse_mm) if t is not None)

    def subset(self, index) -> "FieldData":
        t = torch.as_tensor(np.asarray(index), dtype=torch.long).to(self.x.device)
        return replace(self, x=self.x[t], valid=self.valid[t], y=self.y[t],
                       coarse_mm=None if self.coarse_mm is None else self.coarse_mm[t], **self._labels(index))

    def condition(self, index) -> torch.Tensor:
        """The normalised condition (N, C, h, w) of the days ``index``."""
        return self.y[torch.as_tensor(np.asarray(index), dtype=torch.long).to(self.y.device)]

    def coarse(self, index) -> torch.Tensor | None:
        """The coarse precipitation (N, h, w) mm/day of the days ``index``, or None."""
        t = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return None if self.coarse_mm is None else self.coarse_mm[t.to(self.coarse_mm.device)]

    def days(self, index) -> "FieldData":
        """The days ``index`` in memory (here: a subset)."""
        return self.subset(index)

    def fields_mm(self, index) -> np.ndarray:
        """The fields (N, H, W) mm/day, NaN invalid, of the days ``index``."""
        return self.subset(index).pr_mm[:, 0].cpu().numpy()

    def to(self, device) -> "FieldData":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, x=mv(self.x), valid=mv(self.valid), y=mv(self.y), coarse_mm=mv(self.coarse_mm),
                       is_event=mv(self.is_event), thr_mm=mv(self.thr_mm))

    @property
    def pr_mm(self) -> torch.Tensor:
        """(T, 1, H, W) mm/day with NaN where invalid."""
        pr = self.transform.inverse(self.x)
        return torch.where(self.valid, pr, torch.full_like(pr, float("nan")))


@dataclass(kw_only=True)
class ZarrFields(FieldMeta):
    """The days of ``dataset.zarr`` (or some of them) left on disk: :meth:`read` gives any of them as a
    :class:`FieldData`, the same tensors :func:`load_fields` holds.  Memory: the per-day labels only.

    ``times`` are the days' positions on the store's time axis (increasing), ``chunk_days`` its time chunk:
    days in one chunk are read together (:func:`epoch_plan` shuffles whole chunks, then days within a buffer).
    Picklable (a worker process reopens the store).
    """

    path: str
    times: np.ndarray  # (T,) int64 positions on the store's time axis
    mask: np.ndarray  # (H, W) bool
    chunk_days: int
    fine_shape: tuple[int, int]
    coarse_shape: tuple[int, int]
    n_channels: int
    has_coarse: bool
    _store: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def bytes_per_day(self) -> int:
        """Bytes one day takes in memory as tensors (x float32, valid bool, condition and coarse float32)."""
        h, w = self.fine_shape
        ch, cw = self.coarse_shape
        return h * w * 5 + self.n_channels * ch * cw * 4 + (ch * cw * 4 if self.has_coarse else 0)

    @property
    def nbytes(self) -> int:
        return len(self) * self.bytes_per_day

    @property
    def chunk_of_day(self) -> np.ndarray:
        """(T,) the store's time chunk each day lies in."""
        return self.times // self.chunk_days

    def subset(self, index) -> "ZarrFields":
        return replace(self, times=self.times[np.asarray(index)], **self._labels(index))

    def _open(self) -> xr.Dataset:
        if self._store is None:  # zarr's own lazy indexing, no dask: a read takes only the chunks it needs
            self._store = xr.open_zarr(self.path, chunks=None, decode_timedelta=False)
        return self._store

    def _read_array(self, name: str, index) -> torch.Tensor:
        uniq, back = np.unique(self.times[np.asarray(index, dtype=np.int64)], return_inverse=True)
        return torch.from_numpy(self._open()[name].isel(time=uniq).values.astype("float32")[back])

    def condition(self, index) -> torch.Tensor:
        """The normalised condition (N, C, h, w) of the days ``index``, read without their fields."""
        return self._read_array("condition", index)

    def coarse(self, index) -> torch.Tensor | None:
        """The coarse precipitation (N, h, w) mm/day of the days ``index``, or None."""
        return self._read_array("coarse_pr", index) if self.has_coarse else None

    def days(self, index) -> FieldData:
        """The days ``index`` in memory (read from the store)."""
        return self.read(index)

    def fields_mm(self, index) -> np.ndarray:
        """The fields (N, H, W) mm/day, NaN invalid, of the days ``index``."""
        return self.read(index).pr_mm[:, 0].cpu().numpy()

    def read(self, index=None) -> FieldData:
        """The days ``index`` (positions in this object; None: all) in memory, in that order."""
        index = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        pr = self._read_array("pr", index).numpy()  # (N, H, W) mm/day
        valid = np.isfinite(pr) & self.mask[None]
        x = self.transform.forward(np.where(valid, pr, 0.0)).astype("float32")
        meta = {f.name: getattr(self, f.name) for f in fields(FieldMeta)}
        return FieldData(**{**meta, **self._labels(index)},
                         x=torch.from_numpy(x[:, None]), valid=torch.from_numpy(valid[:, None]),
                         y=self.condition(index), coarse_mm=self.coarse(index))


def open_fields(dataset: str, thresholds: str, events: str | None = None, splits=None) -> ZarrFields:
    """``dataset.zarr`` (+ thresholds map, + events table) as :class:`ZarrFields`: metadata and labels read,
    the fields left on disk.

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
    mask = ds["mask"].values.astype(bool)
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
    chunks = ds["pr"].encoding.get("chunks") or (len(split),)
    cond = ds["condition"]
    return ZarrFields(
        is_event=torch.from_numpy(is_event),
        split=split[idx],
        dates=dates,
        thr_mm=torch.from_numpy(thr[None, None]),
        transform=TargetTransform.from_attrs(ds.attrs),
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
        path=str(dataset),
        times=idx.astype(np.int64),
        mask=mask,
        chunk_days=max(1, int(chunks[0])),
        fine_shape=tuple(int(n) for n in mask.shape),
        coarse_shape=tuple(int(n) for n in cond.shape[-2:]),
        n_channels=int(cond.shape[1]),
        has_coarse="coarse_pr" in ds,
    )


def held_or_streamed(fields: ZarrFields, budget: int, stage: str) -> FieldData | ZarrFields:
    """``fields`` read into memory when their tensors fit ``budget`` bytes, else left on disk (logged)."""
    held = fields.nbytes <= budget
    log.info("%s: %d days, %.2f GB as tensors (budget %.2f GB): %s", stage, len(fields), fields.nbytes / 1e9,
             budget / 1e9, "held in memory" if held else "read from the store as needed")
    return fields.read() if held else fields


def load_fields(dataset: str, thresholds: str, events: str | None = None, splits=None) -> FieldData:
    """``dataset.zarr`` (+ thresholds map, + events table) in memory as tensors (:func:`open_fields`, then every
    day read)."""
    return open_fields(dataset, thresholds, events, splits).read()


#: Days of a pass over data in memory taken together (a streamed pass takes the store's time chunk).
MEMORY_BLOCK_DAYS = 128


def block_days_for(source: FieldData | ZarrFields, batch_size: int) -> int:
    """Days a pass over ``source`` takes at once: whole batches of about one time chunk of the store
    (:data:`MEMORY_BLOCK_DAYS` in memory), so a pass in blocks cuts the same batches as a pass over all the days
    and holds what it derives from one block only."""
    chunk = MEMORY_BLOCK_DAYS if isinstance(source, FieldData) else source.chunk_days
    return batch_size * max(1, -(-chunk // batch_size))


class DayFields:
    """A split's fields in mm/day, indexed like a (T, h, w) array (``fields[idx]`` for integer arrays of any
    shape gives ``idx.shape + (h, w)``) but read from the store only for the days asked for.

    ``finish`` turns read fields (N, H, W) (NaN invalid) into what the user of the array sees (e.g. cropped to
    the original grid, NaN as 0); its output for ``source.read(...)`` must be the same as for the in-memory
    fields.  ``dtype`` and ``shape`` describe that output.  Each read decompresses the time chunks of the
    days asked for (an analog ensemble of M members over B days reads up to M x B chunks).
    """

    ndim = 3

    def __init__(self, source: ZarrFields, finish: Callable[[np.ndarray], np.ndarray]):
        self.source, self.finish = source, finish
        one = finish(source.fields_mm([0])) if len(source) else np.empty((0, 0, 0), "float32")
        self.shape = (len(source), *one.shape[1:])
        self.dtype = one.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise TypeError(f"DayFields takes integer day indices, got {index.dtype}")
        uniq, back = np.unique(index.ravel(), return_inverse=True)
        fields_ = self.finish(self.source.fields_mm(uniq))
        return fields_[back].reshape(*index.shape, *fields_.shape[1:])


def day_blocks(source: FieldData | ZarrFields, days: int) -> Iterator[tuple[np.ndarray, FieldData]]:
    """``source`` in order, ``days`` consecutive days at a time: (positions, those days in memory)."""
    for start in range(0, len(source), max(1, int(days))):
        index = np.arange(start, min(start + days, len(source)))
        yield index, source.days(index)


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


def epoch_plan(source: ZarrFields, oversample: float, generator: torch.Generator, batch_size: int,
               buffer_days: int) -> list[list[torch.Tensor]]:
    """The batches of one streamed epoch, grouped by the buffer that reads them (positions in ``source``).

    The rules, so that a day's chunk is read once per epoch and memory holds one buffer per reader:

    1. How often each day is drawn: once (``oversample == 1``), or as many times as it comes up in ``len(source)``
       draws with replacement, heavy days weighted ``oversample`` (the in-memory path's law, :func:`epoch_indices`).
    2. The store's time chunks that hold ``source``'s days are shuffled; consecutive ones form a buffer until it
       holds at least ``buffer_days`` days.
    3. Within a buffer its days (each as often as drawn) are shuffled, after the days the previous buffer left
       over; they are cut into batches of ``batch_size`` and the remainder (fewer than ``batch_size``) carries
       to the next buffer, so only the epoch's last batch is short.

    Every random choice comes from ``generator``, in this order: the draws, the chunk order, each buffer's shuffle.
    """
    n = len(source)
    counts = np.ones(n, np.int64)
    if oversample != 1.0 and bool(source.is_event.any()):
        weights = torch.where(source.is_event.cpu(), float(oversample), 1.0).double()
        counts = np.bincount(torch.multinomial(weights, n, replacement=True, generator=generator).numpy(), minlength=n)
    chunk = source.chunk_of_day
    ids = np.unique(chunk)
    ids = ids[torch.randperm(len(ids), generator=generator).numpy()]
    groups, current, size = [], [], 0
    for c in ids:
        current.append(c)
        size += int(counts[chunk == c].sum())
        if size >= buffer_days:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    plan, carry = [], np.empty(0, np.int64)
    for group in groups:
        days = np.flatnonzero(np.isin(chunk, group))
        days = np.repeat(days, counts[days])
        days = np.concatenate([carry, days[torch.randperm(len(days), generator=generator).numpy()]])
        full = len(days) // batch_size * batch_size
        plan.append([torch.from_numpy(days[i : i + batch_size]) for i in range(0, full, batch_size)])
        carry = days[full:]
    if len(carry):
        plan.append([torch.from_numpy(carry)])
    return [batches for batches in plan if batches]


class StreamedEpoch(torch.utils.data.IterableDataset):
    """One epoch of :func:`epoch_plan` read from the store: yields ``(positions, x, valid, y, coarse_mm)`` per
    batch (``coarse_mm`` None without a coarse channel), this rank's share ``positions[rank::world]`` of it.

    Each buffer is read once (:meth:`ZarrFields.read` of its days), then cut into its batches.  With ``W`` loader
    workers, worker ``w`` reads buffers ``w, w + W, ...`` and a ``DataLoader`` takes one batch from each worker in
    turn, so the order of batches is the plan's for 0 or 1 worker and interleaved by buffer otherwise; the
    batches themselves are the plan's, each exactly :func:`make_batch` of the in-memory data at its positions.
    """

    def __init__(self, source: ZarrFields, plan: list[list[torch.Tensor]], rank: int = 0, world: int = 1):
        super().__init__()
        self.source, self.plan, self.rank, self.world = source, plan, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for batches in self.plan[worker::workers]:
            days = np.unique(torch.cat(batches).numpy())
            block = self.source.read(days)
            for index in batches:
                share = index[self.rank :: self.world]
                at = torch.from_numpy(np.searchsorted(days, share.numpy()))
                yield (share, block.x[at], block.valid[at], block.y[at],
                       None if block.coarse_mm is None else block.coarse_mm[at])


def stream_batches(source: ZarrFields, plan: list[list[torch.Tensor]], workers: int, rank: int = 0,
                   world: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over :class:`StreamedEpoch` with ``workers`` reader processes (0: read in this process)."""
    return torch.utils.data.DataLoader(StreamedEpoch(source, plan, rank, world), batch_size=None,
                                       num_workers=min(int(workers), len(plan)), pin_memory=pin_memory)


@dataclass
class Batch:
    """One batch; dims as in the module docstring with T -> B."""

    x: torch.Tensor
    valid: torch.Tensor
    y: torch.Tensor
    coarse_mm: torch.Tensor | None
    thr_x: torch.Tensor  # (1 or B, 1, H, W)
    tail_x: torch.Tensor | None = None  # (1 or B, 1, H, W): the twCRPS threshold, model space
    window: Window | None = None  # a patch of each field (train.patch_size): x, valid, thr_x, tail_x are that window

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


# ----------------------------------------------------------------------------- patches


class PatchSampler:
    """Random patches of ``size`` cells for ``train.patch_size``, placed where the data are.

    A patch's top-left corner lies on the lattice of multiples of ``multiple`` (``2**depth``, so every scale of
    the patch is a window of the field's own cells) and it is admitted when at least ``min_valid`` of its
    cells are in ``region`` (cells with data on some train day).  Every admitted place is equally likely.

    Raises
    ------
    ValueError
        The patch does not fit the grid, is not a multiple of ``multiple``, or no place meets ``min_valid``
        (the message gives the best fraction found).
    """

    def __init__(self, region: np.ndarray, size: tuple[int, int], multiple: int, min_valid: float):
        region = np.asarray(region, dtype=bool)
        H, W = region.shape
        h, w = (int(v) for v in size)
        if h > H or w > W or h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"train.patch_size {[h, w]} must be multiples of 2**depth = {multiple} no larger "
                             f"than the (padded) grid {[H, W]}")
        tops, lefts = np.arange(0, H - h + 1, multiple), np.arange(0, W - w + 1, multiple)
        integral = np.pad(region.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        t, l = np.meshgrid(tops, lefts, indexing="ij")
        inside = integral[t + h, l + w] - integral[t, l + w] - integral[t + h, l] + integral[t, l]
        fraction = inside / (h * w)
        ok = fraction >= min_valid
        if not ok.any():
            raise ValueError(f"no {h} x {w} patch on the {multiple}-cell lattice has {min_valid:.0%} of its cells "
                             f"with data (best {fraction.max():.0%}); lower train.patch_min_valid or enlarge "
                             "train.patch_size")
        self.size = (h, w)
        self.offsets = torch.from_numpy(np.stack([t[ok], l[ok]], axis=1).astype(np.int64))  # (K, 2)

    def __len__(self) -> int:
        return len(self.offsets)

    def draw(self, n: int, g: torch.Generator) -> Window:
        """``n`` places, independently and uniformly over the admitted ones (from ``g``)."""
        at = self.offsets[torch.randint(len(self.offsets), (n,), generator=g)]
        return Window(at[:, 0].clone(), at[:, 1].clone(), self.size)

    def crop(self, batch: Batch, g: torch.Generator) -> Batch:
        """``batch`` with a patch of every sample: the fields, validity and threshold maps are cut to it.  The
        coarse precipitation is dropped: the mass term compares it with the whole domain's mean, not a patch's."""
        window = self.draw(batch.x.shape[0], g)
        cut = lambda t: None if t is None else window.crop(t)  # noqa: E731
        return Batch(cut(batch.x), cut(batch.valid), batch.y, None, cut(batch.thr_x), cut(batch.tail_x), window)


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
