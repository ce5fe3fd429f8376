"""Property and regression tests of deepmosaic.pipeline.metrics (run with ``-W error``)."""
from __future__ import annotations

import itertools
import json
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from deepmosaic.pipeline import metrics as M

FAST = settings(max_examples=60, deadline=None)

mask_shapes = st.tuples(st.integers(1, 7), st.integers(1, 7))


@st.composite
def mask_pairs(draw):
    shape = draw(mask_shapes)
    a = draw(hnp.arrays(bool, shape))
    b = draw(hnp.arrays(bool, shape))
    return a, b


@st.composite
def label_pairs(draw, max_label=5):
    shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
    t = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, max_label)))
    p = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, max_label)))
    return t, p


def positions(max_n=4, hi=6.0):
    return st.integers(0, max_n).flatmap(
        lambda n: hnp.arrays(np.float64, (n, 2), elements=st.floats(0, hi, allow_nan=False, width=32)))


def _oracle_iou(a, b):
    sa = {idx for idx in zip(*np.nonzero(a))}
    sb = {idx for idx in zip(*np.nonzero(b))}
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def _relabel(labels, seed):
    """Map every nonzero id to a distinct random (large) id; return the new map and the mapping."""
    rng = np.random.default_rng(seed)
    ids = np.unique(labels[labels != 0])
    new = rng.choice(10**6, size=ids.size, replace=False) + 10**12
    lut = dict(zip(ids.tolist(), new.tolist()))
    out = np.zeros(labels.shape, dtype=np.int64)
    for old, nw in lut.items():
        out[labels == old] = nw
    return out, lut


# ------------------------------------------------------------------------------------------------ iou

@FAST
@given(hnp.arrays(bool, mask_shapes))
def test_iou_self_is_one_including_empty(a):
    assert M.iou(a, a) == 1.0


def test_iou_both_empty_is_one_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.iou(np.zeros((4, 4)), np.zeros((4, 4), np.uint8)) == 1.0
        assert M.iou(np.zeros((0,)), np.zeros((0,))) == 1.0
        assert M.iou(np.zeros((3, 3)), np.ones((3, 3))) == 0.0
        np.testing.assert_array_equal(M.stamp_iou(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))), [1.0, 1.0])


@FAST
@given(mask_pairs())
def test_iou_disjoint_is_zero(pair):
    a, b = pair
    b = b & ~a
    if a.any() or b.any():
        assert M.iou(a, b) == 0.0


@FAST
@given(mask_pairs())
def test_iou_symmetric_bounded_and_matches_set_definition(pair):
    a, b = pair
    v = M.iou(a, b)
    assert v == M.iou(b, a)
    assert 0.0 <= v <= 1.0
    assert v == pytest.approx(_oracle_iou(a, b))


@FAST
@given(mask_pairs(), st.sampled_from([np.uint8, np.int32, np.int64, np.float32, np.float64]))
def test_iou_dtype_invariance(pair, dtype):
    a, b = pair
    assert M.iou(a.astype(dtype), b.astype(dtype)) == M.iou(a, b)
    # any nonzero value is "in": a float mask scaled by 2.5 gives the same IoU
    assert M.iou(a * 2.5, b.astype(np.uint8)) == M.iou(a, b)


def test_iou_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        M.iou(np.zeros((3, 3)), np.zeros((3, 4)))


def test_iou_rejects_nan_mask():
    with pytest.raises(ValueError, match="NaN"):
        M.iou(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))


# ------------------------------------------------------------------ regressions for STYLE.md defects

def test_regression_bool_addition_union_039_not_064():
    # |A n B| = 39, |A u B| = 100: the true IoU is 0.39; adding booleans gives 39 / 61 = 0.64
    a = np.zeros(200, dtype=np.float32)
    b = np.zeros(200, dtype=np.float32)
    a[:70] = 1.0
    b[31:100] = 1.0
    assert np.count_nonzero(a * b) == 39 and np.count_nonzero(a + b) == 100
    assert M.iou(a, b) == pytest.approx(0.39)
    assert M.iou(a, b) != pytest.approx(39 / 61)
    np.testing.assert_allclose(M.stamp_iou(a[None], b[None]), [0.39])


