"""The detect stage against sep: the issue's target table on held-out simulated fields, Spitzer/GLIMPSE, speed.

Held-out fields: ``deepmosaic.pipeline.simulate`` mosaics (a different generator from the training crops of
``deepmosaic.models.datasets``, seeds 9001+ never used anywhere else), in four conditions:

========== ===========================================================================================
nominal    FIELD.md's density (950 objects/Mpix), PSF 0.7" (3.5 px), noise 5 counts: inside the training
           range (PSF 0.5-1.0", noise 2-10 counts at zeropoint 30, 1000-6000 objects/Mpix in crowded crops)
seeing     PSF 1.3" (6.5 px): worse seeing than any training crop
noise      noise 25 counts: 2.5x the noisiest training crop
dense      12000 objects/Mpix: twice the densest training crop
========== ===========================================================================================

Both stages run on the same tiles in one store (``sep,detect``, 512 px tiles, one process); the evaluation
is ``deepmosaic evaluate``'s (one-to-one Hungarian within 2 px; S/N >= 10 keys; AP50, blend and close-pair
recall from ``pipeline/eval_detect.py``), pooled over the fields of a condition. The operating point
(``DetectConfig.threshold``, ``saddle``, ``wing_radius``, ``wing_nsigma``) is the stage's shipped default,
chosen by ``tune_detect.py`` on validation fields (seeds 8001+) before these fields were scored.

Speed (first nominal field): the pipeline with ``detect`` alone and with ``sep`` alone (Mpix/s of the
whole run: background, tiles, catalogs), the stage's ``run`` on the whole field as one window, and a bare
forward pass of the same network over the same patch layout (same batch size, channels-last, random input; no
normalisation, peak finding, photometry or I/O), all in this process.

Spitzer: both stages on ``../shared/data/spitzer_glimpse`` scored against the GLIMPSE catalog as in
``bench_spitzer.py`` (mutual nearest neighbours within 1.5 px); the 5 px aperture flux and peak used for
its purity cuts are measured here at each stage's positions, the same way for both. Skipped without the
data.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_detect.py [--size 1536] [--seeds 4] [--skip-spitzer]``
(about 15 CPU-minutes at the defaults).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONDITIONS = {
    "nominal": {},
    "seeing": {"psf_fwhm": 1.3},
    "noise": {"noise_sigma": 25.0},
    "dense": {"density": 12000.0},
}
BASE = {"density": 950.0}
SEED0 = 9001


def make_field(folder: Path, size: int, seed: int, overrides: dict):
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    sim = simulate_mosaic(SimConfig(size=(size, size), seed=seed, **{**BASE, **overrides}))
    return write_simulation(sim, folder / f"field_{seed}.fits", overwrite=True)


def run_field(image, truth, store):
    from deepmosaic.pipeline.evaluate import evaluate_store
    from deepmosaic.workflows import run
    # the simulations' zeropoint (SimConfig's 30): the stage then also checks the noise level against training
    res = run(str(image), str(store), stages="sep,detect", tile=512, workers=0, overwrite=True,
              set=["detect.zeropoint=30"])
    if res.failures:
        raise RuntimeError(f"failed tiles: {res.failures}")
    return evaluate_store(str(store), str(truth))


def pool(summaries: list[dict], stage: str) -> dict:
    """Pooled S/N >= 10 counts and detection metrics of one stage over several fields."""
    n_true = sum(s[stage]["n_true_snr10"] for s in summaries)
    n_pred = sum(s[stage]["n_pred_snr10"] for s in summaries)
    n_tp = sum(s[stage]["n_tp_snr10"] for s in summaries)
    out = {"n_true": n_true, "completeness": n_tp / n_true if n_true else float("nan"),
           "purity": n_tp / n_pred if n_pred else float("nan"),
           "f1": 2 * n_tp / (n_true + n_pred) if n_true + n_pred else float("nan")}
    det = [s["_detection"][stage] for s in summaries]
    for key, n_key in (("blend_recall", "n_blended"), ("close_pair_recall", "n_close_pair")):
        n = sum(d[n_key] or 0 for d in det)
        hit = sum((d[key] or 0.0) * (d[n_key] or 0) for d in det)
        out[key], out[n_key] = (hit / n if n else float("nan")), n
    aps = [d["ap50"] for d in det if d["ap50"] is not None]
    out["ap50"] = float(np.mean(aps)) if aps else float("nan")
    return out


def flags_summary(store) -> str:
    from deepmosaic.pipeline.store import read_catalog
    from deepmosaic.tasks.detect_task import NOISE_OUT_OF_RANGE, PSF_OUT_OF_RANGE
    f = np.asarray(read_catalog(str(store), "detect")["flags"])
    if not len(f):
        return "no detections"
    return (f"PSF_OUT_OF_RANGE on {np.mean((f & PSF_OUT_OF_RANGE) != 0):.0%}, "
            f"NOISE_OUT_OF_RANGE on {np.mean((f & NOISE_OUT_OF_RANGE) != 0):.0%} of detections")


def curve_line(store, stage: str) -> str:
    from deepmosaic.pipeline.evaluate import read_reports
    c = read_reports(str(store))[stage]["curves"].get("mag")
    if not c:
        return "-"
    return " ".join(f"{m:.1f}:{v:.2f}" for m, v, n in zip(c["centres"], c["completeness"], c["n_true"]) if n >= 5)


def speed(image: Path, folder: Path, batch_size: int = 8) -> dict:
    import torch

    from deepmosaic.pipeline.store import read_background
    from deepmosaic.tasks.base import TileInput
    from deepmosaic.tasks.clumps_task import _get_model
    from deepmosaic.tasks.detect_task import DetectTask, patch_layout
    from deepmosaic.workflows import run
    from astropy.io import fits
    data = fits.getdata(image).astype(np.float32)
    mpix = data.size / 1e6
    out = {}
    for stages in ("detect", "sep"):
        store = folder / f"speed_{stages}.zarr"
        t0 = time.perf_counter()
        run(str(image), str(store), stages=stages, tile=1024, workers=0, overwrite=True)
        out[f"pipeline_{stages}"] = mpix / (time.perf_counter() - t0)
    bg = read_background(str(folder / "speed_detect.zarr"))
    back, rms = bg.evaluate((0, data.shape[0], 0, data.shape[1]))
    ti = TileInput(image=data, background=back, rms=rms, global_rms=bg.global_rms, mask=np.zeros(data.shape, bool),
                   variance=None, origin=(0, 0), core=(slice(0, data.shape[0]), slice(0, data.shape[1])))
    task = DetectTask({"batch_size": batch_size})
    task.run(ti)                                   # warm (model load)
    t0 = time.perf_counter()
    task.run(ti)
    out["stage_run"] = mpix / (time.perf_counter() - t0)
    info = task.network_info()
    model = _get_model(info["base"], "cpu")
    h = info["halo"]
    _, _, py, px, ny, nx = patch_layout(data.shape, (0, 0), info["stride"], task.config.patch)
    n_patches = ny * nx
    x = torch.randn(batch_size, 1, py + 2 * h, px + 2 * h).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for b0 in range(0, n_patches, batch_size):
            model(x[:min(batch_size, n_patches - b0)])
    out["bare_forward"] = mpix / (time.perf_counter() - t0)
    return out


def spitzer(folder: Path, work: Path) -> list[dict] | None:
    import sep as sep_lib

    import bench_spitzer as bs
    from deepmosaic.pipeline.store import read_background, read_catalog
    from deepmosaic.workflows import run
    from astropy.io import fits
    data_dir = Path(bs.DATA)
    if not (data_dir / bs.IMAGE).exists() or not (data_dir / bs.CATALOG).exists():
        return None
    store = work / "spitzer.zarr"
    run(str(data_dir / bs.IMAGE), str(store), stages="sep,detect", tile=512, workers=0, overwrite=True)
    ref_t, ref_c = bs.load_reference(data_dir)
    wcs, scale, sr_per_px, bunit = bs.image_info(data_dir / bs.IMAGE)
    mjy = sr_per_px * 1e9 if bunit.strip().lower() == "mjy/sr" else float("nan")
    img = fits.getdata(data_dir / bs.IMAGE).astype(np.float64)
    bad = ~np.isfinite(img)
    bg = read_background(str(store))
    back, _ = bg.evaluate((0, img.shape[0], 0, img.shape[1]))
    sub = np.ascontiguousarray(np.where(bad, 0.0, img - back))
    rows = []
    for stage in ("sep", "detect"):
        cat = dict(read_catalog(str(store), stage))
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        f, _, _ = sep_lib.sum_circle(sub, x, y, 5.0, mask=bad)
        ix = np.clip(np.floor(x + 0.5).astype(int), 0, img.shape[1] - 1)
        iy = np.clip(np.floor(y + 0.5).astype(int), 0, img.shape[0] - 1)
        cat["flux_aper"], cat["peak"] = f, sub[iy, ix]
        rows.append(bs.score(stage, cat, wcs, ref_t, ref_c, 1.5, scale, mjy))
    return rows


def fmt(v, f=".3f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1536, help="side of each simulated field, px")
    ap.add_argument("--seeds", type=int, default=4, help="nominal fields (out-of-range conditions get half)")
    ap.add_argument("--skip-spitzer", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--keep", default=None, help="keep the fields and stores in this folder")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from deepmosaic.tasks.detect_task import DetectConfig
    tmp = None
    if a.keep:
        work = Path(a.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_detect_")
        work = Path(tmp.name)
    d = DetectConfig()
    print(f"detect operating point (shipped defaults, chosen on validation fields by tune_detect.py before this "
          f"run): threshold {d.threshold}, saddle {d.saddle}, wing_radius {d.wing_radius}, wing_nsigma "
          f"{d.wing_nsigma}; fields {a.size}^2, seeds from {SEED0}; torch threads {torch.get_num_threads()}")
    try:
        table = []
        first = None
        for cond, over in CONDITIONS.items():
            n = a.seeds if cond == "nominal" else max(1, a.seeds // 2)
            sums, stores = [], []
            for k in range(n):
                seed = SEED0 + 100 * list(CONDITIONS).index(cond) + k
                d = work / f"{cond}_{seed}"
                d.mkdir(exist_ok=True)
                image, truth = make_field(d, a.size, seed, over)
                if first is None:
                    first = image
                store = d / "field.zarr"
                sums.append(run_field(image, truth, store))
                stores.append(store)
            for stage in ("sep", "detect"):
                table.append((cond, stage, pool(sums, stage)))
            print(f"{cond}: {n} fields; detect flags: {flags_summary(stores[0])}; completeness vs mag (field 1) "
                  f"sep [{curve_line(stores[0], 'sep')}] detect [{curve_line(stores[0], 'detect')}]")
        print()
        hdr = ["condition", "stage", "N(S/N>=10)", "compl", "purity", "F1", "AP50", "blend recall (n)",
               "pairs<1FWHM recall (n)"]
        rows = [[c, s, str(p["n_true"]), fmt(p["completeness"]), fmt(p["purity"]), fmt(p["f1"]), fmt(p["ap50"]),
                 f"{fmt(p['blend_recall'])} ({p['n_blended']})", f"{fmt(p['close_pair_recall'])} ({p['n_close_pair']})"]
                for c, s, p in table]
        w = [max(len(r[i]) for r in [hdr] + rows) for i in range(len(hdr))]
        for r in [hdr, ["-" * x for x in w]] + rows:
            print("  ".join(c.ljust(x) if i < 2 else c.rjust(x) for i, (c, x) in enumerate(zip(r, w))))
        res = {(c, s): p for c, s, p in table}
        print()
        nom = res[("nominal", "detect")]
        print("targets (nominal): F1 >= 0.985: %s (%.3f); purity >= 0.95: %s (%.3f); blend recall >= 0.90: %s "
              "(%.3f); pairs < 1 FWHM recall >= 0.85: %s (%.3f)" % (
                  nom["f1"] >= 0.985, nom["f1"], nom["purity"] >= 0.95, nom["purity"],
                  nom["blend_recall"] >= 0.90, nom["blend_recall"], nom["close_pair_recall"] >= 0.85,
                  nom["close_pair_recall"]))
        for cond in ("seeing", "noise", "dense"):
            d, s = res[(cond, "detect")]["f1"], res[(cond, "sep")]["f1"]
            print(f"target ({cond}): F1 detect - sep >= 0.05: {d - s >= 0.05} ({d:.3f} - {s:.3f} = {d - s:+.3f})")
        if not a.skip_speed:
            sp = speed(first, work)
            print()
            print("speed (Mpix/s, this process, %d torch threads): pipeline detect %.2f, pipeline sep %.2f, "
                  "stage run on one window %.2f, bare forward pass of the same network %.2f (stage/forward %.2f)"
                  % (torch.get_num_threads(), sp["pipeline_detect"], sp["pipeline_sep"], sp["stage_run"],
                     sp["bare_forward"], sp["stage_run"] / sp["bare_forward"]))
        if not a.skip_spitzer:
            rows = spitzer(Path(""), work)
            print()
            if rows is None:
                print("spitzer: skipped: ../shared/data/spitzer_glimpse is absent")
            else:
                import bench_spitzer as bs
                print("Spitzer/GLIMPSE (r = 1.5 px, mutual nearest neighbours; F_ap and peak measured here for "
                      "both stages):")
                bs.print_table(rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
