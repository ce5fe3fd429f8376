"""Sersic refinement of deblending masks (models/blend_fit.py) and the deblend stage's refine='sersic'."""
from __future__ import annotations

import numpy as np
import pytest

from deepmosaic.models import profile_fit as pf
from deepmosaic.models.blend_fit import fit_blend, fit_window, refine_masks
from deepmosaic.models.datasets import ownership_masks
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.tasks.deblend_task import FLAG_REFINED, DeblendTask

S, FWHM, BETA = 64, 3.5, 3.0
#: (flux, x, y, hlr, n, q, angle) of a central and a fainter companion 2.3 PSF FWHM away
PAIR = [(3000.0, 31.0, 32.0, 4.0, 1.5, 0.7, 20.0), (800.0, 39.0, 32.5, 2.5, 1.0, 0.8, 100.0)]


def pair_scene(seed=0, members=PAIR):
    r = pf.ProfileRenderer(S, FWHM, BETA)
    light = np.stack([r.sersic(*m) for m in members])
    noise = np.random.default_rng(seed).standard_normal((S, S))
    return light, light.sum(0) + noise


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def rough_masks(truth):
    """A network-like start: each truth mask eroded by one pixel (outlines too tight)."""
    from scipy import ndimage
    return np.stack([ndimage.binary_erosion(t) for t in truth])


def test_fit_recovers_a_sersic_pair_and_its_truth_masks():
    light, image = pair_scene()
    truth = ownership_masks(light) > 0.5
    start = rough_masks(truth)
    peaks = np.array([[m[2], m[1]] for m in PAIR])
    masks, fit = refine_masks(image, start, peaks, FWHM, BETA)
    assert fit.success and fit.accepted
    assert 0.8 < fit.chi2_red < 1.2
    for k, m in enumerate(PAIR):
        p = fit.params[k]
        assert abs(p["x"] - m[1]) < 0.2 and abs(p["y"] - m[2]) < 0.2
        assert abs(p["r_half"] / m[3] - 1) < 0.1 and abs(p["flux"] / m[0] - 1) < 0.1
    for k in range(2):
        assert iou(truth[k], masks[k]) > 0.9
        assert iou(truth[k], masks[k]) > iou(truth[k], start[k]) + 0.05   # the start was worse
    assert not (masks[0] & masks[1]).any()


def test_a_companion_the_network_left_empty_gets_its_pixels():
    light, image = pair_scene(seed=1)
    truth = ownership_masks(light) > 0.5
    start = rough_masks(truth)
    start[0] |= start[1]            # the network gave the companion's pixels to the central
    start[1] = False
    peaks = np.array([[m[2], m[1]] for m in PAIR])
    masks, fit = refine_masks(image, start, peaks, FWHM, BETA)
    assert fit.accepted
    assert iou(truth[1], masks[1]) > 0.8 and iou(truth[0], masks[0]) > 0.9


def test_a_fit_that_does_not_describe_the_data_keeps_the_network_masks():
    light, image = pair_scene(seed=2)
    yy, xx = np.mgrid[:S, :S]
    image = image + 60.0 * np.exp(-((yy - 26.0) ** 2 + (xx - 27.0) ** 2) / 2.0)   # a bright knot: not Sersic
    truth = ownership_masks(light) > 0.5
    start = rough_masks(truth)
    peaks = np.array([[m[2], m[1]] for m in PAIR])
    masks, fit = refine_masks(image, start, peaks, FWHM, BETA)
    assert fit.success and not fit.accepted and fit.chi2_red > 1.5
    assert np.array_equal(masks, start)
    # a looser test accepts the same fit
    assert fit_blend(image, start, peaks, FWHM, BETA, chi2_sigma=1e6).accepted
    assert fit_blend(image, start, peaks, FWHM, BETA, chi2_sigma=None).accepted   # no test: kept


def test_masked_pixels_are_not_fitted():
    light, image = pair_scene(seed=3)
    truth = ownership_masks(light) > 0.5
    peaks = np.array([[m[2], m[1]] for m in PAIR])
    bad = np.zeros((S, S), bool)
    bad[10:20, 30:40] = True                      # garbage in a masked block on the central's wing
    spoiled = np.where(bad, 500.0, image)
    assert not fit_blend(spoiled, rough_masks(truth), peaks, FWHM, BETA).accepted
    masks, fit = refine_masks(spoiled, rough_masks(truth), peaks, FWHM, BETA, weight=~bad)
    assert fit.accepted and iou(truth[0], masks[0]) > 0.9


