"""`python -m megatron_dapo.train` against a rollout server that accepts connections and never answers: the
real trainer stalls in its first weight sync, dumps its stacks, reports the phase and exits with the
watchdog's code instead of waiting forever."""

import socket

import pytest

from megatron_dapo.trainer.watchdog import STALL_EXIT_CODE, read_heartbeat
from tests.helpers.demo_run import run, train_command

pytestmark = pytest.mark.slow


def test_a_server_that_never_answers_stops_the_trainer_with_the_stall_code(demo_inputs, tmp_path):
    run_dir = tmp_path / "run"
    with socket.socket() as silent:  # the kernel completes connections into the backlog; nobody reads them
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        command = train_command(
            demo_inputs, run_dir, f"rollout.server_urls=[{url}]", "train.stall_timeout_s=3"
        )
        code, output = run(command, tmp_path / "train.log", timeout_s=240)
    assert code == STALL_EXIT_CODE, output[-4000:]
    assert "STALL: weight_sync of step 0 ran past its 3 s deadline" in output  # the sync at start
    assert "rank 0: weight_sync of step 0, past its 3 s deadline" in output
    watchdog = run_dir / "logs" / "watchdog"
    beat = read_heartbeat(watchdog / "heartbeat-rank0.json")
    assert (beat.phase, beat.step, beat.deadline_s) == ("weight_sync", 0, 3.0)
    stacks = (watchdog / "stacks-rank0.txt").read_text()
    assert "stalled in weight_sync of step 0" in stacks and "in sync_weights" in stacks  # Trainer's frame
