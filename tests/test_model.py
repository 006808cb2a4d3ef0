"""Shapes, constraints and trainability of the cVAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precip_cvae.config import MODEL_PRESETS, ModelConfig
from precip_cvae.losses import kl_divergence, masked_mae
from precip_cvae.model import (
    CVAE,
    LOGVAR_MAX,
    LOGVAR_MIN,
    CVAEOutput,
    count_parameters,
    parameter_count,
    relu_leaky_grad,
)


def _batch(B, C, fine, coarse, seed=0, sea=True):
    g = torch.Generator().manual_seed(seed)
    H, W = fine
    y = torch.randn(B, C, *coarse, generator=g)
    valid = torch.ones(B, 1, H, W, dtype=torch.bool)
    if sea:
        valid[:, :, :, : W // 4] = False  # a strip of sea on the west
    x = torch.relu(torch.randn(B, 1, H, W, generator=g)) * valid
    return x, y, valid


def _tiny_checkpoint(model) -> dict:
    """What checkpoint.build_model reads, for a model on the (3, 16x16, 4x4) data of these tests (copied weights)."""
    return {"model_config": dict(model.cfg.__dict__),
            "model_args": {"n_channels": 3, "fine_shape": [16, 16], "coarse_shape": [4, 4], "n_static": 0},
            "model_state": {k: v.clone() for k, v in model.state_dict().items()}}


# (preset, fine grid, coarse grid): small grids, each a multiple of 2**depth
PRESET_GRIDS = [
    ("tiny", (16, 16), (4, 4)),
    ("small", (16, 24), (5, 7)),
    ("medium", (16, 16), (6, 8)),
    ("seed", (16, 16), (4, 4)),
]


@pytest.mark.parametrize("preset,fine,coarse", PRESET_GRIDS)
def test_forward_shapes_every_preset(preset, fine, coarse):
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset)
    model = CVAE(cfg, 3, fine, coarse)
    x, y, valid = _batch(2, 3, fine, coarse)
    out = model(x, y, valid)
    assert isinstance(out, CVAEOutput)
    assert out.recon.shape == (2, 1, *fine)
    # the default: the map at level 1 (1/2 of the grid), flattened, and 4 numbers for the whole field after it
    assert cfg.global_latent == 4
    assert model.latent_shape() == (cfg.latent_channels * (fine[0] // 2) * (fine[1] // 2) + 4,)
    for t in (out.mu_q, out.logvar_q, out.mu_p, out.logvar_p):
        assert t.shape == (2, *model.latent_shape())
        assert torch.isfinite(t).all()
    with torch.no_grad():
        s = model.eval().sample(y, valid, n_samples=3)
    assert s.shape == (3, 2, 1, *fine)
    assert model.reconstruct(x, y, valid).shape == (2, 1, *fine)


def test_parameter_counts_on_meta():
    args = (3, (64, 64), (16, 16))
    counts = {p: parameter_count(ModelConfig(preset=p), *args) for p in MODEL_PRESETS}
    assert counts["small"] <= 10_000_000
    assert counts["tiny"] < counts["small"] < counts["medium"] < counts["seed"]
    assert counts["seed"] > 10 * counts["small"]
    # the meta count is the count of a real model
    real = CVAE(ModelConfig(preset="small"), *args)
    assert count_parameters(real) == counts["small"]
    assert all(p.device.type == "cpu" for p in real.parameters())


def test_decoder_blocks_add_residual_blocks_at_every_finer_scale():
    """model.decoder_blocks: each block is GroupNorm, conv 3x3, GroupNorm, conv 3x3 at the scale's width; the
    tiny preset's decoder scales finer than the bottom are 4 and 8 channels wide (depth 2)."""
    from precip_cvae import checkpoint

    args = (3, (16, 16), (4, 4))
    base = parameter_count(ModelConfig(preset="tiny", global_latent=0), *args)
    per_block = {w: 2 * (9 * w * w + w) + 2 * (2 * w) for w in (4, 8)}  # 2 convs + 2 norms' scale and shift
    assert per_block == {4: 312, 8: 1200}
    for n in (1, 3):
        assert parameter_count(ModelConfig(preset="tiny", decoder_blocks=n, global_latent=0), *args) == \
            base + n * (312 + 1200)
    # without blocks the weights drawn at a seed are those of a model built before the option existed
    torch.manual_seed(0)
    plain = CVAE(ModelConfig(preset="tiny", global_latent=0), *args)
    torch.manual_seed(0)
    deep = CVAE(ModelConfig(preset="tiny", decoder_blocks=2, global_latent=0), *args)
    shared = {k: v for k, v in deep.state_dict().items() if not k.startswith(("dec_blocks", "dec_head"))}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in shared.items())
    assert plain.dec_blocks is None and len(deep.dec_blocks) == 2 and len(deep.dec_blocks[0]) == 2
    # the blocks are used: members differ from the plain model's, and a checkpoint restores them
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    deep.eval()
    state = _tiny_checkpoint(deep)
    with torch.no_grad():
        s = deep.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1))
        deep.dec_blocks[0][0].body[-1].weight.add_(0.5)
        changed = deep.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(s, changed)
    rebuilt = checkpoint.build_model(state).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1)), s)


