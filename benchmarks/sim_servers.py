"""Simulated SGLang servers with a long tail, for benchmarks/async_rollout.py.

Each server decodes its running sequences in lockstep: one decode step gives every sequence one token and
takes the planner's `ServerSpeed.step_s(n)` for n sequences (megatron_dapo/plan/decode.py), so a server
left with a few long samples is slow per GPU, and the last sample of a step decodes alone. Admitting a
sequence stalls the server for the prefill of its prompt and, for a resumed partial sample, of the tokens
it already has. A weight update pauses every server; running sequences either continue in place under the
new weights or, with partial rollouts, are interrupted and re-admitted (prefill again) ahead of the queue.
Event-driven: time jumps from one finishing sample to the next.
"""

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from dynamic_sampling import Group

from megatron_dapo.plan import ServerSpeed


@dataclass(frozen=True)
class ServerModel:
    speed: ServerSpeed  # the planner's decode step time, and the sequences a server runs at once
    prefill_s_per_token: float  # the server stalls this long per prefilled token
    prompt_tokens: int  # prefilled for every admission, with the sample's own tokens if it resumes

    @property
    def capacity(self) -> int:
        return self.speed.capacity

    def full_tokens_per_s(self) -> float:
        return self.speed.tokens_per_s(self.capacity)


@dataclass(eq=False)
class Flight:
    """One prompt's group on its way through the engine; `oldest` is the weight version of its first token."""

    group: Group
    samples: list["Sample"] = field(default_factory=list)
    finished: int = 0
    oldest: int | None = None  # None until a sample starts

    def tokens(self) -> float:
        return sum(s.done for s in self.samples)


@dataclass(eq=False)
class Sample:
    """A response: its tokens so far split by the weight version that generated them."""

    flight: Flight
    length: int  # tokens when finished
    done: float = 0.0  # tokens in closed segments
    segments: list[tuple[int, float]] = field(default_factory=list)  # (weight version, tokens)
    version: int = -1  # of the open segment
    since: float = 0.0  # the server's decode clock when the open segment began

    def open(self, clock: float, version: int) -> None:
        self.version, self.since = version, clock
        if self.flight.oldest is None:
            self.flight.oldest = version  # versions only grow: the first token is the oldest

    def close(self, clock: float) -> None:
        self.segments.append((self.version, clock - self.since))
        self.done += clock - self.since


_serial = itertools.count()  # tie-break for samples finishing at the same decode step


class Server:
    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self.running: list[tuple[float, int, Sample]] = []  # heap of (finish clock, serial, sample)
        self.clock = 0.0  # decode steps since the start
        self.t = 0.0  # wall time the clock was last brought to
        self.busy_until = 0.0  # decoding stalls until then (prefill, loading weights)
        self.idle_s = 0.0  # time with nothing to decode, or paused for weights
        self.generated = 0.0  # tokens decoded
        self.stamp = 0  # invalidates this server's older entries in the engine's event heap

    def step_s(self) -> float:
        return self.model.speed.step_s(len(self.running))

    def advance(self, now: float) -> None:
        """Bring the decode clock to `now` (the running set has not changed since `self.t`)."""
        if not self.running:
            self.idle_s += now - self.t
        else:
            start = max(self.t, self.busy_until)
            if now > start:
                steps = (now - start) / self.step_s()
                self.clock += steps
                self.generated += steps * len(self.running)
        self.t = now

    def next_finish(self) -> float:
        if not self.running:
            return math.inf
        return max(self.t, self.busy_until) + (self.running[0][0] - self.clock) * self.step_s()

    def admit(self, sample: Sample, now: float, version: int) -> None:
        prefill = (self.model.prompt_tokens + sample.done) * self.model.prefill_s_per_token
        self.busy_until = max(self.busy_until, now) + prefill
        sample.open(self.clock, version)
        finish = self.clock + sample.length - sample.done
        heapq.heappush(self.running, (finish, next(_serial), sample))


