"""Training losses for segmentation, detection and (later) morphology regression.

Conventions: tensors are ``(B, C, H, W)`` (any trailing spatial shape works where noted); ``logits`` are
raw network outputs (a sigmoid is applied inside, in a numerically stable way); ``target`` masks are floats in
``[0, 1]`` with 1 = inside the object. ``reduction`` is ``'mean'`` (default), ``'sum'`` or ``'none'``.
Every function returns a scalar unless ``reduction='none'``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from deepmosaic.pipeline.errors import ConfigError

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction={reduction!r}: use one of {', '.join(REDUCTIONS)}.")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, where: str, na="logits", nb="target") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{where}: {na}.shape={tuple(a.shape)} and {nb}.shape={tuple(b.shape)} must match.")


def bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
        pos_weight: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy with logits.

    Parameters
    ----------
    logits, target : (B, C, ...) float; target in [0, 1]
    weight : broadcastable to ``logits``, optional per-pixel weight (0 = ignore)
    pos_weight : float, optional weight of the positive term (for rare foregrounds)

    Returns
    -------
    scalar (or (B, C, ...) with ``reduction='none'``); 0 for a perfect, confident prediction.
    """
    _check_same_shape(logits, target, "bce")
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pw, reduction="none")
    return _reduce(loss, reduction)


def _probs(x: torch.Tensor, from_logits: bool) -> torch.Tensor:
    return torch.sigmoid(x) if from_logits else x


def _overlap_terms(pred, target, where):
    _check_same_shape(pred, target, where)
    if pred.ndim < 3:
        raise ValueError(f"{where}: expected (B, C, H, W) or (B, C, N) tensors, got shape {tuple(pred.shape)}.")
    dims = tuple(range(2, pred.ndim))
    inter = (pred * target).sum(dims)
    total = pred.sum(dims) + target.sum(dims)
    return inter, total


def _ratio(num: torch.Tensor, den: torch.Tensor, smooth: float) -> torch.Tensor:
    # den == 0 only when both masks are empty and smooth == 0: agreement, ratio 1 (as metrics.iou).
    # Guard the denominator itself (not only the result) so that the gradient stays finite.
    ok = (den + smooth) > 0
    safe = torch.where(ok, den + smooth, torch.ones_like(den))
    return torch.where(ok, (num + smooth) / safe, torch.ones_like(den))


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, from_logits: bool = True,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image and channel.

    Parameters
    ----------
    logits, target : (B, C, H, W) (any number of trailing axes); sums run over the axes after C
    smooth : float, ``s`` above (pixels). ``s = 1`` keeps the gradient alive on empty masks and makes an empty
        prediction of an empty mask a loss of 0; ``s = 0`` gives exactly ``1 - Dice`` on hard masks.
    from_logits : apply a sigmoid first (False: ``logits`` already are probabilities)

    Returns
    -------
    scalar (or (B, C) with ``reduction='none'``) in [0, 1].
    """
    p = _probs(logits, from_logits)
    inter, total = _overlap_terms(p, target, "soft_dice")
    return _reduce(1.0 - _ratio(2.0 * inter, total, smooth), reduction)


def soft_jaccard(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, from_logits: bool = True,
                 reduction: str = "mean") -> torch.Tensor:
    """Soft Jaccard (IoU) loss ``1 - (sum(p t) + s) / (sum(p) + sum(t) - sum(p t) + s)`` per image and channel.

    The differentiable stand-in for the IoU metric: on hard 0/1 masks with ``smooth=0`` it equals
    ``1 - deepmosaic.pipeline.metrics.iou`` exactly (both empty: IoU 1, loss 0).

    Parameters
    ----------
    logits, target : (B, C, H, W) (any number of trailing axes); sums run over the axes after C
    smooth : float, ``s`` above, in pixels (default 1: finite gradients on empty masks).
    from_logits : apply a sigmoid first (False: ``logits`` already are probabilities)

    Returns
    -------
    scalar (or (B, C) with ``reduction='none'``) in [0, 1].
    """
    p = _probs(logits, from_logits)
    inter, total = _overlap_terms(p, target, "soft_jaccard")
    return _reduce(1.0 - _ratio(inter, total - inter, smooth), reduction)


def focal(logits: torch.Tensor, target: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
          reduction: str = "mean") -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)**gamma log(p_t)``.

    Down-weights the many easy (mostly background) pixels so that rare objects are not swamped.

    Parameters
    ----------
    logits, target : (B, C, ...) float, target in [0, 1]
    alpha : weight of positives (negatives get ``1 - alpha``); None = no class weighting
    gamma : focusing exponent; 0 gives (alpha-weighted) BCE

    Returns
    -------
    scalar (or (B, C, ...) with ``reduction='none'``), >= 0.
    """
    _check_same_shape(logits, target, "focal")
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t).clamp_min(0) ** gamma
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return _reduce(loss, reduction)


