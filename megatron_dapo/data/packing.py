"""THD packing: samples laid end to end in one row, and micro-batches balanced by token count.

A sample is a token sequence whose tail, from `response_start`, is the response being scored. Packed, the
sequence's position t carries the log-prob of token t+1 (the label), so the response's per-token values sit at
positions response_start−1 … len−2. Sequences are padded only to the multiple that context parallelism (2·CP)
and sequence parallelism (TP) require: never between sequences without those.

`plan_microbatches` gives every data-parallel rank the same number of micro-batches, each within a per-GPU
token budget, balancing tokens across ranks and micro-batches; every rank computes the same plan from the
same lengths, so the plan needs no communication.
"""

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_dapo.parallel.context import split_for_cp


@dataclass(frozen=True)
class Sample:
    """One sequence to score: prompt tokens then response tokens."""

    token_ids: Sequence[int]
    response_start: int  # index of the first response token; 1 <= response_start <= len(token_ids)

    def __post_init__(self) -> None:
        if not 1 <= self.response_start <= len(self.token_ids):
            raise ValueError(
                f"response_start={self.response_start} must lie in [1, {len(self.token_ids)}] (the number of "
                "tokens): the first token has no log-prob, so at least one prompt token must come first"
            )


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch. Tensors hold this rank's tokens ([T], or [T/cp] after `cp_share`).

    `seq_lens` are the padded lengths of the whole sequences, before any CP split (for attention and RoPE).
    """

    tokens: Tensor  # [T] long
    positions: Tensor  # [T] long: position within the token's sequence
    labels: Tensor  # [T] long: next token; 0 where there is none (masked)
    loss_mask: Tensor  # [T] bool: the label is a response token
    sample_of_token: Tensor  # [T] long: index into `sample_ids` of the token's sequence
    seq_lens: tuple[int, ...]  # padded length of each packed sequence
    sample_ids: tuple[int, ...]  # caller's index of each packed sequence (-1 for a filler sequence)
    response_starts: tuple[int, ...]
    lengths: tuple[int, ...]  # unpadded length of each sequence

    def packed_seq_params(self) -> PackedSeqParams:
        """megatron's THD description of the whole (global) sequences."""
        cu_seqlens = torch.zeros(len(self.seq_lens) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(self.seq_lens), 0)
        cu_seqlens = cu_seqlens.to(self.tokens.device)
        max_len = max(self.seq_lens)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )

    def token_cu_seqlens(self) -> Tensor:
        """[S+1] offsets of each sequence's tokens in this batch's tensors (this rank's share after
        `cp_share`): the `cu_seqlens` algo/loss.py aggregates with."""
        counts = torch.bincount(self.sample_of_token, minlength=len(self.seq_lens))
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    def response_tokens(self) -> Tensor:
        """[S] response tokens of each whole sequence (not of this rank's share): the per-sample token count
        of "sample" aggregation under context parallelism."""
        return torch.tensor(
            [n - k for n, k in zip(self.lengths, self.response_starts, strict=True)],
            device=self.tokens.device,
        )

    def cp_share(self, cp_group: dist.ProcessGroup | None) -> "PackedBatch":
        """This context-parallel rank's tokens (two zigzag chunks of each sequence)."""
        if cp_group is None or cp_group.size() == 1:
            return self
        fields = ("tokens", "positions", "labels", "loss_mask", "sample_of_token")
        return replace(
            self, **{f: split_for_cp(getattr(self, f), list(self.seq_lens), cp_group) for f in fields}
        )

    def to(self, device: torch.device | str) -> "PackedBatch":
        fields = ("tokens", "positions", "labels", "loss_mask", "sample_of_token")
        return replace(self, **{f: getattr(self, f).to(device) for f in fields})

    def scatter_response(self, values: Sequence[Tensor]) -> Tensor:
        """Per-sequence response values ([len − response_start] each, in `sample_ids` order) -> [T] aligned
        with the labels, 0 elsewhere. Use it for old log-probs, advantages and the like, before `cp_share`."""
        out = torch.zeros(self.tokens.shape[0], dtype=values[0].dtype if values else torch.float32)
        for begin, length, response_start, value in zip(
            self._starts(), self.lengths, self.response_starts, values, strict=True
        ):
            if value.shape != (length - response_start,):
                raise ValueError(
                    f"response values of a sequence of {length} tokens starting its response at "
                    f"{response_start} must have shape [{length - response_start}], got {tuple(value.shape)}"
                )
            out[begin + response_start - 1 : begin + length - 1] = value
        return out

    def gather_response(self, per_token: Tensor) -> list[Tensor]:
        """[T] values aligned with the labels (whole sequences, in order) -> each sequence's response."""
        return [
            per_token[begin + response_start - 1 : begin + length - 1]
            for begin, length, response_start in zip(
                self._starts(), self.lengths, self.response_starts, strict=True
            )
        ]

    def _starts(self) -> list[int]:
        starts = [0]
        for n in self.seq_lens[:-1]:
            starts.append(starts[-1] + n)
        return starts


