"""One prompt's G samples in flight, across interruptions: the unit the collector submits, interrupts and
continues (partial rollouts, issue 14).

A flight starts as one request for G samples. When it is interrupted (the batch is full, or the weights are
about to change) with `rollout.partial=true`, the samples keep the tokens and the engine's log-probs they
have, each token labelled with the weight version that generated it; the next launch continues every
unfinished sample with a request of its own whose prompt is the original prompt plus that sample's tokens
(a prefill, then decoding under the weights the engine holds then).
"""

import asyncio
import copy
import itertools
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from megatron_dapo.data.dataset import TokenizedPrompt
from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams

_SEED_LIMIT = 2**31 - 2**16  # the engine draws sample i of a request with seed + i: leave room for i


def request_seed(run_seed: int, step: int, prompt_index: int, submission: int, *more: int) -> int:
    """The sampling seed of one request: the same (run, step, prompt, submission, ...) always samples the
    same; `more` names a continuation (the sample and its launch)."""
    state = np.random.SeedSequence([run_seed, step, prompt_index, submission, *more]).generate_state(1)[0]
    return int(state) % _SEED_LIMIT


@dataclass
class SampleSoFar:
    """One sample's tokens so far; `spans` gives, in order, (weight version, tokens) over token_ids."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # None: still to generate

    def extend(self, completion: Completion, version: int) -> None:
        """Append a launch's tokens, from weight `version` unless the engine says per token (a sample
        retracted across a weight update spans two versions)."""
        self.token_ids.extend(completion.token_ids)
        self.logprobs.extend(completion.logprobs)
        versions = completion.token_weight_versions or [version] * len(completion.token_ids)
        for v, run in itertools.groupby(versions):
            self.spans.append((v, len(list(run))))
        if completion.finish_reason is not FinishReason.ABORT:
            self.finish_reason = completion.finish_reason

    def completion(self) -> Completion:
        return Completion(list(self.token_ids), list(self.logprobs), self.finish_reason or FinishReason.ABORT)


@dataclass(eq=False)  # a flight is itself: compared by identity
class Flight:
    """A prompt's G samples from submission until every sample has finished."""

    prompt: TokenizedPrompt
    step: int  # the step it was submitted for: with `submission`, it names its requests and seeds
    submission: int
    samples: list[SampleSoFar]
    launches: int = 0
    version: int = 0  # the weights the engine held at the latest launch
    task: asyncio.Task | None = None  # -> {sample index: Completion} of the latest launch
    request_ids: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, prompt: TokenizedPrompt, step: int, submission: int, samples: int) -> "Flight":
        return cls(prompt, step, submission, [SampleSoFar() for _ in range(samples)])

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    @property
    def oldest_version(self) -> int:
        """The oldest weights behind any of its tokens (or that its running launch started under)."""
        versions = [v for s in self.samples for v, _ in s.spans]
        if self.task is not None:
            versions.append(self.version)
        return min(versions, default=self.version)

    @property
    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @property
    def partial_samples(self) -> int:
        """Unfinished samples that hold tokens: what a launch continues rather than starts."""
        return sum(1 for s in self.samples if s.finish_reason is None and s.token_ids)

    def launch(self, engine: RolloutEngine, params: SamplingParams, version: int, run_seed: int) -> None:
        """Start the unfinished samples: all G in one request while none has a token, else one request per
        unfinished sample, continuing from its tokens."""
        self.version, self.launches = version, self.launches + 1
        for sample in self.samples:  # interrupted as it reached the limit: it is truncated, not unfinished
            if sample.finish_reason is None and len(sample.token_ids) >= params.max_new_tokens:
                sample.finish_reason = FinishReason.LENGTH
        todo = [i for i, s in enumerate(self.samples) if s.finish_reason is None]
        base = f"step{self.step}-{self.submission}-{self.prompt.record.index}"
        if not any(self.samples[i].token_ids for i in todo) and len(todo) == len(self.samples):
            seed = request_seed(run_seed, self.step, self.prompt.record.index, self.submission)
            self.request_ids = [base if self.launches == 1 else f"{base}-r{self.launches}"]
            call = engine.generate(
                self.prompt.token_ids,
                replace(params, seed=seed),
                n=len(todo),
                request_id=self.request_ids[0],
            )
            self.task = asyncio.ensure_future(_numbered(todo, call))
            return
        self.request_ids = [f"{base}-r{self.launches}s{i}" for i in todo]
        calls = [
            self._continue(engine, params, i, rid, run_seed)
            for i, rid in zip(todo, self.request_ids, strict=True)
        ]
        self.task = asyncio.ensure_future(_gathered(todo, calls))

    def _continue(
        self, engine: RolloutEngine, params: SamplingParams, i: int, request_id: str, run_seed: int
    ) -> Coroutine[Any, Any, list[Completion]]:
        sample = self.samples[i]
        seed = request_seed(run_seed, self.step, self.prompt.record.index, self.submission, i, self.launches)
        left = params.max_new_tokens - len(sample.token_ids)
        return engine.generate(
            self.prompt.token_ids + tuple(sample.token_ids),
            replace(params, seed=seed, max_new_tokens=left),
            n=1,
            request_id=request_id,
        )

    def settle(self, results: dict[int, Completion]) -> int:
        """Take the latest launch's results into the samples; returns the tokens it generated."""
        self.task = None
        for i, completion in results.items():
            self.samples[i].extend(completion, self.version)
        return sum(len(c.token_ids) for c in results.values())

    def state(self) -> dict:
        """What a checkpoint keeps of it: a running launch is not kept (its samples restart from their
        last settled tokens)."""
        return {
            "prompt": self.prompt,
            "step": self.step,
            "submission": self.submission,
            "launches": self.launches,
            "version": self.version,
            "samples": copy.deepcopy(self.samples),
        }

    @classmethod
    def from_state(cls, state: dict) -> "Flight":
        return cls(
            state["prompt"],
            state["step"],
            state["submission"],
            list(state["samples"]),
            launches=state["launches"],
            version=state["version"],
        )


async def _numbered(ids: Sequence[int], call: Coroutine[Any, Any, list[Completion]]) -> dict[int, Completion]:
    return dict(zip(ids, await call, strict=True))


async def _gathered(
    ids: Sequence[int], calls: list[Coroutine[Any, Any, list[Completion]]]
) -> dict[int, Completion]:
    results = await asyncio.gather(*calls)
    return {i: completions[0] for i, completions in zip(ids, results, strict=True)}
