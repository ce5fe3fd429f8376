"""The ``detect`` stage: contract, seams, empty fields, saturated stars, out-of-range flags, peak merging."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.io import fits

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import make_psf, render_profile
from deepmosaic.tasks import get_task_class
from deepmosaic.tasks.base import TileInput
from deepmosaic.tasks.detect_task import (DETECT_COLUMNS, NOISE_OUT_OF_RANGE, PSF_OUT_OF_RANGE,
                                          DetectTask, find_peaks, seeds)
from deepmosaic.workflows import run

SKY, SIGMA = 100.0, 5.0
FWHM = 3.5  # px: 0.7 arcsec at 0.2 arcsec/px, inside the training range (2.5-5 px)


def scene(size=192, seed=0, fwhm=FWHM, objects=None):
    """Sky + noise + the given (x, y, flux, kind) objects; returns the float32 image."""
    model = np.zeros((size, size))
    psf = make_psf(fwhm, 3.0)
    for x, y, flux, kind in objects or ():
        kw = {"hlr": 2.0, "sersic_n": 1.0, "q": 0.7, "angle": 30.0} if kind == "galaxy" else {}
        render_profile(flux, x, y, psf=psf, kind=kind, **kw).add_to(model)
    noise = np.random.default_rng(seed).normal(0.0, SIGMA, model.shape)
    return (model + SKY + noise).astype(np.float32)


def tile_input(image, mask=None, rms=SIGMA):
    shape = image.shape
    return TileInput(image=image, background=np.full(shape, SKY, np.float32), rms=np.full(shape, rms, np.float32),
                     global_rms=rms, mask=np.zeros(shape, bool) if mask is None else mask, variance=None,
                     origin=(0, 0), core=(slice(0, shape[0]), slice(0, shape[1])))


def stars_grid(n=5, size=192, flux=2e4, margin=30):
    g = np.linspace(margin, size - margin, n)
    return [(float(x) + 0.3, float(y) - 0.2, flux, "star") for y in g for x in g]


OBJECTS = [(50.3, 60.7, 3e4, "star"), (120.2, 80.4, 6e4, "galaxy"), (90.0, 150.5, 8e3, "star"),
           (150.6, 40.1, 2e4, "galaxy")]


def _check_schema(cat):
    assert set(DETECT_COLUMNS) <= set(cat)
    for k, c in DETECT_COLUMNS.items():
        assert np.asarray(cat[k]).dtype == np.dtype(c.dtype), (k, np.asarray(cat[k]).dtype)
    assert len({len(v) for v in cat.values()}) == 1


def test_registered_config_and_pickle():
    assert get_task_class("detect") is DetectTask
    with pytest.raises(ConfigError, match="threshold"):
        DetectTask({"threshold": 1.5})
    with pytest.raises(ConfigError, match="thresold"):
        DetectTask({"thresold": 0.5})
    t = DetectTask()
    assert t.halo >= t.network_info()["halo"] + 8
    t.run(tile_input(scene(64)))          # loads the model in this process
    assert pickle.loads(pickle.dumps(t)).config == t.config


def test_window_contract_finds_each_object_once():
    img = scene(objects=OBJECTS)
    out = DetectTask().run(tile_input(img))
    cat = out.catalog
    _check_schema(cat)
    assert out.maps["heatmap"].dtype == np.float32 and out.maps["heatmap"].shape == img.shape
    assert 0 <= out.maps["heatmap"].min() and out.maps["heatmap"].max() <= 1
    for x, y, flux, kind in OBJECTS:
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert (d < 2).sum() == 1, (x, y, d.min())
        k = int(np.argmin(d))
        assert d[k] < 1.0
        # flux in the box's ellipse: most of the light, never more than all of it plus noise
        assert 0.6 * flux < cat["flux"][k] < 1.1 * flux + 5 * cat["flux_err"][k]
    stars = [k for k in range(len(cat["x"])) if min(np.hypot(cat["x"][k] - o[0], cat["y"][k] - o[1])
                                                   for o in OBJECTS if o[3] == "star") < 1]
    assert (cat["class"][stars] == 0).all()
    assert len(cat["x"]) <= len(OBJECTS) + 1      # at most one noise peak on this clean field
    s = seeds(cat)
    assert s["yx"].shape == (len(cat["x"]), 2) and np.all(np.diff(s["score"]) <= 0)


def test_noise_only_gives_empty_schema_valid_catalog():
    out = DetectTask().run(tile_input(scene(128, seed=3)))
    _check_schema(out.catalog)
    assert len(out.catalog["x"]) == 0
    assert out.maps["heatmap"].shape == (128, 128)
    masked = DetectTask().run(tile_input(scene(64), mask=np.ones((64, 64), bool)))
    _check_schema(masked.catalog)
    assert len(masked.catalog["x"]) == 0


@pytest.mark.parametrize("mask_core", [False, True])
def test_saturated_star_is_one_detection(mask_core):
    img = scene(160, seed=4, objects=[(80.2, 79.6, 5e6, "star")])
    sat = SKY + 20000.0
    core = img >= sat
    assert core.sum() > 20
    img = np.minimum(img, sat).astype(np.float32)
    mask = core if mask_core else None
    cat = DetectTask().run(tile_input(img, mask=mask)).catalog
    d = np.hypot(cat["x"] - 80.2, cat["y"] - 79.6)
    assert (d < 12).sum() == 1, np.c_[cat["x"], cat["y"], cat["score"]][d < 12]


def test_find_peaks_merges_flat_tops_and_keeps_close_pairs():
    yy, xx = np.mgrid[0:40, 0:40]
    g = lambda y, x, s=1.0: np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))  # noqa: E731
    pair = np.maximum(g(20, 17), g(20, 20))                 # 3 px apart: two objects
    iy, ix, merged = find_peaks(pair, 0.3, 0.9)
    assert sorted(ix.tolist()) == [17, 20] and merged.sum() == 0
    flat = np.minimum(g(20, 20, 4.0), 0.8)
    flat[20, 17] += 0.01
    flat[19, 23] += 0.005                                  # ragged plateau: several local maxima
    iy, ix, merged = find_peaks(flat, 0.3, 0.9)
    assert len(iy) == 1 and merged[0] >= 1
    assert len(find_peaks(flat, 0.3, 1.0)[0]) >= 2          # saddle=1 disables merging


def test_out_of_range_psf_and_noise_are_flagged(caplog):
    objs = stars_grid()
    ok = DetectTask().run(tile_input(scene(objects=objs, seed=5)))
    assert len(ok.catalog["x"]) >= 20
    assert not (ok.catalog["flags"] & (PSF_OUT_OF_RANGE | NOISE_OUT_OF_RANGE)).any()
    wide = DetectTask().run(tile_input(scene(objects=objs, seed=5, fwhm=9.0)))
    assert len(wide.catalog["x"]) and (wide.catalog["flags"] & PSF_OUT_OF_RANGE).all()
    assert any("PSF FWHM" in n for n in wide.notes)
    wrong_rms = DetectTask().run(tile_input(scene(objects=objs, seed=5), rms=SIGMA / 2))
    assert (wrong_rms.catalog["flags"] & NOISE_OUT_OF_RANGE).all()
    assert any("noise" in n for n in wrong_rms.notes)
    # the noise level against the training range (2-10 counts at zeropoint 30): only with a zeropoint
    assert not (DetectTask({"zeropoint": 30.0}).run(tile_input(scene(objects=objs, seed=5))).catalog["flags"]
                & NOISE_OUT_OF_RANGE).any()
    assert (DetectTask({"zeropoint": 28.0}).run(tile_input(scene(objects=objs, seed=5))).catalog["flags"]
            & NOISE_OUT_OF_RANGE).all()       # 5 counts at zp 28 = 31.5 counts at zp 30


@pytest.fixture(scope="module")
def seam_run(tmp_path_factory):
    """detect over a 256^2 field in 128 px tiles, objects planted on the seams and the corner."""
    d = tmp_path_factory.mktemp("detect")
    objs = [(127.6, 60.3, 3e4, "star"), (128.4, 190.0, 5e4, "galaxy"), (70.0, 127.5, 2e4, "star"),
            (127.5, 128.5, 4e4, "star"), (40.0, 40.0, 3e4, "galaxy")]
    img = scene(256, seed=6, objects=objs)
    fits.writeto(d / "seam.fits", img)
    out = d / "seam.zarr"
    res = run(str(d / "seam.fits"), str(out), stages="detect", tile=128, workers=0)
    assert not res.failures
    return {"store": str(out), "image": img, "objects": objs}


def test_seam_objects_detected_once_and_heatmap_seamless(seam_run):
    store = seam_run["store"]
    cat = st.read_catalog(store, "detect")
    assert len(np.unique(cat["id"])) == len(cat["id"])
    assert np.isfinite(cat["ra"]).all() or np.isnan(cat["ra"]).all()
    for x, y, _, _ in seam_run["objects"]:
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert (d < 2).sum() == 1, (x, y)
    heat = np.asarray(st.open_store(store)["maps/detect/heatmap"][:])
    assert heat.dtype == np.float32
    bg = st.read_background(store)
    back, rms = bg.evaluate((0, 256, 0, 256))
    image = seam_run["image"]
    ti = TileInput(image=image, background=back, rms=rms, global_rms=bg.global_rms,
                   mask=np.zeros(image.shape, bool), variance=None, origin=(0, 0),
                   core=(slice(0, 256), slice(0, 256)))
    whole = DetectTask().run(ti)
    assert np.abs(whole.maps["heatmap"] - heat).max() < 1e-4
    # same objects, same positions as one untiled pass
    assert len(whole.catalog["x"]) == len(cat["x"])
    order = np.lexsort((cat["x"], cat["y"]))
    ref = np.lexsort((whole.catalog["x"], whole.catalog["y"]))
    np.testing.assert_allclose(cat["x"][order], whole.catalog["x"][ref], atol=1e-4)


@pytest.mark.parametrize("flip_average", [False, True])
def test_heads_do_not_depend_on_the_patch_layout(flip_average):
    x = DetectTask.normalise(tile_input(scene(136, seed=7, objects=OBJECTS[:2])))
    big = DetectTask({"patch": 512, "flip_average": flip_average}).heads(x, origin=(16, 24))
    small = DetectTask({"patch": 40, "flip_average": flip_average, "batch_size": 3}).heads(x, origin=(16, 24))
    for k in big:
        assert np.abs(big[k] - small[k]).max() < 1e-4, k