def test_fit_window_holds_masks_and_peaks_inside_the_stamp():
    masks = np.zeros((2, 96, 96), bool)
    masks[0, 40:50, 40:52] = True
    peaks = np.array([[45.0, 45.0], [44.0, 60.0]])
    y0, x0, size = fit_window(masks, peaks, pad=8)
    assert y0 <= 40 - 8 and x0 <= 40 - 8 and y0 + size >= 50 + 8 and x0 + size >= 60 + 8
    assert 0 <= y0 and 0 <= x0 and y0 + size <= 96 and x0 + size <= 96
    y0, x0, size = fit_window(masks, np.array([[2.0, 2.0], [90.0, 93.0]]), pad=8)
    assert (y0, x0, size) == (0, 0, 96)           # clipped to the stamp


def test_priors_pull_an_unconstrained_index_and_shape_and_leave_a_constrained_pair_alone():
    """The MAP fit's prior terms act with their stated sign and weight: a very tight prior pins the faint
    companion's index and shape at the prior's centre; the stage's default priors (weak against the central's
    thousands of pixels) leave the bright central's fitted index and radius where the data put them."""
    light, image = pair_scene(seed=2)
    start = rough_masks(ownership_masks(light) > 0.5)
    peaks = np.array([[m[2], m[1]] for m in PAIR])
    free = fit_blend(image, start, peaks, FWHM, BETA)
    pinned = fit_blend(image, start, peaks, FWHM, BETA, prior_n=(3.0, 1e-3), prior_g=1e-3)
    assert abs(free.params[1]["sersic_n"] / 3.0 - 1) > 0.2                 # the data alone say otherwise
    for k in range(2):
        assert abs(pinned.params[k]["sersic_n"] / 3.0 - 1) < 0.01
        assert pinned.params[k]["q"] > 0.99                                 # g = 0: round
    opts = DeblendTask({}).fit_options()
    assert opts["prior_n"] == (2.0, 0.7) and opts["prior_g"] == 0.3         # the stage's defaults
    weak = fit_blend(image, start, peaks, FWHM, BETA, prior_n=opts["prior_n"], prior_g=opts["prior_g"])
    assert weak.accepted
    for key in ("sersic_n", "r_half"):
        assert abs(weak.params[0][key] / free.params[0][key] - 1) < 0.02, key
    off = DeblendTask({"refine_prior_n": [2.0, 0.0], "refine_prior_g": 0}).fit_options()
    assert off["prior_n"] is None and off["prior_g"] is None
    assert DeblendTask({}).fingerprint() != DeblendTask({"refine_prior_g": 0}).fingerprint()
    for bad in ({"refine_prior_n": [0.1, 0.7]}, {"refine_prior_n": [2.0, -1.0]}):
        with pytest.raises(ConfigError, match="refine_prior_n"):
            DeblendTask(bad)
    with pytest.raises(ConfigError, match="refine_prior_g"):
        DeblendTask({"refine_prior_g": float("nan")})


def test_stage_refine_setting():
    with pytest.raises(ConfigError, match="refine"):
        DeblendTask({"refine": "scarlet"})
    with pytest.raises(ConfigError, match="psf_fwhm"):
        DeblendTask({"refine": "sersic", "psf_fwhm": 0.1})
    assert DeblendTask({}).config.refine == "sersic"                    # the default
    assert DeblendTask({}).fingerprint() != DeblendTask({"refine": "none"}).fingerprint()
    # the chi-square test is off by default (every converged fit is kept) and can be switched on
    assert DeblendTask({}).fit_options()["chi2_sigma"] is None
    assert DeblendTask({"refine_chi2_sigma": 3}).fit_options()["chi2_sigma"] == 3.0
    assert DeblendTask({}).fingerprint() != DeblendTask({"refine_chi2_sigma": 3}).fingerprint()
    with pytest.raises(ConfigError, match="refine_chi2_sigma"):
        DeblendTask({"refine_chi2_sigma": 0})


