"""The deblend stage: contract, pass-through without blends, isolated galaxies, blends of three, skips, seams."""
from __future__ import annotations

import numpy as np
import pytest

from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import make_psf, render_profile
from deepmosaic.tasks import get_task_class
from deepmosaic.tasks.base import TileInput
from deepmosaic.tasks.deblend_task import (DEBLEND_COLUMNS, DEBLEND_MAPS, FLAG_DEBLENDED, FLAG_SKIPPED,
                                           DeblendTask, find_blends)
from deepmosaic.tasks.sep_task import SepTask

FWHM = 4.0  # px: 0.8" at LSST's 0.2"/px


def galaxies(shape, objs, seed=0):
    """Noise-free images [k, H, W] of bulge + disk galaxies ``objs`` = [(y, x, flux, hlr, q, angle), ...]
    and the noisy sum (unit noise)."""
    psf = make_psf(FWHM, 3.0)
    light = np.zeros((len(objs),) + tuple(shape))
    for k, (y, x, flux, hlr, q, angle) in enumerate(objs):
        st = render_profile(flux, x, y, psf=psf, hlr=hlr, q=q, angle=angle, bulge_frac=0.3, shape=shape,
                            origin=(0, 0))
        light[k] = st.array
    noise = np.random.default_rng(seed).standard_normal(shape)
    return light, (light.sum(0) + noise).astype(np.float32)


def tile_of(image):
    H, W = image.shape
    return TileInput(image=image, background=np.zeros_like(image), rms=np.ones_like(image), global_rms=1.0,
                     mask=np.zeros(image.shape, bool), variance=None, origin=(0, 0),
                     core=(slice(0, H), slice(0, W)))


def run_stages(image, **deblend_cfg):
    ti = tile_of(image)
    ti.upstream["sep"] = SepTask().run(ti)
    return ti.upstream["sep"], DeblendTask({"device": "cpu", **deblend_cfg}).run(ti)


def label_at(seg, y, x):
    return int(seg[int(round(y)), int(round(x))])


# a triple: three galaxies about 3 PSF widths apart, footprints merged
TRIPLE = [(64.0, 60.0, 4000.0, 4.0, 0.8, 10.0), (64.0, 74.0, 2500.0, 3.0, 0.7, 80.0),
          (77.0, 67.0, 2000.0, 3.0, 0.9, 40.0)]


def test_registered_and_config_errors():
    assert get_task_class("deblend") is DeblendTask
    with pytest.raises(ConfigError, match="halo"):
        DeblendTask({"halo": 10})
    with pytest.raises(ConfigError, match="stamp"):
        DeblendTask({"stamp": 100})
    with pytest.raises(ConfigError, match="nope"):
        DeblendTask({"nope": 1})


def test_contract_outputs_shapes_schema_flags():
    _, image = galaxies((128, 160), TRIPLE[:2] + [(30.0, 130.0, 3000.0, 3.0, 0.8, 0.0)])
    sep_out, out = run_stages(image)
    assert set(out.maps) == set(DEBLEND_MAPS)
    for name, spec in DEBLEND_MAPS.items():
        assert out.maps[name].shape == image.shape and out.maps[name].dtype == np.dtype(spec.dtype)
    assert set(out.catalog) == set(DEBLEND_COLUMNS)
    n = len(sep_out.catalog["x"])
    for name, col in DEBLEND_COLUMNS.items():
        assert out.catalog[name].shape == (n,) and out.catalog[name].dtype == np.dtype(col.dtype), name
    seg = out.maps["segmentation"]
    assert seg.min() >= 0 and seg.max() <= n
    unc = out.maps["uncertainty"]
    assert np.all((unc >= 0) & (unc <= 1))
    flags = out.catalog["flags"]
    deblended = (flags & FLAG_DEBLENDED) > 0
    assert deblended.sum() == 2 and (out.catalog["n_children"][deblended] == 2).all()
    assert (out.catalog["n_children"][~deblended] == 1).all()
    # the isolated galaxy keeps sep's footprint, position and flux exactly
    iso = int(np.flatnonzero(~deblended)[0])
    assert np.array_equal(seg == iso + 1, sep_out.maps["segmentation"] == iso + 1)
    assert out.catalog["flux"][iso] == sep_out.catalog["flux"][iso]
    assert np.all(unc[seg == iso + 1] == 0)
    # the blend's region carries its primary (brightest) member in the parent map
    primary = int(np.argmax(np.where(deblended, sep_out.catalog["flux"], -np.inf)))
    assert set(np.unique(out.maps["parent"])) == {0, primary + 1}
    assert out.maps["parent"][seg == primary + 1].min() == primary + 1
    assert (unc[out.maps["parent"] > 0] > 0).any()


