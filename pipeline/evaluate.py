"""Score every stage of a result store against a truth catalog, and write the scores into the store.

``evaluate_store`` matches each stage's catalog to the truth with :func:`deepmosaic.pipeline.metrics.evaluate_catalog`
(one-to-one Hungarian assignment on centroid distance within ``max_sep`` pixels; mask IoU of each matched
pair when the stage has ``maps/<stage>/segmentation`` and the truth file has a SEGMAP) and writes

::

    reports/<stage>/                    one group per evaluated stage (replaced on every evaluation)
        attrs["summary"]                JSON: see SUMMARY_KEYS (+ the mask_* keys of evaluate_catalog)
        attrs["versus"]                 only for non-baseline stages: {baseline: {both_found, only_stage,
                                        only_baseline, neither, snr10: {...same...}}} on the truth objects
        attrs["truth"], ["max_sep"], ["zeropoint"], ["has_segmentation"], ["created"], ["baselines"]
        matches/<column>                1-D arrays, one row per true object (input order, matched or not),
                                        then one per unmatched prediction (see MATCH_COLUMNS)
        curves/<quantity>/<field>       binned completeness (true objects) and purity (predictions) against
                                        quantity in mag, snr, blendedness (see CURVE_FIELDS)

Predictions carry no magnitude or S/N of their own, so for the purity curves they get
``mag = zeropoint - 2.5 log10(flux)`` (zeropoint: the median of ``mag + 2.5 log10(flux)`` over the truth)
and ``snr = flux / flux_err``. The latter is an aperture S/N, not the truth's matched-filter S/N: compare
purity-vs-S/N curves between stages, not with the completeness-vs-S/N curve.

The clump stages (``clumps``, ``clumps_sep``) are not galaxies: they are scored against the truth's CLUMPS
table by :mod:`deepmosaic.pipeline.eval_clumps` (``reports_clumps/``, ``summary["_clumps"]``), never here.

The ``*_snr10`` summary keys restrict the evaluation to true objects with S/N >= 10 (simulated fields hold
many objects below any detection limit). The matching is the one over all objects; predictions matched to
a true object with S/N < 10 are neither true nor false positives there (they found something real), every
unmatched prediction still counts as false.
"""
from __future__ import annotations

import datetime as _dt
import math
import os

import numpy as np

from . import eval_clumps, eval_deblend, eval_detect, eval_morphology, metrics
from .errors import InputError, StoreError
from .store import open_store, read_catalog
from .truth import read_truth

__all__ = ["evaluate_store", "format_summary", "read_reports", "BASELINES", "MATCH_COLUMNS", "CURVE_FIELDS",
           "SUMMARY_KEYS", "SNR_CUT"]

#: Stages every other stage is compared with (``attrs["versus"]``).
BASELINES = ("sep", "photutils")

#: S/N threshold of the ``*_snr10`` keys.
SNR_CUT = 10.0

#: Columns of ``reports/<stage>/matches`` (all 1-D, same length). ``-1`` / NaN where there is no partner.
MATCH_COLUMNS = {
    "truth_index": "row in the truth catalog (-1: unmatched prediction)",
    "pred_index": "row in the stage's catalog (-1: missed true object)",
    "truth_id": "truth id (-1: unmatched prediction)",
    "pred_id": "stage catalog id = its label in maps/<stage>/segmentation (-1: missed true object)",
    "matched": "true for a matched pair",
    "distance": "centroid separation of the pair, pix (NaN unless matched)",
    "iou": "mask IoU of the pair (NaN unless matched and both segmentations exist)",
    "flux_residual": "(pred flux - true flux) / true flux (NaN unless matched)",
    "truth_x": "true x, 0-based pix", "truth_y": "true y, 0-based pix",
    "truth_flux": "true flux", "truth_mag": "true magnitude", "truth_snr": "true matched-filter S/N",
    "truth_blendedness": "true blendedness",
    "pred_x": "predicted x, 0-based pix", "pred_y": "predicted y, 0-based pix",
    "pred_flux": "predicted flux", "pred_mag": "zeropoint - 2.5 log10(pred flux)",
}