def test_global_latent_numbers_beside_the_map():
    """model.global_latent: g numbers per sample packed after the flattened map latent; a learned prior and a
    posterior of their own; the decoder reads them at its bottom; KL counts them as g more units; without them the
    model draws the weights it drew before the option; a checkpoint restores them."""
    from precip_cvae import checkpoint
    from precip_cvae.config import ConfigError
    from precip_cvae.losses import kl_units

    args = (3, (16, 16), (4, 4))
    torch.manual_seed(0)
    plain = CVAE(ModelConfig(preset="tiny", global_latent=0), *args)
    torch.manual_seed(0)
    model = CVAE(ModelConfig(preset="tiny", global_latent=4), *args)
    new = ("enc_global", "prior_global", "dec_in")
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(new)}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in shared.items())
    # tiny: d_y 16, widths [4, 8, 16], cond widths [4, 4, 4]; level 1: map features 8 + 4 channels
    d_y, lat = 16, model.latent_ch
    extra = ((2 * 12 + d_y) * d_y + d_y + d_y * 8 + 8) + (d_y * d_y + d_y + d_y * 8 + 8) + 4 * lat
    assert count_parameters(model) == count_parameters(plain) + extra
    n_map = 8 * 8 * 8  # 8 channels at 8 x 8
    assert model.latent_shape() == (n_map + 4,)
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    out = model(x, y, valid, n_prior=3)
    for t in (out.mu_q, out.logvar_q, out.mu_p, out.logvar_p):
        assert t.shape == (2, n_map + 4) and bool(torch.isfinite(t).all())
    assert out.prior_samples.shape == (3, 2, 1, 16, 16)
    assert kl_units(out.mu_q, out.logvar_q, out.mu_p, out.logvar_p).shape == (2, n_map + 4)
    # the global numbers are read: decode one latent with two different global parts
    model.eval()
    with torch.no_grad():
        cond = model.encode_condition(y)
        mu_p, _ = model.prior(cond)
        z = mu_p.clone()
        a = model.decode(z, cond)
        z[:, n_map:] += 3.0
        b = model.decode(z, cond)
        assert float((a - b).abs().amax()) > 0
        s = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1))
    state = _tiny_checkpoint(model)
    rebuilt = checkpoint.build_model(state).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1)), s)
    # a standard-normal prior: zeros for the global part too
    std = CVAE(ModelConfig(preset="tiny", global_latent=2, prior="standard"), *args)
    mu0, lv0 = std.prior(std.encode_condition(y))
    assert mu0.shape == (2, n_map + 2) and float(mu0.abs().sum() + lv0.abs().sum()) == 0.0
    with pytest.raises(ConfigError, match="global_latent"):
        ModelConfig(preset="tiny", global_latent=2, latent="vector")
    with pytest.raises(ConfigError, match="global_latent"):
        ModelConfig(preset="tiny", global_latent=2, context="local")
    # unset (the default): 4 where it applies, 0 where it does not (the seed's vector latent, a local context)
    assert ModelConfig(preset="tiny").global_latent == 4 == ModelConfig.from_dict({"preset": "tiny"}).global_latent
    assert ModelConfig(latent="vector").global_latent == 0 == ModelConfig(context="local").global_latent
    # a checkpoint written before the option existed has no key: it is rebuilt without global numbers
    torch.manual_seed(0)
    old = CVAE(ModelConfig(preset="tiny", global_latent=0), *args).eval()
    old_cfg = {k: v for k, v in old.cfg.__dict__.items() if k != "global_latent"}
    state = {**_tiny_checkpoint(old), "model_config": old_cfg}
    assert checkpoint.build_model(state).cfg.global_latent == 0


