"""Tiling changes nothing: the tiled run equals one whole-image sep.extract with the same background.

The field is 3000 x 4096 (not a multiple of the 512 px core) with objects planted on every seam and
corner of the 512 grid. The tiled run uses a real local Dask cluster with 2 process workers.
"""
import numpy as np
import pytest
import sep
import zarr
from scipy.spatial import cKDTree

from deepmosaic.pipeline.background import background_of_image
from deepmosaic.pipeline.io import open_mosaic
from deepmosaic.pipeline.store import read_catalog
from deepmosaic.tasks.base import FLAG_TILE_TRUNCATED
from deepmosaic.tasks.sep_task import SepConfig, make_kernel, photometry
from deepmosaic.workflows import run


def whole_image(image_path, cfg: SepConfig):
    """The untiled reference: one sep.extract over the whole mosaic, same background model."""
    src = open_mosaic(image_path).detection
    image, mask, _ = src.read_window((0, src.shape[0], 0, src.shape[1]))
    model = background_of_image(image, mask, cfg.back_size, cfg.back_filter_size, cfg.back_filter_thresh)
    back, rms = model.evaluate((0, src.shape[0], 0, src.shape[1]))
    data = image - back
    data[mask] = 0
    sep.set_extract_pixstack(data.size)
    sep.set_sub_object_limit(cfg.sub_object_limit)  # process-global: another test may have lowered it
    objs, seg = sep.extract(data, cfg.thresh, err=model.global_rms, mask=mask, minarea=cfg.minarea,
                            filter_kernel=make_kernel(cfg.filter_kernel), filter_type=cfg.filter_type,
                            deblend_nthresh=cfg.deblend_nthresh, deblend_cont=cfg.deblend_cont,
                            clean=cfg.clean, clean_param=cfg.clean_param, segmentation_map=True)
    flags = objs["flag"].astype(np.int64)
    phot = photometry(data, mask, rms, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], cfg, flags)
    return objs, seg, phot, back


