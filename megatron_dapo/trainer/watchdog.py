"""The stall watchdog: every phase of a step runs under a deadline, so that a job never hangs silently.

A daemon thread per rank watches the phases the loop enters (`with watchdog.phase("rollout", step): ...`).
Each phase change rewrites this rank's heartbeat file (step, phase, start time, deadline), so that a stuck job
can be read from the login node. When a phase passes its deadline, the rank dumps the Python stacks of all its
threads next to the heartbeats, rank 0 reads every rank's heartbeat and logs which phase stalled where (it
cannot rely on the others answering a collective), and the process exits with STALL_EXIT_CODE: the job is
requeued and resumes from its last complete checkpoint.
"""

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_dapo.config import DapoConfig

logger = logging.getLogger("megatron_dapo.train")

STALL_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; distinct from a crash (1) and a signal (128 + n)
# Phases that generate with the engine: their deadline is train.rollout_stall_timeout_s.
GENERATION_PHASES = ("rollout", "eval")
REPORT_WAIT_S = 10.0  # rank 0 waits up to this long for the other ranks' stacks before reporting


@dataclass(frozen=True)
class Heartbeat:
    """Where one rank is: what its heartbeat file holds (one line of JSON)."""

    rank: int
    host: str
    pid: int
    step: int
    phase: str  # "" between phases
    part: str  # which one of a repeated phase ("3/16": the third update of 16), or ""
    started: float  # Unix time the phase began
    deadline_s: float  # seconds the phase may run; 0: no deadline

    def where(self) -> str:
        phase = f"{self.phase} {self.part}".strip() or "between phases"
        return f"{phase} of step {self.step}"

    def overdue(self, now: float) -> bool:
        return bool(self.phase) and self.deadline_s > 0 and now - self.started > self.deadline_s


@dataclass
class _Phase:
    heartbeat: Heartbeat
    deadline: float | None  # time.monotonic() value, None: no deadline


