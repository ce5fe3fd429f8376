"""Scores of the morphology stages (``morphology``, ``morphology_fit``) against simulated truth.

Each stage's catalog is matched one-to-one to the true galaxies (Hungarian assignment on centroid distance
within ``max_sep`` px; stars in the truth are left out) and every matched galaxy is scored against its true
half-light radius ``hlr`` (circularised, before the PSF), Sersic index, axis ratio, angle and bulge fraction:

* ``r_med_rel``: median |r_half / hlr - 1| (all galaxies; for bulge + disk the total light's radius);
  ``r_off30``: fraction with |r_half / hlr - 1| > 0.3;
* ``n_med_rel``: median |n / n_true - 1| over single-Sersic galaxies (``bulge_frac == 0``);
* ``bt_med_abs``: median |B/T - B/T_true| over bulge + disk galaxies;
* ``cov_r``, ``cov_n``, ``cov_q``, ``cov_pa``, ``cov_bt``: fraction of truths inside the stage's 1-sigma
  (68 %) interval (the radius and n in log space, ``|log(v / v_true)| <= err / v``; the angle only for
  ``q_true < 0.9``, wrapped to 180 deg);

per bin of true matched-filter S/N (``SNR_EDGES``), separately for galaxies the stage flags as having a
neighbour (bit NEIGHBOUR), a truncated stamp (TRUNCATED, or the pipeline's mosaic-edge / tile-truncated
bits) and the rest (``clean``). :func:`score_table` is the same scoring on plain arrays, used by the
benchmark (``benchmarks/bench_morphology.py``) on held-out stamps.
"""
from __future__ import annotations

import numpy as np

from . import metrics

#: true matched-filter S/N bin edges
SNR_EDGES = (10.0, 20.0, 50.0, 100.0, 300.0, np.inf)
#: stage catalog columns that mark a morphology stage
MORPH_MARKERS = ("r_half", "r_half_err", "bulge_frac")
#: stage flag bits (tasks/morphology_task.py) and pipeline bits (tasks/base.py) that define the groups
_NEIGHBOUR, _TRUNCATED, _EDGE_BITS = 1, 2, (1 << 9) | (1 << 10)
SCORE_KEYS = ("n", "r_med_rel", "r_off30", "n_med_rel", "bt_med_abs", "q_med_abs", "pa_med_abs", "cov_r", "cov_n",
              "cov_q", "cov_pa", "cov_bt")


