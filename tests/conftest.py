"""Shared fixtures: simulated mosaics are made once per session (seeded) in a temporary folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts) -> Path:
    """Path under ../shared/data, or skip the test with a reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} not present (../shared/data is only beside the project checkout)")
    return p


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 (make test-all) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def field_4096(tmp_path_factory):
    """A 3000 x 4096 simulated field (not a multiple of 512) with objects planted on a 512 grid's seams."""
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    d = tmp_path_factory.mktemp("field4096")
    sim = simulate_mosaic(SimConfig(size=(3000, 4096), seed=11, plant_seams=512))
    image, truth = write_simulation(sim, d / "field.fits")
    return {"image": str(image), "truth": str(truth), "sim": sim, "dir": d}


def simulated_run(folder: Path, size=(512, 512), seed=1, stages="sep,photutils", tile=256) -> dict:
    """Simulate a field into ``folder``, run ``stages`` over it synchronously; paths of image, truth, store."""
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    from deepmosaic.workflows import run
    sim = simulate_mosaic(SimConfig(size=size, seed=seed))
    image, truth = write_simulation(sim, folder / "field.fits")
    store = folder / "field.zarr"
    run(str(image), str(store), stages=stages, tile=tile, workers=0)
    return {"image": str(image), "truth": str(truth), "store": str(store), "dir": folder}
