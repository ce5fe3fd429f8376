"""Evaluation of deblending stages (a stage with ``maps/<stage>/uncertainty`` and ``maps/<stage>/parent``, such
as ``deblend``): blend-member IoUs against sep and the reliability of the per-pixel uncertainty.

Hooked into :func:`deepmosaic.pipeline.evaluate.evaluate_store` (``reports/<stage>/attrs["deblend"]``), the
text summary of ``deepmosaic evaluate`` and the HTML report (:func:`report_section`).

Definitions (truth = the truth file's SEGMAP, the 1-sigma "largest light wins" rule):

* *deblended region*: pixels where ``maps/<stage>/parent`` > 0 (the blends the network deblended);
* *blend members*: true objects with more than half of their truth pixels in the deblended region;
* member IoU: each true member's IoU with the stage's object matched to it one-to-one by mask
  (:func:`~deepmosaic.pipeline.metrics.match_masks`, IoU > 0.5), 0 when unmatched; the same members are
  scored in sep's segmentation when the store has it;
* reliability: over the deblended region, the pixel's stage label is *wrong* when it is not the label of the
  true object the stage's object was matched to (sky for sky; a stage object with no match is wrong
  everywhere). Pixels are binned by predicted uncertainty; per bin: pixels, mean predicted uncertainty,
  observed error rate. Calibrated: error rate ~ mean predicted, rising across bins.
"""
from __future__ import annotations

import html
import math

import numpy as np

from . import metrics

#: bin edges of the predicted uncertainty
UNC_EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
BASELINE = "sep"


