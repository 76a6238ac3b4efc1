"""Exact k-nearest-neighbour search by inner product, fast and memory-bounded.

Exact scoring of all pairs in float32 is the cost of every retrieval evaluation (60,502 SOP
test images: 3.7e9 dot products of 512 dimensions). Matrix products in bfloat16 run several
times faster on current CPUs and GPUs, but they are not exact. :func:`knn` uses them only to
pick candidates and proves that the candidates contain the true neighbours:

1. ``S~ = bf16(q) @ bf16(R)^T`` for a chunk of queries (products accumulate in float32; the
   result is rounded to bfloat16).
2. For each query, a rigorous bound ``|S~_j - S_j| <= delta + c |S~_j|`` holds for every
   reference ``j``: ``delta`` covers the rounding of the inputs (Cauchy-Schwarz on the actual
   residuals ``||x - bf16(x)||``) and the float32 accumulation, ``c`` the final rounding.
3. The top ``k + pad`` items by ``S~`` form the shortlist. If the best possible true score of
   the last shortlisted item is below the worst possible true score of the ``k``-th, no item
   outside the shortlist can belong to the true top ``k``. Rows where this test fails get a
   longer shortlist, and then, if needed, an exact scan of every reference.
4. The shortlist is re-scored exactly in float64 and sorted (ties by index).

So the neighbours and similarities equal an exact computation; only the candidate search
uses low precision. Memory: the bfloat16 copy of the reference, ``chunk_size``-sized blocks of
scores and the shortlists, never an ``N x N`` matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from idml.core.errors import IdmlError
from idml.method.metric import float32_region

#: Unit roundoff of bfloat16 (8 significant bits, round to nearest).
BF16_UNIT_ROUNDOFF = 2.0**-8
#: Unit roundoff of float32.
FP32_UNIT_ROUNDOFF = 2.0**-24
#: Relative slack on every bound, for the float32 norms that enter it.
_SLACK = 1.001
#: Beyond this shortlist length re-scoring gathers too many vectors; exact float32 is cheaper.
MAX_SHORTLIST = 512


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


@contextlib.contextmanager
def _full_precision_reductions(device: torch.device) -> Iterator[None]:
    """On CUDA, forbid cuBLAS from reducing bf16 products in bf16 (split-K), which the error
    bound does not cover."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved


def _check(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool,
           chunk_size: int) -> int:
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise IdmlError(
            f"expected [Q, D] and [N, D], got {tuple(query.shape)}, {tuple(reference.shape)}"
        )
    if exclude_self and query.shape[0] != reference.shape[0]:
        raise IdmlError("exclude_self=True needs query and reference to be the same set")
    available = reference.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise IdmlError(f"k={k} must be in [1, {available}]")
    if chunk_size < 1:
        raise IdmlError(f"chunk_size must be positive, got {chunk_size}")
    return available


