"""Classical baseline of the morphology stage: PSF-convolved Sersic and bulge + disk least-squares fits.

The model is the mosaic simulator's own (:func:`deepmosaic.pipeline.simulate.galaxy_profile`): Sersic
profiles truncated at 5 half-light radii (the half-light radius is that of the truncated profile), sheared
with an area-preserving shear (circularised radius ``sqrt(q u**2 + v**2 / q)`` in the galaxy's frame), a
unit-flux Moffat PSF truncated at 5 FWHM, pixel-integrated. It is rendered here in numpy, not GalSim: GalSim
builds a table for every new Sersic index (~1 s each), which a continuous fit of n cannot afford.

Rendering (:class:`ProfileRenderer`): the galaxy is evaluated at the centres of ``oversample`` x
``oversample`` sub-pixels over the stamp plus a ``margin`` px border (light from outside the stamp scatters
in), the ``3 x 3`` sub-pixels nearest the centre again on a 9 x 9 finer grid (the cusp of high-n profiles),
convolved with the PSF sampled on the same sub-pixel grid by FFT, and averaged per pixel (pixel
integration). Measured accuracy against GalSim's FFT rendering: see ``tests/test_morphology_fit.py``.

Fits (:func:`fit_sersic`, :func:`fit_bulge_disk`): ``scipy.optimize.least_squares`` (trust-region
reflective, 2-point finite-difference Jacobian, bounds), residuals ``(data - model) / sigma`` over unmasked
pixels. Sersic parameters ``(flux, x, y, log hlr, log n, g1, g2)``; bulge + disk ``(flux, x, y, log
hlr_disk, log (hlr_bulge / hlr_disk), B/T, g1, g2)`` with a common shape; ``g = (1 - q) / (1 + q) * (cos 2
theta, sin 2 theta)``. Starting point from the stamp's moments. 1-sigma errors from the covariance ``(J^T
J)^-1 * chi2 / dof``, propagated to ``hlr``, ``n``, ``q``, ``pa`` and the total half-light radius of the
bulge + disk by the delta method (a numerical Jacobian of the transform).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import fft, optimize
from scipy.special import gammainc, gammaincinv, gammaln

from deepmosaic.pipeline.simulate import PSF_TRUNC_FWHM, TRUNC_HLR, _bulge_disk_hlr_factor

#: bounds of the fitted shape parameters
HLR_BOUNDS = (0.3, 60.0)        # px
N_BOUNDS = (0.3, 6.2)           # GalSim's Sersic range
G_MAX = 0.9                     # |g| <= 0.9 <=> q >= 0.053
RATIO_BOUNDS = (0.05, 1.5)      # bulge hlr / disk hlr


@functools.lru_cache(maxsize=4096)
def _sersic_b(n: float) -> float:
    """``b`` with ``I = exp(-b (r / hlr)**(1/n))`` for a Sersic truncated at ``TRUNC_HLR`` hlr whose truncated
    profile has half-light radius ``hlr``: solves ``P(2n, b) = P(2n, b T**(1/n)) / 2`` (P = regularised
    lower incomplete gamma)."""
    t = TRUNC_HLR ** (1.0 / n)

    def f(b):
        return gammainc(2 * n, b) - 0.5 * gammainc(2 * n, b * t)

    b0 = gammaincinv(2 * n, 0.5)  # untruncated value: a bracket from below
    return float(optimize.brentq(f, 1e-6, b0 * 1.01 + 1e-3, xtol=1e-12))


def _sersic_norm(n: float, b: float) -> float:
    """Flux of ``exp(-b (r/hlr)**(1/n))`` truncated at ``TRUNC_HLR`` hlr, for hlr = 1 (area-preserving shear)."""
    x = b * TRUNC_HLR ** (1.0 / n)
    return float(2 * math.pi * n * math.exp(gammaln(2 * n) - 2 * n * math.log(b)) * gammainc(2 * n, x))


def g_to_q_angle(g1: float, g2: float) -> tuple[float, float]:
    """``(q, angle_deg)`` of the shape ``g`` (``|g|`` capped at ``G_MAX``)."""
    g = min(math.hypot(g1, g2), G_MAX)
    return (1 - g) / (1 + g), math.degrees(0.5 * math.atan2(g2, g1)) % 180.0


def q_angle_to_g(q: float, angle: float) -> tuple[float, float]:
    g = (1 - q) / (1 + q)
    return g * math.cos(math.radians(2 * angle)), g * math.sin(math.radians(2 * angle))


class ProfileRenderer:
    """Pixel-integrated, PSF-convolved galaxy images on a ``size`` x ``size`` stamp (numpy + FFT).

    Parameters
    ----------
    size : int
        Stamp side (px); pixel ``i`` spans ``[i - 0.5, i + 0.5)``.
    psf_fwhm, psf_beta : float
        Moffat PSF (FWHM in px), truncated at 5 FWHM as in the simulator.
    oversample : int
        Sub-pixels per pixel along each axis.
    margin : int
        Minimum border (px) around the stamp over which the galaxy is evaluated (widened to a fast FFT size).
    """

    def __init__(self, size: int, psf_fwhm: float, psf_beta: float, oversample: int = 3, margin: int = 8):
        self.size, self.k = int(size), int(oversample)
        # widen the margin until the sub-pixel grid is a fast FFT length (e.g. 48 px, k=3: 64 * 3 = 192)
        m = int(margin)
        while fft.next_fast_len((self.size + 2 * m) * self.k, real=True) != (self.size + 2 * m) * self.k:
            m += 1
        self.margin = m
        self.psf_fwhm, self.psf_beta = float(psf_fwhm), float(psf_beta)
        k = self.k
        n = (self.size + 2 * self.margin) * k
        self.n = n
        # sub-pixel centres in stamp pixel coordinates
        c = (np.arange(n) + 0.5) / k - 0.5 - self.margin
        self.coords = c
        # PSF on the same grid, centred on sub-pixel 0 (wrapped), unit sum
        d = (np.arange(n) - 0.0)
        d = np.where(d > n // 2, d - n, d) / k
        r2 = d[:, None] ** 2 + d[None, :] ** 2
        alpha = psf_fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / psf_beta) - 1.0))
        psf = (1.0 + r2 / alpha ** 2) ** (-psf_beta)
        psf[r2 > (PSF_TRUNC_FWHM * psf_fwhm) ** 2] = 0.0
        self.psf_ft = fft.rfft2(psf / psf.sum())
        fine = 9
        self._fine = (np.arange(fine) + 0.5) / fine - 0.5   # offsets inside one sub-pixel, in sub-pixels

    def _profile(self, dx, dy, hlr, n, q, angle):
        """Unit-flux truncated sheared Sersic at offsets (dx, dy) px from the centre."""
        b = _sersic_b(n)
        th = math.radians(angle)
        ct, st = math.cos(th), math.sin(th)
        u = dx * ct + dy * st
        v = -dx * st + dy * ct
        r = np.sqrt(q * u * u + v * v / q) / hlr
        img = np.exp(-b * r ** (1.0 / n))
        img[r > TRUNC_HLR] = 0.0
        return img / (_sersic_norm(n, b) * hlr * hlr)

    def _sample(self, x0, y0, comps):
        """Sub-pixel image (surface brightness x sub-pixel area) of a sum of ``(flux, hlr, n, q, angle)``."""
        k = self.k
        dx = self.coords[None, :] - x0
        dy = self.coords[:, None] - y0
        img = np.zeros((self.n, self.n))
        # the 3 x 3 sub-pixels nearest the centre, integrated on a finer grid (steep cusps)
        ix = int(np.clip(np.argmin(np.abs(self.coords - x0)), 1, self.n - 2))
        iy = int(np.clip(np.argmin(np.abs(self.coords - y0)), 1, self.n - 2))
        fy = (self.coords[iy - 1:iy + 2, None] + self._fine[None, :] / k - y0).reshape(-1)
        fx = (self.coords[ix - 1:ix + 2, None] + self._fine[None, :] / k - x0).reshape(-1)
        m = len(self._fine)
        for flux, hlr, n, q, angle in comps:
            # only the box holding the truncated profile (r <= TRUNC_HLR hlr reaches at most TRUNC_HLR hlr /
            # sqrt(q) from the centre along either axis): the rest of the grid is exactly 0
            reach = TRUNC_HLR * hlr / math.sqrt(q) + 1.0 / k
            y_lo = min(int(np.searchsorted(self.coords, y0 - reach)), iy - 1)
            y_hi = max(int(np.searchsorted(self.coords, y0 + reach, side="right")), iy + 2)
            x_lo = min(int(np.searchsorted(self.coords, x0 - reach)), ix - 1)
            x_hi = max(int(np.searchsorted(self.coords, x0 + reach, side="right")), ix + 2)
            part = self._profile(dx[:, x_lo:x_hi], dy[y_lo:y_hi, :], hlr, n, q, angle)
            fine = self._profile(fx[None, :], fy[:, None], hlr, n, q, angle)
            cy, cx = iy - y_lo, ix - x_lo
            part[cy - 1:cy + 2, cx - 1:cx + 2] = fine.reshape(3, m, 3, m).mean(axis=(1, 3))
            img[y_lo:y_hi, x_lo:x_hi] += flux * part
        return img / (k * k)

    def render(self, x0: float, y0: float, comps) -> np.ndarray:
        """``[size, size]`` image of components ``(flux, hlr, n, q, angle)`` centred at ``(x0, y0)`` px."""
        sub = fft.irfft2(fft.rfft2(self._sample(x0, y0, comps)) * self.psf_ft, s=(self.n, self.n))
        k, m, s = self.k, self.margin, self.size
        sub = sub[m * k:(m + s) * k, m * k:(m + s) * k]
        return sub.reshape(s, k, s, k).sum(axis=(1, 3))

    def sersic(self, flux, x0, y0, hlr, n, q, angle) -> np.ndarray:
        return self.render(x0, y0, [(flux, hlr, n, q, angle)])

    def bulge_disk(self, flux, x0, y0, hlr, bulge_frac, bulge_hlr_ratio, q, angle) -> np.ndarray:
        """Bulge (n=4) + disk (n=1) whose total half-light radius is ``hlr`` (as the simulator)."""
        disk = hlr / _bulge_disk_hlr_factor(float(bulge_frac), float(bulge_hlr_ratio))
        return self.render(x0, y0, [(flux * bulge_frac, disk * bulge_hlr_ratio, 4.0, q, angle),
                                    (flux * (1 - bulge_frac), disk, 1.0, q, angle)])


# --------------------------------------------------------------------------------------------- moments

def moments_start(data: np.ndarray, weight: np.ndarray, psf_fwhm: float) -> dict:
    """Starting point from the stamp: flux (sum of positive light near the centre), centroid, size from the
    second moments minus the PSF's, shape from the moments. ``data`` in noise units, ``weight`` 0/1."""
    s = data.shape[0]
    c = (s - 1) / 2.0
    yy, xx = np.indices(data.shape, dtype=float)
    w = np.clip(data, 0, None) * weight * (((xx - c) ** 2 + (yy - c) ** 2) <= (s / 2.5) ** 2)
    tot = w.sum()
    if tot <= 0:
        return dict(flux=max(float((data * weight).sum()), 1.0), x=c, y=c, hlr=2.0, g1=0.0, g2=0.0)
    x0, y0 = (w * xx).sum() / tot, (w * yy).sum() / tot
    if abs(x0 - c) > 2 or abs(y0 - c) > 2:
        x0, y0 = c, c
    mxx = (w * (xx - x0) ** 2).sum() / tot
    myy = (w * (yy - y0) ** 2).sum() / tot
    mxy = (w * (xx - x0) * (yy - y0)).sum() / tot
    return dict(flux=float(tot) * 1.3, x=float(x0), y=float(y0), **moments_shape(mxx, myy, mxy, psf_fwhm))


