"""Workflow figures: a nightly reprocessing sequence and the same input on a local cluster, a local TLS
cluster and Slurm jobs. Prints a table of wall times and tiles computed.

    nice -n 10 .venv/bin/python benchmarks/bench_workflow.py [--inputs 3] [--size 2048] [--tile 512] [--no-slurm]

Slurm rows need the single-node Slurm of `make slurm-up`; without it they are skipped with the reason.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import yaml


def _night(folder, cluster, stages=None, out="out"):
    from deepmosaic.workflows.nightly import run_workflow
    from deepmosaic.workflows.spec import load_workflow
    data = {"inputs": ["incoming/*.fits"], "output": out, "tile": ARGS.tile,
            "stages": stages or {"sep": {}}, "cluster": cluster}
    f = os.path.join(folder, f"{out}.yaml")
    with open(f, "w") as fh:
        yaml.safe_dump(data, fh)
    t0 = time.perf_counter()
    res = run_workflow(load_workflow(f))
    return time.perf_counter() - t0, res


def _row(label, seconds, res):
    acts = ", ".join(f"{res.count(a)} {a}" for a in ("new", "up to date", "reprocessed", "resumed") if res.count(a))
    print(f"| {label} | {seconds:.2f} | {res.recomputed_tiles} | {acts}; {len(res.failed)} failed |", flush=True)


def main():
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    folder = tempfile.mkdtemp(prefix="bench_workflow_")
    inc = os.path.join(folder, "incoming")
    os.makedirs(inc)
    for s in range(ARGS.inputs):
        write_simulation(simulate_mosaic(SimConfig(size=(ARGS.size, ARGS.size), seed=100 + s)),
                         os.path.join(inc, f"m{s}.fits"))
        shutil.move(os.path.join(inc, f"m{s}_truth.fits"), os.path.join(folder, f"m{s}_truth.fits"))
    n_tiles = (-(-ARGS.size // ARGS.tile)) ** 2
    print(f"{ARGS.inputs} inputs of {ARGS.size}x{ARGS.size} ({n_tiles} tiles of {ARGS.tile} each), stage sep, "
          f"{os.cpu_count()} CPUs\n")
    print("| run | wall s | tiles computed | inputs |\n|---|---|---|---|")
    local = {"kind": "local", "workers": ARGS.workers}
    _row("night 1 (local cluster)", *_night(folder, local))
    _row("night 2, nothing changed", *_night(folder, local))
    _row("night 3, sep.thresh changed", *_night(folder, local, {"sep": {"thresh": 2.0}}))
    write_simulation(simulate_mosaic(SimConfig(size=(ARGS.size, ARGS.size), seed=999)), os.path.join(inc, "m0.fits"),
                     overwrite=True)
    os.remove(os.path.join(inc, "m0_truth.fits"))
    _row("night 4, one input replaced", *_night(folder, local, {"sep": {"thresh": 2.0}}))

    print()
    print("| same inputs, fresh output | wall s | tiles computed | inputs |\n|---|---|---|---|")
    _row(f"local, {ARGS.workers} workers, TCP on loopback", *_night(folder, local, out="o_local"))
    _row(f"local, {ARGS.workers} workers, TLS", *_night(folder, {**local, "tls": True}, out="o_tls"))
    if ARGS.slurm:
        ok = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True) \
            if shutil.which("sinfo") else None
        if ok is None or ok.returncode or "idle" not in ok.stdout:
            print(f"| Slurm: skipped (not up: {ok.stderr.strip() if ok else 'not installed'}) | | | |")
        else:
            slurm = {"kind": "slurm", "queue": "debug", "jobs": ARGS.workers, "cores": 1, "memory": "2GB",
                     "walltime": "00:30:00", "interface": "lo"}
            _row(f"Slurm, {ARGS.workers} jobs x 1 core, TLS", *_night(folder, slurm, out="o_slurm"))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=3)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-slurm", dest="slurm", action="store_false")
    ARGS = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging
    logging.basicConfig(level=logging.WARNING)
    main()
