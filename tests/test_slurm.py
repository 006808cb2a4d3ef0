"""The SLURM profile: how `--profile slurm` resolves, what it asks SLURM for, and the tiny workflow
run through it on a real single-node SLURM cluster (.ci/slurm.sh), with a training job preempted
by SIGUSR1 mid-way and finished by its retry.

The cluster tests need root (apt-get install slurm-wlm munge when absent, the daemons, and
/etc/slurm/slurm.conf); elsewhere they are skipped with the reason. CI (.ci/run) sets
PRECIP_CVAE_REQUIRE_SLURM=1, which turns that skip into a failure. PRECIP_CVAE_SLURM=0 skips them.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import REPO, copy_workflow, results_tree

SLURM_SH = REPO / ".ci" / "slurm.sh"
LOCK = Path(os.environ.get("PRECIP_CVAE_SLURM_LOCK", "/var/tmp/precip-cvae-slurm.lock"))
EPOCHS = 3  # signalled after epoch 0, the retry resumes and runs epochs 1-2: mid-way, and short
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)


def clean_env() -> dict:
    """The test's environment without what would leak into the jobs (SLURM_*, a GPU, a profile)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("CUDA_VISIBLE_DEVICES", "SNAKEMAKE_PROFILE")}


def snakemake_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def job_stats(text: str) -> dict[str, int]:
    """{rule: count} from the 'Job stats' table snakemake prints before running."""
    table = text.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def resources_of(text: str, rule: str) -> dict[str, str]:
    """The `resources:` line of ``rule`` in snakemake's job listing, as {name: value}."""
    block = re.search(rf"^rule {rule}:\n(.*?)^\s+resources: (.*?)$", text, re.M | re.S)
    assert block, f"no resources for {rule} in:\n{text[-3000:]}"
    return dict(item.split("=", 1) for item in block.group(2).split(", "))


# --- the profiles themselves (no SLURM needed) -------------------------------------------------


def load_profile(name: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())


def test_profile_name_slurm_resolves_from_the_repository_root(monkeypatch):
    from snakemake.cli import get_profile_dir

    assert (REPO / "slurm").is_symlink() and not os.path.isabs(os.readlink(REPO / "slurm"))
    monkeypatch.chdir(REPO)
    profile_dir, config_file = get_profile_dir("slurm")
    assert config_file.resolve() == (REPO / "profiles" / "slurm" / "config.yaml").resolve()


def test_default_profile_never_contradicts_the_slurm_profile():
    # profiles/default is layered on top of --profile slurm and wins key by key
    default, slurm = load_profile("default"), load_profile("slurm")
    clashes = {k: (default[k], slurm[k]) for k in default.keys() & slurm.keys() if default[k] != slurm[k]}
    assert not clashes, clashes
    assert not {"executor", "jobs", "retries", "cores", "default-resources", "set-resources"} & default.keys()


