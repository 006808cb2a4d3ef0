"""Generation: samples/s written to zarr against the model's bare sampling; memory against sample count.

Goal (issue): samples/s written to zarr >= 90 % of the model's bare forward throughput
(``model.sample`` on the same batches, nothing written); memory flat in the number of samples.

    python benchmarks/generate_throughput.py                      # small preset, 10 and 160 members
    python benchmarks/generate_throughput.py --members 10 20 40 --preset medium
    python benchmarks/generate_throughput.py --smoke              # seconds; used by the tests

Data: the demo run's ``dataset.zarr`` when present (``make demo``), else a demo-like set made in a
temporary directory; the checkpoint is a freshly initialised model of ``--preset`` (throughput
does not depend on the weights).  Per ``--members`` value, subprocesses:

* ``speed``: after a warm-up batch, ``--repeats`` times in turn: ``bare`` = ``model.sample``
  (no_grad, ``batch_days`` days x ``members``) on the heavy train days in the batches
  ``generate.run`` makes, nothing else; then ``precip_cvae.generate.run`` (NetCDF off), whose
  log records time the sampling-and-writing loop (from "generating ..." to the last
  "written ...").  Loop samples/s against bare samples/s is the goal's ratio; the fastest run of
  each counts.  Both are also timed in CPU seconds of the process (all threads), which other
  load on the machine disturbs much less than wall time.  The whole call (data loading,
  memorisation check, augmented training set, reports) is printed beside it.
* ``memory``: one ``generate.run`` alone in its process, with ``netcdf`` off and on (the demo
  config writes ``augmented.nc`` too): its peak RSS, at each sample count.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (add_child_argument, add_data_argument, demo_inputs, emit, machine, run_as_child, run_child,
                    untrained_checkpoint, verdict)

GOAL = 0.90
RSS_FLAT = 1.25


def _clocks() -> tuple[float, float]:
    """(wall, CPU of this process over all its threads) seconds."""
    return time.perf_counter(), time.process_time()


def _bare(model, data, chosen, members: int, batch_days: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``model.sample`` on the batches ``generate.run`` makes (no_grad; nothing else)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w0, c0 = _clocks()
        for s in range(0, chosen.size, batch_days):
            days = chosen[s:s + batch_days]
            model.sample(data.y[days], data.valid[days], n_samples=members, generator=g)
        w1, c1 = _clocks()
    return w1 - w0, c1 - c0


class _Times(logging.Handler):
    """Clocks at generate.run's log records: its loop runs from 'generating ...' to the last 'written ...'."""

    def __init__(self):
        super().__init__()
        self.start = self.last = None

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("generating "):
            self.start = _clocks()
        elif msg.startswith("written "):
            self.last = _clocks()


def _setup(dataset, thresholds, events, ckpt, preset, members, batch_days, netcdf, threads):
    import numpy as np
    import torch

    from precip_cvae.config import GenerateConfig
    from precip_cvae.logs import setup

    torch.set_num_threads(int(threads))
    setup(None, logging.WARNING)
    untrained_checkpoint(dataset, thresholds, events, preset, ckpt)
    times = _Times()
    gen_log = logging.getLogger("precip_cvae.generate")
    gen_log.setLevel(logging.INFO)
    gen_log.addHandler(times)
    # an untrained model and one pass of draws: every sample kept (no heavy filter)
    return times, GenerateConfig(members=int(members), batch_days=int(batch_days), netcdf=netcdf == "1",
                                 filter_heavy=False), np


def child_speed(ckpt: str, dataset: str, thresholds: str, events: str, out: str, members: str,
                batch_days: str, threads: str, repeats: str, preset: str) -> None:
    """``repeats`` x (bare sampling, generate.run without NetCDF), alternating; the fastest of each counts."""
    from precip_cvae import checkpoint, generate
    from precip_cvae.config import EventsConfig
    from precip_cvae.data import load_fields

    times, cfg, np = _setup(dataset, thresholds, events, ckpt, preset, members, batch_days, "0", threads)
    model, _ = checkpoint.load_model(ckpt, "cpu")
    data = load_fields(dataset, thresholds, events)
    chosen = np.flatnonzero(np.isin(data.split, list(cfg.splits)) & data.is_event.numpy())
    _bare(model, data, chosen[: cfg.batch_days], cfg.members, cfg.batch_days)  # warm-up
    bare, loop, total = [], [], []
    for _ in range(int(repeats)):
        bare.append(_bare(model, data, chosen, cfg.members, cfg.batch_days))
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = generate.run(generate.GeneratePaths.in_dir(out, ckpt, dataset, thresholds, events, cfg.netcdf),
                              cfg, EventsConfig())
        total.append(time.perf_counter() - t0)
        loop.append((times.last[0] - times.start[0], times.last[1] - times.start[1]))
    n = report["samples"]
    emit({"samples": n, "seconds": min(total), "samples_per_s": n / min(total),
          "bare_per_s": n / min(b[0] for b in bare), "bare_per_cpu_s": n / min(b[1] for b in bare),
          "loop_per_s": n / min(x[0] for x in loop), "loop_per_cpu_s": n / min(x[1] for x in loop)})


