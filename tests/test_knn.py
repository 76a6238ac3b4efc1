"""The kNN engine against float64 NumPy brute force, including the paths its proof falls back on."""

import numpy as np
import pytest
import torch

from idml.evaluation.knn import MAX_SHORTLIST, knn, knn_float32


def brute_force(q: np.ndarray, r: np.ndarray, k: int, exclude_self: bool):
    """Top-k by float64 inner product, ties by smaller index (independent of idml)."""
    s = q.astype(np.float64) @ r.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_equals_float64_brute_force(k, exclude_self):
    x = unit(700, 48, 0)
    q = x if exclude_self else unit(300, 48, 1)
    sims, idx = knn(q, x, k, exclude_self=exclude_self, chunk_size=128)
    ref_s, ref_i = brute_force(q.numpy(), x.numpy(), k, exclude_self)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(sims.numpy(), ref_s, atol=1e-7)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64


def test_clustered_data_with_near_ties_is_exact():
    # Tight clusters put many candidates within bfloat16 rounding of the k-th neighbour:
    # the shortlist proof must fail for some rows and the fallbacks must still be exact.
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 64, generator=g)
    x = centres.repeat_interleave(60, 0) + 1e-3 * torch.randn(1200, 64, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    for k in (3, 30):
        _, idx = knn(x, x, k, exclude_self=True, chunk_size=256, pad=4)
        _, ref_i = brute_force(x.numpy(), x.numpy(), k, True)
        np.testing.assert_array_equal(idx.numpy(), ref_i)


def test_duplicates_found_and_self_excluded_by_index():
    x = unit(50, 16, 4)
    x = torch.cat([x, x[:10]])  # items 50..59 duplicate 0..9
    _, idx = knn(x, x, 1, exclude_self=True)
    assert (idx[:10, 0] == torch.arange(50, 60)).all()
    assert (idx[50:, 0] == torch.arange(10)).all()
    assert not (idx[:, 0] == torch.arange(60)).any()


def test_all_identical_vectors_fall_back_to_exact_rows():
    x = torch.nn.functional.normalize(torch.ones(300, 8), dim=1)
    _, idx = knn(x, x, 2, exclude_self=True, pad=1)
    expected = np.array([[1, 2]] + [[0, 1]] * 299)  # equal scores: smallest other index first
    expected[1] = [0, 2]
    np.testing.assert_array_equal(idx[:2].numpy(), expected[:2])
    np.testing.assert_array_equal(idx[2:].numpy(), np.tile([0, 1], (298, 1)))


def test_deep_search_uses_float32_scan_and_agrees():
    x = unit(800, 32, 5)
    k = MAX_SHORTLIST  # k + pad beyond the shortlist limit
    _, idx = knn(x, x, k, exclude_self=True)
    _, idx32 = knn_float32(x, x, k, exclude_self=True)
    _, ref_i = brute_force(x.numpy(), x.numpy(), k, True)
    assert (idx.numpy() == ref_i).mean() > 0.999  # float32 near-ties may swap
    np.testing.assert_array_equal(idx.numpy(), idx32.numpy())


def test_unnormalised_inputs_are_exact_too():
    x = unit(400, 24, 6) * torch.linspace(0.1, 10, 400)[:, None]
    _, idx = knn(x, x, 7, exclude_self=True)
    _, ref_i = brute_force(x.numpy(), x.numpy(), 7, True)
    np.testing.assert_array_equal(idx.numpy(), ref_i)


@pytest.mark.parametrize("bad", [
    dict(k=0), dict(k=100), dict(chunk_size=0),
])
def test_bad_arguments(bad):
    x = unit(100, 8, 7)
    args = dict(k=3, chunk_size=16) | bad
    with pytest.raises(ValueError):
        knn(x, x, args["k"], exclude_self=True, chunk_size=args["chunk_size"])
    with pytest.raises(ValueError, match="same set"):
        knn(x[:5], x, 1, exclude_self=True)


@pytest.mark.parametrize("k", [1, 6])
def test_many_column_blocks_stay_exact(k):
    x = unit(9000, 16, 9)
    q = x[:200]
    _, idx = knn(q, x, k, exclude_self=False, pad=3, chunk_size=512)
    _, ref_i = brute_force(q.numpy(), x.numpy(), k, False)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
