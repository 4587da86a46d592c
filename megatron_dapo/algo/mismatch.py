"""How far the engine's sampling distribution is from the trainer's pi_old, on the tokens the engine sampled.

Both should be the same policy at the same weights; a gap means a numerical difference (kernels, precision) or
a weight sync that left something stale. The sums add up across samples and data-parallel ranks like
metrics.py's (keys ending in "_max" reduce with max), and `finalize_metrics` turns them into what is logged.
"""

import torch
from torch import Tensor

# A token whose ratio pi_old / pi_rollout leaves this band is counted as far off.
RATIO_BAND = (0.5, 2.0)


def mismatch_metric_sums(old_logprobs: Tensor, rollout_logprobs: Tensor) -> dict[str, Tensor]:
    """Sums over response tokens. old_logprobs, rollout_logprobs: [T] log pi_old and log pi_rollout of the
    same sampled tokens. With r = pi_old / pi_rollout, k3 = r - 1 - log r is never negative and, the tokens
    being drawn from pi_rollout, its mean estimates KL(pi_rollout || pi_old) without bias. In float64."""
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.dim() != 1:
        raise ValueError(
            "old_logprobs and rollout_logprobs must be 1-D and equal in shape, got "
            f"{tuple(old_logprobs.shape)} and {tuple(rollout_logprobs.shape)}"
        )
    log_ratio = old_logprobs.detach().double() - rollout_logprobs.detach().double()
    ratio = log_ratio.exp()
    abs_diff = log_ratio.abs()
    low, high = RATIO_BAND
    zero = torch.zeros((), dtype=torch.float64, device=log_ratio.device)
    return {
        "mismatch_tokens": torch.tensor(float(log_ratio.numel()), dtype=torch.float64),
        "mismatch_k3_sum": (ratio - 1 - log_ratio).sum(),
        "mismatch_abs_diff_sum": abs_diff.sum(),
        # |diff| >= 0, so 0 is the max of no tokens and leaves other parts' max unchanged
        "mismatch_logprob_diff_max": abs_diff.max() if abs_diff.numel() else zero,
        "mismatch_outside_tokens": ((ratio < low) | (ratio > high)).sum().double(),
    }
