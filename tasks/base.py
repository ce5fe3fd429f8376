"""The one task interface shared by baselines (sep, photutils) and model stages.

A task is pure: ``run(tile_input)`` takes in-memory arrays of one tile window and returns a
``TaskOutput`` (window-shaped maps and a catalog in window pixel coordinates). It never does I/O.
The pipeline (``deepmosaic.pipeline.runner``) decides ownership, assigns global ids, converts to
mosaic coordinates, adds ``ra``/``dec``/``tile_row``/``tile_col`` and the pipeline flag bits, and
writes the core of every map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from deepmosaic.pipeline.config import require

# Pipeline flag bits, OR-ed into every catalog's ``flags`` column above the stage's own bits
# (sep uses bits 0-7; see the README's store contract).
FLAG_MASKED = 1 << 8           #: footprint touches masked (bad, NaN/inf) pixels
FLAG_TILE_TRUNCATED = 1 << 9   #: footprint touches the window edge inside the mosaic: halo too small
FLAG_MOSAIC_EDGE = 1 << 10     #: footprint touches the mosaic edge
FLAG_SEAM_UNRESOLVED = 1 << 11  #: part of the footprint in another core could not be linked to this id
FLAG_BUFFER = 1 << 12          #: a per-call buffer/limit was hit (e.g. deblending sub-object limit)

PIPELINE_FLAGS = {
    "masked": FLAG_MASKED,
    "tile_truncated": FLAG_TILE_TRUNCATED,
    "mosaic_edge": FLAG_MOSAIC_EDGE,
    "seam_unresolved": FLAG_SEAM_UNRESOLVED,
    "buffer": FLAG_BUFFER,
}


@dataclass(frozen=True)
class Column:
    """Schema of one catalog column."""

    dtype: str
    unit: str
    description: str


@dataclass(frozen=True)
class MapSpec:
    """Schema of one output map. ``kind='label'`` maps hold catalog row numbers + 1 (0 = sky)."""

    dtype: str
    kind: str  # "label" or "value"
    description: str
    fill: float = 0


@dataclass
class TileInput:
    """Arrays of one tile window, all ``[y, x]`` with the window's shape.

    image : float32, sky NOT subtracted; masked pixels are finite (0) and flagged in ``mask``
    background, rms : float32 global background model and its RMS evaluated on the window
    global_rms : float, the mosaic-wide background RMS (sep's ``globalrms``)
    mask : bool, True = bad pixel (NaN/inf, mask planes, zero weight)
    variance : float32 or None, per-pixel variance if the input has one
    origin : (y0, x0) of the window in mosaic pixels
    core : slices that cut the tile's core out of the window
    at_mosaic_edge : (top, bottom, left, right) whether each window edge is the mosaic edge
    upstream : outputs of the stages that ran before on this tile, by stage name
    """

    image: np.ndarray
    background: np.ndarray
    rms: np.ndarray
    global_rms: float
    mask: np.ndarray
    variance: np.ndarray | None
    origin: tuple[int, int]
    core: tuple[slice, slice]
    at_mosaic_edge: tuple[bool, bool, bool, bool] = (True, True, True, True)
    upstream: dict[str, "TaskOutput"] = field(default_factory=dict)
    bands: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def data(self) -> np.ndarray:
        """Background-subtracted image (float32), masked pixels set to 0."""
        out = self.image - self.background
        out[self.mask] = 0.0
        return out


@dataclass
class TaskOutput:
    """What a task returns for one window.

    maps : name -> window-shaped array; ``label`` maps hold catalog row + 1 (0 = sky)
    catalog : column -> 1-D array; must contain ``x``, ``y`` (window pixels, 0-based) and ``flags``
    """

    maps: dict[str, np.ndarray]
    catalog: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)


class Task:
    """Base class of all stages. Subclasses set ``name``, ``Config``, ``columns`` and ``maps``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    columns: ClassVar[Mapping[str, Column]] = {}
    maps: ClassVar[Mapping[str, MapSpec]] = {}
    #: stages whose outputs this one reads from ``TileInput.upstream``
    requires: ClassVar[tuple[str, ...]] = ()
    #: Dask resources this stage needs (e.g. {"GPU": 1}); none for CPU stages
    resources: ClassVar[Mapping[str, int]] = {}
    #: catalog columns filled by the pipeline after stitching, from another stage's label map at the
    #: object's pixel: ``{"host_id": ("sep", "segmentation")}`` gives the id of the sep object whose
    #: footprint holds it (-1 on sky). Exact across seams, because it reads the stitched map.
    links: ClassVar[Mapping[str, tuple[str, str]]] = {}

    def __init__(self, config: Any = None):
        from deepmosaic.pipeline.config import from_mapping
        if config is None or isinstance(config, Mapping):
            config = from_mapping(self.Config, config or {}, where=self.name)
        self.config = config

    def bind(self, before: list["Task"]) -> None:
        """Called once the run's stages are known, with the stages that run before this one: a stage that uses
        an optional upstream stage adds it to ``requires`` here. Nothing by default."""

    @property
    def halo(self) -> int:
        """Pixels of context this task needs around a core (from its config or receptive field)."""
        return int(getattr(self.config, "halo", 0))

    def run(self, tile: TileInput) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def empty_output(self, shape: tuple[int, int]) -> TaskOutput:
        """A schema-valid output with no objects (for empty or fully masked tiles)."""
        maps = {k: np.full(shape, s.fill, dtype=s.dtype) for k, s in self.maps.items()}
        cat = {k: np.zeros(0, dtype=c.dtype) for k, c in self.columns.items()}
        return TaskOutput(maps=maps, catalog=cat)

    def fingerprint(self) -> dict:
        """What identifies this stage's results (config, weights checksums); used for run keys."""
        from deepmosaic.pipeline.config import to_dict
        return {"name": self.name, "config": to_dict(self.config)}


class ModelTask(Task):
    """A stage driven by a network. ``weights_kind`` names its shipped default weights
    (``models/weights/<kind>``); the config's ``weights`` (a path, with or without extension) overrides them."""

    weights_kind: ClassVar[str] = ""

    def weights_base(self) -> str:
        """Path of the weights without extension (the model card is ``<base>.json``)."""
        from deepmosaic.models.weights_io import _base, shipped
        w = self.config.weights
        return str(shipped(self.weights_kind) if w is None else _base(w))

    def model_card(self, architecture: str | None = None) -> tuple[str, dict]:
        """``(weights base, model card)``; with ``architecture``, a card of another network is refused."""
        from deepmosaic.models.weights_io import WeightsError, read_card
        base = self.weights_base()
        card = read_card(base)
        if architecture is not None and card.get("architecture") != architecture:
            raise WeightsError(f"{base}: the {self.name} stage needs a {architecture!r} network, the card has "
                               f"{card.get('architecture')!r}.")
        return base, card


def check_model_settings(cfg, where: str) -> None:
    """The config checks every network stage shares: ``weights`` (None or a path) and ``device``."""
    require(cfg.weights is None or (isinstance(cfg.weights, str) and cfg.weights.strip()), where, "weights",
            cfg.weights, "a weights path (NAME.safetensors with NAME.json beside it), or None.")
    dev = cfg.device
    require(isinstance(dev, str) and (dev in ("auto", "cpu", "cuda")
                                      or (dev.startswith("cuda:") and dev[5:].isdigit())),
            where, "device", dev, "use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
