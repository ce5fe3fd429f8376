"""Detection, segmentation and photometry metrics: pure numpy/scipy functions, no I/O.

Conventions used throughout
---------------------------
* A *mask* is any array whose nonzero entries are "in the mask" (bool, integer, or float 0/1; NaN in a
  float mask is rejected because it is neither in nor out).
* A *label map* is an integer array; 0 is background and every other value is one object's id.
* Positions are ``(n, d)`` arrays (``d = 2`` for catalogs, columns in any order as long as both sides use
  the same order, e.g. ``(x, y)``) in pixels.
* Boxes are ``(n, 4)`` arrays ``(x_c, y_c, w, h)`` in continuous pixel coordinates.
* Counts are named ``n_*``. Scores whose denominator is zero are reported as ``0.0``, never NaN, except
  where a docstring says otherwise (flux residuals of non-positive truths, fractions in empty bins).

Known defects of the field's own metric code that this module is written (and tested) not to repeat:
IoU unions computed by adding booleans, an IoU comparing a mask with itself, true positives that include
unmatched objects, and greedy matching that lets two detections claim one true object.
"""
from __future__ import annotations

import math
import operator

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

__all__ = [
    "iou",
    "stamp_iou",
    "label_iou_matrix",
    "match_positions",
    "match_masks",
    "detection_scores",
    "panoptic_quality",
    "flux_residuals",
    "binned_scores",
    "evaluate_catalog",
    "box_iou",
    "average_precision",
]

#: Largest dense cost block (rows x columns) solved with ``linear_sum_assignment`` for one connected
#: component of the candidate graph; larger components go to the sparse solver.
_DENSE_LIMIT = 4_000_000

#: Quantities for which ``evaluate_catalog`` draws binned curves when the catalogs carry them.
CURVE_QUANTITIES = ("mag", "snr", "blendedness")


# --------------------------------------------------------------------------------------------------
# input normalisation
# --------------------------------------------------------------------------------------------------

def _as_mask(a, name):
    """Boolean view of a mask: nonzero means "in"."""
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iu":
        return arr != 0
    if arr.dtype.kind in "fc":
        if np.isnan(arr).any():
            raise ValueError(f"{name}: a mask must not contain NaN (nonzero = in the mask, zero = out); "
                             f"replace NaN with 0 or 1 before calling")
        return arr != 0
    raise TypeError(f"{name}: a mask must be a bool, integer or float array, got dtype {arr.dtype}")


def _as_labels(a, name):
    """Validated integer label map (0 = background, ids >= 1)."""
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: a label map must have an integer dtype (0 = background), got dtype "
                        f"{arr.dtype}; convert with .astype(np.int64) if the values are whole numbers")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{name}: label ids must be >= 0 (0 = background), got minimum {arr.min()}")
    return arr


def _as_count(value, name):
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer count, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _as_positions(xy, name):
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) array of positions, got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------------
# IoU of masks
# --------------------------------------------------------------------------------------------------

