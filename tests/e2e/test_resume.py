"""A run that is stopped (SIGUSR1: checkpoint and clean exit) and resumed, then killed (SIGKILL, at a random
moment) and resumed again, logs exactly the metrics of a run that was never interrupted, timings aside. The
stop falls on a step that carries groups over, so a resume restores them.

What makes a CPU run repeatable: train.deterministic=true (groups taken in submission order, the surplus
awaited rather than aborted), a seed on every request, and one CPU engine started with
--max-running-requests 1, shared by all the runs here: a sequence decoded alone cannot depend on which other
requests share its batch, as float rounding otherwise makes it. Every run pushes its own weights into the
engine before its first rollout, so none sees weights another run left there.
"""

import asyncio
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from tests.helpers.demo_run import ENV, read_steps, run, train_command

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def engine_url(demo_inputs, tmp_path_factory):
    spec = ServerSpec(
        model_path=str(demo_inputs["model"]),
        port=free_port(),
        engine="cpu",
        extra_args=("--max-running-requests", "1"),
        log_file=str(tmp_path_factory.mktemp("engine") / "engine.log"),
        env={"OMP_NUM_THREADS": "1"},
    )
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    yield pool.urls[0]
    pool.stop()


def command(inputs, run_dir: Path, engine_url: str, *overrides: str) -> list[str]:
    return train_command(
        inputs,
        run_dir,
        *overrides,
        f"rollout.server_urls=[{engine_url}]",
        "train.deterministic=true",
        "optimizer.distributed=true",  # megatron's DistributedOptimizer state, saved and resumed on CPU
        f"train.steps={STEPS}",
        "checkpoint.save_every_steps=1",
        "eval.every_steps=2",
    )


def without_timings(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every metric of every step except wall-clock ones."""
    return {
        step: {name: value for name, value in metrics.items() if not _is_timing(name)}
        for step, metrics in read_steps(run_dir).items()
    }


def _is_timing(name: str) -> bool:
    return name.startswith("timing/") or "second" in name  # weight_sync/seconds, .../gigabytes_per_second


def wait_for(condition, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited with {process.returncode} too early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for training:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def logged_step(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and f'"step": {step},' in path.read_text()


# Overlapped (asynchronous DAPO): the next step's batch, collected while a step trains, is in its checkpoint.
@pytest.mark.parametrize(
    "mode", [(), ("rollout.max_staleness=1", "rollout.partial=true")], ids=["sync", "async"]
)
def test_stopped_and_killed_runs_resume_to_the_metrics_of_an_uninterrupted_run(
    demo_inputs, engine_url, tmp_path, mode
):
    reference = tmp_path / "reference"
    code, output = run(command(demo_inputs, reference, engine_url, *mode), tmp_path / "reference.log")
    assert code == 0, output[-4000:]
    expected = without_timings(reference)
    assert sorted(expected) == list(range(STEPS + 1))
    carrying = [s for s in range(1, STEPS) if expected[s]["sampling/groups_carried_out"] > 0]
    assert carrying, "no step carries groups over: the test would not cover resuming them"
    if mode:
        assert all(expected[s]["rollout/staleness_max"] == 1 for s in range(2, STEPS + 1))

    interrupted = tmp_path / "interrupted"
    cmd = command(demo_inputs, interrupted, engine_url, *mode)
    # 1. SIGUSR1 during the first step that carries groups over: its checkpoint holds them.
    log = tmp_path / "stopped.log"
    with log.open("w") as output:
        process = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=output)
        # the stop handler is installed before the first weight sync, which the log announces
        wait_for(lambda: "weight sync v0" in log.read_text(), process, log)
        wait_for(lambda: logged_step(interrupted, carrying[0] - 1), process, log)
        process.send_signal(signal.SIGUSR1)
        assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert "stopped by SIGUSR1 after step" in log.read_text(), log.read_text()[-3000:]
    stopped_at = max(read_steps(interrupted))
    assert stopped_at == carrying[0]
    assert (interrupted / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()

    # 2. The same command resumes; SIGKILL at a random moment of it.
    kill_delay_s = random.Random().uniform(0.0, 3.0)
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=output)
        wait_for(lambda: f"(step {stopped_at})" in log.read_text(), process, log)  # resumed
        time.sleep(kill_delay_s)
        process.kill()
        process.wait()

    # 3. And resumes again, to the end.
    code, output = run(cmd, tmp_path / "resumed.log")
    assert code == 0, output[-4000:]
    got = without_timings(interrupted)
    where = f"(SIGKILL {kill_delay_s:.2f} s after resuming from step {stopped_at})"
    assert sorted(got) == sorted(expected), where
    for step in sorted(expected):
        differing = {
            name: (got[step].get(name), value)
            for name, value in expected[step].items()
            if got[step].get(name) != value
        }
        assert not differing and got[step].keys() == expected[step].keys(), (
            f"step {step} {where}: {differing}"
        )


def test_two_data_parallel_ranks_train_as_one(demo_inputs, engine_url, tmp_path):
    """DP=2 (each rank receiving its own share of the step as tensors) logs the rollouts of DP=1 exactly and
    its updates to float rounding: the same samples, split differently, under one token-level denominator."""
    runs = {}
    for ranks in (1, 2):
        run_dir = tmp_path / f"dp{ranks}"
        cmd = command(demo_inputs, run_dir, engine_url)
        cmd = [*cmd, "train.steps=2", "checkpoint.save_every_steps=0", "eval.every_steps=0"]
        if ranks == 2:  # cmd[1:] is "-m megatron_dapo.train ...", which torchrun takes as it is
            cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd[1:]]
        code, output = run(cmd, tmp_path / f"dp{ranks}.log")
        assert code == 0, output[-4000:]
        runs[ranks] = without_timings(run_dir)
    assert sorted(runs[1]) == sorted(runs[2]) == [0, 1, 2]  # step 0: the evaluation before training
    assert runs[1][0] == runs[2][0]
    for step in (1, 2):
        one, two = runs[1][step], runs[2][step]
        rollout = [name for name in one if name.startswith(("rollout/", "sampling/"))]
        assert rollout and {k: one[k] for k in rollout} == {k: two[k] for k in rollout}
        for name in ("train/loss", "train/grad_norm", "train/entropy"):
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), (step, name)
