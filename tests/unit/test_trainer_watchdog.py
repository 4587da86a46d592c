"""The stall watchdog in one process: what a heartbeat holds, nesting, deadlines that end with their phase (no
false alarm), and a phase that overruns: stacks naming the stuck function, the report, the exit code.
The multi-process case (a collective one rank never enters) is tests/parallel/test_watchdog.py."""

import logging
import os
import random
import threading
import time

import pytest

from megatron_dapo.trainer.watchdog import STALL_EXIT_CODE, Watchdog, read_heartbeat


class Exits:
    """Records the exit codes the watchdog asks for, instead of ending the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


@pytest.fixture
def exits():
    return Exits()


@pytest.fixture
def make_watchdog(tmp_path, exits):
    made = []

    def make(rank: int = 0, world_size: int = 1, default_s: float = 60.0, **timeouts_s: float) -> Watchdog:
        made.append(
            Watchdog(
                tmp_path,
                rank=rank,
                world_size=world_size,
                timeouts_s=timeouts_s,
                default_timeout_s=default_s,
                on_stall=exits,
            )
        )
        return made[-1]

    yield make
    for watchdog in made:
        watchdog.close()


def test_a_heartbeat_says_where_the_rank_is(make_watchdog):
    rng = random.Random()
    rank, step, limit = rng.randrange(1, 64), rng.randrange(1, 10_000), rng.uniform(100, 1000)
    watchdog = make_watchdog(rank=rank, world_size=64, update=limit)
    before = time.time()
    with watchdog.phase("update", step, part="2/5"):
        beat = read_heartbeat(watchdog.heartbeat_path(rank))
    after = read_heartbeat(watchdog.heartbeat_path(rank))
    assert (beat.rank, beat.step, beat.phase, beat.part, beat.deadline_s) == (
        rank,
        step,
        "update",
        "2/5",
        limit,
    )
    assert beat.pid == os.getpid() and before <= beat.started <= time.time()
    assert beat.where() == f"update 2/5 of step {step}"
    assert (after.phase, after.step, after.deadline_s) == ("", step, 0)  # between phases, no deadline
    assert after.where() == f"between phases of step {step}"
    assert not list(watchdog.log_dir.glob("*.tmp"))  # written whole, then renamed


def test_nested_phases_inherit_the_step_and_the_outer_one_returns(make_watchdog):
    watchdog = make_watchdog(default_s=60.0, old_logprobs=30.0)
    step = random.randrange(1, 1000)
    with watchdog.phase("rollout", step):
        outer = read_heartbeat(watchdog.heartbeat_path(0))
        with watchdog.phase("old_logprobs"):  # as PolicyRole calls it: no step of its own
            inner = read_heartbeat(watchdog.heartbeat_path(0))
        back = read_heartbeat(watchdog.heartbeat_path(0))
    assert (inner.phase, inner.step, inner.deadline_s) == ("old_logprobs", step, 30.0)
    assert back == outer  # the outer phase again, with its own start and deadline


def test_a_phase_that_ends_in_time_cancels_its_deadline(make_watchdog, exits):
    watchdog = make_watchdog(default_s=60.0, weight_sync=0.3)
    with watchdog.phase("weight_sync", 1):
        time.sleep(0.05)
    with watchdog.phase("rollout", 1):  # a long deadline; the ended phase's must not fire within it
        assert not exits.called.wait(0.6)
    with watchdog.phase("weight_sync", 2):
        pass
    assert not exits.called.wait(0.6)  # between phases
    assert exits.codes == []


def test_many_short_phases_outlast_the_deadline_without_a_false_alarm(make_watchdog, exits):
    watchdog = make_watchdog(default_s=0.3)
    started = time.monotonic()
    for update in range(1, 16):
        with watchdog.phase("update", 4, part=f"{update}/15"):
            time.sleep(random.uniform(0.03, 0.08))
    assert time.monotonic() - started > 0.3  # together past the deadline, each within it
    assert not exits.called.wait(0.4) and exits.codes == []


def test_a_zero_deadline_never_fires(make_watchdog, exits):
    watchdog = make_watchdog(default_s=0.0)
    with watchdog.phase("save", 5):
        assert not exits.called.wait(0.5)
    assert read_heartbeat(watchdog.heartbeat_path(0)).deadline_s == 0


def _stuck_in_weight_sync(exits: Exits) -> None:
    exits.called.wait(10)  # the function the stacks must name


def test_an_overrun_dumps_the_stacks_reports_and_exits_with_the_stall_code(make_watchdog, exits, caplog):
    deadline = random.uniform(0.3, 0.6)
    watchdog = make_watchdog(default_s=60.0, weight_sync=deadline)
    started = time.monotonic()
    caplog.set_level(logging.ERROR, logger="megatron_dapo.train")
    with watchdog.phase("weight_sync", 3):
        _stuck_in_weight_sync(exits)
    waited = time.monotonic() - started
    assert exits.codes == [STALL_EXIT_CODE]
    assert deadline <= waited < deadline + 1.0
    stacks = watchdog.stacks_path(0).read_text()
    assert "rank 0 stalled in weight_sync of step 3" in stacks
    assert "_stuck_in_weight_sync" in stacks
    assert "Current thread 0x" in stacks and "\nThread 0x" in stacks  # the watchdog's and the main thread
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("STALL")]
    assert len(report) == 1
    assert report[0].startswith(f"STALL: weight_sync of step 3 ran past its {deadline:g} s deadline")
    assert "rank 0: weight_sync of step 3, past its" in report[0] and "Stacks (rank 0)" in report[0]


def test_rank_0_reports_every_rank_from_the_heartbeat_files(make_watchdog):
    ranks = [make_watchdog(rank=r, world_size=5, default_s=60.0) for r in range(4)]  # rank 4 never started
    with (
        ranks[0].phase("update", 7, part="3/8"),
        ranks[2].phase("update", 7, part="3/8"),
        ranks[1].phase("old_logprobs", 7),
    ):
        report = ranks[0].report(read_heartbeat(ranks[0].heartbeat_path(0)))
    assert "Where the ranks are (5): ranks 0,2: update 3/8 of step 7, in time (for up to 0 s)" in report
    assert "rank 1: old_logprobs of step 7, in time" in report
    assert "rank 3: between phases of step 0, in time" in report
    assert "rank 4: no heartbeat" in report and "Stacks (no rank)" in report


def test_a_heartbeat_that_cannot_be_written_is_a_warning_not_a_failure(make_watchdog, exits, caplog):
    watchdog = make_watchdog(default_s=0.3)
    watchdog.heartbeat_path(0).with_suffix(".json.tmp").mkdir()  # where the next heartbeat would be written
    with watchdog.phase("save", 9):
        pass
    assert read_heartbeat(watchdog.heartbeat_path(0)).phase == ""  # the old heartbeat stays whole
    assert "could not write its heartbeat" in caplog.text
    assert not exits.called.wait(0.5)  # the deadline still ended with the phase


def test_unwritable_stacks_go_to_stderr_and_the_process_still_exits(make_watchdog, exits, capfd):
    watchdog = make_watchdog(default_s=0.2)
    watchdog.stacks_path(0).mkdir()  # where the stacks would be appended
    with watchdog.phase("save", 2):
        _stuck_in_weight_sync(exits)
    assert exits.codes == [STALL_EXIT_CODE]
    assert "_stuck_in_weight_sync" in capfd.readouterr().err
