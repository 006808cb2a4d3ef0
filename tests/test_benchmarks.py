"""Every benchmark script runs on a tiny size (``--smoke``) so that none of them rots.

The figures are not checked (they mean nothing at these sizes); each script must finish, print
its verdict lines and, where a goal is a yes/no property (no upstream job after a train-only
change), pass it.  One tiny demo-like data set is made once and shared (``--data``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """dataset.zarr, thresholds.nc, events.csv of 2 years of 16x16 demo data."""
    root = tmp_path_factory.mktemp("bench_data")
    sys.path.insert(0, str(BENCH))
    try:
        from common import demo_inputs

        demo_inputs(root, 2, 16)
    finally:
        sys.path.remove(str(BENCH))
    return root


def test_preprocess_events_smoke(tmp_path):
    out = run(str(BENCH / "preprocess_events.py"), "--smoke", "--root", str(tmp_path / "pe"))
    assert "time: pipeline / plain read" in out and "memory: peak RSS" in out
    assert not (tmp_path / "pe").exists(), "the generated inputs must be removed"


def test_train_throughput_smoke(tiny_data):
    out = run(str(BENCH / "train_throughput.py"), "--smoke", "--data", str(tiny_data))
    assert "input-pipeline overhead" in out and "\ntiny " in out


def test_generate_throughput_smoke(tiny_data):
    out = run(str(BENCH / "generate_throughput.py"), "--smoke", "--data", str(tiny_data))
    assert "throughput: written / bare" in out


def test_evaluate_memory_smoke(tiny_data):
    out = run(str(BENCH / "evaluate_memory.py"), "--smoke", "--data", str(tiny_data))
    assert "ms/day/member" in out


def test_workflow_overhead_smoke(tmp_path):
    out = run(str(BENCH / "workflow_overhead.py"), "--smoke", "--workdir", str(tmp_path / "wf"))
    assert "upstream jobs: 0 (goal 0) -> MET" in out, out


def test_gpu_train_cpu_step(tiny_data):
    out = run(str(BENCH / "gpu_train.py"), "--device", "cpu", "--smoke", "--data", str(tiny_data))
    assert "\ntiny " in out and "GFLOP/step" in out


def test_gpu_check_says_why_without_cuda():
    import shutil

    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: gpu_check.sh would run for minutes")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_workflow_job_table_parsing():
    sys.path.insert(0, str(BENCH))
    try:
        from workflow_overhead import job_table
    finally:
        sys.path.remove(str(BENCH))
    out = ("Building DAG of jobs...\nJob stats:\njob           count\n----------  -------\nall               1\n"
           "train_cvae        1\ntotal             2\n\nReasons:\n")
    assert job_table(out) == {"all": 1, "train_cvae": 1}
    assert job_table("Building DAG of jobs...\nNothing to be done (all requested files are present).\n") == {}
