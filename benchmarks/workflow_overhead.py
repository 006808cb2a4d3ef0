"""Workflow overhead: ``snakemake -n`` on a finished run, and what a train-only change reruns.

Goals (issue): ``snakemake -n`` on a finished run takes < 3 s; after a change of a ``train`` key
the dry run lists no job upstream of training (make_demo_data, preprocess, detect_events).

    python benchmarks/workflow_overhead.py                       # whole tiny run in /tmp/bench_workflow
    python benchmarks/workflow_overhead.py --workdir /tmp/w --keep   # keep it (a rerun reuses it)
    python benchmarks/workflow_overhead.py --smoke               # up to detect_events only (the tests)

It copies the workflow (Snakefile, rules, workflow, config, profiles) into ``--workdir``, runs
``snakemake --cores 2 --configfile config/tiny.yaml`` there (the demo run in results/demo is
never touched), times ``snakemake -n`` ``--repeats`` times on the finished run (the fastest
counts; the median is printed too), then writes ``config/tiny_train_changed.yaml`` (``train.lr``
doubled) and dry-runs it: the job table must hold no upstream job.  With ``--smoke`` only the
``detect_events`` outputs are built and timed; the train-change dry run still checks the whole
workflow's jobs.  The exit status is 1 when the upstream check fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import REPO, machine, verdict

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
COPY = ("Snakefile", "rules", "workflow", "config", "profiles")
UPSTREAM = ("make_demo_data", "preprocess", "detect_events")
GOAL_S = 3.0


def snakemake(workdir: Path, *args: str) -> tuple[float, str]:
    """(wall seconds, stdout+stderr) of one snakemake call in ``workdir``; raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed in {workdir}:\n{proc.stdout[-4000:]}")
    return seconds, proc.stdout


def job_table(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> count (without 'total'); empty: nothing to do."""
    jobs, inside = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats:"):
            inside = True
            continue
        if inside:
            parts = line.split()
            if not parts:
                if jobs:
                    break
                continue
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total",):
                jobs[parts[0]] = int(parts[1])
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_workflow")
    ap.add_argument("--configfile", default="config/tiny.yaml")
    ap.add_argument("--repeats", type=int, default=5, help="timed dry runs (the fastest counts)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (a rerun reuses its results)")
    ap.add_argument("--smoke", action="store_true", help="build up to detect_events only, one timed dry run")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in COPY:  # refresh the workflow files; results and data of a kept run stay
        src, dst = REPO / name, workdir / name
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    with open(workdir / args.configfile) as fh:
        config = yaml.safe_load(fh)
    run = config["run"]
    target = [f"results/{run}/events/events.csv", f"results/{run}/events/thresholds.nc"] if args.smoke else []
    base = ["--cores", "2", "--configfile", args.configfile]
    try:
        print(f"workflow overhead in {workdir} ({machine()}); config {args.configfile}"
              f"{', targets ' + ' '.join(target) if target else ''}", flush=True)
        t_run, _ = snakemake(workdir, *target, *base)  # targets first: --configfile takes several values
        print(f"  run: {t_run:.0f} s", flush=True)
        times = []
        for _ in range(1 if args.smoke else args.repeats):
            seconds, out = snakemake(workdir, *target, *base, "-n")
            times.append(seconds)
            leftover = job_table(out)
            if leftover:
                raise RuntimeError(f"the finished run still has jobs to do: {leftover}\n{out[-3000:]}")
        best, med = min(times), statistics.median(times)
        changed = dict(config, train=dict(config.get("train") or {}, lr=2 * float(config["train"].get("lr", 1e-4))))
        changed_file = Path(args.configfile).with_name(Path(args.configfile).stem + "_train_changed.yaml")
        with open(workdir / changed_file, "w") as fh:
            yaml.safe_dump(changed, fh, sort_keys=False)
        _, out = snakemake(workdir, "--cores", "2", "--configfile", str(changed_file), "-n")
        jobs = job_table(out)
        upstream = {k: v for k, v in jobs.items() if k in UPSTREAM}
        print(f"dry run on the finished run: {best:.2f} s (fastest of {len(times)}; median {med:.2f} s; "
              f"goal < {GOAL_S} s) -> {verdict(best < GOAL_S)}")
        print(f"after train.lr {config['train'].get('lr')} -> {changed['train']['lr']}: the dry run lists "
              f"{sum(jobs.values())} jobs {jobs}; upstream jobs: {sum(upstream.values())} "
              f"(goal 0) -> {verdict(not upstream)}")
        if upstream:
            return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