def centernet_focal(logits: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, beta: float = 4.0,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss for Gaussian heatmap targets (Zhou et al. 2019).

    ``-1/N sum[ (1-p)**alpha log p             where heatmap == 1 (object centres)
                (1-y)**beta p**alpha log(1-p)  elsewhere ]``, N = number of centres (at least 1).

    Parameters
    ----------
    logits : (B, K, H, W) heatmap logits, one channel per class
    heatmap : (B, K, H, W) target in [0, 1]: 1 exactly at each object's centre pixel, a Gaussian around it
    weight : broadcastable to ``logits``, optional; 0 removes pixels from the loss (e.g. objects too faint to
        be required, which should be neither rewarded nor punished)

    Returns
    -------
    scalar >= 0; ~0 for a confident, correct heatmap.
    """
    _check_same_shape(logits, heatmap, "centernet_focal", nb="heatmap")
    pos = (heatmap >= 1.0).to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_term = (1 - p) ** alpha * log_p * pos
    neg_term = (1 - heatmap).clamp_min(0) ** beta * p ** alpha * log_1mp * (1 - pos)
    terms = pos_term + neg_term
    if weight is not None:
        terms = terms * weight
        pos = pos * weight
    return -terms.sum() / pos.sum().clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 regression loss at object centres only (CenterNet's size and offset losses).

    Parameters
    ----------
    pred, target : (B, C, H, W) regressed quantities (e.g. C=2 for (w, h) or (dy, dx))
    mask : (B, 1, H, W) or (B, H, W), 1 at object centres and 0 elsewhere (weights allowed)

    Returns
    -------
    scalar: mean absolute error per component over the masked pixels (0 when the mask is empty).
    """
    _check_same_shape(pred, target, "masked_l1", na="pred")
    if mask.ndim == pred.ndim - 1:
        mask = mask.unsqueeze(1)
    mask = mask.to(pred.dtype)
    n = mask.sum() * pred.shape[1]
    return ((pred - target).abs() * mask).sum() / n.clamp_min(1.0)


def gaussian_nll(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor, full: bool = False,
                 reduction: str = "mean") -> torch.Tensor:
    """Gaussian negative log-likelihood ``0.5 (log_var + (target - mean)**2 / exp(log_var))``.

    For regressions that also predict their uncertainty (e.g. log r_half, log n, q of a galaxy).

    Parameters
    ----------
    mean, log_var, target : same shape, e.g. (B, P) for P parameters; ``log_var`` is the natural log of the
        predicted variance (predicting the log keeps the variance positive)
    full : add the constant ``0.5 log(2 pi)``

    Returns
    -------
    scalar (or the input shape with ``reduction='none'``).
    """
    _check_same_shape(mean, target, "gaussian_nll", na="mean")
    _check_same_shape(log_var, target, "gaussian_nll", na="log_var")
    loss = 0.5 * (log_var + (target - mean) ** 2 * torch.exp(-log_var))
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


#: losses of signature ``f(logits, target) -> scalar`` that :func:`combined` can mix
PIXEL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "bce": bce,
    "dice": soft_dice,
    "jaccard": soft_jaccard,
    "focal": focal,
    "centernet_focal": centernet_focal,
}


class CombinedLoss(nn.Module):
    """Weighted sum of pixel losses: ``forward(logits, target) -> scalar``; ``parts()`` gives each term."""

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each unweighted term, by name."""
        return {name: PIXEL_LOSSES[name](logits, target) for name in self.weights}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.parts(logits, target)
        return sum(w * terms[name] for name, w in self.weights.items())

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())


def combined(**weights: float) -> CombinedLoss:
    """A weighted sum of named pixel losses, e.g. ``combined(bce=1.0, dice=1.0)`` (the clump/deblend loss).

    Parameters
    ----------
    **weights : name -> weight (finite, >= 0); names from ``PIXEL_LOSSES``
        (bce, dice, jaccard, focal, centernet_focal), each used with its default options.

    Returns
    -------
    CombinedLoss, called as ``loss(logits, target)`` with (B, C, H, W) tensors.
    """
    if not weights:
        raise ConfigError(f"combined(): give at least one loss weight, e.g. combined(bce=1.0, dice=1.0). "
                          f"Valid names: {', '.join(PIXEL_LOSSES)}.")
    for name, w in weights.items():
        if name not in PIXEL_LOSSES:
            raise ConfigError(f"combined(): unknown loss {name!r}. Valid names: {', '.join(PIXEL_LOSSES)}.")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"combined(): weight {name}={w!r} must be a finite number >= 0.")
    return CombinedLoss({k: float(v) for k, v in weights.items()})
