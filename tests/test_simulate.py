"""Tests of the mosaic simulator (pipeline/simulate.py) and the truth file format (pipeline/truth.py)."""
from __future__ import annotations

import math

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.errors import ConfigError, InputError
from deepmosaic.pipeline.simulate import (BAD, SimConfig, Stamp, bulge_disk_radii, make_psf, render_profile,
                                          simulate_mosaic)
from deepmosaic.pipeline.tiling import TileGrid
from deepmosaic.pipeline.truth import read_truth, truth_path_for, write_simulation

PSF_FWHM_PX = 3.5


@pytest.fixture(scope="module")
def psf():
    return make_psf(PSF_FWHM_PX)


@pytest.fixture(scope="module")
def dense_sim():
    """A small, crowded field with bright objects, bad columns and planted seam objects."""
    cfg = SimConfig(size=(200, 232), seed=11, density=1500.0, mag_range=(18.0, 23.5), plant_seams=64,
                    n_bad_columns=3)
    return simulate_mosaic(cfg)


def _truth_kwargs(row) -> dict:
    """render_profile keyword arguments that re-create a truth row."""
    if row["kind"] == "star":
        return dict(kind="star")
    bd = row["bulge_frac"] > 0
    return dict(kind="galaxy", hlr=row["hlr"], sersic_n=row["sersic_n"], q=row["q"], angle=row["angle"],
                bulge_frac=row["bulge_frac"] if bd else 0.0,
                bulge_hlr_ratio=row["bulge_hlr_ratio"] if bd else 0.4)


def _light_stack(sim, psf) -> np.ndarray:
    """Oracle: every object's noise-free light on the full mosaic, stacked ``[n_obj, ny, nx]``."""
    shape = sim.image.shape
    stack = np.zeros((len(sim.truth),) + shape)
    for k, row in enumerate(sim.truth):
        st = render_profile(row["flux"], row["x"], row["y"], psf=psf, **_truth_kwargs(row))
        ov = st.overlap(shape)
        if ov is not None:
            stack[k][ov[0]] = st.array[ov[1]]
    return stack


def _half_light_radius(arr: np.ndarray, x: float, y: float) -> float:
    """Curve-of-growth half-light radius (px) of a stamp around (x, y), by pixel-centre radius."""
    yy, xx = np.indices(arr.shape)
    r = np.hypot(xx - x, yy - y).ravel()
    order = np.argsort(r)
    cum = np.cumsum(arr.ravel()[order])
    return float(np.interp(0.5 * arr.sum(), cum, r[order]))


# ---------------------------------------------------------------------------------------------------
# render_profile
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(kind="galaxy", sersic_n=1.0, hlr=3.0, q=0.6, angle=20.0),
    dict(kind="galaxy", sersic_n=4.0, hlr=4.0, q=0.8, angle=-50.0),
    dict(kind="galaxy", hlr=3.0, q=0.5, bulge_frac=0.4, bulge_hlr_ratio=0.3),
    dict(kind="star"),
])
def test_render_flux_conserved(psf, kw):
    st = render_profile(1234.5, 40.3, 37.8, psf=psf, **kw)
    assert st.array.dtype == np.float64
    assert st.array.shape[0] % 2 == 1 and st.array.shape == st.array.shape[::-1]
    assert st.array.sum() == pytest.approx(1234.5, rel=0.01)


@pytest.mark.parametrize("n,hlr", [(1.0, 8.0), (4.0, 10.0), (2.5, 6.0)])
def test_render_hlr_matches_analytic(n, hlr):
    x, y = 0.3, -0.2
    st = render_profile(1.0, x, y, psf=None, hlr=hlr, sersic_n=n)
    assert st.array.sum() == pytest.approx(1.0, rel=0.01)
    measured = _half_light_radius(st.array, x - st.x0, y - st.y0)
    assert measured == pytest.approx(hlr, rel=0.03)


