"""precip_cvae.neighbours: the nearest-neighbour search of the analog baseline and the memorisation check."""

from __future__ import annotations

import numpy as np
import pytest

from precip_cvae.neighbours import nearest, nearest_rmse, sq_distances


def test_sq_distances_by_hand():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [3.0, 3.0], [3.0, 4.0]])
    np.testing.assert_allclose(sq_distances(a, b), [[1.0, 18.0, 25.0], [18.0, 1.0, 0.0]])


def test_nearest_orders_ties_to_the_lower_index_and_skips_exclusions():
    b = np.array([[1.0], [-1.0], [2.0], [1.0]])  # rows 0, 1 and 3 all at distance 1 from 0
    a = np.array([[0.0], [2.0]])
    idx, d2 = nearest(a, b, 3)
    np.testing.assert_array_equal(idx, [[0, 1, 3], [2, 0, 3]])
    np.testing.assert_allclose(d2, [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    idx, _ = nearest(a, b, 2, exclude=np.array([[0, 1], [2, -1]]))
    np.testing.assert_array_equal(idx, [[3, 2], [0, 3]])
    # the same in blocks of one row
    np.testing.assert_array_equal(nearest(a, b, 3, chunk=1)[0], [[0, 1, 3], [2, 0, 3]])
    with pytest.raises(ValueError, match="k = 5 must be in 1..4"):
        nearest(a, b, 5)
    with pytest.raises(ValueError, match=r"exclude must be \(N,\) or \(N, K\) with N = 2"):
        nearest(a, b, 1, exclude=np.array([0, 1, 2]))


def test_nearest_rmse_by_hand():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [3.0, 3.0]])
    np.testing.assert_allclose(nearest_rmse(a, b), [np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(nearest_rmse(a, a, exclude_self=True), [np.sqrt(12.5)] * 2)
    np.testing.assert_allclose(nearest_rmse(a, a, exclude=np.array([-1, 1])), [0.0, np.sqrt(12.5)])
    np.testing.assert_allclose(nearest_rmse(a, b, k=2), [[np.sqrt(0.5), 3.0]] * 2)
    # a pixel missing in one field is dropped from every distance: RMSE over the other pixel only
    c = np.array([[1.0, np.nan], [3.0, 4.0]])  # pixel 0 only: 1 is 1 from b[0]; 3 is 0 from b[1]
    np.testing.assert_allclose(nearest_rmse(c, b), [1.0, 0.0])


def test_nearest_rmse_over_blocks_of_b_equals_one_block_and_reads_fields_as_indexed():
    """b compared 3 rows at a time (the k nearest merged over blocks, ties to the lower index) gives what one
    block gives, with exclusions that fall in any block; b may be an object indexed by integer arrays."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(9, 4, 5))
    b = rng.normal(size=(11, 4, 5))
    b[4] = b[7]  # a tie: the lower index wins in both
    a[2] = b[7]
    exclude = np.array([-1, 0, 4, 10, 3, -1, 8, 7, 1])

    class Lazy:  # the interface of precip_cvae.data.DayFields
        shape, ndim = b.shape, 3
        reads = []

        def __len__(self):
            return len(b)

        def __getitem__(self, idx):
            Lazy.reads.append(np.asarray(idx).tolist())
            return b[idx]

    for k in (1, 2, 3):
        whole = nearest_rmse(a.reshape(9, -1), b.reshape(11, -1), k=k, exclude=exclude)
        np.testing.assert_array_equal(nearest_rmse(a.reshape(9, -1), b.reshape(11, -1), k=k, exclude=exclude, b_rows=3),
                                      whole)
        np.testing.assert_array_equal(nearest_rmse(a.reshape(9, -1), Lazy(), k=k, exclude=exclude, b_rows=3), whole)
    assert Lazy.reads[:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]  # a pass for the valid pixels, then one more
    assert nearest_rmse(a.reshape(9, -1), b.reshape(11, -1), k=1)[2] == 0.0  # a copy of b[7] (not excluded for a[2])