@pytest.mark.workflow
def test_slurm_profile_asks_for_a_gpu_and_a_warning_signal_for_training(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    (work / "slurm").symlink_to(os.readlink(REPO / "slurm"))
    proc = subprocess.run(snakemake_cmd("--cores", "8", "--profile", "slurm", "-n", "--configfile", "config/tiny.yaml"),
                          cwd=work, capture_output=True, text=True, timeout=300, env=clean_env())
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in text
    train = resources_of(text, "train_cvae")
    assert train["gpu"] == "1" and train["cpus_per_gpu"] == "8"
    assert train["mem_mb"] == "16000" and train["runtime"] == "720"
    assert re.fullmatch(r"--signal=USR1@\d+", train["slurm_extra"]), train
    pre = resources_of(text, "preprocess")
    assert {"slurm_partition", "slurm_account", "mem_mb", "runtime"} <= pre.keys() and "gpu" not in pre


# --- a real SLURM --------------------------------------------------------------------------------


def _cannot(reason: str):
    if os.environ.get("PRECIP_CVAE_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (PRECIP_CVAE_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


class _Cannot(Exception):
    """The cluster cannot be brought up here (the reason); the tests skip, or fail where SLURM is required."""


def ci_profile(work: Path) -> None:
    """work/slurm/: the repository's SLURM profile with what this one-node cluster needs changed."""
    profile = load_profile("slurm")
    ncpu = len(os.sched_getaffinity(0))  # what nproc says, as the node's CPUs= in .ci/slurm.sh
    profile.update({
        "slurm-status-command": "squeue",  # no slurmdbd here: sacct knows no job
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-keep-successful-logs": True,  # the test reads every job's SLURM log
        "latency-wait": 5,
        "max-threads": ncpu,  # rules ask for up to 8 threads; the node has nproc CPUs
    })
    profile["default-resources"]["mem_mb"] = 2000
    rules = sorted({r for f in (work / "rules").glob("*.smk") for r in re.findall(r"^rule (\w+):", f.read_text(), re.M)})
    set_resources = profile.setdefault("set-resources", {})
    for rule in rules:  # the tiny data need little memory; the rules ask for 8-16 GB
        set_resources.setdefault(rule, {})["mem_mb"] = 2000
    set_resources["train_cvae"]["cpus_per_gpu"] = ncpu
    (work / "slurm").mkdir()
    (work / "slurm" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))


def slurm_job_of(rule: str) -> str | None:
    """The SLURM id of the running job of ``rule`` (the plugin puts the rule in the job comment)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True).stdout
    ids = [line.split("|")[0] for line in out.splitlines() if line.split("|")[-1].startswith(f"rule_{rule}")]
    return ids[0] if ids else None


class ClusterRun(threading.Thread):
    """The single-node cluster (.ci/slurm.sh) brought up and the tiny workflow (EPOCHS epochs) run through the
    SLURM profile, with train_cvae sent SIGUSR1 after its first epoch.  The tests compare it with the session's
    local run of the same config (conftest's ``tiny_run``, which differs only in its number of epochs).

    It runs in a thread that conftest starts when the session's local tiny run starts (``tiny_run``, which these
    tests need): the run mostly waits for SLURM (the plugin polls job states at growing intervals), so the rest
    of the suite runs meanwhile.  The
    cluster stays up until :meth:`stop` (the tests read job states from it).
    """

    def __init__(self, root: Path):
        super().__init__(name="slurm-cluster-run", daemon=True)
        self.root = root
        self.result: dict | None = None
        self.reason: str | None = None  # why the cluster cannot run here
        self.error: BaseException | None = None
        self.lock = None
        self.started_cluster = False
        self.procs: list[subprocess.Popen] = []
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            self._acquire()
            self._start_cluster()
            self.result = self._workflow()
        except _Cannot as exc:
            self.reason = str(exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the fixture, which raises it in the test
            self.error = exc

    def _acquire(self) -> None:
        if sys.platform != "linux":
            raise _Cannot(f"SLURM tests need Linux, this is {sys.platform}")
        # one test cluster per machine: wait for another session's to be stopped
        try:
            self.lock = open(LOCK, "a")
        except OSError as exc:
            raise _Cannot(f"cannot open the SLURM test lock {LOCK}: {exc}") from None
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.lock.close()
                    self.lock = None
                    raise _Cannot(f"another test session holds the SLURM test cluster ({LOCK}) for over 15 minutes") \
                        from None
                time.sleep(2)

    def _start_cluster(self) -> None:
        if self.cancelled.is_set():
            raise _Cannot("the test session ended before the cluster started")
        self.started_cluster = True
        start = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True, timeout=600)
        if start.returncode != 0:
            raise _Cannot(start.stderr.strip().splitlines()[-1] if start.stderr.strip()
                          else f"slurm.sh start: rc {start.returncode}")
        print(start.stderr.strip())

    def _workflow(self) -> dict:
        t0 = time.monotonic()
        work = copy_workflow(self.root / "slurm" / "wf")
        cfg = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
        cfg["train"]["epochs"] = EPOCHS
        (work / "config" / "tiny_slurm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        ci_profile(work)
        if self.cancelled.is_set():
            raise _Cannot("the test session ended before the workflow started")
        log_path = work / "snakemake.out"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(snakemake_cmd("--cores", "8", "--profile", "slurm", "--verbose",
                                                  "--configfile", "config/tiny_slurm.yaml"),
                                    cwd=work, stdout=out, stderr=subprocess.STDOUT, text=True, env=clean_env())
            self.procs.append(proc)
            train_log = work / "results" / "tiny" / "experiments" / "default" / "train" / "train_log.csv"
            signalled = None
            deadline = time.monotonic() + 900
            while proc.poll() is None and time.monotonic() < deadline and not self.cancelled.is_set():
                if signalled is None and train_log.exists() and len(train_log.read_text().splitlines()) >= 2:
                    signalled = slurm_job_of("train_cvae")
                    if signalled:  # SLURM's warning before a time limit, by hand: to the job's steps
                        subprocess.run(["scancel", "--signal=USR1", signalled], check=True)
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # every job's end state, read as soon as the run ends (squeue forgets a job MinJobAge after it ends)
        states = dict(line.split("|") for line in subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%T"], capture_output=True, text=True).stdout.split())
        return {"work": work, "text": log_path.read_text(), "signalled": signalled, "returncode": proc.returncode,
                "states": states, "seconds": time.monotonic() - t0}

    def stop(self) -> None:
        """Stop the cluster (by PID) and release the machine's lock."""
        if self.is_alive():  # the session ends before the tests that wait for it: end the run first
            self.cancelled.set()
            for proc in self.procs:
                proc.terminate()
            self.join(timeout=60)
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], capture_output=True)
        if self.started_cluster:
            subprocess.run(["bash", str(SLURM_SH), "stop"], capture_output=True, text=True, timeout=120)
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None


