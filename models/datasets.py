"""Seeded, reproducible simulated training sets for the three neural stages: clumps, blends and fields.

Everything here is numpy + GalSim (torch only for the optional :class:`TrainingStream` wrapper) and uses the
conventions of :mod:`deepmosaic.pipeline.simulate`: arrays ``[y, x]``, 0-based pixel coordinates with pixel
``i`` spanning ``[i - 0.5, i + 0.5)``, angles in degrees counter-clockwise from +x, profiles truncated as in
the mosaic simulator (Sersic at 5 half-light radii, Moffat PSF at 5 FWHM), PSF convolution and pixel
integration by GalSim's FFT path (:func:`~deepmosaic.pipeline.simulate.render_profile`).

The three sets
--------------
``clumps`` (:class:`ClumpSetConfig`)
    64 x 64 disk galaxies (Sersic or bulge + disk) holding 0..``max_clumps`` unresolved clumps (PSF-shaped
    point sources) at known positions and fluxes; a fraction of galaxies carry a smooth, resolved, compact
    nucleus at their centre as a decoy (it is not a clump and is not in the mask). Target: a binary mask of
    discs of radius ``mask_radius`` px around every clump.
``blends`` (:class:`BlendSetConfig`)
    96 x 96 pairs: a central galaxy at the stamp centre (+- ``center_jitter`` px) and a companion at a
    separation drawn densely at small separations (0.5-6 PSF FWHM by default, log-uniform), 0-3 mag fainter.
    Targets: two truth masks by the 1-sigma "largest light wins" rule (disjoint), the two ``visible`` masks
    (each galaxy's own light > 1 sigma, overlapping), the two isolated noise-free images, peaks, fluxes.
``fields`` (:class:`FieldSetConfig`)
    96 x 96 crops of star + galaxy fields (density, PSF and noise drawn per crop, extra close pairs), with a
    per-object catalog (boxes, class, S/N, flux) and CenterNet-style dense targets (class heatmaps, ignore
    mask, box size, sub-pixel offset, regression mask).

Units and normalisation
-----------------------
Every ``image`` is ``(noise-free light + Gaussian noise) / noise_sigma``: pixel noise has unit variance and
the 1-sigma truth rule becomes "light > 1". All light-like outputs (``model``, ``isolated``, ``flux``,
``clump_flux``) are in the same units (counts / noise sigma); ``noise_sigma`` (counts) is returned per stamp
for the fields set, where magnitudes are defined; the clumps and blends sets are specified directly by S/N
and use ``noise_sigma = 1``. There is no sky: images are background subtracted.

S/N definitions (all background-limited, no object shot noise):

* object S/N (galaxies, stars, blend members, clump hosts): matched-filter S/N of the object alone,
  ``sqrt(sum(I**2)) / sigma`` over its noise-free image ``I`` (over the stamp for clumps and blends; over
  the object's own full rendering for fields), as ``snr`` in :func:`deepmosaic.pipeline.simulate.simulate_mosaic`.
* clump S/N: ``clump_flux / (sigma * sqrt(A_eff))`` with ``A_eff = 1 / sum(p**2)`` the effective area (px) of
  the stamp's pixel-integrated, unit-sum PSF ``p`` drawn at a pixel centre. This is the matched-filter S/N of
  the clump on a flat background; the host galaxy's light under the clump is not counted.

Seeds and splits
----------------
Stamp ``i`` of ``(kind, seed, split)`` has its own random stream, ``numpy.random.SeedSequence(seed,
spawn_key=(KIND_KEYS[kind], SPLITS[split], i))``, split into two children: one for the scene parameters
and one for the noise. So a batch is a pure function of ``(config, seed, n, split, start)``; stamp ``i`` is the
same whatever batch it lands in (``make_batch(..., n=8)[:4] == make_batch(..., n=4)``); and different seeds,
kinds, splits ('train' = 0, 'val' = 1, 'test' = 2) or stamp indices have distinct spawn keys, i.e. independent
streams: a held-out split never repeats a training draw. Use ``start`` to walk an endless, non-repeating
sequence: batch ``b`` of size ``n`` is ``start = b * n``. The config is not hashed into the seed: changing a
range changes what the same draws map to.

Speed and the stamp pool
------------------------
Rendering costs one GalSim FFT draw per object (plus one for the PSF's effective area): measured on one core
of a shared 2-core machine, ~2.5 ms per clump stamp (~400/s), ~3-4 ms per blend (~280-400/s) and ~30-55 ms
per field crop (~20-30/s: ~55 objects with the margin), after GalSim has built its table for each Sersic
index used (a one-off ~1 s per process; see :func:`throughput`). When that is too slow for training, a
:class:`StampPool` renders ``size`` noise-free scenes once (the same scenes as ``make_batch`` stamps
``0..size-1``) and serves batches of randomly chosen scenes under a random one of the 8 flips/rotations of the
square, with fresh noise each time; all targets are recomputed from the transformed truth, so nothing is
reused but the noise-free light. Thousands of stamps per second.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import galsim
import numpy as np

from deepmosaic.pipeline.config import field, from_mapping, require, to_dict
from deepmosaic.pipeline.simulate import (SERSIC_N_STEP, SeparationGrid, _galaxy_extent, bulge_disk_radii,
                                        clump_flags, galaxy_profile, in_ellipse, make_psf, place_clumps,
                                        render_profile)

try:  # torch is a project dependency, but the generators themselves never need it
    import torch
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover
    torch = None
    _IterableDataset = object

#: Split name -> spawn-key component; streams of different splits are disjoint.
SPLITS = {"train": 0, "val": 1, "test": 2}
#: Training-set kind -> spawn-key component.
KIND_KEYS = {"clumps": 1, "blends": 2, "fields": 3}
#: Moffat beta is drawn on a grid of this step so the unit PSF (and GalSim's tables) are reused.
PSF_BETA_STEP = 0.5
#: Bulge fraction and bulge/disk size ratio are drawn on a grid of this step (cached radius solutions).
BULGE_STEP = 0.05
#: spawn-key component that marks a StampPool's batch streams (far from any stamp index).
_POOL_KEY = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------

def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _num(w, name, v, lo, hi, fix):
    require(_is_num(v) and lo <= v <= hi, w, name, v, f"expected a number in [{lo}, {hi}]: {fix}")


def _int(w, name, v, lo, hi, fix):
    require(_is_int(v) and lo <= v <= hi, w, name, v, f"expected an integer in [{lo}, {hi}]: {fix}")


def _rng_pair(w, name, v, lo, hi, fix):
    require(isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_num(x) for x in v)
            and lo <= v[0] <= v[1] <= hi, w, name, v,
            f"expected (low, high) with {lo} <= low <= high <= {hi}: {fix}")


def _validate_common(cfg, w: str, min_size: int) -> None:
    _int(w, "size", cfg.size, min_size, 1024, f"the stamp side in px, e.g. size={cfg.size}.")
    _num(w, "pixel_scale", cfg.pixel_scale, 1e-4, 100.0, "arcsec per px, e.g. 0.2 (LSST-like).")
    _rng_pair(w, "psf_fwhm_range", cfg.psf_fwhm_range, 1e-6, 100.0, "PSF FWHM in arcsec, e.g. (0.5, 1.0).")
    fwhm_px = cfg.psf_fwhm_range[0] / cfg.pixel_scale
    require(fwhm_px >= 1.0, w, "psf_fwhm_range", cfg.psf_fwhm_range,
            f"the PSF must be at least 1 px wide (pixel_scale={cfg.pixel_scale} arcsec/px).")
    require(cfg.psf_fwhm_range[1] / cfg.pixel_scale <= cfg.size / 8, w, "psf_fwhm_range", cfg.psf_fwhm_range,
            f"the PSF is too wide for a {cfg.size} px stamp: keep FWHM <= size / 8 px.")
    _rng_pair(w, "psf_beta_range", cfg.psf_beta_range, 1.5, 20.0, "Moffat beta, e.g. (2.5, 4.5).")
    _rng_pair(w, "sersic_n_range", cfg.sersic_n_range, 0.3, 6.2, "Sersic indices within GalSim's [0.3, 6.2].")
    _rng_pair(w, "hlr_range", cfg.hlr_range, 1e-4, 1e3, "half-light radii in arcsec, e.g. (0.3, 1.5).")
    require(cfg.hlr_range[0] > 0, w, "hlr_range", cfg.hlr_range, "radii must be > 0.")
    _rng_pair(w, "q_range", cfg.q_range, 0.05, 1.0, "axis ratios b/a in [0.05, 1].")
    _num(w, "bulge_disk_fraction", cfg.bulge_disk_fraction, 0.0, 1.0, "a fraction in [0, 1].")
    _rng_pair(w, "bulge_frac_range", cfg.bulge_frac_range, 0.0, 0.95, "bulge flux fractions, e.g. (0.1, 0.7).")
    _rng_pair(w, "bulge_hlr_ratio_range", cfg.bulge_hlr_ratio_range, 0.05, 1.0,
              "bulge hlr / disk hlr, e.g. (0.2, 0.6).")


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClumpSetConfig:
    """Clumpy galaxy stamps for the clump segmentation U-Net. Frozen; :meth:`validate` checks every field."""

    size: int = field(64, "Stamp side in px (square stamps).")
    pixel_scale: float = field(0.2, "Pixel scale in arcsec/px (LSST-like 0.2).")
    psf_fwhm_range: tuple[float, float] = field(
        (0.5, 0.9), "PSF FWHM range in arcsec (Moffat), drawn uniformly per stamp.")
    psf_beta_range: tuple[float, float] = field(
        (2.5, 4.5), "Moffat beta range, drawn per stamp on a 0.5 grid.")
    galaxy_snr_range: tuple[float, float] = field(
        (50.0, 1500.0), "Matched-filter S/N of the host galaxy (disk + nucleus, no clumps), log-uniform.")
    hlr_range: tuple[float, float] = field(
        (0.8, 2.4), "Host half-light radius range in arcsec (log-uniform); clumps need a resolved disk.")
    sersic_n_range: tuple[float, float] = field(
        (0.5, 2.0), "Sersic index range of pure-Sersic hosts (0.05 grid).")
    q_range: tuple[float, float] = field((0.3, 1.0), "Host axis ratio b/a range (uniform).")
    bulge_disk_fraction: float = field(0.2, "Fraction of hosts drawn as bulge (n=4) + disk (n=1).")
    bulge_frac_range: tuple[float, float] = field((0.1, 0.5), "Bulge flux fraction range of bulge + disk hosts.")
    bulge_hlr_ratio_range: tuple[float, float] = field(
        (0.2, 0.6), "Bulge hlr / disk hlr range of bulge + disk hosts.")
    center_jitter: float = field(1.0, "Host centre = stamp centre (size-1)/2 + uniform(-j, j) px per axis.")
    max_clumps: int = field(7, "Clump count per stamp is uniform on 0..max_clumps (fewer when they do not fit).")
    clump_snr_range: tuple[float, float] = field(
        (3.0, 100.0), "Clump S/N = flux / (sigma sqrt(A_eff)) range, log-uniform per clump.")
    clump_region_hlr: float = field(
        1.5, "Clumps are uniform (by area) inside the host's half-light ellipse scaled by this factor.")
    min_clump_separation: float = field(
        6.0, "Minimum distance (px) between clumps, so that mask discs stay apart (keep >= 2 * mask_radius).")
    edge_margin: float = field(6.0, "Clump centres stay at least this far (px) from the stamp edges.")
    mask_radius: float = field(
        2.5, "Target disc radius (px): mask pixels whose centre is within this distance of a clump centre.")
    nucleus_fraction: float = field(0.3, "Fraction of hosts with a smooth compact nucleus (a decoy, not a clump).")
    nucleus_flux_range: tuple[float, float] = field(
        (0.05, 0.3), "Nucleus share of the host's flux, uniform.")
    nucleus_hlr_range: tuple[float, float] = field(
        (0.15, 0.4), "Nucleus half-light radius in arcsec (log-uniform): resolved, unlike a clump.")
    nucleus_sersic_n_range: tuple[float, float] = field((1.0, 2.5), "Nucleus Sersic index range.")
    layout: str = field(
        "stamp", "'stamp': one host at the stamp centre (the fields below are unused); 'canvas': a piece of "
                 "mosaic: 0..N hosts anywhere (cut by the edges too), close clump pairs, clumps on bulges, "
                 "stars and compact galaxies on the sky as decoys (see _clump_canvas_scene); 'mosaic': a crop "
                 "of a small mosaic from the mosaic simulator itself (its ordinary galaxies and stars anywhere, "
                 "on the hosts too; see _clump_mosaic_scene).")
    hosts_range: tuple[int, int] = field((1, 3), "canvas: number of clumpy hosts when not empty (uniform).")
    host_clumps_range: tuple[int, int] = field(
        (0, 7), "canvas: clumps drawn per host (uniform; close companions come on top); max_clumps caps the "
                "canvas total.")
    empty_fraction: float = field(0.1, "canvas: fraction of canvases with no host (sky + decoys only).")
    host_margin: float = field(0.1, "canvas: host centres are uniform over the canvas widened by this fraction "
                                    "of its side on every side (hosts cut by the edge).")
    pair_fraction: float = field(0.3, "canvas: each placed clump gets a close companion with this probability.")
    pair_separation_fwhm_range: tuple[float, float] = field(
        (2.0, 3.0), "canvas: companion distance in PSF FWHM (uniform); never below min_clump_separation px.")
    bulge_clump_fraction: float = field(
        0.3, "canvas: on bulge + disk hosts, this fraction of the clumps sits inside the bulge's half-light "
             "ellipse (clumps on a bulge).")
    stars_range: tuple[int, int] = field((0, 4), "canvas: stars per canvas (decoys on the sky, uniform count).")
    compact_range: tuple[int, int] = field(
        (0, 4), "canvas: small smooth galaxies per canvas (decoys on the sky, uniform count).")
    compact_hlr_range: tuple[float, float] = field(
        (0.15, 1.0), "canvas: decoy galaxy half-light radius in arcsec (log-uniform; Sersic n over (0.5, 4)).")
    decoy_snr_range: tuple[float, float] = field(
        (5.0, 1000.0), "canvas: matched-filter S/N of each decoy star or galaxy (log-uniform).")
    decoy_max_host_light: float = field(
        0.5, "canvas: decoys are only placed where the hosts' noise-free light is below this (noise sigma), "
             "so a star is never indistinguishable from a clump.")
    mosaic_density_range: tuple[float, float] = field(
        (150.0, 450.0), "mosaic: ordinary objects (galaxies and stars, the mosaic simulator's population) per "
                        "Mpix, uniform per scene.")
    mosaic_clumpy_range: tuple[float, float] = field(
        (40.0, 120.0), "mosaic: clumpy hosts per Mpix, uniform per scene.")
    mosaic_pad: int = field(
        32, "mosaic: the scene is simulated this many px wider on every side and cropped, so that objects "
            "centred outside the crop still spill light into it.")

    def validate(self) -> "ClumpSetConfig":
        """Check every field; raise :class:`~deepmosaic.pipeline.errors.ConfigError` naming the first bad one."""
        w = "clumps"
        _validate_common(self, w, 16)
        _rng_pair(w, "galaxy_snr_range", self.galaxy_snr_range, 1e-3, 1e7, "e.g. (50, 1500).")
        _num(w, "center_jitter", self.center_jitter, 0.0, self.size / 4, "px, e.g. 1.0.")
        _int(w, "max_clumps", self.max_clumps, 0, 64, "e.g. max_clumps=7.")
        _rng_pair(w, "clump_snr_range", self.clump_snr_range, 1e-3, 1e6, "e.g. (3, 100).")
        require(self.clump_snr_range[0] > 0, w, "clump_snr_range", self.clump_snr_range, "S/N must be > 0.")
        _num(w, "clump_region_hlr", self.clump_region_hlr, 0.05, 10.0, "half-light radii, e.g. 1.5.")
        _num(w, "min_clump_separation", self.min_clump_separation, 0.0, self.size / 2, "px, e.g. 6.")
        _num(w, "edge_margin", self.edge_margin, 0.0, self.size / 2 - 1, "px, e.g. 6.")
        _num(w, "mask_radius", self.mask_radius, 0.5, self.size / 4, "px, e.g. 2.5.")
        require(self.min_clump_separation >= 2 * self.mask_radius, w, "min_clump_separation",
                self.min_clump_separation, f"keep it >= 2 * mask_radius = {2 * self.mask_radius} px so that the "
                "target discs of neighbouring clumps stay apart.")
        _num(w, "nucleus_fraction", self.nucleus_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _rng_pair(w, "nucleus_flux_range", self.nucleus_flux_range, 0.0, 0.95, "flux shares, e.g. (0.05, 0.3).")
        _rng_pair(w, "nucleus_hlr_range", self.nucleus_hlr_range, 1e-4, 100.0, "arcsec, e.g. (0.15, 0.4).")
        require(self.nucleus_hlr_range[0] > 0, w, "nucleus_hlr_range", self.nucleus_hlr_range, "must be > 0.")
        _rng_pair(w, "nucleus_sersic_n_range", self.nucleus_sersic_n_range, 0.3, 6.2, "e.g. (1, 2.5).")
        require(self.layout in ("stamp", "canvas", "mosaic"), w, "layout", self.layout,
                "use 'stamp', 'canvas' or 'mosaic'.")
        _rng_pair(w, "mosaic_density_range", self.mosaic_density_range, 0.0, 1e4, "objects per Mpix, e.g. "
                  "(150, 450).")
        _rng_pair(w, "mosaic_clumpy_range", self.mosaic_clumpy_range, 0.0, 1e4, "hosts per Mpix, e.g. (40, 120).")
        _int(w, "mosaic_pad", self.mosaic_pad, 0, 1024, "px, e.g. 32.")
        for name in ("hosts_range", "host_clumps_range", "stars_range", "compact_range"):
            v = getattr(self, name)
            require(isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v)
                    and 0 <= v[0] <= v[1] <= 64, w, name, v, "expected integer counts (low, high), 0 <= low <= "
                    "high <= 64, e.g. (0, 4).")
        _num(w, "empty_fraction", self.empty_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _num(w, "host_margin", self.host_margin, 0.0, 1.0, "a fraction of the side, e.g. 0.1.")
        _num(w, "pair_fraction", self.pair_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _rng_pair(w, "pair_separation_fwhm_range", self.pair_separation_fwhm_range, 0.0, 100.0, "e.g. (2, 3).")
        _num(w, "bulge_clump_fraction", self.bulge_clump_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _rng_pair(w, "compact_hlr_range", self.compact_hlr_range, 1e-3, 100.0, "arcsec, e.g. (0.15, 1.0).")
        _rng_pair(w, "decoy_snr_range", self.decoy_snr_range, 1e-3, 1e7, "e.g. (5, 1000).")
        _num(w, "decoy_max_host_light", self.decoy_max_host_light, 0.0, 1e6, "noise sigma, e.g. 0.5.")
        return self


@dataclass(frozen=True)
class BlendSetConfig:
    """Blended galaxy pairs for the deblending U-Net. Frozen; :meth:`validate` checks every field."""

    size: int = field(96, "Stamp side in px (square stamps).")
    pixel_scale: float = field(0.2, "Pixel scale in arcsec/px (LSST-like 0.2).")
    psf_fwhm_range: tuple[float, float] = field(
        (0.5, 1.0), "PSF FWHM range in arcsec (Moffat), drawn uniformly per stamp.")
    psf_beta_range: tuple[float, float] = field(
        (2.5, 4.5), "Moffat beta range, drawn per stamp on a 0.5 grid.")
    central_snr_range: tuple[float, float] = field(
        (20.0, 500.0), "Matched-filter S/N of the central galaxy alone, log-uniform.")
    delta_mag_range: tuple[float, float] = field(
        (0.0, 3.0), "Companion magnitude minus central magnitude (companion fainter), uniform.")
    hlr_range: tuple[float, float] = field(
        (0.2, 1.5), "Half-light radius range in arcsec (log-uniform), drawn independently for both galaxies.")
    sersic_n_range: tuple[float, float] = field((0.5, 4.0), "Sersic index range of pure-Sersic galaxies.")
    q_range: tuple[float, float] = field((0.3, 1.0), "Axis ratio b/a range (uniform).")
    bulge_disk_fraction: float = field(0.3, "Fraction of galaxies drawn as bulge (n=4) + disk (n=1).")
    bulge_frac_range: tuple[float, float] = field((0.1, 0.7), "Bulge flux fraction range of bulge + disk galaxies.")
    bulge_hlr_ratio_range: tuple[float, float] = field(
        (0.2, 0.6), "Bulge hlr / disk hlr range of bulge + disk galaxies.")
    center_jitter: float = field(1.0, "Central centre = stamp centre (size-1)/2 + uniform(-j, j) px per axis.")
    separation_fwhm_range: tuple[float, float] = field(
        (0.5, 6.0), "Centre-to-centre separation range in units of the stamp's PSF FWHM.")
    separation_sampling: str = field(
        "log", "How separations are drawn on that range: 'log' (log-uniform, dense at small separations), "
               "'sqrt' (uniform in sqrt(separation)) or 'linear' (uniform).")

    def validate(self) -> "BlendSetConfig":
        """Check every field; raise :class:`~deepmosaic.pipeline.errors.ConfigError` naming the first bad one."""
        w = "blends"
        _validate_common(self, w, 16)
        _rng_pair(w, "central_snr_range", self.central_snr_range, 1e-3, 1e7, "e.g. (20, 500).")
        _rng_pair(w, "delta_mag_range", self.delta_mag_range, -10.0, 10.0, "magnitudes, e.g. (0, 3).")
        _num(w, "center_jitter", self.center_jitter, 0.0, self.size / 4, "px, e.g. 1.0.")
        _rng_pair(w, "separation_fwhm_range", self.separation_fwhm_range, 0.0, 1e3, "PSF FWHM, e.g. (0.5, 6).")
        require(self.separation_sampling in ("log", "sqrt", "linear"), w, "separation_sampling",
                self.separation_sampling, "use 'log', 'sqrt' or 'linear'.")
        require(self.separation_sampling == "linear" or self.separation_fwhm_range[0] > 0, w,
                "separation_fwhm_range", self.separation_fwhm_range,
                f"the low end must be > 0 with separation_sampling={self.separation_sampling!r}.")
        max_sep = self.separation_fwhm_range[1] * self.psf_fwhm_range[1] / self.pixel_scale
        require(max_sep + self.center_jitter <= self.size / 2 - 2, w, "separation_fwhm_range",
                self.separation_fwhm_range,
                f"the widest pair ({max_sep:.1f} px at the widest PSF) leaves a {self.size} px stamp: "
                "lower the range or raise size.")
        return self


@dataclass(frozen=True)
class FieldSetConfig:
    """Crops of star + galaxy fields for the centre-heatmap detector. Frozen; :meth:`validate` checks it."""

    size: int = field(96, "Crop side in px (square crops).")
    pixel_scale: float = field(0.2, "Pixel scale in arcsec/px (LSST-like 0.2).")
    psf_fwhm_range: tuple[float, float] = field(
        (0.5, 1.0), "PSF FWHM range in arcsec (Moffat), drawn uniformly per crop.")
    psf_beta_range: tuple[float, float] = field((2.5, 4.5), "Moffat beta range, drawn per crop on a 0.5 grid.")
    noise_sigma_range: tuple[float, float] = field(
        (2.0, 10.0), "Gaussian pixel noise sigma range in counts, log-uniform per crop.")
    zeropoint: float = field(30.0, "mag = zeropoint - 2.5 log10(flux in counts).")
    mag_range: tuple[float, float] = field((18.0, 26.0), "Magnitude range (bright, faint) of the objects.")
    mag_slope: float = field(0.3, "d log10 N / d mag of the magnitude distribution (0 = uniform).")
    density_range: tuple[float, float] = field(
        (1000.0, 6000.0), "Mean objects per Mpix (before pairs), log-uniform per crop; the count is Poisson.")
    star_fraction_range: tuple[float, float] = field(
        (0.1, 0.4), "Fraction of stars, uniform per crop.")
    hlr_range: tuple[float, float] = field((0.2, 1.5), "Galaxy half-light radius range in arcsec (log-uniform).")
    sersic_n_range: tuple[float, float] = field((0.5, 4.0), "Sersic index range of pure-Sersic galaxies.")
    q_range: tuple[float, float] = field((0.3, 1.0), "Galaxy axis ratio b/a range (uniform).")
    bulge_disk_fraction: float = field(0.3, "Fraction of galaxies drawn as bulge (n=4) + disk (n=1).")
    bulge_frac_range: tuple[float, float] = field((0.1, 0.7), "Bulge flux fraction range of bulge + disk galaxies.")
    bulge_hlr_ratio_range: tuple[float, float] = field(
        (0.2, 0.6), "Bulge hlr / disk hlr range of bulge + disk galaxies.")
    pair_fraction: float = field(
        0.2, "Each object gets an extra close companion (independent class, magnitude, shape) with this "
             "probability.")
    pair_separation_fwhm_range: tuple[float, float] = field(
        (0.5, 2.5), "Separation of those companions in PSF FWHM (uniform).")
    margin: int = field(
        16, "Objects are placed over the crop plus this many px on each side, so light crosses the edges; "
            "only objects centred inside the crop are in the catalog and the targets.")
    max_objects: int = field(
        160, "Length of the padded per-object arrays; objects centred in the crop beyond it are not drawn.")
    max_stamp_radius: int = field(64, "Cap (px) on the half-size of each object's own rendering.")
    detect_snr: float = field(4.0, "Objects with S/N >= this get a heatmap peak and regression targets.")
    ignore_snr: float = field(
        1.5, "Objects with ignore_snr <= S/N < detect_snr are masked out of the loss (the `ignore` target).")
    heatmap_sigma: float = field(1.0, "Sigma (px) of the Gaussian heatmap peak at each centre pixel.")
    ignore_radius: float = field(2.0, "Radius (px) of the ignore disc around a faint object's centre pixel.")

    def validate(self) -> "FieldSetConfig":
        """Check every field; raise :class:`~deepmosaic.pipeline.errors.ConfigError` naming the first bad one."""
        w = "fields"
        _validate_common(self, w, 16)
        _rng_pair(w, "noise_sigma_range", self.noise_sigma_range, 1e-9, 1e9, "counts, e.g. (2, 10).")
        require(self.noise_sigma_range[0] > 0, w, "noise_sigma_range", self.noise_sigma_range,
                "must be > 0: truth masks are cut at 1 sigma.")
        _num(w, "zeropoint", self.zeropoint, -100.0, 100.0, "a magnitude, e.g. 30.")
        _rng_pair(w, "mag_range", self.mag_range, -50.0, 100.0, "magnitudes (bright, faint), e.g. (18, 26).")
        _num(w, "mag_slope", self.mag_slope, -2.0, 2.0, "e.g. 0.3.")
        _rng_pair(w, "density_range", self.density_range, 0.0, 1e5, "objects per Mpix, e.g. (1000, 6000).")
        require(self.density_range[0] > 0, w, "density_range", self.density_range, "must be > 0 (log-uniform).")
        _rng_pair(w, "star_fraction_range", self.star_fraction_range, 0.0, 1.0, "fractions, e.g. (0.1, 0.4).")
        _num(w, "pair_fraction", self.pair_fraction, 0.0, 1.0, "a fraction in [0, 1].")
        _rng_pair(w, "pair_separation_fwhm_range", self.pair_separation_fwhm_range, 0.0, 100.0, "e.g. (0.5, 2.5).")
        _int(w, "margin", self.margin, 0, 512, "px, e.g. 16.")
        _int(w, "max_objects", self.max_objects, 1, 100000, "e.g. 160.")
        _int(w, "max_stamp_radius", self.max_stamp_radius, 8, 1024, "px, e.g. 64.")
        _num(w, "detect_snr", self.detect_snr, 0.0, 1e6, "e.g. 4.")
        _num(w, "ignore_snr", self.ignore_snr, 0.0, self.detect_snr, "at most detect_snr, e.g. 1.5.")
        _num(w, "heatmap_sigma", self.heatmap_sigma, 0.1, 20.0, "px, e.g. 1.")
        _num(w, "ignore_radius", self.ignore_radius, 0.0, 50.0, "px, e.g. 2.")
        return self


# ---------------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------------

def _check_kind_split(kind: str, split: str) -> None:
    if kind not in KIND_KEYS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KIND_KEYS)}.")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}.")


def stamp_streams(kind: str, seed: int, index: int, split: str = "train"
                  ) -> tuple[np.random.Generator, np.random.Generator]:
    """The ``(parameters, noise)`` generators of stamp ``index`` of ``(kind, seed, split)``.

    Built from ``SeedSequence(seed, spawn_key=(KIND_KEYS[kind], SPLITS[split], index)).spawn(2)``, so every
    stamp, kind and split has its own independent streams.
    """
    _check_kind_split(kind, split)
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed={seed!r}: expected an integer >= 0.")
    if not (_is_int(index) and index >= 0):
        raise ValueError(f"index={index!r}: expected an integer >= 0.")
    ss = np.random.SeedSequence(int(seed), spawn_key=(KIND_KEYS[kind], SPLITS[split], int(index)))
    a, b = ss.spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def _loguniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _grid(v: float, step: float, lo: float, hi: float) -> float:
    """``v`` rounded to a multiple of ``step`` and clipped to ``[lo, hi]`` (cache-friendly parameters)."""
    return float(np.clip(round(round(v / step) * step, 6), lo, hi))


# ---------------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _unit_psf(beta: float) -> galsim.GSObject:
    """Unit-flux Moffat of FWHM 1 px, truncated at 5 FWHM; dilated per stamp.

    Dilating one cached profile keeps GalSim's per-(beta, truncation) tables: a fresh truncated Moffat costs
    ~20 ms to find its maxK.
    """
    return make_psf(1.0, beta)


def stamp_psf(fwhm_px: float, beta: float) -> galsim.GSObject:
    """Unit-flux truncated Moffat PSF of FWHM ``fwhm_px`` px (:func:`~deepmosaic.pipeline.simulate.make_psf`)."""
    return _unit_psf(float(beta)).dilate(float(fwhm_px))


def _draw(prof: galsim.GSObject, size: int, x: float, y: float) -> np.ndarray:
    """FFT-draw ``prof`` (pixel-integrated) into a ``size`` x ``size`` stamp with its centre at ``(x, y)``."""
    im = galsim.ImageD(size, size, scale=1.0)
    im.setOrigin(0, 0)   # GalSim coordinates == our 0-based pixel coordinates
    prof.drawImage(image=im, center=galsim.PositionD(float(x), float(y)), method="fft")
    return im.array


def psf_effective_area(fwhm_px: float, beta: float) -> float:
    """``A_eff = 1 / sum(p**2)`` (px) of the pixel-integrated PSF ``p`` (unit sum) drawn at a pixel centre."""
    r = int(math.ceil(5.0 * fwhm_px)) + 2
    p = _draw(galsim.Convolve(galsim.DeltaFunction(), stamp_psf(fwhm_px, beta)), 2 * r + 1, r, r)
    p = p / p.sum()
    return float(1.0 / np.sum(p * p))


def render_point_sources(size: int, positions: np.ndarray, fluxes: np.ndarray, psf_fwhm: float,
                         psf_beta: float) -> np.ndarray:
    """Noise-free image of PSF-shaped point sources (how clumps are drawn).

    Parameters
    ----------
    size : int
        Stamp side (px).
    positions : array [k, 2]
        ``(y, x)`` centres, 0-based px.
    fluxes : array [k]
        Total fluxes (the truncated PSF has unit flux, so a source wholly inside the stamp sums to its flux).
    psf_fwhm, psf_beta : float
        Moffat PSF (FWHM in px).

    Returns
    -------
    numpy.ndarray, float64, [size, size]
    """
    positions = np.asarray(positions, float).reshape(-1, 2)
    fluxes = np.asarray(fluxes, float).reshape(-1)
    if positions.shape[0] == 0:
        return np.zeros((size, size))
    c = (size - 1) / 2.0
    deltas = [galsim.DeltaFunction(flux=float(f)).shift(float(x - c), float(y - c))
              for (y, x), f in zip(positions, fluxes)]
    prof = galsim.Convolve(galsim.Add(deltas) if len(deltas) > 1 else deltas[0], stamp_psf(psf_fwhm, psf_beta))
    return _draw(prof, size, c, c)


def _draw_galaxy_shape(rng: np.random.Generator, cfg) -> dict:
    """Galaxy shape parameters (always the same number of draws, so the stream layout is fixed)."""
    hlr = float(_loguniform(rng, *cfg.hlr_range)) / cfg.pixel_scale
    q = float(rng.uniform(*cfg.q_range))
    angle = float(rng.uniform(0.0, 180.0))
    n = _grid(rng.uniform(*cfg.sersic_n_range), SERSIC_N_STEP, *cfg.sersic_n_range)
    bd = bool(rng.random() < cfg.bulge_disk_fraction)
    bf = _grid(rng.uniform(*cfg.bulge_frac_range), BULGE_STEP, *cfg.bulge_frac_range)
    ratio = _grid(rng.uniform(*cfg.bulge_hlr_ratio_range), BULGE_STEP, *cfg.bulge_hlr_ratio_range)
    if bd and bf > 0:
        return dict(hlr=hlr, q=q, angle=angle, sersic_n=1.0, bulge_frac=bf, bulge_hlr_ratio=ratio)
    return dict(hlr=hlr, q=q, angle=angle, sersic_n=n, bulge_frac=0.0, bulge_hlr_ratio=0.4)


def _draw_psf(rng: np.random.Generator, cfg) -> tuple[float, float]:
    fwhm = float(rng.uniform(*cfg.psf_fwhm_range)) / cfg.pixel_scale
    beta = _grid(rng.uniform(*cfg.psf_beta_range), PSF_BETA_STEP, *cfg.psf_beta_range)
    return fwhm, beta


# ---------------------------------------------------------------------------------------------------
# Dihedral transforms of square stamps (used by StampPool)
# ---------------------------------------------------------------------------------------------------

def dihedral_array(a: np.ndarray, t: int) -> np.ndarray:
    """Apply transform ``t`` (0..7; bit 2 = transpose, bit 1 = flip y, bit 0 = flip x) to ``a[..., y, x]``."""
    if t & 4:
        a = np.swapaxes(a, -1, -2)
    if t & 2:
        a = a[..., ::-1, :]
    if t & 1:
        a = a[..., :, ::-1]
    return np.ascontiguousarray(a)


def dihedral_yx(yx: np.ndarray, t: int, size: int) -> np.ndarray:
    """Positions ``[..., (y, x)]`` under the same transform as :func:`dihedral_array` on a square stamp."""
    yx = np.asarray(yx, float)
    y, x = yx[..., 0], yx[..., 1]
    if t & 4:
        y, x = x, y
    if t & 2:
        y = (size - 1) - y
    if t & 1:
        x = (size - 1) - x
    return np.stack([y, x], axis=-1)


# ---------------------------------------------------------------------------------------------------
# Clumps
# ---------------------------------------------------------------------------------------------------

def _place_clumps(rng, cfg: ClumpSetConfig, cy, cx, hlr, q, angle, n_want) -> np.ndarray:
    """Up to ``n_want`` clump centres ``(y, x)`` uniform inside the scaled half-light ellipse, kept apart."""
    s = cfg.size
    a = cfg.clump_region_hlr * hlr / math.sqrt(q)      # circularised hlr = sqrt(a b)
    b = cfg.clump_region_hlr * hlr * math.sqrt(q)
    th = math.radians(angle)
    ct, st = math.cos(th), math.sin(th)
    lo, hi = cfg.edge_margin - 0.5, s - 0.5 - cfg.edge_margin
    # a fixed number of candidate draws keeps the stream layout independent of the outcome
    n_try = 40 * max(cfg.max_clumps, 1)
    r = np.sqrt(rng.random(n_try))
    phi = rng.uniform(0.0, 2 * math.pi, n_try)
    u, v = a * r * np.cos(phi), b * r * np.sin(phi)
    xs = cx + u * ct - v * st
    ys = cy + u * st + v * ct
    out: list[tuple[float, float]] = []
    sep2 = cfg.min_clump_separation ** 2
    for y, x in zip(ys, xs):
        if len(out) >= n_want:
            break
        if not (lo <= x <= hi and lo <= y <= hi):
            continue
        if any((y - py) ** 2 + (x - px) ** 2 < sep2 for py, px in out):
            continue
        out.append((float(y), float(x)))
    return np.asarray(out, float).reshape(-1, 2)


def disc_mask(size: int, positions: np.ndarray, radius: float) -> np.ndarray:
    """Float32 ``[size, size]`` mask: 1 where a pixel centre lies within ``radius`` of any ``(y, x)`` position."""
    m = np.zeros((size, size), np.float32)
    yy = np.arange(size, dtype=np.float64)[:, None]
    xx = np.arange(size, dtype=np.float64)[None, :]
    r2 = radius * radius
    for y, x in np.asarray(positions, float).reshape(-1, 2):
        m[((yy - y) ** 2 + (xx - x) ** 2) <= r2] = 1.0
    return m


def _clump_canvas_scene(cfg: ClumpSetConfig, rng: np.random.Generator) -> dict:
    """A ``size`` x ``size`` piece of a clumpy mosaic (``layout='canvas'``).

    * No host (``empty_fraction``) or ``hosts_range`` hosts, centred uniformly over the canvas widened by
      ``host_margin`` (so some are cut by the edge); each drawn as in the stamp layout (Sersic or bulge +
      disk, optional smooth nucleus decoy), S/N measured on its whole rendering.
    * Per host ``host_clumps_range`` clumps, uniform inside ``clump_region_hlr`` half-light ellipses or, for a
      share ``bulge_clump_fraction`` on bulge + disk hosts, inside the bulge's half-light ellipse; each
      placed clump gets a companion at ``pair_separation_fwhm_range`` PSF FWHM with ``pair_fraction``.
      Every clump keeps ``min_clump_separation`` px from every other one and ``edge_margin`` px from the
      edges; ``max_clumps`` caps the total.
    * Decoys (never in the mask): ``stars_range`` stars and ``compact_range`` small smooth galaxies at
      ``decoy_snr_range``, placed only where the hosts' light is below ``decoy_max_host_light`` and >= 3 PSF
      FWHM from every clump.

    Per-clump truth beyond the stamp layout's: ``clump_host`` (host index), ``on_bulge`` (inside the
    bulge's half-light ellipse of a bulge + disk host), ``close_pair`` (another clump within 3 PSF FWHM),
    ``contrast`` (clump flux over the host light in the PSF's effective area at the clump's pixel).
    """
    s = cfg.size
    fwhm, beta = _draw_psf(rng, cfg)
    psf = stamp_psf(fwhm, beta)
    a_eff = psf_effective_area(fwhm, beta)
    big, off = 2 * s, s // 2               # hosts are drawn on a 2s canvas (for their S/N), then cropped
    empty = bool(rng.random() < cfg.empty_fraction)
    n_hosts = 0 if empty else int(rng.integers(cfg.hosts_range[0], cfg.hosts_range[1] + 1))
    galaxy = np.zeros((s, s))
    m = cfg.host_margin * s
    lo_e, hi_e = cfg.edge_margin - 0.5, s - 0.5 - cfg.edge_margin
    grid = SeparationGrid(cfg.min_clump_separation, box=(lo_e, hi_e, lo_e, hi_e), cap=cfg.max_clumps)
    pos: list[tuple[float, float]] = []
    snrs: list[float] = []
    owner: list[int] = []
    hosts = []
    for h in range(n_hosts):
        shape = _draw_galaxy_shape(rng, cfg)
        cy, cx = rng.uniform(-0.5 - m, s - 0.5 + m, 2)
        has_nuc = bool(rng.random() < cfg.nucleus_fraction)
        nuc_frac = float(rng.uniform(*cfg.nucleus_flux_range)) if has_nuc else 0.0
        nuc_hlr = float(_loguniform(rng, *cfg.nucleus_hlr_range)) / cfg.pixel_scale
        nuc_n = _grid(rng.uniform(*cfg.nucleus_sersic_n_range), SERSIC_N_STEP, *cfg.nucleus_sersic_n_range)
        gal_snr = float(_loguniform(rng, *cfg.galaxy_snr_range))
        n_want = int(rng.integers(cfg.host_clumps_range[0], cfg.host_clumps_range[1] + 1))
        prof = galaxy_profile(1.0 - nuc_frac, **shape)
        if has_nuc:
            prof = galsim.Add([prof, galaxy_profile(nuc_frac, nuc_hlr, sersic_n=nuc_n)])
        img = _draw(galsim.Convolve(prof, psf), big, cx + off, cy + off)
        flux = gal_snr / math.sqrt(float(np.sum(img * img)))
        galaxy += flux * img[off:off + s, off:off + s]
        b_hlr = (bulge_disk_radii(shape["hlr"], shape["bulge_frac"], shape["bulge_hlr_ratio"])[0]
                 if shape["bulge_frac"] > 0 else 0.0)
        hosts.append(dict(cy=cy, cx=cx, snr=gal_snr, flux=flux, nucleus=has_nuc, bulge_hlr=b_hlr, **shape))
        lo_p, hi_p = cfg.pair_separation_fwhm_range
        for y, x, snr in place_clumps(
                rng, grid, cy=cy, cx=cx, hlr=shape["hlr"], q=shape["q"], angle=shape["angle"], bulge_hlr=b_hlr,
                n_want=n_want, max_per_host=cfg.host_clumps_range[1], region_hlr=cfg.clump_region_hlr,
                bulge_fraction=cfg.bulge_clump_fraction, pair_fraction=cfg.pair_fraction,
                pair_range_px=(lo_p * fwhm, hi_p * fwhm), snr_range=cfg.clump_snr_range):
            pos.append((y, x)), snrs.append(snr), owner.append(h)
    positions = np.asarray(pos, float).reshape(-1, 2)
    clump_snr = np.asarray(snrs, np.float64)
    clump_flux = clump_snr * math.sqrt(a_eff)
    clumps = render_point_sources(s, positions, clump_flux, fwhm, beta)

    # decoys on the sky: stars and compact smooth galaxies, away from hosts and clumps
    n_star = int(rng.integers(cfg.stars_range[0], cfg.stars_range[1] + 1))
    n_comp = int(rng.integers(cfg.compact_range[0], cfg.compact_range[1] + 1))
    n_dec = n_star + n_comp
    cand = rng.uniform(-0.5, s - 0.5, (n_dec, 20, 2))
    dec_snr = _loguniform(rng, *cfg.decoy_snr_range, max(n_dec, 1))
    dec_hlr = _loguniform(rng, *cfg.compact_hlr_range, max(n_dec, 1)) / cfg.pixel_scale
    dec_n = rng.uniform(0.5, 4.0, max(n_dec, 1))
    dec_q = rng.uniform(*cfg.q_range, max(n_dec, 1))
    dec_angle = rng.uniform(0.0, 180.0, max(n_dec, 1))
    far2 = (3.0 * fwhm) ** 2
    decoys = np.zeros((s, s))
    star_yx, star_flux = [], []
    for d in range(n_dec):
        for y, x in cand[d]:
            iy, ix = int(math.floor(y + 0.5)), int(math.floor(x + 0.5))
            if galaxy[iy, ix] >= cfg.decoy_max_host_light:
                continue
            if any((y - py) ** 2 + (x - px) ** 2 < far2 for py, px in pos):
                continue
            if d < n_star:
                star_yx.append((y, x))
                star_flux.append(float(dec_snr[d]) * math.sqrt(a_eff))
            else:
                n_d = _grid(dec_n[d], SERSIC_N_STEP, 0.5, 4.0)
                prof = galaxy_profile(1.0, float(dec_hlr[d]), sersic_n=n_d, q=float(dec_q[d]),
                                      angle=float(dec_angle[d]))
                img = _draw(galsim.Convolve(prof, psf), big, x + off, y + off)
                decoys += float(dec_snr[d]) / math.sqrt(float(np.sum(img * img))) * img[off:off + s, off:off + s]
            break
    if star_yx:
        decoys += render_point_sources(s, np.asarray(star_yx), np.asarray(star_flux), fwhm, beta)

    # per-clump truth: host, bulge membership, close pairs, contrast with the host light
    k = positions.shape[0]
    on_bulge = np.zeros(k, bool)
    contrast = np.full(k, np.inf)
    for i, (y, x) in enumerate(positions):
        hs = hosts[owner[i]]
        if hs["bulge_hlr"] > 0:
            on_bulge[i] = in_ellipse(y, x, hs["cy"], hs["cx"], hs["bulge_hlr"] / math.sqrt(hs["q"]),
                                     hs["bulge_hlr"] * math.sqrt(hs["q"]), hs["angle"])
        host_light = galaxy[int(math.floor(y + 0.5)), int(math.floor(x + 0.5))] * a_eff
        if host_light > 0:
            contrast[i] = clump_flux[i] / host_light
    close = clump_flags(positions, fwhm)
    first = hosts[0] if hosts else None
    return dict(model=(galaxy + decoys + clumps).astype(np.float32), galaxy=(galaxy + decoys).astype(np.float32),
                clumps=clumps.astype(np.float32), positions=positions, clump_flux=clump_flux, clump_snr=clump_snr,
                clump_host=np.asarray(owner, np.int64), on_bulge=on_bulge, close_pair=close, contrast=contrast,
                galaxy_snr=first["snr"] if first else np.nan, galaxy_flux=first["flux"] if first else np.nan,
                galaxy_center=np.array([first["cy"], first["cx"]]) if first else np.array([np.nan, np.nan]),
                has_nucleus=any(hs["nucleus"] for hs in hosts), n_hosts=n_hosts, n_stars=len(star_yx),
                psf_fwhm=fwhm, psf_beta=beta, psf_area=a_eff)


def _clump_mosaic_scene(cfg: ClumpSetConfig, rng: np.random.Generator) -> dict:
    """A ``size`` x ``size`` crop of a mosaic made by the mosaic simulator (``layout='mosaic'``).

    The scene is :func:`~deepmosaic.pipeline.simulate.simulate_mosaic` on ``size + 2 * mosaic_pad`` px with
    its own seed (drawn from ``rng``, >= 2**24 so never one of the small seeds the benchmarks simulate), a
    PSF drawn from ``psf_fwhm_range`` / ``psf_beta_range``, ``mosaic_density_range`` ordinary objects and
    ``mosaic_clumpy_range`` clumpy hosts per Mpix (hosts and clumps as ``galaxy_snr_range``, ``hlr_range``,
    ``sersic_n_range``, ``host_clumps_range``, ``clump_snr_range``, ``clump_region_hlr``,
    ``bulge_clump_fraction``, ``pair_fraction``, ``pair_separation_fwhm_range``), cropped at its centre. Unlike
    the canvas layout, stars and ordinary galaxies fall anywhere, on clumpy hosts too, as they do on the
    sky. Images are in noise-sigma units (the noise-free model over the simulator's sigma; the sample adds
    unit noise). Clumps whose target disc reaches into the crop are in the mask; ``positions`` lists those
    whose centre is inside it.
    """
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    s, pad = cfg.size, cfg.mosaic_pad
    fwhm, beta = _draw_psf(rng, cfg)
    side = s + 2 * pad
    sc = SimConfig(size=(side, side), seed=int(rng.integers(2 ** 24, 2 ** 31)), pixel_scale=cfg.pixel_scale,
                   psf_fwhm=fwhm * cfg.pixel_scale, psf_beta=beta,
                   density=float(rng.uniform(*cfg.mosaic_density_range)),
                   clumpy_density=float(rng.uniform(*cfg.mosaic_clumpy_range)),
                   clumpy_snr_range=tuple(cfg.galaxy_snr_range), clumpy_hlr_range=tuple(cfg.hlr_range),
                   clumpy_sersic_n_range=tuple(cfg.sersic_n_range), clumps_per_host=tuple(cfg.host_clumps_range),
                   clump_snr_range=tuple(cfg.clump_snr_range), clump_region_hlr=cfg.clump_region_hlr,
                   clump_bulge_fraction=cfg.bulge_clump_fraction, clump_pair_fraction=cfg.pair_fraction,
                   clump_pair_fwhm_range=tuple(cfg.pair_separation_fwhm_range)).validate()
    sim = simulate_mosaic(sc)
    sigma = float(sc.noise_sigma)
    model = (sim.model[pad:pad + s, pad:pad + s] / sigma).astype(np.float32)
    cl = sim.clumps
    yx = np.c_[np.asarray(cl["y"], float), np.asarray(cl["x"], float)].reshape(-1, 2) - pad
    inside = np.all((yx >= -0.5) & (yx < s - 0.5), axis=1)
    inside &= np.cumsum(inside) <= cfg.max_clumps        # the padded truth arrays hold max_clumps
    near = np.all((yx >= -0.5 - cfg.mask_radius) & (yx < s - 0.5 + cfg.mask_radius), axis=1)
    a_eff = psf_effective_area(fwhm, beta)
    snr = np.asarray(cl["snr"], np.float64)
    return dict(model=model, positions=yx[inside], clump_flux=np.asarray(cl["flux"], float)[inside] / sigma,
                clump_snr=snr[inside], mask_positions=yx[near],
                on_bulge=np.asarray(cl["on_bulge"], bool)[inside], close_pair=np.asarray(cl["close_pair"], bool)[inside],
                contrast=np.asarray(cl["contrast"], float)[inside], galaxy_snr=np.nan, galaxy_flux=np.nan,
                galaxy_center=np.array([np.nan, np.nan]), has_nucleus=False, n_hosts=int(sc.clumpy_density > 0),
                psf_fwhm=fwhm, psf_beta=beta, psf_area=a_eff, sim_seed=sc.seed)


def _clump_scene(cfg: ClumpSetConfig, rng: np.random.Generator) -> dict:
    if cfg.layout == "canvas":
        return _clump_canvas_scene(cfg, rng)
    if cfg.layout == "mosaic":
        return _clump_mosaic_scene(cfg, rng)
    s = cfg.size
    fwhm, beta = _draw_psf(rng, cfg)
    shape = _draw_galaxy_shape(rng, cfg)
    c = (s - 1) / 2.0
    cy, cx = c + rng.uniform(-cfg.center_jitter, cfg.center_jitter, 2)
    has_nuc = bool(rng.random() < cfg.nucleus_fraction)
    nuc_frac = float(rng.uniform(*cfg.nucleus_flux_range))
    nuc_hlr = float(_loguniform(rng, *cfg.nucleus_hlr_range)) / cfg.pixel_scale
    nuc_n = _grid(rng.uniform(*cfg.nucleus_sersic_n_range), SERSIC_N_STEP, *cfg.nucleus_sersic_n_range)
    gal_snr = float(_loguniform(rng, *cfg.galaxy_snr_range))
    n_want = int(rng.integers(0, cfg.max_clumps + 1))
    snr_all = _loguniform(rng, *cfg.clump_snr_range, max(cfg.max_clumps, 1))
    pos = _place_clumps(rng, cfg, cy, cx, shape["hlr"], shape["q"], shape["angle"], n_want)
    k = pos.shape[0]
    clump_snr = snr_all[:k].astype(np.float64)

    psf = stamp_psf(fwhm, beta)
    nf = nuc_frac if has_nuc else 0.0
    prof = galaxy_profile(1.0 - nf, **shape)
    if has_nuc:
        prof = galsim.Add([prof, galaxy_profile(nf, nuc_hlr, sersic_n=nuc_n)])
    gal1 = _draw(galsim.Convolve(prof, psf), s, cx, cy)
    gal_flux = gal_snr / math.sqrt(float(np.sum(gal1 * gal1)))
    galaxy = gal_flux * gal1
    a_eff = psf_effective_area(fwhm, beta)
    clump_flux = clump_snr * math.sqrt(a_eff)
    clumps = render_point_sources(s, pos, clump_flux, fwhm, beta)
    return dict(model=(galaxy + clumps).astype(np.float32), galaxy=galaxy.astype(np.float32),
                clumps=clumps.astype(np.float32), positions=pos, clump_flux=clump_flux, clump_snr=clump_snr,
                galaxy_snr=gal_snr, galaxy_flux=gal_flux, galaxy_center=np.array([cy, cx]),
                has_nucleus=has_nuc, nucleus_flux=gal_flux * nf, psf_fwhm=fwhm, psf_beta=beta, psf_area=a_eff,
                hlr=shape["hlr"], q=shape["q"], angle=shape["angle"], sersic_n=shape["sersic_n"],
                bulge_frac=shape["bulge_frac"])


def _clump_sample(cfg: ClumpSetConfig, sc: dict, noise_rng: np.random.Generator, t: int = 0) -> dict:
    s = cfg.size
    model = dihedral_array(sc["model"], t)
    pos = dihedral_yx(sc["positions"], t, s).reshape(-1, 2)
    k = pos.shape[0]
    nmax = cfg.max_clumps
    padded = np.full((nmax, 2), np.nan, np.float32)
    padded[:k] = pos
    snr = np.full(nmax, np.nan, np.float32)
    snr[:k] = sc["clump_snr"]
    flux = np.full(nmax, np.nan, np.float32)
    flux[:k] = sc["clump_flux"]
    noise = noise_rng.standard_normal((s, s), dtype=np.float32)
    # the mosaic layout's mask also holds clumps centred just outside the crop
    mpos = dihedral_yx(sc.get("mask_positions", sc["positions"]), t, s).reshape(-1, 2)
    return dict(
        image=(model + noise)[None], mask=disc_mask(s, mpos, cfg.mask_radius)[None], model=model[None],
        positions=padded, count=np.int64(k), valid=np.arange(nmax) < k, clump_snr=snr, clump_flux=flux,
        galaxy_snr=np.float32(sc["galaxy_snr"]), galaxy_flux=np.float32(sc["galaxy_flux"]),
        galaxy_center=dihedral_yx(sc["galaxy_center"], t, s).astype(np.float32),
        has_nucleus=np.bool_(sc["has_nucleus"]), psf_fwhm=np.float32(sc["psf_fwhm"]),
        psf_beta=np.float32(sc["psf_beta"]),
        psf_area=np.float32(sc["psf_area"]), noise_sigma=np.float32(1.0))


# ---------------------------------------------------------------------------------------------------
# Blends
# ---------------------------------------------------------------------------------------------------

def _draw_separation(rng, cfg: BlendSetConfig) -> float:
    lo, hi = cfg.separation_fwhm_range
    u = float(rng.random())
    if cfg.separation_sampling == "log":
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    if cfg.separation_sampling == "sqrt":
        return (math.sqrt(lo) + u * (math.sqrt(hi) - math.sqrt(lo))) ** 2
    return lo + u * (hi - lo)


def _blend_scene(cfg: BlendSetConfig, rng: np.random.Generator) -> dict:
    s = cfg.size
    fwhm, beta = _draw_psf(rng, cfg)
    shapes = [_draw_galaxy_shape(rng, cfg), _draw_galaxy_shape(rng, cfg)]
    c = (s - 1) / 2.0
    cy, cx = c + rng.uniform(-cfg.center_jitter, cfg.center_jitter, 2)
    sep_fwhm = _draw_separation(rng, cfg)
    phi = float(rng.uniform(0.0, 2 * math.pi))
    sep = sep_fwhm * fwhm
    peaks = np.array([[cy, cx], [cy + sep * math.sin(phi), cx + sep * math.cos(phi)]])
    snr_c = float(_loguniform(rng, *cfg.central_snr_range))
    dmag = float(rng.uniform(*cfg.delta_mag_range))
    psf = stamp_psf(fwhm, beta)
    unit = [render_profile(1.0, float(x), float(y), psf=psf, kind="galaxy", shape=(s, s), origin=(0, 0), **sh).array
            for (y, x), sh in zip(peaks, shapes)]
    f_c = snr_c / math.sqrt(float(np.sum(unit[0] ** 2)))
    flux = np.array([f_c, f_c * 10.0 ** (-0.4 * dmag)])
    iso = np.stack([flux[0] * unit[0], flux[1] * unit[1]])
    snr = np.sqrt(np.sum(iso * iso, axis=(1, 2)))
    return dict(isolated=iso.astype(np.float32), peaks=peaks, flux=flux, snr=snr, separation=sep,
                separation_fwhm=sep_fwhm, delta_mag=dmag, psf_fwhm=fwhm, psf_beta=beta,
                hlr=np.array([sh["hlr"] for sh in shapes]), q=np.array([sh["q"] for sh in shapes]),
                sersic_n=np.array([sh["sersic_n"] for sh in shapes]),
                bulge_frac=np.array([sh["bulge_frac"] for sh in shapes]), shapes=shapes)


def ownership_masks(light: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Disjoint truth masks ``[k, H, W]`` (float32) from per-object noise-free images ``light[k, H, W]``.

    A pixel belongs to the object whose light is largest there (the lowest index on ties), provided that light
    exceeds ``threshold`` (1 = one noise sigma in image units).
    """
    light = np.asarray(light)
    best = light.max(axis=0)
    owner = light.argmax(axis=0)
    keep = best > threshold
    return np.stack([(owner == k) & keep for k in range(light.shape[0])]).astype(np.float32)


