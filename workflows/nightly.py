"""Nightly reprocessing: every input of a workflow gets its own store, a run key decides what is done.

The run key of an input is the sha256 of its parts (kept in the run index, so a reprocess says why):

* ``input``: the input file's checksum (cached in the index while its size and mtime are unchanged),
* ``config``: the resolved stage configs (stage fingerprints without checksums), tile size, HDU,
  the background model's settings,
* ``weights``: the weights checksums the model stages report in their fingerprints,
* ``version``: the deepmosaic version.

Per input: the store finished with the same key is up to date (nothing is recomputed, and the run says
so); a store with the same key but unfinished is resumed tile by tile (the runner's ``--resume``); a store
with another key is reprocessed: when only stage configs or weights changed, just the stages they affect
(the changed stages and those that depend on them; the runner's ``refresh``, listed in the index as
``recomputed_stages``), otherwise (changed input, tile size, background settings or version) the whole
store is rebuilt; inputs whose key did not change are left alone. An input that cannot be read, or whose tiles fail, is recorded as failed with its error,
and the others still run. The run index ``OUTPUT/index.json`` lists every input with its key, status,
times, tile counts and failures; it is rewritten (atomically) after every input, so an interrupted night
leaves it current.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field

from deepmosaic.pipeline.errors import DeepmosaicError, StoreError

from .spec import Workflow, store_name

log = logging.getLogger("deepmosaic")

INDEX_FORMAT = 1
LOCK_NAME = ".workflow.lock"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def key_parts(wf: Workflow, tasks, input_sha256: str) -> dict:
    """The parts of an input's run key (see the module doc)."""
    from deepmosaic.pipeline.runner import _version
    from deepmosaic.workflows.api import background_settings
    config, weights = {}, {}
    for t in tasks:
        fp = dict(t.fingerprint())
        for k in [k for k in fp if k.endswith("sha256")]:
            weights[f"{t.name}.{k}"] = fp.pop(k)
        config[t.name] = fp
    return {"input": input_sha256,
            "config": _hash({"stages": config, "order": [t.name for t in tasks], "tile": wf.tile, "hdu": wf.hdu,
                             "background": background_settings(tasks)}),
            "weights": _hash(weights), "version": _version()}


def run_key(parts: dict) -> str:
    return _hash(parts)[:32]


def read_index(path: str) -> dict:
    if not os.path.exists(path):
        return {"format": INDEX_FORMAT, "inputs": {}, "runs": []}
    with open(path) as fh:
        data = json.load(fh)
    data.setdefault("inputs", {})
    data.setdefault("runs", [])
    return data


