"""A self-contained HTML report of a store's evaluation (``deepmosaic report OUT.zarr``).

The report is a folder (default ``OUT_report/`` beside ``OUT.zarr``) holding ``index.html``, PNG figures
and ``summary.json``; every link is relative, so the folder can be moved, zipped or served as it is.

It reads ``reports/<stage>/`` written by :func:`deepmosaic.pipeline.evaluate.evaluate_store` (run first when
reports are missing and a truth file is given) and draws, with matplotlib's Agg canvas (no pyplot, no
display):

* ``curves_mag.png``, ``curves_snr.png``, ``curves_blendedness.png``: completeness (true objects) and purity
  (predictions) per stage against the quantity;
* ``iou_hist.png``: histogram of matched-pair IoUs per stage (when segmentations exist);
* ``flux_residual.png``: fractional flux residual against true magnitude per stage, with its running median;
* ``gallery_<stage>.png``: cutouts of the input image with the truth segmentation outlines and the stage's
  outlines, for the missed objects of highest S/N, the matched pairs of lowest IoU, typical pairs (IoU
  nearest the median) and the brightest unmatched predictions.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import StoreError
from .evaluate import BASELINES, SNR_CUT, _stages_with_catalogs, evaluate_store, read_reports
from .store import open_store

__all__ = ["make_report", "default_report_dir"]

#: One colour per stage (colour-blind friendly), in the order the stages are listed.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_TRUTH_COLOUR = "#00E5FF"
_STAGE_COLOUR = "#FF9F1C"

_SUMMARY_COLUMNS = (("n_true", "N true", "d"), ("n_pred", "N pred", "d"), ("n_tp", "TP", "d"),
                    ("completeness", "completeness", "f"), ("purity", "purity", "f"), ("f1", "F1", "f"),
                    ("mean_iou", "mean IoU", "f"), ("pq", "PQ", "f"),
                    ("median_abs_flux_residual", "median |&Delta;F/F|", "f"),
                    ("completeness_snr10", "completeness S/N&ge;10", "f"),
                    ("purity_snr10", "purity S/N&ge;10", "f"), ("f1_snr10", "F1 S/N&ge;10", "f"),
                    ("mean_iou_snr10", "mean IoU S/N&ge;10", "f"), ("pq_snr10", "PQ S/N&ge;10", "f"),
                    ("mask_f1", "mask-matched F1 (IoU&gt;0.5)", "f"), ("mask_pq", "mask PQ", "f"))

_QUANTITY_LABELS = {"mag": "magnitude", "snr": "S/N", "blendedness": "blendedness"}


def default_report_dir(store_path) -> Path:
    """``OUT.zarr`` -> ``OUT_report`` (beside the store); a name without ``.zarr`` gets ``_report`` appended."""
    p = Path(os.fspath(store_path).rstrip("/\\"))
    name = p.name[:-5] if p.name.lower().endswith(".zarr") else p.name
    return p.with_name(name + "_report")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _new_figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=100)
    return name


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def _fig_curves(reports: dict, quantity: str, colours: dict, out_dir: Path):
    have = {s: r["curves"][quantity] for s, r in reports.items() if quantity in r["curves"]}
    if not have:
        return None
    fig = _new_figure(11, 4.2)
    ax_c, ax_p = fig.subplots(1, 2, sharex=True)
    any_purity = False
    first = next(iter(have.values()))
    if "n_true" in first:
        # how many true objects each bin holds (same truth for every stage)
        ax_n = ax_c.twinx()
        widths = np.diff(first["edges"])
        ax_n.bar(first["edges"][:-1], first["n_true"], width=widths, align="edge", color="0.85", zorder=0)
        ax_n.set_ylabel("true objects per bin", color="0.45")
        ax_n.tick_params(axis="y", colors="0.45")
        ax_c.set_zorder(ax_n.get_zorder() + 1)
        ax_c.patch.set_visible(False)
    for stage, c in have.items():
        if "completeness" in c:
            ax_c.plot(c["centres"], c["completeness"], "o-", color=colours[stage], label=stage, ms=4)
        if "purity" in c:
            any_purity = True
            ax_p.plot(c["centres"], c["purity"], "o-", color=colours[stage], label=stage, ms=4)
    label = _QUANTITY_LABELS.get(quantity, quantity)
    measured = {"snr": "measured S/N (flux / flux_err)"}.get(quantity, f"measured {label}")
    for ax, what, xlabel in ((ax_c, "completeness (true objects found)", f"true {label}"),
                             (ax_p, "purity (detections that are real)", measured)):
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if quantity == "snr":
            ax.set_xscale("log")
            ax.axvline(SNR_CUT, color="0.4", ls=":", lw=1)
    ax_c.legend(loc="lower left" if quantity == "snr" else "best")
    if not any_purity:
        ax_p.text(0.5, 0.5, f"the catalogs carry no {label}:\nno purity curve", ha="center", va="center",
                  transform=ax_p.transAxes, color="0.4")
    return _save(fig, out_dir, f"curves_{quantity}.png")


def _matched(r):
    m = r["matches"]
    return m["matched"].astype(bool)


def _fig_iou(reports: dict, colours: dict, out_dir: Path):
    stages = [s for s, r in reports.items() if np.isfinite(r["matches"]["iou"][_matched(r)]).any()]
    if not stages:
        return None
    fig = _new_figure(min(4.0 * len(stages), 16), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(stages), sharey=True, squeeze=False)[0])
    for ax, stage in zip(axes, stages):
        ious = reports[stage]["matches"]["iou"][_matched(reports[stage])]
        ious = ious[np.isfinite(ious)]
        ax.hist(ious, bins=np.linspace(0, 1, 21), color=colours[stage], alpha=0.85)
        ax.axvline(0.5, color="0.3", ls=":", lw=1)
        ax.axvline(float(np.mean(ious)), color="k", lw=1.2, label=f"mean {np.mean(ious):.3f}")
        ax.set_title(f"{stage}: IoU of {len(ious)} matched pairs")
        ax.set_xlabel("IoU (predicted vs true segment)")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("pairs")
    return _save(fig, out_dir, "iou_hist.png")


def _fig_flux(reports: dict, colours: dict, out_dir: Path):
    stages = [s for s, r in reports.items() if np.isfinite(r["matches"]["flux_residual"]).any()]
    if not stages:
        return None
    fig = _new_figure(min(4.5 * len(stages), 16), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(stages), sharey=True, squeeze=False)[0])
    lim = 1.0
    for ax, stage in zip(axes, stages):
        m = reports[stage]["matches"]
        r, mag = m["flux_residual"], m["truth_mag"]
        ok = np.isfinite(r) & np.isfinite(mag)
        if not ok.any():  # no magnitudes: plot against the true flux instead
            mag, ok = m["truth_flux"], np.isfinite(r) & np.isfinite(m["truth_flux"])
            ax.set_xscale("log")
            ax.set_xlabel("true flux")
        else:
            ax.set_xlabel("true magnitude")
        x, y = mag[ok], r[ok]
        clipped = np.abs(y) > lim
        ax.scatter(x[~clipped], y[~clipped], s=6, color=colours[stage], alpha=0.6, lw=0)
        ax.scatter(x[clipped], np.clip(y[clipped], -lim, lim), s=14, marker="^", color=colours[stage],
                   alpha=0.8, lw=0, label=f"{int(clipped.sum())} beyond \u00b1{lim:g}")
        if x.size >= 10:
            edges = np.quantile(x, np.linspace(0, 1, min(10, x.size // 5) + 1))
            edges = np.unique(edges)
            idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
            med = [np.median(y[idx == i]) if (idx == i).any() else np.nan for i in range(len(edges) - 1)]
            ax.plot(0.5 * (edges[:-1] + edges[1:]), med, "k-", lw=1.5, label="running median")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_ylim(-lim * 1.05, lim * 1.05)
        ax.set_title(f"{stage}: (F_pred - F_true) / F_true")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("fractional flux residual")
    return _save(fig, out_dir, "flux_residual.png")


# --------------------------------------------------------------------------------------------------
# gallery
# --------------------------------------------------------------------------------------------------

class _Imagery:
    """Windows of the input image, the truth segmentation and each stage's segmentation."""

    def __init__(self, store_path: str, truth_seg):
        self.root = open_store(store_path)
        self.truth_seg = truth_seg
        self.boxes = None
        if truth_seg is not None:
            from scipy import ndimage
            self.boxes = ndimage.find_objects(truth_seg)
        self.source = None
        self.note = ""
        meta = dict(self.root.attrs.get("deepmosaic", {}))
        inputs = meta.get("inputs") or []
        self.shape = None
        if inputs:
            info = inputs[0]
            path = info.get("path")
            self.shape = tuple(info.get("shape") or ()) or None
            if path and not os.path.isabs(path) and not os.path.exists(path):
                alt = os.path.join(os.path.dirname(os.path.abspath(store_path)), path)
                path = alt if os.path.exists(alt) else path
            try:
                from .io import open_mosaic
                kw = {}
                if info.get("plane") is not None:
                    kw["cube_bands"] = True
                if info.get("hdu") is not None and not os.path.isdir(path):
                    kw["hdu"] = info["hdu"]
                mosaic = open_mosaic(path, **kw)
                self.source = mosaic.bands[int(info.get("plane") or 0)]
                self.shape = tuple(self.source.shape)
            except Exception as e:  # noqa: BLE001 - the gallery degrades to outlines only
                self.note = (f"the input image {path!r} could not be read ({type(e).__name__}: {e}); "
                             f"cutouts show outlines only")
        else:
            self.note = "the store records no input image; cutouts show outlines only"
        if self.shape is None and truth_seg is not None:
            self.shape = truth_seg.shape

    def half_size(self, truth_id):
        if self.boxes is None or truth_id is None or truth_id < 1 or truth_id > len(self.boxes):
            return 20
        sl = self.boxes[truth_id - 1]
        if sl is None:
            return 16
        ext = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        return int(min(64, max(12, 0.75 * ext + 6)))

    def window(self, x, y, half):
        ny, nx = self.shape
        cx, cy = int(round(x)), int(round(y))
        return (max(0, cy - half), min(ny, cy + half + 1), max(0, cx - half), min(nx, cx + half + 1))

    def image(self, win):
        if self.source is None:
            return None
        img, bad, _ = self.source.read_window(win)
        return np.where(bad, np.nan, img)

    def stage_seg(self, stage, win):
        y0, y1, x0, x1 = win
        maps = self.root["maps"] if "maps" in self.root else {}
        if stage in maps and "segmentation" in maps[stage]:
            return maps[stage]["segmentation"][y0:y1, x0:x1]
        return None

    def truth_window(self, win):
        if self.truth_seg is None:
            return None
        y0, y1, x0, x1 = win
        return self.truth_seg[y0:y1, x0:x1]