def _sorted_top(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Top ``k`` of each row by ``scores`` (descending), ties broken by the smaller index."""
    by_index = torch.argsort(index, dim=1)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), index.gather(1, order)


def _rescore(q: torch.Tensor, reference: torch.Tensor, cand: torch.Tensor, k: int,
             needed: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of the candidates ``cand [C, L]`` of queries ``q [C, D]``; the top ``k``.

    Only the first ``needed[i]`` candidates of row ``i`` can be in its top ``k`` (the rest are
    proven out); a block of rows re-scores the longest such prefix among its rows.
    """
    dtype = _exact_dtype(q.device)
    sims, idxs = [], []
    for s in range(0, q.shape[0], block):
        c = cand[s : s + block, : max(k, int(needed[s : s + block].max()))]
        vecs = reference[c.reshape(-1)].to(dtype).view(c.shape[0], c.shape[1], -1)
        exact = torch.bmm(vecs, q[s : s + block].to(dtype).unsqueeze(2)).squeeze(2)
        top_s, top_i = _sorted_top(exact, c, k)
        sims.append(top_s)
        idxs.append(top_i)
    return torch.cat(sims), torch.cat(idxs)


def _exact_rows(q: torch.Tensor, reference: torch.Tensor, k: int, self_index: torch.Tensor | None,
                block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top ``k`` of a few rows against every reference."""
    q = q.to(_exact_dtype(q.device))
    scores = torch.cat([q @ reference[s : s + block].to(q.dtype).T
                        for s in range(0, reference.shape[0], block)], dim=1)
    if self_index is not None:
        scores[torch.arange(len(q), device=q.device), self_index] = float("-inf")
    index = torch.arange(reference.shape[0], device=q.device).expand(len(q), -1)
    return _sorted_top(scores, index, k)


def _merge_hits(top_v: torch.Tensor, top_c: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold hits ``(row, col, value)``, sorted by row as ``nonzero`` returns them, into the
    sorted top lists ``top_v``/``top_c`` ``[R, L]``."""
    num_rows, length = top_v.shape
    counts = torch.bincount(r, minlength=num_rows)
    rank = torch.arange(len(r), device=r.device) - (counts.cumsum(0) - counts)[r]
    width = int(counts.max())
    dense_v = top_v.new_full((num_rows, length + width), float("-inf"))
    dense_c = top_c.new_zeros((num_rows, length + width))
    dense_v[:, :length], dense_c[:, :length] = top_v, top_c
    dense_v[r, length + rank], dense_c[r, length + rank] = v, c
    top_v, pos = torch.topk(dense_v, length, dim=1)
    return top_v, dense_c.gather(1, pos)


def _hits_above(scores: torch.Tensor, tau: torch.Tensor, transposed: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, col, value)`` of the scores at or above their row's threshold ``tau``.

    ``transposed``: the lists belong to the *columns* of ``scores`` (``tau`` per column) and
    the triples come back in those terms, unsorted. ``scores`` stays contiguous either way (a
    transposed view makes the comparison and ``nonzero`` several times slower).
    """
    tau = tau.to(torch.bfloat16)  # exact: the thresholds are values that came from bfloat16
    mask = scores >= (tau[None, :] if transposed else tau[:, None])
    flat = mask.view(-1).nonzero().squeeze(1)
    r, c = flat // scores.shape[1], flat % scores.shape[1]
    return (c, r, scores.view(-1)[flat].float()) if transposed else \
        (r, c, scores.view(-1)[flat].float())


def _bf16_shortlists(query_b: torch.Tensor, ref_b: torch.Tensor, length: int,
                     self_index: torch.Tensor | None, row_block: int,
                     col_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``length`` of every query by the bfloat16 product: ``(values, indices)``, sorted.

    Scores are made ``row_block x col_block`` at a time, never as a full matrix. A full
    ``topk`` of every block would cost several times the product itself; instead the first
    block of a row chunk sets each row's threshold (its ``length``-th best so far) and later
    blocks only keep the scores at or above it (one comparison per score; ties kept, so no
    item left out scores above the last one kept). ``self_index[i]``: a column row ``i``
    must not return.
    """
    q, n = query_b.shape[0], ref_b.shape[0]
    vals = torch.empty(q, length, device=query_b.device)
    cand = torch.empty(q, length, dtype=torch.long, device=query_b.device)
    col_block = max(col_block, length + 1)
    for i0 in range(0, q, row_block):
        rows = query_b[i0 : i0 + row_block]
        own = None if self_index is None else self_index[i0 : i0 + row_block]
        local = torch.arange(rows.shape[0], device=rows.device)
        top_v = top_c = None
        for j0 in range(0, n, col_block):
            scores = rows @ ref_b[j0 : j0 + col_block].T
            if own is not None:
                inside = (own >= j0) & (own < j0 + scores.shape[1])
                scores[local[inside], own[inside] - j0] = float("-inf")
            if top_v is None or top_c is None:
                top_v, top_c = torch.topk(scores, length, dim=1)
                top_v = top_v.float()
            else:
                r, c, v = _hits_above(scores, top_v[:, -1])
                if len(r):
                    top_v, top_c = _merge_hits(top_v, top_c, r, c + j0, v)
        vals[i0 : i0 + row_block], cand[i0 : i0 + row_block] = top_v, top_c
    return vals, cand


def _bf16_shortlists_self(ref_b: torch.Tensor, length: int,
                          block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_bf16_shortlists` of a set against itself, self excluded, at half the products.

    The score matrix is symmetric: each ``block x block`` product above the diagonal serves
    both its rows and, transposed, its columns. A row block's lists start from a ``topk`` of
    the first block that touches it; later blocks only keep scores at or above each row's
    threshold, as in :func:`_bf16_shortlists`.
    """
    n = ref_b.shape[0]
    vals = torch.empty(n, length, device=ref_b.device)
    cand = torch.empty(n, length, dtype=torch.long, device=ref_b.device)
    blocks = len(range(0, n, block))
    started = [False] * blocks
    pending: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in
                                                                              range(blocks)]

    def flush(b: int) -> None:
        rows = slice(b * block, (b + 1) * block)
        if pending[b]:
            r, c, v = (torch.cat(parts) for parts in zip(*pending[b], strict=True))
            order = torch.argsort(r, stable=True)  # _merge_hits wants hits grouped by row
            vals[rows], cand[rows] = _merge_hits(vals[rows], cand[rows], r[order], c[order],
                                                 v[order])
            pending[b] = []

    def fold(scores: torch.Tensor, i0: int, j0: int, transposed: bool) -> None:
        """Scores of row block ``i0`` x column block ``j0`` into the lists of the rows of
        ``j0`` (``transposed``) or ``i0``."""
        first, col0 = (j0, i0) if transposed else (i0, j0)
        b = first // block
        rows = slice(first, first + scores.shape[1 if transposed else 0])
        if not started[b]:
            started[b] = True
            v, c = torch.topk(scores.T if transposed else scores, length, dim=1)
            vals[rows], cand[rows] = v.float(), c + col0
            return
        r, c, v = _hits_above(scores, vals[rows, -1], transposed)
        if len(r):
            pending[b].append((r, c + col0, v))
            if sum(len(h[0]) for h in pending[b]) > (rows.stop - rows.start) * length:
                flush(b)  # raise the thresholds now and then; merging costs per call

    for i0 in range(0, n, block):
        rows_b = ref_b[i0 : i0 + block]
        for j0 in range(i0, n, block):
            scores = rows_b @ ref_b[j0 : j0 + block].T
            if j0 == i0:
                scores.fill_diagonal_(float("-inf"))
            fold(scores, i0, j0, transposed=False)
            if j0 != i0:
                fold(scores, i0, j0, transposed=True)
        flush(i0 // block)  # row block i0 has seen every column
    return vals, cand


@torch.no_grad()
def knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    chunk_size: int = 1024,
    pad: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest neighbours of each query by inner product.

    ``query [Q, D]`` and ``reference [N, D]`` (L2-normalised for cosine similarity) on any one
    device. Returns ``(similarities [Q, k] float32, indices [Q, k] int64)`` sorted by
    decreasing similarity, ties by increasing index. With ``exclude_self=True`` query and
    reference are the same set and query ``i`` never returns index ``i`` (removed by index, so
    an exact duplicate of ``i`` is still found). Candidates come from a bfloat16 product and
    are proven complete (module docstring); ``pad`` extra candidates per query make the proof
    succeed for almost every row. Memory: a bfloat16 copy of the reference, plus
    ``O(chunk_size^2 + Q * (k + pad))``.
    """
    available = _check(query, reference, k, exclude_self, chunk_size)
    if k + pad > MAX_SHORTLIST:
        return knn_float32(query, reference, k, exclude_self=exclude_self, chunk_size=chunk_size)
    device = query.device
    query, reference = query.float(), reference.float()
    with float32_region(device), _full_precision_reductions(device):
        ref_b = reference.to(torch.bfloat16)
        query_b = ref_b if exclude_self else query.to(torch.bfloat16)
        delta = _error_bounds(query, query_b, reference, ref_b)
        length = min(available, k + pad)
        if exclude_self and reference.shape[0] > 2 * max(chunk_size, length + 1):
            vals, cand = _bf16_shortlists_self(ref_b, length, block=max(chunk_size, length + 1))
        else:
            self_index = torch.arange(query.shape[0], device=device) if exclude_self else None
            vals, cand = _bf16_shortlists(query_b, ref_b, length, self_index, chunk_size)
        exact = _exact_dtype(device)
        top = (torch.empty(query.shape[0], k, dtype=exact, device=device),
               torch.empty(query.shape[0], k, dtype=torch.long, device=device))
        pending = torch.arange(query.shape[0], device=device)
        while True:
            proven = _settle_proven(query, reference, vals, cand, delta[pending], pending, k,
                                    length >= available, chunk_size, top)
            pending = pending[~proven]
            if not len(pending):
                break
            if length * 8 > MAX_SHORTLIST:  # rare: a plateau of near-equal scores
                for s in range(0, len(pending), 256):
                    rows = pending[s : s + 256]
                    top[0][rows], top[1][rows] = _exact_rows(
                        query[rows], reference, k, rows if exclude_self else None)
                break
            length = min(available, length * 8)
            vals, cand = _bf16_shortlists(query_b[pending], ref_b, length,
                                          pending if exclude_self else None, chunk_size)
    return top[0].float(), top[1]


def _error_bounds(query: torch.Tensor, query_b: torch.Tensor, reference: torch.Tensor,
                  ref_b: torch.Tensor) -> torch.Tensor:
    """Per query (float64 ``[Q]``), a bound on how far its float32-accumulated bfloat16
    products with any reference can be from the exact ones:
    ``|bf16(q).bf16(r) - q.r| <= ||q - bf16(q)|| ||bf16(r)|| + ||q|| ||r - bf16(r)||``,
    plus the float32 accumulation error."""
    dim = reference.shape[1]
    gamma = dim * FP32_UNIT_ROUNDOFF / (1 - dim * FP32_UNIT_ROUNDOFF)  # float32 accumulation
    ref_err = (reference - ref_b.float()).norm(dim=1).max().item() * _SLACK
    ref_norm = ref_b.float().norm(dim=1).max().item() * _SLACK
    q_err = (query - query_b.float()).norm(dim=1).double() * _SLACK
    q_b_norm = query_b.float().norm(dim=1).double() * _SLACK
    q_norm = query.norm(dim=1).double() * _SLACK
    return q_err * ref_norm + q_norm * ref_err + gamma * q_b_norm * ref_norm


def _settle_proven(query: torch.Tensor, reference: torch.Tensor, vals: torch.Tensor,
                   cand: torch.Tensor, delta: torch.Tensor, pending: torch.Tensor, k: int,
                   complete: bool, chunk_size: int,
                   top: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Re-score, into ``top``, the rows of ``pending`` whose bfloat16 shortlist (``vals``,
    ``cand``) provably holds their true top ``k``; return which rows were proven.

    A row is proven when even the best possible true score of its last candidate is below the
    worst possible true score of its k-th (or when the shortlist holds every reference,
    ``complete``). Only the candidates that can still beat the k-th are re-scored.
    """
    c = BF16_UNIT_ROUNDOFF / (1 - BF16_UNIT_ROUNDOFF)  # rounding of each product to bfloat16
    v, d = vals.double(), delta[:, None]
    lower_k = v[:, k - 1 : k] - d - c * v[:, k - 1 : k].abs()
    upper = v + d + c * v.abs()  # the best possible true scores
    if complete:
        proven = torch.ones(len(pending), dtype=torch.bool, device=pending.device)
    else:
        proven = (upper[:, -1:] < lower_k).squeeze(1)
    needed = (upper[proven] >= lower_k[proven]).sum(dim=1)
    by_need = torch.argsort(needed)  # blocks of rows with similar prefix lengths
    needed, done_cand, done = needed[by_need], cand[proven][by_need], pending[proven][by_need]
    for s in range(0, len(done), chunk_size):
        part = slice(s, s + chunk_size)
        top[0][done[part]], top[1][done[part]] = _rescore(
            query[done[part]], reference, done_cand[part], k, needed[part])
    return proven


def knn_float32(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain chunked float32 scan (``torch.topk`` over each chunk of scores).

    Same contract as :func:`knn` except that near-ties (closer than float32 rounding, ~1e-7)
    may come out in either order. Used for deep searches, where re-scoring a long shortlist
    would cost more than the scan.
    """
    _check(query, reference, k, exclude_self, chunk_size)
    reference = reference.float()
    sims, idxs = [], []
    with float32_region(query.device):
        for start in range(0, query.shape[0], chunk_size):
            chunk = query[start : start + chunk_size].float()
            sim = chunk @ reference.T
            if exclude_self:
                rows = torch.arange(chunk.shape[0], device=sim.device)
                sim[rows, rows + start] = float("-inf")
            s, i = torch.topk(sim, k, dim=1, largest=True, sorted=True)
            sims.append(s)
            idxs.append(i)
    return torch.cat(sims), torch.cat(idxs).long()
