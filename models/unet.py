"""A U-Net for any input size, with an analytic receptive field (the stage's halo).

Layout (``depth`` = number of 2x2 max-poolings, widths ``base_channels * 2**level``)::

    level 0   [conv3x3-norm-ReLU] x2 ---------------------------------- skip --> cat -> [conv x2] -> head 1x1
    level 1      maxpool -> [conv x2] ------------------------ skip --> cat -> [conv x2] -> up
    ...
    level d         maxpool -> [conv x2]  (bottleneck) -> up

Any input size works: the input is padded at the bottom and right to a multiple of ``2**depth`` and the
output is cropped back, so ``output.shape[-2:] == input.shape[-2:]``. Padding only the bottom/right keeps
the pooling grid anchored at the window's top-left pixel: when a tiled pipeline puts every window origin on a
multiple of ``2**depth`` (see :meth:`UNet.aligned_halo`), the pixels of each core see exactly the same
arithmetic as in an untiled run.

Locality: with ``norm='batch'`` in eval mode (or ``norm='none'``) an output pixel depends only on input pixels
within :meth:`UNet.halo` of it. ``norm='group'`` normalises over the whole tile, so every output pixel
depends on every input pixel (``UNet.local`` is False): tiled and untiled runs then differ slightly.

Stem: ``stem='highpass'`` puts a fixed (parameter-free) transform before the first convolution: every input
channel ``x`` enters as ``asinh(x)`` and ``asinh(x - box_mean(x))`` (a ``2 * stem_radius + 1`` square box,
edge pixels averaged over the pixels present). In noise-sigma units the first compresses the dynamic range of
bright galaxies and the second keeps what is sharper than the box (a PSF-sized clump on a bright smooth
bulge) while removing the smooth light under it. The stem widens the receptive field by ``stem_radius``.
``stem='add_highpass'`` keeps ``x`` itself as the first channel and adds ``asinh(x - box_mean(x))``: a network
trained with ``stem='none'`` maps onto it exactly (its first convolution on channel 0, zeros on the new
channel; see :func:`widen_first_conv`), so the high-pass view can be learned by fine-tuning instead of from
scratch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from deepmosaic.pipeline.config import field, from_mapping, require, to_dict

from .registry import register

NORMS = ("batch", "group", "none")
STEMS = ("none", "highpass", "add_highpass")
TWO_CHANNEL_STEMS = ("highpass", "add_highpass")
UPSAMPLES = ("transpose", "bilinear")
PAD_MODES = ("reflect", "replicate", "zeros")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet` (JSON-serialisable; saved in the model card beside the weights)."""

    in_channels: int = field(1, "input channels (bands)")
    out_channels: int = field(1, "output channels (logits, one per mask)")
    depth: int = field(3, "number of 2x2 down-samplings; inputs are padded to a multiple of 2**depth")
    base_channels: int = field(16, "channels at full resolution; doubles at every level")
    norm: str = field("batch", "normalisation after each conv: 'batch' | 'group' | 'none'")
    groups: int = field(8, "groups of GroupNorm (reduced to a divisor of the channel count); norm='group' only")
    upsample: str = field("transpose", "decoder up-sampling: 'transpose' (2x2 stride-2 conv) | 'bilinear'")
    pad_mode: str = field("reflect", "how the input is padded up to a multiple of 2**depth: "
                                     "'reflect' | 'replicate' | 'zeros' (reflect falls back to replicate "
                                     "when the input is smaller than the pad)")
    stem: str = field("none", "fixed input transform before the first conv: 'none' | 'highpass' (each channel "
                              "as asinh(x) and asinh(x - box mean)) | 'add_highpass' (x and asinh(x - box "
                              "mean)); see the module docstring")
    stem_radius: int = field(4, "half-size of the highpass stem's box (px); the box is 2 r + 1 px wide")

    def validate(self, where: str = "unet") -> None:
        w = where
        require(self.in_channels >= 1, w, "in_channels", self.in_channels, "use at least 1 input channel.")
        require(self.out_channels >= 1, w, "out_channels", self.out_channels, "use at least 1 output channel.")
        require(0 <= self.depth <= 8, w, "depth", self.depth, "use a depth between 0 and 8.")
        require(self.base_channels >= 1, w, "base_channels", self.base_channels, "use at least 1 channel.")
        require(self.norm in NORMS, w, "norm", self.norm, f"use one of {', '.join(NORMS)}.")
        require(self.groups >= 1, w, "groups", self.groups, "use at least 1 group.")
        require(self.upsample in UPSAMPLES, w, "upsample", self.upsample, f"use one of {', '.join(UPSAMPLES)}.")
        require(self.pad_mode in PAD_MODES, w, "pad_mode", self.pad_mode, f"use one of {', '.join(PAD_MODES)}.")
        require(self.stem in STEMS, w, "stem", self.stem, f"use one of {', '.join(STEMS)}.")
        require(isinstance(self.stem_radius, int) and 1 <= self.stem_radius <= 64, w, "stem_radius",
                self.stem_radius, "use an integer box half-size between 1 and 64 px, e.g. 4.")

    def to_dict(self) -> dict:
        return to_dict(self)