_RUN: ClusterRun | None = None


def start_cluster_run(root: Path) -> None:
    """Start the cluster and its workflow run in the background (conftest calls it after collection)."""
    global _RUN
    if _RUN is None and os.environ.get("PRECIP_CVAE_SLURM") != "0":
        _RUN = ClusterRun(root)
        _RUN.start()


@pytest.fixture(scope="module")
def slurm_run(request, tmp_path_factory):
    """The result of :class:`ClusterRun` (started here if conftest did not), the cluster stopped after; with
    ``local``, the session's local run of the tiny config."""
    if os.environ.get("PRECIP_CVAE_SLURM") == "0":
        pytest.skip("SLURM tests disabled by PRECIP_CVAE_SLURM=0")
    tiny_run = request.getfixturevalue("tiny_run")  # after the skip: a disabled run builds nothing
    start_cluster_run(tmp_path_factory.mktemp("cluster"))
    _RUN.join(timeout=2400)
    try:
        if _RUN.is_alive():
            pytest.fail("the SLURM cluster run did not end in 40 minutes")
        if _RUN.reason is not None:
            _cannot(_RUN.reason)
        if _RUN.error is not None:
            raise _RUN.error
        run = _RUN.result
        assert run["returncode"] == 0, f"snakemake --profile slurm failed (rc {run['returncode']}):\n{run['text'][-6000:]}"
        print(f"the SLURM run took {run['seconds']:.0f} s")
        yield {**run, "local": tiny_run, "local_text": (tiny_run / "snakemake.out").read_text()}
    finally:
        stop_cluster_run()


def stop_cluster_run() -> None:
    """Stop the cluster run and the cluster, if they were started (also at the end of the session: conftest)."""
    global _RUN
    if _RUN is not None:
        _RUN.stop()
        _RUN = None


def submissions(run) -> list[tuple[str, str, Path]]:
    """(rule, SLURM job id, SLURM log) of every job the plugin submitted with sbatch."""
    found = []
    for _, slurm_id, log in SUBMITTED.findall(run["text"]):
        found.append((re.search(r"slurm_logs/rule_([^/]+)/", log).group(1), slurm_id, Path(log)))
    return found


