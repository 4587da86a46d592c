"""A gloo collective that one rank never enters: both ranks dump their stacks, rank 0 names the phase and the
ranks, and both exit with the watchdog's code within the deadline. The processes exit, so they are spawned
here rather than in tests/helpers/distributed_pool.py's pool."""

import json
import logging
import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from megatron_dapo.trainer.watchdog import STALL_EXIT_CODE, Watchdog, read_heartbeat

DEADLINE_S = 3.0
STEP = 3


def _wait_in_all_reduce() -> None:
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(4))  # rank 1 never joins


def _sleep_instead_of_all_reduce() -> None:
    time.sleep(60)


def _rank(rank: int, run_dir: Path) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    logging.basicConfig(filename=run_dir / f"rank{rank}.log", level=logging.INFO)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{run_dir / 'rendezvous'}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=120),  # far beyond the watchdog's deadline
    )
    dist.barrier()
    watchdog = Watchdog(
        run_dir / "logs",
        rank=rank,
        world_size=2,
        timeouts_s={"weight_sync": DEADLINE_S},
        default_timeout_s=600.0,
    )
    # Rank 1 starts its phase a moment later, so that rank 0's deadline passes first: were rank 1 to exit
    # first, gloo would end rank 0's all_reduce with a connection error before its own deadline.
    time.sleep(0.5 * rank)
    with watchdog.phase("weight_sync", STEP):
        _wait_in_all_reduce() if rank == 0 else _sleep_instead_of_all_reduce()
    os._exit(0)  # unreachable while the watchdog works; the test expects STALL_EXIT_CODE


@pytest.mark.slow
def test_a_collective_one_rank_never_enters_is_reported_with_both_stacks(tmp_path):
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank, args=(rank, tmp_path), daemon=True) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=90)  # includes starting Python and importing torch on a busy machine
        codes = [process.exitcode for process in processes]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    ended = time.time()
    assert codes == [STALL_EXIT_CODE, STALL_EXIT_CODE]
    logs = tmp_path / "logs"
    beats = [read_heartbeat(logs / f"heartbeat-rank{rank}.json") for rank in range(2)]
    assert [(b.rank, b.step, b.phase, b.deadline_s) for b in beats] == [
        (rank, STEP, "weight_sync", DEADLINE_S) for rank in range(2)
    ]
    entered = max(b.started for b in beats)
    assert ended - beats[0].started > DEADLINE_S and ended - entered < 20
    assert json.loads((logs / "heartbeat-rank1.json").read_text())["pid"] == processes[1].pid
    stacks = [(logs / f"stacks-rank{rank}.txt").read_text() for rank in range(2)]
    assert f"stalled in weight_sync of step {STEP}" in stacks[0] and "all_reduce" in stacks[0]
    assert "_wait_in_all_reduce" in stacks[0]
    assert "_sleep_instead_of_all_reduce" in stacks[1] and "all_reduce" not in stacks[1].replace(
        "_sleep_instead_of_all_reduce", ""
    )
    report = (tmp_path / "rank0.log").read_text()
    assert f"STALL: weight_sync of step {STEP} ran past its 3 s deadline" in report
    assert f"ranks 0-1: weight_sync of step {STEP}, past its 3 s deadline" in report
    assert "Stacks (ranks 0-1)" in report and f"exiting with code {STALL_EXIT_CODE}" in report.lower()
    assert "STALL" not in (tmp_path / "rank1.log").read_text()  # one report, from rank 0
