"""Verification metrics for precipitation fields, extremes first.

Plain numpy functions on arrays; no file I/O.  All values are in mm day-1
unless stated otherwise.

Conventions
-----------
* ``ens`` : ndarray (M, N, H, W) -- an ensemble, **member axis first**
  (M members over N days).  Most functions also accept (M, H, W) or any
  (M, ...) whose trailing shape matches ``obs``.
* ``pred`` : ndarray (N, H, W) -- a deterministic forecast.
* ``obs`` : ndarray (N, H, W) -- the truth.  **NaN in ``obs`` marks a pixel to
  exclude** (sea, missing); every metric ignores those pixels.  A NaN in a
  forecast at a pixel where ``obs`` is valid is *not* hidden: it propagates to
  the result, so a broken forecast shows up.
* ``thr`` : scalar or ndarray broadcastable to ``obs`` -- typically a per-pixel
  (H, W) percentile map (e.g. the wet-day p95/p99 of the train period).
  An *exceedance* is ``value > thr`` (strict) everywhere in this module.

The forecaster's dilemma
------------------------
Conditioning a score on the *observed* outcome (e.g. ``mae_tail``, the MAE over
pixels where the truth is extreme) is improper: a forecast that predicts
extremes everywhere wins it.  Tail skill is therefore judged with proper
scores (``twcrps_ensemble``, ``fss``) together with ``frequency_bias`` and
``csi``; ``mae_tail`` / ``rmse_ext`` are only reported beside them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scoringrules as sr
from scipy.ndimage import uniform_filter

__all__ = [
    "mae",
    "mae_tail",
    "rmse_ext",
    "pearson",
    "pearson_parts",
    "pearson_of_parts",
    "frequency_bias",
    "contingency",
    "pod",
    "far",
    "csi",
    "crps_ensemble",
    "twcrps_ensemble",
    "fss",
    "fss_ensemble",
    "fss_useful",
    "rank_histogram",
    "rank_histogram_flatness",
    "spread_skill_ratio",
    "rapsd",
    "mean_rapsd",
    "rapsd_band_log_ratios",
    "RAPSD_BANDS",
    "tail_quantiles",
    "mass_error",
    "relative_mass_error",
]


# ----------------------------------------------------------------------------- helpers


def _as_float(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _valid(obs: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels to score (obs is finite)."""
    return np.isfinite(obs)


def _thr_like(thr, obs: np.ndarray) -> np.ndarray:
    """``thr`` broadcast to the shape of ``obs`` (raises if it does not fit)."""
    return np.broadcast_to(_as_float(thr), obs.shape)


def _ens_and_obs(ens, obs) -> tuple[np.ndarray, np.ndarray]:
    ens = _as_float(ens)
    obs = _as_float(obs)
    if ens.ndim != obs.ndim + 1 or ens.shape[1:] != obs.shape:
        raise ValueError(
            f"ensemble shape {ens.shape} must be (M,) + obs shape {obs.shape} "
            "(member axis first)"
        )
    return ens, obs


def _safe_ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- deterministic


def mae(pred, obs) -> float:
    """Mean absolute error over valid pixels.

    Parameters
    ----------
    pred : ndarray (N, H, W), mm day-1
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel

    Returns
    -------
    float
        mm day-1; NaN when no pixel is valid.
    """
    pred, obs = _as_float(pred), _as_float(obs)
    v = _valid(obs)
    if not v.any():
        return float("nan")
    return float(np.mean(np.abs(pred[v] - obs[v])))


def mae_tail(pred, obs, thr) -> float:
    """MAE over the valid pixels where ``obs > thr``.

    Improper on its own (forecaster's dilemma): show it only beside
    ``twcrps_ensemble``, ``fss``, ``frequency_bias`` and ``csi``.

    Parameters
    ----------
    pred, obs : ndarray (N, H, W), mm day-1
    thr : scalar or ndarray broadcastable to (H, W) / obs, mm day-1

    Returns
    -------
    float
        mm day-1; NaN when no pixel qualifies.
    """
    pred, obs = _as_float(pred), _as_float(obs)
    m = _valid(obs) & (obs > _thr_like(thr, obs))
    if not m.any():
        return float("nan")
    return float(np.mean(np.abs(pred[m] - obs[m])))


