"""Every benchmark script runs on a tiny size (``--smoke``) so that none of them rots.

The figures are not checked (they mean nothing at these sizes); each script must finish, print
its verdict lines and, where a goal is a yes/no property (no upstream job after a train-only
change), pass it.  One tiny demo-like data set is made once and shared (``--data``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_continental_smoke(tmp_path):
    out = run(str(BENCH / "continental.py"), "--smoke", "--stages", "--workdir", str(tmp_path), timeout=400)
    assert "streamed peak RSS 1 -> 2 years" in out and "1 years, in memory / streamed" in out
    assert all(f"{stage} peak RSS 1 -> 2 years" in out for stage in ("sample", "score", "generate"))
    assert "patch training peak RSS 1 -> 2 years" in out and "largest difference 0.0e+00" in out
    assert not any(tmp_path.iterdir()), "the generated inputs must be removed"


def test_diagnostics_bands_smoke(tmp_path):
    out = run(str(BENCH / "diagnostics_bands.py"), "--smoke", "--workdir", str(tmp_path))
    assert "a read per block (before)" in out and "the same tables: True" in out
    assert not any(tmp_path.iterdir()), "the generated store must be removed"


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


def test_perfect_model_heavy_days_are_detect_events_exceedance_days():
    """benchmarks/perfect_model.py picks a truth's heavy days as detect_events does: at least min_exceed of the
    day's valid cells above their threshold (strictly), missing cells left out of the count; per-day maps too."""
    sys.path.insert(0, str(BENCH))
    import perfect_model

    truth = np.zeros((4, 2, 10))
    truth[0, 0, 0] = 11.0  # 1 of 20 valid cells above 10: 5 %, heavy at 0.05
    truth[1, 0, 0] = 10.0  # at the threshold, not above
    truth[2, :, 1:] = np.nan  # 2 valid cells, one above: 50 %
    truth[2, 0, 0] = 12.0
    truth[3, 0, :2] = 11.0  # 10 % above, but its own map is higher
    thr = np.full((2, 10), 10.0)
    mean, heavy = perfect_model.day_statistics(truth, thr, 0.05)
    assert heavy.tolist() == [True, False, True, True]
    np.testing.assert_allclose(mean, [11.0 / 20, 10.0 / 20, 12.0 / 2, 22.0 / 20])
    per_day = np.stack([thr, thr, thr, np.full((2, 10), 20.0)])
    assert perfect_model.day_statistics(truth, per_day, 0.05)[1].tolist() == [True, False, True, False]
    assert perfect_model.day_statistics(truth, thr, 0.06)[1].tolist() == [False, False, True, True]


def test_perfect_model_rain_ratios_by_hand():
    """The generated-rain goal in the perfect-model test: every member's domain mean on the truth's heavy days
    against the truth's, and only the members heavy themselves, over the days where one is."""
    sys.path.insert(0, str(BENCH))
    import perfect_model

    truth_mean = np.array([10.0, 1.0, 20.0, 8.0])
    heavy = np.array([True, False, True, True])
    member_mean = np.array([[4.0, 0.0, 30.0, 2.0],
                            [12.0, 9.0, 10.0, 4.0]])
    member_heavy = np.array([[False, False, True, False],
                             [True, True, False, False]])  # day 3: no member heavy
    out = perfect_model.rain_ratios(truth_mean, heavy, member_mean, member_heavy)
    # every member on days 0, 2, 3: (4 + 12 + 30 + 10 + 2 + 4) / 6 = 62 / 6 against (10 + 20 + 8) / 3
    assert out["rain_all"] == pytest.approx((62.0 / 6) / (38.0 / 3))
    # heavy members only: day 0 -> 12, day 2 -> 30; the truth on days 0 and 2: 15
    assert out["rain_filtered"] == pytest.approx(21.0 / 15.0)
    assert out["filtered_days"] == pytest.approx(2.0 / 3.0)


