"""Workflow files (``deepmosaic workflow run FILE.yaml``): schema, validation and path rules.

A workflow names its inputs (paths and globs), the stages and their parameters, the tile size, the
cluster, the output location and optionally a truth file per input. Every mapping rejects unknown keys
(naming the key and the valid ones), the YAML is read with the safe loader, and every path the run
writes (stores, run index, worker and log folders) lies inside the output location.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any

from deepmosaic.pipeline.config import field, from_mapping, require
from deepmosaic.pipeline.errors import ConfigError

CLUSTER_KINDS = ("local", "address", "slurm", "sge")
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ClusterSpec:
    """Where the tiles run. ``local``: process workers on this machine, loopback only. ``address``: an
    existing Dask scheduler. ``slurm`` / ``sge``: Dask workers as batch jobs (dask-jobqueue)."""

    kind: str = field("local", "local | address | slurm | sge")
    workers: int | None = field(None, "local: CPU process workers (default one per core; 0 = in this process, "
                                      "synchronous)")
    gpus: int = field(0, "local: GPU workers, one process per GPU (CUDA_VISIBLE_DEVICES=i, Dask resource GPU=1). "
                         "slurm/sge: 1 gives every job one GPU (--gres=gpu:1 on Slurm) and the resource GPU=1")
    address: str | None = field(None, "address: the scheduler, e.g. tls://head-node:8786")
    jobs: int = field(1, "slurm/sge: batch jobs to start (each runs `processes` workers)")
    adapt_min: int | None = field(None, "slurm/sge: adapt between adapt_min and adapt_max jobs instead of `jobs`")
    adapt_max: int | None = field(None, "slurm/sge: upper bound of adaptive scaling (jobs)")
    cores: int = field(1, "slurm/sge: cores per job")
    processes: int = field(1, "slurm/sge: Dask worker processes per job (threads = cores / processes)")
    memory: str = field("4GB", "slurm/sge: memory per job, e.g. 16GB")
    walltime: str = field("01:00:00", "slurm/sge: wall-time limit of each job, HH:MM:SS")
    queue: str | None = field(None, "slurm/sge: partition (Slurm) or queue (SGE)")
    account: str | None = field(None, "slurm/sge: account/project to charge")
    job_directives: tuple[str, ...] = field((), "slurm/sge: extra lines for the job script, e.g. ['--exclusive'] "
                                                "on Slurm or ['-pe smp 4'] on SGE")
    job_script_prologue: tuple[str, ...] = field((), "slurm/sge: shell lines run before the worker starts "
                                                     "(module load ..., source venv/bin/activate)")
    local_directory: str = field("dask-worker-space", "worker scratch folder, relative to the output location")
    log_directory: str = field("logs", "batch job logs, relative to the output location")
    interface: str | None = field(None, "network interface of scheduler and workers (e.g. ib0; lo on one node)")
    python: str | None = field(None, "slurm/sge: the workers' Python (default: this interpreter)")
    tls: bool | None = field(None, "TLS between client, scheduler and workers; default: on for slurm, sge and "
                                   "address, off for local (loopback)")
    tls_ca_file: str | None = field(None, "CA certificate file; with tls_cert and tls_key instead of the temporary "
                                          "credentials made for each run")
    tls_cert: str | None = field(None, "certificate file (PEM) of this client and the workers")
    tls_key: str | None = field(None, "private key file (PEM) of this client and the workers")
    dashboard: str = field("localhost", "the scheduler's dashboard: localhost (loopback, random port), "
                                        "off, or HOST:PORT to open it (e.g. 0.0.0.0:8787)")
    allow_insecure: bool = field(False, "address: allow a plain tcp:// scheduler that is not on loopback")
    timeout: float = field(300.0, "seconds to wait for the first worker of a batch cluster")

    def validate(self):
        w = "cluster"
        require(self.kind in CLUSTER_KINDS, w, "kind", self.kind, f"one of {', '.join(CLUSTER_KINDS)}.")
        require(self.workers is None or self.workers >= 0, w, "workers", self.workers, "0 or more.")
        require(self.gpus >= 0, w, "gpus", self.gpus, "0 or more.")
        require(self.kind != "address" or bool(self.address), w, "address", self.address,
                "the scheduler's address, e.g. tls://host:8786, for kind: address.")
        require(self.jobs >= 1, w, "jobs", self.jobs, "1 or more.")
        require(self.cores >= 1 and self.processes >= 1 and self.cores % self.processes == 0, w, "processes",
                self.processes, f"a divisor of cores={self.cores} (1 or more).")
        require(self.kind not in ("slurm", "sge") or self.gpus <= 1, w, "gpus", self.gpus,
                "0 or 1 per job on a batch cluster (one worker process per GPU): scale with `jobs`.")
        require(self.gpus == 0 or self.kind == "local" or self.processes == 1, w, "processes", self.processes,
                "1 when gpus=1 (one process per GPU).")
        require((self.adapt_min is None) == (self.adapt_max is None), w, "adapt_max", self.adapt_max,
                "give both adapt_min and adapt_max, or neither.")
        if self.adapt_min is not None:
            require(0 <= self.adapt_min <= self.adapt_max, w, "adapt_min", self.adapt_min,
                    f"between 0 and adapt_max={self.adapt_max}.")
        require(bool(re.fullmatch(r"\d+:\d\d:\d\d|\d+-\d+(:\d\d){0,2}", self.walltime)), w, "walltime",
                self.walltime, "HH:MM:SS (or D-HH[:MM[:SS]] on Slurm).")
        files = (self.tls_ca_file, self.tls_cert, self.tls_key)
        require(all(files) or not any(files), w, "tls_key", self.tls_key,
                "give tls_ca_file, tls_cert and tls_key together (or none: temporary credentials).")
        require(not (any(files) and self.tls is False), w, "tls", self.tls, "true when TLS files are given.")
        require(self.timeout > 0, w, "timeout", self.timeout, "a positive number of seconds.")

    @property
    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        if self.kind == "address":
            return str(self.address).startswith("tls://")
        return self.kind in ("slurm", "sge")

    @property
    def dashboard_address(self) -> str | None:
        d = self.dashboard.strip().lower()
        if d in ("localhost", "127.0.0.1", "loopback"):
            return "127.0.0.1:0"
        if d in ("off", "none", "no", "false"):
            return None
        return self.dashboard.strip()


@dataclass(frozen=True)
class WorkflowFile:
    """The top level of a workflow file."""

    inputs: tuple[str, ...] = field((), "input mosaics: paths and globs (relative to the workflow file's folder); "
                                        "each one gets its own store")
    output: str = field("", "output location: one OUTPUT/<input name>.zarr per input and the run index "
                            "OUTPUT/index.json (relative to the workflow file's folder)")
    stages: Any = field(("sep",), "stage names in order, or a mapping stage -> its parameters (see "
                                   "`deepmosaic stages`)")
    tile: int = field(1024, "tile core size in pixels")
    hdu: str | None = field(None, "FITS HDU of the image in every input (default: IMAGE or the first image HDU)")
    truth: str | None = field(None, "truth file per input to evaluate against, relative to the input's folder; "
                                    "{stem} is the input's name without extension, e.g. {stem}_truth.fits")
    cluster: Any = field("local", "local | slurm | sge | a scheduler address, or a mapping with kind and its "
                                  "resources (see ClusterSpec)")
    checksum_cache: bool = field(True, "reuse an input's checksum from the run index while its size and "
                                       "modification time are unchanged (false: hash every input every run)")
    description: str | None = field(None, "free text")


@dataclass(frozen=True)
class Workflow:
    """A validated workflow: absolute paths, stage parameters, cluster."""

    path: str
    base: str
    inputs: tuple[str, ...]
    output: str
    stages: tuple[str, ...]
    params: dict
    tile: int
    hdu: str | None
    truth: str | None
    cluster: ClusterSpec
    checksum_cache: bool
    patterns: tuple[str, ...] = ()

    @property
    def index_path(self) -> str:
        return inside(self.output, INDEX_NAME, "index")

    def store_path(self, input_path: str) -> str:
        return inside(self.output, store_name(input_path), "store")

    def truth_path(self, input_path: str) -> str | None:
        if not self.truth:
            return None
        folder = os.path.dirname(input_path)
        return os.path.normpath(os.path.join(folder, self.truth.format(stem=input_stem(input_path))))

    def describe(self) -> str:
        c = self.cluster
        where = {"local": f"local ({'in-process' if c.workers == 0 else f'{c.workers or os.cpu_count()} workers'}"
                          f"{f', {c.gpus} GPU workers' if c.gpus else ''}, loopback)",
                 "address": f"scheduler {c.address}",
                 "slurm": f"Slurm ({c.jobs if c.adapt_max is None else f'{c.adapt_min}-{c.adapt_max}'} jobs x "
                          f"{c.cores} cores, {c.memory}, {c.walltime}, queue {c.queue or 'default'})",
                 "sge": f"SGE ({c.jobs} jobs x {c.cores} cores, {c.memory}, {c.walltime})"}[c.kind]
        lines = [f"workflow {self.path}", f"  stages: {', '.join(self.stages)}; tile {self.tile}",
                 f"  cluster: {where}; TLS {'on' if c.use_tls else 'off'}; dashboard {c.dashboard}",
                 f"  output: {self.output} (run index {self.index_path})",
                 f"  inputs: {len(self.inputs)} from {', '.join(self.patterns)}"]
        lines += [f"    {p} -> {os.path.basename(self.store_path(p))}" for p in self.inputs]
        if self.truth:
            lines.append(f"  truth: {self.truth}")
        return "\n".join(lines)


_EXTENSIONS = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".zarr")


def input_stem(path: str) -> str:
    """The input's file name without its mosaic extension."""
    name = os.path.basename(os.path.normpath(path))
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def store_name(path: str) -> str:
    """``<stem>.zarr`` with characters outside [A-Za-z0-9._-] replaced: never a path, never hidden."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", input_stem(path)).lstrip(".") or "input"
    return stem + ".zarr"


def inside(root: str, rel: str, what: str) -> str:
    """``root/rel``, refused (ConfigError) if it would lie outside ``root`` (absolute, ``..``, symlinks)."""
    if os.path.isabs(rel):
        raise ConfigError(f"{what}={rel!r}: an absolute path; give a path relative to the output location "
                          f"{root}.")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([real_root, target]) != real_root:
        raise ConfigError(f"{what}={rel!r}: resolves to {target}, outside the output location {real_root}; "
                          f"give a path inside it.")
    return os.path.join(os.path.abspath(root), os.path.normpath(rel))


def _parse_stages(value) -> tuple[tuple[str, ...], dict]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        names = []
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(f"stages: list item {v!r} is not a stage name; use a list of names or a "
                                  f"mapping stage -> parameters.")
            names.append(v)
        return tuple(names), {}
    if isinstance(value, dict):
        params = {}
        for k, v in value.items():
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"stages.{k}={v!r}: expected a mapping of the stage's parameters (or nothing).")
            params[str(k)] = dict(v or {})
        return tuple(params), params
    raise ConfigError(f"stages={value!r}: expected a list of stage names or a mapping stage -> parameters.")


def _parse_cluster(value) -> ClusterSpec:
    if value is None:
        value = "local"
    if isinstance(value, str):
        value = {"kind": "address", "address": value} if "://" in value else {"kind": value}
    if not isinstance(value, dict):
        raise ConfigError(f"cluster={value!r}: expected local, slurm, sge, a scheduler address or a mapping.")
    return from_mapping(ClusterSpec, value, where="cluster")


def expand_inputs(patterns, base: str) -> tuple[str, ...]:
    """Absolute paths of the inputs (globs expanded, sorted, each once), in the order of the patterns."""
    out: list[str] = []
    for pat in patterns:
        full = os.path.join(base, os.path.expanduser(pat))
        hits = sorted(glob.glob(full)) if glob.has_magic(full) else ([full] if os.path.exists(full) else [])
        if not hits and not glob.has_magic(full):
            out.append(os.path.abspath(full))  # a named file that is missing: it fails in the run, recorded
        for h in hits:
            h = os.path.abspath(h)
            if h not in out:
                out.append(h)
    return tuple(out)


def parse_workflow(data: dict, path: str = "<workflow>", base: str | None = None) -> Workflow:
    """Validate a workflow mapping (as read from YAML) into a ``Workflow``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    base = os.path.abspath(base or os.path.dirname(os.path.abspath(path)))
    data = dict(data)
    if isinstance(data.get("inputs"), str):
        data["inputs"] = [data["inputs"]]
    wf = from_mapping(WorkflowFile, data, where="workflow")
    require(bool(wf.inputs), "workflow", "inputs", list(wf.inputs), "name at least one input path or glob.")
    require(bool(wf.output), "workflow", "output", wf.output, "a folder for the stores and the run index.")
    require(wf.tile >= 16, "workflow", "tile", wf.tile, "a tile size of at least 16 pixels.")
    stages, params = _parse_stages(wf.stages)
    cluster = _parse_cluster(wf.cluster)
    from deepmosaic.workflows.api import build_tasks
    build_tasks(stages, params)  # unknown stages and parameters are refused here, before any run
    output = os.path.abspath(os.path.join(base, os.path.expanduser(wf.output)))
    for what in ("local_directory", "log_directory"):
        inside(output, getattr(cluster, what), f"cluster.{what}")
    if wf.truth:
        try:
            wf.truth.format(stem="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"workflow.truth={wf.truth!r}: only {{stem}} may be substituted ({e}).") from None
    inputs = expand_inputs(wf.inputs, base)
    names: dict[str, str] = {}
    for p in inputs:
        other = names.setdefault(store_name(p), p)
        if other != p:
            raise ConfigError(f"inputs: {other} and {p} would share the store {store_name(p)}; rename one or "
                              f"run them from two workflows with different outputs.")
    return Workflow(path=path, base=base, inputs=inputs, output=output, stages=stages, params=params,
                    tile=wf.tile, hdu=wf.hdu, truth=wf.truth, cluster=cluster, checksum_cache=wf.checksum_cache,
                    patterns=tuple(wf.inputs))


def load_workflow(path: str, overrides: dict | None = None) -> Workflow:
    """Read and validate a workflow YAML file (safe loader). ``overrides`` replace top-level keys."""
    from deepmosaic.workflows.api import load_config_file
    if not os.path.isfile(path):
        raise ConfigError(f"workflow {path}: no such file.")
    data = load_config_file(path)
    data.update(overrides or {})
    return parse_workflow(data, path=os.path.abspath(path))

