"""The tiled run: background pass, per-tile stages, seam stitching, catalog assembly.

Passes (each a set of independent Dask tasks, one per tile; workers read their own windows):

0. background: every tile measures the background meshes whose origin lies in its core; the client
   assembles, filters and interpolates them into one global model (``background.BackgroundModel``).
1. tiles: each tile runs the stages on its window, keeps the objects whose centroid lies in its core
   (ids ``tile.index * ID_STRIDE + k``), writes the core of every map, and writes its catalog part.
   Pixels of its core that belong to objects owned by a neighbour get a provisional negative label.
2. stitching: provisional labels are linked to their owners' ids by reading the owners' chunks at a
   few footprint pixels (read-only sub-pass), then each tile rewrites only its own chunk.
3. catalogs: the client concatenates the parts (tile order) into ``catalogs/<stage>/<column>``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass

import numpy as np

from . import store as st
from .background import BackgroundModel, mesh_grid_shape, measure_meshes, object_mask
from .errors import ConfigError, StoreError
from .tiling import ID_STRIDE, TileGrid

log = logging.getLogger("deepmosaic")

N_SEAM_SAMPLES = 32


def _version() -> str:
    try:
        return importlib.metadata.version("deepmosaic")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def package_versions() -> dict:
    out = {}
    for p in ("numpy", "scipy", "astropy", "sep", "zarr", "dask", "distributed", "photutils", "torch", "galsim"):
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, path).encode())
                with open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- pass 0

def _mesh_block(tile, back_size: int, shape):
    """Mesh index range ``(j0, j1, i0, i1)`` owned by ``tile`` (meshes whose origin is in its core)."""
    y0, y1, x0, x1 = tile.core
    nmy, nmx = mesh_grid_shape(shape, back_size)
    j0, j1 = math.ceil(y0 / back_size), min(math.ceil(y1 / back_size), nmy)
    i0, i1 = math.ceil(x0 / back_size), min(math.ceil(x1 / back_size), nmx)
    return j0, j1, i0, i1


def background_tile(source, tile, back_size: int, shape, first=None, masking=None):
    """Measure the background meshes owned by ``tile`` (worker side: reads its own pixels).

    With ``first`` (the first pass's model; ``masking`` is then ``{"dilate", "thresh", "minarea"}``), the
    object-masked second pass: the meshes' window plus a margin (``MASK_MARGIN`` + the dilation, so the
    footprints that reach a mesh are whole) is read, objects are found on it against ``first`` and masked
    (:func:`background.object_mask`), and the meshes are measured without them.
    """
    j0, j1, i0, i1 = _mesh_block(tile, back_size, shape)
    if j1 <= j0 or i1 <= i0:
        return (j0, i0, np.zeros((0, 0)), np.zeros((0, 0)))
    window = (j0 * back_size, min(j1 * back_size, shape[0]), i0 * back_size, min(i1 * back_size, shape[1]))
    if first is None:
        image, mask, _ = source.read_window(window)
        back, rms = measure_meshes(image, mask, back_size)
        return (j0, i0, back, rms)
    m = MASK_MARGIN + int(masking["dilate"])
    wide = (max(window[0] - m, 0), min(window[1] + m, shape[0]), max(window[2] - m, 0), min(window[3] + m, shape[1]))
    image, mask, _ = source.read_window(wide)
    b0, _ = first.evaluate(wide)
    objects = object_mask(image, mask, b0, first.global_rms, masking["thresh"], masking["minarea"],
                          masking["dilate"])
    inner = (slice(window[0] - wide[0], window[1] - wide[0]), slice(window[2] - wide[2], window[3] - wide[2]))
    back, rms = measure_meshes(image[inner], objects[inner], back_size)
    return (j0, i0, back, rms)


#: pixels read beyond a tile's meshes to find the objects whose grown footprints reach them
MASK_MARGIN = 64


def compute_background(ex, source, grid: TileGrid, back_size, filter_size, filter_thresh, mask_objects=0,
                       mask_thresh=1.5, mask_minarea=5) -> BackgroundModel:
    """The global background model (pass 0); with ``mask_objects`` > 0 (a dilation in px) a second pass
    measures every mesh again without the objects found against the first model."""
    nmy, nmx = mesh_grid_shape(grid.shape, back_size)
    tiles = list(grid)
    model = None
    masking = {"dilate": int(mask_objects), "thresh": float(mask_thresh), "minarea": int(mask_minarea)}
    for label in ("background", "background (objects masked)")[:2 if mask_objects > 0 else 1]:
        back = np.full((nmy, nmx), np.nan)
        rms = np.full((nmy, nmx), np.nan)
        bar = _progress(len(tiles), label)
        jobs = [(source, t, back_size, grid.shape, model, masking) for t in tiles]
        for _, (j0, i0, b, r) in ex.map_unordered(background_tile, jobs):
            back[j0:j0 + b.shape[0], i0:i0 + b.shape[1]] = b
            rms[j0:j0 + r.shape[0], i0:i0 + r.shape[1]] = r
            bar.update()
        bar.close()
        model = BackgroundModel.from_meshes(back, rms, back_size, filter_size, filter_thresh)
    return model


# ----------------------------------------------------------------------------------------------- pass 1

def _pipeline_flags(labels, n, mask, tile, grid):
    """Pipeline flag bits per row (label 1..n) from a window label map."""
    from deepmosaic.tasks.base import FLAG_MASKED, FLAG_MOSAIC_EDGE, FLAG_TILE_TRUNCATED
    flags = np.zeros(n + 1, np.int64)
    if n == 0:
        return flags[1:]
    masked = np.bincount(labels[mask].ravel(), minlength=n + 1)[: n + 1] > 0
    flags[masked] |= FLAG_MASKED
    wy0, wy1, wx0, wx1 = tile.window
    edges = ((labels[0, :], wy0 == 0), (labels[-1, :], wy1 == grid.shape[0]),
             (labels[:, 0], wx0 == 0), (labels[:, -1], wx1 == grid.shape[1]))
    for line, is_mosaic_edge in edges:
        ids = np.unique(line[line > 0])
        flags[ids] |= FLAG_MOSAIC_EDGE if is_mosaic_edge else FLAG_TILE_TRUNCATED
    flags[0] = 0
    return flags[1:]


def _seam_samples(labels, rows_foreign, cx, cy, tile):
    """For each foreign row: up to N_SEAM_SAMPLES footprint pixels outside the core, nearest its centroid."""
    from scipy import ndimage
    cys, cxs = tile.core_in_window
    oy, ox = tile.origin
    out_ys, out_xs, ptr = [], [], [0]
    boxes = ndimage.find_objects(labels) if len(rows_foreign) else []
    for r in rows_foreign:
        box = boxes[r] if r < len(boxes) else None
        if box is None:
            yy = xx = np.zeros(0, np.int64)
        else:
            sub = labels[box] == r + 1
            inside = np.zeros(sub.shape, bool)  # the part of the box that lies in the core
            iy = slice(max(cys.start - box[0].start, 0), max(min(cys.stop, box[0].stop) - box[0].start, 0))
            ix = slice(max(cxs.start - box[1].start, 0), max(min(cxs.stop, box[1].stop) - box[1].start, 0))
            inside[iy, ix] = True
            yy, xx = np.nonzero(sub & ~inside)
            yy, xx = yy + box[0].start, xx + box[1].start
        if len(yy) > N_SEAM_SAMPLES:
            d = (yy - (cy[r] - oy)) ** 2 + (xx - (cx[r] - ox)) ** 2
            keep = np.argsort(d, kind="stable")[:N_SEAM_SAMPLES]
            yy, xx = yy[keep], xx[keep]
        out_ys.append(yy + oy)
        out_xs.append(xx + ox)
        ptr.append(ptr[-1] + len(yy))
    cat = (lambda v: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64))
    return cat(out_ys), cat(out_xs), np.asarray(ptr, np.int64)


def _finish_stage(task, out, tile, grid, mask, wcs, store_path, part):
    """Ownership, global ids, mosaic coordinates, flags, ra/dec; write core maps; fill ``part``."""
    from deepmosaic.tasks.base import FLAG_MOSAIC_EDGE
    cat = {k: np.asarray(v) for k, v in out.catalog.items()}
    n = len(cat.get("x", []))
    oy, ox = tile.origin
    x = cat["x"].astype(np.float64) + ox if n else np.zeros(0)
    y = cat["y"].astype(np.float64) + oy if n else np.zeros(0)
    owned = tile.owns(y, x) if n else np.zeros(0, bool)
    ids = np.zeros(n, np.int64)
    n_owned = int(owned.sum())
    if n_owned >= ID_STRIDE:
        raise RuntimeError(f"tile {tile.row},{tile.col}: {n_owned} objects exceed the id range; use a smaller --tile")
    ids[owned] = tile.index * ID_STRIDE + np.arange(1, n_owned + 1)
    flags = cat["flags"].astype(np.int64) if "flags" in cat else np.zeros(n, np.int64)
    cys, cxs = tile.core_in_window
    n_foreign = 0
    for name, spec in task.maps.items():
        arr = out.maps[name]
        if spec.kind == "label":
            lab = arr.astype(np.int64)
            if name == "segmentation":
                flags |= _pipeline_flags(lab, n, mask, tile, grid)
            core = lab[cys, cxs]
            present = np.unique(core[core > 0]) - 1
            foreign = present[~owned[present]] if n else present
            lut = np.zeros(n + 1, np.int64)
            lut[1:] = ids
            lut[foreign + 1] = -(np.arange(1, len(foreign) + 1))
            st.write_core(store_path, task.name, name, tile, lut[core])
            fy, fx, fptr = _seam_samples(lab, foreign, x, y, tile)
            part[f"{task.name}/_seam/{name}/ys"] = fy
            part[f"{task.name}/_seam/{name}/xs"] = fx
            part[f"{task.name}/_seam/{name}/ptr"] = fptr
            n_foreign += len(foreign)
        else:
            st.write_core(store_path, task.name, name, tile, arr[cys, cxs].astype(spec.dtype))
    # objects near the mosaic edge without a footprint map: flag by centroid distance
    if not any(s.kind == "label" for s in task.maps.values()) and n:
        near = (x < 2) | (y < 2) | (x > grid.shape[1] - 3) | (y > grid.shape[0] - 3)
        flags[near] |= FLAG_MOSAIC_EDGE
    cols = {"id": ids[owned], "x": x[owned], "y": y[owned]}
    for k, v in cat.items():
        if k in ("x", "y", "flags"):
            continue
        cols[k] = v[owned]
    cols["flags"] = flags[owned]
    cols["tile_row"] = np.full(n_owned, tile.row, np.int32)
    cols["tile_col"] = np.full(n_owned, tile.col, np.int32)
    if wcs is not None and n_owned:
        # pixel_to_world uses 0-based pixels; .icrs converts galactic/ecliptic WCS frames
        sky = wcs.pixel_to_world(cols["x"], cols["y"]).icrs
        cols["ra"], cols["dec"] = np.asarray(sky.ra.deg, np.float64), np.asarray(sky.dec.deg, np.float64)
    else:
        cols["ra"] = np.full(n_owned, np.nan)
        cols["dec"] = np.full(n_owned, np.nan)
    for k, v in cols.items():
        part[f"{task.name}/{k}"] = np.asarray(v)
    return n_owned, n_foreign


def process_tile(store_path, mosaic, tasks, background, grid, tile, stages=None, state=None, write=None):
    """Run the stages on one tile (worker side). Returns a small summary dict, never pixels.

    write : names of the stages whose results are written (default all); the others only feed them as
        upstream (a store in which only some stages are recomputed, see ``run_pipeline``).

    stages : ``(start, stop)``: run only ``tasks[start:stop]`` (default all). A part that is not the last
        returns its state (the tile input with the upstream outputs, the catalog part so far) for the next
        part, which gets it as ``state``: so stages with different Dask resources (a model stage on a GPU
        worker after sep on a CPU worker) run on different workers, the state passing between them.
    """
    from deepmosaic.tasks.base import TileInput
    start, stop = stages or (0, len(tasks))
    if state is not None and "ti" not in state:
        return state  # an earlier part finished the tile (no work) or failed
    t0 = time.perf_counter()
    spent = state["seconds"] if state else 0.0
    try:
        if state is None:
            source = mosaic.detection
            image, mask, variance = source.read_window(tile.window)
            part, counts, notes = {}, {}, []
            if mask.all():
                for task in tasks:
                    if write is not None and task.name not in write:
                        continue
                    empty = task.empty_output(image.shape)
                    _finish_stage(task, empty, tile, grid, mask, None, store_path, part)
                st.write_part(store_path, tile.index, part)
                return {"tile": tile.index, "status": st.STATUS_NO_WORK, "n": {}, "seconds": time.perf_counter() - t0}
            back, rms = background.evaluate(tile.window)
            wy0, wy1, wx0, wx1 = tile.window
            ti = TileInput(image=image, background=back, rms=rms, global_rms=background.global_rms, mask=mask,
                           variance=variance, origin=tile.origin, core=tile.core_in_window,
                           at_mosaic_edge=(wy0 == 0, wy1 == grid.shape[0], wx0 == 0, wx1 == grid.shape[1]))
        else:
            ti, part, counts, notes = state["ti"], state["part"], state["n"], state["notes"]
        wcs = mosaic.detection.wcs()
        for task in tasks[start:stop]:
            out = task.run(ti)
            ti.upstream[task.name] = out
            if write is not None and task.name not in write:
                continue
            counts[task.name] = _finish_stage(task, out, tile, grid, ti.mask, wcs, store_path, part)
            notes += [f"{task.name}: {m}" for m in out.notes]
        seconds = spent + time.perf_counter() - t0
        if stop < len(tasks):
            return {"tile": tile.index, "ti": ti, "part": part, "n": counts, "notes": notes, "seconds": seconds}
        st.write_part(store_path, tile.index, part)
        return {"tile": tile.index, "status": st.STATUS_DONE, "n": counts, "notes": notes, "seconds": seconds}
    except Exception as e:
        return {"tile": tile.index, "status": st.STATUS_FAILED, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(), "seconds": spent + time.perf_counter() - t0}


def stage_parts(tasks, ex) -> list[tuple[tuple[int, int], dict]]:
    """Consecutive runs of stages that need the same Dask resources, as ``((start, stop), resources)``.

    A stage's resources (``Task.resources``, e.g. ``{"GPU": 1}``) count only where some worker of the
    executor declares them; on a CPU-only cluster every stage runs anywhere, in one part. On a mixed
    cluster whose CPU workers declare ``CPU`` (the workflow clusters do), the other parts go to those,
    so that the GPU workers are kept for the model stages.
    """
    routes = getattr(ex, "routes", lambda resources: False)  # wrappers that only map (benchmarks)
    parts: list[tuple[tuple[int, int], dict]] = []
    for i, task in enumerate(tasks):
        res = dict(task.resources) if routes(task.resources) else {}
        if parts and parts[-1][1] == res:
            parts[-1] = ((parts[-1][0][0], i + 1), res)
        else:
            parts.append(((i, i + 1), res))
    if any(res for _, res in parts) and routes({"CPU": 1}):
        parts = [(span, res or {"CPU": 1}) for span, res in parts]
    return parts or [((0, 0), {})]


# ----------------------------------------------------------------------------------------------- pass 2

def resolve_seams(store_path, stage, name, tile_index):
    """Owner ids of a tile's provisional (negative) labels, read from the owners' chunks (read-only)."""
    part = st.read_part(store_path, tile_index)
    ys = part[f"{stage}/_seam/{name}/ys"]
    xs = part[f"{stage}/_seam/{name}/xs"]
    ptr = part[f"{stage}/_seam/{name}/ptr"]
    n = len(ptr) - 1
    mapping = np.zeros(n, np.int64)
    if n == 0:
        return tile_index, mapping
    vals = st.read_map_pixels(store_path, stage, name, ys, xs)
    for k in range(n):
        v = vals[ptr[k]:ptr[k + 1]]
        v = v[v > 0]
        if len(v):
            u, c = np.unique(v, return_counts=True)
            mapping[k] = u[np.argmax(c)]
    return tile_index, mapping


def relabel_tile(store_path, stage, name, tile, mapping):
    """Replace provisional labels ``-k`` in the tile's own chunk by ``mapping[k-1]`` (0 if unresolved)."""
    core = st.read_core(store_path, stage, name, tile)
    neg = core < 0
    if neg.any():
        core[neg] = mapping[-core[neg] - 1]
        st.write_core(store_path, stage, name, tile, core)
    return tile.index, int((mapping == 0).sum())


