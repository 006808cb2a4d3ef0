"""Rule ``pool_ensembles`` (``preprocess.split.method: kfold_years``): the held-out days of every fold in one cache.

Fold k's ``sample_ensembles`` cache holds its val and test days, sampled by the model trained on
fold k's train years only.  :func:`pool_ensembles` concatenates, for each split, the days of every
fold (sorted by date) into a cache of the same layout (:mod:`precip_cvae.evaluate.sample`), so the
``evaluate`` rule, the figures and any independent reader score it as they score a fixed split.
Over the folds every year block is test once and val once (:func:`precip_cvae.split.fold_roles`),
so the pooled ``test`` and the pooled ``val`` each hold every day of the record exactly once; this
is checked against the folds' data sets, and a day held out by two folds is an error.

Added to the layout: ``{split}/truth`` has ``fold`` (time) int32, the fold whose model and whose
train-only statistics (thresholds, normalisation, transform) scored the day; the root attribute
``evaluate_meta`` gains ``folds`` (per fold: the cache, the checkpoints and their epochs) and
``pooled: true``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from .. import io
from .names import TRUTH

log = logging.getLogger(__name__)

FOLD_VARIABLE = "fold"
_SAME_ACROSS_FOLDS = ("experiment", "splits", "sources", "members", "primary", "calendar")


def _metas(folds: Sequence[str]) -> list[dict]:
    metas = [json.loads(io.open_zarr_group(path).attrs["evaluate_meta"]) for path in folds]
    for path, meta in zip(folds[1:], metas[1:]):
        for key in _SAME_ACROSS_FOLDS:
            if meta.get(key) != metas[0].get(key):
                raise io.InputError(f"{path}: evaluate_meta {key!r} is {meta.get(key)!r}, but {folds[0]} has "
                                    f"{metas[0].get(key)!r}; every fold must be sampled with the same settings")
    return metas


def _check_coverage(split: str, dates: np.ndarray, datasets: Sequence[str]) -> None:
    """Every day of the record held out once: no day twice, and as many days as the record has."""
    unique, counts = np.unique(dates, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1]
        raise io.InputError(f"pooled {split}: {twice.size} day(s) are held out by more than one fold (first "
                            f"{twice[0]}); the folds of preprocess.split must be disjoint")
    if datasets:
        ds = io.open_zarr(datasets[0])
        n_record = int(ds.sizes["time"])
        if dates.size != n_record:
            raise io.InputError(f"pooled {split}: {dates.size} days over the folds, but the record "
                                f"({datasets[0]}) holds {n_record}; every day must be held out exactly once")


def pool_ensembles(folds: Sequence[str], out: str | Path, datasets: Sequence[str] = ()) -> Path:
    """Concatenate the caches of ``folds`` (fold k at position k) split by split; write ``out`` atomically.

    Parameters
    ----------
    folds : the ``ensembles.zarr`` of each fold, in fold order
    out : the pooled ``ensembles.zarr``
    datasets : the folds' ``dataset.zarr`` (optional): the pooled days of each split must number
        the days of the record

    Raises
    ------
    precip_cvae.io.InputError
        Caches sampled with different settings, a day held out twice, or days missing.
    """
    metas = _metas(folds)
    meta = dict(metas[0])
    meta["pooled"] = True
    meta["folds"] = [{"fold": k, "cache": str(path), "checkpoints": m["checkpoints"]}
                     for k, (path, m) in enumerate(zip(folds, metas))]
    root = io.open_zarr_group(folds[0])
    masks = [io.open_zarr_group(path)["mask"].values for path in folds]
    for path, mask in zip(folds[1:], masks[1:]):
        if mask.shape != masks[0].shape or not np.array_equal(mask, masks[0]):
            raise io.InputError(f"{path}: the mask differs from that of {folds[0]}; folds must share one grid")
    root_ds = root[["mask"]].load()
    root_ds.attrs = {**root.attrs, "evaluate_meta": json.dumps(meta)}
    with io.atomic_path(out) as store:
        io.write_zarr_group(root_ds, store)
        for split in meta["splits"]:
            truths = [io.open_zarr_group(path, f"{split}/{TRUTH}") for path in folds]
            truths = [t.assign({FOLD_VARIABLE: ("time", np.full(t.sizes["time"], k, dtype="int32"),
                                                {"long_name": "fold whose model and train statistics scored the day"})})
                      for k, t in enumerate(truths)]
            truth = xr.concat(truths, dim="time", data_vars="all", coords="minimal", compat="override")
            dates = truth["time"].values.astype(str)
            _check_coverage(split, dates, datasets)
            order = np.argsort(dates, kind="stable")
            chunk = {"time": max(1, int(truths[0].chunks["time"][0])) if truths[0].chunks else 64}
            io.write_zarr_group(truth.isel(time=order).chunk(chunk), store, f"{split}/{TRUTH}")
            for source in meta["sources"]:
                parts = [io.open_zarr_group(path, f"{split}/{source}") for path in folds]
                pooled = xr.concat(parts, dim="time", data_vars="all", coords="minimal", compat="override")
                io.write_zarr_group(pooled.isel(time=order).chunk({"member": -1, **chunk}), store,
                                    f"{split}/{source}")
            log.info("%s: %d days pooled from %d folds (%s)", split, dates.size, len(folds),
                     ", ".join(str(t.sizes["time"]) for t in truths))
        io.consolidate_zarr(store)
    log.info("wrote %s: the held-out days of %d folds, sources %s", out, len(folds), meta["sources"])
    return Path(out)
