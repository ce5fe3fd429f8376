#!/usr/bin/env python
"""Benchmark: the tiled sep stage on a local Dask cluster against one whole-image ``sep.extract``.

What it measures (all on the same simulated FITS mosaic, default 8192 x 8192):

1. simulation of the field (``deepmosaic.pipeline.simulate``) and its FITS file (cached with ``--keep``);
2. the whole-image baseline in this process: read, global mesh background
   (``background_of_image``), one ``sep.extract`` with the sep stage's defaults (through
   ``tasks.sep_task.run_extract``: thresh 1.5 x global RMS, minarea 5, default 3x3 kernel, matched
   filter, deblend 32/0.005, clean) and the same Kron/aperture photometry (``tasks.sep_task.photometry``);
3. the tiled run ``deepmosaic.workflows.run(image, store, tile=1024, workers=2)``: end to end with its
   own cluster (start-up and shutdown included), then on a cluster started beforehand (first run on it,
   then a warm second run), with a per-pass breakdown of the warm run; then, on the same cluster and
   serially in this process, ``sep.extract`` on the tiles *alone* (workers read their own windows, the
   whole-image background model is given, ownership by centroid; no photometry, maps, seams or store):
   FIELD.md's measurement, which isolates what tiling gives sep from what the pipeline adds;
4. throughput (Mpix/s) of each, the ratios tiled / whole, and the catalog agreement (fraction of the
   whole-image objects that the tiled catalog has within 1e-3 px);
5. peak RSS of each Dask worker and of the client at two mosaic sizes (and one larger tile), each in a
   fresh subprocess with a fresh cluster, plus the whole-image baseline's peak RSS at the same sizes;
6. a serial, in-process profile of the tiled code path (the real pipeline functions, wrapped with
   timers): reading, background, sep.extract, photometry, zarr writes, seam pass, catalog assembly;
7. how well sep.extract itself scales to ``--workers`` processes on this machine (one tile, repeated).

Every timed step first waits (``--wait-quiet``) for other processes to go idle and reports the CPU time
other processes used meanwhile: on a shared 2-core machine they distort the 2-worker run most.

Run::

    .venv/bin/python benchmarks/bench_sep_tiling.py --keep /tmp/dm_bench

Spawned Dask workers re-import this file, hence the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

PROBE_TAG = "PROBE_JSON "
MATCH_TOL = 1e-3  # px


def say(msg: str = ""):
    print(msg, flush=True)


def _proc_status_mb(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux ``VmHWM`` (the high-water mark of this process image), not ``ru_maxrss``: a child started by
    fork/vfork + exec inherits its parent's ``ru_maxrss``, which would make every subprocess look as big as
    the benchmark process that launched it.
    """
    v = _proc_status_mb("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_rss():
    """Runs inside a Dask worker: (peak RSS MiB, current RSS MiB) of the worker process."""
    return peak_rss_mb(), _proc_status_mb("VmRSS") or float("nan")


class RssSampler:
    """Samples this process's anonymous RSS (``RssAnon``: heap and arrays, not the page cache of the
    memory-mapped FITS file) in a thread and keeps the maximum. ``VmHWM`` counts mapped file pages too,
    so it grows with the part of the file a process has touched, not only with what it allocates."""

    def __init__(self, interval=0.005):
        import threading
        self.peak = _proc_status_mb("RssAnon") or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval):
        while not self._stop.wait(interval):
            v = _proc_status_mb("RssAnon")
            if v is not None and v > self.peak:
                self.peak = v

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        v = _proc_status_mb("RssAnon")
        return max(self.peak, v or 0.0)


def _worker_sampler_start():
    """Runs inside a Dask worker: start an anonymous-RSS sampler (kept on the ``sys`` module)."""
    import sys as _s
    _s._bench_rss_sampler = RssSampler()
    return _proc_status_mb("RssAnon")


def _worker_sampler_stop():
    import sys as _s
    return _s._bench_rss_sampler.stop()


class CpuWatch:
    """CPU seconds used on the machine during a block, split into this process tree and everything else.

    Other processes on a 2-core machine (a test suite, another benchmark) slow the 2-worker tiled run far
    more than the single-threaded whole-image call, so the report shows how much foreign CPU ran.
    """

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.sys0, self.own0 = self._sys_busy(), self._own()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.busy = self._sys_busy() - self.sys0
        self.own = self._own() - self.own0
        self.foreign = max(self.busy - self.own, 0.0)

    @staticmethod
    def _sys_busy() -> float:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        try:
            import psutil
        except ImportError:
            return 0.0
        me = psutil.Process()
        c = me.cpu_times()
        tot = c.user + c.system + c.children_user + c.children_system
        for ch in me.children(recursive=True):
            try:
                cc = ch.cpu_times()
                tot += cc.user + cc.system
            except psutil.Error:
                pass
        return tot

    def note(self) -> str:
        return f"[cpu {self.own:5.1f} s ours, {self.foreign:4.1f} s other processes]"


QUIET = {"max_wait": 0.0}