def child_memory(ckpt: str, dataset: str, thresholds: str, events: str, out: str, members: str,
                 batch_days: str, netcdf: str, threads: str, preset: str) -> None:
    """One generate.run, nothing else in the process: its peak RSS."""
    from precip_cvae import generate
    from precip_cvae.config import EventsConfig

    _, cfg, _ = _setup(dataset, thresholds, events, ckpt, preset, members, batch_days, netcdf, threads)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = generate.run(generate.GeneratePaths.in_dir(out, ckpt, dataset, thresholds, events, cfg.netcdf),
                          cfg, EventsConfig())
    emit({"samples": report["samples"], "seconds": time.perf_counter() - t0})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--members", type=int, nargs="+", default=[10, 160], help="members per heavy day (sample count)")
    ap.add_argument("--batch-days", type=int, default=16, help="generate.batch_days (package default 16)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="timed (bare, generate) pairs; the fastest counts")
    add_data_argument(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the tests)")
    add_child_argument(ap)
    args = ap.parse_args(argv)
    if run_as_child(args, {"speed": child_speed, "memory": child_memory}):
        return 0
    me = str(Path(__file__).resolve())
    preset, members = ("tiny", [2]) if args.smoke else (args.preset, args.members)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        tmp = Path(tmp)
        ds, thr, ev = demo_inputs(tmp, *((2, 16) if args.smoke else (10, 64)), data=args.data)
        ckpt = str(tmp / "model.pt")  # made by the first subprocess
        inputs = [ckpt, ds, thr, ev, str(tmp / "out")]
        print(f"generation throughput: preset {preset}, batch_days {args.batch_days}, {args.threads} threads "
              f"({machine()}); data {ds}", flush=True)
        rows = []
        for m in members:
            speed = run_child([me, "--child", "speed", *inputs, str(m), str(args.batch_days), str(args.threads),
                               str(1 if args.smoke else args.repeats), preset])
            mem = {nc: run_child([me, "--child", "memory", *inputs, str(m), str(args.batch_days), nc,
                                  str(args.threads), preset]) for nc in (("0",) if args.smoke else ("0", "1"))}
            rows.append({"members": m, **speed, "ratio": speed["loop_per_s"] / speed["bare_per_s"],
                         "cpu_ratio": speed["loop_per_cpu_s"] / speed["bare_per_cpu_s"],
                         "rss": mem["0"]["peak_rss_mb"], "rss_nc": mem.get("1", {}).get("peak_rss_mb", float("nan")),
                         "seconds_nc": mem.get("1", {}).get("seconds", float("nan"))})
        print(f"{'members':>7} {'samples':>7} {'bare/s':>7} {'written/s':>9} {'ratio':>6} {'bare/CPU s':>10} "
              f"{'written/CPU s':>13} {'ratio':>6} {'whole run/s':>11} {'RSS MB':>7} {'RSS MB (+nc)':>12}")
        for r in rows:
            print(f"{r['members']:>7} {r['samples']:>7} {r['bare_per_s']:>7.1f} {r['loop_per_s']:>9.1f} "
                  f"{r['ratio']:>6.2f} {r['bare_per_cpu_s']:>10.1f} {r['loop_per_cpu_s']:>13.1f} "
                  f"{r['cpu_ratio']:>6.2f} "
                  f"{r['samples_per_s']:>11.1f} {r['rss']:>7.0f} {r['rss_nc']:>12.0f}")
        worst, worst_cpu = min(r["ratio"] for r in rows), min(r["cpu_ratio"] for r in rows)
        print(f"throughput: written / bare = {worst:.2f} by wall time, {worst_cpu:.2f} by CPU time (worst; goal >= "
              f"{GOAL}) -> {verdict(worst >= GOAL)} (wall), {verdict(worst_cpu >= GOAL)} (CPU)")
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            for key, label in (("rss", "netcdf off"), ("rss_nc", "netcdf on")):
                growth = b[key] / a[key]
                print(f"memory ({label}): peak RSS {a[key]:.0f} MB at {a['samples']} samples -> {b[key]:.0f} MB at "
                      f"{b['samples']} (x{growth:.2f}; flat means <= x{RSS_FLAT}) -> {verdict(growth <= RSS_FLAT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