def _blend_sample(cfg: BlendSetConfig, sc: dict, noise_rng: np.random.Generator, t: int = 0) -> dict:
    s = cfg.size
    iso = dihedral_array(sc["isolated"], t)
    model = iso.sum(axis=0)
    noise = noise_rng.standard_normal((s, s), dtype=np.float32)
    return dict(
        image=(model + noise)[None], masks=ownership_masks(iso), visible=(iso > 1.0).astype(np.float32),
        isolated=iso, peaks=dihedral_yx(sc["peaks"], t, s).astype(np.float32),
        flux=sc["flux"].astype(np.float32), snr=sc["snr"].astype(np.float32),
        separation=np.float32(sc["separation"]), separation_fwhm=np.float32(sc["separation_fwhm"]),
        delta_mag=np.float32(sc["delta_mag"]), hlr=sc["hlr"].astype(np.float32),
        psf_fwhm=np.float32(sc["psf_fwhm"]), psf_beta=np.float32(sc["psf_beta"]), noise_sigma=np.float32(1.0))


# ---------------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------------

def _sample_mags(rng, n, lo, hi, slope):
    u = rng.random(n)
    if abs(slope) < 1e-12 or hi == lo:
        return lo + (hi - lo) * u
    a = slope * math.log(10.0)
    return lo + np.log1p(u * np.expm1(a * (hi - lo))) / a


