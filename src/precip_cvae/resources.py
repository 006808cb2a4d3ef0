"""The compute a stage may use: the rule's ``threads`` and the torch device (one owner of both).

A rule declares its cores as ``threads:`` (Snakemake caps them at ``--cores``; on SLURM they are
``--cpus-per-task``). :func:`limit_threads` applies that number to everything in the process that
would otherwise take every core of the node:

- dask: the threaded scheduler with ``num_workers`` = threads (``dask.config``), for every
  ``.compute()``, ``.load()`` and ``to_zarr`` inside the block;
- torch: ``torch.set_num_threads`` (intra-op pool), when torch is imported; a later import reads
  ``OMP_NUM_THREADS``, which is set too;
- BLAS/OpenMP: ``threadpoolctl.threadpool_limits`` on the pools already loaded (OpenBLAS of numpy
  and scipy, MKL, libgomp of torch), and ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
  ``MKL_NUM_THREADS`` ... for libraries loaded later and for child processes (DDP ranks).

Everything is restored on leaving the block. Every script in ``workflow/scripts/`` wraps its stage
in ``limit_threads(snakemake.threads)`` (tests/test_resources.py checks it).

:func:`select_device` turns a config's ``device`` (``auto``, ``cpu``, ``cuda``) into a
``torch.device``; train, evaluate, generate and downstream all use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from .config import DEVICES

if TYPE_CHECKING:  # torch is imported only by the stages that use it
    import torch

log = logging.getLogger(__name__)

# read by OpenMP, OpenBLAS, MKL, BLIS, Apple Accelerate and numexpr when they load
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class ThreadLimits:
    """What :func:`limit_threads` set, read back from the libraries after setting it.

    ``torch_threads`` is None when torch was not imported (a later import reads
    ``OMP_NUM_THREADS``); ``pools`` holds ``(user_api, internal_api, num_threads)`` of every
    BLAS/OpenMP pool threadpoolctl found loaded.
    """

    threads: int
    dask_scheduler: str
    dask_num_workers: int
    torch_threads: int | None
    pools: tuple[tuple[str, str, int], ...]
    env: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        pools = ", ".join(f"{api} {n}" for _, api, n in self.pools) or "none loaded"
        torch_part = "not loaded" if self.torch_threads is None else str(self.torch_threads)
        return (f"{self.threads} threads: dask {self.dask_scheduler} scheduler with {self.dask_num_workers} workers, "
                f"torch {torch_part}, BLAS/OpenMP pools {pools}")


def current_limits(threads: int) -> ThreadLimits:
    """The settings in force now, as :class:`ThreadLimits` (``threads``: the number asked for)."""
    import dask
    from threadpoolctl import threadpool_info

    torch = sys.modules.get("torch")
    return ThreadLimits(
        threads=int(threads),
        dask_scheduler=str(dask.config.get("scheduler", None)),
        dask_num_workers=dask.config.get("num_workers", None),
        torch_threads=None if torch is None else int(torch.get_num_threads()),
        pools=tuple((p["user_api"], p["internal_api"], int(p["num_threads"])) for p in threadpool_info()),
        env=tuple((k, os.environ.get(k, "")) for k in THREAD_ENV_VARS),
    )


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[ThreadLimits]:
    """Run the block on ``threads`` cores: dask workers, torch threads and BLAS/OpenMP pools.

    Parameters
    ----------
    threads : int
        The rule's ``threads`` (``snakemake.threads``), >= 1.

    Yields
    ------
    ThreadLimits
        The values set, read back from dask, torch and threadpoolctl (also logged).

    Raises
    ------
    ValueError
        ``threads`` < 1.
    """
    import dask
    from threadpoolctl import threadpool_limits

    n = int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r} (the rule's `threads:`)")
    old_env = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    torch = sys.modules.get("torch")
    old_torch = None if torch is None else torch.get_num_threads()
    os.environ.update({k: str(n) for k in THREAD_ENV_VARS})
    blas = threadpool_limits(limits=n)
    try:
        if torch is not None:
            torch.set_num_threads(n)
        with dask.config.set(scheduler="threads", num_workers=n):
            limits = current_limits(n)
            log.info("%s", limits.describe())
            yield limits
    finally:
        blas.restore_original_limits()
        if old_torch is not None:
            torch.set_num_threads(old_torch)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def select_device(name: str, key: str = "device") -> "torch.device":
    """``torch.device`` for a config's device name.

    Parameters
    ----------
    name : {'auto', 'cpu', 'cuda'}
        'auto': CUDA when torch sees a GPU, else the CPU; 'cuda' without a visible GPU is an error.
    key : str
        The config key, for the messages (``generate.device``).

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones).
    RuntimeError
        'cuda' where torch sees no CUDA device.
    """
    import torch

    if name not in DEVICES:
        raise ValueError(f"{key} {name!r}; valid names are {list(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} is 'cuda' but no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
