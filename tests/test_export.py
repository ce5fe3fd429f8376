"""``deepmosaic export``: FITS/ECSV/Parquet tables with units, overwrite protection, CLI error exits."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from deepmosaic.pipeline.store import read_catalog
from deepmosaic.workflows import run
from deepmosaic.workflows.cli import main

SHAPE = (200, 300)
SOURCES = ((50, 60), (120, 200), (150, 80), (40, 170), (170, 260))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    img = 100.0 + rng.normal(0.0, 1.0, SHAPE)
    for y, x in SOURCES:
        img += 200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [150.5, 100.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    fits.PrimaryHDU(img.astype(np.float32), header=w.to_header()).writeto(d / "field.fits")
    out = d / "field.zarr"
    result = run(str(d / "field.fits"), str(out), tile=128, set=["sep.halo=16"], workers=0)
    assert result.n_objects["sep"] == len(SOURCES)
    return out


def _export(capsys, store, *args):
    rc = main(["export", str(store), *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


EXPECTED_ORDER = ["id", "x", "y", "flux", "flux_err", "flux_aper", "kron_radius", "a", "b", "theta", "npix", "peak",
                  "flags", "tile_row", "tile_col", "ra", "dec"]


@pytest.mark.parametrize("fmt,ext,read_fmt", [("fits", ".fits", "fits"), ("ecsv", ".ecsv", "ascii.ecsv")])
def test_export_tables_round_trip_with_units(store, tmp_path, capsys, fmt, ext, read_fmt):
    rc, out, err = _export(capsys, store, "--format", fmt, "--out-dir", str(tmp_path))
    assert rc == 0, err
    path = tmp_path / f"field_sep{ext}"
    assert out.strip() == str(path)
    t = Table.read(path, format=read_fmt)
    cat = read_catalog(str(store), "sep")
    assert len(t) == len(cat["id"]) == len(SOURCES)
    assert t.colnames == EXPECTED_ORDER
    for name, values in cat.items():
        np.testing.assert_array_equal(np.asarray(t[name]), values, err_msg=name)
    assert t["x"].unit == u.pix and t["y"].unit == u.pix
    assert t["ra"].unit == u.deg and t["dec"].unit == u.deg
    assert t["theta"].unit == u.rad and t["npix"].unit == u.pix ** 2
    assert t["id"].unit is None and t["flags"].unit is None
    assert np.isfinite(t["ra"]).all() and (np.abs(t["ra"] - 150) < 0.1).all()
    assert {k.lower(): v for k, v in t.meta.items()}.get("stage") == "sep"


def test_export_default_out_dir_is_beside_the_store(store, capsys):
    path = store.parent / "field_sep.ecsv"
    try:
        rc, out, err = _export(capsys, store, "--format", "ecsv", "--stage", "sep")
        assert rc == 0, err
        assert out.strip() == str(path) and path.exists()
    finally:
        path.unlink(missing_ok=True)


def test_export_parquet_works_or_says_what_is_missing(store, tmp_path, capsys):
    rc, out, err = _export(capsys, store, "--format", "parquet", "--out-dir", str(tmp_path))
    path = tmp_path / "field_sep.parquet"
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert rc == 2
        assert err.startswith("deepmosaic: error:") and "pyarrow" in err and "pip install" in err
        assert not path.exists()
        return
    assert rc == 0, err
    t = Table.read(path, format="parquet")
    assert len(t) == len(SOURCES) and t["x"].unit == u.pix and t["ra"].unit == u.deg


def test_export_refuses_to_overwrite(store, tmp_path, capsys):
    rc, _, err = _export(capsys, store, "--format", "fits", "--out-dir", str(tmp_path))
    assert rc == 0, err
    path = tmp_path / "field_sep.fits"
    path.write_bytes(b"sentinel")  # to see whether it is replaced
    rc, out, err = _export(capsys, store, "--format", "fits", "--out-dir", str(tmp_path))
    assert rc == 2
    assert err.startswith("deepmosaic: error:") and str(path) in err and "--overwrite" in err
    assert path.read_bytes() == b"sentinel"
    rc, out, err = _export(capsys, store, "--format", "fits", "--out-dir", str(tmp_path), "--overwrite")
    assert rc == 0, err
    assert len(Table.read(path)) == len(SOURCES)


def test_export_unknown_stage_and_missing_store(store, tmp_path, capsys):
    rc, _, err = _export(capsys, store, "--stage", "nope", "--out-dir", str(tmp_path))
    assert rc == 2 and "deepmosaic: error:" in err and "'nope'" in err and "sep" in err
    rc, _, err = _export(capsys, tmp_path / "missing.zarr")
    assert rc == 2 and "deepmosaic: error:" in err and "missing.zarr" in err and "no such store" in err


def test_cli_error_exit_code_and_message(tmp_path, capsys):
    missing = tmp_path / "missing.fits"
    rc = main(["run", str(missing), "--out", str(tmp_path / "o.zarr"), "--sync"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("deepmosaic: error:")
    assert str(missing) in err and "no such file" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.zarr").exists()


def test_cli_run_bad_set_exit_code(store, tmp_path, capsys):
    image = store.parent / "field.fits"
    rc = main(["run", str(image), "--out", str(tmp_path / "o.zarr"), "--sync", "--set", "sep.thresholdd=2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("deepmosaic: error:") and "'thresholdd'" in err and "'thresh'" in err


def test_cli_run_then_export(store, tmp_path, capsys):
    image = store.parent / "field.fits"
    out = tmp_path / "cli.zarr"
    rc = main(["run", str(image), "--out", str(out), "--sync", "--tile", "128", "--set", "sep.halo=16",
               "--hdu", "0"])
    text = capsys.readouterr().out
    assert rc == 0 and f"sep: {len(SOURCES)}" in text
    rc, out_text, err = _export(capsys, out, "--format", "ecsv")
    assert rc == 0, err
    t = Table.read(out_text.strip(), format="ascii.ecsv")
    ref = read_catalog(str(store), "sep")
    np.testing.assert_allclose(np.asarray(t["x"]), ref["x"])
    np.testing.assert_array_equal(np.asarray(t["id"]), ref["id"])