def _field_scene(cfg: FieldSetConfig, rng: np.random.Generator) -> dict:
    s, m = cfg.size, cfg.margin
    fwhm, beta = _draw_psf(rng, cfg)
    sigma = float(_loguniform(rng, *cfg.noise_sigma_range))
    density = float(_loguniform(rng, *cfg.density_range))
    star_frac = float(rng.uniform(*cfg.star_fraction_range))
    lo, hi = -m - 0.5, s + m - 0.5
    n_prim = int(rng.poisson(density * (s + 2 * m) ** 2 / 1e6))
    # primaries uniform over crop + margin; each has a close companion with probability pair_fraction
    x = rng.uniform(lo, hi, n_prim)
    y = rng.uniform(lo, hi, n_prim)
    paired = rng.random(n_prim) < cfg.pair_fraction
    n_pair = int(paired.sum())
    r = rng.uniform(*cfg.pair_separation_fwhm_range, n_pair) * fwhm
    phi = rng.uniform(0.0, 2 * math.pi, n_pair)
    x = np.concatenate([x, x[paired] + r * np.cos(phi)])
    y = np.concatenate([y, y[paired] + r * np.sin(phi)])
    n_obj = x.size
    is_star = rng.random(n_obj) < star_frac
    mag = _sample_mags(rng, n_obj, cfg.mag_range[0], cfg.mag_range[1], cfg.mag_slope)
    shapes = [_draw_galaxy_shape(rng, cfg) for _ in range(n_obj)]
    flux_counts = 10.0 ** (-0.4 * (mag - cfg.zeropoint))

    # keep objects whose light can reach the crop; cap the catalog (objects centred in the crop)
    in_crop = (x >= -0.5) & (x < s - 0.5) & (y >= -0.5) & (y < s - 0.5)
    keep = (x >= lo) & (x < hi) & (y >= lo) & (y < hi)
    over = np.flatnonzero(in_crop)[cfg.max_objects:]
    keep[over] = False
    in_crop &= keep

    psf = stamp_psf(fwhm, beta)
    psf_r = 5.0 * fwhm
    canvas = s + 2 * m
    model = np.zeros((canvas, canvas))
    best = np.zeros((canvas, canvas))
    owner = np.full((canvas, canvas), -1, np.int64)
    idx = np.flatnonzero(keep)
    snr = np.zeros(n_obj)
    half_w = np.zeros(n_obj)
    half_h = np.zeros(n_obj)
    for k in idx:
        xc, yc = float(x[k]) + m, float(y[k]) + m       # canvas coordinates
        if is_star[k]:
            kw = dict(kind="star")
            extent = 0.0
        else:
            kw = dict(kind="galaxy", **shapes[k])
            sh = shapes[k]
            extent = _galaxy_extent(sh["hlr"], sh["q"], sh["bulge_frac"], sh["bulge_hlr_ratio"])
        rad = int(min(math.ceil(extent + psf_r + 1.0), cfg.max_stamp_radius))
        st = render_profile(float(flux_counts[k]) / sigma, xc, yc, psf=psf, shape=(2 * rad + 1, 2 * rad + 1),
                            **kw)
        a = st.array
        snr[k] = math.sqrt(float(np.sum(a * a)))
        vy, vx = np.nonzero(a > 1.0)
        if vy.size:
            half_w[k] = float(np.max(np.abs(vx + st.x0 - xc))) + 0.5
            half_h[k] = float(np.max(np.abs(vy + st.y0 - yc))) + 0.5
        ov = st.overlap((canvas, canvas))
        if ov is None:
            continue
        tsl, ssl = ov
        light = a[ssl]
        model[tsl] += light
        cur = best[tsl]
        win = light > cur
        cur[win] = light[win]
        owner[tsl][win] = k
    owner[best <= 1.0] = -1

    cat = np.flatnonzero(in_crop)                   # catalog order = draw order
    lookup = np.full(n_obj + 1, -1, np.int64)       # object -> catalog id (1..), -1 for margin objects
    lookup[cat] = np.arange(1, cat.size + 1)
    crop = (slice(m, m + s), slice(m, m + s))
    own = owner[crop]
    segmap = np.where(own >= 0, lookup[own], 0).astype(np.int32)
    floor = fwhm / 2.0                               # boxes are at least one PSF FWHM wide
    w = 2.0 * np.maximum(half_w[cat], floor)
    h = 2.0 * np.maximum(half_h[cat], floor)
    return dict(model=model[crop].astype(np.float32), segmap=segmap,
                yx=np.stack([y[cat], x[cat]], axis=-1).reshape(-1, 2), wh=np.stack([w, h], axis=-1).reshape(-1, 2),
                cls=np.where(is_star[cat], 0, 1).astype(np.int64), snr=snr[cat], flux=flux_counts[cat] / sigma,
                mag=mag[cat], paired=np.concatenate([paired, np.ones(n_pair, bool)])[cat],
                noise_sigma=sigma, psf_fwhm=fwhm, psf_beta=beta, density=density, n_margin=int(keep.sum() - cat.size))


