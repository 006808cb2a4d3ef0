"""Reference forecasts the conditional VAE must beat, looked up by name.

Plain numpy functions; no file I/O.  Precipitation in mm day-1.

Three baselines, each usable directly with its own arguments:

* :func:`climatology` -- random train fields, no use of the condition;
* :func:`analogs` -- the train days whose (normalised, flattened) large-scale
  condition is nearest in Euclidean distance;
* :func:`interpolation` -- bilinear interpolation of the coarse precipitation
  to the fine grid over valid coarse cells (deterministic; finite wherever a
  day's coarse field has a finite value).

Common calling convention (what the evaluate stage uses)
--------------------------------------------------------
``BASELINES[name](inputs) -> ens`` with ``inputs`` a :class:`BaselineInputs`
and ``ens`` an ndarray (M, N, H, W), member axis first -- the deterministic
interpolation comes back as a one-member ensemble (1, N, H, W).  Get the
function with :func:`get_baseline`, which raises a
:class:`~precip_cvae.config.ConfigError` listing the valid names::

    run = get_baseline("analogs")
    ens = run(BaselineInputs(train_pr=..., n_members=10, train_cond=...,
                             target_cond=...))

Each baseline reads only the fields it needs (listed in its docstring) and
raises ``ValueError`` naming any that are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import lookup
from .grid import bilinear
from .neighbours import exclusions, nearest

__all__ = [
    "BaselineInputs",
    "BASELINES",
    "get_baseline",
    "climatology",
    "analogs",
    "interpolation",
]


# ----------------------------------------------------------------------------- functions


def _days_array(train_pr):
    """``train_pr`` as given when it is array-like with a shape (an ndarray, or fields read from the store only
    for the days taken: :class:`precip_cvae.data.DayFields`), else as an ndarray."""
    return train_pr if hasattr(train_pr, "shape") and hasattr(train_pr, "__getitem__") else np.asarray(train_pr)


def climatology(train_pr, n_days: int, n_members: int,
                rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Climatological ensemble: independent random draws of train fields.

    Each of the N x M (day, member) slots gets a train day drawn uniformly,
    with replacement and independently of the condition.

    Parameters
    ----------
    train_pr : ndarray (T, H, W), mm day-1
    n_days : int
        N, the number of days to forecast.
    n_members : int
        M.
    rng : numpy Generator, seed or None

    Returns
    -------
    ndarray (M, N, H, W)
        Same dtype as ``train_pr``; every field is one of the train fields.
    """
    train_pr = _days_array(train_pr)
    if train_pr.ndim != 3 or train_pr.shape[0] < 1:
        raise ValueError(f"train_pr must be (T, H, W) with T >= 1, got {train_pr.shape}")
    if n_members < 1 or n_days < 0:
        raise ValueError(f"need n_members >= 1 and n_days >= 0, got {n_members}, {n_days}")
    rng = np.random.default_rng(rng)
    idx = rng.integers(0, train_pr.shape[0], size=(int(n_members), int(n_days)))
    return train_pr[idx]


