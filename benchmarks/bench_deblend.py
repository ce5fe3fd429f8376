"""Deblending benchmark: sep vs the deblend stage on held-out simulated pairs and on pairs of real HST galaxies,
the uncertainty's reliability, and the stage's cost on a large field.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_deblend.py [--n 400] [--size 8192]
        [--weights models/weights/deblend] [--no-field] [--no-hst] [--no-stage] [--detect-peaks] [--flips]
        [--set PARAM=VALUE]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_deblend.py --split val --seed 78 --no-stage --weights W
    .venv/bin/python benchmarks/bench_deblend.py --calibrate    # fit the uncertainty calibration (val split)

Blend sets (built reproducibly; none of them is ever used in training):

* ``sim``: :func:`deepmosaic.models.datasets.make_batch` ``'blends'`` with the default config, split
  ``'test'``, seed 2026 (training uses split 'train' and validation split 'val', seed 0);
* ``sim-bd``: the same, every galaxy bulge + disk (``bulge_disk_fraction=1``);
* ``hst``: pairs of the 100 real HST/ACS COSMOS galaxies of ``../shared/data/cosmos_hst`` (GalSim
  ``RealGalaxy``: the HST PSF deconvolved, a random rotation, the LSST-like Moffat PSF and 0.2"/px of the
  ``sim`` set, the same S/N, magnitude-difference and separation distributions); skipped with a reason when
  ``../shared`` is absent.

Each 96 x 96 stamp is pasted into a 160 x 160 canvas of unit noise and the deblenders run on it:

* ``sep``: the ``sep`` stage (defaults), its segmentation;
* ``stage``: ``sep`` then the ``deblend`` stage, exactly as in a run (the network is told sep's peaks; a
  pair that sep does not split is not deblended);
* ``stage, detect peaks`` (``--detect-peaks``): the detect stage, then the deblend stage seeded by its
  detections (``deblend.peaks=detect``);
* ``network``: the network alone, told the true centres (as in validation).

Truth: the 1-sigma "largest light wins" masks of the noise-free images. Objects are matched one-to-one by mask
(:func:`deepmosaic.pipeline.metrics.match_masks`, IoU > 0 with a Hungarian assignment; the network's own
channels are its assignment); an unmatched true galaxy scores IoU 0; a galaxy with an empty truth mask (a
companion with no pixel above 1 sigma, about a quarter of them) is not scored. Rows: mean IoU of centrals, of
companions, of companions with S/N >= 20 at >= 2 PSF FWHM; median |flux - true flux| / true flux (total
flux, and the truth's flux inside its own mask) of the deblended members (stage), of every matched galaxy
(sep's AUTO flux) or of both network masks; reliability: pixel error rate per bin of predicted uncertainty.
The stage's speed is in stamps/s: the network runs only on the stamps where sep split the pair.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cosmos_hst"
CANVAS = 160
SEED = 2026
UNC_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


# ------------------------------------------------------------------------------------------------ blend sets

def sim_set(n: int, seed: int = SEED, split: str = "test", **overrides) -> dict:
    from deepmosaic.models.datasets import make_batch
    return make_batch("blends", overrides or None, seed=seed, n=n, split=split)


def hst_set(n: int) -> dict:
    """Pairs of real HST galaxies drawn like the ``blends`` set (same PSF, S/N, dmag, separation draws)."""
    import galsim

    from deepmosaic.models.datasets import (BlendSetConfig, _draw, _draw_psf, _draw_separation, _loguniform,
                                            ownership_masks, stamp_psf)
    cfg = BlendSetConfig()
    cat = galsim.RealGalaxyCatalog("real_galaxy_catalog_26_extension_example.fits", dir=str(SHARED))
    rng = np.random.default_rng(np.random.SeedSequence(SEED, spawn_key=(7,)))
    s, c = cfg.size, (cfg.size - 1) / 2.0
    out = {k: [] for k in ("image", "masks", "isolated", "peaks", "flux", "snr", "separation_fwhm", "psf_fwhm",
                           "psf_beta")}
    for _ in range(n):
        fwhm, beta = _draw_psf(rng, cfg)
        j = rng.choice(cat.nobjects, 2, replace=False)
        angles = rng.uniform(0, 360, 2)
        cy, cx = c + rng.uniform(-cfg.center_jitter, cfg.center_jitter, 2)
        sep_fwhm = _draw_separation(rng, cfg)
        phi = rng.uniform(0, 2 * math.pi)
        peaks = np.array([[cy, cx], [cy + sep_fwhm * fwhm * math.sin(phi), cx + sep_fwhm * fwhm * math.cos(phi)]])
        snr_c = float(_loguniform(rng, *cfg.central_snr_range))
        dmag = float(rng.uniform(*cfg.delta_mag_range))
        psf = stamp_psf(fwhm, beta)
        unit = []
        for k in range(2):
            g = galsim.RealGalaxy(cat, index=int(j[k]), noise_pad_size=0).withFlux(1.0)
            g = g.rotate(float(angles[k]) * galsim.degrees).dilate(1.0 / cfg.pixel_scale)   # arcsec -> px
            unit.append(_draw(galsim.Convolve(g, psf), s, peaks[k, 1], peaks[k, 0]))
        f_c = snr_c / math.sqrt(float(np.sum(unit[0] ** 2)))
        flux = np.array([f_c, f_c * 10 ** (-0.4 * dmag)])
        iso = np.stack([flux[0] * unit[0], flux[1] * unit[1]]).astype(np.float32)
        out["image"].append((iso.sum(0) + rng.standard_normal((s, s)))[None].astype(np.float32))
        out["masks"].append(ownership_masks(iso))
        out["isolated"].append(iso)
        out["peaks"].append(peaks)
        out["flux"].append(flux)
        out["snr"].append(np.sqrt(np.sum(iso.astype(np.float64) ** 2, axis=(1, 2))))
        out["separation_fwhm"].append(sep_fwhm)
        out["psf_fwhm"].append(fwhm)
        out["psf_beta"].append(beta)
    return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ deblenders

def on_canvas(batch: dict, i: int, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """Stamp ``i`` in a CANVAS x CANVAS field of unit noise; truth labels (1 central, 2 companion); offset."""
    s = batch["image"].shape[-1]
    o = (CANVAS - s) // 2
    img = rng.standard_normal((CANVAS, CANVAS)).astype(np.float32)
    img[o:o + s, o:o + s] = batch["image"][i, 0]
    truth = np.zeros((CANVAS, CANVAS), np.int64)
    m = batch["masks"][i] > 0.5
    truth[o:o + s, o:o + s] = np.where(m[0], 1, np.where(m[1], 2, 0))
    return img, truth, o


def matched(truth: np.ndarray, pred: np.ndarray) -> dict:
    """True label -> (pred label, IoU), one-to-one by mask (IoU > 0, Hungarian)."""
    from deepmosaic.pipeline.metrics import match_masks
    t, p, v = match_masks(truth, pred, threshold=0.0)
    return {int(a): (int(b), float(c)) for a, b, c in zip(t, p, v)}


def run_stamps(batch: dict, deblend_task, detect_peaks: bool = False) -> dict:
    """sep and the stage on every stamp: per-galaxy IoU [n, 2] and measured flux [n, 2] (NaN unmatched).
    ``detect_peaks``: also the stage seeded by the detect stage's detections (``deblend.peaks=detect``, row
    'stage, detect peaks'), run on the same canvas."""
    from deepmosaic.pipeline.config import to_dict
    from deepmosaic.tasks.base import TileInput
    from deepmosaic.tasks.deblend_task import FLAG_DEBLENDED, DeblendTask
    from deepmosaic.tasks.detect_task import DetectTask
    from deepmosaic.tasks.sep_task import SepTask
    sep_task = SepTask()
    stages = {"sep": None, "stage": deblend_task}
    if detect_peaks:
        detect_task = DetectTask({"device": "cpu"})
        stages["stage, detect peaks"] = DeblendTask({**to_dict(deblend_task.config), "peaks": "detect"})
    n = len(batch["image"])
    res = {f"{k}_iou": np.zeros((n, 2)) for k in stages}
    res.update({f"{k}_flux": np.full((n, 2), np.nan) for k in stages})
    res.update({f"{k}_deblended": np.zeros((n, 2), bool) for k in stages if k != "sep"})
    rng = np.random.default_rng(SEED)
    t_stage = 0.0
    for i in range(n):
        img, truth, _ = on_canvas(batch, i, rng)
        ti = TileInput(image=img, background=np.zeros_like(img), rms=np.ones_like(img), global_rms=1.0,
                       mask=np.zeros(img.shape, bool), variance=None, origin=(0, 0),
                       core=(slice(0, CANVAS), slice(0, CANVAS)))
        ti.upstream["sep"] = sep_task.run(ti)
        outs = {"sep": ti.upstream["sep"]}
        if detect_peaks:
            ti.upstream["detect"] = detect_task.run(ti)
        for name, task in stages.items():
            if task is None:
                continue
            if task.config.refine != "none":   # the fit is told the pair's PSF (a survey knows its PSF)
                task = DeblendTask({**to_dict(task.config), "psf_fwhm": float(batch["psf_fwhm"][i]),
                                    "psf_beta": float(batch["psf_beta"][i])})
            t0 = time.perf_counter()
            outs[name] = task.run(ti)
            if name == "stage":
                t_stage += time.perf_counter() - t0
        for name, o in outs.items():
            for lab, (p, v) in matched(truth, o.maps["segmentation"]).items():
                res[f"{name}_iou"][i, lab - 1] = v
                res[f"{name}_flux"][i, lab - 1] = o.catalog["flux"][p - 1]
                if name != "sep":
                    res[f"{name}_deblended"][i, lab - 1] = bool(o.catalog["flags"][p - 1] & FLAG_DEBLENDED)
    res["stage_seconds"] = t_stage
    return res


def refine_batch(batch: dict, masks: np.ndarray, prob: np.ndarray, task):
    """Every stamp's masks refined as the stage's ``refine='sersic'`` does (its settings), each with its own
    PSF (the network is told the true centres; the fit is told the true PSF), the flux-sharing weights
    (the fitted models' shares where a fit is kept, else the network's probabilities) and which fits were
    kept: ``(masks, shares, kept [n])``."""
    from deepmosaic.models.blend_fit import model_shares, refine_masks
    out, shares, kept = np.empty_like(masks), prob.copy(), np.zeros(len(masks), bool)
    for i in range(len(masks)):
        out[i], fit = refine_masks(batch["image"][i, 0], masks[i], batch["peaks"][i], float(batch["psf_fwhm"][i]),
                                   float(batch["psf_beta"][i]), **task.fit_options())
        if fit.accepted:
            shares[i], kept[i] = model_shares(fit.models), True
    return out, shares, kept


def network_masks(batch: dict, model, n_samples: int = 8, flips: bool = False, refine_task=None):
    """``(masks, prob, raw uncertainty, kept)`` of the network told the true centres; with ``refine_task`` the
    masks refined by its Sersic fit and ``prob`` the flux-sharing weights (:func:`refine_batch`), the
    uncertainty measured against the refined masks, ``kept`` the stamps whose fit was kept (none without)."""
    import torch

    from deepmosaic.models.train import DeblendRecipe
    x = torch.from_numpy(DeblendRecipe.stamp_inputs(batch["image"], batch["peaks"]))
    prob, samples = DeblendRecipe.sample_probs(model, x, n_samples, flips=flips)
    masks = DeblendRecipe.masks_from_probs(prob)
    kept = np.zeros(len(masks), bool)
    if refine_task is not None:
        masks, prob, kept = refine_batch(batch, masks, prob, refine_task)
    return masks, prob, DeblendRecipe.error_probability(samples, masks), kept


def run_network(batch: dict, model, task, n_samples: int = 8, flips: bool = False, refine: bool = False) -> dict:
    """The network alone, told the true centres (``refine``: its masks refined by the Sersic fit): IoU [n, 2],
    labels, uncertainty and the stage's shared fluxes (with wings) per stamp."""
    from deepmosaic.models.train import DeblendRecipe
    t0 = time.perf_counter()
    masks, prob, unc, kept = network_masks(batch, model, n_samples, flips, task if refine else None)
    # as the stage does: refined stamps through the refined masks' calibration, the others the network's
    unc = np.where(kept[:, None, None], task.calibrate(unc, refined=True), task.calibrate(unc, refined=False))
    seconds = time.perf_counter() - t0
    truth = batch["masks"] > 0.5
    iou, _ = DeblendRecipe.object_ious(truth, masks)
    lab_t = np.where(truth[:, 0], 1, np.where(truth[:, 1], 2, 0))
    lab_p = np.where(masks[:, 0], 1, np.where(masks[:, 1], 2, 0))
    flux = np.full((len(prob), 2), np.nan)
    ones = np.ones(prob.shape[-2:])
    for i in range(len(prob)):
        probs = {k: prob[i, k].astype(np.float64) for k in range(2)}
        centres = {k: tuple(batch["peaks"][i][k]) for k in probs}
        f, e = np.full(2, np.nan), np.full(2, np.nan)
        task._share_flux(probs, ones > 0, batch["image"][i, 0].astype(np.float64), ones, f, e, centres,
                         report=[k for k in range(2) if masks[i, k].any()])
        flux[i] = f
    return {"iou": iou, "wrong": lab_t != lab_p, "unc": unc, "seconds": seconds, "flux": flux}