def test_hierarchical_prior_draws_the_map_given_each_members_global_numbers():
    """model.hierarchical_prior: the map's prior is p(z_map | y, z_global). It starts as the factorised prior (a zero
    shift), the weights of everything else are those of the model without it, the KL's map prior is taken at the
    posterior's own global draw, and a sampled member's map is drawn from the prior given that member's global
    numbers, all from one eps of the latent's shape (so the noise is the plain model's)."""
    from precip_cvae import checkpoint
    from precip_cvae.config import ConfigError

    args = (3, (16, 16), (4, 4))
    torch.manual_seed(0)
    plain = CVAE(ModelConfig(preset="tiny", global_latent=4), *args).eval()
    torch.manual_seed(0)
    model = CVAE(ModelConfig(preset="tiny", global_latent=4, hierarchical_prior=True), *args).eval()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert {k for k in state if k not in plain.state_dict()} == {
        "prior_from_global.0.weight", "prior_from_global.0.bias", "prior_from_global.2.weight",
        "prior_from_global.2.bias"}
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    n_map = 8 * 8 * 8
    with torch.no_grad():
        # at the start the shift is zero: the same prior and the same members as the plain model
        cond = model.encode_condition(y)
        assert torch.equal(model.prior(cond, torch.randn(2, 4))[0], plain.prior(cond)[0])
        same = model.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(5))
        # (to float round-off: the hierarchical path runs the prior's convolutions on the members' batch)
        torch.testing.assert_close(same, plain.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(5)))
        for p in model.prior_from_global.parameters():  # a shift that depends on the global numbers
            p.copy_(0.3 * torch.randn_like(p))
        with pytest.raises(ValueError, match="z_global"):
            model.prior(cond)
        mu_a, lv_a = model.prior(cond, torch.zeros(2, 4))
        mu_b, lv_b = model.prior(cond, torch.full((2, 4), 2.0))
        assert float((mu_a[:, :n_map] - mu_b[:, :n_map]).abs().amax()) > 0  # the map moves with z_global
        assert torch.equal(mu_a[:, n_map:], mu_b[:, n_map:]) and torch.equal(lv_a[:, n_map:], lv_b[:, n_map:])
        # the KL's prior: the map given the posterior's global draw (the same randn_like as forward's)
        torch.manual_seed(11)
        out = model(x, y, valid)
        torch.manual_seed(11)
        mu_q, lv_q = model.posterior(x, valid, cond)
        z = mu_q + torch.exp(0.5 * lv_q) * torch.randn_like(mu_q)
        mu_p, lv_p = model.prior(cond, z[:, n_map:])
        torch.testing.assert_close(out.mu_p, mu_p)
        torch.testing.assert_close(out.logvar_p, lv_p)
        # draws: the global numbers from their prior, then each member's map given its own global numbers
        zd = model.draw_prior(cond, 3, generator=torch.Generator().manual_seed(7))
        eps = torch.randn((3, 2, n_map + 4), generator=torch.Generator().manual_seed(7))
        for m in range(3):
            mu_g, lv_g = mu_a[:, n_map:], lv_a[:, n_map:]
            z_g = mu_g + torch.exp(0.5 * lv_g) * eps[m, :, n_map:]
            mu_m, lv_m = model.prior(cond, z_g)
            torch.testing.assert_close(zd[m], mu_m + torch.exp(0.5 * lv_m) * eps[m])
        s = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1))
        assert s.shape == (2, 2, 1, 16, 16) and bool((s >= 0).all())
        # training's prior members are draw_prior's: the same noise gives the same members whatever the truth
        # (the posterior's global draw sets the KL's prior only), and they are those decoded from draw_prior
        torch.manual_seed(3)
        a = model(x, y, valid, n_prior=3).prior_samples
        torch.manual_seed(3)
        b = model(2.0 * x + 1.0, y, valid, n_prior=3).prior_samples
        torch.testing.assert_close(a, b)
        torch.manual_seed(3)
        torch.randn_like(mu_q)  # forward's posterior draw comes first
        zp = model.draw_prior(cond, 3)
        for m in range(3):
            torch.testing.assert_close(a[m], model.decode(zp[m], cond, valid))
    # training draws members the same way and backpropagates into the shift
    model.train()
    out = model(x, y, valid, n_prior=3)
    assert out.prior_samples.shape == (3, 2, 1, 16, 16)
    out.prior_samples.sum().backward()
    assert float(model.prior_from_global[-1].weight.grad.abs().sum()) > 0
    # a checkpoint restores it
    model.eval()
    ckpt = _tiny_checkpoint(model)
    with torch.no_grad():
        s = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(1))
        assert torch.equal(checkpoint.build_model(ckpt).eval().sample(y, valid, n_samples=2,
                                                                      generator=torch.Generator().manual_seed(1)), s)
    for bad in ({"global_latent": 0}, {"prior": "standard"}, {"latent": "vector"}):
        with pytest.raises(ConfigError, match="hierarchical_prior"):
            ModelConfig(preset="tiny", hierarchical_prior=True, **bad)


