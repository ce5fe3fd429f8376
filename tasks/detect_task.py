"""Neural detection: a one-stage centre-heatmap network (CenterNet) over whole mosaics, tile by tile.

``detect`` (:class:`DetectTask`)
    1. Input normalisation as in training (:class:`deepmosaic.models.datasets.FieldSetConfig`: image in
       units of the noise, no sky): ``(image - background) / rms``, masked pixels (and pixels with a
       non-positive or non-finite rms) set to 0 = sky.
    2. The network runs on the fewest patches of at most ``patch`` x ``patch`` core pixels (balanced sizes)
       plus its aligned halo, ``batch_size`` patches per forward call (channels-last on CPU), patch cores on a grid anchored at multiples of the network's stride in
       *mosaic* coordinates (:func:`forward_patches`): every pixel sees the same input and arithmetic
       whatever the tile, window or patch size, so the heatmap is seamless across patches and tiles.
    3. Peaks: pixels of the objectness heatmap that are the maximum of their 3x3 neighbourhood (CenterNet's
       max-pool non-maximum suppression) with score >= ``threshold``. Two peaks are then merged into the
       higher one when the heatmap does not dip between them (its minimum on the segment joining them is
       >= ``saddle`` times the lower peak): a flat-topped or ragged blob (a saturated star, a large galaxy)
       is one object, while two real neighbours keep the dip that the training targets (a Gaussian of
       sigma 1 px per object) put between them. Peaks on masked pixels are dropped (no data there).
       Wing test (:func:`wing_peaks`): of two peaks closer than ``wing_radius``, the one fainter in the
       smoothed image is dropped when its light is no more than the mirror point's about the brighter one's
       centre (``wing_nsigma`` noise sigmas): the network puts weak peaks on the wings of bright objects,
       while a real neighbour adds light on its side only.
       Saturated cores (:func:`saturated_cores`: a plateau of >= 4 pixels at the tile's maximum value, or a
       compact masked blob with a bright rim) make ring-shaped heatmaps with several peaks: every peak
       within the core's radius + ``saturation_reach`` px becomes one detection at the core's centroid
       (flag ``SATURATED``).
    4. Position = peak pixel + the offset head's sub-pixel offset; ``width``, ``height`` from the size
       head (the box of the object's 1-sigma isophote, at least one PSF FWHM, as in training);
       ``class`` = argmax of the class head (0 star, 1 galaxy), ``class_prob`` its softmax probability.
    5. ``flux``: sum of the background-subtracted image in the ellipse inscribed in the box (semi-axes
       ``width/2``, ``height/2``, axis-aligned), with sep's ``sum_ellipse`` (masked pixels excluded,
       sub-pixel sampling); ``flux_err`` from the rms map. An isophotal-like aperture flux on the same
       image as sep's, so the photometry of both stages is comparable.

Ownership, global ids, mosaic coordinates, ra/dec and the mosaic-edge flag are the pipeline's (an object
belongs to the tile whose core holds its centre). The halo is the network's aligned halo plus 16 px for
the peak neighbourhood and the saddle test (peaks up to 8 px apart, chains of two), more with the wing test
(:attr:`DetectTask.halo`), so every peak in a core, and everything the stage computes for it except a flux
ellipse reaching beyond the window (flagged ``APER_TRUNC``), is identical to an untiled run.

Out-of-range inputs
-------------------
The network was trained on a range of PSF widths and noise levels (its model card's training set). Per
tile the stage estimates (:func:`estimate_conditions`):

* the PSF FWHM in px, from the most compact bright detections: for every detection with peak S/N
  20-1000, no other detection within 12 px and no masked pixel near it, the width of its half-maximum
  area, ``2 sqrt(A / pi)`` (peak from a parabola through the brightest pixel's row and column); the
  estimate is the median of the smallest quarter of those widths (at least ``min_psf_stars`` of them):
  stars are the most compact objects, and the class head is not used because a network shown a PSF it
  does not know calls its stars galaxies. It is compared with the same estimator run on noise-free
  Moffat stars at the edges of the training range (computed once per process), so pixelisation biases
  cancel, with 10% of tolerance on each side. A tile without stars overestimates the PSF (galaxies are
  broader) and may be flagged when the true PSF is near the top of the range;
* the noise: the robust standard deviation (1.4826 MAD) of the normalised image on pixels far from any
  detection. The network expects 1 (the training images are in units of the noise); a value outside
  ``noise_tolerance`` means the rms map does not describe the image's noise and detections are
  unreliable (too many or too few).

* with ``zeropoint`` set: the tile's median rms in counts, converted to the training set's zeropoint, against
  the training noise range (10% tolerance). The network sees the image in units of its noise, so this is
  about the population: at a higher noise the same sky holds fainter, smaller-looking objects than in
  training. Without a zeropoint (real data in physical units) this check is off.

Out of range sets ``PSF_OUT_OF_RANGE`` / ``NOISE_OUT_OF_RANGE`` on every detection of the tile, a tile
note and one log warning per process and kind. Unknown (too few stars): no flag.

Seeding the deblending stage
----------------------------
``upstream["detect"].catalog`` (window pixels inside a task) holds ``x``, ``y``, ``width``, ``height``,
``score``, ``class``; :func:`seeds` turns it into ``(y, x)`` peak positions (and boxes) that a deblender
can use in place of sep's footprint peaks. In the store the same contract is ``catalogs/detect/`` (mosaic
pixels) and ``maps/detect/heatmap``.

Stage flag bits
---------------
====  ==================  ==========================================================================
bit   name                meaning
====  ==================  ==========================================================================
1     APER_TRUNC          the flux ellipse crosses the window edge (flux is a lower bound)
2     APER_HASMASKED      the flux ellipse holds masked pixels
4     PSF_OUT_OF_RANGE    the tile's PSF FWHM is outside the network's training range
8     NOISE_OUT_OF_RANGE  the tile's normalised noise is not ~1 (the rms map does not fit the image), or
                          (with ``zeropoint``) its noise level is outside the training range
16    MERGED_PEAKS        other heatmap peaks were merged into this one (saddle rule)
32    SATURATED           a saturated core: the peaks around it were merged into one detection at its centre
====  ==================  ==========================================================================
Pipeline bits 8+ as for every stage.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import sep

from deepmosaic.pipeline.config import field, require

from .base import Column, MapSpec, ModelTask, TaskOutput, TileInput, check_model_settings
from .clumps_task import ClumpsTask, _get_model, _roundup, resolve_device

log = logging.getLogger("deepmosaic")

APER_TRUNC = 1
APER_HASMASKED = 2
PSF_OUT_OF_RANGE = 4
NOISE_OUT_OF_RANGE = 8
MERGED_PEAKS = 16
SATURATED = 32

FLAG_BITS = {"aperture_truncated": APER_TRUNC, "aperture_has_masked": APER_HASMASKED,
             "psf_out_of_range": PSF_OUT_OF_RANGE, "noise_out_of_range": NOISE_OUT_OF_RANGE,
             "merged_peaks": MERGED_PEAKS, "saturated": SATURATED}

CLASS_NAMES = ("star", "galaxy")

DETECT_COLUMNS = {
    "x": Column("f8", "pix", "object centre x (peak pixel + offset), 0-based mosaic pixels"),
    "y": Column("f8", "pix", "object centre y, 0-based mosaic pixels"),
    "width": Column("f8", "pix", "box width (x extent of the 1-sigma isophote, >= one PSF FWHM)"),
    "height": Column("f8", "pix", "box height (y extent)"),
    "score": Column("f8", "", "objectness: heatmap value at the peak, in [0, 1]"),
    "class": Column("i4", "", "0 = star, 1 = galaxy (argmax of the class head)"),
    "class_prob": Column("f8", "", "probability of that class"),
    "flux": Column("f8", "", "background-subtracted flux in the ellipse inscribed in the box, image units"),
    "flux_err": Column("f8", "", "1-sigma error of flux from the rms map"),
    "flags": Column("i8", "", "stage bits 0-7 (see tasks/detect_task.py), pipeline bits 8+"),
}

HEATMAP = {"heatmap": MapSpec("float32", "value", "objectness heatmap of the detector, in [0, 1]")}

#: warnings already logged in this process (one per kind)
_WARNED: set = set()
#: estimator values of the training range's PSF edges, per (lo_px, hi_px, beta)
_PSF_EDGES: dict = {}


@dataclass(frozen=True)
class DetectConfig:
    """Settings of the ``detect`` stage (the CenterNet detector)."""

    stage_name = "detect"
    weights: str | None = field(None, "Weights file (NAME, NAME.safetensors or NAME.json with its model card); "
                                      "None: the shipped default models/weights/detect.")
    threshold: float = field(0.35, "Minimum objectness score of a peak (chosen with saddle and the wing test on "
                                   "validation fields by benchmarks/tune_detect.py; see the README's detect "
                                   "section).")
    saddle: float = field(0.9, "Merge two peaks when the heatmap's minimum on the segment between them is >= "
                               "this fraction of the lower peak (1 disables merging).")
    batch_size: int = field(8, "Patches per forward call.")
    patch: int = field(512, "Largest patch core in px; a window is cut into the fewest patches of at most this "
                            "size, balanced, rounded up to the network's stride multiple.")
    device: str = field("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    flip_average: bool = field(False, "Average the heatmap and class logits over the 8 flips/rotations of each "
                                      "patch (8x the compute).")
    noise_tolerance: tuple[float, float] = field((0.8, 1.25), "Range of the tile's normalised noise "
                                                              "(expected 1) outside which NOISE_OUT_OF_RANGE is set.")
    zeropoint: float | None = field(None, "Magnitude zeropoint of the input (mag = zp - 2.5 log10 counts): "
                                          "when given, the tile's rms is compared with the training noise range "
                                          "(the card's, at its zeropoint) too; None: only the normalised noise is "
                                          "checked.")
    min_psf_stars: int = field(3, "Compact bright objects needed to estimate the tile's PSF FWHM (fewer: no "
                                  "PSF check).")
    wing_radius: float = field(6.0, "Peaks closer than this (px) to a brighter one are tested for being only "
                                    "its wing (mirror-symmetry test, see wing_peaks); 0 disables the test.")
    wing_nsigma: float = field(4.0, "A peak on a brighter object's wing is kept when its smoothed image exceeds "
                                    "the mirrored point's by at least this many noise sigmas.")
    saturation_reach: float = field(5.0, "Peaks within a saturated core's radius + this many px are merged into "
                                         "one detection at the core's centre.")

    def validate(self):
        w = self.stage_name
        check_model_settings(self, w)
        require(0 < self.threshold < 1, w, "threshold", self.threshold, "must be in (0, 1), e.g. 0.3.")
        require(0 < self.saddle <= 1, w, "saddle", self.saddle, "must be in (0, 1], e.g. 0.9.")
        require(self.batch_size >= 1, w, "batch_size", self.batch_size, "must be >= 1.")
        require(8 <= self.patch <= 8192, w, "patch", self.patch, "must be in [8, 8192] px, e.g. 512.")
        tol = self.noise_tolerance
        require(isinstance(tol, (tuple, list)) and len(tol) == 2 and 0 < tol[0] < 1 < tol[1], w,
                "noise_tolerance", tol, "expected (lo, hi) with 0 < lo < 1 < hi, e.g. (0.8, 1.25).")
        require(self.min_psf_stars >= 1, w, "min_psf_stars", self.min_psf_stars, "must be >= 1.")
        require(self.zeropoint is None or (isinstance(self.zeropoint, (int, float)) and -100 < self.zeropoint < 100),
                w, "zeropoint", self.zeropoint, "a magnitude zeropoint, e.g. 30, or None.")
        require(0 <= self.wing_radius <= 32, w, "wing_radius", self.wing_radius,
                "must be in [0, 32] px (0 disables the wing test), e.g. 8.")
        require(0 <= self.wing_nsigma <= 100, w, "wing_nsigma", self.wing_nsigma, "must be in [0, 100], e.g. 3.")
        require(0 <= self.saturation_reach <= 100, w, "saturation_reach", self.saturation_reach,
                "must be in [0, 100] px, e.g. 5.")


# --------------------------------------------------------------------------------------------- inference

def patch_layout(shape, origin, stride: int, patch: int) -> tuple[int, int, int, int, int, int]:
    """``(ay, ax, py, px, ny, nx)``: aligned start of the patch grid (mosaic px, <= origin), patch core size
    and patch counts covering a window of ``shape`` at ``origin`` (see :func:`forward_patches`)."""
    H, W = shape
    oy, ox = int(origin[0]), int(origin[1])
    ay, ax = oy - oy % stride, ox - ox % stride
    span_y, span_x = oy + H - ay, ox + W - ax
    # as few patches as ``patch`` allows, of balanced size (less halo recomputed than a fixed size)
    P = _roundup(patch, stride)
    ny, nx = -(-span_y // P), -(-span_x // P)
    return ay, ax, _roundup(-(-span_y // ny), stride), _roundup(-(-span_x // nx), stride), ny, nx


def forward_patches(model, x: np.ndarray, origin, stride: int, halo: int, patch: int, batch_size: int,
                    device: str, flip_average: bool = False) -> dict[str, np.ndarray]:
    """All output heads of ``model`` over a normalised window ``x`` (float32 [H, W]) at mosaic ``origin``.

    Patch cores lie on a grid anchored at a multiple of ``stride`` in mosaic coordinates and each patch
    carries ``halo`` (a multiple of ``stride``) pixels of context, zeros outside the window. For a local
    network (eval-mode batch norm) the result does not depend on the window, the patch size or the batch.

    ``flip_average``: the heatmap and class logits are averaged over the 8 flips/rotations of each patch
    (8x the compute; the size and offset heads, whose components turn with the image, come from the
    plain pass). Patch sides are multiples of ``stride`` and patches start on multiples of it, so a flipped
    pixel's place in the pooling grid depends only on its mosaic position: still exact across tilings.

    Returns ``{head: float32 [C, H, W]}`` (raw outputs: logits for heatmap and class).
    """
    import torch
    H, W = x.shape
    oy, ox = int(origin[0]), int(origin[1])
    ay, ax, py, px, ny, nx = patch_layout(x.shape, origin, stride, patch)
    big = np.zeros((ny * py + 2 * halo, nx * px + 2 * halo), np.float32)
    big[halo + oy - ay:halo + oy - ay + H, halo + ox - ax:halo + ox - ax + W] = x
    starts = [(i * py, j * px) for i in range(ny) for j in range(nx)]
    out: dict[str, np.ndarray] = {}
    cl = torch.device(device).type == "cpu"   # channels_last: ~15% faster eager convolutions on CPU
    if cl:
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for b0 in range(0, len(starts), batch_size):
            chunk = starts[b0:b0 + batch_size]
            batch = np.stack([big[sy:sy + py + 2 * halo, sx:sx + px + 2 * halo] for sy, sx in chunk])
            t = torch.from_numpy(batch[:, None]).to(device)
            res = model(t.contiguous(memory_format=torch.channels_last) if cl else t)
            if flip_average:
                for k, flip in [(k, f) for f in (False, True) for k in range(4)][1:]:
                    u = torch.flip(t, dims=(3,)) if flip else t
                    u = torch.rot90(u, k, dims=(2, 3)) if k else u
                    r = model(u.contiguous(memory_format=torch.channels_last) if cl else u)
                    for name in ("heatmap", "class"):
                        if name in r:
                            v = torch.rot90(r[name], -k, dims=(2, 3)) if k else r[name]
                            res[name] = res[name] + (torch.flip(v, dims=(3,)) if flip else v)
                for name in ("heatmap", "class"):
                    if name in res:
                        res[name] = res[name] / 8
            for name, t in res.items():
                a = t[:, :, halo:halo + py, halo:halo + px].float().cpu().numpy()
                if name not in out:
                    out[name] = np.zeros((a.shape[1], ny * py, nx * px), np.float32)
                for (sy, sx), v in zip(chunk, a):
                    out[name][:, sy:sy + py, sx:sx + px] = v
    return {k: np.ascontiguousarray(v[:, oy - ay:oy - ay + H, ox - ax:ox - ax + W]) for k, v in out.items()}


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def find_peaks(heat: np.ndarray, threshold: float, saddle: float, mask: np.ndarray | None = None):
    """Peaks of a heatmap (float [H, W] in [0, 1]): 3x3 local maxima >= threshold, merged by the saddle rule.

    Returns ``(iy, ix, n_merged)`` int arrays sorted by decreasing heatmap value; ``n_merged`` counts the
    peaks merged into each kept one. Two peaks merge into the higher when the heatmap's minimum on the
    segment between them (sampled every 0.5 px, nearest pixel) is >= ``saddle`` x the lower peak; only
    peaks within 8 px are compared.
    """
    from scipy import ndimage
    mx = ndimage.maximum_filter(heat, size=3, mode="constant", cval=-np.inf)
    cand = (heat >= mx) & (heat >= threshold)
    if mask is not None:
        cand &= ~mask
    iy, ix = np.nonzero(cand)
    order = np.argsort(-heat[iy, ix], kind="stable")
    iy, ix = iy[order], ix[order]
    n = len(iy)
    keep = np.ones(n, bool)
    merged = np.zeros(n, np.int64)
    if saddle < 1 and n > 1:
        for j in range(1, n):
            for i in range(j):
                if not keep[i]:
                    continue
                dy, dx = iy[j] - iy[i], ix[j] - ix[i]
                d = math.hypot(dy, dx)
                if d > 8:
                    continue
                t = np.linspace(0.0, 1.0, max(2, int(math.ceil(2 * d)) + 1))
                sy = np.floor(iy[i] + t * dy + 0.5).astype(int)
                sx = np.floor(ix[i] + t * dx + 0.5).astype(int)
                if heat[sy, sx].min() >= saddle * heat[iy[j], ix[j]]:
                    keep[j] = False
                    merged[i] += 1
                    break
    return iy[keep], ix[keep], merged[keep]


def wing_peaks(x: np.ndarray, iy, ix, offset: np.ndarray, radius: float, nsigma: float,
               smooth: float = 1.0) -> np.ndarray:
    """Peaks that are only the wing of a brighter object: boolean ``[n]``, True = drop.

    A centrally symmetric object (a PSF, a Sersic or bulge + disc galaxy) has the same light at ``c + v``
    and ``c - v``. For every pair of peaks closer than ``radius`` px, the one fainter in the smoothed image
    (``x`` convolved with a Gaussian of ``smooth`` px; ``x`` in units of the noise) is tested against the
    brighter one's centre ``c`` (peak pixel + ``offset``, the offset head ``[2, H, W]``): its excess over
    the mirrored point ``2c - p`` (bilinear) must be at least ``nsigma`` times the noise of that difference,
    else it is light that the brighter object puts there anyway (the network's weak peaks on the wings of
    bright objects) and is dropped. A real neighbour adds its own light at ``p`` and not at ``2c - p``.
    Mirrored points outside the window are not tested (kept).
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree
    iy, ix = np.asarray(iy, int), np.asarray(ix, int)
    drop = np.zeros(len(iy), bool)
    if radius <= 0 or len(iy) < 2:
        return drop
    sm = ndimage.gaussian_filter(x.astype(np.float32), smooth, mode="constant", truncate=3.0)
    # a smoothed unit white noise has sigma 1 / (2 sqrt(pi) s); the difference of two such points sqrt(2) that
    sigma_diff = math.sqrt(2.0) / (2.0 * math.sqrt(math.pi) * smooth)
    val = sm[iy, ix]
    pairs = cKDTree(np.c_[iy, ix]).query_pairs(radius, output_type="ndarray")
    if not len(pairs):
        return drop
    a, b = pairs[:, 0], pairs[:, 1]
    bright = np.where(val[a] >= val[b], a, b)
    faint = np.where(val[a] >= val[b], b, a)
    cy = iy[bright] + offset[0, iy[bright], ix[bright]]
    cx = ix[bright] + offset[1, iy[bright], ix[bright]]
    my, mx = 2 * cy - iy[faint], 2 * cx - ix[faint]
    H, W = x.shape
    inside = (my >= 0) & (my <= H - 1) & (mx >= 0) & (mx <= W - 1)
    mirror = ndimage.map_coordinates(sm, [my[inside], mx[inside]], order=1, mode="nearest")
    wing = val[faint[inside]] - mirror < nsigma * sigma_diff
    drop[faint[inside][wing]] = True
    return drop


