"""The optional ``downstream`` stage: does augmentation help another model at extremes?

A small deterministic downscaler (condition -> fine field, a compact CNN) is
trained twice per seed with the same seed and the same budget of optimisation
steps: on the real train split only, and on ``augmented_training_set.zarr`` (real
train days + synthetic samples, weighted by ``sample_weight``).  Both are scored
on the real test split, all days and heavy days: MAE_all, MAE_tail, the
extreme-frequency bias, POD/FAR/CSI of P99 exceedances and the quantile loss,
with bootstrap confidence intervals over days for each score and for the
difference augmented - real.

The loss is ``mae`` or ``quantile`` (pinball at ``quantile``): with an MAE-type
loss, real and synthetic targets for similar conditions are averaged and
augmentation can be useless; a quantile loss can use the extra tail examples.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .config import DownstreamConfig
from .data import FieldData

log = logging.getLogger(__name__)


class Downscaler(nn.Module):
    """Compact CNN: condition (B, C, h, w) -> field (B, 1, H, W) >= 0 in model space."""

    def __init__(self, n_channels: int, fine_shape: tuple[int, int], filters: int = 16):
        super().__init__()
        self.fine_shape = tuple(fine_shape)
        f = filters
        self.net = nn.Sequential(
            nn.Conv2d(n_channels, f, 3, padding=1), nn.SiLU(),
            nn.Conv2d(f, f, 3, padding=1), nn.SiLU(),
            nn.Conv2d(f, f, 3, padding=1), nn.SiLU(),
            nn.Conv2d(f, 1, 3, padding=1),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(y, size=self.fine_shape, mode="bilinear", align_corners=False)  # (B, C, H, W)
        return F.softplus(self.net(h))  # (B, 1, H, W)


def _mae(pred, target, valid, q):
    err = (pred - target).abs() * valid
    return err.sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)


def _pinball(pred, target, valid, q):
    diff = target - pred
    loss = torch.maximum(q * diff, (q - 1) * diff) * valid
    return loss.sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)


LOSSES = {"mae": _mae, "quantile": _pinball}  # the enum of downstream.losses in the schema (tested)


def fit(data: FieldData, weights: torch.Tensor, cfg: DownstreamConfig, seed: int, steps: int,
        loss: str, device: torch.device | str = "cpu") -> Downscaler:
    """Train a downscaler for exactly ``steps`` steps (the shared budget) on ``data``.

    ``weights`` (T,) are per-sample loss weights (``sample_weight``). The model lives on
    ``device``; ``data`` stays where it is and each batch is moved there (the initial weights
    and the batch order come from CPU generators, the same on every device).
    """
    torch.manual_seed(seed)
    model = Downscaler(data.y.shape[1], tuple(data.x.shape[-2:]), cfg.filters).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = LOSSES[loss]
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    valid = data.valid.float()
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        pred = model(data.y[idx].to(device))  # (B, 1, H, W)
        per_sample = loss_fn(pred, data.x[idx].to(device), valid[idx].to(device), cfg.quantile)  # (B,)
        w = weights[idx].to(device)
        loss = (per_sample * w).sum() / w.sum().clamp(min=1e-8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def predict(model: Downscaler, data: FieldData, batch: int = 256) -> np.ndarray:
    """(N, H, W) mm/day, NaN where invalid."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(data.y[i : i + batch].to(device)).cpu() for i in range(0, len(data), batch)])
    mm = data.transform.inverse(out)
    return torch.where(data.valid, mm, torch.full_like(mm, float("nan")))[:, 0].numpy()


def day_scores(pred: np.ndarray, obs: np.ndarray, thr: np.ndarray, q: float) -> pd.DataFrame:
    """Per-day ingredients of the scores, so that bootstrap resampling over days is exact.

    Returns sums and counts per day: absolute errors (all, tail), exceedance counts
    (forecast, observed, hits), pinball losses.
    """
    valid = np.isfinite(obs)
    tail = valid & (obs > thr)
    f_ex = valid & (pred > thr)
    err = np.abs(pred - obs)
    diff = obs - pred
    pin = np.maximum(q * diff, (q - 1) * diff)
    s = lambda a, m: np.where(m, a, 0.0).sum(axis=(1, 2))  # noqa: E731
    return pd.DataFrame({
        "abs_all": s(err, valid), "n_all": valid.sum(axis=(1, 2)),
        "abs_tail": s(err, tail), "n_tail": tail.sum(axis=(1, 2)),
        "fcst_ex": f_ex.sum(axis=(1, 2)), "obs_ex": tail.sum(axis=(1, 2)), "hits": (f_ex & tail).sum(axis=(1, 2)),
        "pinball": s(pin, valid),
    })


def aggregate(d: pd.DataFrame) -> dict[str, float]:
    """Scores from summed per-day ingredients."""
    t = d.sum()
    ratio = lambda a, b: float(a / b) if b > 0 else float("nan")  # noqa: E731
    table = {"hits": t["hits"], "misses": t["obs_ex"] - t["hits"], "false_alarms": t["fcst_ex"] - t["hits"],
             "correct_negatives": 0.0}
    return {
        "MAE_all": ratio(t["abs_all"], t["n_all"]),
        "MAE_tail": ratio(t["abs_tail"], t["n_tail"]),
        "freq_bias_p99": ratio(t["fcst_ex"], t["obs_ex"]),
        "POD_p99": metrics.pod(table),
        "FAR_p99": metrics.far(table),
        "CSI_p99": metrics.csi(table),
        "quantile_loss": ratio(t["pinball"], t["n_all"]),
    }