def iou(a, b):
    """Intersection over union of two masks.

    Parameters
    ----------
    a, b : array_like, any shape (the same for both)
        Masks of any dtype (bool, integer, float 0/1): nonzero entries are in the mask.

    Returns
    -------
    float
        ``|A n B| / |A u B|`` in ``[0, 1]``. Both masks empty gives ``1.0`` (perfect agreement, so that
        ``iou(A, A) == 1`` for every ``A``); exactly one empty gives ``0.0``. Never NaN.

    Raises
    ------
    ValueError
        If the shapes differ, or a float mask holds NaN.

    Notes
    -----
    The union is counted with an explicit logical OR. Adding boolean arrays (``a + b``) is a logical OR in
    numpy, so a "union" written as ``sum(a + b) - sum(a * b)`` is ``|A u B| - |A n B|``: a true IoU of 0.39
    would read 0.64 and a perfect prediction would divide by zero.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"iou: masks must have the same shape, got a.shape={a.shape} and b.shape={b.shape}")
    ma = _as_mask(a, "a")
    mb = _as_mask(b, "b")
    union = int(np.count_nonzero(np.logical_or(ma, mb)))
    if union == 0:
        return 1.0
    inter = int(np.count_nonzero(np.logical_and(ma, mb)))
    return inter / union


def stamp_iou(true_masks, pred_masks):
    """IoU of each stamp in two stacks of masks (the lecture's per-stamp IoU).

    Parameters
    ----------
    true_masks, pred_masks : array_like, shape (n, y, x) (or any ``(n, ...)``, the same for both)
        Stacks of masks, any dtype; nonzero = in the mask.

    Returns
    -------
    ndarray of float64, shape (n,)
        IoU of stamp ``i`` of ``true_masks`` with stamp ``i`` of ``pred_masks`` (never of a stamp with
        itself). A stamp where both masks are empty scores 1.0, as in :func:`iou`; take
        ``.mean()`` for the mean IoU over stamps, and drop stamps with an empty truth first if those
        should not count.

    Raises
    ------
    ValueError
        If the shapes differ or the stacks have fewer than 2 dimensions.
    """
    t = np.asarray(true_masks)
    p = np.asarray(pred_masks)
    if t.shape != p.shape:
        raise ValueError(f"stamp_iou: stacks must have the same shape, got true_masks.shape={t.shape} and "
                         f"pred_masks.shape={p.shape}")
    if t.ndim < 2:
        raise ValueError(f"stamp_iou: stacks must be (n, y, x) (at least 2-D), got shape {t.shape}")
    per_stamp = int(np.prod(t.shape[1:]))
    mt = _as_mask(t, "true_masks").reshape(t.shape[0], per_stamp)
    mp = _as_mask(p, "pred_masks").reshape(p.shape[0], per_stamp)
    inter = np.count_nonzero(np.logical_and(mt, mp), axis=1)
    union = np.count_nonzero(np.logical_or(mt, mp), axis=1)
    out = np.ones(t.shape[0], dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


# --------------------------------------------------------------------------------------------------
# label maps
# --------------------------------------------------------------------------------------------------

def _label_overlaps(true_labels, pred_labels):
    """Contingency counts of two label maps.

    Returns ``(true_ids, true_areas, pred_ids, pred_areas, rows, cols, inter)``: sorted nonzero ids and
    their pixel counts in each map, and for each overlapping pair the indices into ``true_ids`` /
    ``pred_ids`` and the number of shared pixels. One sort of the foreground pixels does all the work.
    """
    t = _as_labels(true_labels, "true_labels")
    p = _as_labels(pred_labels, "pred_labels")
    if t.shape != p.shape:
        raise ValueError(f"label maps must have the same shape, got true_labels.shape={t.shape} and "
                         f"pred_labels.shape={p.shape}")
    t = t.ravel()
    p = p.ravel()
    fg = (t != 0) | (p != 0)
    t = t[fg]
    p = p[fg]
    if t.size == 0:
        empty_t = np.zeros(0, dtype=t.dtype)
        empty_p = np.zeros(0, dtype=p.dtype)
        z = np.zeros(0, dtype=np.int64)
        return empty_t, z, empty_p, z.copy(), z.copy(), z.copy(), z.copy()

    t_max = int(t.max())
    p_max = int(p.max())
    if (t_max + 1) * (p_max + 1) <= np.iinfo(np.int64).max:
        # ids small enough to pack both into one int64 key: no relabelling pass needed
        t_lut = p_lut = None
        base = p_max + 1
        key = t.astype(np.int64) * base + p.astype(np.int64)
    else:
        # huge ids (e.g. tile offsets): compact each map to 0..k-1 first
        t_lut, t_code = np.unique(t, return_inverse=True)
        p_lut, p_code = np.unique(p, return_inverse=True)
        base = len(p_lut)
        key = t_code.astype(np.int64) * base + p_code.astype(np.int64)
    keys, counts = np.unique(key, return_counts=True)
    kt = keys // base
    kp = keys % base
    if t_lut is not None:
        kt = t_lut[kt]
        kp = p_lut[kp]
    else:
        kt = kt.astype(t.dtype)
        kp = kp.astype(p.dtype)

    true_ids, t_inv = np.unique(kt, return_inverse=True)
    true_areas = np.bincount(t_inv, weights=counts, minlength=len(true_ids)).astype(np.int64)
    pred_ids, p_inv = np.unique(kp, return_inverse=True)
    pred_areas = np.bincount(p_inv, weights=counts, minlength=len(pred_ids)).astype(np.int64)
    both = (kt != 0) & (kp != 0)
    t_keep = true_ids != 0
    p_keep = pred_ids != 0
    # indices into the id arrays once background is dropped
    t_shift = np.cumsum(~t_keep)  # 1 at and after the background slot (always slot 0 when present)
    p_shift = np.cumsum(~p_keep)
    rows = (t_inv[both] - t_shift[t_inv[both]]).astype(np.int64)
    cols = (p_inv[both] - p_shift[p_inv[both]]).astype(np.int64)
    inter = counts[both].astype(np.int64)
    return (true_ids[t_keep], true_areas[t_keep], pred_ids[p_keep], pred_areas[p_keep], rows, cols, inter)


def label_iou_matrix(true_labels, pred_labels, *, dense=False):
    """IoU of every pair of objects in two label maps, from one contingency count.

    Parameters
    ----------
    true_labels, pred_labels : array_like of int, any shape (the same for both)
        Label maps; 0 is background, any other value is an object id (ids need not be contiguous).
    dense : bool, optional
        Return a dense ``ndarray`` instead of a sparse matrix (only for small problems: the dense matrix
        has ``len(true_ids) * len(pred_ids)`` entries).

    Returns
    -------
    true_ids : ndarray, shape (n_true,)
        Sorted nonzero ids present in ``true_labels`` (dtype of the input labels).
    pred_ids : ndarray, shape (n_pred,)
        Sorted nonzero ids present in ``pred_labels``.
    ious : scipy.sparse.csr_array or ndarray of float64, shape (n_true, n_pred)
        ``ious[i, j]`` is the IoU of object ``true_ids[i]`` with object ``pred_ids[j]``; only overlapping
        pairs are stored in the sparse form (every other pair has IoU 0).

    Notes
    -----
    Cost is one sort of the foreground pixels (``O(N log N)`` for ``N`` pixels), independent of the number
    of labels: a 1e7-pixel map with ~2e4 labels takes ~0.5 s (~1.5 s when ids are too large to pack two
    into one int64, e.g. tile-offset ids, and each map is compacted first). The result is invariant to
    relabelling: renaming ids permutes rows/columns and leaves the values unchanged.
    """
    true_ids, ta, pred_ids, pa, rows, cols, inter = _label_overlaps(true_labels, pred_labels)
    vals = inter / (ta[rows] + pa[cols] - inter)
    shape = (len(true_ids), len(pred_ids))
    if dense:
        m = np.zeros(shape, dtype=np.float64)
        m[rows, cols] = vals
        return true_ids, pred_ids, m
    return true_ids, pred_ids, sparse.csr_array((vals, (rows, cols)), shape=shape)


# --------------------------------------------------------------------------------------------------
# one-to-one assignment on a sparse candidate graph
# --------------------------------------------------------------------------------------------------

def _solve_component(r, c, w, k_r, k_c, fill):
    """Optimal assignment in one connected component; local indices; returns a bool mask of chosen edges.

    Minimises ``sum(w of chosen edges) + fill * (min(k_r, k_c) - n_chosen)``, i.e. leaving a row and a
    column unmatched costs ``fill``; every ``w`` must be ``< fill``.
    """
    if k_r * k_c <= _DENSE_LIMIT:
        cost = np.full((k_r, k_c), fill, dtype=np.float64)
        cost[r, c] = w
        is_edge = np.zeros((k_r, k_c), dtype=bool)
        is_edge[r, c] = True
        ri, ci = linear_sum_assignment(cost)
        chosen = is_edge[ri, ci]
        ri, ci = ri[chosen], ci[chosen]
    else:
        ri, ci = _solve_sparse(r, c, w, k_r, k_c, fill)
    # map chosen (row, col) back to edge positions
    edge_key = r.astype(np.int64) * k_c + c
    pick = np.isin(edge_key, ri.astype(np.int64) * k_c + ci)
    return pick


def _solve_sparse(r, c, w, k_r, k_c, fill):
    """Same problem as the dense branch, on a sparse square graph that always has a perfect matching.

    Left nodes: the ``k_r`` rows, then one dummy per column. Right nodes: the ``k_c`` columns, then one
    dummy per row. A row matched to its own dummy (or a column to its dummy) is unmatched, at cost
    ``fill / 2`` each; dummy-dummy edges mirror the real edges at cost 0 so that any real matching
    completes to a perfect one. Every perfect matching has ``k_r + k_c`` edges, so shifting all weights by
    one constant (to keep them > 0: the solver drops explicit zeros) leaves the optimum unchanged.
    """
    n = k_r + k_c
    half = fill / 2.0
    rr = np.concatenate([r, np.arange(k_r), k_r + np.arange(k_c), k_r + c])
    cc = np.concatenate([c, k_c + np.arange(k_r), np.arange(k_c), k_c + r])
    ww = np.concatenate([w, np.full(k_r, half), np.full(k_c, half), np.zeros(len(r))])
    ww = ww - ww.min() + 1.0
    graph = sparse.csr_array((ww, (rr, cc)), shape=(n, n))
    left, right = min_weight_full_bipartite_matching(graph)
    left = np.asarray(left)
    right = np.asarray(right)
    real = (left < k_r) & (right < k_c)
    return left[real], right[real]


def _assign(rows, cols, cost, n_rows, n_cols, *, cardinality_first):
    """One-to-one assignment restricted to candidate edges ``(rows[k], cols[k])`` with ``cost[k]``.

    ``cardinality_first=True``: maximise the number of matched pairs, then minimise their summed cost
    (costs must be >= 0). ``False``: minimise the summed cost of matched pairs, leaving objects unmatched
    for free (so only edges with cost < 0 can be chosen). The problem is split into connected components
    of the candidate graph; isolated single edges are taken directly, the rest are solved exactly.
    Returns ``(rows_chosen, cols_chosen, cost_chosen)`` sorted by row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    if not cardinality_first:
        keep = cost < 0
        rows, cols, cost = rows[keep], cols[keep], cost[keep]
    if rows.size == 0:
        return rows, cols, cost
    n = n_rows + n_cols
    graph = sparse.coo_array((np.ones(rows.size, dtype=np.int8), (rows, n_rows + cols)), shape=(n, n))
    _, comp_of_node = connected_components(graph, directed=False)
    comp = comp_of_node[rows]
    edges_per_comp = np.bincount(comp)
    single = edges_per_comp[comp] == 1
    chosen = single.copy()

    multi = np.flatnonzero(~single)
    if multi.size:
        order = multi[np.argsort(comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        for grp in np.split(order, bounds):
            r_ids, r_loc = np.unique(rows[grp], return_inverse=True)
            c_ids, c_loc = np.unique(cols[grp], return_inverse=True)
            w = cost[grp]
            if cardinality_first:
                w = w - w.min()
                # larger than any difference in summed cost between matchings, so one more pair always wins
                fill = (min(len(r_ids), len(c_ids)) + 1) * (float(w.max()) + 1.0)
            else:
                fill = 0.0
            chosen[grp] = _solve_component(r_loc, c_loc, w, len(r_ids), len(c_ids), fill)

    rows, cols, cost = rows[chosen], cols[chosen], cost[chosen]
    order = np.argsort(rows, kind="stable")
    return rows[order], cols[order], cost[order]


# --------------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------------

def match_positions(true_xy, pred_xy, max_sep):
    """One-to-one matching of two position lists (Hungarian assignment on centroid distance).

    Parameters
    ----------
    true_xy : array_like of float, shape (n_true, d)
        True positions in pixels (``d = 2`` for images; column order free but the same on both sides).
    pred_xy : array_like of float, shape (n_pred, d)
        Predicted positions.
    max_sep : float
        Largest separation of a matched pair, in the units of the positions (inclusive). Must be >= 0.

    Returns
    -------
    true_idx : ndarray of int64, shape (n_tp,)
        Row indices into ``true_xy`` of matched objects, ascending.
    pred_idx : ndarray of int64, shape (n_tp,)
        Row indices into ``pred_xy``; ``pred_idx[k]`` is matched to ``true_idx[k]``.
    distance : ndarray of float64, shape (n_tp,)
        Separation of each matched pair, all ``<= max_sep``.

    Notes
    -----
    Only pairs within ``max_sep`` are candidates (found with a KD-tree); a pair farther apart is never
    assigned, so it can never displace a valid pair. Among one-to-one matchings of candidate pairs the
    result has the largest number of pairs and, among those, the smallest summed distance. The assignment
    is solved exactly per connected component of the candidate graph (dense ``linear_sum_assignment`` for
    ordinary components, a sparse solver for huge ones), so ~1e4 objects per side take well under a
    second and no ``n_true x n_pred`` matrix is ever built. Rows with a non-finite coordinate are never
    matched.
    """
    t = _as_positions(true_xy, "true_xy")
    p = _as_positions(pred_xy, "pred_xy")
    if t.shape[1] != p.shape[1] and len(t) and len(p):
        raise ValueError(f"true_xy and pred_xy must have the same number of columns, got shapes {t.shape} "
                         f"and {p.shape}")
    max_sep = float(max_sep)
    if not (math.isfinite(max_sep) and max_sep >= 0):
        raise ValueError(f"max_sep must be a finite separation >= 0 in pixels, got {max_sep}")
    empty_i = np.zeros(0, dtype=np.int64)
    t_ok = np.flatnonzero(np.isfinite(t).all(axis=1))
    p_ok = np.flatnonzero(np.isfinite(p).all(axis=1))
    if t_ok.size == 0 or p_ok.size == 0:
        return empty_i, empty_i.copy(), np.zeros(0, dtype=np.float64)
    pairs = cKDTree(t[t_ok]).sparse_distance_matrix(cKDTree(p[p_ok]), max_sep, output_type="ndarray")
    rows = t_ok[pairs["i"]]
    cols = p_ok[pairs["j"]]
    r, c, d = _assign(rows, cols, pairs["v"], len(t), len(p), cardinality_first=True)
    return r, c, d


def match_masks(true_labels, pred_labels, threshold=0.5):
    """One-to-one matching of the objects of two label maps at IoU > ``threshold``.

    Parameters
    ----------
    true_labels, pred_labels : array_like of int, same shape
        Label maps (0 = background).
    threshold : float, optional
        A pair can match only if its IoU is strictly greater than this, in ``[0, 1)``. Default 0.5, the
        usual "good detection".

    Returns
    -------
    true_ids : ndarray, shape (n_tp,)
        Matched ids of ``true_labels``, ascending.
    pred_ids : ndarray, shape (n_tp,)
        The id in ``pred_labels`` matched to each entry of ``true_ids``.
    ious : ndarray of float64, shape (n_tp,)
        IoU of each matched pair.

    Notes
    -----
    For ``threshold >= 0.5`` each object has at most one partner above the threshold (two disjoint
    predictions cannot each cover more than half of a true object's union), so the matching is unique by
    construction. For lower thresholds the pairs are chosen by a Hungarian assignment on ``-IoU``
    (largest summed IoU), which keeps the matching one-to-one.
    """
    threshold = float(threshold)
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    true_ids, ta, pred_ids, pa, rows, cols, inter = _label_overlaps(true_labels, pred_labels)
    vals = inter / (ta[rows] + pa[cols] - inter)
    keep = vals > threshold
    r, c, neg = _assign(rows[keep], cols[keep], -vals[keep], len(true_ids), len(pred_ids),
                        cardinality_first=False)
    return true_ids[r], pred_ids[c], -neg


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------

def detection_scores(n_true, n_pred, n_tp):
    """Completeness, purity and F1 from counts.

    Parameters
    ----------
    n_true : int
        Number of true objects.
    n_pred : int
        Number of predicted (detected) objects.
    n_tp : int
        Number of *matched pairs* from a one-to-one matching (never count unmatched objects), at most
        ``min(n_true, n_pred)``.

    Returns
    -------
    dict
        ``n_true, n_pred, n_tp, n_fp, n_fn`` (int) and ``completeness = n_tp / n_true`` (recall),
        ``purity = n_tp / n_pred`` (precision), ``f1 = 2 n_tp / (n_true + n_pred)`` (float). A score whose
        denominator is 0 is 0.0 (undefined, reported as 0, never NaN).

    Raises
    ------
    ValueError
        If a count is negative or ``n_tp > min(n_true, n_pred)`` (a sign of a non-one-to-one matching).
    """
    n_true = _as_count(n_true, "n_true")
    n_pred = _as_count(n_pred, "n_pred")
    n_tp = _as_count(n_tp, "n_tp")
    if n_tp > min(n_true, n_pred):
        raise ValueError(f"n_tp={n_tp} exceeds min(n_true={n_true}, n_pred={n_pred}): true positives must "
                         f"be pairs of a one-to-one matching")
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "n_tp": n_tp,
        "n_fp": n_pred - n_tp,
        "n_fn": n_true - n_tp,
        "completeness": n_tp / n_true if n_true else 0.0,
        "purity": n_tp / n_pred if n_pred else 0.0,
        "f1": 2.0 * n_tp / (n_true + n_pred) if (n_true + n_pred) else 0.0,
    }


def panoptic_quality(ious_of_matched, n_true, n_pred):
    """Panoptic quality: detection and segmentation in one number.

    Parameters
    ----------
    ious_of_matched : array_like of float, shape (n_tp,)
        IoU of each matched pair (one entry per pair of a one-to-one matching), each in ``[0, 1]``.
    n_true, n_pred : int
        Numbers of true and predicted objects.

    Returns
    -------
    float
        ``sum(IoU) / (TP + FP/2 + FN/2)``, with ``TP = len(ious_of_matched)``, ``FP = n_pred - TP`` and
        ``FN = n_true - TP``. This equals ``mean matched IoU x F1`` (segmentation quality times recognition
        quality). 0.0 when there is nothing at all (``n_true = n_pred = 0``).
    """
    ious = np.asarray(ious_of_matched, dtype=np.float64).ravel()
    n_true = _as_count(n_true, "n_true")
    n_pred = _as_count(n_pred, "n_pred")
    n_tp = ious.size
    if n_tp > min(n_true, n_pred):
        raise ValueError(f"{n_tp} matched IoUs but min(n_true={n_true}, n_pred={n_pred}) is smaller: pass "
                         f"one IoU per matched pair")
    if n_tp and not (np.isfinite(ious).all() and ious.min() >= 0.0 and ious.max() <= 1.0):
        raise ValueError("ious_of_matched must be finite values in [0, 1]")
    denom = n_tp + 0.5 * (n_pred - n_tp) + 0.5 * (n_true - n_tp)
    return float(ious.sum() / denom) if denom > 0 else 0.0


def flux_residuals(pred_flux, true_flux):
    """Fractional flux residuals ``(pred - true) / true``.

    Parameters
    ----------
    pred_flux, true_flux : array_like of float, broadcastable shapes
        Fluxes of matched pairs, element ``k`` of one against element ``k`` of the other.

    Returns
    -------
    ndarray of float64, broadcast shape
        The residuals; NaN where ``true_flux <= 0`` (a fractional error is meaningless there) or either
        flux is not finite. No warning is emitted. Use ``np.nanmedian(np.abs(r))`` and friends downstream.
    """
    pf = np.asarray(pred_flux, dtype=np.float64)
    tf = np.asarray(true_flux, dtype=np.float64)
    pf, tf = np.broadcast_arrays(pf, tf)
    ok = np.isfinite(pf) & np.isfinite(tf) & (tf > 0)
    diff = np.subtract(pf, tf, out=np.zeros(pf.shape, dtype=np.float64), where=ok)
    out = np.full(pf.shape, np.nan, dtype=np.float64)
    np.divide(diff, tf, out=out, where=ok)
    return out


def roc_auc(scores, labels):
    """Area under the ROC curve of ``scores`` for binary ``labels`` (the probability that a random positive
    scores above a random negative; ties count half). NaN when either class is absent.

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    from scipy.stats import rankdata
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: scores {s.shape} and labels {y.shape} differ in length; give one label per score.")
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def binned_scores(values, matched, bins=10):
    """Fraction of matched objects in bins of a quantity (completeness or purity curves).

    Pass true objects' quantity (magnitude, S/N, blendedness) and whether each was matched to get
    completeness; pass predictions' quantity and their matched flags to get purity.

    Parameters
    ----------
    values : array_like of float, shape (n,)
        The quantity per object. Non-finite values fall in no bin.
    matched : array_like of bool, shape (n,)
        Whether each object belongs to a matched pair.
    bins : int or array_like of float, optional
        Number of equal-width bins over the finite range of ``values``, or monotonically increasing bin
        edges. Bins are half-open ``[e_i, e_{i+1})`` except the last, which is closed (as ``np.histogram``).

    Returns
    -------
    dict of ndarray
        ``edges`` (float64, ``n_bins + 1``), ``centres`` (float64, ``n_bins``), ``n`` and ``n_matched``
        (int64, ``n_bins``: objects and matched objects per bin), ``fraction`` (float64, ``n_matched / n``,
        NaN in empty bins: no data, not zero completeness), and ``n_outside`` (int: objects in no bin,
        non-finite values included).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    m = np.asarray(matched).ravel()
    if m.dtype != bool:
        if m.dtype.kind not in "iu" or (m.size and not np.isin(m, (0, 1)).all()):
            raise ValueError(f"matched must be booleans (or 0/1), got dtype {m.dtype}")
        m = m.astype(bool)
    if v.shape != m.shape:
        raise ValueError(f"values and matched must have the same length, got {v.shape[0]} and {m.shape[0]}")
    finite = np.isfinite(v)
    if np.ndim(bins) == 0:
        n_bins = _as_count(bins, "bins")
        if n_bins < 1:
            raise ValueError(f"bins must be >= 1, got {n_bins}")
        if finite.any():
            lo, hi = float(v[finite].min()), float(v[finite].max())
        else:
            lo, hi = 0.0, 1.0
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, n_bins + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64).ravel()
        if edges.size < 2 or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
            raise ValueError(f"bins must be an int or at least two finite, increasing edges, got {bins!r}")
    n, _ = np.histogram(v[finite], bins=edges)
    n_m, _ = np.histogram(v[finite & m], bins=edges)
    frac = np.full(n.shape, np.nan, dtype=np.float64)
    np.divide(n_m, n, out=frac, where=n > 0)
    return {
        "edges": edges,
        "centres": 0.5 * (edges[:-1] + edges[1:]),
        "n": n.astype(np.int64),
        "n_matched": n_m.astype(np.int64),
        "fraction": frac,
        "n_outside": int(v.size - n.sum()),
    }


# --------------------------------------------------------------------------------------------------
# whole-catalog evaluation
# --------------------------------------------------------------------------------------------------

def _catalog_columns(cat, name):
    if not isinstance(cat, dict):
        raise TypeError(f"{name} must be a dict of equal-length 1-D arrays, got {type(cat).__name__}")
    for key in ("x", "y"):
        if key not in cat:
            raise ValueError(f"{name} needs a {key!r} column; it has {sorted(cat)}")
    cols = {k: np.asarray(v) for k, v in cat.items()}
    n = cols["x"].shape[0] if cols["x"].ndim else -1
    for k, v in cols.items():
        if v.ndim != 1 or v.shape[0] != n:
            raise ValueError(f"{name}[{k!r}] must be 1-D with the same length as {name}['x'] ({n}), got "
                             f"shape {v.shape}")
    if "id" in cols:
        ids = cols["id"]
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{name}['id'] must hold integer ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or int(ids.max()) > np.iinfo(np.int64).max):
            raise ValueError(f"{name}['id'] must be >= 0 (-1 marks 'no partner' in the match table)")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"{name}['id'] has duplicate ids; each object needs its own id")
        cols["id"] = ids.astype(np.int64)
    else:
        cols["id"] = np.arange(n, dtype=np.int64)
    return cols, n


