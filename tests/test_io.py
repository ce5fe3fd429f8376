"""The mosaic reader (deepmosaic.pipeline.io): dtypes and scaling, masks, LSST exposures, errors, windows,
zarr input and multi-band runs. Images are small (200 x 300) and written to ``tmp_path``."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import ConfigError, InputError
from deepmosaic.pipeline.io import open_fits, open_mosaic
from deepmosaic.tasks.base import FLAG_MASKED
from deepmosaic.workflows import run

# LSST's MP_DETECTED keyword is longer than 8 characters: astropy writes it as a HIERARCH card, as LSST does
pytestmark = pytest.mark.filterwarnings("ignore:Keyword name 'MP_:astropy.io.fits.verify.VerifyWarning")

SHAPE = (200, 300)
SOURCES = ((50, 60), (120, 200), (150, 80), (40, 170), (170, 260))
FULL = (0, SHAPE[0], 0, SHAPE[1])


def make_image(shape=SHAPE, seed=0, sources=SOURCES, sigma=2.0, amp=200.0):
    """Gaussian blobs of ``amp`` counts on a sky of 100 +- 1; float64."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = 100.0 + rng.normal(0.0, 1.0, shape)
    for y, x in sources:
        img += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
    return img


def make_wcs_header(shape=SHAPE):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w.to_header()


def read_all(path, **kw):
    src = open_mosaic(path, **kw).detection
    return src.read_window((0, src.shape[0], 0, src.shape[1]))


# ------------------------------------------------------------------------------------ dtypes and scaling

@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f8"])
def test_float_byte_orders_and_widths_read_as_native_float32(tmp_path, dtype):
    ref = make_image().astype(np.float32)
    fits.PrimaryHDU(ref.astype("<f4")).writeto(tmp_path / "le.fits")
    fits.PrimaryHDU(ref.astype(dtype)).writeto(tmp_path / "other.fits")
    img_le, mask_le, _ = read_all(tmp_path / "le.fits")
    img, mask, var = read_all(tmp_path / "other.fits")
    assert img.dtype == np.float32 and img.dtype.isnative
    np.testing.assert_array_equal(img, ref)
    np.testing.assert_array_equal(img, img_le)
    assert not mask.any() and not mask_le.any() and var is None
    # the source records the on-disk type, which differs between f4 and f8
    assert open_mosaic(tmp_path / "other.fits").detection.dtype == f"BITPIX={-8 * np.dtype(dtype).itemsize}"


@pytest.mark.parametrize("bscale,bzero", [(0.01, 100.0), (1.0, 32768.0), (2.5, -7.0)])
def test_scaled_integer_image_matches_astropy(tmp_path, bscale, bzero):
    rng = np.random.default_rng(1)
    raw = rng.integers(-30000, 30000, SHAPE).astype(np.int16)
    h = fits.PrimaryHDU(raw)
    h.header["BSCALE"], h.header["BZERO"] = bscale, bzero
    h.writeto(tmp_path / "i16.fits")
    assert fits.getheader(tmp_path / "i16.fits")["BITPIX"] == 16
    assert fits.getheader(tmp_path / "i16.fits")["BSCALE"] == bscale
    expect = fits.getdata(tmp_path / "i16.fits")  # astropy's own scaling
    assert not np.allclose(expect, raw)  # the scaling matters
    img, mask, _ = read_all(tmp_path / "i16.fits")
    assert img.dtype == np.float32
    # astropy scales in float32: agree within ~1 ulp of the terms (more near 0, where its float32 sum cancels)
    terms = np.abs(raw.astype(np.float64) * bscale) + abs(bzero)
    assert (np.abs(img - expect) <= 1.01 * np.spacing(terms.astype(np.float32))).all()
    # ours is the float32 nearest to the exact physical value
    exact = raw.astype(np.float64) * bscale + bzero
    assert (np.abs(img - exact) <= 0.5 * np.spacing(np.abs(img))).all()
    assert not mask.any()


