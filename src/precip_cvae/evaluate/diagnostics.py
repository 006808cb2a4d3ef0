"""Climate-index diagnostics of the cached ensembles (rule ``evaluate``): the terms of CORDEX-ML-Bench.

On the headline split, every source's members are treated as daily series over the scored days
and compared with the observations (:mod:`precip_cvae.indices`, xclim's ETCCDI indices):

* ``indices.csv``: per source and index (Rx1day, SDII, R95pTOT, R99pTOT, CWD, CDD, days above
  the local P99) the observed and the members' spatial means and the spatial mean of the bias
  and of its absolute value; beside them, as rows of the same table, the per-pixel Wasserstein
  distance and Perkins skill score (spatial means) and the RALSD.  R95pTOT/R99pTOT and the
  P99 days use the observed wet-day P95/P99 of the scored days at each pixel (the base period is
  the evaluation period, so an unbiased ensemble scores 0 bias; pixels with fewer than
  ``evaluate.min_wet_days`` wet days take the pooled value), so fixed and cross-validated
  evaluations use one rule.
* ``return_levels.csv``: return levels (2, 5, 10, 20 season years) of the seasonal maxima of
  the domain-mean daily precipitation from a GEV fit (scipy.stats.genextreme) with 90 %
  parametric-bootstrap intervals, for the observations and for each source (its members'
  maxima pooled: M samples per season); skipped with a note when fewer than 5 seasons are scored.
* the bias maps of the primary checkpoint (``index_bias.png``, drawn by :mod:`precip_cvae.plots`).

Season-only records: the series are reindexed to every calendar day and the days not scored are
missing, so no wet or dry spell bridges the gap between two winters (or two held-out year
blocks); each period (calendar year, or DJF winter with ``season_year: djf``) is indexed on its
own and the index is the mean over the periods holding scored days.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from .. import indices, io
from ..config import EvaluateConfig, EventsConfig
from ..events import wet_day_thresholds
from ..metrics import rapsd
from .names import TRUTH, headline_split, source_label
from .score import chunk_days_for

log = logging.getLogger(__name__)

RETURN_PERIODS = (2, 5, 10, 20)
MIN_SEASONS = 5  # gev_return_levels refuses fewer maxima


@dataclass
class Diagnostics:
    """What :func:`diagnose` computed: the tables and the primary source's bias maps."""

    split: str
    indices: pd.DataFrame  # source, index, obs_mean, ens_mean, bias_mean, abs_bias_mean
    return_levels: pd.DataFrame  # source, period, level, lower, upper
    bias_maps: dict = field(default_factory=dict)  # index -> (h, w), of the primary source
    notes: list = field(default_factory=list)


def observed_percentiles(obs, cfg: EvaluateConfig) -> dict[str, np.ndarray]:
    """Per-pixel wet-day percentiles (``cfg.percentiles``) of the observations (N, h, w), pooled fallback.

    ``obs``: numpy or dask; a dask array is streamed over its chunks of days (in float64, chunk by chunk) by
    :func:`precip_cvae.events.wet_day_thresholds`, never read whole."""
    obs = obs.astype("float64")  # as the scores take them; lazy for dask
    da = xr.DataArray(obs, dims=("time", "lat", "lon"))
    mask = xr.DataArray(np.isfinite(obs).any(axis=0).astype("int8"), dims=("lat", "lon"))
    out = {}
    for p in cfg.percentiles:
        ecfg = EventsConfig(percentile=float(p), wet_threshold=cfg.wet_threshold, min_wet_days=cfg.min_wet_days)
        out[f"p{p:g}"] = wet_day_thresholds(da, mask, ecfg).values.astype("float64")
    return out


#: working memory (bytes) of the per-pixel diagnostics of one block of grid rows: its members in float64 and
#: what the index, Wasserstein and Perkins computations make of them (about :data:`DIAGNOSTIC_COPIES` copies,
#: measured with tracemalloc on the demo grid)
DIAGNOSTIC_BLOCK_BYTES = 128 * 2**20
DIAGNOSTIC_COPIES = 12


#: the members' values (in the store's dtype) of the band of grid rows read from the store at once: every
#: chunk of a store chunked by days holds the whole grid, so each band reads the whole store once, and a
#: continental grid needs one row per block (465 reads of the store at 465 x 705 without bands)
DIAGNOSTIC_BAND_BYTES = 512 * 2**20