def moments_shape(mxx: float, myy: float, mxy: float, psf_fwhm: float, undo_psf_dilution: bool = True) -> dict:
    """Starting ``hlr`` (px, 0.5-30) and reduced shear ``g1``, ``g2`` from a galaxy's light-weighted second
    moments (px^2) and the PSF's FWHM (px): the size from the moments minus the PSF's, the distortion turned
    into a reduced shear (|g| <= 0.7), and with ``undo_psf_dilution`` the PSF's rounding of the shape undone
    to first order."""
    psf_var = (psf_fwhm / 2.355) ** 2
    t = max(mxx + myy - 2 * psf_var, 0.5)
    e1, e2 = (mxx - myy) / max(mxx + myy, 1e-6), 2 * mxy / max(mxx + myy, 1e-6)
    emag = math.hypot(e1, e2)
    gmag = emag / (1 + math.sqrt(max(1 - emag * emag, 0.0)))
    if undo_psf_dilution:
        gmag = gmag * (mxx + myy) / t
    gmag = min(gmag, 0.7) if emag > 0 else 0.0
    g1, g2 = (gmag * e1 / emag, gmag * e2 / emag) if emag > 0 else (0.0, 0.0)
    return dict(hlr=float(np.clip(1.18 * math.sqrt(t / 2), 0.5, 30.0)), g1=g1, g2=g2)


