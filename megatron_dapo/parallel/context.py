"""Load-balanced (zigzag) context-parallel split of packed sequences, and its inverse.

Each packed sequence, of a length divisible by 2·CP, is cut into 2·CP equal chunks; CP rank r holds chunks r
and 2·CP−1−r, so every rank gets the same share of causal-attention work. This is the layout Transformer
Engine's CP attention and megatron's THD RoPE expect: a rank's local tokens are, sequence after sequence,
its two chunks.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def check_cp_divisible(seq_lens: list[int], cp: int) -> None:
    """Raise a clear error when a packed sequence cannot be split into 2·CP equal chunks."""
    bad = [n for n in seq_lens if n % (2 * cp)]
    if cp > 1 and bad:
        raise ValueError(
            f"context parallel size {cp} needs every packed sequence length divisible by 2*cp = {2 * cp}, "
            f"got {bad[:4]}: pack with data.packing (it pads each sequence to a multiple of 2*cp) or change "
            "parallel.cp"
        )


def zigzag_positions(seq_len: int, cp: int, cp_rank: int) -> Tensor:
    """Positions within one sequence held by `cp_rank`, in local order: [len/cp] long."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([first, second])


def zigzag_indices(seq_lens: list[int], cp: int, cp_rank: int) -> Tensor:
    """Indices into the packed tensor of the tokens `cp_rank` holds, in local order: [sum(seq_lens)/cp]."""
    check_cp_divisible(seq_lens, cp)
    starts = [0]
    for n in seq_lens[:-1]:
        starts.append(starts[-1] + n)
    parts = [start + zigzag_positions(n, cp, cp_rank) for start, n in zip(starts, seq_lens, strict=True)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_for_cp(
    packed: Tensor, seq_lens: list[int], cp_group: dist.ProcessGroup | None, dim: int = -1
) -> Tensor:
    """This CP rank's share of a packed tensor along `dim` (no communication; every rank holds the batch)."""
    cp = 1 if cp_group is None else cp_group.size()
    if cp == 1:
        return packed
    index = zigzag_indices(seq_lens, cp, cp_group.rank()).to(packed.device)
    return packed.index_select(dim, index)


def gather_from_cp(local: Tensor, seq_lens: list[int], cp_group: dist.ProcessGroup | None) -> Tensor:
    """Per-token values of this rank [T/cp, ...] -> the whole packed sequence in original order [T, ...].

    Forward only (no autograd): used for log-probs handed back to the caller, never for the loss.
    """
    cp = 1 if cp_group is None else cp_group.size()
    if cp == 1:
        return local
    gathered = torch.empty((cp * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=cp_group)
    order = torch.cat([zigzag_indices(seq_lens, cp, rank) for rank in range(cp)]).to(local.device)
    result = torch.empty_like(gathered)
    result[order] = gathered
    return result