def _stretch(img):
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros_like(img)
    lo, mid, hi = np.percentile(img[finite], [5, 50, 99.7])
    scale = max(hi - mid, 1e-12)
    out = np.arcsinh(np.clip((img - mid) / scale, -0.2, None) * 8) / np.arcsinh(8)
    return np.where(finite, out, np.nan)


def _outline(ax, labels, colour, highlight=None, lw=0.8):
    if labels is None:
        return
    lab = np.pad(np.asarray(labels), 1)
    yy = np.arange(-1, lab.shape[0] - 1)
    xx = np.arange(-1, lab.shape[1] - 1)
    for i in np.unique(lab):
        if i == 0:
            continue
        mask = (lab == i).astype(np.float32)
        ax.contour(xx, yy, mask, levels=[0.5], colors=[colour], linewidths=lw * (2.2 if i == highlight else 1.0))


def _pick(matches: dict, k: int) -> list:
    """(title, [row indices]) for each case of the gallery."""
    is_truth = matches["truth_index"] >= 0
    matched = matches["matched"].astype(bool)
    snr = matches["truth_snr"]
    key = np.where(np.isfinite(snr), snr, np.where(np.isfinite(matches["truth_flux"]), matches["truth_flux"], -np.inf))
    missed = np.flatnonzero(is_truth & ~matched)
    missed = missed[np.argsort(-key[missed], kind="stable")][:k]
    iou = matches["iou"]
    with_iou = np.flatnonzero(matched & np.isfinite(iou))
    worst = with_iou[np.argsort(iou[with_iou], kind="stable")][:k]
    if with_iou.size:
        med = np.median(iou[with_iou])
        typical = with_iou[np.argsort(np.abs(iou[with_iou] - med), kind="stable")][:k]
    else:
        m = np.flatnonzero(matched)
        d = matches["distance"][m]
        typical = m[np.argsort(np.abs(d - np.median(d)), kind="stable")][:k] if m.size else m
    spurious = np.flatnonzero(~is_truth)
    pf = matches["pred_flux"][spurious]
    spurious = spurious[np.argsort(-np.where(np.isfinite(pf), pf, -np.inf), kind="stable")][:k]
    return [("missed (highest S/N)", missed), ("lowest IoU", worst),
            ("typical (IoU nearest the median)" if with_iou.size else "typical (median distance)", typical),
            ("spurious (brightest unmatched)", spurious)]


