"""`deepmosaic demo` (the README quickstart's main job): simulate, run every default stage, evaluate."""
from __future__ import annotations

import zarr

from deepmosaic.workflows.cli import DEMO_STAGES, main


def test_demo_runs_every_default_stage_and_evaluates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "512", "--tile", "256", "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "1/3 simulated" in text and "3/3 evaluation" in text and str(out / "mosaic.zarr") in text
    root = zarr.open_group(str(out / "mosaic.zarr"), mode="r")
    stages = DEMO_STAGES.split(",")
    assert sorted(root["catalogs"].group_keys()) == sorted(stages)
    # every stage with a galaxy catalog is scored against the galaxy truth, the clump stages against the clumps
    assert set(root["reports"].group_keys()) >= {s for s in stages if not s.startswith("clumps")}
    assert "clump stages vs the CLUMPS truth" in text