def bootstrap(a: pd.DataFrame, b: pd.DataFrame | None, n: int, seed: int) -> dict[str, tuple[float, float]]:
    """95 % intervals over days of each score of ``a`` (or of ``b - a`` when ``b`` is given)."""
    rng = np.random.default_rng(seed)
    days = len(a)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, days, days)
        sa = aggregate(a.iloc[idx])
        if b is None:
            draws.append(sa)
        else:
            sb = aggregate(b.iloc[idx])
            draws.append({k: sb[k] - sa[k] for k in sa})
    frame = pd.DataFrame(draws)
    return {k: (float(np.nanpercentile(frame[k], 2.5)), float(np.nanpercentile(frame[k], 97.5))) for k in frame}


def compare(real: FieldData, augmented: FieldData, aug_weights: torch.Tensor, test: FieldData,
            cfg: DownstreamConfig, device: torch.device | str = "cpu") -> pd.DataFrame:
    """:func:`compare_one` for every loss in ``cfg.losses``, concatenated."""
    return pd.concat([compare_one(real, augmented, aug_weights, test, cfg, loss, device) for loss in cfg.losses],
                     ignore_index=True)


def compare_one(real: FieldData, augmented: FieldData, aug_weights: torch.Tensor, test: FieldData,
                cfg: DownstreamConfig, loss: str, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Train both variants for every seed and score them on ``test`` (all days and heavy days).

    Returns rows: training_set, loss, seed ('all' for pooled), subset, metric, value, ci_low, ci_high.
    """
    steps = cfg.epochs * max(1, len(real) // cfg.batch_size)  # the shared budget
    obs = test.pr_mm[:, 0].numpy()
    thr = test.thr_mm[0, 0].numpy()
    subsets = {"all": np.ones(len(test), bool), "heavy": test.is_event.numpy()}
    rows = []
    per_day: dict[str, list[pd.DataFrame]] = {"real": [], "augmented": []}
    for seed in range(cfg.seeds):
        for name, data, w in (("real", real, torch.ones(len(real))), ("augmented", augmented, aug_weights)):
            model = fit(data, w, cfg, seed, steps, loss, device)
            scores = day_scores(predict(model, test), obs, thr, cfg.quantile)
            per_day[name].append(scores)
            for subset, m in subsets.items():
                if m.any():
                    for metric, value in aggregate(scores[m]).items():
                        rows.append((name, loss, str(seed), subset, metric, value, np.nan, np.nan))
        log.info("downstream %s loss: seed %d done (%d steps each)", loss, seed, steps)
    # pooled over seeds: the per-day ingredients averaged over seeds, bootstrap over days
    pooled = {k: sum(v) / len(v) for k, v in per_day.items()}
    for subset, m in subsets.items():
        if not m.any():
            continue
        for name in ("real", "augmented"):
            point = aggregate(pooled[name][m])
            ci = bootstrap(pooled[name][m], None, cfg.bootstrap, 0)
            for metric, value in point.items():
                rows.append((name, loss, "all", subset, metric, value, *ci[metric]))
        a, b = aggregate(pooled["real"][m]), aggregate(pooled["augmented"][m])
        ci = bootstrap(pooled["real"][m].reset_index(drop=True), pooled["augmented"][m].reset_index(drop=True),
                       cfg.bootstrap, 1)
        for metric in a:
            rows.append(("augmented_minus_real", loss, "all", subset, metric, b[metric] - a[metric], *ci[metric]))
    return pd.DataFrame(rows, columns=["training_set", "loss", "seed", "subset", "metric", "value", "ci_low",
                                       "ci_high"])


def run(dataset: str, thresholds: str, events: str, training_set: str, cfg: DownstreamConfig,
        out_csv: str) -> pd.DataFrame:
    """Read the real splits and the augmented training set, compare, write ``comparison.csv``.

    The downscalers train on ``cfg.device`` (:func:`precip_cvae.resources.select_device`).
    """
    from .data import load_fields
    from .io import open_zarr, write_csv
    from .resources import select_device

    device = select_device(cfg.device, "downstream.device")

    real = load_fields(dataset, thresholds, events, splits=("train",))
    test = load_fields(dataset, thresholds, events, splits=("test",))
    augmented = load_fields(training_set, thresholds, None)
    weights = torch.from_numpy(open_zarr(training_set)["sample_weight"].values.astype("float32"))
    n_syn = int(open_zarr(training_set)["synthetic"].values.sum())
    log.info("downstream: %d real train fields, augmented set %d (+%d synthetic), %d test days (%d heavy); "
             "losses %s, %d seeds, device %s", len(real), len(augmented), n_syn, len(test),
             int(test.is_event.sum()), list(cfg.losses), cfg.seeds, device)
    table = compare(real, augmented, weights, test, cfg, device)
    write_csv(table, out_csv)
    diff = table[(table.training_set == "augmented_minus_real") & (table.metric.isin(["MAE_tail", "CSI_p99",
                                                                                        "quantile_loss"]))]
    for row in diff.itertuples():
        log.info("augmented - real, %s loss, %s days: %s %+.4f [%+.4f, %+.4f]", row.loss, row.subset, row.metric,
                 row.value, row.ci_low, row.ci_high)
    return table
