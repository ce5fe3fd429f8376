"""The clump stages' contract: maps and catalog schema, empty and masked tiles, planted clumps through the
tiled pipeline (found once across a seam, linked to their host's sep id), and the classical baseline."""
import pickle

import numpy as np
import pytest
import torch
from astropy.io import fits

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import make_psf, render_profile
from deepmosaic.tasks import get_task_class
from deepmosaic.tasks.base import TileInput
from deepmosaic.tasks.clumps_task import CLUMP_COLUMNS, ClumpsSepTask, ClumpsTask, parents_of
from deepmosaic.tasks.sep_task import SepTask
from deepmosaic.workflows import run

torch.set_num_threads(1)

SIGMA, SKY, FWHM = 5.0, 100.0, 3.5          # noise (counts), sky level, PSF FWHM (px; 0.7" at 0.2"/px)
GALAXY = (127.5, 110.0)                      # (x, y): the disk straddles the x = 127.5 seam of a 128 px grid
OFFSETS = ((-8.0, 4.0), (7.0, -5.0), (0.1, 9.0))  # clumps inside the disk; the last one sits on the seam
ISOLATED = (60.0, 210.0)                     # a point source far from any galaxy
CLUMP_SNR = 40.0                             # flux / (sigma sqrt(A_eff)), the training set's S/N definition


def _psf_area(psf):
    p = render_profile(1.0, 20.0, 20.0, psf=psf, kind="star", shape=(41, 41), origin=(0, 0)).array
    p = p / p.sum()
    return 1.0 / np.sum(p * p)


def render_scene(size=256, seed=0):
    """An exponential disk (hlr 8 px, q 0.7, S/N ~340) with 3 point-source clumps, one isolated point source."""
    psf = make_psf(FWHM, 3.0)
    model = np.zeros((size, size))
    render_profile(4e4, *GALAXY, psf=psf, kind="galaxy", hlr=8.0, sersic_n=1.0, q=0.7, angle=30.0).add_to(model)
    flux = CLUMP_SNR * SIGMA * np.sqrt(_psf_area(psf))
    clumps = np.array([(GALAXY[0] + dx, GALAXY[1] + dy) for dx, dy in OFFSETS])
    for x, y in [*clumps, ISOLATED]:
        render_profile(flux, x, y, psf=psf, kind="star").add_to(model)
    noise = np.random.default_rng(seed).normal(0.0, SIGMA, model.shape)
    return (model + SKY + noise).astype(np.float32), clumps


def tile_input(image, mask=None):
    shape = image.shape
    return TileInput(image=image, background=np.full(shape, SKY, np.float32), rms=np.full(shape, SIGMA, np.float32),
                     global_rms=SIGMA, mask=np.zeros(shape, bool) if mask is None else mask, variance=None,
                     origin=(0, 0), core=(slice(0, shape[0]), slice(0, shape[1])))


@pytest.fixture(scope="module")
def scene():
    return render_scene()


@pytest.fixture(scope="module")
def scene_run(scene, tmp_path_factory):
    """sep + clumps + clumps_sep over the scene in 128 px tiles. sep.minarea=100 keeps sep to extended objects
    (the disk, 1000 px), so the isolated point source (~50 px) lies on sep's sky: its host must be -1."""
    d = tmp_path_factory.mktemp("clumps")
    fits.writeto(d / "scene.fits", scene[0])
    out = d / "scene.zarr"
    res = run(str(d / "scene.fits"), str(out), stages="sep,clumps,clumps_sep", tile=128, workers=0,
              set=["sep.minarea=100"])
    assert not res.failures
    return {"store": str(out), "result": res, "image": scene[0], "clumps": scene[1]}


def _check_schema(cat, extra=()):
    for k, c in CLUMP_COLUMNS.items():
        assert k in cat, k
        assert np.asarray(cat[k]).dtype == np.dtype(c.dtype), (k, np.asarray(cat[k]).dtype)
    assert len({len(v) for v in cat.values()}) == 1


# ----------------------------------------------------------------------------------------------- contract