def test_output_non_negative_and_zero_on_invalid_pixels():
    torch.manual_seed(1)
    model = CVAE(ModelConfig(preset="tiny"), 2, (16, 16), (4, 4))
    x, y, valid = _batch(4, 2, (16, 16), (4, 4), seed=1)
    # push the head's pre-activation negative on a part of the grid to get exact zeros
    with torch.no_grad():
        model.dec_head.bias.fill_(-0.05)
    out = model(x, y, valid)
    assert (out.recon >= 0).all()
    assert (out.recon[~valid] == 0).all()
    assert (out.recon[valid] == 0).any() and (out.recon[valid] > 0).any()
    with torch.no_grad():
        s = model.eval().sample(y, valid, n_samples=2)
    assert (s >= 0).all() and (s[:, ~valid] == 0).all()


def test_output_relu_lets_gradient_through_at_zero():
    a = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    out = relu_leaky_grad(a, 0.1)
    assert out.tolist() == [0.0, 0.0, 2.0]  # exact zeros forward
    out.sum().backward()
    assert a.grad.tolist() == pytest.approx([0.1, 0.1, 1.0])  # no dead pixels backward


def test_sample_is_deterministic_given_the_generator():
    torch.manual_seed(2)
    model = CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (4, 4)).eval()
    _, y, valid = _batch(2, 3, (16, 16), (4, 4), seed=2)
    with torch.no_grad():
        a = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(7))
        b = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(7))
        c = model.sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(8))
        tame = model.sample(y, valid, n_samples=2, z_scale=0.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # samples of one call differ
    assert torch.allclose(tame[0], tame[1])  # z_scale = 0: the prior mean, twice


@pytest.mark.parametrize("latent,shape,g", [("vector", (8,), None), ("map", (8, 8, 8), 0), ("map", (516,), None)])
def test_standard_prior_is_zero(latent, shape, g):
    """The standard prior is N(0, 1) for every latent number, the global ones (the default's 4) included."""
    model = CVAE(ModelConfig(preset="tiny", prior="standard", latent=latent, global_latent=g), 3, (16, 16), (4, 4))
    x, y, valid = _batch(3, 3, (16, 16), (4, 4))
    out = model(x, y, valid)
    assert torch.equal(out.mu_p, torch.zeros(3, *shape))
    assert torch.equal(out.logvar_p, torch.zeros(3, *shape))
    learned = CVAE(ModelConfig(preset="tiny", latent=latent, global_latent=g), 3, (16, 16), (4, 4))
    assert count_parameters(learned) > count_parameters(model)
    assert not torch.equal(learned(x, y, valid).mu_p, torch.zeros(3, *shape))


@pytest.mark.parametrize("conditioning", ["fine", "coarse"])
def test_map_latent_on_the_padded_iberia_grid(conditioning):
    """19 x 29 padded to 24 x 32 (grid_multiple 8): the map latent is 8 x (12, 16) at level 1, 8 x (6, 8) at 2."""
    torch.manual_seed(6)
    n_static = 7 if conditioning == "fine" else 0
    model = CVAE(ModelConfig(preset="small", base_filters=16, conditioning=conditioning, global_latent=0), 4,
                 (24, 32), (5, 7), n_static=n_static)
    x, y, valid = _batch(3, 4, (24, 32), (5, 7))
    out = model(x, y, valid, n_prior=4)
    assert out.mu_q.shape == out.mu_p.shape == (3, 8, 12, 16)
    level2 = CVAE(ModelConfig(preset="small", base_filters=16, conditioning=conditioning, latent_level=2,
                              global_latent=0), 4,
                  (24, 32), (5, 7), n_static=n_static)
    assert level2(x, y, valid).mu_q.shape == (3, 8, 6, 8)
    assert out.prior_samples.shape == (4, 3, 1, 24, 32)
    assert (out.prior_samples[:, ~valid] == 0).all()
    # prior samples are differentiable: the ensemble loss reaches the prior network
    out.prior_samples.sum().backward()
    assert model.prior_net[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        s = model.eval().sample(y, valid, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, 1, 24, 32) and not torch.allclose(s[0], s[1])


def test_latent_level_and_static_checks():
    with pytest.raises(Exception, match="latent_level"):
        ModelConfig(preset="tiny", latent_level=3)  # tiny has depth 2
    with pytest.raises(ValueError, match="conditioning 'fine'"):
        CVAE(ModelConfig(preset="tiny", conditioning="coarse"), 3, (16, 16), (4, 4), n_static=2)


def test_static_channels_are_saved_with_the_weights_and_change_the_output():
    torch.manual_seed(7)
    model = CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (4, 4), n_static=2).eval()
    static = torch.randn(2, 16, 16)
    model.set_static(static)
    assert torch.equal(model.state_dict()["static"][0], static)
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    rebuilt = CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (4, 4), n_static=2).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = model.sample(y, valid, generator=torch.Generator().manual_seed(1))
        b = rebuilt.sample(y, valid, generator=torch.Generator().manual_seed(1))
        model.set_static(torch.zeros(2, 16, 16))
        c = model.sample(y, valid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="finite"):
        model.set_static(torch.full((2, 16, 16), float("nan")))


