"""Simulated sky mosaics with a complete truth: image, variance, mask, WCS, catalog and segmentation map.

Everything here is a pure function of a :class:`SimConfig` (no file I/O; see
:mod:`deepmosaic.pipeline.truth` for the files). Same config and seed give byte-identical arrays.

The scene
---------
* Positions are uniform over the mosaic: centroids anywhere in ``[-0.5, n - 0.5)`` on each axis, so
  objects land on tile seams and are cut by the mosaic edge. With ``plant_seams=TILE`` extra objects
  are planted exactly on every seam line and every interior corner of a ``TILE`` x ``TILE`` grid.
* Galaxies are Sersic profiles (n, half-light radius, axis ratio, angle drawn per object); a fraction are
  bulge (n=4) + disk (n=1) with a common axis ratio and angle. Stars are point sources.
* Every profile is truncated (galaxies at ``TRUNC_HLR`` times each component's half-light radius, the
  Moffat PSF at ``PSF_TRUNC_FWHM`` FWHM) so that a finite stamp holds all of its light; the stated
  half-light radius and flux are those of the truncated profile, i.e. of what is drawn.
* Each object is convolved with the PSF and integrated over the pixel (GalSim's default ``method='auto'``),
  drawn into its own stamp at its exact sub-pixel centre and added into the mosaic.
* ``image = sky + objects + noise``: a flat sky with a small linear gradient, Gaussian read/background
  noise of ``noise_sigma`` counts and, when ``gain > 0``, object shot noise; ``variance`` is the variance
  of exactly that noise.

Conventions
-----------
Arrays are indexed ``[y, x]``; pixel coordinates are 0-based and pixel ``i`` spans ``[i - 0.5, i + 0.5)``
(the centre of the first pixel is 0.0). Angles are degrees counter-clockwise from the +x axis (with +y up,
as displayed with ``origin='lower'``). Fluxes are counts; ``mag = zeropoint - 2.5 log10(flux)``.

Truth ownership: a pixel belongs to the object whose noise-free light is largest there, provided that
light exceeds ``1 * noise_sigma``; otherwise it is sky (0). The segmentation map holds the catalog ``id``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.optimize import brentq
from scipy.special import gammainc

from .config import field, require

#: Mask bit planes (bit number). 0 means good.
MASK_BITS = {"BAD": 0}
#: Value of the BAD bit in the mask.
BAD = 1 << MASK_BITS["BAD"]

#: Sersic components are truncated at this many (truncated-profile) half-light radii.
TRUNC_HLR = 5.0
#: The Moffat PSF is truncated at this many FWHM (holds > 99.8% of the untruncated light for beta=3).
PSF_TRUNC_FWHM = 5.0
#: Sersic indices are drawn on a grid of this step so that GalSim's per-index tables are reused.
SERSIC_N_STEP = 0.05
#: Bulge + disk galaxies: bulge fraction and bulge/disk half-light-radius ratio ranges.
BULGE_FRAC_RANGE = (0.1, 0.7)
BULGE_HLR_RATIO_RANGE = (0.2, 0.6)
#: Largest stamp half-size (px) that render_profile chooses by itself.
MAX_STAMP_RADIUS = 160

_WHERE = "SimConfig"


@dataclass(frozen=True)
class SimConfig:
    """Parameters of a simulated mosaic. Frozen; call :meth:`validate` (``from_mapping`` does)."""

    size: tuple[int, int] = field((2048, 2048), "Mosaic shape [ny, nx] in pixels.")
    seed: int = field(0, "Random seed; the same seed gives byte-identical arrays.")
    density: float = field(300.0, "Mean number of (randomly placed) objects per Mpix; the count is Poisson.")
    star_fraction: float = field(0.2, "Fraction of objects that are stars (point sources).")
    pixel_scale: float = field(0.2, "Pixel scale in arcsec/px.")
    psf_fwhm: float = field(0.7, "PSF FWHM in arcsec (Moffat).")
    psf_beta: float = field(3.0, "Moffat beta of the PSF.")
    noise_sigma: float = field(5.0, "Gaussian background/read noise, counts per pixel (1 sigma).")
    gain: float = field(0.0, "Electrons per count for object shot noise; 0 disables shot noise.")
    sky_level: float = field(100.0, "Sky level in counts per pixel.")
    sky_gradient: float = field(
        0.02, "Peak-to-peak fractional linear sky gradient across the mosaic (0 = flat sky).")
    zeropoint: float = field(30.0, "Magnitude of a source of 1 count total: mag = zeropoint - 2.5 log10(flux).")
    mag_range: tuple[float, float] = field((19.0, 25.5), "Magnitude range (bright, faint) of the objects.")
    mag_slope: float = field(
        0.0, "Slope d log10 N / d mag of the magnitude distribution; 0 = uniform in magnitude, 0.3 ~ deep counts.")
    sersic_n_range: tuple[float, float] = field((0.5, 4.0), "Sersic index range of pure-Sersic galaxies.")
    hlr_range: tuple[float, float] = field(
        (0.3, 1.5), "Half-light radius range of galaxies in arcsec (log-uniform).")
    q_range: tuple[float, float] = field((0.3, 1.0), "Axis-ratio (b/a) range of galaxies (uniform).")
    bulge_disk_fraction: float = field(
        0.3, "Fraction of galaxies rendered as bulge (n=4) + disk (n=1) instead of a single Sersic.")
    plant_seams: int | None = field(
        None, "If set, a tile core size: plant extra objects exactly on every seam line and interior corner "
              "of that tile grid (x = k*TILE - 0.5 and small offsets).")
    seam_objects_per_segment: int = field(
        2, "With plant_seams: objects planted on each seam segment (one tile side); corners get one each.")
    n_bad_columns: int = field(0, "Number of dead columns (value 0, mask bit BAD).")
    ra_dec: tuple[float, float] = field((150.1, 2.2), "WCS tangent point (RA, Dec) in degrees, at the mosaic centre.")
    clumpy_density: float = field(
        0.0, "Clumpy disk galaxies per Mpix added on top of the random population (0: none). Their clumps "
             "(unresolved, PSF-shaped) are listed in the truth file's CLUMPS table; see simulate_mosaic.")
    clumpy_snr_range: tuple[float, float] = field(
        (50.0, 1500.0), "Matched-filter S/N of each clumpy host's smooth light (log-uniform).")
    clumpy_hlr_range: tuple[float, float] = field((0.8, 2.4), "Clumpy host half-light radius, arcsec (log-uniform).")
    clumpy_sersic_n_range: tuple[float, float] = field((0.5, 2.0), "Sersic index of pure-Sersic clumpy hosts.")
    clumps_per_host: tuple[int, int] = field((0, 7), "Clumps drawn per clumpy host (uniform; companions on top).")
    clump_snr_range: tuple[float, float] = field(
        (3.0, 100.0), "Clump S/N = flux / (noise_sigma sqrt(A_eff)), log-uniform; A_eff = 1 / sum(psf**2).")
    clump_region_hlr: float = field(1.5, "Clumps are uniform inside the host's half-light ellipse times this.")
    clump_bulge_fraction: float = field(
        0.3, "On bulge + disk hosts, this share of the clumps is drawn inside the bulge's half-light ellipse.")
    clump_pair_fraction: float = field(0.3, "Each placed clump gets a close companion with this probability.")
    clump_pair_fwhm_range: tuple[float, float] = field(
        (2.0, 3.0), "Companion distance in PSF FWHM (uniform); its low end is also every clump pair's minimum.")

    def validate(self) -> "SimConfig":
        """Check every field; raise :class:`~deepmosaic.pipeline.errors.ConfigError` naming the first bad one.

        Returns
        -------
        SimConfig
            ``self``, for chaining.
        """
        w = _WHERE
        size = self.size
        require(isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size),
                w, "size", size, "expected two integers [ny, nx], e.g. size=(2048, 2048).")
        require(min(size) >= 8, w, "size", size, "each side must be at least 8 px.")
        require(max(size) <= 65536 and size[0] * size[1] <= 2**31 - 1, w, "size", size,
                "too large to simulate in memory; simulate at most 2**31 pixels (e.g. 32768 x 32768).")
        require(isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool) and self.seed >= 0,
                w, "seed", self.seed, "expected an integer >= 0.")
        _finite_in(w, "density", self.density, 0.0, 1e5, "objects per Mpix, e.g. density=300.")
        _finite_in(w, "star_fraction", self.star_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _positive(w, "pixel_scale", self.pixel_scale, "arcsec per pixel, e.g. pixel_scale=0.2.")
        _positive(w, "psf_fwhm", self.psf_fwhm, "arcsec, e.g. psf_fwhm=0.7.")
        require(self.psf_fwhm / self.pixel_scale >= 0.5, w, "psf_fwhm", self.psf_fwhm,
                f"the PSF must be at least half a pixel wide (pixel_scale={self.pixel_scale}).")
        _finite_in(w, "psf_beta", self.psf_beta, 1.5, 20.0, "Moffat beta, e.g. psf_beta=3.")
        _positive(w, "noise_sigma", self.noise_sigma,
                  "counts per pixel; it must be > 0 because truth masks are cut at 1 sigma.")
        _finite_in(w, "gain", self.gain, 0.0, 1e9, "electrons per count; 0 turns object shot noise off.")
        _finite_in(w, "sky_level", self.sky_level, -1e9, 1e9, "counts per pixel, e.g. sky_level=100.")
        _finite_in(w, "sky_gradient", self.sky_gradient, 0.0, 1.0, "a fraction in [0, 1], e.g. 0.02.")
        _finite_in(w, "zeropoint", self.zeropoint, -100.0, 100.0, "a magnitude, e.g. zeropoint=27.")
        _range(w, "mag_range", self.mag_range, -50.0, 100.0, "two magnitudes (bright, faint), e.g. (19, 25.5).")
        _finite_in(w, "mag_slope", self.mag_slope, -2.0, 2.0, "d log10 N / d mag, e.g. 0 or 0.3.")
        _range(w, "sersic_n_range", self.sersic_n_range, 0.3, 6.2,
               "two Sersic indices within GalSim's [0.3, 6.2], e.g. (0.5, 4).")
        _range(w, "hlr_range", self.hlr_range, 1e-6, 1e4, "two radii in arcsec, e.g. (0.3, 1.5).")
        _range(w, "q_range", self.q_range, 0.05, 1.0, "two axis ratios in [0.05, 1], e.g. (0.3, 1).")
        _finite_in(w, "bulge_disk_fraction", self.bulge_disk_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        ps = self.plant_seams
        if ps is not None:
            require(isinstance(ps, (int, np.integer)) and not isinstance(ps, bool) and ps >= 16, w,
                    "plant_seams", ps, "expected a tile core size in px (>= 16, like --tile), or None.")
        require(isinstance(self.seam_objects_per_segment, (int, np.integer))
                and 0 <= self.seam_objects_per_segment <= 100, w, "seam_objects_per_segment",
                self.seam_objects_per_segment, "expected an integer in [0, 100].")
        require(isinstance(self.n_bad_columns, (int, np.integer)) and not isinstance(self.n_bad_columns, bool)
                and 0 <= self.n_bad_columns <= size[1], w, "n_bad_columns", self.n_bad_columns,
                f"expected an integer in [0, nx={size[1]}].")
        _validate_clumps(self)
        rd = self.ra_dec
        require(isinstance(rd, (tuple, list)) and len(rd) == 2 and all(_is_finite(v) for v in rd), w,
                "ra_dec", rd, "expected (RA, Dec) in degrees, e.g. (150.1, 2.2).")
        require(0.0 <= rd[0] < 360.0 and -89.0 <= rd[1] <= 89.0, w, "ra_dec", rd,
                "RA must be in [0, 360) and Dec in [-89, 89] degrees.")
        return self

    @property
    def psf_fwhm_px(self) -> float:
        """PSF FWHM in pixels."""
        return self.psf_fwhm / self.pixel_scale


def _is_finite(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _finite_in(w, name, v, lo, hi, fix):
    require(_is_finite(v) and lo <= v <= hi, w, name, v, f"expected a number in [{lo}, {hi}]: {fix}")


def _positive(w, name, v, fix):
    require(_is_finite(v) and v > 0, w, name, v, f"expected a number > 0: {fix}")


def _range(w, name, v, lo, hi, fix):
    require(isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_finite(x) for x in v)
            and lo <= v[0] <= v[1] <= hi, w, name, v, f"expected (low, high) with low <= high: {fix}")


# ---------------------------------------------------------------------------------------------------
# Rendering one object
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stamp:
    """A rendered object: ``array[j, i]`` is the light in target pixel ``(y0 + j, x0 + i)``.

    Attributes
    ----------
    array : numpy.ndarray, float64, shape (ny, nx)
        Noise-free, PSF-convolved, pixel-integrated light in counts per pixel.
    y0, x0 : int
        Target-frame (0-based) pixel of ``array[0, 0]``; may be negative or beyond the target.
    """

    array: np.ndarray
    y0: int
    x0: int

    def overlap(self, shape: tuple[int, int]):
        """Slices of the overlap with a target of ``shape = (ny, nx)``.

        Returns
        -------
        (target_slices, stamp_slices) or None
            Two ``(slice_y, slice_x)`` pairs, or None when the stamp lies wholly outside.
        """
        ny, nx = self.array.shape
        ty0, tx0 = max(self.y0, 0), max(self.x0, 0)
        ty1, tx1 = min(self.y0 + ny, shape[0]), min(self.x0 + nx, shape[1])
        if ty1 <= ty0 or tx1 <= tx0:
            return None
        return ((slice(ty0, ty1), slice(tx0, tx1)),
                (slice(ty0 - self.y0, ty1 - self.y0), slice(tx0 - self.x0, tx1 - self.x0)))

    def add_to(self, image: np.ndarray) -> None:
        """Add the (clipped) stamp into ``image`` in place."""
        ov = self.overlap(image.shape)
        if ov is not None:
            image[ov[0]] += self.array[ov[1]]


def make_psf(fwhm: float, beta: float = 3.0, trunc_fwhm: float = PSF_TRUNC_FWHM) -> galsim.GSObject:
    """A unit-flux Moffat PSF in pixel units.

    Parameters
    ----------
    fwhm : float
        FWHM in pixels.
    beta : float
        Moffat index.
    trunc_fwhm : float
        Truncation radius in units of the FWHM (0 for none). Truncation lets a finite stamp hold all
        the light; at 5 FWHM and beta=3 it drops about 0.1% of the untruncated wings.

    Returns
    -------
    galsim.Moffat
    """
    trunc = trunc_fwhm * fwhm if trunc_fwhm and trunc_fwhm > 0 else 0.0
    return galsim.Moffat(beta=beta, fwhm=fwhm, trunc=trunc)


def _psf_radius(psf: galsim.GSObject | None) -> float:
    """Radius (px) that holds all (truncated) or > 99.5% (folding radius) of the PSF light."""
    if psf is None:
        return 0.0
    trunc = getattr(psf, "trunc", 0.0)
    if trunc:
        return float(trunc)
    return float(math.pi / psf.stepk)


@functools.lru_cache(maxsize=1024)
def _unit_sersic(n: float) -> galsim.Sersic:
    """Unit-flux Sersic with half-light radius 1 px truncated at ``TRUNC_HLR``, for dilating.

    Dilating one cached profile (rather than building ``Sersic(n, half_light_radius=hlr, trunc=...)`` per
    object) keeps ``trunc / scale_radius`` bit-identical for each ``n``, so GalSim's per-(n, trunc) tables
    are built once: a fresh ratio per object costs ~1.5 ms in maxK alone.
    """
    return galsim.Sersic(float(n), half_light_radius=1.0, trunc=TRUNC_HLR)


def _unit_scale_radius(n: float) -> float:
    """GalSim scale radius of a Sersic with half-light radius 1 truncated at ``TRUNC_HLR``."""
    return float(_unit_sersic(n).scale_radius)


def _sersic(n: float, hlr: float, flux: float) -> galsim.GSObject:
    """Truncated Sersic with half-light radius ``hlr`` px (of the truncated profile) and ``flux``."""
    return _unit_sersic(n).dilate(hlr).withFlux(flux)


def _sersic_enclosed(n: float, r: float, hlr: float) -> float:
    """Fraction of a truncated Sersic's light inside radius ``r`` (circular profile)."""
    r0 = _unit_scale_radius(n) * hlr
    rt = TRUNC_HLR * hlr
    r = min(r, rt)
    return float(gammainc(2 * n, (r / r0) ** (1.0 / n)) / gammainc(2 * n, (rt / r0) ** (1.0 / n)))


