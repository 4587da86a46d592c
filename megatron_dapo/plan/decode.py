"""How fast an SGLang server decodes, and how long a synchronous rollout waits for its long tail.

A server decodes its running sequences in lockstep: one step gives each of its n sequences a token and takes
`step_base_s + step_per_sequence_s * n` (reading the weights, then every sequence's KV cache). A full server
is efficient; one left with the last long samples of a step is not, and the last sample decodes alone.
Response lengths are log-normal, cut at rollout.max_response_tokens. benchmarks/sim_servers.py simulates these
same servers event by event; this module is the closed form the planner uses.
"""

import math
from dataclasses import dataclass

from megatron_dapo.plan.assumptions import Assumptions


@dataclass(frozen=True)
class ServerSpeed:
    """One SGLang server's decode step time as a function of the sequences it runs."""

    step_base_s: float  # a step's fixed cost: reading the weights
    step_per_sequence_s: float  # added per running sequence: its KV cache
    capacity: int  # sequences it runs at once (its KV cache at the mean length)

    def step_s(self, sequences: float) -> float:
        return self.step_base_s + self.step_per_sequence_s * sequences

    def tokens_per_s(self, sequences: float) -> float:
        return sequences / self.step_s(sequences)


def server_speed(assume: Assumptions, parameters: int, server_tp: int, capacity: int) -> ServerSpeed:
    """The line through the two stated points: one sequence decodes a token per `tail_ms_per_token`, a full
    server (`capacity` sequences) at `decode_rate` per GPU. Where the two contradict (a full step faster than
    one sequence's), the decode rate holds and the step time no longer grows with the sequences."""
    capacity = max(capacity, 1)
    full_s = capacity / (assume.decode_rate(parameters) * server_tp)
    alone_s = assume.tail_ms_per_token / 1000
    per_sequence = (full_s - alone_s) / (capacity - 1) if capacity > 1 else 0.0
    per_sequence = min(max(per_sequence, 0.0), full_s / capacity)  # neither negative nor a negative base
    return ServerSpeed(full_s - per_sequence * capacity, per_sequence, capacity)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _cut_moment(mu: float, sigma: float, cap: float, k: int) -> float:
    """E[min(L, cap)^k] for ln L ~ N(mu, sigma²): the log-normal's partial moment below the cap, plus the cap
    for the share above it."""
    below = math.exp(k * mu + k * k * sigma * sigma / 2) * _normal_cdf(
        (math.log(cap) - mu - k * sigma**2) / sigma
    )
    return below + cap**k * (1 - _normal_cdf((math.log(cap) - mu) / sigma))


def mean_residual_tokens(mean: float, sigma: float, cap: float) -> float:
    """Tokens a running sample still has to generate, on average, while servers are kept full: E[L²] / 2E[L]
    (long samples hold a slot longer, so a running sample is likelier a long one). Lengths are log-normal of
    log-spread `sigma` cut at `cap`, their median set so that the mean is `mean`."""
    if mean >= cap or sigma == 0:
        return min(mean, cap) / 2
    low, high = math.log(mean) - 10 * sigma - 10, math.log(cap) + 10 * sigma + 10
    for _ in range(200):  # the cut mean grows with mu: bisect for the median
        mid = (low + high) / 2
        low, high = (mid, high) if _cut_moment(mid, sigma, cap, 1) < mean else (low, mid)
    return _cut_moment(low, sigma, cap, 2) / (2 * mean)


def drain_rollout_s(
    tokens_per_server: float, speed: ServerSpeed, longest: int, mean_residual: float
) -> float:
    """A synchronous rollout, one server: full until the shared queue empties, then draining its samples,
    each `mean_residual` tokens from the end, while the longest sample (started last) runs its `longest`
    tokens to the end, alone at last. Every step costs the base, every token the per-sequence time:
    steps = tokens / capacity - mean_residual + longest (just `longest` when the queue is never full)."""
    steps = max(tokens_per_server / speed.capacity - mean_residual, 0.0) + longest
    return speed.step_base_s * steps + speed.step_per_sequence_s * tokens_per_server
