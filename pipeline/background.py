"""A global, mesh-aligned background model computed tile by tile (SExtractor's algorithm).

The mosaic is divided into meshes of ``back_size`` pixels aligned to the mosaic origin. Each mesh's
background and RMS are estimated from its own pixels (sep's clipped-histogram mode estimator, called on
that mesh alone), so any tile can compute the meshes it owns. The mesh grid is then assembled, bad
meshes are filled from their nearest good neighbours, median-filtered, and interpolated with a natural
bicubic spline exactly as SExtractor/sep do. Evaluating the model on a tile window gives the same pixel
values as evaluating it on the whole mosaic: the tiled background equals the whole-image one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

BACK_MINGOODFRAC = 0.5  # a mesh with fewer good pixels than this fraction is "bad" (SExtractor's rule)


def mesh_grid_shape(shape: tuple[int, int], back_size: int) -> tuple[int, int]:
    """Number of meshes ``(n_y, n_x)`` over a mosaic of ``shape`` (the last ones may be partial)."""
    return (shape[0] - 1) // back_size + 1, (shape[1] - 1) // back_size + 1


def measure_meshes(image: np.ndarray, mask: np.ndarray | None, back_size: int):
    """Background and RMS of every mesh of ``image``, whose origin must be mesh-aligned.

    Parameters
    ----------
    image : float32 [y, x], a block of whole meshes (the last row/column may be partial only at
        the mosaic edge)
    mask : bool [y, x] or None, True = bad pixel (excluded)
    back_size : mesh size in pixels

    Returns
    -------
    back, rms : float64 [n_y, n_x]; NaN marks a bad mesh (fewer than half its pixels usable)
    """
    ny, nx = mesh_grid_shape(image.shape, back_size)
    back = np.full((ny, nx), np.nan)
    rms = np.full((ny, nx), np.nan)
    image = np.ascontiguousarray(image, dtype=np.float32)
    for j in range(ny):
        for i in range(nx):
            sl = (slice(j * back_size, (j + 1) * back_size), slice(i * back_size, (i + 1) * back_size))
            sub = np.ascontiguousarray(image[sl])
            msub = None if mask is None else np.ascontiguousarray(mask[sl], dtype=np.uint8)
            n_good = sub.size if msub is None else int(sub.size - msub.sum())
            if n_good < sub.size * BACK_MINGOODFRAC:
                continue
            b = sep.Background(sub, mask=msub, bw=sub.shape[1], bh=sub.shape[0], fw=1, fh=1)
            back[j, i], rms[j, i] = b.globalback, b.globalrms
    return back, rms


def _fill_bad(back: np.ndarray, rms: np.ndarray):
    """Replace bad (NaN) meshes by the mean of their nearest good meshes (SExtractor's rule)."""
    bad = np.isnan(back)
    if not bad.any():
        return back.copy(), rms.copy()
    if bad.all():
        return np.zeros_like(back), np.ones_like(rms)
    gy, gx = np.nonzero(~bad)
    out_b, out_r = back.copy(), rms.copy()
    for y, x in zip(*np.nonzero(bad)):
        d2 = (gy - y) ** 2 + (gx - x) ** 2
        near = d2 == d2.min()
        out_b[y, x] = back[gy[near], gx[near]].mean()
        out_r[y, x] = rms[gy[near], gx[near]].mean()
    return out_b, out_r


def _median_filter(grid: np.ndarray, other: np.ndarray, fy: int, fx: int, thresh: float):
    """SExtractor's mesh median filter: a window shrunk symmetrically at the grid edges."""
    ny, nx = grid.shape
    hy, hx = fy // 2, fx // 2
    out, out_o = grid.copy(), other.copy()
    for y in range(ny):
        ry = min(hy, y, ny - 1 - y)
        for x in range(nx):
            rx = min(hx, x, nx - 1 - x)
            win = grid[y - ry:y + ry + 1, x - rx:x + rx + 1]
            med = np.median(win)
            if abs(med - grid[y, x]) >= thresh:
                out[y, x] = med
                out_o[y, x] = np.median(other[y - ry:y + ry + 1, x - rx:x + rx + 1])
    return out, out_o


def _sextractor_second_derivatives(n: int) -> np.ndarray:
    """SExtractor's spline "second derivatives" ``[n_nodes, n_nodes]`` for unit node data.

    SExtractor's ``makebackspline``/``backline`` solve the natural-spline tridiagonal system but
    divide by 6 during the back-substitution, so the result is not exactly a natural cubic spline.
    The recurrence is linear in the node values; applying it to the identity gives the operator, which
    we then use on any data. Reproducing it (rather than using a textbook spline) makes our background
    agree with sep/SExtractor to float32 rounding.
    """
    values = np.eye(n)
    deriv = np.zeros((n, n))
    if n < 3:
        return deriv
    u = np.zeros((n, n))
    geom = np.zeros(n)
    for k in range(1, n - 1):
        temp = -1.0 / (geom[k - 1] + 4.0)
        geom[k] = temp
        u[k] = temp * (u[k - 1] - 6.0 * (values[k + 1] + values[k - 1] - 2.0 * values[k]))
    for k in range(n - 2, 0, -1):
        deriv[k] = (geom[k] * deriv[k + 1] + u[k]) / 6.0
    return deriv


def _spline_weights(n_nodes: int, positions: np.ndarray, linear: bool = False) -> np.ndarray:
    """Weights ``[len(positions), n_nodes]`` of SExtractor's spline through nodes at 0..n-1.

    ``positions`` are in node units. Beyond the first/last node the end segment is extrapolated.
    ``linear=True`` drops the curvature terms (SExtractor does this along x when there is a single
    row of meshes, because it then reuses the all-zero y derivatives).
    """
    positions = np.asarray(positions, dtype=np.float64)
    if n_nodes == 1:
        return np.ones((positions.size, 1))
    seg = np.clip(np.trunc(positions).astype(int), 0, n_nodes - 2)
    t = positions - seg
    ct = 1.0 - t
    eye = np.eye(n_nodes)
    w = ct[:, None] * eye[seg] + t[:, None] * eye[seg + 1]
    if not linear:
        deriv = _sextractor_second_derivatives(n_nodes)
        w += (ct ** 3 - ct)[:, None] * deriv[seg] + (t ** 3 - t)[:, None] * deriv[seg + 1]
    return w


@dataclass(frozen=True)
class BackgroundModel:
    """The filtered mesh grid of a mosaic; evaluate it on any window.

    back, rms : float64 [n_y, n_x] filtered mesh values
    back_size : mesh size in pixels; global_back, global_rms : medians of the filtered meshes
    (sep's ``globalback``/``globalrms``)
    """

    back: np.ndarray
    rms: np.ndarray
    back_size: int
    global_back: float
    global_rms: float

    @classmethod
    def from_meshes(cls, back, rms, back_size: int, filter_size: int = 3, filter_thresh: float = 0.0):
        """Fill bad meshes, median-filter, and build the model (SExtractor's ``filterback``)."""
        b, r = _fill_bad(np.asarray(back, float), np.asarray(rms, float))
        if filter_size > 1:
            b, r = _median_filter(b, r, filter_size, filter_size, filter_thresh)
        return cls(back=b, rms=r, back_size=int(back_size), global_back=float(np.median(b)),
                   global_rms=float(np.median(r)) if np.median(r) > 0 else 1.0)

    def _weights(self, y0, y1, x0, x1):
        s = self.back_size
        # SExtractor places mesh nodes at y = (j + 0.5) * s along y and at x = (i + 0.5) * s - 0.5
        # along x (its line interpolator starts at dx = (1/s - 1)/2); we reproduce both.
        wy = _spline_weights(self.back.shape[0], np.arange(y0, y1) / s - 0.5)
        wx = _spline_weights(self.back.shape[1], (np.arange(x0, x1) + 0.5) / s - 0.5,
                             linear=self.back.shape[0] == 1)
        return wy, wx

    def evaluate(self, window: tuple[int, int, int, int]):
        """Background and RMS maps (float32) on the mosaic window ``(y0, y1, x0, x1)``."""
        wy, wx = self._weights(*window)
        back = (wy @ self.back @ wx.T).astype(np.float32)
        rms = (wy @ self.rms @ wx.T).astype(np.float32)
        return back, rms

    def to_attrs(self) -> dict:
        return {"back_size": self.back_size, "global_back": self.global_back,
                "global_rms": self.global_rms, "mesh_shape": list(self.back.shape)}


def object_mask(image, mask, back, rms: float, thresh: float = 1.5, minarea: int = 5, dilate: int = 8) -> np.ndarray:
    """Pixels of detected objects, grown by ``dilate`` px: what :func:`measure_meshes` leaves out in the
    object-masked background (a second pass, as photutils advises: sky meshes otherwise take up the faint
    wings of every galaxy, and the model sits a few hundredths of the noise above the true sky).

    Objects are sep.extract footprints of ``image - back`` above ``thresh * rms`` (``rms`` the model's global
    RMS, as the sep stage detects; a per-pixel RMS map changes sep's matched-filter threshold) with
    ``minarea`` pixels and sep's default 3x3 filter, without deblending (only their union matters); grown by
    ``dilate`` iterations of a 3x3 square. Returns a bool mask, True = object (or already masked).
    """
    from deepmosaic.tasks.sep_task import SepConfig, make_kernel, run_extract   # the sep stage's extraction
    data = np.ascontiguousarray(image - back, dtype=np.float32)
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, bool)
    cfg = SepConfig(thresh=float(thresh), minarea=int(minarea))
    _, seg, _, _ = run_extract(data, bad, float(rms), cfg, make_kernel("default"), deblend_nthresh=1,
                               deblend_cont=1.0, clean=False)
    objects = seg > 0
    if dilate > 0 and objects.any():
        from scipy.ndimage import binary_dilation
        objects = binary_dilation(objects, np.ones((3, 3), bool), iterations=int(dilate))
    return objects | bad


def background_of_image(image, mask=None, back_size=64, filter_size=3, filter_thresh=0.0, mask_objects=0,
                        mask_thresh=1.5, mask_minarea=5):
    """The whole-image background model (the untiled reference for tests and small images); with
    ``mask_objects`` > 0 the object-masked second pass of :func:`object_mask` (dilation ``mask_objects``)."""
    b, r = measure_meshes(image, mask, back_size)
    model = BackgroundModel.from_meshes(b, r, back_size, filter_size, filter_thresh)
    if mask_objects <= 0:
        return model
    back, _ = model.evaluate((0, image.shape[0], 0, image.shape[1]))
    obj = object_mask(image, mask, back, model.global_rms, mask_thresh, mask_minarea, mask_objects)
    b, r = measure_meshes(image, obj, back_size)
    return BackgroundModel.from_meshes(b, r, back_size, filter_size, filter_thresh)