#: Fields of ``reports/<stage>/curves/<quantity>``. The ``purity``/``n_pred*`` fields are present only when
#: the predictions carry the quantity (they have no blendedness).
CURVE_FIELDS = ("edges", "centres", "completeness", "n_true", "n_true_matched", "n_true_outside",
                "purity", "n_pred", "n_pred_matched", "n_pred_outside")

#: Keys of ``attrs["summary"]`` (always present; ``None`` where not computable).
SUMMARY_KEYS = ("n_true", "n_pred", "n_tp", "n_fp", "n_fn", "completeness", "purity", "f1", "mean_iou", "pq",
                "median_abs_flux_residual", "max_sep",
                "n_true_snr10", "n_pred_snr10", "n_tp_snr10", "completeness_snr10", "purity_snr10", "f1_snr10",
                "mean_iou_snr10", "pq_snr10", "median_abs_flux_residual_snr10")

_TRUTH_COLUMNS = ("id", "x", "y", "flux", "mag", "snr", "blendedness")


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

def _stages_with_catalogs(root) -> list[str]:
    if "catalogs" not in root:
        return []
    g = root["catalogs"]
    out = []
    for name in sorted(g.group_keys()):
        keys = set(g[name].array_keys())
        if {"x", "y"} <= keys and name not in eval_clumps.CLUMP_STAGES:  # clumps: scored by eval_clumps
            out.append(name)
    # baselines first (in BASELINES order), then the other stages alphabetically
    return [b for b in BASELINES if b in out] + [s for s in out if s not in BASELINES]


def _truth_columns(table) -> dict:
    cols = {}
    for c in _TRUTH_COLUMNS:
        if c in table.colnames:
            v = np.asarray(table[c])
            if c == "id":
                cols[c] = v.astype(np.int64)
            elif v.dtype.kind in "biuf":
                cols[c] = v.astype(np.float64)
    return cols


def _zeropoint(truth: dict):
    """Magnitude zeropoint implied by the truth's ``mag`` and ``flux`` columns, or None."""
    if "mag" not in truth or "flux" not in truth:
        return None
    f, m = truth["flux"], truth["mag"]
    ok = np.isfinite(f) & np.isfinite(m) & (f > 0)
    if not ok.any():
        return None
    return float(np.median(m[ok] + 2.5 * np.log10(f[ok])))


