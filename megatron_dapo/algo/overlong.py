"""Overlong reward shaping (DAPO section 3.4): two independent remedies for the noise truncation adds.

- Soft overlong punishment: a length penalty added to the rule reward, ramping from 0 to -1 over the last
  `buffer_length` tokens before `max_length` (the maximum RESPONSE length, L_max; the buffer is L_cache).
- Overlong filtering: truncated samples are masked out of the loss, so they give no gradient.
"""

import torch
from torch import Tensor

from megatron_dapo.algo.loss import token_sample_index


def _check_limits(max_length: int, buffer_length: int) -> None:
    if not 0 <= buffer_length <= max_length:
        raise ValueError(
            f"need 0 <= buffer_length <= max_length (the max response length), got "
            f"buffer_length={buffer_length}, max_length={max_length}"
        )


def overlong_penalty(length: int, max_length: int, buffer_length: int) -> float:
    """R_length(y) for a response of `length` tokens: 0, then ((L_max - L_cache) - |y|) / L_cache, then -1."""
    _check_limits(max_length, buffer_length)
    if length < 0:
        raise ValueError(f"length must be >= 0 tokens, got {length}")
    expected = max_length - buffer_length
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / buffer_length
    return -1.0


def overlong_penalty_tensor(lengths: Tensor, max_length: int, buffer_length: int) -> Tensor:
    """`overlong_penalty` elementwise. lengths: [N] integer (tokens). Returns [N] float32."""
    _check_limits(max_length, buffer_length)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of token counts, got {lengths.dtype}")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0 tokens")
    expected = max_length - buffer_length
    ramp = (expected - lengths).to(torch.float64) / max(buffer_length, 1)
    penalty = torch.where(lengths <= expected, torch.zeros_like(ramp), ramp)
    penalty = torch.where(lengths > max_length, torch.full_like(ramp, -1.0), penalty)
    return penalty.to(torch.float32)


def overlong_filter_mask(loss_mask: Tensor, cu_seqlens: Tensor, truncated: Tensor) -> Tensor:
    """Zero the loss mask of every token of every truncated sample.

    loss_mask: [T] bool or 0/1 over a THD-packed micro-batch; cu_seqlens: [S+1] sample boundaries (see
    algo/loss.py); truncated: [S] bool (finish reason "length"). Returns [T] like loss_mask.
    """
    num_samples = cu_seqlens.numel() - 1
    if truncated.shape != (num_samples,) or truncated.dtype != torch.bool:
        raise ValueError(f"truncated must be a bool tensor [S]=[{num_samples}], got {tuple(truncated.shape)}")
    drop = truncated[token_sample_index(cu_seqlens, loss_mask.numel())]
    return torch.where(drop, torch.zeros_like(loss_mask), loss_mask)