def _fig_gallery(stage: str, rep: dict, imagery: _Imagery, out_dir: Path, k: int = 6):
    if imagery.shape is None:
        return None
    m = rep["matches"]
    cases = [(t, rows) for t, rows in _pick(m, k) if len(rows)]
    if not cases:
        return None
    fig = _new_figure(2.1 * k, 2.35 * len(cases) + 0.4)
    axes = fig.subplots(len(cases), k, squeeze=False)
    for r, (title, rows) in enumerate(cases):
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(rows):
                ax.set_axis_off()
                continue
            i = rows[c]
            tid = int(m["truth_id"][i]) if m["truth_id"][i] >= 0 else None
            if tid is not None:
                x, y = m["truth_x"][i], m["truth_y"][i]
            else:
                x, y = m["pred_x"][i], m["pred_y"][i]
            win = imagery.window(x, y, imagery.half_size(tid))
            y0, y1, x0, x1 = win
            img = imagery.image(win)
            if img is not None:
                ax.imshow(_stretch(img), origin="lower", cmap="gray", interpolation="nearest")
            else:
                ax.imshow(np.zeros((y1 - y0, x1 - x0)), origin="lower", cmap="gray", vmin=0, vmax=1)
            _outline(ax, imagery.truth_window(win), _TRUTH_COLOUR, highlight=tid)
            pid = int(m["pred_id"][i]) if m["pred_id"][i] >= 0 else None
            _outline(ax, imagery.stage_seg(stage, win), _STAGE_COLOUR, highlight=pid)
            if tid is not None:
                ax.plot(m["truth_x"][i] - x0, m["truth_y"][i] - y0, "+", color=_TRUTH_COLOUR, ms=9, mew=1.5)
            if np.isfinite(m["pred_x"][i]):
                ax.plot(m["pred_x"][i] - x0, m["pred_y"][i] - y0, "x", color=_STAGE_COLOUR, ms=7, mew=1.5)
            ax.set_xlim(-0.5, x1 - x0 - 0.5)
            ax.set_ylim(-0.5, y1 - y0 - 0.5)
            bits = [f"true {tid}" if tid is not None else f"pred {pid}"]
            if np.isfinite(m["truth_snr"][i]):
                bits.append(f"S/N {m['truth_snr'][i]:.0f}")
            if np.isfinite(m["iou"][i]):
                bits.append(f"IoU {m['iou'][i]:.2f}")
            ax.set_title(" ".join(bits), fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"{stage}: truth outlines cyan (+ true centre), {stage} outlines orange (x its centre); "
                 f"thick = the object of the cutout", fontsize=9)
    return _save(fig, out_dir, f"gallery_{_safe(stage)}.png")


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1250px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; font-weight: 600; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 0.8em 0; } figcaption { color: #555; font-size: 0.9em; }
.meta { color: #555; font-size: 0.9em; } .note { color: #a33; } .scroll { overflow-x: auto; }
"""


def _fmt(v, kind):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    return f"{int(v)}" if kind == "d" else f"{float(v):.3f}"


def _summary_table(reports: dict) -> str:
    head = "".join(f"<th>{h}</th>" for _, h, _ in _SUMMARY_COLUMNS)
    rows = []
    for stage, rep in reports.items():
        s = rep["attrs"]["summary"]
        cells = "".join(f"<td>{_fmt(s.get(k), kind)}</td>" for k, _, kind in _SUMMARY_COLUMNS)
        rows.append(f'<tr class="stage"><td>{html.escape(stage)}</td>{cells}</tr>')
    return (f'<div class="scroll"><table class="summary"><thead><tr><th>stage</th>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody></table></div>")


def _versus_table(reports: dict) -> str:
    rows = []
    for stage, rep in reports.items():
        for base, d in (rep["attrs"].get("versus") or {}).items():
            b = d.get("snr10") or {}
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                stage, base, d["both_found"], d["only_stage"], d["only_baseline"], d["neither"],
                b.get("both_found", ""), b.get("only_stage", ""), b.get("only_baseline", ""))) + "</tr>")
    if not rows:
        return ""
    return ('<h2>Against the baselines</h2><p>The same true objects, found by the stage and/or by the '
            'baseline.</p><table class="versus"><thead><tr><th>stage</th><th>baseline</th><th>both found</th>'
            '<th>only the stage</th><th>only the baseline</th><th>neither</th><th>both (S/N&ge;10)</th>'
            '<th>only the stage (S/N&ge;10)</th><th>only the baseline (S/N&ge;10)</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _figure(src, caption):
    if not src:
        return ""
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def make_report(store_path, out_dir=None, truth_path=None, max_sep=2.0, cutouts_per_row=6) -> Path:
    """Write the HTML report of ``store_path`` into ``out_dir`` and return the path of its ``index.html``.

    Parameters
    ----------
    store_path : a store written by ``deepmosaic run``
    out_dir : folder for ``index.html`` and the PNGs (created; files of the same names are replaced);
        default :func:`default_report_dir`
    truth_path : truth file: stages without ``reports/<stage>`` are evaluated against it first (with
        ``max_sep``), and its SEGMAP draws the truth outlines in the cutouts. Default: the truth recorded
        by the evaluation, when that file still exists.

    Raises
    ------
    StoreError
        No store, or no evaluation in it and no ``truth_path`` to make one.
    """
    store_path = os.fspath(store_path)
    root = open_store(store_path)
    with_catalogs = _stages_with_catalogs(root)
    reports = read_reports(store_path)
    missing = [s for s in with_catalogs if s not in reports]
    if missing and truth_path is not None:
        evaluate_store(store_path, truth_path, max_sep=max_sep, stages=missing)
        reports = read_reports(store_path)
        missing = [s for s in with_catalogs if s not in reports]
    if not reports:
        raise StoreError(f"{store_path}: no evaluation in the store (reports/ is empty). Run "
                         f"`deepmosaic evaluate {store_path} --truth TRUTH` first, or pass --truth TRUTH to "
                         f"`deepmosaic report` to evaluate now.")
    order = [b for b in BASELINES if b in reports] + [s for s in reports if s not in BASELINES]
    reports = {s: reports[s] for s in order}
    colours = {s: _COLOURS[i % len(_COLOURS)] for i, s in enumerate(reports)}

    out = Path(out_dir) if out_dir is not None else default_report_dir(store_path)
    out.mkdir(parents=True, exist_ok=True)

    recorded = next(iter(reports.values()))["attrs"].get("truth")
    tpath = truth_path or recorded
    truth_seg, notes = None, []
    if tpath and os.path.exists(tpath):
        from .truth import read_truth
        _, truth_seg = read_truth(tpath)
        if truth_seg is None:
            notes.append("the truth file has no SEGMAP: cutouts show no truth outlines and IoUs are undefined")
    elif tpath:
        notes.append(f"the truth file {tpath!r} does not exist: cutouts show no truth outlines")
    if missing:
        notes.append(f"stage(s) {missing} have catalogs but no evaluation; pass --truth to evaluate them")

    figs = {q: _fig_curves(reports, q, colours, out) for q in ("mag", "snr", "blendedness")}
    fig_iou = _fig_iou(reports, colours, out)
    fig_flux = _fig_flux(reports, colours, out)
    imagery = _Imagery(store_path, truth_seg)
    if imagery.note:
        notes.append(imagery.note)
    galleries = {s: _fig_gallery(s, r, imagery, out, k=cutouts_per_row) for s, r in reports.items()}

    summaries = {s: r["attrs"]["summary"] for s, r in reports.items()}
    (out / "summary.json").write_text(json.dumps({"store": os.path.abspath(store_path), "truth": tpath,
                                                  "stages": summaries,
                                                  "versus": {s: r["attrs"].get("versus") for s, r in
                                                             reports.items() if r["attrs"].get("versus")}},
                                                 indent=1))
    first = next(iter(reports.values()))["attrs"]
    s0 = next(iter(summaries.values()))
    meta = dict(root.attrs.get("deepmosaic", {}))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>deepmosaic report: {html.escape(os.path.basename(store_path.rstrip('/')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>deepmosaic evaluation: {html.escape(os.path.basename(store_path.rstrip('/')))}</h1>",
        '<p class="meta">'
        f"store: {html.escape(os.path.abspath(store_path))}<br>"
        f"input: {html.escape(str(((meta.get('inputs') or [{}])[0]).get('path', '?')))}<br>"
        f"truth: {html.escape(str(tpath))} ({s0.get('n_true')} objects, {s0.get('n_true_snr10')} with "
        f"S/N&ge;{SNR_CUT:g})<br>"
        f"matching: one-to-one Hungarian on centroid distance &le; {first.get('max_sep')} pix; "
        f"evaluated {html.escape(str(first.get('created')))}; deepmosaic {html.escape(str(meta.get('version', '?')))}"
        "</p>",
    ]
    parts += [f'<p class="note">Note: {html.escape(n)}</p>' for n in notes]
    parts += ["<h2>Summary</h2>",
              "<p>Completeness = TP / N<sub>true</sub>, purity = TP / N<sub>pred</sub>, PQ = mean IoU &times; F1. "
              "The S/N&ge;10 columns keep the true objects with S/N&ge;10; detections matched to fainter true "
              "objects count neither for nor against purity there. Mask-matched: one-to-one at IoU&gt;0.5 over "
              "the segmentation maps.</p>",
              _summary_table(reports), _versus_table(reports),
              '<p><a href="summary.json">summary.json</a> (all numbers)</p>',
              "<h2>Completeness and purity</h2>",
              _figure(figs["mag"], "Completeness against true magnitude (grey: true objects per bin) and "
                                   "purity against the magnitude measured by each stage."),
              _figure(figs["snr"], "Against S/N: the truth's matched-filter S/N for completeness, "
                                   "flux/flux_err for purity. Dotted: S/N = 10."),
              _figure(figs["blendedness"], "Completeness against the truth's blendedness (0 = isolated)."),
              "<h2>Segmentation</h2>",
              _figure(fig_iou, "IoU of each centroid-matched pair's segments; dotted: IoU = 0.5.") or
              "<p>No IoU: the truth or the stages have no segmentation map.</p>",
              "<h2>Photometry</h2>",
              _figure(fig_flux, "Fractional flux residual of matched pairs against true magnitude.") or
              "<p>No flux residuals (no flux in the truth or the catalogs).</p>",
              "<h2>Cutouts</h2>"]
    for stage, src in galleries.items():
        parts.append(f"<h3>{html.escape(stage)}</h3>")
        parts.append(_figure(src, f"{stage}: missed objects of highest S/N, matched pairs of lowest IoU, "
                                  f"typical pairs and the brightest unmatched detections.")
                     or "<p>No cutouts.</p>")
    from .eval_clumps import report_section
    parts += report_section(store_path, out, tpath)
    from .eval_detect import report_section as detect_section
    parts += detect_section(reports)
    from .eval_deblend import report_section as deblend_section
    parts += deblend_section(reports, out)
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(p for p in parts if p), encoding="utf-8")
    return index
