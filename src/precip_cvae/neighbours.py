"""Nearest neighbours by Euclidean distance, one owner for the package: the analog baseline
(nearest train conditions, :func:`precip_cvae.baselines.analogs`) and the memorisation check of
generated fields (nearest train fields, :func:`precip_cvae.generate.memorisation.memorisation_check`).

Distances come from BLAS (``|a|^2 + |b|^2 - 2 a.b``, clipped at 0), a block of query rows at a
time so that memory stays at ``chunk x len(b)``; ties go to the lower index of ``b``.  :func:`nearest_rmse`
also takes ``b`` a block of rows at a time (fields larger than memory, read as they are indexed).
"""

from __future__ import annotations

import numpy as np


def sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)) in float64, clipped at 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def exclusions(exclude, n: int) -> np.ndarray | None:
    """``exclude`` as an (n, K) int array of rows to skip (-1 = none), or None."""
    if exclude is None:
        return None
    ex = np.asarray(exclude, dtype=np.int64)
    ex = ex[:, None] if ex.ndim == 1 else ex
    if ex.ndim != 2 or ex.shape[0] != n:
        raise ValueError(f"exclude must be (N,) or (N, K) with N = {n}, got {ex.shape}")
    return ex


def nearest(a: np.ndarray, b: np.ndarray, k: int, exclude=None, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``b`` to each row of ``a``, nearest first (ties: lower index).

    Parameters
    ----------
    a : ndarray (N, F), b : ndarray (T, F), finite
    k : int, 1..T
    exclude : None or int array (N,) or (N, K)
        Rows of ``b`` that may not be neighbours of each row of ``a`` (-1 = none); an excluded row
        gets distance ``inf`` (it comes last, so it is returned only when ``k`` leaves no other).
    chunk : rows of ``a`` per distance block

    Returns
    -------
    indices : ndarray (N, k) int64; sq_dist : ndarray (N, k) float64, squared distances
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a (N, F) and b (T, F) must share F, got {a.shape}, {b.shape}")
    n, t, k = a.shape[0], b.shape[0], int(k)
    if not 1 <= k <= t:
        raise ValueError(f"k = {k} must be in 1..{t} (rows of b)")
    ex = exclusions(exclude, n)
    indices = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float64)
    for s in range(0, n, chunk):
        d = sq_distances(a[s:s + chunk], b)
        if ex is not None:
            rows, cols = np.nonzero(ex[s:s + chunk] >= 0)
            d[rows, ex[s:s + chunk][rows, cols]] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        indices[s:s + chunk] = order
        dist[s:s + chunk] = np.take_along_axis(d, order, axis=1)
    return indices, dist


#: Bytes of ``b``'s rows (float64) that :func:`nearest_rmse` compares at once.
B_BLOCK_BYTES = 256 * 2**20


def _row_reader(b):
    """(number of rows, rows(start, stop) -> (n, P) ndarray) of ``b``: an ndarray, or fields indexed by integer
    arrays and read on demand (:class:`precip_cvae.data.DayFields`)."""
    if isinstance(b, np.ndarray):
        flat = b.reshape(b.shape[0], -1)
        return flat.shape[0], lambda s, e: flat[s:e]
    return len(b), lambda s, e: np.asarray(b[np.arange(s, e)]).reshape(e - s, -1)


def nearest_rmse(a: np.ndarray, b, k: int = 1, exclude=None, exclude_self: bool = False,
                 chunk: int = 256, b_rows: int | None = None) -> np.ndarray:
    """RMSE from each field of ``a`` to its ``k`` nearest field(s) of ``b``, over the pixels valid in both.

    ``b`` is compared a block of rows at a time (``b_rows``; default: as many as fit :data:`B_BLOCK_BYTES` in
    float64) and the ``k`` nearest are merged over the blocks (ties: lower index), so ``b`` may be larger than
    memory: fields read from the store as they are indexed (:class:`precip_cvae.data.DayFields`, read twice:
    once for the valid pixels, once for the distances).  Exact, as with one block.

    Parameters
    ----------
    a : ndarray (Na, P), b : ndarray (Nb, P) or fields indexed like (Nb, ...); NaN = invalid pixel (the mask is
        assumed common, so a pixel NaN in any field is dropped)
    k : 1 (returns (Na,)) or more (returns (Na, k), nearest first)
    exclude : ndarray (Na,) of int, optional: for each field of ``a``, the field of ``b`` to skip
        (itself), or -1
    exclude_self : ``a`` is ``b``: skip each field's own pair (real-to-real distances)
    """
    a = a.reshape(a.shape[0], -1)
    if exclude_self:
        exclude = np.arange(a.shape[0])
    nb, rows = _row_reader(b)
    step = int(b_rows or max(1, B_BLOCK_BYTES // max(1, a.shape[1] * 8)))
    valid = np.ones(a.shape[1], bool)
    for start in range(0, nb, step):
        valid &= np.isfinite(rows(start, min(start + step, nb))).all(axis=0)
    for start in range(0, a.shape[0], chunk):
        valid &= np.isfinite(a[start:start + chunk]).all(axis=0)
    p = max(int(valid.sum()), 1)
    k = int(k)
    if not 1 <= k <= nb:
        raise ValueError(f"k = {k} must be in 1..{nb} (rows of b)")
    av = a[:, valid]
    ex = exclusions(exclude, a.shape[0])
    best_i = np.empty((a.shape[0], 0), np.int64)
    best_d = np.empty((a.shape[0], 0), np.float64)
    for start in range(0, nb, step):
        block = rows(start, min(start + step, nb))[:, valid].astype("float64")
        local = None if ex is None else np.where((ex >= start) & (ex < start + len(block)), ex - start, -1)
        idx, d2 = nearest(av, block, min(k, len(block)), exclude=local, chunk=chunk)  # excluded rows: inf
        cand_i, cand_d = np.concatenate([best_i, idx + start], 1), np.concatenate([best_d, d2], 1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]  # earlier blocks first: ties to the lower index
        best_i, best_d = np.take_along_axis(cand_i, order, 1), np.take_along_axis(cand_d, order, 1)
    out = np.sqrt(best_d / p)  # float64 one block of `a` and of `b` at a time inside `nearest` (memory)
    return out[:, 0] if k == 1 else out