# ------------------------------------------------------------------------------------------------ tables

def subset(batch: dict) -> np.ndarray:
    """Companions with S/N >= 20 at >= 2 PSF FWHM from the central."""
    return (batch["snr"][:, 1] >= 20) & (batch["separation_fwhm"] >= 2.0)


def flux_residual(measured, true, keep) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):     # empty truth masks have no in-mask flux
        r = np.abs(measured - true) / true
    r = r[keep & np.isfinite(r)]
    return float(np.median(r)) if len(r) else float("nan")


def iou_table(name: str, batch: dict, stamps: dict | None, nets: dict) -> list[dict]:
    sub = subset(batch)
    rows = []
    stage_rows = [k[:-4] for k in (stamps or {}) if k.endswith("_iou")]       # sep, stage[, stage, detect peaks]
    cols = [(who, stamps[f"{who}_iou"]) for who in stage_rows] + [(who, net["iou"]) for who, net in nets.items()]
    # galaxies with an empty truth mask (a companion too faint for one pixel above 1 sigma) are not scored
    has = (batch["masks"] > 0.5).any(axis=(-2, -1))
    sub &= has[:, 1]
    for who, iou in cols:
        if iou is None:
            continue
        row = {"set": name, "deblender": who, "n": int(has[:, 1].sum()), "central": iou[has[:, 0], 0].mean(),
               "companion": iou[has[:, 1], 1].mean(), "companion_snr20_2fwhm": iou[sub, 1].mean(),
               "n_subset": int(sub.sum())}
        if who in nets:
            net = nets[who]
            row["flux_med_abs_resid"] = flux_residual(net["flux"], batch["flux"], np.isfinite(net["flux"]))
            in_mask = (batch["isolated"] * (batch["masks"] > 0.5)).sum(axis=(-2, -1))
            row["flux_vs_in_mask"] = flux_residual(net["flux"], in_mask, np.isfinite(net["flux"]))
        if stamps is not None and who in stage_rows:
            f = stamps[f"{who}_flux"]
            deblended = stamps.get(f"{who}_deblended")
            keep = np.isfinite(f) if deblended is None else deblended
            row["flux_med_abs_resid"] = flux_residual(f, batch["flux"], keep)
            in_mask = (batch["isolated"] * (batch["masks"] > 0.5)).sum(axis=(-2, -1))
            row["flux_vs_in_mask"] = flux_residual(f, in_mask, keep)
            row["deblended_frac"] = None if deblended is None else float(deblended.all(axis=1).mean())
        rows.append(row)
    return rows


