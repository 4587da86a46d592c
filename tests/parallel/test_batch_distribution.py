"""Each rank receives exactly its data-parallel share of the step, as tensors, over gloo (4 processes): the
TP/PP/CP peers of a data-parallel rank get the same share, and no rank receives another replica's samples."""

import pytest
import torch
import torch.distributed as dist

from megatron_dapo.parallel.state import ParallelDims, init_parallel
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.distribute import distribute_batch, encode
from tests.helpers.batches import random_groups
from tests.helpers.distributed_pool import DistributedPool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(world_size=4) as p:
        yield p


def receive_share(dims: ParallelDims, seed: int) -> dict:
    pg = init_parallel(dims)
    # Every rank draws the same step, to compare with; only rank 0's shards are sent.
    batch = StepBatch.from_groups(random_groups(8, 4, seed=seed, max_response=30), scale_by_std=True)
    layout = dict(samples_per_minibatch=16, tokens_per_microbatch=64, cp=dims.cp, pad_multiple=2 * dims.cp)
    shares = batch.shard(dp_size=pg.dp.size(), **layout)
    share = distribute_batch(shares if dist.get_rank() == 0 else None, pg)
    expected = shares[pg.dp.rank()]
    got_header, got_buffer = encode(share)
    want_header, want_buffer = encode(expected)
    return {
        "dp_rank": pg.dp.rank(),
        "equal": torch.equal(got_header, want_header) and torch.equal(got_buffer, want_buffer),
        "samples": len(share.data),
        "bytes": got_buffer.numel(),
        "step_bytes": sum(encode(s)[1].numel() for s in shares),
    }


@pytest.mark.parametrize(
    "dims",
    [ParallelDims(), ParallelDims(tp=2), ParallelDims(pp=2), ParallelDims(cp=2), ParallelDims(tp=2, pp=2)],
    ids=["dp4", "tp2-dp2", "pp2-dp2", "cp2-dp2", "tp2-pp2"],
)
def test_every_rank_receives_its_own_share(pool, dims):
    seed = int(torch.randint(0, 2**31, (1,)))
    results = pool.run(receive_share, dims, seed)
    assert all(r["equal"] for r in results)
    dp_size = 4 // dims.model_parallel_size
    assert sorted({r["dp_rank"] for r in results}) == list(range(dp_size))
    assert sum(r["samples"] for r in results) == 32 * dims.model_parallel_size  # each share once per peer
    for r in results:  # a rank receives its replica's share, not the step
        assert r["bytes"] < r["step_bytes"] or dp_size == 1
