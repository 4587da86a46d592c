"""Chaos: a short training run on two CPU engines, one of which is killed with SIGKILL at a random moment
of a step, twice. The run finishes, every step has its full batch, and the metrics show each failure and
restart."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megatron_dapo.rollout.launcher import CPU_ENGINE_MODULE
from tests.e2e.test_train import ENV, REPO, make_demo_inputs, read_steps, train_command

pytestmark = pytest.mark.slow

STEPS = 8  # the second kill is found out, restarted and logged before the end
# One kill during each. An engine killed in step k is found out by the check before step k + 1 at the
# latest, restarted there, synced at its end and back in dispatch for step k + 2: the other may die in k + 3.
KILL_DURING_STEPS = (2, 5)
PROMPTS_PER_STEP = 4  # train_command's FAST settings: 4 prompts x 4 samples, 2 updates of 8 samples


@pytest.fixture(scope="module")
def demo_inputs(request, tmp_path_factory) -> dict[str, Path]:
    return make_demo_inputs(request, tmp_path_factory)


def test_an_engine_killed_mid_step_is_restarted_and_no_step_loses_its_batch(demo_inputs, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(
        demo_inputs, run_dir, f"train.steps={STEPS}", "rollout.num_servers=2", "eval.every_steps=0"
    )
    log = tmp_path / "train.log"
    with log.open("w") as out:
        trainer = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            killed = [_kill_during(step, trainer, run_dir) for step in KILL_DURING_STEPS]
            code = trainer.wait(timeout=600)
        finally:
            trainer.kill()
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert all(killed), f"no engine was killed during step {KILL_DURING_STEPS}: {killed}\n{output[-3000:]}"

    steps = read_steps(run_dir)
    assert sorted(steps) == list(range(STEPS + 1))  # 0: the baseline evaluation
    for step in range(1, STEPS + 1):
        metrics = steps[step]
        groups = sum(metrics[f"sampling/groups_{name}"] for name in ("kept", "carried_in"))
        assert groups - metrics["sampling/groups_carried_out"] == PROMPTS_PER_STEP, (step, metrics)
        assert metrics["train/updates"] == 2, (step, metrics)
    failures = sum(steps[step]["rollout/server_failures"] for step in range(1, STEPS + 1))
    restarts = sum(steps[step]["rollout/server_restarts"] for step in range(1, STEPS + 1))
    assert failures == restarts == len(KILL_DURING_STEPS), (failures, restarts)
    assert "taken out of dispatch" in output and "restarted" in output


def _kill_during(step: int, trainer: subprocess.Popen, run_dir: Path) -> int | None:
    """Once step - 1 is logged, SIGKILL one of the trainer's two engines after a random delay (a step takes
    about a second here); its pid."""
    while step - 1 not in _logged_steps(run_dir):
        if trainer.poll() is not None:
            return None
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    engines = [child for child in psutil.Process(trainer.pid).children(recursive=True) if _is_engine(child)]
    assert len(engines) == 2, f"before step {step}'s kill, live engines: {engines}"
    victim = random.choice(engines)
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def _is_engine(process: psutil.Process) -> bool:
    """A live CPU engine (a killed one stays a zombie until the trainer restarts it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE and CPU_ENGINE_MODULE in process.cmdline()
    except psutil.Error:  # ended meanwhile
        return False


def _logged_steps(run_dir: Path) -> set[int]:
    return set(read_steps(run_dir)) if (run_dir / "metrics.jsonl").exists() else set()
