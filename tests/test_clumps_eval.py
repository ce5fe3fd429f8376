"""Clumpy mosaics with clump truth (simulator option, CLUMPS truth table), the clump evaluation (a hand-made
case with known answers, the evaluate/report hooks) and the canvas layout of the clump training set."""
import math

import numpy as np
import pytest
from astropy.io import fits

from deepmosaic.models import datasets as ds
from deepmosaic.pipeline import eval_clumps
from deepmosaic.pipeline.errors import ConfigError, InputError
from deepmosaic.pipeline.evaluate import evaluate_store, format_summary, read_reports
from deepmosaic.pipeline.simulate import SimConfig, SeparationGrid, simulate_mosaic
from deepmosaic.pipeline.truth import read_clump_truth, read_truth, write_simulation
from deepmosaic.workflows import run

CLUMPY = dict(size=(256, 256), seed=3, density=200.0, clumpy_density=120.0)


@pytest.fixture(scope="module")
def clumpy(tmp_path_factory):
    d = tmp_path_factory.mktemp("clumpy")
    sim = simulate_mosaic(SimConfig(**CLUMPY))
    img, truth = write_simulation(sim, d / "m.fits")
    return sim, img, truth


# ------------------------------------------------------------------------------------------ simulator, truth

def test_clump_option_leaves_the_rest_of_the_mosaic_alone():
    plain = simulate_mosaic(SimConfig(size=(128, 128), seed=3, density=200.0))
    assert plain.clumps is None
    cfg = dict(size=(128, 128), seed=3, density=200.0, clumpy_density=300.0)
    a, b = simulate_mosaic(SimConfig(**cfg)), simulate_mosaic(SimConfig(**cfg))
    assert np.array_equal(a.image, b.image) and len(a.clumps) > 0
    n = len(plain.truth)
    # the random population keeps its draws: same first rows; clumpy hosts come after them
    for c in ("x", "y", "flux", "kind"):
        assert np.array_equal(np.asarray(plain.truth[c]), np.asarray(a.truth[c][:n]))
    assert set(np.asarray(a.clumps["host_id"])) <= set(range(n + 1, len(a.truth) + 1))
    with pytest.raises(ConfigError, match="clumps_per_host"):
        SimConfig(clumps_per_host=(3, 1)).validate()
    with pytest.raises(ConfigError, match="clumpy_density"):
        SimConfig(clumpy_density=-1.0).validate()


def test_clump_truth_written_and_read_back(clumpy):
    sim, img, truth_path = clumpy
    t = read_clump_truth(truth_path)
    assert len(t) == len(sim.clumps) > 10
    for c in ("id", "x", "y", "ra", "dec", "flux", "snr", "host_id", "contrast", "close_pair", "on_bulge"):
        assert c in t.colnames
        np.testing.assert_array_equal(np.asarray(t[c]), np.asarray(sim.clumps[c]))
    # S/N definition: flux / (sigma sqrt(A_eff))
    a_eff = t.meta["PSFAREA"]
    np.testing.assert_allclose(t["snr"], t["flux"] / (CLUMPY.get("noise_sigma", 5.0) * math.sqrt(a_eff)))
    assert 3.0 <= t["snr"].min() and t["snr"].max() <= 100.0
    # hosts are CATALOG galaxies whose flux holds their clumps' light
    cat, seg = read_truth(truth_path)
    assert seg is not None and len(cat) == len(sim.truth)
    rows = {int(i): k for k, i in enumerate(cat["id"])}
    for hid in np.unique(t["host_id"]):
        assert cat["kind"][rows[int(hid)]] == "galaxy"
        assert cat["flux"][rows[int(hid)]] > t["flux"][t["host_id"] == hid].sum()
    # close_pair: another clump within 3 PSF FWHM
    fwhm = 0.7 / 0.2
    xy = np.c_[t["x"], t["y"]]
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(np.asarray(t["close_pair"]), d.min(axis=1) < 3 * fwhm)
    assert d.min() >= 2 * fwhm - 1e-9                     # no pair closer than the low end of the pair range
    assert np.all(np.asarray(t["contrast"]) > 0)
    # the light is there: the noise-free model exceeds the clump's PSF peak at each clump
    for x, y, f in zip(t["x"][:5], t["y"][:5], t["flux"][:5]):
        assert sim.model[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] > 0.02 * f