@pytest.mark.workflow
def test_every_job_went_through_sbatch(slurm_run):
    subs = submissions(slurm_run)
    per_rule = Counter(rule for rule, _, _ in subs)
    expected = Counter(job_stats(slurm_run["local_text"]))
    del expected["all"]  # a rule without an action: snakemake does it itself
    expected["train_cvae"] += 1  # its retry after the signal
    assert per_rule == expected, (per_rule, expected)
    states = slurm_run["states"]
    for rule, slurm_id, log in subs:
        assert log.exists(), log
        assert f"'SLURM_JOB_ID': '{slurm_id}'" in log.read_text(), log  # the job's environment (--verbose)
        assert states.get(slurm_id) == ("FAILED" if slurm_id == slurm_run["signalled"] else "COMPLETED"), (rule, slurm_id)


@pytest.mark.workflow
def test_training_was_given_the_gpu_and_ran_on_the_cpu(slurm_run):
    subs = submissions(slurm_run)
    sbatch = re.findall(r"^sbatch call: (.*)$", slurm_run["text"], re.M)
    train_calls = [c for c in sbatch if "--comment rule_train_cvae" in c]
    assert train_calls and all("--gpus=1" in c and "--cpus-per-gpu=" in c and "--signal=USR1@" in c for c in train_calls)
    assert not any("--gpus" in c for c in sbatch if c not in train_calls)
    for rule, _, log in subs:
        env = log.read_text()
        if rule == "train_cvae":
            assert re.search(r"'CUDA_VISIBLE_DEVICES': '0'", env) and "'SLURM_JOB_GPUS': '0'" in env, log
        else:
            assert "CUDA_VISIBLE_DEVICES" not in env, (rule, log)
    # the GPU is fake (gres File=/dev/null): torch sees no CUDA and train.device auto picks the CPU
    train_log = slurm_run["work"] / "results" / "tiny" / "experiments" / "default" / "logs" / "train_cvae.log"
    assert re.search(r"device cpu$", train_log.read_text(), re.M)


@pytest.mark.workflow
def test_signalled_training_resumes_in_its_retry_with_every_epoch_once(slurm_run):
    assert slurm_run["signalled"], "train_cvae was never seen running after its first epoch"
    exp = slurm_run["work"] / "results" / "tiny" / "experiments" / "default"
    log = pd.read_csv(exp / "train" / "train_log.csv")
    assert log["epoch"].tolist() == list(range(EPOCHS))
    attempts = [(sid, path) for rule, sid, path in submissions(slurm_run) if rule == "train_cvae"]
    (first_id, first_log), (_, second_log) = attempts
    assert first_id == slurm_run["signalled"]
    first = first_log.read_text()
    assert "received signal 10: stopping at the next step" in first
    assert re.search(r"stage train_cvae failed .*SystemExit: 138", first)  # 128 + SIGUSR1
    second = second_log.read_text()
    assert re.search(r"resuming from \S+train_resume/resume\.pt after epoch \d", second)
    assert f"epoch   {EPOCHS}/{EPOCHS}" in (exp / "logs" / "train_cvae.log").read_text()


@pytest.mark.workflow
def test_results_have_the_structure_of_a_local_run(slurm_run):
    slurm_tree = results_tree(slurm_run["work"] / "results")
    local_tree = set((slurm_run["local"] / "results.tree").read_text().splitlines())  # as the local run left it
    assert slurm_tree == local_tree, (sorted(slurm_tree - local_tree), sorted(local_tree - slurm_tree))
    exp = slurm_run["work"] / "results" / "tiny" / "experiments" / "default"
    aug = xr.open_zarr(exp / "generate" / "augmented.zarr")
    ref = xr.open_zarr(slurm_run["local"] / "results" / "tiny" / "experiments" / "default" / "generate" / "augmented.zarr")
    assert set(aug.data_vars) == set(ref.data_vars) and aug["pr"].attrs["units"] == "mm day-1"
    assert set(aug.dims) == set(ref.dims) and (aug.sizes["lat"], aug.sizes["lon"]) == (ref.sizes["lat"], ref.sizes["lon"])
