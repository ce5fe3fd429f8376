"""The simulated-mosaic and truth file formats (written by ``deepmosaic simulate``).

Mosaic file ``OUT.fits``
------------------------
=====  ==========  =======  =====================================================================
HDU    EXTNAME     type     content
=====  ==========  =======  =====================================================================
0      IMAGE       float32  ``[ny, nx]`` sky + objects + noise, counts/px; header holds a celestial
                            TAN WCS (``RA---TAN``/``DEC--TAN``, ``CRPIX`` at the centre, ``CD`` from the
                            pixel scale) and provenance keywords (``MAGZERO``, ``PIXSCALE``, ``PSFFWHM``,
                            ``PSFBETA``, ``NOISESIG``, ``GAIN``, ``SKYLEVEL``, ``SIMSEED``, ``SIMDENS``,
                            ``SEAMTILE``)
1      MASK        int32    ``[ny, nx]`` bit mask, 0 = good; ``MP_BAD = 0`` names bit 0 (dead pixels)
2      VARIANCE    float32  ``[ny, nx]`` variance of the noise in IMAGE, counts^2
=====  ==========  =======  =====================================================================

Truth file ``OUT_truth.fits`` (see :func:`truth_path_for`)
----------------------------------------------------------
=====  ==========  =======  =====================================================================
0      (primary)   --       empty
1      CATALOG     table    one row per true object (columns below)
2      SEGMAP      int32    ``[ny, nx]`` truth segmentation: the owning ``id``, 0 = sky; same WCS
3      CLUMPS      table    only for clumpy mosaics (``SimConfig.clumpy_density > 0``): one row per
                            clump (columns below); read with :func:`read_clump_truth`
=====  ==========  =======  =====================================================================

CATALOG columns (pixel coordinates are 0-based, pixel ``i`` spans ``[i - 0.5, i + 0.5)``; FITS' 1-based
convention is *not* used):

* ``id`` (int64): 1..N, the value in SEGMAP.
* ``x``, ``y`` (float64, pix): true centroid. ``ra``, ``dec`` (float64, deg): the WCS at ``(x, y)``.
* ``flux`` (float64, counts): total flux; ``mag`` = MAGZERO - 2.5 log10(flux).
* ``kind`` (str): ``'star'`` or ``'galaxy'``.
* ``sersic_n`` (Sersic index; 1, the disk's, for bulge + disk; NaN for stars), ``bulge_frac`` (n=4 bulge
  flux fraction; 0 for pure Sersic; NaN for stars), ``bulge_hlr_ratio`` (bulge/disk hlr; NaN unless
  bulge + disk), ``hlr`` (pix, circularised half-light radius before the PSF; 0 for stars), ``q`` (b/a),
  ``angle`` (deg, counter-clockwise from +x).
* ``snr`` (float64): matched-filter S/N of the object alone, ``sqrt(sum(I^2)) / sigma`` over its noise-free
  PSF-convolved light I inside the mosaic.
* ``npix`` (int64): pixels in its truth footprint. Footprint rule: a pixel belongs to the object whose
  noise-free light is largest there, if that light exceeds 1 x the pixel noise sigma; else sky (0).
* ``blendedness`` (float64): 1 - (own light in own footprint) / (all objects' light in that footprint);
  0 when isolated, NaN when ``npix == 0``.
* ``planted_seam`` (bool): planted on a tile seam or corner by ``--plant-seams``.

A clumpy host is an ordinary CATALOG galaxy whose ``flux``, ``snr`` and footprint include its clumps' light.

CLUMPS columns (meta: ``PSFAREA`` = the PSF's effective area ``A_eff`` in px, ``PAIRFWHM``, ``NOISESIG``,
``PSFFWHM``):

* ``id`` (int64): 1..M. ``x``, ``y`` (float64, pix, 0-based), ``ra``, ``dec`` (deg): the clump's centre.
* ``flux`` (float64, counts): the clump's own total flux (a PSF-shaped point source; host light excluded).
* ``snr`` (float64): ``flux / (NOISESIG * sqrt(A_eff))``, the clump's matched-filter S/N against the pixel
  noise in a PSF-sized aperture (``A_eff = 1 / sum(p**2)`` of the unit-sum, pixel-integrated PSF ``p``);
  the host's light under the clump is not counted.
* ``host_id`` (int64): the host's ``id`` in CATALOG.
* ``contrast`` (float64): clump-to-host contrast, ``flux / (host smooth light at the clump's pixel *
  A_eff)``: the clump against the host light in the same PSF-sized aperture (inf where the host has none).
* ``close_pair`` (bool): another clump lies within ``PAIRFWHM`` (3) PSF FWHM.
* ``on_bulge`` (bool): the clump lies inside the bulge's half-light ellipse of a bulge + disk host.

:func:`read_truth` also accepts a truth file without SEGMAP, and a plain catalog (a FITS table in any
HDU, or an ECSV / CSV file) that has at least ``id``, ``x``, ``y`` (``flux`` optional) with 0-based
pixel coordinates.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Column, Table

from .errors import InputError

#: Columns every truth catalog must have.
REQUIRED_COLUMNS = ("id", "x", "y")


def truth_path_for(path: str | os.PathLike) -> Path:
    """The truth file that goes with the mosaic ``path``: ``OUT.fits`` -> ``OUT_truth.fits``.

    A name without a ``.fits``/``.fit``/``.fits.gz`` suffix gets ``_truth.fits`` appended.
    """
    p = Path(path)
    name = p.name
    for suffix in (".fits.gz", ".fits", ".fit"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + "_truth" + name[-len(suffix):])
    return p.with_name(name + "_truth.fits")


_WCS_KEYS = ("WCSAXES", "CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
             "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2",
             "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX")


def _wcs_only(header: fits.Header) -> fits.Header:
    """The WCS cards of ``header``, as they are (for the extension HDUs)."""
    out = fits.Header()
    for key in _WCS_KEYS:
        if key in header:
            out[key] = (header[key], header.comments[key])
    return out


def _write_atomic(hdul: fits.HDUList, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        hdul.writeto(tmp, overwrite=True, checksum=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_simulation(sim, path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a :class:`~deepmosaic.pipeline.simulate.Simulation` as a mosaic file and its truth file.

    Parameters
    ----------
    sim : Simulation
        From :func:`~deepmosaic.pipeline.simulate.simulate_mosaic`.
    path : path-like
        Mosaic file to write (``OUT.fits``); the truth goes to ``truth_path_for(path)``.
    overwrite : bool
        Replace existing files. Without it an existing mosaic or truth file raises InputError and
        nothing is written.

    Returns
    -------
    (image_path, truth_path) : (pathlib.Path, pathlib.Path)
    """
    image_path = Path(path)
    truth_path = truth_path_for(image_path)
    if not overwrite:
        for p in (image_path, truth_path):
            if p.exists():
                raise InputError(
                    f"{str(p)!r} already exists: refusing to overwrite it. Choose another output path, "
                    f"delete the file, or pass overwrite=True (--overwrite).")
    image_path.parent.mkdir(parents=True, exist_ok=True)

    hdr = sim.header.copy()
    wcs_hdr = _wcs_only(hdr)
    primary = fits.PrimaryHDU(data=np.ascontiguousarray(sim.image, dtype=np.float32), header=hdr)
    primary.header["EXTNAME"] = "IMAGE"
    mask_hdr = wcs_hdr.copy()
    mask_hdr["MP_BAD"] = (0, "mask bit plane: dead/bad pixel")
    mask = fits.ImageHDU(data=np.ascontiguousarray(sim.mask, dtype=np.int32), header=mask_hdr, name="MASK")
    var = fits.ImageHDU(data=np.ascontiguousarray(sim.variance, dtype=np.float32), header=wcs_hdr.copy(),
                        name="VARIANCE")
    var.header["BUNIT"] = ("count2", "variance of IMAGE")
    _write_atomic(fits.HDUList([primary, mask, var]), image_path)

    cat = fits.BinTableHDU(sim.truth, name="CATALOG")
    cat.header["IMAGE"] = (image_path.name, "mosaic this truth describes")
    cat.header["PIXCONV"] = ("0-based", "x, y: pixel i spans [i-0.5, i+0.5)")
    seg = fits.ImageHDU(data=np.ascontiguousarray(sim.segmap, dtype=np.int32), header=wcs_hdr.copy(),
                        name="SEGMAP")
    hdus = [fits.PrimaryHDU(), cat, seg]
    if getattr(sim, "clumps", None) is not None:
        hdus.append(fits.BinTableHDU(sim.clumps, name="CLUMPS"))
    _write_atomic(fits.HDUList(hdus), truth_path)
    return image_path, truth_path


