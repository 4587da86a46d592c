"""Random rollout groups and step batches, for the batch, objective and distribution tests."""

import torch

from megatron_dapo.rollout.types import FinishReason
from megatron_dapo.trainer.batch import Group, Response


def random_groups(num_groups: int, group_size: int, seed: int, max_response: int = 12) -> list[Group]:
    """Groups of random prompts and responses; rewards ±1, some truncated (−0.3)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for index in range(num_groups):
        prompt = tuple(
            torch.randint(0, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        )
        responses = []
        for _ in range(group_size):
            length = int(torch.randint(1, max_response, (1,), generator=g))
            tokens = tuple(torch.randint(0, 40, (length,), generator=g).tolist())
            logprobs = tuple((-torch.rand(length, generator=g)).tolist())
            correct = bool(torch.rand(1, generator=g) < 0.5)
            truncated = bool(torch.rand(1, generator=g) < 0.2)
            reward = (1.0 if correct else -1.0) - 0.3 * truncated
            reason = FinishReason.LENGTH if truncated else FinishReason.STOP
            responses.append(Response(tokens, logprobs, reason, reward, correct))
        version = int(torch.randint(0, 3, (1,), generator=g))  # some groups carried over from older weights
        groups.append(Group(100 + index, prompt, tuple(responses), weight_version=version))
    return groups
