"""evaluate_store / format_summary: the reports layout, internal consistency and scores on known cases."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.table import Table

from deepmosaic.pipeline import store as st
from deepmosaic.pipeline.errors import StoreError
from deepmosaic.pipeline.evaluate import (BASELINES, MATCH_COLUMNS, SUMMARY_KEYS, evaluate_store,
                                          format_summary, read_reports)
from deepmosaic.pipeline.truth import read_truth

from conftest import simulated_run


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A 512^2 simulated field run through sep and photutils on 256 px tiles (about 4 s)."""
    return simulated_run(tmp_path_factory.mktemp("evalfield"), seed=1)


@pytest.fixture
def store_copy(field, tmp_path):
    """A private copy of the field's store, for tests that add stages or reports."""
    dst = tmp_path / "copy.zarr"
    shutil.copytree(field["store"], dst)
    return str(dst)


def _add_stage(store, name, catalog: dict, segmentation=None):
    """Write a fake stage: catalogs/<name>/* and, optionally, maps/<name>/segmentation (zarr directly)."""
    st.write_catalog(store, name, catalog, {})
    if segmentation is not None:
        root = zarr.open_group(store, mode="r+")
        g = root["maps"].require_group(name)
        a = g.create_array("segmentation", shape=segmentation.shape, dtype="int64", chunks=(256, 256),
                           fill_value=0, overwrite=True)
        a[...] = segmentation.astype(np.int64)


def _copy_stage(store, src, dst, transform=None, seg_transform=None):
    cat = st.read_catalog(store, src)
    if transform is not None:
        cat = transform(cat)
    seg = zarr.open_array(f"{store}/maps/{src}/segmentation", mode="r")[...]
    if seg_transform is not None:
        seg = seg_transform(seg)
    _add_stage(store, dst, cat, seg)
    return cat


def _matches(store, stage):
    g = zarr.open_group(store, mode="r")["reports"][stage]["matches"]
    return {k: g[k][...] for k in g.array_keys()}


# --------------------------------------------------------------------------------------------------

def test_reports_layout(store_copy, field):
    res = evaluate_store(store_copy, field["truth"])
    assert res["_truth"] == field["truth"]
    assert [k for k in res if not k.startswith("_")] == ["sep", "photutils"]
    assert "_versus" not in res  # only baselines: nothing to compare
    root = zarr.open_group(store_copy, mode="r")
    truth, _ = read_truth(field["truth"])
    for stage in ("sep", "photutils"):
        g = root["reports"][stage]
        summary = dict(g.attrs)["summary"]
        assert summary == res[stage]
        assert set(SUMMARY_KEYS) <= set(summary)
        json.dumps(summary, allow_nan=False)  # JSON-friendly: no NaN, numpy scalars or arrays
        assert "versus" not in g.attrs
        m = {k: g["matches"][k][...] for k in g["matches"].array_keys()}
        assert set(MATCH_COLUMNS) == set(m)
        lengths = {len(v) for v in m.values()}
        assert lengths == {summary["n_true"] + summary["n_fp"]}
        assert m["matched"].dtype == bool and m["truth_id"].dtype == np.int64
        assert np.array_equal(m["truth_id"][:len(truth)], np.asarray(truth["id"]))
        for q in ("mag", "snr", "blendedness"):
            c = {k: g["curves"][q][k][...] for k in g["curves"][q].array_keys()}
            assert {"edges", "centres", "completeness", "n_true", "n_true_matched"} <= set(c)
            assert len(c["edges"]) == len(c["centres"]) + 1 == len(c["completeness"]) + 1
            if q != "blendedness":  # predictions get mag (zeropoint) and snr (flux/flux_err)
                assert {"purity", "n_pred", "n_pred_matched"} <= set(c)
        assert dict(g.attrs)["has_segmentation"] is True
        assert dict(g.attrs)["max_sep"] == 2.0


