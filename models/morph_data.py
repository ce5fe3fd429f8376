"""Seeded simulated galaxy stamps for the morphology regression network (training set ``morphology``).

Every stamp is one galaxy (single Sersic, or an n=4 bulge + n=1 disk with a common axis ratio and angle)
rendered exactly as the mosaic simulator renders it (:func:`deepmosaic.pipeline.simulate.galaxy_profile`:
truncated profiles, circularised half-light radius of the whole profile, angles in degrees counter-clockwise
from +x), convolved with a truncated Moffat PSF and pixel-integrated by GalSim's FFT path, near the stamp
centre (uniform sub-pixel offset of up to ``center_jitter`` px per axis), in a ``size`` x ``size`` stamp.
Images are ``light / noise_sigma + unit-variance Gaussian noise`` (no sky), with the galaxy's matched-filter
S/N ``sqrt(sum(I**2))`` (over the stamp, noise sigma 1) drawn log-uniform from ``snr_range``. With
``core_fraction`` > 0, that fraction of the galaxies takes its radius, index and axis ratio from the
``core_*`` sub-ranges (by default the simulated mosaics'), which weights training towards the galaxies the
stage meets without narrowing the range it is trained on (and flags outside of).
:func:`mosaic_population` is the mosaics' population itself (held-out benchmark, sigma calibration).

Targets (per stamp): ``hlr`` (px), ``sersic_n`` (the Sersic index; 1 for bulge + disk, where it is not a
target), ``q``, ``angle`` (deg, [0, 180)), ``bulge_frac`` (B/T; 0 for single Sersic, where it is not a
target), ``is_bd`` (bulge + disk or not), ``snr``, ``psf_fwhm`` (px), ``psf_beta``.

Seeds and splits follow :mod:`deepmosaic.models.datasets`: stamp ``i`` of ``(seed, split)`` draws its
parameters and its noise from ``SeedSequence(seed, spawn_key=(MORPH_KIND_KEY, SPLITS[split], i))``; the
'train', 'val' and 'test' splits never share a draw. :class:`MorphPool` renders noise-free unit-S/N scenes
once and serves batches with a fresh S/N, one of the 8 flips/rotations of the square (angle transformed with
it) and fresh noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import galsim
import numpy as np

from deepmosaic.pipeline.config import field, from_mapping
from deepmosaic.pipeline.simulate import (BULGE_FRAC_RANGE, BULGE_HLR_RATIO_RANGE, SERSIC_N_STEP, SimConfig,
                                          galaxy_profile)

from .datasets import (BULGE_STEP, SPLITS, _draw, _draw_psf, _grid, _is_int, _loguniform, _num,
                       _rng_pair, _validate_common, dihedral_array, dihedral_yx, stamp_psf)

#: spawn-key component of this training set (datasets.KIND_KEYS uses 1..3)
MORPH_KIND_KEY = 4
#: spawn-key component of MorphPool batch streams
_POOL_KEY = 2**31 - 2


@dataclass(frozen=True)
class MorphSetConfig:
    """Single-galaxy stamps for the morphology network. Frozen; :meth:`validate` checks every field."""

    size: int = field(48, "Stamp side in px (square stamps); the morphology stage cuts stamps of this size.")
    pixel_scale: float = field(0.2, "Pixel scale in arcsec/px (LSST-like 0.2, as the simulated mosaics).")
    psf_fwhm_range: tuple[float, float] = field(
        (0.5, 1.0), "PSF FWHM range in arcsec (Moffat), drawn uniformly per stamp; the network is told the PSF.")
    psf_beta_range: tuple[float, float] = field((2.5, 4.5), "Moffat beta range, drawn per stamp on a 0.5 grid.")
    snr_range: tuple[float, float] = field(
        (6.0, 500.0), "Matched-filter S/N of the galaxy, log-uniform (wider than the 10-300 scored range).")
    hlr_range: tuple[float, float] = field(
        (0.25, 1.8), "Half-light radius range in arcsec (log-uniform); the mosaics use 0.3-1.5.")
    sersic_n_range: tuple[float, float] = field(
        (0.4, 5.0), "Sersic index range of single-Sersic galaxies (0.05 grid); the mosaics use 0.5-4.")
    q_range: tuple[float, float] = field((0.2, 1.0), "Axis ratio b/a range (uniform); the mosaics use 0.3-1.")
    bulge_disk_fraction: float = field(0.4, "Fraction of galaxies drawn as bulge (n=4) + disk (n=1).")
    bulge_frac_range: tuple[float, float] = field(
        (0.05, 0.8), "Bulge flux fraction (B/T) range of bulge + disk galaxies; the mosaics use 0.1-0.7.")
    bulge_hlr_ratio_range: tuple[float, float] = field(
        (0.15, 0.65), "Bulge hlr / disk hlr range of bulge + disk galaxies; the mosaics use 0.2-0.6.")
    center_jitter: float = field(1.0, "Galaxy centre = stamp centre (size-1)/2 + uniform(-j, j) px per axis.")
    core_fraction: float = field(
        0.0, "Fraction of galaxies whose hlr, n and q are drawn from the core_* ranges instead (sub-ranges of the "
             "full ones): more weight on the population the stage is used on, the stated range unchanged.")
    core_hlr_range: tuple[float, float] = field((0.3, 1.5), "Core half-light radius range in arcsec (log-uniform).")
    core_sersic_n_range: tuple[float, float] = field((0.5, 4.0), "Core Sersic index range (0.05 grid).")
    core_q_range: tuple[float, float] = field((0.3, 1.0), "Core axis ratio range (uniform).")

    def validate(self) -> "MorphSetConfig":
        """Check every field; raise :class:`~deepmosaic.pipeline.errors.ConfigError` naming the first bad one."""
        w = "morphology"
        _validate_common(self, w, 16)
        _rng_pair(w, "snr_range", self.snr_range, 1e-3, 1e7, "e.g. (6, 500).")
        _num(w, "center_jitter", self.center_jitter, 0.0, self.size / 8, "px, e.g. 1.0.")
        _num(w, "core_fraction", self.core_fraction, 0.0, 1.0, "a fraction in [0, 1], e.g. 0.5.")
        for name in ("hlr", "sersic_n", "q"):
            full = getattr(self, f"{name}_range")
            _rng_pair(w, f"core_{name}_range", getattr(self, f"core_{name}_range"), full[0], full[1],
                      f"keep the core inside {name}_range={tuple(full)}.")
        return self


def mosaic_population(bulge_disk_fraction: float | None = None, psf_fwhm: float | None = None,
                      psf_beta: float | None = None, snr_range: tuple[float, float] = (10.0, 500.0)
                      ) -> MorphSetConfig:
    """Stamps of the galaxies the stage meets in the simulated mosaics: the simulator's default galaxy ranges
    (:class:`~deepmosaic.pipeline.simulate.SimConfig`: hlr, n, q, bulge + disk fraction and B/T, bulge/disk
    radius ratio) and its one PSF (FWHM ``psf_fwhm`` arcsec, Moffat ``psf_beta``; default the simulator's),
    with S/N log-uniform in ``snr_range`` (default the scored 10-500). The held-out benchmark and the
    sigma calibration draw from it (with different seeds and splits)."""
    sim = SimConfig()
    fwhm = sim.psf_fwhm if psf_fwhm is None else float(psf_fwhm)
    beta = sim.psf_beta if psf_beta is None else float(psf_beta)
    bd = sim.bulge_disk_fraction if bulge_disk_fraction is None else float(bulge_disk_fraction)
    return MorphSetConfig(pixel_scale=sim.pixel_scale, psf_fwhm_range=(fwhm, fwhm), psf_beta_range=(beta, beta),
                          snr_range=tuple(snr_range), hlr_range=tuple(sim.hlr_range),
                          sersic_n_range=tuple(sim.sersic_n_range), q_range=tuple(sim.q_range),
                          bulge_disk_fraction=bd, bulge_frac_range=BULGE_FRAC_RANGE,
                          bulge_hlr_ratio_range=BULGE_HLR_RATIO_RANGE).validate()


def morph_streams(seed: int, index: int, split: str = "train") -> tuple[np.random.Generator, np.random.Generator]:
    """``(parameters, noise)`` generators of stamp ``index`` of ``(seed, split)`` (independent streams)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}.")
    if not (_is_int(seed) and seed >= 0 and _is_int(index) and index >= 0):
        raise ValueError(f"seed={seed!r}, index={index!r}: expected integers >= 0.")
    ss = np.random.SeedSequence(int(seed), spawn_key=(MORPH_KIND_KEY, SPLITS[split], int(index)))
    a, b = ss.spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def draw_params(cfg: MorphSetConfig, rng: np.random.Generator) -> dict:
    """One galaxy's parameters (a fixed number of draws, so the stream layout never depends on the outcome)."""
    fwhm, beta = _draw_psf(rng, cfg)
    hlr = float(_loguniform(rng, *cfg.hlr_range)) / cfg.pixel_scale
    q = float(rng.uniform(*cfg.q_range))
    angle = float(rng.uniform(0.0, 180.0))
    n = _grid(rng.uniform(*cfg.sersic_n_range), SERSIC_N_STEP, *cfg.sersic_n_range)
    bd = bool(rng.random() < cfg.bulge_disk_fraction)
    bf = _grid(rng.uniform(*cfg.bulge_frac_range), BULGE_STEP / 5, *cfg.bulge_frac_range)
    ratio = _grid(rng.uniform(*cfg.bulge_hlr_ratio_range), BULGE_STEP, *cfg.bulge_hlr_ratio_range)
    c = (cfg.size - 1) / 2.0
    cy, cx = c + rng.uniform(-cfg.center_jitter, cfg.center_jitter, 2)
    snr = float(_loguniform(rng, *cfg.snr_range))
    if cfg.core_fraction > 0:  # drawn after the rest, so that core_fraction=0 keeps the original streams
        core = bool(rng.random() < cfg.core_fraction)
        hlr_c = float(_loguniform(rng, *cfg.core_hlr_range)) / cfg.pixel_scale
        q_c = float(rng.uniform(*cfg.core_q_range))
        n_c = _grid(rng.uniform(*cfg.core_sersic_n_range), SERSIC_N_STEP, *cfg.core_sersic_n_range)
        if core:
            hlr, q, n = hlr_c, q_c, n_c
    return dict(psf_fwhm=fwhm, psf_beta=beta, hlr=hlr, q=q, angle=angle, sersic_n=1.0 if bd else n,
                bulge_frac=bf if bd else 0.0, bulge_hlr_ratio=ratio if bd else 0.4, is_bd=bd,
                y=float(cy), x=float(cx), snr=snr)