@pytest.mark.parametrize("fine", [(20, 16), (16, 12), (4, 4), (0, 16)])
def test_indivisible_or_too_small_grid_raises(fine):
    # small preset: depth 3 -> multiple of 8
    with pytest.raises(ValueError, match=r"multiples of 2\*\*depth = 8") as err:
        CVAE(ModelConfig(preset="small"), 3, fine, (4, 4))
    assert str(fine) in str(err.value) and "depth 3" in str(err.value)


def test_wrong_input_shapes_raise():
    model = CVAE(ModelConfig(preset="tiny"), 3, (16, 16), (4, 4))
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    with pytest.raises(ValueError, match="y must be"):
        model(x, y[:, :2], valid)
    with pytest.raises(ValueError, match="x must be"):
        model(x[..., :8], y, valid)


@pytest.mark.parametrize("coarse", [(5, 7), (6, 8), (1, 1), (40, 3)])
def test_arbitrary_coarse_shapes(coarse):
    torch.manual_seed(3)
    model = CVAE(ModelConfig(preset="tiny"), 4, (16, 32), coarse)
    x, y, valid = _batch(2, 4, (16, 32), coarse, seed=3)
    out = model(x, y, valid)
    assert out.recon.shape == (2, 1, 16, 32)
    out.recon.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("latent", ["vector", "map"])
