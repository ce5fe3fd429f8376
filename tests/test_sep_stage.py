"""The sep stage's contract: buffers never crash a tile, and the pipeline's flag bits mean what they say."""
import numpy as np
import pytest
from astropy.io import fits

from deepmosaic.pipeline.store import read_catalog
from deepmosaic.tasks.base import FLAG_BUFFER, FLAG_MOSAIC_EDGE, FLAG_TILE_TRUNCATED
from deepmosaic.workflows import run


def _gauss_image(shape, sources, noise=1.0, seed=0):
    """Gaussian sources (y, x, flux, sigma) on unit noise."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, noise, shape).astype(np.float32) + 10
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x, f, s in sources:
        img += (f / (2 * np.pi * s * s) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))).astype(np.float32)
    return img


@pytest.fixture
def crowded(tmp_path):
    rng = np.random.default_rng(3)
    src = [(y, x, f, 1.5) for y, x, f in zip(rng.uniform(5, 250, 120), rng.uniform(5, 250, 120),
                                              rng.uniform(300, 3000, 120))]
    path = tmp_path / "crowded.fits"
    fits.writeto(path, _gauss_image((256, 256), src))
    return str(path)


def test_tiny_pixel_buffer_is_raised_not_a_crash(crowded, tmp_path):
    ref = run(crowded, tmp_path / "ref.zarr", tile=128, workers=0)
    res = run(crowded, tmp_path / "small.zarr", tile=128, workers=0, set=["sep.pixstack=50"])
    assert not res.failures
    a, b = read_catalog(str(tmp_path / "ref.zarr"), "sep"), read_catalog(str(tmp_path / "small.zarr"), "sep")
    np.testing.assert_array_equal(a["x"], b["x"])
    assert ref.n_objects["sep"] == res.n_objects["sep"] > 50


def test_deblending_overflow_flags_instead_of_crashing(tmp_path):
    # a tight group of many sources in one footprint, with a sub-object limit of 1
    src = [(64 + 3 * np.cos(t), 64 + 3 * np.sin(t), 3000, 1.2) for t in np.linspace(0, 2 * np.pi, 6, endpoint=False)]
    src += [(64, 64, 5000, 1.2)]
    path = tmp_path / "group.fits"
    fits.writeto(path, _gauss_image((128, 128), src))
    res = run(str(path), tmp_path / "o.zarr", tile=128, workers=0, set=["sep.sub_object_limit=1"])
    assert not res.failures
    cat = read_catalog(str(tmp_path / "o.zarr"), "sep")
    assert len(cat["x"]) >= 1 and (cat["flags"] & FLAG_BUFFER).all()


def test_edge_and_truncation_flags(tmp_path):
    # one source cut by the mosaic's left edge, one huge source at a seam that a 16 px halo cannot hold,
    # one small isolated source in the middle of a core
    src = [(100, 1.0, 2000, 1.5), (128, 128, 2e6, 12.0), (200, 60, 2000, 1.5)]
    path = tmp_path / "edges.fits"
    fits.writeto(path, _gauss_image((256, 256), src))
    run(str(path), tmp_path / "o.zarr", tile=128, workers=0, set=["sep.halo=16", "sep.deblend_cont=1.0"])
    cat = read_catalog(str(tmp_path / "o.zarr"), "sep")

    def at(y, x):
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert d.min() < 2, f"no object near ({y}, {x})"
        return int(cat["flags"][np.argmin(d)])

    assert at(100, 1.0) & FLAG_MOSAIC_EDGE
    # the huge source on the corner of four cores cannot be seen whole by any tile: each piece that a
    # tile owns is flagged as truncated by the halo (a user raises sep.halo or the tile size)
    near = np.hypot(cat["x"] - 128, cat["y"] - 128) < 10
    assert near.any() and (cat["flags"][near] & FLAG_TILE_TRUNCATED).all()
    small = at(200, 60)
    assert not small & (FLAG_MOSAIC_EDGE | FLAG_TILE_TRUNCATED)
