"""The conditional VAE: fine-grid daily precipitation ``x`` given coarse predictors ``y``.

Shapes and spaces
-----------------
``x``       (B, 1, H, W)  target in the transformed model space (see
                           :class:`precip_cvae.transform.TargetTransform`), non-negative,
                           invalid pixels hold 0.
``valid``   (B, 1, H, W)  bool, per-pixel validity (sea / missing = False).
``y``       (B, C, h, w)  normalised large-scale predictors on the coarse grid; ``h, w``
                           are arbitrary (they need not be a clean factor of ``H, W``).
``static``  (1, S, H, W)  standardised static fields on the fine grid, fitted on the train
                           split by the training stage and held as a buffer (so a checkpoint
                           carries them): validity, train climatology, threshold maps,
                           coordinates, user fields (:func:`precip_cvae.data.fit_static`).
``z``       (B, d_z) for ``latent='vector'``; (B, latent_channels, H / 2**L, W / 2**L)
            for ``latent='map'`` (``L = latent_level``).

``H`` and ``W`` must be multiples of ``2**depth`` (the data stage pads the grid).

Architecture
------------
Scales ``s = 0..depth`` have resolution ``H / 2**s``.  The condition encoder gives a
map per scale and a global vector ``v_y`` (d_y):

* ``conditioning='fine'``: every predictor is interpolated (bilinear) to the fine grid
  and stacked with the static channels; a strided conv pyramid gives the maps.  ``v_y``
  is an MLP of the *flattened* coarse predictors (every coarse cell keeps its place)
  plus mean/max pooling of the coarsest map.
* ``conditioning='coarse'``: a conv trunk at the coarse resolution, 1x1 projections
  resized to every scale; ``v_y`` from mean/max pooling (the seed's design).

Latent and prior:

* ``latent='vector'``: ``q(z|x,y)`` from strided convs over ``[x * valid, valid]`` with the
  condition maps concatenated, a flattened bottleneck + ``v_y``; ``p(z|y)`` an MLP of
  ``v_y``; the decoder starts from a linear layer of ``[z, v_y]``.
* ``latent='map'``: the posterior encoder stops at scale ``L`` and a 1x1 conv gives
  per-location ``mu_q, logvar_q``; the prior is a conv net over the condition map of
  scale ``L`` (+ ``v_y``); the decoder starts from the condition alone and takes ``z``
  at scale ``L`` (concatenated to its features), so the local detail can differ
  between members.

``prior='standard'`` gives ``N(0, I)`` (zeros) in both cases.  Decoder: from the
bottom, ``depth`` times a 1x1 channel reduction, nearest x2 upsampling, 3x3 conv over
``[h, condition map of that scale]`` (followed by ``decoder_blocks`` residual blocks at that
scale); a 3x3 head.  Channel widths per scale are
``F/2, F, 2F, ..., F * 2**(depth-1)`` (``F`` = ``base_filters``).  GroupNorm
throughout; ``logvar`` is clamped to ``[LOGVAR_MIN, LOGVAR_MAX]``.

Output: a field or a Bernoulli-gamma distribution
--------------------------------------------------
``output='field'`` (the default): the decoder's head is one channel, the field itself.
``output='bernoulli_gamma'``: three channels per pixel, the wet probability ``p``
(sigmoid), the gamma shape ``k`` and scale ``theta`` (softplus, mm/day) of the wet
amount (Cannon 2008; Baño-Medina et al. 2020): ``pr = 0`` with probability ``1 - p``,
else ``pr ~ Gamma(k, theta)``.  A field is then a draw of every pixel (independent
given ``z`` and the condition), mapped to model space with the target transform the
model carries (:class:`~precip_cvae.transform.TargetTransform`, in ``model_args``).
Training draws are differentiable: the gamma amount is reparameterised
(``torch._standard_gamma`` has a pathwise gradient) and the wet/dry choice is a
straight-through Bernoulli (forward the hard draw, backward the gradient of ``p``).

Residual mode
-------------
``residual=True`` (``model.residual``): a deterministic decoder of the condition alone
predicts the conditional mean ``m(y)`` in model space (trained with a squared error, a
proper score for the mean), and the cVAE generates the residual: a field is
``relu(m(y) + r(z, y))`` with ``r`` the raw output of the stochastic decoder (the split of
CorrDiff, Mardani et al. 2024).  ``m`` enters the field without gradient, so the
generative terms shape the residual and only the mean's own loss shapes ``m``.

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

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .transform import TargetTransform

LOGVAR_MIN = -10.0
LOGVAR_MAX = 6.0
OUTPUT_GRAD_LEAK = 0.1
#: Decoder outputs: the field itself, or the parameters of a per-pixel Bernoulli-gamma law.
OUTPUTS = ("field", "bernoulli_gamma")
#: Smallest gamma shape and scale (mm/day) the head can give, so the log-density stays finite.
GAMMA_MIN = 1.0e-3

__all__ = [
    "CVAE",
    "CVAEOutput",
    "Condition",
    "count_parameters",
    "parameter_count",
    "relu_leaky_grad",
    "BernoulliGamma",
    "bernoulli_gamma_draw",
    "bernoulli_gamma_draw_correlated",
    "gaussian_field",
    "OUTPUTS",
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
    mu_q, logvar_q : Tensor (B, d_z) or (B, c_z, h_z, w_z)
        Posterior ``q(z | x, y)`` mean and log-variance.
    mu_p, logvar_p : Tensor, same shape
        Prior ``p(z | y)`` mean and log-variance (zeros for ``prior='standard'``).
    prior_samples : Tensor (M, B, 1, H, W) or None
        ``M = n_prior`` fields decoded from reparameterised prior draws (gradients flow
        through the prior and the decoder), for the ensemble terms of the loss.
    recon_law : BernoulliGamma or None
        ``output='bernoulli_gamma'``: the law decoded from the posterior draw (its
        negative log-likelihood is the reconstruction term); ``recon`` is then its mean,
        in model space.
    mean : Tensor (B, 1, H, W) or None
        ``residual=True``: the deterministic conditional mean ``m(y)`` in model space (with
        gradient, for its own loss).
    """

    recon: torch.Tensor
    mu_q: torch.Tensor
    logvar_q: torch.Tensor
    mu_p: torch.Tensor
    logvar_p: torch.Tensor
    prior_samples: torch.Tensor | None = None
    recon_law: "BernoulliGamma | None" = None
    mean: torch.Tensor | None = None


class BernoulliGamma(NamedTuple):
    """A per-pixel Bernoulli-gamma law of precipitation in mm/day, each (B, 1, H, W).

    ``pr = 0`` with probability ``1 - p``; else ``pr ~ Gamma(shape, scale)``.
    """

    p: torch.Tensor
    shape: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_head(cls, a: torch.Tensor) -> "BernoulliGamma":
        """From the head's three raw channels (B, 3, H, W)."""
        return cls(torch.sigmoid(a[:, 0:1]), F.softplus(a[:, 1:2]) + GAMMA_MIN, F.softplus(a[:, 2:3]) + GAMMA_MIN)

    def mean_mm(self) -> torch.Tensor:
        """``p * shape * scale`` (mm/day)."""
        return self.p * self.shape * self.scale


