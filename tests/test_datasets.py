"""Simulated training sets (deepmosaic.models.datasets): determinism, splits, shapes, and truth that lines up
with the rendered light. Small batches, one process; the whole module runs in well under a minute."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepmosaic.models import datasets as ds
from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.simulate import make_psf, render_profile

KINDS = ("clumps", "blends", "fields")
N = {"clumps": 12, "blends": 10, "fields": 6}


@pytest.fixture(scope="module")
def batches():
    return {k: ds.make_batch(k, seed=7, n=N[k]) for k in KINDS}


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------
# Seeds, splits, API
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_prefix_and_start(kind, batches):
    n = 3
    a = ds.make_batch(kind, seed=7, n=n)
    _equal(a, {k: v[:n] for k, v in batches[kind].items()})       # stamp i is the same in any batch
    b = ds.make_batch(kind, seed=7, n=2, start=1)
    _equal(b, {k: v[1:3] for k, v in a.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_and_splits_give_different_draws(kind, batches):
    base = batches[kind]["image"][:2]
    other_seed = ds.make_batch(kind, seed=8, n=2)["image"]
    val = ds.make_batch(kind, seed=7, n=2, split="val")["image"]
    test = ds.make_batch(kind, seed=7, n=2, split="test")["image"]
    imgs = [base, other_seed, val, test]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not np.allclose(imgs[i], imgs[j])
    # the parameter streams differ too, not only the noise
    s_train = ds.render_scene(kind, seed=7, index=0, split="train")
    s_val = ds.render_scene(kind, seed=7, index=0, split="val")
    assert s_train["psf_fwhm"] != s_val["psf_fwhm"]


def test_streams_are_disjoint_across_splits_and_kinds():
    draws = {}
    for kind in KINDS:
        for split in ds.SPLITS:
            for i in range(3):
                p, q = ds.stamp_streams(kind, 5, i, split)
                draws[(kind, split, i, "p")] = p.random(4)
                draws[(kind, split, i, "n")] = q.random(4)
    vals = np.concatenate(list(draws.values()))
    assert np.unique(vals).size == vals.size


def test_training_sets_table_and_configs():
    assert set(ds.TRAINING_SETS) == set(KINDS) | {"morphology"}  # morphology: models/morph_data.py
    for kind, (cls, gen) in ds.TRAINING_SETS.items():
        cfg = cls().validate()
        assert cfg.pixel_scale == 0.2
        out = gen(cfg, 1, 1)
        assert out["image"].shape == (1, 1, cfg.size, cfg.size)
        for f in cls.__dataclass_fields__.values():
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
    with pytest.raises(ConfigError, match="clump_snr_range"):
        ds.ClumpSetConfig(clump_snr_range=(10.0, 3.0)).validate()
    with pytest.raises(ConfigError, match="min_clump_separation"):
        ds.ClumpSetConfig(mask_radius=4.0).validate()
    with pytest.raises(ConfigError, match="separation_sampling"):
        ds.BlendSetConfig(separation_sampling="cubic").validate()
    with pytest.raises(ConfigError, match="ignore_snr"):
        ds.FieldSetConfig(ignore_snr=5.0).validate()
    with pytest.raises(ConfigError, match="mask_radiu"):
        from_mapping(ds.ClumpSetConfig, {"mask_radiu": 2.0})
    with pytest.raises(ValueError, match="split"):
        ds.make_batch("clumps", n=1, split="holdout")
    with pytest.raises(ValueError, match="kind"):
        ds.make_batch("stars", n=1)
    # dict configs are validated and coerced like YAML
    out = ds.make_batch("clumps", {"size": "48", "max_clumps": 3}, seed=0, n=2)
    assert out["image"].shape == (2, 1, 48, 48) and out["positions"].shape == (2, 3, 2)


@pytest.mark.parametrize("kind,expect", [
    ("clumps", {"image": (1, 64, 64), "mask": (1, 64, 64), "model": (1, 64, 64), "positions": (7, 2),
                "clump_snr": (7,), "clump_flux": (7,), "count": (), "valid": (7,)}),
    ("blends", {"image": (1, 96, 96), "masks": (2, 96, 96), "visible": (2, 96, 96), "isolated": (2, 96, 96),
                "peaks": (2, 2), "flux": (2,), "snr": (2,), "separation": (), "separation_fwhm": ()}),
    ("fields", {"image": (1, 96, 96), "heatmap": (2, 96, 96), "ignore": (1, 96, 96), "size": (2, 96, 96),
                "offset": (2, 96, 96), "reg_mask": (1, 96, 96), "segmap": (1, 96, 96), "boxes": (160, 4),
                "cls": (160,), "snr": (160,), "count": (), "valid": (160,)}),
])
def test_shapes_and_dtypes(kind, expect, batches):
    b = batches[kind]
    n = N[kind]
    for key, shape in expect.items():
        assert b[key].shape == (n, *shape), key
    for key in ("image", "mask", "masks", "visible", "isolated", "heatmap", "ignore", "size", "offset",
                "reg_mask", "model"):
        if key in b:
            assert b[key].dtype == np.float32, key
            assert np.all(np.isfinite(b[key])), key
    if "count" in b:
        assert b["count"].dtype == np.int64
    # images are light / sigma + unit-variance noise
    noise = b["image"] - (b["isolated"].sum(1, keepdims=True) if kind == "blends" else b["model"])
    assert abs(float(noise.std()) - 1.0) < 0.02
    assert abs(float(noise.mean())) < 0.02


# ---------------------------------------------------------------------------------------------------
# Clumps
# ---------------------------------------------------------------------------------------------------

def test_clump_masks_are_discs_on_the_planted_positions(batches):
    b = batches["clumps"]
    cfg = ds.ClumpSetConfig()
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s]
    assert b["count"].max() > 0 and b["count"].min() <= b["count"].max()
    for i in range(N["clumps"]):
        k = int(b["count"][i])
        assert b["valid"][i].sum() == k and np.all(np.isnan(b["positions"][i, k:]))
        pos = b["positions"][i, :k].astype(float)
        m = b["mask"][i, 0]
        np.testing.assert_array_equal(m, ds.disc_mask(s, pos, cfg.mask_radius))
        if k == 0:
            assert m.sum() == 0
        for y, x in pos:
            d2 = (yy - y) ** 2 + (xx - x) ** 2
            disc = d2 <= cfg.mask_radius ** 2
            assert np.all(m[disc] == 1)
            near = d2 <= (cfg.mask_radius + 1.0) ** 2
            assert np.all(m[near & ~disc] == 0)            # discs stay apart (min separation)
            w = m * disc
            cy, cx = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
            assert math.hypot(cy - y, cx - x) < 0.35
        # clump S/N definition: flux / (sigma sqrt(A_eff)), sigma = 1 in image units
        np.testing.assert_allclose(b["clump_snr"][i, :k], b["clump_flux"][i, :k] / np.sqrt(b["psf_area"][i]),
                                   rtol=1e-5)
        assert np.all((b["clump_snr"][i, :k] >= 3.0) & (b["clump_snr"][i, :k] <= 100.0))


def test_clump_light_matches_requested_flux_and_positions():
    cfg = ds.ClumpSetConfig()
    checked = 0
    for idx in range(12):
        sc = ds.render_scene("clumps", cfg, seed=7, index=idx)
        np.testing.assert_allclose(sc["model"], sc["galaxy"] + sc["clumps"], atol=1e-4)
        if sc["positions"].shape[0] == 0:
            assert np.all(sc["clumps"] == 0)
            continue
        # all clumps together, and each one rendered alone without noise
        np.testing.assert_allclose(sc["clumps"].sum(), sc["clump_flux"].sum(), rtol=0.01)
        for (y, x), f in zip(sc["positions"], sc["clump_flux"]):
            one = ds.render_point_sources(cfg.size, [(y, x)], [f], sc["psf_fwhm"], sc["psf_beta"])
            np.testing.assert_allclose(one.sum(), f, rtol=0.01)
            iy, ix = np.unravel_index(np.argmax(one), one.shape)
            assert abs(iy - y) <= 0.5 + 1e-9 and abs(ix - x) <= 0.5 + 1e-9     # peak in the clump's pixel
            # the same point source drawn by the mosaic simulator with an independently built PSF
            ref = render_profile(f, x, y, psf=make_psf(sc["psf_fwhm"], sc["psf_beta"]), kind="star",
                                 shape=(cfg.size, cfg.size), origin=(0, 0)).array
            np.testing.assert_allclose(one, ref, atol=1e-6 * f)
            checked += 1
        # galaxy S/N is the matched-filter S/N of the host alone
        np.testing.assert_allclose(math.sqrt(float(np.sum(sc["galaxy"].astype(float) ** 2))), sc["galaxy_snr"],
                                   rtol=1e-4)
    assert checked >= 5


def test_clump_nucleus_decoys_are_present_but_not_in_the_mask():
    b = ds.make_batch("clumps", ds.ClumpSetConfig(nucleus_fraction=1.0, max_clumps=0), seed=3, n=3)
    assert b["has_nucleus"].all() and b["mask"].sum() == 0 and b["positions"].shape == (3, 0, 2)
    b0 = ds.make_batch("clumps", ds.ClumpSetConfig(nucleus_fraction=0.0, max_clumps=0), seed=3, n=3)
    assert not b0["has_nucleus"].any()
    # same host (same stream layout), a nucleus makes the centre more peaked
    c = np.round(b["galaxy_center"]).astype(int)
    for i in range(3):
        m1, m0 = b["model"][i, 0], b0["model"][i, 0]
        assert m1[c[i, 0], c[i, 1]] / m1.sum() > m0[c[i, 0], c[i, 1]] / m0.sum()


# ---------------------------------------------------------------------------------------------------
# Blends
# ---------------------------------------------------------------------------------------------------

def test_blend_masks_follow_the_one_sigma_largest_light_rule(batches):
    b = batches["blends"]
    for i in range(N["blends"]):
        iso = b["isolated"][i]
        masks = b["masks"][i].astype(bool)
        vis = b["visible"][i].astype(bool)
        np.testing.assert_array_equal(vis, iso > 1.0)
        assert not np.any(masks[0] & masks[1])                       # disjoint
        for k in (0, 1):
            o = 1 - k
            assert np.all(iso[k][masks[k]] > 1.0)                    # own light above 1 sigma ...
            assert np.all(iso[k][masks[k]] >= iso[o][masks[k]])      # ... and the largest there
            assert np.all(masks[k] <= vis[k])
            # every pixel where k is visible and brighter than the other is k's
            assert np.all(masks[k][vis[k] & (iso[k] > iso[o])])
        np.testing.assert_array_equal(masks[0] | masks[1], vis[0] | vis[1])     # the masks cover all light
        np.testing.assert_allclose(b["snr"][i], np.sqrt((iso.astype(float) ** 2).sum((1, 2))), rtol=1e-4)


def test_blend_geometry_and_fluxes(batches):
    b = batches["blends"]
    cfg = ds.BlendSetConfig()
    c = (cfg.size - 1) / 2
    assert np.all(np.abs(b["peaks"][:, 0] - c) <= cfg.center_jitter + 1e-5)
    d = np.hypot(*(b["peaks"][:, 1] - b["peaks"][:, 0]).T)
    np.testing.assert_allclose(d, b["separation"], rtol=1e-4)
    np.testing.assert_allclose(b["separation_fwhm"] * b["psf_fwhm"], b["separation"], rtol=1e-4)
    assert np.all((b["separation_fwhm"] >= 0.5) & (b["separation_fwhm"] <= 6.0))
    dmag = -2.5 * np.log10(b["flux"][:, 1] / b["flux"][:, 0])
    np.testing.assert_allclose(dmag, b["delta_mag"], atol=1e-4)
    # flux in the stamp never exceeds the total; compact galaxies are wholly inside
    inside = b["isolated"].sum((2, 3)) / b["flux"]
    assert np.all(inside < 1.001) and np.all(inside[b["hlr"] < 4.0] > 0.99)
    # each isolated image peaks near its own centre
    for i in range(N["blends"]):
        for k in (0, 1):
            iy, ix = np.unravel_index(np.argmax(b["isolated"][i, k]), (cfg.size, cfg.size))
            assert math.hypot(iy - b["peaks"][i, k, 0], ix - b["peaks"][i, k, 1]) < 1.5


def test_blend_isolated_images_match_an_independent_rendering():
    cfg = ds.BlendSetConfig()
    for idx in range(3):
        sc = ds.render_scene("blends", cfg, seed=11, index=idx)
        psf = make_psf(sc["psf_fwhm"], sc["psf_beta"])
        for k in (0, 1):
            y, x = sc["peaks"][k]
            ref = render_profile(sc["flux"][k], x, y, psf=psf, kind="galaxy", shape=(cfg.size, cfg.size),
                                 origin=(0, 0), **sc["shapes"][k]).array
            np.testing.assert_allclose(sc["isolated"][k], ref, atol=1e-4 * ref.max() + 1e-5)


def test_blend_separation_sampling_is_dense_at_small_separations():
    seps = {}
    for mode in ("log", "sqrt", "linear"):
        rng = np.random.default_rng(0)
        cfg = ds.BlendSetConfig(separation_sampling=mode)
        seps[mode] = np.median([ds._draw_separation(rng, cfg) for _ in range(2000)])
    assert seps["log"] < seps["sqrt"] < seps["linear"]
    assert seps["log"] < 2.0


# ---------------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------------

def _check_field_targets(b, cfg: ds.FieldSetConfig) -> int:
    """Every S/N >= detect_snr object has a heatmap peak of 1 at its centre pixel with its box, offset and
    reg_mask there; faint ones are ignored; boxes contain the object's truth footprint. Returns #objects."""
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s]
    n_checked = 0
    for i in range(b["image"].shape[0]):
        k = int(b["count"][i])
        assert b["valid"][i].sum() == k and np.all(b["cls"][i, k:] == -1)
        boxes, snr, cls = b["boxes"][i, :k].astype(float), b["snr"][i, :k], b["cls"][i, :k]
        pos = snr >= cfg.detect_snr
        faint = (snr >= cfg.ignore_snr) & ~pos
        ix = np.floor(boxes[:, 0] + 0.5).astype(int)
        iy = np.floor(boxes[:, 1] + 0.5).astype(int)
        assert np.all((ix >= 0) & (ix < s) & (iy >= 0) & (iy < s))
        hm, reg = b["heatmap"][i], b["reg_mask"][i, 0]
        assert int(reg.sum()) == len({(a, c) for a, c in zip(iy[pos], ix[pos])})
        assert int((hm == 1.0).sum()) == len({(c, a, d) for c, a, d in zip(cls[pos], iy[pos], ix[pos])})
        for j in np.flatnonzero(pos):
            assert hm[cls[j], iy[j], ix[j]] == 1.0
            assert reg[iy[j], ix[j]] == 1.0
            assert b["ignore"][i, 0, iy[j], ix[j]] == 0.0
            np.testing.assert_array_less(np.abs(b["offset"][i, :, iy[j], ix[j]]), 0.5 + 1e-6)
            # the brightest object at a shared centre pixel owns the regression targets
            same = np.flatnonzero(pos & (iy == iy[j]) & (ix == ix[j]))
            top = same[np.argmax(snr[same])]
            if j == top:
                np.testing.assert_allclose(b["size"][i, :, iy[j], ix[j]], boxes[j, 2:], rtol=1e-6)
                np.testing.assert_allclose(b["offset"][i, :, iy[j], ix[j]],
                                           (boxes[j, 1] - iy[j], boxes[j, 0] - ix[j]), atol=1e-5)
        for j in np.flatnonzero(faint):
            if not reg[iy[j], ix[j]]:
                assert b["ignore"][i, 0, iy[j], ix[j]] == 1.0
        # no heatmap mass where no detectable object is near
        if pos.any():
            dmin = np.min((yy[None] - iy[pos, None, None]) ** 2 + (xx[None] - ix[pos, None, None]) ** 2, axis=0)
            assert np.all(hm.max(0)[dmin > 25] < 1e-3)
        else:
            assert hm.max() == 0.0
        # boxes hold the truth footprint; footprints sit where the light is above 1 sigma
        seg = b["segmap"][i, 0]
        assert np.all(b["model"][i, 0][seg != 0] > 1.0 - 1e-3)
        for j in range(k):
            fy, fx = np.nonzero(seg == j + 1)
            if fy.size == 0:
                continue
            xc, yc, w, h = boxes[j]
            assert np.all(np.abs(fx - xc) + 0.5 <= w / 2 + 1e-4), (i, j)
            assert np.all(np.abs(fy - yc) + 0.5 <= h / 2 + 1e-4), (i, j)
            n_checked += 1
    return n_checked


