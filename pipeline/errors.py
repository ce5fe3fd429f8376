"""Error types. Every message names the parameter (or file/HDU), echoes the value and says the fix."""


class DeepmosaicError(Exception):
    """Base class of all errors raised on purpose by deepmosaic."""


class ConfigError(DeepmosaicError, ValueError):
    """A configuration key or value is invalid."""


class InputError(DeepmosaicError, ValueError):
    """An input mosaic (file, HDU or array) cannot be used."""


class StoreError(DeepmosaicError):
    """The result store is missing, incompatible or already exists."""