def test_registered_and_declared():
    assert get_task_class("clumps") is ClumpsTask
    assert get_task_class("clumps_sep") is ClumpsSepTask
    t = ClumpsTask()
    assert t.requires == ("sep",) and t.resources == {"GPU": 1}
    assert t.links == {"host_id": ("sep", "segmentation")}
    from deepmosaic.models.weights_io import load_model, shipped
    net = load_model(shipped("clumps"))
    # the network's aligned halo plus the margin (rounded to the stride) around the computed core region
    assert t.halo == net.aligned_halo() + 8
    assert ClumpsTask({"margin": 9}).halo == net.aligned_halo() + 16
    with pytest.raises(ConfigError):
        ClumpsTask({"threshold": 1.5})
    with pytest.raises(ConfigError):
        ClumpsTask({"device": "tpu"})
    with pytest.raises(ConfigError):
        ClumpsSepTask({"deblend_nthresh": 100})


def test_window_contract(scene):
    image, clumps = scene
    ti = tile_input(image)
    ti.upstream["sep"] = SepTask({"minarea": 100}).run(ti)
    task = ClumpsTask()
    out = task.run(ti)
    prob, seg = out.maps["probability"], out.maps["segmentation"]
    assert prob.shape == seg.shape == image.shape
    assert prob.dtype == np.float32 and seg.dtype == np.int64
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    cat = out.catalog
    _check_schema(cat)
    n = len(cat["x"])
    assert n >= 3                     # the three planted clumps (the star on the sky may be rejected)
    # labels are catalog row + 1, footprints hold the centroid pixel, npix counts them
    assert set(np.unique(seg)) == set(range(n + 1))
    for k in range(n):
        iy, ix = int(np.floor(cat["y"][k] + 0.5)), int(np.floor(cat["x"][k] + 0.5))
        assert seg[iy, ix] == k + 1
        assert cat["npix"][k] == (seg == k + 1).sum()
        assert prob[seg == k + 1].min() > task.config.threshold
    assert np.all((cat["probability"] > 0.5) & (cat["probability"] <= 1))
    # host_id is a sep row inside the task: the sep footprint at the centroid pixel
    sep_seg = ti.upstream["sep"].maps["segmentation"]
    for k in range(n):
        iy, ix = int(np.floor(cat["y"][k] + 0.5)), int(np.floor(cat["x"][k] + 0.5))
        assert cat["host_id"][k] == sep_seg[iy, ix] - 1
    # the task is picklable and carries no torch state after running
    t2 = pickle.loads(pickle.dumps(task))
    assert not any(type(v).__module__.startswith("torch") for v in vars(t2).values())


def test_patching_is_seamless(scene):
    """Small patches, a batch that does not divide them, and an odd window origin give the same map."""
    x = ClumpsTask.normalise(tile_input(scene[0][70:170, 75:190].copy()))
    ref = ClumpsTask().probability(x, (70, 75))
    small = ClumpsTask({"patch": 40, "batch_size": 3}).probability(x, (70, 75))
    assert np.abs(small - ref).max() < 1e-4
    flip = ClumpsTask({"flip_average": True, "patch": 128}).probability(x, (70, 75))
    assert flip.shape == x.shape and 0 <= flip.min() and flip.max() <= 1


def test_noise_only_gives_empty_schema_valid_catalog():
    rng = np.random.default_rng(4)
    image = (SKY + rng.normal(0, SIGMA, (160, 160))).astype(np.float32)
    ti = tile_input(image)
    ti.upstream["sep"] = SepTask().run(ti)
    for task in (ClumpsTask(), ClumpsSepTask()):
        out = task.run(ti)
        _check_schema(out.catalog)
        assert len(out.catalog["x"]) == 0, task.name
        assert not out.maps["segmentation"].any()
        assert all(m.shape == image.shape for m in out.maps.values())


