"""Clump stages on a held-out clumpy mosaic (completeness/purity per S/N bin, clumps vs clumps_sep), and the
``clumps`` stage's throughput against a bare batched forward pass of the same network.

    .venv/bin/python benchmarks/bench_clumps.py                      # both parts, defaults below
    .venv/bin/python benchmarks/bench_clumps.py --skip-throughput    # accuracy only
    .venv/bin/python benchmarks/bench_clumps.py --skip-eval --size 4096 --tile 2048
    .venv/bin/python benchmarks/bench_clumps.py --choose-threshold --val-mosaics 8101,8102,8103 [--weights W]

Accuracy: ``deepmosaic simulate`` with ``--clumps`` (clumpy hosts on top of the usual random population) at
a seed never used in training (the clump training set draws its scenes from its own SeedSequence streams;
its 'mosaic' layout runs the mosaic simulator on small mosaics with seeds >= 2**24, never these small seeds), ``deepmosaic run --stages sep,clumps,clumps_sep``, ``deepmosaic evaluate`` (clump
stages against the truth's CLUMPS table, one-to-one within 1.5 px), a check of the issue's targets, and
the S/N >= 10 completeness per bin of clump-to-host contrast. ``--density 0`` drops the ordinary galaxies
and stars (the decoys) and keeps the same clumpy hosts and clumps: clumpy galaxies alone.

Throughput: a ``--size`` x ``--size`` field (the held-out mosaic's pixels repeated) cut into ``--tile`` tiles
with the stage's halo, as the runner does; the stage's ``run`` per tile (normalisation, patches with their
network halo, forward, sep on the probability map, catalog; no I/O) against the same network's forward
pass over the same pixels cut into bare ``--tile`` blocks, batched by the stage's ``batch_size``, in the same
process, each the best of ``--repeats`` timings. Mpix/s counts core pixels for both.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np

#: The issue's targets. "5 <= S/N < 10: completeness >= 0.50 at the same purity" is read as: at the same
#: operating point, with the catalog's purity (detections matched to any true clump over all detections)
#: >= 0.97. ``purity_snr5_10`` (the bin's matches against every false detection, bright ones included) is
#: printed beside it, as the stricter per-bin figure.
TARGETS = (("completeness_snr10", 0.97), ("purity_snr10", 0.97), ("completeness_snr5_10", 0.50),
           ("purity", 0.97))


#: ordinary (non-clumpy) objects per Mpix on the held-out and validation mosaics: the decoys
DENSITY = 300.0
#: bin edges of the clump-to-host contrast for the completeness table (clump flux over the host's smooth
#: light in the PSF's effective area at the clump: 0.05 is a clump of 5 % of the light under it)
CONTRAST_EDGES = (0.0, 0.05, 0.1, 0.3, 1.0, math.inf)


def simulate(path: str, size: int, seed: int, clumps: float, density: float = DENSITY):
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    t0 = time.perf_counter()
    sim = simulate_mosaic(SimConfig(size=(size, size), seed=seed, density=density, clumpy_density=clumps))
    img, truth = write_simulation(sim, path, overwrite=True)
    print(f"simulated {size}x{size} (seed {seed}): {len(sim.truth)} objects, {len(sim.clumps)} clumps in "
          f"{time.perf_counter() - t0:.0f} s")
    return sim, img, truth


def accuracy(a, tmp: str):
    from deepmosaic.pipeline.eval_clumps import SNR_BINS
    from deepmosaic.pipeline.evaluate import evaluate_store, format_summary
    from deepmosaic.workflows.api import run
    sim, img, truth = simulate(os.path.join(tmp, "heldout.fits"), a.eval_size, a.seed, a.clumps, a.density)
    store = os.path.join(tmp, "heldout.zarr")
    sets = [f"clumps.threshold={a.threshold}"] if a.threshold is not None else []
    sets += [f"clumps.weights={a.weights}"] if a.weights else []
    sets += [f"clumps.{v}" for v in a.set]
    t0 = time.perf_counter()
    run(str(img), store, stages="sep,clumps,clumps_sep", tile=a.eval_tile, workers=0, overwrite=True, set=sets)
    print(f"pipeline (sep, clumps, clumps_sep; tile {a.eval_tile}, synchronous): {time.perf_counter() - t0:.0f} s")
    res = evaluate_store(store, truth, stages="clumps,clumps_sep")
    print(format_summary(res))
    s = res["_clumps"]
    print("\ntargets (clumps):")
    for key, goal in TARGETS:
        v = s["clumps"].get(key)
        print(f"  {key:<22} {'-' if v is None else f'{v:.3f}'}  (target >= {goal})  "
              f"{'met' if v is not None and v >= goal else 'NOT met'}")
    v = s["clumps"].get("purity_snr5_10")
    print(f"  {'(purity_snr5_10':<22} {'-' if v is None else f'{v:.3f}'}  per-bin figure: the bin's matches "
          f"against every false detection)")
    for name in SNR_BINS:
        d = s["clumps"]["versus"][name]
        print(f"  better than clumps_sep in {name:<8}: {d['better']}  (F1 {d['f1']} vs {d['baseline_f1']})")
    contrast_table(sim, store)
    return sim


def contrast_table(sim, store: str, snr_min: float = 10.0):
    """Completeness of the S/N >= ``snr_min`` clumps per bin of clump-to-host contrast, per clump stage."""
    from deepmosaic.pipeline.eval_clumps import score_clumps
    from deepmosaic.pipeline.store import read_catalog
    truth = {k: np.asarray(sim.clumps[k], float) for k in ("x", "y", "snr", "contrast")}
    bright = truth["snr"] >= snr_min
    bins = list(zip(CONTRAST_EDGES[:-1], CONTRAST_EDGES[1:]))
    print(f"\ncompleteness of S/N >= {snr_min:g} clumps against clump-to-host contrast (clumps in the bin):")
    print("  stage       " + "  ".join(f"{lo:g}-{hi:g}".rjust(10) for lo, hi in bins))
    for stage in ("clumps", "clumps_sep"):
        cat = read_catalog(store, stage)
        _, match = score_clumps(truth, np.c_[np.asarray(cat["x"], float), np.asarray(cat["y"], float)])
        cells = []
        for lo, hi in bins:
            sel = bright & (truth["contrast"] >= lo) & (truth["contrast"] < hi)
            cells.append(f"{match['found'][sel].mean():.3f} ({sel.sum()})" if sel.any() else "-")
        print(f"  {stage:<11} " + "  ".join(c.rjust(10) for c in cells))


def throughput(a, sim):
    import torch
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.tasks.base import TileInput
    from deepmosaic.tasks.clumps_task import ClumpsTask, _get_model, resolve_device
    if sim is None:
        sim = simulate_mosaic(SimConfig(size=(1024, 1024), seed=a.seed, density=a.density, clumpy_density=a.clumps))
    n, T = a.size, a.tile
    reps = -(-n // sim.image.shape[0])
    sky = float(np.median(sim.sky))
    field = np.tile(sim.image - sky, (reps, reps))[:n, :n].astype(np.float32)
    sigma = float(sim.config.noise_sigma)
    task = ClumpsTask({"batch_size": a.batch_size, "patch": a.patch})
    h = task.halo
    info = task.network_info()
    device = resolve_device(task.config.device)
    model = _get_model(info["base"], device)
    print(f"\nthroughput: {n}x{n} field, tile {T}, stage halo {h} (network {info['halo']} + margin), patch "
          f"<= {task.config.patch}, batch {a.batch_size}, device {device}, torch threads {torch.get_num_threads()}")
    zeros = np.zeros_like(field)
    # warm-up (model load, first-call allocations) on a small window, not timed
    task.probability(field[:256, :256] / sigma, (0, 0))

    x = torch.from_numpy(field / sigma)
    t_stage = t_bare = 0.0
    n_obj = 0
    cores = [(y0, x0) for y0 in range(0, n, T) for x0 in range(0, n, T)]
    # interleaved: a group of batch_size tiles through the stage, then the same cores as one bare batch, so
    # that a shared machine's changing load hits both alike; each timed --repeats times, the best kept
    for g0 in range(0, len(cores), a.batch_size):
        group = cores[g0:g0 + a.batch_size]
        for y0, x0 in group:
            wy0, wx0 = max(0, y0 - h), max(0, x0 - h)
            wy1, wx1 = min(n, y0 + T + h), min(n, x0 + T + h)
            win = (slice(wy0, wy1), slice(wx0, wx1))
            shape = (wy1 - wy0, wx1 - wx0)
            tile = TileInput(image=field[win], background=zeros[win], rms=np.full(shape, sigma, np.float32),
                             global_rms=sigma, mask=np.zeros(shape, bool), variance=None, origin=(wy0, wx0),
                             core=(slice(y0 - wy0, min(n, y0 + T) - wy0), slice(x0 - wx0, min(n, x0 + T) - wx0)),
                             at_mosaic_edge=(wy0 == 0, wy1 == n, wx0 == 0, wx1 == n))
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                out = task.run(tile)
                best = min(best, time.perf_counter() - t0)
            t_stage += best
            n_obj += len(out.catalog["x"])
        with torch.inference_mode():
            batch = torch.stack([x[y0:y0 + T, x0:x0 + T] for y0, x0 in group])[:, None].to(device)
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                p = torch.sigmoid(model(batch).float()).cpu()
                best = min(best, time.perf_counter() - t0)
                del p
            t_bare += best
    mpix = n * n / 1e6
    print(f"  bare batched forward : {mpix / t_bare:8.3f} Mpix/s  ({t_bare:.1f} s)")
    print(f"  clumps stage (run)   : {mpix / t_stage:8.3f} Mpix/s  ({t_stage:.1f} s, {n_obj} blobs incl. halo)")
    print(f"  stage / bare         : {t_bare / t_stage:8.3f}  (target >= 0.85)")


def choose_threshold(a):
    """Sweep the probability threshold on the training recipe's validation canvases (never the held-out mosaic)."""
    import torch
    from deepmosaic.models.train import RECIPES
    from deepmosaic.models.weights_io import load_model, read_card, shipped
    base = a.weights or shipped("clumps")
    card = read_card(base)
    recipe = RECIPES["clumps"](card["training_set"]["config"])
    model = load_model(base).eval()
    val_seed = int(card.get("seed", 0)) if a.val_seed is None else a.val_seed
    batch = recipe.batch("val", val_seed, a.val_size)
    with torch.inference_mode():
        prob = torch.sigmoid(model(torch.from_numpy(batch["image"]))).numpy()
    print(f"threshold sweep on {a.val_size} validation canvases (split 'val', seed {val_seed}; {base}):")
    best = None
    for thr in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        recipe.threshold = thr
        r = recipe.evaluate(_Fixed(prob), batch)
        print(f"  {thr:.1f}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        if best is None or r["f1"] > best[1]:
            best = (thr, r["f1"])
    print(f"best F1 (S/N >= {recipe.score_snr:g}) at threshold {best[0]}")


def choose_threshold_mosaics(a):
    """Sweep the threshold through the whole stage on validation mosaics (``--val-mosaics``, never the held-out
    seed): the stage's own sep extraction, seams and all, pooled over the mosaics; best F1 over S/N >= 10."""
    from deepmosaic.pipeline import metrics
    from deepmosaic.pipeline.eval_clumps import score_clumps
    from deepmosaic.pipeline.store import read_catalog
    from deepmosaic.workflows.api import run
    seeds = [int(v) for v in a.val_mosaics.split(",")]
    if a.seed in seeds:
        raise SystemExit(f"--val-mosaics {a.val_mosaics}: the held-out seed {a.seed} cannot be a validation mosaic")
    thresholds = [float(v) for v in a.thresholds.split(",")]
    weights = ([f"clumps.weights={a.weights}"] if a.weights else []) + [f"clumps.{v}" for v in a.set]
    keys = ("n_true_snr10", "n_tp_snr10", "n_true_snr5_10", "n_tp_snr5_10", "n_fp", "n_pred", "n_tp")
    tot = {t: dict.fromkeys(keys, 0) for t in thresholds}
    with tempfile.TemporaryDirectory(prefix="bench_clumps_val_") as tmp:
        for seed in seeds:
            sim, img, _ = simulate(os.path.join(tmp, f"val{seed}.fits"), a.eval_size, seed, a.clumps, a.density)
            truth = {k: np.asarray(sim.clumps[k]) for k in ("x", "y", "snr")}
            for t in thresholds:
                store = os.path.join(tmp, f"val{seed}.zarr")
                run(str(img), store, stages="sep,clumps", tile=a.eval_tile, workers=0, overwrite=True,
                    set=[f"clumps.threshold={t}"] + weights)
                cat = read_catalog(store, "clumps")
                summary, _ = score_clumps(truth, np.c_[np.asarray(cat["x"]), np.asarray(cat["y"])])
                for k in keys:
                    tot[t][k] += summary[k]
    print(f"threshold sweep on validation mosaics {seeds} ({a.eval_size}^2, {a.clumps:g} clumpy hosts/Mpix; "
          f"weights {a.weights or 'shipped'}{''.join(', ' + v for v in a.set)}):")
    best = None
    for t in thresholds:
        c = tot[t]
        # S/N >= 10: every false detection counts against the bin (as score_clumps' purity_snr10)
        r = metrics.detection_scores(c["n_true_snr10"], c["n_tp_snr10"] + c["n_fp"], c["n_tp_snr10"])
        f1 = r["f1"]
        print(f"  {t:.2f}: S/N>=10 completeness {r['completeness']:.3f} purity {r['purity']:.3f} F1 {f1:.3f} | "
              f"5-10 completeness {c['n_tp_snr5_10'] / max(c['n_true_snr5_10'], 1):.3f} | catalog purity "
              f"{c['n_tp'] / max(c['n_pred'], 1):.3f} ({c['n_fp']} false of {c['n_pred']})")
        if best is None or f1 > best[1]:
            best = (t, f1)
    print(f"best S/N >= 10 F1 at threshold {best[0]}")


class _Fixed:
    """Stands in for the network: returns the logits of precomputed probabilities."""

    def __init__(self, prob):
        import torch
        self.logits = torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))
        self.i = 0

    def __call__(self, x):
        out = self.logits[self.i:self.i + len(x)]
        self.i += len(x)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-size", type=int, default=2048, help="held-out mosaic side (px)")
    p.add_argument("--seed", type=int, default=9001, help="held-out simulation seed")
    p.add_argument("--clumps", type=float, default=60.0, help="clumpy hosts per Mpix")
    p.add_argument("--density", type=float, default=DENSITY,
                   help="ordinary objects per Mpix beside the clumpy hosts (0: clumpy galaxies alone, no decoys)")
    p.add_argument("--eval-tile", type=int, default=1024)
    p.add_argument("--threshold", type=float, default=None, help="clumps.threshold (default: the stage's)")
    p.add_argument("--size", type=int, default=8192, help="throughput field side (px)")
    p.add_argument("--tile", type=int, default=2048, help="throughput tile core (px)")
    p.add_argument("--patch", type=int, default=2112, help="clumps.patch: >= tile + 2 margin keeps one patch per tile")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="time each tile / bare batch this often, keep the best "
                                                         "(a shared machine's load only ever slows a run down)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--choose-threshold", action="store_true",
                   help="only sweep the threshold on the training recipe's validation canvases")
    p.add_argument("--weights", default=None, help="clumps weights (default: the shipped ones)")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="a clumps stage setting for the accuracy run or the --val-mosaics sweep, e.g. "
                        "flip_average=true")
    p.add_argument("--val-size", type=int, default=192)
    p.add_argument("--val-seed", type=int, default=None,
                   help="seed of the validation canvases (default: the weights' training seed); give one seed "
                        "to compare two sets of weights on the same canvases")
    p.add_argument("--val-mosaics", default=None,
                   help="with --choose-threshold: comma-separated seeds of validation mosaics (not --seed) to "
                        "sweep the threshold on through the whole stage, instead of the recipe's canvases")
    p.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95", help="with --val-mosaics: thresholds to try")
    a = p.parse_args()
    if a.choose_threshold:
        return choose_threshold_mosaics(a) if a.val_mosaics else choose_threshold(a)
    if a.size % a.tile:
        p.error(f"--size {a.size} must be a multiple of --tile {a.tile} (the bare forward batches equal blocks)")
    with tempfile.TemporaryDirectory(prefix="bench_clumps_") as tmp:
        sim = None if a.skip_eval else accuracy(a, tmp)
        if not a.skip_throughput:
            throughput(a, sim)


if __name__ == "__main__":
    main()
