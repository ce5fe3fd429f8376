"""The zarr result store (a contract; see the README for the layout).

Only this module and the workflow layer touch files of the store. Chunks of every map equal the tile
core, so each tile writes only its own chunks (one chunk, one writer). Per-tile catalog parts are
written by the tile's worker to ``_work/`` and concatenated by the client when the run finishes.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import zarr

from .errors import StoreError

STATUS_PENDING, STATUS_DONE, STATUS_NO_WORK, STATUS_FAILED = 0, 1, 2, 3
STATUS_NAMES = {0: "pending", 1: "done", 2: "no work", 3: "failed"}


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _create_map(group, name: str, spec, grid):
    # float maps compress poorly with zstd and cost more to write than to compute: lz4 + shuffle
    codec = {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")} \
        if np.dtype(spec.dtype).kind == "f" else {}
    arr = group.create_array(name, shape=grid.shape, chunks=grid.core, dtype=spec.dtype, fill_value=spec.fill,
                             **codec)
    arr.attrs.update({"description": spec.description, "kind": spec.kind})


def create_store(path: str, grid, map_specs: dict, attrs: dict):
    """Create an empty store for ``grid`` with the maps of every stage.

    map_specs : {stage: {name: MapSpec}}
    """
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    tiles = root.create_group("tiles")
    for name in ("status", "stitched"):
        arr = tiles.create_array(name, shape=(grid.n_rows, grid.n_cols), dtype="int8", fill_value=0,
                                 chunks=(grid.n_rows, grid.n_cols))
        arr.attrs.update({"core": list(grid.core), "halo": grid.halo,
                          "codes": {str(k): v for k, v in STATUS_NAMES.items()}} if name == "status" else
                         {"description": "1 when the tile's seam labels have been linked to their owners"})
    maps = root.create_group("maps")
    for stage, specs in map_specs.items():
        g = maps.create_group(stage)
        for name, spec in specs.items():
            _create_map(g, name, spec, grid)
    root.create_group("catalogs")
    root.create_group("reports")
    root.attrs["deepmosaic"] = _json_safe(attrs)
    os.makedirs(os.path.join(path, "_work"), exist_ok=True)
    return root


def reset_stages(path: str, grid, map_specs: dict, drop=()):
    """Prepare a finished store for recomputing some stages only (the others' results stay).

    map_specs : {stage: {name: MapSpec}} of the stages to recompute: their maps, catalogs and reports
    are removed and their maps created empty again; ``drop``: stages no longer run, removed too. When
    there is a stage to recompute, every tile goes back to pending (and unstitched) and the work folder
    is recreated.
    """
    root = zarr.open_group(path, mode="r+")
    for stage in [*map_specs, *drop]:
        for group in ("maps", "catalogs", "reports", "reports_clumps"):
            if group in root and stage in root[group]:
                shutil.rmtree(os.path.join(path, group, stage))
    root = zarr.open_group(path, mode="r+")  # re-read the hierarchy after the removals
    for stage, specs in map_specs.items():
        g = root["maps"].create_group(stage, overwrite=True)
        for name, spec in specs.items():
            _create_map(g, name, spec, grid)
    if not map_specs:
        return
    for name in ("status", "stitched"):
        zarr.open_array(f"{path}/tiles/{name}", mode="r+")[...] = 0
    os.makedirs(os.path.join(path, "_work"), exist_ok=True)


def open_store(path: str, mode: str = "r"):
    if not os.path.isdir(path):
        raise StoreError(f"{path}: no such store. Run `deepmosaic run INPUT --out {path}` first.")
    try:
        return zarr.open_group(path, mode=mode)
    except Exception as e:
        raise StoreError(f"{path}: not a deepmosaic zarr store ({type(e).__name__}: {e}).") from None


def remove_store(path: str):
    if os.path.isdir(path):
        shutil.rmtree(path)


def update_attrs(path: str, **changes):
    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs.get("deepmosaic", {}))
    meta.update(_json_safe(changes))
    root.attrs["deepmosaic"] = meta


def write_core(path: str, stage: str, name: str, tile, core: np.ndarray):
    """Write one tile's core of a map (the tile's own chunk)."""
    arr = zarr.open_array(f"{path}/maps/{stage}/{name}", mode="r+")
    arr[tile.core_slices] = core


def read_core(path: str, stage: str, name: str, tile) -> np.ndarray:
    return zarr.open_array(f"{path}/maps/{stage}/{name}", mode="r")[tile.core_slices]


def read_map_pixels(path: str, stage: str, name: str, ys, xs) -> np.ndarray:
    arr = zarr.open_array(f"{path}/maps/{stage}/{name}", mode="r")
    return arr.get_coordinate_selection((np.asarray(ys), np.asarray(xs)))


def status_array(path: str, name: str = "status"):
    """The per-tile status grid ``name``, opened for writing (the client is its one writer): open it once
    and assign ``[row, col]`` per finished tile, instead of re-reading its metadata for every tile."""
    return zarr.open_array(f"{path}/tiles/{name}", mode="r+")


def get_status(path: str, name: str = "status") -> np.ndarray:
    return zarr.open_array(f"{path}/tiles/{name}", mode="r")[...]


def part_path(path: str, tile_index: int) -> str:
    return os.path.join(path, "_work", f"tile_{tile_index:07d}.npz")


def write_part(path: str, tile_index: int, arrays: dict):
    """Write one tile's catalog part (numpy npz, written to a temporary name then renamed: atomic)."""
    final = part_path(path, tile_index)
    tmp = final + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, final)


