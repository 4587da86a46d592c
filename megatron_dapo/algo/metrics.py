"""The quantities the DAPO paper watches, as sums that add up across micro-batches and data-parallel ranks.

Every `*_sums` function returns a dict of 0-d float64 tensors. Combine parts with `merge_metric_sums` in one
process; across ranks all-reduce with SUM every key except those ending in "_max" (all-reduce those with MAX).
`finalize_metrics` then turns the totals into the means and fractions to log.
"""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from megatron_dapo.algo.loss import PolicyLossOutput


def _f64(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach()


def token_metric_sums(
    out: PolicyLossOutput, logprobs: Tensor, entropy: Tensor, loss_mask: Tensor
) -> dict[str, Tensor]:
    """Sums over the valid tokens of one micro-batch.

    out: `policy_loss`'s output; logprobs: [T] under the new policy; entropy: [T] of the new policy's
    next-token distribution; loss_mask: [T] bool or 0/1. Clipping is counted as PPO means it: a token is
    clipped when the clip removes its gradient (upper: A > 0 and r > 1 + eps_high; lower: A < 0 and
    r < 1 - eps_low). Approx KL(old || new) is the k3 estimator (r - 1) - log r, r = pi_new / pi_old;
    "ratio_dev_max" is the largest |r - 1|.
    """
    valid = loss_mask != 0
    zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)

    def total(x: Tensor) -> Tensor:
        return torch.where(valid, x.detach().to(torch.float64), zero).sum()

    ratio = out.ratio.to(torch.float64)
    return {
        "tokens": total(torch.ones_like(ratio)),
        "entropy_sum": total(entropy),
        "clip_upper_tokens": total(out.clipped_upper.to(torch.float64)),
        "clip_lower_tokens": total(out.clipped_lower.to(torch.float64)),
        "dual_clip_tokens": total(out.dual_clipped.to(torch.float64)),
        "clip_upper_prob_sum": total(logprobs.to(torch.float64).exp() * out.clipped_upper),
        "approx_kl_sum": total(ratio - 1 - ratio.log()),
        # the first update of a step runs at pi_old's weights, where this must be exactly 0
        "ratio_dev_max": torch.where(valid, (ratio - 1).abs(), zero).max() if valid.numel() else zero,
    }


def rollout_metric_sums(response_lengths: Tensor, truncated: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Sums over samples. response_lengths: [N] tokens; truncated: [N] bool (finish reason "length");
    correct: [N] bool (the rule reward, before any length penalty)."""
    if not (response_lengths.shape == truncated.shape == correct.shape) or response_lengths.dim() != 1:
        raise ValueError(
            "response_lengths, truncated and correct must be 1-D and equal in shape, got "
            f"{tuple(response_lengths.shape)}, {tuple(truncated.shape)}, {tuple(correct.shape)}"
        )
    lengths = response_lengths.detach().to(torch.float64).cpu()
    return {
        "samples": _f64(lengths.numel()),
        "response_length_sum": lengths.sum(),
        "response_length_max": lengths.max() if lengths.numel() else _f64(0.0),
        "truncated_samples": _f64(truncated.sum().item()),
        "correct_samples": _f64(correct.sum().item()),
    }


def group_metric_sums(num_correct: Sequence[int], group_sizes: Sequence[int]) -> dict[str, Tensor]:
    """Counts of groups, and of those with advantage 0 everywhere: all correct, or all wrong."""
    if len(num_correct) != len(group_sizes):
        raise ValueError(f"num_correct has {len(num_correct)} groups but group_sizes has {len(group_sizes)}")
    all_correct = sum(c == g for c, g in zip(num_correct, group_sizes, strict=True))
    all_wrong = sum(c == 0 for c in num_correct)
    return {
        "groups": _f64(len(num_correct)),
        "groups_all_correct": _f64(all_correct),
        "groups_all_wrong": _f64(all_wrong),
    }


def merge_metric_sums(parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Combine sums from several micro-batches (or ranks, gathered): add, except max for "*_max" keys."""
    merged: dict[str, Tensor] = {}
    for part in parts:
        for key, value in part.items():
            value = _f64(value)
            if key not in merged:
                merged[key] = value
            elif key.endswith("_max"):
                merged[key] = torch.maximum(merged[key], value)
            else:
                merged[key] = merged[key] + value
    return merged


# name to log: (numerator key, denominator key)
_RATIOS = {
    "entropy": ("entropy_sum", "tokens"),
    "clip_fraction_upper": ("clip_upper_tokens", "tokens"),
    "clip_fraction_lower": ("clip_lower_tokens", "tokens"),
    "dual_clip_fraction": ("dual_clip_tokens", "tokens"),
    "clipped_upper_prob_mean": ("clip_upper_prob_sum", "clip_upper_tokens"),
    "approx_kl": ("approx_kl_sum", "tokens"),
    "response_length_mean": ("response_length_sum", "samples"),
    "truncation_ratio": ("truncated_samples", "samples"),
    "accuracy": ("correct_samples", "samples"),
    "groups_all_correct_share": ("groups_all_correct", "groups"),
    "groups_all_wrong_share": ("groups_all_wrong", "groups"),
    "mismatch_kl": ("mismatch_k3_sum", "mismatch_tokens"),
    "mismatch_logprob_diff_mean": ("mismatch_abs_diff_sum", "mismatch_tokens"),
    "mismatch_ratio_outside_share": ("mismatch_outside_tokens", "mismatch_tokens"),
    "is_weight_mean": ("is_weight_sum", "is_tokens"),
    "is_masked_share": ("is_masked_tokens", "is_tokens"),
}
# maxima logged as they are: (key, the count that must be positive)
_MAXIMA = {
    "response_length_max": "samples",
    "mismatch_logprob_diff_max": "mismatch_tokens",
}


def finalize_metrics(sums: dict[str, Tensor]) -> dict[str, float]:
    """Means and fractions from totals. A metric whose inputs are absent or whose denominator is 0 (e.g. the
    mean probability of upper-clipped tokens when none was clipped) is left out rather than logged as 0."""
    result: dict[str, float] = {}
    for name, (num, den) in _RATIOS.items():
        if num in sums and den in sums and float(sums[den]) > 0:
            result[name] = float(sums[num]) / float(sums[den])
    for name, count in _MAXIMA.items():
        if name in sums and float(sums.get(count, 0)) > 0:
            result[name] = float(sums[name])
    return result