def _pair_ious(t_ids, p_ids, overlaps):
    """IoU of given (true id, pred id) pairs from ``_label_overlaps`` output; 0 where neither has pixels."""
    true_ids, ta, pred_ids, pa, rows, cols, inter = overlaps
    n_p = max(len(pred_ids), 1)

    def lookup(ids, table):
        pos = np.searchsorted(table, ids)
        pos = np.minimum(pos, max(len(table) - 1, 0))
        found = (table[pos] == ids) if len(table) else np.zeros(len(ids), bool)
        return pos, found

    ti, t_found = lookup(t_ids, true_ids)
    pj, p_found = lookup(p_ids, pred_ids)
    area_t = np.where(t_found, ta[ti] if len(ta) else 0, 0)
    area_p = np.where(p_found, pa[pj] if len(pa) else 0, 0)
    pair_keys = rows * n_p + cols  # ascending (rows, cols come from a sorted unique)
    want = ti.astype(np.int64) * n_p + pj
    k = np.searchsorted(pair_keys, want)
    k = np.minimum(k, max(len(pair_keys) - 1, 0))
    hit = t_found & p_found & ((pair_keys[k] == want) if len(pair_keys) else False)
    shared = np.where(hit, inter[k] if len(inter) else 0, 0)
    union = area_t + area_p - shared
    out = np.zeros(len(t_ids), dtype=np.float64)
    np.divide(shared, union, out=out, where=union > 0)
    return out