def test_unsigned_16bit_image_reads_exactly(tmp_path):
    ref = np.random.default_rng(2).integers(0, 65535, SHAPE).astype(np.uint16)
    fits.PrimaryHDU(ref).writeto(tmp_path / "u16.fits")  # stored as int16 with BZERO=32768
    assert fits.getheader(tmp_path / "u16.fits")["BZERO"] == 32768
    img, mask, _ = read_all(tmp_path / "u16.fits")
    np.testing.assert_array_equal(img, ref.astype(np.float32))
    assert not mask.any()


@pytest.mark.parametrize("scaled", [False, True])
def test_blank_pixels_of_integer_images_are_masked(tmp_path, scaled):
    raw = np.full(SHAPE, 1000, np.int16)
    raw[10, 20] = raw[199, 299] = -32768
    h = fits.PrimaryHDU(raw)
    h.header["BLANK"] = -32768
    if scaled:
        h.header["BSCALE"], h.header["BZERO"] = 0.5, 10.0
    h.writeto(tmp_path / "blank.fits")
    img, mask, _ = read_all(tmp_path / "blank.fits")
    assert mask[10, 20] and mask[199, 299] and mask.sum() == 2
    assert img[10, 20] == 0 and img[199, 299] == 0
    assert img[0, 0] == (510.0 if scaled else 1000.0)
    # astropy agrees about which pixels are blank
    np.testing.assert_array_equal(mask, np.isnan(fits.getdata(tmp_path / "blank.fits").astype(float)))


# ------------------------------------------------------------------------------------------------ masks

def test_nan_and_inf_pixels_are_masked_and_zeroed(tmp_path):
    img = make_image().astype(np.float32)
    bad = [(0, 0), (5, 7), (100, 150), (199, 299)]
    img[0, 0], img[5, 7], img[100, 150], img[199, 299] = np.nan, np.inf, -np.inf, np.nan
    fits.PrimaryHDU(img).writeto(tmp_path / "nan.fits")
    out, mask, _ = read_all(tmp_path / "nan.fits")
    assert mask.sum() == len(bad)
    for y, x in bad:
        assert mask[y, x] and out[y, x] == 0.0
    assert np.isfinite(out).all()
    good = ~mask
    np.testing.assert_array_equal(out[good], img[good])


def test_mask_hdu_nonzero_is_bad(tmp_path):
    img = make_image().astype(np.float32)
    m = np.zeros(SHAPE, np.int32)
    m[10:20, 30:40] = 1
    m[150, 250] = 7
    fits.HDUList([fits.PrimaryHDU(img), fits.ImageHDU(m, name="MASK")]).writeto(tmp_path / "m.fits")
    src = open_mosaic(tmp_path / "m.fits").detection
    assert src.mask_hdu == "MASK"
    out, mask, _ = src.read_window(FULL)
    np.testing.assert_array_equal(mask, m != 0)
    assert (out[mask] == 0).all()
    np.testing.assert_array_equal(out[~mask], img[~mask])
    # an explicit mask_hdu=None ignores it
    _, mask2, _ = open_fits(tmp_path / "m.fits", mask_hdu=None).detection.read_window(FULL)
    assert not mask2.any()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16])
def test_mask_hdu_of_any_integer_type(tmp_path, dtype):
    """Unsigned 16/32-bit masks are stored with BZERO; their zero must still read as "good"."""
    m = np.zeros(SHAPE, dtype)
    m[10:20, 30:40] = 1
    fits.HDUList([fits.PrimaryHDU(make_image().astype(np.float32)),
                  fits.ImageHDU(m, name="MASK")]).writeto(tmp_path / "m.fits")
    _, mask, _ = read_all(tmp_path / "m.fits")
    assert mask.sum() == 100
    assert mask[10:20, 30:40].all()


