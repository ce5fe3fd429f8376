"""Detection scores (pipeline/eval_detect.py): blend sets, AP50 of boxes, the evaluate/report hooks."""
from __future__ import annotations

import numpy as np

from deepmosaic.pipeline import eval_detect
from deepmosaic.pipeline.evaluate import evaluate_store, format_summary, read_reports

from conftest import simulated_run


def _truth():
    # two stars 2 px apart, a galaxy pair 6 px apart (hlr 3 px), a faint neighbour, an isolated star
    return {"id": np.arange(1, 7), "x": np.array([10.0, 12.0, 50.0, 56.0, 90.0, 91.0]),
            "y": np.array([10.0, 10.0, 50.0, 50.0, 90.0, 150.0]),
            "snr": np.array([50.0, 20.0, 30.0, 15.0, 40.0, 1.0]),
            "hlr": np.array([0.0, 0.0, 3.0, 3.0, 0.0, 0.0])}


def test_blend_and_close_pair_sets():
    t = _truth()
    t["x"][5], t["y"][5] = 91.0, 90.0            # S/N 1 neighbour 1 px from the isolated star: not a blend
    s = eval_detect.neighbour_sets(t, psf=3.5)
    np.testing.assert_array_equal(s["close_pair"], [True, True, False, False, False, False])
    # galaxies: 6 px < 2 * sqrt(3^2 + 1.75^2) = 6.9 px
    np.testing.assert_array_equal(s["blended"], [True, True, True, True, False, False])
    assert not eval_detect.neighbour_sets(t, psf=None)["blended"].any()


def test_ap50_of_exact_boxes_is_one_and_shifted_boxes_score_lower():
    t = _truth()
    tb = eval_detect.true_boxes(t, None, psf=4.0)
    assert np.allclose(tb[:, 2:], 4.0)           # no footprints: half a FWHM on each side
    cat = {"x": t["x"], "y": t["y"], "width": tb[:, 2], "height": tb[:, 3], "score": np.linspace(1, 0.5, 6)}
    d = eval_detect.detection_metrics(t, None, {"PSFFWHM": 0.8, "PIXSCALE": 0.2}, cat, None, np.ones(6, bool))
    assert d["ap50"] == 1.0 and d["psf_fwhm_px"] == 4.0 and d["blend_recall"] == 1.0
    cat["y"] = t["y"] + 1.5                      # IoU of 4 px boxes shifted by 1.5 px: 10 / 22 = 0.45
    d = eval_detect.detection_metrics(t, None, {"PSFFWHM": 0.8, "PIXSCALE": 0.2}, cat, None, np.zeros(6, bool))
    assert d["ap50"] == 0.0 and d["blend_recall"] == 0.0 and d["close_pair_recall"] == 0.0


def test_evaluate_and_report_carry_detection_scores(tmp_path):
    r = simulated_run(tmp_path, size=(256, 256), seed=3, stages="sep,detect", tile=256)
    summary = evaluate_store(r["store"], r["truth"])
    det = summary["_detection"]
    assert set(det) == {"sep", "detect"}
    for d in det.values():
        assert 0.0 <= d["ap50"] <= 1.0 and abs(d["psf_fwhm_px"] - 3.5) < 1e-9
    assert "AP50" in format_summary(summary)
    assert read_reports(r["store"])["detect"]["attrs"]["detection"] == det["detect"]
    assert eval_detect.report_section(read_reports(r["store"]))[0] == "<h2>Detection</h2>"
