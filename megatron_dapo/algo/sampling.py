"""Dynamic sampling (DAPO section 3.2) as a streaming filter the trainer drives while rollouts run.

A group (one prompt's G samples) whose samples are all correct or all wrong has advantage 0 everywhere and
gives no gradient. The sampler keeps only groups with 0 < #correct < G, as they finish, and tells the trainer
how many more prompts to submit so that the kept groups fill the batch. The loop it is built for:

    sampler = DynamicSampler(prompts_per_step=512, max_rounds=10)
    while not sampler.full:
        submit(sampler.prompts_to_submit(in_flight=num_prompts_in_flight()))
        group, correct = wait_for_next_finished_group()
        sampler.add(group, correct)
    abort_in_flight_prompts()
    batch, stats = sampler.take_batch()

Surplus kept groups (finished after the batch filled) are carried into the next step instead of being thrown
away. The trainer's own group objects pass through untouched: the sampler only reads the correctness flags.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from megatron_dapo.algo.metrics import group_metric_sums

GroupT = TypeVar("GroupT")


class DynamicSamplingError(RuntimeError):
    """The batch could not be filled within the round budget."""


def is_informative(correct: Sequence[bool]) -> bool:
    """True when the group has both correct and wrong samples, so its advantages are not all zero."""
    num_correct = sum(bool(c) for c in correct)
    return 0 < num_correct < len(correct)


class DynamicSampler(Generic[GroupT]):
    """Collects finished groups into batches of `prompts_per_step` groups.

    enabled=False keeps every group (naive GRPO and the ablation rows before dynamic sampling).
    max_rounds: a round is `prompts_per_step` prompts; once `max_rounds` rounds of prompts have been
        submitted in one step and all have finished with the batch still not full, the sampler raises
        `DynamicSamplingError` instead of sampling forever.
    """

    def __init__(self, prompts_per_step: int, *, enabled: bool = True, max_rounds: int = 10) -> None:
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.prompts_per_step = prompts_per_step
        self.enabled = enabled
        self.max_rounds = max_rounds
        self._kept: list[GroupT] = []
        # Keep-rate evidence: this step's finished groups plus the previous step's, so the estimate follows
        # the policy as it improves without starting blind at each step.
        self._prev_kept = 0
        self._prev_seen = 0
        self._new_step()

    def _new_step(self) -> None:
        self._submitted = 0
        self._carried_in = len(self._kept)
        self._num_correct: list[int] = []
        self._group_sizes: list[int] = []
        self._kept_this_step = 0

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.prompts_per_step

    @property
    def keep_rate(self) -> float:
        """Estimated share of finished groups that are kept; smoothed by one kept group so it is never 0."""
        if not self.enabled:
            return 1.0
        kept = self._prev_kept + self._kept_this_step
        seen = self._prev_seen + len(self._num_correct)
        return (kept + 1) / (seen + 1)

    def prompts_to_submit(self, in_flight: int) -> int:
        """How many more prompts to submit now, given `in_flight` prompts submitted and not yet finished.

        Asks for enough that the expected kept groups (at the observed keep rate) fill the batch, within the
        round budget. Raises DynamicSamplingError when the budget is spent, nothing is in flight, and the
        batch is still not full.
        """
        if in_flight < 0:
            raise ValueError(f"in_flight must be >= 0 prompts, got {in_flight}")
        if self.full:
            return 0
        rate = self.keep_rate
        missing = self.prompts_per_step - len(self._kept) - in_flight * rate
        # the epsilon keeps float noise in an exact quotient (e.g. 100.00000001) from asking for one more
        wanted = max(0, math.ceil(missing / rate - 1e-9))
        budget = self.max_rounds * self.prompts_per_step - self._submitted
        count = min(wanted, budget)
        if count == 0 and in_flight == 0:
            seen = self._step_sums()
            raise DynamicSamplingError(
                f"dynamic sampling filled only {len(self._kept)} of {self.prompts_per_step} groups after "
                f"{self.max_rounds} rounds ({self._submitted} prompts; of {seen['groups']} finished groups "
                f"{seen['groups_all_correct']} were all correct and {seen['groups_all_wrong']} all wrong). "
                "The prompts are too easy or too hard for this policy: raise the round limit, change the "
                "data, or disable dynamic sampling."
            )
        self._submitted += count
        return count

    def _step_sums(self) -> dict[str, int]:
        return {k: int(v) for k, v in group_metric_sums(self._num_correct, self._group_sizes).items()}

    def add(self, group: GroupT, correct: Sequence[bool]) -> bool:
        """Record a finished group and its per-sample correctness; returns whether it was kept."""
        if len(correct) == 0:
            raise ValueError("a group needs at least one sample's correctness flag")
        if self.enabled and len(correct) < 2:
            raise ValueError(
                "dynamic sampling needs at least 2 samples per prompt (a single sample can never have "
                "0 < #correct < G): raise the samples per prompt or disable dynamic sampling"
            )
        self._num_correct.append(sum(bool(c) for c in correct))
        self._group_sizes.append(len(correct))
        keep = not self.enabled or is_informative(correct)
        if keep:
            self._kept.append(group)
            self._kept_this_step += 1
        return keep

    def drop_kept(self, unwanted: Callable[[GroupT], bool]) -> list[GroupT]:
        """Remove and return the kept groups `unwanted` names (e.g. too stale to train on any more)."""
        flags = [unwanted(g) for g in self._kept]
        dropped = [g for g, drop in zip(self._kept, flags, strict=True) if drop]
        self._kept = [g for g, drop in zip(self._kept, flags, strict=True) if not drop]
        self._carried_in = min(self._carried_in, len(self._kept))
        return dropped

    def take_batch(self) -> tuple[list[GroupT], dict[str, int]]:
        """The first `prompts_per_step` kept groups, oldest first, and this step's counters; the surplus is
        carried into the next step."""
        if not self.full:
            raise RuntimeError(
                f"take_batch called with {len(self._kept)} of {self.prompts_per_step} groups: wait for `full`"
            )
        batch, self._kept = self._kept[: self.prompts_per_step], self._kept[self.prompts_per_step :]
        stats = self._step_sums()
        stats.update(
            prompts_submitted=self._submitted,
            groups_kept=self._kept_this_step,
            groups_carried_in=self._carried_in,
            groups_carried_out=len(self._kept),
        )
        self._prev_kept, self._prev_seen = self._kept_this_step, len(self._num_correct)
        self._new_step()
        return batch, stats

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint between steps must hold: the carried-over groups and the keep-rate evidence."""
        return {"carried": list(self._kept), "prev_kept": self._prev_kept, "prev_seen": self._prev_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kept = list(state["carried"])
        self._prev_kept, self._prev_seen = int(state["prev_kept"]), int(state["prev_seen"])
        self._new_step()