class Watchdog:
    """Deadlines for the phases of a step on this rank, and the heartbeat file that says where the rank is."""

    def __init__(
        self,
        log_dir: Path,
        *,
        rank: int,
        world_size: int,
        timeouts_s: Mapping[str, float],
        default_timeout_s: float,
        on_stall: Callable[[int], None] = os._exit,  # tests observe the exit code instead of dying
    ) -> None:
        self.log_dir, self.rank, self.world_size = log_dir, rank, world_size
        self.timeouts_s, self.default_timeout_s = dict(timeouts_s), default_timeout_s
        self._exit = on_stall
        self._phases: list[_Phase] = []  # the innermost last
        self._step = 0
        self._closed = False
        self._stalled = False
        self._changed = threading.Condition()
        log_dir.mkdir(parents=True, exist_ok=True)
        self._write_heartbeat(self._heartbeat("", 0, ""))
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def heartbeat_path(self, rank: int) -> Path:
        return self.log_dir / f"heartbeat-rank{rank}.json"

    def stacks_path(self, rank: int) -> Path:
        return self.log_dir / f"stacks-rank{rank}.txt"

    @contextlib.contextmanager
    def phase(self, name: str, step: int | None = None, part: str = "") -> Iterator[None]:
        """Run the body under `name`'s deadline. `step` defaults to the latest step a phase named, so that
        the roles inside a step's phases need not know it."""
        self._step = self._step if step is None else step
        limit = self.timeouts_s.get(name, self.default_timeout_s)
        entered = _Phase(self._heartbeat(name, limit, part), time.monotonic() + limit if limit > 0 else None)
        with self._changed:
            self._phases.append(entered)
            self._changed.notify()
        self._write_heartbeat(entered.heartbeat)
        try:
            yield
        finally:
            self._leave(entered)

    def close(self) -> None:
        """Stop watching (the run ended, or failed with an error of its own)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _leave(self, entered: _Phase) -> None:
        with self._changed:
            stalled = self._stalled
            if not stalled:
                self._phases.remove(entered)
                self._changed.notify()
                current = self._phases[-1].heartbeat if self._phases else self._heartbeat("", 0, "")
        if stalled:
            # The body returned or failed (a collective whose peer exited) after the stall was declared:
            # the report and the exit are under way in the watchdog's thread.
            self._thread.join()
            return
        self._write_heartbeat(current)

    def _heartbeat(self, phase: str, deadline_s: float, part: str) -> Heartbeat:
        return Heartbeat(
            rank=self.rank,
            host=socket.gethostname(),
            pid=os.getpid(),
            step=self._step,
            phase=phase,
            part=part,
            started=time.time(),
            deadline_s=deadline_s,
        )

    def _write_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Atomically: a reader on another node sees the old file or the new one, never half of one."""
        path = self.heartbeat_path(self.rank)
        partial = path.with_suffix(".json.tmp")
        try:
            partial.write_text(json.dumps(asdict(heartbeat)) + "\n")
            os.replace(partial, path)
        except OSError as err:  # a full or flaky shared disk: the heartbeat is a diagnostic, not worth a run
            logger.warning("rank %d: could not write its heartbeat %s: %s", self.rank, path, err)

    def _watch(self) -> None:
        expired = self._wait_for_expiry()
        if expired is not None:
            self._stall(expired)

    def _wait_for_expiry(self) -> Heartbeat | None:
        """The outermost phase past its deadline, or None once closed; sleeps until the nearest deadline."""
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                timed = [p for p in self._phases if p.deadline is not None]
                expired = [p for p in timed if p.deadline <= now]
                if expired:
                    self._stalled = True
                    return expired[0].heartbeat
                self._changed.wait(min(p.deadline for p in timed) - now if timed else None)
        return None

    def _stall(self, expired: Heartbeat) -> None:
        """Stacks to this rank's file; on rank 0, the report of every rank; then exit for a requeue, whatever
        failed on the way (an exception here must not leave the process hanging)."""
        try:
            self._dump_stacks(expired)
            if self.rank == 0:
                self._wait_for_stacks(since=expired.started)
                logger.error("%s", self.report(expired))
        finally:
            for handler in logging.getLogger().handlers + logger.handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(STALL_EXIT_CODE)

    def _dump_stacks(self, expired: Heartbeat) -> None:
        stacks = self.stacks_path(self.rank)
        try:
            with stacks.open("a") as out:
                out.write(f"=== {time.ctime()}: rank {self.rank} stalled in {expired.where()} ===\n")
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError as err:  # the log directory is unwritable: the job's output still gets them
            logger.error("rank %d: could not write %s (%s); stacks on stderr", self.rank, stacks, err)
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            return
        logger.error(
            "rank %d: %s ran past its %g s deadline; stacks of every thread in %s",
            self.rank, expired.where(), expired.deadline_s, stacks,
        )  # fmt: skip

    def _wait_for_stacks(self, since: float) -> None:
        """The other ranks dump their stacks when their own deadline passes, seconds apart at most."""
        give_up = time.monotonic() + REPORT_WAIT_S
        while time.monotonic() < give_up and len(self._ranks_with_stacks(since)) < self.world_size:
            time.sleep(0.1)

    def _ranks_with_stacks(self, since: float) -> list[int]:
        return [
            r
            for r in range(self.world_size)
            if self.stacks_path(r).exists() and self.stacks_path(r).stat().st_mtime >= since
        ]

    def report(self, expired: Heartbeat) -> str:
        """Which phase stalled, where every rank is (from the heartbeat files) and what to do."""
        now = time.time()
        places: dict[str, list[int]] = {}
        longest: dict[str, float] = {}
        for rank in range(self.world_size):
            beat = read_heartbeat(self.heartbeat_path(rank))
            if beat is None:
                place = "no heartbeat"
            else:
                state = f"past its {beat.deadline_s:g} s deadline" if beat.overdue(now) else "in time"
                place = f"{beat.where()}, {state}"
                longest[place] = max(longest.get(place, 0.0), now - beat.started)
            places.setdefault(place, []).append(rank)
        where = "; ".join(
            f"{_ranks(ranks)}: {place}" + (f" (for up to {longest[place]:.0f} s)" if place in longest else "")
            for place, ranks in places.items()
        )
        with_stacks = _ranks(self._ranks_with_stacks(expired.started))
        return (
            f"STALL: {expired.where()} ran past its {expired.deadline_s:g} s deadline. Where the ranks "
            f"are ({self.world_size}): {where}. Stacks ({with_stacks}): "
            f"{self.log_dir}/stacks-rank*.txt. Exiting with code {STALL_EXIT_CODE}; run the same command "
            "to resume from the last complete checkpoint."
        )


def read_heartbeat(path: Path) -> Heartbeat | None:
    """A rank's heartbeat, or None when there is none to read (the rank never started, or the file is from
    another version or damaged: the report goes on without it)."""
    try:
        return Heartbeat(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "ranks 0-2,5,7-8": readable for hundreds of ranks; [3] -> "rank 3"."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    listed = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return {0: "no rank", 1: f"rank {listed}"}.get(len(ranks), f"ranks {listed}")


def watchdog_for(cfg: DapoConfig, *, rank: int, world_size: int) -> Watchdog:
    """The run's watchdog: files in logging.dir/logs/watchdog/, deadlines from train.*stall_timeout_s."""
    t = cfg.train
    return Watchdog(
        Path(cfg.logging.dir) / "logs" / "watchdog",
        rank=rank,
        world_size=world_size,
        timeouts_s=dict.fromkeys(GENERATION_PHASES, t.rollout_stall_timeout_s),
        default_timeout_s=t.stall_timeout_s,
    )