def test_bulge_disk_hlr_is_total_hlr():
    hlr = 8.0
    b, d = bulge_disk_radii(hlr, 0.4, 0.35)
    assert b == pytest.approx(0.35 * d)
    assert b < hlr < d
    st = render_profile(1.0, 0.0, 0.0, psf=None, hlr=hlr, bulge_frac=0.4, bulge_hlr_ratio=0.35)
    assert _half_light_radius(st.array, -st.x0, -st.y0) == pytest.approx(hlr, rel=0.03)


def test_render_centroid_and_angle(psf):
    x, y = 25.37, 18.81
    st = render_profile(100.0, x, y, psf=psf, hlr=4.0, sersic_n=1.0, q=0.3, angle=30.0)
    a = st.array
    yy, xx = np.indices(a.shape)
    xx, yy = xx + st.x0, yy + st.y0
    cx, cy = (a * xx).sum() / a.sum(), (a * yy).sum() / a.sum()
    assert cx == pytest.approx(x, abs=0.01) and cy == pytest.approx(y, abs=0.01)
    mxx = (a * (xx - cx) ** 2).sum()
    myy = (a * (yy - cy) ** 2).sum()
    mxy = (a * (xx - cx) * (yy - cy)).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * mxy, mxx - myy))   # CCW from +x, y = row index
    assert angle == pytest.approx(30.0, abs=1.0)


def test_pixel_integration_is_real():
    # A galaxy smaller than a pixel: integrating over pixels conserves its flux and differs strongly
    # from sampling the profile at pixel centres.
    x, y = 10.3, 9.6
    st = render_profile(1.0, x, y, psf=None, hlr=0.3, sersic_n=1.0, shape=(21, 21), origin=(0, 0))
    assert st.array.sum() == pytest.approx(1.0, rel=0.005)
    sampled = galsim.Sersic(1.0, half_light_radius=0.3, trunc=1.5).drawImage(
        nx=21, ny=21, scale=1.0, method="no_pixel", offset=(x - 10, y - 10)).array
    assert abs(sampled.sum() - 1.0) > 0.2                 # centre samples do not conserve flux
    assert np.abs(st.array - sampled).max() > 0.2 * st.array.max()
    # A point source without a PSF lands wholly in the pixel that contains it.
    p = render_profile(7.0, 3.49, 5.51, psf=None, kind="star", shape=(9, 9), origin=(0, 0))
    assert p.array[6, 3] == 7.0 and p.array.sum() == 7.0


def test_star_equals_psf_convolved_with_pixel(psf):
    # Independent oracle: real-space convolution of the PSF with the pixel, sampled at pixel centres.
    x, y = 12.27, 11.64
    st = render_profile(50.0, x, y, psf=psf, kind="star", shape=(25, 25), origin=(0, 0))
    ref = galsim.Convolve(psf * 50.0, galsim.Pixel(1.0), real_space=True).drawImage(
        nx=25, ny=25, scale=1.0, method="no_pixel", offset=(x - 12, y - 12)).array
    assert np.abs(st.array - ref).max() < 1e-3 * ref.max()


def test_render_stamp_placement_and_overlap(psf):
    st = render_profile(10.0, -0.4, 3.2, psf=psf, kind="star")
    assert st.x0 < 0                                   # the stamp hangs over the mosaic edge
    img = np.zeros((20, 20))
    st.add_to(img)
    (ty, tx), (sy, sx) = st.overlap(img.shape)
    assert img.sum() == pytest.approx(st.array[sy, sx].sum())
    assert Stamp(np.ones((3, 3)), 50, 50).overlap((20, 20)) is None


def test_render_rejects_bad_arguments(psf):
    with pytest.raises(ValueError, match="kind"):
        render_profile(1.0, 0, 0, psf=psf, kind="quasar")
    with pytest.raises(ValueError, match="hlr"):
        render_profile(1.0, 0, 0, psf=psf, hlr=-1.0)


# ---------------------------------------------------------------------------------------------------
# simulate_mosaic
# ---------------------------------------------------------------------------------------------------

