"""A few epochs of training per preset: samples/s, device memory and achieved FLOP/s against a peak.

The Python side of ``benchmarks/gpu_check.sh`` (which adds the CUDA check and a time limit);
with ``--device cpu --smoke`` it runs one step of the tiny preset on CPU (the tests).

    python benchmarks/gpu_train.py --device cuda --presets small seed --epochs 3
    python benchmarks/gpu_train.py --device cpu --smoke

Each preset trains ``--epochs`` epochs the way ``train_cvae`` does (``epoch_indices``,
``make_batch``, ``train_step`` with bf16 autocast on CUDA; the data set on the device), the
first epoch being warm-up (kernel selection, allocator); samples/s is over the others.  FLOPs per
step come from ``torch.utils.flop_counter.FlopCounterMode`` on one step (forward and backward;
matmuls and convolutions, 2 FLOPs per multiply-add, element-wise work not counted), so the
achieved FLOP/s is a lower bound.  The peak assumed for an H200 (and H100) SXM is the bf16
dense tensor-core figure, 989 TFLOP/s (1979 is with 2:4 sparsity); ``--peak-tflops`` sets
another card's.  Data: a demo-like set (10 years of 64x64, three predictors) made in a
temporary directory, or ``results/demo`` when present.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_argument, demo_inputs, machine  # first: sets OMP_WAIT_POLICY before torch loads

import torch

from precip_cvae.config import LossConfig, ModelConfig, TrainConfig
from precip_cvae.data import epoch_indices, load_fields, make_batch
from precip_cvae.model import CVAE, count_parameters
from precip_cvae.train import build_optimizer, train_step

H200_BF16_DENSE_TFLOPS = 989.0


def step_flops(model, opt, batch, cfg, transform, autocast) -> float:
    """FLOPs of one training step (forward + backward) as counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, opt, batch, cfg, 1, transform, autocast)
    return float(counter.get_total_flops())


def bench(preset: str, data, device: torch.device, epochs: int, batch: int, bf16: bool, max_steps: int) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=batch, loss=LossConfig(warmup_epochs=0))
    model = CVAE(ModelConfig(preset=preset), data.y.shape[1], tuple(data.x.shape[-2:]),
                 tuple(data.y.shape[-2:])).to(device)
    model.train()
    opt = build_optimizer(model, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    thr_x = data.thr_x.to(device)
    n = len(data)
    steps = min(n // batch, max_steps) if max_steps else n // batch
    g = torch.Generator().manual_seed(0)
    flops = step_flops(model, opt, make_batch(data, torch.arange(batch), thr_x, device), cfg, data.transform,
                       autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for epoch in range(epochs):
        order = epoch_indices(data.is_event, 1.0, g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for s in range(steps):
            b = make_batch(data, order[s * batch:(s + 1) * batch], thr_x, device)
            losses = train_step(model, opt, b, cfg, epoch, data.transform, autocast)
            float(losses["total"].detach())  # the loop reads the loss back every step, as train_cvae does
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    timed = times[1:] or times  # the first epoch warms up
    seconds = sum(timed) / len(timed)
    achieved = flops * steps / seconds
    out = {"preset": preset, "params": count_parameters(model), "batch": batch, "steps": steps,
           "samples_per_s": steps * batch / seconds, "step_gflop": flops / 1e9, "achieved_tflops": achieved / 1e12}
    if device.type == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--presets", nargs="+", default=["small", "seed"])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per preset; the first is warm-up")
    ap.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: whole epochs)")
    ap.add_argument("--no-bf16", action="store_true", help="float32 (bf16 autocast is the default on CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                    help="the card's peak for the MFU column (default: H200 SXM bf16 dense, 989)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_data_argument(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 1 step, tiny data (the tests, CPU)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train: no CUDA device is visible to torch (torch.cuda.is_available() is False: a CPU build "
              "of torch, no driver, or CUDA_VISIBLE_DEVICES empty); use --device cpu for the CPU path",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and not args.no_bf16
    presets, epochs, max_steps = (["tiny"], 1, 1) if args.smoke else (args.presets, args.epochs, args.max_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()})"
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        ds, thr, ev = demo_inputs(Path(tmp), *((2, 16) if args.smoke else (10, 64)), data=args.data)
        data = load_fields(ds, thr, ev, splits=("train",)).to(device)
        print(f"{name}; {'bf16 autocast' if bf16 else 'float32'}; {len(data)} train fields of "
              f"{tuple(data.x.shape[-2:])}; peak assumed {args.peak_tflops:g} TFLOP/s", flush=True)
        print(f"{'preset':8} {'params':>11} {'batch':>5} {'steps':>5} {'samples/s':>10} {'GFLOP/step':>10} "
              f"{'TFLOP/s':>8} {'of peak':>8} {'max alloc GiB':>13} {'reserved GiB':>12}")
        for preset in presets:
            r = bench(preset, data, device, epochs, 2 if args.smoke else args.batch, bf16, max_steps)
            share = f"{100 * r['achieved_tflops'] / args.peak_tflops:.2f}%" if device.type == "cuda" else "n/a"
            mem = (f"{r['max_allocated_gib']:>13.2f} {r['max_reserved_gib']:>12.2f}" if "max_allocated_gib" in r
                   else f"{'n/a':>13} {'n/a':>12}")
            print(f"{r['preset']:8} {r['params']:>11,} {r['batch']:>5} {r['steps']:>5} {r['samples_per_s']:>10.1f} "
                  f"{r['step_gflop']:>10.3g} {r['achieved_tflops']:>8.3g} {share:>8} {mem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