@functools.lru_cache(maxsize=4096)
def _bulge_disk_hlr_factor(bulge_frac: float, bulge_hlr_ratio: float) -> float:
    """Half-light radius of a bulge (n=4) + disk (n=1) with disk hlr 1 and bulge hlr ``bulge_hlr_ratio``."""
    def f(r):
        return (bulge_frac * _sersic_enclosed(4.0, r, bulge_hlr_ratio)
                + (1 - bulge_frac) * _sersic_enclosed(1.0, r, 1.0) - 0.5)
    return float(brentq(f, 1e-6, TRUNC_HLR * max(1.0, bulge_hlr_ratio), xtol=1e-10, rtol=1e-10))


def bulge_disk_radii(hlr: float, bulge_frac: float, bulge_hlr_ratio: float) -> tuple[float, float]:
    """Component half-light radii ``(bulge_hlr, disk_hlr)`` (px) of a bulge + disk whose total hlr is ``hlr``.

    The composite is self-similar in the disk size, so the total half-light radius is a fixed multiple of
    the disk's for given ``bulge_frac`` and ``bulge_hlr_ratio`` (bulge hlr / disk hlr).
    """
    disk = hlr / _bulge_disk_hlr_factor(float(bulge_frac), float(bulge_hlr_ratio))
    return disk * bulge_hlr_ratio, disk


