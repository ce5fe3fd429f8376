"""Execution back-ends: a Dask distributed cluster (local processes, or an existing scheduler) and a
synchronous in-process mode for debugging. Both expose ``map_unordered(fn, args_list)``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("deepmosaic")


class Progress:
    """A one-line progress bar on a terminal (stderr); a start/end line otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.n = total, label, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._draw()

    def _draw(self, final=False):
        if not self.tty and not final:
            return
        width = 30
        done = int(width * self.n / max(self.total, 1))
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        line = f"{self.label:<16} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total}  {rate:.1f}/s"
        end = "\n" if final else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()

    def update(self, k: int = 1):
        self.n += k
        self._draw()

    def close(self):
        self._draw(final=True)


class SyncExecutor:
    """Runs every call in this process, in order (``--workers 0`` / ``--sync``): easy to debug."""

    description = "synchronous (in-process)"
    dashboard = None

    def map_unordered(self, fn, args_list, resources=None):
        for i, args in enumerate(args_list):
            yield i, fn(*args)


class DaskExecutor:
    """Submits calls to a distributed Client and yields results as they complete."""

    def __init__(self, client, description: str):
        self.client = client
        self.description = description
        self.dashboard = getattr(client, "dashboard_link", None)

    def map_unordered(self, fn, args_list, resources=None):
        from distributed import as_completed
        if not args_list:
            return
        futures = {}
        for i, args in enumerate(args_list):
            f = self.client.submit(fn, *args, pure=False, resources=resources or None)
            futures[f] = i
        for fut in as_completed(list(futures)):
            i = futures[fut]
            yield i, fut.result()
            fut.release()


def _worker_env():
    # One process per core: keep each worker single-threaded in BLAS/OpenMP/torch.
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(k, "1")


def _quiet_distributed():
    """Dask's own INFO chatter (workers starting/stopping) would drown our log; keep its errors."""
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def executor(workers: int | None = None, scheduler: str | None = None, security=None):
    """Context manager yielding an executor.

    workers : number of local process workers (default: one per core); 0 = synchronous in-process
    scheduler : address of an existing Dask scheduler to attach to (``tcp://...`` or ``tls://...``)
    security : a ``distributed.security.Security`` for TLS clusters
    """
    if workers == 0 and not scheduler:
        yield SyncExecutor()
        return
    import dask
    from distributed import Client, LocalCluster
    _quiet_distributed()
    if scheduler:
        client = Client(scheduler, security=security, timeout="30s")
        try:
            log.info("attached to Dask scheduler %s (dashboard: %s)", scheduler, client.dashboard_link)
            yield DaskExecutor(client, f"Dask scheduler {scheduler}")
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    _worker_env()
    with dask.config.set({"distributed.worker.daemon": False, "distributed.logging.distributed": "error"}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        log.info("local Dask cluster: %d process workers; dashboard %s", n, client.dashboard_link)
        yield DaskExecutor(client, f"local Dask cluster, {n} process workers")
    finally:
        client.close()
        cluster.close()