@pytest.mark.parametrize("seed", [0, 1])
def test_stage_refine_moves_the_outlines_towards_the_truth(seed):
    """A Sersic pair 2.6 PSF FWHM apart that sep splits: with refine='sersic' the stage's masks are closer to the
    truth convention than the network's, and the stage's contract (one label per member) holds."""
    from test_deblend_stage import run_stages
    r = pf.ProfileRenderer(128, FWHM, BETA)
    members = [(4000.0, 63.0, 64.0, 4.0, 1.5, 0.7, 20.0), (2000.0, 72.0, 64.5, 2.5, 1.0, 0.8, 100.0)]
    light = np.stack([r.sersic(*m) for m in members])
    image = (light.sum(0) + np.random.default_rng(seed).standard_normal((128, 128))).astype(np.float32)
    truth = ownership_masks(light) > 0.5
    scores = {}
    for name, cfg in (("plain", {"refine": "none"}), ("refined", {"psf_fwhm": FWHM, "psf_beta": BETA})):
        sep_out, out = run_stages(image, **cfg)
        assert len(sep_out.catalog["x"]) == 2
        seg = out.maps["segmentation"]
        labels = [int(np.bincount(seg[t & (seg > 0)]).argmax()) for t in truth]
        assert sorted(labels) == [1, 2], name
        refined_flag = (out.catalog["flags"] & FLAG_REFINED) > 0
        assert refined_flag.tolist() == ([True, True] if name == "refined" else [False, False])
        scores[name] = [iou(t, seg == lab) for t, lab in zip(truth, labels)]
    assert min(scores["refined"]) > 0.9 and np.mean(scores["refined"]) > np.mean(scores["plain"]) + 0.05, scores


def test_blends_of_more_members_than_refine_max_members_keep_the_network_masks():
    from test_deblend_stage import TRIPLE, galaxies, run_stages
    with pytest.raises(ConfigError, match="refine_max_members"):
        DeblendTask({"refine_max_members": 1})
    _, image = galaxies((128, 128), TRIPLE, seed=5)
    _, out = run_stages(image, refine_max_members=2)      # a triple is not refined
    _, plain = run_stages(image, refine="none")
    triple = out.catalog["n_children"] == 3
    assert triple.sum() == 3 and not (out.catalog["flags"][triple] & FLAG_REFINED).any()
    assert np.array_equal(out.maps["segmentation"], plain.maps["segmentation"])
    # an unrefined blend's uncertainty goes through the network's calibration, not the refined masks' one
    assert np.array_equal(out.maps["uncertainty"], plain.maps["uncertainty"])
    # by default (3) the triple is fitted: its three galaxies keep their own labels, now from the fit
    _, fitted = run_stages(image)
    triple = fitted.catalog["n_children"] == 3
    assert triple.sum() == 3 and (fitted.catalog["flags"][triple] & FLAG_REFINED).all()
    labels = {int(fitted.maps["segmentation"][int(y), int(x)]) for y, x, *_ in TRIPLE}
    assert len(labels) == 3 and 0 not in labels


def test_stage_fit_leaves_out_other_objects_footprints():
    """A bright galaxy that is no member of the pair but lies in its fit window: fitted as sky it spoils the
    fit (it fails the chi-square test, refine_chi2_sigma=3); with its grown sep footprint left out
    (refine_neighbour_grow, the default) the fit passes and the pair is flagged refined."""
    from test_deblend_stage import tile_of

    from deepmosaic.tasks.sep_task import SepTask
    r = pf.ProfileRenderer(160, 3.5, 3.0)
    light = (r.sersic(4000.0, 70.0, 80.0, 4.0, 1.5, 0.7, 20.0) + r.sersic(2000.0, 79.0, 80.5, 2.5, 1.0, 0.8, 100.0)
             + r.sersic(6000.0, 100.0, 102.0, 3.0, 2.5, 0.6, 60.0))       # the neighbour, ~30 px away
    image = (light + np.random.default_rng(3).standard_normal(light.shape)).astype(np.float32)
    ti = tile_of(image)
    ti.upstream["sep"] = SepTask().run(ti)
    flags = {}
    for grow in (-1, 2):
        out = DeblendTask({"device": "cpu", "refine_neighbour_grow": grow, "neighbour_distance": 0,
                           "refine_chi2_sigma": 3.0}).run(ti)
        cat = out.catalog
        pair = [int(out.maps["segmentation"][80, 70]) - 1, int(out.maps["segmentation"][80, 79]) - 1]
        assert min(pair) >= 0 and pair[0] != pair[1]
        assert cat["n_children"][pair].tolist() == [2, 2]
        flags[grow] = (cat["flags"][pair] & FLAG_REFINED) > 0
    assert flags[2].all() and not flags[-1].any()
