"""Data-parallel training (DDP), launched with ``torchrun``.

``train.gpus > 1`` makes :func:`precip_cvae.train.run` call :func:`launch`, which starts

    python -m torch.distributed.run --standalone --nproc-per-node <gpus> -m precip_cvae.distributed <spec>

``torchrun`` is the standard launcher: it sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
for each process, finds a free port, and on a failure stops the other processes.  Each
process runs :func:`main`: ``init_process_group`` from that environment (``env://``; NCCL
on GPUs, gloo on CPU), then one training process on its share of every batch
(:func:`precip_cvae.train.train_process`, named by the :class:`RankJob` the launcher
writes, so that this module never imports the training).  Only rank 0 validates, writes checkpoints and
logs.  With ``train.nodes`` M > 1 the launcher runs one torchrun per node under ``srun`` inside the SLURM
job, meeting at a c10d rendezvous on the job's first node (:class:`Rendezvous`, docs/hpc.md).

How a process ended is not read from tracebacks: each rank writes a small JSON status
(``ok``, ``interrupted`` with the signal, ``non_finite`` or ``error``) into the status
directory, and :func:`launch` turns the statuses into the same exceptions a single
process raises (:class:`~precip_cvae.interrupts.TrainingInterrupted`,
:class:`~precip_cvae.interrupts.NonFiniteLoss`).  SIGTERM / SIGUSR1 received by the launching
process (SLURM's warning before a time limit) reach every rank as SIGTERM; each stops at
its next step, as one process does.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .interrupts import NonFiniteLoss, SignalFlag, TrainingInterrupted

log = logging.getLogger(__name__)

SPEC_FILE = "spec.pkl"
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: rerun to resume
EXIT_NON_FINITE = 65  # EX_DATAERR


class Dist:
    """Rank bookkeeping for DDP; a world of one makes every collective a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int | None = None):
        self.rank, self.world = rank, world
        self.local_rank = rank if local_rank is None else local_rank

    @classmethod
    def from_env(cls) -> "Dist":
        """The rank of this process as torchrun set it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except KeyError as exc:
            raise RuntimeError(f"{exc.args[0]} is not set: start this module with torchrun") from None
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}


@dataclass(frozen=True)
class RankJob:
    """What every rank runs: ``target`` ('package.module:function') called as ``function(**kwargs, dist=Dist)``
    on ``threads`` threads (each process's ``OMP_NUM_THREADS``)."""

    target: str
    kwargs: dict[str, Any]
    threads: int = 1

    def function(self):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Spec:
    """The pickled file every rank reads: its job, the launcher's log file and where to report."""

    job: RankJob
    log_path: str | None
    status_dir: str


def _status_path(status_dir: str | Path, rank: int) -> Path:
    return Path(status_dir) / f"rank{rank}.json"


def write_spec(status_dir: str | Path, job: RankJob, log_path: str | None = None) -> Path:
    """An empty ``status_dir`` holding the spec of a run (``job`` and where to log and report); its path."""
    status_dir = Path(status_dir)
    shutil.rmtree(status_dir, ignore_errors=True)
    status_dir.mkdir(parents=True)
    spec = status_dir / SPEC_FILE
    spec.write_bytes(pickle.dumps(Spec(job, log_path, str(status_dir))))
    return spec


def expand_hostlist(expr: str) -> list[str]:
    """The host names of a SLURM host list (``SLURM_JOB_NODELIST``), as ``scontrol show hostnames`` gives
    them: ``gpu[01-03,07],login2`` -> gpu01, gpu02, gpu03, gpu07, login2 (zero padding kept)."""
    hosts, i, expr = [], 0, expr.strip()
    while i < len(expr):
        j = i
        while j < len(expr) and expr[j] not in ",[":
            j += 1
        prefix = expr[i:j]
        if j < len(expr) and expr[j] == "[":
            close = expr.index("]", j)
            tail_end = close + 1
            while tail_end < len(expr) and expr[tail_end] != ",":
                tail_end += 1
            suffix = expr[close + 1 : tail_end]
            for part in expr[j + 1 : close].split(","):
                lo, _, hi = part.partition("-")
                if not hi:
                    hosts.append(f"{prefix}{lo}{suffix}")
                    continue
                if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                    raise ValueError(f"SLURM host list {expr!r}: range {part!r} is not lo-hi")
                hosts += [f"{prefix}{n:0{len(lo)}d}{suffix}" for n in range(int(lo), int(hi) + 1)]
            i = tail_end + 1
        else:
            if prefix:
                hosts.append(prefix)
            i = j + 1
    return hosts


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a multi-node training meet (torchrun's c10d rendezvous): ``nodes`` nodes, the first
    node of the job's host list as the endpoint, a port, and the SLURM job id as the rendezvous id."""

    nodes: int
    host: str
    port: int
    job_id: str

    @classmethod
    def from_slurm(cls, nodes: int, env=None) -> "Rendezvous":
        """From the SLURM allocation this process runs in (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST``,
        ``SLURM_JOB_NUM_NODES``).  ``MASTER_PORT`` sets the port, else 29500 + the job id modulo 1000 (two
        jobs sharing a first node rarely share a port).

        Raises
        ------
        RuntimeError
            Not inside a SLURM job, or the job has fewer nodes than asked for.
        """
        env = os.environ if env is None else env
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing:
            raise RuntimeError(f"train.nodes {nodes}: multi-node training runs inside a SLURM job ({', '.join(missing)} "
                               "not set); submit with the slurm profile, or set train.nodes 1")
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
        have = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
        if have < nodes or len(hosts) < nodes:
            raise RuntimeError(f"train.nodes {nodes}: SLURM job {env['SLURM_JOB_ID']} has {have} node(s) "
                               f"({env['SLURM_JOB_NODELIST']}); ask for {nodes} (the rule's nodes resource)")
        job_id = str(env["SLURM_JOB_ID"])
        port = int(env.get("MASTER_PORT") or 29500 + int("".join(c for c in job_id if c.isdigit()) or 0) % 1000)
        return cls(nodes, hosts[0], port, job_id)


def torchrun_command(world: int, spec: str | Path, rendezvous: Rendezvous | None = None) -> list[str]:
    """torchrun starting ``world`` ranks on this node (``--standalone``), or, with a ``rendezvous``, ``world``
    ranks on each of its nodes, one torchrun per node started by ``srun`` (c10d rendezvous at its endpoint).
    SIGUSR1 (SLURM's warning before a time limit) is passed on to the ranks, not left to kill torchrun."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    tail = [f"--nproc-per-node={world}", f"--signals-to-handle={SIGNALS_TO_HANDLE}", "-m", "precip_cvae.distributed",
            str(spec)]
    if rendezvous is None:
        return [*run, "--standalone", *tail]
    n = rendezvous.nodes
    return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *run,
            f"--nnodes={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous.host}:{rendezvous.port}",
            f"--rdzv-id={rendezvous.job_id}", *tail]


def read_statuses(status_dir: str | Path) -> list[dict]:
    """The statuses the ranks wrote, by rank."""
    return sorted((json.loads(p.read_text()) for p in Path(status_dir).glob("rank*.json")), key=lambda s: s["rank"])


def launch(world: int, job: RankJob, work_dir: str | Path, nodes: int = 1) -> None:
    """Run ``job`` in ``world`` processes on each of ``nodes`` nodes started by torchrun (across nodes: one
    torchrun per node under ``srun``, :class:`Rendezvous` from the SLURM job); return when all succeeded.

    ``work_dir`` (the resume directory, on a file system every node sees) receives the spec and the ranks'
    statuses.
    ``job.threads`` (threads per process) becomes each process's ``OMP_NUM_THREADS``.

    Raises
    ------
    precip_cvae.interrupts.TrainingInterrupted
        A rank stopped on a signal (or this process was signalled): rerun to resume.
    precip_cvae.interrupts.NonFiniteLoss
        The loss was not finite (every rank agrees before any backward pass).
    RuntimeError
        Any other failure, with the first failed rank's error.
    """
    status_dir = Path(work_dir) / "ddp"
    log_path = next((h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
    rendezvous = Rendezvous.from_slurm(nodes) if nodes > 1 else None
    cmd = torchrun_command(world, write_spec(status_dir, job, log_path), rendezvous)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(job.threads)))}
    log.info("DDP: %d processes (%s) with torchrun%s", world * nodes, "nccl" if torch.cuda.is_available() else "gloo",
             "" if rendezvous is None else f" on {nodes} nodes, rendezvous {rendezvous.host}:{rendezvous.port}")
    world = world * nodes  # the ranks that report
    for handler in logging.getLogger().handlers:
        handler.flush()
    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        log.warning("received signal %d: stopping the DDP processes at their next step", signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun passes SIGTERM on to every rank

    old = {s: signal.signal(s, forward) for s in SignalFlag.SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    statuses = read_statuses(status_dir)
    failed = [s for s in statuses if s["outcome"] != "ok"]
    if code == 0 and len(statuses) == world and not failed:
        if received:  # too late to stop anything: training finished and best.pt is selected
            log.warning("signal %d arrived after every rank had finished; the training is complete", received[0])
        return
    interrupted = next((s for s in failed if s["outcome"] == "interrupted"), None)
    if interrupted is not None or received:
        signum = interrupted["signum"] if interrupted else received[0]
        message = interrupted["message"] if interrupted else f"interrupted by signal {signum} before the first step"
        raise TrainingInterrupted(signum, message)
    non_finite = next((s for s in failed if s["outcome"] == "non_finite"), None)
    if non_finite is not None:
        raise NonFiniteLoss(non_finite["message"])
    if failed:
        first = min(failed, key=lambda s: s["rank"])
        raise RuntimeError(f"DDP rank {first['rank']} failed: {first['type']}: {first['message']}")
    if code != 0 or len(statuses) != world:
        raise RuntimeError(f"torchrun exited with code {code} and {len(statuses)} of {world} ranks reported "
                           f"(statuses in {status_dir}); see the log above")


def _outcome(exc: BaseException | None) -> tuple[dict[str, Any], int]:
    if exc is None:
        return {"outcome": "ok"}, 0
    if isinstance(exc, TrainingInterrupted):
        return {"outcome": "interrupted", "signum": int(exc.signum), "message": str(exc)}, EXIT_INTERRUPTED
    if isinstance(exc, NonFiniteLoss):
        return {"outcome": "non_finite", "message": str(exc)}, EXIT_NON_FINITE
    return {"outcome": "error", "type": type(exc).__name__, "message": str(exc)}, 1


def main(argv: list[str] | None = None) -> int:
    """One rank (``python -m precip_cvae.distributed SPEC`` under torchrun); returns its exit code."""
    import torch.distributed as tdist

    from .logs import setup

    argv = sys.argv[1:] if argv is None else argv
    spec: Spec = pickle.loads(Path(argv[0]).read_bytes())
    dist = Dist.from_env()
    setup(spec.log_path if dist.main else None, logging.INFO if dist.main else logging.WARNING, append=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    # NCCL for the gradients on GPUs; gloo for the small CPU tensors of Dist's flags and means
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend, init_method="env://")
    error: BaseException | None = None
    try:
        spec.job.function()(**spec.job.kwargs, dist=dist)
    except Exception as exc:  # noqa: BLE001 -- reported to the launcher through the status file
        error = exc
        if not isinstance(exc, (TrainingInterrupted, NonFiniteLoss)):
            log.exception("rank %d failed", dist.rank)
        else:
            log.warning("rank %d: %s", dist.rank, exc)
    finally:
        status, code = _outcome(error)
        _status_path(spec.status_dir, dist.rank).write_text(json.dumps({"rank": dist.rank, **status}))
        tdist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
