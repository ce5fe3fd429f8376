"""Frozen, documented configuration objects that reject unknown keys.

Every stage config is a frozen dataclass whose fields carry a ``doc`` in their metadata.
``from_mapping`` builds one from a dict (YAML, ``--set``), refusing unknown keys with the
valid ones listed, and coercing strings from the command line to the field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Mapping

from .errors import ConfigError


def field(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a documentation string (shown by ``deepmosaic stages``)."""
    return dataclasses.field(default=default, metadata={"doc": doc, **kwargs})


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(where: str, name: str, value: Any, type_: Any) -> Any:
    """Coerce ``value`` (possibly a CLI string) to ``type_`` or raise a ConfigError."""
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(where, name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{where}.{name}={value!r}: expected {type_}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").strip("()[]").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}.{name}={value!r}: expected a list, e.g. {name}=1,2,3.")
        inner = args[0] if args else Any
        return tuple(_coerce(where, name, v, inner) for v in value) if origin is tuple else [
            _coerce(where, name, v, inner) for v in value]
    if type_ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}.{name}={value!r}: expected true or false.")
    if type_ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}.{name}={value!r}: expected an integer.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{name}={value!r}: expected an integer.") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where}.{name}={value!r}: expected an integer, not {f}.")
        if f != int(f):
            raise ConfigError(f"{where}.{name}={value!r}: expected an integer, not a fraction.")
        return int(f)
    if type_ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}.{name}={value!r}: expected a number.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{name}={value!r}: expected a number.") from None
    if type_ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{name}={value!r}: expected a string.")
        return value
    return value


def from_mapping(cls: type, data: Mapping[str, Any] | None, where: str | None = None):
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys.

    Parameters
    ----------
    cls : dataclass type
    data : mapping of field name to value (strings are coerced to the field type)
    where : name used in error messages (defaults to the class's ``name`` or its name)
    """
    where = where or getattr(cls, "stage_name", cls.__name__)
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {k!r}.{_suggest(k, list(fields))} Valid keys: {', '.join(sorted(fields))}.")
    kwargs = {k: _coerce(where, k, v, hints[k]) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def replace(obj: Any, changes: Mapping[str, Any]):
    """A copy of the frozen config ``obj`` with ``changes`` applied (validated like ``from_mapping``)."""
    merged = dataclasses.asdict(obj)
    merged.update(changes)
    return from_mapping(type(obj), merged)


def to_dict(obj: Any) -> dict:
    """JSON-friendly dict of a config (tuples become lists)."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}


def parse_set_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """Parse ``--set STAGE.PARAM=VALUE`` options into ``{stage: {param: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(
                f"--set {item!r}: expected STAGE.PARAM=VALUE, e.g. --set sep.deblend_cont=1.0.")
        key, value = item.split("=", 1)
        stage, param = key.split(".", 1)
        out.setdefault(stage.strip(), {})[param.strip()] = value.strip()
    return out


def require(cond: bool, where: str, name: str, value: Any, fix: str) -> None:
    """Raise a ConfigError naming ``where.name``, echoing ``value`` and saying ``fix`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{where}.{name}={value!r}: {fix}")