def detection_targets(cfg: FieldSetConfig, yx: np.ndarray, wh: np.ndarray, cls: np.ndarray, snr: np.ndarray
                      ) -> dict:
    """CenterNet-style dense targets for a crop from its catalog.

    Parameters
    ----------
    yx : array [k, 2]
        True centres ``(y, x)`` (0-based px) of the objects centred in the crop.
    wh : array [k, 2]
        Box sizes ``(w, h)`` in px.
    cls : array [k] int
        0 star, 1 galaxy (heatmap channel).
    snr : array [k]
        Object S/N.

    Returns
    -------
    dict of float32 arrays
        ``heatmap [2, H, W]``: per class, the max over objects with S/N >= detect_snr of
        ``exp(-d**2 / (2 heatmap_sigma**2))`` with ``d`` the distance to the object's centre *pixel*
        ``(round(y), round(x))``, so that pixel holds exactly 1. ``ignore [1, H, W]``: 1 within ignore_radius of
        the centre pixel of every object with ignore_snr <= S/N < detect_snr, except on the centre pixels of
        detectable objects. ``size [2, H, W]``: ``(w, h)`` and ``offset [2, H, W]``: ``(dy, dx) = (y - round(y),
        x - round(x))`` in [-0.5, 0.5), both at the centre pixels of detectable objects (the brighter wins
        where two share a pixel); ``reg_mask [1, H, W]``: 1 at those pixels. Same layout as
        :func:`deepmosaic.models.detection.encode_targets` (see :func:`centernet_targets`).
    """
    s = cfg.size
    heat = np.zeros((2, s, s), np.float32)
    ignore = np.zeros((1, s, s), np.float32)
    size = np.zeros((2, s, s), np.float32)
    offset = np.zeros((2, s, s), np.float32)
    reg = np.zeros((1, s, s), np.float32)
    yx = np.asarray(yx, float).reshape(-1, 2)
    iy = np.clip(np.floor(yx[:, 0] + 0.5).astype(int), 0, s - 1)
    ix = np.clip(np.floor(yx[:, 1] + 0.5).astype(int), 0, s - 1)
    snr = np.asarray(snr, float)
    pos = snr >= cfg.detect_snr
    faint = (snr >= cfg.ignore_snr) & ~pos
    rh = int(math.ceil(4.0 * cfg.heatmap_sigma))
    g1 = np.exp(-np.arange(-rh, rh + 1) ** 2 / (2.0 * cfg.heatmap_sigma ** 2))
    gauss = (g1[:, None] * g1[None, :]).astype(np.float32)
    ri = int(math.ceil(cfg.ignore_radius))
    dd = np.arange(-ri, ri + 1)
    disc = (dd[:, None] ** 2 + dd[None, :] ** 2) <= cfg.ignore_radius ** 2

    def paste(dst, patch, r, cy, cx, op):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, s), max(cx - r, 0), min(cx + r + 1, s)
        sub = patch[y0 - (cy - r):y1 - (cy - r), x0 - (cx - r):x1 - (cx - r)]
        dst[y0:y1, x0:x1] = op(dst[y0:y1, x0:x1], sub)

    for k in np.flatnonzero(faint):
        paste(ignore[0], disc.astype(np.float32), ri, iy[k], ix[k], np.maximum)
    for k in np.flatnonzero(pos)[np.argsort(snr[pos], kind="stable")]:   # ascending S/N: brightest last
        paste(heat[int(cls[k])], gauss, rh, iy[k], ix[k], np.maximum)
        size[:, iy[k], ix[k]] = wh[k]
        offset[:, iy[k], ix[k]] = (yx[k, 0] - iy[k], yx[k, 1] - ix[k])
        reg[0, iy[k], ix[k]] = 1.0
    ignore[0][reg[0] > 0] = 0.0
    return dict(heatmap=heat, ignore=ignore, size=size, offset=offset, reg_mask=reg)


