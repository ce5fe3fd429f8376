"""Reading mosaics lazily: FITS (memmapped, any HDU, LSST-style exposures) and zarr arrays.

A ``MosaicSource`` is a small, picklable description of one band of a mosaic. Dask workers call
``read_window`` to read their own tile window straight from the file; the client never ships pixels.
A ``Mosaic`` groups one or more bands on the same pixel grid (one file per band, or the planes of a
cube); the first stages detect on one band (``detect_band``), later ones may read them all.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

# LSST mask planes treated as bad pixels by default (MP_<NAME> header keywords give their bits).
DEFAULT_BAD_PLANES = ("BAD", "SAT", "CR", "NO_DATA", "SUSPECT")


@functools.lru_cache(maxsize=16)
def _open_fits(path: str, mtime: float):
    from astropy.io import fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard cards in old headers are not our concern here
        # BSCALE/BZERO/BLANK are applied by read_window, so that integer images stay memory-mapped
        return fits.open(path, memmap=True, lazy_load_hdus=False, do_not_scale_image_data=True)


def _fits(path: str):
    return _open_fits(path, os.path.getmtime(path))


_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _raw_window(path: str, hdu, key) -> np.ndarray:
    """On-disk (unscaled) pixels of ``hdu`` at ``key``.

    Plain image HDUs are read through a short-lived ``np.memmap`` of the data block: one strided copy
    of the window, and the mapped pages are released when the map goes (astropy's ``section`` reads row
    by row and leaves the file's pages in the worker's RSS). Compressed HDUs go through ``section``.
    """
    info = hdu.fileinfo()
    bitpix = hdu.header.get("BITPIX")
    if info is None or bitpix not in _BITPIX_DTYPES or hdu.header.get("ZIMAGE") or not hdu.is_image:
        return np.asarray(hdu.section[key])
    shape = tuple(int(hdu.header[f"NAXIS{i}"]) for i in range(hdu.header["NAXIS"], 0, -1))
    mm = np.memmap(path, dtype=_BITPIX_DTYPES[bitpix], mode="r", offset=info["datLoc"], shape=shape)
    try:
        return np.array(mm[key])
    finally:
        del mm


@functools.lru_cache(maxsize=16)
def _open_zarr(path: str, mtime: float):
    import zarr
    return zarr.open_array(path, mode="r")


def _physical(header, raw: np.ndarray) -> np.ndarray:
    """Apply BSCALE/BZERO of a mask/variance HDU (files are opened with scaling off): e.g. an unsigned
    16-bit mask is stored as int16 with BZERO=32768, whose raw zero would otherwise read as -32768."""
    bscale, bzero = header.get("BSCALE", 1), header.get("BZERO", 0)
    if bscale == 1 and bzero == 0:
        return raw
    if raw.dtype.kind in "iu" and bscale == 1 and float(bzero).is_integer():
        return raw.astype(np.int64) + int(bzero)
    return raw.astype(np.float64) * bscale + bzero


def _find_hdu(hdul, path: str, hdu, role: str):
    try:
        return hdul[hdu]
    except (KeyError, IndexError):
        names = [h.name or str(i) for i, h in enumerate(hdul)]
        raise InputError(f"{path}: {role} HDU {hdu!r} not found; the file has HDUs {names}. "
                         f"Name one of them (e.g. --hdu {names[0]!r}).") from None


@dataclass(frozen=True)
class MosaicSource:
    """One band of a mosaic on disk; ``read_window`` returns float32 image, bool mask, variance.

    Attributes
    ----------
    path : file path (FITS or zarr)
    kind : "fits" or "zarr"
    hdu : FITS HDU name or index of the image
    plane : index along the first axis of a cube, or None for a 2-D image
    mask_hdu, variance_hdu : FITS HDU names/indices or None
    mask_bits : integer bit mask of the mask planes counted as bad (0: any nonzero mask value is bad)
    shape : (ny, nx); dtype : the on-disk dtype (e.g. ">i2"); band : the band's name
    """

    path: str
    kind: str
    hdu: object = 0
    plane: int | None = None
    mask_hdu: object = None
    variance_hdu: object = None
    mask_bits: int = 0
    shape: tuple[int, int] = (0, 0)
    dtype: str = ""
    band: str = "band0"
    bscale: float = 1.0
    bzero: float = 0.0
    blank: int | None = None
    header: str = field(default="", repr=False)  # the image header as text (WCS)

    def read_window(self, window: tuple[int, int, int, int]):
        """Read ``[y0:y1, x0:x1]``.

        Returns
        -------
        image : float32 [y, x], native byte order; non-finite pixels set to 0
        mask : bool [y, x], True = bad (non-finite, masked planes, zero/negative variance)
        variance : float32 [y, x] or None
        """
        y0, y1, x0, x1 = window
        sl = (slice(y0, y1), slice(x0, x1))
        if self.kind == "fits":
            hdul = _fits(self.path)
            h = hdul[self.hdu]
            img = _raw_window(self.path, h, (self.plane,) + sl if self.plane is not None else sl)
            var = msk = None
            if self.variance_hdu is not None:
                hv = hdul[self.variance_hdu]
                var = np.asarray(_physical(hv.header, _raw_window(self.path, hv, sl)), dtype=np.float32)
            if self.mask_hdu is not None:
                hm = hdul[self.mask_hdu]
                msk = _physical(hm.header, _raw_window(self.path, hm, sl))
        else:
            arr = _open_zarr(self.path, os.path.getmtime(self.path))
            img = arr[(self.plane,) + sl] if self.plane is not None else arr[sl]
            var = msk = None
        raw = np.asarray(img)
        bad = np.zeros(raw.shape, bool) if self.blank is None else raw == self.blank
        if self.bscale != 1.0 or self.bzero != 0.0:
            image = (raw.astype(np.float64) * self.bscale + self.bzero).astype(np.float32)
        else:
            image = raw.astype(np.float32)  # also converts big-endian to native order
        bad |= ~np.isfinite(image)
        if msk is not None:
            if self.mask_bits:
                bad |= (msk.astype(np.int64, copy=False) & self.mask_bits) != 0
            else:
                bad |= msk != 0
        if var is not None:
            bad |= ~np.isfinite(var) | (var <= 0)
            var = np.where(np.isfinite(var), var, 0).astype(np.float32)
        if bad.any():
            image = image.copy()
            image[bad] = 0.0
        return image, bad, var

    def wcs(self):
        """The celestial astropy WCS of the image, or None when the header has none."""
        if not self.header:
            return None
        from astropy.io import fits
        from astropy.wcs import WCS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = WCS(fits.Header.fromstring(self.header))
        if not w.has_celestial:
            return None
        return w.celestial


@dataclass(frozen=True)
class Mosaic:
    """Bands of one mosaic on a common pixel grid; ``detect_band`` is what single-band stages use."""

    bands: tuple[MosaicSource, ...]
    detect_band: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def detection(self) -> MosaicSource:
        return self.bands[self.detect_band]

    @property
    def shape(self) -> tuple[int, int]:
        return self.detection.shape


def _mask_bits_from_header(header, planes) -> int:
    bits = 0
    for p in planes:
        key = f"MP_{p}"
        if key in header:
            bits |= 1 << int(header[key])
    return bits


def _check_fits_data(path, hdul, hdu_key, role):
    h = _find_hdu(hdul, path, hdu_key, role)
    if h.header.get("NAXIS", 0) == 0 or not getattr(h, "is_image", True):
        raise InputError(f"{path}: HDU {hdu_key!r} ({role}) holds no image data "
                         f"(NAXIS={h.header.get('NAXIS', 0)}). Name the image HDU with --hdu.")
    shape = tuple(int(h.header[f"NAXIS{i}"]) for i in range(h.header["NAXIS"], 0, -1))
    if any(s == 0 for s in shape):
        raise InputError(f"{path}: HDU {hdu_key!r} ({role}) is a zero-size image {shape}; nothing to process.")
    info = h.fileinfo()
    size = os.path.getsize(path)
    if info is not None and info["datLoc"] + info["datSpan"] > size:
        raise InputError(
            f"{path}: HDU {hdu_key!r} ({role}) is truncated: its data needs "
            f"{info['datLoc'] + info['datSpan']} bytes but the file has {size}. Re-copy or re-download the file.")
    return h, shape


def open_fits(path: str, hdu=None, mask_hdu="auto", variance_hdu="auto", mask_planes=DEFAULT_BAD_PLANES,
              cube_bands: bool = False) -> Mosaic:
    """Open a FITS mosaic lazily and validate it.

    Parameters
    ----------
    path : FITS file
    hdu : image HDU (name or index); default: ``IMAGE`` if present, else the first HDU with 2-D data
    mask_hdu, variance_hdu : ``"auto"`` takes HDUs named ``MASK`` / ``VARIANCE`` when present; None for none
    mask_planes : LSST mask planes (``MP_*`` keywords of the mask header) counted as bad pixels
    cube_bands : read a 3-D cube's first axis as bands instead of refusing it
    """
    from astropy.io import fits
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file. Check the path (relative paths are from {os.getcwd()}).")
    try:
        hdul = _fits(os.path.abspath(path))
        hdul.verify("silentfix")
        _ = [h.header for h in hdul]
    except InputError:
        raise
    except Exception as e:  # astropy raises OSError/ValueError/TypeError on corrupt files
        raise InputError(f"{path}: not a readable FITS file ({type(e).__name__}: {e}). "
                         f"Check that the file is complete and really FITS.") from None
    if isinstance(hdu, str) and hdu.strip().isdigit() and hdu.strip().upper() not in [h.name for h in hdul]:
        hdu = int(hdu)  # --hdu 1 on the command line arrives as the string "1": an HDU number
    if hdu is None:
        names = [h.name for h in hdul]
        if "IMAGE" in names:
            hdu = "IMAGE"
        else:
            hdu = next((i for i, h in enumerate(hdul) if h.header.get("NAXIS", 0) >= 2 and h.is_image), None)
            if hdu is None:
                raise InputError(f"{path}: no HDU holds an image (HDUs: {[h.name for h in hdul]}); "
                                 f"this file cannot be processed as a mosaic.")
    h, shape = _check_fits_data(path, hdul, hdu, "image")
    names = [x.name for x in hdul]
    if mask_hdu == "auto":
        mask_hdu = "MASK" if "MASK" in names and hdu != "MASK" else None
    if variance_hdu == "auto":
        variance_hdu = "VARIANCE" if "VARIANCE" in names and hdu != "VARIANCE" else None
    mask_bits = 0
    for role, key in (("mask", mask_hdu), ("variance", variance_hdu)):
        if key is None:
            continue
        hh, s = _check_fits_data(path, hdul, key, role)
        if s != shape[-2:]:
            raise InputError(f"{path}: {role} HDU {key!r} has shape {s} but the image HDU {hdu!r} has "
                             f"{shape[-2:]}; they must match.")
        if role == "mask":
            mask_bits = _mask_bits_from_header(hh.header, mask_planes)
            if mask_bits == 0 and any(str(k).startswith("MP_") for k in hh.header):
                # the mask declares its planes but none of the bad ones: no pixel is bad by its mask
                # (mask_bits=0 would mean "any nonzero value is bad", e.g. DETECTED)
                mask_hdu = None
    header = h.header.copy()
    if len(shape) == 3:
        if not cube_bands:
            raise InputError(f"{path}: HDU {hdu!r} is a 3-D cube {shape}; deepmosaic expects a 2-D image. "
                             f"Pass cube_bands=True (--cube-bands) to read its first axis as bands, or "
                             f"give one file per band.")
        planes = range(shape[0])
    elif len(shape) == 2:
        planes = [None]
    else:
        raise InputError(f"{path}: HDU {hdu!r} has {len(shape)} axes {shape}; expected a 2-D image.")
    for k in list(header.keys()):
        if k.startswith(("NAXIS3", "CTYPE3", "CRPIX3", "CRVAL3", "CDELT3", "CUNIT3", "PC3_", "CD3_")):
            del header[k]
    htext = header.tostring()
    dtype = h.header.get("BITPIX")
    bands = tuple(
        MosaicSource(path=os.path.abspath(path), kind="fits", hdu=hdu, plane=p, mask_hdu=mask_hdu,
                     variance_hdu=variance_hdu, mask_bits=mask_bits, shape=tuple(shape[-2:]),
                     dtype=f"BITPIX={dtype}", bscale=float(h.header.get("BSCALE", 1.0)),
                     bzero=float(h.header.get("BZERO", 0.0)),
                     blank=int(h.header["BLANK"]) if "BLANK" in h.header and int(dtype) > 0 else None,
                     band=str(header.get("FILTER", f"band{i}")) if p is None else f"band{i}",
                     header=htext)
        for i, p in enumerate(planes))
    return Mosaic(bands=bands)


def open_zarr(path: str, cube_bands: bool = False) -> Mosaic:
    """Open a zarr array mosaic (2-D, or 3-D with ``cube_bands``); a ``wcs`` attr may hold a FITS header dict."""
    path = os.fspath(path)
    try:
        arr = _open_zarr(os.path.abspath(path), os.path.getmtime(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable zarr array ({type(e).__name__}: {e}).") from None
    shape = tuple(arr.shape)
    if any(s == 0 for s in shape):
        raise InputError(f"{path}: zero-size array {shape}; nothing to process.")
    if len(shape) == 3 and not cube_bands:
        raise InputError(f"{path}: a 3-D array {shape}; pass cube_bands=True (--cube-bands) to read its "
                         f"first axis as bands.")
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: array has {len(shape)} axes {shape}; expected a 2-D image.")
    header = ""
    wcs = dict(arr.attrs).get("wcs")
    if wcs:
        from astropy.io import fits
        header = fits.Header(wcs).tostring()
    planes = range(shape[0]) if len(shape) == 3 else [None]
    return Mosaic(bands=tuple(
        MosaicSource(path=os.path.abspath(path), kind="zarr", plane=p, shape=tuple(shape[-2:]),
                     dtype=str(arr.dtype), band=f"band{i}", header=header) for i, p in enumerate(planes)))


def open_mosaic(path, **kwargs) -> Mosaic:
    """Open FITS (``.fits``, ``.fit``, ``.fits.fz``...) or zarr (a directory) lazily, validating it."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return open_zarr(p, cube_bands=kwargs.get("cube_bands", False))
    return open_fits(p, **kwargs)