def test_areal_scores_by_hand():
    """benchmarks/areal_scores.py: block means over valid cells, heavy days of members and truth by detect_events'
    criterion, the fair CRPS of domain means, block means."""
    sys.path.insert(0, str(BENCH))
    import areal_scores

    obs = np.zeros((2, 2, 10))
    obs[0, 0, :2] = 11.0  # day 0: 10 % above 10 -> heavy; day 1: nothing
    obs[:, 1, 9] = np.nan
    ens = np.zeros((2, 2, 2, 10))
    ens[0, 1, 0, 0] = 30.0  # member 0 heavy on day 1 (1 of 19 valid cells: 5.3 %)
    ens[1, 0, 0, 0] = 11.0  # member 1 heavy on day 0
    ens[1, 1, 1, 9] = 99.0  # on a missing cell: not counted
    thr = np.full((2, 10), 10.0)
    days = areal_scores.day_scores(ens, obs, thr, 0.05, blocks=(4,))
    assert days["heavy_obs"].tolist() == [1.0, 0.0]
    assert days["heavy_ens"].tolist() == [0.5, 0.5]
    s = areal_scores.summary(days, np.arange(2))
    assert s["heavy_freq"] == 1.0  # one member-day per member on average against one truth day
    # domain means (19 valid cells): truth 22/19 and 0; members 0, 11/19 on day 0 and 30/19, 0 on day 1
    m0, m1 = np.array([0.0, 11 / 19]), np.array([30 / 19, 0.0])
    crps = lambda x, y: np.abs(x - y).mean() - np.abs(x[0] - x[1]) / 2  # fair CRPS of 2 members  # noqa: E731
    assert days["crps_field"].tolist() == pytest.approx([crps(m0, 22 / 19), crps(m1, 0.0)])
    # spread/skill of the domain means: (M + 1) / M x the members' variance over the squared error of their mean
    var = 3 / 2 * (np.var(m0, ddof=1) + np.var(m1, ddof=1))
    err = (m0.mean() - 22 / 19) ** 2 + (m1.mean() - 0.0) ** 2
    assert s["ss_field"] == pytest.approx(np.sqrt(var / err))
    # block means over the valid cells, NaN where fewer than half of a block's cells are valid
    field = np.arange(12.0).reshape(1, 3, 4)
    valid = np.ones((1, 3, 4), bool)
    valid[0, 2, 2:] = False
    got = areal_scores.block_means(field, valid, 2)
    np.testing.assert_allclose(got[0], [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9) / 2, np.nan]])
    assert areal_scores.block_means(field[None].repeat(2, 0), valid, 0).shape == (2, 1, 1, 1)


def test_settings_table_over_seeds_by_hand(tmp_path):
    """benchmarks/settings_table.py --over-seeds: mean and sample sd of each setting's <setting>_seed<N> runs (best
    checkpoint of the cVAE only), the P99 ratio from its two quantiles; names without a seed are left out."""
    sys.path.insert(0, str(BENCH))
    import settings_table

    def write(name, crps, q99_ens, last_crps=99.0):
        d = tmp_path / "experiments" / name / "evaluate"
        d.mkdir(parents=True)
        rows = [("cvae", "best", "test", "heavy", "crps", crps), ("cvae", "last", "test", "heavy", "crps", last_crps),
                ("cvae", "best", "test", "all", "crps", 50.0), ("analogs", "-", "test", "heavy", "crps", 7.0),
                ("cvae", "best", "test", "heavy", "tail_q99_ens", q99_ens),
                ("cvae", "best", "test", "heavy", "tail_q99_obs", 40.0)]
        text = "model,checkpoint,split,subset,metric,value,lower,upper\n"
        text += "".join(f"{m},{c},{s},{b},{k},{v},,\n" for m, c, s, b, k, v in rows)
        (d / "metrics.csv").write_text(text)

    write("default_seed0", 4.0, 30.0)
    write("default_seed1", 5.0, 34.0)
    write("default_seed2", 6.0, 38.0)
    write("seed_seed0", 8.0, 80.0)
    write("glob0", 1.0, 1.0)
    values = settings_table.seed_values(tmp_path, "test", "heavy")
    assert sorted(values["setting"]) == ["default", "default", "default", "seed"]
    default = values[values["setting"] == "default"]
    assert default["crps"].tolist() == [4.0, 5.0, 6.0]
    assert default["q99"].tolist() == pytest.approx([0.75, 0.85, 0.95])
    text = settings_table.seeds_table(tmp_path, "test", "heavy")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["default"][1] == "3" and rows["default"][2] == "5 ± 1"  # CRPS: mean 5, sd sqrt(((-1)^2 + 1^2) / 2) = 1
    assert rows["default"][6] == "0.85 ± 0.1"  # P99 ratio: mean 0.85, sd 0.1
    assert rows["seed"][1] == "1" and rows["seed"][2] == "8" and rows["seed"][6] == "2"