def rows_per_block(members: int, days: int, width: int, budget: int | None = None) -> int:
    """Grid rows per block of the per-pixel diagnostics: as many as keep a block's working memory within
    ``budget`` (default :data:`DIAGNOSTIC_BLOCK_BYTES`), at least one row."""
    budget = DIAGNOSTIC_BLOCK_BYTES if budget is None else budget
    return int(max(1, budget // max(1, DIAGNOSTIC_COPIES * members * days * width * 8)))


def rows_per_band(members: int, days: int, width: int, itemsize: int, rows: int, budget: int | None = None) -> int:
    """Grid rows read from the store at once: as many whole blocks of ``rows`` as keep the band's values
    (``itemsize`` bytes each) within ``budget`` (default :data:`DIAGNOSTIC_BAND_BYTES`), at least one block."""
    budget = DIAGNOSTIC_BAND_BYTES if budget is None else budget
    fit = budget // max(1, members * days * width * itemsize)
    return int(max(rows, fit // rows * rows))


@dataclass
class SourceDiagnostics:
    """The diagnostics of one source, computed with bounded memory (:func:`source_diagnostics`)."""

    table: pd.DataFrame | None  # the index table (daily records), else None
    bias_maps: dict  # index -> (h, w)
    distribution: dict  # wasserstein, perkins_skill_score, ralsd
    domain_means: np.ndarray  # (M, N): each member's domain-mean series (return levels)


def _finite_mean(v: np.ndarray, axis) -> np.ndarray:
    """Mean over ``axis`` of the finite values of ``v``, NaN where there is none."""
    fin = np.isfinite(v)
    cnt = fin.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(fin, v, 0.0).sum(axis=axis) / cnt, np.nan)


def domain_mean_series(values, chunk_days: int = 64) -> np.ndarray:
    """The domain mean of each day of ``values`` (N, h, w; numpy, dask or zarr) over its finite pixels, NaN on a
    day without any (as :func:`precip_cvae.indices.seasonal_maxima` takes it), read ``chunk_days`` days at a time."""
    n = int(values.shape[0])
    out = np.full(n, np.nan)
    for s in range(0, n, chunk_days):
        v = np.asarray(values[s:s + chunk_days], dtype=np.float64)
        out[s:s + len(v)] = _finite_mean(v, (1, 2))
    return out


def source_diagnostics(ens, obs, dates, calendar: str, pct: dict, cfg: EvaluateConfig,
                       season_year: str, daily: bool, rows: int | None = None, chunk_days: int | None = None,
                       band_rows: int | None = None) -> SourceDiagnostics:
    """Every diagnostic of one source's members ``ens`` (M, N, h, w) against ``obs`` (N, h, w; both numpy, dask
    or zarr, read lazily), with
    memory bounded whatever M and N: the quantities over whole fields (the RALSD spectra, each member's
    domain-mean series, the value range of the Perkins bins) in one pass over chunks of days, the per-pixel
    ones (climate indices, Wasserstein distance, Perkins skill score) over blocks of grid rows with all their
    days (``rows`` per block, default :func:`rows_per_block`; ``chunk_days`` per chunk, default
    :func:`precip_cvae.evaluate.score.chunk_days_for`).  Equal to the whole-array functions of :mod:`precip_cvae.indices`: each
    pixel's value depends on its own series, each spectrum on its own field.  The blocks are cut from bands of
    ``band_rows`` rows (default :func:`rows_per_band`) read from the store at once, in its dtype: a band reads
    every chunk that holds its rows (with days in chunks of the whole grid, the whole store), so the store is
    read once for the whole-field pass and once per band, not once per block.  The truth is read with them: by
    the same chunks of days, then by the same bands (in float64)."""
    m, n, h, w = (int(x) for x in ens.shape)
    valid_px = np.zeros((h, w), dtype=bool)
    spec_e, spec_o, broken = None, None, False
    domain = np.full((m, n), np.nan)
    lo, hi = np.inf, -np.inf
    step = chunk_days or chunk_days_for(m, h, w)
    for s in range(0, n, step):
        stop = min(s + step, n)
        o = np.asarray(obs[s:stop], dtype=np.float64)
        valid = np.isfinite(o)
        if not valid.any(axis=(1, 2)).all():
            raise ValueError("ralsd: every obs day needs at least one valid pixel")
        valid_px |= valid.any(axis=0)
        e = np.asarray(ens[:, s:stop], dtype=np.float64)
        broken |= bool((valid & ~np.isfinite(e)).any())
        domain[:, s:stop] = _finite_mean(e, (2, 3))  # each member's own finite pixels (indices.seasonal_maxima)
        e = np.where(valid, e, np.nan)
        fin = np.isfinite(e)
        if fin.any():
            lo, hi = min(lo, float(e[fin].min())), max(hi, float(e[fin].max()))
        if valid.any():
            lo, hi = min(lo, float(o[valid].min())), max(hi, float(o[valid].max()))
        for d in range(stop - s):
            po = rapsd(o[d])[1]
            pe = np.stack([rapsd(e[j, d])[1] for j in range(m)])
            spec_o = po if spec_o is None else spec_o + po
            spec_e = pe if spec_e is None else spec_e + pe
    ralsd = float("nan") if broken else indices.ralsd_of_mean_spectra(spec_e / n, spec_o / n)
    edges = indices._bin_edges(1.0, lo, hi) if np.isfinite(lo) else None
    p_lo, p_hi = pct.values()
    obs_maps, ens_maps = {}, {}
    wmap, pmap = np.full((h, w), np.nan), np.full((h, w), np.nan)
    rows = rows or rows_per_block(m, n, w)
    band_rows = max(rows, band_rows or rows_per_band(m, n, w, np.dtype(ens.dtype).itemsize, rows))
    band, obs_band, b0 = None, None, 0
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        if not valid_px[r0:r1].any():
            continue
        if band is None or r1 > b0 + band.shape[2]:  # the next band of rows, read at once
            b0 = r0
            band = np.asarray(ens[:, :, b0:min(b0 + band_rows, h)])
            obs_band = np.asarray(obs[:, b0:min(b0 + band_rows, h)], dtype=np.float64)
        o = obs_band[:, r0 - b0:r1 - b0]
        e = np.asarray(band[:, :, r0 - b0:r1 - b0], dtype=np.float64)
        if daily:
            om, em = indices.ensemble_index_maps(e, o, dates, calendar, p_lo[r0:r1], p_hi[r0:r1], cfg.wet_threshold,
                                                 season_year)
            for name in om:
                obs_maps.setdefault(name, np.full((h, w), np.nan))[r0:r1] = om[name]
                ens_maps.setdefault(name, np.full((h, w), np.nan))[r0:r1] = em[name]
        wmap[r0:r1] = indices.wasserstein_map(e, o)
        if edges is not None:
            pmap[r0:r1] = indices.perkins_skill_score(e, o, bins=edges)[0]
    table, bias = (indices.index_table(obs_maps, ens_maps, valid_px) if daily and obs_maps else (None, {}))
    with np.errstate(invalid="ignore"):
        w_mean = float(np.nanmean(wmap)) if np.isfinite(wmap).any() else float("nan")
    pss = float(np.mean(pmap[valid_px])) if valid_px.any() else float("nan")
    return SourceDiagnostics(table, bias, {"wasserstein": w_mean, "perkins_skill_score": pss, "ralsd": ralsd},
                             domain)


def _return_levels(label: str, values: np.ndarray, dates, season_year: str) -> pd.DataFrame:
    """GEV return levels of the seasonal maxima of the domain mean; values (N, h, w), or one domain-mean series
    per member (M, N)."""
    series = [values] if values.ndim == 3 else list(values)
    maxima = np.concatenate([indices.seasonal_maxima(v, dates, season_year).to_numpy() for v in series])
    table = indices.gev_return_levels(maxima, RETURN_PERIODS)
    return table.assign(source=label, n_maxima=maxima.size)


def diagnose(ensembles: str, meta: dict, cfg: EvaluateConfig, season_year: str = "calendar") -> Diagnostics:
    """Index, distribution and return-level diagnostics of every source on the headline split.

    Reads one source's ensemble at a time.  ``season_year``: the data set's split rule ('djf' makes
    a winter one period).
    """
    t0 = time.perf_counter()
    split = headline_split(meta)
    truth = io.open_zarr_group(ensembles, f"{split}/{TRUTH}")
    obs = truth["pr"].data  # lazy (time, lat, lon): read by chunks of days and bands of rows, never whole
    dates = [str(d)[:10] for d in truth["time"].values.astype(str)]
    calendar = meta.get("calendar", "standard")
    pct = observed_percentiles(obs, cfg)
    obs_domain = domain_mean_series(obs)
    rows, levels, maps, notes = [], [], {}, []
    daily = len(set(dates)) == len(dates)  # climate indices and return levels are defined on daily series
    n_seasons = indices.seasonal_maxima(obs_domain, dates, season_year).size if daily else 0
    gev = daily and n_seasons >= MIN_SEASONS
    if not daily:
        notes.append(f"Climate indices and return levels skipped: the {split} split has {len(dates)} time steps on "
                     f"{len(set(dates))} day(s), and they are defined on daily series (sum the steps to days with "
                     "`preprocess.time_step: 1D` to get them). The distribution distances below use every step.")
    elif not gev:
        notes.append(f"GEV return levels skipped: {n_seasons} season year(s) scored, at least {MIN_SEASONS} needed "
                     "(cross-validation over years scores every season)")
    else:
        levels.append(_return_levels("observed", obs_domain[None], dates, season_year))
    for source in meta["sources"]:
        ens = io.open_zarr_group(ensembles, f"{split}/{source}")["pr"].data  # lazy (member, time, lat, lon)
        result = source_diagnostics(ens, obs, dates, calendar, pct, cfg, season_year, daily)
        if result.table is not None:
            rows.extend(result.table.assign(source=source).to_dict("records"))
            if source == meta["primary"]:
                maps = result.bias_maps
        rows.extend({"source": source, "index": k, "ens_mean": v} for k, v in result.distribution.items())
        if gev:
            levels.append(_return_levels(source, result.domain_means, dates, season_year))
        del result
    out = pd.DataFrame(rows).reindex(columns=["source", "index", "obs_mean", "ens_mean", "bias_mean", "abs_bias_mean"])
    rl = pd.concat(levels, ignore_index=True) if levels else pd.DataFrame(
        columns=["source", "period", "level", "lower", "upper", "n_maxima"])
    if len(rl):
        rl = rl[["source", "period", "level", "lower", "upper", "n_maxima"]]
    log.info("index diagnostics of %d sources on %s (%d days, %d season years) in %.1f s", len(meta["sources"]),
             split, len(dates), n_seasons, time.perf_counter() - t0)
    return Diagnostics(split, out, rl, maps, notes)


def diagnostics_markdown(diag: Diagnostics, meta: dict) -> list[str]:
    """summary.md lines: the index table (spatial mean of |bias| per source) and the return levels."""
    t = diag.indices
    idx = t[t["abs_bias_mean"].notna()]
    wide = idx.pivot(index="index", columns="source", values="abs_bias_mean")
    wide = wide.reindex(index=[i for i in indices.INDEX_NAMES if i in wide.index],
                        columns=[s for s in meta["sources"] if s in wide.columns])
    obs = idx.drop_duplicates("index").set_index("index")["obs_mean"]
    wide.insert(0, "observed (mean)", obs.reindex(wide.index))
    wide = wide.rename(columns={s: source_label(s) for s in meta["sources"]})
    dist = t[t["index"].isin(["wasserstein", "perkins_skill_score", "ralsd"])].pivot(
        index="index", columns="source", values="ens_mean")
    dist = dist.reindex(columns=[s for s in meta["sources"] if s in dist.columns]).rename(
        columns={s: source_label(s) for s in meta["sources"]})
    text = [f"## Climate indices ({diag.split} split, each member a daily series)", ""]
    if wide.empty:
        text.append("No climate index (the note below says why).")
    else:
        text += ["Spatial mean of |member-mean index - observed index| per pixel (lower is better); the first column "
                 "is the observed index's spatial mean. Units: "
                 + ", ".join(f"{k} {v}" for k, v in indices.INDEX_UNITS.items())
                 + ". R95pTOT/R99pTOT and days above P99 use the observed wet-day percentiles of these days; days "
                 "not scored are missing, so no spell bridges a gap between seasons.", "",
                 wide.to_markdown(floatfmt=".3g")]
    text += ["",
            "Distribution distances per pixel (spatial means; Wasserstein in mm/day, lower is better; Perkins skill "
            "score 0-1, higher is better) and the radially averaged log spectral distance (RALSD, CORDEX-ML-Bench, "
            "dB², lower is better):", "",
            dist.to_markdown(floatfmt=".3g"), ""]
    if len(diag.return_levels):
        rl = diag.return_levels.assign(
            cell=lambda d: [f"{v:.3g} [{a:.3g}, {b:.3g}]" for v, a, b in zip(d.level, d.lower, d.upper)])
        wide_rl = rl.pivot(index="source", columns="period", values="cell")
        order = ["observed", *[s for s in meta["sources"] if s in wide_rl.index]]
        wide_rl = wide_rl.reindex(order).rename(index={s: source_label(s) for s in meta["sources"]})
        wide_rl.columns = [f"{int(c)}-season level" for c in wide_rl.columns]
        text += ["Return levels of the seasonal maximum of the domain-mean daily precipitation (mm/day, GEV fit, "
                 "90 % parametric-bootstrap interval; a source's members pooled):", "",
                 wide_rl.to_markdown(), ""]
    text += [f"{n}" for n in diag.notes] + ([""] if diag.notes else [])
    return text