def lsst_mask(shape=SHAPE):
    """An LSST-style mask: planes BAD=0, SAT=1, DETECTED=5 declared with MP_* keywords."""
    m = np.zeros(shape, np.int32)
    m[0:5, 0:5] |= 1 << 0      # BAD
    m[50:60, 100:110] |= 1 << 1  # SAT
    m[100:130, 150:200] |= 1 << 5  # DETECTED: not a bad plane
    m[120:125, 160:165] |= 1 << 1  # SAT inside DETECTED
    h = fits.ImageHDU(m, name="MASK")
    h.header["MP_BAD"], h.header["MP_SAT"], h.header["MP_DETECTED"] = 0, 1, 5
    return m, h


def test_lsst_mask_planes_only_bad_planes_count(tmp_path):
    m, mh = lsst_mask()
    fits.HDUList([fits.PrimaryHDU(make_image().astype(np.float32)), mh]).writeto(tmp_path / "m.fits")
    src = open_mosaic(tmp_path / "m.fits").detection
    assert src.mask_bits == 0b11
    _, mask, _ = src.read_window(FULL)
    expect = (m & 0b11) != 0
    np.testing.assert_array_equal(mask, expect)
    assert not mask[100:120, 150:200].any()  # DETECTED alone is not bad
    assert mask[120:125, 160:165].all()
    # choosing the planes: only SAT
    _, mask_sat, _ = open_fits(tmp_path / "m.fits", mask_planes=("SAT",)).detection.read_window(FULL)
    np.testing.assert_array_equal(mask_sat, (m & 0b10) != 0)


def test_lsst_mask_without_any_bad_plane_masks_nothing(tmp_path):
    """Mask planes declared (MP_*) but none of them bad: DETECTED pixels must not become bad."""
    m = np.zeros(SHAPE, np.int32)
    m[100:130, 150:200] = 1 << 5
    mh = fits.ImageHDU(m, name="MASK")
    mh.header["MP_DETECTED"] = 5
    mh.header["MP_EDGE"] = 4
    fits.HDUList([fits.PrimaryHDU(make_image().astype(np.float32)), mh]).writeto(tmp_path / "m.fits")
    _, mask, _ = read_all(tmp_path / "m.fits")
    assert not mask.any()


def test_variance_hdu_bad_values_are_masked(tmp_path):
    img = make_image().astype(np.float32)
    var = np.full(SHAPE, 2.0, np.float32)
    var[1, 1], var[2, 2], var[3, 3], var[4, 4] = 0.0, -1.0, np.nan, np.inf
    fits.HDUList([fits.PrimaryHDU(img), fits.ImageHDU(var, name="VARIANCE")]).writeto(tmp_path / "v.fits")
    src = open_mosaic(tmp_path / "v.fits").detection
    assert src.variance_hdu == "VARIANCE" and src.mask_hdu is None
    out, mask, v = src.read_window(FULL)
    assert v is not None and v.dtype == np.float32 and v.shape == SHAPE
    assert {(int(y), int(x)) for y, x in zip(*np.nonzero(mask))} == {(1, 1), (2, 2), (3, 3), (4, 4)}
    assert np.isfinite(v).all()
    assert v[0, 0] == 2.0 and v[3, 3] == 0.0
    assert out[2, 2] == 0.0 and out[0, 0] == img[0, 0]


def write_lsst_exposure(path, img, with_wcs=True):
    m, mh = lsst_mask(img.shape)
    var = np.full(img.shape, 1.0, np.float32)
    var[190:200, 0:10] = 0.0
    ih = fits.ImageHDU(img.astype(np.float32), name="IMAGE")
    if with_wcs:
        ih.header.update(make_wcs_header(img.shape))
    fits.HDUList([fits.PrimaryHDU(), ih, mh, fits.ImageHDU(var, name="VARIANCE")]).writeto(path)
    return m, var


