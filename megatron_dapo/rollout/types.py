"""What the rollout engines return: typed completions, so the trainer never reads a dict of strings."""

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """Why generation ended; the values are SGLang's `meta_info.finish_reason.type` strings."""

    STOP = "stop"  # an EOS or stop token was generated
    LENGTH = "length"  # max_new_tokens reached: the sample is truncated
    ABORT = "abort"  # cancelled (surplus generation under dynamic sampling, or shutdown)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, named as in SGLang's sampling params."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k, as in SGLang
    max_new_tokens: int = 128  # tokens
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # SGLang's sampling_seed; sample i of a request draws with seed + i


@dataclass
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]  # generated tokens, the stop token included when one was generated
    logprobs: list[float]  # the engine's log-prob (nats) of each generated token; len == len(token_ids)
    finish_reason: FinishReason
    weight_version: int = 0  # version of the weights that generated it (bumped by every weight sync)
    # The version that generated each token (len == len(token_ids)) when the engine reports it per token
    # (weight updates during a pause split a sample between versions); [] when it reports only one.
    token_weight_versions: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # engine-specific extras, never read by the algorithm
