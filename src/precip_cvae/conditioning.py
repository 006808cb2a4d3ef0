"""Static fine-grid channels of the condition, fitted on the train split only.

The model's fine-grid condition (``model.conditioning: fine``) stacks the predictors,
interpolated to the target grid, with these static channels; the training stage fits
them once and stores them in the model (a buffer, so every checkpoint carries them
and evaluation or generation never refit them on other days):

========================  =============================================================
``valid_fraction``        share of train days on which the pixel is valid
``clim_x``                train mean of the transformed target (model space)
``wet_frequency``         share of train days with ``pr >= wet_threshold``
``threshold_x``           the heavy-event threshold map of ``detect_events`` (model space)
``tail_x``                the local wet-day percentile ``train.loss.tail_percentile``
                          of the train split (model space; the twCRPS term's ``t``)
``lat``, ``lon``          grid coordinates scaled to [-1, 1]
``static_<name>``         user fields of ``data.static`` (orography, land fraction, ...)
========================  =============================================================

Each channel is standardised over the pixels valid on any train day (mean 0, std 1;
a constant channel becomes 0); pixels without data are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from .config import EventsConfig
from .data import FieldData, ZarrFields, day_blocks
from .events import wet_day_thresholds

__all__ = ["StaticFields", "fit_static", "tail_threshold", "STATIC_BASE_CHANNELS", "condition_sampling_grid"]

STATIC_BASE_CHANNELS = ("valid_fraction", "clim_x", "wet_frequency", "threshold_x", "tail_x", "lat", "lon")


@dataclass(frozen=True)
class StaticFields:
    """Static channels (S, H, W), standardised, and the raw tail threshold (1, 1, H, W) in model space."""

    values: torch.Tensor
    names: tuple[str, ...]
    tail_x: torch.Tensor
    region: np.ndarray | None = None  # (H, W) bool: cells with data on some train day


def _scaled_coord(values, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64) if values is not None else np.arange(n, dtype=np.float64)
    lo, hi = float(np.min(v)), float(np.max(v))
    return np.zeros(n) if hi == lo else 2.0 * (v - lo) / (hi - lo) - 1.0


#: Days of a streamed train split held at once while the static channels are fitted (bytes of tensors).
STATIC_BLOCK_BYTES = 256 * 2**20


def _block_days(train: FieldData | ZarrFields) -> int:
    """As many days as fit :data:`STATIC_BLOCK_BYTES` (in memory) or as many whole time chunks (streamed)."""
    if isinstance(train, FieldData):
        return max(1, STATIC_BLOCK_BYTES // max(1, train.nbytes // max(1, len(train))))
    per_chunk = train.chunk_days * train.bytes_per_day
    return train.chunk_days * max(1, STATIC_BLOCK_BYTES // max(1, per_chunk))


def _pr_blocks(train: FieldData | ZarrFields, days: int):
    """The train days' mm/day fields (NaN invalid) as a dask array of blocks of ``days`` days, each block read
    when the thresholds' passes reach it (``fields_mm``, the same fields in memory or from the store)."""
    import dask
    import dask.array as dsa

    h, w = train.fine_shape

    parts = [dsa.from_delayed(dask.delayed(train.fields_mm)(np.arange(start, min(start + days, len(train)))),
                              shape=(min(start + days, len(train)) - start, h, w), dtype=np.float32)
             for start in range(0, len(train), days)]
    return dsa.concatenate(parts, axis=0)


def tail_threshold(train: FieldData | ZarrFields, percentile: float, wet_threshold: float = 1.0,
                   min_wet_days: int = 30, mask: np.ndarray | None = None) -> torch.Tensor:
    """The local wet-day ``percentile`` of the train days, (1, 1, H, W) in model space.

    Pixels with fewer than ``min_wet_days`` wet days take the pooled value
    (:func:`precip_cvae.events.wet_day_thresholds`, which streams over the days); +inf where the pixel has no
    data (``mask``: the pixels valid on any train day, computed when not given).
    """
    import dask

    pr = _pr_blocks(train, _block_days(train))
    if mask is None:
        mask = np.asarray(np.isfinite(pr).any(axis=0).compute(scheduler="synchronous"))
    ecfg = EventsConfig(percentile=float(percentile), wet_threshold=float(wet_threshold),
                        min_wet_days=int(min_wet_days))
    region = xr.DataArray(np.asarray(mask).astype("int8"), dims=("lat", "lon"))
    with dask.config.set(scheduler="synchronous"):  # one block in memory at a time
        thr = wet_day_thresholds(xr.DataArray(pr, dims=("time", "lat", "lon")), region, ecfg).values  # (H, W)
    t = torch.from_numpy(np.asarray(thr, dtype=np.float32))[None, None]
    tx = train.transform.forward(torch.nan_to_num(t, nan=0.0))
    return torch.where(torch.isfinite(t), tx, torch.full_like(tx, float("inf")))