@pytest.fixture(scope="module")
def tiled_noblend(field_4096, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled") / "noblend.zarr"
    res = run(field_4096["image"], out, tile=512, workers=2, set=["sep.deblend_cont=1.0"])
    return str(out), res


def _label_correspondence(seg_whole, seg_tiled):
    """Pairs (whole label, tiled label) over all pixels; one-to-one iff the maps are equal up to relabelling."""
    pairs = np.unique(np.stack([seg_whole.ravel(), seg_tiled.ravel()], 1), axis=0)
    return pairs


def test_tiled_equals_untiled_without_deblending(field_4096, tiled_noblend):
    out, res = tiled_noblend
    assert res.tiles["done"] == 6 * 8 and not res.failures
    cat = read_catalog(out, "sep")
    objs, seg, phot, _ = whole_image(field_4096["image"], SepConfig(deblend_cont=1.0))
    assert len(cat["x"]) == len(objs), "every object exactly once"
    assert len(np.unique(cat["id"])) == len(cat["id"])
    d, idx = cKDTree(np.c_[objs["x"], objs["y"]]).query(np.c_[cat["x"], cat["y"]])
    assert len(np.unique(idx)) == len(objs)
    assert d.max() < 1e-3
    np.testing.assert_array_equal(cat["npix"], objs["npix"][idx])
    # photometry apertures that reach beyond the window are flagged; all others are identical
    trunc = (cat["flags"] & FLAG_TILE_TRUNCATED) != 0
    assert trunc.mean() < 0.005, f"{trunc.sum()} objects truncated by a 64 px halo"
    np.testing.assert_allclose(cat["flux"][~trunc], phot["flux"][idx][~trunc], rtol=1e-4)
    np.testing.assert_allclose(cat["flux_aper"][~trunc], phot["flux_aper"][idx][~trunc], rtol=1e-4)
    # segmentation equal up to relabelling, and each tiled label is its catalog row's id
    seg_tiled = zarr.open_array(f"{out}/maps/sep/segmentation")[...]
    assert (seg_tiled >= 0).all(), "no provisional seam labels left"
    pairs = _label_correspondence(seg, seg_tiled)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
    mapping = dict(pairs)
    assert mapping[0] == 0
    expect = cat["id"]
    got = np.array([mapping[i + 1] for i in idx])
    np.testing.assert_array_equal(got, expect)


def test_tiled_background_equals_whole_image(field_4096, tiled_noblend):
    out, _ = tiled_noblend
    _, _, _, back = whole_image(field_4096["image"], SepConfig(deblend_cont=1.0))
    tiled = zarr.open_array(f"{out}/maps/sep/background")[...]
    np.testing.assert_array_equal(tiled, back)
    # and it is sep's own background to float32 rounding
    src = open_mosaic(field_4096["image"]).detection
    image, mask, _ = src.read_window((0, src.shape[0], 0, src.shape[1]))
    sep_back = sep.Background(image, mask=mask, bw=64, bh=64, fw=3, fh=3).back()
    assert np.abs(tiled - sep_back).max() < 1e-3 * max(1.0, float(np.abs(sep_back).max())) * 1e-2


def test_planted_seam_objects_once_and_one_id_across_seams(field_4096, tiled_noblend):
    """Objects planted on every seam and corner: none found twice, none lost, one id across the seam.

    "Lost" is judged against what the whole-image run detects (faint plants may be below sep's
    threshold with or without tiles).
    """
    out, _ = tiled_noblend
    truth = field_4096["sim"].truth
    planted = truth[truth["planted_seam"]]
    assert len(planted) > 50
    cat = read_catalog(out, "sep")
    tree = cKDTree(np.c_[cat["x"], cat["y"]])
    objs, whole_seg, _, _ = whole_image(field_4096["image"], SepConfig(deblend_cont=1.0))
    whole_tree = cKDTree(np.c_[objs["x"], objs["y"]])
    seg_tiled = zarr.open_array(f"{out}/maps/sep/segmentation")[...]
    n_found = n_crossing = 0
    for obj in planted:
        near = tree.query_ball_point([obj["x"], obj["y"]], r=2.0)
        assert len(near) <= 1, f"planted object {obj['id']} at ({obj['x']:.1f}, {obj['y']:.1f}) found twice"
        whole = whole_tree.query_ball_point([obj["x"], obj["y"]], r=2.0)
        if not whole:
            continue
        assert len(near) == 1, f"planted object {obj['id']} (S/N {obj['snr']:.0f}) lost on the seam"
        n_found += 1
        oid = cat["id"][near[0]]
        # its whole footprint carries the catalog id, on both sides of the seam
        yy, xx = np.nonzero(whole_seg == whole[0] + 1)
        vals = np.unique(seg_tiled[yy, xx])
        assert list(vals) == [oid], f"object {oid} has labels {vals} across the seam"
        tiles_touched = {(y // 512, x // 512) for y, x in zip(yy, xx)}
        n_crossing += len(tiles_touched) > 1
    assert n_crossing >= 0.5 * n_found, f"only {n_crossing} footprints cross a seam: test too weak"
    assert n_found >= 50, f"only {n_found} of {len(planted)} plants detectable: test too weak"


def test_segmentation_ids_are_catalog_ids(tiled_noblend):
    out, _ = tiled_noblend
    cat = read_catalog(out, "sep")
    seg = zarr.open_array(f"{out}/maps/sep/segmentation")[...]
    ids = np.unique(seg)
    assert set(ids[ids > 0]) == set(cat["id"])


def test_tiled_with_deblending_mostly_equal(field_4096, tmp_path):
    """With deblending on, every object is still found once at the same position.

    What differs: sep (like SExtractor's ``gatherup``) hands the parent's pixels below the split
    thresholds to the children by a pseudo-random draw. The generator is reseeded per ``sep.extract``
    call and consumed in scan order, so for a blended object the draws depend on which blends came
    before it in the same call: the whole image and a tile give the same children at the same positions
    but may give a pixel or two to a different child, which changes its npix, shape and Kron flux.
    Measured on this field: 99.96% of positions equal (one blend split differently), ~10% of fluxes
    differ, all of them deblended (sep flag OBJ_MERGED) or flagged as truncated by the halo. Repeating the whole-image call gives identical results, so it is this and
    not tiling that moves pixels.
    """
    out = tmp_path / "blend.zarr"
    run(field_4096["image"], out, tile=512, workers=0)
    cat = read_catalog(str(out), "sep")
    objs, _, phot, _ = whole_image(field_4096["image"], SepConfig())
    assert abs(len(cat["x"]) - len(objs)) <= 0.005 * len(objs)
    d, idx = cKDTree(np.c_[objs["x"], objs["y"]]).query(np.c_[cat["x"], cat["y"]])
    same_pos = d < 1e-3
    assert same_pos.mean() >= 0.995, f"only {same_pos.mean():.4f} of positions equal"
    same_flux = np.isclose(cat["flux"], phot["flux"][idx], rtol=1e-4)
    differ = ~same_flux
    explained = (cat["flags"] & (1 | FLAG_TILE_TRUNCATED)) != 0
    assert explained[differ].all(), "flux differences only on deblended (OBJ_MERGED) or halo-truncated objects"
