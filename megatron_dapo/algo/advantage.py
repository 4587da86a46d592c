"""Group-normalised advantages (GRPO/DAPO): each sample's reward relative to its prompt's group.

Definitions, chosen so that no input gives NaN:
- the group mean and the unbiased (Bessel-corrected) standard deviation, as GRPO's and DAPO's code use;
- a group whose rewards are all equal (including a singleton group) gets advantage exactly 0: it carries no
  preference between its samples, and dividing a rounding residue by eps would invent one.
"""

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """(R_i - mean_g) / (std_g + eps) per sample, or R_i - mean_g when `scale_by_std` is False.

    rewards: [N] float, one scalar reward per sample.
    group_ids: [N] integer, the prompt group of each sample; any values, any order.
    Returns [N] in rewards' dtype, computed in float64.
    """
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a 1-D float tensor, got shape {tuple(rewards.shape)} {rewards.dtype}"
        )
    if group_ids.shape != rewards.shape or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor shaped like rewards {tuple(rewards.shape)}, "
            f"got {tuple(group_ids.shape)} {group_ids.dtype}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf: check the reward function and the overlong penalty")
    if rewards.numel() == 0:
        return rewards.clone()

    r = rewards.to(torch.float64)
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, group, torch.ones_like(r)
    )
    mean = torch.zeros_like(count).index_add_(0, group, r) / count
    centred = r - mean[group]

    lowest = torch.full_like(count, torch.inf).scatter_reduce(0, group, r, reduce="amin")
    highest = torch.full_like(count, -torch.inf).scatter_reduce(0, group, r, reduce="amax")
    constant = (lowest == highest)[group]

    if scale_by_std:
        sq = torch.zeros_like(count).index_add_(0, group, centred * centred)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        centred = centred / (std[group] + eps)
    return torch.where(constant, torch.zeros_like(centred), centred).to(rewards.dtype)