def rmse_ext(pred, obs, thr) -> float:
    """Root-mean-square error over the valid pixels where ``obs > thr``.

    Same caveat as :func:`mae_tail`.

    Parameters
    ----------
    pred, obs : ndarray (N, H, W), mm day-1
    thr : scalar or ndarray broadcastable to obs, mm day-1

    Returns
    -------
    float
        mm day-1; NaN when no pixel qualifies.
    """
    pred, obs = _as_float(pred), _as_float(obs)
    m = _valid(obs) & (obs > _thr_like(thr, obs))
    if not m.any():
        return float("nan")
    return float(np.sqrt(np.mean((pred[m] - obs[m]) ** 2)))


def pearson(pred, obs) -> float:
    """Pearson correlation pooled over all valid pixels (and days).

    Parameters
    ----------
    pred, obs : ndarray (N, H, W), mm day-1

    Returns
    -------
    float
        Dimensionless; NaN with fewer than 2 valid pixels or zero variance.
    """
    pred, obs = _as_float(pred), _as_float(obs)
    v = _valid(obs)
    if v.sum() < 2:
        return float("nan")
    a = pred[v] - pred[v].mean()
    b = obs[v] - obs[v].mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return _safe_ratio(np.sum(a * b), den)


def pearson_parts(mean: np.ndarray, o: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per day: count, means and centred second moments of (ensemble mean, truth) over valid pixels (c, 6)."""
    n = v.sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = np.where(n > 0, np.where(v, mean, 0.0).sum(axis=(1, 2)) / n, 0.0)
        mb = np.where(n > 0, np.where(v, o, 0.0).sum(axis=(1, 2)) / n, 0.0)
    a = np.where(v, mean - ma[:, None, None], 0.0)
    b = np.where(v, o - mb[:, None, None], 0.0)
    return np.stack([n, ma, mb, (a * a).sum(axis=(1, 2)), (b * b).sum(axis=(1, 2)), (a * b).sum(axis=(1, 2))], -1)


def pearson_of_parts(parts: np.ndarray) -> float:
    """Pooled Pearson correlation from the per-day parts of :func:`pearson_parts` (Chan et al.'s combination of
    counts, means and centred moments); :func:`pearson` over the same pixels, to rounding."""
    n, ma, mb, caa, cbb, cab = (parts[:, i] for i in range(6))
    total = n.sum()
    if total < 2:
        return float("nan")
    ga, gb = (n * ma).sum() / total, (n * mb).sum() / total
    saa = caa.sum() + (n * (ma - ga) ** 2).sum()
    sbb = cbb.sum() + (n * (mb - gb) ** 2).sum()
    sab = cab.sum() + (n * (ma - ga) * (mb - gb)).sum()
    den = np.sqrt(saa * sbb)
    return float(sab / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- categorical


def frequency_bias(pred_or_ens, obs, thr, member_axis: int | None = None) -> float:
    """Frequency bias: forecast exceedances / observed exceedances of ``thr``.

    Parameters
    ----------
    pred_or_ens : ndarray (N, H, W) or an ensemble, mm day-1
        With ``member_axis`` given, that axis holds the members (use 0 for the
        (M, N, H, W) convention); the forecast count is then the mean count over
        members.
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs, mm day-1
    member_axis : int or None

    Returns
    -------
    float
        1 = unbiased, > 1 over-forecasting.  NaN when nothing is observed above
        ``thr`` (on valid pixels).
    """
    f, obs = _as_float(pred_or_ens), _as_float(obs)
    if member_axis is None:
        f = f[None]
    else:
        f = np.moveaxis(f, member_axis, 0)
    f, obs = _ens_and_obs(f, obs)
    t = _thr_like(thr, obs)
    v = _valid(obs)
    n_obs = np.sum(obs[v] > t[v])
    n_fc = np.mean(np.sum((f > t) & v, axis=tuple(range(1, f.ndim))))
    return _safe_ratio(n_fc, n_obs)


def contingency(pred, obs, thr, member_axis: int | None = None) -> dict[str, float]:
    """2x2 contingency table of exceedances of ``thr`` over valid pixels.

    Parameters
    ----------
    pred : ndarray (N, H, W) or an ensemble, mm day-1
        For an ensemble give ``member_axis`` (0 for (M, N, H, W)): the table is
        then *member-pooled* -- each count is the mean over members of that
        member's count.  Scores derived from it (POD, FAR, CSI) are those of the
        pooled table, i.e. of a randomly drawn member in aggregate.  (The
        ensemble mean is not used: averaging smooths the extremes away.)
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs, mm day-1
    member_axis : int or None

    Returns
    -------
    dict
        ``hits``, ``misses``, ``false_alarms``, ``correct_negatives`` (floats).
    """
    f, obs = _as_float(pred), _as_float(obs)
    f = f[None] if member_axis is None else np.moveaxis(f, member_axis, 0)
    f, obs = _ens_and_obs(f, obs)
    t = _thr_like(thr, obs)
    v = _valid(obs)
    o = obs > t  # NaN > t is False; masked by v anyway
    fe = f > t
    axes = tuple(range(1, f.ndim))
    hits = np.sum(fe & o & v, axis=axes).mean()
    misses = np.sum(~fe & o & v, axis=axes).mean()
    fa = np.sum(fe & ~o & v, axis=axes).mean()
    cn = np.sum(~fe & ~o & v, axis=axes).mean()
    return {
        "hits": float(hits),
        "misses": float(misses),
        "false_alarms": float(fa),
        "correct_negatives": float(cn),
    }


def pod(table: Mapping[str, float]) -> float:
    """Probability of detection, hits / (hits + misses); NaN if undefined."""
    return _safe_ratio(table["hits"], table["hits"] + table["misses"])


def far(table: Mapping[str, float]) -> float:
    """False-alarm *ratio*, false_alarms / (hits + false_alarms); NaN if undefined."""
    return _safe_ratio(table["false_alarms"], table["hits"] + table["false_alarms"])


def csi(table: Mapping[str, float]) -> float:
    """Critical success index, hits / (hits + misses + false_alarms); NaN if undefined."""
    return _safe_ratio(
        table["hits"], table["hits"] + table["misses"] + table["false_alarms"]
    )


# ----------------------------------------------------------------------------- CRPS


def crps_ensemble(ens, obs) -> np.ndarray:
    """Per-point fair CRPS of an ensemble (``scoringrules`` PWM estimator: equal to the fair one, faster).

    ``CRPS = E|X - y| - 1/2 E|X - X'|`` with the fair denominator M(M-1) in the
    second term.  For M = 1 the fair estimator is undefined; the CRPS of a
    point forecast, the absolute error, is returned instead.

    Parameters
    ----------
    ens : ndarray (M, N, H, W), mm day-1 (member axis first)
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel

    Returns
    -------
    ndarray (N, H, W)
        mm day-1; NaN where ``obs`` is NaN.
    """
    ens, obs = _ens_and_obs(ens, obs)
    if ens.shape[0] == 1:
        out = np.abs(ens[0] - obs)
    else:
        out = np.asarray(sr.crps_ensemble(obs, ens, m_axis=0, estimator="pwm"))
    return np.where(_valid(obs), out, np.nan)


def twcrps_ensemble(ens, obs, thr) -> np.ndarray:
    """Per-point fair threshold-weighted CRPS, chaining function v(x) = max(x, thr).

    Equals the CRPS of the censored variables max(X, thr) vs max(y, thr): only
    the part of the distributions above ``thr`` is scored (Allen et al. 2023).
    Zero when the ensemble and the observation all lie at or below ``thr``.

    Parameters
    ----------
    ens : ndarray (M, N, H, W), mm day-1 (member axis first)
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs (e.g. a per-pixel (H, W) map),
        mm day-1

    Returns
    -------
    ndarray (N, H, W)
        mm day-1; NaN where ``obs`` is NaN.
    """
    ens, obs = _ens_and_obs(ens, obs)
    t = _as_float(thr)
    np.broadcast_shapes(t.shape, obs.shape)  # fail early with a clear error

    def v(x):
        return np.maximum(x, t)

    if ens.shape[0] == 1:
        out = np.abs(v(ens[0]) - v(obs))
    else:
        out = np.asarray(
            sr.twcrps_ensemble(obs, ens, v_func=v, m_axis=0, estimator="pwm")
        )
    return np.where(_valid(obs), out, np.nan)


# ----------------------------------------------------------------------------- FSS


def _fractions(field: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """Neighbourhood fractions over the last two axes, normalised by validity.

    ``field`` must be 0 at invalid pixels.  Outside the domain counts as invalid.
    """
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    size = (1,) * (field.ndim - 2) + (int(window), int(window))
    num = uniform_filter(field, size=size, mode="constant", cval=0.0)
    den = uniform_filter(valid.astype(np.float64), size=size, mode="constant", cval=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), 0.0)
    return frac


def _fss_from_fields(pf: np.ndarray, io: np.ndarray, valid: np.ndarray, window: int) -> float:
    ff = _fractions(np.where(valid, pf, 0.0), valid, window)
    fo = _fractions(np.where(valid, io, 0.0), valid, window)
    mse = np.sum(((ff - fo) ** 2)[valid])
    ref = np.sum((ff ** 2 + fo ** 2)[valid])
    return float(1.0 - mse / ref) if ref > 0 else float("nan")


def fss(fcst, obs, thr, window: int) -> float:
    """Fractions skill score (Roberts & Lean 2008) of a deterministic forecast.

    Binary exceedance fields ``> thr`` are turned into fractions over a square
    ``window`` x ``window`` neighbourhood (``scipy.ndimage.uniform_filter``).

    NaN handling: pixels where ``obs`` is NaN count as not exceeding, and each
    fraction is divided by the *validity fraction* of its neighbourhood (the
    share of valid pixels in the window), so a coastal window is a fraction of
    its valid pixels only.  Outside the domain is treated the same way as an
    invalid pixel, hence a NaN border gives the same FSS as cropping it.  The
    FSS sums (squared differences and the reference Pf^2 + Po^2) run over the
    valid pixels only, and over all days for (N, H, W) input (sums aggregated
    before the ratio, as Roberts & Lean).

    Parameters
    ----------
    fcst : ndarray (H, W) or (N, H, W), mm day-1
    obs : ndarray, same shape as ``fcst``, mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs, mm day-1
    window : int
        Neighbourhood side in pixels (odd values are centred).

    Returns
    -------
    float
        1 = perfect, 0 = no skill (no overlap at all).  NaN when neither field
        has any exceedance.
    """
    fcst, obs = _as_float(fcst), _as_float(obs)
    if fcst.shape != obs.shape or obs.ndim not in (2, 3):
        raise ValueError(f"fcst {fcst.shape} and obs {obs.shape} must both be (H, W) or (N, H, W)")
    t = _thr_like(thr, obs)
    v = _valid(obs)
    return _fss_from_fields((fcst > t).astype(np.float64), (obs > t).astype(np.float64), v, window)


def fss_ensemble(ens, obs, thr, window: int) -> float:
    """FSS of an ensemble, using the exceedance probability as forecast field.

    The forecast field is P(X > thr) = fraction of members exceeding ``thr``
    at each pixel; then as :func:`fss` (same NaN handling).

    Parameters
    ----------
    ens : ndarray (M, H, W) or (M, N, H, W), mm day-1 (member axis first)
    obs : ndarray (H, W) or (N, H, W), mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs, mm day-1
    window : int

    Returns
    -------
    float
    """
    ens, obs = _ens_and_obs(ens, obs)
    if obs.ndim not in (2, 3):
        raise ValueError(f"obs must be (H, W) or (N, H, W), got {obs.shape}")
    t = _thr_like(thr, obs)
    prob = np.mean(ens > t, axis=0)
    v = _valid(obs)
    return _fss_from_fields(prob, (obs > t).astype(np.float64), v, window)


def fss_useful(obs, thr) -> float:
    """The 'useful' FSS level 0.5 + f0/2 (Roberts & Lean 2008).

    ``f0`` is the observed base rate: the fraction of valid pixels (over all
    days) with ``obs > thr``.

    Parameters
    ----------
    obs : ndarray (..., H, W), mm day-1; NaN = excluded pixel
    thr : scalar or ndarray broadcastable to obs, mm day-1

    Returns
    -------
    float
    """
    obs = _as_float(obs)
    v = _valid(obs)
    if not v.any():
        return float("nan")
    f0 = np.mean(obs[v] > _thr_like(thr, obs)[v])
    return float(0.5 + f0 / 2.0)


# ----------------------------------------------------------------------------- ensemble shape


def rank_histogram(ens, obs, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Rank (Talagrand) histogram with random tie breaking.

    The rank of ``obs`` among the members is the number of members below it
    plus a uniform draw from 0..(number of members equal to it); this matters
    for precipitation, where many members and observations are exactly 0.

    Parameters
    ----------
    ens : ndarray (M, N, H, W) (or any (M,) + obs.shape), mm day-1
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel
    rng : numpy Generator, seed or None (seed 0)

    Returns
    -------
    ndarray (M + 1,) of int
        Counts per rank 0..M over all valid points.
    """
    ens, obs = _ens_and_obs(ens, obs)
    rng = np.random.default_rng(0 if rng is None else rng)
    v = _valid(obs)
    e = ens[:, v]  # (M, P)
    o = obs[v]
    below = np.sum(e < o, axis=0)
    ties = np.sum(e == o, axis=0)
    ranks = below + rng.integers(0, ties + 1)
    return np.bincount(ranks, minlength=ens.shape[0] + 1)


def rank_histogram_flatness(counts) -> float:
    """Normalised chi-square of a rank histogram: chi2 / (K - 1).

    ``chi2 = sum_k (c_k - E)^2 / E`` with ``E = sum(c) / K`` for K = M + 1 bins.
    This equals the reliability index delta = Delta / Delta_0 of Candille &
    Talagrand (2005).  Its expected value is 1 for a flat histogram (pure
    sampling noise, multinomial counts); values well above 1 mean a non-flat
    (U-shaped, dome-shaped or sloped) histogram.

    Parameters
    ----------
    counts : array (K,)

    Returns
    -------
    float
        NaN for an empty histogram or K < 2.
    """
    c = _as_float(counts)
    k = c.size
    n = c.sum()
    if k < 2 or n <= 0:
        return float("nan")
    e = n / k
    return float(np.sum((c - e) ** 2 / e) / (k - 1))


def spread_skill_ratio(ens, obs) -> float:
    """Spread/skill ratio sqrt((M+1)/M) * sqrt(mean var) / RMSE(ensemble mean).

    The variance is across members with ddof=1, averaged over valid points
    before the square root; the RMSE is that of the ensemble mean over the
    same points.  About 1 for a calibrated (exchangeable) ensemble, < 1 for
    an under-dispersed one.

    Parameters
    ----------
    ens : ndarray (M, N, H, W), mm day-1
    obs : ndarray (N, H, W), mm day-1; NaN = excluded pixel

    Returns
    -------
    float
        NaN for M < 2 or no valid point.
    """
    ens, obs = _ens_and_obs(ens, obs)
    m = ens.shape[0]
    v = _valid(obs)
    if m < 2 or not v.any():
        return float("nan")
    e = ens[:, v]
    var = np.mean(np.var(e, axis=0, ddof=1))
    mse = np.mean((e.mean(axis=0) - obs[v]) ** 2)
    return _safe_ratio(np.sqrt((m + 1) / m) * np.sqrt(var), np.sqrt(mse))


# ----------------------------------------------------------------------------- spectra


def rapsd(field, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of a 2-D field.

    Kept simple: the mean over valid pixels is removed, NaN pixels are then set
    to 0 (they add no variance), and no window/taper is applied.  Power is
    ``|FFT|^2 / (H W)^2`` so that it sums to the field variance over all 2-D
    frequencies.  Frequencies come from ``np.fft.fftfreq`` (so no fft-shift is
    needed) and are binned radially with bin width 1 / L, L = max(H, W); the
    bins k = 1 .. L // 2 are returned (the k = 0 mean is dropped, corners
    beyond the Nyquist radius too).

    Parameters
    ----------
    field : ndarray (H, W), e.g. mm day-1
    spacing : float
        Grid spacing; wavenumbers are in cycles per unit of ``spacing``
        (cycles per pixel by default: a wave of wavelength P pixels sits at
        1 / P).

    Returns
    -------
    wavenumbers : ndarray (L // 2,)
    power : ndarray (L // 2,)
        Mean power per bin, (field units)^2; NaN for an empty bin.
    """
    f = _as_float(field)
    if f.ndim != 2:
        raise ValueError(f"rapsd needs a 2-D field, got shape {f.shape}")
    h, w = f.shape
    v = np.isfinite(f)
    if not v.any():
        raise ValueError("rapsd: field has no finite value")
    f = np.where(v, f - f[v].mean(), 0.0)
    p = np.abs(np.fft.fft2(f)) ** 2 / (h * w) ** 2
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    length = max(h, w)
    kbin = np.rint(np.sqrt(kx ** 2 + ky ** 2) * length).astype(int)
    nb = length // 2 + 1
    keep = kbin < nb
    sums = np.bincount(kbin[keep], weights=p[keep], minlength=nb)
    cnts = np.bincount(kbin[keep], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        power = sums / cnts
    k = np.arange(nb) / (length * spacing)
    return k[1:], power[1:]


def mean_rapsd(fields, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean of :func:`rapsd` over the leading axis.

    Parameters
    ----------
    fields : ndarray (N, H, W) (more leading axes are flattened)
    spacing : float

    Returns
    -------
    wavenumbers : ndarray (L // 2,)
    power : ndarray (L // 2,)
    """
    f = _as_float(fields)
    f = f.reshape((-1,) + f.shape[-2:])
    k, p0 = rapsd(f[0], spacing)
    acc = p0.copy()
    for x in f[1:]:
        acc += rapsd(x, spacing)[1]
    return k, acc / f.shape[0]


#: Wavelength bands (pixels) of :func:`rapsd_band_log_ratios`: (name, shortest, longest).
RAPSD_BANDS = (("gt8px", 8.0, np.inf), ("4to8px", 4.0, 8.0), ("2to4px", 2.0, 4.0))


def rapsd_band_log_ratios(k, p_ens, p_obs) -> dict[str, float]:
    """Mean over each wavelength band of ``log10(p_ens / p_obs)``.

    Parameters
    ----------
    k : ndarray (K,), cycles per pixel (wavelength 1 / k pixels)
    p_ens, p_obs : ndarray (K,), power of the members and of the truth

    Returns
    -------
    dict ``rapsd_log_ratio_<band>`` -> float for the bands of :data:`RAPSD_BANDS`
    (``gt8px``: wavelengths above 8 pixels, ``4to8px``, ``2to4px``: the finest); 0 is the
    truth's power, < 0 too smooth, > 0 too rough; NaN when the grid has no wavenumber
    in a band.
    """
    k = np.asarray(k, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log10(np.asarray(p_ens, dtype=float) / np.asarray(p_obs, dtype=float))
        wavelength = 1.0 / k
    out = {}
    for name, lo, hi in RAPSD_BANDS:
        pick = (wavelength > lo) & (wavelength <= hi) & np.isfinite(ratio)
        if name == "2to4px":
            pick = (wavelength >= lo) & (wavelength <= hi) & np.isfinite(ratio)
        out[f"rapsd_log_ratio_{name}"] = float(ratio[pick].mean()) if pick.any() else float("nan")
    return out


# ----------------------------------------------------------------------------- distributions


def tail_quantiles(values, quantiles: Sequence[float] = (0.99, 0.999),
                   wet_threshold: float = 1.0) -> np.ndarray:
    """Upper quantiles of the pooled wet values.

    Parameters
    ----------
    values : ndarray, any shape, mm day-1; NaN ignored
    quantiles : sequence of float in [0, 1]
    wet_threshold : float
        Values ``>= wet_threshold`` (mm day-1) are wet and pooled.

    Returns
    -------
    ndarray (len(quantiles),)
        mm day-1; NaN when there is no wet value.
    """
    x = _as_float(values).ravel()
    x = x[np.isfinite(x) & (x >= wet_threshold)]
    q = np.asarray(quantiles, dtype=np.float64)
    if x.size == 0:
        return np.full(q.shape, np.nan)
    return np.quantile(x, q)


#: lower bound (mm day-1) of a mass error's denominator, so that near-dry days do not blow up
MASS_FLOOR = 0.1


def relative_mass_error(mean_pred, mean_ref, floor: float = MASS_FLOOR):
    """``(mean_pred - mean_ref) / max(mean_ref, floor)``: the package's one mass-error formula.

    Domain means in mm day-1, numpy arrays or torch tensors (the training loss, the evaluation's
    scores and generate's report all use it).
    """
    denom = mean_ref.clamp(min=floor) if hasattr(mean_ref, "clamp") else np.maximum(mean_ref, floor)
    return (mean_pred - mean_ref) / denom


def mass_error(pred, ref, floor: float = MASS_FLOOR) -> np.ndarray:
    """Relative domain-mean (mass) error per sample.

    ``(mean(pred) - mean(ref)) / max(mean(ref), floor)`` with both means over the
    pixels where ``ref`` is valid.

    Parameters
    ----------
    pred : ndarray (..., H, W), mm day-1, e.g. (N, H, W) or (M, N, H, W)
    ref : ndarray broadcastable to pred, e.g. (N, H, W), mm day-1; NaN = excluded
    floor : float
        Lower bound on the denominator (mm day-1) so dry days do not blow up.

    Returns
    -------
    ndarray pred.shape[:-2]
        Dimensionless; NaN for a sample without valid pixel.
    """
    pred, ref = _as_float(pred), _as_float(ref)
    ref = np.broadcast_to(ref, pred.shape)
    v = _valid(ref)
    n = v.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        mp = np.sum(np.where(v, pred, 0.0), axis=(-2, -1)) / n
        mr = np.sum(np.where(v, ref, 0.0), axis=(-2, -1)) / n
        out = relative_mass_error(mp, mr, floor)
    return np.where(n > 0, out, np.nan)
