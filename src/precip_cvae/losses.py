"""Training loss of the cVAE.

``L = lambda_base * L_rec + lambda_ext * MAE_ext + beta(epoch) * KL + lambda_mass * L_mass
+ lambda_crps * afCRPS + lambda_tail * twCRPS + lambda_energy * ES + lambda_pooled * afCRPS_pooled
(+ lambda_mean * MSE_mean)``

(the last term in residual mode only: the squared error of the deterministic conditional mean).

``L_rec`` is chosen by ``reconstruction``: ``l1``, the MAE over valid pixels of the decoding
of a posterior draw (a conditional median: it pulls the field toward the median, which
makes heavy days light); ``bernoulli_gamma``, the negative log-likelihood of the truth under
the per-pixel Bernoulli-gamma law decoded from the posterior draw (wet probability, gamma
shape and scale; Cannon 2008); ``ensemble_mean``, the squared error of the mean of the prior
members (a content loss, Harris et al. 2022: it asks the members to be right on average, not
each of them).  ES is the fair energy score of the prior members over each field's valid
pixels, a multivariate proper score that rewards the right spatial structure, not only
each pixel's marginal.  afCRPS_pooled is the afCRPS of the prior members' block means in
mm/day (``pooled_sizes``: blocks of k x k cells, 0 for the whole field): a proper score of the rain
over areas, which a per-pixel score leaves free.  A model can have each pixel's marginal right and
still scatter its exceedances over too many days; the area totals of a calibrated ensemble vary
between members as much as the truth's do between days.

The ensemble terms score ``M = ensemble_members`` fields decoded from the *prior*
p(z|y), as generation draws them: the almost-fair CRPS (afCRPS, Lang et al. 2024, the
loss of ECMWF's AIFS-CRPS) over valid pixels, and the threshold-weighted CRPS with the
chaining function ``v(x) = max(x, t)`` (``t`` a local train wet-day percentile), the
proper way to emphasise the tail.  The KL can be divided by the number of valid
pixels (``kl_per_pixel``), so ``beta_kl`` is on the scale of the per-pixel terms, and
floored per latent unit by ``free_bits``.

Every term is a per-sample quantity averaged over the samples where it is defined,
so a sample's weight never depends on how many pixels (valid or extreme) it has,
and a term is never diluted by the samples where it is undefined.  Lessons of
past failures, each pinned by a test in ``tests/test_losses.py``:

* ``MAE_ext`` is the mean over the samples that *have* extreme pixels; it is
  never multiplied by the fraction of such samples (that made the tail MAE ~10x
  worse: with 1 heavy day in 10 the extreme gradient was 10x too weak).
* A sample with 1 extreme pixel weighs as much as one with 100.
* No extreme pixel in the batch -> ``MAE_ext`` is 0 with a finite gradient, not NaN.
* ``beta`` ramps linearly from 0 (0-based epoch 0) to ``beta_kl`` at
  ``epoch == warmup_epochs``.
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .metrics import MASS_FLOOR, relative_mass_error
from .model import BernoulliGamma, CVAEOutput
from .transform import TargetTransform

__all__ = [
    "masked_mae",
    "extreme_mae",
    "kl_divergence",
    "kl_units",
    "kl_term",
    "afcrps",
    "masked_afcrps",
    "tail_crps",
    "mass_loss",
    "bernoulli_gamma_nll",
    "energy_score",
    "masked_energy_score",
    "block_means",
    "pooled_afcrps",
    "ensemble_mean_error",
    "masked_mse",
    "beta_schedule",
    "warmup_finished",
    "compute_loss",
    "MM_CAP",
]

#: Upper bound (mm/day) applied, straight-through, to predictions before they are
#: mapped to mm/day: far above any observed daily total (~1,800 mm), it only stops an
#: untrained decoder's large output from overflowing ``expm1`` into inf/NaN.
MM_CAP = 1.0e4


def _masked_abs_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``|pred - target|`` over each sample's ``mask`` pixels, then over samples with any.

    Parameters
    ----------
    pred, target : Tensor (B, ...)
        Same shape.
    mask : Tensor (B, ...), bool
        Pixels to average; same shape as ``pred``.

    Returns
    -------
    Tensor ()
        0 (still attached to ``pred``'s graph, finite gradient) when no sample has a
        masked pixel.  Values outside the mask (even NaN) affect neither the value
        nor the gradient.
    """
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape"
        )
    mask = mask.bool()
    # where() before abs(), not a multiplication after: NaN/inf outside the mask must
    # not leak into the value or (through abs' backward) into the gradient
    diff = torch.where(mask, pred - target, torch.zeros_like(pred))
    err = diff.abs().flatten(1)  # (B, N)
    count = mask.flatten(1).sum(dim=1)  # (B,)
    has = count > 0  # (B,)
    per_sample = err.sum(dim=1) / count.clamp(min=1).to(err.dtype)  # (B,), 0 where no pixel
    # sum over the samples that have pixels / their number (no host sync, no NaN when none)
    return per_sample.sum() / has.sum().clamp(min=1).to(err.dtype)