def test_field_targets_and_boxes(batches):
    b = batches["fields"]
    cfg = ds.FieldSetConfig()
    assert _check_field_targets(b, cfg) > 20
    assert (b["snr"] >= 4).sum() > 10 and ((b["snr"] >= 1.5) & (b["snr"] < 4)).sum() > 5
    assert set(np.unique(b["cls"])) <= {-1, 0, 1} and (b["cls"] == 0).any() and (b["cls"] == 1).any()
    t = ds.centernet_targets(b)
    assert set(t) == {"heatmap", "size", "offset", "mask", "weight"}
    np.testing.assert_array_equal(t["weight"], 1 - b["ignore"])


def test_field_snr_and_box_of_a_lone_star():
    """A star's catalog S/N and box agree with a direct rendering of it alone."""
    cfg = ds.FieldSetConfig()
    for idx in range(6):
        sc = ds.render_scene("fields", cfg, seed=7, index=idx)
        stars = np.flatnonzero(sc["cls"] == 0)
        if stars.size:
            break
    j = stars[0]
    y, x = sc["yx"][j]
    st = render_profile(sc["flux"][j], x, y, psf=make_psf(sc["psf_fwhm"], sc["psf_beta"]), kind="star")
    assert math.isclose(math.sqrt(float((st.array ** 2).sum())), sc["snr"][j], rel_tol=1e-4)
    vy, vx = np.nonzero(st.array > 1.0)
    if vy.size:
        assert np.all(np.abs(vx + st.x0 - x) + 0.5 <= sc["wh"][j, 0] / 2 + 1e-6)
        assert np.all(np.abs(vy + st.y0 - y) + 0.5 <= sc["wh"][j, 1] / 2 + 1e-6)