def wait_quiet(label: str, threshold: float = 0.3, window: float = 2.0):
    """Wait (at most ``--wait-quiet`` seconds) until other processes use < ``threshold`` cores.

    The machine may be shared (test suites of other sessions); timings taken while they run are not
    comparable, and hurt the multi-process tiled run much more than the single-threaded baseline.
    """
    if QUIET["max_wait"] <= 0:
        return
    t0 = time.perf_counter()
    while True:
        b0 = CpuWatch._sys_busy()
        time.sleep(window)
        load = (CpuWatch._sys_busy() - b0) / window
        waited = time.perf_counter() - t0
        if load < threshold:
            if waited > window + 0.5:
                say(f"  (waited {waited:.0f} s for other processes to finish before: {label})")
            return
        if waited >= QUIET["max_wait"]:
            say(f"  (machine still busy, {load:.1f} cores used by others; measuring anyway: {label})")
            return


# --------------------------------------------------------------------------------------------- inputs

def sim_path(directory: str, size: int, density: float, seed: int) -> str:
    return os.path.join(directory, f"sim_{size}_d{density:g}_s{seed}.fits")


def ensure_simulation(directory: str, size: int, density: float, seed: int) -> str:
    """Simulate a ``size`` x ``size`` field and write it as FITS, unless that file is already there."""
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    path = sim_path(directory, size, density, seed)
    if os.path.exists(path):
        say(f"[sim] reusing cached {path}")
        return path
    cfg = SimConfig(size=(size, size), density=density, seed=seed)
    t0 = time.perf_counter()
    sim = simulate_mosaic(cfg)
    t1 = time.perf_counter()
    n = len(sim.truth)
    write_simulation(sim, path, overwrite=True)
    t2 = time.perf_counter()
    del sim
    say(f"[sim] simulated {size}x{size}, {n} objects ({n / (size * size / 1e6):.0f}/Mpix) in {t1 - t0:.1f} s; "
        f"FITS written in {t2 - t1:.1f} s -> {path}")
    if t1 - t0 > 120:
        say(f"[sim] note: simulating took more than 2 minutes; pass --keep DIR to cache it for later runs")
    return path


def crop_mosaic(src: str, size: int, dst: str) -> str:
    """The ``[0:size, 0:size]`` corner of a simulated mosaic (IMAGE, MASK, VARIANCE; the WCS stays valid)."""
    from astropy.io import fits
    if os.path.exists(dst):
        return dst
    with fits.open(src, memmap=True) as h:
        hdus = []
        for i, hdu in enumerate(h):
            data = np.array(hdu.data[:size, :size])
            hdr = hdu.header.copy()
            for key in ("CHECKSUM", "DATASUM"):
                hdr.remove(key, ignore_missing=True)
            hdus.append(fits.PrimaryHDU(data, hdr) if i == 0 else fits.ImageHDU(data, hdr, name=hdu.name))
        tmp = dst + ".tmp"
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        os.replace(tmp, dst)
    return dst


# ------------------------------------------------------------------------------------- whole image

def whole_image(path: str) -> dict:
    """The untiled reference: read, background, one sep.extract, photometry; returns timings + catalog."""
    from deepmosaic.pipeline.background import background_of_image
    from deepmosaic.pipeline.io import open_mosaic
    from deepmosaic.tasks.sep_task import SepConfig, make_kernel, photometry, run_extract
    cfg = SepConfig()
    t = {}
    t0 = time.perf_counter()
    src = open_mosaic(path).detection
    ny, nx = src.shape
    image, mask, _variance = src.read_window((0, ny, 0, nx))
    t1 = time.perf_counter()
    t["read"] = t1 - t0
    bkg = background_of_image(image, mask, cfg.back_size, cfg.back_filter_size, cfg.back_filter_thresh)
    t2 = time.perf_counter()
    t["background meshes"] = t2 - t1
    back, rms = bkg.evaluate((0, ny, 0, nx))
    data = image - back
    data[mask] = 0.0
    t3 = time.perf_counter()
    t["background evaluate+subtract"] = t3 - t2
    objs, seg, extra, notes = run_extract(data, mask, bkg.global_rms, cfg, make_kernel(cfg.filter_kernel))
    t4 = time.perf_counter()
    t["sep.extract"] = t4 - t3
    flags = objs["flag"].astype(np.int64) | extra
    phot = photometry(data, mask, rms, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], cfg, flags)
    t5 = time.perf_counter()
    t["photometry"] = t5 - t4
    t["total"] = t5 - t0
    return {"shape": (ny, nx), "t": t, "n": int(len(objs)), "notes": notes, "global_rms": bkg.global_rms,
            "background": bkg,
            "x": np.asarray(objs["x"], float), "y": np.asarray(objs["y"], float),
            "flux": np.asarray(phot["flux"], float)}


# ---------------------------------------------------------------------------------------- timers

class Timers:
    """Accumulates wall time of wrapped functions (patched in place, restored on exit)."""

    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self._undo = []

    def wrap(self, owner, attr: str, key: str, kind: str = "function"):
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        func = orig.__func__ if isinstance(orig, (classmethod, staticmethod)) else orig
        acc_t, acc_n = self.t, self.n

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return func(*a, **k)
            finally:
                acc_t[key] += time.perf_counter() - t0
                acc_n[key] += 1

        timed.__name__ = getattr(func, "__name__", attr)
        new = classmethod(timed) if isinstance(orig, classmethod) else (
            staticmethod(timed) if isinstance(orig, staticmethod) else timed)
        setattr(owner, attr, new)
        self._undo.append((owner, attr, orig))

    def restore(self):
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


