"""The profile-fit baseline: its numpy renderer agrees with GalSim's, and fits recover the parameters of
rendered, noisy galaxies (the round trip: parameters -> rendered stamp -> fit)."""
import math

import numpy as np
import pytest

from deepmosaic.models.morph_data import render_galaxy
from deepmosaic.models.profile_fit import ProfileRenderer, fit_bulge_disk, fit_sersic, fit_stamp, g_to_q_angle, \
    q_angle_to_g
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.tasks import get_task_class
from deepmosaic.tasks.morphology_task import MORPH_COLUMNS, MorphologyFitTask

SIZE, FWHM, BETA = 48, 3.5, 3.0


def galaxy(**kw):
    p = dict(hlr=4.0, sersic_n=1.5, q=0.6, angle=35.0, bulge_frac=0.0, bulge_hlr_ratio=0.4, psf_fwhm=FWHM,
             psf_beta=BETA, x=23.7, y=23.2)
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def renderer():
    return ProfileRenderer(SIZE, FWHM, BETA)


@pytest.mark.parametrize("p", [galaxy(hlr=1.5, sersic_n=4.0, q=0.5), galaxy(hlr=6.0, sersic_n=0.8, q=0.3),
                               galaxy(hlr=3.0, bulge_frac=0.4, bulge_hlr_ratio=0.3, sersic_n=1.0)])
def test_renderer_matches_galsim(renderer, p):
    ref = render_galaxy(p, SIZE)          # GalSim, unit matched-filter S/N
    if p["bulge_frac"] > 0:
        m = renderer.bulge_disk(1.0, p["x"], p["y"], p["hlr"], p["bulge_frac"], p["bulge_hlr_ratio"], p["q"],
                                p["angle"])
    else:
        m = renderer.sersic(1.0, p["x"], p["y"], p["hlr"], p["sersic_n"], p["q"], p["angle"])
    assert abs(m.sum() - 1.0) < 0.03, "unit flux, minus the light outside the stamp"
    m = m / math.sqrt((m * m).sum())
    # at S/N 300 the model error is below one sigma of residual S/N (noise alone gives ~48)
    assert 300 * math.sqrt(((ref - m) ** 2).sum()) < 1.0


def test_shape_parametrisation_round_trips():
    for q, a in ((0.3, 10.0), (0.9, 170.0), (0.55, 90.0)):
        q2, a2 = g_to_q_angle(*q_angle_to_g(q, a))
        assert q2 == pytest.approx(q) and a2 == pytest.approx(a)


def _noisy(p, snr, seed):
    return render_galaxy(p, SIZE) * snr + np.random.default_rng(seed).standard_normal((SIZE, SIZE))


def test_sersic_fit_recovers_parameters_within_errors(renderer):
    p = galaxy(hlr=4.0, sersic_n=2.5, q=0.6, angle=35.0)
    r = fit_sersic(_noisy(p, 150.0, 1), np.ones((SIZE, SIZE)), renderer)
    assert r["success"] and not r["at_bound"]
    assert abs(r["r_half"] / p["hlr"] - 1) < 0.06 and abs(r["r_half"] - p["hlr"]) < 4 * r["r_half_err"]
    assert abs(r["sersic_n"] / p["sersic_n"] - 1) < 0.12 and abs(r["sersic_n"] - p["sersic_n"]) < 4 * r["sersic_n_err"]
    assert abs(r["q"] - p["q"]) < 0.04 and abs(r["pa"] - p["angle"]) < 4.0
    assert abs(r["x"] - p["x"]) < 0.2 and abs(r["y"] - p["y"]) < 0.2
    assert 0.8 < r["chi2"] / r["n_data"] < 1.2


def test_bulge_disk_fit_recovers_bulge_fraction(renderer):
    p = galaxy(hlr=5.0, sersic_n=1.0, bulge_frac=0.4, bulge_hlr_ratio=0.3, q=0.7, angle=120.0)
    r = fit_bulge_disk(_noisy(p, 200.0, 2), np.ones((SIZE, SIZE)), renderer)
    assert abs(r["bulge_frac"] - 0.4) < 0.1 and r["bulge_frac_err"] > 0
    assert abs(r["r_half"] / p["hlr"] - 1) < 0.1
    # fit_stamp prefers the bulge + disk model for it by BIC and reports its radius
    s = fit_stamp(_noisy(p, 200.0, 2), np.ones((SIZE, SIZE)), renderer)
    assert s["model"] == "bulge_disk" and s["bulge_frac"] == pytest.approx(r["bulge_frac"])


def test_fit_stage_config_is_validated():
    with pytest.raises(ConfigError, match="oversample"):
        MorphologyFitTask({"oversample": 0})
    with pytest.raises(ConfigError, match="detection"):
        MorphologyFitTask({"detection": "photutils"})
    with pytest.raises(ConfigError, match="max_nfv"):
        MorphologyFitTask({"max_nfv": 10})
    t = get_task_class("morphology_fit")({"detection": "detect"})
    assert t.requires == ("detect",) and t.columns is MORPH_COLUMNS and t.halo == SIZE // 2 + 2


def test_fit_stage_measures_the_detections_it_is_given():
    from deepmosaic.pipeline.simulate import make_psf, render_profile
    from deepmosaic.tasks.base import TileInput
    from deepmosaic.tasks.sep_task import SepTask
    model = np.zeros((120, 120))
    render_profile(3e4, 60.3, 58.6, psf=make_psf(FWHM, BETA), kind="galaxy", hlr=4.0, sersic_n=2.0, q=0.6,
                   angle=60.0).add_to(model)
    img = (model + 100.0 + np.random.default_rng(5).normal(0, 5.0, model.shape)).astype(np.float32)
    tile = TileInput(image=img, background=np.full(img.shape, 100.0, np.float32),
                     rms=np.full(img.shape, 5.0, np.float32), global_rms=5.0, mask=np.zeros(img.shape, bool),
                     variance=None, origin=(0, 0), core=(slice(0, 120), slice(0, 120)))
    tile.upstream["sep"] = SepTask().run(tile)
    cat = MorphologyFitTask().run(tile).catalog
    assert list(cat) == list(MORPH_COLUMNS) and len(cat["x"]) == len(tile.upstream["sep"].catalog["x"]) == 1
    assert cat["flags"][0] == 0
    assert abs(cat["r_half"][0] / 4.0 - 1) < 0.1 and abs(cat["sersic_n"][0] / 2.0 - 1) < 0.2
    assert abs(cat["q"][0] - 0.6) < 0.05 and abs(cat["pa"][0] - 60.0) < 5.0