def test_summary_consistent(store_copy, field):
    res = evaluate_store(store_copy, field["truth"])
    truth, _ = read_truth(field["truth"])
    for stage in ("sep", "photutils"):
        s = res[stage]
        cat = st.read_catalog(store_copy, stage)
        m = _matches(store_copy, stage)
        assert s["n_true"] == len(truth)
        assert s["n_pred"] == len(cat["x"])
        assert s["n_tp"] == int(m["matched"].sum())
        assert s["n_tp"] + s["n_fn"] == s["n_true"] and s["n_tp"] + s["n_fp"] == s["n_pred"]
        c, p = s["completeness"], s["purity"]
        assert s["f1"] == pytest.approx(2 * c * p / (c + p))
        assert s["pq"] == pytest.approx(s["mean_iou"] * s["f1"])
        assert s["mean_iou"] == pytest.approx(np.nanmean(m["iou"][m["matched"]]))
        assert np.all(m["distance"][m["matched"]] <= 2.0)
        assert np.all(np.isnan(m["distance"][~m["matched"]]))
        # every predicted id appears exactly once in the table
        pred_ids = m["pred_id"][m["pred_id"] >= 0]
        assert np.array_equal(np.sort(pred_ids), np.sort(cat["id"]))
        # S/N >= 10 subset
        assert s["n_true_snr10"] == int((truth["snr"] >= 10).sum())
        assert s["n_tp_snr10"] <= s["n_tp"] and s["n_pred_snr10"] <= s["n_pred"]
        c10, p10 = s["completeness_snr10"], s["purity_snr10"]
        assert s["f1_snr10"] == pytest.approx(2 * c10 * p10 / (c10 + p10))
        assert s["pq_snr10"] == pytest.approx(s["mean_iou_snr10"] * s["f1_snr10"])
        assert s["median_abs_flux_residual"] == pytest.approx(np.nanmedian(np.abs(m["flux_residual"])))
        # the curves add up to the counts
        g = zarr.open_group(store_copy, mode="r")["reports"][stage]["curves"]
        n_in = int(g["mag"]["n_true"][...].sum())
        assert n_in + int(g["mag"]["n_true_outside"][0]) == s["n_true"]
        assert int(g["mag"]["n_true_matched"][...].sum()) == s["n_tp"]  # every true object has a magnitude


def test_sep_quality_on_a_simulated_field(store_copy, field):
    # measured on this field (seed 1): completeness_snr10 0.926, purity 0.980 (seeds 1-8: 0.87-1.0 and
    # 0.96-1.0); the thresholds leave a margin for small changes in the simulator or the stage
    s = evaluate_store(store_copy, field["truth"], stages="sep")["sep"]
    assert s["completeness_snr10"] > 0.8
    assert s["purity"] > 0.9
    assert s["purity_snr10"] > 0.9
    assert s["mean_iou"] > 0.5


def test_perfect_prediction(store_copy, field, tmp_path):
    truth, segmap = read_truth(field["truth"])
    # a truth that keeps only the objects with a footprint: every matched pair then has pixels
    keep = np.isin(np.asarray(truth["id"]), np.unique(segmap[segmap > 0]))
    assert 0 < keep.sum() < len(truth)  # this field has objects too faint for a footprint
    sub = truth[keep]
    sub_path = tmp_path / "sub_truth.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(sub, name="CATALOG"),
                  fits.ImageHDU(segmap, name="SEGMAP")]).writeto(sub_path)
    cat = {k: np.asarray(sub[k]) for k in ("id", "x", "y", "flux")}
    _add_stage(store_copy, "perfect", cat, segmap)
    res = evaluate_store(store_copy, sub_path, stages=["perfect"])
    s = res["perfect"]
    for key in ("completeness", "purity", "f1", "mean_iou", "pq", "completeness_snr10", "purity_snr10",
                "f1_snr10", "mean_iou_snr10", "mask_f1"):
        assert s[key] == pytest.approx(1.0), key
    assert s["median_abs_flux_residual"] == 0.0
    m = _matches(store_copy, "perfect")
    assert np.all(m["distance"] == 0.0) and np.all(m["iou"] == 1.0)
    # the perfect stage is compared with both baselines on the same true objects
    vs = dict(zarr.open_group(store_copy, mode="r")["reports"]["perfect"].attrs)["versus"]
    assert set(vs) == set(BASELINES)
    for base in BASELINES:
        found_by_base = evaluate_store(store_copy, sub_path, stages=[base])[base]["n_tp"]
        assert vs[base]["only_baseline"] == 0
        assert vs[base]["both_found"] == found_by_base
        assert vs[base]["only_stage"] == len(sub) - found_by_base
        assert vs[base]["neither"] == 0
    assert res["_versus"]["perfect"] == vs

    # every true object, against the full truth: all found, but an object without a footprint (too faint
    # for any pixel to pass the truth's 1-sigma rule) scores IoU 0 by metrics.evaluate_catalog's convention
    _add_stage(store_copy, "perfect_all", {k: np.asarray(truth[k]) for k in ("id", "x", "y", "flux")}, segmap)
    full = evaluate_store(store_copy, field["truth"], stages=["perfect_all"])["perfect_all"]
    assert full["completeness"] == full["purity"] == 1.0
    m = _matches(store_copy, "perfect_all")
    assert np.all(m["iou"][keep] == 1.0) and np.all(m["iou"][~keep] == 0.0)
    assert full["mean_iou"] == pytest.approx(keep.mean())


