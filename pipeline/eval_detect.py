"""Detection scores beyond completeness and purity: box AP50, recall in blends and in close pairs.

:func:`detection_metrics` is called by :func:`deepmosaic.pipeline.evaluate.evaluate_store` for every
evaluated stage and written to ``reports/<stage>/attrs["detection"]``; :func:`detection_table` renders them
for the HTML report and the CLI. Completeness and purity against magnitude are the ``curves/mag`` of the
same report (every stage, so the detector and sep overlay in ``curves_mag.png``).

Definitions (true objects from the truth file; ``psf`` = its ``PSFFWHM`` / ``PIXSCALE`` in px)
----------------------------------------------------------------------------------------------------
``ap50``
    COCO-style average precision (:func:`deepmosaic.pipeline.metrics.average_precision`, IoU >= 0.5) of
    the stage's boxes against the true boxes of the objects with S/N >= 1 (fainter ones have no visible
    extent). True box: centred on the true centre, half-sizes the largest x and y distance (+ 0.5 px) of the
    object's truth-footprint pixels (SEGMAP: pixels where its own light is the largest and > 1 sigma), at
    least half a PSF FWHM: the training targets' box definition. Predicted boxes: ``x, y, width, height``
    columns when the stage has them (detect); else the box of its footprint in ``maps/<stage>/segmentation``
    symmetrised around its centroid the same way (sep, photutils); else none (AP50 not computed). Scores:
    the ``score`` column, else ``flux / flux_err``, else ``flux``.
``blend_recall``
    Recall of the true objects with S/N >= 10 that have a true neighbour with S/N >= 3 closer than twice
    the larger *observed* half-light radius of the two, ``sqrt(hlr**2 + (psf / 2)**2)`` (``hlr`` is the
    intrinsic one, 0 for stars; ``psf / 2`` is a Gaussian PSF's half-light radius).
``close_pair_recall``
    Recall of the true objects with S/N >= 10 whose nearest neighbour with S/N >= 3 is closer than one PSF
    FWHM.
A true object counts as found when the evaluation's one-to-one matching (within ``max_sep``) matched it.
"""
from __future__ import annotations

import math

import numpy as np

from . import metrics

#: the S/N floor of the objects whose recall is reported, and of the neighbours that make a blend
SNR_OBJECT = 10.0
SNR_NEIGHBOUR = 3.0
SNR_BOX = 1.0

DETECTION_KEYS = ("ap50", "n_blended", "blend_recall", "n_close_pair", "close_pair_recall", "psf_fwhm_px")