# ----------------------------------------------------------------------------------------------- driver

def _progress(total, label):
    from .execute import Progress
    return Progress(total, label)


@dataclass
class RunResult:
    store: str
    n_objects: dict
    tiles: dict
    failures: list
    seconds: float
    recomputed_tiles: int
    recomputed_stages: list | None = None  # stages recomputed in this run (all of them: None)


def _depends(task) -> set:
    return {*task.requires, *(s for s, _ in task.links.values())} - {task.name}


def refresh_plan(out: str, meta: dict, tasks, resolved: dict, inputs: list):
    """Which stages of the finished store ``out`` (its ``deepmosaic`` attributes: ``meta``) must be
    recomputed for this run, or None (rebuild it all).

    Only the stages whose resolved config (weights checksums included) changed, the stages new to the
    store, and every stage that depends on one of those (``requires``, ``links``), are recomputed; the
    others' maps and catalogs stay. The whole store is rebuilt instead when the input, the deepmosaic
    version, the tile grid, the halo or the background settings differ, or the store is not finished.
    Returns ``(stages to recompute, stages no longer run)``.
    """
    if not meta.get("finished") or meta.get("refreshing") or os.path.isdir(os.path.join(out, "_work")):
        return None
    if meta.get("version") != _version() or \
            [i.get("sha256") for i in meta.get("inputs", [])] != [i["sha256"] for i in inputs]:
        return None
    old, new = meta.get("config") or {}, st._json_safe(resolved)
    rest = (lambda c: {k: v for k, v in c.items() if k not in ("stages", "run_key")})
    if rest(old) != rest(new):
        return None
    old_stages, new_stages = old.get("stages") or {}, new["stages"]
    changed: list[str] = []
    for t in tasks:
        if old_stages.get(t.name) != new_stages[t.name] or _depends(t) & set(changed):
            changed.append(t.name)
    return changed, [s for s in old_stages if s not in new_stages]