def saturated_cores(image: np.ndarray, x: np.ndarray, mask: np.ndarray, rim_snr: float = 20.0):
    """Saturated star cores of a window: ``([(yc, xc, radius)], filled)``.

    Two kinds: pixels at exactly the window's maximum value (unmasked), when there are >= 4 of them and the
    value is > ``rim_snr`` in the normalised image ``x`` (a clipped plateau), grouped into connected parts
    of >= 4 pixels; and connected masked blobs of >= 4 pixels, at least 2 px wide in both axes (not a bad
    column or row), whose one-pixel rim has a median > ``rim_snr`` in ``x`` (a masked saturated core).
    Masked cores are filled in ``x`` (in place) with their rim's maximum, a clipped plateau as the network
    knows it (a hole of zeros makes ring-shaped heatmaps with peaks on the bright wings); ``filled`` is the
    boolean map of those pixels.
    """
    from scipy import ndimage
    out = []
    filled = np.zeros(mask.shape, bool)
    good = ~mask
    if good.any():
        top = image[good].max()
        plateau = good & (image == top)
        if plateau.sum() >= 4 and np.median(x[plateau]) > rim_snr:
            lab, n = ndimage.label(plateau, structure=np.ones((3, 3)))
            for k, sl in enumerate(ndimage.find_objects(lab), start=1):
                yy, xx = np.nonzero(lab[sl] == k)
                if yy.size >= 4:
                    out.append((yy.mean() + sl[0].start, xx.mean() + sl[1].start, math.sqrt(yy.size / math.pi)))
    if mask.any():
        lab, n = ndimage.label(mask)
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if h < 2 or w < 2 or h * w > 10000:
                continue
            pad = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
            blob = lab[pad] == k
            if blob.sum() < 4:
                continue
            rim = ndimage.binary_dilation(blob) & ~mask[pad]
            if rim.any() and np.median(x[pad][rim]) > rim_snr:
                yy, xx = np.nonzero(blob)
                out.append((yy.mean() + pad[0].start, xx.mean() + pad[1].start, math.sqrt(yy.size / math.pi)))
                x[pad][blob] = x[pad][rim].max()
                filled[pad] |= blob
    return out, filled