def masked_mae(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid pixels.

    Parameters
    ----------
    pred, target : Tensor (B, 1, H, W)
        Prediction and truth, same space and units.
    valid : Tensor (B, 1, H, W), bool
        Pixels to compare.

    Returns
    -------
    Tensor ()
        Per-sample MAE over its valid pixels, averaged over the samples that have
        any valid pixel (0 if none has).
    """
    return _masked_abs_error(pred, target, valid)


def extreme_mae(pred: torch.Tensor, target: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over extreme pixels, every sample with any weighing the same.

    Parameters
    ----------
    pred, target : Tensor (B, 1, H, W)
        Prediction and truth.
    extreme : Tensor (B, 1, H, W), bool
        Pixels whose truth exceeds the per-pixel heavy-rain threshold (computed by
        the caller; should be a subset of the valid pixels).

    Returns
    -------
    Tensor ()
        Mean over each sample's extreme pixels, then the plain average over the
        samples that have any extreme pixel -- never multiplied by the fraction of
        such samples.  0 (attached to the graph, finite gradient) if no sample has any.
    """
    return _masked_abs_error(pred, target, extreme)


def kl_divergence(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """``KL(q || p)`` of diagonal Gaussians (nats).

    Parameters
    ----------
    mu_q, logvar_q, mu_p, logvar_p : Tensor (B, d_z) or (B, c_z, h_z, w_z)

    Returns
    -------
    Tensor ()
        Summed over the latent units, averaged over the batch.
    """
    return kl_units(mu_q, logvar_q, mu_p, logvar_p).sum(dim=1).mean()


def kl_units(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(q || p)`` of diagonal Gaussians (nats), flattened to (B, U) latent units."""
    kl = 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0
    )
    return kl.flatten(1)  # (B, U)


def kl_term(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    valid: torch.Tensor | None = None,
    free_bits: float = 0.0,
    per_pixel: bool = False,
) -> torch.Tensor:
    """The KL term of the loss (before ``beta``).

    Parameters
    ----------
    mu_q, logvar_q, mu_p, logvar_p : Tensor (B, ...)
        Posterior and prior of every latent unit (a vector or a map).
    valid : Tensor (B, 1, H, W), bool, optional
        Needed for ``per_pixel``.
    free_bits : float
        Nats per latent unit: each unit's batch-mean KL counts as ``max(KL_u, free_bits)``
        (Kingma et al. 2016), so units below the floor feel no pull to the prior
        (their gradient is 0) while units above it are penalised as usual.  0: off.
    per_pixel : bool
        Divide by the mean number of valid pixels per sample, so ``beta`` is on the
        scale of a per-pixel reconstruction error.

    Returns
    -------
    Tensor ()
        ``sum_u max(mean_b KL_bu, free_bits) [/ mean_b n_valid_b]``; with
        ``free_bits = 0`` the sum over units averaged over the batch, as
        :func:`kl_divergence`.
    """
    per_unit = kl_units(mu_q, logvar_q, mu_p, logvar_p).mean(dim=0)  # (U,) batch mean
    if free_bits > 0:
        per_unit = per_unit.clamp(min=float(free_bits))
    kl = per_unit.sum()
    if per_pixel:
        if valid is None:
            raise ValueError("kl_term(per_pixel=True) needs the valid mask")
        n_valid = valid.flatten(1).sum(dim=1).to(kl.dtype).mean().clamp(min=1.0)
        kl = kl / n_valid
    return kl


def afcrps(members: torch.Tensor, target: torch.Tensor, alpha: float = 0.95) -> torch.Tensor:
    """Almost-fair ensemble CRPS per point (Lang et al. 2024).

    ``mean_i |x_i - y| - (1 - eps) / (2 M (M - 1)) * sum_{i != j} |x_i - x_j|`` with
    ``eps = (1 - alpha) / M``: ``alpha = 1`` is the fair (unbiased) CRPS, ``alpha = 0``
    the plain ensemble CRPS; in between the estimator stays proper and avoids the fair
    one's degenerate optima at small ``M``.

    Parameters
    ----------
    members : Tensor (M, ...)
        Ensemble members (M >= 2), any trailing shape.
    target : Tensor (...)
        Truth, the trailing shape of ``members``.
    alpha : float in [0, 1]

    Returns
    -------
    Tensor (...)
    """
    m = members.shape[0]
    if m < 2:
        raise ValueError(f"afcrps needs at least 2 members, got {m}")
    if tuple(members.shape[1:]) != tuple(target.shape):
        raise ValueError(f"members {tuple(members.shape)} must be (M,) + target shape {tuple(target.shape)}")
    skill = (members - target.unsqueeze(0)).abs().mean(dim=0)
    spread = torch.zeros_like(skill)
    for i in range(m - 1):  # sum over i < j, twice: sum_{i != j}
        spread = spread + (members[i + 1:] - members[i].unsqueeze(0)).abs().sum(dim=0)
    eps = (1.0 - float(alpha)) / m
    return skill - (1.0 - eps) / (m * (m - 1)) * spread


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over ``mask`` (B, ...), then over the samples with any masked point."""
    zero = torch.zeros_like(values)
    v = torch.where(mask, values, zero).flatten(1)
    count = mask.flatten(1).sum(dim=1)
    per_sample = v.sum(dim=1) / count.clamp(min=1).to(v.dtype)
    return per_sample.sum() / (count > 0).sum().clamp(min=1).to(v.dtype)


def masked_afcrps(members: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float = 0.95) -> torch.Tensor:
    """afCRPS over each sample's valid pixels, averaged over the samples that have any.

    members (M, B, 1, H, W), target and valid (B, 1, H, W).  Invalid pixels (even NaN)
    change neither the value nor the gradient.
    """
    valid = valid.bool()
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    safe_m = torch.where(valid.unsqueeze(0), members, torch.zeros_like(members))
    return _masked_mean(afcrps(safe_m, safe_t, alpha), valid)


def tail_crps(members: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, threshold: torch.Tensor,
              alpha: float = 0.95) -> torch.Tensor:
    """Threshold-weighted afCRPS with the chaining function ``v(x) = max(x, t)``.

    Parameters
    ----------
    members : Tensor (M, B, 1, H, W); target, valid : (B, 1, H, W)
    threshold : Tensor (1 or B, 1, H, W)
        ``t`` per pixel in the same space; pixels where it is not finite are left out.

    Returns
    -------
    Tensor ()
        0 where every member and the truth are below ``t`` (they all map to ``t``).
    """
    mask = valid.bool() & torch.isfinite(threshold).expand_as(valid)
    t = torch.where(torch.isfinite(threshold), threshold, torch.zeros_like(threshold)).expand_as(target)
    return masked_afcrps(torch.maximum(members, t.unsqueeze(0)), torch.maximum(target, t), mask, alpha)


def mass_loss(
    pred_mm: torch.Tensor,
    target_mm: torch.Tensor,
    valid: torch.Tensor,
    coarse_mm: torch.Tensor | None = None,
    floor: float = MASS_FLOOR,
) -> torch.Tensor:
    """Relative error of the area-mean precipitation.

    Parameters
    ----------
    pred_mm, target_mm : Tensor (B, 1, H, W)
        Prediction and truth in mm/day.
    valid : Tensor (B, 1, H, W), bool
        Pixels of the domain.
    coarse_mm : Tensor (B, h, w) or (B, 1, h, w), optional
        Coarse precipitation condition in mm/day.  When given, the relative
        difference between the prediction's area mean and the coarse field's domain
        mean (NaN cells ignored) is added.
    floor : float
        Lower bound (mm/day) of the denominators, so that near-dry days do not blow up.

    Returns
    -------
    Tensor ()
        ``|m_pred - m_true| / max(m_true, floor)`` (+ ``|m_pred - m_coarse| /
        max(m_coarse, floor)``), averaged over the samples with any valid pixel;
        0 when the totals match.
    """
    valid = valid.bool()
    count = valid.flatten(1).sum(dim=1)  # (B,)
    has = count > 0
    denom = count.clamp(min=1).to(pred_mm.dtype)
    zero = torch.zeros_like(pred_mm)
    m_pred = torch.where(valid, pred_mm, zero).flatten(1).sum(dim=1) / denom  # (B,) mm/day
    m_true = torch.where(valid, target_mm, zero).flatten(1).sum(dim=1) / denom  # (B,) mm/day
    rel = relative_mass_error(m_pred, m_true, floor).abs()  # (B,)
    if coarse_mm is not None:
        if coarse_mm.shape[0] != pred_mm.shape[0]:
            raise ValueError(
                f"coarse_mm has batch size {coarse_mm.shape[0]}, the prediction {pred_mm.shape[0]}"
            )
        m_coarse = torch.nanmean(coarse_mm.flatten(1).to(pred_mm.dtype), dim=1)  # (B,) mm/day
        rel = rel + relative_mass_error(m_pred, m_coarse, floor).abs()
    rel = torch.where(has, rel, torch.zeros_like(rel))
    return rel.sum() / has.sum().clamp(min=1).to(rel.dtype)


def bernoulli_gamma_nll(law: BernoulliGamma, target_mm: torch.Tensor, valid: torch.Tensor,
                        wet_threshold: float = 0.1) -> torch.Tensor:
    """Negative log-likelihood (nats per pixel) of ``target_mm`` under a per-pixel Bernoulli-gamma law.

    A pixel with ``pr < wet_threshold`` (to float32 round-off) is dry: ``-log(1 - p)``; a wet one:
    ``-log(p) - log Gamma(pr; shape, scale)``.

    Parameters
    ----------
    law : BernoulliGamma
        ``p``, ``shape``, ``scale`` (B, 1, H, W); shape and scale in mm/day.
    target_mm : Tensor (B, 1, H, W)
        Truth in mm/day (invalid pixels are ignored, even NaN).
    valid : Tensor (B, 1, H, W), bool
    wet_threshold : float
        mm/day.

    Returns
    -------
    Tensor ()
        Mean over each sample's valid pixels, then over the samples that have any.
    """
    valid = valid.bool()
    y = torch.where(valid, target_mm, torch.zeros_like(target_mm))
    # a relative tolerance: a truth of exactly the threshold may come back a rounding below it from model space
    wet = valid & (y >= float(wet_threshold) * (1.0 - 1e-4))
    y_wet = torch.where(wet, y, torch.ones_like(y))  # a harmless value where the density is not used
    p = law.p.clamp(1e-6, 1 - 1e-6)
    k, theta = law.shape, law.scale
    log_gamma = (k - 1) * torch.log(y_wet) - y_wet / theta - torch.lgamma(k) - k * torch.log(theta)
    nll = torch.where(wet, -torch.log(p) - log_gamma, -torch.log1p(-p))
    return _masked_mean(nll, valid)


def energy_score(members: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fair energy score per sample (Gneiting and Raftery 2007), distances over ``mask``.

    ``ES = 1/M sum_i ||x_i - y|| - 1/(2 M (M - 1)) sum_{i != j} ||x_i - x_j||`` with
    ``||v|| = sqrt(sum_mask v**2 / n_mask)`` (an RMS distance, so the score is on the scale
    of the per-pixel terms whatever the grid size).

    Parameters
    ----------
    members : Tensor (M, B, ...)
        M >= 2.
    target : Tensor (B, ...)
    mask : Tensor (B, ...), bool
        Points to compare; others (even NaN) change neither the value nor the gradient.

    Returns
    -------
    Tensor (B,)
        0 for a sample without any masked point.
    """
    m = members.shape[0]
    if m < 2:
        raise ValueError(f"energy_score needs at least 2 members, got {m}")
    if tuple(members.shape[1:]) != tuple(target.shape) or tuple(mask.shape) != tuple(target.shape):
        raise ValueError(f"members {tuple(members.shape)} must be (M,) + target shape {tuple(target.shape)}, "
                         f"mask {tuple(mask.shape)} the target's")
    mask = mask.bool()
    n = mask.flatten(1).sum(dim=1).clamp(min=1).to(members.dtype)  # (B,)
    zero = torch.zeros_like(target)
    t = torch.where(mask, target, zero)
    x = torch.where(mask.unsqueeze(0), members, zero.unsqueeze(0))

    def dist(a, b):  # RMS distance over the mask, (..., B); a tiny floor keeps sqrt's gradient finite at 0
        return torch.sqrt((a - b).pow(2).flatten(-mask.ndim + 1).sum(dim=-1) / n + 1e-12)

    skill = dist(x, t.unsqueeze(0)).mean(dim=0)  # (B,)
    spread = torch.zeros_like(skill)
    for i in range(m - 1):
        spread = spread + dist(x[i + 1:], x[i].unsqueeze(0)).sum(dim=0)  # sum over j > i
    return skill - spread / (m * (m - 1))  # (2 / (2 M (M - 1))) * sum_{i<j}


def masked_energy_score(members: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`energy_score` of (M, B, 1, H, W) members over each sample's valid pixels, averaged over the samples
    that have any."""
    valid = valid.bool()
    es = energy_score(members, target, valid)  # (B,)
    has = valid.flatten(1).any(dim=1)
    es = torch.where(has, es, torch.zeros_like(es))
    return es.sum() / has.sum().clamp(min=1).to(es.dtype)


def block_means(values: torch.Tensor, valid: torch.Tensor, size: int,
                min_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Means over the valid cells of non-overlapping ``size`` x ``size`` blocks.

    Parameters
    ----------
    values : Tensor (..., B, 1, H, W)
        Any leading dimensions (members) before the batch.
    valid : Tensor (B, 1, H, W), bool
        Invalid cells (even NaN) change neither the means nor their gradient.
    size : int
        Block side in cells, from the top-left corner (the last row and column of blocks may be
        partial); 0: one block, the whole field.
    min_fraction : float
        A block counts when at least this fraction of its cells (of the cells inside the field) is valid.  The
        whole field (``size`` 0) counts whenever it has a valid cell: its valid cells are the domain (a land mask
        on a padded grid may cover less than half of it).

    Returns
    -------
    means : Tensor (..., B, 1, h, w)
        ``h = ceil(H / size)`` (1 for ``size`` 0); 0 where a block has no valid cell.
    counted : Tensor (B, 1, h, w), bool
    """
    valid = valid.bool()
    lead = values.shape[:-4]
    b, c, hh, ww = valid.shape
    v = torch.where(valid, values, torch.zeros_like(values)).reshape(-1, c, hh, ww)
    w = valid.to(v.dtype)
    if size == 0:
        total = v.sum(dim=(-2, -1), keepdim=True)
        n = w.sum(dim=(-2, -1), keepdim=True)
        cells = torch.zeros_like(n)  # no fraction: any valid cell makes the domain
    else:
        pool = lambda a: torch.nn.functional.avg_pool2d(a, size, stride=size, ceil_mode=True,  # noqa: E731
                                                        count_include_pad=False, divisor_override=1)
        total, n, cells = pool(v), pool(w), pool(torch.ones_like(w))
    reps = v.shape[0] // b
    means = total / n.repeat(reps, 1, 1, 1).clamp(min=1.0)
    counted = (n > 0) & (n >= float(min_fraction) * cells)
    return means.reshape(*lead, b, c, *means.shape[-2:]), counted


def pooled_afcrps(members: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, sizes: tuple[int, ...],
                  alpha: float = 0.95, min_fraction: float = 0.5) -> torch.Tensor:
    """afCRPS of block means (:func:`block_means`), averaged over the blocks of each sample that count, then
    over the samples with any, then over ``sizes``.

    members (M, B, 1, H, W), target and valid (B, 1, H, W).
    """
    if not sizes:
        raise ValueError("pooled_afcrps needs at least one block size")
    terms = []
    for size in sizes:
        pm, counted = block_means(members, valid, int(size), min_fraction)
        pt, _ = block_means(target, valid, int(size), min_fraction)
        terms.append(masked_afcrps(pm, pt, counted, alpha))
    return torch.stack(terms).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared error over each sample's valid pixels, then over the samples with any (invalid pixels, even NaN,
    change neither the value nor the gradient)."""
    valid = valid.bool()
    diff = torch.where(valid, pred - target, torch.zeros_like(pred))
    return _masked_mean(diff * diff, valid)


def ensemble_mean_error(members: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`masked_mse` of the members' mean (M, B, 1, H, W) against ``target``."""
    return masked_mse(members.mean(dim=0), target, valid)


def beta_schedule(epoch: int, beta_kl: float, warmup_epochs: int) -> float:
    """KL weight at a 0-based ``epoch``: linear from 0 (epoch 0) to ``beta_kl`` (epoch ``warmup_epochs``), constant after.

    ``warmup_epochs = 0`` gives ``beta_kl`` from the start.
    """
    if warmup_epochs <= 0:
        return float(beta_kl)
    return float(beta_kl) * min(max(epoch, 0) / warmup_epochs, 1.0)


def warmup_finished(epoch: int, warmup_epochs: int) -> bool:
    """True once ``beta`` has reached ``beta_kl`` (``epoch >= warmup_epochs``)."""
    return epoch >= warmup_epochs


def _cap_straight_through(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(x, cap)`` in value, identity in gradient."""
    return x - (x - cap).clamp(min=0).detach()


def compute_loss(
    out: CVAEOutput,
    x: torch.Tensor,
    valid: torch.Tensor,
    extreme: torch.Tensor,
    cfg: LossConfig,
    epoch: int,
    transform: TargetTransform,
    coarse_mm: torch.Tensor | None = None,
    tail_x: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The full training loss and its parts.

    Parameters
    ----------
    out : CVAEOutput
        Model output; ``out.recon`` (B, 1, H, W) in model space; ``out.prior_samples``
        (M, B, 1, H, W) when ``cfg.lambda_crps`` or ``cfg.lambda_tail`` is on.
    x : Tensor (B, 1, H, W)
        Truth in model space.
    valid, extreme : Tensor (B, 1, H, W), bool
        Valid pixels; pixels above the per-pixel heavy-rain threshold (intersected
        with ``valid`` here).
    cfg : LossConfig
        Weights, warm-up and the space of the MAE terms (``'transformed'``: model
        space; ``'mm'``: both sides mapped to mm/day with ``transform.inverse``).
    epoch : int
        0-based epoch, for the KL warm-up.
    transform : TargetTransform
        Model space <-> mm/day; the mass term is always in mm/day.
    coarse_mm : Tensor (B, h, w), optional
        Coarse precipitation (mm/day) for the mass term.
    tail_x : Tensor (1 or B, 1, H, W), optional
        The local tail threshold ``t`` (model space) of the twCRPS term; needed when
        ``cfg.lambda_tail > 0``.

    Returns
    -------
    dict of str to Tensor ()
        ``total``, ``rec`` (the ``reconstruction`` term), ``mean`` (residual mode: the squared
        error of the conditional mean ``out.mean``, else 0), ``mae_all`` (MAE of ``out.recon``,
        the decoding of the posterior draw, or its law's mean), ``mae_ext``, ``kl`` (nats,
        summed over latent units), ``kl_term`` (what beta multiplies), ``mass``, ``crps``,
        ``tail``, ``energy``, ``pooled``, ``beta``, with ``total = lambda_base * rec + lambda_ext * mae_ext
        + beta * kl_term + lambda_mass * mass + lambda_crps * crps + lambda_tail * tail +
        lambda_energy * energy + lambda_pooled * pooled + lambda_mean * mean`` (``rec`` is ``mae_all`` for
        ``reconstruction='l1'``).
    """
    recon = out.recon
    valid = valid.bool()
    extreme = extreme.bool() & valid
    cap = float(transform.forward(torch.tensor(MM_CAP, dtype=torch.float64)))
    recon_mm = transform.inverse(_cap_straight_through(recon, cap))  # (B, 1, H, W) mm/day
    x_mm = transform.inverse(x)  # (B, 1, H, W) mm/day
    if cfg.space == "mm":
        pred, target = recon_mm, x_mm
    else:
        pred, target = recon, x
    mae_all = masked_mae(pred, target, valid)
    mae_ext = extreme_mae(pred, target, extreme)
    kl = kl_divergence(out.mu_q, out.logvar_q, out.mu_p, out.logvar_p)
    klt = kl_term(out.mu_q, out.logvar_q, out.mu_p, out.logvar_p, valid, cfg.free_bits, cfg.kl_per_pixel)
    mass = mass_loss(recon_mm, x_mm, valid, coarse_mm)
    beta = torch.tensor(beta_schedule(epoch, cfg.beta_kl, cfg.warmup_epochs), dtype=recon.dtype, device=recon.device)
    zero = recon.sum() * 0.0
    crps, tail, energy, pooled = zero, zero, zero, zero
    ens = out.prior_samples
    if cfg.uses_ensemble and (ens is None or ens.shape[0] < 2):
        raise ValueError("the ensemble loss terms need >= 2 prior samples (model(..., n_prior=M))")
    if cfg.reconstruction == "bernoulli_gamma":
        if out.recon_law is None:
            raise ValueError("train.loss.reconstruction 'bernoulli_gamma' needs a model with output 'bernoulli_gamma'")
        rec = bernoulli_gamma_nll(out.recon_law, x_mm, valid, cfg.wet_threshold_mm)
    elif cfg.reconstruction == "ensemble_mean":
        rec = ensemble_mean_error(ens, x, valid)
    else:
        rec = mae_all
    if cfg.lambda_energy > 0:
        energy = masked_energy_score(ens, x, valid)
    if cfg.lambda_pooled > 0:
        ens_mm = transform.inverse(_cap_straight_through(ens, cap))
        pooled = pooled_afcrps(ens_mm, x_mm, valid, tuple(cfg.pooled_sizes), cfg.crps_alpha)
    # model.residual: the conditional mean's own (proper) loss
    mean_err = zero if out.mean is None else masked_mse(out.mean, x, valid)
    if cfg.lambda_crps > 0 or cfg.lambda_tail > 0:
        if cfg.lambda_crps > 0:
            if cfg.crps_space in ("transformed", "both"):
                crps = crps + masked_afcrps(ens, x, valid, cfg.crps_alpha)
            if cfg.crps_space in ("mm", "both"):
                ens_mm = transform.inverse(_cap_straight_through(ens, cap))
                crps = crps + masked_afcrps(ens_mm, x_mm, valid, cfg.crps_alpha)
        if cfg.lambda_tail > 0:
            if tail_x is None:
                raise ValueError("train.loss.lambda_tail > 0 needs the tail threshold map (tail_x)")
            tail = tail_crps(ens, x, valid, tail_x, cfg.crps_alpha)
    total = (cfg.lambda_base * rec + cfg.lambda_ext * mae_ext + beta * klt + cfg.lambda_mass * mass
             + cfg.lambda_crps * crps + cfg.lambda_tail * tail + cfg.lambda_energy * energy
             + cfg.lambda_pooled * pooled + cfg.lambda_mean * mean_err)
    return {"total": total, "rec": rec, "mae_all": mae_all, "mae_ext": mae_ext, "kl": kl, "kl_term": klt,
            "mass": mass, "crps": crps, "tail": tail, "energy": energy, "pooled": pooled, "mean": mean_err,
            "beta": beta}