def _bins_for(bins, quantity):
    if isinstance(bins, dict):
        return bins.get(quantity, 10)
    return bins


def evaluate_catalog(truth, pred, max_sep=2.0, truth_seg=None, pred_seg=None, bins=10):
    """Match a predicted catalog to the truth and score it.

    Parameters
    ----------
    truth : dict of 1-D arrays, all of length n_true
        Must have ``x`` and ``y`` (0-based pixels); optional ``id`` (int >= 0, the label of the object in
        ``truth_seg``; default ``0..n_true-1``), ``flux``, and the curve quantities ``mag``, ``snr``,
        ``blendedness``.
    pred : dict of 1-D arrays, all of length n_pred
        Must have ``x`` and ``y``; optional ``id`` (label in ``pred_seg``), ``flux``, and any curve
        quantity (which gives a purity curve).
    max_sep : float, optional
        Largest centroid separation of a matched pair, in pixels (inclusive). Default 2.0.
    truth_seg, pred_seg : array_like of int, optional
        Label maps of the same shape, labelled with the catalogs' ids. Give both or neither.
    bins : int, array_like, or dict, optional
        Bins for the curves: a number of bins, edges, or a dict ``{quantity: int or edges}`` (missing
        quantities get 10 bins). See :func:`binned_scores`.

    Returns
    -------
    table : dict of ndarray
        One row per matched pair and per unmatched object: first every true object in input order (matched
        or not), then the unmatched predictions in input order. Columns: ``truth_index``, ``pred_index``
        (int64 row in the input catalogs, -1 if none), ``truth_id``, ``pred_id`` (int64, -1 if none),
        ``matched`` (bool), ``distance`` (float64, NaN if unmatched), ``iou`` (float64: mask IoU of the
        centroid-matched pair from the label IoU matrix; NaN if unmatched or without segmentation maps; 0.0
        for a matched pair whose labels have no pixels in either map), ``flux_residual`` (float64,
        ``(pred - true) / true`` for matched pairs, NaN otherwise or when ``true <= 0`` or fluxes are
        missing).
    summary : dict
        JSON-friendly (Python ``int``, ``float`` or ``None``): ``n_true``, ``n_pred``, ``n_tp``, ``n_fp``,
        ``n_fn``, ``completeness``, ``purity``, ``f1`` (0.0 when undefined), ``max_sep``, ``mean_iou``
        (mean IoU over centroid-matched pairs), ``pq`` (panoptic quality of the centroid matching,
        ``= mean_iou x f1``), ``median_abs_flux_residual``. With segmentation maps also the mask matching
        at IoU > 0.5 over all labels in the maps: ``mask_n_true``, ``mask_n_pred``, ``mask_n_tp``,
        ``mask_completeness``, ``mask_purity``, ``mask_f1``, ``mask_mean_iou`` and ``mask_pq`` (the
        standard panoptic quality). ``None`` marks a value that cannot be computed (no segmentation maps,
        no matched pair, no usable flux).
    curves : dict
        ``curves["completeness"][q]`` for each ``q`` of ``mag``, ``snr``, ``blendedness`` present in
        ``truth``, and ``curves["purity"][q]`` for each present in ``pred``: the dicts of
        :func:`binned_scores`.
    """
    t, n_true = _catalog_columns(truth, "truth")
    p, n_pred = _catalog_columns(pred, "pred")
    if (truth_seg is None) != (pred_seg is None):
        raise ValueError("give both truth_seg and pred_seg, or neither")
    if truth_seg is not None and not ("id" in truth and "id" in pred):
        raise ValueError("with segmentation maps, truth and pred need an 'id' column holding each object's "
                         "label in truth_seg / pred_seg")

    t_xy = np.column_stack([t["x"], t["y"]]).astype(np.float64) if n_true else np.zeros((0, 2))
    p_xy = np.column_stack([p["x"], p["y"]]).astype(np.float64) if n_pred else np.zeros((0, 2))
    ti, pj, dist = match_positions(t_xy, p_xy, max_sep)
    n_tp = len(ti)

    t_matched = np.zeros(n_true, dtype=bool)
    t_matched[ti] = True
    p_matched = np.zeros(n_pred, dtype=bool)
    p_matched[pj] = True
    partner = np.full(n_true, -1, dtype=np.int64)
    partner[ti] = pj
    t_dist = np.full(n_true, np.nan)
    t_dist[ti] = dist

    # per-pair flux residuals, each pair's own truth flux (never an index into another array)
    resid = np.full(n_true, np.nan)
    if "flux" in t and "flux" in p and n_tp:
        resid[ti] = flux_residuals(p["flux"][pj], t["flux"][ti])

    pair_iou = np.full(n_true, np.nan)
    overlaps = None
    if truth_seg is not None:
        overlaps = _label_overlaps(truth_seg, pred_seg)
        if n_tp:
            pair_iou[ti] = _pair_ious(t["id"][ti], p["id"][pj], overlaps)

    un_p = np.flatnonzero(~p_matched)
    n_un = len(un_p)
    table = {
        "truth_index": np.concatenate([np.arange(n_true, dtype=np.int64), np.full(n_un, -1, np.int64)]),
        "pred_index": np.concatenate([partner, un_p.astype(np.int64)]),
        "truth_id": np.concatenate([t["id"], np.full(n_un, -1, np.int64)]),
        "pred_id": np.concatenate([np.where(partner >= 0, p["id"][np.maximum(partner, 0)] if n_pred else -1,
                                            -1).astype(np.int64), p["id"][un_p]]),
        "matched": np.concatenate([t_matched, np.zeros(n_un, dtype=bool)]),
        "distance": np.concatenate([t_dist, np.full(n_un, np.nan)]),
        "iou": np.concatenate([pair_iou, np.full(n_un, np.nan)]),
        "flux_residual": np.concatenate([resid, np.full(n_un, np.nan)]),
    }

    det = detection_scores(n_true, n_pred, n_tp)
    summary = dict(det)
    summary["max_sep"] = float(max_sep)
    if overlaps is not None:
        matched_ious = pair_iou[ti]
        summary["mean_iou"] = float(matched_ious.mean()) if n_tp else None
        summary["pq"] = panoptic_quality(matched_ious, n_true, n_pred)
    else:
        summary["mean_iou"] = None
        summary["pq"] = None
    finite_r = resid[np.isfinite(resid)]
    summary["median_abs_flux_residual"] = float(np.median(np.abs(finite_r))) if finite_r.size else None

    if overlaps is not None:
        true_ids, _, pred_ids, _, rows, cols, inter = overlaps
        mt, mp, mious = match_masks(truth_seg, pred_seg, threshold=0.5)
        mdet = detection_scores(len(true_ids), len(pred_ids), len(mt))
        summary["mask_n_true"] = mdet["n_true"]
        summary["mask_n_pred"] = mdet["n_pred"]
        summary["mask_n_tp"] = mdet["n_tp"]
        summary["mask_completeness"] = mdet["completeness"]
        summary["mask_purity"] = mdet["purity"]
        summary["mask_f1"] = mdet["f1"]
        summary["mask_mean_iou"] = float(mious.mean()) if len(mious) else None
        summary["mask_pq"] = panoptic_quality(mious, len(true_ids), len(pred_ids))

    curves = {"completeness": {}, "purity": {}}
    for q in CURVE_QUANTITIES:
        if q in t:
            curves["completeness"][q] = binned_scores(t[q], t_matched, _bins_for(bins, q))
        if q in p:
            curves["purity"][q] = binned_scores(p[q], p_matched, _bins_for(bins, q))
    return table, summary, curves