def run_pipeline(mosaic, out: str, tasks, tile_size=1024, executor=None, resume=False, overwrite=False,
                 background_settings=None, run_config=None, quiet=False, refresh=False) -> RunResult:
    """Run ``tasks`` over ``mosaic`` into the store ``out`` (see ``deepmosaic.workflows.run`` for the API).

    refresh : for an existing store: recompute only the stages that :func:`refresh_plan` names (their
        results are replaced, the other stages' stay), or rebuild the whole store when it cannot be
        refreshed stage by stage. An interrupted refresh is finished with ``resume`` (or ``refresh``).
    """
    t_start = time.perf_counter()
    halo = max([t.halo for t in tasks] + [0])
    grid = TileGrid(mosaic.shape, tile_size, halo)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--stages={','.join(names)}: a stage is listed twice; list each once.")
    for i, t in enumerate(tasks):
        need = sorted({*t.requires, *(s for s, _ in t.links.values())} - set(names[:i + 1]))  # own maps may be linked
        if need:
            raise ConfigError(f"--stages={','.join(names)}: stage {t.name!r} needs {', '.join(need)} before it; "
                              f"use --stages {','.join(need + [t.name])}.")
    bs = background_settings or {"back_size": 64, "filter_size": 3, "filter_thresh": 0.0}
    resolved = {"stages": {t.name: t.fingerprint() for t in tasks}, "tile": list(grid.core), "halo": halo,
                "background": bs, **(run_config or {})}
    inputs = [{"path": b.path, "sha256": file_sha256(b.path), "shape": list(b.shape), "dtype": b.dtype,
               "hdu": b.hdu, "plane": b.plane, "band": b.band, "wcs_header": b.header} for b in mosaic.bands]

    refreshing = None
    if os.path.exists(out) and refresh and not overwrite:
        meta = dict(st.open_store(out).attrs.get("deepmosaic", {}))
        plan = None if meta.get("refreshing") else refresh_plan(out, meta, tasks, resolved, inputs)
        if meta.get("refreshing"):
            resume = True  # an interrupted refresh: finish it
        elif plan is None:
            overwrite = True
        else:
            refreshing, dropped = plan
            st.reset_stages(out, grid, {t.name: dict(t.maps) for t in tasks if t.name in refreshing}, dropped)
            n_kept = {k: v for k, v in (meta.get("n_objects") or {}).items() if k not in refreshing + dropped}
            if not refreshing:  # nothing to recompute: the stages no longer run are gone, record the config
                st.update_attrs(out, config=resolved, n_objects=n_kept)
                log.info("%s: no stage to recompute%s", out, f"; dropped {', '.join(dropped)}" if dropped else "")
                return RunResult(store=out, n_objects=n_kept, tiles=dict(meta.get("tiles", {})), failures=[],
                                 seconds=time.perf_counter() - t_start, recomputed_tiles=0, recomputed_stages=[])
            st.update_attrs(out, config=resolved, finished=None, refreshing=refreshing, n_objects=n_kept)
            log.info("%s: recomputing stage(s) %s; keeping %s", out, ", ".join(refreshing),
                     ", ".join(sorted(n_kept)) or "nothing")
    if os.path.exists(out) and refreshing is None:
        if overwrite:
            st.remove_store(out)
        elif resume:
            meta = dict(st.open_store(out).attrs.get("deepmosaic", {}))
            old_cfg, old_inputs = meta.get("config"), [i.get("sha256") for i in meta.get("inputs", [])]
            if st._json_safe(resolved) != old_cfg or old_inputs != [i["sha256"] for i in inputs]:
                raise StoreError(f"{out}: --resume refused: the store was made from a different input or "
                                 f"configuration. Use --overwrite to start again, or another --out.")
        else:
            raise StoreError(f"{out} already exists. Use --resume to finish it, --overwrite to replace it, "
                             f"or choose another --out.")
    fresh = not os.path.exists(out)
    if fresh:
        attrs = {"version": _version(), "created": _now(), "finished": None, "config": resolved,
                 "inputs": inputs, "packages": package_versions(), "bands": [b.band for b in mosaic.bands]}
        st.create_store(out, grid, {t.name: dict(t.maps) for t in tasks}, attrs)

    meta = dict(st.open_store(out).attrs.get("deepmosaic", {}))
    if not fresh and meta.get("finished") and not os.path.isdir(os.path.join(out, "_work")):
        log.info("%s: already finished with this input and configuration; nothing to recompute", out)
        return RunResult(store=out, n_objects=dict(meta.get("n_objects", {})), tiles=dict(meta.get("tiles", {})),
                         failures=[], seconds=time.perf_counter() - t_start, recomputed_tiles=0)
    write = meta.get("refreshing")  # stages being recomputed (a refresh), or None: all
    run_tasks = list(tasks)
    if write is not None:
        need = set(write)
        for t in reversed(tasks):  # the written stages and everything they take as upstream
            if t.name in need:
                need |= _depends(t)
        run_tasks = [t for t in tasks if t.name in need]
    ex = executor
    background = st.read_background(out)
    if background is None:
        background = compute_background(ex, mosaic.detection, grid, bs["back_size"], bs["filter_size"],
                                        bs["filter_thresh"], bs.get("mask_objects", 0), bs.get("mask_thresh", 1.5),
                                        bs.get("mask_minarea", 5))
        st.write_background(out, background)

    status = st.get_status(out)
    todo = [t for t in grid if status[t.row, t.col] in (st.STATUS_PENDING, st.STATUS_FAILED)]
    failures = []
    bar = _progress(len(todo), "tiles")
    args = [(out, mosaic, tuple(run_tasks), background, grid, t) for t in todo]
    parts = stage_parts(run_tasks, ex)
    if write is not None:
        results = ex.map_chain(process_tile, args, [({"stages": span, "write": frozenset(write)}, res)
                                                    for span, res in parts])
    elif len(parts) == 1:
        results = ex.map_unordered(process_tile, args, resources=parts[0][1])
    else:
        results = ex.map_chain(process_tile, args, [({"stages": span}, res) for span, res in parts])
    status_out = st.status_array(out, "status")
    for i, res in results:
        t = todo[i]
        status_out[t.row, t.col] = res["status"]
        if res["status"] == st.STATUS_FAILED:
            failures.append({"tile": [t.row, t.col], "error": res["error"]})
            log.warning("tile %d,%d failed: %s", t.row, t.col, res["error"])
            log.debug(res.get("traceback", ""))
        bar.update()
    bar.close()

    # pass 2: link seam labels to their owners, for every label map
    status = st.get_status(out)
    stitched = st.get_status(out, "stitched")
    ready = [t for t in grid if status[t.row, t.col] in (st.STATUS_DONE, st.STATUS_NO_WORK)
             and not stitched[t.row, t.col]]
    unresolved = 0
    written = [t for t in tasks if write is None or t.name in write]
    label_maps = [(t.name, n) for t in written for n, s in t.maps.items() if s.kind == "label"]
    if ready and not failures:
        for stage, name in label_maps:
            maps = {idx: m for _, (idx, m) in
                    ex.map_unordered(resolve_seams, [(out, stage, name, t.index) for t in ready])}
            jobs = [(out, stage, name, t, maps[t.index]) for t in ready if len(maps[t.index])]
            for _, (_, n_unres) in ex.map_unordered(relabel_tile, jobs):
                unresolved += n_unres
        for t in ready:
            stitched[t.row, t.col] = 1
        st.status_array(out, "stitched")[...] = stitched

    # pass 3: catalogs
    n_objects = {}
    status = st.get_status(out)
    if not failures and (status != st.STATUS_PENDING).all():
        for task in written:
            parts = [st.read_part(out, t.index) for t in grid]
            cols = _concat_parts(task, parts)
            _fill_links(out, task, cols, grid.shape)
            schema = {**task.columns, **_PIPELINE_COLUMNS}
            st.write_catalog(out, task.name, cols, schema)
            n_objects[task.name] = int(len(cols["id"]))
        st.clear_work(out)
        if write is not None:
            n_objects = {**(meta.get("n_objects") or {}), **n_objects}
            n_objects = {t.name: n_objects[t.name] for t in tasks if t.name in n_objects}
        done = {"refreshing": None} if write is not None else {}
        st.update_attrs(out, finished=_now(), n_objects=n_objects, seam_unresolved=unresolved, **done)
    counts = {st.STATUS_NAMES[k]: int((status == k).sum()) for k in st.STATUS_NAMES}
    st.update_attrs(out, tiles=counts, failures=failures)
    return RunResult(store=out, n_objects=n_objects, tiles=counts, failures=failures,
                     seconds=time.perf_counter() - t_start, recomputed_tiles=len(todo),
                     recomputed_stages=list(write) if write is not None else None)