def test_truth_without_clumps_is_refused(tmp_path):
    sim = simulate_mosaic(SimConfig(size=(64, 64), seed=1, density=100.0))
    _, truth = write_simulation(sim, tmp_path / "p.fits")
    assert "CLUMPS" not in [h.name for h in fits.open(truth)]
    with pytest.raises(InputError, match="CLUMPS"):
        read_clump_truth(truth)
    with pytest.raises(InputError, match="does not exist"):
        read_clump_truth(tmp_path / "nope.fits")


# ------------------------------------------------------------------------------------------ scoring

def test_score_clumps_hand_made_case():
    truth = {"x": np.array([10.0, 30.0, 50.0, 70.0, 90.0]), "y": np.array([10.0, 10.0, 10.0, 10.0, 10.0]),
             "snr": np.array([20.0, 12.0, 7.0, 3.0, 50.0]),
             "close_pair": np.array([True, False, True, False, False]),
             "on_bulge": np.array([False, False, False, False, True])}
    pred = np.array([[11.0, 10.0],      # clump 0 at 1.0 px: matched
                     [31.6, 10.0],      # 1.6 px from clump 1: beyond 1.5 px, a false detection
                     [50.0, 10.5],      # clump 2 at 0.5 px: matched
                     [70.0, 11.5],      # clump 3 at exactly 1.5 px: matched (inclusive)
                     [200.0, 200.0]])   # nothing there
    s, m = eval_clumps.score_clumps(truth, pred)
    assert (s["n_true"], s["n_pred"], s["n_tp"], s["n_fp"]) == (5, 5, 3, 2)
    assert s["completeness"] == pytest.approx(3 / 5) and s["purity"] == pytest.approx(3 / 5)
    # S/N >= 10: clumps 0, 1, 4; one found; purity = 1 / (1 + 2 false)
    assert s["n_true_snr10"] == 3 and s["completeness_snr10"] == pytest.approx(1 / 3)
    assert s["purity_snr10"] == pytest.approx(1 / 3) and s["f1_snr10"] == pytest.approx(1 / 3)
    assert s["completeness_snr5_10"] == 1.0 and s["purity_snr5_10"] == pytest.approx(1 / 3)
    assert s["completeness_snr_lt5"] == 1.0
    assert s["completeness_snr10_close_pair"] == 1.0 and s["n_true_snr10_close_pair"] == 1
    assert s["completeness_snr10_on_bulge"] == 0.0
    assert s["completeness_snr5_10_on_bulge"] is None          # no such clump: undefined, not 0
    np.testing.assert_array_equal(m["found"], [True, False, True, True, False])
    np.testing.assert_array_equal(m["pred_matched"], [True, False, True, True, False])
    # nothing detected: completeness 0, purity undefined
    s0, _ = eval_clumps.score_clumps(truth, np.zeros((0, 2)))
    assert s0["completeness_snr10"] == 0.0 and s0["purity_snr10"] is None and s0["f1_snr10"] is None


def test_evaluate_scores_clump_stages_against_clump_truth_only(clumpy, tmp_path):
    sim, img, truth = clumpy
    store = tmp_path / "c.zarr"
    res = run(str(img), str(store), stages="sep,clumps_sep", tile=128, workers=0)
    assert not res.failures
    out = evaluate_store(store, truth)
    # clumps are never matched to the galaxy truth as if they were galaxies
    assert "clumps_sep" not in out and "sep" in out
    assert "clumps_sep" not in read_reports(store)
    s = out["_clumps"]["clumps_sep"]
    assert s["n_true"] == len(sim.clumps)
    text = format_summary(out)
    assert "CLUMPS truth" in text and "clumps_sep" in text
    back = eval_clumps.read_clump_reports(store)
    assert back["clumps_sep"]["attrs"]["summary"]["n_tp"] == s["n_tp"]
    assert set(back["clumps_sep"]["curves"]) == {"snr", "contrast"}
    assert int(back["clumps_sep"]["curves"]["snr"]["n_true"].sum()) <= len(sim.clumps)
    # only the clump stage asked for: no galaxy evaluation at all
    only = evaluate_store(store, truth, stages="clumps_sep")
    assert set(only) == {"_truth", "_clumps"}
    assert "compl S/N>=10" not in format_summary(only)  # and no empty galaxy table in the summary
    # the HTML report has a clump section with its curves
    from deepmosaic.pipeline.report import make_report
    index = make_report(store, tmp_path / "rep")
    page = index.read_text()
    assert "<h2>Clumps</h2>" in page and (tmp_path / "rep" / "clumps_completeness_snr.png").exists()


