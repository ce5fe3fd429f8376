"""The ``deepmosaic`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from deepmosaic.pipeline.errors import DeepmosaicError

log = logging.getLogger("deepmosaic")


def _setup_logging(verbose: int):
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "bokeh", "tornado", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_simulate(a):
    from deepmosaic.pipeline.config import from_mapping
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    params = {"size": tuple(a.size), "seed": a.seed, "density": a.density}
    if a.plant_seams:
        params["plant_seams"] = a.plant_seams
    if a.clumps:
        params["clumpy_density"] = a.clumps
    for kv in a.set or []:
        k, _, v = kv.partition("=")
        params[k] = v
    cfg = from_mapping(SimConfig, params, where="simulate")
    t0 = time.perf_counter()
    sim = simulate_mosaic(cfg)
    img, truth = write_simulation(sim, a.out, overwrite=a.overwrite)
    print(f"simulated {cfg.size[0]}x{cfg.size[1]} mosaic with {len(sim.truth)} objects in "
          f"{time.perf_counter() - t0:.1f} s\n  image: {img}\n  truth: {truth}")


def cmd_run(a):
    from deepmosaic.workflows.api import run
    result = run(a.input if len(a.input) > 1 else a.input[0], a.out, stages=a.stages, tile=a.tile, set=a.set,
                 config=a.config, workers=0 if a.sync else a.workers, scheduler=a.scheduler, resume=a.resume,
                 overwrite=a.overwrite, truth=a.truth, hdu=a.hdu, cube_bands=a.cube_bands)
    _print_run(result)
    if getattr(result, "evaluation", None):
        from deepmosaic.pipeline.evaluate import format_summary
        print(format_summary(result.evaluation))
    return 1 if result.failures else 0


def _print_run(result):
    objs = ", ".join(f"{k}: {v}" for k, v in result.n_objects.items()) or "none (run incomplete)"
    tiles = ", ".join(f"{v} {k}" for k, v in result.tiles.items() if v)
    print(f"store: {result.store}\n  tiles: {tiles} ({result.recomputed_tiles} computed in this run)\n"
          f"  objects: {objs}\n  time: {result.seconds:.1f} s")
    for f in result.failures:
        print(f"  FAILED tile {f['tile']}: {f['error']}")


def cmd_evaluate(a):
    from deepmosaic.pipeline.evaluate import evaluate_store, format_summary
    summary = evaluate_store(a.store, a.truth, max_sep=a.max_sep)
    print(format_summary(summary))


def cmd_report(a):
    from deepmosaic.pipeline.report import make_report
    index = make_report(a.store, out_dir=a.out, truth_path=a.truth, max_sep=a.max_sep)
    print(f"report: {index}")


def cmd_export(a):
    from deepmosaic.workflows.export import export_catalogs
    for path in export_catalogs(a.store, fmt=a.format, stages=a.stage, out_dir=a.out_dir, overwrite=a.overwrite):
        print(path)


def cmd_stages(a):
    import dataclasses
    from deepmosaic.tasks import STAGES, _load_optional
    _load_optional()
    for name, cls in sorted(STAGES.items()):
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls.Config):
            print(f"  {name}.{f.name} = {f.default!r}\n      {f.metadata.get('doc', '')}")


#: The demo's default: both SExtractor baselines and every neural stage with its shipped weights.
DEMO_STAGES = "sep,photutils,detect,clumps,clumps_sep,deblend,morphology"


def cmd_demo(a):
    from deepmosaic.pipeline.config import from_mapping
    from deepmosaic.pipeline.simulate import SimConfig, simulate_mosaic
    from deepmosaic.pipeline.truth import write_simulation
    from deepmosaic.workflows.api import run
    os.makedirs(a.out, exist_ok=True)
    image = os.path.join(a.out, "mosaic.fits")
    t0 = time.perf_counter()
    cfg = from_mapping(SimConfig, {"size": (a.size, a.size), "seed": a.seed, "clumpy_density": a.clumps},
                       where="demo")
    sim = simulate_mosaic(cfg)
    _, truth = write_simulation(sim, image, overwrite=True)
    print(f"1/3 simulated a {a.size}x{a.size} mosaic with {len(sim.truth)} objects "
          f"({time.perf_counter() - t0:.1f} s): {image}")
    store = os.path.join(a.out, "mosaic.zarr")
    stages = a.stages
    result = run(image, store, stages=stages, tile=a.tile, workers=a.workers, overwrite=True, truth=truth)
    print(f"2/3 ran stages {stages} over {sum(result.tiles.values())} tiles in {result.seconds:.1f} s")
    _print_run(result)
    from deepmosaic.pipeline.evaluate import format_summary
    print("3/3 evaluation against the simulation's truth:")
    print(format_summary(result.evaluation))
    print(f"\nresults: {store}  (catalogs/, maps/, reports/; export with "
          f"`deepmosaic export {store} --format fits`)")


def cmd_train(a):
    from deepmosaic.models.train import TrainConfig, train
    from deepmosaic.pipeline.config import from_mapping
    from deepmosaic.workflows.api import load_config_file
    params = dict(load_config_file(a.config))
    for kv in a.set or []:
        k, sep_, v = kv.partition("=")
        if not sep_:
            raise DeepmosaicError(f"--set {kv!r}: expected PARAM=VALUE, e.g. --set epochs=5.")
        params[k.strip()] = v.strip()
    params["kind"] = a.kind
    if a.device:
        params["device"] = a.device
    cfg = from_mapping(TrainConfig, params, where="train")
    out = a.out or os.path.join("train_out", a.kind)
    card = train(cfg, out, resume=a.resume)
    print(f"trained {a.kind}: best validation {json.dumps(card['metrics'])}\n  weights: "
          f"{os.path.join(out, a.kind)}.safetensors (+ .json model card)")
    if a.ship:
        import shutil
        from deepmosaic.models.weights_io import WEIGHTS_DIR
        for ext in (".safetensors", ".json"):
            shutil.copy(os.path.join(out, a.kind + ext), os.path.join(WEIGHTS_DIR, a.kind + ext))
        print(f"  shipped to {WEIGHTS_DIR}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmosaic", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a simulated mosaic FITS and its truth (OUT_truth.fits)")
    s.add_argument("out")
    s.add_argument("--size", nargs=2, type=int, default=(2048, 2048), metavar=("H", "W"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--density", type=float, default=300.0, metavar="PER_MPIX")
    s.add_argument("--plant-seams", type=int, default=None, metavar="TILE",
                   help="plant objects on every seam and corner of a TILE-pixel grid")
    s.add_argument("--clumps", type=float, default=0.0, metavar="PER_MPIX",
                   help="add clumpy disk galaxies (per Mpix); their clumps go to the truth's CLUMPS table")
    s.add_argument("--set", action="append", metavar="PARAM=VALUE", help="any other SimConfig field")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_simulate)

    r = sub.add_parser("run", help="run stages over a mosaic into a zarr store")
    r.add_argument("input", nargs="+", help="FITS file or zarr array (several: one per band)")
    r.add_argument("--out", required=True)
    r.add_argument("--stages", default=None, help="comma-separated stages (default: sep)")
    r.add_argument("--tile", type=int, default=None, help="tile core size in pixels (default 1024)")
    r.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE")
    r.add_argument("--config", default=None, help="YAML run config")
    r.add_argument("--workers", type=int, default=None, help="local process workers (default: one per core)")
    r.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    r.add_argument("--sync", action="store_true", help="run in this process, no Dask cluster (debugging)")
    r.add_argument("--hdu", default=None, help="FITS HDU name or number of the image")
    r.add_argument("--cube-bands", action="store_true", help="read a 3-D cube's first axis as bands")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="finish the tiles not yet done")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    r.add_argument("--truth", default=None, help="truth file to evaluate against when done")
    r.set_defaults(fn=cmd_run)

    e = sub.add_parser("evaluate", help="evaluate every stage of a store against a truth file")
    e.add_argument("store")
    e.add_argument("--truth", required=True)
    e.add_argument("--max-sep", type=float, default=2.0, help="matching radius in pixels")
    e.set_defaults(fn=cmd_evaluate)

    rp = sub.add_parser("report", help="write an HTML report (figures, cutouts, summary table) of a store's "
                                       "evaluation")
    rp.add_argument("store")
    rp.add_argument("--out", default=None, metavar="DIR",
                    help="folder for index.html and the figures (default: OUT_report beside OUT.zarr)")
    rp.add_argument("--truth", default=None,
                    help="truth file: evaluate the stages that have no report yet (and draw truth outlines)")
    rp.add_argument("--max-sep", type=float, default=2.0, help="matching radius in pixels when evaluating")
    rp.set_defaults(fn=cmd_report)

    x = sub.add_parser("export", help="write catalogs as FITS, Parquet or ECSV tables with units")
    x.add_argument("store")
    x.add_argument("--format", choices=("fits", "parquet", "ecsv"), default="fits")
    x.add_argument("--stage", action="append", default=None, help="stage(s) to export (default: all)")
    x.add_argument("--out-dir", default=None, help="folder for the tables (default: beside the store)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)

    tr = sub.add_parser("train", help="train a network on simulated data (clumps, deblend, detect)")
    tr.add_argument("kind", choices=("clumps", "deblend", "detect", "morphology"))
    tr.add_argument("--config", default=None, help="YAML with train settings (see deepmosaic.models.train)")
    tr.add_argument("--set", action="append", metavar="PARAM=VALUE", help="e.g. --set epochs=5")
    tr.add_argument("--out", default=None, help="output folder (default train_out/KIND)")
    tr.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    tr.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
    tr.add_argument("--ship", action="store_true", help="copy the result into models/weights/")
    tr.set_defaults(fn=cmd_train)

    from deepmosaic.workflows.workflow_cli import add_parser as add_workflow_parser
    add_workflow_parser(sub)

    t = sub.add_parser("stages", help="list the stages and their parameters")
    t.set_defaults(fn=cmd_stages)

    d = sub.add_parser("demo", help="simulate a mosaic, run the pipeline, evaluate, print a summary")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--size", type=int, default=2048)
    d.add_argument("--seed", type=int, default=2026)
    d.add_argument("--tile", type=int, default=512)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--stages", default=DEMO_STAGES,
                   help="stages to run (default: the baselines and every neural stage with its shipped weights, "
                        "except the slow morphology_fit)")
    d.add_argument("--clumps", type=float, default=40.0,
                   help="clumpy galaxies per Mpix in the simulated mosaic (their clumps are scored too)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        rc = args.fn(args)
    except DeepmosaicError as e:
        print(f"deepmosaic: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