def reliability(truth_seg: np.ndarray, pred_seg: np.ndarray, uncertainty: np.ndarray, region: np.ndarray,
                edges=UNC_EDGES) -> dict:
    """Error rate of the predicted labels per bin of predicted uncertainty, over ``region``.

    Parameters
    ----------
    truth_seg, pred_seg : int [H, W] label maps (0 = sky); uncertainty : float [H, W] in [0, 1];
    region : bool [H, W] pixels to score; edges : increasing bin edges (the last bin includes its right edge)

    Returns
    -------
    dict of lists: ``edges``, ``n_pixels``, ``mean_uncertainty`` and ``error_rate`` (None for empty bins),
    plus ``n_region`` and ``error_rate_all``.
    """
    t_ids, p_ids, _ = metrics.match_masks(truth_seg, pred_seg, threshold=0.5)
    region = np.asarray(region, bool)
    p = np.asarray(pred_seg)[region]
    t = np.asarray(truth_seg)[region]
    u = np.asarray(uncertainty, np.float64)[region]
    # the true label each predicted label stands for: sky -> 0, matched -> its true id, unmatched -> -1
    lookup = dict(zip(p_ids.tolist(), t_ids.tolist()))
    uniq, inv = np.unique(p, return_inverse=True)
    stands = np.array([0 if v == 0 else lookup.get(int(v), -1) for v in uniq], np.int64)
    wrong = stands[inv.ravel()] != t
    edges = np.asarray(edges, float)
    idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
    n = np.bincount(idx, minlength=len(edges) - 1)
    su = np.bincount(idx, weights=u, minlength=len(edges) - 1)
    sw = np.bincount(idx, weights=wrong, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu, er = su / n, sw / n
    return {"edges": edges.tolist(), "n_pixels": n.astype(int).tolist(),
            "mean_uncertainty": [None if k == 0 else float(v) for k, v in zip(n, mu)],
            "error_rate": [None if k == 0 else float(v) for k, v in zip(n, er)],
            "n_region": int(region.sum()), "error_rate_all": float(wrong.mean()) if len(wrong) else None}


def member_ious(truth_seg: np.ndarray, pred_seg: np.ndarray, members: np.ndarray) -> np.ndarray:
    """IoU of each true id in ``members`` with its one-to-one match (IoU > 0.5) in ``pred_seg``, else 0."""
    t_ids, _, ious = metrics.match_masks(truth_seg, pred_seg, threshold=0.5)
    got = dict(zip(t_ids.tolist(), ious.tolist()))
    return np.array([got.get(int(m), 0.0) for m in members], np.float64)


def for_stage(root, stage: str, truth_seg) -> dict | None:
    """Deblending metrics of ``stage`` (the evaluate hook); None for stages without an uncertainty map or
    without a truth SEGMAP."""
    maps = root["maps"][stage] if "maps" in root and stage in root["maps"] else None
    if truth_seg is None or maps is None or not {"uncertainty", "parent", "segmentation"} <= set(maps.array_keys()):
        return None
    truth = np.asarray(truth_seg[...])
    pred = np.asarray(maps["segmentation"][...])
    region = np.asarray(maps["parent"][...]) > 0
    out = {"reliability": reliability(truth, pred, np.asarray(maps["uncertainty"][...]), region)}
    ids, n_all = np.unique(truth[truth > 0], return_counts=True)
    ids_in, n_in = np.unique(truth[(truth > 0) & region], return_counts=True)
    frac = dict(zip(ids_in.tolist(), n_in.tolist()))
    members = np.array([i for i, n in zip(ids.tolist(), n_all.tolist()) if frac.get(i, 0) > n / 2], np.int64)
    blends = {"n_members": int(len(members)), "mean_iou": None, "baseline": None, "baseline_mean_iou": None}
    if len(members):
        blends["mean_iou"] = float(member_ious(truth, pred, members).mean())
        if BASELINE in root["maps"] and "segmentation" in root["maps"][BASELINE]:
            base = np.asarray(root["maps"][BASELINE]["segmentation"][...])
            blends.update(baseline=BASELINE, baseline_mean_iou=float(member_ious(truth, base, members).mean()))
    out["blends"] = blends
    return out


def _f(v, fmt=".3f"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_lines(per_stage: dict | None) -> list[str]:
    """Plain-text lines for ``deepmosaic evaluate`` (none without results)."""
    lines = []
    for stage, d in (per_stage or {}).items():
        if not d:
            continue
        b, r = d["blends"], d["reliability"]
        lines.append(f"deblending ({stage}; see pipeline/eval_deblend.py): {b['n_members']} true blend members, "
                     f"mean IoU {_f(b['mean_iou'])}" + (f" ({b['baseline']}: {_f(b['baseline_mean_iou'])})"
                                                        if b["baseline"] else ""))
        cells = [f"[{lo:.2f},{hi:.2f}) n={n} u={_f(mu)} err={_f(er)}" for lo, hi, n, mu, er in
                 zip(r["edges"][:-1], r["edges"][1:], r["n_pixels"], r["mean_uncertainty"], r["error_rate"]) if n]
        lines.append("  uncertainty reliability: " + "; ".join(cells))
    return lines


def report_section(reports: dict, out_dir) -> list[str]:
    """HTML parts of the deblending section (empty when no evaluated stage has deblending metrics)."""
    from .report import _new_figure, _safe, _save
    per_stage = {s: r["attrs"]["deblend"] for s, r in reports.items() if r["attrs"].get("deblend")}
    if not per_stage:
        return []
    parts = ["<h2>Deblending</h2>",
             "<p>Blend members: true objects with most of their pixels in a region the network deblended; IoU "
             "with the one-to-one match by mask (IoU &gt; 0.5), 0 if unmatched. Reliability: pixels of the "
             "deblended regions binned by predicted uncertainty; a pixel is wrong when its label is not that "
             "of the true object its object was matched to. Calibrated: the points follow the diagonal.</p>"]
    for stage, d in per_stage.items():
        b, r = d["blends"], d["reliability"]
        base = f" ({html.escape(b['baseline'])}: {_f(b['baseline_mean_iou'])})" if b["baseline"] else ""
        parts.append(f"<p>{html.escape(stage)}: {b['n_members']} true blend members, mean IoU "
                     f"{_f(b['mean_iou'])}{base}; overall pixel error rate {_f(r['error_rate_all'])} over "
                     f"{r['n_region']} px.</p>")
        rows = "".join(f"<tr><td>[{lo:.2f}, {hi:.2f})</td><td>{n}</td><td>{_f(mu)}</td><td>{_f(er)}</td></tr>"
                       for lo, hi, n, mu, er in zip(r["edges"][:-1], r["edges"][1:], r["n_pixels"],
                                                    r["mean_uncertainty"], r["error_rate"]))
        parts.append('<table class="summary"><thead><tr><th>uncertainty bin</th><th>pixels</th>'
                     f"<th>mean predicted</th><th>error rate</th></tr></thead><tbody>{rows}</tbody></table>")
        fig = _new_figure(4.2, 3.6)
        ax = fig.add_subplot()
        ok = [i for i, n in enumerate(r["n_pixels"]) if n]
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.plot([r["mean_uncertainty"][i] for i in ok], [r["error_rate"][i] for i in ok], "o-")
        ax.set_xlabel("predicted uncertainty (bin mean)")
        ax.set_ylabel("observed pixel error rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{stage}: uncertainty reliability")
        src = _save(fig, out_dir, f"deblend_reliability_{_safe(stage)}.png")
        parts.append(f'<figure><img src="{src}" alt="reliability"><figcaption>{html.escape(stage)}: observed '
                     f"error rate against predicted uncertainty (dotted: perfect calibration).</figcaption></figure>")
    return parts
