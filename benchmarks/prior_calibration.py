"""Is the learned prior as wide as the posterior it stands for?  And would a wider one help?

A learned prior ``p(z | y)`` is calibrated when the posterior means of the days with that condition scatter around
the prior mean as far as the prior says: per latent number, over days,
``ratio = sqrt(mean(((mu_q - mu_p) / sigma_p)^2) + mean((sigma_q / sigma_p)^2))`` is 1 (the KL term alone would
fit the prior there; the ensemble terms of the loss also train it).  This script reads a k-fold run's checkpoints
and, per fold:

- the ratio of the map latent's numbers (their mean) and of each global latent number, on the train days;
- the spread/skill of single cells and of the domain mean on train and val days (16 prior members): a deficit on
  train days too is not overfitting of the prior;
- the val scores with the global numbers' prior standard deviation multiplied by their train ratio (``glob``) or
  every number's (``all``), against the checkpoint as it is (``none``): the fair CRPS of the cells on all and heavy
  days, the fair CRPS and spread/skill of the domain mean, with paired 90 % bootstrap intervals over the days.

The same noise (generator seed) draws every variant, so the differences are the rescaling's.

Usage::

    .venv/bin/python benchmarks/prior_calibration.py results/iberia_issue28s default_seed0     # about 3 minutes
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from precip_cvae import metrics
from precip_cvae.checkpoint import load_model
from precip_cvae.data import open_fields
from precip_cvae.transform import TargetTransform

MEMBERS = 16


@torch.no_grad()
def latent_ratio(model, days) -> torch.Tensor:
    """Per latent number (the packed latent: map cells, then the global numbers): the calibration ratio above."""
    cond = model._with_mean(model.encode_condition(days.y))
    mu_p, lv_p = model.prior(cond)
    mu_q, lv_q = model.posterior(days.x, days.valid, cond)
    sd_p = (0.5 * lv_p).exp()
    return torch.sqrt((((mu_q - mu_p) / sd_p) ** 2).mean(0) + ((0.5 * (lv_q - lv_p)).exp() ** 2).mean(0))


@torch.no_grad()
def members_mm(model, transform, days, factor: torch.Tensor | None, seed: int) -> np.ndarray:
    """(M, N, H, W) prior members in mm/day, NaN off the valid cells; the prior sd times ``factor`` (per number)."""
    prior = model.prior
    if factor is not None:
        model.prior = lambda cond: (lambda m, lv: (m, lv + 2 * torch.log(factor)))(*prior(cond))
    try:
        s = model.sample(days.y, days.valid, n_samples=MEMBERS, generator=torch.Generator().manual_seed(seed))
    finally:
        model.prior = prior
    pr = transform.inverse(s[:, :, 0].float()).numpy()
    return np.where(days.valid[:, 0].numpy()[None], pr, np.nan)


def spread_skill(ens: np.ndarray, obs: np.ndarray) -> float:
    """sqrt((M + 1) / M * mean member variance / mean squared error of the member mean), over finite points."""
    m = ens.shape[0]
    ok = np.isfinite(obs)
    var = np.var(ens, axis=0, ddof=1)[ok].mean()
    mse = ((ens.mean(0) - obs) ** 2)[ok].mean()
    return float(np.sqrt((m + 1) / m * var / mse))


def day_scores(ens: np.ndarray, obs: np.ndarray) -> dict[str, np.ndarray]:
    """Per day: the cells' mean fair CRPS, and the domain mean (members and truth) for its CRPS and spread/skill."""
    c = metrics.crps_ensemble(ens, obs)
    valid = np.isfinite(obs)
    n_valid = valid.sum((-1, -2))
    dm_e = np.nansum(ens, (-1, -2)) / n_valid
    dm_o = np.nansum(obs, (-1, -2)) / n_valid
    return {"crps": np.nanmean(c.reshape(c.shape[0], -1), axis=1), "dm_e": dm_e, "dm_o": dm_o,
            "crps_field": metrics.crps_ensemble(dm_e[:, :, None, None], dm_o[:, None, None])[:, 0, 0]}


