"""Execution back-ends: a Dask distributed cluster (local processes, or an existing scheduler) and a
synchronous in-process mode for debugging. Both expose ``map_unordered(fn, args_list)``.
"""
from __future__ import annotations

import contextlib
import itertools
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

    def routes(self, resources) -> bool:
        """Whether calls needing ``resources`` go to dedicated workers (never, in-process)."""
        return False

    def map_unordered(self, fn, args_list, resources=None):
        for i, args in enumerate(args_list):
            yield i, fn(*args)

    def map_chain(self, fn, args_list, steps):
        """``fn(*args, **kw, state=previous result)`` for each step ``(kw, resources)``; yields the last."""
        for i, args in enumerate(args_list):
            state = None
            for kw, _ in steps:
                state = fn(*args, **kw, state=state)
            yield i, state


class DaskExecutor:
    """Submits calls to a distributed Client and yields results as they complete.

    declared_resources : Dask worker resources (e.g. ``{"GPU"}``) that workers of this cluster will have
        even if none has started yet (batch-scheduler clusters); otherwise the running workers tell.
    """

    def __init__(self, client, description: str, declared_resources=()):
        self.client = client
        self.description = description
        self.dashboard = getattr(client, "dashboard_link", None)
        self.declared_resources = set(declared_resources)

    def routes(self, resources) -> bool:
        """Whether some worker declares every resource in ``resources``: then calls that need them are
        restricted to such workers. On a cluster where none does (CPU only), they run anywhere."""
        if not resources:
            return False
        have = set(self.declared_resources)
        for w in self.client.scheduler_info(n_workers=-1).get("workers", {}).values():
            if all(w.get("resources", {}).get(r, 0) >= n for r, n in resources.items()):
                return True
        return set(resources) <= have

    def _submit(self, fn, *args, resources=None, **kw):
        return self.client.submit(fn, *args, pure=False, resources=dict(resources) if resources else None, **kw)

    def map_unordered(self, fn, args_list, resources=None):
        from distributed import as_completed
        if not args_list:
            return
        futures = {}
        for i, args in enumerate(args_list):
            futures[self._submit(fn, *args, resources=resources)] = i
        for fut in as_completed(list(futures)):
            i = futures[fut]
            yield i, fut.result()
            fut.release()

    def map_chain(self, fn, args_list, steps):
        """For each ``args``: ``fn(*args, **kw, state=...)`` once per step ``(kw, resources)``, each step
        fed the previous one's result on the workers (it never comes back here) and restricted to workers
        with that step's resources. Yields ``(i, result of the last step)`` as chains complete."""
        from distributed import as_completed
        if not args_list:
            return
        import uuid
        last, held = {}, {}

        def submit(i):
            fut, chain = None, []
            for j, (kw, resources) in enumerate(steps):  # keys say the step (dashboard, task stream)
                fut = self._submit(fn, *args_list[i], **kw, state=fut, resources=resources,
                                   key=f"{fn.__name__}-part{j}-{uuid.uuid4().hex}")
                chain.append(fut)
            last[fut], held[fut] = i, chain
            return fut

        # the states passed between parts hold a tile's pixels: keep a bounded number of chains in flight
        n_workers = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        window = max(8, 4 * n_workers)
        pending = iter(range(len(args_list)))
        done = as_completed([submit(i) for i in itertools.islice(pending, window)])
        for fut in done:
            yield last.pop(fut), fut.result()
            for f in held.pop(fut):
                f.release()
            nxt = next(pending, None)
            if nxt is not None:
                done.add(submit(nxt))


def _worker_env():
    # One process per core: keep each worker single-threaded in BLAS/OpenMP/torch.
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(k, "1")


# glibc malloc settings for process workers. A tile's arrays (a few MB to a few tens of MB each) are
# allocated and freed dozens of times per tile; with glibc's defaults each one is a fresh mmap whose pages
# the kernel faults in and zeroes, and with Dask's own default (MALLOC_TRIM_THRESHOLD_=65536) the heap is
# also handed back to the kernel after every free. Measured on the 8192^2 benchmark field: bare tiled
# extraction in one process 7.5 s with glibc's defaults, 10.0 s with Dask's, 5.9 s with these (system time
# 1.8 / 4.3 / 0.3 s); two workers faulting at once contend further. Arrays above 64 MiB (whole-mosaic
# buffers, which tile workers never hold) are still mapped and returned at once, and at most 256 MiB of
# freed heap is kept per worker. Values the user exported win.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                     "MALLOC_TOP_PAD_": str(16 << 20)}


def worker_malloc_env() -> dict:
    """The malloc variables our workers start with: ``WORKER_MALLOC_ENV``, where the user exported none."""
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


def worker_spawn_environ() -> dict:
    """Dask's ``distributed.nanny.pre-spawn-environ`` for our workers: Dask's own entries, with our malloc
    settings (:func:`worker_malloc_env`) over its trim threshold."""
    import dask
    return {**(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}), **worker_malloc_env()}


def local_worker_config() -> dict:
    """Dask config under which a local cluster starts its process workers: single-threaded BLAS/OpenMP
    (:func:`_worker_env`), non-daemon workers (they may start processes), our pre-spawn environment."""
    _worker_env()
    return {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": worker_spawn_environ()}


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
        if not scheduler.startswith(("tls://", "tcp://127.", "tcp://localhost", "inproc://")) and security is None:
            log.warning("scheduler %s: plain TCP off this machine; anyone who reaches it can run code as you "
                        "(use a tls:// scheduler, e.g. through `deepmosaic workflow run` with TLS files)", scheduler)
        client = Client(scheduler, security=security, timeout="30s")
        try:
            log.info("attached to Dask scheduler %s (dashboard: %s)", scheduler, client.dashboard_link)
            yield DaskExecutor(client, f"Dask scheduler {scheduler}")
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    with dask.config.set({**local_worker_config(), "distributed.logging.distributed": "error"}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        log.info("local Dask cluster: %d process workers; dashboard %s", n, client.dashboard_link)
        yield DaskExecutor(client, f"local Dask cluster, {n} process workers")
    finally:
        client.close()
        cluster.close()
