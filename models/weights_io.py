"""Safe weight files: ``NAME.safetensors`` (tensors only, never pickled) + ``NAME.json`` (the model card).

The card holds everything needed to rebuild and trust the model::

    {"format": "deepmosaic-model/1",
     "architecture": "unet", "config": {...},           # rebuilt with models.registry.build
     "weights": {"file": "NAME.safetensors", "sha256": "...", "dtype": "float32" | "float16",
                 "n_parameters": int},
     "training_set": {...} | null, "seed": int | null,  # given by the caller (placeholders until training)
     "metrics": {...} | null, "description": str | null, "extra": {...} | null,
     "versions": {"deepmosaic": ..., "torch": ..., "safetensors": ..., "numpy": ..., "python": ...},
     "created": "2025-01-01T00:00:00+00:00"}

:func:`load_model` checks the checksum before reading a tensor, rebuilds the architecture from the registry
and loads every tensor strictly (no missing, unexpected or mis-shaped keys).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from deepmosaic.pipeline.errors import ConfigError, DeepmosaicError

from . import registry

FORMAT = "deepmosaic-model/1"
#: keys a caller may put in the card (everything else is written by save_model)
CARD_KEYS = ("training_set", "seed", "metrics", "description", "extra")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: suffixes of pickle-based files, which are never read
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
#: where the default weights of every model stage ship (``models/weights/`` in the repository)
WEIGHTS_DIR = str(Path(__file__).resolve().parent / "weights")


def shipped(kind: str) -> Path:
    """Path (without extension) of the shipped default weights for ``kind`` (clumps, deblend, detect)."""
    base = Path(WEIGHTS_DIR) / kind
    if not base.with_suffix(".safetensors").exists():
        raise WeightsError(f"no shipped weights for {kind!r} in {WEIGHTS_DIR}; train them with "
                           f"`deepmosaic train {kind} --ship` or name a weights file.")
    return base


class WeightsError(DeepmosaicError):
    """A weight file or its model card is missing, unsafe, inconsistent or does not fit the architecture."""


class ChecksumError(WeightsError):
    """The weights file's sha256 differs from the one recorded in its model card."""


def _base(path: str | os.PathLike) -> Path:
    """``path`` without a ``.safetensors``/``.json`` suffix; pickle formats are refused."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{p}: {suffix} files are pickles, which can run arbitrary code when loaded; deepmosaic reads "
            f"only .safetensors weights with a .json model card. Convert once in a trusted session: "
            f"load the state dict there and write it with deepmosaic.models.weights_io.save_model.")
    if suffix in (".safetensors", ".json"):
        return p.with_name(p.stem)
    return p


def _with(base: Path, ext: str) -> Path:
    """``NAME`` + ``ext``, keeping dots inside NAME (``net.v2`` -> ``net.v2.json``)."""
    return base.with_name(base.name + ext)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("deepmosaic", "torch", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def save_model(model: torch.nn.Module, path_without_ext: str | os.PathLike, card: Mapping[str, Any] | None = None,
               *, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write ``NAME.safetensors`` and the model card ``NAME.json``.

    Parameters
    ----------
    model : a registered network (has ``arch_name`` and a frozen ``config``)
    path_without_ext : ``NAME`` (a ``.safetensors`` or ``.json`` suffix is accepted and dropped)
    card : caller's part of the card, keys among ``training_set`` (dict: the training-set config), ``seed``
        (int), ``metrics`` (dict of validation metrics), ``description`` (str), ``extra`` (dict); missing keys
        are written as null placeholders. Must be JSON-serialisable.
    dtype : ``'float32'`` or ``'float16'``: floating tensors are stored in this type (float16 halves the
        file; loading casts back to the module's float32). Integer buffers are stored as they are.
    overwrite : replace existing files (otherwise an existing ``NAME.safetensors``/``NAME.json`` is an error)

    Returns
    -------
    dict, the card as written.
    """
    base = _base(path_without_ext)
    arch = getattr(model, "arch_name", None)
    config = getattr(model, "config", None)
    if arch is None or config is None:
        raise WeightsError(f"save_model: {type(model).__name__} is not a registered architecture (no arch_name/"
                           f"config); register it with deepmosaic.models.registry.register.")
    if dtype not in DTYPES:
        raise ConfigError(f"save_model: dtype={dtype!r}: use one of {', '.join(DTYPES)}.")
    card = dict(card or {})
    unknown = [k for k in card if k not in CARD_KEYS]
    if unknown:
        raise ConfigError(f"save_model: unknown card key {unknown[0]!r}. Valid keys: {', '.join(CARD_KEYS)} "
                          f"(architecture, config, checksum, versions and time are filled in by save_model).")
    st_path, json_path = _with(base, ".safetensors"), _with(base, ".json")
    if not overwrite:
        for p in (st_path, json_path):
            if p.exists():
                raise WeightsError(f"save_model: {p} already exists; pass overwrite=True or choose another name.")
    base.parent.mkdir(parents=True, exist_ok=True)

    target = DTYPES[dtype]
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(target)
        tensors[key] = t.contiguous()
    tmp = st_path.with_name(st_path.name + ".tmp")
    # one metadata key: safetensors writes a multi-key metadata map in hash order, which would make the
    # file (and its sha256) differ between identical saves
    save_file(tensors, str(tmp), metadata={"deepmosaic": json.dumps({"format": FORMAT, "architecture": arch})})
    os.chmod(tmp, 0o644)  # readable by the group, like any other file of the repository
    os.replace(tmp, st_path)

    full = {
        "format": FORMAT,
        "architecture": arch,
        "config": config.to_dict(),
        "weights": {"file": st_path.name, "sha256": _sha256(st_path), "dtype": dtype,
                    "n_parameters": int(sum(p.numel() for p in model.parameters()))},
        **{k: card.get(k) for k in CARD_KEYS},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        text = json.dumps(full, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"save_model: the card is not JSON-serialisable ({err}); use plain dicts, lists, "
                          f"strings and finite numbers.") from None
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, json_path)
    return full