def _halfmax_width(stamp: np.ndarray) -> float:
    """2 sqrt(A / pi), A = pixels >= half the peak; the peak from a parabola through the central pixel's
    row and column (the stamp is centred on the brightest pixel)."""
    c = stamp.shape[0] // 2
    v0 = stamp[c, c]
    peak = v0
    for a, b in ((stamp[c, c - 1], stamp[c, c + 1]), (stamp[c - 1, c], stamp[c + 1, c])):
        den = a - 2 * v0 + b
        if den < 0:
            peak += -((b - a) ** 2) / (8 * den) / 2   # half of each axis' parabola excess
    area = float(np.count_nonzero(stamp >= 0.5 * peak))
    return 2.0 * math.sqrt(area / math.pi)


def psf_edges(fwhm_range_px: tuple[float, float], beta: float = 3.0) -> tuple[float, float]:
    """The estimator of :func:`estimate_conditions` on noise-free Moffat stars at the two FWHM edges
    (median over sub-pixel centres), cached per process."""
    key = (round(fwhm_range_px[0], 4), round(fwhm_range_px[1], 4), beta)
    if key not in _PSF_EDGES:
        from deepmosaic.models.datasets import stamp_psf
        vals = []
        for f in fwhm_range_px:
            psf = stamp_psf(f, beta)
            ws = []
            for dy, dx in ((0.0, 0.0), (0.25, -0.2), (-0.4, 0.35), (0.45, 0.45)):
                r = int(3 * f) + 3
                img = psf.drawImage(nx=2 * r + 1, ny=2 * r + 1, scale=1.0, offset=(dx, dy)).array
                cy, cx = np.unravel_index(np.argmax(img), img.shape)
                h = int(math.ceil(2 * f)) + 2
                ws.append(_halfmax_width(img[cy - h:cy + h + 1, cx - h:cx + h + 1]))
            vals.append(float(np.median(ws)))
        _PSF_EDGES[key] = (vals[0], vals[1])
    return _PSF_EDGES[key]


