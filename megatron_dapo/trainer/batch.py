"""The step's data between the two roles: the rollout role's scored groups, the step's samples with their
advantages, split into mini-batches, and each data-parallel rank's share of them (trainer/distribute.py
sends each rank its own)."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_dapo.algo import group_advantages
from megatron_dapo.data.packing import PackedBatch, Sample, pack, plan_microbatches
from megatron_dapo.rollout.types import FinishReason


@dataclass(frozen=True)
class Response:
    """One scored sample."""

    token_ids: tuple[int, ...]  # generated tokens, the stop token included when one was generated
    logprobs: tuple[float, ...]  # the engine's log-prob (nats) of each generated token
    finish_reason: FinishReason  # STOP: finished; LENGTH: truncated (aborted samples are never scored)
    reward: float  # rule reward (+1 / -1) plus the soft overlong penalty when it is on
    correct: bool  # the rule reward alone: what dynamic sampling and accuracy count
    # (weight version, tokens) over token_ids in order: a continued sample has a span per launch.
    version_spans: tuple[tuple[int, int], ...] = ()

    @property
    def truncated(self) -> bool:
        return self.finish_reason is FinishReason.LENGTH

    def spans(self, default_version: int) -> tuple[tuple[int, int], ...]:
        """The version spans; all tokens from `default_version` (the group's) when none were recorded."""
        return self.version_spans or ((default_version, len(self.token_ids)),)


@dataclass(frozen=True)
class Group:
    """One prompt's G scored samples: the unit of advantage normalisation and of dynamic sampling."""

    prompt_index: int  # row of the prompt in the training set
    prompt_ids: tuple[int, ...]  # the token ids the engine was prompted with
    responses: tuple[Response, ...]
    # The oldest weights behind any of its tokens: those published after this step (a group carried over
    # from the step before, or generated ahead of training, is older than the step's own policy).
    weight_version: int = 0

    @property
    def correct(self) -> list[bool]:
        return [response.correct for response in self.responses]


@dataclass(frozen=True)
class StepBatch:
    """Every response of the step, group after group; index i names the same sample in every field."""

    samples: list[Sample]  # prompt + response token ids; the response starts at response_start
    advantages: Tensor  # [N] float32, group-normalised, the same on every token of the response
    truncated: Tensor  # [N] bool: generation hit max_response_tokens
    rollout_logprobs: list[Tensor]  # N x [response tokens] float32: the engine's log-probs
    weight_versions: Tensor  # [N] int64: the oldest weights behind each sample's tokens

    @classmethod
    def from_groups(cls, groups: Sequence[Group], *, scale_by_std: bool) -> "StepBatch":
        """Advantages are normalised within each group, over the whole step, before any mini-batch split."""
        responses = [(g, r) for g in groups for r in g.responses]
        rewards = torch.tensor([r.reward for _, r in responses], dtype=torch.float32)
        group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.responses], dtype=torch.long)
        return cls(
            samples=[Sample(g.prompt_ids + r.token_ids, len(g.prompt_ids)) for g, r in responses],
            advantages=group_advantages(rewards, group_ids, scale_by_std=scale_by_std),
            truncated=torch.tensor([r.truncated for _, r in responses], dtype=torch.bool),
            rollout_logprobs=[torch.tensor(r.logprobs, dtype=torch.float32) for _, r in responses],
            weight_versions=torch.tensor(
                [min(v for v, _ in r.spans(g.weight_version)) for g, r in responses], dtype=torch.int64
            ),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def response_tokens(self, i: int) -> int:
        sample = self.samples[i]
        return len(sample.token_ids) - sample.response_start

    def minibatches(self, samples_per_minibatch: int) -> list[list[int]]:
        """Consecutive slices of `samples_per_minibatch` samples, one gradient update each (the paper: 512
        prompts x 16 samples in mini-batches of 512 samples, 16 updates per step). Groups arrive in random
        prompt order, so consecutive slices are as good as shuffled ones and keep each group together."""
        if len(self) % samples_per_minibatch:
            raise ValueError(
                f"{len(self)} samples do not split into mini-batches of {samples_per_minibatch}: "
                "train.samples_per_minibatch must divide prompts_per_step x samples_per_prompt"
            )
        return [list(range(i, i + samples_per_minibatch)) for i in range(0, len(self), samples_per_minibatch)]

    def select(self, ids: Sequence[int]) -> "StepBatch":
        """The samples `ids`, in that order, renumbered from 0."""
        return StepBatch(
            samples=[self.samples[i] for i in ids],
            advantages=self.advantages[list(ids)],
            truncated=self.truncated[list(ids)],
            rollout_logprobs=[self.rollout_logprobs[i] for i in ids],
            weight_versions=self.weight_versions[list(ids)],
        )

    def shard(
        self,
        *,
        samples_per_minibatch: int,
        dp_size: int,
        tokens_per_microbatch: int,
        cp: int,
        pad_multiple: int,
    ) -> list["RankBatch"]:
        """Each data-parallel rank's share of the step: the samples it trains on, in micro-batch order, and
        its micro-batch plan. Every rank gets the same number of micro-batches in each mini-batch (filler
        micro-batches where it has too few samples), so that all ranks run the same schedule."""
        ids: list[list[int]] = [[] for _ in range(dp_size)]
        plans: list[list[list[int]]] = [[] for _ in range(dp_size)]  # [rank][minibatch] = micro-batch sizes
        for minibatch in self.minibatches(samples_per_minibatch):
            plan = plan_microbatches(
                [len(self.samples[i].token_ids) for i in minibatch],
                dp_size=dp_size,
                tokens_per_microbatch=tokens_per_microbatch,
                cp=cp,
                pad_multiple=pad_multiple,
            )
            for rank, microbatches in enumerate(plan):
                ids[rank].extend(minibatch[j] for microbatch in microbatches for j in microbatch)
                plans[rank].append([len(microbatch) for microbatch in microbatches])
        return [RankBatch(self.select(i), p) for i, p in zip(ids, plans, strict=True)]


@dataclass(frozen=True)
class RankBatch:
    """One data-parallel rank's share of a step: its samples, laid out micro-batch after micro-batch."""

    data: StepBatch  # this rank's samples only, numbered from 0
    plan: list[list[int]]  # plan[minibatch] = the sizes of its micro-batches, in samples (0: a filler)

    def microbatch_ids(self) -> list[list[list[int]]]:
        """ids[minibatch][microbatch] = indices into `data` (consecutive by construction)."""
        ids, start = [], 0
        for sizes in self.plan:
            ids.append([list(range(start, start := start + size)) for size in sizes])
        return ids

    def microbatches(self, pad_multiple: int) -> list[list[PackedBatch]]:
        """Every mini-batch's packed micro-batches."""
        return [
            [pack(self.data.samples, microbatch, pad_multiple) for microbatch in minibatch]
            for minibatch in self.microbatch_ids()
        ]