def test_lsst_exposure_is_read_as_such(tmp_path):
    img = make_image()
    m, var = write_lsst_exposure(tmp_path / "calexp.fits", img)
    src = open_mosaic(tmp_path / "calexp.fits").detection
    assert (src.hdu, src.mask_hdu, src.variance_hdu) == ("IMAGE", "MASK", "VARIANCE")
    assert src.shape == SHAPE and src.wcs() is not None
    out, mask, v = src.read_window(FULL)
    expect = ((m & 0b11) != 0) | (var <= 0)
    np.testing.assert_array_equal(mask, expect)
    np.testing.assert_array_equal(out[~mask], img.astype(np.float32)[~mask])
    np.testing.assert_array_equal(v, var)


# ------------------------------------------------------------------------------------- runs with masks

def _masked_run(tmp_path, kind):
    """Tile 128 / halo 16 over 200 x 300: tile column 2 (x 256..299, window from x=240) is fully masked."""
    img = make_image()
    if kind == "nan":
        img[:, 240:] = np.nan
        img[118:123, 199] = np.nan  # a line through the source at (120, 200)
        fits.PrimaryHDU(img.astype(np.float32)).writeto(tmp_path / "in.fits")
    else:  # LSST exposure, the same pixels marked BAD in the mask plane
        m = np.zeros(SHAPE, np.int32)
        m[:, 240:] |= 1
        m[118:123, 199] |= 1
        m[40:45, 20:25] |= 1 << 5  # DETECTED only
        mh = fits.ImageHDU(m, name="MASK")
        mh.header["MP_BAD"], mh.header["MP_DETECTED"] = 0, 5
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img.astype(np.float32), name="IMAGE"), mh]).writeto(
            tmp_path / "in.fits")
    out = tmp_path / "out.zarr"
    result = run(str(tmp_path / "in.fits"), str(out), tile=128, set=["sep.halo=16"], workers=0)
    return result, out


@pytest.mark.parametrize("kind", ["nan", "mask_hdu"])
def test_run_respects_masks(tmp_path, kind):
    result, out = _masked_run(tmp_path, kind)
    assert not result.failures
    status = st.get_status(str(out))
    assert status.shape == (2, 3)
    np.testing.assert_array_equal(status[:, 2], [st.STATUS_NO_WORK] * 2)
    np.testing.assert_array_equal(status[:, :2], np.full((2, 2), st.STATUS_DONE))
    assert result.tiles["no work"] == 2
    cat = st.read_catalog(str(out), "sep")
    # the sources at x < 240 are all found; the ones in the masked columns are not
    assert len(cat["x"]) == 4
    assert (cat["x"] < 240).all()
    masked = (cat["flags"] & FLAG_MASKED) != 0
    near_line = (np.abs(cat["x"] - 200) < 3) & (np.abs(cat["y"] - 120) < 3)
    assert near_line.sum() == 1
    np.testing.assert_array_equal(masked, near_line)
    # the fully masked tiles' segmentation chunks are empty
    seg = zarr.open_array(str(out / "maps" / "sep" / "segmentation"), mode="r")[...]
    assert (seg[:, 256:] == 0).all()


# ----------------------------------------------------------------------------------------------- errors

def _assert_names(msg, path, *parts):
    assert str(path) in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


def test_cube_is_refused_unless_cube_bands(tmp_path):
    img = make_image().astype(np.float32)
    cube = np.stack([img, 2 * img, 3 * img])
    fits.PrimaryHDU(cube).writeto(tmp_path / "cube.fits")
    with pytest.raises(InputError) as e:
        open_mosaic(tmp_path / "cube.fits")
    _assert_names(str(e.value), tmp_path / "cube.fits", "HDU 0", "3-D cube", "(3, 200, 300)", "cube_bands")
    m = open_mosaic(tmp_path / "cube.fits", cube_bands=True)
    assert len(m.bands) == 3 and m.shape == SHAPE
    assert len({b.band for b in m.bands}) == 3
    for k, b in enumerate(m.bands):
        out, _, _ = b.read_window((10, 50, 20, 60))
        np.testing.assert_array_equal(out, cube[k, 10:50, 20:60])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_zero_size_image_is_refused(tmp_path, shape):
    fits.PrimaryHDU(np.zeros(shape, np.float32)).writeto(tmp_path / "empty.fits")
    with pytest.raises(InputError) as e:
        open_mosaic(tmp_path / "empty.fits")
    _assert_names(str(e.value), tmp_path / "empty.fits", "HDU 0", "zero-size", str(shape))


