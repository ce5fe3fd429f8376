"""The tile grid: cores that cover the mosaic exactly, each with a halo clipped at the mosaic edge.

Coordinates are 0-based ``[y, x]`` mosaic pixels. A tile's *core* is the part it owns (objects whose
centroid falls in it, and the zarr chunk of every map); its *window* is the core grown by the halo and
clipped to the mosaic; the stages see the window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

#: Object ids are ``tile.index * ID_STRIDE + k`` with ``k`` = 1, 2, ... inside the tile: deterministic,
#: unique across the store, and known to the tile worker without talking to any other tile.
ID_STRIDE = 100_000_000


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position, core and window in mosaic pixels (half-open, ``[y0, y1) x [x0, x1)``)."""

    row: int
    col: int
    index: int
    core: tuple[int, int, int, int]     # y0, y1, x0, x1
    window: tuple[int, int, int, int]   # y0, y1, x0, x1 (core + halo, clipped)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """Slices that cut the core out of a window-shaped array."""
        cy0, cy1, cx0, cx1 = self.core
        wy0, _, wx0, _ = self.window
        return slice(cy0 - wy0, cy1 - wy0), slice(cx0 - wx0, cx1 - wx0)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        cy0, cy1, cx0, cx1 = self.core
        return slice(cy0, cy1), slice(cx0, cx1)

    @property
    def window_slices(self) -> tuple[slice, slice]:
        wy0, wy1, wx0, wx1 = self.window
        return slice(wy0, wy1), slice(wx0, wx1)

    @property
    def origin(self) -> tuple[int, int]:
        return self.window[0], self.window[2]

    @property
    def window_shape(self) -> tuple[int, int]:
        wy0, wy1, wx0, wx1 = self.window
        return wy1 - wy0, wx1 - wx0

    def owns(self, y, x):
        """Boolean (array) telling whether mosaic position(s) ``(y, x)`` fall in this tile's core.

        Pixel ``i`` spans ``[i - 0.5, i + 0.5)``, so a core ``[y0, y1)`` owns centroids in
        ``[y0 - 0.5, y1 - 0.5)``; the first and last tiles also own centroids beyond the mosaic edge.
        """
        cy0, cy1, cx0, cx1 = self.core
        return (_ge(y, cy0 - 0.5, cy0 == 0) & _lt(y, cy1 - 0.5, self._last_y)
                & _ge(x, cx0 - 0.5, cx0 == 0) & _lt(x, cx1 - 0.5, self._last_x))

    # set by TileGrid so that edge tiles also own centroids beyond the mosaic's last pixel
    _last_y: bool = False
    _last_x: bool = False


def _ge(v, lo, open_low):
    import numpy as np
    v = np.asarray(v, dtype=float)
    return np.ones(v.shape, bool) if open_low else v >= lo


def _lt(v, hi, open_high):
    import numpy as np
    v = np.asarray(v, dtype=float)
    return np.ones(v.shape, bool) if open_high else v < hi


@dataclass(frozen=True)
class TileGrid:
    """Regular grid of cores over a ``shape = (ny, nx)`` mosaic.

    Parameters
    ----------
    shape : (int, int)
        Mosaic shape ``(ny, nx)``.
    core : int or (int, int)
        Core size in pixels (the last row/column of tiles may be smaller).
    halo : int
        Halo width in pixels, the maximum the configured stages declare. Must be smaller than the core.
    """

    shape: tuple[int, int]
    core: tuple[int, int]
    halo: int

    def __init__(self, shape, core=1024, halo=0):
        core = (int(core), int(core)) if isinstance(core, (int, float)) else tuple(int(c) for c in core)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ConfigError(f"mosaic shape={shape}: expected two positive sizes (ny, nx).")
        if min(core) < 16:
            raise ConfigError(f"tile={core}: tile cores must be at least 16 px; use --tile 256 or more.")
        if halo < 0:
            raise ConfigError(f"halo={halo}: must be >= 0.")
        if halo >= min(core):
            raise ConfigError(
                f"halo={halo} px does not fit the tile core={core[0]}x{core[1]} px: the halo the stages need "
                f"must be smaller than the core. Use a larger --tile (at least {halo + 1}, better "
                f"{max(256, 4 * halo)}) or reduce the stages' halo.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "halo", int(halo))

    @property
    def n_rows(self) -> int:
        return math.ceil(self.shape[0] / self.core[0])

    @property
    def n_cols(self) -> int:
        return math.ceil(self.shape[1] / self.core[1])

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, row: int, col: int) -> Tile:
        ny, nx = self.shape
        cy, cx = self.core
        h = self.halo
        y0, x0 = row * cy, col * cx
        y1, x1 = min(y0 + cy, ny), min(x0 + cx, nx)
        t = Tile(row=row, col=col, index=row * self.n_cols + col, core=(y0, y1, x0, x1),
                 window=(max(0, y0 - h), min(ny, y1 + h), max(0, x0 - h), min(nx, x1 + h)))
        object.__setattr__(t, "_last_y", row == self.n_rows - 1)
        object.__setattr__(t, "_last_x", col == self.n_cols - 1)
        return t

    def __iter__(self):
        for r in range(self.n_rows):
            for c in range(self.n_cols):
                yield self.tile(r, c)

    def tile_of(self, y: float, x: float) -> Tile:
        """The tile whose core owns the mosaic position ``(y, x)``."""
        r = min(max(int(math.floor((y + 0.5) / self.core[0])), 0), self.n_rows - 1)
        c = min(max(int(math.floor((x + 0.5) / self.core[1])), 0), self.n_cols - 1)
        return self.tile(r, c)

    def by_index(self, index: int) -> Tile:
        return self.tile(index // self.n_cols, index % self.n_cols)