def read_card(path: str | os.PathLike) -> dict:
    """The model card of ``NAME`` (``NAME``, ``NAME.json`` or ``NAME.safetensors``)."""
    json_path = _with(_base(path), ".json")
    if not json_path.exists():
        raise WeightsError(f"{json_path}: model card not found; every .safetensors file needs its .json card "
                           f"(written by save_model) to be loaded.")
    try:
        card = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{json_path}: not valid JSON ({err}).") from None
    fmt = card.get("format") if isinstance(card, dict) else None
    if fmt != FORMAT:
        raise WeightsError(f"{json_path}: not a deepmosaic model card (format={fmt!r}, expected {FORMAT!r}).")
    return card


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights (eval mode, float32).

    Parameters
    ----------
    path : ``NAME``, ``NAME.json`` or ``NAME.safetensors``. Pickle formats (.pt, .pth, .pkl, ...) are refused.
    map_location : device for the model

    Returns
    -------
    torch.nn.Module in eval mode with ``model.card`` set to the card.

    Raises
    ------
    ChecksumError
        The file's sha256 differs from the card's (the message names the file and both hashes).
    WeightsError
        Missing files, a foreign card, missing/unexpected/mis-shaped tensors (all listed).
    ConfigError
        Unknown architecture or invalid config in the card.
    """
    base = _base(path)
    card = read_card(base)
    st_path = _with(base, ".safetensors")
    if not st_path.exists():
        raise WeightsError(f"{st_path}: weights file not found (its card {_with(base, '.json')} exists).")
    expected = card.get("weights", {}).get("sha256")
    # Hash and parse the same bytes, so the checked file is the loaded one.
    data = st_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{st_path}: sha256 mismatch: the card records {expected} but the file hashes to "
                            f"{actual}. The file is corrupted or was replaced; re-download or re-save it.")

    model = registry.build(card["architecture"], **card.get("config", {}))
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # a card-consistent but malformed file: say which one
        raise WeightsError(f"{st_path}: not a readable safetensors file ({err}).") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mis_shaped = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mis_shaped:
            parts.append(f"mis-shaped tensors {mis_shaped}")
        raise WeightsError(f"{st_path}: weights do not fit architecture {card['architecture']!r} with its card's "
                           f"config: {'; '.join(parts)}.")
    # Cast each tensor to the module's own dtype (float16 files load into float32 modules).
    tensors = {k: v.to(own[k].dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    model.card = card
    return model.to(map_location).eval()
