"""HPC mode through a real batch scheduler: a simulated mosaic processed by Dask workers running as Slurm
jobs (TLS with temporary credentials) gives the same store as an in-process run. Needs the single-node
Slurm of `make slurm-up` (.ci/run starts it); skips with the reason where Slurm is not up."""
import ast
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import zarr

from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.execute import WORKER_MALLOC_ENV
from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import read_catalog
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.workflows.clusters import jobqueue_kwargs, make_security
from deepmosaic.workflows.nightly import run_workflow
from deepmosaic.workflows.spec import ClusterSpec, load_workflow, parse_workflow


def _slurm_idle() -> str | None:
    """None when a Slurm partition has an idle node, else why not."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm is not installed (run `make slurm-up`, as root on Debian)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"Slurm is not running (sinfo: {out.stderr.strip() or out.returncode}); run `make slurm-up`"
    if not any(s.startswith(("idle", "mix")) for s in out.stdout.split()):
        return f"no idle Slurm node (sinfo states: {out.stdout.split()})"
    return None


@pytest.mark.parametrize("kind", ["slurm", "sge"])
def test_batch_job_script_from_the_workflow(tmp_path, kind):
    """The shipped Slurm example (and the same resources on SGE) becomes a job script with its resources,
    TLS and a private key folder (no scheduler needed: the cluster is built and closed, no job submitted)."""
    import dask_jobqueue
    from importlib.resources import files
    spec = load_workflow(str(files("deepmosaic.workflows") / "slurm.yaml")).cluster
    spec = from_mapping(ClusterSpec, {**{k: getattr(spec, k) for k in ClusterSpec.__dataclass_fields__},
                                      "kind": kind, "job_directives": ["--nice=10" if kind == "slurm" else "-pe smp 1"],
                                      "gpus": 1, "account": "survey"})
    secrets = tmp_path / ".tls-x"
    secrets.mkdir(mode=0o700)
    out = tmp_path / "out"
    out.mkdir()
    cls = {"slurm": dask_jobqueue.SLURMCluster, "sge": dask_jobqueue.SGECluster}[kind]
    cluster = cls(security=make_security(spec), **jobqueue_kwargs(spec, str(out), str(secrets)))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    expected = {"slurm": ["#SBATCH -p debug", "#SBATCH -A survey", "#SBATCH --mem=2G", "#SBATCH -t 00:30:00",
                          "#SBATCH --nice=10", "#SBATCH --gres=gpu:1"],
                "sge": ["#$ -q debug", "#$ -P survey", "#$ -l h_rt=00:30:00", "#$ -pe smp 1"]}[kind]
    for line in expected + ["tls://", "--tls-key", "--resources GPU=1", "--interface lo",
                            f"--local-directory {out}/dask-worker-space", f"{out}/logs/"]:
        assert line in script, (line, script)
    key = next(a for a in script.split() if ".worker.key." in a)
    assert os.path.dirname(key) == str(secrets) and stat.S_IMODE(os.stat(secrets).st_mode) == 0o700
    # the batch workers get the local workers' allocator settings through the nanny's pre-spawn environment
    export = next(line for line in script.splitlines() if "PRE_SPAWN_ENVIRON" in line)
    shown = subprocess.run(["bash", "-c", f"{export}; {sys.executable} -c 'import dask, distributed; "
                            f"print(dict(dask.config.get(\"distributed.nanny.pre-spawn-environ\")))'"],
                           capture_output=True, text=True, check=True).stdout
    env = ast.literal_eval(shown.strip())
    assert {k: env[k] for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV and env["OMP_NUM_THREADS"] in (1, "1")


@pytest.mark.slurm
def test_mosaic_through_slurm_jobs_equals_a_local_run(tmp_path):
    why = _slurm_idle()
    if why:
        pytest.skip(why)
    img, _ = write_simulation(simulate_mosaic(SimConfig(size=(512, 768), seed=31)), tmp_path / "m.fits")
    common = {"inputs": [str(img)], "tile": 256, "stages": ["sep"]}
    slurm = parse_workflow({**common, "output": "slurm_out",
                            "cluster": {"kind": "slurm", "queue": "debug", "jobs": 2, "cores": 1, "memory": "1GB",
                                        "walltime": "00:10:00", "interface": "lo", "timeout": 120}},
                           path=str(tmp_path / "slurm.yaml"))
    assert slurm.cluster.use_tls
    res = run_workflow(slurm)
    assert [r["status"] for r in res.records] == ["done"], res.summary()
    assert res.recomputed_tiles == 6
    logs = os.listdir(tmp_path / "slurm_out" / "logs")
    assert any(f.endswith(".err") for f in logs), logs  # the workers really ran as Slurm jobs
    assert not [f for f in os.listdir(tmp_path / "slurm_out") if f.startswith(".tls-")]  # credentials removed

    local = parse_workflow({**common, "output": "local_out", "cluster": {"kind": "local", "workers": 0}},
                           path=str(tmp_path / "local.yaml"))
    run_workflow(local)
    a, b = str(tmp_path / "slurm_out" / "m.zarr"), str(tmp_path / "local_out" / "m.zarr")
    ca, cb = read_catalog(a, "sep"), read_catalog(b, "sep")
    assert list(ca) == list(cb) and len(ca["id"]) > 0
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    for name in ("segmentation", "background"):
        np.testing.assert_array_equal(zarr.open_array(f"{a}/maps/sep/{name}")[...],
                                      zarr.open_array(f"{b}/maps/sep/{name}")[...])


@pytest.mark.slurm
def test_slurm_workers_get_the_allocator_settings(tmp_path):
    """Workers started as Slurm jobs run with the same malloc settings as local workers."""
    why = _slurm_idle()
    if why:
        pytest.skip(why)
    from deepmosaic.workflows.clusters import open_executor
    spec = parse_workflow({"inputs": ["x.fits"], "output": "out", "stages": ["sep"],
                           "cluster": {"kind": "slurm", "queue": "debug", "jobs": 1, "cores": 1, "memory": "1GB",
                                       "walltime": "00:05:00", "interface": "lo", "timeout": 120}},
                          path=str(tmp_path / "w.yaml")).cluster
    keys = tuple(WORKER_MALLOC_ENV)
    with open_executor(spec, str(tmp_path / "out")) as ex:  # a lambda travels by value, not by module name
        seen = list(ex.client.run(lambda: {k: __import__("os").environ.get(k) for k in keys}).values())
    assert seen and all(s == WORKER_MALLOC_ENV for s in seen), seen
