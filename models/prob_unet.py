"""Probabilistic U-Net (after Kohl et al. 2018): segmentations sampled from a learned latent distribution.

Pieces:

- a U-Net body giving the last decoder features of the image, ``(B, F, H, W)``;
- a *prior* net on the image and a *posterior* net on image + target, each a conv encoder followed by a
  global average and a 1x1 conv giving a diagonal Gaussian ``N(mu, diag(sigma**2))`` over a small latent;
- ``fcomb``: the latent ``z`` is broadcast to every pixel, concatenated to the features and mapped to logits by
  ``n_fcomb`` 1x1 convs.

Training (``loss``): ``z`` is drawn from the posterior (reparameterised), and
``loss = recon(logits, target) + beta * KL(posterior || prior)``, KL summed over latent dimensions and
averaged over the batch. Inference: ``sample(x, n)`` draws ``z`` from the prior; ``forward(x)`` uses the
prior mean (one deterministic, "most likely" prediction); ``predict_with_uncertainty`` gives the per-pixel
mean and standard deviation of the sampled probabilities.

Locality: the latent is pooled over the whole input, so every output pixel depends on the whole tile
(``local`` is False); ``halo()`` is the U-Net part's halo only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence
from torch.nn import functional as F

from deepmosaic.pipeline.config import field, require, to_dict

from . import losses
from .registry import register
from .unet import ConvBlock, HaloMixin, UNetBody, UNetConfig, check_input, coerce_config, pad_to_multiple


@dataclass(frozen=True)
class ProbUNetConfig:
    """Architecture of a :class:`ProbUNet` (JSON-serialisable)."""

    in_channels: int = field(1, "input channels (bands)")
    out_channels: int = field(1, "output channels (one sigmoid mask each, e.g. 2 for a blended pair)")
    depth: int = field(3, "U-Net down-samplings (and the prior/posterior encoders' depth)")
    base_channels: int = field(16, "U-Net channels at full resolution; doubles at every level")
    norm: str = field("batch", "normalisation in the U-Net and the encoders: 'batch' | 'group' | 'none'")
    groups: int = field(8, "groups of GroupNorm; norm='group' only")
    upsample: str = field("transpose", "decoder up-sampling: 'transpose' | 'bilinear'")
    pad_mode: str = field("reflect", "padding up to a multiple of 2**depth: 'reflect' | 'replicate' | 'zeros'")
    latent_dim: int = field(6, "dimension of the latent Gaussian")
    latent_base_channels: int = field(8, "channels of the prior/posterior encoders at full resolution")
    n_fcomb: int = field(3, "1x1 convs combining features and latent (the last one gives the logits)")
    beta: float = field(1.0, "weight of KL(posterior || prior) in the training loss")

    def validate(self) -> None:
        w = "prob_unet"
        self.unet_config().validate(where=w)
        require(self.latent_dim >= 1, w, "latent_dim", self.latent_dim, "use at least 1 latent dimension.")
        require(self.latent_base_channels >= 1, w, "latent_base_channels", self.latent_base_channels,
                "use at least 1 channel.")
        require(self.n_fcomb >= 1, w, "n_fcomb", self.n_fcomb, "use at least 1 combining conv.")
        require(self.beta >= 0, w, "beta", self.beta, "use a KL weight >= 0.")

    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=self.in_channels, out_channels=self.out_channels, depth=self.depth,
                          base_channels=self.base_channels, norm=self.norm, groups=self.groups,
                          upsample=self.upsample, pad_mode=self.pad_mode)

    def to_dict(self) -> dict:
        return to_dict(self)


class ProbUNetOutput(NamedTuple):
    """``logits``: (B, out_channels, H, W); ``kl``: scalar KL(posterior || prior), None without a target."""

    logits: torch.Tensor
    kl: torch.Tensor | None


class GaussianEncoder(nn.Module):
    """Conv encoder -> global mean -> 1x1 conv: a diagonal Gaussian over the latent, per image."""

    def __init__(self, c_in: int, base: int, depth: int, latent_dim: int, norm: str, groups: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        c = c_in
        for level in range(depth + 1):
            w = base * 2 ** level
            self.blocks.append(ConvBlock(c, w, norm, groups))
            c = w
        self.to_params = nn.Conv2d(c, 2 * latent_dim, 1)
        # Start close to N(0, 1) for both nets, so that the KL starts small.
        nn.init.normal_(self.to_params.weight, std=1e-3)
        nn.init.zeros_(self.to_params.bias)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> Independent:
        for level, block in enumerate(self.blocks):
            if level > 0:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
            x = block(x)
        params = self.to_params(x.mean(dim=(-2, -1), keepdim=True)).flatten(1)
        mu, log_sigma = params[:, :self.latent_dim], params[:, self.latent_dim:]
        return Independent(Normal(mu, torch.exp(log_sigma.clamp(-10.0, 10.0))), 1)


@register("prob_unet", ProbUNetConfig)
class ProbUNet(HaloMixin, nn.Module):
    """Probabilistic U-Net: (B, in_channels, H, W) -> logits (B, out_channels, H, W) for any H, W."""

    def __init__(self, config: ProbUNetConfig | dict | None = None, **kwargs):
        super().__init__()
        cfg = self.config = coerce_config(ProbUNetConfig, config, kwargs, "prob_unet")
        self.body = UNetBody(cfg.unet_config())
        self.prior_net = GaussianEncoder(cfg.in_channels, cfg.latent_base_channels, cfg.depth, cfg.latent_dim,
                                         cfg.norm, cfg.groups)
        self.posterior_net = GaussianEncoder(cfg.in_channels + cfg.out_channels, cfg.latent_base_channels,
                                             cfg.depth, cfg.latent_dim, cfg.norm, cfg.groups)
        f = self.body.out_channels
        layers: list[nn.Module] = []
        c = f + cfg.latent_dim
        for _ in range(cfg.n_fcomb - 1):
            layers += [nn.Conv2d(c, f, 1), nn.ReLU(inplace=True)]
            c = f
        layers.append(nn.Conv2d(c, cfg.out_channels, 1))
        self.fcomb = nn.Sequential(*layers)

    @property
    def local(self) -> bool:
        return False  # the latent is pooled over the whole tile

    # -- pieces ---------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """U-Net decoder features (B, base_channels, H, W), cropped to the input's size."""
        check_input(x, self.config.in_channels, "ProbUNet")
        h, w = x.shape[-2:]
        return self.body(pad_to_multiple(x, self.stride_multiple, self.config.pad_mode))[..., :h, :w]

    def prior(self, x: torch.Tensor) -> Independent:
        """Prior over the latent given the image: a batch of B diagonal Gaussians."""
        return self.prior_net(x)

    def posterior(self, x: torch.Tensor, target: torch.Tensor) -> Independent:
        """Posterior over the latent given image and target masks (B, out_channels, H, W)."""
        if target.shape[0] != x.shape[0] or target.shape[1] != self.config.out_channels \
                or target.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"ProbUNet: target shape {tuple(target.shape)} must be (B, out_channels="
                             f"{self.config.out_channels}, H, W) matching x of shape {tuple(x.shape)}.")
        return self.posterior_net(torch.cat([x, target.to(x.dtype)], dim=1))

    def combine(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits from features (B, F, H, W) and latents (B, L): z broadcast to every pixel, 1x1 convs."""
        zmap = z[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        return self.fcomb(torch.cat([features, zmap.to(features.dtype)], dim=1))

    # -- public API -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> ProbUNetOutput:
        """With ``target``: logits from a posterior sample and the KL; without: logits at the prior mean."""
        feats = self.features(x)
        prior = self.prior(x)
        if target is None:
            return ProbUNetOutput(self.combine(feats, prior.mean), None)
        post = self.posterior(x, target)
        kl = kl_divergence(post, prior).mean()
        return ProbUNetOutput(self.combine(feats, post.rsample()), kl)

    def loss(self, x: torch.Tensor, target: torch.Tensor, recon=None, beta: float | None = None):
        """ELBO-style training loss: ``recon(logits, target) + beta * KL``.

        Parameters
        ----------
        x : (B, in_channels, H, W); target : (B, out_channels, H, W) masks in [0, 1]
        recon : callable ``(logits, target) -> scalar``; default per-pixel mean BCE
        beta : KL weight; default ``config.beta``

        Returns
        -------
        (total, {'recon': scalar, 'kl': scalar})
        """
        recon = recon or losses.bce
        beta = self.config.beta if beta is None else beta
        out = self(x, target)
        r = recon(out.logits, target)
        return r + beta * out.kl, {"recon": r, "kl": out.kl}

    def sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` segmentations drawn from the prior: logits of shape (n, B, out_channels, H, W).

        Features and the prior are computed once; only the 1x1 ``fcomb`` runs per sample.
        """
        if n < 1:
            raise ValueError(f"ProbUNet.sample: n={n!r} must be >= 1.")
        feats = self.features(x)
        prior = self.prior(x)
        return torch.stack([self.combine(feats, prior.sample()) for _ in range(n)])

    def predict_with_uncertainty(self, x: torch.Tensor, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel mean and standard deviation (over ``n`` prior samples) of the sigmoid probabilities.

        Returns
        -------
        (mean, std) : two (B, out_channels, H, W) tensors; mean in [0, 1], std >= 0 (population std, 0 for n=1)
        """
        probs = torch.sigmoid(self.sample(x, n))
        return probs.mean(0), probs.std(0, correction=0)
