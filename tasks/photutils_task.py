"""The photutils baseline: ``detect_sources`` / ``deblend_sources`` / ``SourceCatalog`` on one tile.

Same interface, catalog columns (``SOURCE_COLUMNS``) and maps (``segmentation`` + ``background``) as the
sep stage, so the two baselines can be compared on identical tiles.

Steps of ``PhotutilsTask.run``:

1. background: the pipeline's global mesh model (``tile.background``/``tile.rms``; default, agrees with
   sep across seams) or a ``Background2D`` fitted on the window itself (``use_global_background=False``).
2. detection image: the background-subtracted window convolved with a normalised 2-D Gaussian
   (``kernel_fwhm``; masked pixels are interpolated over, outside the window counts as sky = 0).
3. ``detect_sources`` at ``threshold * rms`` (per pixel) on the detection image, masked pixels excluded.
4. ``deblend_sources`` (``n_processes=1``: never spawn processes inside a Dask worker), only on segments
   with two or more local maxima of the detection image: the others cannot split (same result, ~2.5x faster
   on a typical field). A deblending error or photutils' 200-marker limit keeps the segment whole, flagged.
5. ``SourceCatalog`` on the background-subtracted data with the detection image as ``convolved_data``
   (centroids and shapes from the convolved image, as SExtractor does) and the background RMS as
   ``error``. ``kron_radius`` is reported scaled, ``k * r1`` with ``k = kron_params[0]`` (SExtractor's
   KRON_RADIUS, like the sep stage); photutils' own ``kron_radius`` is the unscaled ``r1``.

Stage flag bits (0-7) reuse sep's meanings where photutils has a counterpart:

====  ===================  ==========================================================================
bit   sep name             meaning here
====  ===================  ==========================================================================
1     OBJ_MERGED           the object is a child of a deblended parent segment
2     OBJ_TRUNC            the segment touches the window edge (truncated footprint)
4     OBJ_DOVERFLOW        deblending of the parent gave up (photutils' 200-marker limit, or an error):
                           the parent is kept undeblended; the pipeline bit ``FLAG_BUFFER`` is set too
8     OBJ_SINGU            non-finite second moments: ``a``/``b``/``theta`` replaced by 0
16    APER_TRUNC           the Kron or the ``aper_radius`` aperture crosses the window edge
32    APER_HASMASKED       the Kron or the ``aper_radius`` aperture contains masked pixels
64    APER_ALLMASKED       the ``aper_radius`` aperture is fully masked: ``flux_aper`` set to 0
128   APER_NONPOSITIVE     no Kron measurement (photutils returned NaN: a measured Kron radius > 6, i.e.
                           a near-zero flux sum in the measuring ellipse, or a fully masked aperture):
                           ``kron_radius`` set to 0 (photutils' own value for "no Kron aperture"),
                           ``flux``/``flux_err`` replaced by the segment (isophotal) flux and its error
====  ===================  ==========================================================================

So every catalog value is finite: NaNs are replaced by the fallbacks above, each with its flag bit.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass

import numpy as np

from deepmosaic.pipeline.config import field, require

from .base import FLAG_BUFFER, Task, TaskOutput, TileInput
from .sep_task import BACKGROUND, SEGMENTATION, SOURCE_COLUMNS

# Stage flag bits (see the module docstring); the values equal sep's constants of the same meaning.
OBJ_MERGED = 1
OBJ_TRUNC = 2
OBJ_DOVERFLOW = 4
OBJ_SINGU = 8
APER_TRUNC = 16
APER_HASMASKED = 32
APER_ALLMASKED = 64
APER_NONPOSITIVE = 128

FLAG_BITS = {
    "deblended": OBJ_MERGED,
    "segment_truncated": OBJ_TRUNC,
    "deblend_gave_up": OBJ_DOVERFLOW,
    "singular_moments": OBJ_SINGU,
    "aperture_truncated": APER_TRUNC,
    "aperture_has_masked": APER_HASMASKED,
    "aperture_all_masked": APER_ALLMASKED,
    "no_kron": APER_NONPOSITIVE,
}

DEBLEND_MODES = ("exponential", "linear", "sinh")


@dataclass(frozen=True)
class PhotutilsConfig:
    """Settings of the ``photutils`` stage; names follow photutils 3 (``n_pixels``, ``n_levels``)."""

    stage_name = "photutils"
    halo: int = field(64, "Pixels of context around each tile core; objects larger than this are flagged.")
    threshold: float = field(1.5, "Detection threshold in units of the background RMS (per pixel), applied "
                                  "to the convolved image.")
    n_pixels: int = field(5, "Minimum number of connected pixels above threshold for an object.")
    kernel_fwhm: float = field(2.0, "FWHM in pixels of the normalised Gaussian convolution kernel of the "
                                    "detection image; 0 = no convolution.")
    deblend: bool = field(True, "Deblend segments with deblend_sources (needs scikit-image).")
    n_levels: int = field(32, "Number of multi-thresholding levels for deblending.")
    contrast: float = field(0.005, "Minimum flux fraction of a deblended child (1.0 switches deblending off).")
    mode: str = field("exponential", "Spacing of the deblending levels: 'exponential', 'linear' or 'sinh'.")
    box_size: int = field(64, "Background2D box size in pixels (only with use_global_background=false).")
    filter_size: int = field(3, "Background2D median filter size in boxes, odd (only with "
                                "use_global_background=false).")
    use_global_background: bool = field(True, "true: use the pipeline's global mesh background (agrees with "
                                              "sep across seams); false: fit Background2D on the window "
                                              "itself (the pure photutils baseline).")
    kron_params: tuple[float, ...] = field((2.5, 3.5), "photutils kron_params: (scale k, minimum unscaled "
                                                        "Kron radius[, minimum circular radius in pixels]); "
                                                        "SExtractor's PHOT_AUTOPARAMS.")
    aper_radius: float = field(5.0, "Radius of the fixed circular aperture for flux_aper, pixels.")

    def validate(self):
        w = self.stage_name
        require(self.halo >= 0, w, "halo", self.halo, "must be >= 0 pixels.")
        require(math.isfinite(self.threshold) and self.threshold > 0, w, "threshold", self.threshold,
                "must be > 0 (units of the background RMS), e.g. 1.5.")
        require(self.n_pixels >= 1, w, "n_pixels", self.n_pixels, "must be >= 1 pixel.")
        require(math.isfinite(self.kernel_fwhm) and self.kernel_fwhm >= 0, w, "kernel_fwhm", self.kernel_fwhm,
                "must be >= 0 pixels (0 = no convolution), e.g. 2.0.")
        require(self.n_levels >= 1, w, "n_levels", self.n_levels, "must be >= 1 (32 is typical).")
        require(0 <= self.contrast <= 1, w, "contrast", self.contrast, "must be in [0, 1].")
        require(self.mode in DEBLEND_MODES, w, "mode", self.mode, f"use one of {', '.join(DEBLEND_MODES)}.")
        require(self.box_size >= 4, w, "box_size", self.box_size, "must be >= 4 pixels (64 is typical).")
        require(self.filter_size >= 1 and self.filter_size % 2 == 1, w, "filter_size", self.filter_size,
                "must be an odd number >= 1.")
        kp = tuple(self.kron_params)
        require(len(kp) in (2, 3), w, "kron_params", kp, "give 2 or 3 numbers, e.g. 2.5,3.5 or 2.5,3.5,0.")
        require(all(math.isfinite(v) for v in kp) and kp[0] > 0 and all(v >= 0 for v in kp[1:]), w,
                "kron_params", kp, "the scale must be > 0 and the minimum radii >= 0.")
        require(math.isfinite(self.aper_radius) and self.aper_radius > 0, w, "aper_radius", self.aper_radius,
                "must be > 0 pixels.")
        require(not self.deblend or importlib.util.find_spec("skimage") is not None, w, "deblend", self.deblend,
                "photutils' deblending needs scikit-image: install it (pip install scikit-image) or set "
                "deblend=false.")


def make_kernel(fwhm: float) -> np.ndarray | None:
    """Normalised (sum 1) 2-D Gaussian kernel of ``fwhm`` pixels, odd size ~3 FWHM; None if ``fwhm`` is 0."""
    if fwhm <= 0:
        return None
    from photutils.segmentation import make_2dgaussian_kernel
    size = 2 * int(math.ceil(1.5 * fwhm)) + 1
    k = make_2dgaussian_kernel(fwhm, size=size).array
    return (k / k.sum()).astype(np.float64)


def convolve_detection(data: np.ndarray, mask: np.ndarray, kernel: np.ndarray | None) -> np.ndarray:
    """Detection image: ``data`` convolved with ``kernel`` (float64 [y, x]).

    Masked pixels are interpolated over (the kernel is renormalised on the good pixels); beyond the
    window the image counts as 0, the expected value of background-subtracted sky.
    """
    if kernel is None:
        return np.asarray(data, dtype=np.float64)
    from astropy.convolution import convolve
    m = mask if mask.any() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns when interpolating over masked pixels
        return convolve(np.asarray(data, dtype=np.float64), kernel, boundary="fill", fill_value=0.0,
                        normalize_kernel=False, mask=m, nan_treatment="interpolate", preserve_nan=False)


def window_background(image, mask, box_size, filter_size):
    """``Background2D`` fitted on the window: ``(background, rms)`` float32 maps, or None if it fails."""
    from photutils.background import Background2D
    box = (min(box_size, image.shape[0]), min(box_size, image.shape[1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bkg = Background2D(image, box, mask=mask if mask.any() else None,
                               filter_size=(filter_size, filter_size))
            return (np.asarray(bkg.background, np.float32), np.asarray(bkg.background_rms, np.float32))
    except (ValueError, ZeroDivisionError):
        return None


def multi_peak_labels(conv: np.ndarray, labels: np.ndarray, min_area: int) -> np.ndarray:
    """Labels of the segments that deblending could split: at least ``min_area`` pixels and two or more
    local maxima of ``conv`` inside the segment (8-connected, ties counted).

    Every connected part of a segment above any threshold holds its own maximum, which is a local
    maximum within the segment; a segment with one local maximum therefore stays one part at every
    deblending level, and photutils would return it unchanged. Skipping those (most isolated objects)
    gives the same result several times faster.
    """
    from scipy.ndimage import maximum_filter
    inside = labels > 0
    vals = np.where(inside, conv, -np.inf)
    peaks = inside & (vals >= maximum_filter(vals, size=3, mode="constant", cval=-np.inf))
    n_max = int(labels.max())
    n_peaks = np.bincount(labels[peaks], minlength=n_max + 1)
    area = np.bincount(labels[inside], minlength=n_max + 1)
    keep = (n_peaks >= 2) & (area >= min_area)
    keep[0] = False
    return np.nonzero(keep)[0]


def _deblend(conv, segm, cfg, flags_by_label):
    """Deblend ``segm`` on the detection image; never raises.

    Returns ``(segm_data, notes)``: a label array (labels not yet consecutive) and notes. Stage flags of
    each output label are written into ``flags_by_label`` (a dict label -> bits).
    """
    from astropy.utils.exceptions import AstropyUserWarning
    from photutils import segmentation as ps
    notes = []
    candidates = multi_peak_labels(conv, segm.data, 2 * cfg.n_pixels)
    if len(candidates) == 0:
        return segm.data.copy(), notes
    try:
        with warnings.catch_warnings():
            # the "mode changed to linear" warning is read back from ``info`` below
            warnings.simplefilter("ignore", AstropyUserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            out = ps.deblend_sources(conv, segm, cfg.n_pixels, labels=candidates, n_levels=cfg.n_levels,
                                     contrast=cfg.contrast, mode=cfg.mode, relabel=True, n_processes=1,
                                     progress_bar=False)
    except Exception as e:  # noqa: BLE001 - flag and continue, never kill the tile
        notes.append(f"deblending failed ({type(e).__name__}: {e}); {len(candidates)} segment(s) with "
                     f"several peaks kept undeblended and flagged")
        for lab in candidates:
            flags_by_label[int(lab)] = OBJ_DOVERFLOW | FLAG_BUFFER
        return segm.data.copy(), notes
    data = out.data.copy()
    info = getattr(out, "info", None) or {}
    gave_up = info.get("warnings", {}).get("nmarkers", {}).get("input_labels", [])
    gave_up = {int(v) for v in np.atleast_1d(gave_up)}
    parents = out.parent_to_deblended_labels
    next_label = int(data.max()) + 1 if data.size else 1
    for parent in sorted(gave_up):
        # too many potential children (photutils' 200-marker limit; it retried in linear mode): keep the
        # parent segment whole, whatever the retry gave
        data[segm.data == parent] = next_label
        flags_by_label[next_label] = OBJ_DOVERFLOW | FLAG_BUFFER
        next_label += 1
    for parent, children in parents.items():
        if int(parent) not in gave_up:
            for c in np.atleast_1d(children):
                flags_by_label[int(c)] = flags_by_label.get(int(c), 0) | OBJ_MERGED
    if gave_up:
        notes.append(f"deblending: {len(gave_up)} segment(s) over photutils' 200-marker limit kept "
                     f"undeblended and flagged")
    return data, notes


def _consecutive(labels: np.ndarray):
    """Relabel ``labels`` to 1..n in increasing label order; returns ``(new_labels, old_of_new)``."""
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[labels], present


def _aperture_geometry(x, y, a, b, theta, kron_radius, kron_params, aper_radius):
    """Half extents (in x and y) of the larger of the Kron and circular apertures, for flagging."""
    k = kron_params[0]
    min_circ = kron_params[2] if len(kron_params) > 2 else 0.0
    ra = np.where(kron_radius > 0, k * kron_radius * a, min_circ)
    rb = np.where(kron_radius > 0, k * kron_radius * b, min_circ)
    c, s = np.cos(theta), np.sin(theta)
    hx = np.sqrt((ra * c) ** 2 + (rb * s) ** 2)
    hy = np.sqrt((ra * s) ** 2 + (rb * c) ** 2)
    return np.maximum(hx, aper_radius), np.maximum(hy, aper_radius), ra, rb


def _apertures_touch_mask(mask, x, y, ra, rb, theta, aper_radius):
    """Whether each object's Kron ellipse or circular aperture covers a masked pixel centre."""
    n = len(x)
    out = np.zeros(n, bool)
    if not mask.any() or n == 0:
        return out
    ny, nx = mask.shape
    sat = np.zeros((ny + 1, nx + 1), np.int64)  # summed-area table: quick reject by bounding box
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    c, s = np.cos(theta), np.sin(theta)
    for i in range(n):
        r = max(ra[i], rb[i], aper_radius)
        x0, x1 = max(int(np.floor(x[i] - r)), 0), min(int(np.ceil(x[i] + r)) + 1, nx)
        y0, y1 = max(int(np.floor(y[i] - r)), 0), min(int(np.ceil(y[i] + r)) + 1, ny)
        if x1 <= x0 or y1 <= y0 or sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0] == 0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx, dy = xx - x[i], yy - y[i]
        inside = dx * dx + dy * dy <= aper_radius ** 2
        if ra[i] > 0 and rb[i] > 0:
            u, v = dx * c[i] + dy * s[i], -dx * s[i] + dy * c[i]
            inside |= (u / ra[i]) ** 2 + (v / rb[i]) ** 2 <= 1.0
        out[i] = bool(mask[y0:y1, x0:x1][inside].any())
    return out


