"""The built-in synthetic demo data set.

Deterministic from a seed, written as CF NetCDF with one file per year:

* ``{outdir}/target/pr_{year}.nc``: daily precipitation ``pr`` (time, lat, lon)
  on the fine grid in kg m-2 s-1 (so unit conversion is exercised);
* ``{outdir}/predictors/predictors_{year}.nc``: ``psl`` (Pa), ``hus850``
  (kg kg-1) and ``ta850`` (K) on a coarser grid with its own lat/lon.

How the fields are built, so that the condition -> target relation is learnable:
a daily latent storm strength ``a`` (AR(1), stronger in winter) and a storm
centre that wanders over the domain drive both the predictors (a pressure low,
a humidity plume and a temperature dipole around the centre) and the rain
(intensity and wet area grow with ``a`` and peak near the centre).  Rare heavy
days (``heavy_fraction`` of days, chosen where ``a`` plus noise is largest) have
much higher intensities and a deeper low.  Rain itself is a thresholded Gaussian
random field with a power-law spectrum (spatially correlated, intermittent),
exponentiated (heavy-tailed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

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


def power_law_fields(rng: np.random.Generator, n: int, ny: int, nx: int, beta: float = 3.0) -> np.ndarray:
    """``n`` Gaussian random fields (n, ny, nx) with power spectrum ~ k**-beta, unit variance."""
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    k = np.sqrt(kx**2 + ky**2)
    k[0, 0] = np.inf
    amp = k ** (-beta / 2.0)
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
    """Build the demo data set in memory (about 60 MB for 10 years of 64x64)."""
    rng = np.random.default_rng(cfg.seed)
    time = pd.date_range(f"{cfg.start_year}-01-01", f"{cfg.start_year + cfg.years - 1}-12-31", freq="D")
    nt = len(time)
    lat, lon = cell_centres(LAT0, LAT1, cfg.nlat), cell_centres(LON0, LON1, cfg.nlon)
    clat, clon = cell_centres(LAT0, LAT1, cfg.nclat), cell_centres(LON0, LON1, cfg.nclon)

    # --- latent large-scale state
    phase = 2 * np.pi * (time.day_of_year.values - 15) / 365.25
    winter = 0.5 * (1 + np.cos(phase))  # 1 in mid-January, 0 in mid-July
    a = _ar1(rng, nt, 0.7) + 0.8 * (winter - 0.5)
    score = a + 0.5 * rng.standard_normal(nt)
    heavy = score > np.quantile(score, 1 - cfg.heavy_fraction)
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

    # --- predictors on the coarse grid
    d2c = distance2(clat, clon)
    depth = 800 + 900 * np.clip(a, -1.5, None) + 2500 * heavy  # Pa
    low = np.exp(-d2c / (2 * 2.0**2))
    psl = (
        101500
        + 500 * (1 - winter)[:, None, None]
        - depth[:, None, None] * low
        + 150 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.5)
    )
    plume = np.exp(-d2c / (2 * 2.5**2))
    hus = (
        0.0045
        + 0.0015 * (1 - winter)[:, None, None]
        + (0.0012 * np.tanh(a) + 0.0025 * heavy)[:, None, None] * plume
        + 0.0004 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.5)
    )
    hus = np.clip(hus, 2e-4, None)
    dlon = (clon[None, None, :] - lon_c[:, None, None]) / 3.0
    ta = (
        275
        + 9 * (1 - winter)[:, None, None]
        + (1.5 + np.clip(a, 0, None))[:, None, None] * np.tanh(dlon) * low
        + 0.8 * power_law_fields(rng, nt, cfg.nclat, cfg.nclon, beta=3.5)
    )

    # --- fine precipitation
    d2f = distance2(lat, lon)
    envelope = np.exp(-d2f / (2 * (1.2 + 0.8 * heavy)[:, None, None] ** 2))
    g = power_law_fields(rng, nt, cfg.nlat, cfg.nlon, beta=3.0)
    wet_fraction = np.clip(0.06 + 0.22 * (1 / (1 + np.exp(-1.5 * a))) + 0.25 * heavy, 0.02, 0.8)
    z = -np.sqrt(2) * _erfcinv(2 * wet_fraction)  # N(0,1) quantile of 1 - wet_fraction
    excess = g + (1.5 + 1.0 * heavy[:, None, None]) * envelope - z[:, None, None] - 1.2
    intensity = np.exp(1.0 + 0.35 * a + 1.6 * heavy + 0.3 * winter)  # mm/day scale
    rain = np.where(excess > 0, intensity[:, None, None] * np.maximum(excess, 0) ** 1.6, 0.0)
    rain *= 0.6 + 0.8 * envelope  # rain concentrates near the storm
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


def _erfcinv(y: np.ndarray) -> np.ndarray:
    from scipy.special import erfcinv

    return erfcinv(y)


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
