"""The ``deblend`` stage: a network deblends sep's blends, with a per-pixel uncertainty.

What it does on one tile window
-------------------------------
1. **Blends** are groups of sep objects (``tile.upstream['sep']``): objects whose footprints touch (sep's
   deblended children of one parent footprint) or whose centroids are closer than ``neighbour_distance`` px,
   joined transitively. An object in no group is *isolated* and keeps its sep footprint, position and
   AUTO flux unchanged.
2. Every member's **peak** is the brightest pixel of its sep footprint in the normalised image
   ``(image - background) / rms``. Secondary peaks inside sep footprints (``find_peaks``, or the detect
   stage's detections with ``peaks='detect'``) become members too, except, with ``clump_peaks='drop'`` and the
   clumps stage before this one (:meth:`DeblendTask.bind`), those where its probability map reaches
   ``clump_probability``: a clump of the galaxy, not a companion. sep's own objects are never dropped.
3. **Stamps** of ``stamp`` x ``stamp`` px are cut from the normalised image. A pair is one stamp centred on
   the brighter peak, the network told where both peaks are (input channels, see
   :class:`~deepmosaic.models.train.DeblendRecipe`). A blend of more than two members is deblended
   *one member against the rest*: one stamp centred on each member, the central marker on it and the
   companion marker on all the others; each member's probability is read from its own call, then every pixel
   goes to the member of largest probability (where it exceeds 0.5). All stamps of the window go through the
   network in batches (``batch_size``).
4. **Masks** are written into ``segmentation`` only on pixels that are sky or belong to the blend's own
   members in sep's map (a blend never takes pixels of another object). A member that the network leaves
   empty keeps its sep footprint (flag ``empty_mask``). Blends with more than ``max_members`` members or a
   footprint that does not fit in a stamp are skipped: their members keep their sep footprints (flag
   ``skipped``).
   **Refinement** (``refine='sersic'``, blends of at most ``refine_max_members`` members, 3 by default):
   the blend's masks are then re-drawn from a joint PSF-convolved
   Sersic fit of its members (:mod:`deepmosaic.models.blend_fit`: one profile per member, started from the
   network's masks at the peaks, PSF ``psf_fwhm`` / ``psf_beta``; a maximum a posteriori fit with a
   log-normal prior on the Sersic index and a Gaussian one on the shape, ``refine_prior_n`` /
   ``refine_prior_g``): a pixel goes to the member whose fitted
   light is largest there, where it exceeds 1 sigma, the truth convention applied to the models. Every fit
   that converges is kept (with ``refine_chi2_sigma`` set, only those whose residuals pass a chi-square test
   over the members' pixels; the others keep the network's masks). The fit sees the same
   pixels in every window that holds the whole blend, so both sides of a seam get the same masks.
5. **Uncertainty**: per pixel, the probability that the pixel's label (sky, or which member) is wrong,
   averaged over ``n_samples`` latent draws of the probabilistic U-Net's prior
   (:meth:`~deepmosaic.models.train.DeblendRecipe.error_probability`; against the refined masks when they
   are refined), mapped through the calibration stored in the model card for those masks when it has one
   (:meth:`DeblendTask.calibrate`); 0 outside deblended stamps. The draws
   of a stamp are seeded by its centre in mosaic pixels, so the two tiles that see a blend straddling a seam
   compute the same values.
6. **Fluxes** of members: the background-subtracted image over the pixels where ``sum_j p_j > share_floor``
   plus a ring ``flux_wings`` px wide around them (the wings below the 1-sigma edge of the masks), shared
   between the members (``flux_sharing='symmetric'``, the default) in proportion to ``T_k * (p_k +
   template_floor)``: ``T_k`` the member's symmetric template (the lesser of a pixel and its mirror about the
   member's peak, on the ``template_smooth``-px smoothed image; SDSS's deblender's templates), ``p_k`` its
   probability (for a refined blend, the fitted models' shares ``M_k / max(sum_j M_j, 1)`` instead). The
   probabilities say which galaxy owns a pixel, not how its light divides: shared by them
   alone (``'probability'``), a companion loses the light it has under the central's mask (-31 % median on
   validation pairs). With its background error. Isolated objects keep sep's AUTO flux.

Seams: a member belongs to the tile whose core holds its centroid (the intensity-weighted centroid of its
mask, computed from the same pixels in every window that holds the whole blend); the runner links the
neighbour's labels. ``parent`` is a label map of each blend's region carrying its primary (brightest)
member, from which the runner fills ``parent_id`` after stitching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from deepmosaic.pipeline.config import field, require

from .base import Column, MapSpec, ModelTask, TaskOutput, TileInput, check_model_settings
from .clumps_task import ClumpsTask, _get_model, resolve_device

#: stage flag bits (0-7; pipeline bits 8+ are OR-ed in by the runner)
FLAG_DEBLENDED = 1      #: member of a blend, mask from the network
FLAG_SKIPPED = 2        #: blend too large / too many members: skipped, sep footprint kept
FLAG_EMPTY_MASK = 4     #: the network gave this member no pixel: sep footprint kept
FLAG_NEIGHBOUR = 8      #: grouped with a neighbour by distance only (footprints do not touch)
FLAG_NEW_PEAK = 16      #: a peak the stage found inside a sep footprint (not an object of sep's catalog)
FLAG_REFINED = 32       #: refine='sersic': the blend's masks come from its accepted Sersic fit

STAGE_FLAGS = {"deblended": FLAG_DEBLENDED, "skipped": FLAG_SKIPPED, "empty_mask": FLAG_EMPTY_MASK,
               "neighbour": FLAG_NEIGHBOUR, "new_peak": FLAG_NEW_PEAK, "refined": FLAG_REFINED}

DEBLEND_COLUMNS = {
    "x": Column("f8", "pix", "x, 0-based mosaic pixels: intensity-weighted centroid of the mask (members); "
                             "sep's centroid (isolated objects)"),
    "y": Column("f8", "pix", "y, 0-based mosaic pixels"),
    "parent_id": Column("i8", "", "id (in this catalog) of the primary, brightest member of the object's blend; "
                                  "-1 for isolated objects (filled from maps/deblend/parent after stitching)"),
    "flux": Column("f8", "", "members: background-subtracted image flux shared by symmetric templates times the "
                             "network's probabilities (flux_sharing; plus a ring of wings, see flux_wings); "
                             "isolated objects: sep's AUTO flux; image units"),
    "flux_err": Column("f8", "", "1-sigma background error of flux"),
    "n_children": Column("i8", "", "members of the object's blend (1: isolated)"),
    "npix": Column("i8", "pix2", "pixels of the object's mask"),
    "sep_flux": Column("f8", "", "sep's AUTO flux of the same detection (before deblending); NaN for a new peak"),
    "flags": Column("i8", "", "bit 0 deblended, 1 skipped (blend too large / too many members: footprint kept), "
                              "2 empty network mask (footprint kept), 3 grouped by distance, 4 new peak found "
                              "inside a sep footprint, 5 masks from the blend's Sersic fit (refine); pipeline "
                              "bits 8+"),
}

DEBLEND_MAPS = {
    "segmentation": MapSpec("int64", "label", "catalog id of each pixel's object after deblending, 0 = sky"),
    "parent": MapSpec("int64", "label", "id of the primary member of the blend covering the pixel, 0 elsewhere"),
    "uncertainty": MapSpec("float32", "value", "probability that the pixel's deblended label is wrong "
                                               "(0 outside deblended stamps)"),
}


def symmetric_template(img: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """``min(img[p], img[mirror of p about (cy, cx)])`` clipped at 0; 0 where the mirror pixel is outside."""
    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W]
    my = np.rint(2.0 * cy - yy).astype(np.int64)
    mx = np.rint(2.0 * cx - xx).astype(np.int64)
    inside = (my >= 0) & (my < H) & (mx >= 0) & (mx < W)
    mirror = np.where(inside, img[np.clip(my, 0, H - 1), np.clip(mx, 0, W - 1)], 0.0)
    return np.clip(np.minimum(img, mirror), 0.0, None)


@dataclass(frozen=True)
class DeblendConfig:
    """Settings of the ``deblend`` stage."""

    stage_name = "deblend"
    weights: str | None = field(None, "Weights file (NAME, NAME.safetensors or NAME.json with its model card); "
                                      "None: the shipped default models/weights/deblend.")
    halo: int = field(64, "Pixels of context around each tile core; must hold half a stamp plus a blend's "
                          "reach (at least stamp / 2).")
    stamp: int = field(96, "Stamp side in px fed to the network (the training size; multiple of 16).")
    neighbour_distance: float = field(6.0, "Objects whose centroids are closer than this (px) form a blend even "
                                           "when their footprints do not touch; 0 switches it off.")
    max_members: int = field(6, "Blends with more members are skipped (flag 'skipped', footprints kept).")
    margin: int = field(4, "A blend's footprints must lie this far (px) inside every stamp it needs, else "
                           "it is skipped as too large.")
    peaks: str = field("sep", "Where extra blend members come from: 'sep' (secondary peaks of the image inside "
                              "sep's footprints, see find_peaks) or 'detect' (the detect stage's detections inside "
                              "sep's footprints; run `--stages sep,detect,deblend`).")
    find_peaks: bool = field(True, "With peaks='sep': also look for secondary peaks inside each sep footprint (a "
                                   "close pair that sep left as one object); each becomes a member of a blend.")
    peak_smooth: float = field(1.0, "Gaussian sigma (px) of the smoothing before peaks are looked for.")
    peak_min_separation: int = field(3, "Peaks closer than this (px) are one peak.")
    peak_min_dip: float = field(1.0, "A secondary peak must stand this far (units of the pixel noise, on the "
                                     "smoothed image, where the noise is ~0.28) above the lowest point of the "
                                     "straight line to every brighter peak of its footprint...")
    peak_rel_dip: float = field(0.05, "... and this fraction of its own height.")
    n_samples: int = field(8, "Latent draws of the probabilistic U-Net for the uncertainty map (0: the "
                              "deterministic prediction's own ambiguity only).")
    share_floor: float = field(0.02, "Flux sharing: pixels where the members' summed probability is below "
                                     "this count for no member.")
    flux_wings: int = field(8, "Member fluxes also take the light of a ring this wide (px) around the shared "
                               "region (0: none).")
    flux_sharing: str = field("symmetric", "How members share the light: 'symmetric' (symmetric templates times "
                                           "the probabilities) or 'probability' (the probabilities alone; the ring "
                                           "split by the core fluxes). See the module docstring, step 6.")
    template_smooth: int = field(3, "Box (px) smoothing the image before the symmetric templates (1: none).")
    template_floor: float = field(0.05, "Added to each member's probability where it weights its template, so "
                                        "that the wings beyond the masks are shared by the templates.")
    flip_average: bool = field(False, "Average the probabilities over the 8 flips/rotations of each stamp "
                                      "(8x the compute).")
    companion_shift: float | None = field(None, "Logit shift added to the companion channel of a pair's call "
                                                "before masks, uncertainty and flux sharing (None: the model "
                                                "card's extra.companion_logit_shift, fitted on validation pairs; "
                                                "0: the network's raw probabilities). Blends of 3+ members, "
                                                "read from each member's own (central) channel, are unaffected.")
    refine: str = field("sersic", "'sersic': refine each blend's masks with a joint PSF-convolved Sersic fit of its "
                                "members started from the network's masks (models/blend_fit.py; kept where the "
                                "fit passes a chi-square test, else the network's masks); 'none': the network's "
                                "masks.")
    psf_fwhm: float = field(3.5, "With refine='sersic': the Moffat PSF's FWHM in px (the simulator's 0.7\" at "
                                 "0.2\"/px); set it to the survey's.")
    psf_beta: float = field(3.0, "With refine='sersic': the Moffat PSF's beta.")
    refine_chi2_sigma: float | None = field(None, "With refine='sersic': None (the default) keeps every fit that "
                                                  "converges; a number keeps a fit only when its reduced chi-square "
                                                  "over the members' pixels is <= 1 + this x sqrt(2 / pixels) (e.g. "
                                                  "3: galaxies a Sersic profile does not describe keep the "
                                                  "network's masks, which on simulated fields are the worse ones).")
    refine_max_nfev: int = field(200, "With refine='sersic': the fit's budget of model evaluations.")
    refine_max_members: int = field(3, "With refine='sersic': blends of more members keep the network's masks (the "
                                       "refinement was validated on pairs and triples; its cost grows with the "
                                       "square of the members).")
    refine_oversample: int = field(3, "With refine='sersic': sub-pixels per pixel (per axis) of the fit's "
                                      "renderer.")
    refine_neighbour_grow: int = field(2, "With refine='sersic': the fit leaves out the sep footprints of objects "
                                          "that are not members of the blend, grown by this many px (their light "
                                          "is no member's); -1: they are fitted as sky.")
    refine_prior_n: tuple[float, float] = field((2.0, 0.7), "With refine='sersic': a log-normal prior on every "
                                                 "member's Sersic index, (median, sigma of ln n); the fit maximises "
                                                 "the posterior (a faint or close companion's index is otherwise "
                                                 "barely constrained and runs to its bounds). Sigma 0: no prior.")
    refine_prior_g: float = field(0.3, "With refine='sersic': sigma of a zero-mean Gaussian prior on each member's "
                                       "shear components g1, g2 (the spread of galaxy ellipticities); 0: no prior.")
    clump_peaks: str = field("drop", "'drop': when the clumps stage runs before deblend (--stages sep,clumps,"
                                     "deblend), a secondary peak the stage finds inside a galaxy's footprint "
                                     "(find_peaks, or peaks='detect') where the clump probability reaches "
                                     "clump_probability is a clump of that galaxy, not a blend member. sep's own "
                                     "objects are never dropped. 'keep', or no clumps stage before it: peaks are "
                                     "not tested.")
    clump_probability: float = field(0.5, "With clump_peaks='drop': the clump probability (its maximum over the 3x3 "
                                          "px around a peak) from which a secondary peak is a clump.")
    batch_size: int = field(32, "Stamps per forward call.")
    device: str = field("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")

    def validate(self):
        w = self.stage_name
        check_model_settings(self, w)
        require(32 <= self.stamp <= 1024 and self.stamp % 16 == 0, w, "stamp", self.stamp,
                "must be a multiple of 16 in [32, 1024], e.g. 96.")
        require(self.halo >= self.stamp // 2, w, "halo", self.halo,
                f"must be >= stamp / 2 = {self.stamp // 2} px so that a stamp around an owned object fits the "
                f"window; raise halo or lower stamp.")
        require(self.neighbour_distance >= 0, w, "neighbour_distance", self.neighbour_distance, "must be >= 0 px.")
        require(self.max_members >= 2, w, "max_members", self.max_members, "must be >= 2.")
        require(0 <= self.margin < self.stamp // 4, w, "margin", self.margin, f"must be in [0, {self.stamp // 4}).")
        require(0 < self.peak_smooth <= 5, w, "peak_smooth", self.peak_smooth, "must be in (0, 5] px.")
        require(self.peaks in ("sep", "detect"), w, "peaks", self.peaks, "use 'sep' or 'detect'.")
        require(self.peak_min_separation >= 1, w, "peak_min_separation", self.peak_min_separation, "must be >= 1 px.")
        require(self.peak_min_dip > 0, w, "peak_min_dip", self.peak_min_dip, "must be > 0.")
        require(0 <= self.peak_rel_dip < 1, w, "peak_rel_dip", self.peak_rel_dip, "must be in [0, 1).")
        require(0 <= self.n_samples <= 64, w, "n_samples", self.n_samples, "must be in [0, 64].")
        require(0 < self.share_floor < 1, w, "share_floor", self.share_floor, "must be in (0, 1).")
        require(self.flux_sharing in ("symmetric", "probability"), w, "flux_sharing", self.flux_sharing,
                "use 'symmetric' or 'probability'.")
        require(isinstance(self.template_smooth, int) and 1 <= self.template_smooth <= 15, w, "template_smooth",
                self.template_smooth, "an integer number of px in [1, 15], e.g. 3.")
        require(0 <= self.template_floor <= 1, w, "template_floor", self.template_floor, "must be in [0, 1].")
        require(0 <= self.flux_wings <= 32, w, "flux_wings", self.flux_wings, "must be in [0, 32] px.")
        require(self.batch_size >= 1, w, "batch_size", self.batch_size, "must be >= 1.")
        require(self.clump_peaks in ("drop", "keep"), w, "clump_peaks", self.clump_peaks, "use 'drop' or 'keep'.")
        require(math.isfinite(self.clump_probability) and 0 < self.clump_probability <= 1, w, "clump_probability",
                self.clump_probability, "a probability in (0, 1], e.g. 0.5.")
        require(self.refine in ("none", "sersic"), w, "refine", self.refine, "use 'none' or 'sersic'.")
        require(math.isfinite(self.psf_fwhm) and 1.0 <= self.psf_fwhm <= 30.0, w, "psf_fwhm", self.psf_fwhm,
                "the PSF FWHM in px, in [1, 30], e.g. 3.5.")
        require(math.isfinite(self.psf_beta) and 1.5 <= self.psf_beta <= 20.0, w, "psf_beta", self.psf_beta,
                "the Moffat beta, in [1.5, 20], e.g. 3.")
        require(self.refine_chi2_sigma is None or (math.isfinite(self.refine_chi2_sigma)
                                                    and self.refine_chi2_sigma > 0), w, "refine_chi2_sigma",
                self.refine_chi2_sigma, "a number > 0, e.g. 3, or none to keep every converged fit.")
        require(isinstance(self.refine_max_nfev, int) and 20 <= self.refine_max_nfev <= 5000, w, "refine_max_nfev",
                self.refine_max_nfev, "an integer in [20, 5000], e.g. 200.")
        require(isinstance(self.refine_max_members, int) and self.refine_max_members >= 2, w, "refine_max_members",
                self.refine_max_members, "an integer >= 2, e.g. 3 (pairs and triples).")
        require(isinstance(self.refine_oversample, int) and 1 <= self.refine_oversample <= 5, w, "refine_oversample",
                self.refine_oversample, "an integer in [1, 5], e.g. 3.")
        require(isinstance(self.refine_neighbour_grow, int) and -1 <= self.refine_neighbour_grow <= 16, w,
                "refine_neighbour_grow", self.refine_neighbour_grow, "an integer number of px in [-1, 16], e.g. 2.")
        med, sig = self.refine_prior_n
        require(math.isfinite(med) and 0.3 <= med <= 6.2 and math.isfinite(sig) and 0 <= sig <= 10, w,
                "refine_prior_n", self.refine_prior_n,
                "(median n in [0.3, 6.2], sigma of ln n in [0, 10]; 0: no prior), e.g. (2, 0.7).")
        require(math.isfinite(self.refine_prior_g) and 0 <= self.refine_prior_g <= 10, w, "refine_prior_g",
                self.refine_prior_g, "a sigma in [0, 10] (0: no prior), e.g. 0.3.")
        require(self.companion_shift is None or (math.isfinite(self.companion_shift)
                                                  and abs(self.companion_shift) <= 20), w, "companion_shift",
                self.companion_shift, "use a number of logits in [-20, 20], or none for the model card's value.")


# ------------------------------------------------------------------------------------------------ blends

def find_blends(seg: np.ndarray, x: np.ndarray, y: np.ndarray, neighbour_distance: float):
    """Groups of sep objects (rows) that form blends.

    Parameters
    ----------
    seg : int [H, W] sep label map (row + 1, 0 = sky)
    x, y : float [n] centroids (window px)
    neighbour_distance : float, px; centroids closer than this join a group (0: never)

    Returns
    -------
    (groups, by_distance): ``groups`` a list of int arrays of rows (>= 2 rows each, rows ascending, groups
    ordered by their first row); ``by_distance`` bool [n], rows joined only through the distance rule.
    """
    n = len(x)
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    touching = np.zeros(n, bool)
    for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1, :], seg[1:, :])):
        pairs = (a > 0) & (b > 0) & (a != b)
        if pairs.any():
            for i, j in np.unique(np.stack([a[pairs], b[pairs]], 1), axis=0) - 1:
                union(int(i), int(j))
                touching[[i, j]] = True
    if neighbour_distance > 0 and n > 1:
        from scipy.spatial import cKDTree
        for i, j in cKDTree(np.c_[y, x]).query_pairs(neighbour_distance):
            union(int(i), int(j))
    roots = np.array([find(i) for i in range(n)], np.int64)
    groups = [np.flatnonzero(roots == r) for r in np.unique(roots)]
    groups = [g for g in groups if len(g) > 1]
    in_group = np.zeros(n, bool)
    for g in groups:
        in_group[g] = True
    return groups, in_group & ~touching


def clumps_at(prob: np.ndarray, peaks: np.ndarray, threshold: float) -> np.ndarray:
    """bool [m]: whether the clump probability map ``prob`` reaches ``threshold`` within the 3x3 px around each
    peak ``(y, x)`` (window px)."""
    H, W = prob.shape
    out = np.zeros(len(peaks), bool)
    for i, (py, px) in enumerate(np.asarray(peaks, float).reshape(-1, 2)):
        iy, ix = int(np.floor(py + 0.5)), int(np.floor(px + 0.5))
        win = prob[max(iy - 1, 0):min(iy + 2, H), max(ix - 1, 0):min(ix + 2, W)]
        out[i] = win.size > 0 and float(win.max()) >= threshold
    return out


def brightest_pixels(img: np.ndarray, seg: np.ndarray, n: int) -> np.ndarray:
    """(y, x) of the largest value of ``img`` in each footprint ``seg == row + 1`` (float [n, 2]; one box per
    object, so the cost follows the footprints' area, not a sort of the window)."""
    out = np.zeros((n, 2))
    for r, box in enumerate(ndimage.find_objects(seg, max_label=n)):
        if box is None:
            continue
        sub = np.where(seg[box] == r + 1, img[box], -np.inf)
        iy, ix = np.unravel_index(int(np.argmax(sub)), sub.shape)
        out[r] = (box[0].start + iy, box[1].start + ix)
    return out


def footprint_peaks(smooth: np.ndarray, seg: np.ndarray, n: int, min_separation: int, min_dip: float,
                    rel_dip: float):
    """Secondary peaks inside sep footprints: local maxima of the smoothed image that stand clear of every
    brighter peak of the same footprint (the lowest point of the straight line between them lies at least
    ``max(min_dip, rel_dip * height)`` below the peak).

    Parameters
    ----------
    smooth : float [H, W] smoothed normalised image; seg : int [H, W] sep labels (row + 1); n : rows

    Returns
    -------
    (peaks float [m, 2] (y, x) window px, rows int [m] the sep row whose footprint holds each)
    """
    size = 2 * min_separation + 1
    cand = (smooth == ndimage.maximum_filter(smooth, size=size)) & (seg > 0)
    ys, xs = np.nonzero(cand)
    if len(ys) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    labs = seg[ys, xs] - 1
    vals = smooth[ys, xs]
    out, rows = [], []
    for r in np.unique(labs):
        k = np.flatnonzero(labs == r)
        k = k[np.argsort(-vals[k], kind="stable")]
        kept = [k[0]]                                           # the footprint's own (brightest) peak
        for c in k[1:]:
            ok = True
            for a in kept:
                length = int(np.ceil(np.hypot(ys[c] - ys[a], xs[c] - xs[a]))) + 1
                t = np.linspace(0.0, 1.0, max(length, 2))
                line = ndimage.map_coordinates(smooth, [ys[c] + t * (ys[a] - ys[c]), xs[c] + t * (xs[a] - xs[c])],
                                               order=1)
                if vals[c] - line.min() < max(min_dip, rel_dip * vals[c]):
                    ok = False
                    break
            if ok:
                kept.append(c)
                out.append((ys[c], xs[c]))
                rows.append(r)
    return np.asarray(out, float).reshape(-1, 2), np.asarray(rows, np.int64)


def detection_peaks(catalog: dict, seg: np.ndarray, own: np.ndarray, min_separation: float):
    """Extra blend members from the detect stage's detections (window pixels) inside sep footprints.

    In each footprint the detection nearest the footprint's own peak ``own[row]`` is sep's object itself;
    every other detection there (strongest first) at least ``min_separation`` px from the peaks kept so far
    becomes a member. Detections on sep's sky are not blend members (the stage deblends sep's footprints).
    Returns (peaks float [m, 2] (y, x), rows int [m]) like :func:`footprint_peaks`.
    """
    from .detect_task import seeds
    if len(catalog.get("x", [])) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    s = seeds(catalog)
    yx = s["yx"]
    H, W = seg.shape
    yi = np.clip(np.floor(yx[:, 0] + 0.5).astype(np.int64), 0, H - 1)
    xi = np.clip(np.floor(yx[:, 1] + 0.5).astype(np.int64), 0, W - 1)
    rows = seg[yi, xi] - 1
    own_det = {}
    for k in np.flatnonzero(rows >= 0):  # the detection of sep's own object, per footprint
        d = float(np.hypot(*(yx[k] - own[rows[k]])))
        if rows[k] not in own_det or d < own_det[rows[k]][1]:
            own_det[rows[k]] = (k, d)
    kept = {r: [np.asarray(own[r], float)] for r in own_det}
    out, out_rows = [], []
    for k in np.flatnonzero(rows >= 0):   # strongest first (seeds are sorted by score)
        r = int(rows[k])
        if own_det[r][0] == k or min(float(np.hypot(*(yx[k] - p))) for p in kept[r]) < min_separation:
            continue
        kept[r].append(yx[k])
        out.append(yx[k])
        out_rows.append(r)
    return (np.asarray(out, float).reshape(-1, 2), np.asarray(out_rows, np.int64))


def cut(img: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """``size`` x ``size`` stamp of ``img`` whose pixel ``size // 2`` is ``(cy, cx)``, zeros outside."""
    return cut_frame(img, cy - size // 2, cx - size // 2, size, size)


def cut_frame(img: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """``img[y0:y0 + height, x0:x0 + width]``, zeros (False) where that frame leaves ``img``."""
    out = np.zeros((height, width), img.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + height, img.shape[0]), min(x0 + width, img.shape[1])
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


@dataclass
class _Call:
    """One network call: a stamp centred on window pixel (cy, cx), peaks in stamp px (central first)."""

    blend: int
    member: int          # the row whose probability is read from channel 0 (N > 2); -1 for a pair
    cy: int
    cx: int
    peaks: np.ndarray    # [k, 2] stamp px


class DeblendTask(ModelTask):
    """Blends found from sep's footprints, deblended by the (probabilistic) U-Net; isolated objects kept.

    As in :class:`~deepmosaic.tasks.clumps_task.ClumpsTask`, the torch model is never part of the task's
    state: it is loaded on first use in each process and cached there.
    """

    name = "deblend"
    weights_kind = "deblend"
    Config = DeblendConfig
    columns = DEBLEND_COLUMNS
    maps = DEBLEND_MAPS
    requires = ("sep",)
    resources = {"GPU": 1}
    links = {"parent_id": ("deblend", "parent")}

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.peaks == "detect":
            self.requires = ("sep", "detect")
        self._sha = None
        self._calibrations = {}    # refine mode -> (raw, calibrated) lists from the card, or () without one
        self._card_shift = 0.0

    def bind(self, before) -> None:
        """With ``clump_peaks='drop'`` and the clumps stage among ``before``: read its probability map (it is
        then required, and asked to compute it over this stage's whole window, see
        :meth:`ClumpsTask.need_margin`)."""
        clumps = [t for t in before if isinstance(t, ClumpsTask)]
        if self.config.clump_peaks == "drop" and clumps:
            self.requires = tuple(dict.fromkeys((*self.requires, ClumpsTask.name)))
            clumps[0].need_margin(self.halo)

    @property
    def tests_clumps(self) -> bool:
        """Whether secondary peaks are tested against the clumps stage's map (bound to it by :meth:`bind`)."""
        return ClumpsTask.name in self.requires

    def fit_options(self) -> dict:
        """The settings of :func:`deepmosaic.models.blend_fit.fit_blend` that ``refine_*`` gives (for the stage
        and for benchmarks that refine masks as the stage does)."""
        cfg = self.config
        return {"chi2_sigma": cfg.refine_chi2_sigma, "max_nfev": cfg.refine_max_nfev,
                "oversample": cfg.refine_oversample,
                "prior_n": tuple(cfg.refine_prior_n) if cfg.refine_prior_n[1] > 0 else None,
                "prior_g": cfg.refine_prior_g or None}

    def network_sha256(self) -> str | None:
        if self._sha is None:
            from deepmosaic.models.weights_io import WeightsError
            base, card = self.model_card()
            cfg = card.get("config", {})
            if cfg.get("in_channels") != 3 or cfg.get("out_channels") != 2:
                raise WeightsError(f"{base}: the deblend stage needs a network with 3 input "
                                   f"channels (image, central and companion peaks) and 2 outputs, the card has "
                                   f"{cfg.get('in_channels')} -> {cfg.get('out_channels')}.")
            self._sha = card.get("weights", {}).get("sha256") or ""
            from deepmosaic.models.train import DeblendRecipe
            extra = card.get("extra") or {}
            self._calibrations = {}
            for mode, key in (("none", "uncertainty_calibration"), ("sersic", "uncertainty_calibration_sersic")):
                cal = extra.get(key)
                self._calibrations[mode] = (list(cal["raw"]), list(cal["calibrated"])) if cal else ()
            self._card_shift = DeblendRecipe.card_companion_shift(card)
        return self._sha

    def companion_shift(self) -> float:
        """The companion logit shift in use: ``companion_shift`` if set, else the model card's (0 without)."""
        self.network_sha256()
        return self._card_shift if self.config.companion_shift is None else float(self.config.companion_shift)

    def calibration(self, refined: bool | None = None) -> tuple:
        """``(raw, calibrated)`` of the card for the network's masks (``uncertainty_calibration``) or, with
        ``refined`` (default: ``refine='sersic'``), for the Sersic-refined masks
        (``uncertainty_calibration_sersic``, the network's when the card has none); ``()`` without one. The stage
        passes ``refined`` per blend: a blend whose fit was not kept has the network's masks."""
        self.network_sha256()
        refined = self.config.refine == "sersic" if refined is None else refined
        return (refined and self._calibrations["sersic"]) or self._calibrations["none"]

    def calibrate(self, err: np.ndarray, refined: bool | None = None) -> np.ndarray:
        """The raw error probability mapped through the card's calibration (:meth:`calibration`: fitted on the
        validation split, observed error rate per bin of raw value, non-decreasing), unchanged without one."""
        cal = self.calibration(refined)
        if not cal:
            return err
        return np.interp(err, cal[0], cal[1]).astype(np.float32)

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["weights_sha256"] = self.network_sha256()
        fp["companion_shift"] = self.companion_shift()        # the card's value changes results too
        fp["clumps_from"] = ClumpsTask.name if self.tests_clumps else None  # whether clump peaks were tested
        # both calibrations: a blend whose fit is not kept goes through the network's even when refining
        fp["uncertainty_calibration"] = {mode: [list(v) for v in cal] for mode, cal in self._calibrations.items()}
        return fp

    # ---- planning ----------------------------------------------------------------------------------
    def plan(self, groups, peaks, seg, flux_order):
        """Network calls for every blend that fits; returns ``(calls, skipped_rows)``."""
        cfg = self.config
        s, h = cfg.stamp, cfg.stamp // 2
        boxes = ndimage.find_objects(seg)
        calls, skipped = [], []
        for b, rows in enumerate(groups):
            if len(rows) > cfg.max_members:
                skipped += list(rows)
                continue
            rows = sorted(rows, key=lambda r: flux_order[r])          # brightest first
            own = [boxes[r] for r in rows if r < len(boxes) and boxes[r] is not None]   # new peaks have none
            y0, y1 = min(b_[0].start for b_ in own), max(b_[0].stop for b_ in own)
            x0, x1 = min(b_[1].start for b_ in own), max(b_[1].stop for b_ in own)
            centres = [rows[0]] if len(rows) == 2 else rows
            fits = all(y0 - (int(peaks[c, 0]) - h) >= cfg.margin and (int(peaks[c, 0]) - h + s) - y1 >= cfg.margin
                       and x0 - (int(peaks[c, 1]) - h) >= cfg.margin and (int(peaks[c, 1]) - h + s) - x1 >= cfg.margin
                       for c in centres)
            if not fits:
                skipped += list(rows)
                continue
            for c in centres:
                cy, cx = int(peaks[c, 0]), int(peaks[c, 1])
                order = [c] + [r for r in rows if r != c]
                calls.append(_Call(b, -1 if len(rows) == 2 else c, cy, cx,
                                   peaks[order] - np.array([cy - h, cx - h], float)))
        return calls, skipped

    # ---- inference ---------------------------------------------------------------------------------
    def infer(self, norm: np.ndarray, calls, origin):
        """Probabilities [n, 2, s, s] and samples [S, n, 2, s, s] of every call, in batches."""
        import torch

        from deepmosaic.models.train import DeblendRecipe
        cfg = self.config
        model = _get_model(self.weights_base(), resolve_device(cfg.device))
        stamps = np.stack([cut(norm, c.cy, c.cx, cfg.stamp) for c in calls])[:, None]
        k = max(len(c.peaks) for c in calls)
        peaks = np.full((len(calls), k, 2), np.nan)
        for i, c in enumerate(calls):
            peaks[i, :len(c.peaks)] = c.peaks
        x = torch.from_numpy(DeblendRecipe.stamp_inputs(stamps, peaks))
        # seeds from the stamp centre in mosaic pixels: both tiles of a seam draw the same latents
        oy, ox = origin
        seeds = np.array([(c.cy + oy) * 1_000_003 + (c.cx + ox) for c in calls], np.int64) % (2 ** 62)
        return DeblendRecipe.sample_probs(model, x, cfg.n_samples, seeds, cfg.batch_size, cfg.flip_average,
                                          self.companion_shift())

    def run(self, tile: TileInput) -> TaskOutput:
        from deepmosaic.models.train import DeblendRecipe
        cfg = self.config
        sep_out = tile.upstream["sep"]
        seg = np.asarray(sep_out.maps["segmentation"], np.int64)
        scat = sep_out.catalog
        n = len(scat["x"])
        shape = seg.shape
        out = self.empty_output(shape)
        if n == 0:
            return out
        data = tile.data
        norm = ClumpsTask.normalise(tile)
        rms2 = np.where(np.isfinite(tile.rms), tile.rms, 0.0).astype(np.float64) ** 2
        smooth = ndimage.gaussian_filter(norm, cfg.peak_smooth)
        peaks = brightest_pixels(smooth, seg, n)
        groups, by_distance = find_blends(seg, np.asarray(scat["x"]), np.asarray(scat["y"]), cfg.neighbour_distance)
        # secondary peaks inside sep footprints become members n, n+1, ... of their footprint's blend
        if cfg.peaks == "detect":
            extra, extra_rows = detection_peaks(tile.upstream["detect"].catalog, seg, peaks, cfg.peak_min_separation)
        elif cfg.find_peaks:
            extra, extra_rows = footprint_peaks(smooth, seg, n, cfg.peak_min_separation, cfg.peak_min_dip,
                                                cfg.peak_rel_dip)
        else:
            extra, extra_rows = np.zeros((0, 2)), []
        if self.tests_clumps and len(extra):      # a clump of the galaxy is not a member of a blend
            prob = np.asarray(tile.upstream[ClumpsTask.name].maps["probability"])
            real = ~clumps_at(prob, extra, cfg.clump_probability)
            extra, extra_rows = extra[real], np.asarray(extra_rows)[real]
        m = len(extra)
        if m:
            group_of = {int(r): g for g, rows in enumerate(groups) for r in rows}
            for j, r in enumerate(extra_rows):
                if int(r) not in group_of:
                    group_of[int(r)] = len(groups)
                    groups.append(np.array([r], np.int64))
                groups[group_of[int(r)]] = np.append(groups[group_of[int(r)]], n + j)
            peaks = np.concatenate([peaks, extra])
        N = n + m
        height = smooth[peaks[:, 0].astype(int), peaks[:, 1].astype(int)]
        calls, skipped = self.plan(groups, peaks, seg, -height)

        new_seg = seg.copy()
        parent = np.zeros(shape, np.int64)
        unc = np.zeros(shape, np.float32)
        pad = np.full(m, np.nan)
        x = np.concatenate([np.asarray(scat["x"], float), peaks[n:, 1]])
        y = np.concatenate([np.asarray(scat["y"], float), peaks[n:, 0]])
        sep_flux = np.concatenate([np.asarray(scat["flux"], float), pad])
        flux, flux_err = sep_flux.copy(), np.concatenate([np.asarray(scat["flux_err"], float), pad])
        npix = np.zeros(N, np.int64)
        npix[:n] = np.bincount(seg.ravel(), minlength=n + 1)[1:n + 1]
        flags = np.zeros(N, np.int64)
        flags[n:] |= FLAG_NEW_PEAK
        n_children = np.ones(N, np.int64)
        for g in groups:
            n_children[g] = len(g)
        flags[:n][by_distance] |= FLAG_NEIGHBOUR
        flags[skipped] |= FLAG_SKIPPED

        if calls:
            prob, samples = self.infer(norm, calls, tile.origin)
            s, h = cfg.stamp, cfg.stamp // 2
            by_blend: dict[int, list[int]] = {}
            for i, c in enumerate(calls):
                by_blend.setdefault(c.blend, []).append(i)
            for b, idx in by_blend.items():
                rows = sorted(groups[b], key=lambda r: -height[r])
                # the blend's frame: the union of its stamps, in window px
                fy0 = min(calls[i].cy for i in idx) - h
                fx0 = min(calls[i].cx for i in idx) - h
                fy1 = max(calls[i].cy for i in idx) - h + s
                fx1 = max(calls[i].cx for i in idx) - h + s
                H, W = fy1 - fy0, fx1 - fx0
                p = np.zeros((len(rows), H, W), np.float32)
                sp = np.zeros((samples.shape[0], len(rows), H, W), np.float32)
                if len(idx) == 1:                                # a pair: both channels of one call
                    c = calls[idx[0]]
                    p[:, :s, :s] = prob[idx[0]]
                    sp[:, :, :s, :s] = samples[:, idx[0]]
                else:                                            # one member against the rest
                    for i in idx:
                        c = calls[i]
                        k = rows.index(c.member)
                        oy_, ox_ = c.cy - h - fy0, c.cx - h - fx0
                        p[k, oy_:oy_ + s, ox_:ox_ + s] = prob[i, 0]
                        sp[:, k, oy_:oy_ + s, ox_:ox_ + s] = samples[:, i, 0]
                masks = DeblendRecipe.masks_from_probs(p)
                refined = False
                if cfg.refine == "sersic" and len(rows) <= cfg.refine_max_members:
                    masks, shares = self._refine(norm, tile.mask, masks, (fy0, fx0), peaks[rows], seg, rows)
                    if shares is not None:                   # the fit was kept: its models share the light
                        p, refined = shares, True
                        flags[rows] |= FLAG_REFINED
                # the calibration of the masks this blend got: refined ones, or the network's own
                err = self.calibrate(DeblendRecipe.error_probability(sp[:, None], masks[None])[0], refined=refined)
                self._paste(rows, masks, p, err, (fy0, fx0), seg, data, rms2, new_seg, parent, unc,
                            x, y, flux, flux_err, npix, flags, peaks)

        # new peaks that got no pixel (the network saw no galaxy there, or their blend was skipped) are dropped
        keep = np.ones(N, bool)
        keep[n:] = npix[n:] > 0
        if not keep.all():
            lut = np.zeros(N + 1, np.int64)
            lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
            new_seg, parent = lut[new_seg], lut[parent]
            for g in groups:
                n_children[g] = int(keep[g].sum())
        out.maps["segmentation"] = new_seg
        out.maps["parent"] = parent
        out.maps["uncertainty"] = unc
        cols = {"x": x, "y": y, "parent_id": np.full(N, -1, np.int64), "flux": flux, "flux_err": flux_err,
                "n_children": n_children, "npix": npix, "sep_flux": sep_flux, "flags": flags}
        out.catalog = {k: v[keep] for k, v in cols.items()}
        return out

    def _refine(self, norm, mask, masks, frame0, peaks, seg, rows):
        """``refine='sersic'``: the blend's masks from a joint Sersic fit of its members
        (:func:`deepmosaic.models.blend_fit.refine_masks`) on the frame's normalised pixels (masked pixels,
        pixels outside the window and, with ``refine_neighbour_grow`` >= 0, the grown sep footprints ``seg`` of
        objects other than the members ``rows`` are not fitted); the network's ``masks`` where the fit is not
        kept. Returns ``(masks, shares)``: ``shares`` the fitted models' light-sharing weights
        (:func:`~deepmosaic.models.blend_fit.model_shares`), None when the fit is not kept."""
        from deepmosaic.models.blend_fit import model_shares, refine_masks
        cfg = self.config
        H, W = masks.shape[-2:]
        fy0, fx0 = frame0
        d = cut_frame(norm, fy0, fx0, H, W)
        good = cut_frame(~np.asarray(mask, bool), fy0, fx0, H, W)
        if cfg.refine_neighbour_grow >= 0:
            fseg = cut_frame(seg, fy0, fx0, H, W)
            own = np.isin(fseg, np.asarray(rows, np.int64) + 1)
            other = (fseg > 0) & ~own
            if cfg.refine_neighbour_grow > 0 and other.any():
                other = ndimage.binary_dilation(other, iterations=cfg.refine_neighbour_grow) & ~own
            good &= ~other
        refined, fit = refine_masks(d, masks, np.asarray(peaks, float) - np.array([fy0, fx0], float), cfg.psf_fwhm,
                                    cfg.psf_beta, weight=good, **self.fit_options())
        return refined, (model_shares(fit.models) if fit.accepted else None)

    def _share_flux(self, probs, allowed, d, rms2, flux, flux_err, centres, report=None):
        """Member fluxes from the members' probability maps ``probs`` (member row -> map on the pixels ``d``),
        written for the members in ``report`` (default all; a member whose mask came out empty still competes
        for the light, so its light is not given to the others).

        ``core``: pixels where the summed probability exceeds ``share_floor``, within ``allowed``; ``ring``:
        ``flux_wings`` px around it (galaxy wings below the masks' 1-sigma edge). ``flux_sharing``:

        * ``'symmetric'``: every pixel of core + ring is shared in proportion to ``T_k * (p_k + template_floor)``,
          ``T_k`` the symmetric template of member k (the ``template_smooth`` px box-smoothed image, the
          smaller of a pixel and its mirror about the member's centre ``centres[k]``, >= 0; SDSS's deblender's
          templates), ``p_k`` its probability; where every template is 0, by the probabilities;
        * ``'probability'``: the core by ``p_k / sum_j p_j``, the ring split in proportion to the members'
          core fluxes.

        Errors from the background variance ``rms2`` of the shared pixels.
        """
        report = list(probs) if report is None else [r for r in report if r in probs]
        if not report:
            return
        cfg = self.config
        total = sum(probs.values())
        core = (total > cfg.share_floor) & allowed
        ring = np.zeros_like(core)
        if cfg.flux_wings > 0 and core.any():
            ring = ndimage.binary_dilation(core, iterations=cfg.flux_wings) & allowed & ~core
        if cfg.flux_sharing == "symmetric":
            region = core | ring
            src = ndimage.uniform_filter(d, cfg.template_smooth) if cfg.template_smooth > 1 else d
            w = {r: symmetric_template(src, *centres[r]) * (probs[r] + cfg.template_floor) for r in probs}
            wsum = sum(w.values())
            fallback = wsum <= 0       # e.g. pixels below 0 (noise): by the probabilities, so noise stays unbiased
            for r in report:
                by_prob = probs[r] / np.maximum(total, 1e-12)
                share = np.where(region, np.where(fallback, by_prob, w[r] / np.maximum(wsum, 1e-300)), 0.0)
                flux[r] = float(np.sum(share * d))
                flux_err[r] = math.sqrt(float(np.sum(share * share * rms2)))
            return
        prob_share = {r: np.where(core, pk / np.maximum(total, 1e-12), 0.0) for r, pk in probs.items()}
        core_flux = {r: float(np.sum(w * d)) for r, w in prob_share.items()}
        var = {r: float(np.sum(w * w * rms2)) for r, w in prob_share.items()}
        pos = {r: max(f, 0.0) for r, f in core_flux.items()}
        tot = sum(pos.values())
        ring_flux, ring_var = float(np.sum(d[ring])), float(np.sum(rms2[ring]))
        for r in report:
            frac = pos[r] / tot if tot > 0 else 0.0
            flux[r] = core_flux[r] + frac * ring_flux
            flux_err[r] = math.sqrt(var[r] + frac * frac * ring_var)

    def _paste(self, rows, masks, p, err, frame0, seg, data, rms2, new_seg, parent, unc,
               x, y, flux, flux_err, npix, flags, peaks):
        """Write one deblended blend (frame-shaped masks, probabilities, uncertainty) into the window."""
        fy0, fx0 = frame0
        H, W = masks.shape[-2:]
        wy0, wx0 = max(fy0, 0), max(fx0, 0)
        wy1, wx1 = min(fy0 + H, seg.shape[0]), min(fx0 + W, seg.shape[1])
        fs = (slice(wy0 - fy0, wy1 - fy0), slice(wx0 - fx0, wx1 - fx0))
        ws = (slice(wy0, wy1), slice(wx0, wx1))
        sub = seg[ws]
        members = np.isin(sub, np.asarray(rows) + 1)
        allowed = (sub == 0) | members
        region = new_seg[ws]
        region[members] = 0                                  # the members' sep pixels are re-assigned
        d = data[ws].astype(np.float64)
        yy, xx = np.mgrid[wy0:wy1, wx0:wx1]
        shared = []       # members with pixels: their fluxes are written
        for k, r in enumerate(rows):
            m = masks[k][fs] & allowed
            if not m.any():
                region[(sub == r + 1)] = r + 1
                flags[r] |= FLAG_EMPTY_MASK
                continue
            region[m] = r + 1
            flags[r] |= FLAG_DEBLENDED
            shared.append(r)
            wt = np.clip(d[m], 0, None)
            if wt.sum() > 0:
                y[r], x[r] = float(np.sum(wt * yy[m]) / wt.sum()), float(np.sum(wt * xx[m]) / wt.sum())
            else:
                y[r], x[r] = float(yy[m].mean()), float(xx[m].mean())
            npix[r] = int(m.sum())
        probs = {r: p[k][fs].astype(np.float64) for k, r in enumerate(rows)}
        centres = {r: (float(peaks[r, 0]) - wy0, float(peaks[r, 1]) - wx0) for r in rows}
        self._share_flux(probs, allowed, d, rms2[ws], flux, flux_err, centres, report=shared)
        claimed = (region > 0) & allowed
        parent[ws][claimed | members] = rows[0] + 1
        unc[ws][allowed] = np.maximum(unc[ws][allowed], err[fs][allowed])
