"""xfast.distributed.similarity_topk against torch.topk / a stable sort of the full score matrix."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from xfast.distributed import similarity_topk


def expected_topk(queries, keys, k):
    """Full matrix, best first, equal scores by lower key index."""
    scores = queries.double() @ keys.double().T
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def tied(n, d, seed):
    """Small integer entries: dot products are exact and many of them are equal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).double()


@pytest.mark.parametrize("k,block", [(1, 4096), (5, 7), (64, 64), (301, 50)])
def test_matches_torch_topk(k, block):
    g = torch.Generator().manual_seed(k)
    queries, keys = torch.randn(37, 16, generator=g, dtype=torch.float64), torch.randn(301, 16, generator=g,
                                                                                       dtype=torch.float64)
    scores, index = similarity_topk(queries, keys, k, block=block)
    want_scores, want_index = torch.topk(queries @ keys.T, k, dim=1)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(index, want_index)


@pytest.mark.parametrize("block", [1, 3, 16, 1000])
def test_ties_go_to_the_lower_index(block):
    queries, keys = tied(20, 4, seed=1), tied(90, 4, seed=2)
    scores, index = similarity_topk(queries, keys, 12, block=block)
    want_scores, want_index = expected_topk(queries, keys, 12)
    assert torch.equal(scores, want_scores) and torch.equal(index, want_index)
    # The case is only meaningful if ties straddle the cut and the blocks.
    full = queries @ keys.T
    assert ((full == want_scores[:, -1:]).sum(1) > (want_scores == want_scores[:, -1:]).sum(1)).any()


def test_dtypes_and_empty_queries():
    keys = torch.randn(10, 8)
    scores, index = similarity_topk(torch.randn(4, 8).bfloat16(), keys.bfloat16(), 3)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64 and scores.shape == (4, 3)
    scores, index = similarity_topk(torch.empty(0, 8), keys, 3)
    assert scores.shape == (0, 3) and index.shape == (0, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=11), "k=11 is larger than the number of keys"),
    (dict(k=0), "k must be a positive int"),
    (dict(k=2, block=0), "block must be a positive int"),
    (dict(k=2, mode="gather"), "mode must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        similarity_topk(torch.randn(4, 8), torch.randn(10, 8), **kwargs)


@pytest.mark.parametrize("queries,keys,match", [
    (torch.randn(4, 8), torch.randn(10, 7), "keys has embedding dim 7 but queries has 8"),
    (torch.randn(4, 8), torch.randn(10, 8).double(), "keys has dtype"),
    (torch.randn(8), torch.randn(10, 8), "queries must be 2-D"),
    (torch.full((4, 8), float("nan")), torch.randn(10, 8), "queries contains NaN"),
])
def test_bad_inputs(queries, keys, match):
    with pytest.raises(ValueError, match=match):
        similarity_topk(queries, keys, 2)


# Rank 2 meets the key shards in descending order (2, 1, 0): ties must still go by index.
QUERY_COUNTS, KEY_COUNTS = (5, 0, 4), (4, 0, 9)


def three_ranks(rank, world):
    queries, keys = tied(sum(QUERY_COUNTS), 4, seed=3), tied(sum(KEY_COUNTS), 4, seed=4)
    q0, k0 = sum(QUERY_COUNTS[:rank]), sum(KEY_COUNTS[:rank])
    local_queries, local_keys = queries[q0:q0 + QUERY_COUNTS[rank]], keys[k0:k0 + KEY_COUNTS[rank]]
    want_scores, want_index = expected_topk(local_queries, keys, 6)
    for mode in ("allgather", "ring"):
        for block in (2, 4096):
            scores, index = similarity_topk(local_queries, local_keys, 6, group=dist.group.WORLD, block=block,
                                            mode=mode)
            assert torch.equal(scores, want_scores) and torch.equal(index, want_index), (rank, mode, block)
        # bf16 keys (the small integers are exact in 8 bits) travel as bf16; scores in float32.
        scores, index = similarity_topk(local_queries.bfloat16(), local_keys.bfloat16(), 6, group=dist.group.WORLD,
                                        mode=mode)
        assert scores.dtype == torch.float32, (rank, mode)
        assert torch.equal(scores.double(), want_scores) and torch.equal(index, want_index), (rank, mode, "bf16")
    with pytest.raises(ValueError, match=r"k=14 is larger than the number of keys over all ranks \(13"):
        similarity_topk(local_queries, local_keys, 14, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="mode must be the same on every rank"):
        similarity_topk(local_queries, local_keys, 2, group=dist.group.WORLD, mode="ring" if rank else "allgather")
    bad = local_keys[:, :3] if rank == 2 else local_keys
    with pytest.raises(ValueError, match="invalid input on (rank 2|this rank).*keys has embedding dim 3 but queries has 4"):
        similarity_topk(local_queries, bad, 2, group=dist.group.WORLD)


@pytest.mark.multiprocess
def test_three_ranks_uneven_shards_with_ties():
    run_ranks(3, three_ranks)
