"""Clump segmentation: star-forming clumps inside galaxies, as a probability map and a catalog linked to hosts.

Two stages share one catalog schema (``CLUMP_COLUMNS``) and a ``segmentation`` label map, so they can be
compared on identical tiles:

``clumps`` (:class:`ClumpsTask`, the neural stage)
    1. Input normalisation exactly as in training (:class:`deepmosaic.models.datasets.ClumpSetConfig`:
       ``image / noise_sigma`` with no sky): ``(image - background) / rms`` with the pipeline's global
       background model; masked pixels (and pixels with a non-positive or non-finite rms) are set to 0,
       i.e. to the sky level.
    2. Only the tile core plus ``margin`` px is computed (more when a later stage reads the map over its
       window: the deblend stage's clump test, :meth:`ClumpsTask.need_margin`; a clump blob whose centroid is
       in the core lies within it; the stage's halo is the network's aligned halo plus that margin). That
       region, from its start rounded down to a multiple of the network's ``stride_multiple`` in *mosaic*
       coordinates, is cut into the fewest equal patches of at most ``patch`` px (stride multiples), each
       fed with the network's aligned halo of context on every side (outside the window: zeros = sky),
       ``batch_size`` patches per forward call, optionally averaged over the 8 flips/rotations of the square
       (``flip_average``). Because patch starts and the halo are stride multiples, every pixel sees exactly
       the same input and arithmetic whatever the tile size, window or patch size (the U-Net is local with
       ``norm='batch'`` in eval mode): the probability map is seamless across patches and tiles. Large
       patches waste less on halos: a 1024 px tile computes (1040 + 112)^2 px for 1024^2, a 2048 px tile
       (2064 + 112)^2 for 2048^2.
    3. Clumps are extracted from the probability map with sep (``thresh=threshold`` absolute, no error
       map, no filter, ``minarea``; deblending off by default: the training targets are discs of radius
       2 px around clumps kept >= 5 px apart, so neighbouring clumps stay separate blobs). Local maxima of the map are
       not used: flat-topped blobs have many spurious peaks (FIELD.md: purity ~0.6).

    The shipped weights were first trained on 64 x 64 single-galaxy stamps, where the network (receptive
    field ~100 px) learned to lean on the stamp border: inside a larger noise field its purity dropped from
    0.92 to 0.74. They are now fine-tuned on 128 x 128 *canvases* (``ClumpSetConfig(layout='canvas')``, the
    ClumpRecipe's default: 0-3 hosts anywhere and cut by the edges, empty sky, close clump pairs, clumps on
    bulges, stars and compact galaxies as decoys); see the model card and the README's clumps section for
    the held-out figures.

``clumps_sep`` (:class:`ClumpsSepTask`, the classical baseline)
    sep on the background-subtracted image with fine deblending (``deblend_nthresh=64``,
    ``deblend_cont=1e-4``, small ``minarea``, a PSF-matched Gaussian filter) so that clumps come out as
    sub-objects of their galaxy. The same image is also extracted *without* deblending (same threshold and
    filter) to get the parent footprints; a child's parent is the parent label under its pixels. Kept:
    children flagged ``OBJ_MERGED`` (sep bit 1) whose parent holds more than one child, minus, per parent,
    the child with the largest footprint (the smooth body of the galaxy, which fine deblending also
    returns as a child; ``drop_host_body=False`` keeps it). Positions are sep's barycentres of the child's
    pixels, ``flux`` is sep's circular-aperture flux (``aper_radius``).

Catalog columns (both stages; window pixels here, mosaic pixels in the store)
-----------------------------------------------------------------------------
``x``, ``y``
    ``clumps``: probability-weighted centroid of the clump's blob (pixels above ``threshold``);
    ``clumps_sep``: sep's barycentre of the deblended child.
``flux``
    ``clumps``: sum of the background-subtracted image over the blob's pixels (masked pixels count 0).
    This *includes the host galaxy's light under the clump* and misses the clump's PSF wings outside the
    blob (a blob of radius ~2.5 px holds roughly half to two thirds of a point source's light).
    ``clumps_sep``: sep circular-aperture flux of radius ``aper_radius`` at the child's position (host
    light included as well).
``flux_local``
    ``flux`` minus a local host estimate: the median of the background-subtracted image in an annulus
    ``local_annulus = (r_in, r_out)`` px around the clump (masked pixels and the clumps themselves left out:
    every ``clumps`` blob, or discs of ``aper_radius`` around every ``clumps_sep`` clump) times the area
    that ``flux`` was summed over (blob pixels, or ``pi * aper_radius**2``). It removes the host's smooth
    light under the clump to first order (a linear host gradient cancels in the symmetric annulus); it
    over-subtracts where the annulus catches a neighbouring clump's wings or the host's nucleus. When
    no annulus pixel is usable it equals ``flux`` and bit ``LOCAL_NONE`` is set.
``npix``
    pixels in the clump's footprint (``segmentation`` map).
``probability``
    ``clumps``: peak of the probability map inside the blob; ``clumps_sep``: NaN.
``host_id``
    The host galaxy. Inside the task: the **row** of the ``sep`` stage's catalog for this window whose
    footprint (``upstream["sep"].maps["segmentation"]``) holds the clump's centroid pixel
    ``(floor(y + 0.5), floor(x + 0.5))``, -1 on sky (or when no ``sep`` stage ran before). In the store:
    the pipeline replaces it by the sep object's global ``id`` (``Task.links``: the stitched sep
    segmentation map read at the same pixel, exact across seams), -1 on sky. Caveat: the sep stage's own
    deblending can carve a bright clump out of its galaxy's footprint: as a sep object of its own (which
    then is the "host"), or, when that child fails sep's ``minarea``, as pixels left unassigned (host -1).
    Link to a sep run whose deblending keeps galaxies whole (``sep.deblend_cont=1``) when that matters.
``flags``
    Stage bits 0-7 (below) plus the pipeline's bits 8+ (masked, truncated, mosaic edge, ...; see base.py).

Stage flag bits
---------------
====  ===============  ==================================================================================
bit   name             meaning
====  ===============  ==================================================================================
1     OBJ_MERGED       sep: the object was deblended from a larger one (``clumps_sep``: always set)
2     OBJ_TRUNC        sep: the footprint touches the window edge
4     OBJ_DOVERFLOW    sep: deblending overflowed
8     OBJ_SINGU        sep: singular moments
16    APER_TRUNC       ``clumps_sep``: the flux aperture crosses the window edge
32    LOCAL_HASMASKED  the local annulus holds masked pixels or crosses the window edge
64    APER_HASMASKED   ``clumps_sep``: the flux aperture holds masked pixels
128   LOCAL_NONE       no usable annulus pixel: ``flux_local = flux``
====  ===============  ==================================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sep

from deepmosaic.pipeline.config import field, require

from .base import Column, MapSpec, ModelTask, Task, TaskOutput, TileInput, check_model_settings
from .sep_task import SepConfig, make_kernel, run_extract, validate_extract_params

OBJ_MERGED = 1
OBJ_TRUNC = 2
OBJ_DOVERFLOW = 4
OBJ_SINGU = 8
APER_TRUNC = 16
LOCAL_HASMASKED = 32
APER_HASMASKED = 64
LOCAL_NONE = 128

FLAG_BITS = {
    "deblended": OBJ_MERGED,
    "footprint_truncated": OBJ_TRUNC,
    "deblend_overflow": OBJ_DOVERFLOW,
    "singular_moments": OBJ_SINGU,
    "aperture_truncated": APER_TRUNC,
    "annulus_has_masked": LOCAL_HASMASKED,
    "aperture_has_masked": APER_HASMASKED,
    "no_local_annulus": LOCAL_NONE,
}

CLUMP_COLUMNS = {
    "x": Column("f8", "pix", "clump centroid x, 0-based mosaic pixels (pixel i spans [i-0.5, i+0.5))"),
    "y": Column("f8", "pix", "clump centroid y, 0-based mosaic pixels"),
    "flux": Column("f8", "", "background-subtracted flux over the clump's blob (clumps) or aperture "
                             "(clumps_sep); includes the host's light under the clump"),
    "flux_local": Column("f8", "", "flux minus the host level (annulus median) times the summed area"),
    "npix": Column("i8", "pix2", "pixels in the clump's footprint"),
    "probability": Column("f8", "", "peak clump probability in the blob (NaN for clumps_sep)"),
    "host_id": Column("i8", "", "id of the sep object whose footprint holds the clump's centroid pixel "
                                "(-1: sky); a sep catalog row inside the task"),
    "flags": Column("i8", "", "stage bits 0-7 (see tasks/clumps_task.py), pipeline bits 8+"),
}

CLUMP_SEGMENTATION = {"segmentation": MapSpec("int64", "label", "catalog id of each clump's pixels, 0 = none")}
PROBABILITY = {"probability": MapSpec("float32", "value", "clump probability of each pixel, in [0, 1]")}

#: loaded networks, per process: (weights base path, device) -> torch module in eval mode
_MODELS: dict = {}


def _check_annulus(w, value):
    require(isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
            and 0 <= value[0] < value[1] <= 64, w, "local_annulus", value,
            "expected (r_in, r_out) px with 0 <= r_in < r_out <= 64, e.g. (5, 8).")


# ------------------------------------------------------------------------------------------------- shared

def local_level(data, mask, x, y, r_in, r_out, exclude):
    """Median of ``data`` in the annulus ``r_in <= r <= r_out`` around each ``(x, y)``.

    Pixels that are masked or belong to a footprint in ``exclude`` (label map, > 0) are left out.
    Returns ``(level, flags)``: ``level`` NaN and ``LOCAL_NONE`` where no pixel is usable,
    ``LOCAL_HASMASKED`` where the annulus holds masked pixels or crosses the window edge.
    """
    n = len(x)
    level = np.full(n, np.nan)
    flags = np.zeros(n, np.int64)
    ny, nx = data.shape
    r = int(math.ceil(r_out))
    for k in range(n):
        cx, cy = float(x[k]), float(y[k])
        ix, iy = int(math.floor(cx + 0.5)), int(math.floor(cy + 0.5))
        y0, y1, x0, x1 = iy - r, iy + r + 1, ix - r, ix + r + 1
        if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx:
            flags[k] |= LOCAL_HASMASKED
        y0, y1, x0, x1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
        if y1 <= y0 or x1 <= x0:
            flags[k] |= LOCAL_NONE
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        ring = (d2 >= r_in ** 2) & (d2 <= r_out ** 2)
        bad = mask[y0:y1, x0:x1]
        if (ring & bad).any():
            flags[k] |= LOCAL_HASMASKED
        use = ring & ~bad & (exclude[y0:y1, x0:x1] == 0)
        if use.any():
            level[k] = float(np.median(data[y0:y1, x0:x1][use]))
        else:
            flags[k] |= LOCAL_NONE
    return level, flags


def disc_map(shape, x, y, radius):
    """uint8 map, 1 on pixels whose centre lies within ``radius`` of any ``(x, y)``."""
    out = np.zeros(shape, np.uint8)
    r = int(math.ceil(radius))
    for cx, cy in zip(np.asarray(x, float), np.asarray(y, float)):
        ix, iy = int(math.floor(cx + 0.5)), int(math.floor(cy + 0.5))
        y0, y1 = max(iy - r, 0), min(iy + r + 1, shape[0])
        x0, x1 = max(ix - r, 0), min(ix + r + 1, shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2).astype(np.uint8)
    return out


def host_rows(tile: TileInput, x, y, stage: str = "sep", name: str = "segmentation"):
    """Row of ``stage``'s window catalog whose footprint holds pixel ``(floor(y+.5), floor(x+.5))``; -1 on sky.

    Returns ``(rows, note)``; ``note`` is a message when the upstream stage did not run (all rows -1).
    """
    n = len(x)
    up = tile.upstream.get(stage)
    if up is None or name not in up.maps:
        return np.full(n, -1, np.int64), f"no upstream {stage!r} {name} map on this tile: host_id = -1"
    seg = np.asarray(up.maps[name])
    if n == 0:
        return np.zeros(0, np.int64), None
    iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(np.int64), 0, seg.shape[0] - 1)
    ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(np.int64), 0, seg.shape[1] - 1)
    lab = seg[iy, ix].astype(np.int64)
    return np.where(lab > 0, lab - 1, -1), None


def _blob_stats(labels, n, values):
    """Per-label sums of ``values`` (labels 1..n, same shape): ``np.bincount`` with weights."""
    return np.bincount(np.ravel(labels), weights=np.ravel(values), minlength=n + 1)[1:n + 1]


# ------------------------------------------------------------------------------------------------- clumps

@dataclass(frozen=True)
class ClumpsConfig:
    """Settings of the ``clumps`` stage (the clump segmentation U-Net)."""

    stage_name = "clumps"
    weights: str | None = field(None, "Weights file (NAME, NAME.safetensors or NAME.json with its model card); "
                                      "None: the shipped default models/weights/clumps.")
    threshold: float = field(0.95, "Probability threshold: sep extracts clumps from the probability map above "
                                  "it (absolute threshold, no filter). 0.95: the best S/N >= 10 F1 of the shipped "
                                  "weights on three validation mosaics (their card, extra.threshold), fixed before "
                                  "any held-out evaluation.")
    minarea: int = field(3, "Minimum pixels above threshold for a clump.")
    deblend_cont: float = field(1.0, "sep deblend_cont on the probability map (1.0: no deblending; blobs of "
                                     "neighbouring clumps are kept apart by the training targets).")
    batch_size: int = field(2, "Patches per forward call.")
    patch: int = field(2048, "Largest patch core in px: the region to compute (the tile core plus ``margin``) is "
                             "cut into the fewest equal patches of at most this size (rounded up to the "
                             "network's stride multiple), each fed with the network's aligned halo of context "
                             "on every side. Large patches waste less on halos; memory grows with "
                             "batch_size x (patch + 2 halo)^2.")
    margin: int = field(8, "Probability computed over the tile core plus this many px (rounded up to the stride "
                           "multiple) on every side: a clump blob whose centroid is in the core must lie within "
                           "it (blobs are ~2-3 px in radius).")
    device: str = field("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    flip_average: bool = field(False, "Average the probability over the 8 flips/rotations of each patch "
                                      "(8x the compute).")
    local_annulus: tuple[float, float] = field((5.0, 8.0), "Inner and outer radius (px) of the annulus whose "
                                                           "median is the local host level for flux_local.")

    def validate(self):
        w = self.stage_name
        check_model_settings(self, w)
        require(0 < self.threshold < 1, w, "threshold", self.threshold, "must be in (0, 1), e.g. 0.5.")
        require(self.minarea >= 1, w, "minarea", self.minarea, "must be >= 1 pixel.")
        require(0 <= self.deblend_cont <= 1, w, "deblend_cont", self.deblend_cont, "must be in [0, 1].")
        require(self.batch_size >= 1, w, "batch_size", self.batch_size, "must be >= 1.")
        require(8 <= self.patch <= 8192, w, "patch", self.patch, "must be in [8, 8192] px, e.g. 2048.")
        require(0 <= self.margin <= 256, w, "margin", self.margin, "must be in [0, 256] px, e.g. 8.")
        _check_annulus(w, self.local_annulus)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; other values unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_model(base: str, device: str):
    """The network at ``base`` on ``device``, loaded once per process (checksummed safetensors + card)."""
    key = (base, device)
    model = _MODELS.get(key)
    if model is None:
        from deepmosaic.models.weights_io import load_model
        model = load_model(base, map_location=device)
        _MODELS[key] = model
    return model


def _roundup(v: int, m: int) -> int:
    return -(-v // m) * m


class ClumpsTask(ModelTask):
    """Clump probability map from the shipped (or a given) U-Net, clumps from it with sep, linked to hosts.

    The torch model is never part of the task's state (tasks are pickled to workers): it is loaded on first
    use in each process and cached there (``_MODELS``). The model card is read lazily in the client for
    the halo (the network's ``aligned_halo()``) and the weights' checksum (part of the fingerprint).
    """

    name = "clumps"
    weights_kind = "clumps"
    Config = ClumpsConfig
    columns = CLUMP_COLUMNS
    maps = {**PROBABILITY, **CLUMP_SEGMENTATION}
    requires = ("sep",)
    resources = {"GPU": 1}
    links = {"host_id": ("sep", "segmentation")}

    def __init__(self, config=None):
        super().__init__(config)
        self._net = None  # {"halo", "stride", "local", "sha256", "base"}: plain values only (picklable)
        #: a later stage that reads the probability map over its whole window (deblend's clump test) raises
        #: the computed margin to its halo (:meth:`need_margin`); the core's results do not depend on it
        self.min_margin = 0

    def need_margin(self, px: int) -> None:
        """Compute the probability over the tile core plus at least ``px`` (a downstream stage reads it there)."""
        self.min_margin = max(self.min_margin, int(px))

    @property
    def margin(self) -> int:
        """The computed margin (px, before rounding to the stride): ``margin`` or a downstream stage's need."""
        return max(self.config.margin, self.min_margin)

    # ---- model card ------------------------------------------------------------------------------
    def network_info(self) -> dict:
        """Halo, stride multiple, locality and checksum of the network, from its card (no weights read)."""
        if self._net is None:
            from deepmosaic.models import registry
            from deepmosaic.models.weights_io import WeightsError
            base, card = self.model_card()
            net = registry.build(card["architecture"], **card.get("config", {}))
            cfg = net.config
            if getattr(cfg, "in_channels", 1) != 1 or getattr(cfg, "out_channels", 1) != 1:
                raise WeightsError(f"{base}: the clumps stage needs a network with 1 input and 1 output "
                                   f"channel, the card has {cfg.in_channels} -> {cfg.out_channels}.")
            self._net = {"base": base, "halo": int(net.aligned_halo()), "stride": int(net.stride_multiple),
                         "local": bool(net.local), "sha256": card.get("weights", {}).get("sha256")}
        return self._net

    @property
    def halo(self) -> int:
        """The network's aligned halo plus the aligned ``margin``: the context the core + margin region needs."""
        info = self.network_info()
        return info["halo"] + _roundup(self.margin, info["stride"])

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["weights_sha256"] = self.network_info()["sha256"]
        return fp

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in list(state):  # never pickle a torch object, whatever a subclass caches
            if type(state[k]).__module__.startswith("torch"):
                state.pop(k)
        return state

    # ---- inference -------------------------------------------------------------------------------
    @staticmethod
    def normalise(tile: TileInput) -> np.ndarray:
        """``(image - background) / rms`` (float32), 0 on masked pixels and where rms is not > 0."""
        rms = np.asarray(tile.rms, np.float32)
        good = ~tile.mask & np.isfinite(rms) & (rms > 0)
        x = np.zeros(tile.image.shape, np.float32)
        x[good] = (tile.image[good] - tile.background[good]) / rms[good]
        x[~np.isfinite(x)] = 0.0
        return x

    def probability(self, x: np.ndarray, origin=(0, 0), region=None) -> np.ndarray:
        """Clump probability (float32, [0, 1]) of a normalised window whose first pixel is mosaic ``origin``.

        ``region = (y0, y1, x0, x1)`` (window pixels) limits the computation to that box (0 elsewhere); default
        the whole window. The box, from its start rounded down to a multiple of the network's stride in mosaic
        coordinates, is cut into the fewest equal patches of at most ``patch`` px per axis (stride multiples);
        each patch carries the aligned halo of context (input pixels outside the window are 0 = sky).
        """
        import torch
        info = self.network_info()
        cfg = self.config
        device = resolve_device(cfg.device)
        model = _get_model(info["base"], device)
        m, h = info["stride"], info["halo"]
        H, W = x.shape
        ry0, ry1, rx0, rx1 = region if region is not None else (0, H, 0, W)
        res = np.zeros((H, W), np.float32)
        if ry1 <= ry0 or rx1 <= rx0:
            return res
        oy, ox = int(origin[0]), int(origin[1])
        ay, ax = oy + ry0 - (oy + ry0) % m, ox + rx0 - (ox + rx0) % m   # aligned start of the patch grid
        span_y, span_x = oy + ry1 - ay, ox + rx1 - ax
        P = _roundup(cfg.patch, m)
        ny, nx = -(-span_y // P), -(-span_x // P)
        py, px = _roundup(-(-span_y // ny), m), _roundup(-(-span_x // nx), m)
        # big[i, j] is mosaic pixel (ay - h + i, ax - h + j)
        big = np.zeros((ny * py + 2 * h, nx * px + 2 * h), np.float32)
        wy0, wy1 = max(0, ay - h - oy), min(H, ay - h + big.shape[0] - oy)
        wx0, wx1 = max(0, ax - h - ox), min(W, ax - h + big.shape[1] - ox)
        big[oy + wy0 - ay + h:oy + wy1 - ay + h, ox + wx0 - ax + h:ox + wx1 - ax + h] = x[wy0:wy1, wx0:wx1]
        starts = [(i * py, j * px) for i in range(ny) for j in range(nx)]
        out = np.zeros((ny * py, nx * px), np.float32)
        transforms = [(k, f) for f in (False, True) for k in range(4)] if cfg.flip_average else [(0, False)]
        with torch.inference_mode():
            for b0 in range(0, len(starts), cfg.batch_size):
                chunk = starts[b0:b0 + cfg.batch_size]
                batch = np.stack([big[sy:sy + py + 2 * h, sx:sx + px + 2 * h] for sy, sx in chunk])
                t = torch.from_numpy(batch[:, None]).to(device)
                acc = None
                for k, flip in transforms:
                    u = torch.flip(t, dims=(3,)) if flip else t
                    u = torch.rot90(u, k, dims=(2, 3)) if k else u
                    p = torch.sigmoid(model(u).float())
                    p = torch.rot90(p, -k, dims=(2, 3)) if k else p
                    p = torch.flip(p, dims=(3,)) if flip else p
                    acc = p if acc is None else acc + p
                prob = (acc / len(transforms))[:, 0, h:h + py, h:h + px].cpu().numpy()
                for (sy, sx), pr in zip(chunk, prob):
                    out[sy:sy + py, sx:sx + px] = pr
        res[ry0:ry1, rx0:rx1] = out[oy + ry0 - ay:oy + ry1 - ay, ox + rx0 - ax:ox + rx1 - ax]
        return np.clip(res, 0.0, 1.0)

    # ---- the stage -------------------------------------------------------------------------------
    def run(self, tile: TileInput) -> TaskOutput:
        cfg = self.config
        shape = tile.image.shape
        if tile.mask.all():
            return self.empty_output(shape)
        notes = []
        if not self.network_info()["local"]:
            notes.append("the network is not local (norm='group'): tiled probabilities depend on the tiling")
        H, W = shape
        mg = _roundup(self.margin, self.network_info()["stride"])
        cy, cx = tile.core
        region = (max(0, (cy.start or 0) - mg), min(H, (H if cy.stop is None else cy.stop) + mg),
                  max(0, (cx.start or 0) - mg), min(W, (W if cx.stop is None else cx.stop) + mg))
        prob = self.probability(self.normalise(tile), tile.origin, region)
        prob[tile.mask] = 0.0
        data = tile.data
        sep_cfg = SepConfig(thresh=cfg.threshold, minarea=cfg.minarea, filter_kernel="none",
                            deblend_cont=cfg.deblend_cont, clean=False)
        objs, seg, extra, n2 = run_extract(prob, tile.mask, None, sep_cfg, None)
        notes += n2
        seg = seg.astype(np.int64)
        n = len(objs)
        if n == 0:
            out = self.empty_output(shape)
            out.maps["probability"] = prob
            out.notes = notes
            return out
        # per-blob sums over the blob pixels only (a few % of the window)
        yy, xx = np.nonzero(seg)
        lab = seg[yy, xx]
        pv = prob[yy, xx].astype(np.float64)
        w = _blob_stats(lab, n, pv)
        x = _blob_stats(lab, n, pv * xx) / w
        y = _blob_stats(lab, n, pv * yy) / w
        npix = np.bincount(lab, minlength=n + 1)[1:n + 1].astype(np.int64)
        flux = _blob_stats(lab, n, data[yy, xx].astype(np.float64))
        peak = np.zeros(n + 1)
        np.maximum.at(peak, lab, pv)
        peak = peak[1:]
        flags = objs["flag"].astype(np.int64) | extra
        level, lflags = local_level(data, tile.mask, x, y, *cfg.local_annulus, exclude=seg)
        flags |= lflags
        flux_local = np.where(np.isfinite(level), flux - npix * np.nan_to_num(level), flux)
        host, note = host_rows(tile, x, y)
        if note:
            notes.append(note)
        cat = {"x": x, "y": y, "flux": flux, "flux_local": flux_local, "npix": npix,
               "probability": peak, "host_id": host, "flags": flags}
        return TaskOutput(maps={"probability": prob, "segmentation": seg}, catalog=cat, notes=notes)


# --------------------------------------------------------------------------------------------- clumps_sep

@dataclass(frozen=True)
class ClumpsSepConfig:
    """Settings of the ``clumps_sep`` baseline: clumps as sep's finely deblended sub-objects of galaxies."""

    stage_name = "clumps_sep"
    halo: int = field(64, "Pixels of context around each tile core (host footprints must fit in it).")
    thresh: float = field(1.5, "Detection threshold in units of the global background RMS.")
    minarea: int = field(3, "Minimum pixels above threshold (small: clumps are unresolved).")
    filter_kernel: str = field("gauss:3.5", "PSF-matched detection filter: 'gauss:FWHM' with the PSF's FWHM in "
                                            "px (3.5 = 0.7 arcsec at 0.2 arcsec/px), or 'default', 'none', "
                                            "'tophat:R'.")
    filter_type: str = field("matched", "sep filter_type: 'matched' or 'conv'.")
    deblend_nthresh: int = field(64, "Deblending thresholds (fine: clumps are small contrasts on a disk).")
    deblend_cont: float = field(1e-4, "Minimum deblending contrast (tiny: a clump holds a few % of its host).")
    clean: bool = field(False, "sep cleaning (off: it would merge clumps back into their host).")
    clean_param: float = field(1.0, "Cleaning parameter (with clean=True).")
    aper_radius: float = field(2.5, "Radius (px) of the circular aperture of flux.")
    drop_host_body: bool = field(True, "Drop, per parent, the child with the largest footprint (the galaxy's "
                                       "smooth body, which fine deblending returns as one more child).")
    local_annulus: tuple[float, float] = field((5.0, 8.0), "Inner and outer radius (px) of the annulus whose "
                                                           "median is the local host level for flux_local.")
    pixstack: int = field(0, "Active-pixel buffer of sep.extract; 0 sizes it for the tile window.")
    sub_object_limit: int = field(1024, "Deblending sub-object limit; on overflow objects are flagged.")

    def validate(self):
        w = self.stage_name
        validate_extract_params(self)
        require(1 <= self.deblend_nthresh <= 64, w, "deblend_nthresh", self.deblend_nthresh,
                "must be in [1, 64].")
        require(self.aper_radius > 0, w, "aper_radius", self.aper_radius, "must be > 0 pixels.")
        _check_annulus(w, self.local_annulus)


def parents_of(child_seg, parent_seg, n_children):
    """Parent label (0: none) of every child label 1..n: the parent label covering most of its pixels."""
    on = child_seg > 0
    c = child_seg[on].astype(np.int64)
    p = parent_seg[on].astype(np.int64)
    out = np.zeros(n_children, np.int64)
    if len(c) == 0:
        return out
    pairs, counts = np.unique(np.stack([c, p]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))       # per child, the most frequent parent first
    pairs = pairs[:, order]
    first = np.ones(pairs.shape[1], bool)
    first[1:] = pairs[0, 1:] != pairs[0, :-1]
    out[pairs[0, first] - 1] = pairs[1, first]
    return out


class ClumpsSepTask(Task):
    """Classical baseline: clumps as sep's finely deblended children inside multi-child parents."""

    name = "clumps_sep"
    Config = ClumpsSepConfig
    columns = CLUMP_COLUMNS
    maps = dict(CLUMP_SEGMENTATION)
    requires = ("sep",)
    links = {"host_id": ("sep", "segmentation")}

    def run(self, tile: TileInput) -> TaskOutput:
        cfg = self.config
        shape = tile.image.shape
        mask = tile.mask
        if mask.all():
            return self.empty_output(shape)
        data = tile.data
        kernel = make_kernel(cfg.filter_kernel)
        err = tile.global_rms
        objs, seg, extra, notes = run_extract(data, mask, err, cfg, kernel)
        _, pseg, _, n2 = run_extract(data, mask, err, cfg, kernel, deblend_cont=1.0, deblend_nthresh=1)
        notes = notes + n2
        n = len(objs)
        parent = parents_of(seg, pseg, n)
        n_children = np.bincount(parent, minlength=int(pseg.max()) + 1)
        merged = (objs["flag"].astype(np.int64) & OBJ_MERGED) > 0
        keep = merged & (parent > 0) & (n_children[parent] > 1)
        npix_all = np.bincount(seg.ravel(), minlength=n + 1)[1:n + 1]
        if cfg.drop_host_body and keep.any():
            for p in np.unique(parent[keep]):
                members = np.nonzero(parent == p)[0]
                body = members[np.argmax(npix_all[members])]
                keep[body] = False
        rows = np.nonzero(keep)[0]
        m = len(rows)
        lut = np.zeros(n + 1, np.int64)
        lut[rows + 1] = np.arange(1, m + 1)
        out_seg = lut[seg]
        if m == 0:
            out = self.empty_output(shape)
            out.maps["segmentation"] = out_seg
            out.notes = notes
            return out
        x = objs["x"][rows].astype(np.float64)
        y = objs["y"][rows].astype(np.float64)
        flags = objs["flag"][rows].astype(np.int64) | extra
        flux, _, aflag = sep.sum_circle(data, x, y, cfg.aper_radius, err=tile.rms, mask=mask, subpix=5)
        aflag = aflag.astype(np.int64)
        flags |= np.where(aflag & sep.APER_TRUNC, APER_TRUNC, 0) | np.where(aflag & sep.APER_HASMASKED,
                                                                          APER_HASMASKED, 0)
        # children's deblended footprints can be large (the kept host body with drop_host_body=False):
        # leave out discs of the aperture radius around every kept clump instead
        level, lflags = local_level(data, mask, x, y, *cfg.local_annulus,
                                    exclude=disc_map(shape, x, y, cfg.aper_radius))
        flags |= lflags
        area = math.pi * cfg.aper_radius ** 2
        flux_local = np.where(np.isfinite(level), flux - area * np.nan_to_num(level), flux)
        host, note = host_rows(tile, x, y)
        if note:
            notes.append(note)
        npix = np.bincount(out_seg.ravel(), minlength=m + 1)[1:m + 1].astype(np.int64)
        cat = {"x": x, "y": y, "flux": np.asarray(flux, np.float64), "flux_local": flux_local, "npix": npix,
               "probability": np.full(m, np.nan), "host_id": host, "flags": flags}
        return TaskOutput(maps={"segmentation": out_seg}, catalog=cat, notes=notes)
