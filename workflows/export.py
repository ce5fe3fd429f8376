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
    for name, values in cols.items():  # the store's column order (id, x, y, ..., ra, dec)
        unit = meta.get(name, {}).get("unit") or None
        t[name] = values
        if unit:
            t[name].unit = u.Unit(unit)
        t[name].description = meta.get(name, {}).get("description", "")
    t.meta["stage"] = stage
    t.meta["store"] = os.path.abspath(store_path)
    return t


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