# --------------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------------

def _as_boxes(b, name):
    arr = np.asarray(b, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must be an (n, 4) array of (x_c, y_c, w, h), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    if (arr[:, 2:] < 0).any():
        raise ValueError(f"{name}: box widths and heights must be >= 0")
    return arr


def box_iou(boxes_a, boxes_b):
    """IoU of every pair of axis-aligned boxes.

    Parameters
    ----------
    boxes_a : array_like of float, shape (n, 4)
        Boxes ``(x_c, y_c, w, h)``: centre and full width/height, continuous pixel coordinates.
    boxes_b : array_like of float, shape (m, 4)
        Boxes in the same convention.

    Returns
    -------
    ndarray of float64, shape (n, m)
        IoU of ``boxes_a[i]`` with ``boxes_b[j]``; 0.0 for a pair whose union has zero area (degenerate
        boxes never count as a detection).
    """
    a = _as_boxes(boxes_a, "boxes_a")
    b = _as_boxes(boxes_b, "boxes_b")
    ax0, ax1 = a[:, 0] - a[:, 2] / 2, a[:, 0] + a[:, 2] / 2
    ay0, ay1 = a[:, 1] - a[:, 3] / 2, a[:, 1] + a[:, 3] / 2
    bx0, bx1 = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
    by0, by1 = b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2
    iw = np.clip(np.minimum(ax1[:, None], bx1[None, :]) - np.maximum(ax0[:, None], bx0[None, :]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None, :]) - np.maximum(ay0[:, None], by0[None, :]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    out = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def average_precision(true_boxes, pred_boxes, scores, *, iou_threshold=0.5, true_groups=None,
                      pred_groups=None):
    """COCO-style average precision of scored boxes (AP50 by default).

    Parameters
    ----------
    true_boxes : array_like of float, shape (n_true, 4)
        True boxes ``(x_c, y_c, w, h)``.
    pred_boxes : array_like of float, shape (n_pred, 4)
        Predicted boxes, same convention.
    scores : array_like of float, shape (n_pred,)
        Confidence of each prediction (higher = more confident); finite.
    iou_threshold : float, optional
        A prediction is a true positive if its IoU with a still-unmatched true box is ``>= iou_threshold``
        (COCO's rule). Default 0.5.
    true_groups, pred_groups : array_like of int, optional
        Image (or tile) index of each box; predictions only match true boxes of the same group. Default:
        one group.

    Returns
    -------
    float
        Mean over the 101 recall levels ``0, 0.01, ..., 1`` of the interpolated precision (the largest
        precision at any recall >= that level; 0 for levels never reached). 0.0 when there is no true box
        (undefined, reported as 0).

    Notes
    -----
    Predictions are taken in decreasing score (ties in input order); each is assigned to the unmatched true
    box of highest IoU, so no true box is claimed twice (one-to-one, greedy by score as COCO does).
    """
    tb = _as_boxes(true_boxes, "true_boxes")
    pb = _as_boxes(pred_boxes, "pred_boxes")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape[0] != pb.shape[0]:
        raise ValueError(f"scores must have one entry per predicted box, got {s.shape[0]} for {pb.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    thr = float(iou_threshold)
    if not (0.0 < thr <= 1.0):
        raise ValueError(f"iou_threshold must be in (0, 1], got {thr}")
    tg = np.zeros(len(tb), np.int64) if true_groups is None else np.asarray(true_groups).ravel()
    pg = np.zeros(len(pb), np.int64) if pred_groups is None else np.asarray(pred_groups).ravel()
    if tg.shape[0] != len(tb) or pg.shape[0] != len(pb):
        raise ValueError("true_groups / pred_groups must have one entry per box")
    n_true = len(tb)
    if n_true == 0:
        return 0.0

    members = {}
    for g in np.unique(tg):
        members[g] = np.flatnonzero(tg == g)
    taken = np.zeros(n_true, dtype=bool)
    order = np.argsort(-s, kind="stable")
    is_tp = np.zeros(len(order), dtype=bool)
    for rank, k in enumerate(order):
        cand = members.get(pg[k])
        if cand is None:
            continue
        free = cand[~taken[cand]]
        if free.size == 0:
            continue
        ious = box_iou(pb[k:k + 1], tb[free])[0]
        best = int(np.argmax(ious))
        if ious[best] >= thr:
            taken[free[best]] = True
            is_tp[rank] = True

    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    recall = tp / n_true
    precision = tp / np.maximum(tp + fp, 1)
    # interpolated precision: best precision at this or any higher recall
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
    levels = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, levels, side="left")
    reached = idx < recall.size
    interp = np.zeros(levels.size)
    interp[reached] = envelope[idx[reached]]
    return float(interp.mean())
