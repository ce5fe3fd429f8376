"""Morphology benchmark: the CNN stage against the profile-fit baseline on held-out simulated galaxies.

Held-out stamps come from :mod:`deepmosaic.models.morph_data`'s 'test' split with a seed never used in
training (streams disjoint from every training and validation draw), with the simulated mosaics' galaxy
ranges (:func:`~deepmosaic.models.morph_data.mosaic_population`: hlr 0.3-1.5 arcsec, n 0.5-4, q 0.3-1,
B/T 0.1-0.7, bulge/disk radius 0.2-0.6) and S/N log-uniform in [10, 500]. ``--split val --no-fit``
scores weights on validation stamps instead (to choose between weights without touching the test set). Both stages measure the *same* stamps through their ``measure`` method (the code path of the
stage after the stamps are cut): the accuracy table per S/N bin (``pipeline/eval_morphology.py``), the
68 % coverage, and the speed in galaxies per second on this CPU (torch threads = ``--threads``; the fit is
single-threaded, one galaxy after another, as in the stage).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_morphology.py --n 3000 --fit-per-bin 20 [--out results.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_morphology.py --split val --seed 8 --no-fit --weights W --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from deepmosaic.models.morph_data import make_morph_batch, mosaic_population
from deepmosaic.pipeline.eval_morphology import SNR_EDGES, format_rows, galaxy_errors, score_table
from deepmosaic.tasks.morphology_task import MorphologyFitTask, MorphologyTask


def held_out(n: int, seed: int, bd_fraction: float, psf_fwhm_arcsec: float, split: str = "test") -> dict:
    """Stamps of the simulated mosaics' galaxy population (S/N 10-500), all single Sersic or all bulge + disk."""
    cfg = mosaic_population(bulge_disk_fraction=bd_fraction, psf_fwhm=psf_fwhm_arcsec, psf_beta=3.0)
    return make_morph_batch(cfg, seed=seed, n=n, split=split)


def truth_of(batch: dict) -> dict:
    return {"hlr": batch["hlr"], "sersic_n": batch["sersic_n"], "q": batch["q"], "angle": batch["angle"],
            "bulge_frac": batch["bulge_frac"]}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def fit_subset(snr: np.ndarray, per_bin: int, min_snr: float = 0.0) -> np.ndarray:
    """The first ``per_bin`` galaxies of every S/N bin (at or above ``min_snr``)."""
    idx = []
    for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:]):
        if hi <= min_snr:
            continue
        idx.extend(np.nonzero((snr >= lo) & (snr < hi))[0][:per_bin].tolist())
    return np.array(sorted(idx), int)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("\n".join(format_rows(rows)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="single-Sersic held-out galaxies for the CNN")
    p.add_argument("--n-bd", type=int, default=1500, help="bulge + disk held-out galaxies for the CNN")
    p.add_argument("--fit-per-bin", type=int, default=20, help="galaxies per S/N bin fitted by morphology_fit")
    p.add_argument("--seed", type=int, default=9001, help="held-out seed (training used seeds 0, 1, 3 and 4)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="'val' to compare weights (the calibration uses 'val' seed 7: pick another seed)")
    p.add_argument("--no-fit", action="store_true", help="score the CNN only (no profile fit, no speed ratio)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--psf-fwhm", type=float, default=0.7, help="PSF FWHM in arcsec (0.2 arcsec/px)")
    p.add_argument("--weights", default=None)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    fwhm_px = a.psf_fwhm / 0.2
    settings = {"psf_fwhm": fwhm_px, "psf_beta": 3.0}
    cnn = MorphologyTask({**settings, "device": "cpu", "weights": a.weights})
    fit = MorphologyFitTask(settings)
    fc = fit.config
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"held-out seed {a.seed} (split '{a.split}'), weights {a.weights or 'shipped'}, PSF {fwhm_px:.2f} px Moffat beta 3")
    print(f"fit: scipy.optimize.least_squares (trf, 2-point Jacobian, bounds), Sersic (7 parameters) + bulge+disk "
          f"(8 parameters), BIC choice; oversample {fc.oversample}, max_nfev {fc.max_nfev}, stamp {fc.stamp_size} px")
    results = {"seed": a.seed, "split": a.split, "psf_fwhm_px": fwhm_px, "weights": a.weights, "fit_settings": {
        "method": "scipy.optimize.least_squares trf, 2-point finite-difference Jacobian, bounds; Sersic + "
                  "bulge/disk, BIC", "oversample": fc.oversample, "max_nfev": fc.max_nfev}}

    sets = {"sersic": held_out(a.n, a.seed, 0.0, a.psf_fwhm, a.split),
            "bulge_disk": held_out(a.n_bd, a.seed + 1, 1.0, a.psf_fwhm, a.split)}
    for name, batch in sets.items():
        stamps = batch["image"][:, 0]
        snr = batch["snr"]
        cnn.measure(stamps[:64])  # warm-up: model load
        (vals, _), t_cnn = timed(cnn.measure, stamps)
        err = galaxy_errors(vals, truth_of(batch))
        rows = score_table(err, snr)
        results[f"cnn_{name}"] = {"rows": rows, "gal_per_s": len(stamps) / t_cnn, "n": len(stamps)}
        print_table(f"CNN (morphology), {name} galaxies: {len(stamps)} stamps, {len(stamps) / t_cnn:.0f} gal/s",
                    rows)
        if a.no_fit:
            continue
        sub = fit_subset(snr, a.fit_per_bin, min_snr=50.0 if name == "bulge_disk" else 0.0)
        (fvals, fflags), t_fit = timed(fit.measure, stamps[sub])
        ferr = galaxy_errors(fvals, truth_of({k: v[sub] for k, v in batch.items()}))
        frows = score_table(ferr, snr[sub])
        crows = score_table({k: v[sub] for k, v in err.items()}, snr[sub])
        results[f"fit_{name}"] = {"rows": frows, "gal_per_s": len(sub) / t_fit, "n": int(len(sub)),
                                  "fit_failed": int((fflags & 16 > 0).sum()), "cnn_same_rows": crows}
        print_table(f"profile fit (morphology_fit), {name}: {len(sub)} stamps ({a.fit_per_bin} per S/N bin), "
                    f"{len(sub) / t_fit:.2f} gal/s, fit_failed {int((fflags & 16 > 0).sum())}", frows)
        print_table(f"CNN on the same {len(sub)} stamps", crows)
    if a.no_fit:
        return _write(results, a.out)
    speed_cnn = results["cnn_sersic"]["gal_per_s"]
    speed_fit = (results["fit_sersic"]["n"] + results["fit_bulge_disk"]["n"]) / (
        results["fit_sersic"]["n"] / results["fit_sersic"]["gal_per_s"]
        + results["fit_bulge_disk"]["n"] / results["fit_bulge_disk"]["gal_per_s"])
    results["speed"] = {"cnn_gal_per_s": speed_cnn, "fit_gal_per_s": speed_fit, "ratio": speed_cnn / speed_fit,
                        "threads": a.threads, "load_average": os.getloadavg()[0]}
    print(f"\nspeed: CNN {speed_cnn:.0f} gal/s ({a.threads} threads) vs fit {speed_fit:.3f} gal/s (1 thread): "
          f"x{speed_cnn / speed_fit:.0f}")
    _write(results, a.out)


def _write(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
