"""deepmosaic.pipeline."""