def analogs(train_cond, target_cond, train_pr, n_members: int,
            exclude=None, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Analog ensemble: the M train days with the nearest condition.

    Distance is Euclidean in the given condition space, which must already be
    normalised and flattened.  Ties go to the lower train index.

    Parameters
    ----------
    train_cond : ndarray (T, F)
    target_cond : ndarray (N, F)
    train_pr : ndarray (T, H, W), mm day-1
    n_members : int
        M; must not exceed the number of train days left after exclusion.
    exclude : None or int array (N,) or (N, K)
        Train indices that may not be analogs of each target day (-1 = none).
        Leave-one-out scoring on the train set: ``exclude=np.arange(T)`` (add
        neighbouring days as extra columns to exclude them too).
    chunk : int
        Target days per distance block (memory: chunk x T floats).

    Returns
    -------
    ens : ndarray (M, N, H, W)
        ``ens[j, i] = train_pr[indices[i, j]]``.
    indices : ndarray (N, M) of int
        Train indices per target day, nearest first.
    """
    tc = np.asarray(train_cond, dtype=np.float64)
    qc = np.asarray(target_cond, dtype=np.float64)
    train_pr = _days_array(train_pr)
    if tc.ndim != 2 or qc.ndim != 2 or tc.shape[1] != qc.shape[1]:
        raise ValueError(
            f"train_cond (T, F) and target_cond (N, F) must share F, got {tc.shape}, {qc.shape}"
        )
    if train_pr.shape[0] != tc.shape[0]:
        raise ValueError(f"train_pr has {train_pr.shape[0]} days, train_cond {tc.shape[0]}")
    t, n, m = tc.shape[0], qc.shape[0], int(n_members)
    ex = exclusions(exclude, n)
    n_excl = 0 if ex is None else int(np.max((ex >= 0).sum(1), initial=0))
    if m < 1 or m > t - n_excl:
        raise ValueError(f"n_members = {m} must be in 1..{t - n_excl} (train days left)")
    indices, _ = nearest(qc, tc, m, exclude=ex, chunk=chunk)
    return train_pr[indices.T], indices


def interpolation(coarse_pr, coarse_lat, coarse_lon, fine_lat, fine_lon) -> np.ndarray:
    """Bilinear interpolation of coarse precipitation onto the fine grid, over valid coarse cells only.

    :func:`precip_cvae.grid.bilinear` with ``missing="skip"``: each fine value is the bilinear
    combination of its four coarse neighbours whose values are finite, with their weights
    renormalised to sum to 1 (the plain bilinear value when all four are finite, equal to
    ``scipy.interpolate.RegularGridInterpolator``'s linear one).  A fine cell whose neighbours with
    non-zero weight are all missing (beside a coast of all-sea blocks) takes the nearest finite
    coarse value of that day, in coordinate units.  Outside the coarse hull the fine coordinates are
    clipped to it (the nearest edge value).  A day whose coarse field is all missing stays missing.

    Parameters
    ----------
    coarse_pr : ndarray (N, h, w), mm day-1, NaN where missing (e.g. blocks of sea)
    coarse_lat : ndarray (h,), coarse_lon : ndarray (w,)
    fine_lat : ndarray (H,), fine_lon : ndarray (W,); or both (H, W): each fine cell's own position

    Returns
    -------
    ndarray (N, H, W), float64, mm day-1
    """
    pr = np.asarray(coarse_pr, dtype=np.float64)
    if pr.ndim != 3:
        raise ValueError(f"coarse_pr must be (N, h, w), got {pr.shape}")
    return bilinear(pr, coarse_lat, coarse_lon, fine_lat, fine_lon, missing="skip")


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True, eq=False)
class BaselineInputs:
    """Everything a baseline may need; each baseline reads only its own fields.

    Attributes
    ----------
    train_pr : ndarray (T, H, W), mm day-1 -- climatology, analogs (or any object indexed like one by integer
        arrays, e.g. :class:`precip_cvae.data.DayFields`: only the days taken are read)
    n_members : int -- M (climatology, analogs; interpolation always gives 1)
    n_days : int or None -- N for climatology; defaults to len(target_cond) or
        len(coarse_pr) when those are given
    rng : numpy Generator, seed or None -- climatology
    train_cond : ndarray (T, F) -- analogs (normalised, flattened)
    target_cond : ndarray (N, F) -- analogs
    exclude : int array (N,) or (N, K) or None -- analogs, see :func:`analogs`
    coarse_pr : ndarray (N, h, w), mm day-1 -- interpolation
    coarse_lat, coarse_lon, fine_lat, fine_lon : 1-D ndarrays -- interpolation
    """

    train_pr: np.ndarray | None = None
    n_members: int = 1
    n_days: int | None = None
    rng: np.random.Generator | int | None = None
    train_cond: np.ndarray | None = None
    target_cond: np.ndarray | None = None
    exclude: np.ndarray | None = None
    coarse_pr: np.ndarray | None = None
    coarse_lat: np.ndarray | None = None
    coarse_lon: np.ndarray | None = None
    fine_lat: np.ndarray | None = None
    fine_lon: np.ndarray | None = None

    def require(self, baseline: str, *names: str) -> None:
        missing = [k for k in names if getattr(self, k) is None]
        if missing:
            raise ValueError(f"baseline {baseline!r} needs input(s) {missing}")

    def days(self) -> int:
        if self.n_days is not None:
            return int(self.n_days)
        for a in (self.target_cond, self.coarse_pr):
            if a is not None:
                return len(a)
        raise ValueError("n_days is not given and cannot be inferred "
                         "(no target_cond or coarse_pr)")


def _run_climatology(inp: BaselineInputs) -> np.ndarray:
    inp.require("climatology", "train_pr")
    return climatology(inp.train_pr, inp.days(), inp.n_members, inp.rng)


def _run_analogs(inp: BaselineInputs) -> np.ndarray:
    inp.require("analogs", "train_pr", "train_cond", "target_cond")
    ens, _ = analogs(inp.train_cond, inp.target_cond, inp.train_pr, inp.n_members,
                     exclude=inp.exclude)
    return ens


def _run_interpolation(inp: BaselineInputs) -> np.ndarray:
    inp.require("interpolation", "coarse_pr", "coarse_lat", "coarse_lon", "fine_lat", "fine_lon")
    return interpolation(inp.coarse_pr, inp.coarse_lat, inp.coarse_lon,
                         inp.fine_lat, inp.fine_lon)[None]


BASELINES: dict[str, Callable[[BaselineInputs], np.ndarray]] = {
    "climatology": _run_climatology,
    "analogs": _run_analogs,
    "interpolation": _run_interpolation,
}


def get_baseline(name: str) -> Callable[[BaselineInputs], np.ndarray]:
    """The baseline called ``name``: ``f(BaselineInputs) -> ndarray (M, N, H, W)``.

    Raises
    ------
    precip_cvae.config.ConfigError
        For an unknown name; the message lists the valid names.
    """
    return lookup(BASELINES, name, "baseline")
