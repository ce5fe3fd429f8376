"""Workflow files (schema, safe YAML, paths kept inside the output) and nightly reprocessing (run keys,
idempotence, changed config or input, interrupted night, a corrupt input among good ones)."""
import importlib.resources
import json
import os

import numpy as np
import pytest
import yaml
import zarr

from deepmosaic.pipeline.errors import ConfigError
from deepmosaic.pipeline.execute import SyncExecutor
from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
from deepmosaic.pipeline.store import read_catalog
from deepmosaic.pipeline.truth import write_simulation
from deepmosaic.workflows.nightly import read_index, run_workflow
from deepmosaic.workflows.spec import load_workflow, parse_workflow

SIZE, TILE = (384, 384), 128  # 9 tiles per input


def _write_inputs(folder, seeds):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        img, _ = write_simulation(simulate_mosaic(SimConfig(size=SIZE, seed=s)), folder / f"m{s}.fits",
                                  overwrite=True)
        paths.append(str(img))
    return paths


def _workflow(tmp_path, **changes):
    data = {"inputs": ["incoming/m*[0-9].fits"], "output": "out", "tile": TILE, "stages": {"sep": {}},
            "cluster": {"kind": "local", "workers": 0}, **changes}
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))  # stage order matters
    return load_workflow(str(f))


def _same_catalogs(a, b, stages):
    for stage in stages:
        ca, cb = read_catalog(a, stage), read_catalog(b, stage)
        assert list(ca) == list(cb), stage
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"{stage}.{k}")


def _same_store(a, b):
    _same_catalogs(a, b, ["sep"])
    np.testing.assert_array_equal(zarr.open_array(f"{a}/maps/sep/segmentation")[...],
                                  zarr.open_array(f"{b}/maps/sep/segmentation")[...])


# ------------------------------------------------------------------------------------------ validation

def test_shipped_workflows_validate():
    files = [f for f in importlib.resources.files("deepmosaic.workflows").iterdir() if f.name.endswith(".yaml")]
    assert {f.name for f in files} >= {"nightly.yaml", "slurm.yaml", "gpu.yaml"}
    kinds = {}
    for f in files:
        wf = load_workflow(str(f))
        kinds[f.name] = (wf.cluster.kind, wf.cluster.gpus, wf.cluster.use_tls)
    assert kinds["slurm.yaml"][0] == "slurm" and kinds["slurm.yaml"][2] is True
    assert kinds["gpu.yaml"][1] >= 1
    assert kinds["nightly.yaml"] == ("local", 0, False)


@pytest.mark.parametrize("data, words", [
    ({"inptus": ["a.fits"]}, ["'inptus'", "inputs", "Valid keys"]),
    ({"cluster": {"kind": "slurm", "queu": "debug"}}, ["'queu'", "queue", "walltime"]),
    ({"cluster": "pbs"}, ["cluster.kind='pbs'", "slurm"]),
    ({"stages": {"sep": {"thresold": 2}}}, ["'thresold'", "thresh"]),
    ({"stages": ["sep", "nosuchstage"]}, ["nosuchstage"]),
    ({"cluster": {"kind": "local", "local_directory": "../elsewhere"}}, ["outside the output location"]),
    ({"cluster": {"kind": "slurm", "log_directory": "/tmp/logs"}}, ["absolute path"]),
    ({"cluster": {"kind": "slurm", "tls_cert": "c.pem"}}, ["tls_ca_file, tls_cert and tls_key together"]),
    ({"cluster": {"kind": "slurm", "walltime": "90 minutes"}}, ["walltime", "HH:MM:SS"]),
    ({"truth": "{name}_truth.fits"}, ["{stem}"]),
])
def test_invalid_workflows_are_refused_naming_the_key(tmp_path, data, words):
    base = {"inputs": ["a.fits"], "output": "out"}
    with pytest.raises(ConfigError) as e:
        parse_workflow({**base, **data}, path=str(tmp_path / "wf.yaml"))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_workflow_yaml_is_read_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("inputs: !!python/object/apply:os.system ['touch pwned']\noutput: out\n")
    with pytest.raises(ConfigError, match="safe"):
        load_workflow(str(f))
    assert not (tmp_path / "pwned").exists()