def galaxy_profile(flux: float, hlr: float, *, sersic_n: float = 1.0, q: float = 1.0, angle: float = 0.0,
                   bulge_frac: float = 0.0, bulge_hlr_ratio: float = 0.4) -> galsim.GSObject:
    """Intrinsic (pre-PSF) galaxy profile in pixel units.

    Parameters
    ----------
    flux : float
        Total flux (counts).
    hlr : float
        Half-light radius (px) of the whole (truncated) profile, circularised: the area-preserving shear
        keeps it equal to ``sqrt(a * b)`` of the half-light ellipse.
    sersic_n : float
        Sersic index of a pure Sersic galaxy (ignored when ``bulge_frac > 0``).
    q : float
        Axis ratio b/a in (0, 1].
    angle : float
        Position angle of the major axis, degrees counter-clockwise from +x.
    bulge_frac : float
        Fraction of the flux in an n=4 bulge; the rest is an n=1 disk. 0 gives a pure Sersic.
    bulge_hlr_ratio : float
        Bulge half-light radius over disk half-light radius (used when ``bulge_frac > 0``).

    Returns
    -------
    galsim.GSObject
    """
    if bulge_frac > 0:
        b_hlr, d_hlr = bulge_disk_radii(hlr, bulge_frac, bulge_hlr_ratio)
        prof = galsim.Add([_sersic(4.0, b_hlr, bulge_frac * flux), _sersic(1.0, d_hlr, (1 - bulge_frac) * flux)])
    else:
        prof = _sersic(float(sersic_n), hlr, flux)
    if q < 1.0:
        prof = prof.shear(q=q, beta=angle * galsim.degrees)
    return prof


def _galaxy_extent(hlr: float, q: float, bulge_frac: float, bulge_hlr_ratio: float) -> float:
    """Semi-major truncation radius (px) of a galaxy profile."""
    if bulge_frac > 0:
        r = TRUNC_HLR * max(bulge_disk_radii(hlr, bulge_frac, bulge_hlr_ratio))
    else:
        r = TRUNC_HLR * hlr
    return r / math.sqrt(q)


