"""The built-in synthetic demo data set.

Deterministic from a seed, written as CF NetCDF with one file per year:

* ``{outdir}/target/pr_{year}.nc``: daily precipitation ``pr`` (time, lat, lon)
  on the fine grid in kg m-2 s-1 (so unit conversion is exercised);
* ``{outdir}/predictors/predictors_{year}.nc``: ``psl`` (Pa), ``hus850``
  (kg kg-1) and ``ta850`` (K) on a coarser grid with its own lat/lon.

How the fields are built, so that the condition -> target relation is learnable:
a daily storm strength ``a`` (AR(1), stronger in winter), a moisture anomaly ``q``
(AR(1)) and a storm centre that wanders over the 8 x 8 degree domain drive both the
predictors (a pressure low as deep as ``a``, a humidity plume as moist as ``q`` and
``a``, a temperature dipole around the centre) and the rain.  Rain is a thresholded,
power-transformed Gaussian random field with a power-law spectrum flattened beyond
about 2 degrees (spatially correlated, intermittent, skewed); its wet area and
intensity grow with ``s = a + q / 2`` and peak near the centre.  Heavy days are the
tail of ``s`` (the top ``heavy_fraction`` of days), not a separate regime: the
predictors show them as the deepest, moistest lows, and their intensity grows
continuously (a little faster past the threshold), so a model can learn them from
the ordinary days as well as from the few heavy ones.

Statistics of the demo of ``config/config.yaml`` (seed 42, 10 years of 32 x 32 at
0.25 degrees, predictors 8 x 8 at 1 degree; :func:`statistics`), with E-OBS over
Iberia (0.5 degrees, winters 1983-2002, ``../shared``) for comparison:

=============================================  ==============  ==================
                                               demo            E-OBS Iberia DJF
=============================================  ==============  ==================
wet-day frequency (>= 1 mm/day, all pixels)    0.26            0.27
wet-day mean                                   6.3 mm/day      7.2 mm/day
P99 of wet values                              37 mm/day       35 mm/day
largest value                                  287 mm/day      116 mm/day
correlation e-folding distance                 about 320 km    about 400 km
heavy days' domain mean / other days'          8.3             (no such label)
corr(domain-mean rain, deepest psl anomaly)    -0.82           -0.68 (domain-mean psl)
=============================================  ==============  ==================

The largest value is a 0.25-degree pixel on the heaviest day of ten years, all
seasons: intended (it is about a Mediterranean torrential-rain day), while E-OBS
is a 0.5-degree interpolation of stations, which smooths its peaks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import norm

from .config import DemoConfig
from .io import write_yearly_netcdf

log = logging.getLogger(__name__)

# domain of the demo (degrees); the fine and coarse grids both cover it
LAT0, LAT1 = 36.0, 44.0
LON0, LON1 = -8.0, 0.0


def cell_centres(start: float, stop: float, n: int) -> np.ndarray:
    """``n`` cell centres of equal cells covering [start, stop]."""
    step = (stop - start) / n
    return start + step * (np.arange(n) + 0.5)


def power_law_fields(rng: np.random.Generator, n: int, ny: int, nx: int, beta: float = 3.0,
                     scale: float | None = None, spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``n`` Gaussian random fields (n, ny, nx) with power spectrum ~ k**-beta, unit variance.

    ``scale`` (in the units of ``spacing``, e.g. degrees) flattens the spectrum below the wavenumber
    1/scale, so that the correlation length is a physical distance, the same on any grid.
    """
    ky = np.fft.fftfreq(ny, d=spacing[0])[:, None]
    kx = np.fft.rfftfreq(nx, d=spacing[1])[None, :]
    k2 = kx**2 + ky**2
    if scale is None:
        k2[0, 0] = np.inf
        amp = k2 ** (-beta / 4.0)
    else:
        amp = (k2 + scale**-2) ** (-beta / 4.0)
        amp[0, 0] = 0.0
    noise = rng.standard_normal((n, ny, nx))
    spec = np.fft.rfft2(noise) * amp
    fields = np.fft.irfft2(spec, s=(ny, nx))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    eps = rng.standard_normal(n) * np.sqrt(1 - phi**2)
    out = np.empty(n)
    out[0] = rng.standard_normal()
    for i in range(1, n):
        out[i] = phi * out[i - 1] + eps[i]
    return out


@dataclass(frozen=True)
class DemoFields:
    target: xr.Dataset
    predictors: xr.Dataset
    heavy: np.ndarray  # (time,) bool: the generator's own heavy days


