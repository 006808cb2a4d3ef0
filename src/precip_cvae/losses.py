"""Training loss of the cVAE.

``L = lambda_base * MAE_all + lambda_ext * MAE_ext + beta(epoch) * KL + lambda_mass * L_mass``

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
from .model import CVAEOutput
from .transform import TargetTransform

__all__ = [
    "masked_mae",
    "extreme_mae",
    "kl_divergence",
    "mass_loss",
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
    mu_q, logvar_q, mu_p, logvar_p : Tensor (B, d_z)

    Returns
    -------
    Tensor ()
        Summed over the latent dimensions, averaged over the batch.
    """
    kl = 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0
    )  # (B, d_z)
    return kl.sum(dim=1).mean()


def mass_loss(
    pred_mm: torch.Tensor,
    target_mm: torch.Tensor,
    valid: torch.Tensor,
    coarse_mm: torch.Tensor | None = None,
    floor: float = 0.1,
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
    rel = (m_pred - m_true).abs() / m_true.clamp(min=floor)  # (B,)
    if coarse_mm is not None:
        if coarse_mm.shape[0] != pred_mm.shape[0]:
            raise ValueError(
                f"coarse_mm has batch size {coarse_mm.shape[0]}, the prediction {pred_mm.shape[0]}"
            )
        m_coarse = torch.nanmean(coarse_mm.flatten(1).to(pred_mm.dtype), dim=1)  # (B,) mm/day
        rel = rel + (m_pred - m_coarse).abs() / m_coarse.clamp(min=floor)
    rel = torch.where(has, rel, torch.zeros_like(rel))
    return rel.sum() / has.sum().clamp(min=1).to(rel.dtype)


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
) -> dict[str, torch.Tensor]:
    """The full training loss and its parts.

    Parameters
    ----------
    out : CVAEOutput
        Model output; ``out.recon`` (B, 1, H, W) in model space.
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

    Returns
    -------
    dict of str to Tensor ()
        ``total``, ``mae_all``, ``mae_ext``, ``kl``, ``mass``, ``beta``, with
        ``total = lambda_base * mae_all + lambda_ext * mae_ext + beta * kl +
        lambda_mass * mass``.
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
    mass = mass_loss(recon_mm, x_mm, valid, coarse_mm)
    beta = torch.tensor(beta_schedule(epoch, cfg.beta_kl, cfg.warmup_epochs), dtype=recon.dtype, device=recon.device)
    total = cfg.lambda_base * mae_all + cfg.lambda_ext * mae_ext + beta * kl + cfg.lambda_mass * mass
    return {"total": total, "mae_all": mae_all, "mae_ext": mae_ext, "kl": kl, "mass": mass, "beta": beta}
