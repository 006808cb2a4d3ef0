"""Loss terms against values computed by hand; each past failure has a test."""

from __future__ import annotations

import math
import numpy as np

import pytest
import torch

from precip_cvae.config import LossConfig
from precip_cvae.losses import (
    afcrps,
    kl_term,
    masked_afcrps,
    tail_crps,
    MM_CAP,
    beta_schedule,
    compute_loss,
    extreme_mae,
    kl_divergence,
    mass_loss,
    masked_mae,
    warmup_finished,
)
from precip_cvae.model import CVAEOutput
from precip_cvae.transform import TargetTransform


def _t(rows, dtype=torch.float32):
    """(H, W) nested list -> (1, 1, H, W) tensor."""
    return torch.tensor(rows, dtype=dtype)[None, None]


# ----------------------------------------------------------------------------- masked MAE


def test_masked_mae_hand_values():
    pred = torch.cat([_t([[1.0, 2.0], [3.0, 4.0]]), _t([[0.0, 0.0], [0.0, 0.0]])])
    target = torch.cat([_t([[1.0, 0.0], [0.0, 100.0]]), _t([[1.0, 1.0], [1.0, 5.0]])])
    valid = torch.cat(
        [_t([[True, True], [True, False]], torch.bool), _t([[True, True], [True, True]], torch.bool)]
    )
    # sample 0: |0| + |2| + |3| over 3 valid pixels = 5/3 (the 100 is masked out)
    # sample 1: (1 + 1 + 1 + 5) / 4 = 2
    assert masked_mae(pred, target, valid).item() == pytest.approx((5 / 3 + 2) / 2)


def test_masked_mae_skips_samples_without_valid_pixels_and_ignores_nan_outside():
    pred = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.tensor([[[[2.0, 2.0], [2.0, float("nan")]]], [[[9.0, 9.0], [9.0, 9.0]]]])
    valid = torch.tensor([[[[True, True], [True, False]]], [[[False, False], [False, False]]]])
    loss = masked_mae(pred, target, valid)
    assert loss.item() == pytest.approx(2.0)  # not 1.0: the empty sample is not averaged in
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 0, 1, 1].item() == 0.0 and pred.grad[1].abs().sum().item() == 0.0


# ----------------------------------------------------------------------------- extreme MAE


def test_extreme_gradient_is_not_diluted_by_the_fraction_of_extreme_samples():
    # 10 samples, only sample 3 has extreme pixels (6 of them)
    B, H, W, lam = 10, 4, 4, 5.0
    target = torch.zeros(B, 1, H, W)
    extreme = torch.zeros(B, 1, H, W, dtype=torch.bool)
    extreme[3, 0, :2, :3] = True
    n_ext = int(extreme.sum())
    target[extreme] = 10.0
    pred = torch.full((B, 1, H, W), 4.0, requires_grad=True)
    loss = lam * extreme_mae(pred, target, extreme)
    assert loss.item() == pytest.approx(lam * 6.0)
    loss.backward()
    g = pred.grad[extreme]
    # d/dpred of lam * mean_i |pred_i - 10| over the sample's 6 extreme pixels = -lam / 6;
    # the buggy version (times 1/10 samples) gave -lam / 60
    assert torch.allclose(g, torch.full_like(g, -lam / n_ext))
    assert pred.grad[~extreme].abs().sum().item() == 0.0


def test_extreme_samples_weigh_the_same_whatever_their_pixel_count():
    H = W = 10
    target = torch.zeros(2, 1, H, W)
    extreme = torch.zeros(2, 1, H, W, dtype=torch.bool)
    extreme[0, 0, 0, 0] = True  # 1 extreme pixel
    extreme[1] = True  # 100 extreme pixels
    target[extreme] = 20.0
    pred = target.clone()
    pred[extreme] += 1.0
    assert extreme_mae(pred, target, extreme).item() == pytest.approx(1.0)
    pred = target.clone()
    pred[0][extreme[0]] += 2.0
    pred[1][extreme[1]] -= 4.0
    # (2 + 4) / 2 = 3; a pixel-weighted mean would give (2 + 400) / 101 ~ 3.98
    assert extreme_mae(pred, target, extreme).item() == pytest.approx(3.0)


def test_extreme_mae_without_extreme_pixels_is_zero_with_finite_gradient():
    pred = torch.rand(4, 1, 3, 3, requires_grad=True)
    target = torch.rand(4, 1, 3, 3)
    extreme = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    loss = extreme_mae(pred, target, extreme)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum().item() == 0.0


# ----------------------------------------------------------------------------- KL


def test_kl_of_identical_gaussians_is_zero():
    mu = torch.randn(5, 7)
    logvar = torch.randn(5, 7)
    assert kl_divergence(mu, logvar, mu, logvar).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("d_z", [1, 4])