def write_index(path: str, index: dict):
    """Write the run index atomically (a temporary file renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(index, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _checksum(path: str, cached: dict | None, use_cache: bool) -> str:
    from deepmosaic.pipeline.runner import file_sha256
    # a zarr input (a folder) changes in its files, not in the folder's size or time: always hashed
    if use_cache and cached and not os.path.isdir(path) and cached.get("stat") == _stat(path) \
            and (cached.get("parts") or {}).get("input"):
        return cached["parts"]["input"]
    return file_sha256(path)


def _stat(path: str) -> dict:
    s = os.stat(path)
    return {"size": s.st_size, "mtime_ns": s.st_mtime_ns}


def _store_state(store: str) -> tuple[str | None, bool]:
    """(run key recorded in the store, whether it finished), or (None, False) without a usable store."""
    if not os.path.isdir(store):
        return None, False
    try:
        from deepmosaic.pipeline.store import open_store
        meta = dict(open_store(store).attrs.get("deepmosaic", {}))
    except Exception:
        return None, False
    key = (meta.get("config") or {}).get("run_key")
    return key, bool(meta.get("finished")) and not os.path.isdir(os.path.join(store, "_work"))


def _changed(old: dict | None, new: dict) -> list[str]:
    if not old:
        return []
    return [k for k in ("input", "config", "weights", "version") if old.get(k) != new.get(k)]


@dataclass
class NightResult:
    """What one workflow run did: one record per input (as in the run index) and the totals."""

    index_path: str
    records: list = field(default_factory=list)
    seconds: float = 0.0

    def count(self, action: str) -> int:
        return sum(r["action"] == action for r in self.records)

    @property
    def recomputed_tiles(self) -> int:
        return sum(r.get("recomputed_tiles", 0) for r in self.records)

    @property
    def failed(self) -> list:
        return [r for r in self.records if r["status"] == "failed"]

    def summary(self) -> str:
        n = len(self.records)
        head = (f"{n} input(s): {self.count('up to date')} up to date, {self.count('new')} new, "
                f"{self.count('reprocessed')} reprocessed, {self.count('resumed')} resumed, "
                f"{len(self.failed)} failed; {self.recomputed_tiles} tiles computed in {self.seconds:.1f} s")
        if n and self.count("up to date") == n:
            head += " (nothing to do: every input is up to date)"
        lines = [head]
        for r in self.records:
            why = f" ({r['reason']})" if r.get("reason") else ""
            tiles = f", {r['recomputed_tiles']} tiles computed" if r.get("recomputed_tiles") else ""
            lines.append(f"  {r['status']:<7} {r['action']:<11} {r['input']}{why}{tiles}")
            if r.get("error"):
                lines.append(f"          error: {r['error']}")
        lines.append(f"run index: {self.index_path}")
        return "\n".join(lines)


def run_workflow(wf: Workflow, executor=None) -> NightResult:
    """Process every input of ``wf`` that is not up to date (see the module doc).

    executor : an executor to use instead of opening the workflow's cluster (tests, notebooks)
    """
    t0 = time.perf_counter()
    os.makedirs(wf.output, exist_ok=True)
    with _exclusive(wf.output):
        return _run_locked(wf, executor, t0)


@contextlib.contextmanager
def _exclusive(output: str):
    """One workflow run per output location at a time (a cron night that overlaps the previous one)."""
    import fcntl
    fh = open(os.path.join(output, LOCK_NAME), "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise StoreError(f"{output}: another workflow run is using this output location "
                             f"({fh.read().strip() or 'pid unknown'}); wait for it to finish.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {_now()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock (so does the process's death)


def _run_locked(wf: Workflow, executor, t0) -> NightResult:
    from deepmosaic.workflows.api import build_tasks
    from deepmosaic.workflows.clusters import open_executor
    index = read_index(wf.index_path)
    tasks = build_tasks(wf.stages, wf.params)
    result = NightResult(index_path=wf.index_path)
    run_record = {"started": _now(), "workflow": wf.path, "finished": None, "inputs": len(wf.inputs)}
    index["runs"].append(run_record)
    index["runs"] = index["runs"][-100:]
    write_index(wf.index_path, index)

    plans = plan_workflow(wf, tasks, index)
    if all(p["action"] in ("up to date", "failed") for p in plans):
        executor_ctx = None  # no tile to compute: do not start a cluster
    else:
        executor_ctx = None if executor is not None else open_executor(wf.cluster, wf.output)
    ex = executor if executor is not None or executor_ctx is None else executor_ctx.__enter__()
    try:
        for plan in plans:
            rec = _process(wf, tasks, plan, ex, index)
            result.records.append(rec)
    finally:
        if executor_ctx is not None:
            executor_ctx.__exit__(None, None, None)
        result.seconds = time.perf_counter() - t0
        run_record.update(finished=_now(), seconds=round(result.seconds, 3),
                          **{a.replace(" ", "_"): result.count(a) for a in
                             ("up to date", "new", "reprocessed", "resumed")},
                          failed=len(result.failed), recomputed_tiles=result.recomputed_tiles)
        write_index(wf.index_path, index)
    return result


def plan_workflow(wf: Workflow, tasks=None, index=None) -> list[dict]:
    """What a run would do with each input (``action``: up to date, new, resumed, reprocessed, failed)."""
    from deepmosaic.workflows.api import build_tasks
    tasks = tasks if tasks is not None else build_tasks(wf.stages, wf.params)
    index = index if index is not None else read_index(wf.index_path)
    return [_plan(wf, tasks, path, index["inputs"].get(path)) for path in wf.inputs]


def _plan(wf: Workflow, tasks, path: str, old: dict | None) -> dict:
    """Decide what to do with one input: its key, and up to date / new / resumed / reprocessed / failed."""
    plan = {"input": path, "store": os.path.basename(wf.store_path(path)), "old": old}
    try:
        if not os.path.exists(path):
            raise DeepmosaicError(f"{path}: no such input file.")
        sha = _checksum(path, old, wf.checksum_cache)
    except (OSError, DeepmosaicError) as e:
        return {**plan, "action": "failed", "error": str(e) if isinstance(e, DeepmosaicError) else
                f"{type(e).__name__}: {e}"}
    parts = key_parts(wf, tasks, sha)
    key = run_key(parts)
    stored_key, finished = _store_state(wf.store_path(path))
    plan.update(key=key, parts=parts, stat=_stat(path))
    if stored_key == key and finished:
        return {**plan, "action": "up to date"}
    if stored_key == key:
        return {**plan, "action": "resumed", "reason": "an earlier run stopped before the end"}
    if stored_key is None and not os.path.exists(wf.store_path(path)):
        return {**plan, "action": "new"}
    changed = _changed((old or {}).get("parts"), parts)
    return {**plan, "action": "reprocessed", "changed": changed,
            "reason": "changed: " + ", ".join(changed or ["store made by another run"])}


def _evaluate(wf: Workflow, path: str, store: str, rec: dict):
    """Evaluate a finished store against the input's truth file, if the workflow names one."""
    truth = wf.truth_path(path)
    if truth and os.path.exists(truth):
        from deepmosaic.pipeline.evaluate import evaluate_store
        summary = evaluate_store(store, truth)
        rec["evaluation"] = {s: {k: v.get(k) for k in ("completeness", "purity", "f1") if k in v}
                             for s, v in summary.items() if not s.startswith("_")}
    elif truth:
        rec["evaluation"] = f"no truth file {truth}"