def test_store_names_stay_inside_the_output(tmp_path):
    for rel in ("a/x.fits", "b/..y.fits", "b/we ird;rm.fits"):  # globs skip hidden files: ..y named
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    wf = parse_workflow({"inputs": ["a/x.fits", "b/*.fits", "b/..y.fits"], "output": "out"}, path=str(tmp_path / "w.yaml"))
    stores = [wf.store_path(p) for p in wf.inputs]
    assert all(os.path.dirname(s) == str(tmp_path / "out") for s in stores)
    assert sorted(os.path.basename(s) for s in stores) == ["we_ird_rm.zarr", "x.zarr", "y.zarr"]
    (tmp_path / "b" / "x.fits").write_bytes(b"")
    with pytest.raises(ConfigError, match="share the store"):
        parse_workflow({"inputs": ["a/x.fits", "b/x.fits"], "output": "out"}, path=str(tmp_path / "w.yaml"))


# ------------------------------------------------------------------------------------------ nightly

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("night_inputs")
    return _write_inputs(d, [1, 2])


def _night(tmp_path, inputs, corrupt=False):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for p in inputs:
        (folder / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    if corrupt:  # a truncated copy: header fine, data missing
        (folder / "m3.fits").write_bytes(open(inputs[0], "rb").read()[:8640])
    return folder


def test_nightly_idempotent_and_one_corrupt_input_fails_alone(tmp_path, inputs):
    _night(tmp_path, inputs, corrupt=True)
    wf = _workflow(tmp_path)
    first = run_workflow(wf)
    by_name = {r["store"]: r for r in first.records}
    assert set(by_name) == {"m1.zarr", "m2.zarr", "m3.zarr"}
    assert by_name["m3.zarr"]["status"] == "failed" and "truncated" in by_name["m3.zarr"]["error"]
    for name in ("m1.zarr", "m2.zarr"):
        assert by_name[name]["status"] == "done" and by_name[name]["recomputed_tiles"] == 9
        assert by_name[name]["tiles"]["done"] + by_name[name]["tiles"]["no work"] == 9
    index = read_index(wf.index_path)
    assert {r["status"] for r in index["inputs"].values()} == {"done", "failed"}
    for r in index["inputs"].values():
        assert {"key", "status", "started", "finished", "seconds", "tiles", "failures", "error"} <= set(r)

    second = run_workflow(wf)
    assert second.recomputed_tiles == 0
    assert second.count("up to date") == 2
    assert "m3.fits" in second.failed[0]["input"]  # still failing, still reported
    assert "up to date" in second.summary()
    assert len(read_index(wf.index_path)["runs"]) == 2


def test_changed_config_or_input_reprocesses_what_it_affects(tmp_path, inputs):
    folder = _night(tmp_path, inputs)
    run_workflow(_workflow(tmp_path))
    changed = run_workflow(_workflow(tmp_path, stages={"sep": {"thresh": 3.0}}))
    assert [r["action"] for r in changed.records] == ["reprocessed", "reprocessed"]
    assert all(r["reason"] == "changed: config" for r in changed.records)
    assert changed.recomputed_tiles == 18
    n_hi = read_catalog(str(tmp_path / "out" / "m1.zarr"), "sep")["id"].size

    # one input replaced by another image: only that one is redone
    write_simulation(simulate_mosaic(SimConfig(size=SIZE, seed=7)), folder / "m2.fits", overwrite=True)
    wf = _workflow(tmp_path, stages={"sep": {"thresh": 3.0}})
    again = run_workflow(wf)
    actions = {r["store"]: (r["action"], r.get("reason")) for r in again.records}
    assert actions == {"m1.zarr": ("up to date", None), "m2.zarr": ("reprocessed", "changed: input")}
    assert again.recomputed_tiles == 9
    assert read_catalog(str(tmp_path / "out" / "m1.zarr"), "sep")["id"].size == n_hi


class _Interrupt(SyncExecutor):
    """Runs tiles in process and raises KeyboardInterrupt (Ctrl-C, a killed night) after ``n`` tiles."""

    def __init__(self, n):
        self.n = n

    def map_unordered(self, fn, args_list, resources=None):
        for i, out in super().map_unordered(fn, args_list, resources):
            if fn.__name__ == "process_tile":
                if self.n == 0:
                    raise KeyboardInterrupt
                self.n -= 1
            yield i, out


def test_interrupted_night_resumes_tile_by_tile(tmp_path, inputs):
    _night(tmp_path, inputs)
    wf = _workflow(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_workflow(wf, executor=_Interrupt(9 + 4))  # the first input done, 4 tiles of the second
    index = read_index(wf.index_path)
    status = {r["store"]: r["status"] for r in index["inputs"].values()}
    assert status == {"m1.zarr": "done", "m2.zarr": "interrupted"}

    resumed = run_workflow(wf)
    acts = {r["store"]: (r["action"], r["recomputed_tiles"]) for r in resumed.records}
    assert acts == {"m1.zarr": ("up to date", 0), "m2.zarr": ("resumed", 5)}
    ref = tmp_path / "ref"
    run_workflow(parse_workflow({"inputs": [str(tmp_path / "incoming" / "m2.fits")], "output": str(ref),
                                 "tile": TILE, "stages": ["sep"], "cluster": {"kind": "local", "workers": 0}},
                                path=str(tmp_path / "ref.yaml")))
    _same_store(str(tmp_path / "out" / "m2.zarr"), str(ref / "m2.zarr"))
    assert json.load(open(wf.index_path))["inputs"][str(tmp_path / "incoming" / "m2.fits")]["status"] == "done"


def test_new_weights_at_the_same_path_change_only_the_weights_part(tmp_path):
    """Retrained weights shipped under the same name: the run key changes through the weights checksum
    alone, so the night says `changed: weights` (the model is never loaded to know it)."""
    import shutil
    from deepmosaic.models.weights_io import shipped
    from deepmosaic.workflows.api import build_tasks
    from deepmosaic.workflows.nightly import _changed, key_parts, run_key
    base = shipped("clumps")
    for ext in (".safetensors", ".json"):
        shutil.copy(str(base) + ext, tmp_path / f"clumps{ext}")
    wf = parse_workflow({"inputs": ["x.fits"], "output": "out", "stages": {"sep": {}, "clumps": {
        "weights": str(tmp_path / "clumps")}}}, path=str(tmp_path / "wf.yaml"))
    before = key_parts(wf, build_tasks(wf.stages, wf.params), "0" * 64)
    card = json.loads((tmp_path / "clumps.json").read_text())
    card["weights"]["sha256"] = "f" * 64  # what a retrained file's card would say
    (tmp_path / "clumps.json").write_text(json.dumps(card))
    after = key_parts(wf, build_tasks(wf.stages, wf.params), "0" * 64)
    assert _changed(before, after) == ["weights"]
    assert run_key(before) != run_key(after)


def test_two_runs_on_one_output_are_refused(tmp_path):
    """A night that overlaps the previous one on the same output stops at once, naming the other run."""
    import fcntl
    from deepmosaic.pipeline.errors import StoreError
    from deepmosaic.workflows.nightly import LOCK_NAME
    wf = _workflow(tmp_path)
    os.makedirs(wf.output)
    with open(os.path.join(wf.output, LOCK_NAME), "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 12345 since last night\n")
        other.flush()
        with pytest.raises(StoreError, match="another workflow run.*pid 12345"):
            run_workflow(wf)
    assert not os.path.exists(wf.index_path)


def _store_files(store, stage):
    """{relative path: (size, mtime_ns)} of every file of one stage's maps and catalog."""
    out = {}
    for group in ("maps", "catalogs"):
        root = os.path.join(store, group, stage)
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                out[os.path.relpath(p, store)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def _clean_run(tmp_path, name, stages) -> str:
    """The same input run from scratch into its own output: the store a recomputation must equal."""
    out = tmp_path / name
    run_workflow(parse_workflow({"inputs": [str(tmp_path / "incoming" / "m1.fits")], "output": str(out),
                                 "tile": TILE, "stages": stages, "cluster": {"kind": "local", "workers": 0}},
                                path=str(tmp_path / f"{name}.yaml")))
    return str(out / "m1.zarr")


def test_changed_stage_config_recomputes_only_that_stage_and_its_dependents(tmp_path):
    _write_inputs(tmp_path / "incoming", [1])
    stages = {"sep": {}, "photutils": {}, "morphology": {}}  # morphology measures sep's detections
    run_workflow(_workflow(tmp_path, stages=stages))
    store = str(tmp_path / "out" / "m1.zarr")
    before = {s: _store_files(store, s) for s in stages}

    # photutils alone changed: sep and morphology are not touched (not even rewritten)
    stages2 = {**stages, "photutils": {"n_pixels": 8}}
    night = run_workflow(_workflow(tmp_path, stages=stages2))
    rec = night.records[0]
    assert (rec["action"], rec["reason"], rec["recomputed_stages"]) == ("reprocessed", "changed: config",
                                                                         ["photutils"])
    assert _store_files(store, "sep") == before["sep"] and _store_files(store, "morphology") == before["morphology"]
    _same_catalogs(store, _clean_run(tmp_path, "ref2", stages2), stages)

    # sep changed: sep and what depends on it (morphology) are recomputed, photutils is kept
    kept = _store_files(store, "photutils")
    stages3 = {**stages2, "sep": {"thresh": 3.0}}
    night = run_workflow(_workflow(tmp_path, stages=stages3))
    assert night.records[0]["recomputed_stages"] == ["sep", "morphology"]
    assert _store_files(store, "photutils") == kept
    ref3 = _clean_run(tmp_path, "ref3", stages3)
    _same_catalogs(store, ref3, stages)
    _same_store(store, ref3)  # the sep segmentation map too
    meta = zarr.open_group(store, mode="r").attrs["deepmosaic"]
    assert meta["finished"] and not meta.get("refreshing") and set(meta["n_objects"]) == set(stages)

    # a stage no longer run is dropped from the store without recomputing the others
    night = run_workflow(_workflow(tmp_path, stages={"sep": {"thresh": 3.0}, "photutils": {"n_pixels": 8}}))
    assert night.records[0]["recomputed_tiles"] == 0
    assert "morphology" not in zarr.open_group(store, mode="r")["catalogs"]


class _InterruptChain(SyncExecutor):
    """Like ``_Interrupt`` for the chained tile parts that a stage-by-stage recomputation uses."""

    def __init__(self, n):
        self.n = n

    def map_chain(self, fn, args_list, steps):
        for i, out in super().map_chain(fn, args_list, steps):
            if self.n == 0:
                raise KeyboardInterrupt
            self.n -= 1
            yield i, out


def test_interrupted_stage_recomputation_resumes_and_equals_a_clean_run(tmp_path):
    _write_inputs(tmp_path / "incoming", [1])
    stages = {"sep": {}, "photutils": {}}
    run_workflow(_workflow(tmp_path, stages=stages))
    store = str(tmp_path / "out" / "m1.zarr")
    kept = _store_files(store, "sep")
    stages2 = {"sep": {}, "photutils": {"n_pixels": 8}}
    with pytest.raises(KeyboardInterrupt):
        run_workflow(_workflow(tmp_path, stages=stages2), executor=_InterruptChain(4))
    resumed = run_workflow(_workflow(tmp_path, stages=stages2))
    rec = resumed.records[0]
    assert (rec["action"], rec["recomputed_tiles"], rec["recomputed_stages"]) == ("resumed", 5, ["photutils"])
    assert _store_files(store, "sep") == kept
    _same_catalogs(store, _clean_run(tmp_path, "ref", stages2), stages2)