def test_regression_perfect_prediction_is_one_not_division_by_zero():
    a = np.zeros((8, 8), dtype=np.float64)
    a[2:5, 3:7] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.iou(a, a.copy()) == 1.0
        assert M.stamp_iou(a[None], a[None].copy())[0] == 1.0
        t = a.astype(np.int64)
        _, _, m = M.label_iou_matrix(t, t.copy(), dense=True)
        assert m[0, 0] == 1.0


def test_regression_iou_compares_truth_with_prediction_not_itself():
    t = np.zeros((2, 6, 6), bool)
    p = np.zeros((2, 6, 6), bool)
    t[0, :3] = True
    p[0, 3:] = True          # disjoint: 0
    t[1, :4] = True
    p[1, :2] = True          # half: 0.5
    np.testing.assert_allclose(M.stamp_iou(t, p), [0.0, 0.5])
    assert M.iou(t[0], p[0]) == 0.0
    _, _, m = M.label_iou_matrix(t[1].astype(int), p[1].astype(int) * 2, dense=True)
    np.testing.assert_allclose(m, [[0.5]])


def test_regression_true_positives_never_count_unmatched():
    # two detections near one true object: only one can be a true positive
    truth = {"x": np.array([10.0, 50.0]), "y": np.array([10.0, 50.0])}
    pred = {"x": np.array([10.3, 9.8, 80.0]), "y": np.array([10.0, 10.1, 80.0])}
    table, summary, _ = M.evaluate_catalog(truth, pred, max_sep=2.0)
    assert summary["n_tp"] == 1
    assert summary["completeness"] == 0.5
    assert summary["purity"] == pytest.approx(1 / 3)
    assert table["matched"].sum() == 1
    with pytest.raises(ValueError, match="one-to-one"):
        M.detection_scores(2, 3, 3)


def test_regression_greedy_double_claim_is_impossible():
    ti, pi, d = M.match_positions([[0.0, 0.0]], [[0.5, 0.0], [-0.5, 0.0], [0.0, 0.4]], 1.0)
    assert len(ti) == 1 and pi[0] == 2 and d[0] == pytest.approx(0.4)


def test_regression_flux_residual_uses_each_pairs_own_truth():
    # predictions in a shuffled order: residuals must pair each prediction with its own true object,
    # never with an index taken from a sorted or sub-array
    rng = np.random.default_rng(3)
    n = 50
    tx, ty = rng.uniform(0, 500, n), rng.uniform(0, 500, n)
    tflux = rng.uniform(10, 1000, n)
    perm = rng.permutation(n)
    frac = rng.uniform(-0.2, 0.2, n)          # residual intended for each true object
    pred = {"x": tx[perm] + 0.01, "y": ty[perm], "flux": tflux[perm] * (1 + frac[perm]),
            "id": np.arange(100, 100 + n)}
    truth = {"x": tx, "y": ty, "flux": tflux, "id": np.arange(1, n + 1)}
    table, summary, _ = M.evaluate_catalog(truth, pred, max_sep=0.5)
    assert summary["n_tp"] == n
    np.testing.assert_allclose(table["flux_residual"][:n], frac, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(table["pred_index"][:n], np.argsort(perm))
    assert summary["median_abs_flux_residual"] == pytest.approx(np.median(np.abs(frac)))


# --------------------------------------------------------------------------------------- stamp_iou

@FAST
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(hnp.arrays(bool, (n, 4, 5)), hnp.arrays(bool, (n, 4, 5)))))
def test_stamp_iou_equals_per_stamp_iou(stacks):
    t, p = stacks
    got = M.stamp_iou(t.astype(np.uint8), p.astype(np.float32))
    assert got.shape == (t.shape[0],) and got.dtype == np.float64
    np.testing.assert_allclose(got, [M.iou(a, b) for a, b in zip(t, p)])