def test_arrays_dtypes_and_shapes(dense_sim):
    s = dense_sim
    ny, nx = s.config.size
    for arr, dt in ((s.image, np.float32), (s.variance, np.float32), (s.mask, np.int32),
                    (s.segmap, np.int32), (s.model, np.float32)):
        assert arr.shape == (ny, nx) and arr.dtype == dt
    t = s.truth
    assert t["id"].dtype == np.int64 and np.array_equal(t["id"], np.arange(1, len(t) + 1))
    for c in ("x", "y", "ra", "dec", "flux", "mag", "hlr", "snr", "blendedness"):
        assert t[c].dtype == np.float64
    assert set(t["kind"]) <= {"star", "galaxy"}
    stars = t["kind"] == "star"
    assert np.all(np.isnan(t["sersic_n"][stars])) and np.all(t["hlr"][stars] == 0)
    assert np.all(np.isnan(t["bulge_frac"][stars])) and np.all(t["bulge_frac"][~stars] >= 0)
    bd = ~stars & (t["bulge_frac"] > 0)
    assert np.all(t["sersic_n"][bd] == 1.0)
    np.testing.assert_allclose(t["mag"], s.config.zeropoint - 2.5 * np.log10(t["flux"]))
    assert np.all((t["x"] >= -0.5) & (t["x"] < nx - 0.5) & (t["y"] >= -0.5) & (t["y"] < ny - 0.5))


