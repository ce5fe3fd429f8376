"""One-stage centre-heatmap detector (CenterNet-style, Zhou et al. 2019) on the U-Net backbone.

The U-Net body gives full-resolution features; three small heads (3x3 conv -> ReLU -> 1x1 conv) give

- ``heatmap``: (B, K, H, W) logits, one channel per class (default star, galaxy); the target is 1 at each
  object's centre pixel ``(round(y), round(x))`` and a Gaussian around it (:func:`encode_targets`);
- ``size``: (B, 2, H, W) object ``(w, h)`` in pixels, read at centre pixels;
- ``offset``: (B, 2, H, W) sub-pixel ``(dy, dx) = (y - round(y), x - round(x))``, in [-0.5, 0.5].

With ``class_head=True`` the heatmap has a single *objectness* channel (target: the max over the class
heatmaps) and a fourth head gives ``class``: (B, K, H, W) class logits, trained with cross-entropy at the
centre pixels only. Per-class heatmaps make an object whose class is uncertain (a compact galaxy, a star in
a blend) split its score over two channels: two weak peaks at one position, one of them a duplicate after
per-class peak finding, and neither above a useful threshold. One objectness channel detects the object
once, whatever its class.

:func:`decode` turns these into objects: local maxima of the heatmap in 3x3 neighbourhoods (the max-pool
non-maximum suppression), above a score threshold, top ``k`` per image. Coordinates are 0-based pixels of the
input, ``[y, x]``, with pixel centres at integers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepmosaic.pipeline.config import field, require, to_dict

from . import losses
from .registry import register
from .unet import (HaloMixin, UNetBody, UNetConfig, apply_stem, check_input, coerce_config, pad_to_multiple,
                   stem_channels)

HEADS = ("heatmap", "size", "offset")

#: one row per detected object (see :func:`decode`)
DETECTION_DTYPE = np.dtype([("y", "f8"), ("x", "f8"), ("score", "f4"), ("class_id", "i4"),
                            ("w", "f4"), ("h", "f4"), ("class_prob", "f4")])


@dataclass(frozen=True)
class CenterNetConfig:
    """Architecture of a :class:`CenterNet` (JSON-serialisable)."""

    in_channels: int = field(1, "input channels (bands)")
    class_names: tuple[str, ...] = field(("star", "galaxy"), "one heatmap channel per class, in this order")
    depth: int = field(3, "U-Net down-samplings")
    base_channels: int = field(16, "U-Net channels at full resolution; doubles at every level")
    norm: str = field("batch", "normalisation: 'batch' | 'group' | 'none'")
    groups: int = field(8, "groups of GroupNorm; norm='group' only")
    upsample: str = field("transpose", "decoder up-sampling: 'transpose' | 'bilinear'")
    pad_mode: str = field("reflect", "padding up to a multiple of 2**depth: 'reflect' | 'replicate' | 'zeros'")
    head_channels: int = field(16, "hidden channels of each head's 3x3 conv")
    heatmap_prior: float = field(0.1, "initial heatmap probability (sets the heatmap bias; CenterNet uses 0.1)")
    stem: str = field("none", "fixed input transform before the body, as UNetConfig.stem: 'none' | 'highpass' | "
                              "'add_highpass' (x and asinh(x - box mean); starts exactly from a 'none' network)")
    stem_radius: int = field(4, "half-size of the stem's box (px)")
    class_head: bool = field(False, "one objectness heatmap channel + a class-logit head (True), or one "
                                    "heatmap channel per class (False, the original CenterNet)")

    def validate(self) -> None:
        w = "centernet"
        self.unet_config().validate(where=w)
        require(len(self.class_names) >= 1, w, "class_names", self.class_names, "name at least one class.")
        require(len(set(self.class_names)) == len(self.class_names), w, "class_names", self.class_names,
                "class names must be distinct.")
        require(self.head_channels >= 1, w, "head_channels", self.head_channels, "use at least 1 channel.")
        require(0 < self.heatmap_prior < 1, w, "heatmap_prior", self.heatmap_prior, "use a value in (0, 1).")
        require(isinstance(self.class_head, bool), w, "class_head", self.class_head, "use true or false.")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=self.in_channels, out_channels=1, depth=self.depth,
                          base_channels=self.base_channels, norm=self.norm, groups=self.groups,
                          upsample=self.upsample, pad_mode=self.pad_mode, stem=self.stem,
                          stem_radius=self.stem_radius)

    def to_dict(self) -> dict:
        return to_dict(self)


def _head(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, c_out, 1))


@register("centernet", CenterNetConfig)
class CenterNet(HaloMixin, nn.Module):
    """(B, in_channels, H, W) -> {'heatmap': (B, K, H, W) logits, 'size': (B, 2, H, W), 'offset': (B, 2, H, W)}.

    With ``class_head``: 'heatmap' is (B, 1, H, W) objectness logits and 'class' (B, K, H, W) class logits.
    """

    _head_radius = 1  # the heads' 3x3 conv

    def __init__(self, config: CenterNetConfig | dict | None = None, **kwargs):
        super().__init__()
        cfg = self.config = coerce_config(CenterNetConfig, config, kwargs, "centernet")
        self.body = UNetBody(dataclasses.replace(cfg.unet_config(), in_channels=stem_channels(cfg)))
        f = self.body.out_channels
        n_heat = 1 if cfg.class_head else cfg.n_classes
        heads = {"heatmap": _head(f, cfg.head_channels, n_heat), "size": _head(f, cfg.head_channels, 2),
                 "offset": _head(f, cfg.head_channels, 2)}
        if cfg.class_head:
            heads["class"] = _head(f, cfg.head_channels, cfg.n_classes)
        self.heads = nn.ModuleDict(heads)
        nn.init.constant_(self.heads["heatmap"][-1].bias, -math.log((1 - cfg.heatmap_prior) / cfg.heatmap_prior))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.config.in_channels, "CenterNet")
        h, w = x.shape[-2:]
        feats = self.body(pad_to_multiple(apply_stem(self.config, x), self.stride_multiple, self.config.pad_mode))
        return {name: head(feats)[..., :h, :w] for name, head in self.heads.items()}

    def loss(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
             size_weight: float = 0.1, offset_weight: float = 1.0, class_weight: float = 0.5):
        """CenterNet loss: focal(heatmap) + size_weight * L1(size) + offset_weight * L1(offset).

        ``targets`` as from :func:`encode_targets` (an optional ``'weight'`` (B, 1|K, H, W) map removes
        pixels from the heatmap loss). Returns ``(total, {'heatmap', 'size', 'offset'})``.

        With ``class_head`` the objectness target is the max of the per-class target heatmaps, and
        ``class_weight`` * cross-entropy of the class logits at the centre pixels (class = the target
        channel holding 1 there) is added (``'class'`` in the parts).
        """
        heat_t = targets["heatmap"]
        if self.config.class_head:
            heat_t = heat_t.amax(1, keepdim=True)
        hm = losses.centernet_focal(outputs["heatmap"], heat_t, weight=targets.get("weight"))
        sz = losses.masked_l1(outputs["size"], targets["size"], targets["mask"])
        off = losses.masked_l1(outputs["offset"], targets["offset"], targets["mask"])
        parts = {"heatmap": hm, "size": sz, "offset": off}
        total = hm + size_weight * sz + offset_weight * off
        if self.config.class_head:
            parts["class"] = centre_class_loss(outputs["class"], targets["heatmap"], targets["mask"])
            total = total + class_weight * parts["class"]
        return total, parts

    def decode(self, outputs: Mapping[str, torch.Tensor], threshold: float = 0.3, k: int = 100):
        """See :func:`decode`."""
        return decode(outputs, threshold=threshold, k=k)


def centre_class_loss(class_logits: torch.Tensor, heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``class_logits`` (B, K, H, W) at the pixels where ``mask`` (B, 1, H, W) is set;
    the class there is the channel of the target ``heatmap`` (B, K, H, W) with the largest value (1 at the
    centre pixel of an object of that class). 0 when the mask is empty."""
    sel = mask[:, 0] > 0
    if not bool(sel.any()):
        return class_logits.sum() * 0.0
    logits = class_logits.permute(0, 2, 3, 1)[sel]
    target = heatmap.permute(0, 2, 3, 1)[sel].argmax(-1)
    return F.cross_entropy(logits.float(), target)


