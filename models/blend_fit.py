"""Refine a deblending network's masks with a joint profile fit of the blend's members.

The deblending masks follow the project's truth convention: a pixel belongs to the member whose noise-free
light is largest there, where that light exceeds 1 noise sigma. The network estimates that partition from
the noisy stamp; its outlines are least certain where the light is near 1 sigma, and it often gives a faint
or close companion nothing. A model of each member's noise-free light answers the convention's question
directly: :func:`fit_blend` fits one PSF-convolved Sersic profile per member, all members at once (their
light overlaps), starting from the network's masks and the members' peaks, and :func:`refine_masks` applies
the convention to the fitted models; :func:`model_shares` turns the models into weights that share the
image's light between the members (the stage's fluxes of refined blends).

A Sersic profile is only a model: real galaxies have arms, clumps and twists. With ``chi2_sigma`` set, the
refined masks are used only where the fit describes the data: the reduced chi-square of the residuals over
the pixels the fitted members own (``n`` pixels) must not exceed ``1 + chi2_sigma * sqrt(2 / n)`` (the
chi-square test at ``chi2_sigma`` standard deviations for unit-variance noise); otherwise, or if the fit
fails, the network's masks are kept. (The deblend stage keeps every converged fit by default: on simulated
fields with clumpy galaxies and neighbours, the masks of fits that fail the test were still better than the
network's.) Inputs are in noise units (image / pixel sigma).

Fit: ``scipy.optimize.least_squares`` (trust-region reflective, forward-difference Jacobian that re-renders
only the stepped member, bounds) over a square
window holding every member's network mask and peak plus ``pad`` px; per member ``(flux, x, y, log hlr,
log n, g1, g2)`` with the renderer of :mod:`deepmosaic.models.profile_fit` (the simulator's truncated
Sersic, a truncated Moffat PSF, pixel-integrated); centres within ``position_bound`` px of the peaks.
Optional priors (``prior_n``, ``prior_g``) add the terms ``(parameter - mean) / sigma`` to the residuals, which
makes the fit a maximum a posteriori estimate: a faint or close companion's Sersic index and shape are
barely constrained by its pixels and, without them, run to their bounds (on validation pairs a fifth of the
companions' indices ended at 0.3 and a tenth at 6.2), which changes the outlines the masks are drawn from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from . import profile_fit as pf

#: relative step of the forward-difference Jacobian (scipy's for '2-point')
_EPS = float(np.sqrt(np.finfo(np.float64).eps))

__all__ = ["BlendFit", "fit_blend", "refine_masks", "model_shares", "fit_window", "member_start"]


@dataclass
class BlendFit:
    """One joint fit: ``models [k, H, W]`` (noise units, the stamp's frame, 0 outside the window)."""

    models: np.ndarray
    params: list
    chi2_red: float
    n_pix: int
    success: bool
    accepted: bool


def fit_window(masks: np.ndarray, peaks: np.ndarray, pad: int, min_size: int = 24) -> tuple[int, int, int]:
    """``(y0, x0, size)`` of a square window inside the stamp holding every mask pixel and peak plus ``pad``."""
    H, W = masks.shape[-2:]
    any_mask = masks.reshape(-1, H, W).any(0)
    ys, xs = np.nonzero(any_mask)
    py, px = peaks[:, 0], peaks[:, 1]
    y_lo = min(ys.min() if ys.size else H, np.floor(py.min())) - pad
    y_hi = max(ys.max() if ys.size else 0, np.ceil(py.max())) + pad + 1
    x_lo = min(xs.min() if xs.size else W, np.floor(px.min())) - pad
    x_hi = max(xs.max() if xs.size else 0, np.ceil(px.max())) + pad + 1
    size = int(min(max(y_hi - y_lo, x_hi - x_lo, min_size), H, W))
    cy, cx = (y_lo + y_hi) / 2, (x_lo + x_hi) / 2
    y0 = int(np.clip(round(cy - size / 2), 0, H - size))
    x0 = int(np.clip(round(cx - size / 2), 0, W - size))
    return y0, x0, size


def member_start(data: np.ndarray, mask: np.ndarray, peak, psf_fwhm: float) -> dict:
    """Starting point of one member: flux, size and shape from the light in its mask about its peak (a
    PSF-sized guess when the mask is empty), centre at the peak."""
    py, px = float(peak[0]), float(peak[1])
    w = np.clip(data, 0, None) * mask
    tot = float(w.sum())
    psf_var = (psf_fwhm / 2.355) ** 2
    if mask.sum() < 5 or tot <= 0:
        iy = int(np.clip(round(py), 0, data.shape[0] - 1))
        ix = int(np.clip(round(px), 0, data.shape[1] - 1))
        amp = max(float(data[iy, ix]), 1.0)
        return {"flux": amp * 2 * math.pi * psf_var, "x": px, "y": py, "hlr": max(psf_fwhm / 2, 0.5),
                "g1": 0.0, "g2": 0.0}
    yy, xx = np.indices(data.shape, dtype=float)
    mxx = float((w * (xx - px) ** 2).sum() / tot)
    myy = float((w * (yy - py) ** 2).sum() / tot)
    mxy = float((w * (xx - px) * (yy - py)).sum() / tot)
    return {"flux": tot * 1.3, "x": px, "y": py,
            **pf.moments_shape(mxx, myy, mxy, psf_fwhm, undo_psf_dilution=False)}


def fit_blend(data: np.ndarray, masks: np.ndarray, peaks: np.ndarray, psf_fwhm: float, psf_beta: float, *,
              weight: np.ndarray | None = None, pad: int = 8, position_bound: float = 3.0, max_nfev: int = 200,
              oversample: int = 3, chi2_sigma: float | None = 3.0, prior_n: tuple[float, float] | None = None,
              prior_g: float | None = None) -> BlendFit:
    """Joint PSF-convolved Sersic fit of a blend's members (see the module doc).

    Parameters
    ----------
    data : float [H, W]
        The stamp in noise units (background-subtracted image / pixel sigma).
    masks : bool [k, H, W]
        The network's masks of the k members (starting points and the fit window).
    peaks : float [k, 2]
        The members' peaks ``(y, x)`` in stamp px.
    psf_fwhm, psf_beta : float
        Moffat PSF, FWHM in px.
    weight : bool [H, W], optional
        Pixels to fit (False: masked, outside the image); all by default.
    chi2_sigma : float or None
        Keep the fit only if it passes the chi-square test at this many sigmas (module doc); None keeps every
        fit that converges.
    prior_n : (float, float), optional
        ``(median, sigma of ln n)``: a log-normal prior on every member's Sersic index (a maximum a
        posteriori fit); none by default.
    prior_g : float, optional
        Sigma of a zero-mean Gaussian prior on each shear component ``g1, g2``; none by default.

    Returns
    -------
    BlendFit with the members' models on the stamp's frame (0 outside the fit window); ``accepted`` says
    whether the fit is kept (it converged, owns pixels and, with ``chi2_sigma``, passed the chi-square test).
    """
    data = np.asarray(data, np.float64)
    masks = np.asarray(masks, bool)
    peaks = np.asarray(peaks, np.float64)
    k = len(peaks)
    y0, x0, size = fit_window(masks, peaks, pad)
    win = (slice(y0, y0 + size), slice(x0, x0 + size))
    d = data[win]
    good = (np.ones(d.shape, bool) if weight is None else np.asarray(weight, bool)[win])
    local = peaks - np.array([y0, x0], float)
    renderer = pf.ProfileRenderer(size, psf_fwhm, psf_beta, oversample=oversample)
    starts = [member_start(np.where(good, d, 0.0), masks[j][win] & good, local[j], psf_fwhm) for j in range(k)]
    x_init, lo, hi = [], [], []
    for st in starts:
        x_init += [max(st["flux"], 1e-3), st["x"], st["y"], math.log(np.clip(st["hlr"], 0.31, 59.0)), math.log(1.5),
                   st["g1"], st["g2"]]
        lo += [1e-6, st["x"] - position_bound, st["y"] - position_bound, math.log(pf.HLR_BOUNDS[0]),
               math.log(pf.N_BOUNDS[0]), -pf.G_MAX, -pf.G_MAX]
        hi += [np.inf, st["x"] + position_bound, st["y"] + position_bound, math.log(pf.HLR_BOUNDS[1]),
               math.log(pf.N_BOUNDS[1]), pf.G_MAX, pf.G_MAX]
    x_init, lo, hi = np.array(x_init), np.array(lo), np.array(hi)
    x_init = np.clip(x_init, lo + 1e-6, hi - 1e-6)

    def member(v, j):
        q, ang = pf.g_to_q_angle(v[7 * j + 5], v[7 * j + 6])
        return renderer.sersic(v[7 * j], v[7 * j + 1], v[7 * j + 2], math.exp(v[7 * j + 3]), math.exp(v[7 * j + 4]),
                               q, ang)

    flat, w = d.ravel(), good.ravel().astype(np.float64)
    last = {}
    # prior terms: extra residuals (v[i] - mu) / sigma after the pixels' (a MAP fit for unit-variance noise)
    p_idx, p_mu, p_sig = [], [], []
    for j in range(k):
        if prior_n is not None:
            p_idx.append(7 * j + 4)
            p_mu.append(math.log(prior_n[0]))
            p_sig.append(prior_n[1])
        if prior_g is not None:
            p_idx += [7 * j + 5, 7 * j + 6]
            p_mu += [0.0, 0.0]
            p_sig += [prior_g, prior_g]
    p_idx, p_mu, p_sig = np.array(p_idx, int), np.array(p_mu), np.array(p_sig)

    def resid(v):
        parts = [member(v, j) for j in range(k)]
        last["v"], last["parts"] = v.copy(), parts
        return np.concatenate([(flat - sum(parts).ravel()) * w, (v[p_idx] - p_mu) / p_sig])

    def jac(v):
        # forward differences as scipy's '2-point' takes them (step sqrt(eps) max(1, |v|), reversed at a
        # bound), but a step of member j's parameters re-renders member j only: the others' light is unchanged;
        # the flux, in which the light is linear, needs no render
        if "v" not in last or not np.array_equal(last["v"], v):
            resid(v)
        parts = last["parts"]
        J = np.zeros((flat.size + p_idx.size, v.size))
        J[flat.size + np.arange(p_idx.size), p_idx] = 1.0 / p_sig
        for i in range(v.size):
            if i % 7 == 0:          # a member's light is linear in its flux: d model / d flux = model / flux
                J[:flat.size, i] = -parts[i // 7].ravel() * w / v[i]
                continue
            step = _EPS * (1.0 if v[i] >= 0 else -1.0) * max(1.0, abs(v[i]))
            x1 = v[i] + step
            if x1 < lo[i] or x1 > hi[i]:
                x1 = v[i] - step
            v1 = v.copy()
            v1[i] = x1
            J[:flat.size, i] = (parts[i // 7] - member(v1, i // 7)).ravel() * w / (x1 - v[i])
        return J

    models = np.zeros((k,) + data.shape)
    try:
        res = optimize.least_squares(resid, x_init, jac=jac, bounds=(lo, hi), method="trf", x_scale="jac",
                                     max_nfev=max_nfev)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):
        return BlendFit(models, [], float("nan"), 0, False, False)
    local_models = np.stack([member(res.x, j) for j in range(k)])
    models[(slice(None),) + win] = local_models
    owned = (local_models.max(0) > 1.0) & good
    n_pix = int(owned.sum())
    residual = d - local_models.sum(0)
    chi2_red = float(np.mean(residual[owned] ** 2)) if n_pix else float("nan")
    params = []
    for j in range(k):
        v = res.x[7 * j:7 * j + 7]
        q, ang = pf.g_to_q_angle(v[5], v[6])
        params.append({"flux": float(v[0]), "x": float(v[1] + x0), "y": float(v[2] + y0),
                       "r_half": math.exp(v[3]), "sersic_n": math.exp(v[4]), "q": q, "pa": ang})
    success = bool(res.status > 0) and np.isfinite(chi2_red)
    accepted = success and n_pix > 0 and (chi2_sigma is None
                                          or chi2_red <= 1.0 + chi2_sigma * math.sqrt(2.0 / n_pix))
    return BlendFit(models, params, chi2_red, n_pix, success, bool(accepted))


def refine_masks(data: np.ndarray, masks: np.ndarray, peaks: np.ndarray, psf_fwhm: float, psf_beta: float,
                 **fit_options) -> tuple[np.ndarray, BlendFit]:
    """The members' masks ``[k, H, W]`` by the truth convention applied to their fitted models (a pixel goes
    to the member with the most model light there, where it exceeds 1 sigma), or ``masks`` unchanged when the
    fit is not accepted. Returns ``(masks, fit)``."""
    from .datasets import ownership_masks
    fit = fit_blend(data, masks, peaks, psf_fwhm, psf_beta, **fit_options)
    if not fit.accepted:
        return np.asarray(masks, bool), fit
    return ownership_masks(fit.models) > 0.5, fit


def model_shares(models: np.ndarray) -> np.ndarray:
    """Per-member weights ``[k, H, W]`` for sharing the image's light between fitted members: ``M_k / max(sum_j
    M_j, 1)``, the members' fractions of the model light where it exceeds 1 sigma, fading with the light below
    (they take the network's probabilities' place in the stage's flux sharing when a fit is kept)."""
    models = np.asarray(models, np.float64)
    return (models / np.maximum(models.sum(0), 1.0)).astype(np.float32)
