"""Training at E-OBS-Europe size: peak memory and throughput, streamed from the store against in memory.

Goal (issue 25): the train_cvae stage in bounded memory when the record doubles (peak RSS ratio <= 1.25 from
5 to 10 years, absolute <= 6 GB on this machine), with its throughput, and where the in-memory path also runs,
the ratio between the two.

    python benchmarks/continental.py                       # 465 x 705, 5 and 10 years (2.4 and 4.8 GB of rain)
    python benchmarks/continental.py --years 1 2 --nlat 120 --nlon 160 --steps 4   # a quick look
    python benchmarks/continental.py --smoke                   # seconds; used by the tests

Data (written here, not by preprocess, in the layout preprocess writes): a 0.1 deg grid padded to a multiple
of 8 (472 x 712), a sea mask (about 45 % sea), wet days on 10-50 % of days by place with a day-to-day
large-scale modulation, gamma amounts (shape 0.75, scale 2-8 mm/day), three predictors on a 2 deg grid,
time chunks of 128 days, 70/15/15 % train/val/test by time; thresholds the per-pixel gamma P99; 2 % of days
flagged heavy.  What each child measures, in its own process: the stage's set-up (open, the static channels
fitted on every train day), ``--steps`` training steps of ``--batch`` days through the stage's own batch
iterator (``train.epoch_batches``) with the tiny model, and validation on ``--val-days`` days with 2 members.
Peak RSS is the training process's; the reader processes' largest peak is printed beside it.  With
``--stages``, at each size the streamed training's model is then sampled on the whole test split
(sample_ensembles: the cVAE, climatology and analogs, ``--members``), scored (evaluate) and used to generate
``--members`` samples for every heavy train day (generate, the memorisation check against every train field),
each stage in its own process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_child_argument, emit, free_disk_gb, machine, run_as_child, run_child, verdict

RSS_RATIO = 1.25
RSS_LIMIT_MB = 6 * 1024
CHUNK = 128


def _grid(nlat: int, nlon: int) -> tuple[int, int]:
    return -(-nlat // 8) * 8, -(-nlon // 8) * 8


def child_write(root: str, years: str, nlat: str, nlon: str) -> None:
    """dataset.zarr, thresholds.nc and events.csv of ``years`` years on an ``nlat`` x ``nlon`` land-sea grid."""
    import pandas as pd
    import xarray as xr
    from scipy import stats

    from precip_cvae.split import format_times

    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    n_lat, n_lon = int(nlat), int(nlon)
    H, W = _grid(n_lat, n_lon)
    days = 365 * int(years)
    rng = np.random.default_rng(int(years))
    lat = 34.0 + 0.1 * np.arange(H)
    lon = -25.0 + 0.1 * np.arange(W)
    yy, xx = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    land = (np.sin(7 * xx + 2) * np.cos(5 * yy) + 0.6 * np.sin(13 * yy * xx + 1)) > -0.15
    land[n_lat:], land[:, n_lon:] = False, False  # the padding
    p_wet = 0.1 + 0.4 * yy * (0.5 + 0.5 * np.cos(3 * xx))  # wetter to the north
    scale = 2.0 + 6.0 * (1 - xx) * (0.5 + 0.5 * yy)  # heavier to the west
    time = pd.date_range("1990-01-01", periods=days, freq="D")
    clat, clon = np.arange(34.0, 34.0 + 0.1 * H + 2, 2.0), np.arange(-25.0, -25.0 + 0.1 * W + 2, 2.0)
    n_split = [int(days * 0.7), int(days * 0.85)]
    split = np.array(["train"] * n_split[0] + ["val"] * (n_split[1] - n_split[0]) + ["test"] * (days - n_split[1]))
    import dask.array as dsa

    template = xr.Dataset(
        {"pr": (("time", "lat", "lon"), dsa.zeros((days, H, W), chunks=(CHUNK, H, W), dtype="float32")),
         "condition": (("time", "channel", "clat", "clon"),
                       dsa.zeros((days, 3, clat.size, clon.size), chunks=(CHUNK, 3, clat.size, clon.size),
                                 dtype="float32")),
         "mask": (("lat", "lon"), land.astype("int8")), "split": (("time",), split),
         "cond_mean": (("channel",), np.zeros(3)), "cond_std": (("channel",), np.ones(3))},
        coords={"time": time, "lat": lat, "lon": lon, "clat": clat, "clon": clon,
                "channel": ["psl", "hus850", "ta850"]},
        attrs={"target_transform": "log1p", "target_transform_scale": 1.0, "pad_lat": [0, H - n_lat],
               "pad_lon": [0, W - n_lon], "orig_nlat": n_lat, "orig_nlon": n_lon})
    template.to_zarr(root_p / "dataset.zarr", mode="w", compute=False)
    for start in range(0, days, CHUNK):
        n = min(CHUNK, days - start)
        coarse = rng.normal(size=(n, 3, clat.size, clon.size)).astype("float32")
        # the wet probability of the day: the first predictor's anomaly, smoothed onto the fine grid
        iy = np.minimum((np.arange(H) * 0.1 / 2.0).astype(int), clat.size - 1)
        ix = np.minimum((np.arange(W) * 0.1 / 2.0).astype(int), clon.size - 1)
        push = 1.0 / (1.0 + np.exp(-coarse[:, 0][:, iy][:, :, ix]))  # (n, H, W) in (0, 1)
        wet = rng.random((n, H, W)) < np.clip(p_wet[None] * 2 * push, 0, 1)
        amount = rng.gamma(0.75, 1.0, (n, H, W)).astype("float32") * scale[None].astype("float32") + 1.0
        pr = np.where(land[None], np.where(wet, amount, 0.0), np.nan).astype("float32")
        part = xr.Dataset({"pr": (("time", "lat", "lon"), pr),
                           "condition": (("time", "channel", "clat", "clon"), coarse)})
        part.to_zarr(root_p / "dataset.zarr", region={"time": slice(start, start + n)})
    thr = np.where(land, stats.gamma.ppf(0.99, 0.75) * scale + 1.0, np.nan).astype("float32")
    da = xr.DataArray(thr, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, name="threshold",
                      attrs={"wet_threshold_mm_day": 1.0, "min_wet_days": 30})
    da.to_dataset().to_netcdf(root_p / "thresholds.nc")
    pd.DataFrame({"date": format_times(time), "split": split,
                  "is_event": rng.random(days) < 0.02}).to_csv(root_p / "events.csv", index=False)
    emit({"days": days, "shape": [H, W], "land_fraction": float(land.mean()),
          "wet_fraction": float(np.nanmean(np.where(land[None], pr >= 1.0, np.nan))),
          "gb": days * H * W * 4 / 1e9})


def child_train(root: str, in_memory: str, steps: str, batch: str, val_days: str, threads: str,
                workers: str, patch: str = "0") -> None:
    """The stage's set-up, ``steps`` steps through its batch iterator, validation on ``val_days`` days.  With
    ``patch`` > 0: a local model on ``patch`` x ``patch`` patches, and one batch of val days sampled whole and by
    tiles (a quarter of the whole field's activations)."""
    import gc
    import resource

    import torch

    from precip_cvae import train
    from precip_cvae.config import LossConfig, ModelConfig, TrainConfig
    from precip_cvae.distributed import Dist
    from precip_cvae.logs import setup
    from precip_cvae.resources import limit_threads

    setup(None)
    patch = int(patch)
    label = in_memory + (f"_patch{patch}" if patch else "")
    paths = train.TrainPaths.in_dir(f"{root}/dataset.zarr", f"{root}/thresholds.nc", f"{root}/events.csv",
                                    f"{root}/train_{label}", f"{root}/resume_{label}")
    cfg = TrainConfig(epochs=1, batch_size=int(batch), val_members=2, num_threads=int(threads),
                      in_memory=in_memory == "true", loader_workers=int(workers), shuffle_buffer_days=256,
                      patch_size=(patch, patch) if patch else None,
                      loss=LossConfig(warmup_epochs=0, ensemble_members=2))
    model_cfg = ModelConfig(preset="tiny", context="local", context_cells=patch) if patch else ModelConfig(preset="tiny")
    with limit_threads(int(threads)):
        t0 = time.perf_counter()
        s = train._set_up(paths, model_cfg, cfg, "continental", Dist())
        setup_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        batches = train.epoch_batches(s, g)
        wait = compute = 0.0
        n = 0
        for step in range(int(steps)):
            t1 = time.perf_counter()
            b = next(batches)
            if s.patches is not None:
                b = s.patches.crop(b, g)
            t2 = time.perf_counter()
            train.train_step(s.net, s.opt, b, cfg, 1, s.train.transform, s.autocast)
            t3 = time.perf_counter()
            if step > 0:  # the first batch waits for the readers to start and fill their buffers
                wait, compute = wait + t2 - t1, compute + t3 - t2
                n += len(b.x)
        batches.close()
        del batches
        gc.collect()
        val = s.val.subset(np.arange(min(int(val_days), len(s.val))))
        t4 = time.perf_counter()
        scores = train.validate(s.eval_model, val, cfg, 0, s.device, int(batch))
        val_s = time.perf_counter() - t4
        tiles = _tiled_sampling(s.eval_model, val, int(batch)) if patch else {}
    if not patch:  # the later stages sample the whole-field model
        from precip_cvae import checkpoint

        checkpoint.save(s.snapshot(0), f"{root}/model_{in_memory}.pt")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    emit({"setup_s": setup_s, "samples_per_s": n / max(compute + wait, 1e-9), "input_wait": wait / max(compute, 1e-9),
          "val_fields_per_s": len(val) * 2 / val_s, "val_CRPS": scores["val_CRPS"], "train_days": len(s.train),
          "streamed": not isinstance(s.train, train.FieldData), "workers_peak_mb": children, **tiles})


def _tiled_sampling(model, val, batch: int) -> dict:
    """One batch of val days, 2 members, sampled whole and by the tiles of a quarter of the whole field's
    activations: seconds of each, the tile and the largest difference."""
    import torch

    from precip_cvae.data import make_batch

    days = val.read(np.arange(min(batch, len(val)))) if hasattr(val, "read") else val
    b = make_batch(days, torch.arange(min(batch, len(days))), val.thr_x, "cpu")
    whole_bytes = 1e12
    while model.tile_for(len(b.x), whole_bytes / 2) is None:  # about the whole field's activations
        whole_bytes /= 2
    tile = model.tile_for(len(b.x), whole_bytes / 4)
    out = {}
    with torch.no_grad():
        for name, t in (("whole", None), ("tiled", tile)):
            t0 = time.perf_counter()
            out[name] = model.sample(b.y, b.valid, 2, generator=torch.Generator().manual_seed(0), tile=t)
            out[f"{name}_s"] = time.perf_counter() - t0
    return {"tile": list(tile), "receptive_radius": model.receptive_radius(), "sample_whole_s": out["whole_s"],
            "sample_tiled_s": out["tiled_s"], "tiled_max_diff": float((out["whole"] - out["tiled"]).abs().max())}


def child_sample(root: str, members: str, threads: str) -> None:
    """sample_ensembles on the test split: the cVAE checkpoint of the streamed training, climatology, analogs."""
    from precip_cvae.config import EvaluateConfig
    from precip_cvae.evaluate import sample
    from precip_cvae.logs import setup

    setup(None)
    cfg = EvaluateConfig(members=int(members), splits=("test",), checkpoints=("best",),
                         baselines=("climatology", "analogs"), batch_size=32, device="cpu")
    paths = sample.SamplePaths(f"{root}/dataset.zarr", f"{root}/thresholds.nc", f"{root}/events.csv",
                               {"best": f"{root}/model_false.pt"}, f"{root}/ensembles.zarr")
    t0 = time.perf_counter()
    sample.sample_ensembles(paths, cfg, threads=int(threads), experiment="continental")
    import xarray as xr

    days = xr.open_zarr(paths.out, group="test/truth").sizes["time"]
    emit({"seconds": time.perf_counter() - t0, "fields": days * int(members) * 3})


def child_score(root: str, members: str) -> None:
    """evaluate's scores of the cache (every source, all and heavy days, bootstrap intervals)."""
    from precip_cvae.config import EvaluateConfig
    from precip_cvae.evaluate import report
    from precip_cvae.logs import setup

    setup(None)
    cfg = EvaluateConfig(members=int(members), splits=("test",), checkpoints=("best",),
                         baselines=("climatology", "analogs"))
    paths = report.ScorePaths.in_dir(ensembles=f"{root}/ensembles.zarr", dataset=f"{root}/dataset.zarr",
                                      train_log="", out_dir=f"{root}/evaluate")
    t0 = time.perf_counter()
    report.run(paths, cfg, experiment="continental")
    emit({"seconds": time.perf_counter() - t0})


def child_generate(root: str, members: str) -> None:
    """generate on the heavy train days (no NetCDF copy; memorisation against every train field)."""
    from precip_cvae import generate
    from precip_cvae.config import EventsConfig, GenerateConfig
    from precip_cvae.logs import setup

    setup(None)
    cfg = GenerateConfig(members=int(members), splits=("train",), batch_days=4, device="cpu",
                         filter_heavy=False)  # the cost of one pass of draws (a one-epoch model)
    paths = generate.GeneratePaths.in_dir(f"{root}/generate", f"{root}/model_false.pt", f"{root}/dataset.zarr",
                                          f"{root}/thresholds.nc", f"{root}/events.csv")
    t0 = time.perf_counter()
    out = generate.run(paths, cfg, EventsConfig())
    emit({"seconds": time.perf_counter() - t0, "samples": out["samples"]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--years", type=int, nargs=2, default=[5, 10])
    ap.add_argument("--nlat", type=int, default=465)
    ap.add_argument("--nlon", type=int, default=705)
    ap.add_argument("--steps", type=int, default=8, help="training steps (the first one is not timed)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--val-days", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--in-memory-years", type=int, default=None,
                    help="also run the in-memory path at this many years (default: the first of --years)")
    ap.add_argument("--workdir", default=None, help="where the data go (default: a temporary directory)")
    ap.add_argument("--stages", action="store_true",
                    help="also sample_ensembles (test split), evaluate and generate (heavy train days) at each size")
    ap.add_argument("--members", type=int, default=4, help="members of --stages")
    ap.add_argument("--patch", type=int, default=0,
                    help="also train a local model on patches of this many cells (and sample it by tiles)")
    ap.add_argument("--patch-batch", type=int, default=32, help="patches per step of --patch")
    ap.add_argument("--smoke", action="store_true", help="1 and 2 years of 40 x 48, 3 steps (for the tests)")
    add_child_argument(ap)
    args = ap.parse_args()
    if run_as_child(args, {"write": child_write, "train": child_train, "sample": child_sample, "score": child_score,
                           "generate": child_generate}):
        return 0
    if args.smoke:
        args.years, args.nlat, args.nlon, args.steps, args.val_days, args.threads = [1, 2], 40, 48, 3, 4, 1
        args.patch, args.patch_batch = 16, 8
    held_years = args.years[0] if args.in_memory_years is None else args.in_memory_years
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        need = 4 * args.years[1] * 365 * _grid(args.nlat, args.nlon)[0] * _grid(args.nlat, args.nlon)[1] * 1.6 / 1e9
        if free_disk_gb(tmp) < need:
            print(f"needs about {need:.0f} GB free under {tmp}; pass --workdir", file=sys.stderr)
            return 1
        print(f"# {machine()}; grid {args.nlat} x {args.nlon}, years {args.years}, {args.steps} steps of "
              f"{args.batch} days, {args.val_days} val days, {args.workers} reader(s), {args.threads} threads")
        rows = {}
        for years in args.years:
            root = f"{tmp}/y{years}"
            t0 = time.perf_counter()
            info = run_child([__file__, "--child", "write", root, str(years), str(args.nlat), str(args.nlon)])
            print(f"data {years} y: {info['days']} days {info['shape'][0]} x {info['shape'][1]}, land "
                  f"{info['land_fraction']:.2f}, wet {info['wet_fraction']:.2f}, {info['gb']:.2f} GB of rain as "
                  f"float32 (written in {time.perf_counter() - t0:.0f} s)", flush=True)
            paths = ["streamed"] + (["in memory"] if years == held_years else [])
            for path in paths:
                r = run_child([__file__, "--child", "train", root, "true" if path == "in memory" else "false",
                               str(args.steps), str(args.batch), str(args.val_days), str(args.threads),
                               str(args.workers)])
                rows[(years, path)] = r
                print(f"  {path:9s}: peak RSS {r['peak_rss_mb']:.0f} MB (readers {r['workers_peak_mb']:.0f} MB); "
                      f"set-up {r['setup_s']:.0f} s; {r['samples_per_s']:.2f} samples/s, input wait "
                      f"{100 * r['input_wait']:.1f} % of compute; validation {r['val_fields_per_s']:.2f} fields/s",
                      flush=True)
            if args.patch:
                r = run_child([__file__, "--child", "train", root, "false", str(args.steps), str(args.patch_batch),
                               str(args.val_days), str(args.threads), str(args.workers), str(args.patch)])
                rows[(years, "patches")] = r
                print(f"  patches  : {args.patch} x {args.patch}, {args.patch_batch} a step: peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB (readers {r['workers_peak_mb']:.0f} MB); {r['samples_per_s']:.2f} "
                      f"patches/s, input wait {100 * r['input_wait']:.1f} % of compute; sampling {args.batch} days "
                      f"x 2 members whole {r['sample_whole_s']:.1f} s, by tiles of {r['tile']} (margin "
                      f"{r['receptive_radius']}) {r['sample_tiled_s']:.1f} s, largest difference "
                      f"{r['tiled_max_diff']:.1e}", flush=True)
            if args.stages:
                m = str(args.members)
                for stage, extra in (("sample", [m, str(args.threads)]), ("score", [m]), ("generate", [m])):
                    r = run_child([__file__, "--child", stage, root, *extra])
                    rows[(years, stage)] = r
                    rate = (f"{r['fields'] / r['seconds']:.1f} fields/s" if "fields" in r else
                            f"{r['samples'] / r['seconds']:.2f} samples/s" if "samples" in r else "")
                    print(f"  {stage:9s}: peak RSS {r['peak_rss_mb']:.0f} MB; {r['seconds']:.0f} s {rate}", flush=True)
        small, large = rows[(args.years[0], "streamed")], rows[(args.years[1], "streamed")]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(f"streamed peak RSS {args.years[0]} -> {args.years[1]} years: {small['peak_rss_mb']:.0f} -> "
              f"{large['peak_rss_mb']:.0f} MB (x{ratio:.2f}; goal <= x{RSS_RATIO}): {verdict(ratio <= RSS_RATIO)}")
        if args.stages:
            for stage in ("sample", "score", "generate"):
                a, b = rows[(args.years[0], stage)], rows[(args.years[1], stage)]
                ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
                print(f"{stage} peak RSS {args.years[0]} -> {args.years[1]} years: {a['peak_rss_mb']:.0f} -> "
                      f"{b['peak_rss_mb']:.0f} MB (x{ratio:.2f}; goal <= x{RSS_RATIO}, <= {RSS_LIMIT_MB} MB): "
                      f"{verdict(ratio <= RSS_RATIO and b['peak_rss_mb'] <= RSS_LIMIT_MB)}")
        if args.patch:
            a, b = rows[(args.years[0], "patches")], rows[(args.years[1], "patches")]
            ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
            print(f"patch training peak RSS {args.years[0]} -> {args.years[1]} years: {a['peak_rss_mb']:.0f} -> "
                  f"{b['peak_rss_mb']:.0f} MB (x{ratio:.2f}; goal <= x{RSS_RATIO}, <= {RSS_LIMIT_MB} MB): "
                  f"{verdict(ratio <= RSS_RATIO and b['peak_rss_mb'] <= RSS_LIMIT_MB)}")
        worst = max(r["peak_rss_mb"] + r["workers_peak_mb"] * args.workers for k, r in rows.items()
                    if k[1] in ("streamed", "patches"))
        print(f"largest streamed peak, training process + readers: {worst:.0f} MB (goal <= {RSS_LIMIT_MB} MB): "
              f"{verdict(worst <= RSS_LIMIT_MB)}")
        if (held_years, "in memory") in rows:
            held, streamed = rows[(held_years, "in memory")], rows[(held_years, "streamed")]
            print(f"{held_years} years, in memory / streamed: peak RSS {held['peak_rss_mb']:.0f} / "
                  f"{streamed['peak_rss_mb']:.0f} MB (x{held['peak_rss_mb'] / streamed['peak_rss_mb']:.2f}), "
                  f"samples/s {held['samples_per_s']:.2f} / {streamed['samples_per_s']:.2f} "
                  f"(x{held['samples_per_s'] / streamed['samples_per_s']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