def sequence_pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Each packed sequence's length is padded to this: 2·CP chunks, each divisible by TP under SP."""
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def pack(samples: Sequence[Sample], sample_ids: Sequence[int], pad_multiple: int = 1) -> PackedBatch:
    """Pack `samples` (by `sample_ids`, in that order) into one THD micro-batch.

    An empty selection gives one filler sequence with nothing to score, so that a data-parallel rank with
    fewer samples than micro-batches still runs the same schedule as the others.
    """
    if not sample_ids:
        filler = torch.zeros(pad_multiple, dtype=torch.long)
        return PackedBatch(
            tokens=filler,
            positions=torch.arange(pad_multiple),
            labels=filler,
            loss_mask=torch.zeros(pad_multiple, dtype=torch.bool),
            sample_of_token=filler,
            seq_lens=(pad_multiple,),
            sample_ids=(-1,),
            response_starts=(1,),
            lengths=(1,),
        )
    tokens, positions, labels, loss_mask, owner, seq_lens = [], [], [], [], [], []
    for index, sample_id in enumerate(sample_ids):
        sample = samples[sample_id]
        ids = torch.as_tensor(sample.token_ids, dtype=torch.long)  # a tuple, or a received tensor
        length = ids.numel()
        seq_len = padded_length(length, pad_multiple)
        padded = torch.zeros(seq_len, dtype=torch.long)
        padded[:length] = ids
        label = torch.zeros(seq_len, dtype=torch.long)
        label[: length - 1] = ids[1:]
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[sample.response_start - 1 : length - 1] = True
        tokens.append(padded)
        positions.append(torch.arange(seq_len))
        labels.append(label)
        loss_mask.append(mask)
        owner.append(torch.full((seq_len,), index, dtype=torch.long))
        seq_lens.append(seq_len)
    return PackedBatch(
        tokens=torch.cat(tokens),
        positions=torch.cat(positions),
        labels=torch.cat(labels),
        loss_mask=torch.cat(loss_mask),
        sample_of_token=torch.cat(owner),
        seq_lens=tuple(seq_lens),
        sample_ids=tuple(sample_ids),
        response_starts=tuple(samples[i].response_start for i in sample_ids),
        lengths=tuple(len(samples[i].token_ids) for i in sample_ids),
    )


def balanced_partition(lengths: Sequence[int], num_parts: int) -> list[list[int]]:
    """Indices of `lengths` in `num_parts` groups of near-equal total (longest first, into the lightest).

    Each group keeps its indices in ascending order, so packing is deterministic.
    """
    heap = [(0, part) for part in range(num_parts)]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        total, part = heapq.heappop(heap)
        parts[part].append(index)
        heapq.heappush(heap, (total + lengths[index], part))
    return [sorted(p) for p in parts]


def plan_microbatches(
    lengths: Sequence[int], *, dp_size: int, tokens_per_microbatch: int, cp: int = 1, pad_multiple: int = 1
) -> list[list[list[int]]]:
    """plan[dp_rank][microbatch] = sample indices; the same micro-batch count on every DP rank.

    lengths: tokens of each sample of the mini-batch (all DP ranks). tokens_per_microbatch: per-GPU budget,
    counted after padding and after the CP split (a micro-batch of T packed tokens puts T/cp on each GPU).
    """
    budget = tokens_per_microbatch * cp
    padded = [padded_length(n, pad_multiple) for n in lengths]
    too_long = [n for n in padded if n > budget]
    if too_long:
        raise ValueError(
            f"a sample of {max(too_long)} tokens (padded) exceeds the micro-batch budget of {budget} tokens "
            f"(tokens_per_microbatch={tokens_per_microbatch} x cp={cp}): raise train.tokens_per_microbatch "
            f"to at least {-(-max(too_long) // cp)}, or raise parallel.cp"
        )
    per_rank = balanced_partition(padded, dp_size)
    count = max(1, -(-max(sum(padded[i] for i in rank) for rank in per_rank) // budget))
    while True:
        plan = [_split(rank, [padded[i] for i in rank], count) for rank in per_rank]
        if all(sum(padded[i] for i in group) <= budget for rank in plan for group in rank):
            return plan
        count += 1


def _split(indices: list[int], padded: list[int], count: int) -> list[list[int]]:
    """`indices` (with padded lengths `padded`) in `count` balanced groups."""
    return [[indices[j] for j in group] for group in balanced_partition(padded, count)]
