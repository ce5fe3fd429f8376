"""The morphology network, its training set and stage: NLL heads, stamps, flags, the catalog contract
(one row per detection, with the detection's id) through the tiled pipeline and the evaluation."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from deepmosaic.models import morph_data as md
from deepmosaic.models.datasets import dihedral_array
from deepmosaic.models.morphology import (MorphNetConfig, MorphologyRecipe, calibrate, calibrate_weights,
                                          coverage_per_bin, decode, nll, predict, prepare_inputs, targets)
from deepmosaic.models.registry import build
from deepmosaic.models.weights_io import save_model, shipped
from deepmosaic.pipeline.config import from_mapping, to_dict
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import make_psf, render_profile
from deepmosaic.tasks import get_task_class
from deepmosaic.tasks.base import TileInput
from deepmosaic.tasks.morphology_task import MORPH_COLUMNS, NEIGHBOUR, TRUNCATED, MorphologyTask
from deepmosaic.tasks.sep_task import SepTask

torch.set_num_threads(1)
SIGMA, SKY = 5.0, 100.0


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A small random MorphNet with a card like the shipped one (contract tests need no trained weights)."""
    torch.manual_seed(0)
    model = build("morphnet", channels=[4] * 7, hidden=8)
    base = tmp_path_factory.mktemp("w") / "morph"
    save_model(model, base, {"training_set": {"kind": "morphology", "config": to_dict(md.MorphSetConfig())}})
    return str(base)


# ------------------------------------------------------------------------------------------- network, NLL

def test_heads_shapes_sigma_scale_and_input_check():
    model = build("morphnet", channels=[4] * 7, hidden=8).eval()
    x = torch.from_numpy(prepare_inputs(np.random.default_rng(0).normal(size=(3, 48, 48)), 3.5, 3.0))
    assert x.shape == (3, 4, 48, 48)
    with torch.no_grad():
        raw = model(x)
        mu, sig = model.mean_sigma(x)
        model.sigma_scale.fill_(2.0)
        _, sig2 = model.mean_sigma(x)
    assert raw.shape == (3, 11) and mu.shape == (3, 6) and sig.shape == (3, 5) and (sig > 0).all()
    torch.testing.assert_close(sig2, 2 * sig)
    with pytest.raises(ValueError, match="prepare_inputs"):
        model(torch.zeros(2, 1, 48, 48))
    out = decode(mu.numpy(), sig.numpy())
    assert set(out) == {p for c in ("r_half", "sersic_n", "q", "pa", "bulge_frac") for p in (c, c + "_err")}
    assert ((out["pa"] >= 0) & (out["pa"] < 180)).all() and ((out["q"] >= 0.05) & (out["q"] <= 1)).all()


def test_inputs_are_brightness_normalised():
    img = md.render_galaxy(dict(hlr=4.0, sersic_n=1.0, q=0.7, angle=20.0, bulge_frac=0.0, bulge_hlr_ratio=0.4,
                                psf_fwhm=3.5, psf_beta=3.0, x=23.5, y=23.5), 48) * 50
    a, b = prepare_inputs(np.stack([img, 10 * img]), 3.5, 3.0)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert b[1, 0, 0] == pytest.approx(a[1, 0, 0] + math.log(10), abs=1e-5)   # the scale rides along
    assert a[2, 5, 5] == pytest.approx(3.5 / 4) and a[3, 0, 0] == pytest.approx(-0.5)


def test_nll_masks_n_for_bulge_disk_and_b_t_for_sersic():
    batch = {"hlr": np.array([3.0, 3.0]), "sersic_n": np.array([2.0, 1.0]), "q": np.array([0.5, 0.5]),
             "angle": np.array([30.0, 30.0]), "bulge_frac": np.array([0.0, 0.4]), "is_bd": np.array([False, True])}
    y = torch.from_numpy(targets(batch))
    raw = torch.zeros(2, 11)
    base = float(nll(raw, y))
    y2 = y.clone()
    y2[1, 1] += 1.0          # n of the bulge + disk galaxy: not a target
    y2[0, 5] += 0.5          # B/T of the single Sersic: not a target
    assert float(nll(raw, y2)) == pytest.approx(base)
    y3 = y.clone()
    y3[0, 1] += 1.0
    assert float(nll(raw, y3)) > base
    good = raw.clone()
    good[:, :6] = y[:, :6]
    assert float(nll(good, y)) < base