# --------------------------------------------------------------------------------------------- fitting

def _cov(res, n_data: int) -> np.ndarray:
    """Covariance ``(J^T J)^-1 chi2/dof`` of a least_squares result (pseudo-inverse if singular)."""
    J = res.jac
    dof = max(n_data - J.shape[1], 1)
    s2 = max(2 * res.cost / dof, 1e-12)
    return np.linalg.pinv(J.T @ J) * s2


def _propagate(f, p, cov) -> np.ndarray:
    """Standard errors of ``f(p)`` (a vector) by the delta method with a central-difference Jacobian."""
    f0 = np.asarray(f(p), float)
    J = np.zeros((len(f0), len(p)))
    for i in range(len(p)):
        h = 1e-5 * max(abs(p[i]), 1.0)
        a, b = p.copy(), p.copy()
        a[i] += h
        b[i] -= h
        J[:, i] = (np.asarray(f(a)) - np.asarray(f(b))) / (2 * h)
    var = np.einsum("ij,jk,ik->i", J, cov, J)
    return np.sqrt(np.clip(var, 0, None))


def _pa_err(g1, g2, cov_g) -> float:
    """1-sigma position-angle error (deg) from the covariance of (g1, g2); 90 when round."""
    g2sum = g1 * g1 + g2 * g2
    if g2sum < 1e-8:
        return 90.0
    dth = np.array([-g2, g1]) / (2 * g2sum)
    return float(min(math.degrees(math.sqrt(max(dth @ cov_g @ dth, 0.0))), 90.0))


