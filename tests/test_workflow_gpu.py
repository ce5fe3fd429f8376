"""GPU routing: a model stage (Dask resource GPU) runs only on the workers that declare a GPU, sep on the
others, and the store equals an in-process run's. No GPU exists on the machines this runs on: the GPU worker
declares the resource GPU=1 (a fake one) and its model runs on its CPU, which is all routing needs."""
import numpy as np
import pytest
import zarr

from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.execute import SyncExecutor
from deepmosaic.pipeline.runner import stage_parts
from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import read_catalog
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.tasks.clumps_task import ClumpsTask
from deepmosaic.tasks.sep_task import SepTask
from deepmosaic.workflows import run
from deepmosaic.workflows.clusters import open_executor
from deepmosaic.workflows.spec import ClusterSpec


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img, _ = write_simulation(simulate_mosaic(SimConfig(size=(256, 256), seed=21)),
                              tmp_path_factory.mktemp("gpu") / "m.fits")
    return str(img)


def test_in_process_and_cpu_only_runs_keep_one_part():
    tasks = [SepTask(), ClumpsTask()]
    assert ClumpsTask.resources == {"GPU": 1} and not SepTask.resources
    assert stage_parts(tasks, SyncExecutor()) == [((0, 2), {})]


def test_model_stage_runs_on_the_gpu_worker_sep_on_the_cpu_worker(image, tmp_path):
    from distributed import get_task_stream
    spec = from_mapping(ClusterSpec, {"kind": "local", "workers": 1, "gpus": 1})
    with open_executor(spec, str(tmp_path)) as ex:
        workers = ex.client.scheduler_info(n_workers=-1)["workers"]
        gpu = {a for a, w in workers.items() if w["resources"].get("GPU")}
        cpu = set(workers) - gpu
        assert len(gpu) == 1 and len(cpu) == 1
        assert stage_parts([SepTask(), ClumpsTask()], ex) == [((0, 1), {"CPU": 1}), ((1, 2), {"GPU": 1})]
        with get_task_stream(ex.client) as ts:
            res = run(image, tmp_path / "mixed.zarr", stages="sep,clumps", tile=128, executor=ex)
        where: dict[str, set] = {}
        for t in ts.data:
            name = t["key"] if isinstance(t["key"], str) else str(t["key"])
            if name.startswith("process_tile-part"):
                where.setdefault(name.split("-")[1], set()).add(t["worker"])
    assert not res.failures and res.recomputed_tiles == 4
    assert where == {"part0": cpu, "part1": gpu}, where

    run(image, tmp_path / "sync.zarr", stages="sep,clumps", tile=128, workers=0)
    for stage in ("sep", "clumps"):
        a, b = read_catalog(str(tmp_path / "mixed.zarr"), stage), read_catalog(str(tmp_path / "sync.zarr"), stage)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{stage}.{k}")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "mixed.zarr/maps/clumps/segmentation"))[...],
                                  zarr.open_array(str(tmp_path / "sync.zarr/maps/clumps/segmentation"))[...])


def test_cpu_only_cluster_runs_model_stages_anywhere(tmp_path):
    spec = from_mapping(ClusterSpec, {"kind": "local", "workers": 1})
    with open_executor(spec, str(tmp_path)) as ex:
        assert not ex.routes({"GPU": 1})
        assert stage_parts([SepTask(), ClumpsTask()], ex) == [((0, 2), {})]