def centernet_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields batch's targets under the key names of ``CenterNet.loss``.

    ``{'heatmap', 'size', 'offset', 'mask': reg_mask, 'weight': 1 - ignore}`` (numpy; wrap with
    ``torch.from_numpy``). ``weight`` [n, 1, H, W] broadcasts over the heatmap's class channels.
    """
    return {"heatmap": batch["heatmap"], "size": batch["size"], "offset": batch["offset"],
            "mask": batch["reg_mask"], "weight": (1.0 - batch["ignore"]).astype(np.float32)}


def _field_sample(cfg: FieldSetConfig, sc: dict, noise_rng: np.random.Generator, t: int = 0) -> dict:
    s, mx = cfg.size, cfg.max_objects
    model = dihedral_array(sc["model"], t)
    segmap = dihedral_array(sc["segmap"], t)
    yx = dihedral_yx(sc["yx"], t, s).reshape(-1, 2)
    wh = sc["wh"][:, ::-1] if t & 4 else sc["wh"]
    k = yx.shape[0]
    tg = detection_targets(cfg, yx, wh, sc["cls"], sc["snr"])
    boxes = np.full((mx, 4), np.nan, np.float32)
    boxes[:k, 0], boxes[:k, 1] = yx[:, 1], yx[:, 0]
    boxes[:k, 2:] = wh

    def pad(v, fill, dtype):
        out = np.full(mx, fill, dtype)
        out[:k] = v
        return out

    noise = noise_rng.standard_normal((s, s), dtype=np.float32)
    return dict(image=(model + noise)[None], model=model[None], segmap=segmap[None], **tg,
                boxes=boxes, cls=pad(sc["cls"], -1, np.int64), snr=pad(sc["snr"], np.nan, np.float32),
                flux=pad(sc["flux"], np.nan, np.float32), mag=pad(sc["mag"], np.nan, np.float32),
                paired=pad(sc["paired"], False, bool), count=np.int64(k), valid=np.arange(mx) < k,
                noise_sigma=np.float32(sc["noise_sigma"]), psf_fwhm=np.float32(sc["psf_fwhm"]),
                psf_beta=np.float32(sc["psf_beta"]))


# ---------------------------------------------------------------------------------------------------
# Public batch API
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Kind:
    config: type
    scene: Callable
    sample: Callable


_KINDS = {"clumps": _Kind(ClumpSetConfig, _clump_scene, _clump_sample),
          "blends": _Kind(BlendSetConfig, _blend_scene, _blend_sample),
          "fields": _Kind(FieldSetConfig, _field_scene, _field_sample)}


def _config_for(kind: str, config) -> Any:
    _check_kind_split(kind, "train")
    cls = _KINDS[kind].config
    if config is None:
        config = cls()
    elif isinstance(config, dict):
        config = from_mapping(cls, config, where=kind)
    elif not isinstance(config, cls):
        raise TypeError(f"config={type(config).__name__}: expected {cls.__name__} (or a dict of its fields) "
                        f"for kind={kind!r}.")
    return config.validate()


def render_scene(kind: str, config=None, seed: int = 0, index: int = 0, split: str = "train") -> dict:
    """The noise-free scene and full truth of stamp ``index`` (what :func:`make_batch` adds noise to).

    Returns a dict of numpy arrays and scalars (kind-specific; e.g. clumps give ``galaxy`` and ``clumps``
    images separately, fields give the unpadded catalog ``yx``, ``wh``, ``cls``, ``snr``).
    """
    config = _config_for(kind, config)
    prng, _ = stamp_streams(kind, seed, index, split)
    return _KINDS[kind].scene(config, prng)


def _collate(samples: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(sm[k]) for sm in samples]) for k in samples[0]}


def make_batch(kind: str, config=None, seed: int = 0, n: int = 16, *, split: str = "train",
               start: int = 0) -> dict[str, np.ndarray]:
    """A batch of ``n`` freshly rendered stamps ``start .. start + n - 1`` of ``(kind, seed, split)``.

    Parameters
    ----------
    kind : {'clumps', 'blends', 'fields'}
    config : ClumpSetConfig | BlendSetConfig | FieldSetConfig | dict | None
        The kind's config (a dict is validated with ``from_mapping``); None = defaults.
    seed : int >= 0
    n : int >= 1
    split : {'train', 'val', 'test'}
        Selects disjoint random streams (see the module docstring).
    start : int >= 0
        Index of the first stamp.

    Returns
    -------
    dict of numpy arrays, first axis n. Common keys: ``image`` float32 [n, 1, H, W] (light / noise sigma +
    unit-variance noise), ``psf_fwhm`` [n] (px), ``psf_beta`` [n], ``noise_sigma`` [n] (counts; 1 for clumps
    and blends).

    * clumps: ``mask`` float32 [n, 1, H, W] (discs of ``mask_radius`` around clumps), ``model`` [n, 1, H, W]
      (noise-free), ``positions`` float32 [n, max_clumps, 2] ``(y, x)`` (NaN padded), ``count`` int64 [n],
      ``valid`` bool [n, max_clumps], ``clump_snr``, ``clump_flux`` [n, max_clumps] (NaN padded),
      ``galaxy_snr``, ``galaxy_flux``, ``galaxy_center`` [n, 2], ``has_nucleus``, ``psf_area`` (A_eff, px),
      ``psf_beta``.
    * blends: ``masks`` float32 [n, 2, H, W] (central, companion; disjoint, 1-sigma largest-light rule),
      ``visible`` [n, 2, H, W] (own light > 1 sigma; may overlap), ``isolated`` [n, 2, H, W] (noise-free image
      of each galaxy), ``peaks`` [n, 2, 2] ``(y, x)``, ``flux`` [n, 2] (total, image units), ``snr`` [n, 2],
      ``separation`` [n] (px), ``separation_fwhm`` [n], ``delta_mag`` [n], ``hlr`` [n, 2] (px).
    * fields: ``heatmap`` [n, 2, H, W] (star, galaxy), ``ignore`` [n, 1, H, W], ``size`` [n, 2, H, W]
      ``(w, h)``, ``offset`` [n, 2, H, W] ``(dy, dx)``, ``reg_mask`` [n, 1, H, W] (see
      :func:`detection_targets`); ``model`` [n, 1, H, W]; ``segmap`` int32 [n, 1, H, W] (catalog index + 1, 0
      sky, -1 light of an object centred outside the crop); per object (padded to ``max_objects``, ``count``
      and ``valid`` say how many): ``boxes`` float32 [n, M, 4] ``(x_c, y_c, w, h)``, ``cls`` int64 (0 star,
      1 galaxy, -1 pad), ``snr``, ``flux`` (image units), ``mag``, ``paired`` (an added close companion).
      Boxes are centred on the true centre and just contain every pixel where the object's own light
      exceeds 1 sigma (``w = 2 max|x_pix - x_c| + 1`` over those pixels, likewise ``h``), at least one PSF
      FWHM wide; they are measured on the object's own rendering, not clipped to the crop.
    """
    config = _config_for(kind, config)
    _check_kind_split(kind, split)
    if not (_is_int(n) and n >= 1):
        raise ValueError(f"n={n!r}: expected an integer >= 1.")
    if not (_is_int(start) and start >= 0):
        raise ValueError(f"start={start!r}: expected an integer >= 0.")
    k = _KINDS[kind]
    out = []
    for i in range(start, start + n):
        prng, nrng = stamp_streams(kind, seed, i, split)
        out.append(k.sample(config, k.scene(config, prng), nrng, 0))
    return _collate(out)


def make_clump_batch(config: ClumpSetConfig | None = None, seed: int = 0, n: int = 16, *, split: str = "train",
                     start: int = 0) -> dict[str, np.ndarray]:
    """``make_batch('clumps', ...)``."""
    return make_batch("clumps", config, seed, n, split=split, start=start)


def make_blend_batch(config: BlendSetConfig | None = None, seed: int = 0, n: int = 16, *, split: str = "train",
                     start: int = 0) -> dict[str, np.ndarray]:
    """``make_batch('blends', ...)``."""
    return make_batch("blends", config, seed, n, split=split, start=start)


def make_field_batch(config: FieldSetConfig | None = None, seed: int = 0, n: int = 16, *, split: str = "train",
                     start: int = 0) -> dict[str, np.ndarray]:
    """``make_batch('fields', ...)``."""
    return make_batch("fields", config, seed, n, split=split, start=start)


#: kind -> (config class, batch generator ``(config, seed, n, *, split, start) -> dict``).
TRAINING_SETS: dict[str, tuple[type, Callable]] = {
    "clumps": (ClumpSetConfig, make_clump_batch),
    "blends": (BlendSetConfig, make_blend_batch),
    "fields": (FieldSetConfig, make_field_batch),
}


class StampPool:
    """Noise-free scenes rendered once; batches add a random flip/rotation and fresh noise.

    Scene ``i`` of the pool is exactly the scene of :func:`make_batch` stamp ``start + i`` of ``(kind, seed,
    split)``. :meth:`batch` picks scenes uniformly at random (with replacement), applies one of the 8
    symmetries of the square to each (images and every target are transformed or recomputed: positions,
    peaks, boxes with w and h swapped on a transpose, heatmaps, offsets) and draws new unit-variance noise.

    Parameters
    ----------
    kind, config, seed, split
        As for :func:`make_batch`.
    size : int
        Number of scenes to render (the cost: ``size`` stamps at :func:`make_batch` speed).
    start : int
        Index of the first stamp in the pool.
    """

    def __init__(self, kind: str, config=None, seed: int = 0, size: int = 256, *, split: str = "train",
                 start: int = 0):
        self.config = _config_for(kind, config)
        _check_kind_split(kind, split)
        if not (_is_int(size) and size >= 1):
            raise ValueError(f"size={size!r}: expected an integer >= 1.")
        self.kind, self.seed, self.split, self.start = kind, int(seed), split, int(start)
        k = _KINDS[kind]
        self.scenes = [k.scene(self.config, stamp_streams(kind, seed, i, split)[0])
                       for i in range(start, start + size)]

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, n: int, step: int = 0) -> dict[str, np.ndarray]:
        """Batch ``step`` of ``n`` augmented stamps; deterministic in ``(pool, n, step)``."""
        if not (_is_int(n) and n >= 1 and _is_int(step) and step >= 0):
            raise ValueError(f"n={n!r}, step={step!r}: expected integers n >= 1 and step >= 0.")
        ss = np.random.SeedSequence(self.seed, spawn_key=(KIND_KEYS[self.kind], SPLITS[self.split], _POOL_KEY,
                                                          self.start, len(self.scenes), int(step)))
        rng = np.random.default_rng(ss)
        pick = rng.integers(0, len(self.scenes), n)
        trans = rng.integers(0, 8, n)
        sample = _KINDS[self.kind].sample
        return _collate([sample(self.config, self.scenes[i], rng, int(t)) for i, t in zip(pick, trans)])


def throughput(kind: str, config=None, n: int = 32, seed: int = 0, pool: bool = False, warm: int = 16,
               pool_size: int = 16) -> float:
    """Stamps per second of :func:`make_batch` (or of :meth:`StampPool.batch` when ``pool``) on this core.

    ``warm`` stamps are rendered first (not timed): GalSim builds a table once per new Sersic index, which
    dominates the first few dozen stamps of a process. With ``pool``, a pool of ``pool_size`` scenes is
    rendered first (not timed).
    """
    if pool:
        p = StampPool(kind, config, seed, size=pool_size)
        t0 = time.perf_counter()
        p.batch(n, 0)
    else:
        make_batch(kind, config, seed, warm, start=10**6)   # GalSim builds a table per new Sersic index once
        t0 = time.perf_counter()
        make_batch(kind, config, seed, n)
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# Files and torch
# ---------------------------------------------------------------------------------------------------

def cache_to(path, batch: dict[str, np.ndarray], *, kind: str | None = None, config=None, **meta) -> Path:
    """Write ``batch`` to a compressed ``.npz`` (with the kind, config and ``meta`` as JSON under ``_meta``)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    info = dict(meta, kind=kind, config=to_dict(config) if config is not None else None)
    np.savez_compressed(path, _meta=np.array(json.dumps(info)), **batch)
    return path


