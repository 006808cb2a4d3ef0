"""Training throughput and input-pipeline overhead on CPU (or CUDA when present).

For each preset, at its batch size, it times:
  * a real epoch slice: sampling indices, gathering batches from the in-memory
    tensors, augmenting, and the optimisation step (what train_cvae does);
  * the same number of steps on one pre-made batch (no input pipeline at all).
The overhead ratio real / pre-made is the input pipeline's cost (goal <= 1.05).

    python benchmarks/train_throughput.py                       # small preset, demo-sized data
    python benchmarks/train_throughput.py --presets tiny small medium seed --steps 10
    python benchmarks/train_throughput.py --smoke               # seconds; used by the tests

Data: results/demo/preprocess/dataset.zarr when it exists (after `make demo`), else a
demo-like data set generated into a temporary directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from precip_cvae import demo, events, preprocess
from precip_cvae.config import DataConfig, DemoConfig, EventsConfig, LossConfig, ModelConfig, PreprocessConfig, TrainConfig, VariableSource
from precip_cvae.data import augment, epoch_indices, load_fields, make_batch
from precip_cvae.model import CVAE, count_parameters
from precip_cvae.train import _nullcontext, build_optimizer, train_step

BATCH = {"tiny": 32, "small": 32, "medium": 16, "seed": 8}


def prepare(root: Path, years: int, size: int) -> tuple[str, str, str]:
    existing = Path("results/demo/preprocess/dataset.zarr")
    if existing.exists() and size == 64 and years >= 10:
        return str(existing), "results/demo/events/thresholds.nc", "results/demo/events/events.csv"
    demo.write_demo_data(DemoConfig(years=years, nlat=size, nlon=size, nclat=size // 4, nclon=size // 4), root / "raw")
    data = DataConfig(target=VariableSource(str(root / "raw/target/*.nc"), "pr"),
                      predictors=tuple(VariableSource(str(root / "raw/predictors/*.nc"), v) for v in ("psl", "hus850", "ta850")))
    preprocess.run(data, PreprocessConfig(), str(root / "d.zarr"))
    events.run(str(root / "d.zarr"), EventsConfig(), str(root / "t.nc"), str(root / "e.csv"))
    return str(root / "d.zarr"), str(root / "t.nc"), str(root / "e.csv")


def bench(preset: str, data, steps: int, device) -> dict:
    torch.manual_seed(0)
    bs = BATCH[preset]
    cfg = TrainConfig(batch_size=bs, loss=LossConfig(warmup_epochs=0))
    model = CVAE(ModelConfig(preset=preset), data.y.shape[1], tuple(data.x.shape[-2:]), tuple(data.y.shape[-2:])).to(device)
    opt = build_optimizer(model, cfg)
    thr_x = data.thr_x.to(device)
    g = torch.Generator().manual_seed(0)
    order = epoch_indices(data.is_event, 1.0, g)
    n = len(order)
    ctx = _nullcontext() if device.type == "cpu" else torch.autocast("cuda", dtype=torch.bfloat16)

    def real_steps():
        for i in range(steps):
            idx = order[(i * bs) % (n - bs): (i * bs) % (n - bs) + bs]
            batch = augment(make_batch(data, idx, thr_x, device), cfg.augment, g, cfg)
            train_step(model, opt, batch, cfg, 1, data.transform, ctx)

    fixed = make_batch(data, order[:bs], thr_x, device)

    def premade_steps():
        for _ in range(steps):
            train_step(model, opt, fixed, cfg, 1, data.transform, ctx)

    real_steps() if steps <= 3 else [train_step(model, opt, fixed, cfg, 1, data.transform, ctx) for _ in range(2)]
    timings = {}
    for name, fn in (("premade", premade_steps), ("real", real_steps), ("premade2", premade_steps), ("real2", real_steps)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - t0
    real = min(timings["real"], timings["real2"])
    premade = min(timings["premade"], timings["premade2"])
    return {"preset": preset, "params": count_parameters(model), "batch": bs, "steps": steps,
            "samples_per_s": steps * bs / real, "premade_samples_per_s": steps * bs / premade,
            "overhead_ratio": real / premade}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        years, size = (1, 16) if args.smoke else (10, 64)
        steps = 2 if args.smoke else args.steps
        presets = ["tiny"] if args.smoke else args.presets
        ds, thr, ev = prepare(Path(tmp), years, size)
        data = load_fields(ds, thr, ev, splits=("train",)).to(device)
        print(f"device {device}, threads {torch.get_num_threads()}, {len(data)} train fields of {tuple(data.x.shape[-2:])}")
        print(f"{'preset':8} {'params':>10} {'batch':>5} {'samples/s':>10} {'pre-made':>10} {'overhead':>9}  (goal <= 1.05)")
        worst = 0.0
        for preset in presets:
            r = bench(preset, data, steps, device)
            worst = max(worst, r["overhead_ratio"])
            print(f"{r['preset']:8} {r['params']:>10,} {r['batch']:>5} {r['samples_per_s']:>10.1f} "
                  f"{r['premade_samples_per_s']:>10.1f} {r['overhead_ratio']:>9.3f}")
        print(f"input-pipeline overhead (worst): {worst:.3f} -> {'meets' if worst <= 1.05 else 'misses'} the 1.05 goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
