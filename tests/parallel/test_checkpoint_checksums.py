"""Checkpoint checksums with two ranks (gloo): each rank writes files of its own, the manifest covers all of
them (each rank hashes a share), and a bad file that only the other rank checks at resume stops both."""

import os
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_dapo.checkpoint.manifest import MANIFEST, CorruptCheckpointError, read_manifest
from megatron_dapo.checkpoint.rl_state import RLState, begin_save, finish_save, save_rl_state
from megatron_dapo.trainer.policy.checkpointing import gather_checksums, resume_point
from tests.helpers.distributed_pool import DistributedPool

pytestmark = pytest.mark.slow


def save_corrupt_and_resume(root: Path) -> dict:
    """The save protocol of trainer/checkpointing.py with stand-in shards; then rank 0 damages its own shard,
    which rank 1 checks at resume (files are dealt out largest first: rank 1's shard to rank 0, rank 0's to
    rank 1). Returns the manifest's files, the intact resume point and the error each rank raised."""
    rank = dist.get_rank()
    tmp = [begin_save(root, 10) if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    ckpt = Path(tmp[0])
    (ckpt / f"shard_rank{rank}.bin").write_bytes(os.urandom(100_000 * (rank + 1)))
    save_rl_state(ckpt, RLState(step=10, loader={}, sampler={}, scheduler={}), rank=rank)
    dist.barrier()  # every rank's files are closed
    checksums = gather_checksums(ckpt)
    final = [finish_save(ckpt, checksums) if rank == 0 else None]
    dist.broadcast_object_list(final, src=0)
    result = {"files": sorted(read_manifest(final[0])), "intact": resume_point(root, fallback=False)}
    if rank == 0:
        with (final[0] / "shard_rank0.bin").open("r+b") as shard:
            shard.seek(5_000)
            shard.write(b"\xff" * 50_000)
    dist.barrier()
    try:
        resume_point(root, fallback=False)
    except CorruptCheckpointError as error:
        result["error"] = str(error)
    return result


def test_every_ranks_files_are_hashed_and_checked(tmp_path):
    with DistributedPool(world_size=2) as pool:
        results = pool.run(save_corrupt_and_resume, tmp_path)
    ckpt = tmp_path / "step_00000010"
    files = [
        "rl_state/rng_rank00000.pt", "rl_state/rng_rank00001.pt", "rl_state/state.pt",
        "shard_rank0.bin", "shard_rank1.bin",
    ]  # fmt: skip
    for rank, result in enumerate(results):
        assert result["files"] == files and result["intact"] == ckpt, rank
        assert result.get("error", "").startswith(f"{ckpt / 'shard_rank0.bin'} does not match"), rank
    assert (ckpt / MANIFEST).is_file()