class Engine:
    """`servers` servers sharing one queue; samples go to the server with a free slot."""

    def __init__(self, servers: int, model: ServerModel) -> None:
        self.model = model
        self.servers = [Server(model) for _ in range(servers)]
        self.queue: deque[Sample] = deque()
        self.version = 0  # of the weights the servers hold
        self.events: list[tuple[float, int, int]] = []  # (time, server index, stamp)

    def submit(self, group: Group, now: float) -> Flight:
        flight = Flight(group)
        flight.samples = [Sample(flight, int(n)) for n in group.lengths]
        self.queue.extend(flight.samples)
        self.fill(now)
        return flight

    def fill(self, now: float) -> None:
        """Queued samples to the least-loaded servers first."""
        order = sorted(range(len(self.servers)), key=lambda i: len(self.servers[i].running))
        for i in order:
            if not self.queue:
                return
            if len(self.servers[i].running) < self.model.capacity:
                self.servers[i].advance(now)
                self._fill(i, now)

    def _fill(self, i: int, now: float) -> None:
        server = self.servers[i]
        while self.queue and len(server.running) < self.model.capacity:
            server.admit(self.queue.popleft(), now, self.version)
        self._schedule(i)

    def _schedule(self, i: int) -> None:
        server = self.servers[i]
        server.stamp += 1
        when = server.next_finish()
        if when < math.inf:
            heapq.heappush(self.events, (when, i, server.stamp))

    def next_time(self) -> float:
        while self.events and self.events[0][2] != self.servers[self.events[0][1]].stamp:
            heapq.heappop(self.events)
        return self.events[0][0] if self.events else math.inf

    def pop_finished(self) -> tuple[float, list[Sample]]:
        """Advance to the next finishing sample; return the time and the samples that finished then."""
        self.next_time()
        now, i, _ = heapq.heappop(self.events)
        server = self.servers[i]
        server.advance(now)
        server.clock = server.running[0][0]  # exact, whatever the float rounding of advance
        finished = []
        while server.running and server.running[0][0] <= server.clock + 1e-6:
            sample = heapq.heappop(server.running)[2]
            sample.close(server.clock)
            finished.append(sample)
        self._fill(i, now)
        return now, finished

    def advance_all(self, now: float) -> None:
        for server in self.servers:
            server.advance(now)

    def update_weights(self, now: float, pause_s: float, version: int, interrupt: bool) -> None:
        """Pause every server for `pause_s`, load `version`; running samples continue in place, or with
        `interrupt` (partial rollouts) leave their server and are re-admitted ahead of the queue."""
        if interrupt:
            self.interrupt_all(now)
        for server in self.servers:
            server.advance(now)
            for _, _, sample in server.running:
                sample.close(server.clock)
                sample.open(server.clock, version)
            server.busy_until = max(server.busy_until, now) + pause_s
        self.version = version
        for i, server in enumerate(self.servers):
            self._fill(i, now)
            if server.running:  # holding sequences but not decoding (an empty server's advance counts it)
                server.idle_s += pause_s

    def interrupt_all(self, now: float) -> None:
        """Every running sample leaves its server, keeping its tokens, and waits first in the queue (to be
        continued after a prefill of its prompt and tokens). Colocated, the GPUs then go to training."""
        interrupted = []
        for i, server in enumerate(self.servers):
            server.advance(now)
            for _, _, sample in sorted(server.running):
                sample.close(server.clock)
                interrupted.append(sample)
            server.running = []
            self._schedule(i)
        self.queue.extendleft(reversed(interrupted))

    def cancel(self, flights: Iterable[Flight], now: float) -> None:
        """Abort every sample of `flights`, running or queued; their tokens stay counted in `done`."""
        doomed = set(flights)
        if not doomed:
            return
        self.queue = deque(s for s in self.queue if s.flight not in doomed)
        for i, server in enumerate(self.servers):
            if not any(entry[2].flight in doomed for entry in server.running):
                continue
            server.advance(now)
            kept = []
            for entry in server.running:
                if entry[2].flight in doomed:
                    entry[2].close(server.clock)
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            server.running = kept
            self._fill(i, now)