def galaxy_errors(pred: dict, truth: dict) -> dict[str, np.ndarray]:
    """Per-galaxy errors and interval hits (float; NaN where a quantity is not scored).

    ``pred``: ``r_half``, ``sersic_n``, ``q``, ``pa``, ``bulge_frac`` and their ``*_err``; ``truth``:
    ``hlr``, ``sersic_n``, ``q``, ``angle``, ``bulge_frac`` (0 for single Sersic), all arrays of one length.
    """
    bd = np.asarray(truth["bulge_frac"], float) > 0
    r, rt = np.asarray(pred["r_half"], float), np.asarray(truth["hlr"], float)
    n, nt = np.asarray(pred["sersic_n"], float), np.asarray(truth["sersic_n"], float)
    q, qt = np.asarray(pred["q"], float), np.asarray(truth["q"], float)
    bt, btt = np.asarray(pred["bulge_frac"], float), np.asarray(truth["bulge_frac"], float)
    dpa = np.abs((np.asarray(pred["pa"], float) - np.asarray(truth["angle"], float) + 90.0) % 180.0 - 90.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_rel = r / rt - 1.0
        n_rel = np.where(bd, np.nan, n / nt - 1.0)
        out = {"r_rel": r_rel, "n_rel": n_rel, "q_abs": np.abs(q - qt), "pa_abs": np.where(qt < 0.9, dpa, np.nan),
               "bt_abs": np.where(bd, np.abs(bt - btt), np.nan)}

        def hit(cond, valid):
            return np.where(valid & np.isfinite(cond.astype(float)), cond.astype(float), np.nan)

        ok = np.isfinite(r) & np.isfinite(np.asarray(pred["r_half_err"], float))
        out["r_in"] = hit(np.abs(np.log(r / rt)) <= pred["r_half_err"] / r, ok)
        out["n_in"] = hit(np.abs(np.log(n / nt)) <= pred["sersic_n_err"] / n, ~bd & np.isfinite(n))
        out["q_in"] = hit(out["q_abs"] <= pred["q_err"], np.isfinite(q))
        out["pa_in"] = hit(dpa <= pred["pa_err"], (qt < 0.9) & np.isfinite(dpa))
        out["bt_in"] = hit(out["bt_abs"] <= pred["bulge_frac_err"], bd & np.isfinite(bt))
    return out


def _med(v):
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _mean(v):
    v = v[np.isfinite(v)]
    return float(np.mean(v)) if len(v) else None


def summarise(err: dict, sel: np.ndarray) -> dict:
    """The ``SCORE_KEYS`` of the galaxies ``sel`` (None where no galaxy is scored)."""
    e = {k: np.asarray(v, float)[sel] for k, v in err.items()}
    r = e["r_rel"][np.isfinite(e["r_rel"])]
    return {"n": int(sel.sum()), "r_med_rel": _med(np.abs(e["r_rel"])),
            "r_off30": float(np.mean(np.abs(r) > 0.3)) if len(r) else None,
            "n_med_rel": _med(np.abs(e["n_rel"])), "bt_med_abs": _med(e["bt_abs"]), "q_med_abs": _med(e["q_abs"]),
            "pa_med_abs": _med(e["pa_abs"]), "cov_r": _mean(e["r_in"]), "cov_n": _mean(e["n_in"]),
            "cov_q": _mean(e["q_in"]), "cov_pa": _mean(e["pa_in"]), "cov_bt": _mean(e["bt_in"])}


def score_table(err: dict, snr: np.ndarray, sel: np.ndarray | None = None, edges=SNR_EDGES) -> list[dict]:
    """One :func:`summarise` row per S/N bin (``snr_lo``, ``snr_hi`` added; None = open), plus rows for S/N >= 20
    and >= 50."""
    snr = np.asarray(snr, float)
    sel = np.ones(len(snr), bool) if sel is None else np.asarray(sel, bool)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows.append({"snr_lo": lo, "snr_hi": hi if np.isfinite(hi) else None,
                     **summarise(err, sel & (snr >= lo) & (snr < hi))})
    for lo in (20.0, 50.0):
        rows.append({"snr_lo": lo, "snr_hi": None, **summarise(err, sel & (snr >= lo))})
    return rows


def for_stage(catalog: dict, truth_table, max_sep: float = 2.0) -> dict | None:
    """Scores of one stage's catalog (module docstring); None when the catalog is not a morphology catalog.

    Returns ``{"n_matched", "max_sep", "groups": {group: {"all": row, "bins": [rows]}}}`` for the groups
    ``clean``, ``neighbour``, ``truncated``; in each, ``sersic`` and ``bulge_disk`` sub-rows restrict
    ``all`` to the true model type.
    """
    if not all(k in catalog for k in MORPH_MARKERS):
        return None
    t = truth_table
    kind = np.asarray(t["kind"]).astype(str) if "kind" in t.colnames else np.full(len(t), "galaxy")
    need = ("hlr", "sersic_n", "q", "angle", "bulge_frac", "snr")
    if not all(c in t.colnames for c in need):
        return {"n_matched": 0, "note": f"the truth lacks {', '.join(c for c in need if c not in t.colnames)}"}
    gal = np.nonzero(kind == "galaxy")[0]
    txy = np.c_[np.asarray(t["x"], float)[gal], np.asarray(t["y"], float)[gal]]
    pxy = np.c_[np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)]
    ti, pi, _ = metrics.match_positions(txy, pxy, max_sep)
    rows = gal[ti]
    truth = {c: np.asarray(t[c], float)[rows] for c in need}
    pred = {k: np.asarray(v)[pi] for k, v in catalog.items()}
    err = galaxy_errors(pred, truth)
    flags = np.asarray(pred.get("flags", np.zeros(len(pi))), np.int64)
    trunc = (flags & (_TRUNCATED | _EDGE_BITS)) > 0
    neigh = ((flags & _NEIGHBOUR) > 0) & ~trunc
    groups = {"clean": ~trunc & ~neigh, "neighbour": neigh, "truncated": trunc}
    bd = truth["bulge_frac"] > 0
    out = {"n_matched": int(len(pi)), "max_sep": float(max_sep), "groups": {}}
    for g, sel in groups.items():
        out["groups"][g] = {"all": summarise(err, sel), "sersic": summarise(err, sel & ~bd),
                            "bulge_disk": summarise(err, sel & bd),
                            "bins": score_table(err, truth["snr"], sel)}
    return out


def _f(v, pct=False):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def format_rows(rows: list[dict], label: str = "") -> list[str]:
    """Aligned text lines of :func:`score_table` rows."""
    head = (f"{label:<16}{'S/N':>12} {'n':>6} {'|dr/r|':>8} {'>30%':>7} {'|dn/n|':>8} {'|dB/T|':>7} {'|dq|':>6} "
            f"{'|dPA|':>6} {'cov r':>6} {'cov n':>6} {'cov q':>6} {'covPA':>6} {'covBT':>6}")
    lines = [head]
    for r in rows:
        hi = "" if r["snr_hi"] is None else f"{r['snr_hi']:.0f}"
        rng = f"{r['snr_lo']:.0f}-{hi}" if hi else f">={r['snr_lo']:.0f}"
        lines.append(f"{'':<16}{rng:>12} {r['n']:>6} {_f(r['r_med_rel'], True):>8} {_f(r['r_off30'], True):>7} "
                     f"{_f(r['n_med_rel'], True):>8} {_f(r['bt_med_abs']):>7} {_f(r['q_med_abs']):>6} "
                     f"{_f(r['pa_med_abs']) if r['pa_med_abs'] is None else format(r['pa_med_abs'], '.1f'):>6} "
                     f"{_f(r['cov_r']):>6} {_f(r['cov_n']):>6} {_f(r['cov_q']):>6} {_f(r['cov_pa']):>6} "
                     f"{_f(r['cov_bt']):>6}")
    return lines


def format_lines(results: dict | None) -> list[str]:
    """Text lines for ``deepmosaic evaluate``: per morphology stage and group, the S/N-binned table."""
    lines: list[str] = []
    for stage, res in (results or {}).items():
        lines.append(f"morphology of {stage}: {res.get('n_matched', 0)} galaxies matched to the truth"
                     + (f" ({res['note']})" if res.get("note") else ""))
        for g, d in res.get("groups", {}).items():
            if d["all"]["n"] == 0:
                continue
            lines.append(f"  {g}: {d['all']['n']} galaxies")
            lines.extend("  " + s for s in format_rows(d["bins"]))
    return lines


__all__ = ["for_stage", "galaxy_errors", "summarise", "score_table", "format_rows", "format_lines", "SNR_EDGES",
           "SCORE_KEYS"]