def _process(wf: Workflow, tasks, plan: dict, ex, index: dict) -> dict:
    from deepmosaic.pipeline.io import open_mosaic
    from deepmosaic.pipeline.runner import run_pipeline
    from deepmosaic.workflows.api import background_settings
    path, store = plan["input"], wf.store_path(plan["input"])
    old = plan.pop("old") or {}
    rec = {"input": path, "store": store_name(path), "action": plan["action"], "key": plan.get("key"),
           "parts": plan.get("parts"), "stat": plan.get("stat"), "reason": plan.get("reason"),
           "started": _now(), "finished": None, "seconds": 0.0, "recomputed_tiles": 0, "error": None,
           "failures": [], "tiles": old.get("tiles", {}), "n_objects": old.get("n_objects", {})}
    if plan["action"] == "up to date":
        rec.update(status="done", finished=old.get("finished"), tiles=old.get("tiles", {}),
                   seconds=old.get("seconds", 0.0), started=old.get("started"))
        if "evaluation" in old:
            rec["evaluation"] = old["evaluation"]
        else:  # e.g. a night stopped between the last tile and the evaluation
            _evaluate(wf, path, store, rec)
        if not rec["tiles"]:  # an index lost or made elsewhere: read the counts from the store
            from deepmosaic.pipeline.store import open_store
            meta = dict(open_store(store).attrs.get("deepmosaic", {}))
            rec.update(tiles=meta.get("tiles", {}), n_objects=meta.get("n_objects", {}))
        log.info("%s: up to date (run key %s); nothing to recompute", path, plan["key"][:12])
        index["inputs"][path] = rec
        return rec
    if plan["action"] == "failed":
        rec.update(status="failed", error=plan["error"], finished=_now())
        log.error("%s: failed: %s", path, plan["error"])
        index["inputs"][path] = rec
        write_index(wf.index_path, index)
        return rec
    rec["status"] = "running"
    index["inputs"][path] = rec
    write_index(wf.index_path, index)
    t0 = time.perf_counter()
    log.info("%s: %s%s -> %s", path, plan["action"], f" ({plan['reason']})" if plan.get("reason") else "", store)
    try:
        kw = {"hdu": wf.hdu} if wf.hdu is not None else {}
        mosaic = open_mosaic(path, **kw)
        # only the config or weights changed: recompute just the stages they affect (the runner falls back to
        # a full rebuild when the store cannot be refreshed stage by stage)
        by_stage = plan["action"] == "reprocessed" and set(plan.get("changed") or ()) <= {"config", "weights"} \
            and bool(plan.get("changed"))
        res = run_pipeline(mosaic, store, tasks, tile_size=wf.tile, executor=ex,
                           resume=plan["action"] == "resumed",
                           overwrite=plan["action"] == "reprocessed" and not by_stage, refresh=by_stage,
                           background_settings=background_settings(tasks), run_config={"run_key": plan["key"]})
        rec.update(tiles=res.tiles, n_objects=res.n_objects, failures=res.failures,
                   recomputed_tiles=res.recomputed_tiles, recomputed_stages=res.recomputed_stages)
        if res.failures:
            rec.update(status="failed", error=f"{len(res.failures)} tile(s) failed, first: {res.failures[0]}")
        else:
            rec["status"] = "done"
            _evaluate(wf, path, store, rec)
    except KeyboardInterrupt:
        rec.update(status="interrupted", seconds=round(time.perf_counter() - t0, 3))
        write_index(wf.index_path, index)
        raise
    except Exception as e:  # one bad input must not stop the night: record it, go on
        rec.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, DeepmosaicError)
                   else str(e))
        log.error("%s: failed: %s", path, rec["error"])
        log.debug(traceback.format_exc())
    rec.update(finished=_now(), seconds=round(time.perf_counter() - t0, 3))
    write_index(wf.index_path, index)
    return rec
