"""The conditional VAE: fine-grid daily precipitation ``x`` given coarse predictors ``y``.

Shapes and spaces
-----------------
``x``      (B, 1, H, W)  target in the transformed model space (see
                          :class:`precip_cvae.transform.TargetTransform`), non-negative,
                          invalid pixels hold 0.
``valid``  (B, 1, H, W)  bool, per-pixel validity (sea / missing = False).
``y``      (B, C, h, w)  normalised large-scale predictors on the coarse grid; ``h, w``
                          are arbitrary (they need not be a clean factor of ``H, W``).
``z``      (B, d_z)      latent vector.

``H`` and ``W`` must be multiples of ``2**depth`` (the data stage pads the grid).

Architecture
------------
* Condition encoder: a small conv trunk at the coarse resolution, then, for every
  scale ``s = 0..depth`` (resolution ``H / 2**s``), a 1x1 projection resized with
  ``F.interpolate`` (bilinear, anti-aliased when shrinking) -- the coarse/fine ratio is
  arbitrary, so no strided layer can be assumed to line up.  Mean- and max-pooling of
  the trunk give the global condition vector ``v_y`` (d_y); max-pooling keeps a
  local heavy-rain signal that a mean alone would wash out.
* Posterior ``q(z | x, y)``: strided convs over ``[x * valid, valid]`` with the
  condition map of every scale concatenated, flattened bottleneck + ``v_y`` ->
  ``mu_q, logvar_q``.
* Prior ``p(z | y)``: MLP of ``v_y`` -> ``mu_p, logvar_p``; ``prior='standard'``
  gives ``N(0, I)`` (zeros).
* Decoder ``p(x | z, y)``: linear ``[z, v_y]`` -> a map at ``(H, W) / 2**depth``,
  a residual block, then ``depth`` times: 1x1 channel reduction, nearest-neighbour
  x2 upsampling, 3x3 conv over ``[h, condition map of that scale]``; a 3x3 head.

Channel widths per scale are ``F/2, F, 2F, ..., F * 2**(depth-1)`` (``F`` =
``base_filters``): the full-resolution level is the costly one on CPU, so it is the
narrowest.  The bottleneck is flattened (posterior) / produced by a linear layer
(decoder), so a model is tied to its ``fine_shape``; the condition grid is free.

Normalisation is GroupNorm (batch statistics across heterogeneous days are fragile).
``logvar`` is clamped to ``[LOGVAR_MIN, LOGVAR_MAX]``.

Output non-negativity
---------------------
The head ends in a ReLU *forward* (so dry pixels can be exactly 0, which is the
most common value) with a *leaky backward*: where the pre-activation is <= 0 a
fraction ``OUTPUT_GRAD_LEAK`` of the gradient still flows.  A plain ReLU lets a
wet pixel whose pre-activation drifted below zero die for good (zero gradient);
softplus never reaches 0.  With the leak such a pixel is pushed back up by the
MAE gradient, while a dry pixel predicted as exactly 0 gets no push at all
(the L1 subgradient of ``|0 - 0|`` is 0 in torch), so there is no drift.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

LOGVAR_MIN = -10.0
LOGVAR_MAX = 6.0
OUTPUT_GRAD_LEAK = 0.1

__all__ = [
    "CVAE",
    "CVAEOutput",
    "Condition",
    "count_parameters",
    "parameter_count",
    "relu_leaky_grad",
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "OUTPUT_GRAD_LEAK",
]


class CVAEOutput(NamedTuple):
    """What :meth:`CVAE.forward` returns.

    Attributes
    ----------
    recon : Tensor (B, 1, H, W)
        Decoded from a reparameterised posterior sample; model space, >= 0,
        0 on invalid pixels.
    mu_q, logvar_q : Tensor (B, d_z)
        Posterior ``q(z | x, y)`` mean and log-variance.
    mu_p, logvar_p : Tensor (B, d_z)
        Prior ``p(z | y)`` mean and log-variance (zeros for ``prior='standard'``).
    """

    recon: torch.Tensor
    mu_q: torch.Tensor
    logvar_q: torch.Tensor
    mu_p: torch.Tensor
    logvar_p: torch.Tensor


class Condition(NamedTuple):
    """The encoded condition.

    Attributes
    ----------
    maps : tuple of Tensor
        ``maps[s]`` is (B, c_s, H / 2**s, W / 2**s) for ``s = 0..depth``.
    vector : Tensor (B, d_y)
        Global condition vector ``v_y``.
    """

    maps: tuple[torch.Tensor, ...]
    vector: torch.Tensor


# ----------------------------------------------------------------------------- pieces


class _ReLULeakyGrad(torch.autograd.Function):
    """Forward ``max(a, 0)``; backward slope 1 where ``a > 0``, ``leak`` elsewhere."""

    @staticmethod
    def forward(ctx, a, leak: float):
        ctx.save_for_backward(a)
        ctx.leak = leak
        return a.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        slope = torch.where(a > 0, torch.ones_like(a), torch.full_like(a, ctx.leak))
        return grad * slope, None


def relu_leaky_grad(a: torch.Tensor, leak: float = OUTPUT_GRAD_LEAK) -> torch.Tensor:
    """Exact ReLU forward with a leaky gradient (see the module docstring)."""
    return _ReLULeakyGrad.apply(a, leak)


def _groups(ch: int) -> int:
    """Largest divisor of ``ch`` that is <= 8 and leaves >= 2 channels per group."""
    for g in range(min(8, max(ch // 2, 1)), 0, -1):
        if ch % g == 0:
            return g
    return 1


class _ConvAct(nn.Sequential):
    """3x3 conv (optionally strided) -> GroupNorm -> SiLU -> Dropout2d."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )


class _ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, ch: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(_groups(ch), ch),
            nn.SiLU(),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, h):
        return h + self.body(h)  # (B, ch, h, w)


def _resize(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (anti-aliased when shrinking either side)."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    shrink = size[0] < a.shape[-2] or size[1] < a.shape[-1]
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False, antialias=shrink)


# ----------------------------------------------------------------------------- model


class CVAE(nn.Module):
    """Conditional VAE for fine-grid precipitation given coarse predictors.

    Parameters
    ----------
    cfg : ModelConfig
        Sizes (``base_filters``, ``d_y``, ``d_z``, ``depth``), dropouts and prior kind.
    n_channels : int
        Number of condition channels ``C`` in ``y``.
    fine_shape : (int, int)
        ``(H, W)`` of the target grid; both must be multiples of ``2**depth``.
    coarse_shape : (int, int)
        ``(h, w)`` of the condition grid (any size; only checked to be positive).

    Raises
    ------
    ValueError
        If ``fine_shape`` is not divisible by ``2**depth`` (message names the shape,
        the depth and the required multiple) or a size is not positive.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_channels: int,
        fine_shape: tuple[int, int],
        coarse_shape: tuple[int, int],
    ):
        super().__init__()
        depth = int(cfg.depth)
        fine_shape = tuple(int(s) for s in fine_shape)
        coarse_shape = tuple(int(s) for s in coarse_shape)
        if depth < 1:
            raise ValueError(f"model depth must be >= 1, got {depth}")
        if n_channels < 1:
            raise ValueError(f"the condition needs at least one channel, got n_channels={n_channels}")
        if len(coarse_shape) != 2 or min(coarse_shape) < 1:
            raise ValueError(f"coarse grid shape must be two positive sizes, got {coarse_shape}")
        multiple = 2**depth
        if len(fine_shape) != 2 or min(fine_shape) < 1 or any(s % multiple for s in fine_shape):
            raise ValueError(
                f"fine grid shape {fine_shape} is not usable with model depth {depth}: "
                f"height and width must be positive multiples of 2**depth = {multiple} "
                f"(pad the grid, e.g. preprocess.grid_multiple: {multiple}, or lower model.depth)"
            )

        self.cfg = cfg
        self.n_channels = int(n_channels)
        self.fine_shape = fine_shape
        self.coarse_shape = coarse_shape
        self.depth = depth
        self.d_z = int(cfg.d_z)
        self.d_y = int(cfg.d_y)
        fb = int(cfg.base_filters)
        p_enc, p_dec = float(cfg.dropout_encoder), float(cfg.dropout_decoder)

        # channel widths per scale s (resolution H / 2**s): F/2, F, 2F, ..., F * 2**(depth-1)
        self.widths = [max(fb // 2, 4)] + [fb * 2 ** (s - 1) for s in range(1, depth + 1)]
        self.cond_widths = [max(4, w // 4) for w in self.widths]
        self.sizes = [(fine_shape[0] >> s, fine_shape[1] >> s) for s in range(depth + 1)]
        bottom = self.widths[depth]
        hb, wb = self.sizes[depth]
        self.latent_ch = max(8, bottom // 4)  # channels of the flattened bottleneck map
        w, cw = self.widths, self.cond_widths

        # --- condition encoder (coarse resolution) -> maps per scale + vector
        c_trunk = fb
        self.cond_stem = _ConvAct(n_channels, c_trunk, dropout=p_enc)
        self.cond_block = _ResBlock(c_trunk, dropout=p_enc)
        self.cond_proj = nn.ModuleList(nn.Conv2d(c_trunk, c, 1) for c in cw)
        self.cond_vec = nn.Sequential(
            nn.Linear(2 * c_trunk, self.d_y),
            nn.SiLU(),
            nn.Dropout(p_enc) if p_enc > 0 else nn.Identity(),
        )

        # --- posterior encoder q(z | x, y): the condition map of scale s is concatenated
        # to the input of the strided conv that leaves scale s (and of the 1x1 reduction
        # at the bottom), so every scale is injected once.
        self.enc_stem = _ConvAct(2, w[0])
        self.enc_down = nn.ModuleList(
            _ConvAct(w[s - 1] + cw[s - 1], w[s], stride=2, dropout=p_enc) for s in range(1, depth + 1)
        )
        self.enc_reduce = nn.Conv2d(bottom + cw[depth], self.latent_ch, 1)
        self.enc_head = nn.Linear(self.latent_ch * hb * wb + self.d_y, 2 * self.d_z)

        # --- prior p(z | y)
        if cfg.prior == "learned":
            self.prior_net = nn.Sequential(
                nn.Linear(self.d_y, self.d_y),
                nn.SiLU(),
                nn.Linear(self.d_y, 2 * self.d_z),
            )
        else:
            self.prior_net = None

        # --- decoder p(x | z, y)
        self.dec_in = nn.Linear(self.d_z + self.d_y, self.latent_ch * hb * wb)
        self.dec_bottom = _ConvAct(self.latent_ch + cw[depth], bottom, dropout=p_dec)
        self.dec_bottom_res = _ResBlock(bottom, dropout=p_dec)
        # scale s -> s-1: 1x1 channel reduction at scale s (cheap), nearest x2 upsampling,
        # then a 3x3 conv over [h, condition map of scale s-1]
        self.dec_reduce = nn.ModuleList(nn.Conv2d(w[s], w[s - 1], 1) for s in range(1, depth + 1))
        self.dec_up = nn.ModuleList(
            _ConvAct(w[s - 1] + cw[s - 1], w[s - 1], dropout=p_dec) for s in range(1, depth + 1)
        )
        self.dec_head = nn.Conv2d(w[0], 1, 3, padding=1)
        with torch.no_grad():
            # start slightly wet so few pixels begin on the ReLU's flat side
            self.dec_head.bias.fill_(0.1)

    # ------------------------------------------------------------------ building blocks

    def _check_inputs(self, y: torch.Tensor, valid: torch.Tensor | None, x: torch.Tensor | None = None):
        if y.ndim != 4 or y.shape[1] != self.n_channels:
            raise ValueError(f"y must be (B, {self.n_channels}, h, w), got {tuple(y.shape)}")
        H, W = self.fine_shape
        for name, t in (("x", x), ("valid", valid)):
            if t is None:
                continue
            if t.ndim != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != (H, W) or t.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{name} must be (B, 1, {H}, {W}) with B = {y.shape[0]} as in y, got {tuple(t.shape)}"
                )

    def encode_condition(self, y: torch.Tensor) -> Condition:
        """Encode ``y`` (B, C, h, w) into per-scale maps and the vector ``v_y`` (B, d_y)."""
        t = self.cond_block(self.cond_stem(y))  # (B, F, h, w)
        maps = tuple(_resize(proj(t), size) for proj, size in zip(self.cond_proj, self.sizes))
        pooled = torch.cat([t.mean(dim=(2, 3)), t.amax(dim=(2, 3))], dim=1)  # (B, 2F)
        return Condition(maps, self.cond_vec(pooled))  # maps[s]: (B, c_s, H/2**s, W/2**s)

    def posterior(self, x: torch.Tensor, valid: torch.Tensor, cond: Condition):
        """``mu_q, logvar_q`` (B, d_z) of ``q(z | x, y)``."""
        v = valid.to(x.dtype)  # (B, 1, H, W)
        h = self.enc_stem(torch.cat([x * v, v], dim=1))  # (B, w_0, H, W)
        for s in range(1, self.depth + 1):
            h = self.enc_down[s - 1](torch.cat([h, cond.maps[s - 1]], dim=1))  # (B, w_s, H/2**s, W/2**s)
        h = self.enc_reduce(torch.cat([h, cond.maps[self.depth]], dim=1))  # (B, latent_ch, hb, wb)
        h = h.flatten(1)  # (B, latent_ch * hb * wb)
        stats = self.enc_head(torch.cat([h, cond.vector], dim=1))  # (B, 2 d_z)
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def prior(self, cond: Condition):
        """``mu_p, logvar_p`` (B, d_z) of ``p(z | y)``; zeros for the standard prior."""
        v = cond.vector  # (B, d_y)
        if self.prior_net is None:
            zeros = v.new_zeros(v.shape[0], self.d_z)
            return zeros, zeros.clone()
        mu, logvar = self.prior_net(v).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor, cond: Condition, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``z`` (B, d_z) to a field (B, 1, H, W) >= 0, 0 where ``valid`` is False."""
        hb, wb = self.sizes[self.depth]
        h = self.dec_in(torch.cat([z, cond.vector], dim=1))  # (B, latent_ch * hb * wb)
        h = F.silu(h).view(z.shape[0], self.latent_ch, hb, wb)
        h = self.dec_bottom(torch.cat([h, cond.maps[self.depth]], dim=1))  # (B, w_D, hb, wb)
        h = self.dec_bottom_res(h)
        for s in range(self.depth, 0, -1):
            h = self.dec_reduce[s - 1](h)  # (B, w_{s-1}, H/2**s, W/2**s)
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B, w_{s-1}, H/2**(s-1), W/2**(s-1))
            h = self.dec_up[s - 1](torch.cat([h, cond.maps[s - 1]], dim=1))
        out = relu_leaky_grad(self.dec_head(h))  # (B, 1, H, W)
        if valid is not None:
            out = out * valid.to(out.dtype)
        return out

    # ------------------------------------------------------------------ public API

    def forward(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> CVAEOutput:
        """Encode, sample ``z ~ q(z | x, y)`` (reparameterised) and decode.

        Parameters
        ----------
        x : Tensor (B, 1, H, W)
            Target in model space (invalid pixels are ignored).
        y : Tensor (B, C, h, w)
            Normalised condition.
        valid : Tensor (B, 1, H, W), bool
            Pixel validity.

        Returns
        -------
        CVAEOutput
        """
        self._check_inputs(y, valid, x)
        cond = self.encode_condition(y)
        mu_q, logvar_q = self.posterior(x, valid, cond)
        mu_p, logvar_p = self.prior(cond)
        z = mu_q + torch.exp(0.5 * logvar_q) * torch.randn_like(mu_q)  # (B, d_z)
        recon = self.decode(z, cond, valid)
        return CVAEOutput(recon, mu_q, logvar_q, mu_p, logvar_p)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: (B, 1, H, W) in model space."""
        self._check_inputs(y, valid, x)
        cond = self.encode_condition(y)
        mu_q, _ = self.posterior(x, valid, cond)
        return self.decode(mu_q, cond, valid)

    def sample(
        self,
        y: torch.Tensor,
        valid: torch.Tensor | None = None,
        n_samples: int = 1,
        z_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw fields from ``p(x | z, y)`` with ``z = mu_p + z_scale * sigma_p * eps``.

        Parameters
        ----------
        y : Tensor (B, C, h, w)
            Normalised condition.
        valid : Tensor (B, 1, H, W), bool, optional
            Pixels to keep; others are set to 0.  ``None``: keep all.
        n_samples : int
            Samples per condition.
        z_scale : float
            Multiplies the prior standard deviation (``< 1`` for tamer samples).
        generator : torch.Generator, optional
            Source of ``eps``; the same generator state gives the same samples
            (in ``eval()`` mode, where dropout is off).

        Returns
        -------
        Tensor (n_samples, B, 1, H, W)
            Model space, >= 0.

        Notes
        -----
        Gradient tracking follows the caller; wrap in ``torch.no_grad()`` for
        generation.  Samples are decoded one ``n_samples`` slice at a time to bound
        memory.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self._check_inputs(y, valid)
        cond = self.encode_condition(y)
        mu_p, logvar_p = self.prior(cond)  # (B, d_z)
        sigma_p = torch.exp(0.5 * logvar_p)
        eps_device = generator.device if generator is not None else mu_p.device
        eps = torch.randn(
            (n_samples, *mu_p.shape), generator=generator, device=eps_device, dtype=mu_p.dtype
        ).to(mu_p.device)  # (n_samples, B, d_z)
        out = [self.decode(mu_p + z_scale * sigma_p * eps[i], cond, valid) for i in range(n_samples)]
        return torch.stack(out, dim=0)  # (n_samples, B, 1, H, W)


# ----------------------------------------------------------------------------- sizes


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(
    cfg: ModelConfig,
    n_channels: int,
    fine_shape: tuple[int, int],
    coarse_shape: tuple[int, int],
) -> int:
    """Parameters of ``CVAE(cfg, ...)``, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = CVAE(cfg, n_channels, fine_shape, coarse_shape)
    return count_parameters(model)