def test_logvar_is_clamped(latent):
    torch.manual_seed(4)
    model = CVAE(ModelConfig(preset="tiny", latent=latent, global_latent=0), 3, (16, 16), (4, 4))
    with torch.no_grad():
        if latent == "vector":
            model.enc_head.bias[model.d_z :].fill_(1e3)
            model.prior_net[-1].bias[model.d_z :].fill_(-1e3)
        else:
            model.enc_head[-1].bias[model.z_ch :].fill_(1e3)
            model.prior_net[-1].bias[model.z_ch :].fill_(-1e3)
    out = model(*_batch(2, 3, (16, 16), (4, 4)))
    assert torch.all(out.logvar_q == LOGVAR_MAX) and torch.all(out.logvar_p == LOGVAR_MIN)


def test_dropout_only_in_train_mode():
    torch.manual_seed(5)
    model = CVAE(ModelConfig(preset="tiny", dropout_encoder=0.5, dropout_decoder=0.5), 3, (16, 16), (4, 4))
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x, y, valid), model.reconstruct(x, y, valid))
        model.train()
        assert not torch.equal(model.reconstruct(x, y, valid), model.reconstruct(x, y, valid))


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", dropout_encoder=0.0, dropout_decoder=0.0)
    model = CVAE(cfg, 3, (16, 16), (4, 4))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(8, 3, 4, 4, generator=g)
    valid = torch.ones(8, 1, 16, 16, dtype=torch.bool)
    valid[:, :, :3, :5] = False
    # blobby fields with dry areas: a smoothed noise field, shifted down and cut at 0
    noise = torch.randn(8, 1, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    x = torch.relu(3 * smooth + 0.3) * valid

    def recon_mae():
        model.eval()
        with torch.no_grad():
            mae = masked_mae(model.reconstruct(x, y, valid), x, valid).item()
        model.train()
        return mae

    before = recon_mae()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        out = model(x, y, valid)
        # the default loss's KL scale: per valid pixel
        loss = masked_mae(out.recon, x, valid) + 1e-2 * kl_divergence(*out[1:5]) / valid[0].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon_mae()
    assert after < before / 5, (before, after)


def test_small_preset_forward_backward_at_64x64():
    """`small` at the demo's 64x64 (16x16 condition): the reconstruction has the target's shape and is
    zero off the valid pixels, the loss reaches the encoder, the condition network and the decoder,
    and every gradient is finite.  (Its speed is a benchmark: benchmarks/train_throughput.py.)"""
    torch.manual_seed(0)
    model = CVAE(ModelConfig(preset="small"), 3, (64, 64), (16, 16))
    x, y, valid = _batch(8, 3, (64, 64), (16, 16))
    out = model(x, y, valid)
    assert out.recon.shape == (8, 1, 64, 64)
    assert (out.recon[~valid] == 0).all()
    loss = masked_mae(out.recon, x, valid)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for part in ("enc_stem", "cond_stem", "dec_head"):
        assert any(n.startswith(part) and g.abs().sum() > 0 for n, g in grads.items()), part


def test_bernoulli_gamma_output_samples_and_checkpoint_round_trip(tmp_path):
    from precip_cvae import checkpoint
    from precip_cvae.transform import TargetTransform

    torch.manual_seed(4)
    tf = TargetTransform("log1p", 0.9)
    cfg = ModelConfig(preset="tiny")
    model = CVAE(cfg, 3, (16, 16), (4, 4), output="bernoulli_gamma", transform=tf).eval()
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    with torch.no_grad():
        s = model.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(5))
        again = model.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(5))
        mean = model.reconstruct(x, y, valid)
    assert s.shape == (3, 2, 1, 16, 16) and torch.equal(s, again)
    assert float(s.min()) >= 0 and float(s[:, ~valid].abs().max()) == 0
    assert float((s[:, valid] == 0).float().mean()) > 0.05  # dry pixels are exactly 0
    assert not torch.allclose(s[0], s[1])
    assert mean.shape == (2, 1, 16, 16) and float(mean.min()) >= 0
    state = {"model_config": dict(cfg.__dict__), "format": checkpoint.CHECKPOINT_FORMAT,
             "model_args": {"n_channels": 3, "fine_shape": [16, 16], "coarse_shape": [4, 4], "n_static": 0,
                            "output": "bernoulli_gamma", "transform": tf.to_attrs()},
             "model_state": model.state_dict()}
    rebuilt = checkpoint.build_model(state).eval()
    assert rebuilt.output == "bernoulli_gamma" and rebuilt.transform == tf
    with torch.no_grad():
        b = rebuilt.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s, b)
    with pytest.raises(ValueError, match="transform"):
        CVAE(cfg, 3, (16, 16), (4, 4), output="bernoulli_gamma")