def fit_sersic(data, weight, renderer: ProfileRenderer, start: dict | None = None, max_nfev: int = 300) -> dict:
    """Least-squares PSF-convolved Sersic fit of one stamp (noise units).

    Returns dict ``r_half``, ``sersic_n``, ``q``, ``pa`` and ``*_err``, ``flux``, ``x``, ``y``, ``chi2``,
    ``n_data``, ``nfev``, ``success``, ``at_bound`` (a shape parameter ended on a bound).
    """
    st = start or moments_start(data, weight, renderer.psf_fwhm)
    w = weight.astype(float).ravel()
    d = data.ravel()

    def model(p):
        q, ang = g_to_q_angle(p[5], p[6])
        return renderer.sersic(p[0], p[1], p[2], math.exp(p[3]), math.exp(p[4]), q, ang)

    def resid(p):
        return (d - model(p).ravel()) * w

    x0 = np.array([st["flux"], st["x"], st["y"], math.log(st["hlr"]), math.log(2.0), st["g1"], st["g2"]])
    lo = np.array([1e-6, st["x"] - 3, st["y"] - 3, math.log(HLR_BOUNDS[0]), math.log(N_BOUNDS[0]), -G_MAX, -G_MAX])
    hi = np.array([np.inf, st["x"] + 3, st["y"] + 3, math.log(HLR_BOUNDS[1]), math.log(N_BOUNDS[1]), G_MAX, G_MAX])
    x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
    res = optimize.least_squares(resid, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev)
    p = res.x
    cov = _cov(res, int(w.sum()))
    q, ang = g_to_q_angle(p[5], p[6])
    errs = _propagate(lambda v: [math.exp(v[3]), math.exp(v[4]), g_to_q_angle(v[5], v[6])[0]], p, cov)
    at_bound = bool(np.any(np.isclose(p[3:5], lo[3:5], atol=1e-3) | np.isclose(p[3:5], hi[3:5], atol=1e-3)))
    return {"r_half": math.exp(p[3]), "r_half_err": float(errs[0]), "sersic_n": math.exp(p[4]),
            "sersic_n_err": float(errs[1]), "q": q, "q_err": float(errs[2]), "pa": ang,
            "pa_err": _pa_err(p[5], p[6], cov[5:7, 5:7]), "flux": float(p[0]), "x": float(p[1]), "y": float(p[2]),
            "chi2": float(2 * res.cost), "n_data": int(w.sum()), "n_par": 7, "nfev": int(res.nfev),
            "success": bool(res.success), "at_bound": at_bound}