def test_copied_stage_against_baselines(store_copy, field):
    _copy_stage(store_copy, "sep", "neural")
    res = evaluate_store(store_copy, field["truth"])
    assert list(k for k in res if not k.startswith("_")) == ["sep", "photutils", "neural"]
    for key in ("completeness", "purity", "f1", "mean_iou", "pq", "completeness_snr10"):
        assert res["neural"][key] == res["sep"][key]
    vs = res["_versus"]["neural"]
    assert vs["sep"] == {"both_found": res["sep"]["n_tp"], "only_stage": 0, "only_baseline": 0,
                         "neither": res["sep"]["n_fn"], "snr10": vs["sep"]["snr10"]}
    assert vs["sep"]["snr10"]["only_stage"] == vs["sep"]["snr10"]["only_baseline"] == 0
    p = vs["photutils"]
    assert p["both_found"] + p["only_baseline"] == res["photutils"]["n_tp"]
    assert p["both_found"] + p["only_stage"] == res["neural"]["n_tp"]
    assert sum(p[k] for k in ("both_found", "only_stage", "only_baseline", "neither")) == res["neural"]["n_true"]
    assert "versus" not in zarr.open_group(store_copy, mode="r")["reports"]["sep"].attrs
    assert "neural vs sep" in format_summary(res)


def test_corrupted_catalogs_score_lower(store_copy, field):
    base = evaluate_store(store_copy, field["truth"], stages="sep")["sep"]
    rng = np.random.default_rng(0)

    def shift_half(cat):
        cat = dict(cat)
        x = cat["x"].copy()
        x[::2] += 6.0  # far beyond max_sep = 2 px
        cat["x"] = x
        return cat

    cat = _copy_stage(store_copy, "sep", "shifted", transform=shift_half)
    n_shifted = len(cat["x"][::2])

    def add_spurious(cat):
        n = 30
        out = {k: np.concatenate([v, v[:1].repeat(n)]) for k, v in cat.items()}
        out["x"][-n:] = rng.uniform(0, 511, n)
        out["y"][-n:] = rng.uniform(0, 511, n)
        out["id"][-n:] = cat["id"].max() + 1 + np.arange(n)
        return out

    _copy_stage(store_copy, "sep", "spurious", transform=add_spurious)
    _copy_stage(store_copy, "sep", "segshift", seg_transform=lambda s: np.roll(s, 3, axis=1))
    res = evaluate_store(store_copy, field["truth"], stages=["shifted", "spurious", "segshift"])

    sh = res["shifted"]
    # the shifted half is lost (a shifted detection may land on another true object by chance)
    assert sh["n_tp"] <= base["n_tp"] - n_shifted + 3
    assert sh["completeness"] < base["completeness"] - 0.2
    assert sh["purity"] < base["purity"] - 0.3
    assert sh["f1"] < base["f1"]

    sp = res["spurious"]
    assert sp["n_pred"] == base["n_pred"] + 30
    assert sp["n_tp"] >= base["n_tp"]  # spurious positions cannot unmatch a real pair
    assert sp["purity"] < base["purity"] - 0.2
    assert sp["completeness"] >= base["completeness"]

    sg = res["segshift"]
    assert sg["completeness"] == base["completeness"] and sg["purity"] == base["purity"]
    assert sg["mean_iou"] < base["mean_iou"] - 0.1
    assert sg["pq"] < base["pq"]


def test_truth_without_segmap(store_copy, field, tmp_path):
    truth, _ = read_truth(field["truth"])
    path = tmp_path / "truth.ecsv"
    truth.write(path, format="ascii.ecsv")
    res = evaluate_store(store_copy, path)
    for stage in ("sep", "photutils"):
        s = res[stage]
        assert s["mean_iou"] is None and s["pq"] is None
        assert s["mean_iou_snr10"] is None and s["pq_snr10"] is None
        assert s["completeness"] > 0.5
        m = _matches(store_copy, stage)
        assert np.all(np.isnan(m["iou"]))
        assert dict(zarr.open_group(store_copy, mode="r")["reports"][stage].attrs)["has_segmentation"] is False
    assert "-" in format_summary(res)


