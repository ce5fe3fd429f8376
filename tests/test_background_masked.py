"""The object-masked background (``sep.back_mask_objects``): closer to the true sky than SExtractor's single
pass, the same tiled as whole-image, and off unless asked for."""
import numpy as np
import pytest

from deepmosaic.pipeline.background import background_of_image, object_mask
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import open_store, read_background
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.tasks.sep_task import SepConfig, SepTask
from deepmosaic.workflows import run
from deepmosaic.workflows.api import background_settings


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    sim = simulate_mosaic(SimConfig(size=(1024, 1280), seed=31))
    img, _ = write_simulation(sim, tmp_path_factory.mktemp("bgmask") / "f.fits")
    return sim, str(img)


def _sky_error(model, sim):
    back, _ = model.evaluate((0, sim.image.shape[0], 0, sim.image.shape[1]))
    return float(np.median((back - sim.sky) / sim.config.noise_sigma))


def test_masked_background_is_closer_to_the_true_sky(field):
    sim, _ = field
    image, mask = sim.image.astype(np.float32), sim.mask > 0
    plain = _sky_error(background_of_image(image, mask), sim)
    masked = _sky_error(background_of_image(image, mask, mask_objects=8), sim)
    # the single pass sits above the sky (it takes up the galaxies' wings); masking removes most of that
    assert plain > 0.02, plain
    assert abs(masked) < 0.5 * plain, (masked, plain)


def test_object_mask_covers_objects_not_the_sky(field):
    sim, _ = field
    image, mask = sim.image.astype(np.float32), sim.mask > 0
    model = background_of_image(image, mask)
    back, _ = model.evaluate((0, image.shape[0], 0, image.shape[1]))
    obj = object_mask(image, mask, back, model.global_rms, dilate=0)
    grown = object_mask(image, mask, back, model.global_rms, dilate=8)
    bright = sim.model > 5 * sim.config.noise_sigma
    assert obj[bright].mean() > 0.99                  # the objects' bright pixels are masked
    assert obj.mean() < 0.1 and grown.mean() < 0.4    # most of the sky is not
    assert (grown >= obj).all() and grown.sum() > 2 * obj.sum()


def test_tiled_masked_background_equals_whole_image(field, tmp_path):
    sim, img = field
    out = tmp_path / "m.zarr"
    run(img, str(out), stages="sep", tile=256, workers=0, set=["sep.back_mask_objects=8"])
    tiled = read_background(str(out))
    whole = background_of_image(sim.image.astype(np.float32), sim.mask > 0, mask_objects=8)
    np.testing.assert_allclose(tiled.back, whole.back, rtol=0, atol=1e-6 * sim.config.noise_sigma)
    np.testing.assert_allclose(tiled.rms, whole.rms, rtol=0, atol=1e-6 * sim.config.noise_sigma)
    assert open_store(str(out)).attrs["deepmosaic"]["config"]["background"]["mask_objects"] == 8


def test_off_by_default_and_settings_recorded_only_when_on():
    assert SepConfig().back_mask_objects == 0
    assert "mask_objects" not in background_settings([SepTask()])
    on = background_settings([SepTask({"back_mask_objects": 6, "thresh": 2.0})])
    assert on["mask_objects"] == 6 and on["mask_thresh"] == 2.0 and on["mask_minarea"] == 5


@pytest.mark.parametrize("bad", [-1, 65, 2.5])
def test_bad_dilation_is_refused_with_the_fix(bad):
    with pytest.raises(ConfigError, match="back_mask_objects"):
        SepTask({"back_mask_objects": bad})
