"""Galaxy morphology of every detection: a CNN with calibrated uncertainties, and a profile-fit baseline.

Two stages share one catalog schema (``MORPH_COLUMNS``) and one way of cutting stamps, so they are compared
on identical galaxies:

``morphology`` (:class:`MorphologyTask`, the neural stage)
    :class:`~deepmosaic.models.morphology.MorphNet` (shipped weights ``models/weights/morphology``) predicts
    the half-light radius, Sersic index, axis ratio, position angle and bulge-to-total ratio, each with a
    1-sigma uncertainty, in batches of ``batch_size`` stamps, on CUDA when available (``device='auto'``).
``morphology_fit`` (:class:`MorphologyFitTask`, the classical baseline)
    Least-squares fits of a PSF-convolved Sersic and of an n=4 bulge + n=1 disk to the same stamps
    (:mod:`deepmosaic.models.profile_fit`: scipy ``least_squares``, trust-region reflective, finite-difference
    Jacobian); errors from the covariance. ``sersic_n`` comes from the Sersic fit, ``bulge_frac`` from the
    bulge + disk fit, ``r_half``/``q``/``pa`` from the model with the lower BIC.

Which objects, and their ids
----------------------------
Both stages read the detection catalog of the stage named by ``detection`` (``sep`` by default, or
``detect``) from ``TileInput.upstream`` and return **one row per detection, in the detection catalog's
order, at the detection's own ``(x, y)``**. The pipeline decides ownership from ``(x, y)`` and numbers owned
rows in order, so every morphology row gets exactly the ``id`` of its detection (``catalogs/morphology/id``
== the sep/detect ``id``; tested). Rows whose centroid is outside the tile core are not measured (NaN): the
pipeline drops them. With ``detection='detect'``, objects the detector classifies as stars are not measured
either (NaN, flag ``NOT_GALAXY``).

Stamps (as in training: :mod:`deepmosaic.models.morph_data`)
-------------------------------------------------------------
``(image - background) / rms`` (the pipeline's global background model), a ``stamp_size`` square (the
network's, 48 px by default) placed so that the detection's centroid falls within half a pixel of the stamp
centre ``(S - 1) / 2``. Pixels outside the window or masked, and (``mask_neighbours``) pixels of other
detections' footprints (sep's segmentation map), are replaced by unit-variance noise drawn from a generator
seeded by the object's mosaic pixel, so a stamp does not depend on the tiling. The stamp's PSF is the
config's ``psf_fwhm`` (px) and ``psf_beta`` (the simulated mosaics' defaults: 0.7 arcsec at 0.2 arcsec/px =
3.5 px, beta 3): set them to the survey's PSF.

Stage flag bits
---------------
====  =============  ==========================================================================================
bit   name           meaning
====  =============  ==========================================================================================
1     NEIGHBOUR      other detections' light in the stamp (sep footprints; or, without a segmentation map,
                     detections within the stamp) exceeds ``neighbour_frac`` of the object's own
2     TRUNCATED      the stamp crosses the window or mosaic edge or holds masked pixels (replaced by noise)
4     OUT_OF_RANGE   a value outside the network's training range (r_half, n, q) or the PSF outside it
8     NOT_GALAXY     the detector classifies the object as a star: not measured (``detection='detect'``)
16    FIT_FAILED     ``morphology_fit``: the optimiser did not converge or the size / index hit a bound
====  =============  ==========================================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepmosaic.pipeline.config import field, require

from .base import Column, ModelTask, Task, TaskOutput, TileInput, check_model_settings
from .clumps_task import ClumpsTask, _get_model, resolve_device

NEIGHBOUR = 1
TRUNCATED = 2
OUT_OF_RANGE = 4
NOT_GALAXY = 8
FIT_FAILED = 16

FLAG_BITS = {"neighbour": NEIGHBOUR, "truncated": TRUNCATED, "out_of_range": OUT_OF_RANGE,
             "not_galaxy": NOT_GALAXY, "fit_failed": FIT_FAILED}

#: measured columns (each with ``*_err``), in catalog order
PARAMS = ("r_half", "sersic_n", "q", "pa", "bulge_frac")

MORPH_COLUMNS = {
    "x": Column("f8", "pix", "the detection's centroid x, 0-based mosaic pixels"),
    "y": Column("f8", "pix", "the detection's centroid y, 0-based mosaic pixels"),
    "r_half": Column("f8", "pix", "half-light radius before the PSF, circularised (sqrt(a b) of the half-light "
                                  "ellipse)"),
    "r_half_err": Column("f8", "pix", "1-sigma error of r_half"),
    "sersic_n": Column("f8", "", "Sersic index (of a single-Sersic model)"),
    "sersic_n_err": Column("f8", "", "1-sigma error of sersic_n"),
    "q": Column("f8", "", "axis ratio b/a"),
    "q_err": Column("f8", "", "1-sigma error of q"),
    "pa": Column("f8", "deg", "position angle of the major axis, counter-clockwise from +x, in [0, 180)"),
    "pa_err": Column("f8", "deg", "1-sigma error of pa (90: undetermined)"),
    "bulge_frac": Column("f8", "", "bulge-to-total flux ratio of an n=4 bulge + n=1 disk model"),
    "bulge_frac_err": Column("f8", "", "1-sigma error of bulge_frac"),
    "flags": Column("i8", "", "stage bits 0-7 (see tasks/morphology_task.py), pipeline bits 8+"),
}

DETECTIONS = ("sep", "detect")


def _common_checks(cfg) -> None:
    w = cfg.stage_name
    require(cfg.detection in DETECTIONS, w, "detection", cfg.detection,
            f"use one of {', '.join(DETECTIONS)} (the stage whose catalog is measured; list it before {w}).")
    require(isinstance(cfg.psf_fwhm, (int, float)) and 1.0 <= cfg.psf_fwhm <= 30.0, w, "psf_fwhm", cfg.psf_fwhm,
            "the PSF FWHM in pixels, e.g. 3.5 (0.7 arcsec at 0.2 arcsec/px).")
    require(isinstance(cfg.psf_beta, (int, float)) and 1.5 <= cfg.psf_beta <= 20.0, w, "psf_beta", cfg.psf_beta,
            "the Moffat beta of the PSF, e.g. 3.")
    require(isinstance(cfg.neighbour_frac, (int, float)) and 0.0 <= cfg.neighbour_frac <= 10.0, w,
            "neighbour_frac", cfg.neighbour_frac, "a flux ratio, e.g. 0.1.")


# --------------------------------------------------------------------------------------------- stamps

def cut_stamps(tile: TileInput, x, y, size: int, labels=None, own=None, mask_neighbours: bool = True,
               neighbour_xy=None, neighbour_flux=None, own_flux=None, neighbour_frac: float = 0.1):
    """Stamps around window positions ``(x, y)`` in units of the noise (see the module docstring).

    Parameters
    ----------
    tile : TileInput
    x, y : arrays [k]
        Window pixel centroids.
    size : int
        Stamp side.
    labels : int array [H, W] or None
        Footprint label map of the detections (row + 1, 0 = sky); ``own`` [k] the objects' own labels.
    neighbour_xy, neighbour_flux, own_flux
        Without a label map: every detection's ``(x, y)`` [m, 2] and flux [m], and the objects' own fluxes
        [k], for the position-based neighbour flag.

    Returns
    -------
    stamps float32 [k, size, size], flags int64 [k] (NEIGHBOUR, TRUNCATED), replaced bool [k, size, size]
    (pixels filled with noise: outside the window, masked, or a neighbour's footprint)
    """
    norm = ClumpsTask.normalise(tile)
    H, W = norm.shape
    ox, oy = tile.origin[1], tile.origin[0]
    c = (size - 1) / 2.0
    k = len(x)
    stamps = np.zeros((k, size, size), np.float32)
    flags = np.zeros(k, np.int64)
    replaced = np.zeros((k, size, size), bool)
    for i in range(k):
        ix0 = int(math.floor(float(x[i]) - c + 0.5))
        iy0 = int(math.floor(float(y[i]) - c + 0.5))
        ya, yb, xa, xb = max(iy0, 0), min(iy0 + size, H), max(ix0, 0), min(ix0 + size, W)
        replace = np.ones((size, size), bool)
        st = stamps[i]
        if yb > ya and xb > xa:
            st[ya - iy0:yb - iy0, xa - ix0:xb - ix0] = norm[ya:yb, xa:xb]
            replace[ya - iy0:yb - iy0, xa - ix0:xb - ix0] = tile.mask[ya:yb, xa:xb]
        if replace.any():
            flags[i] |= TRUNCATED
        if labels is not None:
            lab = np.zeros((size, size), np.int64)
            if yb > ya and xb > xa:
                lab[ya - iy0:yb - iy0, xa - ix0:xb - ix0] = labels[ya:yb, xa:xb]
            other = (lab > 0) & (lab != own[i])
            own_light = float(np.clip(st[lab == own[i]], 0, None).sum())
            if float(np.clip(st[other], 0, None).sum()) > neighbour_frac * max(own_light, 1e-9) and other.any():
                flags[i] |= NEIGHBOUR
            if mask_neighbours:
                replace |= other
        elif neighbour_xy is not None and len(neighbour_xy):
            d = np.abs(neighbour_xy - np.array([x[i], y[i]]))
            inside = (d.max(axis=1) <= size / 2) & (d.max(axis=1) > 0)
            if np.nansum(np.clip(neighbour_flux[inside], 0, None)) > neighbour_frac * max(float(own_flux[i]), 1e-9):
                flags[i] |= NEIGHBOUR
        if replace.any():
            # noise seeded by the object's mosaic pixel: the stamp does not depend on the tiling
            rng = np.random.default_rng([iy0 + oy + 2**20, ix0 + ox + 2**20])
            st[replace] = rng.standard_normal(int(replace.sum())).astype(np.float32)
        replaced[i] = replace
    return stamps, flags, replaced


def _ordered(x, y, values: dict, flags) -> dict:
    cols = {"x": x, "y": y, **values, "flags": flags}
    return {c: np.asarray(cols[c], MORPH_COLUMNS[c].dtype) for c in MORPH_COLUMNS}


# --------------------------------------------------------------------------------------------- shared base

class _MorphologyBase(Task):
    """Detection catalog -> stamps -> ``measure`` -> catalog; subclasses implement ``measure``."""

    columns = MORPH_COLUMNS
    maps: dict = {}

    def __init__(self, config=None):
        super().__init__(config)
        self.requires = (self.config.detection,)

    @property
    def stamp_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def halo(self) -> int:
        return self.stamp_size // 2 + 2

    def measure(self, stamps: np.ndarray, replaced: np.ndarray | None = None
                ) -> tuple[dict, np.ndarray]:  # pragma: no cover - abstract
        """Values (PARAMS and ``*_err`` arrays) and stage flags of stamps [k, S, S]; ``replaced`` marks the
        pixels filled with noise (the fit gives them no weight)."""
        raise NotImplementedError

    def run(self, tile: TileInput) -> TaskOutput:
        cfg = self.config
        det = tile.upstream.get(cfg.detection)
        if det is None:
            raise RuntimeError(f"{self.name}: no '{cfg.detection}' output on this tile; run --stages "
                               f"{cfg.detection},{self.name} (or set {self.name}.detection).")
        x = np.asarray(det.catalog["x"], np.float64)
        y = np.asarray(det.catalog["y"], np.float64)
        n = len(x)
        out = {p: np.full(n, np.nan) for p in PARAMS}
        out.update({p + "_err": np.full(n, np.nan) for p in PARAMS})
        flags = np.zeros(n, np.int64)
        notes: list[str] = []
        if n == 0:
            return TaskOutput(maps={}, catalog=_ordered(x, y, out, flags))
        # only centroids in the core are kept by the pipeline (one px of slack around it)
        cy, cx = tile.core
        iy, ix = np.floor(y + 0.5), np.floor(x + 0.5)
        todo = (iy >= cy.start - 1) & (iy < cy.stop + 1) & (ix >= cx.start - 1) & (ix < cx.stop + 1)
        cls = det.catalog.get("class")
        if cls is not None:
            star = np.asarray(cls) == 0
            flags[star] |= NOT_GALAXY
            todo &= ~star
        rows = np.nonzero(todo)[0]
        if len(rows):
            seg = det.maps.get("segmentation")
            if seg is not None:
                stamps, f, replaced = cut_stamps(tile, x[rows], y[rows], self.stamp_size, labels=np.asarray(seg),
                                       own=rows + 1, mask_neighbours=cfg.mask_neighbours,
                                       neighbour_frac=cfg.neighbour_frac)
            else:
                flux = np.asarray(det.catalog.get("flux", np.ones(n)), np.float64)
                stamps, f, replaced = cut_stamps(tile, x[rows], y[rows], self.stamp_size,
                                       neighbour_xy=np.c_[x, y], neighbour_flux=flux, own_flux=flux[rows],
                                       neighbour_frac=cfg.neighbour_frac)
                notes.append(f"no segmentation map from '{cfg.detection}': neighbours flagged by position and "
                             "flux, not masked")
            vals, f2 = self.measure(stamps, replaced)
            for k, v in vals.items():
                out[k][rows] = v
            flags[rows] |= f | f2
        return TaskOutput(maps={}, catalog=_ordered(x, y, out, flags), notes=notes)


# --------------------------------------------------------------------------------------------- morphology

@dataclass(frozen=True)
class _StampConfig:
    """Settings both morphology stages share: which detections, the PSF, neighbours."""

    detection: str = field("sep", "Stage whose catalog is measured: 'sep' (footprints: neighbours masked) or "
                                  "'detect' (stars skipped).")
    psf_fwhm: float = field(3.5, "PSF FWHM in pixels (the simulated mosaics: 0.7 arcsec / 0.2 arcsec/px).")
    psf_beta: float = field(3.0, "Moffat beta of the PSF.")
    mask_neighbours: bool = field(True, "Replace other detections' footprint pixels in a stamp by noise.")
    neighbour_frac: float = field(0.1, "NEIGHBOUR flag when other detections' light in the stamp exceeds this "
                                       "fraction of the object's own.")


@dataclass(frozen=True)
class MorphologyConfig(_StampConfig):
    """Settings of the ``morphology`` stage (the CNN)."""

    stage_name = "morphology"
    weights: str | None = field(None, "Weights file (NAME, NAME.safetensors or NAME.json with its model card); "
                                      "None: the shipped default models/weights/morphology.")
    batch_size: int = field(256, "Stamps per forward call.")
    device: str = field("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")

    def validate(self):
        w = self.stage_name
        _common_checks(self)
        check_model_settings(self, w)
        require(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536, w, "batch_size",
                self.batch_size, "an integer in [1, 65536], e.g. 256.")


class MorphologyTask(_MorphologyBase, ModelTask):
    """The CNN stage. The torch model is loaded once per process (never pickled with the task)."""

    name = "morphology"
    weights_kind = "morphology"
    Config = MorphologyConfig
    resources = {"GPU": 1}

    def __init__(self, config=None):
        super().__init__(config)
        self._net = None  # plain values from the model card (picklable)

    def network_info(self) -> dict:
        """Stamp size, training ranges and checksum from the model card (no weights read)."""
        if self._net is None:
            base, card = self.model_card("morphnet")
            ts = (card.get("training_set") or {}).get("config") or {}
            scale = float(ts.get("pixel_scale", 0.2))
            rng = {"r_half": [v / scale for v in ts.get("hlr_range", (0.0, np.inf))],
                   "sersic_n": list(ts.get("sersic_n_range", (0.0, np.inf))),
                   "q": [float(ts.get("q_range", (0.0, 1.0))[0]), 1.0],
                   "psf_fwhm": [v / scale for v in ts.get("psf_fwhm_range", (0.0, np.inf))],
                   "psf_beta": list(ts.get("psf_beta_range", (0.0, np.inf)))}
            self._net = {"base": base, "size": int(card["config"].get("stamp_size", 48)), "range": rng,
                         "sha256": card.get("weights", {}).get("sha256")}
        return self._net

    @property
    def stamp_size(self) -> int:
        return self.network_info()["size"]

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["weights_sha256"] = self.network_info()["sha256"]
        return fp

    __getstate__ = ClumpsTask.__getstate__

    def measure(self, stamps, replaced=None):
        from deepmosaic.models.morphology import decode, predict, prepare_inputs
        cfg = self.config
        info = self.network_info()
        device = resolve_device(cfg.device)
        model = _get_model(info["base"], device)
        x = prepare_inputs(stamps, cfg.psf_fwhm, cfg.psf_beta)
        mu, sig = predict(model, x, cfg.batch_size, device)
        vals = decode(mu, sig)
        rng = info["range"]
        flags = np.zeros(len(stamps), np.int64)
        for p in ("r_half", "sersic_n"):
            flags[(vals[p] < rng[p][0]) | (vals[p] > rng[p][1])] |= OUT_OF_RANGE
        flags[vals["q"] < rng["q"][0]] |= OUT_OF_RANGE
        if not (rng["psf_fwhm"][0] <= cfg.psf_fwhm <= rng["psf_fwhm"][1]
                and rng["psf_beta"][0] <= cfg.psf_beta <= rng["psf_beta"][1]):
            flags |= OUT_OF_RANGE
        return vals, flags


# --------------------------------------------------------------------------------------------- morphology_fit

@dataclass(frozen=True)
class MorphologyFitConfig(_StampConfig):
    """Settings of the ``morphology_fit`` baseline (PSF-convolved Sersic and bulge + disk least squares)."""

    stage_name = "morphology_fit"
    stamp_size: int = field(48, "Stamp side in px (the network's, so both stages see the same pixels).")
    oversample: int = field(3, "Sub-pixels per pixel per axis of the model rendering (3 agrees with GalSim's "
                               "FFT rendering to < 0.6 sigma of residual S/N at S/N 300).")
    max_nfev: int = field(300, "Maximum model evaluations per fit (least_squares max_nfev).")
    bulge_disk: bool = field(True, "Also fit bulge + disk (gives bulge_frac; chosen for r_half/q/pa by BIC).")

    def validate(self):
        w = self.stage_name
        _common_checks(self)
        require(isinstance(self.stamp_size, int) and 16 <= self.stamp_size <= 256, w, "stamp_size",
                self.stamp_size, "an integer in [16, 256], e.g. 48.")
        require(isinstance(self.oversample, int) and 1 <= self.oversample <= 9, w, "oversample", self.oversample,
                "an integer in [1, 9], e.g. 3.")
        require(isinstance(self.max_nfev, int) and self.max_nfev >= 10, w, "max_nfev", self.max_nfev,
                "an integer >= 10, e.g. 300.")


class MorphologyFitTask(_MorphologyBase):
    """The profile-fit baseline, one galaxy at a time (``fit_stamp``)."""

    name = "morphology_fit"
    Config = MorphologyFitConfig

    @property
    def stamp_size(self) -> int:
        return self.config.stamp_size

    def measure(self, stamps, replaced=None):
        from deepmosaic.models.profile_fit import ProfileRenderer, fit_stamp
        cfg = self.config
        renderer = ProfileRenderer(cfg.stamp_size, cfg.psf_fwhm, cfg.psf_beta, oversample=cfg.oversample)
        k = len(stamps)
        vals = {p: np.full(k, np.nan) for p in PARAMS}
        vals.update({p + "_err": np.full(k, np.nan) for p in PARAMS})
        flags = np.zeros(k, np.int64)
        for i in range(k):
            weight = np.ones(stamps.shape[1:]) if replaced is None else (~replaced[i]).astype(float)
            r = fit_stamp(stamps[i].astype(np.float64), weight, renderer, cfg.bulge_disk, cfg.max_nfev)
            for p in PARAMS:
                vals[p][i], vals[p + "_err"][i] = r[p], r[p + "_err"]
            if r["fit_failed"]:
                flags[i] |= FIT_FAILED
        return vals, flags


__all__ = ["MorphologyTask", "MorphologyFitTask", "MorphologyConfig", "MorphologyFitConfig", "MORPH_COLUMNS",
           "FLAG_BITS", "cut_stamps"]
