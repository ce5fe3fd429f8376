"""An interrupted run (SIGKILL mid-way) finished with --resume gives a store identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import STATUS_DONE, read_catalog
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.workflows import run


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    sim = simulate_mosaic(SimConfig(size=(1536, 1536), seed=5))
    img, _ = write_simulation(sim, d / "m.fits")
    return str(img)


def _store_equal(a, b):
    ca, cb = read_catalog(a, "sep"), read_catalog(b, "sep")
    assert list(ca) == list(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    for name in ("segmentation", "background"):
        np.testing.assert_array_equal(zarr.open_array(f"{a}/maps/sep/{name}")[...],
                                      zarr.open_array(f"{b}/maps/sep/{name}")[...])
    np.testing.assert_array_equal(zarr.open_array(f"{a}/tiles/status")[...],
                                  zarr.open_array(f"{b}/tiles/status")[...])


def test_resume_after_kill_gives_identical_store(image, tmp_path):
    ref = tmp_path / "ref.zarr"
    run(image, ref, tile=128, workers=0)
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "deepmosaic.workflows.cli", "run", image, "--out", str(out), "--tile", "128",
           "--sync"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_done, t0 = 0, time.time()
    try:
        while time.time() - t0 < 120 and proc.poll() is None:
            status_path = out / "tiles" / "status"
            if status_path.exists():
                try:
                    n_done = int((zarr.open_array(str(status_path), mode="r")[...] == STATUS_DONE).sum())
                except Exception:
                    n_done = 0  # the array is being written: look again
            if n_done >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; make the field larger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    status = zarr.open_array(str(out / "tiles" / "status"))[...]
    assert 0 < (status == STATUS_DONE).sum() < status.size, "killed mid-way"
    assert not (out / "catalogs" / "sep").exists(), "no catalog before the run finishes"
    res = run(image, out, tile=128, workers=0, resume=True)
    assert 0 < res.recomputed_tiles < status.size
    _store_equal(str(ref), str(out))
    # and a second resume has nothing left to do
    assert run(image, out, tile=128, workers=0, resume=True).recomputed_tiles == 0