def _standardise(a: np.ndarray, region: np.ndarray) -> np.ndarray:
    a = np.where(region & np.isfinite(a), a, np.nan)
    if not np.isfinite(a).any():
        return np.zeros_like(a)
    mean, std = np.nanmean(a), np.nanstd(a)
    out = (a - mean) / std if std > 0 else a - mean
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def fit_static(data: FieldData | ZarrFields, tail_percentile: float = 90.0, wet_threshold: float = 1.0,
               min_wet_days: int = 30) -> StaticFields:
    """Fit the static channels on the train days of ``data`` (other splits are never read).

    In memory or streamed from the store (:class:`ZarrFields`, a block of whole time chunks at a time): the
    same sums over the same tensors, so the same channels.

    Parameters
    ----------
    data : FieldData or ZarrFields
        The data set (any splits; only ``split == 'train'`` days are used).
    tail_percentile, wet_threshold, min_wet_days
        The ``tail_x`` channel's local wet-day percentile and its fallback.

    Returns
    -------
    StaticFields
    """
    train = data.select("train")
    H, W = train.fine_shape
    n_valid, x_sum, n_wet = np.zeros((H, W)), np.zeros((H, W)), np.zeros((H, W))
    for _, block in day_blocks(train, _block_days(train)):
        x = block.x[:, 0].double().cpu().numpy()  # (T, H, W) model space, 0 invalid
        valid = block.valid[:, 0].cpu().numpy()
        pr = block.pr_mm[:, 0].double().cpu().numpy()
        n_valid += valid.sum(axis=0)
        x_sum += (x * valid).sum(axis=0)
        n_wet += (np.nan_to_num(pr, nan=0.0) >= wet_threshold).sum(axis=0)
    region = n_valid > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        valid_fraction = n_valid / max(len(train), 1)
        clim = np.where(region, x_sum / np.maximum(n_valid, 1), np.nan)
        wet = np.where(region, n_wet / np.maximum(n_valid, 1), np.nan)
    thr_x = train.thr_x[0, 0].double().cpu().numpy()
    tail_x = tail_threshold(train, tail_percentile, wet_threshold, min_wet_days, mask=region)
    lat = np.broadcast_to(_scaled_coord(data.lat, H)[:, None], (H, W))
    lon = np.broadcast_to(_scaled_coord(data.lon, W)[None, :], (H, W))
    channels = [valid_fraction, clim, wet, thr_x, tail_x[0, 0].double().numpy(), lat, lon]
    names = list(STATIC_BASE_CHANNELS)
    if data.static is not None:
        for name, field in zip(data.static_names, data.static.double().cpu().numpy()):
            channels.append(field)
            names.append(f"static_{name}")
    values = np.stack([_standardise(np.asarray(c, dtype=np.float64), region) for c in channels])
    return StaticFields(torch.from_numpy(values.astype(np.float32)), tuple(names), tail_x, region)


def condition_sampling_grid(data: FieldData) -> np.ndarray:
    """Where each fine cell lies in the predictor (condition) grid, for ``model.condition_interpolation:
    geographic``: (H, W, 2) with (x, y) = the fractional column and row of the cell's position scaled to
    [-1, 1] (``F.grid_sample`` with ``align_corners=True``; clamped to the grid's edge cells).

    The position is the cell's own latitude and longitude (``cell_lat``/``cell_lon`` of a rotated-pole or
    projected target) when the condition grid is geographic, else the fine grid's axes
    (:func:`precip_cvae.grid.fine_positions`).  Sampling the predictors there with bilinear weights is
    :func:`precip_cvae.grid.bilinear` of the predictor grid at the same points.
    """
    from .grid import fine_positions, fractional_index

    lat, lon = fine_positions(data.lat, data.lon, data.cells or {}, data.condition_attrs or {})
    if lat.ndim == 1:
        lat, lon = np.meshgrid(lat, lon, indexing="ij")
    fy, fx = fractional_index(data.clat, lat), fractional_index(data.clon, lon)
    scale = lambda f, n: 2.0 * f / (n - 1) - 1.0 if n > 1 else np.zeros_like(f)  # noqa: E731
    return np.stack([scale(fx, data.clon.size), scale(fy, data.clat.size)], axis=-1).astype("float32")
