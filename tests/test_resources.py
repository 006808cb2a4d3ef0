"""A rule's `threads` reach dask, torch and BLAS (precip_cvae.resources.limit_threads), and the device
key of train, evaluate, generate and downstream has one owner (select_device).

The stage tests run the real scripts of workflow/scripts/ with a stand-in `snakemake` object on
threads 1 and record, inside every dask computation of the stage, the scheduler settings, the torch
threads, the BLAS/OpenMP pools and the dask worker threads that ran tasks.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dask
import dask.array
import dask.callbacks
import pytest
import torch
import yaml
from threadpoolctl import threadpool_info

from conftest import REPO, copy_workflow
from precip_cvae import generate, resources, train
from precip_cvae.config import DEVICES, LossConfig, ModelConfig, TrainConfig
from precip_cvae.resources import THREAD_ENV_VARS, limit_threads, select_device

SCRIPTS = REPO / "workflow" / "scripts"


def pool_threads() -> set[int]:
    return {int(p["num_threads"]) for p in threadpool_info()}


# --- the helper --------------------------------------------------------------------------------


def test_limit_threads_sets_dask_torch_blas_and_env_and_restores_them():
    before = (dask.config.get("scheduler", None), dask.config.get("num_workers", None), torch.get_num_threads(),
              pool_threads(), {k: os.environ.get(k) for k in THREAD_ENV_VARS})
    assert threadpool_info(), "numpy and torch load at least one BLAS/OpenMP pool"
    for n in (1, 2):
        with limit_threads(n) as lim:
            assert dask.config.get("scheduler") == "threads" and dask.config.get("num_workers") == n
            assert torch.get_num_threads() == n
            assert pool_threads() == {n}
            assert all(os.environ[k] == str(n) for k in THREAD_ENV_VARS)
            # what it returns is what the libraries report
            assert (lim.threads, lim.dask_scheduler, lim.dask_num_workers, lim.torch_threads) == (n, "threads", n, n)
            assert lim.pools and {p[2] for p in lim.pools} == {n}
            assert dict(lim.env) == {k: str(n) for k in THREAD_ENV_VARS}
            assert f"dask threads scheduler with {n} workers, torch {n}" in lim.describe()
        after = (dask.config.get("scheduler", None), dask.config.get("num_workers", None), torch.get_num_threads(),
                 pool_threads(), {k: os.environ.get(k) for k in THREAD_ENV_VARS})
        assert after == before


def test_limit_threads_refuses_less_than_one():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with limit_threads(0):
            pass


def test_dask_uses_as_many_worker_threads_as_it_is_given():
    workers = []

    class Workers(dask.callbacks.Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            workers.append(worker_id)

    x = dask.array.ones((64, 64), chunks=(4, 4))  # 256 tasks, many at a time
    with limit_threads(1), Workers():
        assert float((x * 2).sum().compute()) == 2 * 64 * 64
    assert len(set(workers)) == 1 and len(workers) > 256


def test_select_device(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="generate.device is 'cuda' but no CUDA device is visible"):
        select_device("cuda", "generate.device")
    with pytest.raises(ValueError, match=r"downstream.device 'gpu'; valid names are \['auto', 'cpu', 'cuda'\]"):
        select_device("gpu", "downstream.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda") and select_device("cuda") == torch.device("cuda")
    assert select_device("cpu") == torch.device("cpu")
    assert resources.DEVICES == DEVICES == ("auto", "cpu", "cuda")


def test_no_other_module_picks_a_device_or_sets_threads():
    # one owner: only resources.py calls set_num_threads, dask.config.set(num_workers) or threadpool_limits,
    # and nobody else defines select_device (a torch DataLoader's num_workers are reader processes, each with
    # torch's one thread: data.stream_batches)
    import re

    for path in (REPO / "src" / "precip_cvae").rglob("*.py"):
        if path.name == "resources.py":
            continue
        text = path.read_text()
        assert "set_num_threads" not in text and "threadpool_limits" not in text, path
        dask_workers = re.search(r"dask\.config\.set\([^)]*num_workers", text)
        loader_workers = [m.start() for m in re.finditer(r"num_workers=", text)
                          if "DataLoader(" not in text[max(0, m.start() - 300):m.start()]]
        assert dask_workers is None and not loader_workers and "def select_device" not in text, path


# --- rules and scripts -------------------------------------------------------------------------


def rule_blocks() -> dict[str, str]:
    """{rule name: its text} of every rule in rules/*.smk."""
    blocks = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        # a rule may sit inside an `if` (indented): its block ends at the first line indented no deeper
        for m in re.finditer(r"^( *)rule (\w+):\n", text, flags=re.M):
            indent = len(m.group(1))
            body = re.split(rf"^ {{0,{indent}}}\S", text[m.end():], maxsplit=1, flags=re.M)[0]
            blocks[m.group(2)] = "\n".join(line[indent:] for line in body.split("\n"))
    return blocks


def passes_threads_to_limit_threads(script: Path) -> bool:
    """The script's top-level `with` has `limit_threads(snakemake.threads)` and holds all its work."""
    tree = ast.parse(script.read_text())
    imports = any(isinstance(n, ast.ImportFrom) and n.module == "precip_cvae.resources"
                  and "limit_threads" in [a.name for a in n.names] for n in tree.body)
    withs = [n for n in tree.body if isinstance(n, ast.With)]
    if not imports or len(withs) != 1:
        return False
    calls = [item.context_expr for item in withs[0].items]
    wanted = [c for c in calls if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "limit_threads"
              and len(c.args) == 1 and ast.unparse(c.args[0]) == "snakemake.threads"]
    # nothing but imports and the docstring outside the `with`
    outside = [n for n in tree.body if not isinstance(n, (ast.With, ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(wanted) == 1 and not outside


def test_every_rule_with_a_script_declares_threads_and_its_script_applies_them():
    blocks = rule_blocks()
    with_script = {}
    for name, body in blocks.items():
        m = re.search(r"^    script:\n\s+\"\.\./workflow/scripts/(\w+\.py)\"", body, re.M)
        if m:
            with_script[name] = m.group(1)
    assert set(with_script.values()) == {p.name for p in SCRIPTS.glob("*.py")}, "a script without a rule"
    assert {"preprocess", "detect_events", "train_cvae", "generate", "downstream"} <= with_script.keys()
    for name, script in with_script.items():
        m = re.search(r"^    threads: (\d+)", blocks[name], re.M)
        assert m and int(m.group(1)) >= 1, f"rule {name} declares no threads"
        assert passes_threads_to_limit_threads(SCRIPTS / script), f"{script} does not apply snakemake.threads"
    assert re.search(r"^    threads: 4\b", blocks["preprocess"], re.M)
    assert re.search(r"^    threads: 2\b", blocks["detect_events"], re.M)


def test_the_check_above_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from precip_cvae.resources import limit_threads\nwith limit_threads(4):\n    pass\n")
    assert not passes_threads_to_limit_threads(bad)
    bad.write_text("from precip_cvae.resources import limit_threads\nx = 1\n"
                   "with limit_threads(snakemake.threads):\n    pass\n")
    assert not passes_threads_to_limit_threads(bad)
    good = tmp_path / "good.py"
    good.write_text('"""doc"""\nfrom precip_cvae.resources import limit_threads\n'
                    "with open('x'), limit_threads(snakemake.threads):\n    pass\n")
    assert passes_threads_to_limit_threads(good)


# --- stages run through their scripts on one thread --------------------------------------------


class Recorder(dask.callbacks.Callback):
    """At the start of every dask computation: the settings in force; per task: its worker thread."""

    def __init__(self):
        super().__init__()
        self.starts, self.workers = [], set()

    def _start(self, dsk):
        t = sys.modules.get("torch")
        self.starts.append((dask.config.get("scheduler", None), dask.config.get("num_workers", None),
                            None if t is None else t.get_num_threads(), frozenset(pool_threads())))

    def _posttask(self, key, result, dsk, state, worker_id):
        self.workers.add(worker_id)


GENERATE_OUTPUTS = ("augmented", "training_set", "report", "report_md", "netcdf", "condition_netcdf")


def run_script(name: str, threads: int, log: Path, **parts) -> Recorder:
    ns = {k: SimpleNamespace(**v) for k, v in parts.items()}
    fake = SimpleNamespace(threads=threads, log=[str(log)], wildcards=SimpleNamespace(experiment="default"), **ns)
    rec = Recorder()
    with rec:
        runpy.run_path(str(SCRIPTS / f"{name}.py"), init_globals={"snakemake": fake}, run_name="__main__")
    return rec


def assert_one_thread(rec: Recorder, log: Path, torch_loaded: bool):
    assert rec.starts, "the stage computed nothing with dask"
    for scheduler, workers, torch_threads, pools in rec.starts:
        assert scheduler == "threads" and workers == 1 and pools == {1}
        assert torch_threads == (1 if torch_loaded else torch_threads)
    assert len(rec.workers) == 1
    assert re.search(r"1 threads: dask threads scheduler with 1 workers, torch (1|not loaded), BLAS/OpenMP pools \w+ 1",
                     log.read_text())


def test_preprocess_and_detect_events_scripts_use_one_worker_on_one_thread(small_inputs):
    root, _, _ = small_inputs
    data = {"target": {"paths": str(root / "target" / "*.nc"), "variable": "pr"},
            "predictors": [{"paths": str(root / "pred" / "z500.nc"), "variable": "z500"}]}
    dataset = root / "dataset.zarr"
    rec = run_script("preprocess", 1, root / "preprocess.log", params={"data": data,
                     "preprocess": {"grid_multiple": 4, "chunk_time": 100}, "fold": None}, output={"dataset": str(dataset)})
    assert_one_thread(rec, root / "preprocess.log", torch_loaded="torch" in sys.modules)
    assert dataset.exists()
    rec = run_script("detect_events", 1, root / "events.log", input={"dataset": str(dataset)},
                     params={"events": {"min_wet_days": 5}},
                     output={"thresholds": str(root / "thresholds.nc"), "events": str(root / "events.csv")})
    assert_one_thread(rec, root / "events.log", torch_loaded="torch" in sys.modules)
    assert (root / "events.csv").exists()
    # outside the stage the process is back to its own settings
    assert dask.config.get("num_workers", None) is None


def test_generate_script_samples_on_one_torch_thread(prepared, tmp_path):
    paths = train.TrainPaths.in_dir(prepared["dataset"], prepared["thresholds"], prepared["events"],
                             str(tmp_path / "train"), str(tmp_path / "resume"))
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, val_members=2, device="cpu",
                                                             loss=LossConfig(warmup_epochs=0)), threads=1)
    torch.set_num_threads(2)  # what the process had before; the stage must bring it down to 1
    sampled = []
    from precip_cvae import model as model_mod

    original = model_mod.CVAE.sample

    def spy(self, *args, **kwargs):
        sampled.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    model_mod.CVAE.sample = spy
    try:
        out = tmp_path / "generate"
        rec = run_script("generate", 1, tmp_path / "generate.log",
                         input={"checkpoint": str(paths.best), "dataset": prepared["dataset"],
                                "thresholds": prepared["thresholds"], "events": prepared["events"]},
                         params={"generate": {"members": 2, "netcdf": True, "device": "cpu", "filter_heavy": False},
                                 "events": {"min_exceed_fraction": 0.05}},
                         output={k: v for k, v in vars(generate.GeneratePaths.in_dir(
                             out, "", "", "", "", netcdf=True)).items() if k in GENERATE_OUTPUTS})
    finally:
        model_mod.CVAE.sample = original
    assert sampled and set(sampled) == {1}
    assert_one_thread(rec, tmp_path / "generate.log", torch_loaded=True)
    assert "on device cpu" in (tmp_path / "generate.log").read_text()
    assert torch.get_num_threads() == 2


def test_training_threads_per_process(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(train, "_train", lambda *a, **k: seen.append((torch.get_num_threads(),
                                                                       dask.config.get("num_workers"))))
    paths = train.TrainPaths.in_dir("d", "t", "e", str(tmp_path), str(tmp_path / "r"))
    cfg = TrainConfig(epochs=1, device="cpu")
    train.run(paths, ModelConfig(preset="tiny"), cfg, threads=3)
    assert seen[-1] == (3, 3)
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, num_threads=1), threads=3)
    assert seen[-1] == (1, 1)  # train.num_threads replaces the rule's threads
    # DDP: each of the gpus processes gets its share of the rule's threads
    spawned = []
    def launch(world, job, work_dir, nodes=1):
        assert job.kwargs["threads"] == job.threads and job.function() is train.train_process
        spawned.append((world, job.threads) if nodes == 1 else (world, job.threads, nodes))
        train._write_log([], job.kwargs["paths"].log_csv)

    monkeypatch.setattr(train.distributed, "launch", launch)
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, gpus=2), threads=8)
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, gpus=4), threads=2)
    # several nodes: gpus processes on each, each with its share of the node's threads
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, gpus=2, nodes=3), threads=8)
    train.run(paths, ModelConfig(preset="tiny"), TrainConfig(epochs=1, gpus=1, nodes=2), threads=8)
    assert spawned == [(2, 4), (4, 1), (2, 4, 3), (1, 8, 2)]
    train.train_process(paths, ModelConfig(preset="tiny"), cfg, 4, "default", dist=train.Dist(1, 2))
    assert seen[-1] == (4, 4)  # a rank applies the share it was given


# --- GPUs asked for by the rules ---------------------------------------------------------------


def resources_of(text: str, rule: str) -> dict[str, str]:
    block = re.search(rf"^rule {rule}:\n(.*?)^\s+resources: (.*?)$", text, re.M | re.S)
    assert block, f"no resources for {rule} in:\n{text[-3000:]}"
    return dict(item.split("=", 1) for item in block.group(2).split(", "))


@pytest.mark.workflow
def test_generate_and_downstream_ask_for_a_gpu_unless_their_device_is_cpu(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
    asked = {}
    for device in ("cpu", "auto", "cuda"):
        cfg["generate"]["device"] = cfg["downstream"]["device"] = device
        (work / "config" / f"{device}.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "8", "-n", "--configfile",
                               f"config/{device}.yaml"], cwd=work, capture_output=True, text=True, timeout=300)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-3000:]
        asked[device] = {r: resources_of(text, r).get("gpu") for r in ("generate", "downstream", "train_cvae",
                                                                        "preprocess")}
        threads = {r: re.search(rf"^rule {r}:\n(?:    .*\n)*?    threads: (\d+)$", text, re.M).group(1)
                   for r in ("preprocess", "detect_events", "generate", "downstream")}
        assert threads == {"preprocess": "4", "detect_events": "2", "generate": "4", "downstream": "4"}
    assert asked["cpu"] == {"generate": "0", "downstream": "0", "train_cvae": "1", "preprocess": None}
    assert asked["auto"] == asked["cuda"] == {"generate": "1", "downstream": "1", "train_cvae": "1",
                                              "preprocess": None}