def test_field_without_blends_passes_through():
    objs = [(40.0 + 90 * (i // 3), 40.0 + 90 * (i % 3), 1500.0 + 700 * i, 2.5 + 0.4 * i, 0.7, 30.0 * i)
            for i in range(6)]
    _, image = galaxies((220, 260), objs, seed=3)
    sep_out, out = run_stages(image)
    assert len(sep_out.catalog["x"]) == 6
    assert np.array_equal(out.maps["segmentation"], sep_out.maps["segmentation"])
    assert not out.maps["parent"].any() and not out.maps["uncertainty"].any()
    for c in ("x", "y", "flux", "flux_err"):
        assert np.array_equal(out.catalog[c], sep_out.catalog[c])
    assert not out.catalog["flags"].any() and (out.catalog["n_children"] == 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isolated_galaxy_never_split(seed):
    rng = np.random.default_rng(seed)
    obj = (48.0 + rng.uniform(-1, 1), 48.0 + rng.uniform(-1, 1), float(rng.uniform(2e3, 2e4)),
           float(rng.uniform(2, 6)), float(rng.uniform(0.4, 1)), float(rng.uniform(0, 180)))
    _, image = galaxies((96, 96), [obj], seed=seed)
    sep_out, out = run_stages(image)
    seg = out.maps["segmentation"]
    assert len(np.unique(seg[seg > 0])) == len(sep_out.catalog["x"]) == 1
    assert not out.catalog["flags"].any()


def test_three_member_blend_one_member_against_the_rest():
    light, image = galaxies((128, 128), TRIPLE, seed=5)
    sep_out, out = run_stages(image)
    seg, cat = out.maps["segmentation"], out.catalog
    assert len(cat["x"]) == 3, "sep must see three members for this test to mean something"
    assert (cat["n_children"] == 3).all() and ((cat["flags"] & FLAG_DEBLENDED) > 0).all()
    owners = [label_at(seg, y, x) for y, x, *_ in TRIPLE]
    assert sorted(owners) == [1, 2, 3], owners          # each true centre in its own mask
    truth = np.where(light.max(0) > 1.0, light.argmax(0) + 1, 0)
    from deepmosaic.pipeline.metrics import iou
    for k, lab in enumerate(owners):
        assert iou(truth == k + 1, seg == lab) > 0.6
    # fluxes shared by the masks add up to (about) the blend's light
    assert abs(cat["flux"].sum() / light.sum() - 1) < 0.15


def test_too_many_members_or_too_large_is_skipped_with_flag():
    _, image = galaxies((128, 128), TRIPLE, seed=5)
    for cfg in ({"max_members": 2}, {"stamp": 32, "halo": 64}):
        sep_out, out = run_stages(image, **cfg)
        assert ((out.catalog["flags"] & FLAG_SKIPPED) > 0).all()
        assert np.array_equal(out.maps["segmentation"], sep_out.maps["segmentation"])
        assert not out.maps["uncertainty"].any()


def test_find_blends_touching_and_distance():
    seg = np.zeros((10, 30), np.int64)
    seg[2:5, 2:5], seg[2:5, 5:8], seg[2:5, 20:23] = 1, 2, 3
    x, y = np.array([3.0, 6.0, 21.0]), np.array([3.0, 3.0, 3.0])
    groups, by_dist = find_blends(seg, x, y, 0.0)
    assert [g.tolist() for g in groups] == [[0, 1]] and not by_dist.any()
    groups, by_dist = find_blends(seg, x, y, 16.0)
    assert [g.tolist() for g in groups] == [[0, 1, 2]] and by_dist.tolist() == [False, False, True]


def test_blend_straddling_a_seam_is_deblended_once(tmp_path):
    from astropy.io import fits

    from deepmosaic.pipeline import store as st
    from deepmosaic.workflows import run
    # a pair across the vertical seam at x = 128 of a 128 px tiling, plus an isolated galaxy
    objs = [(100.0, 122.0, 5000.0, 4.0, 0.8, 20.0), (104.0, 135.0, 3000.0, 3.0, 0.6, 100.0),
            (40.0, 40.0, 3000.0, 3.0, 0.8, 0.0)]
    _, image = galaxies((200, 256), objs, seed=7)
    fits.writeto(tmp_path / "seam.fits", image + 100.0)
    segs, cats = {}, {}
    for tile in (128, 256):
        store = tmp_path / f"t{tile}.zarr"
        run(str(tmp_path / "seam.fits"), str(store), stages="sep,deblend", tile=tile, workers=0,
            set=["deblend.device=cpu"])
        z = st.open_store(str(store))
        segs[tile] = z["maps/deblend/segmentation"][:]
        cats[tile] = st.read_catalog(str(store), "deblend")
    tiled, whole = segs[128], segs[256]
    cat = cats[128]
    pair = [label_at(tiled, y, x) for y, x, *_ in objs[:2]]
    assert 0 not in pair and pair[0] != pair[1]
    assert len(cat["id"]) == len(np.unique(cat["id"])) == len(cats[256]["id"]) == 3
    assert set(np.unique(tiled[tiled > 0])) == set(cat["id"])           # every label has one catalog row
    members = np.isin(cat["id"], pair)
    assert (cat["n_children"][members] == 2).all()
    assert (cat["tile_col"][members] == [0, 1]).all() or (cat["tile_col"][members] == [1, 0]).all()
    # the parent link is the same for both members, across the seam
    assert len(set(cat["parent_id"][members])) == 1 and cat["parent_id"][members][0] in pair
    # tiled == untiled up to relabelling
    from deepmosaic.pipeline.metrics import label_iou_matrix
    _, _, m = label_iou_matrix(whole, tiled, dense=True)
    assert m.shape == (3, 3) and np.all(m.max(axis=1) > 0.99)


def test_secondary_peak_inside_one_sep_footprint_becomes_a_member():
    from deepmosaic.tasks.deblend_task import FLAG_NEW_PEAK
    objs = [(48.0, 44.0, 5000.0, 3.0, 0.8, 20.0), (48.0, 52.0, 2500.0, 2.5, 0.7, 100.0)]   # 2 PSF FWHM apart
    _, image = galaxies((96, 96), objs, seed=1)
    sep_out, out = run_stages(image)
    assert len(sep_out.catalog["x"]) == 1, "sep must leave this pair as one object for the test to mean something"
    cat, seg = out.catalog, out.maps["segmentation"]
    assert len(cat["x"]) == 2 and (cat["n_children"] == 2).all()
    assert ((cat["flags"] & FLAG_NEW_PEAK) > 0).tolist() == [False, True]
    assert np.isnan(cat["sep_flux"][1]) and np.isfinite(cat["flux"]).all()
    assert sorted(label_at(seg, y, x) for y, x, *_ in objs) == [1, 2]
    # switched off, the footprint passes through
    _, off = run_stages(image, find_peaks=False)
    assert np.array_equal(off.maps["segmentation"], sep_out.maps["segmentation"])


def test_uncertainty_goes_through_the_cards_calibration():
    task = DeblendTask({"device": "cpu", "refine": "none"})
    task.network_sha256()
    raw = np.array([0.0, 0.01, 0.3, 1.0], np.float32)
    if task.calibration():   # the shipped card carries one: a non-decreasing map of [0, 1] into [0, 1]
        cal = task.calibrate(raw)
        assert np.all(np.diff(cal) >= 0) and cal.min() >= 0 and cal.max() <= 1
    task._calibrations = {"none": ([0.0, 0.5, 1.0], [0.0, 0.8, 0.9]), "sersic": ()}
    assert np.allclose(task.calibrate(raw), [0.0, 0.016, 0.48, 0.9])
    # refined masks have their own calibration; without one in the card, the network's is used
    assert np.allclose(task.calibrate(raw, refined=True), [0.0, 0.016, 0.48, 0.9])
    task._calibrations["sersic"] = ([0.0, 1.0], [0.0, 0.5])
    assert np.allclose(task.calibrate(raw, refined=True), raw / 2)
    assert np.allclose(task.calibrate(raw), [0.0, 0.016, 0.48, 0.9])       # this task does not refine
    refining = DeblendTask({"device": "cpu"})                                # refine='sersic', the default
    refining.network_sha256()
    refining._calibrations = dict(task._calibrations)
    assert np.allclose(refining.calibrate(raw), raw / 2)
    assert refining.fingerprint()["uncertainty_calibration"] == {"none": [[0.0, 0.5, 1.0], [0.0, 0.8, 0.9]],
                                                                 "sersic": [[0.0, 1.0], [0.0, 0.5]]}
    task._calibrations = {"none": (), "sersic": ()}
    assert np.array_equal(task.calibrate(raw), raw)


def test_detect_peaks_seed_the_blends():
    from deepmosaic.tasks.base import TaskOutput
    from deepmosaic.tasks.deblend_task import FLAG_NEW_PEAK
    objs = [(48.0, 44.0, 5000.0, 3.0, 0.8, 20.0), (48.0, 52.0, 2500.0, 2.5, 0.7, 100.0)]   # 2 PSF FWHM apart
    _, image = galaxies((96, 96), objs, seed=1)
    ti = tile_of(image)
    ti.upstream["sep"] = SepTask().run(ti)
    assert len(ti.upstream["sep"].catalog["x"]) == 1, "sep must leave this pair as one object"
    # the detect stage's catalog (window px): both galaxies, plus one on the sky that is no blend member
    det = {"x": np.array([52.3, 44.2, 10.0]), "y": np.array([47.8, 48.1, 10.0]),
           "score": np.array([0.7, 0.9, 0.5]), "width": np.full(3, 8.0), "height": np.full(3, 8.0),
           "class": np.ones(3, np.int64)}
    ti.upstream["detect"] = TaskOutput(maps={}, catalog=det)
    task = DeblendTask({"device": "cpu", "peaks": "detect"})
    assert task.requires == ("sep", "detect")
    out = task.run(ti)
    cat, seg = out.catalog, out.maps["segmentation"]
    assert len(cat["x"]) == 2 and (cat["n_children"] == 2).all()
    assert ((cat["flags"] & FLAG_NEW_PEAK) > 0).tolist() == [False, True]
    assert sorted(label_at(seg, y, x) for y, x, *_ in objs) == [1, 2]
    # one detection per footprint (sep's own object): nothing to deblend, the footprint passes through
    ti.upstream["detect"] = TaskOutput(maps={}, catalog={k: v[1:2] for k, v in det.items()})
    single = task.run(ti)
    assert np.array_equal(single.maps["segmentation"], ti.upstream["sep"].maps["segmentation"])
    with pytest.raises(ConfigError, match="peaks"):
        DeblendTask({"peaks": "heatmap"})


def test_detect_seeded_deblend_needs_the_detect_stage_first(tmp_path):
    from deepmosaic.workflows import run
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    image, _ = write_simulation(simulate_mosaic(SimConfig(size=(128, 128), seed=3)), tmp_path / "f.fits")
    with pytest.raises(ConfigError, match="needs detect"):
        run(str(image), str(tmp_path / "s.zarr"), stages="sep,deblend", tile=128, workers=0,
            set=["deblend.peaks=detect"])


def test_companion_shift_moves_pixels_to_the_companion_only():
    """The companion logit shift (the card's fitted value unless companion_shift is set) changes only the
    companion channel; on a pair, a larger shift gives the fainter member more pixels and the brighter fewer."""
    from deepmosaic.models.train import DeblendRecipe
    prob = np.random.default_rng(0).uniform(0.01, 0.99, (3, 2, 2, 5, 5)).astype(np.float32)   # [s, n, k, H, W]
    assert DeblendRecipe.shift_companions(prob, 0.0) is prob
    up = DeblendRecipe.shift_companions(prob, 2.0)
    assert np.array_equal(up[..., 0, :, :], prob[..., 0, :, :])
    assert np.all(up[..., 1, :, :] > prob[..., 1, :, :])
    np.testing.assert_allclose(DeblendRecipe.shift_companions(up, -2.0), prob, rtol=1e-4, atol=1e-6)

    task = DeblendTask({"device": "cpu"})
    task.network_sha256()
    assert task.companion_shift() == task._card_shift
    assert DeblendTask({"device": "cpu", "companion_shift": 1.5}).companion_shift() == 1.5
    assert (DeblendTask({"companion_shift": 0}).fingerprint()
            != DeblendTask({"companion_shift": 3}).fingerprint())
    with pytest.raises(ConfigError, match="companion_shift"):
        DeblendTask({"companion_shift": 50})

    pair = TRIPLE[:2]
    _, image = galaxies((128, 128), pair, seed=3)
    npix = []
    for shift in (0.0, 4.0, 8.0):
        _, out = run_stages(image, companion_shift=shift, find_peaks=False, refine="none")   # the network's masks
        seg = out.maps["segmentation"]
        a, b = label_at(seg, pair[0][0], pair[0][1]), label_at(seg, pair[1][0], pair[1][1])
        assert a > 0 and b > 0 and a != b
        npix.append((int((seg == a).sum()), int((seg == b).sum())))
    assert npix[0][1] <= npix[1][1] <= npix[2][1] and npix[0][1] < npix[2][1]
    assert npix[0][0] >= npix[1][0] >= npix[2][0]


def test_training_validation_skips_galaxies_with_an_empty_truth(monkeypatch):
    """The recipe's validation scores galaxies as the benchmark does: a companion whose truth mask is empty does
    not count, so predicting nothing for faint companions is not rewarded with IoU 1."""
    from deepmosaic.models.train import DeblendRecipe
    truth = np.zeros((2, 2, 8, 8), np.float32)
    truth[:, 0, 2:6, 2:6] = 1                     # two centrals, 16 px each
    truth[0, 1, 0:2, 0:2] = 1                     # one companion with a mask, one without
    pred = truth > 0.5
    pred[0, 1] = False                            # the network misses the real companion
    monkeypatch.setattr(DeblendRecipe, "inputs_targets", lambda self, b: (None, None))
    monkeypatch.setattr(DeblendRecipe, "predict", classmethod(lambda cls, m, x, n_samples=0: (pred, None, None)))
    out = DeblendRecipe(None).evaluate(None, {"masks": truth})
    assert out["central_iou"] == 1.0
    assert out["companion_iou"] == 0.0            # not (0 + 1) / 2: the empty companion is not scored
    assert out["mean_iou"] == 0.5


def _clump_output(shape, centres, radius=2.0):
    """A clumps stage output (window px) whose probability map is 1 within ``radius`` of each centre."""
    from deepmosaic.tasks.base import TaskOutput
    yy, xx = np.indices(shape)
    prob = np.zeros(shape, np.float32)
    for y, x in centres:
        prob[np.hypot(yy - y, xx - x) <= radius] = 1.0
    return TaskOutput(maps={"probability": prob}, catalog={})


def test_clumps_at_reads_the_3x3_maximum():
    from deepmosaic.tasks.deblend_task import clumps_at
    prob = np.zeros((20, 20), np.float32)
    prob[5, 5] = 0.9
    prob[0, 19] = 0.6
    got = clumps_at(prob, np.array([[6.0, 6.0], [7.4, 7.0], [0.2, 18.6], [19.0, 0.0]]), 0.5)
    assert got.tolist() == [True, False, True, False]
    assert clumps_at(prob, np.zeros((0, 2)), 0.5).shape == (0,)


def test_a_clumps_secondary_peak_is_no_blend_member():
    """A second peak inside one sep footprint (the stage's peak finder makes it a member): where the clumps
    stage's probability map calls it a clump, it is no member and the footprint passes through whole; without
    clump probability there it is deblended as before (the map here is a stand-in: 1 near the given centres)."""
    objs = [(48.0, 44.0, 5000.0, 3.0, 0.8, 20.0), (48.0, 52.0, 2500.0, 2.5, 0.7, 100.0)]   # 2 PSF FWHM apart
    _, image = galaxies((96, 96), objs, seed=1)
    ti = tile_of(image)
    ti.upstream["sep"] = SepTask().run(ti)
    assert len(ti.upstream["sep"].catalog["x"]) == 1, "sep must leave this pair as one object"
    seg_sep = ti.upstream["sep"].maps["segmentation"]
    clumps_task = get_task_class("clumps")({})
    halo_before = clumps_task.halo
    task = DeblendTask({"device": "cpu"})
    task.bind([clumps_task])
    assert task.requires == ("sep", "clumps") and task.fingerprint()["clumps_from"] == "clumps"
    assert clumps_task.margin >= task.halo and clumps_task.halo > halo_before   # its map covers our window
    # the companion's peak called a clump: one object, sep's footprint unchanged
    ti.upstream["clumps"] = _clump_output(image.shape, [(48.0, 52.0)])
    out = task.run(ti)
    assert len(out.catalog["x"]) == 1 and np.array_equal(out.maps["segmentation"], seg_sep)
    # no clump there: the pair is deblended as before
    ti.upstream["clumps"] = _clump_output(image.shape, [(10.0, 80.0)])
    out = task.run(ti)
    seg = out.maps["segmentation"]
    assert len(out.catalog["x"]) == 2 and sorted(label_at(seg, y, x) for y, x, *_ in objs) == [1, 2]
    # 'keep' tests nothing: the clump's peak is a member again
    keep = DeblendTask({"device": "cpu", "clump_peaks": "keep"})
    keep.bind([clumps_task])
    assert keep.requires == ("sep",) and keep.fingerprint()["clumps_from"] is None
    ti.upstream["clumps"] = _clump_output(image.shape, [(48.0, 52.0)])
    assert len(keep.run(ti).catalog["x"]) == 2
    with pytest.raises(ConfigError, match="clump_peaks"):
        DeblendTask({"clump_peaks": "merge"})
    with pytest.raises(ConfigError, match="clump_probability"):
        DeblendTask({"clump_probability": 0})


def test_build_tasks_binds_deblend_to_an_earlier_clumps_stage():
    from deepmosaic.workflows.api import build_tasks
    sep, clumps, deblend = build_tasks(["sep", "clumps", "deblend"], {})
    assert "clumps" in deblend.requires and clumps.margin >= deblend.halo
    _, deblend_alone = build_tasks(["sep", "deblend"], {})
    assert deblend_alone.requires == ("sep",)
    _, deblend_first, clumps_after = build_tasks(["sep", "deblend", "clumps"], {})
    assert deblend_first.requires == ("sep",) and clumps_after.margin == clumps_after.config.margin