@pytest.mark.parametrize("content", ["random", "text"])
def test_corrupt_file_is_refused(tmp_path, content):
    p = tmp_path / "corrupt.fits"
    if content == "random":
        p.write_bytes(np.random.default_rng(3).bytes(20000))
    else:
        p.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(InputError) as e:
        open_mosaic(p)
    _assert_names(str(e.value), p, "not a readable FITS file")


def test_truncated_file_is_refused(tmp_path):
    full = tmp_path / "full.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(make_image().astype(np.float32), name="SCI")]).writeto(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[: len(data) - 100_000])
    with pytest.raises(InputError) as e:
        open_mosaic(cut)
    _assert_names(str(e.value), cut, "HDU 1", "truncated", str(len(data)), str(len(data) - 100_000))
    # cut inside the header: still a clear InputError naming the file
    cut.write_bytes(data[:1000])
    with pytest.raises(InputError) as e:
        open_mosaic(cut)
    assert str(cut) in str(e.value)


def test_missing_hdu_lists_the_hdus(tmp_path):
    p = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(make_image().astype(np.float32), name="SCI"),
                  fits.ImageHDU(np.zeros(SHAPE, np.float32), name="WHT")]).writeto(p)
    with pytest.raises(InputError) as e:
        open_mosaic(p, hdu="IMAGEX")
    _assert_names(str(e.value), p, "'IMAGEX'", "not found", "PRIMARY", "SCI", "WHT")
    # the names and numbers that exist work; a number given as text (--hdu 1) is a number
    img = make_image().astype(np.float32)
    for hdu in ("SCI", 1, "1"):
        out, _, _ = open_mosaic(p, hdu=hdu).detection.read_window(FULL)
        np.testing.assert_array_equal(out, img)
    with pytest.raises(InputError) as e:
        open_mosaic(p, hdu=7)
    _assert_names(str(e.value), p, "7", "not found", "SCI")
    # without --hdu: the primary holds no data, the first image extension is taken
    assert open_mosaic(p).detection.hdu == 1
    with pytest.raises(InputError) as e:
        open_mosaic(p, hdu=0)
    _assert_names(str(e.value), p, "HDU 0", "no image data")


def test_mask_hdu_of_other_shape_is_refused(tmp_path):
    p = tmp_path / "m.fits"
    fits.HDUList([fits.PrimaryHDU(make_image().astype(np.float32)),
                  fits.ImageHDU(np.zeros((100, 300), np.int32), name="MASK")]).writeto(p)
    with pytest.raises(InputError) as e:
        open_mosaic(p)
    _assert_names(str(e.value), p, "mask HDU 'MASK'", "(100, 300)", "(200, 300)", "must match")


def test_missing_file_is_refused(tmp_path):
    p = tmp_path / "nope.fits"
    with pytest.raises(InputError) as e:
        open_mosaic(p)
    _assert_names(str(e.value), p, "no such file")


# ----------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("window", [(10, 50, 20, 90), (0, 1, 0, 300), (150, 200, 250, 300), (37, 38, 99, 100)])
def test_read_window_equals_slice_of_full_image(tmp_path, window):
    img = make_image().astype(np.float32)
    img[40:45, 60:70] = np.nan
    m = np.zeros(SHAPE, np.int16)
    m[170:180, 260:280] = 4
    var = np.full(SHAPE, 3.0, np.float32)
    var[0, :] = 0
    fits.HDUList([fits.PrimaryHDU(img), fits.ImageHDU(m, name="MASK"),
                  fits.ImageHDU(var, name="VARIANCE")]).writeto(tmp_path / "w.fits")
    src = open_mosaic(tmp_path / "w.fits").detection
    full = src.read_window(FULL)
    part = src.read_window(window)
    y0, y1, x0, x1 = window
    for a, b in zip(full, part):
        np.testing.assert_array_equal(b, a[y0:y1, x0:x1])
    assert full[1].any()


