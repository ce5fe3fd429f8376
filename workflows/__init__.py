"""deepmosaic.workflows: the CLI's runs and the Python API (``from deepmosaic.workflows import run``)."""
from .api import run

__all__ = ["run"]