def test_minimal_truth_catalog(store_copy, field, tmp_path):
    """A plain catalog with only id, x, y: no flux, no S/N, no curves by magnitude."""
    truth, _ = read_truth(field["truth"])
    path = tmp_path / "minimal.csv"
    Table({k: truth[k] for k in ("id", "x", "y")}).write(path, format="ascii.csv")
    s = evaluate_store(store_copy, path, stages="sep")["sep"]
    assert s["median_abs_flux_residual"] is None and s["completeness_snr10"] is None
    assert s["completeness"] > 0.5
    g = zarr.open_group(store_copy, mode="r")["reports"]["sep"]
    assert "mag" not in g["curves"]  # predictions get no magnitude without a zeropoint
    text = format_summary({"sep": s})
    assert "sep" in text


def test_reevaluation_replaces_the_report(store_copy, field):
    evaluate_store(store_copy, field["truth"], stages="sep")
    root = zarr.open_group(store_copy, mode="r+")
    root["reports"]["sep"].create_array("stale", shape=(1,), dtype="int8")
    s = evaluate_store(store_copy, field["truth"], stages="sep", max_sep=0.5)["sep"]
    g = zarr.open_group(store_copy, mode="r")["reports"]["sep"]
    assert "stale" not in g
    assert dict(g.attrs)["summary"]["max_sep"] == 0.5 == s["max_sep"]
    assert read_reports(store_copy)["sep"]["attrs"]["summary"] == s


def test_store_errors(store_copy, field, tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        evaluate_store(tmp_path / "nothing.zarr", field["truth"])
    with pytest.raises(StoreError, match="no catalog for stage"):
        evaluate_store(store_copy, field["truth"], stages="unet")
    for stage in ("sep", "photutils"):
        shutil.rmtree(f"{store_copy}/catalogs/{stage}")
    with pytest.raises(StoreError, match="Run the pipeline first"):
        evaluate_store(store_copy, field["truth"])


def test_format_summary_is_an_aligned_table():
    s = {"n_true": 10, "n_pred": 8, "n_tp": 7, "completeness": 0.7, "purity": 0.875, "f1": 0.7777777,
         "mean_iou": None, "pq": None, "median_abs_flux_residual": 0.05, "max_sep": 2.0, "n_true_snr10": 5,
         "completeness_snr10": 1.0, "purity_snr10": 1.0, "f1_snr10": 1.0}
    text = format_summary({"sep": s, "a_long_stage_name": dict(s, n_pred=12345), "_truth": "t.fits"})
    lines = text.splitlines()
    assert lines[0].startswith("truth: t.fits")
    table = lines[1:]
    assert len(table) == 4 and len({len(line) for line in table}) == 1  # header, rule, two rows
    assert "0.875" in text and "0.778" in text and "12345" in text
    assert table[2].split()[5] == "-"  # mean IoU unknown


def test_run_with_truth_writes_reports(field, tmp_path):
    from deepmosaic.workflows import run
    store = tmp_path / "withtruth.zarr"
    result = run(field["image"], str(store), stages="sep", tile=256, workers=0, truth=field["truth"])
    assert result.evaluation["sep"]["n_tp"] > 0
    rep = read_reports(store)
    assert list(rep) == ["sep"]
    assert rep["sep"]["attrs"]["summary"] == result.evaluation["sep"]


def test_cli_evaluate_prints_the_table(store_copy, field, capsys):
    from deepmosaic.workflows.cli import main
    assert main(["evaluate", store_copy, "--truth", field["truth"]]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "compl S/N>=10" in lines[1]
    # the main table: the rows after the header rule (the per-stage extra sections follow it)
    rule = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    rows = [line for line in lines[rule + 1:rule + 3]]
    assert sorted(r.split()[0] for r in rows) == ["photutils", "sep"]
    summary = read_reports(store_copy)["sep"]["attrs"]["summary"]
    row = next(r for r in rows if r.startswith("sep"))
    assert f"{summary['completeness']:.3f}" in row and f"{summary['purity']:.3f}" in row
    assert not math.isnan(summary["completeness"])
    # a store without catalogs: a clear error, exit status 2
    shutil.rmtree(f"{store_copy}/catalogs/sep")
    shutil.rmtree(f"{store_copy}/catalogs/photutils")
    assert main(["evaluate", store_copy, "--truth", field["truth"]]) == 2
    assert "Run the pipeline first" in capsys.readouterr().err