def render_galaxy(p: dict, size: int) -> np.ndarray:
    """Noise-free PSF-convolved, pixel-integrated image of galaxy ``p`` (keys of :func:`draw_params`), unit
    matched-filter S/N (``sum(I**2) == 1``), float64 ``[size, size]``."""
    prof = galaxy_profile(1.0, p["hlr"], sersic_n=p["sersic_n"], q=p["q"], angle=p["angle"],
                          bulge_frac=p["bulge_frac"], bulge_hlr_ratio=p["bulge_hlr_ratio"])
    img = _draw(galsim.Convolve(prof, stamp_psf(p["psf_fwhm"], p["psf_beta"])), size, p["x"], p["y"])
    return img / math.sqrt(float(np.sum(img * img)))


def _scene(cfg: MorphSetConfig, rng: np.random.Generator) -> dict:
    p = draw_params(cfg, rng)
    p["unit"] = render_galaxy(p, cfg.size).astype(np.float32)
    return p


_KEYS = ("hlr", "sersic_n", "q", "angle", "bulge_frac", "bulge_hlr_ratio", "snr", "psf_fwhm", "psf_beta")


def _sample(sc: dict, noise_rng: np.random.Generator, t: int = 0, snr: float | None = None) -> dict:
    size = sc["unit"].shape[-1]
    snr = sc["snr"] if snr is None else snr
    model = dihedral_array(sc["unit"], t) * np.float32(snr)
    yx = dihedral_yx(np.array([sc["y"], sc["x"]]), t, size)
    # position angle (counter-clockwise from +x) under the square's symmetries: a transpose mirrors about
    # y = x (theta -> 90 - theta), a flip of y or of x mirrors about an axis (theta -> -theta or 180 - theta)
    ang = sc["angle"]
    if t & 4:
        ang = 90.0 - ang
    if t & 2:
        ang = -ang
    if t & 1:
        ang = 180.0 - ang
    noise = noise_rng.standard_normal((size, size), dtype=np.float32)
    out = {k: np.float32(sc[k]) for k in _KEYS}
    out.update(image=(model + noise)[None], angle=np.float32(ang % 180.0), snr=np.float32(snr),
               is_bd=np.bool_(sc["is_bd"]), center=yx.astype(np.float32))
    return out


