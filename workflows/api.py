"""The Python API behind the CLI: ``run`` does what ``deepmosaic run`` does, for notebooks and scripts."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import yaml

from deepmosaic.pipeline.config import parse_set_options
from deepmosaic.pipeline.errors import ConfigError

log = logging.getLogger("deepmosaic")

RUN_KEYS = {"stages", "tile", "workers", "scheduler", "hdu", "truth"}


def load_config_file(path: str | None) -> dict:
    """Read a run config YAML (safe loader). Top-level keys: stages, tile, workers, scheduler, hdu, truth,
    and one mapping per stage with its parameters."""
    if not path:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file.")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:  # includes tags such as !!python/object that safe_load refuses
            raise ConfigError(f"--config {path}: not a valid (safe) YAML file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def build_tasks(stages: Iterable[str], stage_params: Mapping[str, Mapping[str, Any]]):
    """Instantiate the named stages with their parameters (unknown stages/keys are refused), each bound to
    the stages listed before it (:meth:`~deepmosaic.tasks.base.Task.bind`)."""
    from deepmosaic.tasks import get_task_class
    stages = [s.strip() for s in stages if s.strip()]
    if not stages:
        raise ConfigError("--stages is empty; name at least one stage, e.g. --stages sep.")
    for name in stage_params:
        if name not in stages:
            get_task_class(name)  # unknown stage names are refused with the valid ones
            raise ConfigError(f"parameters given for stage {name!r}, which is not in --stages "
                              f"{','.join(stages)}; add it to --stages or drop its settings.")
    tasks = [get_task_class(s)(dict(stage_params.get(s, {}))) for s in stages]
    for i, t in enumerate(tasks):
        t.bind(tasks[:i])      # a stage may use (and set up) the stages that run before it
    return tasks


def resolve(stages=None, set_options=None, config=None, tile=None):
    """Merge a config file/dict, --stages and --set options into (stage names, params, tile, extra)."""
    cfg = dict(config or {})
    from deepmosaic.tasks import STAGES, _load_optional
    _load_optional()
    unknown = [k for k in cfg if k not in RUN_KEYS and k not in STAGES]
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]!r}. Valid keys: {', '.join(sorted(RUN_KEYS))} "
                          f"and the stage names {', '.join(sorted(STAGES))}.")
    if stages is None:
        stages = cfg.get("stages", ["sep"])
    if isinstance(stages, str):
        stages = stages.split(",")
    params = {k: dict(v or {}) for k, v in cfg.items() if k not in RUN_KEYS}
    for stage, kv in parse_set_options(set_options).items():
        params.setdefault(stage, {}).update(kv)
    tile = tile or cfg.get("tile", 1024)
    return list(stages), params, int(tile), {k: cfg[k] for k in ("workers", "scheduler", "hdu", "truth") if k in cfg}


def background_settings(tasks) -> dict:
    """The global background model's settings: the sep stage's, or sep's defaults."""
    from deepmosaic.tasks.sep_task import SepConfig
    cfg = next((t.config for t in tasks if isinstance(t.config, SepConfig)), SepConfig())
    out = {"back_size": cfg.back_size, "filter_size": cfg.back_filter_size, "filter_thresh": cfg.back_filter_thresh}
    if cfg.back_mask_objects > 0:   # only then: stores made without it keep their configuration
        out.update(mask_objects=cfg.back_mask_objects, mask_thresh=cfg.thresh, mask_minarea=cfg.minarea)
    return out


def run(input, out, stages=None, tile=None, set=None, config=None, workers=None, scheduler=None,
        resume=False, overwrite=False, truth=None, hdu=None, cube_bands=False, security=None, executor=None):
    """Run the pipeline on ``input`` into the zarr store ``out``.

    Parameters
    ----------
    input : path of a FITS file or zarr array (or a list of per-band paths on one pixel grid)
    out : path of the zarr store to create
    stages : list or comma-separated string of stage names (default ``["sep"]``)
    tile : tile core size in pixels (default 1024)
    set : list of ``"STAGE.PARAM=VALUE"`` overrides
    config : dict or path of a YAML run config
    workers : local process workers (default one per core; 0 = synchronous in this process)
    scheduler : address of an existing Dask scheduler
    resume, overwrite : what to do if ``out`` exists (otherwise it is refused)
    truth : truth file (``*_truth.fits``) to evaluate against when the run finishes
    hdu : FITS HDU of the image (default: ``IMAGE`` or the first image HDU)

    Returns
    -------
    RunResult (store path, objects per stage, tile counts, failures, seconds)
    """
    from deepmosaic.pipeline.execute import executor as make_executor
    from deepmosaic.pipeline.io import Mosaic, open_mosaic
    from deepmosaic.pipeline.runner import run_pipeline
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(os.fspath(config))
    stage_names, params, tile, extra = resolve(stages, set, config, tile)
    if workers is None:
        workers = extra.get("workers")
    scheduler = scheduler or extra.get("scheduler")
    hdu = hdu if hdu is not None else extra.get("hdu")
    truth = truth or extra.get("truth")
    tasks = build_tasks(stage_names, params)
    paths = list(input) if isinstance(input, (list, tuple)) else [input]
    kw = {"cube_bands": cube_bands}
    if hdu is not None:
        kw["hdu"] = hdu
    mosaics = [open_mosaic(p, **kw) for p in paths]
    bands = tuple(b for m in mosaics for b in m.bands)
    if len({b.band for b in bands}) < len(bands):  # e.g. one file per band without FILTER keywords
        import dataclasses
        bands = tuple(dataclasses.replace(b, band=f"band{i}") for i, b in enumerate(bands))
    if len({b.shape for b in bands}) > 1:
        raise ConfigError(f"input: the bands have different shapes {[b.shape for b in bands]}; "
                          f"they must share one pixel grid.")
    mosaic = Mosaic(bands=bands)
    ctx = make_executor(workers=workers, scheduler=scheduler, security=security) if executor is None else None
    ex = executor or ctx.__enter__()
    try:
        log.info("running %s on %s (%s) with %s", ",".join(stage_names), paths, mosaic.shape, ex.description)
        result = run_pipeline(mosaic, os.fspath(out), tasks, tile_size=tile, executor=ex, resume=resume,
                              overwrite=overwrite, background_settings=background_settings(tasks))
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if truth and not result.failures:
        from deepmosaic.pipeline.evaluate import evaluate_store
        result.evaluation = evaluate_store(os.fspath(out), truth)
    return result
