"""``augmented_training_set.zarr``: the real train days and the samples in the layout of ``dataset.zarr``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .. import cf
from ..config import GenerateConfig
from ..io import open_zarr, write_zarr
from ..split import format_times


def write_training_set(ds: xr.Dataset, augmented: Path, path: Path, cfg: GenerateConfig, attrs: dict) -> None:
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
    write_zarr(combined, path)