def _collate(samples: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in samples[0]}


def _config(config) -> MorphSetConfig:
    if config is None:
        config = MorphSetConfig()
    elif isinstance(config, dict):
        config = from_mapping(MorphSetConfig, config, where="morphology")
    elif not isinstance(config, MorphSetConfig):
        raise TypeError(f"config={type(config).__name__}: expected MorphSetConfig or a dict of its fields.")
    return config.validate()


def make_morph_batch(config: MorphSetConfig | dict | None = None, seed: int = 0, n: int = 16, *,
                     split: str = "train", start: int = 0) -> dict[str, np.ndarray]:
    """Stamps ``start .. start + n - 1`` of ``(seed, split)``, freshly rendered.

    Returns
    -------
    dict of numpy arrays, first axis n: ``image`` float32 [n, 1, S, S] (light / sigma + unit noise),
    ``hlr`` (px), ``sersic_n``, ``q``, ``angle`` (deg), ``bulge_frac``, ``bulge_hlr_ratio``, ``snr``,
    ``psf_fwhm`` (px), ``psf_beta`` float32 [n]; ``is_bd`` bool [n]; ``center`` float32 [n, 2] ``(y, x)``.
    """
    cfg = _config(config)
    if not (_is_int(n) and n >= 1 and _is_int(start) and start >= 0):
        raise ValueError(f"n={n!r}, start={start!r}: expected integers n >= 1, start >= 0.")
    out = []
    for i in range(start, start + n):
        prng, nrng = morph_streams(seed, i, split)
        out.append(_sample(_scene(cfg, prng), nrng))
    return _collate(out)