def encode_targets(objects: Sequence[Mapping[str, Sequence[float]]], shape: tuple[int, int], n_classes: int,
                   sigma: float = 1.0) -> dict[str, torch.Tensor]:
    """Training targets for :class:`CenterNet` from object lists.

    Parameters
    ----------
    objects : one mapping per image with equal-length sequences ``y``, ``x`` (0-based pixels, float),
        ``class_id`` (int in [0, n_classes)) and optionally ``w``, ``h`` (pixels; default 0)
    shape : (H, W) of the images
    n_classes : heatmap channels
    sigma : Gaussian width of the heatmap target, pixels

    Returns
    -------
    dict of float32 tensors: ``heatmap`` (B, K, H, W) with exactly 1 at each centre pixel;
    ``size`` (B, 2, H, W) ``(w, h)``, ``offset`` (B, 2, H, W) ``(dy, dx)`` and ``mask`` (B, 1, H, W), set at
    centre pixels only. Objects whose centre pixel falls outside the image are skipped.
    """
    H, W = shape
    B = len(objects)
    heat = np.zeros((B, n_classes, H, W), np.float32)
    size = np.zeros((B, 2, H, W), np.float32)
    offset = np.zeros((B, 2, H, W), np.float32)
    mask = np.zeros((B, 1, H, W), np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    for b, obj in enumerate(objects):
        ys, xs = np.asarray(obj["y"], float), np.asarray(obj["x"], float)
        cls = np.asarray(obj["class_id"], int)
        ws = np.asarray(obj.get("w", np.zeros_like(ys)), float)
        hs = np.asarray(obj.get("h", np.zeros_like(ys)), float)
        for y, x, c, w, h in zip(ys, xs, cls, ws, hs):
            if not 0 <= c < n_classes:
                raise ValueError(f"encode_targets: class_id={c} outside [0, {n_classes}).")
            iy, ix = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
            if not (0 <= iy < H and 0 <= ix < W):
                continue
            g = np.exp(-((yy - iy) ** 2 + (xx - ix) ** 2) / (2.0 * sigma ** 2)).astype(np.float32)
            heat[b, c] = np.maximum(heat[b, c], g)
            size[b, :, iy, ix] = (w, h)
            offset[b, :, iy, ix] = (y - iy, x - ix)
            mask[b, 0, iy, ix] = 1.0
    return {k: torch.from_numpy(v) for k, v in
            (("heatmap", heat), ("size", size), ("offset", offset), ("mask", mask))}


@torch.no_grad()
def decode(outputs: Mapping[str, torch.Tensor], threshold: float = 0.3, k: int = 100) -> list[np.ndarray]:
    """Objects from CenterNet outputs: 3x3 max-pool peaks (non-maximum suppression), score >= threshold.

    Parameters
    ----------
    outputs : ``{'heatmap': (B, K, H, W) logits, 'size': (B, 2, H, W), 'offset': (B, 2, H, W)}``
    threshold : minimum sigmoid score of a peak
    k : at most this many objects per image (the highest scores, over all classes)

    Returns
    -------
    list of B structured arrays of dtype :data:`DETECTION_DTYPE`, sorted by decreasing score:
    ``y``, ``x`` (0-based input pixels, centre pixel + offset), ``score``, ``class_id``, ``w``, ``h``
    (sizes clipped at 0), ``class_prob`` (softmax probability of ``class_id`` from the ``'class'`` head, or
    the score for per-class heatmaps). When ``outputs`` has a ``'class'`` entry (a network with
    ``class_head``), peaks are found on the one objectness channel and the class is the argmax of the class
    logits at the peak. A pixel is a peak when its logit equals the maximum of its 3x3 neighbourhood
    (peaks are found on logits, where sigmoid saturation cannot create ties); exactly equal neighbours both
    count as peaks.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"decode: threshold={threshold!r} must be a probability in [0, 1].")
    if k < 1:
        raise ValueError(f"decode: k={k!r} must be >= 1.")
    logits = outputs["heatmap"].float()
    B, K, H, W = logits.shape
    peaks = logits == F.max_pool2d(logits, 3, stride=1, padding=1)
    scores = torch.where(peaks, torch.sigmoid(logits), torch.zeros_like(logits)).reshape(B, -1)
    top_scores, top_idx = scores.topk(min(k, scores.shape[1]), dim=1)
    size = outputs["size"].float()
    offset = outputs["offset"].float()
    class_p = torch.softmax(outputs["class"].float(), dim=1) if "class" in outputs else None
    result = []
    for b in range(B):
        keep = top_scores[b] >= threshold
        if threshold == 0:
            keep &= top_scores[b] > 0  # non-peaks carry score 0
        idx = top_idx[b][keep]
        cls, pix = idx // (H * W), idx % (H * W)
        iy, ix = pix // W, pix % W
        off = offset[b][:, iy, ix].double().cpu().numpy()
        wh = size[b][:, iy, ix].clamp_min(0).cpu().numpy()
        row = np.zeros(len(idx), DETECTION_DTYPE)
        row["y"] = iy.cpu().numpy() + off[0]
        row["x"] = ix.cpu().numpy() + off[1]
        row["score"] = top_scores[b][keep].cpu().numpy()
        row["w"], row["h"] = wh[0], wh[1]
        if class_p is None:
            row["class_id"] = cls.cpu().numpy()
            row["class_prob"] = row["score"]
        else:
            cp = class_p[b][:, iy, ix]
            best = cp.argmax(0)
            row["class_id"] = best.cpu().numpy()
            row["class_prob"] = cp.gather(0, best[None])[0].cpu().numpy()
        result.append(row)
    return result