class PassTimer:
    """Wraps an executor: wall time of each ``map_unordered`` pass and the summed task seconds."""

    def __init__(self, inner):
        self.inner = inner
        self.description = inner.description
        self.dashboard = getattr(inner, "dashboard", None)
        self.passes = []

    def map_unordered(self, fn, args_list, resources=None):
        t0 = time.perf_counter()
        n, busy = 0, 0.0
        for i, res in self.inner.map_unordered(fn, args_list, resources=resources):
            if isinstance(res, dict) and "seconds" in res:
                busy += res["seconds"]
            n += 1
            yield i, res
        self.passes.append((fn.__name__, time.perf_counter() - t0, n, busy))


def client_side_timers():
    """Timers on the client-side steps of ``run_pipeline`` (names resolved at call time, so patchable)."""
    from deepmosaic.pipeline import runner
    from deepmosaic.pipeline import store as st
    tm = Timers()
    tm.wrap(runner, "file_sha256", "input sha256 (client)")
    tm.wrap(st, "remove_store", "remove old store (client)")
    tm.wrap(st, "create_store", "create store (client)")
    tm.wrap(runner, "compute_background", "background pass incl. mesh filter (client+workers)")
    tm.wrap(st, "write_background", "write background model (client)")
    tm.wrap(st, "status_array", "tile status grid opens (client)")
    tm.wrap(st, "get_status", "status reads (client)")
    tm.wrap(st, "read_part", "catalog assembly: read parts (client)")
    tm.wrap(runner, "_concat_parts", "catalog assembly: concatenate (client)")
    tm.wrap(st, "write_catalog", "catalog assembly: write zarr columns (client)")
    tm.wrap(st, "clear_work", "clear _work (client)")
    tm.wrap(st, "update_attrs", "update attrs (client)")
    return tm


# ------------------------------------------------------------------------------------ tiled runs

def read_tiled_catalog(store: str) -> dict:
    from deepmosaic.pipeline.store import read_catalog
    return read_catalog(store, "sep")


def match_fraction(xw, yw, xt, yt, tol=MATCH_TOL):
    """Fraction of whole-image objects with a tiled object within ``tol`` px (and one-to-one count)."""
    from scipy.spatial import cKDTree
    if len(xw) == 0:
        return float("nan"), 0, np.zeros(0, int)
    tree = cKDTree(np.column_stack([xt, yt]))
    d, j = tree.query(np.column_stack([xw, yw]), k=1, distance_upper_bound=tol)
    ok = np.isfinite(d)
    n_unique = len(np.unique(j[ok]))
    idx = np.where(ok, j, -1)
    return ok.mean(), n_unique, idx


def tiled_benchmark(path: str, workdir: str, tile: int, workers: int, repeat: int = 1, background=None):
    from deepmosaic.pipeline.execute import executor
    from deepmosaic.workflows.api import run
    store = os.path.join(workdir, "tiled.zarr")
    out = {}

    # (a) end to end: run() starts its own cluster and shuts it down
    wait_quiet("tiled end-to-end run")
    with CpuWatch() as cw:
        t0 = time.perf_counter()
        res = run(path, store, tile=tile, workers=workers, overwrite=True)
        out["cold"] = time.perf_counter() - t0
    out["cold_cpu"] = cw
    out["cold_pipeline"] = res.seconds
    assert not res.failures, res.failures
    out["n_objects"] = res.n_objects.get("sep")

    # (b) a cluster started beforehand: its start-up, the first run on it, warm runs, shutdown
    wait_quiet("cluster start-up")
    t0 = time.perf_counter()
    cm = executor(workers=workers)
    ex = cm.__enter__()
    out["cluster_start"] = time.perf_counter() - t0
    try:
        wait_quiet("first run on the started cluster")
        with CpuWatch() as cw:
            t0 = time.perf_counter()
            res = run(path, store, tile=tile, executor=ex, overwrite=True)
            out["first_on_cluster"] = time.perf_counter() - t0
        out["first_cpu"] = cw
        out["warm_all"] = []
        for _ in range(max(repeat, 1)):
            timed = PassTimer(ex)
            wait_quiet("warm tiled run")
            with client_side_timers() as tm, CpuWatch() as cw:
                t0 = time.perf_counter()
                res = run(path, store, tile=tile, executor=timed, overwrite=True)
                wall = time.perf_counter() - t0
            assert not res.failures, res.failures
            out["warm_all"].append(wall)
            if wall <= min(out["warm_all"]):
                out.update(warm=wall, warm_pipeline=res.seconds, warm_passes=timed.passes,
                           warm_client=(dict(tm.t), dict(tm.n)), warm_cpu=cw)
        if background is not None:
            out["bare"] = bare_tiled_extract(ex, path, tile, background, repeat)
    finally:
        t0 = time.perf_counter()
        cm.__exit__(None, None, None)
        out["cluster_stop"] = time.perf_counter() - t0
    out["catalog"] = read_tiled_catalog(store)
    out["store"] = store
    return out


# ------------------------------------------------------------------------- bare tiled extraction

def _bare_extract(source, background, tile):
    """Worker side: read this tile's window, subtract the given global background, sep.extract, keep the
    objects whose centroid lies in the core. No photometry, maps, seams or store: the extraction alone."""
    from deepmosaic.tasks.sep_task import SepConfig, make_kernel, run_extract
    cfg = SepConfig()
    image, mask, _ = source.read_window(tile.window)
    back, _rms = background.evaluate(tile.window)
    data = image - back
    data[mask] = 0.0
    objs, _seg, _extra, _notes = run_extract(data, mask, background.global_rms, cfg, make_kernel(cfg.filter_kernel))
    oy, ox = tile.origin
    x, y = np.asarray(objs["x"], float) + ox, np.asarray(objs["y"], float) + oy
    keep = tile.owns(y, x)
    return x[keep], y[keep]