def make_demo_fields(cfg: DemoConfig) -> DemoFields:
    """Build the demo data set in memory (about 15 MB for 10 years of 32x32)."""
    rng = np.random.default_rng(cfg.seed)
    time = pd.date_range(f"{cfg.start_year}-01-01", f"{cfg.start_year + cfg.years - 1}-12-31", freq="D")
    nt = len(time)
    lat, lon = cell_centres(LAT0, LAT1, cfg.nlat), cell_centres(LON0, LON1, cfg.nlon)
    clat, clon = cell_centres(LAT0, LAT1, cfg.nclat), cell_centres(LON0, LON1, cfg.nclon)
    fine = ((LAT1 - LAT0) / cfg.nlat, (LON1 - LON0) / cfg.nlon)
    coarse = ((LAT1 - LAT0) / cfg.nclat, (LON1 - LON0) / cfg.nclon)

    # --- large-scale state: storm strength a (the dynamics) and moisture q, both seen by the predictors
    phase = 2 * np.pi * (time.day_of_year.values - 15) / 365.25
    winter = 0.5 * (1 + np.cos(phase))  # 1 in mid-January, 0 in mid-July
    a = _ar1(rng, nt, 0.7) + 0.8 * (winter - 0.5)
    q = _ar1(rng, nt, 0.6)
    s = a + 0.5 * q  # what makes rain heavy: strong dynamics in a moist air mass
    s_heavy = np.quantile(s, 1 - cfg.heavy_fraction)
    heavy = s > s_heavy
    boost = np.maximum(s - s_heavy, 0.0)  # continuous: the heaviest days are the tail of s, not a separate regime
    # storm centre: a slow random walk reflected at the domain edges
    cy = np.empty(nt)
    cx = np.empty(nt)
    cy[0], cx[0] = 0.5, 0.5
    steps = rng.normal(0, 0.12, size=(nt, 2))
    for i in range(1, nt):
        cy[i] = cy[i - 1] * 0.9 + 0.05 + steps[i, 0]
        cx[i] = cx[i - 1] * 0.9 + 0.05 + steps[i, 1]
        cy[i] = abs(cy[i]) if cy[i] < 0 else (2 - cy[i] if cy[i] > 1 else cy[i])
        cx[i] = abs(cx[i]) if cx[i] < 0 else (2 - cx[i] if cx[i] > 1 else cx[i])
    cy, cx = np.clip(cy, 0, 1), np.clip(cx, 0, 1)
    lat_c = LAT0 + cy * (LAT1 - LAT0)
    lon_c = LON0 + cx * (LON1 - LON0)

    def distance2(glat, glon):  # (time, nlat, nlon) squared distance to the centre in degrees
        return (glat[None, :, None] - lat_c[:, None, None]) ** 2 + (glon[None, None, :] - lon_c[:, None, None]) ** 2

    # --- predictors on the coarse grid: a low as deep as the storm is strong, a humidity plume as moist
    d2c = distance2(clat, clon)
    depth = 1000 + 700 * a + 1500 * boost  # Pa
    low = np.exp(-d2c / (2 * 2.0**2))
    psl = (
        101500
        + 500 * (1 - winter)[:, None, None]
        - depth[:, None, None] * low
        + 150 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.0, scale=3.0, spacing=coarse)
    )
    plume = np.exp(-d2c / (2 * 2.5**2))
    hus = (
        0.0045
        + 0.0015 * (1 - winter)[:, None, None]
        + (0.0008 * q + 0.0004 * a + 0.0010 * boost + 0.0008)[:, None, None] * plume
        + 0.0003 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.0, scale=3.0, spacing=coarse)
    )
    hus = np.clip(hus, 2e-4, None)
    dlon = (clon[None, None, :] - lon_c[:, None, None]) / 3.0
    ta = (
        275
        + 9 * (1 - winter)[:, None, None]
        + (1.5 + np.clip(a, 0, None))[:, None, None] * np.tanh(dlon) * low
        + 0.8 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.0, scale=3.0, spacing=coarse)
    )

    # --- fine precipitation: a thresholded, power-transformed Gaussian random field (correlated over
    # about 2 degrees, intermittent, skewed), wetter and more intense near the centre as s grows
    d2f = distance2(lat, lon)
    width = 1.6 + 0.25 * np.clip(a, -1.0, None) + 0.3 * boost  # degrees
    envelope = np.exp(-d2f / (2 * width[:, None, None] ** 2))
    g = power_law_fields(rng, nt, cfg.nlat, cfg.nlon, beta=3.0, scale=2.0, spacing=fine)
    wet_fraction = np.clip(1 / (1 + np.exp(-(0.9 * s - 0.6 + 0.8 * winter))), 0.02, 0.85)
    z = norm.ppf(1 - wet_fraction)  # g > z on wet_fraction of a field's pixels (before the envelope)
    excess = g + 1.2 * (envelope - 0.3) - z[:, None, None]
    intensity = np.exp(1.4 + 0.35 * s + 0.2 * boost + 0.2 * winter)  # mm/day scale
    rain = np.where(excess > 0, intensity[:, None, None] * (0.3 + 0.7 * envelope) * np.maximum(excess, 0) ** 1.4, 0.0)
    rain_kg = (rain / 86400.0).astype("float32")  # mm/day -> kg m-2 s-1

    coords_f = {
        "time": ("time", time),
        "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
        "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
    }
    target = xr.Dataset(
        {
            "pr": (
                ("time", "lat", "lon"),
                rain_kg,
                {
                    "units": "kg m-2 s-1",
                    "standard_name": "precipitation_flux",
                    "long_name": "daily mean precipitation flux (synthetic demo)",
                },
            )
        },
        coords=coords_f,
        attrs={
            "Conventions": "CF-1.8",
            "title": "precip-cvae synthetic demo target",
            "source": f"precip_cvae.demo seed={cfg.seed}",
        },
    )
    coords_c = {
        "time": ("time", time),
        "lat": ("lat", clat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
        "lon": ("lon", clon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
    }
    dims = ("time", "lat", "lon")
    predictors = xr.Dataset(
        {
            "psl": (dims, psl.astype("float32"), {"units": "Pa", "standard_name": "air_pressure_at_mean_sea_level"}),
            "hus850": (dims, hus.astype("float32"), {"units": "kg kg-1", "standard_name": "specific_humidity"}),
            "ta850": (dims, ta.astype("float32"), {"units": "K", "standard_name": "air_temperature"}),
        },
        coords=coords_c,
        attrs={
            "Conventions": "CF-1.8",
            "title": "precip-cvae synthetic demo predictors",
            "source": f"precip_cvae.demo seed={cfg.seed}",
        },
    )
    return DemoFields(target=target, predictors=predictors, heavy=heavy)


def write_demo_data(cfg: DemoConfig, outdir: str | Path | None = None) -> dict[str, list[str]]:
    """Generate the demo data and write one CF NetCDF file per year.

    Returns {'target': [...], 'predictors': [...]} file lists.
    """
    outdir = Path(outdir or cfg.outdir)
    fields = make_demo_fields(cfg)
    time_enc = {"time": {"units": "days since 1970-01-01", "calendar": "standard", "dtype": "float64"}}
    enc_t = {"pr": {"zlib": True, "complevel": 1, "dtype": "float32"}, **time_enc}
    enc_p = {v: {"zlib": True, "complevel": 1} for v in fields.predictors.data_vars} | time_enc
    target = write_yearly_netcdf(fields.target, outdir / "target", "pr", encoding=enc_t)
    preds = write_yearly_netcdf(fields.predictors, outdir / "predictors", "predictors", encoding=enc_p)
    log.info(
        "demo data: %d days, %d generator heavy days (%.1f %%), %d target and %d predictor files in %s",
        fields.target.sizes["time"],
        int(fields.heavy.sum()),
        100 * fields.heavy.mean(),
        len(target),
        len(preds),
        outdir,
    )
    return {"target": [str(p) for p in target], "predictors": [str(p) for p in preds]}


def statistics(fields: DemoFields) -> dict[str, float]:
    """The figures the module docstring states, computed from ``fields`` (mm/day, km).

    ``efolding_km`` fits ``r = exp(-d / L)`` to the correlation ``r`` of daily rain between
    2000 fixed pairs of pixels at great-circle distance ``d``; ``heavy_ratio`` is the heavy
    days' mean domain-mean rain over the other days'; ``corr_psl`` correlates the domain-mean
    rain with the day's lowest sea-level pressure anomaly (from its calendar-day-free mean).
    """
    pr = fields.target["pr"].values.astype(np.float64) * 86400.0
    values = pr.ravel()
    wet = values[values >= 1.0]
    nt, ny, nx = pr.shape
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, ny * nx, 2000), rng.integers(0, ny * nx, 2000)
    lat = np.deg2rad(fields.target["lat"].values)[np.arange(ny * nx) // nx]
    lon = np.deg2rad(fields.target["lon"].values)[np.arange(ny * nx) % nx]
    cos_d = np.sin(lat[a]) * np.sin(lat[b]) + np.cos(lat[a]) * np.cos(lat[b]) * np.cos(lon[a] - lon[b])
    dist = 6371.0 * np.arccos(np.clip(cos_d, -1.0, 1.0))
    flat = pr.reshape(nt, -1)
    za = (flat[:, a] - flat[:, a].mean(0)) / flat[:, a].std(0)
    zb = (flat[:, b] - flat[:, b].mean(0)) / flat[:, b].std(0)
    r = (za * zb).mean(0)
    use = (dist > 0) & (r > 0.05)
    log_r = np.sum(dist[use] * np.log(r[use]))
    efolding = float(-np.sum(dist[use] ** 2) / log_r) if log_r < 0 else float("nan")  # nan: no decaying pair
    domain = pr.mean(axis=(1, 2))
    psl = fields.predictors["psl"].values
    low = (psl - psl.mean(axis=0)).min(axis=(1, 2))
    heavy = fields.heavy
    return {
        "wet_day_frequency": float(wet.size / values.size),
        "wet_day_mean": float(wet.mean()),
        "p99_wet": float(np.percentile(wet, 99)),
        "max": float(values.max()),
        "efolding_km": efolding,
        "heavy_ratio": float(domain[heavy].mean() / domain[~heavy].mean()),
        "corr_psl": float(np.corrcoef(domain, low)[0, 1]),
    }