def test_clump_stage_named_without_clump_truth_is_an_input_error(tmp_path):
    sim = simulate_mosaic(SimConfig(size=(128, 128), seed=2, density=200.0))
    img, truth = write_simulation(sim, tmp_path / "p.fits")
    store = tmp_path / "p.zarr"
    run(str(img), str(store), stages="sep,clumps_sep", tile=128, workers=0)
    with pytest.raises(InputError, match="CLUMPS"):
        evaluate_store(store, truth, stages="clumps_sep")
    out = evaluate_store(store, truth)            # default: the galaxy stages, a note for the clump stage
    assert "note" in out["_clumps"] and "sep" in out


# ------------------------------------------------------------------------------------------ training canvases

def test_canvas_layout_targets_and_decoys():
    cfg = ds.ClumpSetConfig(layout="canvas", size=64, max_clumps=12, mask_radius=2.0, min_clump_separation=5.0,
                            edge_margin=3.0, stars_range=(2, 2), compact_range=(1, 1), empty_fraction=0.0)
    b = ds.make_batch("clumps", cfg, seed=4, n=6)
    assert b["image"].shape == (6, 1, 64, 64) and b["positions"].shape == (6, 12, 2)
    for i in range(6):
        k = int(b["count"][i])
        pos = b["positions"][i, :k]
        np.testing.assert_array_equal(b["mask"][i, 0], ds.disc_mask(64, pos, 2.0))
        if k > 1:
            d = np.hypot(*(pos[:, None] - pos[None]).transpose(2, 0, 1))
            np.fill_diagonal(d, np.inf)
            assert d.min() >= 5.0
    sc = ds.render_scene("clumps", cfg, seed=4, index=1)
    assert sc["n_stars"] >= 1
    np.testing.assert_allclose(sc["model"], sc["galaxy"] + sc["clumps"], atol=1e-4)
    assert len(sc["on_bulge"]) == len(sc["close_pair"]) == len(sc["contrast"]) == len(sc["positions"])
    with pytest.raises(ConfigError, match="layout"):
        ds.ClumpSetConfig(layout="mosaics").validate()


def test_mosaic_layout_is_a_crop_of_the_simulator():
    """layout='mosaic': a crop of simulate_mosaic itself, clumps in the mask and listed with their truth."""
    cfg = ds.ClumpSetConfig(layout="mosaic", size=64, max_clumps=40, mask_radius=2.0, min_clump_separation=5.0,
                            edge_margin=3.0, mosaic_clumpy_range=(400.0, 400.0), mosaic_density_range=(300.0, 300.0),
                            mosaic_pad=16)
    sc = ds.render_scene("clumps", cfg, seed=2, index=0)
    assert sc["sim_seed"] >= 2 ** 24                   # never one of the benchmarks' small seeds
    fwhm_arcsec = sc["psf_fwhm"] * cfg.pixel_scale
    sim = simulate_mosaic(SimConfig(size=(96, 96), seed=sc["sim_seed"], psf_fwhm=fwhm_arcsec,
                                    psf_beta=sc["psf_beta"], density=300.0, clumpy_density=400.0))
    np.testing.assert_allclose(sc["model"], sim.model[16:80, 16:80] / 5.0, atol=1e-4)
    yx = np.c_[np.asarray(sim.clumps["y"]), np.asarray(sim.clumps["x"])] - 16
    inside = np.all((yx >= -0.5) & (yx < 63.5), axis=1)
    assert inside.sum() >= 1
    np.testing.assert_allclose(sc["positions"], yx[inside])
    np.testing.assert_allclose(sc["clump_snr"], np.asarray(sim.clumps["snr"])[inside])
    b = ds.make_batch("clumps", cfg, seed=2, n=3)
    k = int(b["count"][0])
    assert k == inside.sum() and b["valid"][0].sum() == k
    np.testing.assert_array_equal(b["mask"][0, 0], ds.disc_mask(64, sc["mask_positions"], 2.0))
    capped = ds.render_scene("clumps", ds.ClumpSetConfig(**{**cfg.__dict__, "max_clumps": 1}), seed=2, index=0)
    assert len(capped["positions"]) == 1 and len(capped["mask_positions"]) == len(sc["mask_positions"])


def test_separation_grid():
    g = SeparationGrid(5.0, box=(0, 100, 0, 100), cap=3)
    assert g(10, 10) and not g(13, 13) and g(10, 15.0) and not g(-1, 50)
    assert g(50, 50) and not g(80, 80)          # the cap of 3