def test_calibration_finds_the_missing_factor():
    class Fixed(nn.Module):
        """Predicts the truth plus N(0, 2 s) errors while claiming sigma s."""
        def __init__(self, mu):
            super().__init__()
            self.mu = torch.from_numpy(mu)
            self.register_buffer("sigma_scale", torch.ones(5))

        def mean_sigma(self, x):
            idx = x[:, 0, 0, 0].long()
            return self.mu[idx], torch.full((len(idx), 5), 0.05) * self.sigma_scale

    n = 4000
    rng = np.random.default_rng(1)
    batch = {"hlr": np.exp(rng.uniform(0, 2, n)), "sersic_n": rng.uniform(0.5, 4, n), "q": rng.uniform(0.3, 1, n),
             "angle": rng.uniform(0, 180, n), "bulge_frac": np.where(np.arange(n) % 2, 0.3, 0.0)}
    batch["is_bd"] = batch["bulge_frac"] > 0
    t = targets(batch)[:, :6].astype(np.float64)
    mu = (t + rng.normal(0, 0.1, t.shape)).astype(np.float32)
    x = np.zeros((n, 4, 1, 1), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    scales = calibrate(Fixed(mu), x, batch)
    assert scales.shape == (1, 5)
    assert scales[0, 0] == pytest.approx(2.0, rel=0.08) and scales[0, 2] == pytest.approx(2.0, rel=0.08)
    assert scales[0, 4] == pytest.approx(2.0, rel=0.1)


def test_calibration_is_per_parameter_and_per_brightness_bin():
    """Each head's sigma is off by its own factor, different in the two brightness bins: the calibration finds
    every factor and the calibrated 68 % intervals then cover ~68 % of each parameter in each bin."""
    f = np.array([[1.5, 2.5, 0.7, 1.0, 3.0], [0.8, 1.2, 2.0, 1.6, 0.6]])

    class Binned(nn.Module):
        def __init__(self, mu):
            super().__init__()
            self.mu = torch.from_numpy(mu)
            self.register_buffer("sigma_scale", torch.ones(2, 5))
            self.register_buffer("cal_edges", torch.zeros(1))

        def mean_sigma(self, x):
            b = torch.bucketize(x[:, 1, 0, 0].contiguous(), self.cal_edges)
            return self.mu[x[:, 0, 0, 0].long()], 0.05 * self.sigma_scale[b]

    n = 6000
    rng = np.random.default_rng(4)
    batch = {"hlr": np.exp(rng.uniform(0, 2, n)), "sersic_n": rng.uniform(0.5, 4, n), "q": rng.uniform(0.3, 0.7, n),
             "angle": rng.uniform(0, 180, n), "bulge_frac": np.where(np.arange(n) % 2, 0.4, 0.0)}
    batch["is_bd"] = batch["bulge_frac"] > 0
    bright = np.arange(n) >= n // 2
    x = np.zeros((n, 4, 1, 1), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    x[:, 1, 0, 0] = np.where(bright, rng.uniform(2, 3, n), rng.uniform(0, 1, n))   # log brightness scale
    head_of_mean = [0, 1, 2, 3, 3, 4]          # log hlr, log n, q, cos, sin (one sigma), B/T
    sd = 0.05 * f[bright.astype(int)][:, head_of_mean]
    mu = (targets(batch)[:, :6] + rng.normal(0, 1, (n, 6)) * sd).astype(np.float32)
    model = Binned(mu)
    scales = calibrate(model, x, batch)
    assert 1.0 < float(model.cal_edges[0]) < 2.0
    np.testing.assert_allclose(scales, f, rtol=0.12)
    for row in coverage_per_bin(model, x, batch):
        assert row["n"] == n // 2
        assert all(abs(row[c] - 0.6827) < 0.02 for c in ("r_in", "n_in", "q_in", "pa_in", "bt_in")), row


def test_calibrate_weights_records_the_validation_set_and_coverage(tiny_weights, tmp_path):
    card = calibrate_weights(tiny_weights, tmp_path / "cal", n=160, seed=11, bins=2)
    cal = card["extra"]["calibration"]
    assert np.array(cal["sigma_scale"]).shape == (2, 5) and len(cal["log_brightness_edges"]) == 1
    assert cal["set"]["split"] == "val" and cal["set"]["seed"] == 11 and cal["set"]["n"] == 160
    assert cal["set"]["config"] == to_dict(md.mosaic_population())      # the mosaics' galaxies, not training's
    assert [row["n"] for row in cal["coverage_after"]] == [80, 80]
    for row in cal["coverage_after"]:
        assert abs(row["r_in"] - 0.6827) < 0.03 and abs(row["q_in"] - 0.6827) < 0.03
    from deepmosaic.models.weights_io import load_model
    model = load_model(tmp_path / "cal")
    np.testing.assert_allclose(model.sigma_scale.numpy(), np.array(cal["sigma_scale"]), rtol=1e-3)


def test_fine_tuning_takes_the_weights_of_a_calibrated_source_but_not_its_calibration():
    torch.manual_seed(1)
    source = build("morphnet", channels=[4] * 7, hidden=8, cal_bins=3)
    source.sigma_scale.fill_(2.0)
    model = build("morphnet", channels=[4] * 7, hidden=8)          # cal_bins 1, as train builds it
    MorphologyRecipe(None).init_from(model, source)
    assert torch.equal(model.head[0].weight, source.head[0].weight)
    assert torch.equal(model.sigma_scale, torch.ones(1, 5))
    with pytest.raises(ValueError, match="train.init"):
        MorphologyRecipe(None).init_from(build("morphnet", channels=[4] * 7, hidden=16), source)


def test_bd_head_starts_as_the_plain_network_and_learns_from_its_own_loss():
    """bd_head adds a bulge + disk logit: started from a network without it, the regression is unchanged and
    the probability is 0.5; its cross-entropy enters the loss; the evaluation reports its AUC."""
    torch.manual_seed(2)
    source = build("morphnet", channels=[4] * 7, hidden=8).eval()
    model = build("morphnet", channels=[4] * 7, hidden=8, bd_head=True)
    MorphologyRecipe(None).init_from(model, source)
    model.eval()
    x = torch.from_numpy(prepare_inputs(np.random.default_rng(3).normal(size=(4, 48, 48)), 3.5, 3.0))
    with torch.no_grad():
        raw = model(x)
        assert raw.shape == (4, 12)
        torch.testing.assert_close(raw[:, :11], source(x))
        torch.testing.assert_close(model.bd_prob(x), torch.full((4,), 0.5))
        for a, b in zip(model.mean_sigma(x), source.mean_sigma(x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="bd_head"):
        source.bd_prob(x)
    batch = {"hlr": np.array([3.0, 3.0]), "sersic_n": np.array([2.0, 1.0]), "q": np.array([0.5, 0.5]),
             "angle": np.array([30.0, 30.0]), "bulge_frac": np.array([0.0, 0.4]), "is_bd": np.array([False, True])}
    y = torch.from_numpy(targets(batch))
    raw = torch.zeros(2, 12)
    right, wrong = raw.clone(), raw.clone()
    right[:, 11] = torch.tensor([-5.0, 5.0])
    wrong[:, 11] = torch.tensor([5.0, -5.0])
    assert float(nll(right, y)) < float(nll(raw, y)) - 0.6 < float(nll(wrong, y)) - 1.2
    assert float(nll(raw, y)) == pytest.approx(float(nll(raw[:, :11], y)) + math.log(2), abs=1e-5)
    scores = MorphologyRecipe({"snr_range": [150.0, 400.0]}).evaluate(model, md.make_morph_batch(
        md.MorphSetConfig(snr_range=(150.0, 400.0)), seed=1, n=24, split="val"))
    assert scores["bd_auc_snr100"] == pytest.approx(0.5)          # an untrained logit: every score ties


# ------------------------------------------------------------------------------------------- training set

def test_mosaic_population_and_core_fraction():
    sim_like = md.mosaic_population()
    assert sim_like.hlr_range == (0.3, 1.5) and sim_like.psf_fwhm_range == (0.7, 0.7)
    assert sim_like.bulge_frac_range == (0.1, 0.7) and sim_like.snr_range == (10.0, 500.0)
    # core_fraction=0 draws nothing more: the streams of every existing seed are unchanged
    a, b = md.make_morph_batch(n=20, seed=3), md.make_morph_batch({"core_fraction": 0.0}, n=20, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = md.make_morph_batch({"core_fraction": 1.0, "bulge_disk_fraction": 0.0}, n=60, seed=3)
    assert 0.3 / 0.2 <= c["hlr"].min() and c["hlr"].max() <= 1.5 / 0.2
    assert c["sersic_n"].min() >= 0.5 and c["sersic_n"].max() <= 4.0 and c["q"].min() >= 0.3
    with pytest.raises(ConfigError, match="core_hlr_range"):
        md.MorphSetConfig(core_hlr_range=(0.1, 1.0)).validate()
    with pytest.raises(ConfigError, match="core_fraction"):
        md.MorphSetConfig(core_fraction=1.5).validate()


def test_batches_are_seeded_per_stamp_and_split():
    a = md.make_morph_batch(n=3, seed=2)
    b = md.make_morph_batch(n=2, seed=2, start=1)
    np.testing.assert_array_equal(a["image"][1:], b["image"])
    t = md.make_morph_batch(n=3, seed=2, split="test")
    assert not np.isin(a["hlr"], t["hlr"]).any()
    assert a["image"].shape == (3, 1, 48, 48) and a["image"].dtype == np.float32
    # matched-filter S/N as drawn: sum of (image - noise)^2 ~ snr^2
    sc = md._scene(md.MorphSetConfig(), md.morph_streams(2, 0)[0])
    assert float(np.sum(sc["unit"].astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)


def test_pool_flips_carry_the_angle_and_centre():
    cfg = md.MorphSetConfig()
    sc = md._scene(cfg, md.morph_streams(0, 5)[0])
    for t in range(8):
        s = md._sample(sc, np.random.default_rng(0), t, snr=1.0)
        p = dict(sc, angle=float(s["angle"]), y=float(s["center"][0]), x=float(s["center"][1]))
        np.testing.assert_allclose(dihedral_array(sc["unit"], t), md.render_galaxy(p, cfg.size), atol=2e-4)


def test_configs_are_validated():
    with pytest.raises(ConfigError, match="snr_range"):
        md.MorphSetConfig(snr_range=(10.0, 5.0)).validate()
    with pytest.raises(ConfigError, match="hlr_rnage"):
        from_mapping(md.MorphSetConfig, {"hlr_rnage": (1, 2)})
    with pytest.raises(ConfigError, match="channels"):
        build("morphnet", channels=[8, 8])
    with pytest.raises(ConfigError, match="stamp_size"):
        MorphNetConfig(stamp_size=50).validate("morphnet")
    with pytest.raises(ConfigError, match="psf_fwhm"):
        MorphologyTask({"psf_fwhm": 0.2})
    with pytest.raises(ConfigError, match="batch_size"):
        MorphologyTask({"batch_size": 0})
    with pytest.raises(ConfigError, match="device"):
        MorphologyTask({"device": "gpu"})
    with pytest.raises(ConfigError, match="detection"):
        MorphologyTask({"detection": "truth"})
    assert get_task_class("morphology")({"detection": "detect"}).requires == ("detect",)
    with pytest.raises(ConfigError, match="unknown key"):
        MorphologyRecipe({"snr": 3})


# ------------------------------------------------------------------------------------------- the stage

def _scene(size=200):
    """Isolated galaxy, a close pair, a galaxy whose stamp crosses the window edge, one outside the core."""
    psf = make_psf(3.5, 3.0)
    model = np.zeros((size, size))
    gals = [(60.0, 60.0, 4.0), (130.0, 60.0, 4.0), (139.0, 67.0, 3.0), (188.0, 140.0, 3.0), (100.0, 196.0, 3.0)]
    for x, y, hlr in gals:
        render_profile(6e4, x, y, psf=psf, kind="galaxy", hlr=hlr, sersic_n=1.5, q=0.7, angle=30.0).add_to(model)
    noise = np.random.default_rng(3).normal(0.0, SIGMA, model.shape)
    img = (model + SKY + noise).astype(np.float32)
    tile = TileInput(image=img, background=np.full(img.shape, SKY, np.float32),
                     rms=np.full(img.shape, SIGMA, np.float32), global_rms=SIGMA, mask=np.zeros(img.shape, bool),
                     variance=None, origin=(0, 0), core=(slice(0, 190), slice(0, size)))
    return tile, gals


def test_stage_contract_rows_flags_and_core(tiny_weights):
    tile, gals = _scene()
    tile.upstream["sep"] = SepTask({"deblend_cont": 0.005}).run(tile)
    det = tile.upstream["sep"].catalog
    task = get_task_class("morphology")({"weights": tiny_weights, "device": "cpu"})
    assert task.halo == 26 and task.requires == ("sep",)
    out = task.run(tile)
    cat = out.catalog
    assert list(cat) == list(MORPH_COLUMNS)
    for k, col in MORPH_COLUMNS.items():
        assert cat[k].dtype == np.dtype(col.dtype) and len(cat[k]) == len(det["x"]), k
    np.testing.assert_array_equal(cat["x"], det["x"])
    np.testing.assert_array_equal(cat["y"], det["y"])

    def row(x, y):
        return int(np.argmin((det["x"] - x) ** 2 + (det["y"] - y) ** 2))

    iso, a, b, edge, outside = (row(x, y) for x, y, _ in gals)
    assert len({iso, a, b, edge, outside}) == 5, "sep separates the five galaxies"
    assert not cat["flags"][iso] & (NEIGHBOUR | TRUNCATED) and np.isfinite(cat["r_half"][iso]) and cat["r_half_err"][iso] > 0
    assert cat["flags"][a] & NEIGHBOUR and cat["flags"][b] & NEIGHBOUR
    assert cat["flags"][edge] & TRUNCATED
    assert np.isnan(cat["r_half"][outside]), "centroid outside the core: not measured (the pipeline drops it)"
    # the same stage, pickled to a worker, gives the same numbers (the model is not part of the state)
    import pickle
    again = pickle.loads(pickle.dumps(task)).run(tile).catalog
    np.testing.assert_array_equal(again["r_half"], cat["r_half"])
    # an empty detection catalog gives an empty, schema-valid catalog
    tile.upstream["sep"] = SepTask().empty_output(tile.image.shape)
    empty = task.run(tile).catalog
    assert all(len(v) == 0 for v in empty.values()) and list(empty) == list(MORPH_COLUMNS)


def test_pipeline_gives_the_detection_ids_and_evaluates(tiny_weights, tmp_path):
    from deepmosaic.pipeline.evaluate import evaluate_store, format_summary
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.store import read_catalog
    from deepmosaic.pipeline.truth import write_simulation
    from deepmosaic.workflows import run
    image, truth = write_simulation(simulate_mosaic(SimConfig(size=(320, 320), seed=4)), tmp_path / "f.fits")
    store = str(tmp_path / "f.zarr")
    run(str(image), store, stages="sep,morphology", tile=128, workers=0,
        set=[f"morphology.weights={tiny_weights}", "morphology.device=cpu"])
    sep, morph = read_catalog(store, "sep"), read_catalog(store, "morphology")
    assert len(morph["id"]) == len(sep["id"]) > 10
    o, p = np.argsort(sep["id"]), np.argsort(morph["id"])
    np.testing.assert_array_equal(sep["id"][o], morph["id"][p])
    np.testing.assert_array_equal(sep["x"][o], morph["x"][p])
    assert np.isfinite(morph["r_half"]).all(), "every owned detection is measured"
    res = evaluate_store(store, str(truth), stages="morphology")
    m = res["_morphology"]["morphology"]
    assert m["n_matched"] > 10 and set(m["groups"]) == {"clean", "neighbour", "truncated"}
    assert sum(g["all"]["n"] for g in m["groups"].values()) == m["n_matched"]
    assert "morphology of morphology" in format_summary(res)


def test_shipped_calibration_came_from_validation_stamps_of_the_mosaics():
    from deepmosaic.models.weights_io import read_card
    card = read_card(shipped("morphology"))
    cal = card["extra"]["calibration"]
    assert cal["set"]["split"] == "val" and cal["set"]["config"] == to_dict(md.mosaic_population())
    bins = card["config"]["cal_bins"]
    assert np.array(cal["sigma_scale"]).shape == (bins, 5) and len(cal["coverage_after"]) == bins
    assert all(abs(row[c] - 0.6827) < 0.01 for row in cal["coverage_after"] for c in cal["heads"])


def test_shipped_weights_measure_held_out_galaxies():
    base = shipped("morphology")
    from deepmosaic.models.weights_io import load_model
    model = load_model(base)
    batch = md.make_morph_batch(seed=123, n=64, split="test")
    mu, sig = predict(model, prepare_inputs(batch["image"], batch["psf_fwhm"], batch["psf_beta"]))
    out = decode(mu, sig)
    bright = batch["snr"] >= 30
    assert np.median(np.abs(out["r_half"][bright] / batch["hlr"][bright] - 1)) < 0.1