def _native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order (FITS data are big-endian)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _set_column(t: Table, name: str, values: np.ndarray) -> None:
    """Replace column ``name`` by ``values``, keeping its unit and description."""
    old = t[name]
    t.replace_column(name, Column(values, name=name, unit=old.unit, description=old.description))


def _table_native(t: Table) -> Table:
    for name in t.colnames:
        col = t[name]
        if col.dtype.kind == "S":
            _set_column(t, name, np.char.decode(np.asarray(col), "ascii"))
        elif col.dtype.kind in "biuf" and not col.dtype.isnative:
            _set_column(t, name, _native(np.asarray(col)))
    return t


def _read_plain(path: Path) -> Table:
    fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv"}.get(path.suffix.lower())
    try:
        return Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one actionable message
        raise InputError(
            f"{str(path)!r}: cannot read a catalog from it ({type(exc).__name__}: {exc}). Expected a truth "
            f"FITS file with a 'CATALOG' table HDU, or an ECSV/CSV/FITS table with columns id, x, y.") from None


def read_truth(path: str | os.PathLike) -> tuple[Table, np.ndarray | None]:
    """Read a truth catalog (and its segmentation map when present).

    Parameters
    ----------
    path : path-like
        A truth file (``OUT_truth.fits``), a FITS file with any table HDU, or an ECSV/CSV catalog.

    Returns
    -------
    truth : astropy.table.Table
        Native-byte-order columns, names lower-cased; at least ``id`` (int64), ``x``, ``y`` (float64,
        0-based pixels).
    segmap : numpy.ndarray of int32, shape (ny, nx), or None
        The SEGMAP HDU (0 = sky, else the owning ``id``), None when the file has none.

    Raises
    ------
    InputError
        Missing or unreadable file, no table HDU, missing required columns, or a SEGMAP that is not a
        2-D integer image or holds ids absent from the catalog.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"truth file {str(p)!r} does not exist. Write one with `deepmosaic simulate OUT.fits` "
                         f"(it writes OUT_truth.fits), or pass an existing catalog (FITS table or ECSV).")
    segmap = None
    where = str(p)
    if p.suffix.lower() in (".ecsv", ".csv"):
        table = _read_plain(p)
    else:
        try:
            hdul = fits.open(p, memmap=False)
        except OSError:
            table = _read_plain(p)
        else:
            with hdul:
                names = [h.name for h in hdul]
                tab_hdus = [h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
                if "CATALOG" in names:
                    hdu = hdul["CATALOG"]
                    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                        raise InputError(f"{where}[CATALOG]: HDU 'CATALOG' is an image, not a table. "
                                         f"Write the truth with deepmosaic.pipeline.truth.write_simulation.")
                elif tab_hdus:
                    hdu = tab_hdus[0]
                else:
                    raise InputError(
                        f"{where}: no 'CATALOG' table HDU (HDUs present: {names}). Pass the truth file "
                        f"written by `deepmosaic simulate` (OUT_truth.fits), not the mosaic itself.")
                where = f"{p}[{hdu.name or hdul.index_of(hdu)}]"
                table = Table.read(hdu, character_as_bytes=False)
                if "SEGMAP" in names:
                    seg = hdul["SEGMAP"].data
                    if seg is None or seg.ndim != 2 or seg.dtype.kind not in "iu":
                        raise InputError(
                            f"{p}[SEGMAP]: expected a 2-D integer image, got "
                            f"{None if seg is None else (seg.shape, str(seg.dtype))}. Rewrite the truth file.")
                    segmap = _native(np.asarray(seg)).astype(np.int32, copy=False)
    table = _table_native(table)
    for key in ("EXTNAME", "CHECKSUM", "DATASUM"):
        table.meta.pop(key, None)
    lower = {n.lower(): n for n in table.colnames}
    for low, orig in lower.items():
        if low != orig and low not in table.colnames:
            table.rename_column(orig, low)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError(
            f"{where}: missing required column(s) {missing}; found {table.colnames}. A truth catalog needs "
            f"id, x, y (0-based pixels) and optionally flux; rename the columns or regenerate the truth.")
    ids = np.asarray(table["id"])
    if ids.dtype.kind not in "iu":
        if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
            raise InputError(f"{where}: column 'id' must hold integers; got dtype {ids.dtype}.")
    _set_column(table, "id", ids.astype(np.int64))
    for c in ("x", "y"):
        _set_column(table, c, np.asarray(table[c], dtype=np.float64))
    if len(np.unique(table["id"])) != len(table):
        raise InputError(f"{where}: column 'id' has duplicate values; each true object needs a unique id.")
    if segmap is not None:
        _check_segmap_ids(p, segmap, np.asarray(table["id"]))
    return table, segmap


#: Columns a clump truth table must have.
CLUMP_REQUIRED_COLUMNS = ("id", "x", "y", "snr", "host_id")


def read_clump_truth(path: str | os.PathLike) -> Table:
    """The CLUMPS table of a truth file (native byte order, lower-case names), see the module docstring.

    Raises
    ------
    InputError
        Missing file, no CLUMPS table HDU (a mosaic simulated without ``clumpy_density``), or missing columns.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"clump truth file {str(p)!r} does not exist. Simulate a clumpy mosaic with "
                         f"`deepmosaic simulate OUT.fits --clumps PER_MPIX` (it writes OUT_truth.fits).")
    try:
        hdul = fits.open(p, memmap=False)
    except OSError as exc:
        raise InputError(f"{str(p)!r}: not a FITS file ({exc}); pass the OUT_truth.fits of a clumpy mosaic.") from None
    with hdul:
        names = [h.name for h in hdul]
        if "CLUMPS" not in names or not isinstance(hdul["CLUMPS"], fits.BinTableHDU):
            raise InputError(f"{p}: no 'CLUMPS' table HDU (HDUs present: {names}): the mosaic was simulated "
                             f"without clumps. Simulate one with `deepmosaic simulate OUT.fits --clumps 60` "
                             f"(SimConfig.clumpy_density > 0).")
        table = _table_native(Table.read(hdul["CLUMPS"], character_as_bytes=False))
    for key in ("EXTNAME", "CHECKSUM", "DATASUM"):
        table.meta.pop(key, None)
    for name in list(table.colnames):
        if name.lower() != name and name.lower() not in table.colnames:
            table.rename_column(name, name.lower())
    missing = [c for c in CLUMP_REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError(f"{p}[CLUMPS]: missing column(s) {missing}; found {table.colnames}. Regenerate the "
                         f"truth with `deepmosaic simulate --clumps`.")
    return table


def _check_segmap_ids(p: Path, segmap: np.ndarray, ids: np.ndarray) -> None:
    if segmap.size == 0:
        return
    lo, hi = int(segmap.min()), int(segmap.max())
    if lo < 0:
        raise InputError(f"{p}[SEGMAP]: negative value {lo}; expected 0 for sky and catalog ids elsewhere.")
    if hi == 0:
        return
    if hi < 50_000_000:
        present = np.flatnonzero(np.bincount(segmap.ravel()))
    else:
        present = np.unique(segmap)
    present = present[present > 0]
    unknown = np.setdiff1d(present, ids)
    if unknown.size:
        raise InputError(f"{p}[SEGMAP]: ids {unknown[:5].tolist()} (of {unknown.size}) are not in CATALOG.id; "
                         f"the segmentation map and catalog do not belong together. Regenerate the truth file.")


__all__ = ["write_simulation", "read_truth", "read_clump_truth", "truth_path_for", "REQUIRED_COLUMNS",
           "CLUMP_REQUIRED_COLUMNS"]
