"""deepmosaic.models."""