def coerce_config(cls, config, kwargs, where: str):
    """``config`` (an instance, a mapping or None) plus keyword overrides -> a validated frozen ``cls``."""
    if isinstance(config, cls):
        data = config.to_dict()
    elif config is None:
        data = {}
    elif isinstance(config, dict):
        data = dict(config)
    else:
        raise TypeError(f"{where}: config must be a {cls.__name__}, a dict or None, got {type(config).__name__}")
    data.update(kwargs)
    return from_mapping(cls, data, where=where)


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two [3x3 conv (zero padding 1) -> norm -> ReLU]; spatial shape unchanged."""

    def __init__(self, c_in: int, c_out: int, norm: str, groups: int):
        layers = []
        for c in (c_in, c_out):
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=(norm == "none")),
                       make_norm(norm, c_out, groups), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class UNetBody(nn.Module):
    """Encoder-decoder without the head: (B, in, H, W) -> (B, base_channels, H, W).

    ``H`` and ``W`` must be multiples of ``2**depth``; :class:`UNet` pads for you.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.depth = cfg.depth
        widths = [cfg.base_channels * 2 ** i for i in range(cfg.depth + 1)]
        self.widths = widths
        self.encoders = nn.ModuleList()
        c_prev = cfg.in_channels
        for w in widths:
            self.encoders.append(ConvBlock(c_prev, w, cfg.norm, cfg.groups))
            c_prev = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(cfg.depth)):
            c_deep, c_skip = widths[level + 1], widths[level]
            if cfg.upsample == "transpose":
                self.ups.append(nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2))
            else:
                self.ups.append(nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(c_deep, c_skip, 1)))
            self.decoders.append(ConvBlock(2 * c_skip, c_skip, cfg.norm, cfg.groups))

    @property
    def out_channels(self) -> int:
        return self.widths[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, enc in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return x


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str) -> torch.Tensor:
    """Pad the last two axes at the bottom/right up to a multiple of ``multiple`` (top-left stays put)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if mode == "zeros":
        return F.pad(x, (0, pw, 0, ph))
    if mode == "reflect" and ph < h and pw < w:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def check_input(x: torch.Tensor, in_channels: int, where: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: expected a (batch, channels, y, x) tensor, got shape {tuple(x.shape)}; "
                         f"add the missing axes, e.g. image[None, None].")
    if x.shape[1] != in_channels:
        raise ValueError(f"{where}: the input has {x.shape[1]} channels but the model was built with "
                         f"in_channels={in_channels}.")


def receptive_reach(depth: int, upsample: str = "transpose", head_radius: int = 0) -> tuple[int, int]:
    """Analytic receptive field of the U-Net: the farthest input pixel an output pixel depends on.

    Intervals of dependence are propagated backwards, layer by layer, through the network's graph
    (3x3 conv: +-1 at its level; 2x2 max-pool: level-(l+1) pixels ``[a, b]`` read level-l pixels
    ``[2a, 2b+1]``; 2x2 stride-2 transposed conv: level-l ``[a, b]`` read level-(l+1)
    ``[a//2, b//2]``; bilinear x2: ``[floor((a-0.5)/2), floor((b-0.5)/2)+1]``; skip concatenation: the
    union). Because of pooling, the field depends on the output pixel's position modulo ``2**depth`` (counted
    from the window's top-left pixel); every residue is evaluated.

    Returns
    -------
    (halo, size) : int, int
        ``halo``: the largest distance, along one axis, between an output pixel and an input pixel it depends
        on (over all positions and both directions). ``size``: the largest receptive-field width in pixels.
    """
    def enc(level, a, b):                      # e_level pixels [a, b] -> input pixels
        a, b = a - 2, b + 2                    # two 3x3 convs
        if level == 0:
            return a, b
        return enc(level - 1, 2 * a, 2 * b + 1)  # max-pool from level-1

    def up(a, b):
        if upsample == "transpose":
            return a // 2, b // 2
        return math.floor((a - 0.5) / 2), math.floor((b - 0.5) / 2) + 1

    def dec(level, a, b):                      # d_level pixels [a, b] -> input pixels
        if level == depth:
            return enc(depth, a, b)
        a, b = a - 2, b + 2                    # two 3x3 convs on cat(up(d_{level+1}), e_level)
        lo1, hi1 = enc(level, a, b)
        lo2, hi2 = dec(level + 1, *up(a, b))
        return min(lo1, lo2), max(hi1, hi2)

    halo = size = 0
    for p in range(2 ** depth):
        lo, hi = dec(0, p - head_radius, p + head_radius)
        halo = max(halo, p - lo, hi - p)
        size = max(size, hi - lo + 1)
    return halo, size


def highpass_stem(x: torch.Tensor, radius: int, keep_input: bool = False) -> torch.Tensor:
    """``cat([asinh(x), asinh(x - box_mean(x))], dim=1)``: (B, C, H, W) -> (B, 2C, H, W); the box is
    ``2 radius + 1`` px square, averaged over the pixels inside the input at its edges. ``keep_input``: the
    first half is ``x`` itself (the ``add_highpass`` stem)."""
    k = 2 * radius + 1
    mean = F.avg_pool2d(x, k, stride=1, padding=radius, count_include_pad=False)
    return torch.cat([x if keep_input else torch.asinh(x), torch.asinh(x - mean)], dim=1)


def stem_channels(config) -> int:
    """Input channels of the body behind ``config``'s stem (a config with ``in_channels``, ``stem``)."""
    return config.in_channels * (2 if config.stem in TWO_CHANNEL_STEMS else 1)


def apply_stem(config, x: torch.Tensor) -> torch.Tensor:
    """``config``'s stem on an unpadded input (so padding never enters the box mean); 'none' passes ``x``."""
    if config.stem not in TWO_CHANNEL_STEMS:
        return x
    return highpass_stem(x, config.stem_radius, keep_input=config.stem == "add_highpass")


def widen_first_conv(model: nn.Module, source: nn.Module) -> None:
    """Load ``source`` (a U-Net-family network with ``stem='none'``) into ``model`` (the same network with
    ``stem='add_highpass'``): every tensor as it is, except the first convolution's weight, whose new input
    channels start at zero. ``model`` then computes exactly what ``source`` does."""
    own, theirs = model.state_dict(), source.state_dict()
    if set(own) != set(theirs):
        raise ValueError("widen_first_conv: the two networks differ in more than their stem")
    widened = {}
    for k, v in theirs.items():
        if own[k].shape == v.shape:
            widened[k] = v
        elif (own[k].ndim == 4 and v.ndim == 4 and own[k].shape[0] == v.shape[0]
              and own[k].shape[2:] == v.shape[2:] and own[k].shape[1] == 2 * v.shape[1]):
            w = torch.zeros_like(own[k])
            w[:, :v.shape[1]] = v
            widened[k] = w
        else:
            raise ValueError(f"widen_first_conv: {k} is {tuple(v.shape)} in the source and "
                             f"{tuple(own[k].shape)} here; only the first convolution's input may double")
    model.load_state_dict(widened)


class HaloMixin:
    """Receptive-field helpers shared by the U-Net family (needs ``self.config`` and ``_head_radius``)."""

    _head_radius = 0

    @property
    def _stem_radius(self) -> int:
        return self.config.stem_radius if getattr(self.config, "stem", "none") != "none" else 0

    @property
    def stride_multiple(self) -> int:
        """Inputs are padded to a multiple of this; tile window origins should be multiples of it."""
        return 2 ** self.config.depth

    @property
    def local(self) -> bool:
        """Whether an output pixel depends only on input pixels within :meth:`halo` (eval mode)."""
        return self.config.norm != "group"

    def receptive_field(self) -> dict:
        """``{'halo': int, 'size': int, 'stride_multiple': int, 'local': bool}`` (see :func:`receptive_reach`)."""
        halo, size = receptive_reach(self.config.depth, self.config.upsample, self._head_radius)
        r = self._stem_radius                  # the stem reads r px further on each side
        return {"halo": halo + r, "size": size + 2 * r, "stride_multiple": self.stride_multiple,
                "local": self.local}

    def halo(self) -> int:
        """Pixels of context the network uses on each side of an output pixel (exact, analytic)."""
        return self.receptive_field()["halo"]

    def aligned_halo(self) -> int:
        """:meth:`halo` rounded up to a multiple of ``2**depth``: with tile cores on that multiple too, every
        window origin sits on the pooling grid and tiled outputs equal untiled ones."""
        m = self.stride_multiple
        return -(-self.halo() // m) * m


@register("unet", UNetConfig)
class UNet(HaloMixin, nn.Module):
    """U-Net: (B, in_channels, H, W) float -> (B, out_channels, H, W) logits, for any H, W >= 1.

    Build with a :class:`UNetConfig`, a dict, or keywords: ``UNet(depth=2, base_channels=8)``.
    """

    def __init__(self, config: UNetConfig | dict | None = None, **kwargs):
        super().__init__()
        self.config = coerce_config(UNetConfig, config, kwargs, "unet")
        self.body = UNetBody(dataclasses.replace(self.config, in_channels=stem_channels(self.config)))
        self.head = nn.Conv2d(self.body.out_channels, self.config.out_channels, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features, (B, base_channels, H, W), cropped to the input's size."""
        check_input(x, self.config.in_channels, type(self).__name__)
        h, w = x.shape[-2:]
        x = apply_stem(self.config, x)
        y = self.body(pad_to_multiple(x, self.stride_multiple, self.config.pad_mode))
        return y[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