def interval(diff: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-day differences with a 90 % bootstrap interval over days."""
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(1)
    return float(diff.mean()), float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="results/<run> of a k-fold run (fold<k>/ directories)")
    ap.add_argument("experiment", help="<setting>_seed<N>: the checkpoint fold<k>/experiments/<it>/train/best.pt")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args(argv)

    folds, pooled = [], {}
    for fold in range(args.folds):
        root = f"{args.run}/fold{fold}"
        data = open_fields(f"{root}/preprocess/dataset.zarr", f"{root}/events/thresholds.nc",
                           f"{root}/events/events.csv", splits=("train", "val")).read()
        model, state = load_model(f"{root}/experiments/{args.experiment}/train/best.pt")
        if model.hierarchical:
            raise SystemExit(f"{root}/experiments/{args.experiment}: model.hierarchical_prior draws the map given the "
                             "global numbers; this script measures the factorised prior (hierarchical_prior false)")
        model.eval()
        transform = TargetTransform.from_attrs(state["data"]["transform"])
        g = int(model.g)
        train, val = data.select("train"), data.select("val")
        ratio = latent_ratio(model, train)
        row = {"fold": fold, "ratio_map": float(ratio[:-g].mean() if g else ratio.mean())}
        row.update({f"ratio_global{k}": float(ratio[-g + k]) for k in range(g)})
        for name, days in (("train", train), ("val", val)):
            ens = members_mm(model, transform, days, None, seed=1)
            obs = torch.where(days.valid[:, 0], days.pr_mm[:, 0].float(), torch.tensor(float("nan"))).numpy()
            s = day_scores(ens, obs)
            row[f"ss_cell_{name}"] = spread_skill(ens, obs)
            row[f"ss_field_{name}"] = spread_skill(s["dm_e"][:, :, None], s["dm_o"][:, None])
        folds.append(row)
        print(pd.DataFrame([row]).round(3).to_string(index=False), flush=True)
        # val with the prior widened by the train ratios
        obs = torch.where(val.valid[:, 0], val.pr_mm[:, 0].float(), torch.tensor(float("nan"))).numpy()
        glob = torch.ones_like(ratio)
        if g:
            glob[-g:] = ratio[-g:]
        for variant, factor in (("none", None), ("glob", glob), ("all", ratio)):
            s = day_scores(members_mm(model, transform, val, factor, seed=7), obs)
            s["heavy"] = val.is_event.numpy().astype(bool)
            for key, value in s.items():
                pooled.setdefault(variant, {}).setdefault(key, []).append(value)

    table = pd.DataFrame(folds)
    print("\nper fold (train ratios, spread/skill on train and val days):")
    print(table.round(3).to_string(index=False))
    print("\nmean over folds:")
    print(table.drop(columns="fold").mean().round(3).to_string())

    cat = {v: {k: np.concatenate(x, axis=-1) for k, x in d.items()} for v, d in pooled.items()}
    heavy = cat["none"]["heavy"]
    print(f"\nval, 5 folds pooled ({len(heavy)} days, {int(heavy.sum())} heavy); difference to 'none' [90 %]:")
    rows = []
    for variant, s in cat.items():
        r = {"prior sd": variant, "CRPS all": s["crps"].mean(), "CRPS heavy": s["crps"][heavy].mean(),
             "CRPS domain mean": s["crps_field"].mean(),
             "ss domain mean": spread_skill(s["dm_e"][:, :, None], s["dm_o"][:, None]),
             "mass bias": s["dm_e"].mean() / s["dm_o"].mean() - 1}
        if variant != "none":
            for key, label, sel in (("crps", "all", slice(None)), ("crps", "heavy", heavy),
                                    ("crps_field", "domain", slice(None))):
                d = s[key][sel] - cat["none"][key][sel]
                r[f"d {label}"] = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*interval(d))
        rows.append(r)
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