def test_fully_masked_tile_is_no_work(tmp_path):
    # the left tile's whole window (core 128 + halo 64) is NaN: "no work"; the other tiles are noise only
    rng = np.random.default_rng(5)
    image = (SKY + rng.normal(0, SIGMA, (128, 512))).astype(np.float32)
    image[:, :192] = np.nan
    fits.writeto(tmp_path / "masked.fits", image)
    out = str(tmp_path / "masked.zarr")
    res = run(str(tmp_path / "masked.fits"), out, stages="sep,clumps,clumps_sep", tile=128, workers=0)
    assert not res.failures
    status = st.get_status(out)
    assert status[0, 0] == st.STATUS_NO_WORK and (status[0, 1:] == st.STATUS_DONE).all()
    for stage in ("clumps", "clumps_sep"):
        cat = st.read_catalog(out, stage)
        assert len(cat["id"]) == 0
        _check_schema(cat)
    # a task handed a fully masked window returns the empty schema itself, without loading the network
    ti = tile_input(np.zeros((64, 64), np.float32), mask=np.ones((64, 64), bool))
    out = ClumpsTask().run(ti)
    assert len(out.catalog["x"]) == 0 and out.maps["probability"].dtype == np.float32


# ------------------------------------------------------------------------------------------ planted scene

def test_planted_clumps_found_once_and_linked_to_host(scene_run):
    store = scene_run["store"]
    cat = st.read_catalog(store, "clumps")
    sep_cat = st.read_catalog(store, "sep")
    galaxy = np.argmin(np.hypot(sep_cat["x"] - GALAXY[0], sep_cat["y"] - GALAXY[1]))
    assert np.hypot(sep_cat["x"][galaxy] - GALAXY[0], sep_cat["y"][galaxy] - GALAXY[1]) < 1.0
    galaxy_id = sep_cat["id"][galaxy]
    assert len(np.unique(cat["id"])) == len(cat["id"])
    for x, y in scene_run["clumps"]:
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert (d < 1.5).sum() == 1, f"clump at ({x}, {y}): {(d < 1.5).sum()} detections within 1.5 px"
        k = int(np.argmin(d))
        assert cat["host_id"][k] == galaxy_id
    # a point source on the sky is a star to the network trained with star decoys (not a clump): at most one
    # detection there, and never linked to a host
    d = np.hypot(cat["x"] - ISOLATED[0], cat["y"] - ISOLATED[1])
    assert (d < 1.5).sum() <= 1
    assert np.all(cat["host_id"][d < 1.5] == -1)
    # every host_id is a sep id or -1
    assert np.isin(cat["host_id"], np.append(sep_cat["id"], -1)).all()


def test_seam_clump_stitched_and_map_seamless(scene_run):
    store = scene_run["store"]
    cat = st.read_catalog(store, "clumps")
    seg = np.asarray(st.open_store(store)["maps/clumps/segmentation"][:])
    prob = np.asarray(st.open_store(store)["maps/clumps/probability"][:])
    # the seam clump's footprint spans both tiles and carries its one id on both sides
    x, y = scene_run["clumps"][2]
    k = int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y)))
    fp = seg == cat["id"][k]
    assert fp[:, :128].any() and fp[:, 128:].any()
    assert set(np.unique(seg[int(y) - 1:int(y) + 2, 126:130])) == {cat["id"][k]}
    assert (seg >= 0).all() and set(np.unique(seg[seg > 0])) == set(cat["id"])
    # the tiled probability map equals one untiled pass over the whole mosaic
    bg = st.read_background(store)
    back, rms = bg.evaluate((0, 256, 0, 256))
    image = scene_run["image"]
    ti = TileInput(image=image, background=back, rms=rms, global_rms=bg.global_rms, mask=np.zeros(image.shape, bool),
                   variance=None, origin=(0, 0), core=(slice(0, 256), slice(0, 256)))
    whole = ClumpsTask().probability(ClumpsTask.normalise(ti), (0, 0))
    assert np.abs(whole - prob).max() < 1e-4