def test_deterministic_for_a_seed():
    cfg = SimConfig(size=(96, 128), seed=4, density=2000.0, n_bad_columns=1, gain=1.5)
    a, b = simulate_mosaic(cfg), simulate_mosaic(cfg)
    for name in ("image", "variance", "mask", "segmap", "model"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert all(np.array_equal(a.truth[c], b.truth[c], equal_nan=a.truth[c].dtype.kind == "f")
               for c in a.truth.colnames)
    c = simulate_mosaic(SimConfig(size=(96, 128), seed=5, density=2000.0, n_bad_columns=1, gain=1.5))
    assert not np.array_equal(a.image, c.image)
    assert len(a.truth) != len(c.truth) or not np.array_equal(a.truth["x"], c.truth["x"])


def test_truth_masks_follow_the_light(dense_sim, psf):
    s = dense_sim
    t = s.truth
    sigma = s.config.noise_sigma
    stack = _light_stack(s, psf)                       # independent re-rendering from the truth rows
    np.testing.assert_allclose(s.model, stack.sum(0), rtol=1e-5, atol=1e-4)
    best = stack.max(0)
    oracle = np.where(best > sigma, stack.argmax(0) + 1, 0)
    assert np.array_equal(s.segmap, oracle)
    # segmap ids are catalog ids; npix matches; every segmap pixel has owner light > 1 sigma
    ids = np.unique(s.segmap)
    assert set(ids[ids > 0]) <= set(t["id"])
    assert np.array_equal(np.bincount(s.segmap.ravel(), minlength=len(t) + 1)[1:], t["npix"])
    on = s.segmap > 0
    assert np.all(best[on] > sigma) and np.all(s.model[on] > sigma)
    assert np.all(best[~on] <= sigma)
    # each footprint contains its centroid pixel, unless a brighter neighbour takes that pixel
    has = t["npix"] > 0
    assert has.sum() > 20
    for k in np.flatnonzero(has):
        iy, ix = int(math.floor(t["y"][k] + 0.5)), int(math.floor(t["x"][k] + 0.5))
        if s.segmap[iy, ix] != t["id"][k]:
            assert stack[s.segmap[iy, ix] - 1, iy, ix] > stack[k, iy, ix]
    # blendedness from its definition
    for k in np.flatnonzero(has)[:50]:
        fp = s.segmap == t["id"][k]
        expect = 1.0 - stack[k][fp].sum() / stack[:, fp].sum()
        assert t["blendedness"][k] == pytest.approx(expect, abs=1e-9)
    assert np.all(np.isnan(t["blendedness"][~has]))
    assert np.nanmax(t["blendedness"]) > 0.05         # the crowded field does blend
    # matched-filter S/N of each object alone
    for k in range(0, len(t), 7):
        assert t["snr"][k] == pytest.approx(math.sqrt((stack[k] ** 2).sum()) / sigma, rel=1e-6)


def test_noise_and_variance_are_honest():
    s = simulate_mosaic(SimConfig(size=(256, 256), seed=2, density=50.0, sky_gradient=0.05))
    resid = (s.image - s.sky - s.model).astype(np.float64)
    assert np.all(s.variance == np.float32(25.0))
    assert resid.std() == pytest.approx(5.0, rel=0.02) and abs(resid.mean()) < 0.1
    assert s.sky.max() - s.sky.min() == pytest.approx(0.05 * 100.0, rel=0.05)
    g = simulate_mosaic(SimConfig(size=(256, 256), seed=2, density=400.0, mag_range=(16.0, 19.0), gain=0.5))
    pull = (g.image - g.sky - g.model) / np.sqrt(g.variance)
    assert pull.std() == pytest.approx(1.0, rel=0.02)
    assert g.variance.max() > 2 * 25.0               # object shot noise is in the variance


def test_bad_columns_are_masked(dense_sim):
    s = dense_sim
    bad_cols = np.flatnonzero(np.all(s.mask & BAD, axis=0))
    assert bad_cols.size == 3
    assert np.all(s.image[:, bad_cols] == 0.0)
    assert not np.any(np.delete(s.mask, bad_cols, axis=1))


def test_plant_seams_on_every_line_and_corner():
    tile = 64
    cfg = SimConfig(size=(150, 300), seed=8, density=0.0, plant_seams=tile, seam_objects_per_segment=2)
    t = simulate_mosaic(cfg).truth
    ny, nx = cfg.size
    assert len(t) > 0 and np.all(t["planted_seam"])
    x, y = np.asarray(t["x"]), np.asarray(t["y"])
    xs = [k * tile - 0.5 for k in range(1, math.ceil(nx / tile))]   # 63.5 ... 255.5
    ys = [k * tile - 0.5 for k in range(1, math.ceil(ny / tile))]   # 63.5, 127.5
    y_edges = [-0.5] + ys + [ny - 0.5]
    x_edges = [-0.5] + xs + [nx - 0.5]
    for sx in xs:                  # exactly on each vertical seam, within every tile row
        for a, b in zip(y_edges[:-1], y_edges[1:]):
            assert np.any((x == sx) & (y > a) & (y < b)), (sx, a, b)
    for sy in ys:
        for a, b in zip(x_edges[:-1], x_edges[1:]):
            assert np.any((y == sy) & (x > a) & (x < b)), (sy, a, b)
    for sx in xs:
        for sy in ys:
            assert np.any((x == sx) & (y == sy)), (sx, sy)
    # everything planted is within half a pixel of a seam line
    dx = np.min(np.abs(x[:, None] - np.array(xs)[None]), axis=1)
    dy = np.min(np.abs(y[:, None] - np.array(ys)[None]), axis=1)
    assert np.all(np.minimum(dx, dy) <= 0.5)
    assert np.sum((dx > 0) & (dx < 0.5) & (dy > 0.5)) > 0          # some sit just off a line
    expected = len(xs) * len(y_edges[:-1]) * 2 + len(ys) * len(x_edges[:-1]) * 2 + len(xs) * len(ys)
    assert len(t) == expected
    # "on the seam" as the tile grid defines it: a centroid at k*tile - 0.5 belongs to tile k
    grid = TileGrid((ny, nx), core=tile, halo=0)
    for row in t[(x == xs[0]) & (dy > 0.5)]:
        owner = grid.tile_of(row["y"], row["x"])
        assert owner.col == 1 and owner.owns(row["y"], row["x"])
        assert not grid.tile(owner.row, 0).owns(row["y"], row["x"])


def test_plant_seams_adds_to_random_objects():
    base = simulate_mosaic(SimConfig(size=(128, 128), seed=3, density=500.0))
    seams = simulate_mosaic(SimConfig(size=(128, 128), seed=3, density=500.0, plant_seams=64))
    n = len(base.truth)
    assert len(seams.truth) > n and not np.any(seams.truth["planted_seam"][:n])
    np.testing.assert_array_equal(base.truth["x"], seams.truth["x"][:n])


def test_header_wcs_and_catalog_sky_positions(dense_sim):
    s = dense_sim
    h = s.header
    assert h["CTYPE1"] == "RA---TAN" and h["CTYPE2"] == "DEC--TAN"
    ny, nx = s.config.size
    assert (h["CRPIX1"], h["CRPIX2"]) == ((nx + 1) / 2, (ny + 1) / 2)
    assert h["CD1_1"] == pytest.approx(-0.2 / 3600) and h["CD2_2"] == pytest.approx(0.2 / 3600)
    w = WCS(h)
    assert w.has_celestial
    centre = w.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
    assert centre.ra.deg == pytest.approx(150.1) and centre.dec.deg == pytest.approx(2.2)


@pytest.mark.parametrize("changes,name", [
    ({"density": -1.0}, "density"), ({"size": (4, 4)}, "size"), ({"plant_seams": 8}, "plant_seams"),
    ({"star_fraction": 1.5}, "star_fraction"), ({"noise_sigma": 0.0}, "noise_sigma"),
    ({"mag_range": (25.0, 19.0)}, "mag_range"), ({"n_bad_columns": -2}, "n_bad_columns"),
    ({"ra_dec": (400.0, 0.0)}, "ra_dec"), ({"sersic_n_range": (0.1, 4.0)}, "sersic_n_range"),
])
def test_validate_names_field_and_value(changes, name):
    with pytest.raises(ConfigError) as err:
        SimConfig(**changes).validate()
    msg = str(err.value)
    assert f"SimConfig.{name}=" in msg and repr(next(iter(changes.values()))) in msg


def test_config_from_cli_strings_and_docs():
    cfg = from_mapping(SimConfig, {"size": "128,96", "seed": "7", "plant_seams": "64", "density": "10"})
    assert cfg.size == (128, 96) and cfg.seed == 7 and cfg.plant_seams == 64 and cfg.density == 10.0
    assert from_mapping(SimConfig, {"plant_seams": "none"}).plant_seams is None
    import dataclasses
    assert all(f.metadata.get("doc") for f in dataclasses.fields(SimConfig))


# ---------------------------------------------------------------------------------------------------
# truth files
# ---------------------------------------------------------------------------------------------------

def test_truth_path_for(tmp_path):
    assert truth_path_for(tmp_path / "a.fits") == tmp_path / "a_truth.fits"
    assert truth_path_for("x/b.fits.gz").name == "b_truth.fits.gz"
    assert truth_path_for("c").name == "c_truth.fits"


def test_write_read_round_trip(dense_sim, tmp_path):
    s = dense_sim
    img_path, truth_path = write_simulation(s, tmp_path / "sub" / "mosaic.fits")
    assert truth_path == tmp_path / "sub" / "mosaic_truth.fits"
    with fits.open(img_path) as hdul:
        assert [h.name for h in hdul] == ["IMAGE", "MASK", "VARIANCE"]
        assert hdul[0].data.dtype == np.dtype(">f4") and np.array_equal(hdul[0].data, s.image)
        assert hdul["MASK"].header["MP_BAD"] == 0 and hdul["MASK"].data.dtype.kind == "i"
        assert np.array_equal(hdul["MASK"].data, s.mask)
        assert np.array_equal(hdul["VARIANCE"].data, s.variance)
        w = WCS(hdul[0].header)
        assert w.has_celestial and w.celestial.wcs.ctype[0] == "RA---TAN"
        assert WCS(hdul["MASK"].header).wcs.compare(w.wcs)
    t, seg = read_truth(truth_path)
    assert seg.dtype == np.int32 and seg.dtype.isnative and np.array_equal(seg, s.segmap)
    assert t.colnames == s.truth.colnames and len(t) == len(s.truth)
    for c in t.colnames:
        assert t[c].dtype.isnative or t[c].dtype.kind in "U?"
        if t[c].dtype.kind == "f":
            np.testing.assert_array_equal(t[c], s.truth[c])
        else:
            assert np.array_equal(t[c], s.truth[c]), c
    assert t["x"].unit == "pix" and t.meta["MAGZERO"] == dense_sim.config.zeropoint
    sky = w.pixel_to_world(t["x"], t["y"])
    from astropy.coordinates import SkyCoord
    sep = sky.separation(SkyCoord(t["ra"], t["dec"], unit="deg"))
    assert sep.max().to_value("arcsec") < 1e-6
    with fits.open(truth_path) as hdul:
        assert WCS(hdul["SEGMAP"].header).has_celestial


def test_write_refuses_to_overwrite(dense_sim, tmp_path):
    path = tmp_path / "m.fits"
    write_simulation(dense_sim, path)
    with pytest.raises(InputError, match="overwrite") as err:
        write_simulation(dense_sim, path)
    assert "m.fits" in str(err.value)
    write_simulation(dense_sim, path, overwrite=True)
    # an existing truth file alone also stops the write, before anything is written
    other = tmp_path / "n.fits"
    truth_path_for(other).write_bytes(b"")
    with pytest.raises(InputError, match="n_truth.fits"):
        write_simulation(dense_sim, other)
    assert not other.exists()


def test_read_truth_plain_catalogs(tmp_path):
    t = Table({"ID": [1, 2, 3], "X": [1.0, 2.5, 3.0], "Y": [4.0, 5.0, 6.0], "flux": [1.0, 2.0, 3.0]})
    t.write(tmp_path / "cat.ecsv")
    out, seg = read_truth(tmp_path / "cat.ecsv")
    assert seg is None and out.colnames[:3] == ["id", "x", "y"] and out["id"].dtype == np.int64
    t.write(tmp_path / "cat.fits")                     # a FITS table without EXTNAME CATALOG
    out, seg = read_truth(tmp_path / "cat.fits")
    assert seg is None and np.array_equal(out["x"], [1.0, 2.5, 3.0]) and out["x"].dtype.isnative
    # a truth file with CATALOG but without SEGMAP
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(t, name="CATALOG")]).writeto(tmp_path / "noseg.fits")
    out, seg = read_truth(tmp_path / "noseg.fits")
    assert seg is None and len(out) == 3