def render_profile(flux: float, x: float, y: float, *, psf: galsim.GSObject | None, kind: str = "galaxy",
                   hlr: float = 1.0, sersic_n: float = 1.0, q: float = 1.0, angle: float = 0.0,
                   bulge_frac: float = 0.0, bulge_hlr_ratio: float = 0.4,
                   shape: tuple[int, int] | None = None, origin: tuple[int, int] | None = None,
                   max_radius: int = MAX_STAMP_RADIUS) -> Stamp:
    """Draw one PSF-convolved, pixel-integrated object into its own stamp.

    Parameters
    ----------
    flux : float
        Total flux in counts.
    x, y : float
        Centre in 0-based target pixels (pixel ``i`` spans ``[i - 0.5, i + 0.5)``).
    psf : galsim.GSObject or None
        PSF in pixel units (e.g. :func:`make_psf`); None draws the intrinsic profile (pixel-integrated).
    kind : {'galaxy', 'star'}
        A star is a point source (the PSF itself); the shape parameters are then ignored.
    hlr, sersic_n, q, angle, bulge_frac, bulge_hlr_ratio
        Galaxy shape, see :func:`galaxy_profile` (hlr in px, angle in degrees CCW from +x).
    shape : (int, int), optional
        Stamp shape ``(ny, nx)``. By default an odd square stamp that holds the whole truncated profile
        (PSF included), half-size capped at ``max_radius``.
    origin : (int, int), optional
        Target pixel ``(y0, x0)`` of the stamp's first pixel. By default the stamp is centred on the pixel
        containing ``(x, y)``.
    max_radius : int
        Cap on the automatic stamp half-size (px).

    Returns
    -------
    Stamp
        ``array`` float64 ``[ny, nx]`` in counts per pixel, with its ``(y0, x0)`` origin.

    Notes
    -----
    Drawn with GalSim's default ``method='auto'``: the profile is convolved with the PSF and the pixel
    response (FFT), so pixel values are integrals over the pixel area, not samples at pixel centres.
    """
    if kind not in ("galaxy", "star"):
        raise ValueError(f"render_profile(kind={kind!r}): expected 'galaxy' or 'star'.")
    if not (math.isfinite(flux) and math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"render_profile(flux={flux!r}, x={x!r}, y={y!r}): expected finite numbers.")
    if kind == "galaxy" and not (hlr > 0 and 0 < q <= 1):
        raise ValueError(f"render_profile(hlr={hlr!r}, q={q!r}): a galaxy needs hlr > 0 px and 0 < q <= 1.")
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    if shape is None:
        extent = 0.0 if kind == "star" else _galaxy_extent(hlr, q, bulge_frac, bulge_hlr_ratio)
        radius = int(min(math.ceil(extent + _psf_radius(psf) + 1.0), max_radius))
        shape = (2 * radius + 1, 2 * radius + 1)
    ny, nx = int(shape[0]), int(shape[1])
    if origin is None:
        origin = (iy - ny // 2, ix - nx // 2)
    y0, x0 = int(origin[0]), int(origin[1])

    if kind == "star" and psf is None:
        # A pixel-integrated point source: all of its light falls in the pixel that contains it.
        arr = np.zeros((ny, nx))
        if 0 <= iy - y0 < ny and 0 <= ix - x0 < nx:
            arr[iy - y0, ix - x0] = flux
        return Stamp(arr, y0, x0)

    if kind == "star":
        # A delta convolved with the PSF keeps GalSim on the FFT path when the pixel is added.
        prof = galsim.Convolve(galsim.DeltaFunction(flux=flux), psf)
    else:
        prof = galaxy_profile(flux, hlr, sersic_n=sersic_n, q=q, angle=angle, bulge_frac=bulge_frac,
                              bulge_hlr_ratio=bulge_hlr_ratio)
        if psf is not None:
            prof = galsim.Convolve(prof, psf)
    im = galsim.ImageD(nx, ny, scale=1.0)
    im.setOrigin(x0, y0)   # GalSim image coordinates == our 0-based target pixel coordinates
    prof.drawImage(image=im, center=galsim.PositionD(x, y))
    return Stamp(im.array, y0, x0)


# ---------------------------------------------------------------------------------------------------
# The mosaic
# ---------------------------------------------------------------------------------------------------

@dataclass
class Simulation:
    """A simulated mosaic and its truth.

    Attributes
    ----------
    image : numpy.ndarray, float32, shape (ny, nx)
        Sky + objects + noise, counts per pixel.
    variance : numpy.ndarray, float32, shape (ny, nx)
        Variance of the noise in ``image`` (counts^2).
    mask : numpy.ndarray, int32, shape (ny, nx)
        Bit mask, 0 = good; bit ``MASK_BITS['BAD']`` (0) marks dead pixels.
    header : astropy.io.fits.Header
        Celestial TAN WCS (reference pixel at the centre) plus provenance keywords.
    truth : astropy.table.Table
        One row per object, see :func:`simulate_mosaic`.
    segmap : numpy.ndarray, int32, shape (ny, nx)
        Truth segmentation map: owning object ``id`` or 0 for sky.
    model : numpy.ndarray, float32, shape (ny, nx)
        Noise-free light of all objects (no sky).
    sky : numpy.ndarray, float32, shape (ny, nx)
        The sky that was added.
    config : SimConfig
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    header: fits.Header
    truth: Table
    segmap: np.ndarray
    model: np.ndarray
    sky: np.ndarray
    config: SimConfig
    clumps: Table | None = None

    @property
    def wcs(self) -> WCS:
        """The celestial WCS of the mosaic."""
        return WCS(self.header)


def make_header(config: SimConfig) -> fits.Header:
    """FITS header with a celestial TAN WCS for ``config`` (north up, east left) and provenance keywords.

    The reference pixel is the mosaic centre: ``CRPIX = (n + 1) / 2`` in FITS' 1-based convention.
    """
    ny, nx = config.size
    scale = config.pixel_scale / 3600.0
    hdr = fits.Header()
    hdr["WCSAXES"] = (2, "number of WCS axes")
    hdr["CTYPE1"] = ("RA---TAN", "gnomonic projection")
    hdr["CTYPE2"] = ("DEC--TAN", "gnomonic projection")
    hdr["CUNIT1"] = ("deg", "unit of CRVAL1 and CD1_*")
    hdr["CUNIT2"] = ("deg", "unit of CRVAL2 and CD2_*")
    hdr["CRVAL1"] = (float(config.ra_dec[0]), "[deg] RA at the reference pixel")
    hdr["CRVAL2"] = (float(config.ra_dec[1]), "[deg] Dec at the reference pixel")
    # FITS pixels are 1-based: the centre of an n-pixel axis is (n + 1) / 2.
    hdr["CRPIX1"] = ((nx + 1) / 2.0, "reference pixel (1-based), mosaic centre")
    hdr["CRPIX2"] = ((ny + 1) / 2.0, "reference pixel (1-based), mosaic centre")
    hdr["CD1_1"] = (-scale, "[deg/px] east to the left")
    hdr["CD1_2"] = (0.0, "[deg/px]")
    hdr["CD2_1"] = (0.0, "[deg/px]")
    hdr["CD2_2"] = (scale, "[deg/px] north up")
    hdr["RADESYS"] = ("ICRS", "celestial reference frame")
    hdr["BUNIT"] = ("count", "pixel values are counts")
    hdr["MAGZERO"] = (float(config.zeropoint), "mag = MAGZERO - 2.5 log10(flux in counts)")
    hdr["PIXSCALE"] = (float(config.pixel_scale), "arcsec/px")
    hdr["PSFFWHM"] = (float(config.psf_fwhm), "PSF FWHM, arcsec (Moffat)")
    hdr["PSFBETA"] = (float(config.psf_beta), "Moffat beta of the PSF")
    hdr["NOISESIG"] = (float(config.noise_sigma), "Gaussian noise sigma, counts/px")
    hdr["GAIN"] = (float(config.gain), "e-/count for object shot noise (0: none)")
    hdr["SKYLEVEL"] = (float(config.sky_level), "mean sky, counts/px")
    hdr["SIMSEED"] = (int(config.seed), "deepmosaic simulate seed")
    hdr["SIMDENS"] = (float(config.density), "objects per Mpix (random part)")
    hdr["SEAMTILE"] = (int(config.plant_seams or 0), "tile core of planted seam objects (0: none)")
    return hdr


def _sample_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes on ``[lo, hi]`` with ``dN/dm ~ 10**(slope * m)`` (inverse-CDF sampling)."""
    u = rng.random(n)
    if abs(slope) < 1e-12 or hi == lo:
        return lo + (hi - lo) * u
    a = slope * math.log(10.0)
    # CDF(m) = (exp(a(m-lo)) - 1) / (exp(a(hi-lo)) - 1)
    return lo + np.log1p(u * np.expm1(a * (hi - lo))) / a


def _draw_population(rng: np.random.Generator, n: int, config: SimConfig, mag_range) -> dict:
    """Per-object random parameters (everything drawn for every object so the stream layout is fixed)."""
    star = rng.random(n) < config.star_fraction
    mag = _sample_mags(rng, n, mag_range[0], mag_range[1], config.mag_slope)
    n_lo, n_hi = config.sersic_n_range
    sersic = np.round(rng.uniform(n_lo, n_hi, n) / SERSIC_N_STEP) * SERSIC_N_STEP
    sersic = np.clip(np.round(sersic, 4), n_lo, n_hi)
    lo, hi = (np.log(h / config.pixel_scale) for h in config.hlr_range)
    hlr = np.exp(rng.uniform(lo, hi, n))
    q = rng.uniform(config.q_range[0], config.q_range[1], n)
    angle = rng.uniform(0.0, 180.0, n)
    bd = rng.random(n) < config.bulge_disk_fraction
    bulge_frac = rng.uniform(*BULGE_FRAC_RANGE, n)
    ratio = rng.uniform(*BULGE_HLR_RATIO_RANGE, n)
    return dict(star=star, mag=mag, sersic=sersic, hlr=hlr, q=q, angle=angle, bd=bd,
                bulge_frac=bulge_frac, ratio=ratio)


def _seam_positions(rng: np.random.Generator, config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(x, y)`` planted on the seams and interior corners of a ``plant_seams`` tile grid.

    A tile core ``[k*T, (k+1)*T)`` owns centroids in ``[k*T - 0.5, (k+1)*T - 0.5)``, so the seam between
    two tiles is the line ``k*T - 0.5``. On every seam segment (one tile side) the first object sits
    exactly on the line and the others at small signed offsets (log-uniform 0.001-0.5 px); each interior
    corner gets one object exactly on the corner.
    """
    t = int(config.plant_seams)
    ny, nx = config.size
    xs_seam = [k * t - 0.5 for k in range(1, math.ceil(nx / t))]
    ys_seam = [k * t - 0.5 for k in range(1, math.ceil(ny / t))]
    m = int(config.seam_objects_per_segment)
    px, py = [], []

    def along(lo, hi):
        # positions spread along a segment [lo, hi], away from its corners
        fr = (np.arange(m) + 1.0) / (m + 1.0) + rng.uniform(-0.25, 0.25, m) / (m + 1.0)
        return lo + (hi - lo) * fr

    def offsets():
        off = np.sign(rng.uniform(-1, 1, m)) * 10 ** rng.uniform(-3.0, math.log10(0.5), m)
        off[0] = 0.0
        return off

    if m > 0:
        y_edges = [-0.5] + ys_seam + [ny - 0.5]
        x_edges = [-0.5] + xs_seam + [nx - 0.5]
        for xs in xs_seam:                       # vertical seams, one segment per tile row
            for a, b in zip(y_edges[:-1], y_edges[1:]):
                px.extend(xs + offsets())
                py.extend(along(a, b))
        for ys in ys_seam:                       # horizontal seams, one segment per tile column
            for a, b in zip(x_edges[:-1], x_edges[1:]):
                px.extend(along(a, b))
                py.extend(ys + offsets())
    for xs in xs_seam:                           # interior corners, exactly on them
        for ys in ys_seam:
            px.append(xs)
            py.append(ys)
    return np.asarray(px, float), np.asarray(py, float)


# ---------------------------------------------------------------------------------------------------
# Clumpy galaxies (SimConfig.clumpy_density > 0)
# ---------------------------------------------------------------------------------------------------

#: Bulge flux fraction range of bulge + disk clumpy hosts (the clump training set's range).
CLUMPY_BULGE_FRAC_RANGE = (0.1, 0.5)
#: Two clumps closer than this many PSF FWHM are flagged ``close_pair`` in the clump truth.
CLOSE_PAIR_FWHM = 3.0


def _validate_clumps(c: SimConfig) -> None:
    w = _WHERE
    _finite_in(w, "clumpy_density", c.clumpy_density, 0.0, 1e4, "clumpy hosts per Mpix, e.g. 60 (0: none).")
    _range(w, "clumpy_snr_range", c.clumpy_snr_range, 1e-3, 1e7, "host S/N, e.g. (50, 1500).")
    require(c.clumpy_snr_range[0] > 0, w, "clumpy_snr_range", c.clumpy_snr_range, "S/N must be > 0.")
    _range(w, "clumpy_hlr_range", c.clumpy_hlr_range, 1e-3, 1e3, "arcsec, e.g. (0.8, 2.4).")
    _range(w, "clumpy_sersic_n_range", c.clumpy_sersic_n_range, 0.3, 6.2, "Sersic indices, e.g. (0.5, 2).")
    v = c.clumps_per_host
    require(isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in v)
            and 0 <= v[0] <= v[1] <= 64, w, "clumps_per_host", v, "expected integers (low, high) in [0, 64].")
    _range(w, "clump_snr_range", c.clump_snr_range, 1e-3, 1e6, "clump S/N, e.g. (3, 100).")
    require(c.clump_snr_range[0] > 0, w, "clump_snr_range", c.clump_snr_range, "S/N must be > 0.")
    _finite_in(w, "clump_region_hlr", c.clump_region_hlr, 0.05, 10.0, "half-light radii, e.g. 1.5.")
    _finite_in(w, "clump_bulge_fraction", c.clump_bulge_fraction, 0.0, 1.0, "a fraction in [0, 1].")
    _finite_in(w, "clump_pair_fraction", c.clump_pair_fraction, 0.0, 1.0, "a fraction in [0, 1].")
    _range(w, "clump_pair_fwhm_range", c.clump_pair_fwhm_range, 0.5, 100.0, "PSF FWHM, e.g. (2, 3).")


def in_ellipse(y, x, cy, cx, a, b, angle) -> bool:
    """Whether ``(y, x)`` lies inside the ellipse of semi-axes ``a`` (along ``angle`` deg CCW from +x), ``b``."""
    th = math.radians(angle)
    u = (x - cx) * math.cos(th) + (y - cy) * math.sin(th)
    v = -(x - cx) * math.sin(th) + (y - cy) * math.cos(th)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def place_clumps(rng: np.random.Generator, accept, *, cy, cx, hlr, q, angle, bulge_hlr, n_want, max_per_host,
                 region_hlr, bulge_fraction, pair_fraction, pair_range_px, snr_range) -> list:
    """Clumps of one host: ``[(y, x, snr), ...]`` (shared by the simulator and the clump training set).

    Candidates are uniform (by area) inside the half-light ellipse scaled by ``region_hlr`` or, with
    probability ``bulge_fraction`` (when ``bulge_hlr > 0``), inside the bulge's half-light ellipse; S/N is
    log-uniform on ``snr_range``. ``accept(y, x)`` says whether a position is allowed and, if so, records it
    (separations, edges, caps are the caller's). Each accepted clump gets a companion at a distance uniform
    on ``pair_range_px`` with probability ``pair_fraction`` (if ``accept`` allows it). Up to ``n_want``
    primary clumps; a fixed number of draws keeps the random stream's layout independent of the outcome.
    """
    n_try = 30 * max(int(max_per_host), 1)
    r = np.sqrt(rng.random(n_try))
    phi = rng.uniform(0.0, 2 * math.pi, n_try)
    bulge = rng.random(n_try) < (bulge_fraction if bulge_hlr > 0 else 0.0)
    pair = rng.random(n_try) < pair_fraction
    pair_d = rng.uniform(pair_range_px[0], pair_range_px[1], n_try)
    pair_phi = rng.uniform(0.0, 2 * math.pi, n_try)
    lo, hi = math.log(snr_range[0]), math.log(snr_range[1])
    snr_a, snr_b = np.exp(rng.uniform(lo, hi, n_try)), np.exp(rng.uniform(lo, hi, n_try))
    th = math.radians(angle)
    out, placed = [], 0
    for j in range(n_try):
        if placed >= n_want:
            break
        scale = bulge_hlr if bulge[j] else region_hlr * hlr
        u, v = scale / math.sqrt(q) * r[j] * math.cos(phi[j]), scale * math.sqrt(q) * r[j] * math.sin(phi[j])
        x, y = cx + u * math.cos(th) - v * math.sin(th), cy + u * math.sin(th) + v * math.cos(th)
        if not accept(y, x):
            continue
        out.append((y, x, float(snr_a[j])))
        placed += 1
        if pair[j]:
            y2, x2 = y + pair_d[j] * math.sin(pair_phi[j]), x + pair_d[j] * math.cos(pair_phi[j])
            if accept(y2, x2):
                out.append((y2, x2, float(snr_b[j])))
    return out


class SeparationGrid:
    """``accept(y, x)``: positions inside a box and at least ``min_sep`` from every accepted one (spatial hash)."""

    def __init__(self, min_sep: float, box=(-np.inf, np.inf, -np.inf, np.inf), cap: int | None = None):
        self.min_sep, self.box, self.cap = float(min_sep), box, cap
        self.cells: dict = {}
        self.points: list = []

    def __call__(self, y: float, x: float) -> bool:
        y0, y1, x0, x1 = self.box
        if not (y0 <= y <= y1 and x0 <= x <= x1) or (self.cap is not None and len(self.points) >= self.cap):
            return False
        c = max(self.min_sep, 1e-9)
        gy, gx = int(math.floor(y / c)), int(math.floor(x / c))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for py, px in self.cells.get((gy + dy, gx + dx), ()):
                    if (y - py) ** 2 + (x - px) ** 2 < self.min_sep ** 2:
                        return False
        self.cells.setdefault((gy, gx), []).append((y, x))
        self.points.append((y, x))
        return True


def psf_area(psf: galsim.GSObject) -> float:
    """``A_eff = 1 / sum(p**2)`` (px) of the pixel-integrated, unit-sum PSF ``p`` drawn at a pixel centre."""
    p = render_profile(1.0, 0.0, 0.0, psf=psf, kind="star").array
    p = p / p.sum()
    return float(1.0 / np.sum(p * p))


def clump_flags(yx: np.ndarray, fwhm_px: float) -> np.ndarray:
    """``close_pair``: another position within ``CLOSE_PAIR_FWHM`` PSF FWHM."""
    yx = np.asarray(yx, float).reshape(-1, 2)
    out = np.zeros(len(yx), bool)
    if len(yx) > 1:
        from scipy.spatial import cKDTree
        d, _ = cKDTree(yx).query(yx, k=2)
        out = d[:, 1] < CLOSE_PAIR_FWHM * fwhm_px
    return out


def _clumpy_hosts(config: SimConfig, nx: int, ny: int) -> dict | None:
    """Clumpy hosts and their clumps, from their own random stream (the rest of the mosaic is unchanged)."""
    if config.clumpy_density <= 0:
        return None
    rng = np.random.default_rng([config.seed, 2])
    n = int(rng.poisson(config.clumpy_density * ny * nx / 1e6))
    x = rng.uniform(-0.5, nx - 0.5, n)
    y = rng.uniform(-0.5, ny - 0.5, n)
    ps = config.pixel_scale
    hlr = np.exp(rng.uniform(math.log(config.clumpy_hlr_range[0] / ps), math.log(config.clumpy_hlr_range[1] / ps), n))
    q = rng.uniform(config.q_range[0], config.q_range[1], n)
    angle = rng.uniform(0.0, 180.0, n)
    n_lo, n_hi = config.clumpy_sersic_n_range
    sersic = np.clip(np.round(np.round(rng.uniform(n_lo, n_hi, n) / SERSIC_N_STEP) * SERSIC_N_STEP, 4), n_lo, n_hi)
    bd = rng.random(n) < config.bulge_disk_fraction
    bulge_frac = rng.uniform(*CLUMPY_BULGE_FRAC_RANGE, n)
    ratio = rng.uniform(*BULGE_HLR_RATIO_RANGE, n)
    snr = np.exp(rng.uniform(math.log(config.clumpy_snr_range[0]), math.log(config.clumpy_snr_range[1]), n))
    n_want = rng.integers(config.clumps_per_host[0], config.clumps_per_host[1] + 1, n)
    fwhm = config.psf_fwhm_px
    lo_p, hi_p = config.clump_pair_fwhm_range
    grid = SeparationGrid(lo_p * fwhm, box=(-0.5, ny - 0.5, -0.5, nx - 0.5))
    rows, bulge_hlr = [], np.zeros(n)
    for j in range(n):
        if bd[j]:
            bulge_hlr[j] = bulge_disk_radii(hlr[j], bulge_frac[j], ratio[j])[0]
        for cy, cx, csnr in place_clumps(
                rng, grid, cy=y[j], cx=x[j], hlr=hlr[j], q=q[j], angle=angle[j], bulge_hlr=bulge_hlr[j],
                n_want=int(n_want[j]), max_per_host=config.clumps_per_host[1], region_hlr=config.clump_region_hlr,
                bulge_fraction=config.clump_bulge_fraction, pair_fraction=config.clump_pair_fraction,
                pair_range_px=(lo_p * fwhm, hi_p * fwhm), snr_range=config.clump_snr_range):
            on_bulge = bool(bd[j]) and in_ellipse(cy, cx, y[j], x[j], bulge_hlr[j] / math.sqrt(q[j]),
                                                  bulge_hlr[j] * math.sqrt(q[j]), angle[j])
            rows.append((j, cy, cx, csnr, on_bulge))
    host = np.array([r[0] for r in rows], np.int64)
    cyx = np.array([(r[1], r[2]) for r in rows], float).reshape(-1, 2)
    a_eff = psf_area(make_psf(fwhm, config.psf_beta))
    csnr = np.array([r[3] for r in rows], float)
    pop = dict(star=np.zeros(n, bool), mag=np.full(n, float(config.zeropoint)), sersic=sersic, hlr=hlr, q=q,
               angle=angle, bd=bd, bulge_frac=bulge_frac, ratio=ratio)
    return dict(x=x, y=y, pop=pop, host_snr=snr, clump_host=host, clump_yx=cyx, clump_snr=csnr,
                clump_flux=csnr * config.noise_sigma * math.sqrt(a_eff), psf_area=a_eff,
                on_bulge=np.array([r[4] for r in rows], bool), contrast=np.full(len(rows), np.inf))


def _add_clumps(st: Stamp, clumpy: dict, j: int, psf: galsim.GSObject, sigma: float) -> float:
    """Scale clumpy host ``j``'s unit-flux stamp to its S/N, add its clumps in place; returns the total flux.

    Also fills ``clumpy['contrast']`` for its clumps: clump flux over the host's smooth light at the clump's
    pixel times the PSF's effective area (inf where the host has no light there).
    """
    arr = st.array
    scale = float(clumpy["host_snr"][j]) * sigma / math.sqrt(float(np.sum(arr * arr)))
    arr *= scale
    idx = np.nonzero(clumpy["clump_host"] == j)[0]
    if idx.size == 0:
        return scale
    hy, hx = float(clumpy["y"][j]), float(clumpy["x"][j])
    deltas = []
    for i in idx:
        cy, cx = clumpy["clump_yx"][i]
        f = float(clumpy["clump_flux"][i])
        iy, ix = int(math.floor(cy + 0.5)) - st.y0, int(math.floor(cx + 0.5)) - st.x0
        if 0 <= iy < arr.shape[0] and 0 <= ix < arr.shape[1] and arr[iy, ix] > 0:
            clumpy["contrast"][i] = f / (arr[iy, ix] * clumpy["psf_area"])
        deltas.append(galsim.DeltaFunction(flux=f).shift(cx - hx, cy - hy))
    prof = galsim.Convolve(galsim.Add(deltas) if len(deltas) > 1 else deltas[0], psf)
    im = galsim.ImageD(arr.shape[1], arr.shape[0], scale=1.0)
    im.setOrigin(st.x0, st.y0)
    prof.drawImage(image=im, center=galsim.PositionD(hx, hy))
    arr += im.array
    return scale + float(clumpy["clump_flux"][idx].sum())


def clump_truth(clumpy: dict, n_main: int, wcs: WCS, config: SimConfig) -> Table:
    """The CLUMPS truth table (see :mod:`deepmosaic.pipeline.truth`)."""
    yx = clumpy["clump_yx"]
    m = len(yx)
    ra, dec = wcs.pixel_to_world_values(yx[:, 1], yx[:, 0]) if m else (np.zeros(0), np.zeros(0))
    t = Table()
    t["id"] = np.arange(1, m + 1, dtype=np.int64)
    t["x"], t["y"] = yx[:, 1].copy(), yx[:, 0].copy()
    t["ra"], t["dec"] = np.asarray(ra, np.float64), np.asarray(dec, np.float64)
    t["flux"] = clumpy["clump_flux"]
    t["snr"] = clumpy["clump_snr"]
    t["host_id"] = clumpy["clump_host"] + n_main + 1
    t["contrast"] = clumpy["contrast"]
    t["close_pair"] = clump_flags(yx, config.psf_fwhm_px)
    t["on_bulge"] = clumpy["on_bulge"]
    for name, unit in {"x": "pix", "y": "pix", "ra": "deg", "dec": "deg", "flux": "count"}.items():
        t[name].unit = unit
    t.meta.update({"PSFAREA": float(clumpy["psf_area"]), "PAIRFWHM": CLOSE_PAIR_FWHM,
                   "NOISESIG": float(config.noise_sigma), "PSFFWHM": float(config.psf_fwhm)})
    return t


def simulate_mosaic(config: SimConfig | None = None) -> Simulation:
    """Simulate a mosaic with its truth catalog and truth segmentation map.

    Parameters
    ----------
    config : SimConfig, optional
        Defaults to ``SimConfig()``; validated here.

    Returns
    -------
    Simulation
        ``truth`` columns (one row per object, ``id`` = 1..N = segmap value):

        ========== ======= =====================================================================
        id         int64   1..N, the value in ``segmap``
        x, y       float64 true centroid, 0-based pixels (pixel i spans [i-0.5, i+0.5))
        ra, dec    float64 degrees, from the WCS at (x, y)
        flux       float64 total flux, counts (of the drawn, truncated profile)
        mag        float64 zeropoint - 2.5 log10(flux)
        kind       str     'star' or 'galaxy'
        sersic_n   float64 Sersic index; 1 (the disk) for bulge + disk; NaN for stars
        bulge_frac float64 bulge (n=4) flux fraction; 0 for pure Sersic; NaN for stars
        bulge_hlr_ratio float64 bulge hlr / disk hlr for bulge + disk; NaN otherwise
        hlr        float64 circularised half-light radius before the PSF, px; 0 for stars
        q          float64 axis ratio b/a (1 for stars)
        angle      float64 major-axis angle, degrees CCW from +x (0 for stars)
        snr        float64 matched-filter S/N of the object alone, sqrt(sum(I^2 / var)) over its
                           noise-free stamp I inside the mosaic (= sqrt(sum I^2)/sigma when gain=0)
        npix       int64   pixels in its truth footprint (segmap == id)
        blendedness float64 1 - (own light in its footprint) / (all objects' light there);
                           0 isolated; NaN when npix == 0
        planted_seam bool  planted on a seam or corner by ``plant_seams``
        ========== ======= =====================================================================

    Notes
    -----
    The footprint rule: a pixel belongs to the object whose own noise-free light is largest there, if
    that light exceeds ``noise_sigma`` (the background noise, also when ``gain > 0``).
    """
    config = (config or SimConfig()).validate()
    ny, nx = (int(s) for s in config.size)
    rng = np.random.default_rng(config.seed)
    sigma = float(config.noise_sigma)

    # --- object parameters: random population, then planted seam objects --------------------------
    n_rand = int(rng.poisson(config.density * ny * nx / 1e6))
    x = rng.uniform(-0.5, nx - 0.5, n_rand)
    y = rng.uniform(-0.5, ny - 0.5, n_rand)
    pop = _draw_population(rng, n_rand, config, config.mag_range)
    planted = np.zeros(n_rand, bool)
    if config.plant_seams is not None:
        seam_rng = np.random.default_rng([config.seed, 1])
        sx, sy = _seam_positions(seam_rng, config)
        m_lo = config.mag_range[0]
        m_hi = min(config.mag_range[1], m_lo + 3.0)   # planted objects are bright enough to be found
        spop = _draw_population(seam_rng, sx.size, config, (m_lo, m_hi))
        x, y = np.concatenate([x, sx]), np.concatenate([y, sy])
        pop = {k: np.concatenate([pop[k], spop[k]]) for k in pop}
        planted = np.concatenate([planted, np.ones(sx.size, bool)])
    n_main = x.size
    clumpy = _clumpy_hosts(config, nx, ny)
    if clumpy is not None:
        x, y = np.concatenate([x, clumpy["x"]]), np.concatenate([y, clumpy["y"]])
        pop = {k: np.concatenate([pop[k], clumpy["pop"][k]]) for k in pop}
        planted = np.concatenate([planted, np.zeros(clumpy["x"].size, bool)])
    n_obj = x.size
    is_star = pop["star"]
    is_bd = pop["bd"] & ~is_star
    flux = 10.0 ** (-0.4 * (pop["mag"] - config.zeropoint))
    hlr = np.where(is_star, 0.0, pop["hlr"])
    q = np.where(is_star, 1.0, pop["q"])
    angle = np.where(is_star, 0.0, pop["angle"])
    sersic = np.where(is_star, np.nan, np.where(is_bd, 1.0, pop["sersic"]))
    bulge_frac = np.where(is_star, np.nan, np.where(is_bd, pop["bulge_frac"], 0.0))
    ratio = np.where(is_bd, pop["ratio"], np.nan)

    # --- render -----------------------------------------------------------------------------------
    psf = make_psf(config.psf_fwhm_px, config.psf_beta)
    model = np.zeros((ny, nx), np.float64)
    max_light = np.zeros((ny, nx), np.float64)
    owner = np.zeros((ny, nx), np.int32)
    snr = np.zeros(n_obj)
    gain = float(config.gain)
    for k in range(n_obj):
        oid = k + 1
        if is_star[k]:
            st = render_profile(flux[k], x[k], y[k], psf=psf, kind="star")
        else:
            st = render_profile(flux[k], x[k], y[k], psf=psf, kind="galaxy", hlr=hlr[k],
                                sersic_n=sersic[k], q=q[k], angle=angle[k],
                                bulge_frac=bulge_frac[k] if is_bd[k] else 0.0,
                                bulge_hlr_ratio=ratio[k] if is_bd[k] else 0.4)
        if clumpy is not None and k >= n_main:
            flux[k] = _add_clumps(st, clumpy, k - n_main, psf, sigma)
        ov = st.overlap((ny, nx))
        if ov is None:
            continue
        tsl, ssl = ov
        light = st.array[ssl]
        model[tsl] += light
        var = sigma * sigma + (light / gain if gain > 0 else 0.0)
        snr[k] = math.sqrt(float(np.sum(light * light / var)))
        cur = max_light[tsl]
        win = light > cur
        cur[win] = light[win]
        owner[tsl][win] = oid
    owner[max_light <= sigma] = 0

    # --- footprint statistics ---------------------------------------------------------------------
    flat_owner = owner.ravel()
    npix = np.bincount(flat_owner, minlength=n_obj + 1)[1:]
    own = np.bincount(flat_owner, weights=max_light.ravel(), minlength=n_obj + 1)[1:]
    tot = np.bincount(flat_owner, weights=model.ravel(), minlength=n_obj + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        blend = np.where(npix > 0, 1.0 - own / np.where(tot > 0, tot, 1.0), np.nan)
    blend = np.where(npix > 0, np.clip(blend, 0.0, 1.0), np.nan)
    del max_light

    # --- sky, noise, mask -------------------------------------------------------------------------
    theta = rng.uniform(0.0, 2 * math.pi)
    gy = (np.arange(ny, dtype=np.float64) / max(ny - 1, 1) - 0.5)[:, None]
    gx = (np.arange(nx, dtype=np.float64) / max(nx - 1, 1) - 0.5)[None, :]
    amp = config.sky_level * config.sky_gradient
    # peak-to-peak of cos*gx + sin*gy is |cos| + |sin|: normalise so the plane spans `amp`
    norm = abs(math.cos(theta)) + abs(math.sin(theta))
    sky = (config.sky_level + amp / norm * (math.cos(theta) * gx + math.sin(theta) * gy)).astype(np.float32)
    variance = np.full((ny, nx), sigma * sigma, np.float32)
    noise = rng.standard_normal((ny, nx), dtype=np.float32)
    if gain > 0:
        variance += (np.clip(model, 0, None) / gain).astype(np.float32)
        noise *= np.sqrt(variance)
    else:
        noise *= np.float32(sigma)
    model32 = model.astype(np.float32)
    del model
    image = sky + model32 + noise
    del noise
    mask = np.zeros((ny, nx), np.int32)
    if config.n_bad_columns:
        cols = np.sort(rng.choice(nx, size=int(config.n_bad_columns), replace=False))
        image[:, cols] = 0.0          # dead columns; the mask, not the variance, says so
        mask[:, cols] |= BAD

    # --- header and catalog -----------------------------------------------------------------------
    header = make_header(config)
    wcs = WCS(header)
    ra, dec = wcs.pixel_to_world_values(x, y) if n_obj else (np.zeros(0), np.zeros(0))
    with np.errstate(divide="ignore"):
        mag = config.zeropoint - 2.5 * np.log10(flux)
    truth = Table()
    truth["id"] = np.arange(1, n_obj + 1, dtype=np.int64)
    truth["x"] = x.astype(np.float64)
    truth["y"] = y.astype(np.float64)
    truth["ra"] = np.asarray(ra, np.float64)
    truth["dec"] = np.asarray(dec, np.float64)
    truth["flux"] = flux
    truth["mag"] = mag
    truth["kind"] = np.where(is_star, "star", "galaxy").astype("U6")
    truth["sersic_n"] = sersic
    truth["bulge_frac"] = bulge_frac
    truth["bulge_hlr_ratio"] = ratio
    truth["hlr"] = hlr
    truth["q"] = q
    truth["angle"] = angle
    truth["snr"] = snr
    truth["npix"] = npix.astype(np.int64)
    truth["blendedness"] = blend
    truth["planted_seam"] = planted
    units = {"x": "pix", "y": "pix", "ra": "deg", "dec": "deg", "flux": "count", "mag": "mag",
             "hlr": "pix", "angle": "deg", "npix": "pix"}
    for name, unit in units.items():
        truth[name].unit = unit
    truth.meta.update({"MAGZERO": float(config.zeropoint), "PIXSCALE": float(config.pixel_scale),
                       "PSFFWHM": float(config.psf_fwhm), "NOISESIG": sigma, "SIMSEED": int(config.seed),
                       "SEAMTILE": int(config.plant_seams or 0)})
    clump_table = None
    if clumpy is not None:
        clump_table = clump_truth(clumpy, n_main, wcs, config)
        truth.meta["NCLUMPY"] = int(clumpy["x"].size)
    return Simulation(image=image, variance=variance, mask=mask, header=header, truth=truth, clumps=clump_table,
                      segmap=owner, model=model32, sky=sky, config=config)


def config_from_header(header: fits.Header) -> dict:
    """The simulation settings recorded in a mosaic header (as written by :func:`make_header`)."""
    keys = {"MAGZERO": "zeropoint", "PIXSCALE": "pixel_scale", "PSFFWHM": "psf_fwhm", "PSFBETA": "psf_beta",
            "NOISESIG": "noise_sigma", "GAIN": "gain", "SKYLEVEL": "sky_level", "SIMSEED": "seed",
            "SIMDENS": "density"}
    return {v: header[k] for k, v in keys.items() if k in header}


__all__ = ["SimConfig", "Simulation", "Stamp", "simulate_mosaic", "render_profile", "galaxy_profile",
           "make_psf", "make_header", "bulge_disk_radii", "config_from_header", "MASK_BITS", "BAD", "TRUNC_HLR",
           "PSF_TRUNC_FWHM"]