def estimate_conditions(x: np.ndarray, mask: np.ndarray, iy, ix, widths, min_stars: int = 3) -> dict:
    """PSF and noise estimates of a normalised tile (see the module doc).

    Returns ``{"psf_fwhm_raw": float or NaN, "n_psf_stars": int, "noise": float or NaN}``; ``psf_fwhm_raw``
    is in the units of :func:`psf_edges` (compare with those, not with a true FWHM).
    """
    H, W = x.shape
    iy, ix = np.asarray(iy, int), np.asarray(ix, int)
    # noise: pixels farther than ~the box size from every detection
    far = ~mask.copy()
    for y, x0, w in zip(iy, ix, widths):
        r = int(max(6, math.ceil(w)))
        far[max(y - r, 0):y + r + 1, max(x0 - r, 0):x0 + r + 1] = False
    vals = x[far]
    noise = float(1.4826 * np.median(np.abs(vals - np.median(vals)))) if vals.size > 1000 else float("nan")
    # PSF: the most compact of the isolated bright detections
    ws = []
    pos = np.c_[iy, ix].astype(float)
    for k in range(len(iy)):
        y, x0 = iy[k], ix[k]
        peak = x[y, x0]
        if not (20 <= peak <= 1000):
            continue
        h = 8
        if y - h < 0 or x0 - h < 0 or y + h >= H or x0 + h >= W:
            continue
        d = np.hypot(pos[:, 0] - y, pos[:, 1] - x0)
        if np.count_nonzero(d < 12) > 1:
            continue
        if mask[y - h:y + h + 1, x0 - h:x0 + h + 1].any():
            continue
        ws.append(_halfmax_width(x[y - h:y + h + 1, x0 - h:x0 + h + 1]))
    ws = np.sort(ws)[:max(min_stars, len(ws) // 4)]
    psf = float(np.median(ws)) if len(ws) >= min_stars else float("nan")
    return {"psf_fwhm_raw": psf, "n_psf_stars": len(ws), "noise": noise}


def seeds(catalog: dict) -> dict[str, np.ndarray]:
    """Deblending seeds from a detect catalog (window or mosaic pixels, whichever the catalog is in).

    Returns ``{"yx": float [n, 2] (y, x) centres, "box": float [n, 2] (height, width), "score": [n],
    "class": [n]}``, sorted by decreasing score.
    """
    order = np.argsort(-np.asarray(catalog["score"], float), kind="stable")
    yx = np.c_[np.asarray(catalog["y"], float), np.asarray(catalog["x"], float)].reshape(-1, 2)[order]
    box = np.c_[np.asarray(catalog["height"], float), np.asarray(catalog["width"], float)].reshape(-1, 2)[order]
    return {"yx": yx, "box": box, "score": np.asarray(catalog["score"], float)[order],
            "class": np.asarray(catalog["class"], np.int64)[order]}


def _warn_once(kind: str, msg: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("detect: %s", msg)


class DetectTask(ModelTask):
    """Objects from the centre-heatmap detector (see the module doc). The torch model is loaded lazily per
    process and never pickled; the model card gives the halo, the checksum and the training range."""

    name = "detect"
    weights_kind = "detect"
    Config = DetectConfig
    columns = DETECT_COLUMNS
    maps = HEATMAP
    resources = {"GPU": 1}

    def __init__(self, config=None):
        super().__init__(config)
        self._net = None  # plain values only (picklable)

    def network_info(self) -> dict:
        """Halo, stride, locality, checksum and training range of the network, from its card."""
        if self._net is None:
            from deepmosaic.models import registry
            from deepmosaic.models.weights_io import WeightsError
            base, card = self.model_card("centernet")
            net = registry.build("centernet", **card.get("config", {}))
            cfg = net.config
            if cfg.in_channels != 1 or tuple(cfg.class_names) != CLASS_NAMES:
                raise WeightsError(f"{base}: the detect stage needs 1 input channel and classes {CLASS_NAMES}, "
                                   f"the card has {cfg.in_channels} and {tuple(cfg.class_names)}.")
            ts = (card.get("training_set") or {}).get("config") or {}
            scale = float(ts.get("pixel_scale", 0.2))
            fwhm = ts.get("psf_fwhm_range")
            self._net = {"base": base, "halo": int(net.aligned_halo()), "stride": int(net.stride_multiple),
                         "local": bool(net.local), "sha256": card.get("weights", {}).get("sha256"),
                         "class_head": bool(cfg.class_head),
                         "psf_range_px": (fwhm[0] / scale, fwhm[1] / scale) if fwhm else None,
                         "noise_range": ((*ts["noise_sigma_range"], float(ts.get("zeropoint", 30.0)))
                                         if ts.get("noise_sigma_range") else None)}
        return self._net

    @property
    def halo(self) -> int:
        # peaks and the saddle test need 16 px; the wing test compares a core peak with peaks up to
        # wing_radius away (themselves 16 px from the edge) and with its mirror up to 2 wing_radius away
        # (+ 3 px of smoothing kernel, + 1 of interpolation)
        r = math.ceil(self.config.wing_radius)
        return self.network_info()["halo"] + (max(16 + r, 2 * r + 4) if r > 0 else 16)

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["weights_sha256"] = self.network_info()["sha256"]
        return fp

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not type(v).__module__.startswith("torch")}

    #: ``(image - background) / rms``, 0 on masked pixels: the clumps stage's normalisation (same training units)
    normalise = staticmethod(ClumpsTask.normalise)

    def heads(self, x: np.ndarray, origin=(0, 0)) -> dict[str, np.ndarray]:
        """Raw network outputs over a normalised window (see :func:`forward_patches`)."""
        info = self.network_info()
        device = resolve_device(self.config.device)
        model = _get_model(info["base"], device)
        return forward_patches(model, x, origin, info["stride"], info["halo"], self.config.patch,
                               self.config.batch_size, device, self.config.flip_average)

    def run(self, tile: TileInput) -> TaskOutput:
        cfg = self.config
        shape = tile.image.shape
        if tile.mask.all():
            return self.empty_output(shape)
        info = self.network_info()
        notes = []
        if not info["local"]:
            notes.append("the network is not local (norm='group'): tiled detections depend on the tiling")
        x = self.normalise(tile)
        cores, filled = saturated_cores(tile.image, x, tile.mask)
        peak_mask = tile.mask & ~filled
        out = self.heads(x, tile.origin)
        if info["class_head"]:
            heat = _sigmoid(out["heatmap"][0])
            cprob = np.exp(out["class"] - out["class"].max(0))
            cprob /= cprob.sum(0)
        else:
            p = _sigmoid(out["heatmap"])
            heat = p.max(0)
            cprob = p / np.maximum(p.sum(0), 1e-12)
        heat = heat.astype(np.float32)
        heat[peak_mask] = 0.0
        iy, ix, merged = find_peaks(heat, cfg.threshold, cfg.saddle, peak_mask)
        if cfg.wing_radius > 0:
            keep = ~wing_peaks(x, iy, ix, out["offset"], cfg.wing_radius, cfg.wing_nsigma)
            iy, ix, merged = iy[keep], ix[keep], merged[keep]
        sat_pos = {}
        for yc, xc, r in cores:
            near = np.flatnonzero(np.hypot(iy - yc, ix - xc) <= r + cfg.saturation_reach)
            if near.size:   # peaks are sorted by score: keep the first, at the core's centre
                keep = np.ones(len(iy), bool)
                keep[near[1:]] = False
                merged[near[0]] += near.size - 1
                sat_pos[(iy[near[0]], ix[near[0]])] = (yc, xc)
                iy, ix, merged = iy[keep], ix[keep], merged[keep]
        n = len(iy)
        cls = cprob[:, iy, ix].argmax(0).astype(np.int32) if n else np.zeros(0, np.int32)
        class_prob = cprob[:, iy, ix].max(0).astype(np.float64) if n else np.zeros(0)
        wid = np.maximum(out["size"][0, iy, ix].astype(np.float64), 1.0)
        hei = np.maximum(out["size"][1, iy, ix].astype(np.float64), 1.0)
        yc = iy + out["offset"][0, iy, ix].astype(np.float64)
        xc = ix + out["offset"][1, iy, ix].astype(np.float64)
        flags = np.where(merged > 0, MERGED_PEAKS, 0).astype(np.int64)
        for k in range(n):
            if (iy[k], ix[k]) in sat_pos:
                yc[k], xc[k] = sat_pos[(iy[k], ix[k])]
                flags[k] |= SATURATED
        flags |= self._condition_flags(x, tile.mask, iy, ix, wid, notes, tile.rms)
        if n == 0:
            res = self.empty_output(shape)
            res.maps["heatmap"] = heat
            res.notes = notes
            return res
        flux, ferr, fflags = self._photometry(tile, xc, yc, wid, hei)
        flags |= fflags
        cat = {"x": xc, "y": yc, "width": wid, "height": hei, "score": heat[iy, ix].astype(np.float64),
               "class": cls, "class_prob": class_prob, "flux": flux, "flux_err": ferr, "flags": flags}
        return TaskOutput(maps={"heatmap": heat}, catalog=cat, notes=notes)

    def _condition_flags(self, x, mask, iy, ix, wid, notes, rms=None) -> int:
        cfg = self.config
        cond = estimate_conditions(x, mask, iy, ix, wid, cfg.min_psf_stars)
        bits = 0
        nrng = self.network_info()["noise_range"]
        if cfg.zeropoint is not None and nrng and rms is not None and np.isfinite(rms).any():
            # the tile's noise in counts at the training zeropoint (a fainter zeropoint = more noise per count)
            level = float(np.nanmedian(rms)) * 10 ** (-0.4 * (cfg.zeropoint - nrng[2]))
            if not 0.9 * nrng[0] <= level <= 1.1 * nrng[1]:
                bits |= NOISE_OUT_OF_RANGE
                msg = (f"noise {level:.3g} counts at zeropoint {nrng[2]:g} outside the training range "
                       f"{nrng[0]:g}-{nrng[1]:g}: the objects' S/N distribution is not what the network saw")
                notes.append(msg)
                _warn_once("noise_level", msg)
        lo, hi = cfg.noise_tolerance
        if math.isfinite(cond["noise"]) and not lo <= cond["noise"] <= hi:
            bits |= NOISE_OUT_OF_RANGE
            msg = (f"normalised noise {cond['noise']:.2f} outside {cfg.noise_tolerance}: the rms map does not "
                   f"describe this image's noise, detections are unreliable")
            notes.append(msg)
            _warn_once("noise", msg)
        rng = self.network_info()["psf_range_px"]
        if rng and math.isfinite(cond["psf_fwhm_raw"]):
            e_lo, e_hi = psf_edges(rng)
            if not 0.9 * e_lo <= cond["psf_fwhm_raw"] <= 1.1 * e_hi:
                bits |= PSF_OUT_OF_RANGE
                est = rng[0] + (cond["psf_fwhm_raw"] - e_lo) * (rng[1] - rng[0]) / (e_hi - e_lo)
                msg = (f"PSF FWHM ~{est:.2f} px (from {cond['n_psf_stars']} objects) outside the training range "
                       f"{rng[0]:.2f}-{rng[1]:.2f} px: detections outside the network's experience")
                notes.append(msg)
                _warn_once("psf", msg)
        return bits

    @staticmethod
    def _photometry(tile: TileInput, xc, yc, wid, hei):
        data = np.ascontiguousarray(tile.data, np.float64)
        rms = np.ascontiguousarray(np.where(np.isfinite(tile.rms), tile.rms, 0.0), np.float64)
        mask = np.ascontiguousarray(tile.mask, bool)
        a, b = np.maximum(wid, hei) / 2.0, np.minimum(wid, hei) / 2.0   # sep wants a >= b
        theta = np.where(wid >= hei, 0.0, math.pi / 2)
        flux, ferr, sflag = sep.sum_ellipse(data, xc, yc, a, b, theta, r=1.0, err=rms, mask=mask, subpix=5)
        flags = np.zeros(len(xc), np.int64)
        H, W = data.shape
        hw, hh = wid / 2.0, hei / 2.0
        trunc = (xc - hw < -0.5) | (yc - hh < -0.5) | (xc + hw > W - 0.5) | (yc + hh > H - 0.5)
        flags[trunc] |= APER_TRUNC
        flags[(np.asarray(sflag) & sep.APER_HASMASKED) != 0] |= APER_HASMASKED
        return np.asarray(flux, np.float64), np.asarray(ferr, np.float64), flags