def reliability(net: dict, bins=UNC_BINS) -> list[tuple]:
    """(bin lo, hi, pixels, mean predicted uncertainty, observed error rate) over pixels where the truth or
    the prediction is a galaxy or the uncertainty is above the first bin edge."""
    u, w = net["unc"].ravel(), net["wrong"].ravel()
    idx = np.clip(np.digitize(u, bins) - 1, 0, len(bins) - 2)
    out = []
    for b in range(len(bins) - 1):
        sel = idx == b
        if sel.any():
            out.append((bins[b], bins[b + 1], int(sel.sum()), float(u[sel].mean()), float(w[sel].mean())))
    return out


def print_tables(rows, rel):
    print("\n## IoU (one-to-one by mask; unmatched = 0) and flux residuals")
    print("| set | deblender | n (companions with a truth mask) | central IoU | companion IoU | companion S/N>=20, >=2 FWHM (n) | "
          "median abs flux resid (vs total) | (vs in-mask truth) | pairs deblended |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fr = r.get("flux_med_abs_resid")
        fm = r.get("flux_vs_in_mask")
        db = r.get("deblended_frac")
        print(f"| {r['set']} | {r['deblender']} | {r['n']} | {r['central']:.3f} | {r['companion']:.3f} | "
              f"{r['companion_snr20_2fwhm']:.3f} ({r['n_subset']}) | "
              f"{'-' if fr is None else f'{100 * fr:.1f}%'} | {'-' if fm is None else f'{100 * fm:.1f}%'} | "
              f"{'-' if db is None else f'{100 * db:.0f}%'} |")
    for name, curve in rel.items():
        print(f"\n## Uncertainty reliability ({name}, network told the true centres; all stamp pixels)")
        print("| predicted uncertainty bin | pixels | mean predicted | observed error rate |")
        print("|---|---|---|---|")
        for lo, hi, npx, mu, err in curve:
            print(f"| [{lo:.2f}, {hi:.2f}) | {npx} | {mu:.3f} | {err:.3f} |")


# ------------------------------------------------------------------------------------------------ calibration

#: bins of the raw error probability; the last one holds the pixels where every draw disagrees with the mask
#: (raw = 1): rare for the network's own masks, common for refined ones, whose error rate there is far below 1
CAL_EDGES = (0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.999, 1.0)


def calibrate(weights: str, n: int = 384, min_pixels: int = 50, refine_task=None) -> dict:
    """Fit the uncertainty calibration on the *validation* split (seed 0, as in training; the benchmark sets
    use the test split) and write it into the model card as ``extra.uncertainty_calibration``: per bin of the
    raw error probability, the mean raw value and the observed pixel error rate (bins of >= ``min_pixels``
    px, made non-decreasing), anchored at (0, 0) and (1, the last bin's rate); the stage interpolates linearly. With
    ``refine_task``: for the masks refined by its Sersic fit, as ``extra.uncertainty_calibration_sersic``."""
    from deepmosaic.models.train import RECIPES
    from deepmosaic.models.weights_io import load_model
    recipe = RECIPES["deblend"](None)
    model = load_model(weights)
    batch = recipe.batch("val", 0, n)
    masks, _, unc, kept = network_masks(batch, model, 8, refine_task=refine_task)
    truth = batch["masks"] > 0.5
    if refine_task is not None:                  # the refined masks' calibration: the stamps whose fit was kept
        masks, unc, truth = masks[kept], unc[kept], truth[kept]
    lab_t = np.where(truth[:, 0], 1, np.where(truth[:, 1], 2, 0))
    lab_p = np.where(masks[:, 0], 1, np.where(masks[:, 1], 2, 0))
    wrong, u = (lab_t != lab_p).ravel(), unc.ravel()
    edges = np.asarray(CAL_EDGES, float)
    idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
    cnt = np.bincount(idx, minlength=len(edges) - 1)
    mean_u = np.bincount(idx, weights=u, minlength=len(edges) - 1) / np.maximum(cnt, 1)
    rate = np.bincount(idx, weights=wrong, minlength=len(edges) - 1) / np.maximum(cnt, 1)
    ok = cnt >= min_pixels
    raw = np.concatenate([[0.0], mean_u[ok], [1.0]])
    cal = np.maximum.accumulate(rate[ok])
    cal = np.concatenate([[0.0], cal, [cal[-1]]])
    against = (f"the Sersic-refined masks ({len(masks)} stamps whose fit was kept)" if refine_task is not None
               else "the network's masks")
    out = {"raw": [round(float(a), 6) for a in raw], "calibrated": [round(float(b), 6) for b in cal],
           "fit": f"observed pixel error rate of {against} per bin of the raw error probability (8 prior draws) "
                  f"on {n} 'val' stamps (seed 0), bins with >= {min_pixels} px, made non-decreasing; applied by "
                  f"linear interpolation"}
    key = "uncertainty_calibration_sersic" if refine_task is not None else "uncertainty_calibration"
    path = write_card_extra(weights, **{key: out})
    print(f"calibration written into {path}: raw {out['raw']} -> {out['calibrated']}")
    return out


def write_card_extra(weights: str, **items):
    """Set ``items`` in the ``extra`` of the model card of ``weights`` (the weights file is not touched);
    returns the card's path."""
    import json

    from deepmosaic.models.weights_io import _base, _with
    path = _with(_base(weights), ".json")
    card = json.loads(path.read_text())
    card["extra"].update(items)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


SHIFT_GRID = tuple(range(0, 11))


def fit_shift(weights: str, seed: int, n: int) -> float:
    """Fit the companion logit shift (:meth:`DeblendRecipe.shift_companions`) on *validation* pairs (split
    'val', ``seed``): the shift of ``SHIFT_GRID`` with the highest mean of the central and companion IoU (network
    told the true centres, scored as in the tables) on the ``sim`` set; the ``sim-bd`` set is printed beside it.
    Writes it into the model card as ``extra.companion_logit_shift``."""
    import torch

    from deepmosaic.models.train import DeblendRecipe
    from deepmosaic.models.weights_io import load_model
    model = load_model(weights)
    table = {}
    for name, over in (("sim", {}), ("sim-bd", {"bulge_disk_fraction": 1.0})):
        batch = sim_set(n, seed, "val", **over)
        x = torch.from_numpy(DeblendRecipe.stamp_inputs(batch["image"], batch["peaks"]))
        prob, _ = DeblendRecipe.sample_probs(model, x, 0, companion_shift=0.0)
        truth = batch["masks"] > 0.5
        for s in SHIFT_GRID:
            masks = DeblendRecipe.masks_from_probs(DeblendRecipe.shift_companions(prob, s))
            iou, has = DeblendRecipe.object_ious(truth, masks)
            table[name, s] = (iou[has[:, 0], 0].mean(), iou[has[:, 1], 1].mean())
    print(f"companion logit shift on validation pairs (split 'val', seed {seed}, {n} per set; network told the "
          f"true centres): central / companion IoU")
    for s in SHIFT_GRID:
        print(f"  {s:>3}: " + "   ".join(f"{name} {table[name, s][0]:.4f} / {table[name, s][1]:.4f}"
                                          for name in ("sim", "sim-bd")))
    best = max(SHIFT_GRID, key=lambda s: sum(table["sim", s]))
    path = write_card_extra(weights, companion_logit_shift=float(best), companion_logit_shift_fit=(
        f"argmax over {list(SHIFT_GRID)} of the mean central + companion IoU on {n} 'val' pairs (seed {seed}): "
        f"central {table['sim', best][0]:.4f} / companion {table['sim', best][1]:.4f} against "
        f"{table['sim', 0][0]:.4f} / {table['sim', 0][1]:.4f} unshifted"))
    print(f"shift {best} written into {path}")
    return float(best)


# ------------------------------------------------------------------------------------------------ field

def field_benchmark(size: int, tile: int, weights: str | None, settings=()):
    """Run sep,deblend over a simulated size x size field in this process; time each stage."""
    import tempfile

    from deepmosaic.pipeline import store as st
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    from deepmosaic.tasks.deblend_task import DeblendTask
    from deepmosaic.tasks.sep_task import SepTask
    from deepmosaic.workflows import run
    spent = {"sep": 0.0, "deblend": 0.0}

    def timed(cls, key):
        orig = cls.run

        def wrapper(self, tile_input):
            t0 = time.perf_counter()
            try:
                return orig(self, tile_input)
            finally:
                spent[key] += time.perf_counter() - t0
        cls.run = wrapper
        return orig

    d = Path(tempfile.mkdtemp(prefix="bench_deblend_"))
    t0 = time.perf_counter()
    sim = simulate_mosaic(SimConfig(size=(size, size), seed=SEED))
    image, _ = write_simulation(sim, d / "field.fits")
    t_sim = time.perf_counter() - t0
    origs = timed(SepTask, "sep"), timed(DeblendTask, "deblend")
    try:
        t0 = time.perf_counter()
        sets = ["deblend.device=cpu"] + ([f"deblend.weights={weights}"] if weights else []) + \
            [f"deblend.{a}" for a in settings]
        run(str(image), str(d / "field.zarr"), stages="sep,deblend", tile=tile, workers=0, set=sets)
        total = time.perf_counter() - t0
    finally:
        SepTask.run, DeblendTask.run = origs
    cat = st.read_catalog(str(d / "field.zarr"), "deblend")
    blends = np.unique(cat["parent_id"][cat["parent_id"] > 0])
    print(f"\n## Field {size} x {size} (tile {tile}, one process, simulated in {t_sim:.0f} s)")
    print(f"objects {len(cat['id'])}, blends deblended {len(blends)}, members {int((cat['parent_id'] > 0).sum())}; "
          f"run {total:.1f} s: sep {spent['sep']:.1f} s, deblend {spent['deblend']:.1f} s "
          f"({100 * spent['deblend'] / total:.1f}% of the run); "
          f"{len(blends) / max(spent['deblend'], 1e-9):.1f} blends/s (halo windows see some blends twice)")
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="blends per set (0: no blend sets, the field run only)")
    ap.add_argument("--weights", default=None, help="deblend weights (default: the shipped ones)")
    ap.add_argument("--size", type=int, default=8192, help="side of the simulated field for the cost figures")
    ap.add_argument("--tile", type=int, default=1024, help="tile core size of the field run")
    ap.add_argument("--no-field", action="store_true", help="skip the field run")
    ap.add_argument("--no-hst", action="store_true", help="skip the real-galaxy set")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the uncertainty calibration on the validation split, write it into the card, stop")
    ap.add_argument("--fit-shift", action="store_true",
                    help="fit the companion logit shift on validation pairs (--seed, split 'val'), write it into "
                         "the card, stop")
    ap.add_argument("--flips", action="store_true", help="also the network with 8-flip averaging (8x slower)")
    ap.add_argument("--refine", action="store_true",
                    help="also the network's masks refined by the Sersic fit (deblend.refine=sersic; the fit told "
                         "each pair's PSF); with --calibrate: fit the refined masks' calibration")
    ap.add_argument("--no-stage", action="store_true", help="network only (no sep / stage rows)")
    ap.add_argument("--detect-peaks", action="store_true",
                    help="also the stage seeded by the detect stage's detections (deblend.peaks=detect)")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="'val' scores the simulated sets on validation pairs (to choose between weights without "
                         "touching the test pairs; training validates on 'val' seed 0, so pick another seed); "
                         "the real-galaxy set and the field run are held-out sets and are skipped")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the simulated sets")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                    help="deblend stage setting for the stage rows and the field run, e.g. flip_average=true")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from deepmosaic.models.weights_io import load_model, shipped
    from deepmosaic.tasks.deblend_task import DeblendTask
    weights = args.weights or str(shipped("deblend"))
    if args.calibrate:
        calibrate(weights, refine_task=DeblendTask({"device": "cpu", "weights": weights, "refine": "sersic"})
                  if args.refine else None)
        return
    if args.fit_shift:
        if args.seed in (0, SEED):
            raise SystemExit(f"--fit-shift --seed {args.seed}: use a validation seed other than 0 (training's "
                             f"validation and the uncertainty calibration) and {SEED} (the test pairs' seed).")
        fit_shift(weights, args.seed, args.n)
        return
    model = load_model(weights)
    overrides = dict(a.split("=", 1) for a in args.set)   # strings: the config coerces them
    task = DeblendTask({"device": "cpu", "weights": weights, **overrides})
    sets = {"sim": lambda: sim_set(args.n, args.seed, args.split),
            "sim-bd": lambda: sim_set(args.n, args.seed, args.split, bulge_disk_fraction=1.0)}
    if args.split == "val":
        args.no_field = True
        print(f"validation pairs (split 'val', seed {args.seed}): the hst set and the field run are skipped")
    elif args.no_hst:
        print("hst set: skipped (--no-hst)")
    elif not SHARED.exists():
        print(f"hst set: skipped ({SHARED} not present: ../shared/data is only beside the project checkout)")
    else:
        sets["hst"] = lambda: hst_set(args.n)
    rows, rel = [], {}
    for name, make in (sets.items() if args.n > 0 else ()):
        t0 = time.perf_counter()
        batch = make()
        t_make = time.perf_counter() - t0
        nets = {"network": run_network(batch, model, task)}
        if args.flips:
            nets["network, 8 flips"] = run_network(batch, model, task, flips=True)
        if args.refine:
            nets["network, refined"] = run_network(batch, model, task, refine=True)
        stamps = None if args.no_stage else run_stamps(batch, task, args.detect_peaks)
        rows += iou_table(name, batch, stamps, nets)
        rel[name] = reliability(nets["network"])
        if args.flips:
            rel[name + ", 8 flips"] = reliability(nets["network, 8 flips"])
        if args.refine:
            rel[name + ", refined"] = reliability(nets["network, refined"])
        extra = "" if stamps is None else (f"; stage {len(batch['image']) / stamps['stage_seconds']:.1f} stamps/s "
                                           f"(the network runs only where sep split the pair)")
        speed = ", ".join(f"{who} {len(batch['image']) / net['seconds']:.1f}" for who, net in nets.items())
        print(f"{name}: {len(batch['image'])} blends built in {t_make:.1f} s; blends/s (8 latent draws): {speed}"
              f"{extra}", flush=True)
    if rows:
        print_tables(rows, rel)
    if not args.no_field:
        field_benchmark(args.size, args.tile, args.weights, args.set)


if __name__ == "__main__":
    main()