def _values(q) -> np.ndarray:
    """A photutils column (Quantity, masked or plain) as float64 with NaN for missing values."""
    v = getattr(q, "value", q)
    v = np.ma.filled(np.ma.asarray(v, dtype=np.float64), np.nan)
    return np.atleast_1d(np.asarray(v, dtype=np.float64))


def _prop(cat, name: str, old_name: str) -> np.ndarray:
    """A SourceCatalog property by its photutils 3 name, or its photutils 2 name on older versions."""
    return _values(getattr(cat, name if hasattr(type(cat), name) else old_name))


class PhotutilsTask(Task):
    """photutils segmentation baseline (``detect_sources`` + ``deblend_sources`` + ``SourceCatalog``)."""

    name = "photutils"
    Config = PhotutilsConfig
    columns = SOURCE_COLUMNS
    maps = {**SEGMENTATION, **BACKGROUND}

    def _empty(self, shape, background):
        out = self.empty_output(shape)
        out.maps["background"] = np.asarray(background, np.float32)
        return out

    def run(self, tile: TileInput) -> TaskOutput:
        from photutils.segmentation import SegmentationImage, SourceCatalog, detect_sources
        from photutils.utils import NoDetectionsWarning
        cfg = self.config
        mask = np.asarray(tile.mask, bool)
        background, rms = tile.background, tile.rms
        notes: list[str] = []
        if not cfg.use_global_background and not mask.all():
            fitted = window_background(tile.image, mask, cfg.box_size, cfg.filter_size)
            if fitted is None:
                notes.append("Background2D failed on this window; used the global background model")
            else:
                background, rms = fitted
        shape = tile.image.shape
        if mask.all():
            return self._empty(shape, background)
        data = (tile.image - background).astype(np.float64)
        data[mask] = 0.0
        rms = np.asarray(rms, np.float64)
        conv = convolve_detection(data, mask, make_kernel(cfg.kernel_fwhm))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoDetectionsWarning)
            segm = detect_sources(conv, cfg.threshold * rms, cfg.n_pixels, mask=mask)
        if segm is None:
            out = self._empty(shape, background)
            out.notes.extend(notes)
            return out

        flags_by_label: dict[int, int] = {}
        if cfg.deblend and cfg.contrast < 1:
            labels, more = _deblend(conv, segm, cfg, flags_by_label)
            notes += more
        else:
            labels = segm.data.copy()
        labels, old = _consecutive(labels)
        n = len(old)
        flags = np.array([flags_by_label.get(int(o), 0) for o in old], np.int64)
        segm = SegmentationImage(labels)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)  # AstropyUserWarning about masked/NaN sources
            cat = SourceCatalog(data, segm, convolved_data=conv, error=rms, mask=mask,
                                kron_params=tuple(cfg.kron_params), progress_bar=False)
            x, y = _prop(cat, "x_centroid", "xcentroid"), _prop(cat, "y_centroid", "ycentroid")
            a, b = _prop(cat, "semimajor_axis", "semimajor_sigma"), _prop(cat, "semiminor_axis", "semiminor_sigma")
            # photutils 3 gives [0, 360) degrees; the catalog (like sep) uses [-pi/2, pi/2) radians
            theta = np.mod(np.deg2rad(_values(cat.orientation)) + np.pi / 2, np.pi) - np.pi / 2
            kron_radius = _values(cat.kron_radius)
            flux, flux_err = _values(cat.kron_flux), _prop(cat, "kron_flux_err", "kron_fluxerr")
            seg_flux, seg_err = _values(cat.segment_flux), _prop(cat, "segment_flux_err", "segment_fluxerr")
            ap_flux, _ = cat.circular_photometry(cfg.aper_radius)
            ap_flux = _values(ap_flux)
            npix = _values(cat.area)
            peak = _values(cat.max_value)
        assert np.array_equal(np.asarray(cat.label), np.arange(1, n + 1)), "catalog rows must be labels - 1"

        # centroids are finite for any segment with unmasked pixels; guard anyway (flux-weighted fallback
        # would need the same pixels, so use the segment's bounding-box centre)
        bad_xy = ~(np.isfinite(x) & np.isfinite(y))
        if bad_xy.any():
            for i in np.nonzero(bad_xy)[0]:
                sl = segm.slices[i]
                y[i] = 0.5 * (sl[0].start + sl[0].stop - 1)
                x[i] = 0.5 * (sl[1].start + sl[1].stop - 1)
            flags[bad_xy] |= OBJ_SINGU
        singular = ~(np.isfinite(a) & np.isfinite(b) & np.isfinite(theta))
        a[singular], b[singular], theta[singular] = 0.0, 0.0, 0.0
        flags[singular] |= OBJ_SINGU
        no_kron = ~(np.isfinite(kron_radius) & np.isfinite(flux) & np.isfinite(flux_err))
        kron_radius[no_kron] = 0.0
        flux[no_kron] = np.where(np.isfinite(seg_flux[no_kron]), seg_flux[no_kron], 0.0)
        flux_err[no_kron] = np.where(np.isfinite(seg_err[no_kron]), seg_err[no_kron], 0.0)
        flags[no_kron] |= APER_NONPOSITIVE
        all_masked = ~np.isfinite(ap_flux)
        ap_flux[all_masked] = 0.0
        flags[all_masked] |= APER_ALLMASKED
        peak[~np.isfinite(peak)] = 0.0
        npix = np.where(np.isfinite(npix), npix, 0).astype(np.int64)

        # truncation by the window edge: the footprint, then the apertures
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        edge = edge[edge > 0]
        flags[edge - 1] |= OBJ_TRUNC
        hx, hy, ra, rb = _aperture_geometry(x, y, a, b, theta, kron_radius, tuple(cfg.kron_params),
                                            cfg.aper_radius)
        ny, nx = shape
        crosses = (x - hx < -0.5) | (x + hx > nx - 0.5) | (y - hy < -0.5) | (y + hy > ny - 0.5)
        flags[crosses] |= APER_TRUNC
        flags[_apertures_touch_mask(mask, x, y, ra, rb, theta, cfg.aper_radius)] |= APER_HASMASKED

        cat_out = {
            "x": x, "y": y, "flux": flux, "flux_err": flux_err, "flux_aper": ap_flux,
            "kron_radius": cfg.kron_params[0] * kron_radius, "a": a, "b": b, "theta": theta, "npix": npix, "peak": peak,
            "flags": flags,
        }
        cat_out = {k: np.asarray(v, dtype=SOURCE_COLUMNS[k].dtype) for k, v in cat_out.items()}
        return TaskOutput(maps={"segmentation": labels.astype(np.int64),
                                "background": np.asarray(background, np.float32)},
                          catalog=cat_out, notes=notes)