def bare_tiled_extract(ex, path: str, tile_size: int, background, repeat: int = 1) -> dict:
    """sep.extract on the tiles alone (FIELD.md's measurement), on ``ex`` and serially in this process.

    Same windows and ownership rule as the pipeline, same global background model as the whole-image call;
    what the full pipeline adds on top (background pass, photometry, maps, seams, catalogs) is left out, so the
    gap between this and the pipeline's figure is the pipeline's own overhead."""
    from deepmosaic.pipeline.io import open_mosaic
    from deepmosaic.pipeline.tiling import TileGrid
    from deepmosaic.tasks.sep_task import SepConfig
    source = open_mosaic(path).detection
    grid = TileGrid(source.shape, tile_size, SepConfig().halo)
    args = [(source, background, t) for t in grid]
    out = {"n_tiles": len(args)}

    def collect(results):
        xs, ys = zip(*results) if results else ((), ())
        return np.concatenate(xs or [np.zeros(0)]), np.concatenate(ys or [np.zeros(0)])

    list(ex.map_unordered(_bare_extract, args[:2]))  # warm the workers' imports
    best = None
    for _ in range(max(repeat, 1)):
        wait_quiet("bare tiled extraction on the cluster")
        t0 = time.perf_counter()
        res = [r for _, r in ex.map_unordered(_bare_extract, args)]
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    out["cluster"] = best
    out["x"], out["y"] = collect(res)
    wait_quiet("bare tiled extraction, serial")
    t0 = time.perf_counter()
    for a in args:
        _bare_extract(*a)
    out["serial"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------ memory probes

def probe_main(args):
    """Subprocess entry point: one measurement in a fresh process (and a fresh cluster)."""
    if args._probe == "whole":
        smp = RssSampler()
        r = whole_image(args._probe_input)
        anon = smp.stop()
        print(PROBE_TAG + json.dumps({"client_peak_mb": peak_rss_mb(), "client_anon_peak_mb": anon,
                                      "seconds": r["t"]["total"], "n": r["n"]}), flush=True)
        return
    from deepmosaic.pipeline.execute import executor
    from deepmosaic.workflows.api import run
    store = os.path.join(args._probe_workdir, f"mem_{os.getpid()}.zarr")
    smp = RssSampler()
    with executor(workers=args.workers) as ex:
        idle = ex.client.run(_worker_rss)
        idle_anon = ex.client.run(_worker_sampler_start)
        t0 = time.perf_counter()
        res = run(args._probe_input, store, tile=args.tile, executor=ex, overwrite=True)
        secs = time.perf_counter() - t0
        anon = ex.client.run(_worker_sampler_stop)
        after = ex.client.run(_worker_rss)
    client_anon = smp.stop()
    shutil.rmtree(store, ignore_errors=True)
    print(PROBE_TAG + json.dumps({
        "workers_idle_peak_mb": [v[0] for v in idle.values()],
        "workers_idle_anon_mb": list(idle_anon.values()),
        "workers_peak_mb": [v[0] for v in after.values()],
        "workers_anon_peak_mb": list(anon.values()),
        "client_peak_mb": peak_rss_mb(), "client_anon_peak_mb": client_anon,
        "seconds": secs, "n": res.n_objects.get("sep"), "failures": len(res.failures)}), flush=True)


def run_probe(kind: str, path: str, tile: int, workers: int, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", kind, "--_probe-input", path,
           "--_probe-workdir", workdir, "--tile", str(tile), "--workers", str(workers)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG):])
    raise RuntimeError(f"probe {kind} {path} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


# ------------------------------------------------------------------------------------ serial profile

def profile_serial(path: str, tile_size: int, workdir: str) -> tuple[dict, dict, float]:
    """Run the tiled code path tile by tile in this process with timers on its parts.

    Uses the pipeline's own functions (``runner.background_tile``, ``runner.process_tile``,
    ``runner.resolve_seams``, ``runner.relabel_tile``, ``runner._concat_parts``, ``store.write_catalog``);
    only timers are added. Returns (seconds by part, calls by part, serial total).
    """
    from deepmosaic.pipeline import background as bg
    from deepmosaic.pipeline import io as dio
    from deepmosaic.pipeline import runner
    from deepmosaic.pipeline import store as st
    from deepmosaic.pipeline.tiling import TileGrid
    from deepmosaic.tasks import sep_task
    from deepmosaic.workflows.api import background_settings

    mosaic = dio.open_mosaic(path)
    task = sep_task.SepTask()
    tasks = (task,)
    grid = TileGrid(mosaic.shape, tile_size, task.halo)
    bs = background_settings(tasks)
    store = os.path.join(workdir, "profile.zarr")
    st.remove_store(store)
    st.create_store(store, grid, {task.name: dict(task.maps)}, {})
    tiles = list(grid)
    T = Timers()
    t_all = time.perf_counter()

    # pass 0: background meshes per tile, then the client's fill/filter
    with Timers() as t0:
        t0.wrap(dio.MosaicSource, "read_window", "read")
        t0.wrap(runner, "measure_meshes", "measure")  # runner imported the name
        meshes = []
        tb = time.perf_counter()
        status_out = st.status_array(store, "status")
        for tile in tiles:
            meshes.append(runner.background_tile(mosaic.detection, tile, bs["back_size"], grid.shape))
        T.t["0 background pass: per-tile total"] += time.perf_counter() - tb
        T.t["0   read window(s) (image+mask+variance)"] += t0.t["read"]
        T.t["0   measure meshes (sep.Background per 64x64 mesh)"] += t0.t["measure"]
    tb = time.perf_counter()
    nmy, nmx = bg.mesh_grid_shape(grid.shape, bs["back_size"])
    back = np.full((nmy, nmx), np.nan)
    rms = np.full((nmy, nmx), np.nan)
    for j0, i0, b, r in meshes:
        back[j0:j0 + b.shape[0], i0:i0 + b.shape[1]] = b
        rms[j0:j0 + r.shape[0], i0:i0 + r.shape[1]] = r
    model = bg.BackgroundModel.from_meshes(back, rms, bs["back_size"], bs["filter_size"], bs["filter_thresh"])
    st.write_background(store, model)
    T.t["0 background: assemble + fill + median filter + write (client)"] += time.perf_counter() - tb

    # pass 1: process_tile, with timers on its parts
    with Timers() as t1:
        t1.wrap(dio.MosaicSource, "read_window", "read")
        t1.wrap(bg.BackgroundModel, "evaluate", "bgeval")
        t1.wrap(dio.MosaicSource, "wcs", "wcs")
        t1.wrap(sep_task.SepTask, "run", "taskrun")
        t1.wrap(sep_task, "run_extract", "extract")
        t1.wrap(sep_task, "photometry", "phot")
        t1.wrap(runner, "_finish_stage", "finish")
        t1.wrap(runner, "_pipeline_flags", "pflags")
        t1.wrap(runner, "_seam_samples", "seam")
        orig_write_core = st.write_core

        def write_core_by_map(path_, stage, name, tile_, core):
            t_ = time.perf_counter()
            try:
                return orig_write_core(path_, stage, name, tile_, core)
            finally:
                t1.t[f"write_core:{name}"] += time.perf_counter() - t_
                t1.t["write_core"] += time.perf_counter() - t_

        st.write_core = write_core_by_map
        t1._undo.append((st, "write_core", orig_write_core))
        t1.wrap(st, "write_part", "write_part")
        tb = time.perf_counter()
        status_out = st.status_array(store, "status")
        for tile in tiles:
            r = runner.process_tile(store, mosaic, tasks, model, grid, tile)
            if r["status"] == st.STATUS_FAILED:
                raise RuntimeError(r["traceback"])
            status_out[tile.row, tile.col] = r["status"]
        tot = time.perf_counter() - tb
        c = t1.t
        T.t["1 tile pass: per-tile total"] += tot
        T.t["1   read window (image+mask+variance, to float32/bool)"] += c["read"]
        T.t["1   background evaluate (spline, back+rms)"] += c["bgeval"]
        T.t["1   WCS parse"] += c["wcs"]
        T.t["1   sep.extract (run_extract)"] += c["extract"]
        T.t["1   photometry (kron_radius, sum_ellipse, sum_circle)"] += c["phot"]
        T.t["1   rest of SepTask.run (subtract background, dtype copies)"] += c["taskrun"] - c["extract"] - c["phot"]
        for name in task.maps:
            T.t[f"1   finish: zarr write_core {name} ({task.maps[name].dtype})"] += c[f"write_core:{name}"]
        T.t["1   finish: _seam_samples"] += c["seam"]
        T.t["1   finish: _pipeline_flags"] += c["pflags"]
        T.t["1   finish: rest (ownership, ids, LUT, ra/dec)"] += c["finish"] - c["write_core"] - c["seam"] - c["pflags"]
        T.t["1   write_part (npz)"] += c["write_part"]
        T.t["1   rest of process_tile + status writes"] += tot - sum(
            c[k] for k in ("read", "bgeval", "wcs", "taskrun", "finish", "write_part"))

    # pass 2: seams
    with Timers() as t2:
        t2.wrap(st, "read_map_pixels", "pixels")
        t2.wrap(st, "read_part", "part")
        t2.wrap(st, "read_core", "core")
        t2.wrap(st, "write_core", "write")
        tb = time.perf_counter()
        maps = {}
        for tile in tiles:
            idx, m = runner.resolve_seams(store, "sep", "segmentation", tile.index)
            maps[idx] = m
        ts = time.perf_counter() - tb
        tb = time.perf_counter()
        status_out = st.status_array(store, "status")
        for tile in tiles:
            if len(maps[tile.index]):
                runner.relabel_tile(store, "sep", "segmentation", tile, maps[tile.index])
        tr = time.perf_counter() - tb
        c = t2.t
        T.t["2 seam pass: resolve_seams total"] += ts
        T.t["2   read_map_pixels (zarr coordinate selection on neighbours' chunks)"] += c["pixels"]
        T.t["2   read_part"] += c["part"]
        T.t["2 seam pass: relabel_tile total"] += tr
        T.t["2   read_core + write_core (own chunk)"] += c["core"] + c["write"]
        n_sampled = sum(len(m) for m in maps.values())

    # pass 3: catalogs
    tb = time.perf_counter()
    parts = [st.read_part(store, t.index) for t in grid]
    T.t["3   read parts"] += time.perf_counter() - tb
    tc = time.perf_counter()
    cols = runner._concat_parts(task, parts)
    st.write_catalog(store, task.name, cols, {**task.columns, **runner._PIPELINE_COLUMNS})
    T.t["3   concatenate + write zarr columns"] += time.perf_counter() - tc
    T.t["3 catalog assembly total"] += time.perf_counter() - tb

    # client-side fixed costs of a run
    tb = time.perf_counter()
    runner.file_sha256(mosaic.detection.path)
    T.t["- input sha256 (client, every run)"] += time.perf_counter() - tb
    total = time.perf_counter() - t_all

    # reading a window: what read_window does, by part, and a memory-mapped slice instead of .section
    from deepmosaic.pipeline.io import _fits
    hdul = _fits(mosaic.detection.path)
    src = mosaic.detection
    alt = defaultdict(float)
    for tile in tiles:
        sl = tile.window_slices
        ta = time.perf_counter()
        src.read_window(tile.window)
        alt["read_window (as the pipeline does: image+mask+variance via .section)"] += time.perf_counter() - ta
        for hname in [src.hdu, src.mask_hdu, src.variance_hdu]:
            if hname is None:
                continue
            ta = time.perf_counter()
            np.asarray(hdul[hname].section[sl])
            alt[f"  .section[window] of HDU {hname} alone (row-by-row reads)"] += time.perf_counter() - ta
        ta = time.perf_counter()
        np.array(hdul[src.hdu].data[sl], dtype=np.float32)
        alt[f"  alternative: np.array(memmapped .data[window], float32), image only"] += time.perf_counter() - ta

    st.remove_store(store)
    info = {"n_tiles": len(tiles), "n_foreign_seam_objects": n_sampled, "window": grid.tile(1, 1).window_shape,
            "read_alternatives": dict(alt)}
    return dict(T.t), info, total


def _sep_loop(args):
    """One process: repeat sep.extract on one interior tile window (for the parallel-scaling check)."""
    path, tile_size, n = args
    from deepmosaic.pipeline.background import background_of_image
    from deepmosaic.pipeline.io import open_mosaic
    from deepmosaic.pipeline.tiling import TileGrid
    from deepmosaic.tasks.sep_task import SepConfig, make_kernel, run_extract
    src = open_mosaic(path).detection
    grid = TileGrid(src.shape, tile_size, SepConfig().halo)
    t = grid.tile(min(1, grid.n_rows - 1), min(1, grid.n_cols - 1))
    image, mask, _ = src.read_window(t.window)
    bkg = background_of_image(image, mask)
    back, _ = bkg.evaluate((0, image.shape[0], 0, image.shape[1]))
    data = image - back
    data[mask] = 0
    cfg, kernel = SepConfig(), make_kernel("default")
    run_extract(data, mask, bkg.global_rms, cfg, kernel)
    t0 = time.perf_counter()
    for _ in range(n):
        run_extract(data, mask, bkg.global_rms, cfg, kernel)
    return (time.perf_counter() - t0) / n


def parallel_scaling(path: str, tile_size: int, workers: int, n: int = 20):
    """sep.extract on one tile window: seconds per call in 1 process, and in ``workers`` processes at once."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.map(_sep_loop, [(path, tile_size, n)])[0]
    with ctx.Pool(workers) as pool:
        many = pool.map(_sep_loop, [(path, tile_size, n)] * workers)
    return one, many


# -------------------------------------------------------------------------------------------- main

def fmt_rate(mpix, secs):
    return f"{mpix / secs:6.2f} Mpix/s" if secs > 0 else "   n/a"


def crop_for(path, s, size, workdir):
    return path if s == size else crop_mosaic(path, s, os.path.join(workdir, f"crop_{s}_of_{os.path.basename(path)}"))


def _reexec_with_malloc(mode: str):
    """glibc reads its malloc variables at start-up: restart this process once with them set (or unset)."""
    from deepmosaic.pipeline.execute import WORKER_MALLOC_ENV
    want = dict(WORKER_MALLOC_ENV) if mode == "tuned" else {}
    have = {k: os.environ[k] for k in WORKER_MALLOC_ENV if k in os.environ}
    if have == want or os.environ.get("_DM_BENCH_REEXEC"):
        return
    env = {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC_ENV}
    env.update(want, _DM_BENCH_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="mosaic side in pixels")
    ap.add_argument("--tile", type=int, default=1024, help="tile core size")
    ap.add_argument("--workers", type=int, default=2, help="local Dask process workers")
    ap.add_argument("--density", type=float, default=None,
                    help="objects per Mpix (default: the simulator's SimConfig default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None,
                    help="directory to cache the simulated FITS in and keep the stores (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="repetitions of the whole-image baseline and of the warm tiled run (best is reported)")
    ap.add_argument("--mem-sizes", default=None,
                    help="comma-separated mosaic sides for the memory table (default: size/2,size)")
    ap.add_argument("--wait-quiet", type=float, default=180.0,
                    help="before each timed step wait up to this many seconds for other processes to go idle")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS table")
    ap.add_argument("--no-profile", action="store_true", help="skip the serial per-part profile")
    ap.add_argument("--_probe", choices=["tiled", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--_probe-input", help=argparse.SUPPRESS)
    ap.add_argument("--_probe-workdir", help=argparse.SUPPRESS)
    ap.add_argument("--malloc", choices=["tuned", "glibc"], default="tuned",
                    help="allocator of this process (the whole-image baseline, the client, the serial profile): "
                         "'tuned' = the settings the pipeline gives its workers (pipeline.execute."
                         "WORKER_MALLOC_ENV), so both sides run with the same allocator; 'glibc' = glibc's "
                         "defaults (the baseline then pays a page fault per fresh large buffer)")
    args = ap.parse_args(argv)
    if args._probe:
        return probe_main(args)
    _reexec_with_malloc(args.malloc)

    QUIET["max_wait"] = args.wait_quiet
    from deepmosaic.pipeline.simulate import SimConfig
    density = SimConfig().density if args.density is None else args.density
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_sep_tiling_")
    os.makedirs(workdir, exist_ok=True)
    size, tile, workers = args.size, args.tile, args.workers
    mpix = size * size / 1e6
    say(f"bench_sep_tiling: {size}x{size} ({mpix:.1f} Mpix), tile {tile}, {workers} workers, density {density:g}/Mpix, "
        f"seed {args.seed}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; workdir {workdir}")
    from deepmosaic.pipeline.execute import WORKER_MALLOC_ENV, worker_malloc_env
    say(f"allocator: this process {args.malloc} "
        f"({ {k: os.environ.get(k, 'unset') for k in WORKER_MALLOC_ENV} }); Dask workers {worker_malloc_env()}")
    try:
        # 1. simulate -------------------------------------------------------------------------------
        path = ensure_simulation(workdir, size, density, args.seed)

        # 2. whole image ----------------------------------------------------------------------------
        say(f"[whole] reading, background, sep.extract, photometry in this process (x{args.repeat}, best kept) ...")
        runs = []
        for _ in range(max(args.repeat, 1)):
            wait_quiet("whole-image baseline")
            with CpuWatch() as cw:
                W = whole_image(path)
            W["cpu"] = cw
            runs.append(W)
            say(f"[whole]   run: " + ", ".join(f"{k} {v:.2f} s" for k, v in W["t"].items()) + f" {cw.note()}")
        # best of each part (each part is deterministic work; the minimum is the least disturbed)
        W = runs[0]
        W["t"] = {k: min(r["t"][k] for r in runs) for k in W["t"]}
        for k, v in W["t"].items():
            say(f"[whole]   {k:<32s} {v:7.2f} s")
        say(f"[whole]   {W['n']} objects; global rms {W['global_rms']:.4f}; notes {W['notes']}")

        # 3. tiled ----------------------------------------------------------------------------------
        say(f"[tiled] run(tile={tile}, workers={workers}) ...")
        R = tiled_benchmark(path, workdir, tile, workers, args.repeat, background=W["background"])
        say(f"[tiled]   end to end, own cluster (start + run + shutdown) {R['cold']:7.2f} s "
            f"(RunResult.seconds {R['cold_pipeline']:.2f}) {R['cold_cpu'].note()}")
        say(f"[tiled]   cluster start-up                                 {R['cluster_start']:7.2f} s")
        say(f"[tiled]   first run on the started cluster (worker imports) {R['first_on_cluster']:7.2f} s "
            f"{R['first_cpu'].note()}")
        say(f"[tiled]   warm run on the started cluster, best of {len(R['warm_all'])}         {R['warm']:7.2f} s "
            f"(all: {', '.join(f'{v:.2f}' for v in R['warm_all'])}) {R['warm_cpu'].note()}")
        say(f"[tiled]   cluster shutdown                                 {R['cluster_stop']:7.2f} s")
        say(f"[tiled]   {R['n_objects']} objects")
        say("[tiled]   best warm run, passes (wall; summed task seconds on the workers):")
        for name, wall, n, busy in R["warm_passes"]:
            b = f"; tasks {busy:6.2f} s = {busy / wall / workers * 100:3.0f}% of {workers} workers" if busy else ""
            say(f"[tiled]     {name:<20s} {n:4d} tasks {wall:7.2f} s{b}")
        ct, cn = R["warm_client"]
        say("[tiled]   best warm run, client-side steps:")
        for k in sorted(ct, key=lambda k: -ct[k]):
            say(f"[tiled]     {k:<56s} {ct[k]:7.3f} s ({cn[k]} calls)")

        # 4. rates, ratios, agreement ---------------------------------------------------------------
        t = W["t"]
        whole = {"sep.extract only": t["sep.extract"],
                 "extract + photometry": t["sep.extract"] + t["photometry"],
                 "full (read+bkg+extract+phot)": t["total"]}
        tiled = {"tiled, end to end incl. cluster start": R["cold"], "tiled, warm cluster": R["warm"]}
        bare = R.get("bare")
        if bare:
            tiled[f"tiles, sep.extract alone, {workers} workers"] = bare["cluster"]
            tiled["tiles, sep.extract alone, serial"] = bare["serial"]
        say()
        say(f"== throughput on {size}x{size} ({mpix:.1f} Mpix) ==")
        for k, v in whole.items():
            say(f"  whole image, {k:<34s} {v:7.2f} s  {fmt_rate(mpix, v)}")
        for k, v in tiled.items():
            say(f"  {k:<47s} {v:7.2f} s  {fmt_rate(mpix, v)}")
        say("== ratio tiled / whole (throughput; target >= 2.5x) ==")
        say(f"  {'':<40s}" + "".join(f"{k[:28]:>30s}" for k in whole))
        for tk, tv in tiled.items():
            say(f"  {tk:<40s}" + "".join(f"{wv / tv:29.2f}x" for wv in whole.values()))
        cat = R["catalog"]
        frac, n_unique, idx = match_fraction(W["x"], W["y"], cat["x"], cat["y"])
        n_t = len(cat["x"])
        ok = idx >= 0
        dflux = np.abs(cat["flux"][idx[ok]] - W["flux"][ok]) / np.maximum(np.abs(W["flux"][ok]), 1e-30)
        if bare:
            say("  ('tiles, sep.extract alone': workers read their own windows, the whole-image background model is "
                "given, sep.extract, ownership by centroid; no photometry, maps, seams or store. Its first column "
                "is FIELD.md's measurement; the full tiled pipeline is the 'tiled' rows.)")
            bf, bn, _ = match_fraction(W["x"], W["y"], bare["x"], bare["y"])
            say(f"  tiles alone: {len(bare['x'])} objects, {bf * 100:.2f}% of the whole-image objects matched "
                f"within {MATCH_TOL:g} px")
        say(f"== catalog agreement (within {MATCH_TOL:g} px) ==")
        say(f"  whole {W['n']} objects, tiled {n_t}; matched {ok.sum()} = {frac * 100:.2f}% of whole "
            f"({n_unique} distinct tiled objects, {n_unique / max(n_t, 1) * 100:.2f}% of tiled)")
        if ok.any():
            say(f"  matched: Kron flux equal to 1e-6 relative for {np.mean(dflux < 1e-6) * 100:.2f}%; "
                f"median |dflux|/flux {np.median(dflux):.2e}, 99th percentile {np.percentile(dflux, 99):.2e}")

        # 5. memory ---------------------------------------------------------------------------------
        if not args.no_memory:
            sizes = ([int(v) for v in args.mem_sizes.split(",")] if args.mem_sizes
                     else sorted({max(size // 2, tile), size}))
            rows = [(v, tile) for v in sizes] + [(max(sizes), 2 * tile)]
            say()
            say("[memory] fresh subprocess + fresh cluster per row ...")
            table = []
            for sz, tl in rows:
                wait_quiet(f"memory probe {sz}^2")
                r = run_probe("tiled", crop_for(path, sz, size, workdir), tl, workers, workdir)
                table.append((sz, tl, r))
                say(f"[memory]   {sz}^2 tile {tl}: done in {r['seconds']:.1f} s")
            whole_mem = {sz: run_probe("whole", crop_for(path, sz, size, workdir), tile, workers, workdir)
                         for sz in sizes}
            say("== peak memory per process (MiB): anonymous RSS (allocated arrays; sampled every 5 ms) "
                "and VmHWM (RSS high-water mark, includes pages of the memory-mapped FITS) ==")
            say(f"  {'mosaic':>8s} {'tile':>5s} | {'worker anon peak':>17s} {'worker VmHWM':>13s} "
                f"{'idle':>5s} | {'client anon':>11s} {'VmHWM':>6s} | {'whole-image anon':>16s} {'VmHWM':>6s}")
            for sz, tl, r in table:
                wa = "/".join(f"{v:.0f}" for v in sorted(r["workers_anon_peak_mb"]))
                wh = "/".join(f"{v:.0f}" for v in sorted(r["workers_peak_mb"]))
                wi = max(r["workers_idle_anon_mb"])
                wm = whole_mem.get(sz) if tl == tile else None
                wcols = f"{wm['client_anon_peak_mb']:16.0f} {wm['client_peak_mb']:6.0f}" if wm else f"{'-':>16s} {'-':>6s}"
                say(f"  {sz:>7d}^2 {tl:>5d} | {wa:>17s} {wh:>13s} {wi:5.0f} | {r['client_anon_peak_mb']:11.0f} "
                    f"{r['client_peak_mb']:6.0f} | {wcols}")
            say("  (worker columns: each of the workers; idle = worker anonymous RSS before its first task; "
                "whole-image = the untiled baseline alone in a fresh process)")

        # 6. serial profile -------------------------------------------------------------------------
        if not args.no_profile:
            say()
            say("[profile] serial, in-process, the pipeline's own functions with timers ...")
            wait_quiet("serial profile")
            with CpuWatch() as cw:
                P, info, total = profile_serial(path, tile, workdir)
            say(f"== serial profile of the tiled code path ({info['n_tiles']} tiles, interior window "
                f"{info['window'][0]}x{info['window'][1]}, {info['n_foreign_seam_objects']} foreign seam objects) "
                f"{cw.note()} ==")
            for k in sorted(P):
                say(f"  {k[2:]:<74s} {P[k]:7.2f} s  ({P[k] / info['n_tiles'] * 1000:6.1f} ms/tile)")
            say(f"  {'serial total':<74s} {total:7.2f} s; / {workers} workers = {total / workers:.2f} s "
                f"(best warm tiled run {R['warm']:.2f} s; whole-image sep.extract {t['sep.extract']:.2f} s)")
            say("== reading one window, alternatives (all tiles, serial) ==")
            for k, v in info["read_alternatives"].items():
                say(f"  {k:<74s} {v:7.2f} s  ({v / info['n_tiles'] * 1000:6.1f} ms/tile)")
            wait_quiet("parallel scaling check")
            with CpuWatch() as cw:
                one, many = parallel_scaling(path, tile, workers)
            say(f"== parallel scaling of sep.extract on one tile window {cw.note()} ==")
            say(f"  1 process {one * 1000:.1f} ms/call; {workers} processes at once "
                f"{', '.join(f'{v * 1000:.1f}' for v in many)} ms/call -> {workers}-process speed-up "
                f"{workers * one / max(many):.2f}x (ideal {workers}x)")
        say()
        say(f"this process: peak RSS (VmHWM) {peak_rss_mb():.0f} MiB; load average now {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
