"""Security of the Dask clusters: local ones listen on loopback only (scheduler, workers, nannies,
dashboard); TLS clusters refuse clients without the run's credentials; remote schedulers need TLS."""
import gc
import os

import psutil
import pytest

from deepmosaic.pipeline.config import from_mapping
from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.workflows.clusters import open_executor
from deepmosaic.workflows.spec import ClusterSpec


def _listening(proc):
    try:
        return [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


@pytest.mark.parametrize("which", ["deepmosaic run", "workflow"])
def test_local_cluster_listens_on_loopback_only(tmp_path, which):
    from deepmosaic.pipeline.execute import executor
    spec = from_mapping(ClusterSpec, {"kind": "local", "workers": 2})
    with (executor(workers=2) if which == "deepmosaic run" else open_executor(spec, str(tmp_path))) as ex:
        info = ex.client.scheduler_info(n_workers=-1)
        assert info["address"].startswith("tcp://127.0.0.1:")
        assert len(info["workers"]) == 2
        for addr, w in info["workers"].items():
            assert addr.startswith("tcp://127.0.0.1:") and w["nanny"].startswith("tcp://127.0.0.1:")
        assert ex.dashboard.startswith("http://127.0.0.1:")
        me = psutil.Process()
        procs = [me] + me.children(recursive=True)
        sockets = [a for p in procs for a in _listening(p)]
        # the scheduler, its dashboard, 2 nannies and 2 workers at least: all of them on 127.0.0.1
        assert len(sockets) >= 6, sockets
        assert {a.ip for a in sockets} == {"127.0.0.1"}, sockets
        assert ex.client.submit(os.getpid).result() != os.getpid()


def test_tls_cluster_refuses_clients_without_its_credentials(tmp_path):
    from distributed import Client
    from distributed.security import Security
    spec = from_mapping(ClusterSpec, {"kind": "local", "workers": 1, "tls": True})
    with open_executor(spec, str(tmp_path)) as ex:
        address = ex.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert ex.client.submit(sum, [1, 2]).result() == 3  # the run's own client works
        attempts = {
            "no credentials": dict(address=address),  # refused client-side: no TLS context
            "plain tcp": dict(address=address.replace("tls://", "tcp://")),  # the scheduler resets it
            "another run's credentials": dict(address=address, security=Security.temporary()),  # cert refused
        }
        for what, kw in attempts.items():
            gc.collect()  # a refused Client collected inside the next Client() deadlocks distributed's loop lock
            with pytest.raises((OSError, TimeoutError, ValueError, TypeError)):
                c = Client(**kw, timeout="3s")
                try:  # a client that somehow connected must at least fail to run anything
                    c.submit(os.getpid).result(timeout=3)
                finally:
                    c.close()
                pytest.fail(f"a client with {what} ran a task on the TLS cluster")
        gc.collect()


def test_remote_schedulers_need_tls_and_dashboards_stay_on_loopback():
    for tls in (None, False):
        spec = from_mapping(ClusterSpec, {"kind": "address", "address": "tcp://10.1.2.3:8786", "tls": tls})
        with pytest.raises(ConfigError, match="allow_insecure"):
            open_executor(spec, "/tmp").__enter__()
    spec = from_mapping(ClusterSpec, {"kind": "address", "address": "tcp://10.1.2.3:8786", "tls": True})
    with pytest.raises(ConfigError, match="TLS is on"):
        open_executor(spec, "/tmp").__enter__()
    spec = from_mapping(ClusterSpec, {"kind": "address", "address": "tls://10.1.2.3:8786"})
    with pytest.raises(ConfigError, match="tls_ca_file"):
        open_executor(spec, "/tmp").__enter__()
    for kind in ("local", "slurm", "sge"):
        spec = from_mapping(ClusterSpec, {"kind": kind})
        assert spec.dashboard_address == "127.0.0.1:0"
        assert spec.use_tls is (kind != "local")