def read_part(path: str, tile_index: int) -> dict | None:
    p = part_path(path, tile_index)
    if not os.path.exists(p):
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_background(path: str, model):
    root = zarr.open_group(path, mode="r+")
    g = root.require_group("background")
    for name, arr in (("mesh_back", model.back), ("mesh_rms", model.rms)):
        a = g.create_array(name, shape=arr.shape, dtype="float64", overwrite=True)
        a[...] = arr
    g.attrs.update(model.to_attrs())


def read_background(path: str):
    from .background import BackgroundModel
    root = zarr.open_group(path, mode="r")
    if "background" not in root or "mesh_back" not in root["background"]:
        return None
    g = root["background"]
    a = dict(g.attrs)
    return BackgroundModel(back=g["mesh_back"][...], rms=g["mesh_rms"][...], back_size=int(a["back_size"]),
                           global_back=float(a["global_back"]), global_rms=float(a["global_rms"]))


def write_catalog(path: str, stage: str, columns: dict, schema: dict):
    """Write ``catalogs/<stage>/<column>`` (1-D arrays of equal length) with unit/description attrs."""
    root = zarr.open_group(path, mode="r+")
    g = root["catalogs"].require_group(stage)
    n = {len(v) for v in columns.values()}
    if len(n) > 1:
        raise StoreError(f"catalog {stage}: columns have different lengths {sorted(n)}")
    for name, values in columns.items():
        values = np.asarray(values)
        a = g.create_array(name, shape=values.shape, dtype=values.dtype,
                           chunks=(max(1, min(len(values), 1 << 20)),), overwrite=True)
        if len(values):
            a[...] = values
        col = schema.get(name)
        a.attrs.update({"unit": getattr(col, "unit", ""), "description": getattr(col, "description", "")})
    g.attrs["n_rows"] = int(next(iter(n)) if n else 0)
    g.attrs["columns"] = list(columns)


def read_catalog(path: str, stage: str) -> dict:
    root = open_store(path)
    if "catalogs" not in root or stage not in root["catalogs"]:
        have = sorted(root["catalogs"].group_keys()) if "catalogs" in root else []
        raise StoreError(f"{path}: no catalog for stage {stage!r}; the store has {have}.")
    g = root["catalogs"][stage]
    names = list(g.attrs.get("columns", [])) or sorted(g.array_keys())
    return {k: g[k][...] for k in names}


def catalog_units(path: str, stage: str) -> dict:
    g = open_store(path)["catalogs"][stage]
    return {k: dict(g[k].attrs) for k in g.array_keys()}


def clear_work(path: str):
    shutil.rmtree(os.path.join(path, "_work"), ignore_errors=True)