def test_stamp_iou_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        M.stamp_iou(np.zeros((2, 3, 3)), np.zeros((3, 3, 3)))


# -------------------------------------------------------------------------------- label_iou_matrix

@FAST
@given(label_pairs())
def test_label_iou_matrix_matches_per_label_iou(pair):
    t, p = pair
    tids, pids, m = M.label_iou_matrix(t, p, dense=True)
    np.testing.assert_array_equal(tids, np.unique(t[t != 0]))
    np.testing.assert_array_equal(pids, np.unique(p[p != 0]))
    expected = np.array([[M.iou(t == i, p == j) for j in pids] for i in tids]).reshape(len(tids), len(pids))
    np.testing.assert_allclose(m, expected)
    _, _, ms = M.label_iou_matrix(t, p)
    np.testing.assert_allclose(ms.toarray(), m)


@FAST
@given(label_pairs(), st.integers(0, 2**32 - 1))
def test_label_iou_matrix_invariant_to_relabelling(pair, seed):
    t, p = pair
    t2, lut_t = _relabel(t, seed)
    p2, lut_p = _relabel(p, seed + 1)
    tids, pids, m = M.label_iou_matrix(t, p, dense=True)
    tids2, pids2, m2 = M.label_iou_matrix(t2, p2, dense=True)
    # the same IoU for every (old id, old id) pair after renaming
    row = {v: k for k, v in enumerate(tids2.tolist())}
    col = {v: k for k, v in enumerate(pids2.tolist())}
    for i, a in enumerate(tids.tolist()):
        for j, b in enumerate(pids.tolist()):
            assert m2[row[lut_t[a]], col[lut_p[b]]] == pytest.approx(m[i, j])


@FAST
@given(label_pairs(), st.integers(0, 2**32 - 1), st.sampled_from([0.5, 0.2, 0.0]))
def test_match_masks_invariant_to_relabelling_and_one_to_one(pair, seed, thr):
    t, p = pair
    t2, lut_t = _relabel(t, seed)
    p2, lut_p = _relabel(p, seed + 7)
    a_t, a_p, a_iou = M.match_masks(t, p, thr)
    b_t, b_p, b_iou = M.match_masks(t2, p2, thr)
    assert len(set(a_t.tolist())) == len(a_t) and len(set(a_p.tolist())) == len(a_p)
    assert np.all(a_iou > thr)
    np.testing.assert_allclose(np.sort(a_iou), np.sort(b_iou))
    assert a_iou.sum() == pytest.approx(b_iou.sum())
    if thr >= 0.5:   # unique by construction: the very same pairs after renaming
        assert {(lut_t[i], lut_p[j]) for i, j in zip(a_t.tolist(), a_p.tolist())} == \
            set(zip(b_t.tolist(), b_p.tolist()))


@FAST
@given(label_pairs(max_label=4), st.sampled_from([0.0, 0.1, 0.3]))
def test_match_masks_low_threshold_maximises_summed_iou(pair, thr):
    t, p = pair
    tids, pids, m = M.label_iou_matrix(t, p, dense=True)
    _, _, ious = M.match_masks(t, p, thr)
    best = 0.0
    for perm in itertools.permutations(range(max(len(pids), len(tids))), len(tids)):
        s = sum(m[i, j] for i, j in enumerate(perm) if j < len(pids) and m[i, j] > thr)
        best = max(best, s)
    assert ious.sum() == pytest.approx(best)


@settings(max_examples=30, deadline=None)
@given(label_pairs(max_label=6), st.sampled_from([0.0, 0.1]))
def test_match_masks_sparse_solver_agrees_with_dense(pair, thr):
    t, p = pair
    dense = M.match_masks(t, p, thr)
    old = M._DENSE_LIMIT
    try:
        M._DENSE_LIMIT = 0
        sp = M.match_masks(t, p, thr)
    finally:
        M._DENSE_LIMIT = old
    assert len(set(sp[0].tolist())) == len(sp[0]) and len(set(sp[1].tolist())) == len(sp[1])
    assert sp[2].sum() == pytest.approx(dense[2].sum())


