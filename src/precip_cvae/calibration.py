"""Marginal calibration of generated members: per-pixel quantile mapping, fitted out of sample.

A cVAE whose members are too light (or too wet) at a pixel can be corrected toward the
observed distribution of that pixel by a monotone map ``f_i``: the members' quantiles at
pixel ``i`` (pooled over the fit days and members) are sent to the observed quantiles on
the same days.  The map is applied to each member separately, so on every day and at
every pixel the members keep their rank order (ties aside): the spatial and inter-member
dependence of the raw ensemble survives, as in ensemble copula coupling (Schefzik et al.
2013), and only the marginals change.

Rules the code keeps (pinned in ``tests/test_calibration.py``):

* fitted **out of sample**: the evaluation fits on the train split's days and applies the
  map to val and test; generation (which samples train heavy days) fits on the val days.
  A day the map is applied to never enters its fit (changing that day's truth changes
  nothing).
* a member value of 0 (dry) stays 0: the map never makes rain where the member has none;
  a too-wet model is dried by mapping its small amounts to 0.
* between the fitted quantile levels the map is linear; above the highest level it scales
  by the ratio of the top quantiles (clipped to ``[1 / MAX_TAIL_RATIO, MAX_TAIL_RATIO]``), so
  a member beyond anything seen in the fit is still mapped, continuously and monotonically.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["QuantileMap", "fit_quantile_map", "LEVELS", "MAX_TAIL_RATIO", "CALIBRATIONS"]

#: Names of ``evaluate.calibrate`` and ``generate.calibrate``.
CALIBRATIONS = ("none", "quantile_map")
#: Quantile levels of the map: every percent, then denser in the upper tail.
LEVELS = np.concatenate([np.linspace(0.01, 0.99, 99), [0.995, 0.998]])
#: Bound of the multiplicative correction above the highest fitted level.
MAX_TAIL_RATIO = 5.0


@dataclass(frozen=True)
class QuantileMap:
    """A per-pixel monotone map from member values to observed values (mm/day).

    Attributes
    ----------
    levels : ndarray (L,)
        Quantile levels, increasing in (0, 1).
    model_q, obs_q : ndarray (L, h, w)
        Quantiles of the members and of the observations at each level; NaN at pixels
        without data (masked: values there pass through unchanged).
    n_days : int
        Days the map was fitted on.
    """

    levels: np.ndarray
    model_q: np.ndarray
    obs_q: np.ndarray
    n_days: int

    def apply(self, members: np.ndarray) -> np.ndarray:
        """Map ``members`` (..., h, w), mm/day, pixel by pixel; NaN stays NaN, 0 stays 0.

        Returns
        -------
        ndarray, the shape and dtype of ``members``.
        """
        values = np.asarray(members)
        if values.shape[-2:] != self.model_q.shape[1:]:
            raise ValueError(f"members on a {values.shape[-2:]} grid, the map was fitted on {self.model_q.shape[1:]}")
        flat = values.reshape(-1, values.shape[-2] * values.shape[-1])  # (K, P)
        out = flat.astype("float64", copy=True)
        mq = self.model_q.reshape(len(self.levels), -1)
        oq = self.obs_q.reshape(len(self.levels), -1)
        for p in np.flatnonzero(np.isfinite(mq).all(axis=0) & np.isfinite(oq).all(axis=0)):
            out[:, p] = _map_pixel(flat[:, p].astype("float64"), mq[:, p], oq[:, p])
        return out.reshape(values.shape).astype(values.dtype, copy=False)


def _map_pixel(v: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """The monotone map of one pixel (quantiles ``xq`` -> ``yq``, both non-decreasing)."""
    out = np.interp(v, xq, yq)  # constant below xq[0] and above xq[-1]: both fixed below
    top_x, top_y = xq[-1], yq[-1]
    above = v > top_x
    if above.any():
        if top_x > 0:
            ratio = float(np.clip(top_y / top_x, 1.0 / MAX_TAIL_RATIO, MAX_TAIL_RATIO))
            out[above] = top_y + (v[above] - top_x) * ratio
        else:
            out[above] = top_y + (v[above] - top_x)
    # below the lowest fitted quantile: scale toward 0 (np.interp would hold yq[0])
    below = v < xq[0]
    if below.any():
        out[below] = yq[0] * v[below] / xq[0] if xq[0] > 0 else v[below]
    out[v <= 0] = 0.0
    out[~np.isfinite(v)] = np.nan
    return np.maximum(out, 0.0)


def fit_quantile_map(members: np.ndarray, obs: np.ndarray, levels: np.ndarray = LEVELS) -> QuantileMap:
    """Fit the per-pixel map of ``members`` to ``obs`` on the same days.

    Parameters
    ----------
    members : ndarray (M, T, h, w)
        Members on the fit days, mm/day (NaN where the day has no data at the pixel).
    obs : ndarray (T, h, w)
        Observations on the same days, mm/day, NaN where missing.  A member value at a
        day and pixel whose observation is missing is left out, so both sides describe
        the same days.
    levels : ndarray (L,)

    Returns
    -------
    QuantileMap
        Pixels with fewer than 10 observed days get NaN quantiles (left unchanged by
        :meth:`QuantileMap.apply`).
    """
    members = np.asarray(members, dtype="float64")
    obs = np.asarray(obs, dtype="float64")
    if members.ndim != 4 or members.shape[1:] != obs.shape:
        raise ValueError(f"members (M, T, h, w) and obs (T, h, w) must agree, got {members.shape} and {obs.shape}")
    seen = np.isfinite(obs)  # (T, h, w)
    m = np.where(seen[None] & np.isfinite(members), members, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels (masked) give NaN quantiles
        model_q = np.nanquantile(m.reshape(-1, *obs.shape[1:]), levels, axis=0)  # (L, h, w)
        obs_q = np.nanquantile(obs, levels, axis=0)
    few = seen.sum(axis=0) < 10
    model_q[:, few] = np.nan
    obs_q[:, few] = np.nan
    # quantiles are non-decreasing; guard against round-off before np.interp
    model_q = np.maximum.accumulate(model_q, axis=0)
    obs_q = np.maximum.accumulate(obs_q, axis=0)
    return QuantileMap(np.asarray(levels, dtype="float64"), model_q, obs_q, int(obs.shape[0]))