def psf_fwhm_px(meta) -> float | None:
    """PSF FWHM in px from a truth table's metadata (``PSFFWHM`` arcsec / ``PIXSCALE``), or None."""
    m = {str(k).upper(): v for k, v in dict(meta or {}).items()}
    try:
        return float(m["PSFFWHM"]) / float(m["PIXSCALE"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _half_extents(labels: np.ndarray, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, 2] (half_w, half_h): max |pixel - centre| + 0.5 over each id's pixels in ``labels`` (0 if none)."""
    from scipy import ndimage
    out = np.zeros((len(ids), 2))
    if labels is None or not len(ids):
        return out
    lab = np.where(np.asarray(labels) > 0, np.asarray(labels), 0).astype(np.int64)
    # store ids are sparse (tile index * stride + n): compact them before find_objects
    uniq, inv = np.unique(lab, return_inverse=True)
    if uniq[0] != 0:
        uniq, inv = np.r_[0, uniq], inv + 1
    lab = inv.reshape(lab.shape)
    slices = ndimage.find_objects(lab)
    pos = np.searchsorted(uniq, ids)
    for k, (i, p, cx, cy) in enumerate(zip(ids, pos, x, y)):
        if i <= 0 or p >= len(uniq) or uniq[p] != i or slices[p - 1] is None:
            continue
        sl = slices[p - 1]
        sub = lab[sl] == p
        yy, xx = np.nonzero(sub)
        if not yy.size:
            continue
        out[k, 0] = np.max(np.abs(xx + sl[1].start - cx)) + 0.5
        out[k, 1] = np.max(np.abs(yy + sl[0].start - cy)) + 0.5
    return out


def true_boxes(truth: dict, segmap, psf: float | None) -> np.ndarray:
    """[n, 4] (x_c, y_c, w, h) of every true object (see the module doc)."""
    half = _half_extents(segmap, truth["id"], truth["x"], truth["y"]) if segmap is not None else \
        np.zeros((len(truth["x"]), 2))
    floor = (psf or 0.0) / 2.0
    half = np.maximum(half, floor)
    return np.c_[truth["x"], truth["y"], 2 * half[:, 0], 2 * half[:, 1]]


def pred_boxes(cat: dict, seg) -> tuple[np.ndarray, np.ndarray] | None:
    """``(boxes [n, 4], scores [n])`` of a stage's catalog, or None when it has no box (module doc)."""
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    if "width" in cat and "height" in cat:
        boxes = np.c_[x, y, np.asarray(cat["width"], float), np.asarray(cat["height"], float)]
    elif seg is not None and "id" in cat:
        half = _half_extents(seg, np.asarray(cat["id"], np.int64), x, y)
        boxes = np.c_[x, y, 2 * half[:, 0], 2 * half[:, 1]]
    else:
        return None
    if "score" in cat:
        score = np.asarray(cat["score"], float)
    elif "flux" in cat and "flux_err" in cat:
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.asarray(cat["flux"], float) / np.asarray(cat["flux_err"], float)
    elif "flux" in cat:
        score = np.asarray(cat["flux"], float)
    else:
        score = np.ones(len(x))
    return boxes, np.nan_to_num(score, nan=-np.inf, posinf=1e300, neginf=-1e300).clip(-1e300, 1e300)


def neighbour_sets(truth: dict, psf: float | None) -> dict[str, np.ndarray]:
    """Boolean masks over the true objects: ``blended`` and ``close_pair`` (module doc)."""
    from scipy.spatial import cKDTree
    n = len(truth["x"])
    blended = np.zeros(n, bool)
    close = np.zeros(n, bool)
    snr = np.asarray(truth.get("snr", np.full(n, np.nan)), float)
    if psf is None or not np.isfinite(snr).any():
        return {"blended": blended, "close_pair": close}
    hlr = np.asarray(truth.get("hlr", np.zeros(n)), float)
    hlr_obs = np.sqrt(np.nan_to_num(hlr) ** 2 + (psf / 2.0) ** 2)
    visible = np.flatnonzero(snr >= SNR_NEIGHBOUR)
    xy = np.c_[truth["x"], truth["y"]]
    tree = cKDTree(xy[visible])
    reach = 2.0 * max(float(hlr_obs.max()) if n else 0.0, psf)
    for i in np.flatnonzero(snr >= SNR_OBJECT):
        for j in visible[tree.query_ball_point(xy[i], reach)]:
            if j == i:
                continue
            d = math.hypot(*(xy[i] - xy[j]))
            if d < 2.0 * max(hlr_obs[i], hlr_obs[j]):
                blended[i] = True
            if d < psf:
                close[i] = True
    return {"blended": blended, "close_pair": close}


def detection_metrics(truth: dict, segmap, meta, cat: dict, seg, matched: np.ndarray) -> dict:
    """AP50, blend and close-pair recall of one stage (module doc); ``matched``: per true object."""
    psf = psf_fwhm_px(meta)
    out = dict.fromkeys(DETECTION_KEYS)
    out["psf_fwhm_px"] = psf
    snr = np.asarray(truth.get("snr", np.full(len(truth["x"]), np.inf)), float)
    pb = pred_boxes(cat, seg)
    if pb is not None:
        keep = snr >= SNR_BOX
        tb = true_boxes({k: np.asarray(v)[keep] for k, v in truth.items()},
                        segmap, psf)
        out["ap50"] = metrics.average_precision(tb, pb[0], pb[1], iou_threshold=0.5)
    sets = neighbour_sets(truth, psf)
    for name, key in (("blended", "blend_recall"), ("close_pair", "close_pair_recall")):
        sel = sets[name]
        out[f"n_{name}"] = int(sel.sum())
        out[key] = float(matched[sel].mean()) if sel.any() else None
    return out


def detection_table(per_stage: dict) -> list[list[str]]:
    """Rows ``[stage, AP50, blend recall (n), close-pair recall (n)]`` for the report and the CLI."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"
    rows = []
    for stage, d in per_stage.items():
        if not d:
            continue
        rows.append([stage, f(d.get("ap50")), f"{f(d.get('blend_recall'))} ({d.get('n_blended') or 0})",
                     f"{f(d.get('close_pair_recall'))} ({d.get('n_close_pair') or 0})"])
    return rows


def for_stage(store_path, stage: str, table, segmap, matched: np.ndarray) -> dict:
    """:func:`detection_metrics` of ``stage`` in a store against a truth table (the evaluate hook)."""
    from .store import open_store, read_catalog
    cat = read_catalog(store_path, stage)
    root = open_store(store_path)
    key = f"maps/{stage}/segmentation"
    seg = np.asarray(root[key][...]) if key in root and "width" not in cat else None
    truth = {c: np.asarray(table[c]) for c in ("id", "x", "y", "snr", "hlr") if c in table.colnames}
    truth = {k: (v.astype(np.int64) if k == "id" else v.astype(np.float64)) for k, v in truth.items()}
    out = detection_metrics(truth, segmap, table.meta, cat, seg, np.asarray(matched, bool))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def format_lines(per_stage: dict | None) -> list[str]:
    """Plain-text lines of :func:`detection_table` for ``deepmosaic evaluate`` (none without results)."""
    rows = detection_table(per_stage or {})
    if not rows:
        return []
    header = ["stage", "AP50", "blend recall (n)", "pairs < 1 FWHM recall (n)"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(4)]
    return ["detection (S/N>=10 objects; see pipeline/eval_detect.py):"] + [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header] + rows]


def report_section(reports: dict) -> list[str]:
    """HTML parts of the detection section of the report (empty when no stage has detection metrics)."""
    import html
    per_stage = {s: r["attrs"]["detection"] for s, r in reports.items() if r["attrs"].get("detection")}
    rows = detection_table(per_stage)
    if not rows:
        return []
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return ["<h2>Detection</h2>",
            "<p>AP50: COCO-style average precision of the boxes at IoU &ge; 0.5 (true boxes from the truth "
            "footprints). Blend recall: true objects with S/N&ge;10 and a neighbour (S/N&ge;3) closer than twice "
            "the larger observed half-light radius; pairs: nearest such neighbour closer than one PSF FWHM. "
            "Completeness against magnitude: the first figure of the previous section.</p>",
            '<table class="summary"><thead><tr><th>stage</th><th>AP50</th><th>blend recall (n)</th>'
            f"<th>pairs &lt; 1 FWHM recall (n)</th></tr></thead><tbody>{body}</tbody></table>"]