def test_clumps_sep_same_columns(scene_run):
    store = scene_run["store"]
    a, b = st.read_catalog(store, "clumps"), st.read_catalog(store, "clumps_sep")
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype for k in a)
    _check_schema(b)
    assert np.isnan(b["probability"]).all()
    sep_ids = st.read_catalog(store, "sep")["id"]
    assert np.isin(b["host_id"], np.append(sep_ids, -1)).all()


def test_parents_of_majority():
    child = np.array([[1, 1, 2, 0], [1, 3, 2, 0]])
    parent = np.array([[5, 5, 5, 0], [4, 7, 5, 0]])
    assert parents_of(child, parent, 3).tolist() == [5, 5, 7]


def test_a_stage_without_the_stage_it_needs_is_refused_before_running(tmp_path):
    from deepmosaic.workflows import run
    img = tmp_path / "noise.fits"
    fits.writeto(img, np.random.default_rng(0).normal(0, 1, (64, 64)).astype("f4"))
    with pytest.raises(ConfigError, match="needs sep before it"):
        run(str(img), tmp_path / "o.zarr", stages="clumps", tile=128, workers=0)
    assert not (tmp_path / "o.zarr").exists()


def test_a_network_with_a_stem_runs_seamlessly_in_the_stage(scene, tmp_path):
    """Weights with a stem (stem='add_highpass', as `train.init` makes them from stem='none' ones) load and run
    in the stage, whose halo includes the stem's reach, and small patches give the same map as one pass. (The
    exactness of that halo is checked on the network in test_models, in float64: a random network's outermost
    receptive-field pixels are too weak to show here.)"""
    from deepmosaic.models.registry import build
    from deepmosaic.models.weights_io import save_model
    torch.manual_seed(0)
    net = build("unet", in_channels=1, out_channels=1, depth=2, base_channels=4, stem="add_highpass",
                stem_radius=6).eval()
    base = tmp_path / "stem_clumps"
    save_model(net, base, {"training_set": {"kind": "clumps"}}, dtype="float32")
    task = ClumpsTask({"weights": str(base)})
    assert task.halo >= net.halo() + 8
    assert net.halo() == 23 + 6            # depth 2: 23 px; the box reaches 6 px more
    x = ClumpsTask.normalise(tile_input(scene[0][70:170, 75:190].copy()))
    ref = task.probability(x, (70, 75))
    small = ClumpsTask({"weights": str(base), "patch": 24, "batch_size": 3}).probability(x, (70, 75))
    assert np.abs(small - ref).max() < 1e-5


def test_a_raised_margin_gives_the_untiled_map_over_the_whole_margin():
    """need_margin (the deblend stage's clump test) widens the computed region: a tile's window then holds
    the same probabilities as the untiled map over its core plus that margin, so two tiles that see one
    blend read the same clump probabilities; with the default margin the map stops near the core."""
    image, _ = render_scene(size=352)
    whole = ClumpsTask().run(tile_input(image)).maps["probability"]
    task = ClumpsTask()
    task.need_margin(64)
    assert task.margin == 64 and task.halo == task.network_info()["halo"] + 64
    y0 = x0 = 16                                  # window [16, 336) around the core [128, 224), all inside
    core, h = 96, task.halo
    win = image[y0:y0 + core + 2 * h, x0:x0 + core + 2 * h]
    assert win.shape == (core + 2 * h,) * 2
    ti = tile_input(win.copy())
    ti.origin, ti.core = (y0, x0), (slice(h, h + core), slice(h, h + core))
    prob = task.run(ti).maps["probability"]
    lo, hi = h - 64, h + core + 64                  # core +- 64 in window px
    ref = whole[y0 + lo:y0 + hi, x0 + lo:x0 + hi]
    assert ref.max() > 0.5                          # the disk's clumps are in this region
    assert np.abs(prob[lo:hi, lo:hi] - ref).max() < 1e-4
    default = ClumpsTask()
    ti.core = (slice(h, h + core), slice(h, h + core))
    narrow = default.run(ti).maps["probability"]
    assert not np.allclose(narrow[lo:hi, lo:hi], ref, atol=1e-4)
