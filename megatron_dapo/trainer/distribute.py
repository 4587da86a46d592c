"""Each data-parallel rank receives its own share of the step, as tensors.

Rank 0 ran the rollout and cut the step into one share per data-parallel rank (`StepBatch.shard`). A share
travels as one flat byte buffer: rank 0 sends each to the first rank of its data-parallel replica, which
broadcasts it to its context-parallel peers, and each of those to its tensor/pipeline peers. So every rank
receives what it trains on and nothing more (1/DP of the step), and nothing is pickled.
"""

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor

from megatron_dapo.data.packing import Sample
from megatron_dapo.trainer.batch import RankBatch, StepBatch

# The wire layout: (field, dtype), widest first, so that every field starts aligned for its dtype.
FIELDS: tuple[tuple[str, torch.dtype], ...] = (
    ("lengths", torch.int64),  # [N] tokens of each sample
    ("response_starts", torch.int64),  # [N]
    ("microbatches", torch.int64),  # [M] micro-batches in each mini-batch
    ("microbatch_sizes", torch.int64),  # [sum of microbatches] samples in each micro-batch
    ("weight_versions", torch.int64),  # [N]
    ("tokens", torch.int32),  # [sum of lengths] token ids, sample after sample
    ("advantages", torch.float32),  # [N]
    ("rollout_logprobs", torch.float32),  # [sum of response tokens]
    ("truncated", torch.bool),  # [N]
)


def share_to_tensors(share: RankBatch) -> dict[str, Tensor]:
    data = share.data
    return {
        "lengths": torch.tensor([len(s.token_ids) for s in data.samples], dtype=torch.int64),
        "response_starts": torch.tensor([s.response_start for s in data.samples], dtype=torch.int64),
        "microbatches": torch.tensor([len(sizes) for sizes in share.plan], dtype=torch.int64),
        "microbatch_sizes": torch.tensor([n for sizes in share.plan for n in sizes], dtype=torch.int64),
        "tokens": torch.cat(
            [torch.as_tensor(s.token_ids, dtype=torch.int32) for s in data.samples]
            or [torch.zeros(0, dtype=torch.int32)]
        ),
        "advantages": data.advantages.to(torch.float32),
        "rollout_logprobs": torch.cat(
            [lp.to(torch.float32) for lp in data.rollout_logprobs] or [torch.zeros(0)]
        ),
        "truncated": data.truncated.to(torch.bool),
        "weight_versions": data.weight_versions.to(torch.int64),
    }


def share_from_tensors(tensors: dict[str, Tensor]) -> RankBatch:
    lengths = tensors["lengths"].tolist()
    starts = tensors["response_starts"].tolist()
    tokens = tensors["tokens"].to(torch.long).split(lengths)
    rollout_logprobs = tensors["rollout_logprobs"].split(
        [n - k for n, k in zip(lengths, starts, strict=True)]
    )
    sizes = tensors["microbatch_sizes"].tolist()
    plan, begin = [], 0
    for count in tensors["microbatches"].tolist():
        plan.append(sizes[begin : begin + count])
        begin += count
    data = StepBatch(
        samples=[Sample(ids, start) for ids, start in zip(tokens, starts, strict=True)],
        advantages=tensors["advantages"],
        truncated=tensors["truncated"],
        rollout_logprobs=list(rollout_logprobs),
        weight_versions=tensors["weight_versions"],
    )
    return RankBatch(data, plan)


def encode(share: RankBatch) -> tuple[Tensor, Tensor]:
    """(header: [fields] int64 element counts, buffer: uint8 bytes of every field in FIELDS order)."""
    tensors = share_to_tensors(share)
    parts = [tensors[name].to(dtype).contiguous().view(-1) for name, dtype in FIELDS]
    header = torch.tensor([part.numel() for part in parts], dtype=torch.int64)
    return header, torch.cat([part.view(torch.uint8) for part in parts])


def decode(header: Tensor, buffer: Tensor) -> RankBatch:
    tensors, offset = {}, 0
    for (name, dtype), count in zip(FIELDS, header.tolist(), strict=True):
        size = count * torch.empty(0, dtype=dtype).element_size()
        tensors[name] = buffer[offset : offset + size].view(dtype)
        offset += size
    return share_from_tensors(tensors)


def buffer_bytes(header: Tensor) -> int:
    return sum(
        count * torch.empty(0, dtype=dtype).element_size()
        for (_, dtype), count in zip(FIELDS, header.tolist(), strict=True)
    )


def distribute_batch(shares: list[RankBatch] | None, pg: ProcessGroupCollection) -> RankBatch:
    """Collective: this rank's share. `shares` (one per DP rank) is given on global rank 0 only."""
    device = _device(pg.dp)
    header = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
    buffer = torch.zeros(0, dtype=torch.uint8, device=device)
    leader = pg.tp.rank() == 0 and pg.pp.rank() == 0 and pg.cp.rank() == 0
    if dist.get_rank() == 0:
        if shares is None or len(shares) != pg.dp.size():
            raise ValueError(f"rank 0 must give one share per data-parallel rank ({pg.dp.size()})")
        sends = []
        for dp_rank in range(1, pg.dp.size()):
            other_header, other_buffer = encode(shares[dp_rank])
            destination = dist.get_global_rank(pg.dp, dp_rank)
            sends.append(dist.isend(other_header.to(device), dst=destination))
            sends.append(dist.isend(other_buffer.to(device), dst=destination))
        own_header, own_buffer = encode(shares[0])
        header.copy_(own_header)
        buffer = own_buffer.to(device)
        for request in sends:
            request.wait()
    elif leader:
        dist.recv(header, src=0)
        buffer = torch.empty(buffer_bytes(header), dtype=torch.uint8, device=device)
        dist.recv(buffer, src=0)
    # Context-parallel peers of a replica's first rank, then tensor/pipeline peers of each: group rank 0 of
    # each group holds the share when the broadcast starts.
    if pg.tp.rank() == 0 and pg.pp.rank() == 0:
        buffer = _broadcast(header, buffer, pg.cp)
    if dist.get_global_rank(pg.mp, 0) == dist.get_rank() and not (pg.tp.rank() == 0 and pg.pp.rank() == 0):
        raise RuntimeError("the model-parallel group's first rank is not its TP/PP rank 0: unexpected layout")
    buffer = _broadcast(header, buffer, pg.mp)
    return decode(header.cpu(), buffer.cpu())


def _broadcast(header: Tensor, buffer: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Group rank 0's header and buffer to every member of `group`; returns the buffer."""
    if group.size() == 1:
        return buffer
    source = dist.get_global_rank(group, 0)
    dist.broadcast(header, src=source, group=group)
    if group.rank() != 0:
        buffer = torch.empty(buffer_bytes(header.cpu()), dtype=torch.uint8, device=header.device)
    dist.broadcast(buffer, src=source, group=group)
    return buffer


def _device(group: dist.ProcessGroup) -> torch.device:
    """NCCL moves CUDA tensors only; gloo, CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
