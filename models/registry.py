"""Names -> network builders. ``build('unet', depth=2)`` makes a model from a plain (JSON/YAML) config.

A registered class takes its frozen config dataclass (or a dict of its fields) as first argument and keeps
it as ``self.config``; :mod:`deepmosaic.models.weights_io` saves ``(name, config)`` beside the weights so a
file can be rebuilt without pickling code.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.errors import ConfigError

_REGISTRY: dict[str, tuple[type, type]] = {}
# Modules that register the built-in architectures; imported on first lookup.
_BUILTIN_MODULES = ("unet", "prob_unet", "detection", "morphology")


def register(name: str, config_class: type) -> Callable[[type], type]:
    """Class decorator: make ``cls`` buildable as ``build(name, **config)``.

    Sets ``cls.arch_name = name`` and ``cls.config_class = config_class``. Registering a different class
    under a taken name raises a ConfigError.
    """
    def deco(cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and old[0].__qualname__ != cls.__qualname__:
            raise ConfigError(f"model name {name!r} is already registered to {old[0].__qualname__}; "
                              f"pick another name for {cls.__qualname__}.")
        cls.arch_name = name
        cls.config_class = config_class
        _REGISTRY[name] = (cls, config_class)
        return cls
    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def names() -> list[str]:
    """Sorted names of every registered architecture."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> tuple[type, type]:
    """``(model_class, config_class)`` registered as ``name``; unknown names raise a ConfigError."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model {name!r} is not registered. Valid names: {', '.join(sorted(_REGISTRY))}.") \
            from None


def build(name: str, **config: Any):
    """A new model of architecture ``name`` from config keywords (validated; unknown keys are an error)."""
    cls, config_class = get(name)
    return cls(from_mapping(config_class, config, where=name))