def test_label_maps_reject_floats_and_negative_ids():
    with pytest.raises(TypeError, match="integer"):
        M.label_iou_matrix(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=">= 0"):
        M.label_iou_matrix(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="same shape"):
        M.match_masks(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_label_iou_matrix_empty_maps():
    tids, pids, m = M.label_iou_matrix(np.zeros((3, 3), int), np.zeros((3, 3), int))
    assert tids.size == 0 and pids.size == 0 and m.shape == (0, 0)
    mt, mp, mi = M.match_masks(np.zeros((3, 3), int), np.ones((3, 3), int))
    assert mt.size == mp.size == mi.size == 0


def test_label_iou_matrix_hand_example():
    t = np.array([[1, 1, 0, 0],
                  [1, 1, 0, 2],
                  [0, 0, 0, 2]])
    p = np.array([[9, 9, 9, 0],
                  [9, 9, 0, 0],
                  [0, 0, 0, 4]])
    tids, pids, m = M.label_iou_matrix(t, p, dense=True)
    np.testing.assert_array_equal(tids, [1, 2])
    np.testing.assert_array_equal(pids, [4, 9])
    np.testing.assert_allclose(m, [[0.0, 4 / 5], [1 / 2, 0.0]])
    mt, mp, mi = M.match_masks(t, p)
    np.testing.assert_array_equal(mt, [1])     # 2-4 has IoU exactly 0.5: not > 0.5
    np.testing.assert_array_equal(mp, [9])
    np.testing.assert_allclose(mi, [0.8])


# --------------------------------------------------------------------------------- match_positions

def _oracle_match(t, p, max_sep):
    """Brute force: most pairs within max_sep, then least summed distance."""
    d = np.hypot(*(t[:, None, :] - p[None, :, :]).transpose(2, 0, 1)) if len(t) and len(p) else None
    best = (0, 0.0)
    if d is None:
        return best
    slots = list(range(len(p))) + [None] * len(t)
    for choice in set(itertools.permutations(slots, len(t))):
        pairs = [(i, j) for i, j in enumerate(choice) if j is not None]
        if any(d[i, j] > max_sep for i, j in pairs):
            continue
        key = (len(pairs), -sum(d[i, j] for i, j in pairs))
        if (key[0], key[1]) > (best[0], -best[1]):
            best = (key[0], -key[1])
    return best


def _check_matching(t, p, max_sep, ti, pi, d):
    assert ti.dtype == np.int64 and pi.dtype == np.int64 and d.dtype == np.float64
    assert len(set(ti.tolist())) == len(ti), "a true object was claimed twice"
    assert len(set(pi.tolist())) == len(pi), "a prediction was used twice"
    assert np.all(d <= max_sep)
    if len(ti):
        np.testing.assert_allclose(d, np.hypot(*(t[ti] - p[pi]).T))
        assert np.all(np.diff(ti) > 0)


@settings(max_examples=80, deadline=None)
@given(positions(), positions(), st.sampled_from([0.5, 1.5, 3.0]))
def test_match_positions_is_optimal_one_to_one(t, p, max_sep):
    ti, pi, d = M.match_positions(t, p, max_sep)
    _check_matching(t, p, max_sep, ti, pi, d)
    n_best, sum_best = _oracle_match(t, p, max_sep)
    assert len(ti) == n_best
    assert d.sum() == pytest.approx(sum_best, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(positions(max_n=4, hi=3.0), positions(max_n=4, hi=3.0), st.sampled_from([1.0, 2.0]))
def test_match_positions_sparse_solver_agrees_with_dense(t, p, max_sep):
    dense = M.match_positions(t, p, max_sep)
    old = M._DENSE_LIMIT
    try:
        M._DENSE_LIMIT = 0      # every multi-pair component goes to the sparse solver
        sp = M.match_positions(t, p, max_sep)
    finally:
        M._DENSE_LIMIT = old
    _check_matching(t, p, max_sep, *sp)
    assert len(sp[0]) == len(dense[0])
    assert sp[2].sum() == pytest.approx(dense[2].sum(), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.sampled_from([2.0, 30.0]))
def test_match_positions_recovers_shuffled_copy(n, seed, max_sep):
    rng = np.random.default_rng(seed)
    # jittered grid: true objects >= 3 px apart, predictions within 0.3 px of their own object
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)[:n] * 5.0
    t = grid + rng.uniform(-1, 1, (n, 2))
    perm = rng.permutation(n)
    p = t[perm] + rng.uniform(-0.2, 0.2, (n, 2))
    ti, pi, d = M.match_positions(t, p, max_sep)
    assert len(ti) == n
    np.testing.assert_array_equal(perm[pi], ti)


@FAST
@given(positions(max_n=5, hi=10.0), positions(max_n=5, hi=10.0), st.floats(0.1, 4.0))
def test_match_positions_drops_pairs_beyond_max_sep(t, p, max_sep):
    ti, pi, d = M.match_positions(t, p, max_sep)
    assert np.all(d <= max_sep)
    # nothing left unmatched that could still pair up within max_sep
    free_t = np.setdiff1d(np.arange(len(t)), ti)
    free_p = np.setdiff1d(np.arange(len(p)), pi)
    if free_t.size and free_p.size:
        gap = np.hypot(*(t[free_t][:, None] - p[free_p][None]).transpose(2, 0, 1))
        assert gap.min() > max_sep


def test_match_positions_beats_greedy_nearest_neighbour():
    # T1 - P1 is the closest pair; greedy takes it and strands both T2 and P2
    t = np.array([[0.0, 0.0], [1.6, 0.0]])
    p = np.array([[0.5, 0.0], [-1.2, 0.0]])
    ti, pi, d = M.match_positions(t, p, 1.5)
    np.testing.assert_array_equal(ti, [0, 1])
    np.testing.assert_array_equal(pi, [1, 0])
    np.testing.assert_allclose(d, [1.2, 1.1])


def test_match_positions_never_takes_far_pair_over_near_one():
    # Hungarian on raw distances would pick T1-P1 + T2-P2 (1.0 + 8.1) and then drop the far pair, losing
    # the 0.9 pair; candidates restricted to max_sep keep the nearer of the two possible pairs
    t = np.array([[0.0, 0.0], [1.9, 0.0]])
    p = np.array([[1.0, 0.0], [10.0, 0.0]])
    ti, pi, d = M.match_positions(t, p, 1.5)
    np.testing.assert_array_equal(ti, [1])
    np.testing.assert_array_equal(pi, [0])
    np.testing.assert_allclose(d, [0.9])


def test_match_positions_edge_cases():
    e = M.match_positions(np.zeros((0, 2)), [[1.0, 1.0]], 2.0)
    assert all(a.size == 0 for a in e)
    e = M.match_positions([[1.0, 1.0]], [], 2.0)
    assert all(a.size == 0 for a in e)
    ti, pi, d = M.match_positions([[0.0, 0.0]], [[2.0, 0.0]], 2.0)   # inclusive boundary
    assert len(ti) == 1
    ti, pi, d = M.match_positions([[np.nan, 0.0], [5.0, 5.0]], [[5.0, 5.0]], 2.0)
    np.testing.assert_array_equal(ti, [1])
    ti, pi, d = M.match_positions([[1.0, 1.0]], [[1.0, 1.0]], 0.0)    # identical positions, zero distance
    assert len(ti) == 1 and d[0] == 0.0
    with pytest.raises(ValueError, match="max_sep"):
        M.match_positions([[0.0, 0.0]], [[0.0, 0.0]], -1.0)
    with pytest.raises(ValueError, match="shape"):
        M.match_positions([0.0, 1.0], [[0.0, 0.0]], 1.0)


def test_match_positions_scale_1e4_per_side():
    rng = np.random.default_rng(0)
    n = 10_000
    t = rng.uniform(0, 1000, (n, 2))
    perm = rng.permutation(n)
    p = t[perm] + rng.normal(0, 0.05, (n, 2))
    start = time.perf_counter()
    ti, pi, d = M.match_positions(t, p, 2.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"matching 1e4 x 1e4 took {elapsed:.1f} s"
    assert len(ti) == n and np.mean(perm[pi] == ti) > 0.999
    # a crowded case (one huge connected component) goes through the sparse solver
    start = time.perf_counter()
    ti, pi, d = M.match_positions(t, p, 25.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"crowded matching took {elapsed:.1f} s"
    assert len(ti) == n and np.all(perm[pi] == ti)


def test_label_iou_matrix_scale():
    rng = np.random.default_rng(1)
    side = 2000
    cells = 20   # 100 x 100 grid of 20 px cells, ~1e4 labels
    t = (np.arange(side)[:, None] // cells) * (side // cells) + (np.arange(side)[None, :] // cells) + 1
    t = np.where(rng.random((side, side)) < 0.9, t, 0).astype(np.int64)
    shifted = np.roll(t, 3, axis=1)
    p = np.where(shifted > 0, shifted * 3 + 10**9, 0)   # huge ids: the compacting path
    start = time.perf_counter()
    tids, pids, m = M.label_iou_matrix(t, p)
    mt, mp, mi = M.match_masks(t, p)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    assert len(tids) == 10_000 and m.shape == (10_000, len(pids))
    assert len(mt) == 10_000 and np.all(mi > 0.5)


# --------------------------------------------------------------------------------------- scores

def test_detection_scores_hand_example():
    s = M.detection_scores(10, 8, 6)
    assert s["completeness"] == 0.6
    assert s["purity"] == 0.75
    assert s["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert s["f1"] == pytest.approx(12 / 18)
    assert (s["n_fp"], s["n_fn"]) == (2, 4)


def test_detection_scores_undefined_is_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = M.detection_scores(0, 0, 0)
        assert s["completeness"] == s["purity"] == s["f1"] == 0.0
        s = M.detection_scores(5, 0, 0)
        assert s["purity"] == 0.0 and s["completeness"] == 0.0
    with pytest.raises(ValueError):
        M.detection_scores(-1, 2, 0)


def test_panoptic_quality_hand_example():
    # TP = 3 (IoUs 0.9, 0.8, 0.7), n_true = 4, n_pred = 5: PQ = 2.4 / (3 + 1 + 0.5) = 2.4 / 4.5
    pq = M.panoptic_quality([0.9, 0.8, 0.7], 4, 5)
    assert pq == pytest.approx(2.4 / 4.5)
    f1 = M.detection_scores(4, 5, 3)["f1"]
    assert pq == pytest.approx(0.8 * f1)
    assert M.panoptic_quality([], 0, 0) == 0.0
    assert M.panoptic_quality([1.0, 1.0], 2, 2) == 1.0
    with pytest.raises(ValueError):
        M.panoptic_quality([0.5, 0.5, 0.5], 2, 5)


@FAST
@given(st.lists(st.floats(0, 1), max_size=6), st.integers(0, 4), st.integers(0, 4))
def test_panoptic_quality_is_mean_iou_times_f1(ious, extra_t, extra_p):
    n_tp = len(ious)
    n_true, n_pred = n_tp + extra_t, n_tp + extra_p
    pq = M.panoptic_quality(ious, n_true, n_pred)
    f1 = M.detection_scores(n_true, n_pred, n_tp)["f1"]
    expected = (np.mean(ious) if ious else 0.0) * f1
    assert pq == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= pq <= 1.0


def test_flux_residuals_hand_and_nan_safe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = M.flux_residuals([11.0, 9.0, 5.0, 1.0, np.inf, 3.0], [10.0, 10.0, 0.0, -2.0, 1.0, np.nan])
    np.testing.assert_allclose(r[:2], [0.1, -0.1])
    assert np.isnan(r[2:]).all()


def test_binned_scores_hand_example():
    values = np.array([18.0, 18.5, 19.2, 19.9, 20.5, 21.0, np.nan, 25.0])
    matched = np.array([True, True, True, False, False, False, True, True])
    out = M.binned_scores(values, matched, [18, 19, 20, 21])
    np.testing.assert_array_equal(out["n"], [2, 2, 2])
    np.testing.assert_array_equal(out["n_matched"], [2, 1, 0])
    np.testing.assert_allclose(out["fraction"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(out["centres"], [18.5, 19.5, 20.5])
    assert out["n_outside"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = M.binned_scores(values, matched, [30, 31, 32])
    np.testing.assert_array_equal(empty["n"], [0, 0])
    assert np.isnan(empty["fraction"]).all()
    even = M.binned_scores([1.0, 2.0, 3.0], [True, False, True], 2)
    np.testing.assert_allclose(even["edges"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(even["n"], [1, 2])


# ------------------------------------------------------------------------------- evaluate_catalog

def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_evaluate_catalog_hand_example_with_segmaps():
    shape = (40, 60)
    truth = {"id": np.array([1, 2, 3]), "x": np.array([10.0, 30.0, 50.0]), "y": np.array([10.0, 20.0, 30.0]),
             "flux": np.array([100.0, 200.0, 50.0]), "mag": np.array([20.0, 21.0, 24.0]),
             "snr": np.array([50.0, 20.0, 3.0]), "blendedness": np.array([0.0, 0.1, 0.5])}
    pred = {"id": np.array([7, 5, 9]), "x": np.array([30.5, 10.0, 5.0]), "y": np.array([20.0, 10.5, 35.0]),
            "flux": np.array([180.0, 110.0, 10.0])}
    tseg = np.zeros(shape, np.int32)
    pseg = np.zeros(shape, np.int32)
    tseg[_disc(shape, 10, 10, 4)] = 1
    tseg[_disc(shape, 20, 30, 4)] = 2
    tseg[_disc(shape, 30, 50, 3)] = 3
    pseg[_disc(shape, 10, 10, 4)] = 5          # perfect mask for truth 1
    pseg[_disc(shape, 20, 32, 4)] = 7          # shifted by 2 px for truth 2
    pseg[_disc(shape, 35, 5, 2)] = 9           # spurious
    table, summary, curves = M.evaluate_catalog(truth, pred, max_sep=2.0, truth_seg=tseg, pred_seg=pseg,
                                                bins={"mag": [19, 22, 25], "snr": [0, 10, 100]})
    iou_2 = M.iou(tseg == 2, pseg == 7)
    np.testing.assert_array_equal(table["truth_id"], [1, 2, 3, -1])
    np.testing.assert_array_equal(table["pred_id"], [5, 7, -1, 9])
    np.testing.assert_array_equal(table["pred_index"], [1, 0, -1, 2])
    np.testing.assert_array_equal(table["matched"], [True, True, False, False])
    np.testing.assert_allclose(table["distance"][:2], [0.5, 0.5])
    np.testing.assert_allclose(table["iou"][:2], [1.0, iou_2])
    assert np.isnan(table["iou"][2:]).all()
    np.testing.assert_allclose(table["flux_residual"][:2], [0.1, -0.1])
    assert summary["n_true"] == 3 and summary["n_pred"] == 3 and summary["n_tp"] == 2
    assert summary["completeness"] == pytest.approx(2 / 3) and summary["purity"] == pytest.approx(2 / 3)
    assert summary["mean_iou"] == pytest.approx((1 + iou_2) / 2)
    assert summary["pq"] == pytest.approx(summary["mean_iou"] * summary["f1"])
    assert summary["median_abs_flux_residual"] == pytest.approx(0.1)
    assert iou_2 > 0.5
    assert summary["mask_n_tp"] == 2 and summary["mask_n_true"] == 3 and summary["mask_n_pred"] == 3
    assert summary["mask_pq"] == pytest.approx((1 + iou_2) / 3)
    json.dumps(summary, allow_nan=False)
    comp = curves["completeness"]
    assert set(comp) == {"mag", "snr", "blendedness"} and curves["purity"] == {}
    np.testing.assert_array_equal(comp["mag"]["n"], [2, 1])
    np.testing.assert_allclose(comp["mag"]["fraction"], [1.0, 0.0])
    np.testing.assert_allclose(comp["snr"]["fraction"], [0.0, 1.0])


def test_evaluate_catalog_without_segmaps_and_empty():
    truth = {"x": np.array([1.0]), "y": np.array([1.0])}
    table, summary, curves = M.evaluate_catalog(truth, {"x": np.zeros(0), "y": np.zeros(0)})
    assert summary["n_tp"] == 0 and summary["purity"] == 0.0 and summary["mean_iou"] is None
    assert summary["pq"] is None and summary["median_abs_flux_residual"] is None
    assert np.isnan(table["iou"]).all()
    json.dumps(summary, allow_nan=False)
    table, summary, _ = M.evaluate_catalog({"x": [], "y": []}, {"x": [], "y": []})
    assert summary["f1"] == 0.0 and table["truth_id"].size == 0
    with pytest.raises(ValueError, match="both"):
        M.evaluate_catalog(truth, truth, truth_seg=np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="'id'"):
        M.evaluate_catalog(truth, truth, truth_seg=np.zeros((2, 2), int), pred_seg=np.zeros((2, 2), int))


# ---------------------------------------------------------------------------------------- boxes / AP

def test_box_iou_hand_values():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(M.box_iou(a, b), [[2 / 6, 1.0, 0.0, 0.0]])
    assert M.box_iou(a, np.zeros((0, 4))).shape == (1, 0)


def test_average_precision_hand_example():
    truth = np.array([[10.0, 10.0, 4.0, 4.0], [30.0, 30.0, 4.0, 4.0]])
    pred = np.array([[10.0, 10.5, 4.0, 4.0],    # TP (truth 0), score 0.9
                     [50.0, 50.0, 4.0, 4.0],    # FP, score 0.8
                     [30.5, 30.0, 4.0, 4.0],    # TP (truth 1), score 0.7
                     [10.0, 10.0, 4.0, 4.0]])   # duplicate of truth 0: FP, score 0.6
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # recall 0.5, 0.5, 1, 1; precision 1, 1/2, 2/3, 1/2: interpolated 1 up to recall 0.5 (51 levels), 2/3 after
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert M.average_precision(truth, pred, scores) == pytest.approx(expected)
    assert M.average_precision(truth, pred[[0, 2]], [0.9, 0.8]) == 1.0
    assert M.average_precision(truth, np.zeros((0, 4)), []) == 0.0
    assert M.average_precision(np.zeros((0, 4)), pred, scores) == 0.0
    # groups: the same boxes in another image never match
    assert M.average_precision(truth, pred[[0, 2]], [0.9, 0.8], true_groups=[0, 0], pred_groups=[1, 1]) == 0.0


def test_average_precision_one_to_one_by_score():
    truth = np.array([[0.0, 0.0, 2.0, 2.0]])
    pred = np.array([[0.0, 0.0, 2.0, 2.0], [0.1, 0.0, 2.0, 2.0]])
    # the higher-scored (worse-fitting) box claims the truth; the better one is then a false positive
    ap = M.average_precision(truth, pred, [0.5, 0.9])
    assert ap == 1.0            # recall 1 at rank 1 with precision 1
    ap_low = M.average_precision(truth, pred[[1, 0]], [0.1, 0.9])
    assert ap_low == 1.0
    pred_bad = np.array([[5.0, 5.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    assert M.average_precision(truth, pred_bad, [0.9, 0.5]) == pytest.approx(0.5)


def test_roc_auc():
    from deepmosaic.pipeline.metrics import roc_auc
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 2, 3], [0, 1, 1]) == 1.0 and roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5                   # ties count half
    assert np.isnan(roc_auc([1, 2], [1, 1]))
    with pytest.raises(ValueError, match="one label per score"):
        roc_auc([1, 2, 3], [0, 1])
