"""The SExtractor baseline: sep detection, deblending and Kron/aperture photometry on one tile."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sep

from deepmosaic.pipeline.config import field, require

from .base import FLAG_BUFFER, FLAG_TILE_TRUNCATED, Column, MapSpec, Task, TaskOutput, TileInput


def make_kernel(spec: str) -> np.ndarray | None:
    """Detection filter from a short spec: ``default`` (sep's 3x3), ``none``, ``gauss:FWHM``, ``tophat:R``."""
    s = spec.strip().lower()
    if s == "none":
        return None
    if s == "default":
        return np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
    m = re.fullmatch(r"(gauss|tophat):([0-9.]+)", s)
    if not m:
        raise ValueError(spec)
    size = float(m.group(2))
    r = int(np.ceil(size * 1.5)) if m.group(1) == "gauss" else int(np.ceil(size))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    if m.group(1) == "gauss":
        sigma = size / 2.3548
        return np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return ((xx ** 2 + yy ** 2) <= size ** 2).astype(np.float32)


def validate_extract_params(cfg) -> None:
    """Checks shared by every config that drives ``run_extract`` (sep, clumps_sep)."""
    w = cfg.stage_name
    require(cfg.halo >= 0, w, "halo", cfg.halo, "must be >= 0 pixels.")
    require(cfg.thresh > 0, w, "thresh", cfg.thresh, "must be > 0 (units of the background RMS).")
    require(cfg.minarea >= 1, w, "minarea", cfg.minarea, "must be >= 1 pixel.")
    require(cfg.filter_type in ("matched", "conv"), w, "filter_type", cfg.filter_type, "use 'matched' or 'conv'.")
    try:
        make_kernel(cfg.filter_kernel)
    except ValueError:
        require(False, w, "filter_kernel", cfg.filter_kernel,
                "use 'default', 'none', 'gauss:FWHM' (e.g. gauss:3.0) or 'tophat:R'.")
    require(0 <= cfg.deblend_cont <= 1, w, "deblend_cont", cfg.deblend_cont, "must be in [0, 1].")
    require(cfg.pixstack >= 0, w, "pixstack", cfg.pixstack, "must be >= 0 (0 = automatic).")
    require(cfg.sub_object_limit >= 1, w, "sub_object_limit", cfg.sub_object_limit, "must be >= 1.")


@dataclass(frozen=True)
class SepConfig:
    """Settings of the ``sep`` stage; detection parameters keep sep.extract's own names."""

    stage_name = "sep"
    halo: int = field(64, "Pixels of context around each tile core; objects larger than this are flagged.")
    thresh: float = field(1.5, "Detection threshold in units of the global background RMS.")
    minarea: int = field(5, "Minimum number of pixels above threshold for an object.")
    filter_kernel: str = field("default", "Detection filter: 'default' (sep's 3x3), 'none', 'gauss:FWHM', 'tophat:R'.")
    filter_type: str = field("matched", "sep filter_type: 'matched' or 'conv'.")
    deblend_nthresh: int = field(32, "Number of deblending thresholds.")
    deblend_cont: float = field(0.005, "Minimum contrast ratio for deblending (1.0 switches deblending off).")
    clean: bool = field(True, "Clean spurious detections near bright objects.")
    clean_param: float = field(1.0, "Cleaning parameter.")
    back_size: int = field(64, "Background mesh size in pixels (meshes aligned to the mosaic).")
    back_filter_size: int = field(3, "Median filter size over background meshes.")
    back_filter_thresh: float = field(0.0, "Filter a mesh only if it differs from the median by this much.")
    back_mask_objects: int = field(
        0, "Object-masked background: > 0 measures the meshes a second time without the objects found "
           "against the first model (footprints above thresh with minarea px, grown by this many px; 8 is "
           "typical). 0 = SExtractor's single pass, whose sky takes up the galaxies' faint wings.")
    kron_factor: float = field(2.5, "Kron factor k of the AUTO aperture (SExtractor PHOT_AUTOPARAMS[0]).")
    kron_min_radius: float = field(3.5, "Minimum AUTO aperture radius in units of a, b "
                                        "(SExtractor PHOT_AUTOPARAMS[1]).")
    aper_radius: float = field(5.0, "Radius of the fixed circular aperture for flux_aper, pixels.")
    gain: float | None = field(None, "Gain (e-/ADU) for the Poisson term of flux_err; None: background only.")
    pixstack: int = field(0, "Active-pixel buffer of sep.extract; 0 sizes it for the tile window.")
    sub_object_limit: int = field(1024, "Deblending sub-object limit; on overflow the object is flagged.")

    def validate(self):
        w = self.stage_name
        validate_extract_params(self)
        require(self.deblend_nthresh >= 1, w, "deblend_nthresh", self.deblend_nthresh, "must be >= 1.")
        require(self.back_size >= 8, w, "back_size", self.back_size, "must be >= 8 pixels (64 is typical).")
        require(self.back_filter_size >= 1 and self.back_filter_size % 2 == 1, w, "back_filter_size",
                self.back_filter_size, "must be an odd number >= 1.")
        require(isinstance(self.back_mask_objects, int) and 0 <= self.back_mask_objects <= 64, w,
                "back_mask_objects", self.back_mask_objects, "an integer number of px in [0, 64], e.g. 8 (0 = off).")
        require(self.kron_factor > 0, w, "kron_factor", self.kron_factor, "must be > 0.")
        require(self.kron_min_radius >= 0, w, "kron_min_radius", self.kron_min_radius, "must be >= 0.")
        require(self.aper_radius > 0, w, "aper_radius", self.aper_radius, "must be > 0 pixels.")
        require(self.gain is None or self.gain > 0, w, "gain", self.gain, "must be > 0 or None.")


SOURCE_COLUMNS = {
    "x": Column("f8", "pix", "centroid x, 0-based mosaic pixels (pixel i spans [i-0.5, i+0.5))"),
    "y": Column("f8", "pix", "centroid y, 0-based mosaic pixels"),
    "flux": Column("f8", "", "Kron (AUTO) flux, background subtracted, image units"),
    "flux_err": Column("f8", "", "1-sigma error of flux"),
    "flux_aper": Column("f8", "", "flux in a circular aperture of radius aper_radius"),
    "kron_radius": Column("f8", "", "Kron radius k*r1 in units of a and b (SExtractor's KRON_RADIUS)"),
    "a": Column("f8", "pix", "semi-major axis (second moments)"),
    "b": Column("f8", "pix", "semi-minor axis (second moments)"),
    "theta": Column("f8", "rad", "position angle, counter-clockwise from +x"),
    "npix": Column("i8", "pix2", "pixels above threshold in the footprint"),
    "peak": Column("f8", "", "peak value of the background-subtracted image"),
    "flags": Column("i8", "", "sep bits 0-7, pipeline bits 8+ (see README)"),
}

SEGMENTATION = {"segmentation": MapSpec("int64", "label", "catalog id of each pixel's object, 0 = sky")}
BACKGROUND = {"background": MapSpec("float32", "value", "global background model (sky level), image units")}


def aperture_leaves_window(shape, x, y, a, b, theta, r, at_mosaic_edge=(True, True, True, True)):
    """True where the ellipse ``r*(a, b, theta)`` around ``(x, y)`` crosses a window edge inside the mosaic.

    Such a measurement would change with a larger halo; the pipeline flags it ``FLAG_TILE_TRUNCATED``.
    ``at_mosaic_edge`` is (top, bottom, left, right): edges that are the mosaic's own are not counted.
    """
    A, B = r * a, r * b
    hx = np.sqrt((A * np.cos(theta)) ** 2 + (B * np.sin(theta)) ** 2)
    hy = np.sqrt((A * np.sin(theta)) ** 2 + (B * np.cos(theta)) ** 2)
    top, bottom, left, right = at_mosaic_edge
    ny, nx = shape
    out = np.zeros(len(x), bool)
    if not top:
        out |= y - hy < -0.5
    if not bottom:
        out |= y + hy > ny - 0.5
    if not left:
        out |= x - hx < -0.5
    if not right:
        out |= x + hx > nx - 0.5
    return out


def photometry(data, mask, rms, x, y, a, b, theta, cfg, flags, at_mosaic_edge=(True, True, True, True)):
    """Kron (AUTO) and circular-aperture photometry with sep, SExtractor's rules for small objects.

    Returns a dict of catalog columns (``flux``, ``flux_err``, ``flux_aper``, ``kron_radius``) and updates
    ``flags`` in place with sep's photometry flags.
    """
    n = len(x)
    if n == 0:
        z = np.zeros(0)
        return {"flux": z, "flux_err": z, "flux_aper": z, "kron_radius": z}
    a = np.maximum(a, 1e-3)
    b = np.maximum(b, 1e-3)
    theta = np.clip(theta, -np.pi / 2, np.pi / 2)
    kr, kflag = sep.kron_radius(data, x, y, a, b, theta, 6.0, mask=mask)
    # SExtractor's AUTO aperture: k * r1 in units of (a, b), never below the minimum radius
    r_aper = np.where(np.isfinite(kr) & (kr > 0), cfg.kron_factor * kr, 0.0)
    r_aper = np.maximum(r_aper, cfg.kron_min_radius)
    flux = np.zeros(n)
    ferr = np.zeros(n)
    fflag = np.zeros(n, np.int64)
    ok = r_aper > 0
    if ok.any():
        flux[ok], ferr[ok], fflag[ok] = sep.sum_ellipse(data, x[ok], y[ok], a[ok], b[ok], theta[ok], r_aper[ok],
                                                        err=rms, mask=mask, gain=cfg.gain, subpix=1)
    ap, _, aflag = sep.sum_circle(data, x, y, cfg.aper_radius, err=rms, mask=mask, gain=cfg.gain, subpix=5)
    flags |= kflag.astype(np.int64) | fflag.astype(np.int64) | aflag.astype(np.int64)
    # the Kron radius is measured within 6 a; the AUTO and fixed apertures must fit the window too
    r = np.maximum(6.0, r_aper)
    leaves = aperture_leaves_window(data.shape, x, y, a, b, theta, r, at_mosaic_edge)
    leaves |= aperture_leaves_window(data.shape, x, y, 1.0, 1.0, 0.0, cfg.aper_radius, at_mosaic_edge)
    flags[leaves] |= FLAG_TILE_TRUNCATED
    return {"flux": flux, "flux_err": ferr, "flux_aper": ap, "kron_radius": cfg.kron_factor * kr}


def run_extract(data, mask, err, cfg, kernel, **overrides):
    """sep.extract with buffers sized for the window; never dies on "buffer full".

    Returns ``(objects, segmentation, extra_flags, notes)``: on a sub-object overflow the extraction is
    repeated without deblending and every object is flagged ``FLAG_BUFFER``.
    """
    params = dict(thresh=cfg.thresh, err=err, mask=mask, minarea=cfg.minarea, filter_kernel=kernel,
                  filter_type=cfg.filter_type, deblend_nthresh=cfg.deblend_nthresh,
                  deblend_cont=cfg.deblend_cont, clean=cfg.clean, clean_param=cfg.clean_param,
                  segmentation_map=True)
    params.update(overrides)
    # sep's limits are per process; our workers run one tile at a time, so setting them per call is safe
    stack = cfg.pixstack or max(300_000, data.size)
    sep.set_sub_object_limit(cfg.sub_object_limit)
    notes, extra = [], 0
    for _ in range(6):
        sep.set_extract_pixstack(int(stack))
        try:
            objs, seg = sep.extract(data, **params)
            return objs, seg, extra, notes
        except Exception as e:  # sep raises plain Exception with its C message
            msg = str(e)
            if "pixel buffer full" in msg:
                stack *= 4
                notes.append(f"sep pixel buffer raised to {stack}")
                continue
            if "deblending overflow" in msg or "sub-object" in msg:
                notes.append("deblending overflow: extracted again without deblending, objects flagged")
                params["deblend_cont"] = 1.0
                params["deblend_nthresh"] = 1  # no sub-thresholds at all: the tree cannot overflow
                extra = FLAG_BUFFER
                continue
            raise
    raise RuntimeError(f"sep.extract kept failing on a {data.shape} window; raise sep.pixstack.")


class SepTask(Task):
    """SExtractor-like detection with sep (the baseline every survey compares against)."""

    name = "sep"
    Config = SepConfig
    columns = SOURCE_COLUMNS
    maps = {**SEGMENTATION, **BACKGROUND}

    def run(self, tile: TileInput) -> TaskOutput:
        cfg = self.config
        data = tile.data
        mask = tile.mask
        if mask.all():
            out = self.empty_output(data.shape)
            out.maps["background"] = tile.background
            return out
        objs, seg, extra, notes = run_extract(data, mask, tile.global_rms, cfg, make_kernel(cfg.filter_kernel))
        flags = objs["flag"].astype(np.int64) | extra
        phot = photometry(data, mask, tile.rms, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"],
                          cfg, flags, tile.at_mosaic_edge)
        cat = {
            "x": objs["x"].astype(np.float64), "y": objs["y"].astype(np.float64),
            **phot,
            "a": objs["a"].astype(np.float64), "b": objs["b"].astype(np.float64),
            "theta": objs["theta"].astype(np.float64), "npix": objs["npix"].astype(np.int64),
            "peak": objs["peak"].astype(np.float64), "flags": flags,
        }
        return TaskOutput(maps={"segmentation": seg.astype(np.int64), "background": tile.background},
                          catalog=cat, notes=notes)