def fit_bulge_disk(data, weight, renderer: ProfileRenderer, start: dict | None = None, max_nfev: int = 300) -> dict:
    """Least-squares n=4 bulge + n=1 disk fit (common q, angle and centre) of one stamp (noise units).

    Returns dict ``bulge_frac``, ``bulge_frac_err``, total ``r_half`` (+ ``_err``), ``q``, ``pa`` (+ errors),
    ``chi2``, ``n_data``, ``n_par``, ``success``, ``at_bound``.
    """
    st = start or moments_start(data, weight, renderer.psf_fwhm)
    w = weight.astype(float).ravel()
    d = data.ravel()

    def comps(p):
        q, ang = g_to_q_angle(p[6], p[7])
        disk = math.exp(p[3])
        bulge = disk * math.exp(p[4])
        return [(p[0] * p[5], bulge, 4.0, q, ang), (p[0] * (1 - p[5]), disk, 1.0, q, ang)]

    def resid(p):
        return (d - renderer.render(p[1], p[2], comps(p)).ravel()) * w

    def total_hlr(p):
        bt = float(np.clip(p[5], 1e-4, 1 - 1e-4))
        return math.exp(p[3]) * _bulge_disk_hlr_factor(round(bt, 6), round(float(math.exp(p[4])), 6))

    x0 = np.array([st["flux"], st["x"], st["y"], math.log(st["hlr"] * 1.2), math.log(0.4), 0.3, st["g1"], st["g2"]])
    lo = np.array([1e-6, st["x"] - 3, st["y"] - 3, math.log(HLR_BOUNDS[0]), math.log(RATIO_BOUNDS[0]), 0.0,
                   -G_MAX, -G_MAX])
    hi = np.array([np.inf, st["x"] + 3, st["y"] + 3, math.log(HLR_BOUNDS[1]), math.log(RATIO_BOUNDS[1]), 1.0,
                   G_MAX, G_MAX])
    x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
    res = optimize.least_squares(resid, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev)
    p = res.x
    cov = _cov(res, int(w.sum()))
    q, ang = g_to_q_angle(p[6], p[7])
    errs = _propagate(lambda v: [total_hlr(v), g_to_q_angle(v[6], v[7])[0]], p, cov)
    return {"r_half": total_hlr(p), "r_half_err": float(errs[0]), "bulge_frac": float(p[5]),
            "bulge_frac_err": float(math.sqrt(max(cov[5, 5], 0.0))), "q": q, "q_err": float(errs[1]), "pa": ang,
            "pa_err": _pa_err(p[6], p[7], cov[6:8, 6:8]), "chi2": float(2 * res.cost), "n_data": int(w.sum()),
            "n_par": 8, "nfev": int(res.nfev), "success": bool(res.success),
            "at_bound": bool(np.isclose(p[3], lo[3], atol=1e-3) or np.isclose(p[3], hi[3], atol=1e-3))}


def fit_stamp(data, weight, renderer: ProfileRenderer, bulge_disk: bool = True, max_nfev: int = 300) -> dict:
    """Both fits of one stamp and the catalog values: ``sersic_n`` from the Sersic fit, ``bulge_frac`` from the
    bulge + disk fit, ``r_half``, ``q``, ``pa`` from whichever model has the lower BIC (``chi2 + k ln N``).
    ``model`` is 'sersic' or 'bulge_disk'; ``fit_failed`` when the chosen fit did not converge or hit a
    size/index bound."""
    st = moments_start(data, weight, renderer.psf_fwhm)
    s = fit_sersic(data, weight, renderer, st, max_nfev)
    out = dict(s, bulge_frac=np.nan, bulge_frac_err=np.nan, model="sersic")
    if bulge_disk:
        b = fit_bulge_disk(data, weight, renderer, st, max_nfev)
        out["bulge_frac"], out["bulge_frac_err"] = b["bulge_frac"], b["bulge_frac_err"]
        ln_n = math.log(max(s["n_data"], 2))
        if b["chi2"] + b["n_par"] * ln_n < s["chi2"] + s["n_par"] * ln_n:
            out.update({k: b[k] for k in ("r_half", "r_half_err", "q", "q_err", "pa", "pa_err", "success",
                                          "at_bound")}, model="bulge_disk")
        out["nfev"] = s["nfev"] + b["nfev"]
    out["fit_failed"] = (not out["success"]) or out["at_bound"]
    return out


__all__ = ["ProfileRenderer", "fit_sersic", "fit_bulge_disk", "fit_stamp", "moments_start", "g_to_q_angle",
           "q_angle_to_g"]