def test_residual_mode_mean_plus_residual_and_checkpoint_round_trip(tmp_path):
    """model.residual: members are relu(m(y) + r), >= 0 in model space and in mm/day; m(y) is deterministic, gets
    no gradient from the members, and a rebuilt checkpoint restores both parts."""
    from precip_cvae import checkpoint
    from precip_cvae.transform import TargetTransform

    torch.manual_seed(6)
    cfg = ModelConfig(preset="tiny", residual=True, dropout_encoder=0.0, dropout_decoder=0.0)
    model = CVAE(cfg, 3, (16, 16), (4, 4)).eval()
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    with torch.no_grad():
        s = model.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(2))
        cond = model.encode_condition(y)
        m1, m2 = model.mean_field(cond), model.mean_field(cond)
        r = model._decode_head(torch.zeros(2, *model.latent_shape()), cond, None)
        field = model.decode(torch.zeros(2, *model.latent_shape()), cond, valid)
    assert torch.equal(m1, m2) and float(m1.min()) >= 0
    np.testing.assert_allclose(field.numpy(), (torch.relu(m1 + r) * valid).numpy(), atol=1e-6)
    assert float(s.min()) >= 0 and float(TargetTransform("log1p", 0.8).inverse(s).min()) >= 0
    assert not torch.allclose(s[0], s[1])
    # the members' loss does not reach m(y); the mean's own loss does
    model.train()
    out = model(x, y, valid, n_prior=2)
    out.prior_samples.sum().backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for n, p in model.named_parameters()
               if n.startswith("mean_"))
    model.zero_grad()
    out = model(x, y, valid)
    out.mean.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
               if n.startswith("mean_"))
    model.eval()
    state = {"model_config": dict(cfg.__dict__), "model_args": {"n_channels": 3, "fine_shape": [16, 16],
                                                                "coarse_shape": [4, 4], "n_static": 0},
             "model_state": model.state_dict()}
    rebuilt = checkpoint.build_model(state).eval()
    assert rebuilt.residual
    with torch.no_grad():
        b = rebuilt.sample(y, valid, n_samples=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s, b)
    with pytest.raises(ValueError, match="residual"):
        CVAE(cfg, 3, (16, 16), (4, 4), output="bernoulli_gamma", transform=TargetTransform())