def load_cached(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`cache_to`: ``(batch, meta)``."""
    with np.load(Path(path), allow_pickle=False) as z:
        batch = {k: z[k] for k in z.files if k != "_meta"}
        meta = json.loads(str(z["_meta"])) if "_meta" in z.files else {}
    return batch, meta


class TrainingStream(_IterableDataset):
    """A torch ``IterableDataset`` of ready-made batches (dicts of tensors); use ``DataLoader(batch_size=None)``.

    Batch ``b`` is ``make_batch(kind, config, seed, batch_size, split=split, start=b * batch_size)`` or, with
    ``pool_size > 0``, ``StampPool(...).batch(batch_size, step=b)`` (each worker renders its own pool).
    With several DataLoader workers, worker ``w`` of ``W`` yields the batches ``b = w, w + W, ...``.
    ``n_batches=None`` streams forever.
    """

    def __init__(self, kind: str, config=None, seed: int = 0, batch_size: int = 32, *, split: str = "train",
                 n_batches: int | None = None, pool_size: int = 0):
        if torch is None:  # pragma: no cover
            raise ImportError("TrainingStream needs torch.")
        self.kind, self.config = kind, _config_for(kind, config)
        _check_kind_split(kind, split)
        self.seed, self.batch_size, self.split = int(seed), int(batch_size), split
        self.n_batches, self.pool_size = n_batches, int(pool_size)

    def __len__(self) -> int:
        if self.n_batches is None:
            raise TypeError("an endless TrainingStream (n_batches=None) has no length.")
        return int(self.n_batches)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pool = (StampPool(self.kind, self.config, self.seed, self.pool_size, split=self.split)
                if self.pool_size > 0 else None)
        b = wid
        while self.n_batches is None or b < self.n_batches:
            if pool is not None:
                batch = pool.batch(self.batch_size, b)
            else:
                batch = make_batch(self.kind, self.config, self.seed, self.batch_size, split=self.split,
                                   start=b * self.batch_size)
            yield {k: torch.from_numpy(v) for k, v in batch.items()}
            b += nw


__all__ = ["ClumpSetConfig", "BlendSetConfig", "FieldSetConfig", "TRAINING_SETS", "SPLITS", "KIND_KEYS",
           "make_batch", "make_clump_batch", "make_blend_batch", "make_field_batch", "render_scene",
           "StampPool", "TrainingStream", "stamp_streams", "throughput", "cache_to", "load_cached",
           "detection_targets", "centernet_targets", "ownership_masks", "disc_mask", "render_point_sources",
           "psf_effective_area", "stamp_psf", "dihedral_array", "dihedral_yx"]

# The morphology set lives in its own module, which adds itself to TRAINING_SETS on import.
from . import morph_data as _morph_data  # noqa: E402,F401  (imported last: it uses names defined above)