# ---------------------------------------------------------------------------------------------------
# Pool, augmentation, files, torch
# ---------------------------------------------------------------------------------------------------

def test_dihedral_positions_follow_the_pixels():
    s = 9
    rng = np.random.default_rng(0)
    for t in range(8):
        y, x = rng.integers(0, s, 2)
        a = np.zeros((s, s))
        a[y, x] = 1
        ty, tx = ds.dihedral_yx(np.array([y, x], float), t, s)
        assert ds.dihedral_array(a, t)[int(ty), int(tx)] == 1


def test_pool_batches_are_deterministic_and_consistent():
    pool = ds.StampPool("clumps", seed=7, size=6)
    a, b = pool.batch(16, step=3), pool.batch(16, step=3)
    _equal(a, b)
    assert not np.allclose(a["image"], pool.batch(16, step=4)["image"])
    # pool scene i is make_batch stamp i (before augmentation)
    ref = ds.make_batch("clumps", seed=7, n=6)
    models = {pool.scenes[i]["model"].tobytes() for i in range(6)}
    assert all(ref["model"][i, 0].tobytes() in models for i in range(6))
    cfg = pool.config
    for i in range(16):
        k = int(a["count"][i])
        pos = a["positions"][i, :k]
        np.testing.assert_array_equal(a["mask"][i, 0], ds.disc_mask(cfg.size, pos, cfg.mask_radius))
        # each transformed clump position carries its clump's light: the noise-free model minus a
        # re-rendering of the clumps at the transformed positions leaves a smooth galaxy (no clump left)
        if k:
            clumps = ds.render_point_sources(cfg.size, pos, a["clump_flux"][i, :k], float(a["psf_fwhm"][i]),
                                             float(a["psf_beta"][i]))
            resid = a["model"][i, 0] - clumps
            assert resid.min() > -1e-3 * max(1.0, float(a["clump_flux"][i, :k].max()))

    fpool = ds.StampPool("fields", seed=7, size=3)
    fb = fpool.batch(8, step=0)
    assert _check_field_targets(fb, fpool.config) > 5
    bpool = ds.StampPool("blends", seed=7, size=3)
    bb = bpool.batch(6, step=0)
    for i in range(6):
        for k in (0, 1):
            iy, ix = np.unravel_index(np.argmax(bb["isolated"][i, k]), (96, 96))
            assert math.hypot(iy - bb["peaks"][i, k, 0], ix - bb["peaks"][i, k, 1]) < 1.5


