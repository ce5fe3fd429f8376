"""Score the clump stages (``clumps``, ``clumps_sep``) against the clump truth of a clumpy mosaic.

Clumps are not galaxies: their catalogs are never matched to the truth CATALOG. :func:`deepmosaic.pipeline.
evaluate.evaluate_store` hands the clump stages to :func:`evaluate_clumps`, which matches each clump
catalog one-to-one (Hungarian, :func:`~deepmosaic.pipeline.metrics.match_positions`) to the truth file's
``CLUMPS`` table within ``MATCH_RADIUS`` = 1.5 px and writes

::

    reports_clumps/<stage>/
        attrs["summary"]      JSON: SUMMARY (below); attrs["truth"], ["radius"], ["created"]
        matches/<column>      one row per true clump (input order), then one per unmatched detection
        curves/<quantity>/    completeness against the clump's ``snr`` and ``contrast`` (edges, centres,
                              n_true, n_true_matched, completeness)

Bins of the clump S/N (the truth's matched-filter S/N, ``flux / (sigma sqrt(A_eff))``): ``snr10``
(S/N >= 10), ``snr5_10`` (5 <= S/N < 10) and ``snr_lt5``. Per bin ``b``:

* ``completeness_b`` = true clumps of the bin matched / true clumps of the bin;
* ``purity_b`` = TP_b / (TP_b + FP): detections matched to clumps of *other* bins count neither for nor
  against it (they found something real), every unmatched detection counts as false (as the ``*_snr10``
  keys of the galaxy evaluation);
* ``f1_b`` from those two; the same completeness for the harder subsets ``close_pair`` (another clump within
  3 PSF FWHM) and ``on_bulge`` (inside a bulge's half-light ellipse): ``completeness_b_close_pair`` etc.

``purity`` (all bins) = matched detections / detections. The summary of every non-baseline clump stage also
holds ``versus``: per bin, its completeness, purity and F1 against those of ``clumps_sep`` and whether it is
better (higher F1) there.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
import os

import numpy as np

from . import metrics
from .errors import InputError
from .store import open_store, read_catalog

__all__ = ["CLUMP_STAGES", "BASELINE", "MATCH_RADIUS", "SNR_BINS", "SUBSETS", "score_clumps", "evaluate_clumps",
           "read_clump_reports", "split_stages", "format_lines", "report_section"]

#: Stages whose catalogs are clumps (scored here, never against the galaxy truth).
CLUMP_STAGES = ("clumps_sep", "clumps")
#: The classical baseline every other clump stage is compared with.
BASELINE = "clumps_sep"
#: Largest distance (px, inclusive) of a matched truth-detection pair.
MATCH_RADIUS = 1.5
#: Clump S/N bins: name -> [low, high).
SNR_BINS = {"snr10": (10.0, math.inf), "snr5_10": (5.0, 10.0), "snr_lt5": (0.0, 5.0)}
#: Harder subsets (boolean truth columns) reported separately.
SUBSETS = ("close_pair", "on_bulge")
#: Curve bin edges.
CURVE_EDGES = {"snr": np.geomspace(2.0, 200.0, 13), "contrast": np.geomspace(0.01, 100.0, 13)}

_GROUP = "reports_clumps"


def _ratio(a: int, b: int):
    return a / b if b else None


def score_clumps(truth: dict, pred_xy: np.ndarray, radius: float = MATCH_RADIUS) -> tuple[dict, dict]:
    """Match one clump catalog to the clump truth and score it (the module docstring's definitions).

    Parameters
    ----------
    truth : dict of 1-D arrays: ``x``, ``y``, ``snr`` and optionally ``contrast``, ``close_pair``, ``on_bulge``
    pred_xy : array [n, 2] of detected ``(x, y)``
    radius : matching radius, px

    Returns
    -------
    (summary, match) : the summary dict and ``{'truth_index', 'pred_index', 'matched', 'distance'}`` arrays
        plus the per-true-clump ``found`` flags (``match['found']``) and per-detection ``pred_matched``.
    """
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    snr = np.asarray(truth["snr"], float)
    pred_xy = np.asarray(pred_xy, float).reshape(-1, 2)
    n_true, n_pred = len(tx), len(pred_xy)
    ti, pj, dist = metrics.match_positions(np.c_[tx, ty], pred_xy, radius)
    found = np.zeros(n_true, bool)
    found[ti] = True
    pred_matched = np.zeros(n_pred, bool)
    pred_matched[pj] = True
    n_fp = n_pred - len(pj)
    s = metrics.detection_scores(n_true, n_pred, len(ti))
    summary = {"n_true": n_true, "n_pred": n_pred, "n_tp": int(len(ti)), "n_fp": int(n_fp),
               "completeness": s["completeness"], "purity": s["purity"], "f1": s["f1"], "radius": float(radius),
               "median_distance": float(np.median(dist)) if len(dist) else None}
    for name, (lo, hi) in SNR_BINS.items():
        sel = (snr >= lo) & (snr < hi)
        tp = int((found & sel).sum())
        comp, pur = _ratio(tp, int(sel.sum())), _ratio(tp, tp + n_fp)
        summary[f"n_true_{name}"] = int(sel.sum())
        summary[f"n_tp_{name}"] = tp
        summary[f"completeness_{name}"] = comp
        summary[f"purity_{name}"] = pur
        summary[f"f1_{name}"] = (None if comp is None or pur is None
                                 else 2 * comp * pur / (comp + pur) if comp + pur > 0 else 0.0)
        for sub in SUBSETS:
            if sub in truth:
                ss = sel & np.asarray(truth[sub], bool)
                summary[f"n_true_{name}_{sub}"] = int(ss.sum())
                summary[f"completeness_{name}_{sub}"] = _ratio(int((found & ss).sum()), int(ss.sum()))
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    match = {"truth_index": ti, "pred_index": pj, "distance": dist, "found": found, "pred_matched": pred_matched}
    return summary, match


def _curves(truth: dict, found: np.ndarray) -> dict:
    out = {}
    for q, edges in CURVE_EDGES.items():
        if q not in truth:
            continue
        b = metrics.binned_scores(np.asarray(truth[q], float), found, bins=edges)
        out[q] = {"edges": b["edges"], "centres": np.sqrt(b["edges"][:-1] * b["edges"][1:]), "n_true": b["n"],
                  "n_true_matched": b["n_matched"], "completeness": b["fraction"]}
    return out


def _versus(stage_summary: dict, base_summary: dict) -> dict:
    out = {}
    for name in SNR_BINS:
        a, b = stage_summary.get(f"f1_{name}"), base_summary.get(f"f1_{name}")
        out[name] = {"completeness": stage_summary.get(f"completeness_{name}"),
                     "purity": stage_summary.get(f"purity_{name}"), "f1": a,
                     "baseline_completeness": base_summary.get(f"completeness_{name}"),
                     "baseline_purity": base_summary.get(f"purity_{name}"), "baseline_f1": b,
                     "better": (a is not None and b is not None and a > b) if a is not None else None}
    return out


def _truth_dict(table) -> dict:
    out = {c: np.asarray(table[c]) for c in ("x", "y", "snr", "contrast", "close_pair", "on_bulge", "host_id",
                                              "flux", "id") if c in table.colnames}
    return out


def _write(root, stage: str, summary: dict, match: dict, truth: dict, pred: dict, curves: dict, attrs: dict):
    from .evaluate import _write_array
    g = root.require_group(_GROUP).create_group(stage, overwrite=True)
    n_true = len(truth["x"])
    n_pred = len(pred["x"])
    unmatched = np.nonzero(~match["pred_matched"])[0]
    pred_of_true = np.full(n_true, -1, np.int64)
    pred_of_true[match["truth_index"]] = match["pred_index"]
    dist = np.full(n_true, np.nan)
    dist[match["truth_index"]] = match["distance"]
    rows = {"truth_index": np.r_[np.arange(n_true), np.full(len(unmatched), -1)],
            "pred_index": np.r_[pred_of_true, unmatched],
            "matched": np.r_[match["found"], np.zeros(len(unmatched), bool)],
            "distance": np.r_[dist, np.full(len(unmatched), np.nan)]}
    for c in ("x", "y", "snr", "contrast"):
        if c in truth:
            rows[f"truth_{c}"] = np.r_[np.asarray(truth[c], float), np.full(len(unmatched), np.nan)]
    for c in SUBSETS:
        if c in truth:
            rows[c] = np.r_[np.asarray(truth[c], bool), np.zeros(len(unmatched), bool)]
    for c in ("x", "y", "probability"):
        if c in pred:
            v = np.asarray(pred[c], float)
            col = np.full(n_true, np.nan)
            ok = pred_of_true >= 0
            col[ok] = v[pred_of_true[ok]]
            rows[f"pred_{c}"] = np.r_[col, v[unmatched]] if n_pred else col
    m = g.create_group("matches")
    for name, values in rows.items():
        _write_array(m, name, values)
    c = g.create_group("curves")
    for q, fields in curves.items():
        cq = c.create_group(q)
        for name, values in fields.items():
            _write_array(cq, name, values)
    g.attrs.update({"summary": summary, **attrs})


def split_stages(root, stages) -> tuple:
    """``(other_stages, clump_stages)``: ``stages`` (None, list or comma string) split into the galaxy stages
    (None stays None: every one) and the clump stages to score here (None: every clump stage with a catalog)."""
    if stages is None:
        have = []
        if "catalogs" in root:
            have = [s for s in root["catalogs"].group_keys() if s in CLUMP_STAGES
                    and {"x", "y"} <= set(root["catalogs"][s].array_keys())]
        return None, [s for s in CLUMP_STAGES if s in have]
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    return [s for s in wanted if s not in CLUMP_STAGES], [s for s in wanted if s in CLUMP_STAGES]


def evaluate_clumps(store_path, truth_path, stages, radius: float = MATCH_RADIUS, required: bool = True) -> dict:
    """Score the clump ``stages`` of a store against the truth's CLUMPS table and write ``reports_clumps/``.

    Returns ``{stage: summary}`` (non-baseline stages with a ``versus`` entry when ``clumps_sep`` is in the
    store). With ``required=False`` a truth without CLUMPS gives ``{"note": ...}`` instead of an InputError.
    """
    from .truth import read_clump_truth
    store_path, truth_path = os.fspath(store_path), os.fspath(truth_path)
    try:
        table = read_clump_truth(truth_path)
    except InputError as exc:
        if required:
            raise
        return {"note": f"clump stages {list(stages)} not scored: {exc}"}
    truth = _truth_dict(table)
    root = open_store(store_path, mode="r+")
    have = [s for s in root["catalogs"].group_keys()] if "catalogs" in root else []
    todo = list(stages) + ([BASELINE] if BASELINE in have and BASELINE not in stages
                           and any(s != BASELINE for s in stages) else [])
    results = {}
    for stage in todo:
        if stage not in have:
            raise InputError(f"{store_path}: no catalog for clump stage {stage!r}; run it first "
                             f"(`deepmosaic run INPUT --stages sep,{stage}`).")
        cat = read_catalog(store_path, stage)
        pred = {k: np.asarray(v) for k, v in cat.items()}
        summary, match = score_clumps(truth, np.c_[pred["x"], pred["y"]], radius)
        results[stage] = (summary, match, pred)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = {}
    for stage in stages:
        summary, match, pred = results[stage]
        if stage != BASELINE and BASELINE in results:
            summary["versus"] = _versus(summary, results[BASELINE][0])
        _write(root, stage, summary, match, truth, pred, _curves(truth, match["found"]),
               {"truth": os.path.abspath(truth_path), "radius": float(radius), "created": created})
        out[stage] = summary
    return out


def read_clump_reports(store_path) -> dict:
    """``{stage: {"attrs", "curves"}}`` of ``reports_clumps/`` (empty when the store has none)."""
    root = open_store(os.fspath(store_path))
    out = {}
    if _GROUP not in root:
        return out
    for stage in root[_GROUP].group_keys():
        g = root[_GROUP][stage]
        curves = {q: {k: g["curves"][q][k][...] for k in g["curves"][q].array_keys()}
                  for q in g["curves"].group_keys()} if "curves" in g else {}
        out[stage] = {"attrs": dict(g.attrs), "curves": curves}
    return {s: out[s] for s in CLUMP_STAGES if s in out} | {s: v for s, v in out.items() if s not in CLUMP_STAGES}


# --------------------------------------------------------------------------------------------- text and HTML

_ROWS = (("completeness", "compl"), ("purity", "purity"), ("f1", "F1"))


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def table_rows(summaries: dict) -> tuple[list, list]:
    """Header and rows (strings) of the clump table: per stage and S/N bin, then the harder subsets."""
    head = ["stage", "n_pred"]
    for name in SNR_BINS:
        head += [f"{h} {name}" for _, h in _ROWS]
    head += [f"compl {name} {sub}" for name in ("snr10", "snr5_10") for sub in SUBSETS]
    rows = []
    for stage, s in summaries.items():
        r = [stage, str(s.get("n_pred"))]
        for name in SNR_BINS:
            r += [_fmt(s.get(f"{k}_{name}")) for k, _ in _ROWS]
        r += [_fmt(s.get(f"completeness_{name}_{sub}")) for name in ("snr10", "snr5_10") for sub in SUBSETS]
        rows.append(r)
    return head, rows


def format_lines(clumps: dict | None) -> list[str]:
    """Lines for :func:`deepmosaic.pipeline.evaluate.format_summary` (``summary["_clumps"]``)."""
    if not clumps:
        return []
    if "note" in clumps:
        return [f"clumps: {clumps['note']}"]
    first = next(iter(clumps.values()))
    lines = [f"clump stages vs the CLUMPS truth (one-to-one within {first.get('radius')} px): "
             + ", ".join(f"{name} {first.get('n_true_' + name)} true" for name in SNR_BINS)]
    head, rows = table_rows(clumps)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for stage, s in clumps.items():
        for name, d in (s.get("versus") or {}).items():
            lines.append(f"{stage} vs {BASELINE} {name}: F1 {_fmt(d['f1'])} vs {_fmt(d['baseline_f1'])} "
                         f"-> {'better' if d['better'] else 'not better'}")
    return lines


def _fig_curves(reports: dict, out_dir, quantity: str) -> str | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    have = {s: r["curves"][quantity] for s, r in reports.items() if quantity in r["curves"]}
    if not have:
        return None
    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for stage, c in have.items():
        ax.plot(c["centres"], c["completeness"], "o-", label=stage)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel({"snr": "clump S/N (matched filter)", "contrast": "clump-to-host contrast"}[quantity])
    ax.set_ylabel("completeness")
    if quantity == "snr":
        for v in (5, 10):
            ax.axvline(v, ls=":", color="grey")
    ax.legend()
    fig.tight_layout()
    name = f"clumps_completeness_{quantity}.png"
    fig.savefig(os.path.join(os.fspath(out_dir), name), dpi=90)
    return name


def report_section(store_path, out_dir, truth_path=None) -> list[str]:
    """HTML parts of the clump section of the report (empty when the store has no clump stage).

    Evaluates the clump stages first when they have no ``reports_clumps/`` yet and ``truth_path`` has CLUMPS.
    """
    reports = read_clump_reports(store_path)
    if not reports and truth_path and os.path.exists(truth_path):
        _, stages = split_stages(open_store(os.fspath(store_path)), None)
        if stages:
            evaluate_clumps(store_path, truth_path, stages, required=False)
            reports = read_clump_reports(store_path)
    if not reports:
        return []
    summaries = {s: r["attrs"]["summary"] for s, r in reports.items()}
    head, rows = table_rows(summaries)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    parts = ["<h2>Clumps</h2>",
             f"<p>Clump stages against the truth's CLUMPS table, matched one-to-one within "
             f"{MATCH_RADIUS} px. S/N is the clump's matched-filter S/N against the pixel noise (host light "
             f"excluded). Per S/N bin, purity = TP<sub>bin</sub> / (TP<sub>bin</sub> + unmatched detections); "
             f"close_pair: another clump within 3 PSF FWHM; on_bulge: inside a bulge's half-light ellipse.</p>",
             f'<div class="scroll"><table class="summary"><thead><tr>{cells}</tr></thead><tbody>\n{body}'
             f"</tbody></table></div>"]
    for stage, s in summaries.items():
        vs = s.get("versus")
        if vs:
            items = "".join(f"<li>{name}: F1 {_fmt(d['f1'])} vs {_fmt(d['baseline_f1'])} "
                            f"({'better' if d['better'] else 'not better'})</li>" for name, d in vs.items())
            parts.append(f"<p>{html.escape(stage)} vs {BASELINE}:</p><ul>{items}</ul>")
    for q, cap in (("snr", "Completeness against the clump's S/N (dotted: 5 and 10)."),
                   ("contrast", "Completeness against the clump-to-host contrast (clump flux over the host's "
                                "light in the PSF's effective area).")):
        src = _fig_curves(reports, out_dir, q)
        if src:
            parts.append(f'<figure><img src="{src}" alt="{q}"><figcaption>{cap}</figcaption></figure>')
    return parts