def _pred_columns(cat: dict, zeropoint) -> dict:
    """The catalog columns evaluate_catalog uses, plus a derived ``mag`` and ``snr`` when absent."""
    cols = {k: np.asarray(cat[k]) for k in ("x", "y") if k in cat}
    cols["x"] = cols["x"].astype(np.float64)
    cols["y"] = cols["y"].astype(np.float64)
    if "id" in cat and np.asarray(cat["id"]).dtype.kind in "iu":
        cols["id"] = np.asarray(cat["id"]).astype(np.int64)
    if "flux" in cat:
        cols["flux"] = np.asarray(cat["flux"], dtype=np.float64)
    for q in metrics.CURVE_QUANTITIES:
        if q in cat and np.asarray(cat[q]).dtype.kind in "biuf":
            cols[q] = np.asarray(cat[q], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if "mag" not in cols and zeropoint is not None and "flux" in cols:
            f = cols["flux"]
            cols["mag"] = np.where(f > 0, zeropoint - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)
        if "snr" not in cols and "flux" in cols and "flux_err" in cat:
            e = np.asarray(cat["flux_err"], dtype=np.float64)
            cols["snr"] = np.where(e > 0, cols["flux"] / np.where(e > 0, e, 1.0), np.nan)
    return cols


def _edges(quantity: str, samples: list) -> np.ndarray | None:
    """Common bin edges of one quantity for every stage (so that curves can be overlaid)."""
    vals = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if quantity == "blendedness":
        return np.linspace(0.0, 1.0, 11)
    if quantity == "snr":
        vals = vals[vals > 0]
        if vals.size == 0:
            return None
        lo = math.floor(4 * math.log10(max(float(vals.min()), 0.1))) / 4
        hi = math.ceil(4 * math.log10(float(vals.max()))) / 4
        if hi <= lo:
            hi = lo + 0.25
        return 10.0 ** np.arange(lo, hi + 1e-9, 0.25)
    if vals.size == 0:
        return None
    lo = math.floor(2 * float(vals.min())) / 2
    hi = math.ceil(2 * float(vals.max())) / 2
    if hi <= lo:
        hi = lo + 0.5
    n = int(round((hi - lo) / 0.5))
    if n > 60:  # an absurd range (a huge outlier): fall back to 40 equal bins
        return np.linspace(lo, hi, 41)
    return np.linspace(lo, hi, n + 1)


def _read_map(root, stage: str):
    if "maps" in root and stage in root["maps"] and "segmentation" in root["maps"][stage]:
        return root["maps"][stage]["segmentation"]
    return None


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------

def _none_or_float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _snr10_summary(table: dict, truth: dict, n_pred: int, has_seg: bool) -> dict:
    keys = ("n_true_snr10", "n_pred_snr10", "n_tp_snr10", "completeness_snr10", "purity_snr10", "f1_snr10",
            "mean_iou_snr10", "pq_snr10", "median_abs_flux_residual_snr10")
    if "snr" not in truth:
        return dict.fromkeys(keys)
    n_true = len(truth["x"])
    bright = np.asarray(truth["snr"] >= SNR_CUT)  # NaN -> False
    matched_t = table["matched"][:n_true]
    n_true_b = int(bright.sum())
    n_tp_b = int((matched_t & bright).sum())
    n_tp_faint = int((matched_t & ~bright).sum())
    n_pred_b = n_pred - n_tp_faint  # predictions of faint true objects are don't-cares
    det = metrics.detection_scores(n_true_b, n_pred_b, n_tp_b)
    sel = matched_t & bright
    ious = table["iou"][:n_true][sel]
    out = {"n_true_snr10": n_true_b, "n_pred_snr10": n_pred_b, "n_tp_snr10": n_tp_b,
           "completeness_snr10": det["completeness"], "purity_snr10": det["purity"], "f1_snr10": det["f1"]}
    if has_seg:
        out["mean_iou_snr10"] = float(ious.mean()) if ious.size else None
        out["pq_snr10"] = metrics.panoptic_quality(ious, n_true_b, n_pred_b)
    else:
        out["mean_iou_snr10"] = None
        out["pq_snr10"] = None
    r = table["flux_residual"][:n_true][sel]
    r = r[np.isfinite(r)]
    out["median_abs_flux_residual_snr10"] = float(np.median(np.abs(r))) if r.size else None
    return out


def _match_table(table: dict, truth: dict, pred: dict) -> dict:
    """evaluate_catalog's table plus the positions, fluxes and curve quantities of both sides."""
    out = {k: table[k] for k in ("truth_index", "pred_index", "truth_id", "pred_id", "matched", "distance",
                                 "iou", "flux_residual")}
    ti, pj = table["truth_index"], table["pred_index"]
    for side, idx, cols, names in (("truth", ti, truth, ("x", "y", "flux", "mag", "snr", "blendedness")),
                                   ("pred", pj, pred, ("x", "y", "flux", "mag"))):
        for c in names:
            v = np.full(len(idx), np.nan)
            if c in cols and len(cols[c]):
                ok = idx >= 0
                v[ok] = np.asarray(cols[c], dtype=np.float64)[idx[ok]]
            out[f"{side}_{c}"] = v
    return out


def _curves(curves: dict, edges: dict) -> dict:
    out = {}
    for q, e in edges.items():
        c = curves["completeness"].get(q)
        p = curves["purity"].get(q)
        if c is None and p is None:
            continue
        d = {"edges": np.asarray(e, np.float64), "centres": 0.5 * (np.asarray(e[:-1]) + np.asarray(e[1:]))}
        if c is not None:
            d.update(completeness=c["fraction"], n_true=c["n"], n_true_matched=c["n_matched"],
                     n_true_outside=np.array([c["n_outside"]], np.int64))
        if p is not None:
            d.update(purity=p["fraction"], n_pred=p["n"], n_pred_matched=p["n_matched"],
                     n_pred_outside=np.array([p["n_outside"]], np.int64))
        out[q] = d
    return out


def _versus(found: dict, truth: dict, stage: str) -> dict:
    """Overlap of the true objects found by ``stage`` and by each baseline present."""
    bright = np.asarray(truth["snr"] >= SNR_CUT) if "snr" in truth else None
    out = {}
    for base in BASELINES:
        if base not in found or base == stage:
            continue

        def counts(sel):
            a, b = found[stage][sel], found[base][sel]
            return {"both_found": int((a & b).sum()), "only_stage": int((a & ~b).sum()),
                    "only_baseline": int((~a & b).sum()), "neither": int((~a & ~b).sum())}

        d = counts(np.ones(len(truth["x"]), bool))
        if bright is not None:
            d["snr10"] = counts(bright)
        out[base] = d
    return out


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------

def _write_array(group, name: str, values, attrs=None):
    values = np.asarray(values)
    a = group.create_array(name, shape=values.shape, dtype=values.dtype,
                           chunks=tuple(max(1, s) for s in values.shape) or None, overwrite=True)
    if values.size:
        a[...] = values
    if attrs:
        a.attrs.update(attrs)


def _write_report(root, stage: str, match: dict, curves: dict, attrs: dict):
    reports = root.require_group("reports")
    g = reports.create_group(stage, overwrite=True)  # a fresh group: no leftovers of an older evaluation
    m = g.create_group("matches")
    for name, values in match.items():
        _write_array(m, name, values, {"description": MATCH_COLUMNS.get(name, "")})
    m.attrs["n_rows"] = int(len(match["matched"]))
    c = g.create_group("curves")
    for q, fields in curves.items():
        cq = c.create_group(q)
        for name, values in fields.items():
            _write_array(cq, name, values)
    g.attrs.update(attrs)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------

def evaluate_store(store_path, truth_path, max_sep=2.0, stages=None) -> dict:
    """Evaluate the catalogs of a store against a truth file and write ``reports/<stage>/`` (module doc).

    Parameters
    ----------
    store_path : path of a store written by ``deepmosaic run``
    truth_path : truth file (``*_truth.fits`` from ``deepmosaic simulate``; with a SEGMAP for IoUs) or any
        catalog :func:`~deepmosaic.pipeline.truth.read_truth` accepts (0-based pixel ``x``, ``y``)
    max_sep : largest centroid separation of a matched pair, in pixels (inclusive)
    stages : stage name(s) to evaluate (list or comma-separated string); default every stage with a catalog

    Returns
    -------
    dict
        ``{stage: summary}`` (the dict written to ``reports/<stage>/attrs["summary"]``), ``"_truth"``: the
        truth path, and ``"_versus"``: ``{stage: versus}`` for non-baseline stages (when there are any).

    Raises
    ------
    StoreError
        No store, no catalog in it (run the pipeline first), or an unknown stage.
    InputError
        Unreadable truth, or a truth SEGMAP whose shape differs from the store's maps.

    Notes
    -----
    The segmentation maps (truth and stage) are read whole into memory: fine for the fields evaluated so
    far (a 8192^2 int64 map is 0.5 GB). Future work: a chunked evaluation that accumulates the label
    overlaps tile by tile from the zarr chunks.
    """
    store_path = os.fspath(store_path)
    truth_path = os.fspath(truth_path)
    root = open_store(store_path, mode="r+")
    stages, clump_stages = eval_clumps.split_stages(root, stages)
    clumps = (eval_clumps.evaluate_clumps(store_path, truth_path, clump_stages, required=stages is not None)
              if clump_stages else None)
    if stages == [] and clumps is not None:
        return {"_truth": truth_path, "_clumps": clumps}
    available = _stages_with_catalogs(root)
    if not available:
        raise StoreError(f"{store_path}: the store has no catalogs to evaluate. Run the pipeline first "
                         f"(`deepmosaic run INPUT --out {store_path}`, or `--resume` to finish an "
                         f"interrupted run: catalogs are written when every tile is done).")
    if stages is None:
        wanted = available
    else:
        wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
        unknown = [s for s in wanted if s not in available]
        if unknown or not wanted:
            raise StoreError(f"{store_path}: no catalog for stage(s) {unknown or wanted}; the store has "
                             f"{available}.")
    max_sep = float(max_sep)
    table, segmap = read_truth(truth_path)
    truth = _truth_columns(table)
    zp = _zeropoint(truth)

    # baselines are matched too (not written unless asked for) so that other stages can be compared
    todo = list(wanted) + [b for b in BASELINES if b in available and b not in wanted
                           and any(s not in BASELINES for s in wanted)]
    preds = {s: _pred_columns(read_catalog(store_path, s), zp) for s in todo}
    edges = {}
    for q in metrics.CURVE_QUANTITIES:
        samples = ([truth[q]] if q in truth else []) + [p[q] for p in preds.values() if q in p]
        e = _edges(q, samples)
        if e is not None and (q in truth or any(q in p for p in preds.values())):
            edges[q] = e

    results, found = {}, {}
    for stage in todo:
        pred = preds[stage]
        seg = _read_map(root, stage)
        truth_seg = pred_seg = None
        if segmap is not None and seg is not None and "id" in pred:
            if tuple(seg.shape) != tuple(segmap.shape):
                raise InputError(f"{truth_path}: SEGMAP has shape {segmap.shape} but the store's "
                                 f"maps/{stage}/segmentation has {tuple(seg.shape)}: the truth does not "
                                 f"describe this mosaic. Pass the truth file of the input the store was made "
                                 f"from.")
            truth_seg, pred_seg = segmap, seg[...]
        tab, summary, curves = metrics.evaluate_catalog(truth, pred, max_sep=max_sep, truth_seg=truth_seg,
                                                        pred_seg=pred_seg, bins=edges)
        summary = {k: (_none_or_float(v) if isinstance(v, float) else v) for k, v in summary.items()}
        summary.update(_snr10_summary(tab, truth, len(pred["x"]), truth_seg is not None))
        found[stage] = tab["matched"][:len(truth["x"])].copy()
        results[stage] = (tab, summary, curves, truth_seg is not None)

    out = {}
    versus_all = {}
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for stage in wanted:
        tab, summary, curves, has_seg = results[stage]
        attrs = {"summary": summary, "truth": os.path.abspath(truth_path), "max_sep": max_sep,
                 "zeropoint": zp, "has_segmentation": bool(has_seg), "created": created,
                 "baselines": list(BASELINES), "snr_cut": SNR_CUT}
        attrs["detection"] = eval_detect.for_stage(store_path, stage, table, segmap, found[stage])
        out.setdefault("_detection", {})[stage] = attrs["detection"]
        deblend = eval_deblend.for_stage(root, stage, segmap)
        if deblend:
            attrs["deblend"] = out.setdefault("_deblend", {})[stage] = deblend
        morph = eval_morphology.for_stage(read_catalog(store_path, stage), table, max_sep)
        if morph:
            attrs["morphology"] = out.setdefault("_morphology", {})[stage] = morph
        if stage not in BASELINES:
            vs = _versus(found, truth, stage)
            if vs:
                attrs["versus"] = vs
                versus_all[stage] = vs
        _write_report(root, stage, _match_table(tab, truth, preds[stage]), _curves(curves, edges), attrs)
        out[stage] = summary
    out["_truth"] = truth_path
    if clumps is not None:
        out["_clumps"] = clumps
    if versus_all:
        out["_versus"] = versus_all
    return out


def read_reports(store_path) -> dict:
    """``{stage: {"attrs": dict, "matches": {column: array}, "curves": {quantity: {field: array}}}}``."""
    root = open_store(os.fspath(store_path))
    out = {}
    if "reports" not in root:
        return out
    for stage in sorted(root["reports"].group_keys()):
        g = root["reports"][stage]
        attrs = dict(g.attrs)
        if "summary" not in attrs:
            continue
        matches = {k: g["matches"][k][...] for k in g["matches"].array_keys()} if "matches" in g else {}
        curves = {}
        if "curves" in g:
            for q in g["curves"].group_keys():
                cq = g["curves"][q]
                curves[q] = {k: cq[k][...] for k in cq.array_keys()}
        out[stage] = {"attrs": attrs, "matches": matches, "curves": curves}
    return out


# --------------------------------------------------------------------------------------------------
# text summary
# --------------------------------------------------------------------------------------------------

_TABLE = (("n_pred", "n_pred", "d"), ("completeness", "compl", "f"), ("purity", "purity", "f"), ("f1", "F1", "f"),
          ("mean_iou", "mean IoU", "f"), ("pq", "PQ", "f"), ("median_abs_flux_residual", "med|dF/F|", "f"),
          ("completeness_snr10", "compl S/N>=10", "f"), ("purity_snr10", "purity S/N>=10", "f"),
          ("f1_snr10", "F1 S/N>=10", "f"))


def _cell(v, kind):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{int(v)}" if kind == "d" else f"{float(v):.3f}"


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`evaluate_store`'s result: one row per stage, aligned, 3 decimals.

    ``-`` marks a value that cannot be computed (e.g. IoU without segmentation maps). Keys starting with
    ``_`` are not stages; ``_truth`` heads the table and ``_versus`` adds a comparison with the baselines.
    """
    stages = [k for k in summary if not str(k).startswith("_")]
    header = ["stage"] + [h for _, h, _ in _TABLE]
    rows = [[s] + [_cell(summary[s].get(k), kind) for k, _, kind in _TABLE] for s in stages]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    lines = []
    first = summary[stages[0]] if stages else {}
    head = []
    if "_truth" in summary:
        head.append(f"truth: {summary['_truth']}")
    if first:
        n10 = first.get("n_true_snr10")
        head.append(f"n_true: {first.get('n_true')}" + (f" ({n10} with S/N>={SNR_CUT:g})" if n10 is not None else ""))
        head.append(f"max_sep: {first.get('max_sep')} pix")
    if head:
        lines.append("  ".join(head))
    if rows:  # no galaxy table when only the clump stages were evaluated
        lines.append(line(header))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(line(r) for r in rows)
    for stage, vs in (summary.get("_versus") or {}).items():
        for base, d in vs.items():
            lines.append(f"{stage} vs {base} (true objects): both {d['both_found']}, only {stage} "
                         f"{d['only_stage']}, only {base} {d['only_baseline']}, neither {d['neither']}")
    lines.extend(eval_detect.format_lines(summary.get("_detection")))
    lines.extend(eval_deblend.format_lines(summary.get("_deblend")))
    lines.extend(eval_morphology.format_lines(summary.get("_morphology")))
    lines.extend(eval_clumps.format_lines(summary.get("_clumps")))
    return "\n".join(lines)