from deepmosaic.tasks.base import Column as _Column  # noqa: E402

_PIPELINE_COLUMNS = {
    "id": _Column("i8", "", "object id, unique in the store; equals its pixels' value in the stage's label maps"),
    "tile_row": _Column("i4", "", "row of the tile whose core owns the object"),
    "tile_col": _Column("i4", "", "column of the tile whose core owns the object"),
    "ra": _Column("f8", "deg", "right ascension (ICRS) from the input WCS; NaN without one"),
    "dec": _Column("f8", "deg", "declination (ICRS) from the input WCS; NaN without one"),
}


def _fill_links(store_path, task, cols, shape):
    """Fill ``task.links`` columns from the stitched label maps at each object's pixel (-1 on sky)."""
    n = len(cols["id"])
    for column, (stage, name) in task.links.items():
        if n == 0:
            cols[column] = np.zeros(0, np.int64)
            continue
        # edge tiles own centroids up to half a pixel beyond the mosaic: clip onto the map
        ys = np.clip(np.floor(cols["y"] + 0.5).astype(np.int64), 0, shape[0] - 1)
        xs = np.clip(np.floor(cols["x"] + 0.5).astype(np.int64), 0, shape[1] - 1)
        ids = st.read_map_pixels(store_path, stage, name, ys, xs).astype(np.int64)
        cols[column] = np.where(ids > 0, ids, -1)


def _concat_parts(task, parts):
    chunks: dict[str, list] = {}
    for p in parts:
        if p is None:
            continue
        mine = [k for k in p if k.startswith(task.name + "/") and "/_seam/" not in k]
        for k in mine:
            chunks.setdefault(k.split("/", 1)[1], []).append(p[k])
    order = ["id", "x", "y"] + [c for c in task.columns if c not in ("x", "y", "flags")] + \
        ["flags", "tile_row", "tile_col", "ra", "dec"]
    out = {}
    for c in order:
        if c in chunks:
            out[c] = np.concatenate(chunks[c])
        else:
            dt = (task.columns.get(c) or _PIPELINE_COLUMNS.get(c)).dtype
            out[c] = np.zeros(0, dtype=dt)
    return out


def _now():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