def test_correlated_bernoulli_gamma_draws_keep_the_law_and_share_it_with_neighbours():
    """model.bg_correlation: uniforms from a smoothed Gaussian field (a Gaussian copula). Each pixel keeps its
    law (wet with probability p, gamma amounts of mean k theta), and neighbours' draws correlate as
    exp(-d^2 / (4 L^2)) in the Gaussian field; L = 0 draws them independently."""
    from scipy import stats

    from precip_cvae.model import BernoulliGamma, bernoulli_gamma_draw, bernoulli_gamma_draw_correlated, gaussian_field

    g = gaussian_field((64, 1, 40, 48), 3.0, torch.Generator().manual_seed(0))
    assert float(g.mean()) == pytest.approx(0.0, abs=0.05) and float(g.std()) == pytest.approx(1.0, abs=0.03)
    edge = gaussian_field((2000, 1, 40, 2), 3.0, torch.Generator().manual_seed(1))[..., 0]  # the first column
    assert float(edge.std()) == pytest.approx(1.0, abs=0.03)  # unit variance at the edges too
    lag = lambda a, d: float(torch.corrcoef(torch.stack([a[..., :-d].flatten(), a[..., d:].flatten()]))[0, 1])  # noqa: E731
    assert lag(g, 1) == pytest.approx(np.exp(-1 / 36), abs=0.02) and lag(g, 6) == pytest.approx(np.exp(-1), abs=0.05)
    law = BernoulliGamma(torch.full((64, 1, 40, 48), 0.3), torch.full((64, 1, 40, 48), 0.8),
                         torch.full((64, 1, 40, 48), 5.0))
    draws = {L: bernoulli_gamma_draw_correlated(law, L, torch.Generator().manual_seed(1)) for L in (0.0, 3.0)}
    draws["independent"] = bernoulli_gamma_draw(law, torch.Generator().manual_seed(1))
    for name, d in draws.items():
        wet = d[d > 0]
        assert float((d > 0).float().mean()) == pytest.approx(0.3, abs=0.02), name
        assert float(wet.mean()) == pytest.approx(0.8 * 5.0, rel=0.05), name
        assert stats.kstest(wet[::7].numpy(), stats.gamma(0.8, scale=5.0).cdf).pvalue > 0.001, name
    wet_lag = {name: lag((d > 0).float(), 1) for name, d in draws.items()}
    assert abs(wet_lag[0.0]) < 0.02 and abs(wet_lag["independent"]) < 0.02 and wet_lag[3.0] > 0.6
    again = bernoulli_gamma_draw_correlated(law, 3.0, torch.Generator().manual_seed(1))
    assert torch.equal(again, draws[3.0])


def test_a_bernoulli_gamma_model_samples_correlated_fields_and_trains_with_independent_draws():
    from precip_cvae.transform import TargetTransform

    tf = TargetTransform("log1p", 0.9)
    x, y, valid = _batch(2, 3, (16, 16), (4, 4))
    out = {}
    for L in (0.0, 2.0):
        torch.manual_seed(4)
        model = CVAE(ModelConfig(preset="tiny", bg_correlation=L), 3, (16, 16), (4, 4), output="bernoulli_gamma",
                     transform=tf).eval()
        with torch.no_grad():
            out[L] = model.sample(y, valid, n_samples=4, generator=torch.Generator().manual_seed(5))
            cond = model.encode_condition(y)
            z = torch.zeros(2, *model.latent_shape())
            a = model.decode(z, cond, valid, torch.Generator().manual_seed(2), straight_through=True)
            b = model.decode(z, cond, valid, torch.Generator().manual_seed(2), straight_through=True)
        out[f"train{L}"] = a
        assert torch.equal(a, b)
    assert out[2.0].shape == out[0.0].shape == (4, 2, 1, 16, 16)
    assert float(out[2.0][:, ~valid].abs().max()) == 0 and float(out[2.0].min()) >= 0
    assert not torch.equal(out[0.0], out[2.0])
    assert torch.equal(out["train0.0"], out["train2.0"])  # training's draws do not depend on bg_correlation
