"""Dask clusters for workflow runs: local (loopback only), an existing scheduler, Slurm and SGE batch jobs.

Security: on a shared machine an open Dask scheduler lets any other user run code as you. Local clusters
bind scheduler, workers and dashboard to 127.0.0.1. Batch clusters and remote schedulers use TLS by
default, with credentials made for this run (``Security.temporary()``: a fresh CA and key, written for
the batch jobs into a private 0700 folder inside the output location and gone with the run) or the
files the workflow names. Dashboards stay on loopback unless the workflow opens one.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import sys
import tempfile
from urllib.parse import urlparse

from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.execute import (DaskExecutor, SyncExecutor, _quiet_distributed, local_worker_config,
                                         worker_malloc_env)

from .spec import ClusterSpec, inside

log = logging.getLogger("deepmosaic")


def make_security(spec: ClusterSpec):
    """The ``distributed.security.Security`` of a cluster run (None without TLS)."""
    if not spec.use_tls:
        return None
    from distributed.security import Security
    if spec.tls_ca_file:
        for what in ("tls_ca_file", "tls_cert", "tls_key"):
            if not os.path.isfile(getattr(spec, what)):
                raise ConfigError(f"cluster.{what}={getattr(spec, what)!r}: no such file.")
        return Security(tls_ca_file=spec.tls_ca_file, tls_client_cert=spec.tls_cert, tls_client_key=spec.tls_key,
                        tls_scheduler_cert=spec.tls_cert, tls_scheduler_key=spec.tls_key,
                        tls_worker_cert=spec.tls_cert, tls_worker_key=spec.tls_key, require_encryption=True)
    return Security.temporary()


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else "tcp://" + address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_open_dashboard(spec: ClusterSpec):
    addr = spec.dashboard_address
    host = addr.rsplit(":", 1)[0] if addr and ":" in addr else ""  # ":8787" or "8787": every interface
    if addr and not (host and _is_loopback(host)):
        log.warning("the dashboard listens on %s, reachable from other machines (cluster.dashboard)", addr)


def local_cluster(spec: ClusterSpec, output: str):
    """A cluster of process workers on this machine, every socket on 127.0.0.1: ``workers`` CPU workers and
    ``gpus`` GPU workers (one process per GPU, ``CUDA_VISIBLE_DEVICES`` set to its GPU, resource GPU=1)."""
    from distributed import Nanny, Scheduler, SpecCluster
    security = make_security(spec)
    n = (os.cpu_count() or 1) if spec.workers is None else spec.workers
    scratch = inside(output, spec.local_directory, "cluster.local_directory")
    os.makedirs(scratch, exist_ok=True)
    dash = spec.dashboard_address
    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "protocol": "tls://" if security else "tcp://", "security": security,
        **({"dashboard_address": dash} if dash else {"dashboard": False})}}
    common = {"nthreads": 1, "host": "127.0.0.1", "security": security, "local_directory": scratch,
              "silence_logs": logging.ERROR}
    # CPU workers declare CPU=1 so that, next to GPU workers, the CPU stages can be kept off the GPU ones
    workers = {f"cpu-{i}": {"cls": Nanny, "options": {**common, "resources": {"CPU": 1}}} for i in range(n)}
    for i in range(spec.gpus):
        workers[f"gpu-{i}"] = {"cls": Nanny, "options": {**common, "resources": {"GPU": 1},
                                                         "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
    return SpecCluster(workers=workers, scheduler=scheduler, security=security, silence_logs=logging.ERROR,
                       name="deepmosaic-local")


@contextlib.contextmanager
def _local(spec: ClusterSpec, output: str):
    if spec.workers == 0 and not spec.gpus:
        yield SyncExecutor()
        return
    import dask
    from distributed import Client
    _quiet_distributed()
    with dask.config.set(local_worker_config()):
        cluster = local_cluster(spec, output)
    try:
        client = Client(cluster, security=cluster.security)
        try:
            n = len(cluster.worker_spec)
            client.wait_for_workers(n, timeout=spec.timeout)
            log.info("local Dask cluster: %d process workers (%d with a GPU) on 127.0.0.1; dashboard %s", n,
                     spec.gpus, client.dashboard_link if spec.dashboard_address else "off")
            yield DaskExecutor(client, f"local Dask cluster, {n - spec.gpus} CPU + {spec.gpus} GPU workers",
                               declared_resources={"GPU"} if spec.gpus else ())
        finally:
            client.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def _address(spec: ClusterSpec):
    from distributed import Client
    address = spec.address
    if spec.use_tls and not address.startswith("tls://"):
        raise ConfigError(f"cluster.address={address!r}: TLS is on (the default for a remote scheduler); use a "
                          f"tls:// address, or set cluster.tls: false and cluster.allow_insecure: true.")
    if not spec.use_tls and not _is_loopback(address) and not spec.allow_insecure:
        raise ConfigError(f"cluster.address={address!r}: a plain scheduler off this machine lets anyone who "
                          f"reaches it run code as you; use TLS (tls:// with cluster.tls_ca_file, tls_cert, "
                          f"tls_key) or set cluster.allow_insecure: true.")
    if spec.use_tls and not spec.tls_ca_file:
        raise ConfigError(f"cluster.address={address!r}: a TLS scheduler that is already running needs its "
                          f"credentials: set cluster.tls_ca_file, tls_cert and tls_key.")
    _quiet_distributed()
    client = Client(address, security=make_security(spec), timeout=f"{spec.timeout}s")
    try:
        log.info("attached to Dask scheduler %s", address)
        yield DaskExecutor(client, f"Dask scheduler {address}")
    finally:
        client.close()


def _malloc_prologue() -> str:
    """Job-script line giving the batch workers the allocator settings of local workers (through Dask's
    nanny pre-spawn environment, merged with Dask's own entries); a later prologue line of the workflow
    file can override it."""
    return f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{worker_malloc_env()!r}"'


def jobqueue_kwargs(spec: ClusterSpec, output: str, secrets: str | None) -> dict:
    """Keyword arguments of ``SLURMCluster`` / ``SGECluster`` from the workflow's cluster resources."""
    directives = list(spec.job_directives)
    extra_args = []
    if spec.gpus:
        extra_args += ["--resources", "GPU=1"]
        if spec.kind == "slurm":
            directives.append("--gres=gpu:1")
    kw = dict(cores=spec.cores, processes=spec.processes, memory=spec.memory, walltime=spec.walltime,
              queue=spec.queue, job_extra_directives=directives,
              job_script_prologue=[_malloc_prologue()] + list(spec.job_script_prologue),
              worker_extra_args=extra_args,
              local_directory=inside(output, spec.local_directory, "cluster.local_directory"),
              log_directory=inside(output, spec.log_directory, "cluster.log_directory"),
              python=spec.python or sys.executable, interface=spec.interface,
              scheduler_options={"dashboard_address": spec.dashboard_address} if spec.dashboard_address
              else {"dashboard": False},
              job_name="deepmosaic")
    if spec.account:
        kw["account" if spec.kind == "slurm" else "project"] = spec.account
    if secrets:
        kw["shared_temp_directory"] = secrets
    return kw


@contextlib.contextmanager
def _batch(spec: ClusterSpec, output: str):
    import dask_jobqueue
    from distributed import Client
    _quiet_distributed()
    cls = {"slurm": dask_jobqueue.SLURMCluster, "sge": dask_jobqueue.SGECluster}[spec.kind]
    security = make_security(spec)
    secrets = None
    if security is not None and not spec.tls_ca_file:
        # the batch jobs read the temporary worker credentials from files: a private folder of this run
        os.makedirs(output, exist_ok=True)
        secrets = tempfile.mkdtemp(prefix=".tls-", dir=output)
        os.chmod(secrets, 0o700)
    for what in ("local_directory", "log_directory"):
        os.makedirs(inside(output, getattr(spec, what), f"cluster.{what}"), exist_ok=True)
    cluster = None
    try:
        cluster = cls(security=security, **jobqueue_kwargs(spec, output, secrets))
        if spec.adapt_max is not None:
            cluster.adapt(minimum_jobs=spec.adapt_min, maximum_jobs=spec.adapt_max)
        else:
            cluster.scale(jobs=spec.jobs)
        client = Client(cluster, security=security)
        try:
            client.wait_for_workers(1, timeout=spec.timeout)
            log.info("%s cluster at %s: %s; dashboard %s", spec.kind, cluster.scheduler_address,
                     "adaptive" if spec.adapt_max is not None else f"{spec.jobs} jobs",
                     client.dashboard_link if spec.dashboard_address else "off")
            yield DaskExecutor(client, f"{spec.kind} cluster ({cluster.scheduler_address})",
                               declared_resources={"GPU"} if spec.gpus else ())
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()  # cancels the jobs
            for k in ("_job_ca_file", "_job_cert", "_job_key"):  # the jobs' credential files: deleted on close
                f = getattr(cluster, k, None)
                if f is not None:
                    f.close()
        if secrets:
            shutil.rmtree(secrets, ignore_errors=True)


def open_executor(spec: ClusterSpec, output: str):
    """Context manager yielding an executor (``map_unordered``/``map_chain``) for ``spec``; closes it after."""
    _warn_open_dashboard(spec)
    if spec.kind == "local":
        return _local(spec, output)
    if spec.kind == "address":
        return _address(spec)
    return _batch(spec, output)