def test_cache_roundtrip(tmp_path, batches):
    cfg = ds.ClumpSetConfig()
    p = ds.cache_to(tmp_path / "clumps", batches["clumps"], kind="clumps", config=cfg, seed=7, split="train")
    assert p.suffix == ".npz"
    back, meta = ds.load_cached(p)
    _equal(back, batches["clumps"])
    assert meta["kind"] == "clumps" and meta["seed"] == 7 and meta["config"]["mask_radius"] == cfg.mask_radius
    assert from_mapping(ds.ClumpSetConfig, meta["config"]) == cfg


def test_torch_stream():
    torch = pytest.importorskip("torch")
    stream = ds.TrainingStream("clumps", seed=7, batch_size=4, n_batches=2)
    out = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
    assert len(out) == 2 and out[0]["image"].shape == (4, 1, 64, 64) and out[0]["image"].dtype == torch.float32
    ref = ds.make_batch("clumps", seed=7, n=4, start=4)
    np.testing.assert_array_equal(out[1]["image"].numpy(), ref["image"])
    pooled = list(ds.TrainingStream("blends", seed=7, batch_size=3, n_batches=1, pool_size=2))
    assert pooled[0]["masks"].shape == (3, 2, 96, 96)


def test_throughput_report():
    """Prints stamps/s per kind (one core); no timing assertion. Run with -s to see the figures."""
    rates = {}
    for kind, n in (("clumps", 48), ("blends", 24), ("fields", 6)):
        rates[kind] = ds.throughput(kind, n=n, warm=8)
        rates[kind + "_pool"] = ds.throughput(kind, n=64, pool=True, pool_size=4)
    print("\nstamps/s on one core: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    assert all(v > 0 for v in rates.values())
