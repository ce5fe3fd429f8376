"""Execution modes give identical stores; workers read their own pixels (the client ships none)."""
import pickle

import numpy as np
import pytest
import zarr

from deepmosaic.pipeline.io import open_mosaic
from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import read_catalog
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.workflows import run


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    sim = simulate_mosaic(SimConfig(size=(700, 900), seed=8))
    img, _ = write_simulation(sim, tmp_path_factory.mktemp("exec") / "m.fits")
    return str(img)


def _same(a, b):
    ca, cb = read_catalog(a, "sep"), read_catalog(b, "sep")
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    np.testing.assert_array_equal(zarr.open_array(f"{a}/maps/sep/segmentation")[...],
                                  zarr.open_array(f"{b}/maps/sep/segmentation")[...])


def test_sync_local_cluster_and_existing_scheduler_agree(image, tmp_path):
    from distributed import LocalCluster
    run(image, tmp_path / "sync.zarr", tile=256, workers=0)
    run(image, tmp_path / "local.zarr", tile=256, workers=2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        run(image, tmp_path / "attached.zarr", tile=256, scheduler=cluster.scheduler_address)
    _same(str(tmp_path / "sync.zarr"), str(tmp_path / "local.zarr"))
    _same(str(tmp_path / "sync.zarr"), str(tmp_path / "attached.zarr"))


def test_tile_tasks_carry_no_pixels(image):
    """What the client sends per tile (source description, stages, background mesh, tile) is tiny."""
    from deepmosaic.pipeline.background import BackgroundModel
    from deepmosaic.pipeline.tiling import TileGrid
    from deepmosaic.tasks.sep_task import SepTask
    mosaic = open_mosaic(image)
    grid = TileGrid(mosaic.shape, 256, 64)
    model = BackgroundModel.from_meshes(np.ones((11, 15)), np.ones((11, 15)), 64)
    args = ("out.zarr", mosaic, (SepTask(),), model, grid, grid.tile(1, 1))
    size = len(pickle.dumps(args))
    assert size < 100_000, f"{size} bytes per task"
    assert size < mosaic.shape[0] * mosaic.shape[1] * 4 / 20


def _malloc_env():
    import os
    from deepmosaic.pipeline.execute import WORKER_MALLOC_ENV
    return {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}


def test_local_workers_get_the_allocator_settings_and_user_values_win(monkeypatch):
    """Local process workers start with the malloc settings (each a fresh mmap + page faults per tile
    buffer otherwise, and Dask's own trim threshold hands the heap back after every free); values the user
    exported override ours, and Dask's other pre-spawn variables are kept."""
    from deepmosaic.pipeline.execute import WORKER_MALLOC_ENV, executor, worker_spawn_environ
    for k in WORKER_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    env = worker_spawn_environ()
    assert {k: env[k] for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) > 65536  # not Dask's default
    assert env.get("OMP_NUM_THREADS") in (1, "1")  # Dask's own entries stay
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    with executor(workers=1) as ex:
        seen = list(ex.client.run(_malloc_env).values())
    assert seen == [{**WORKER_MALLOC_ENV, "MALLOC_TRIM_THRESHOLD_": "1048576"}]
