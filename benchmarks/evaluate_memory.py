"""Evaluation: time per day per member and peak memory against ensemble size x days.

Goal (issue): memory flat in ensemble size x days (streamed); report the time per day per member
of ``sample_ensembles`` (rule sample_ensembles: checkpoint + baselines -> ensembles.zarr) and of
``evaluate.report.run`` (rule evaluate: scores of the cache; the figures are not drawn here).

    python benchmarks/evaluate_memory.py                        # 4 and 16 members on the test split
    python benchmarks/evaluate_memory.py --members 8 32 --splits val test
    python benchmarks/evaluate_memory.py --smoke                # seconds; used by the tests

Data: the demo run's ``dataset.zarr`` when present (``make demo``), else a demo-like set made in a
temporary directory; one freshly initialised checkpoint of ``--preset`` ('best'), the three
default baselines.  Each step runs in its own subprocess (peak RSS of that step alone).  "Flat"
means the peak RSS grows by at most x1.25 when members x days grows by the factor between the
first and the last ``--members``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import (add_child_argument, add_data_argument, demo_inputs, emit, machine, run_as_child, run_child,
                    untrained_checkpoint, verdict)

RSS_FLAT = 1.25


def _cfg(members: str, splits: str):
    from precip_cvae.config import EvaluateConfig

    return EvaluateConfig(members=int(members), splits=tuple(splits.split(",")), checkpoints=("best",))


def child_sample(ckpt: str, dataset: str, thresholds: str, events: str, out: str, members: str, splits: str,
                 threads: str, preset: str) -> None:
    from precip_cvae.evaluate import sample
    from precip_cvae.logs import setup

    setup(None)
    untrained_checkpoint(dataset, thresholds, events, preset, ckpt)
    cfg = _cfg(members, splits)
    paths = sample.SamplePaths(dataset=dataset, thresholds=thresholds, events=events, checkpoints={"best": ckpt},
                                 out=out)
    t0 = time.perf_counter()
    sample.sample_ensembles(paths, cfg, threads=int(threads), experiment="benchmark")
    seconds = time.perf_counter() - t0
    import xarray as xr

    days = sum(xr.open_zarr(out, group=f"{s}/truth").sizes["time"] for s in cfg.splits)
    emit({"seconds": seconds, "days": days})


def child_score(ensembles: str, dataset: str, out: str, members: str, splits: str) -> None:
    from precip_cvae.evaluate import report
    from precip_cvae.logs import setup

    setup(None)
    cfg = _cfg(members, splits)
    paths = report.ScorePaths.in_dir(ensembles=ensembles, dataset=dataset, train_log="", out_dir=out)
    t0 = time.perf_counter()
    report.run(paths, cfg, experiment="benchmark")
    emit({"seconds": time.perf_counter() - t0})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--members", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--splits", nargs="+", default=["test"], choices=["val", "test"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for sampling")
    add_data_argument(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the tests)")
    add_child_argument(ap)
    args = ap.parse_args(argv)
    if run_as_child(args, {"sample": child_sample, "score": child_score}):
        return 0
    me = str(Path(__file__).resolve())
    preset, members = ("tiny", [2]) if args.smoke else (args.preset, args.members)
    splits = ",".join(args.splits)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        tmp = Path(tmp)
        ds, thr, ev = demo_inputs(tmp, *((2, 16) if args.smoke else (10, 64)), data=args.data)
        ckpt = str(tmp / "best.pt")  # made by the first subprocess
        print(f"evaluation: preset {preset}, splits {splits}, baselines climatology/analogs/interpolation "
              f"({machine()}); data {ds}", flush=True)
        rows = []
        for m in members:
            store = str(tmp / f"ensembles_{m}.zarr")
            s = run_child([me, "--child", "sample", ckpt, ds, thr, ev, store, str(m), splits, str(args.threads),
                           preset])
            c = run_child([me, "--child", "score", store, ds, str(tmp / f"scores_{m}"), str(m), splits])
            with open(tmp / f"scores_{m}" / "metrics.json") as fh:
                sources = json.load(fh)["meta"]["sources"]
            dm = s["days"] * m
            rows.append({"members": m, "days": s["days"], "sources": len(sources),
                         "sample_s": s["seconds"], "sample_ms": 1e3 * s["seconds"] / dm, "sample_rss": s["peak_rss_mb"],
                         "score_s": c["seconds"], "score_ms": 1e3 * c["seconds"] / dm, "score_rss": c["peak_rss_mb"]})
        print(f"{'members':>7} {'days':>5} {'sources':>7} {'sample s':>8} {'ms/day/member':>13} {'peak RSS MB':>11} "
              f"{'score s':>8} {'ms/day/member':>13} {'peak RSS MB':>11}")
        for r in rows:
            print(f"{r['members']:>7} {r['days']:>5} {r['sources']:>7} {r['sample_s']:>8.1f} {r['sample_ms']:>13.2f} "
                  f"{r['sample_rss']:>11.0f} {r['score_s']:>8.1f} {r['score_ms']:>13.2f} {r['score_rss']:>11.0f}")
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            factor = b["members"] * b["days"] / (a["members"] * a["days"])
            for step in ("sample", "score"):
                growth = b[f"{step}_rss"] / a[f"{step}_rss"]
                print(f"memory ({step}): peak RSS {a[f'{step}_rss']:.0f} -> {b[f'{step}_rss']:.0f} MB when members x "
                      f"days grows x{factor:.0f} (x{growth:.2f}; flat means <= x{RSS_FLAT}) -> "
                      f"{verdict(growth <= RSS_FLAT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
