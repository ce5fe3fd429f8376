"""Export store catalogs as astropy tables with units (FITS, Parquet, ECSV)."""
from __future__ import annotations

import os

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import DeepmosaicError, StoreError

EXTENSIONS = {"fits": ".fits", "parquet": ".parquet", "ecsv": ".ecsv"}


def catalog_table(store_path: str, stage: str):
    """``catalogs/<stage>`` as an astropy Table, units and descriptions from the column attrs."""
    import astropy.units as u
    from astropy.table import Table
    cols = st.read_catalog(store_path, stage)
    meta = st.catalog_units(store_path, stage)
    t = Table()
    for name in _column_order(stage, cols):
        values = cols[name]
        unit = meta.get(name, {}).get("unit") or None
        t[name] = values
        if unit:
            t[name].unit = u.Unit(unit)
        t[name].description = meta.get(name, {}).get("description", "")
    t.meta["stage"] = stage
    t.meta["store"] = os.path.abspath(store_path)
    return t


def _column_order(stage: str, cols) -> list[str]:
    """The store's column order (id, x, y, the stage's columns, flags, tile, ra/dec), not the order in
    which zarr happens to list the arrays (that follows the file system and changes between stores)."""
    stage_cols: list[str] = []
    try:
        from deepmosaic.tasks import get_task_class
        stage_cols = list(get_task_class(stage).columns)
    except DeepmosaicError:
        pass  # a stage this installation does not know: its own columns go in name order
    head = [c for c in ["id", "x", "y"] + stage_cols if c in cols and c != "flags"]
    tail = [c for c in ("flags", "tile_row", "tile_col", "ra", "dec") if c in cols]
    rest = sorted(set(cols) - set(head) - set(tail))
    return list(dict.fromkeys(head)) + rest + tail


def export_catalogs(store_path, fmt="fits", stages=None, out_dir=None, overwrite=False):
    """Write one table per stage; returns the paths written."""
    if fmt not in EXTENSIONS:
        raise DeepmosaicError(f"--format={fmt!r}: use one of {', '.join(EXTENSIONS)}.")
    root = st.open_store(store_path)
    have = sorted(root["catalogs"].group_keys())
    stages = stages or have
    if not have:
        raise StoreError(f"{store_path}: the store has no catalogs yet (is the run finished? try --resume).")
    out_dir = out_dir or os.path.dirname(os.path.abspath(store_path))
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.basename(os.path.normpath(store_path)).removesuffix(".zarr")
    targets = [(s, os.path.join(out_dir, f"{base}_{s}{EXTENSIONS[fmt]}")) for s in stages]
    if not overwrite:  # refuse before writing anything, not after some stages' tables are written
        for _, path in targets:
            if os.path.exists(path):
                raise StoreError(f"{path} exists; pass --overwrite to replace it.")
    paths = []
    for s, path in targets:
        t = catalog_table(store_path, s)
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise DeepmosaicError("--format parquet needs pyarrow: pip install 'deepmosaic[parquet]'.") from None
            t.write(path, format="parquet", overwrite=True)
        elif fmt == "ecsv":
            t.write(path, format="ascii.ecsv", overwrite=True)
        else:
            t.write(path, format="fits", overwrite=True)
        paths.append(path)
    return paths
