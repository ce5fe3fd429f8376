"""Deblending evaluation: the reliability curve and blend-member IoUs, through evaluate and report."""
from __future__ import annotations

import json

import numpy as np

from deepmosaic.pipeline.eval_deblend import member_ious, reliability


def test_reliability_counts_wrong_labels_per_bin():
    truth = np.zeros((6, 8), np.int64)
    truth[1:5, 1:4], truth[1:5, 4:7] = 1, 2
    pred = np.where(truth > 0, truth + 10, 0)          # the same objects under other ids
    region = truth >= 0
    unc = np.zeros(truth.shape)
    r = reliability(truth, pred, unc, region)
    assert r["error_rate_all"] == 0.0 and sum(r["n_pixels"]) == truth.size == r["n_region"]
    # move one column of object 2 to object 1 and mark exactly those pixels uncertain
    pred2 = pred.copy()
    pred2[1:5, 4] = 11
    unc2 = np.where(pred2 != pred, 0.6, 0.01)
    r = reliability(truth, pred2, unc2, region)
    k = r["edges"].index(0.5)
    assert r["error_rate"][k] == 1.0 and r["n_pixels"][k] == 4 and r["error_rate"][0] == 0.0
    assert abs(r["mean_uncertainty"][k] - 0.6) < 1e-12
    # an unmatched prediction is wrong everywhere it lies; the region restricts the pixels scored
    pred3 = pred.copy()
    pred3[pred3 == 12] = 0
    pred3[1:5, 6] = 99
    r = reliability(truth, pred3, unc, truth == 2)
    assert r["n_region"] == 12 and r["error_rate_all"] == 1.0


def test_member_ious_zero_when_unmatched():
    truth = np.zeros((4, 8), np.int64)
    truth[:, :4], truth[:, 4:] = 1, 2
    pred = np.zeros_like(truth)
    pred[:, :4] = 5
    assert member_ious(truth, pred, np.array([1, 2])).tolist() == [1.0, 0.0]


def test_evaluate_and_report_show_the_reliability_curve(tmp_path):
    from conftest import simulated_run

    from deepmosaic.pipeline.evaluate import evaluate_store, format_summary
    from deepmosaic.pipeline.report import make_report
    from deepmosaic.pipeline.store import open_store
    r = simulated_run(tmp_path, size=(512, 512), seed=4, stages="sep,deblend", tile=256)
    summary = evaluate_store(r["store"], r["truth"])
    d = summary["_deblend"]["deblend"]
    assert "sep" not in summary.get("_deblend", {})
    rel = d["reliability"]
    assert sum(rel["n_pixels"]) == rel["n_region"] > 0
    assert d["blends"]["n_members"] > 0 and 0 <= d["blends"]["mean_iou"] <= 1
    assert d["blends"]["baseline"] == "sep"
    attrs = dict(open_store(r["store"])["reports"]["deblend"].attrs)
    assert json.loads(json.dumps(attrs["deblend"])) == d
    assert "uncertainty reliability" in format_summary(summary)
    index = make_report(r["store"], tmp_path / "report")
    text = index.read_text()
    assert "<h2>Deblending</h2>" in text and (tmp_path / "report" / "deblend_reliability_deblend.png").exists()
