"""How long a generation request may run before its server counts as stuck.

A server that accepts connections but never answers would otherwise hold a request forever. Each request gets
floor_s + max_new_tokens x slack / speed, where speed is the slowest tokens/s among the server's recently
finished samples (measured by the client, so queueing counts), or min_tokens_per_s before any has finished.
The clock starts at dispatch and again whenever another sample of the same server finishes: a server with a
long queue keeps its samples as long as it keeps finishing some (SGLangClient._within_deadline).
"""

import math
import time
from collections import deque
from dataclasses import dataclass

SPEED_WINDOW = 32  # finished samples per server that the speed is measured over


@dataclass(frozen=True)
class DeadlinePolicy:
    floor_s: float = 120.0  # added to every deadline: connecting, queueing, prefill
    min_tokens_per_s: float = 10.0  # the speed assumed of a server until one of its samples has finished
    slack: float = 3.0  # how many times slower than its slowest recent sample a request may run

    def __post_init__(self) -> None:
        if self.floor_s <= 0 or self.min_tokens_per_s <= 0 or self.slack < 1:
            raise ValueError(f"{self}: floor_s and min_tokens_per_s must be > 0, slack >= 1")


DEFAULT_DEADLINES = DeadlinePolicy()


class SpeedMeter:
    """Tokens/s of each server's recently finished samples, and the deadlines they imply."""

    def __init__(self, policy: DeadlinePolicy) -> None:
        self.policy = policy
        self._speeds: dict[str, deque[float]] = {}
        self._last_finished: dict[str, float] = {}  # time.monotonic() of each server's latest answer

    def record(self, url: str, tokens: int, seconds: float) -> None:
        """A sample of `tokens` finished on `url` after `seconds`; samples without tokens say nothing of
        speed, but show the server alive."""
        self._last_finished[url] = time.monotonic()
        if tokens > 0 and seconds > 0:
            self._speeds.setdefault(url, deque(maxlen=SPEED_WINDOW)).append(tokens / seconds)

    def last_finished(self, url: str) -> float:
        """When a sample of `url` last finished (time.monotonic()); -inf if none has."""
        return self._last_finished.get(url, -math.inf)

    def tokens_per_s(self, url: str) -> float | None:
        """The slowest recent sample's speed on `url`; None before any has finished."""
        speeds = self._speeds.get(url)
        return min(speeds) if speeds else None

    def deadline_s(self, url: str, max_new_tokens: int) -> float:
        speed = self.tokens_per_s(url) or self.policy.min_tokens_per_s
        return self.policy.floor_s + max_new_tokens * self.policy.slack / speed

    def forget(self, url: str) -> None:
        """A restarted server starts over: its old speed may not hold."""
        self._speeds.pop(url, None)
        self._last_finished.pop(url, None)
