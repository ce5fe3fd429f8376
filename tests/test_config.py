"""Configuration: unknown keys/stages, coercion and validation of values, --set parsing, halo vs tile,
safe YAML, the tile grid's geometry, and what happens when the output store already exists."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
import zarr
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.config import from_mapping, parse_set_options
from deepmosaic.pipeline.errors import ConfigError, StoreError
from deepmosaic.pipeline.tiling import TileGrid
from deepmosaic.tasks.sep_task import SepConfig
from deepmosaic.workflows import run
from deepmosaic.workflows.api import build_tasks, resolve

SHAPE = (200, 300)
SOURCES = ((50, 60), (120, 200), (150, 80))


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    img = 100.0 + rng.normal(0.0, 1.0, SHAPE)
    for y, x in SOURCES:
        img += 200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0)
    p = tmp_path / "img.fits"
    fits.PrimaryHDU(img.astype(np.float32)).writeto(p)
    return str(p)


def _run(image, out, **kw):
    kw.setdefault("tile", 128)
    kw.setdefault("workers", 0)
    return run(image, str(out), **kw)


def _meta(out):
    return zarr.open_group(str(out), mode="r").attrs["deepmosaic"]


# ------------------------------------------------------------------------------------------ unknown keys

def _assert_unknown_key(msg):
    assert "'thresholdd'" in msg
    assert "Did you mean 'thresh'?" in msg
    assert "Valid keys:" in msg
    for k in ("thresh", "minarea", "deblend_cont", "halo", "back_size"):
        assert k in msg.split("Valid keys:")[1]


def test_unknown_stage_key_via_set(image, tmp_path):
    out = tmp_path / "out.zarr"
    with pytest.raises(ConfigError) as e:
        _run(image, out, set=["sep.thresholdd=2"])
    _assert_unknown_key(str(e.value))
    assert str(e.value).startswith("sep:")
    assert not out.exists()


def test_unknown_stage_key_via_yaml(image, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stages: [sep]\ntile: 128\nsep:\n  thresholdd: 2\n")
    with pytest.raises(ConfigError) as e:
        _run(image, tmp_path / "out.zarr", config=str(cfg))
    _assert_unknown_key(str(e.value))


def test_unknown_top_level_yaml_key(image, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tiles: 128\n")
    with pytest.raises(ConfigError) as e:
        _run(image, tmp_path / "out.zarr", config=str(cfg))
    msg = str(e.value)
    assert "'tiles'" in msg and "tile" in msg and "sep" in msg


@pytest.mark.parametrize("how", ["stages", "set", "yaml"])
def test_unknown_stage_name_lists_valid_stages(image, tmp_path, how):
    kw = {"stages": "sepp"} if how == "stages" else {"set": ["sepp.thresh=2"]} if how == "set" else {}
    if how == "yaml":
        cfg = tmp_path / "run.yaml"
        cfg.write_text("stages: [sepp]\n")
        kw["config"] = str(cfg)
    with pytest.raises(ConfigError) as e:
        _run(image, tmp_path / "out.zarr", **kw)
    msg = str(e.value)
    assert "unknown stage 'sepp'" in msg and "Valid stages:" in msg and "sep" in msg.split("Valid stages:")[1]


def test_empty_stages_refused():
    with pytest.raises(ConfigError) as e:
        build_tasks([], {})
    assert "--stages is empty" in str(e.value)


# ------------------------------------------------------------------------------------ coercion, values

def test_set_value_is_coerced_and_reaches_stage_config(image, tmp_path):
    stages, params, tile, _ = resolve(None, ["sep.deblend_cont=1.0", "sep.minarea=7", "sep.clean=false",
                                             "sep.gain=none"], None, 128)
    (task,) = build_tasks(stages, params)
    assert isinstance(task.config.deblend_cont, float) and task.config.deblend_cont == 1.0
    assert task.config.minarea == 7 and isinstance(task.config.minarea, int)
    assert task.config.clean is False and task.config.gain is None
    # ... and the run uses it: the store records the resolved stage config
    out = tmp_path / "out.zarr"
    _run(image, out, set=["sep.deblend_cont=1.0", "sep.halo=16"])
    cfg = _meta(out)["config"]["stages"]["sep"]["config"]
    assert cfg["deblend_cont"] == 1.0 and isinstance(cfg["deblend_cont"], float)
    assert cfg["halo"] == 16
    assert _meta(out)["config"]["halo"] == 16


def test_set_overrides_yaml(tmp_path):
    cfg = {"tile": 256, "sep": {"thresh": 3, "minarea": 4}}
    stages, params, tile, _ = resolve(None, ["sep.thresh=2.5"], cfg, None)
    assert stages == ["sep"] and tile == 256
    (task,) = build_tasks(stages, params)
    assert task.config.thresh == 2.5 and task.config.minarea == 4


@pytest.mark.parametrize("item,param,echo", [
    ("sep.minarea=0", "minarea", "sep.minarea=0"),
    ("sep.filter_type=foo", "filter_type", "sep.filter_type='foo'"),
    ("sep.back_filter_size=4", "back_filter_size", "sep.back_filter_size=4"),
    ("sep.thresh=abc", "thresh", "sep.thresh='abc'"),
    ("sep.thresh=-1", "thresh", "sep.thresh=-1.0"),
    ("sep.minarea=2.5", "minarea", "sep.minarea='2.5'"),
    ("sep.minarea=nan", "minarea", "sep.minarea='nan'"),
    ("sep.minarea=inf", "minarea", "sep.minarea='inf'"),
    ("sep.clean=maybe", "clean", "sep.clean='maybe'"),
    ("sep.filter_kernel=gauss:x", "filter_kernel", "sep.filter_kernel='gauss:x'"),
    ("sep.deblend_cont=2", "deblend_cont", "sep.deblend_cont=2.0"),
])
def test_bad_values_name_the_parameter_and_echo_the_value(image, tmp_path, item, param, echo):
    out = tmp_path / "out.zarr"
    with pytest.raises(ConfigError) as e:
        _run(image, out, set=[item])
    assert param in str(e.value)
    assert echo in str(e.value), str(e.value)
    assert not out.exists()


def test_from_mapping_accepts_yaml_types():
    cfg = from_mapping(SepConfig, {"thresh": 2, "halo": 32.0, "clean": "yes", "gain": "2"})
    assert cfg.thresh == 2.0 and isinstance(cfg.thresh, float)
    assert cfg.halo == 32 and isinstance(cfg.halo, int)
    assert cfg.clean is True and cfg.gain == 2.0
    with pytest.raises(ConfigError, match=r"sep.halo=True: expected an integer"):
        from_mapping(SepConfig, {"halo": True})


@pytest.mark.parametrize("item", ["sep.thresh", "thresh=2", "=2", "sep.thresh:2", ""])
def test_parse_set_options_refuses_malformed_items(item):
    with pytest.raises(ConfigError) as e:
        parse_set_options([item])
    msg = str(e.value)
    assert repr(item) in msg and "STAGE.PARAM=VALUE" in msg


def test_parse_set_options_parses():
    assert parse_set_options(["sep.thresh=2", " sep.filter_kernel = gauss:2.5 ", "a.b=x=y"]) == {
        "sep": {"thresh": "2", "filter_kernel": "gauss:2.5"}, "a": {"b": "x=y"}}
    assert parse_set_options(None) == {}


# ------------------------------------------------------------------------------------------ halo vs tile

@pytest.mark.parametrize("tile,halo", [(64, 100), (64, 64)])
def test_halo_larger_than_core_refused(image, tmp_path, tile, halo):
    out = tmp_path / "out.zarr"
    with pytest.raises(ConfigError) as e:
        _run(image, out, tile=tile, set=[f"sep.halo={halo}"])
    msg = str(e.value)
    assert f"halo={halo}" in msg and f"{tile}x{tile}" in msg
    assert not out.exists()


def test_halo_larger_than_core_refused_via_yaml(image, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tile: 64\nsep:\n  halo: 100\n")
    with pytest.raises(ConfigError) as e:
        run(image, str(tmp_path / "out.zarr"), config=str(cfg), workers=0)
    assert "100" in str(e.value) and "64" in str(e.value)


def test_tilegrid_refuses_halo_not_fitting():
    with pytest.raises(ConfigError) as e:
        TileGrid((200, 300), core=(64, 32), halo=40)
    assert "halo=40" in str(e.value) and "64x32" in str(e.value)
    TileGrid((200, 300), core=(64, 32), halo=31)  # fits
    with pytest.raises(ConfigError, match="at least 16"):
        TileGrid((200, 300), core=8, halo=0)
    with pytest.raises(ConfigError, match="halo=-1"):
        TileGrid((200, 300), core=64, halo=-1)
    with pytest.raises(ConfigError, match="shape"):
        TileGrid((0, 300), core=64)


# ----------------------------------------------------------------------------------------------- YAML

def test_yaml_config_uses_a_safe_loader(image, tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"sep: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises((ConfigError, yaml.YAMLError)) as e:
        _run(image, tmp_path / "out.zarr", config=str(cfg))
    assert "python/object" in str(e.value)
    assert not marker.exists()
    cfg.write_text("sep: !!python/object:collections.OrderedDict {}\n")
    with pytest.raises((ConfigError, yaml.YAMLError)):
        _run(image, tmp_path / "out.zarr", config=str(cfg))
    assert not (tmp_path / "out.zarr").exists()


def test_yaml_config_must_be_a_mapping(image, tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- sep\n- tile\n")
    with pytest.raises(ConfigError, match="mapping"):
        _run(image, tmp_path / "out.zarr", config=str(cfg))
    with pytest.raises(ConfigError, match="no such file"):
        _run(image, tmp_path / "out.zarr", config=str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------------------------- tile grid

def _check_grid(grid: TileGrid):
    ny, nx = grid.shape
    cover = np.zeros(grid.shape, np.int32)
    tiles = list(grid)
    assert len(tiles) == len(grid) == grid.n_rows * grid.n_cols
    assert [t.index for t in tiles] == list(range(len(grid)))
    h = grid.halo
    for t in tiles:
        y0, y1, x0, x1 = t.core
        assert 0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx
        cover[y0:y1, x0:x1] += 1
        assert t.window == (max(0, y0 - h), min(ny, y1 + h), max(0, x0 - h), min(nx, x1 + h))
        assert grid.by_index(t.index) == t
        # the core cut out of a window-shaped array is the core
        win = np.arange(ny * nx).reshape(grid.shape)[t.window_slices]
        np.testing.assert_array_equal(win[t.core_in_window], np.arange(ny * nx).reshape(grid.shape)[t.core_slices])
    assert (cover == 1).all()  # exact cover, no overlap
    # ownership: every position (pixel centres, pixel edges, outside the mosaic) has exactly one owner
    ys = np.concatenate([np.arange(-2, ny + 2) - 0.5, np.arange(-1, ny + 1), [-0.5, -0.5000001, ny - 0.5, ny + 10.0],
                         np.arange(0, ny + 1, grid.core[0]) - 0.5, np.arange(0, ny + 1, grid.core[0]) - 0.5 - 1e-9])
    xs = np.concatenate([np.arange(-2, nx + 2) - 0.5, np.arange(-1, nx + 1), [-0.5, -0.5000001, nx - 0.5, nx + 10.0],
                         np.arange(0, nx + 1, grid.core[1]) - 0.5, np.arange(0, nx + 1, grid.core[1]) - 0.5 - 1e-9])
    yy, xx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    owners = np.zeros(len(yy), np.int32)
    owner_idx = np.full(len(yy), -1)
    for t in tiles:
        o = t.owns(yy, xx)
        owners += o
        owner_idx[o] = t.index
    assert (owners == 1).all()
    # tile_of agrees with owns (a sample, tile_of is scalar)
    for k in np.linspace(0, len(yy) - 1, 400).astype(int):
        assert grid.tile_of(yy[k], xx[k]).index == owner_idx[k]
    # pixel i's centre belongs to the tile whose core contains i
    for y in range(0, ny, max(1, ny // 7)):
        for x in range(0, nx, max(1, nx // 7)):
            t = grid.tile_of(y, x)
            assert t.core[0] <= y < t.core[1] and t.core[2] <= x < t.core[3]


@pytest.mark.parametrize("shape,core,halo", [
    ((200, 300), 64, 16), ((1, 1), 16, 0), ((17, 33), 16, 15), ((513, 1025), 512, 64), ((100, 100), 100, 99),
    ((255, 97), (64, 32), 20), ((31, 16), 16, 3),
])
def test_tilegrid_geometry(shape, core, halo):
    grid = TileGrid(shape, core, halo)
    _check_grid(grid)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ny=hst.integers(1, 260), nx=hst.integers(1, 260), cy=hst.integers(16, 90), cx=hst.integers(16, 90),
       data=hst.data())
def test_tilegrid_geometry_property(ny, nx, cy, cx, data):
    halo = data.draw(hst.integers(0, min(cy, cx) - 1))
    _check_grid(TileGrid((ny, nx), (cy, cx), halo))


@settings(max_examples=200, deadline=None)
@given(ny=hst.integers(1, 400), nx=hst.integers(1, 400), core=hst.integers(16, 128),
       y=hst.floats(-50, 450, allow_nan=False), x=hst.floats(-50, 450, allow_nan=False))
def test_tile_of_and_owns_agree_anywhere(ny, nx, core, y, x):
    grid = TileGrid((ny, nx), core, 0)
    owners = [t.index for t in grid if t.owns(y, x)]
    assert owners == [grid.tile_of(y, x).index]


# ------------------------------------------------------------------------------------ existing stores

def test_existing_store_refused_without_resume_or_overwrite(image, tmp_path):
    out = tmp_path / "out.zarr"
    first = _run(image, out, set=["sep.halo=16"])
    assert first.n_objects["sep"] == len(SOURCES)
    with pytest.raises(StoreError) as e:
        _run(image, out, set=["sep.halo=16"])
    msg = str(e.value)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert len(st.read_catalog(str(out), "sep")["x"]) == len(SOURCES)  # untouched
    again = _run(image, out, set=["sep.halo=16"], overwrite=True)
    assert again.n_objects["sep"] == len(SOURCES) and again.recomputed_tiles == 6


def test_resume_with_other_config_or_input_refused(image, tmp_path):
    out = tmp_path / "out.zarr"
    _run(image, out, set=["sep.halo=16"])
    with pytest.raises(StoreError) as e:
        _run(image, out, set=["sep.halo=16", "sep.thresh=3"], resume=True)
    assert "--resume refused" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(StoreError):
        _run(image, out, set=["sep.halo=16"], tile=64, resume=True)
    other = tmp_path / "other.fits"
    data = fits.getdata(image)
    fits.PrimaryHDU(data + 1).writeto(other)
    with pytest.raises(StoreError, match="different input"):
        _run(str(other), out, set=["sep.halo=16"], resume=True)


def test_resume_finishes_failed_tiles(image, tmp_path, monkeypatch):
    ref_out = tmp_path / "ref.zarr"
    _run(image, ref_out, set=["sep.halo=16"])
    ref = st.read_catalog(str(ref_out), "sep")
    # a run in which two tiles fail: no catalog yet, their status says failed
    from deepmosaic.pipeline import runner
    orig = runner.process_tile

    def flaky(store_path, mosaic, tasks, background, grid, tile):
        if (tile.row, tile.col) in ((0, 0), (0, 1)):
            return {"tile": tile.index, "status": st.STATUS_FAILED, "error": "RuntimeError: boom", "seconds": 0.0}
        return orig(store_path, mosaic, tasks, background, grid, tile)

    out = tmp_path / "out.zarr"
    monkeypatch.setattr(runner, "process_tile", flaky)
    bad = _run(image, out, set=["sep.halo=16"])
    assert len(bad.failures) == 2 and bad.n_objects == {}
    assert (st.get_status(str(out))[0, :2] == st.STATUS_FAILED).all()
    monkeypatch.setattr(runner, "process_tile", orig)
    res = _run(image, out, set=["sep.halo=16"], resume=True)
    assert res.recomputed_tiles == 2 and not res.failures
    assert (st.get_status(str(out)) == st.STATUS_DONE).all()
    cat = st.read_catalog(str(out), "sep")
    for k in ("id", "x", "y", "flux"):
        np.testing.assert_array_equal(cat[k], ref[k])


def test_resume_of_finished_store_keeps_catalog(image, tmp_path):
    out = tmp_path / "out.zarr"
    _run(image, out, set=["sep.halo=16"])
    res = _run(image, out, set=["sep.halo=16"], resume=True)
    assert res.recomputed_tiles == 0
    assert len(st.read_catalog(str(out), "sep")["x"]) == len(SOURCES)