def test_zarr_array_input_with_wcs(tmp_path):
    img = make_image().astype(np.float32)
    hdr = make_wcs_header()
    path = tmp_path / "mosaic.zarr"
    arr = zarr.create_array(store=str(path), shape=SHAPE, dtype="float32", chunks=(64, 64))
    arr[...] = img
    arr.attrs["wcs"] = dict(hdr)
    src = open_mosaic(path).detection
    assert src.kind == "zarr" and src.shape == SHAPE
    np.testing.assert_array_equal(src.read_window(FULL)[0], img)
    np.testing.assert_array_equal(src.read_window((10, 50, 20, 90))[0], img[10:50, 20:90])
    w = src.wcs()
    assert w is not None and w.has_celestial
    np.testing.assert_allclose(w.all_pix2world([[149.5, 99.5]], 0)[0], [150.0, 2.0], atol=1e-9)
    # a run over it puts ra/dec from that WCS into the catalog
    out = tmp_path / "out.zarr"
    result = run(str(path), str(out), tile=128, set=["sep.halo=16"], workers=0)
    assert result.n_objects["sep"] == len(SOURCES)
    cat = st.read_catalog(str(out), "sep")
    ra, dec = WCS(hdr).all_pix2world(cat["x"], cat["y"], 0)
    np.testing.assert_allclose(cat["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(cat["dec"], dec, atol=1e-9)


def test_zarr_array_without_wcs_and_nan(tmp_path):
    img = make_image().astype(np.float32)
    img[5, 5] = np.nan
    path = tmp_path / "plain.zarr"
    arr = zarr.create_array(store=str(path), shape=SHAPE, dtype=">f8", chunks=(100, 100))
    arr[...] = img
    src = open_mosaic(path).detection
    assert src.wcs() is None
    out, mask, var = src.read_window(FULL)
    assert out.dtype == np.float32 and out.dtype.isnative and var is None
    assert mask[5, 5] and mask.sum() == 1 and out[5, 5] == 0


# ------------------------------------------------------------------------------------------- multi-band

def test_multi_band_run_detects_on_first_band(tmp_path):
    g_src, r_src = SOURCES[:2], SOURCES[2:]
    fits.PrimaryHDU(make_image(sources=g_src).astype(np.float32)).writeto(tmp_path / "band_g.fits")
    fits.PrimaryHDU(make_image(seed=1, sources=r_src).astype(np.float32)).writeto(tmp_path / "band_r.fits")
    for order, expect in ((("g", "r"), g_src), (("r", "g"), r_src)):
        out = tmp_path / f"{''.join(order)}.zarr"
        result = run([str(tmp_path / f"band_{b}.fits") for b in order], str(out), tile=128,
                     set=["sep.halo=16"], workers=0)
        assert not result.failures
        cat = st.read_catalog(str(out), "sep")
        found = sorted(zip(np.round(cat["y"]).astype(int), np.round(cat["x"]).astype(int)))
        assert found == sorted(expect)
        inputs = zarr.open_group(str(out), mode="r").attrs["deepmosaic"]["inputs"]
        assert [i["path"] for i in inputs] == [str(tmp_path / f"band_{b}.fits") for b in order]


def test_multi_band_run_refuses_different_shapes(tmp_path):
    fits.PrimaryHDU(make_image().astype(np.float32)).writeto(tmp_path / "band_g.fits")
    fits.PrimaryHDU(make_image(shape=(150, 300)).astype(np.float32)).writeto(tmp_path / "band_r.fits")
    out = tmp_path / "out.zarr"
    with pytest.raises((ConfigError, InputError)) as e:
        run([str(tmp_path / "band_g.fits"), str(tmp_path / "band_r.fits")], str(out), tile=128, workers=0)
    msg = str(e.value)
    assert "different shapes" in msg and "(200, 300)" in msg and "(150, 300)" in msg
    assert not out.exists()