def bernoulli_gamma_draw(law: BernoulliGamma, generator: torch.Generator | None = None,
                         straight_through: bool = False) -> torch.Tensor:
    """One draw (mm/day) per pixel of ``law``.

    ``straight_through``: differentiable in ``p`` (the hard wet/dry draw forward, the
    gradient of ``p`` backward) as well as in shape and scale (pathwise gamma gradient).
    ``generator`` (on the law's device or the CPU) makes the draw reproducible.
    """
    device = generator.device if generator is not None else law.p.device
    u = torch.rand(law.p.shape, generator=generator, device=device, dtype=law.p.dtype).to(law.p.device)
    wet = (u < law.p).to(law.p.dtype)
    if straight_through:
        wet = wet + law.p - law.p.detach()
    k = law.shape
    if generator is not None and k.device != device:
        g = torch._standard_gamma(k.detach().to(device), generator=generator).to(k.device)
        # the pathwise gradient of a gamma draw g(k): d g / d k from torch's own formula
        g = g + (k - k.detach()) * torch._standard_gamma_grad(k.detach(), g) if k.requires_grad else g
    else:
        g = torch._standard_gamma(k, generator=generator)
    return wet * g * law.scale


def gaussian_field(shape: tuple[int, ...], length: float, generator: torch.Generator | None = None,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal fields (B, C, H, W), each value N(0, 1), correlated over about ``length`` cells.

    White noise on a grid padded by ``ceil(3 length)`` cells a side, smoothed by a separable Gaussian of standard
    deviation ``length`` whose weights are scaled to unit sum of squares, then cut to (H, W): every value is a
    weighted sum of the same number of independent N(0, 1) (unit variance everywhere, edges included); the
    correlation of two cells ``d`` apart is ``exp(-d**2 / (4 length**2))``.  ``length`` 0: white noise.
    """
    b, c, h, w = shape
    gen_device = generator.device if generator is not None else device
    if length <= 0:
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    r = int(math.ceil(3 * length))
    noise = torch.randn((b * c, 1, h + 2 * r, w + 2 * r), generator=generator, device=gen_device, dtype=dtype).to(device)
    t = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / length) ** 2)
    k = k / torch.sqrt((k * k).sum())
    out = F.conv2d(F.conv2d(noise, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))  # (B C, 1, H, W)
    return out.view(b, c, h, w)


def bernoulli_gamma_draw_correlated(law: BernoulliGamma, length: float,
                                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw (mm/day) per pixel of ``law`` from spatially correlated uniforms (a Gaussian copula).

    Two fields of :func:`gaussian_field` with correlation length ``length`` cells become uniforms
    (``u = Phi(g)``); a pixel is wet when ``u_wet < p`` and its amount is the gamma quantile of ``u_amount``
    (``scipy.special.gammaincinv``).  Each pixel's law is exactly ``law`` (the marginals of
    :func:`bernoulli_gamma_draw`); neighbours share their draws, so wet areas and heavy amounts come in patches
    rather than as independent speckle.  For sampling (no gradient).
    """
    from scipy.special import gammaincinv

    p = law.p
    u = torch.special.ndtr(gaussian_field((p.shape[0], 2, *p.shape[-2:]), length, generator, p.device,
                                          torch.float64))  # (B, 2, H, W) in (0, 1)
    wet = u[:, 0:1] < p.double()
    q = gammaincinv(law.shape.double().cpu().numpy(), u[:, 1:2].cpu().numpy())
    amount = torch.from_numpy(q).to(p.device) * law.scale.double()
    return (wet * amount).to(p.dtype)


class Condition(NamedTuple):
    """The encoded condition.

    Attributes
    ----------
    maps : tuple of Tensor
        ``maps[s]`` is (B, c_s, H / 2**s, W / 2**s) for ``s = 0..depth``.
    vector : Tensor (B, d_y)
        Global condition vector ``v_y``.
    mean : Tensor (B, 1, H, W) or None
        Residual mode: the conditional mean ``m(y)`` in model space, set by the model.
    """

    maps: tuple[torch.Tensor, ...]
    vector: torch.Tensor
    mean: torch.Tensor | None = None  # residual mode: m(y) (B, 1, H, W), once per condition


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


class _ChannelNorm(nn.Module):
    """Normalisation over the channels of each pixel (a layer norm on dim 1, with a per-channel scale and
    shift): no statistic crosses pixels, so a window of a field is normalised as it is inside the field."""

    def __init__(self, ch: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.eps = eps

    def forward(self, h):
        h = F.layer_norm(h.movedim(1, -1), (h.shape[1],), self.weight, self.bias, self.eps)
        return h.movedim(-1, 1)


def _norm(ch: int, local: bool) -> nn.Module:
    """GroupNorm over each group's channels and the whole map (global), or a per-pixel channel norm (local)."""
    return _ChannelNorm(ch) if local else nn.GroupNorm(_groups(ch), ch)


def _groups(ch: int) -> int:
    """Largest divisor of ``ch`` that is <= 8 and leaves >= 2 channels per group."""
    for g in range(min(8, max(ch // 2, 1)), 0, -1):
        if ch % g == 0:
            return g
    return 1


class _ConvAct(nn.Sequential):
    """3x3 conv (optionally strided) -> GroupNorm (or the per-pixel norm, ``local``) -> SiLU -> Dropout2d."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0, local: bool = False):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            _norm(c_out, local),
            nn.SiLU(),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )


class _ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, ch: int, dropout: float = 0.0, local: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            _norm(ch, local),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch, local),
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


def _broadcast(v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C) -> (B, C, *size); a local vector map (B, C, h, w) -> its nearest upsampling to ``size``."""
    if v.ndim == 4:
        return v if tuple(v.shape[-2:]) == tuple(size) else F.interpolate(v, size=tuple(size), mode="nearest")
    return v[:, :, None, None].expand(-1, -1, *size)


def _per_pixel(layers: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` (Linear, activations) to a vector (B, C) or to every pixel of a map (B, C, h, w)."""
    if v.ndim == 4:
        return layers(v.movedim(1, -1)).movedim(-1, 1)
    return layers(v)


class Window(NamedTuple):
    """A window of the fine grid per sample: rows ``top[b] : top[b] + size[0]``, columns ``left[b] : left[b] +
    size[1]`` (a training patch, or a tile of inference).  Offsets are multiples of ``2**depth`` so every scale of
    the window lies on the field's own cells."""

    top: torch.Tensor  # (B,) long
    left: torch.Tensor  # (B,) long
    size: tuple[int, int]

    @classmethod
    def fixed(cls, top: int, left: int, size: tuple[int, int], batch: int, device=None) -> "Window":
        """The same window for ``batch`` samples."""
        full = lambda v: torch.full((batch,), int(v), dtype=torch.long, device=device)  # noqa: E731
        return cls(full(top), full(left), (int(size[0]), int(size[1])))

    def scaled(self, s: int) -> "Window":
        """The window at scale ``s`` (resolution / 2**s)."""
        f = 2**s
        return Window(self.top // f, self.left // f, (self.size[0] // f, self.size[1] // f))

    def cells(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's row (B, h) and column (B, w) indices of the field."""
        rows = self.top.to(device)[:, None] + torch.arange(self.size[0], device=device)
        cols = self.left.to(device)[:, None] + torch.arange(self.size[1], device=device)
        return rows, cols

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """(1 or B, C, H, W) -> (B, C, h, w): each sample's window (a field shared by the batch is cropped for
        every sample)."""
        B = self.top.shape[0]
        rows, cols = self.cells(t.device)
        t = t.expand(B, *t.shape[1:]) if t.shape[0] == 1 else t
        b = torch.arange(B, device=t.device)[:, None, None]
        return t.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- model


class CVAE(nn.Module):
    """Conditional VAE for fine-grid precipitation given coarse predictors.

    Parameters
    ----------
    cfg : ModelConfig
        Sizes (``base_filters``, ``d_y``, ``d_z``, ``depth``), dropouts, prior kind,
        ``latent`` (map | vector), ``latent_level``, ``latent_channels`` and
        ``conditioning`` (fine | coarse).
    n_channels : int
        Number of condition channels ``C`` in ``y``.
    fine_shape : (int, int)
        ``(H, W)`` of the target grid; both must be multiples of ``2**depth``.
    coarse_shape : (int, int)
        ``(h, w)`` of the condition grid (any size; only checked to be positive).
    n_static : int
        Static fine-grid channels (``conditioning='fine'`` only; set their values with
        :meth:`set_static`, they are saved with the weights).
    output : {'field', 'bernoulli_gamma'}
        What the decoder gives (see the module docstring).
    transform : TargetTransform, optional
        mm/day <-> model space; needed for ``output='bernoulli_gamma'``, whose law is in mm/day.

    Raises
    ------
    ValueError
        If ``fine_shape`` is not divisible by ``2**depth`` (message names the shape,
        the depth and the required multiple), ``latent_level`` is outside ``1..depth``
        or a size is not positive.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_channels: int,
        fine_shape: tuple[int, int],
        coarse_shape: tuple[int, int],
        n_static: int = 0,
        output: str = "field",
        transform: TargetTransform | None = None,
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"model output {output!r} is not one of {list(OUTPUTS)}")
        if output == "bernoulli_gamma" and transform is None:
            raise ValueError("output 'bernoulli_gamma' needs the target transform (its law is in mm/day)")
        self.output = output
        self.transform = transform
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
        if cfg.latent == "map" and not 1 <= int(cfg.latent_level) <= depth:
            raise ValueError(f"model.latent_level {cfg.latent_level} must be in 1..depth ({depth})")
        if cfg.conditioning != "fine" and n_static:
            raise ValueError("static fine-grid channels need model.conditioning 'fine'")
        self.local = getattr(cfg, "context", "global") == "local"
        if self.local and (cfg.latent != "map" or cfg.conditioning != "fine"):
            raise ValueError(f"model.context 'local' needs model.latent 'map' and model.conditioning 'fine' (got "
                             f"{cfg.latent!r} and {cfg.conditioning!r}): a vector latent or a coarse-grid encoder "
                             "sees the whole field at once")
        #: local: the condition vector of a cell pools the coarsest condition map over (2 r + 1)^2 cells around it
        self.pool_radius = max(1, math.ceil(int(getattr(cfg, "context_cells", 32)) / 2 / 2**depth)) if self.local else 0

        self.cfg = cfg
        self.n_channels = int(n_channels)
        self.n_static = int(n_static)
        self.fine_shape = fine_shape
        self.coarse_shape = coarse_shape
        self.depth = depth
        self.latent = cfg.latent
        self.level = int(cfg.latent_level) if cfg.latent == "map" else depth
        self.d_z = int(cfg.d_z)
        self.z_ch = int(cfg.latent_channels)
        self.d_y = int(cfg.d_y)
        self.fine_condition = cfg.conditioning == "fine"
        self.noise_ch = int(getattr(cfg, "noise_channels", 0))
        self.g = int(getattr(cfg, "global_latent", 0))
        if self.g and (cfg.latent != "map" or self.local):
            raise ValueError("model.global_latent needs model.latent 'map' and model.context 'global'")
        self.hierarchical = bool(getattr(cfg, "hierarchical_prior", False))
        if self.hierarchical and (not self.g or cfg.prior != "learned"):
            raise ValueError("model.hierarchical_prior needs model.global_latent > 0 and model.prior 'learned'")
        self.bg_correlation = float(getattr(cfg, "bg_correlation", 0.0))
        fb = int(cfg.base_filters)
        p_enc, p_dec = float(cfg.dropout_encoder), float(cfg.dropout_decoder)

        # channel widths per scale s (resolution H / 2**s): F/2, F, 2F, ..., F * 2**(depth-1)
        self.widths = [max(fb // 2, 4)] + [fb * 2 ** (s - 1) for s in range(1, depth + 1)]
        div = 2 if self.fine_condition else 4
        self.cond_widths = [max(4, w // div) for w in self.widths]
        self.sizes = [(fine_shape[0] >> s, fine_shape[1] >> s) for s in range(depth + 1)]
        self.latent_ch = max(8, self.widths[depth] // 4)  # channels of the decoder's first (bottom) map
        self.register_buffer("static", torch.zeros(1, self.n_static, *fine_shape))
        self.geographic = self.fine_condition and getattr(cfg, "condition_interpolation", "index") == "geographic"
        if self.geographic:  # where each fine cell lies in the predictor grid, for F.grid_sample (x, y in [-1, 1])
            self.register_buffer("cond_grid", torch.zeros(1, *fine_shape, 2))
        # the parts, built in this order (the order the weights are drawn in at a seed)
        self._build_condition_encoder(p_enc)
        self._build_posterior(p_enc)
        self._build_prior(cfg.prior)
        self._build_decoder(p_dec)
        self.residual = bool(getattr(cfg, "residual", False))
        if self.residual and output != "field":
            raise ValueError("model.residual needs the decoder output 'field' (not a Bernoulli-gamma law)")
        if self.residual:
            self._build_mean()
        self._build_head(output)
        if self.g:  # built last, so a model without it draws the same weights at a seed as before the option
            self._build_global_latent(p_enc)

    # ------------------------------------------------------------------ the parts

    def _build_condition_encoder(self, p_enc: float) -> None:
        """The condition encoder: maps per scale (``cond_stem``, ``cond_down`` or ``cond_proj``) and the vector
        ``v_y`` (``cond_vec``); fine: predictors on the target grid with the static channels, coarse: on their
        own grid."""
        cw, depth, n_channels = self.cond_widths, self.depth, self.n_channels
        if self.fine_condition:
            c_in = n_channels + self.n_static
            lc = self.local
            self.cond_stem = _ConvAct(c_in, cw[0], dropout=p_enc, local=lc)
            self.cond_down = nn.ModuleList(
                _ConvAct(cw[s - 1], cw[s], stride=2, dropout=p_enc, local=lc) for s in range(1, depth + 1)
            )
            # global: the flattened coarse predictors and the whole map pooled; local: the map pooled around each cell
            n_flat = 0 if lc else n_channels * self.coarse_shape[0] * self.coarse_shape[1]
            self.cond_vec = nn.Sequential(
                nn.Linear(n_flat + 2 * cw[depth], self.d_y),
                nn.SiLU(),
                nn.Dropout(p_enc) if p_enc > 0 else nn.Identity(),
                nn.Linear(self.d_y, self.d_y),
                nn.SiLU(),
            )
        else:
            c_trunk = int(self.cfg.base_filters)
            self.cond_stem = _ConvAct(n_channels, c_trunk, dropout=p_enc)
            self.cond_block = _ResBlock(c_trunk, dropout=p_enc)
            self.cond_proj = nn.ModuleList(nn.Conv2d(c_trunk, c, 1) for c in cw)
            self.cond_vec = nn.Sequential(
                nn.Linear(2 * c_trunk, self.d_y),
                nn.SiLU(),
                nn.Dropout(p_enc) if p_enc > 0 else nn.Identity(),
            )

    def _build_posterior(self, p_enc: float) -> None:
        """The posterior encoder q(z | x, y): the condition map of scale s is concatenated to the input of the
        strided conv that leaves scale s, so every scale is injected once."""
        w, cw, L = self.widths, self.cond_widths, self.level
        lc = self.local
        self.enc_stem = _ConvAct(2, w[0], local=lc)
        self.enc_down = nn.ModuleList(
            _ConvAct(w[s - 1] + cw[s - 1], w[s], stride=2, dropout=p_enc, local=lc) for s in range(1, L + 1)
        )
        if self.latent == "map":
            self.enc_head = nn.Sequential(
                _ConvAct(w[L] + cw[L], w[L], local=lc),
                nn.Conv2d(w[L], 2 * self.z_ch, 1),
            )
        else:
            hb, wb = self.sizes[self.depth]
            self.enc_reduce = nn.Conv2d(w[self.depth] + cw[self.depth], self.latent_ch, 1)
            self.enc_head = nn.Linear(self.latent_ch * hb * wb + self.d_y, 2 * self.d_z)

    def _build_prior(self, prior: str) -> None:
        """The prior p(z | y): learned from the condition, or none (the standard normal)."""
        w, cw, L = self.widths, self.cond_widths, self.level
        self.prior_net = None
        if prior != "learned":
            return
        if self.latent == "map":
            self.prior_net = nn.Sequential(
                _ConvAct(cw[L] + self.d_y, w[L], local=self.local),
                nn.Conv2d(w[L], 2 * self.z_ch, 1),
            )
        else:
            self.prior_net = nn.Sequential(
                nn.Linear(self.d_y, self.d_y),
                nn.SiLU(),
                nn.Linear(self.d_y, 2 * self.d_z),
            )

    def _z_channels_at(self, s: int) -> int:
        """Channels of fresh input the decoder takes at scale ``s``: a map latent at its level, noise channels
        (no KL) at every finer scale."""
        at_latent = self.z_ch if (self.latent == "map" and s == self.level) else 0
        return at_latent + (self.noise_ch if s < self.level else 0)

    def _build_decoder(self, p_dec: float) -> None:
        """The decoder p(x | z, y): from the bottom map up, each scale s -> s-1 a 1x1 channel reduction at scale s
        (cheap), nearest x2 upsampling, then a 3x3 conv over [h, condition map of scale s-1 (, z)]."""
        w, cw, depth = self.widths, self.cond_widths, self.depth
        bottom = w[depth]
        if self.latent == "map":
            self.dec_in = nn.Linear(self.d_y, self.latent_ch)  # broadcast over the bottom map
        else:
            hb, wb = self.sizes[depth]
            self.dec_in = nn.Linear(self.d_z + self.d_y, self.latent_ch * hb * wb)
        lc = self.local
        self.dec_bottom = _ConvAct(self.latent_ch + cw[depth] + self._z_channels_at(depth), bottom, dropout=p_dec,
                                   local=lc)
        self.dec_bottom_res = _ResBlock(bottom, dropout=p_dec, local=lc)
        self.dec_reduce = nn.ModuleList(nn.Conv2d(w[s], w[s - 1], 1) for s in range(1, depth + 1))
        self.dec_up = nn.ModuleList(
            _ConvAct(w[s - 1] + cw[s - 1] + self._z_channels_at(s - 1), w[s - 1], dropout=p_dec, local=lc)
            for s in range(1, depth + 1)
        )
        # a deeper decoder: residual blocks after each scale's conv (built last, so a model without them draws the
        # same weights at a seed as before the option)
        n_blocks = int(getattr(self.cfg, "decoder_blocks", 0))
        self.dec_blocks = None
        if n_blocks:
            self.dec_blocks = nn.ModuleList(
                nn.Sequential(*(_ResBlock(w[s - 1], dropout=p_dec, local=lc) for _ in range(n_blocks)))
                for s in range(1, depth + 1)
            )

    def _build_global_latent(self, p_enc: float) -> None:
        """``global_latent``: g numbers for the whole field. The posterior reads the mean and maximum of the
        encoder's map at the latent's level with the condition vector; the learned prior reads the condition
        vector; the decoder takes them at its bottom with the condition vector (``dec_in``)."""
        w, cw, L = self.widths, self.cond_widths, self.level
        self.enc_global = nn.Sequential(
            nn.Linear(2 * (w[L] + cw[L]) + self.d_y, self.d_y),
            nn.SiLU(),
            nn.Dropout(p_enc) if p_enc > 0 else nn.Identity(),
            nn.Linear(self.d_y, 2 * self.g),
        )
        self.prior_global = None
        if self.prior_net is not None:
            self.prior_global = nn.Sequential(nn.Linear(self.d_y, self.d_y), nn.SiLU(), nn.Linear(self.d_y, 2 * self.g))
        # the decoder's bottom vector reads [v_y, z_global]: a new input layer (drawn here, after every other part)
        self.dec_in = nn.Linear(self.d_y + self.g, self.latent_ch)
        self.prior_from_global = None
        if self.hierarchical:  # p(z_map | y, z_global): a shift of the map prior's mean and log-variance per cell,
            # from the condition map at the latent's level and the global numbers; zero at the start (the prior
            # begins as the factorised one)
            self.prior_from_global = nn.Sequential(nn.Conv2d(cw[L] + self.g, w[L], 1), nn.SiLU(),
                                                   nn.Conv2d(w[L], 2 * self.z_ch, 1))
            with torch.no_grad():
                self.prior_from_global[-1].weight.zero_()
                self.prior_from_global[-1].bias.zero_()

    def _pack(self, z_map: torch.Tensor, z_global: torch.Tensor | None) -> torch.Tensor:
        """One latent tensor per sample: the map itself, or [map flattened, global] (B, c_z h_z w_z + g)."""
        return z_map if not self.g else torch.cat([z_map.flatten(1), z_global], dim=1)

    def _unpack(self, z: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_pack`'s inverse: the map (B, c_z, *size) and the global part (B, g) or None."""
        if not self.g:
            return z, None
        n = self.z_ch * size[0] * size[1]
        return z[:, :n].reshape(z.shape[0], self.z_ch, *size), z[:, n:]

    def _build_mean(self) -> None:
        """The conditional mean m(y) of ``model.residual``: the decoder's shape, without z, without dropout."""
        w, cw, depth = self.widths, self.cond_widths, self.depth
        lc = self.local
        self.mean_bottom = _ConvAct(cw[depth], w[depth], local=lc)
        self.mean_reduce = nn.ModuleList(nn.Conv2d(w[s], w[s - 1], 1) for s in range(1, depth + 1))
        self.mean_up = nn.ModuleList(_ConvAct(w[s - 1] + cw[s - 1], w[s - 1], local=lc) for s in range(1, depth + 1))
        self.mean_head = nn.Conv2d(w[0], 1, 3, padding=1)

    def _build_head(self, output: str) -> None:
        """The output head: one field channel, or the three of a Bernoulli-gamma law, with its starting bias."""
        self.dec_head = nn.Conv2d(self.widths[0], 3 if output == "bernoulli_gamma" else 1, 3, padding=1)
        with torch.no_grad():
            if output == "bernoulli_gamma":
                # start at p = 0.5, shape ~0.7 and scale ~5 mm/day: a wet-day mean of a few mm
                self.dec_head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
            else:
                # start slightly wet so few pixels begin on the ReLU's flat side
                self.dec_head.bias.fill_(0.1)

    # ------------------------------------------------------------------ building blocks

    def set_static(self, static: torch.Tensor) -> None:
        """Set the static channels (S, H, W) or (1, S, H, W); finite values only."""
        static = torch.as_tensor(static, dtype=self.static.dtype).reshape(self.static.shape)
        if not bool(torch.isfinite(static).all()):
            raise ValueError("static channels must be finite (fill invalid pixels before)")
        with torch.no_grad():
            self.static.copy_(static.to(self.static.device))

    def set_condition_grid(self, grid: torch.Tensor) -> None:
        """Set where each fine cell lies in the predictor grid: (H, W, 2) or (1, H, W, 2), (x, y) in [-1, 1]
        (``align_corners=True``: -1 and 1 are the first and last predictor cells' centres)."""
        if not self.geographic:
            raise ValueError("a condition grid needs model.condition_interpolation 'geographic'")
        grid = torch.as_tensor(grid, dtype=self.cond_grid.dtype).reshape(self.cond_grid.shape)
        if not bool(torch.isfinite(grid).all()):
            raise ValueError("the condition grid must be finite")
        with torch.no_grad():
            self.cond_grid.copy_(grid.to(self.cond_grid.device))

    def latent_shape(self, window: Window | None = None) -> tuple[int, ...]:
        """Shape of one sample's ``z``: (d_z,) or (latent_channels, H / 2**L, W / 2**L) (of ``window``'s size)."""
        if self.latent == "map":
            size = self.sizes[self.level] if window is None else window.scaled(self.level).size
            return (self.z_ch * size[0] * size[1] + self.g,) if self.g else (self.z_ch, *size)
        return (self.d_z,)

    def _check_window(self, window: Window | None, batch: int) -> None:
        if window is None:
            return
        if not self.local:
            raise ValueError("a window of the field (patch training, tiled sampling) needs model.context 'local'")
        m, (H, W) = 2**self.depth, self.fine_shape
        h, w = window.size
        if h < m or w < m or h % m or w % m or window.top.shape != (batch,) or window.left.shape != (batch,):
            raise ValueError(f"a window must be a multiple of 2**depth = {m} in both sizes with one offset per "
                             f"sample ({batch}), got size {window.size} and {tuple(window.top.shape)} offsets")
        top, left = window.top.cpu(), window.left.cpu()
        if bool((top % m).any() or (left % m).any() or (top < 0).any() or (left < 0).any()
                or (top + h > H).any() or (left + w > W).any()):
            raise ValueError(f"window offsets must be multiples of {m} and keep the {window.size} window inside "
                             f"the {self.fine_shape} grid")

    def _check_inputs(self, y: torch.Tensor, valid: torch.Tensor | None, x: torch.Tensor | None = None,
                      window: Window | None = None):
        if y.ndim != 4 or y.shape[1] != self.n_channels:
            raise ValueError(f"y must be (B, {self.n_channels}, h, w), got {tuple(y.shape)}")
        if self.fine_condition and tuple(y.shape[-2:]) != self.coarse_shape:
            raise ValueError(f"y must be on the {self.coarse_shape} grid the model was built for, got "
                             f"{tuple(y.shape[-2:])}")
        self._check_window(window, y.shape[0])
        H, W = self.fine_shape if window is None else window.size
        for name, t in (("x", x), ("valid", valid)):
            if t is None:
                continue
            if t.ndim != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != (H, W) or t.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{name} must be (B, 1, {H}, {W}) with B = {y.shape[0]} as in y, got {tuple(t.shape)}"
                )

    def _fine_input(self, y: torch.Tensor, window: Window | None) -> torch.Tensor:
        """The predictors at the fine cells (of ``window``) with the static channels: (B, C + S, H, W)."""
        B = y.shape[0]
        if self.geographic:  # each cell's own position in the predictor grid (clamped at its edges)
            grid = self.cond_grid.expand(B, -1, -1, -1)
            if window is not None:
                grid = window.crop(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            inp = F.grid_sample(y, grid.to(y.dtype), mode="bilinear", padding_mode="border", align_corners=True)
        elif not self.local:
            inp = F.interpolate(y, size=self.fine_shape, mode="bilinear", align_corners=False)  # (B, C, H, W)
        else:  # local: F.interpolate's sampling points written out, so a window gets exactly its cells' values
            H, W = self.fine_shape
            w = window if window is not None else Window.fixed(0, 0, self.fine_shape, B, y.device)
            rows, cols = w.cells(y.device)  # (B, h), (B, w)
            gy = ((2 * rows + 1) / H - 1).to(y.dtype)[:, :, None].expand(-1, -1, w.size[1])
            gx = ((2 * cols + 1) / W - 1).to(y.dtype)[:, None, :].expand(-1, w.size[0], -1)
            inp = F.grid_sample(y, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                                align_corners=False)  # (B, C, h, w)
        if self.n_static:
            static = self.static.expand(B, -1, -1, -1)
            inp = torch.cat([inp, (static if window is None else window.crop(static)).to(y.dtype)], dim=1)
        return inp

    def encode_condition(self, y: torch.Tensor, window: Window | None = None) -> Condition:
        """Encode ``y`` (B, C, h, w) into per-scale maps and the vector ``v_y``: (B, d_y), or (B, d_y, H / 2**depth,
        W / 2**depth) for ``context='local'``, where a ``window`` of the field can be encoded alone."""
        self._check_window(window, y.shape[0])
        if self.fine_condition:
            h = self.cond_stem(self._fine_input(y, window))  # (B, c_0, H, W)
            maps = [h]
            for down in self.cond_down:
                h = down(h)  # (B, c_s, H/2**s, W/2**s)
                maps.append(h)
            if self.local:  # mean and max over the (2 r + 1)^2 cells around each cell (those inside the window)
                k, r = 2 * self.pool_radius + 1, self.pool_radius
                pooled = torch.cat([F.avg_pool2d(h, k, 1, r, count_include_pad=False), F.max_pool2d(h, k, 1, r)],
                                   dim=1)  # (B, 2 c_D, H/2**D, W/2**D)
                return Condition(tuple(maps), _per_pixel(self.cond_vec, pooled))
            pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2 c_D)
            return Condition(tuple(maps), self.cond_vec(torch.cat([y.flatten(1), pooled], dim=1)))
        t = self.cond_block(self.cond_stem(y))  # (B, F, h, w)
        maps = tuple(_resize(proj(t), size) for proj, size in zip(self.cond_proj, self.sizes))
        pooled = torch.cat([t.mean(dim=(2, 3)), t.amax(dim=(2, 3))], dim=1)  # (B, 2F)
        return Condition(maps, self.cond_vec(pooled))  # maps[s]: (B, c_s, H/2**s, W/2**s)

    def posterior(self, x: torch.Tensor, valid: torch.Tensor, cond: Condition):
        """``mu_q, logvar_q`` of ``q(z | x, y)``: (B, d_z) or (B, c_z, h_z, w_z)."""
        v = valid.to(x.dtype)  # (B, 1, H, W)
        h = self.enc_stem(torch.cat([x * v, v], dim=1))  # (B, w_0, H, W)
        for s in range(1, self.level + 1):
            h = self.enc_down[s - 1](torch.cat([h, cond.maps[s - 1]], dim=1))  # (B, w_s, H/2**s, W/2**s)
        if self.latent == "map":
            feats = torch.cat([h, cond.maps[self.level]], dim=1)
            stats = self.enc_head(feats)  # (B, 2 c_z, h_z, w_z)
            if self.g:
                pooled = torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3)), cond.vector], dim=1)
                mu_g, lv_g = self.enc_global(pooled).chunk(2, dim=1)  # (B, g) each
                mu, logvar = stats.chunk(2, dim=1)
                stats = torch.cat([self._pack(mu, mu_g), self._pack(logvar, lv_g)], dim=1)  # (B, 2 (n + g))
        else:
            h = self.enc_reduce(torch.cat([h, cond.maps[self.depth]], dim=1))  # (B, latent_ch, hb, wb)
            stats = self.enc_head(torch.cat([h.flatten(1), cond.vector], dim=1))  # (B, 2 d_z)
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def prior(self, cond: Condition, z_global: torch.Tensor | None = None):
        """``mu_p, logvar_p`` of ``p(z | y)`` (shape of the posterior's); zeros for the standard prior.

        ``hierarchical_prior``: the map part is ``p(z_map | y, z_global)`` and needs ``z_global`` (B, g), the global
        numbers it is conditioned on (the posterior's draw for the KL; :meth:`draw_prior` draws them from the prior).
        """
        v = cond.vector  # (B, d_y) or (B, d_y, H/2**D, W/2**D)
        if self.prior_net is None:
            zeros = v.new_zeros(v.shape[0], *self.latent_shape_of(cond))
            return zeros, zeros.clone()
        if self.latent == "map":
            size = tuple(cond.maps[self.level].shape[-2:])
            stats = self.prior_net(torch.cat([cond.maps[self.level], _broadcast(v, size)], dim=1))
            if self.g:
                mu, logvar = stats.chunk(2, dim=1)
                mu_g, lv_g = self.prior_global(v).chunk(2, dim=1)
                if self.hierarchical:
                    if z_global is None:
                        raise ValueError("model.hierarchical_prior: the map's prior needs the global numbers z_global")
                    mu, logvar = self._given_global(mu, logvar, cond.maps[self.level], z_global)
                stats = torch.cat([self._pack(mu, mu_g), self._pack(logvar, lv_g)], dim=1)
        else:
            stats = self.prior_net(v)
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _given_global(self, mu: torch.Tensor, logvar: torch.Tensor, cond_map: torch.Tensor,
                      z_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map prior's (B, c_z, h_z, w_z) mean and log-variance shifted by ``prior_from_global`` of the condition
        map at the latent's level (B, c, h_z, w_z) and the global numbers (B, g)."""
        size = tuple(cond_map.shape[-2:])
        shift = self.prior_from_global(torch.cat([cond_map, _broadcast(z_global, size)], dim=1))
        d_mu, d_lv = shift.chunk(2, dim=1)
        return mu + d_mu, logvar + d_lv

    def draw_prior(self, cond: Condition, n: int, z_scale: float = 1.0, generator=None) -> torch.Tensor:
        """(n, B, *latent_shape) draws of the prior: ``mu_p + z_scale * sigma_p * eps`` with one ``eps`` of that
        shape.  ``hierarchical_prior``: the global numbers first (their part of ``eps``), then the map given each
        member's own global numbers (the rest of ``eps``)."""
        if not self.hierarchical:
            mu_p, logvar_p = self.prior(cond)
            return self._prior_draws(mu_p, logvar_p, n, z_scale, generator)
        v = cond.vector
        B = v.shape[0]
        mu_g, lv_g = self.prior_global(v).chunk(2, dim=1)  # (B, g)
        lv_g = lv_g.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps_device = generator.device if generator is not None else v.device
        eps = torch.randn((n, B, *self.latent_shape_of(cond)), generator=generator, device=eps_device,
                          dtype=v.dtype).to(v.device)
        z_g = mu_g + z_scale * torch.exp(0.5 * lv_g) * eps[..., -self.g:]  # (n, B, g)
        rep = lambda t: t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731 -- member-major, as z_g.reshape
        # the prior reads the condition map at the latent's level and the vector: those repeated for the n members
        maps = tuple(rep(m) if i == self.level else m for i, m in enumerate(cond.maps))
        mu_p, logvar_p = self.prior(Condition(maps, rep(v)), z_g.reshape(n * B, self.g))  # (n B, n_map + g)
        k = mu_p.shape[1] - self.g  # the map's numbers; the global ones are z_g itself
        z_map = mu_p[:, :k] + z_scale * torch.exp(0.5 * logvar_p[:, :k]) * eps.reshape(n * B, -1)[:, :k]
        return torch.cat([z_map.view(n, B, k), z_g], dim=-1)

    def latent_shape_of(self, cond: Condition) -> tuple[int, ...]:
        """:meth:`latent_shape` of the field ``cond`` encodes."""
        size = tuple(cond.maps[self.level].shape[-2:])
        if self.latent == "map":
            return (self.z_ch * size[0] * size[1] + self.g,) if self.g else (self.z_ch, *size)
        return (self.d_z,)

    def decode(self, z: torch.Tensor, cond: Condition, valid: torch.Tensor | None = None,
               generator: torch.Generator | None = None, straight_through: bool = False,
               noise: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Decode ``z`` to a field (B, 1, H, W) >= 0 in model space, 0 where ``valid`` is False.

        With ``noise_channels`` > 0, fresh N(0, 1) noise (from ``generator`` when given) is
        concatenated at every decoder scale finer than the latent's.  With
        ``output='bernoulli_gamma'`` the field is a draw of the decoded law (from
        ``generator``; differentiable with ``straight_through``).
        """
        return self._finish(self._raw_field(z, cond, generator, noise), valid, generator, straight_through)

    def _raw_field(self, z: torch.Tensor, cond: Condition, generator: torch.Generator | None,
                   noise: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The head's raw output (B, 1 or 3, H, W), plus ``m(y)`` in residual mode: what :meth:`_finish` makes a
        field of (the part of decoding that a tile can do alone)."""
        head = self._decode_head(z, cond, generator, noise)
        if self.residual:  # m(y) without gradient: the generative terms shape the residual only
            mean = cond.mean if cond.mean is not None else self.mean_field(cond)
            head = mean.detach() + head
        return head

    def _finish(self, head: torch.Tensor, valid: torch.Tensor | None, generator: torch.Generator | None,
                straight_through: bool = False) -> torch.Tensor:
        """A field (B, 1, H, W) >= 0 in model space from :meth:`_raw_field`: its ReLU, or a draw of the law."""
        if self.output == "bernoulli_gamma":
            law = BernoulliGamma.from_head(head)
            if self.bg_correlation > 0 and not straight_through:  # a sampled field, not a training draw
                draw = bernoulli_gamma_draw_correlated(law, self.bg_correlation, generator)
            else:
                draw = bernoulli_gamma_draw(law, generator, straight_through)
            return self._mask(self.transform.forward(draw), valid)
        return self._mask(relu_leaky_grad(head), valid)

    def mean_field(self, cond: Condition) -> torch.Tensor:
        """``residual=True``: the conditional mean ``m(y)`` (B, 1, H, W) in model space, >= 0."""
        if not self.residual:
            raise ValueError("mean_field needs model.residual")
        h = self.mean_bottom(cond.maps[self.depth])  # (B, w_D, hb, wb)
        for s in range(self.depth, 0, -1):
            h = F.interpolate(self.mean_reduce[s - 1](h), scale_factor=2.0, mode="nearest")
            h = self.mean_up[s - 1](torch.cat([h, cond.maps[s - 1]], dim=1))
        return relu_leaky_grad(self.mean_head(h))

    def _with_mean(self, cond: Condition) -> Condition:
        """``cond`` carrying ``m(y)`` (computed once per condition) in residual mode; itself otherwise."""
        return cond._replace(mean=self.mean_field(cond)) if self.residual else cond

    def decode_law(self, z: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> BernoulliGamma:
        """``output='bernoulli_gamma'``: the per-pixel law decoded from ``z`` (mm/day)."""
        if self.output != "bernoulli_gamma":
            raise ValueError("decode_law needs model output 'bernoulli_gamma'")
        return BernoulliGamma.from_head(self._decode_head(z, cond, generator))

    @staticmethod
    def _mask(field: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return field if valid is None else field * valid.to(field.dtype)

    def _law_mean(self, law: BernoulliGamma, valid: torch.Tensor | None) -> torch.Tensor:
        """The law's mean (mm/day) in model space, 0 where ``valid`` is False."""
        return self._mask(self.transform.forward(law.mean_mm()), valid)

    def _one_noise(self, B: int, size, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
        """(B, noise_channels, *size) N(0, 1) from ``generator`` (on its device), on ``like``'s device."""
        gen_device = generator.device if generator is not None else like.device
        return torch.randn((B, self.noise_ch, *size), generator=generator, device=gen_device,
                           dtype=like.dtype).to(like.device)

    def _noise(self, B: int, generator: torch.Generator | None, like: torch.Tensor) -> dict[int, torch.Tensor]:
        """The whole field's noise channels per scale (those finer than the latent's), drawn in the order
        :meth:`_decode_head` draws them."""
        return {s - 1: self._one_noise(B, self.sizes[s - 1], generator, like)
                for s in range(self.depth, 0, -1) if self.noise_ch and s - 1 < self.level}

    def _decode_head(self, z: torch.Tensor, cond: Condition, generator: torch.Generator | None,
                     noise: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder up to its head's raw output (B, 1 or 3, H, W); ``noise`` (scale -> map) when drawn before."""
        hb, wb = cond.maps[self.depth].shape[-2:]
        B = z.shape[0]
        if self.g:  # the map and the whole field's numbers, which enter at the bottom with v_y
            z, z_global = self._unpack(z, tuple(cond.maps[self.level].shape[-2:]))
            base = _broadcast(F.silu(self.dec_in(torch.cat([cond.vector, z_global], dim=1))), (hb, wb))
        elif self.latent == "map":
            base = _broadcast(F.silu(_per_pixel(self.dec_in, cond.vector)), (hb, wb))  # (B, latent_ch, hb, wb)
        else:
            base = F.silu(self.dec_in(torch.cat([z, cond.vector], dim=1))).view(B, self.latent_ch, hb, wb)
        parts = [base, cond.maps[self.depth]]
        if self.latent == "map" and self.level == self.depth:
            parts.append(z)
        h = self.dec_bottom_res(self.dec_bottom(torch.cat(parts, dim=1)))  # (B, w_D, hb, wb)
        for s in range(self.depth, 0, -1):
            h = self.dec_reduce[s - 1](h)  # (B, w_{s-1}, H/2**s, W/2**s)
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B, w_{s-1}, H/2**(s-1), W/2**(s-1))
            parts = [h, cond.maps[s - 1]]
            if self.latent == "map" and self.level == s - 1:
                parts.append(z)
            if self.noise_ch and s - 1 < self.level:
                size = tuple(cond.maps[s - 1].shape[-2:])
                parts.append(self._one_noise(B, size, generator, h) if noise is None else noise[s - 1])
            h = self.dec_up[s - 1](torch.cat(parts, dim=1))
            if self.dec_blocks is not None:
                h = self.dec_blocks[s - 1](h)
        return self.dec_head(h)  # (B, 1 or 3, H, W)

    def _prior_draws(self, mu_p, logvar_p, n: int, z_scale: float = 1.0, generator=None) -> torch.Tensor:
        """(n, B, *latent_shape) draws ``mu_p + z_scale * sigma_p * eps``."""
        eps_device = generator.device if generator is not None else mu_p.device
        eps = torch.randn((n, *mu_p.shape), generator=generator, device=eps_device, dtype=mu_p.dtype).to(mu_p.device)
        return mu_p + z_scale * torch.exp(0.5 * logvar_p) * eps

    # ------------------------------------------------------------------ public API

    def forward(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, n_prior: int = 0,
                window: Window | None = None) -> CVAEOutput:
        """Encode, sample ``z ~ q(z | x, y)`` (reparameterised) and decode.

        Parameters
        ----------
        x : Tensor (B, 1, H, W)
            Target in model space (invalid pixels are ignored).
        y : Tensor (B, C, h, w)
            Normalised condition.
        valid : Tensor (B, 1, H, W), bool
            Pixel validity.
        n_prior : int
            Also decode this many reparameterised draws from the prior (0: none).
        window : Window, optional
            ``context='local'``: ``x`` and ``valid`` are this window of each sample's field (a training patch).

        Returns
        -------
        CVAEOutput
        """
        self._check_inputs(y, valid, x, window)
        cond = self._with_mean(self.encode_condition(y, window))
        mu_q, logvar_q = self.posterior(x, valid, cond)
        z = mu_q + torch.exp(0.5 * logvar_q) * torch.randn_like(mu_q)
        # hierarchical_prior: the map's prior given the posterior's global draw (the KL of the map given z_global)
        mu_p, logvar_p = self.prior(cond, z[:, -self.g:] if self.hierarchical else None)
        law = None
        if self.output == "bernoulli_gamma":
            law = self.decode_law(z, cond)
            recon = self._law_mean(law, valid)
        else:
            recon = self.decode(z, cond, valid)
        prior_samples = None
        if n_prior > 0:
            zp = (self.draw_prior(cond, n_prior) if self.hierarchical
                  else self._prior_draws(mu_p, logvar_p, n_prior))  # (M, B, *latent_shape)
            B = x.shape[0]
            # one decoder pass over M * B: the condition repeated member-major
            again = lambda m: None if m is None else m.repeat(n_prior, *([1] * (m.ndim - 1)))  # noqa: E731
            rep = Condition(tuple(again(m) for m in cond.maps), again(cond.vector), again(cond.mean))
            dec = self.decode(zp.reshape(n_prior * B, *zp.shape[2:]), rep, valid.repeat(n_prior, 1, 1, 1),
                              straight_through=True)
            prior_samples = dec.view(n_prior, B, *dec.shape[1:])  # (M, B, 1, H, W)
        mean = None if cond.mean is None else self._mask(cond.mean, valid)
        return CVAEOutput(recon, mu_q, logvar_q, mu_p, logvar_p, prior_samples, law, mean)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                    window: Window | None = None) -> torch.Tensor:
        """Decode the posterior mean: (B, 1, H, W) in model space (the law's mean for a Bernoulli-gamma output)."""
        self._check_inputs(y, valid, x, window)
        cond = self._with_mean(self.encode_condition(y, window))
        mu_q, _ = self.posterior(x, valid, cond)
        if self.output == "bernoulli_gamma":
            return self._law_mean(self.decode_law(mu_q, cond), valid)
        return self.decode(mu_q, cond, valid)

    def sample(
        self,
        y: torch.Tensor,
        valid: torch.Tensor | None = None,
        n_samples: int = 1,
        z_scale: float = 1.0,
        generator: torch.Generator | None = None,
        tile: tuple[int, int] | None = None,
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
        tile : (int, int), optional
            ``context='local'``: decode the field by tiles of this interior size (multiples of ``2**depth``),
            each computed with a margin of :meth:`receptive_radius` cells around it, so the field equals the
            untiled one (to float round-off) with activations of one tile in memory
            (:meth:`tile_for` picks it from a memory budget).  ``None``: the whole field at once.

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
        if tile is not None and any(t < s for t, s in zip(tile, self.fine_shape)):
            return self._sample_tiled(y, valid, n_samples, z_scale, generator, tile)
        cond = self._with_mean(self.encode_condition(y))
        z = self.draw_prior(cond, n_samples, z_scale, generator)  # (n_samples, B, *latent_shape)
        out = [self.decode(z[i], cond, valid, generator) for i in range(n_samples)]
        return torch.stack(out, dim=0)  # (n_samples, B, 1, H, W)

    # ------------------------------------------------------------------ tiled inference (context 'local')

    def receptive_radius(self) -> int:
        """Fine cells around a cell that a sampled value can depend on (``context='local'``), rounded up to a
        multiple of ``2**depth``: a bound summed over the 3x3 convolutions of the condition encoder, prior and
        decoder at their scales, the nearest upsamplings and the condition vector's pooling window."""
        if not self.local:
            raise ValueError("a receptive radius needs model.context 'local' (a global model sees the whole field)")
        m = 2**self.depth
        encoder = 1 + sum(2 ** (s - 1) for s in range(1, self.depth + 1))  # stem + strided convs
        vector = encoder + self.pool_radius * m
        prior = max(encoder, vector) + 2**self.level + m
        # bottom conv + residual block (3 convs at the coarsest scale), then per scale an upsampling and a conv
        # (and the decoder blocks' two convs each)
        n_blocks = int(getattr(self.cfg, "decoder_blocks", 0))
        decoder = 3 * m + sum(2**s + (1 + 2 * n_blocks) * 2 ** (s - 1) for s in range(1, self.depth + 1)) + 1
        radius = max(vector, prior) + decoder + m  # the conditional mean's decoder is no deeper
        return -(-radius // m) * m

    def bytes_per_cell(self) -> float:
        """Activation memory of one fine cell of one sample (float32, a few activations of every scale alive at
        once): the estimate that sizes tiles and validation batches."""
        return 4 * 6 * sum((w + c) / 4**s for s, (w, c) in enumerate(zip(self.widths, self.cond_widths)))

    def tile_for(self, batch: int, budget_bytes: float) -> tuple[int, int] | None:
        """The interior size of square tiles whose activations for ``batch`` samples fit ``budget_bytes``, or None
        when the whole field fits (or the model is global and cannot be tiled)."""
        if not self.local:
            return None
        per_cell = self.bytes_per_cell()
        H, W = self.fine_shape
        if batch * H * W * per_cell <= budget_bytes:
            return None
        m, margin = 2**self.depth, 2 * self.receptive_radius()
        side = int(math.sqrt(budget_bytes / (batch * per_cell))) - margin
        side = max(m, side // m * m)
        return (min(side, H), min(side, W))

    def _tiles(self, tile: tuple[int, int]):
        """(outer, inner) windows of the tiling: ``inner`` (top, left, h, w) cut the field; ``outer`` adds the
        receptive radius on every side (clipped at the field's edges)."""
        m, R, (H, W) = 2**self.depth, self.receptive_radius(), self.fine_shape
        th, tw = (int(t) for t in tile)
        if th < m or tw < m or th % m or tw % m:
            raise ValueError(f"tile {tuple(tile)} must be positive multiples of 2**depth = {m}")
        for r0 in range(0, H, th):
            for c0 in range(0, W, tw):
                h, w = min(th, H - r0), min(tw, W - c0)
                top, left = max(0, r0 - R), max(0, c0 - R)
                bottom, right = min(H, r0 + h + R), min(W, c0 + w + R)
                yield (top, left, bottom - top, right - left), (r0, c0, h, w)

    @staticmethod
    def _paste(dst: torch.Tensor, src: torch.Tensor, outer, inner, f: int) -> None:
        """Copy the ``inner`` part of ``src`` (computed over ``outer``) into ``dst`` at scale factor ``f``."""
        (t0, l0, _, _), (r0, c0, h, w) = outer, inner
        dst[..., r0 // f:(r0 + h) // f, c0 // f:(c0 + w) // f] = \
            src[..., (r0 - t0) // f:(r0 - t0 + h) // f, (c0 - l0) // f:(c0 - l0 + w) // f]

    def _sample_tiled(self, y, valid, n_samples, z_scale, generator, tile):
        """:meth:`sample` by tiles: the prior and then each member's raw field are computed tile by tile and
        pasted; the draws (latent, noise channels, Bernoulli-gamma) are made for the whole field in the order
        the untiled path makes them, so both give the same fields."""
        if not self.local:
            raise ValueError("tiled sampling needs model.context 'local'")
        B, L = y.shape[0], self.level
        tiles = list(self._tiles(tile))
        window = lambda o: Window.fixed(o[0], o[1], o[2:], B, y.device)  # noqa: E731
        mu_p = logvar_p = None
        for outer, inner in tiles:
            m, lv = self.prior(self.encode_condition(y, window(outer)))
            if mu_p is None:
                mu_p = m.new_empty(B, m.shape[1], *self.sizes[L])
                logvar_p = torch.empty_like(mu_p)
            self._paste(mu_p, m, outer, inner, 2**L)
            self._paste(logvar_p, lv, outer, inner, 2**L)
        z = self._prior_draws(mu_p, logvar_p, n_samples, z_scale, generator)  # (n, B, z_ch, H/2**L, W/2**L)
        out = []
        for i in range(n_samples):
            noise = self._noise(B, generator, mu_p)  # the decoder's dtype and device, as the untiled path draws
            raw = None
            for outer, inner in tiles:
                win = window(outer)
                cond = self._with_mean(self.encode_condition(y, win))
                part = self._raw_field(win.scaled(L).crop(z[i]), cond, None,
                                       {s: win.scaled(s).crop(n) for s, n in noise.items()})
                if raw is None:
                    raw = part.new_empty(B, part.shape[1], *self.fine_shape)
                self._paste(raw, part, outer, inner, 1)
            out.append(self._finish(raw, valid, generator))
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
    n_static: int = 0,
    output: str = "field",
) -> int:
    """Parameters of ``CVAE(cfg, ...)``, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = CVAE(cfg, n_channels, fine_shape, coarse_shape, n_static, output,
                     TargetTransform() if output == "bernoulli_gamma" else None)
    return count_parameters(model)