class MorphPool:
    """Noise-free unit-S/N scenes rendered once; :meth:`batch` draws scenes at random with a fresh log-uniform
    S/N, a random flip/rotation (the angle and centre follow) and fresh noise; deterministic in
    ``(pool, n, step)``. Scene ``i`` is the scene of :func:`make_morph_batch` stamp ``start + i``."""

    def __init__(self, config=None, seed: int = 0, size: int = 1024, *, split: str = "train", start: int = 0):
        self.config = _config(config)
        if not (_is_int(size) and size >= 1):
            raise ValueError(f"size={size!r}: expected an integer >= 1.")
        self.seed, self.split, self.start = int(seed), split, int(start)
        self.scenes = [_scene(self.config, morph_streams(seed, i, split)[0]) for i in range(start, start + size)]

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, n: int, step: int = 0) -> dict[str, np.ndarray]:
        ss = np.random.SeedSequence(self.seed, spawn_key=(MORPH_KIND_KEY, SPLITS[self.split], _POOL_KEY,
                                                          self.start, len(self.scenes), int(step)))
        rng = np.random.default_rng(ss)
        pick = rng.integers(0, len(self.scenes), n)
        trans = rng.integers(0, 8, n)
        snr = _loguniform(rng, *self.config.snr_range, n)
        return _collate([_sample(self.scenes[i], rng, int(t), float(s)) for i, t, s in zip(pick, trans, snr)])


__all__ = ["MorphSetConfig", "MorphPool", "make_morph_batch", "mosaic_population", "draw_params", "render_galaxy", "morph_streams"]


def _register() -> None:
    from . import datasets
    datasets.TRAINING_SETS.setdefault("morphology", (MorphSetConfig, make_morph_batch))


_register()
