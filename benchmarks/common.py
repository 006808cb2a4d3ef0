"""Helpers shared by the benchmark scripts (not part of the package).

Each benchmark measures what it compares in the same run, on the same machine
and inputs, and runs the memory-sensitive parts in a fresh subprocess whose
peak resident set size (``VmHWM``, read at the child's end)
is that part's alone.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

# OpenMP threads that spin while waiting burn the CPU that other processes on a shared machine need,
# and make both wall and CPU time noisy; benchmarks let them sleep instead (override by setting it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RESULT_TAG = "BENCH_RESULT "  # a child prints one line "BENCH_RESULT {json}" on stdout


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB: ``VmHWM`` of /proc/self/status (ru_maxrss keeps the
    peak of the process that forked this one across exec; it is the fallback where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Child side: hand ``result`` (plus this process's peak RSS) to the parent."""
    result = dict(result, peak_rss_mb=peak_rss_mb())
    print(RESULT_TAG + json.dumps(result, default=float), flush=True)


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``python <args>`` in a fresh process; return the dict it :func:`emit`-ted.

    The child's stderr passes through (its log lines); a failure raises with its output.
    """
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([PYTHON, *args], stdout=subprocess.PIPE, stderr=None, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {args} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def free_disk_gb(path: str | Path) -> float:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format)."""
    head = "  ".join(f"{h:>{max(len(h), 10)}}" for _, h, _ in columns)
    lines = [head]
    for r in rows:
        cells = []
        for key, h, fmt in columns:
            v = r.get(key, "")
            text = format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v)
            cells.append(f"{text:>{max(len(h), 10)}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def machine() -> str:
    """One line on where this ran: CPUs, load, Python, torch threads."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{os.cpu_count()} CPUs, load {load:.2f}, Python {sys.version.split()[0]}"


# ----------------------------------------------------------------------------- demo data and a checkpoint

DEMO = REPO / "results" / "demo"


def demo_inputs(root: Path, years: int = 10, size: int = 64, data: str | None = None) -> tuple[str, str, str]:
    """(dataset.zarr, thresholds.nc, events.csv): those in ``data`` when given (a directory
    holding the three, e.g. made by an earlier call), else the demo run's when it exists and fits
    (10 years of 64x64), else those of a demo-like data set preprocessed into ``root``."""
    from precip_cvae import demo, events, preprocess
    from precip_cvae.config import DataConfig, DemoConfig, EventsConfig, PreprocessConfig, VariableSource

    if data:
        found = tuple(str(Path(data) / n) for n in ("dataset.zarr", "thresholds.nc", "events.csv"))
        missing = [f for f in found if not Path(f).exists()]
        if missing:
            raise SystemExit(f"--data {data}: missing {missing}")
        return found  # type: ignore[return-value]
    if size == 64 and years == 10 and (DEMO / "events" / "events.csv").exists():
        return (str(DEMO / "preprocess" / "dataset.zarr"), str(DEMO / "events" / "thresholds.nc"),
                str(DEMO / "events" / "events.csv"))
    root = Path(root)
    demo.write_demo_data(DemoConfig(years=years, nlat=size, nlon=size, nclat=max(size // 4, 2),
                                    nclon=max(size // 4, 2)), root / "raw")
    data = DataConfig(target=VariableSource(str(root / "raw/target/*.nc"), "pr"),
                      predictors=tuple(VariableSource(str(root / "raw/predictors/*.nc"), v)
                                       for v in ("psl", "hus850", "ta850")))
    preprocess.run(data, PreprocessConfig(), str(root / "dataset.zarr"))
    events.run(str(root / "dataset.zarr"), EventsConfig(), str(root / "thresholds.nc"), str(root / "events.csv"))
    return str(root / "dataset.zarr"), str(root / "thresholds.nc"), str(root / "events.csv")


def add_child_argument(ap) -> None:
    """``--child KIND ARGS...``: the script re-runs itself in a fresh process to measure one part."""
    import argparse

    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)


def run_as_child(args, handlers: dict) -> bool:
    """When ``--child KIND ARGS...`` was given, run ``handlers[KIND](*ARGS)`` and return True."""
    if not args.child:
        return False
    kind, *rest = args.child
    handlers[kind](*rest)
    return True


def add_data_argument(ap) -> None:
    ap.add_argument("--data", help="directory with dataset.zarr, thresholds.nc and events.csv to use "
                                   "(default: results/demo, else a demo-like set made on the fly)")


def untrained_checkpoint(dataset: str, thresholds: str, events: str, preset: str, path: str | Path) -> Path:
    """A loadable checkpoint of a freshly initialised model for ``dataset`` (throughput does not
    depend on the weights), with the fields ``checkpoint.load_model`` and the stages read.
    An existing ``path`` is kept (the first subprocess that needs it writes it)."""
    if Path(path).exists():
        return Path(path)
    import dataclasses

    import torch

    from precip_cvae import checkpoint
    from precip_cvae.config import ModelConfig
    from precip_cvae.data import load_fields
    from precip_cvae.model import CVAE, count_parameters

    data = load_fields(dataset, thresholds, events, splits=("train",))
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset)
    fine, coarse = tuple(data.x.shape[-2:]), tuple(data.y.shape[-2:])
    model = CVAE(cfg, data.y.shape[1], fine, coarse)
    state = {
        "model_config": dataclasses.asdict(cfg),
        "model_args": {"n_channels": int(data.y.shape[1]), "fine_shape": list(fine), "coarse_shape": list(coarse)},
        "model_state": model.state_dict(),
        "data": {"channels": list(data.channels), "transform": data.transform.to_attrs(),
                 "pad_lat": [int(v) for v in data.attrs.get("pad_lat", [0, 0])],
                 "pad_lon": [int(v) for v in data.attrs.get("pad_lon", [0, 0])],
                 "dataset": str(dataset), "thresholds": str(thresholds)},
        "epoch": 0, "config_hash": "benchmark", "experiment": "benchmark",
        "parameter_count": count_parameters(model),
    }
    return checkpoint.save(state, path)