def test_read_truth_errors(dense_sim, tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        read_truth(tmp_path / "missing_truth.fits")
    assert "missing_truth.fits" in str(err.value)
    img_path, _ = write_simulation(dense_sim, tmp_path / "m.fits")
    with pytest.raises(InputError, match="CATALOG"):
        read_truth(img_path)                            # the mosaic, not its truth
    bad = Table({"id": [1, 2], "x": [0.0, 1.0], "mag": [20.0, 21.0]})
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(bad, name="CATALOG")]).writeto(tmp_path / "b.fits")
    with pytest.raises(InputError) as err:
        read_truth(tmp_path / "b.fits")
    assert "b.fits[CATALOG]" in str(err.value) and "'y'" in str(err.value)
    dup = Table({"id": [1, 1], "x": [0.0, 1.0], "y": [0.0, 1.0]})
    dup.write(tmp_path / "dup.ecsv")
    with pytest.raises(InputError, match="duplicate"):
        read_truth(tmp_path / "dup.ecsv")
    seg = np.zeros((4, 4), np.int32)
    seg[1, 1] = 9
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(dup[:1], name="CATALOG"),
                  fits.ImageHDU(seg, name="SEGMAP")]).writeto(tmp_path / "s.fits")
    with pytest.raises(InputError, match=r"SEGMAP.*\[9\]"):
        read_truth(tmp_path / "s.fits")
    (tmp_path / "junk.ecsv").write_text("not a table at all\n\x00\x01")
    with pytest.raises(InputError, match="junk.ecsv"):
        read_truth(tmp_path / "junk.ecsv")