def test_kl_of_shifted_unit_gaussian(d_z):
    # KL(N(1, 1) || N(0, 1)) = 0.5 per dimension, summed over dims, mean over batch
    mu_q = torch.ones(3, d_z)
    zeros = torch.zeros(3, d_z)
    assert kl_divergence(mu_q, zeros, zeros, zeros).item() == pytest.approx(0.5 * d_z)


def test_kl_with_different_variances_hand_value():
    # KL(N(0, e^2) || N(0, 1)) = 0.5 * (0 - 2 + e^2 - 1)
    mu = torch.zeros(2, 1)
    kl = kl_divergence(mu, torch.full((2, 1), 2.0), mu, torch.zeros(2, 1))
    assert kl.item() == pytest.approx(0.5 * (math.exp(2.0) - 3.0), rel=1e-6)


# ----------------------------------------------------------------------------- mass


def test_mass_loss_zero_when_totals_match():
    target = _t([[0.0, 4.0], [2.0, 2.0]])
    pred = _t([[2.0, 2.0], [2.0, 2.0]])  # different field, same area mean (2 mm/day)
    valid = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert mass_loss(pred, target, valid).item() == pytest.approx(0.0)


def test_mass_loss_hand_values():
    valid = torch.tensor([[[[True, True], [True, False]]], [[[True, True], [True, True]]]])
    target = torch.tensor([[[[1.0, 2.0], [3.0, 50.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    pred = torch.tensor([[[[3.0, 3.0], [3.0, 0.0]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    # sample 0: mean_true = 2 (the 50 is invalid), mean_pred = 3 -> |3 - 2| / 2 = 0.5
    # sample 1: mean_true = 0 -> floor 0.1; mean_pred = 0.1 -> 0.1 / 0.1 = 1
    assert mass_loss(pred, target, valid).item() == pytest.approx(0.75)
    coarse = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]])  # (B, h, w), domain means 2 and 0
    # sample 0 adds |3 - 2| / 2 = 0.5, sample 1 adds |0.1 - 0| / 0.1 = 1
    assert mass_loss(pred, target, valid, coarse_mm=coarse).item() == pytest.approx((1.0 + 2.0) / 2)


# ----------------------------------------------------------------------------- beta


def test_beta_schedule_warmup_15():
    beta = 0.03
    assert beta_schedule(0, beta, 15) == 0.0
    assert beta_schedule(5, beta, 15) == pytest.approx(beta / 3)
    assert beta_schedule(15, beta, 15) == pytest.approx(beta)
    assert beta_schedule(20, beta, 15) == pytest.approx(beta)
    assert not warmup_finished(14, 15)
    assert warmup_finished(15, 15) and warmup_finished(20, 15)


def test_beta_schedule_without_warmup():
    assert beta_schedule(0, 0.01, 0) == pytest.approx(0.01)
    assert beta_schedule(7, 0.01, 0) == pytest.approx(0.01)
    assert warmup_finished(0, 0)


# ----------------------------------------------------------------------------- compute_loss


def _fake_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, W, d_z = 4, 6, 6, 3
    x = torch.rand(B, 1, H, W, generator=g) * 2
    valid = torch.rand(B, 1, H, W, generator=g) > 0.2
    x = x * valid
    extreme = (x > 1.6) & valid
    recon = (torch.rand(B, 1, H, W, generator=g) * 2 * valid).requires_grad_()
    out = CVAEOutput(
        recon,
        torch.randn(B, d_z, generator=g),
        torch.randn(B, d_z, generator=g) * 0.1,
        torch.randn(B, d_z, generator=g),
        torch.zeros(B, d_z),
    )
    coarse = torch.rand(B, 2, 3, generator=g) * 5
    return out, x, valid, extreme, coarse


@pytest.mark.parametrize("space", ["transformed", "mm"])
def test_compute_loss_total_is_the_weighted_sum(space):
    out, x, valid, extreme, coarse = _fake_batch()
    cfg = LossConfig(preset="seed", lambda_base=1.5, lambda_ext=5.0, beta_kl=0.3, lambda_mass=0.2, warmup_epochs=15,
                     space=space)
    tf = TargetTransform("log1p", 0.8)
    parts = compute_loss(out, x, valid, extreme, cfg, epoch=5, transform=tf, coarse_mm=coarse)
    assert set(parts) == {"total", "rec", "mae_all", "mae_ext", "kl", "kl_term", "mass", "crps", "tail", "energy", "pooled", "mean", "beta"}
    assert parts["kl_term"].item() == parts["kl"].item() and parts["crps"].item() == parts["tail"].item() == 0
    assert parts["beta"].item() == pytest.approx(0.1)
    expected = (
        1.5 * parts["mae_all"] + 5.0 * parts["mae_ext"] + 0.1 * parts["kl"] + 0.2 * parts["mass"]
    )
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(parts[k].item() > 0 for k in ("mae_all", "mae_ext", "kl", "mass"))
    # the parts are the documented functions, in the documented spaces
    if space == "mm":
        pred, target = tf.inverse(out.recon), tf.inverse(x)
    else:
        pred, target = out.recon, x
    assert parts["mae_all"].item() == pytest.approx(masked_mae(pred, target, valid).item(), rel=1e-6)
    assert parts["mae_ext"].item() == pytest.approx(extreme_mae(pred, target, extreme).item(), rel=1e-6)
    mass = mass_loss(tf.inverse(out.recon), tf.inverse(x), valid, coarse)
    assert parts["mass"].item() == pytest.approx(mass.item(), rel=1e-6)
    parts["total"].backward()
    assert torch.isfinite(out.recon.grad).all()


def test_compute_loss_spaces_differ_and_mass_is_in_mm():
    out, x, valid, extreme, _ = _fake_batch(1)
    tf = TargetTransform("log1p", 1.0)
    a = compute_loss(out, x, valid, extreme, LossConfig(preset="seed", space="transformed"), 20, tf)
    b = compute_loss(out, x, valid, extreme, LossConfig(preset="seed", space="mm"), 20, tf)
    assert a["mae_all"].item() != pytest.approx(b["mae_all"].item(), rel=1e-3)
    assert a["mass"].item() == pytest.approx(b["mass"].item())
    assert a["beta"].item() == pytest.approx(0.01)


def test_compute_loss_stays_finite_for_a_huge_untrained_output():
    out, x, valid, extreme, _ = _fake_batch(2)
    recon = torch.full_like(out.recon, 500.0).requires_grad_()  # expm1(500) overflows float32
    out = out._replace(recon=recon)
    tf = TargetTransform("log1p", 1.0)
    parts = compute_loss(out, x, valid, extreme, LossConfig(preset="seed", space="mm"), 20, tf)
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["mae_all"].item() == pytest.approx(MM_CAP, rel=1e-3)
    parts["total"].backward()
    g = recon.grad[valid]
    assert torch.isfinite(g).all() and (g > 0).all()  # still pushed down


# ----------------------------------------------------------------------------- ensemble terms


def test_afcrps_equals_a_hand_computation_on_three_members():
    # one point, members 1, 2, 4, truth 3; M = 3, alpha 0.95 -> eps = 0.05 / 3
    members = torch.tensor([1.0, 2.0, 4.0]).view(3, 1)
    y = torch.tensor([3.0])
    skill = (2 + 1 + 1) / 3  # mean |x_i - y|
    pairs = 2 * (1 + 3 + 2)  # sum over i != j of |x_i - x_j|
    eps = 0.05 / 3
    expected = skill - (1 - eps) / (2 * 3 * 2) * pairs
    assert afcrps(members, y, alpha=0.95).item() == pytest.approx(expected, rel=1e-6)
    # alpha 0: the plain ensemble CRPS, mean |x - y| - 1/(2 M^2) sum |x_i - x_j|
    assert afcrps(members, y, alpha=0.0).item() == pytest.approx(skill - pairs / 18, rel=1e-6)


def test_afcrps_at_alpha_one_is_scoringrules_fair_crps():
    scoringrules = pytest.importorskip("scoringrules")
    g = torch.Generator().manual_seed(0)
    members = torch.rand(5, 3, 4, generator=g, dtype=torch.float64) * 3
    y = torch.rand(3, 4, generator=g, dtype=torch.float64) * 3
    ours = afcrps(members, y, alpha=1.0).numpy()
    ref = scoringrules.crps_ensemble(y.numpy(), np.moveaxis(members.numpy(), 0, -1), estimator="fair")
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_afcrps_gradient_reaches_every_member():
    g = torch.Generator().manual_seed(1)
    members = (torch.rand(4, 2, 1, 3, 3, generator=g)).requires_grad_()
    y = torch.rand(2, 1, 3, 3, generator=g)
    valid = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    valid[0, 0, 0, 0] = False
    masked_afcrps(members, y, valid).backward()
    per_member = members.grad.abs().flatten(1).sum(dim=1)
    assert (per_member > 0).all()
    assert (members.grad[:, 0, 0, 0, 0] == 0).all()  # an invalid pixel gets no gradient


def test_masked_afcrps_ignores_nan_outside_the_mask_and_weighs_samples_equally():
    members = torch.zeros(2, 2, 1, 1, 4)
    y = torch.zeros(2, 1, 1, 4)
    y[0, ..., 0] = 4.0  # sample 0: one pixel off by 4 (CRPS 4 at alpha 1), over 1 valid pixel
    y[1, ..., 1:] = float("nan")
    valid = torch.tensor([[True, False, False, False], [True, False, False, False]]).view(2, 1, 1, 4)
    y[1, ..., 0] = 2.0  # sample 1: off by 2 at its only valid pixel
    out = masked_afcrps(members, y, valid, alpha=1.0)
    assert out.item() == pytest.approx((4.0 + 2.0) / 2)


def test_tail_term_is_zero_below_the_threshold_and_positive_above():
    t = torch.full((1, 1, 2, 2), 1.0)
    valid = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    members = torch.rand(3, 1, 1, 2, 2) * 0.9  # all below t = 1
    y = torch.rand(1, 1, 2, 2) * 0.9
    members.requires_grad_()
    below = tail_crps(members, y, valid, t)
    assert below.item() == 0.0
    below.backward()
    assert (members.grad == 0).all()
    y_high = y.clone()
    y_high[0, 0, 0, 0] = 3.0  # the truth exceeds t at one pixel: members below t miss it by 2
    above = tail_crps(members.detach(), y_high, valid, t, alpha=1.0)
    assert above.item() == pytest.approx(2.0 / 4, rel=1e-6)  # one pixel of four
    # no threshold (inf) at a pixel: that pixel is left out
    t_inf = t.clone()
    t_inf[0, 0, 0, 0] = float("inf")
    assert tail_crps(members.detach(), y_high, valid, t_inf).item() == 0.0


def test_free_bits_clamp_each_unit_and_kl_per_pixel_divides_by_valid_pixels():
    # 2 samples, 3 units; p = N(0, 1), q = N(mu, 1): KL per unit = mu^2 / 2
    mu_q = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 0.0]], requires_grad=True)
    zeros = torch.zeros(2, 3)
    # batch means per unit: 0, 0.5, 1.0 nats
    plain = kl_term(mu_q, zeros, zeros, zeros)
    assert plain.item() == pytest.approx(1.5)
    assert plain.item() == pytest.approx(kl_divergence(mu_q, zeros, zeros, zeros).item())
    clamped = kl_term(mu_q, zeros, zeros, zeros, free_bits=0.75)
    assert clamped.item() == pytest.approx(0.75 + 0.75 + 1.0)
    clamped.backward()
    # units under the floor feel no pull; the unit above it does (d/dmu of mean mu^2/2 = mu / 2)
    assert mu_q.grad[:, :2].abs().sum().item() == 0.0
    assert mu_q.grad[:, 2].tolist() == pytest.approx([1.0, 0.0])
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    valid[0, :, :2] = True  # 8 valid pixels
    valid[1, :, :3] = True  # 12 valid pixels: mean 10
    per_pixel = kl_term(mu_q.detach(), zeros, zeros, zeros, valid, per_pixel=True)
    assert per_pixel.item() == pytest.approx(1.5 / 10)
    with pytest.raises(ValueError, match="valid"):
        kl_term(mu_q, zeros, zeros, zeros, per_pixel=True)


def test_kl_of_a_map_latent_sums_over_every_location():
    mu_q = torch.ones(2, 3, 2, 2)
    zeros = torch.zeros(2, 3, 2, 2)
    assert kl_divergence(mu_q, zeros, zeros, zeros).item() == pytest.approx(12 * 0.5)


def test_compute_loss_adds_the_ensemble_terms_with_their_weights():
    out, x, valid, extreme, coarse = _fake_batch(3)
    g = torch.Generator().manual_seed(3)
    ens = (torch.rand(4, *out.recon.shape, generator=g) * 2 * valid).requires_grad_()
    out = out._replace(prior_samples=ens)
    tf = TargetTransform("log1p", 0.8)
    tail_x = torch.full((1, 1, *x.shape[-2:]), 0.5)
    cfg = LossConfig(lambda_crps=2.0, lambda_tail=3.0, crps_space="both", beta_kl=0.2, warmup_epochs=0)
    parts = compute_loss(out, x, valid, extreme, cfg, epoch=0, transform=tf, coarse_mm=coarse, tail_x=tail_x)
    crps = masked_afcrps(ens, x, valid) + masked_afcrps(tf.inverse(ens), tf.inverse(x), valid)
    assert parts["crps"].item() == pytest.approx(crps.item(), rel=1e-5)
    assert parts["tail"].item() == pytest.approx(tail_crps(ens, x, valid, tail_x).item(), rel=1e-6)
    expected = (parts["mae_all"] + 0.2 * parts["kl_term"] + 0.01 * parts["mass"] + 2.0 * parts["crps"]
                + 3.0 * parts["tail"])
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    parts["total"].backward()
    assert (ens.grad.abs().flatten(1).sum(dim=1) > 0).all()
    with pytest.raises(ValueError, match="prior samples"):
        compute_loss(out._replace(prior_samples=None), x, valid, extreme, cfg, 0, tf, tail_x=tail_x)
    with pytest.raises(ValueError, match="tail threshold"):
        compute_loss(out, x, valid, extreme, cfg, 0, tf)


# ----------------------------------------------------------------------------- issue 28: reconstruction options, energy


def test_bernoulli_gamma_nll_equals_scipy_on_a_hand_example():
    from scipy import stats

    from precip_cvae.losses import bernoulli_gamma_nll
    from precip_cvae.model import BernoulliGamma

    # 2 x 2 pixels: dry (0.0), below the wet threshold (0.05: dry), wet 0.1 (exactly the threshold) and 12.5
    p = _t([[0.3, 0.6], [0.8, 0.9]], torch.float64)
    k = _t([[0.7, 1.0], [0.5, 2.5]], torch.float64)
    theta = _t([[4.0, 2.0], [8.0, 6.0]], torch.float64)
    y = _t([[0.0, 0.05], [0.1, 12.5]], torch.float64)
    valid = torch.ones_like(y, dtype=torch.bool)
    got = bernoulli_gamma_nll(BernoulliGamma(p, k, theta), y, valid, wet_threshold=0.1)
    want = -np.mean([
        stats.bernoulli.logpmf(0, 0.3),
        stats.bernoulli.logpmf(0, 0.6),
        stats.bernoulli.logpmf(1, 0.8) + stats.gamma.logpdf(0.1, a=0.5, scale=8.0),
        stats.bernoulli.logpmf(1, 0.9) + stats.gamma.logpdf(12.5, a=2.5, scale=6.0),
    ])
    assert float(got) == pytest.approx(want, rel=1e-10)
    # an invalid pixel (even NaN) is left out: the mean over the other three
    valid2 = valid.clone()
    valid2[0, 0, 1, 1] = False
    y2 = y.clone()
    y2[0, 0, 1, 1] = float("nan")
    got2 = bernoulli_gamma_nll(BernoulliGamma(p, k, theta), y2, valid2, wet_threshold=0.1)
    want2 = -np.mean([stats.bernoulli.logpmf(0, 0.3), stats.bernoulli.logpmf(0, 0.6),
                      stats.bernoulli.logpmf(1, 0.8) + stats.gamma.logpdf(0.1, a=0.5, scale=8.0)])
    assert float(got2) == pytest.approx(want2, rel=1e-10)


def test_bernoulli_gamma_draws_reproduce_wet_fraction_and_mean():
    from precip_cvae.model import BernoulliGamma, bernoulli_gamma_draw

    n = 200_000
    law = BernoulliGamma(torch.full((n, 1, 1, 1), 0.35), torch.full((n, 1, 1, 1), 0.8),
                         torch.full((n, 1, 1, 1), 9.0))
    draw = bernoulli_gamma_draw(law, torch.Generator().manual_seed(3))
    wet = (draw > 0).double()
    # wet fraction p = 0.35, sd sqrt(p (1 - p) / n) = 0.00107; mean p k theta = 2.52, variance of a draw
    # E[X^2] - E[X]^2 = p k (k + 1) theta^2 - (p k theta)^2 = 40.82 - 6.35 = 34.47: sd of the mean 0.0131
    assert float(wet.mean()) == pytest.approx(0.35, abs=4 * 0.00107)
    assert float(draw.double().mean()) == pytest.approx(0.35 * 0.8 * 9.0, abs=4 * 0.0131)
    assert float(draw.min()) >= 0.0
    # the same generator state gives the same draw; straight-through keeps the value and passes p's gradient
    again = bernoulli_gamma_draw(law, torch.Generator().manual_seed(3))
    assert torch.equal(draw, again)
    p = torch.full((4, 1, 1, 1), 0.5, requires_grad=True)
    k = torch.full((4, 1, 1, 1), 2.0, requires_grad=True)
    st = bernoulli_gamma_draw(BernoulliGamma(p, k, torch.full((4, 1, 1, 1), 3.0)), torch.Generator().manual_seed(1),
                              straight_through=True)
    st.sum().backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0
    assert k.grad is not None and bool(torch.isfinite(k.grad).all())


def test_energy_score_hand_computation_on_three_members():
    from precip_cvae.losses import energy_score, masked_energy_score

    # one sample, 2 valid pixels of 3 (the third is invalid and NaN): members and truth as 2-vectors
    members = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 2.0, 5.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    members = members[:, None, None, None, :]  # (3, 1, 1, 1, 3)
    y = torch.tensor([[[[1.0, 1.0, float("nan")]]]], dtype=torch.float64)
    valid = torch.tensor([[[[True, True, False]]]])
    n = 2.0
    rms = lambda a, b: math.sqrt(((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / n)  # noqa: E731
    xs = [(1.0, 0.0), (0.0, 2.0), (3.0, 1.0)]
    skill = sum(rms(x, (1.0, 1.0)) for x in xs) / 3
    pairs = rms(xs[0], xs[1]) + rms(xs[0], xs[2]) + rms(xs[1], xs[2])  # sum over i < j
    want = skill - 2 * pairs / (2 * 3 * 2)
    assert float(energy_score(members, y, valid)[0]) == pytest.approx(want, abs=1e-9)
    assert float(masked_energy_score(members, y, valid)) == pytest.approx(want, abs=1e-9)


def test_energy_score_prefers_the_true_distribution():
    from precip_cvae.losses import masked_energy_score

    g = torch.Generator().manual_seed(0)
    B, M, n = 400, 8, 16
    # correlated truth: a common shift plus pixel noise
    def draw(k, shift=0.0, scale=1.0):
        common = torch.randn(k, B, 1, 1, 1, generator=g)
        return shift + scale * (common + 0.5 * torch.randn(k, B, 1, 1, n, generator=g))

    y = draw(1)[0]
    valid = torch.ones_like(y, dtype=torch.bool)
    true = masked_energy_score(draw(M), y, valid)
    shifted = masked_energy_score(draw(M, shift=0.7), y, valid)
    wide = masked_energy_score(draw(M, scale=2.0), y, valid)
    narrow = masked_energy_score(draw(M, scale=0.3), y, valid)
    assert float(true) < float(shifted) and float(true) < float(wide) and float(true) < float(narrow)


def test_ensemble_mean_error_hand_values():
    from precip_cvae.losses import ensemble_mean_error

    members = torch.stack([_t([[1.0, 4.0]]), _t([[3.0, 0.0]])])  # mean [[2, 2]]
    y = _t([[1.0, 5.0]])
    valid = torch.tensor([[[[True, True]]]])
    assert float(ensemble_mean_error(members, y, valid)) == pytest.approx((1.0 + 9.0) / 2)
    valid[0, 0, 0, 1] = False
    assert float(ensemble_mean_error(members, y, valid)) == pytest.approx(1.0)


@pytest.mark.parametrize("reconstruction", ["l1", "bernoulli_gamma", "ensemble_mean"])
def test_compute_loss_reconstruction_options_and_energy(reconstruction):
    from precip_cvae.config import ModelConfig
    from precip_cvae.losses import bernoulli_gamma_nll, ensemble_mean_error, masked_energy_score
    from precip_cvae.model import CVAE

    torch.manual_seed(0)
    tf = TargetTransform("log1p", 0.8)
    cfg = LossConfig(reconstruction=reconstruction, lambda_energy=0.5, lambda_crps=1.0, ensemble_members=3)
    model = CVAE(ModelConfig(preset="tiny", dropout_encoder=0.0, dropout_decoder=0.0), 2, (16, 16), (4, 4),
                 output=cfg.model_output, transform=tf)
    g = torch.Generator().manual_seed(1)
    x = tf.forward(torch.relu(torch.randn(2, 1, 16, 16, generator=g) * 5))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, :, :, :3] = False
    y = torch.randn(2, 2, 4, 4, generator=g)
    out = model(x, y, valid, n_prior=cfg.n_prior)
    parts = compute_loss(out, x, valid, valid & (x > 1), cfg, epoch=10, transform=tf)
    if reconstruction == "bernoulli_gamma":
        assert out.recon_law is not None
        assert float(parts["rec"]) == pytest.approx(float(bernoulli_gamma_nll(out.recon_law, tf.inverse(x), valid, 0.1)))
    elif reconstruction == "ensemble_mean":
        assert float(parts["rec"]) == pytest.approx(float(ensemble_mean_error(out.prior_samples, x, valid)))
    else:
        assert float(parts["rec"].detach()) == float(parts["mae_all"].detach())
    assert float(parts["energy"].detach()) == pytest.approx(float(masked_energy_score(out.prior_samples, x, valid).detach()))
    want = (parts["rec"] + parts["beta"] * parts["kl_term"] + cfg.lambda_mass * parts["mass"] + parts["crps"]
            + 0.5 * parts["energy"])
    assert float(parts["total"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    parts["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


def test_residual_mode_adds_the_squared_error_of_the_conditional_mean():
    from precip_cvae.config import ModelConfig
    from precip_cvae.model import CVAE

    torch.manual_seed(3)
    tf = TargetTransform("log1p", 0.8)
    model = CVAE(ModelConfig(preset="tiny", residual=True), 2, (16, 16), (4, 4))
    g = torch.Generator().manual_seed(2)
    x = tf.forward(torch.relu(torch.randn(2, 1, 16, 16, generator=g) * 5))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, :, :8] = False
    out = model(x, torch.randn(2, 2, 4, 4, generator=g), valid, n_prior=2)
    cfg = LossConfig(lambda_mean=2.0)
    parts = compute_loss(out, x, valid, valid & (x > 1), cfg, epoch=10, transform=tf)
    m, t = out.mean.detach().numpy(), x.numpy()
    v = valid.numpy()
    want = np.mean([((m[b] - t[b]) ** 2)[v[b]].mean() for b in range(2)])
    assert float(parts["mean"].detach()) == pytest.approx(want, rel=1e-5)
    rest = (parts["rec"] + parts["beta"] * parts["kl_term"] + cfg.lambda_mass * parts["mass"] + parts["crps"])
    assert float(parts["total"].detach()) == pytest.approx(float((rest + 2.0 * parts["mean"]).detach()), rel=1e-6)


# ----------------------------------------------------------------------------- pooled afCRPS


def test_block_means_by_hand():
    from precip_cvae.losses import block_means

    v = _t([[1.0, 3.0, 5.0, 100.0, 7.0],
            [2.0, float("nan"), 6.0, 8.0, 9.0],
            [4.0, 4.0, 0.0, 0.0, 10.0]])
    valid = torch.isfinite(v)
    valid[0, 0, 0, 3] = False  # 100 is masked as well
    means, counted = block_means(v, valid, 2)
    # blocks (rows 0-1 | 2) x (cols 0-1 | 2-3 | 4): partial blocks hold the cells inside the field
    assert means.shape == (1, 1, 2, 3)
    want = [[(1 + 3 + 2) / 3, (5 + 6 + 8) / 3, (7 + 9) / 2],
            [(4 + 4) / 2, 0.0, 10.0]]
    np.testing.assert_allclose(means[0, 0].numpy(), want, rtol=1e-6)
    # a block counts with half of its (in-field) cells valid: all of these have at least 3 of 4, 2 of 2, 1 of 1
    assert counted[0, 0].tolist() == [[True, True, True], [True, True, True]]
    valid[0, 0, 2, 4] = False
    valid[0, 0, 2, 2] = False
    means, counted = block_means(v, valid, 2)
    assert counted[0, 0].tolist() == [[True, True, True], [True, True, False]]
    assert float(means[0, 0, 1, 1]) == 0.0  # (0 + masked) / 1
    whole, counted = block_means(v, valid, 0)
    kept = v[valid]
    assert whole.shape == (1, 1, 1, 1) and bool(counted.all())
    assert float(whole) == pytest.approx(float(kept.mean()))
    # the whole field counts with far fewer than half of its cells valid (a land mask on a padded grid: Iberia's
    # 327 land cells of 24 x 32), and not at all without one
    few = torch.zeros_like(valid)
    few[0, 0, 1, 4] = True
    whole, counted = block_means(v, few, 0)
    assert bool(counted.all()) and float(whole) == 9.0
    assert not bool(block_means(v, torch.zeros_like(valid), 0)[1].any())


def test_block_means_of_members_use_each_sample_mask():
    from precip_cvae.losses import block_means

    g = torch.Generator().manual_seed(0)
    members = torch.rand(3, 2, 1, 4, 6, generator=g)
    valid = torch.rand(2, 1, 4, 6, generator=g) > 0.3
    means, counted = block_means(members, valid, 3)
    assert means.shape == (3, 2, 1, 2, 2)
    for m in range(3):
        for b in range(2):
            one, c1 = block_means(members[m, b][None], valid[b][None], 3)
            assert torch.allclose(means[m, b], one[0]) and bool((counted[b] == c1[0]).all())


def test_pooled_afcrps_hand_values_and_masked_cells_are_inert():
    from precip_cvae.losses import pooled_afcrps

    # one sample, 2 x 2 field, the whole field as the block: means are the members' and the truth's field means
    members = torch.stack([_t([[1.0, 3.0], [2.0, 2.0]]), _t([[4.0, 4.0], [4.0, 8.0]]), _t([[0.0, 0.0], [0.0, 0.0]])])
    y = _t([[3.0, 3.0], [3.0, 3.0]])
    valid = torch.ones_like(y, dtype=torch.bool)
    xs, t, m = [2.0, 5.0, 0.0], 3.0, 3
    skill = sum(abs(x - t) for x in xs) / m
    pairs = sum(abs(a - b) for i, a in enumerate(xs) for b in xs[i + 1:])
    eps = (1 - 0.95) / m
    want = skill - (1 - eps) / (m * (m - 1)) * pairs
    assert float(pooled_afcrps(members, y, valid, (0,))) == pytest.approx(want)
    # the same with the field padded by invalid cells to 4 x 4 (a quarter valid): the whole field still counts
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, 2, 0, 2), value=fill)  # noqa: E731
    got = pooled_afcrps(pad(members, 0.0), pad(y, 0.0), pad(valid, False), (0,))
    assert float(got) == pytest.approx(want)
    # two sizes average: 1-cell blocks give the per-pixel afCRPS
    per_pixel = float(masked_afcrps(members, y, valid))
    assert float(pooled_afcrps(members, y, valid, (1, 0))) == pytest.approx((per_pixel + want) / 2)
    # a masked NaN cell changes neither the value nor the gradient
    members = members.clone().requires_grad_(True)
    y2 = y.clone()
    y2[0, 0, 1, 1] = float("nan")
    valid2 = torch.isfinite(y2)
    loss = pooled_afcrps(members, y2, valid2, (0, 2))
    loss.backward()
    assert math.isfinite(float(loss))
    assert float(members.grad[:, 0, 0, 1, 1].abs().sum()) == 0.0
    xs = [2.0, 4.0, 0.0]  # means over the 3 valid cells
    skill = sum(abs(x - t) for x in xs) / m
    pairs = sum(abs(a - b) for i, a in enumerate(xs) for b in xs[i + 1:])
    assert float(loss) == pytest.approx(skill - (1 - eps) / (m * (m - 1)) * pairs)


def test_pooled_afcrps_tells_scattered_from_coherent_members():
    """Members with each pixel's marginal right but independent pixels score as well per pixel as members
    drawn like the truth (a common shift plus pixel noise), and worse once pooled."""
    from precip_cvae.losses import pooled_afcrps

    g = torch.Generator().manual_seed(0)
    B, M, H, W = 300, 8, 8, 8

    def coherent(k):
        return torch.randn(k, B, 1, 1, 1, generator=g) + 0.5 * torch.randn(k, B, 1, H, W, generator=g)

    def scattered(k):  # the same N(0, 1.25) marginal, independent pixels
        return math.sqrt(1.25) * torch.randn(k, B, 1, H, W, generator=g)

    y = coherent(1)[0]
    valid = torch.ones_like(y, dtype=torch.bool)
    good, bad = coherent(M), scattered(M)
    per_pixel_good, per_pixel_bad = float(masked_afcrps(good, y, valid)), float(masked_afcrps(bad, y, valid))
    assert abs(per_pixel_good - per_pixel_bad) < 0.03 * per_pixel_good
    # whole-field means: the scattered members' barely vary (nearly a point forecast, CRPS near E|Y| = 0.80), the
    # coherent ones vary as the truth's (about 0.57 for 8 members)
    whole_good, whole_bad = float(pooled_afcrps(good, y, valid, (0,))), float(pooled_afcrps(bad, y, valid, (0,)))
    assert whole_bad > 1.15 * whole_good  # 0.68 against 0.54 with this seed
    # 4 x 4 blocks: the scattered members' means still vary too little
    assert float(pooled_afcrps(bad, y, valid, (4,))) > 1.1 * float(pooled_afcrps(good, y, valid, (4,)))


def test_compute_loss_adds_the_pooled_term_in_mm():
    from precip_cvae.config import ConfigError, ModelConfig
    from precip_cvae.losses import pooled_afcrps
    from precip_cvae.model import CVAE

    torch.manual_seed(0)
    tf = TargetTransform("log1p", 0.8)
    cfg = LossConfig(lambda_pooled=0.5, pooled_sizes=(4, 0), ensemble_members=3)
    assert cfg.uses_ensemble and cfg.n_prior == 3
    model = CVAE(ModelConfig(preset="tiny"), 2, (16, 16), (4, 4), transform=tf)
    g = torch.Generator().manual_seed(1)
    x = tf.forward(torch.relu(torch.randn(2, 1, 16, 16, generator=g) * 5))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, :, :, :3] = False
    out = model(x, torch.randn(2, 2, 4, 4, generator=g), valid, n_prior=cfg.n_prior)
    parts = compute_loss(out, x, valid, valid & (x > 1), cfg, epoch=10, transform=tf)
    want_pooled = pooled_afcrps(tf.inverse(out.prior_samples), tf.inverse(x), valid, (4, 0))
    assert float(parts["pooled"].detach()) == pytest.approx(float(want_pooled.detach()), rel=1e-6)
    want = (parts["rec"] + parts["beta"] * parts["kl_term"] + cfg.lambda_mass * parts["mass"] + parts["crps"]
            + 0.5 * parts["pooled"])
    assert float(parts["total"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    off = compute_loss(out, x, valid, valid & (x > 1), LossConfig(), epoch=10, transform=tf)
    assert float(off["pooled"].detach()) == 0.0
    with pytest.raises(ConfigError, match="pooled_sizes"):
        LossConfig(lambda_pooled=1.0, pooled_sizes=())
