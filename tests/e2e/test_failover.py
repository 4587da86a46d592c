"""Chaos: a short training run on two CPU engines, one of which is killed with SIGKILL at a random moment,
twice. The run finishes, every step has its full batch, and the metrics show each failure and restart."""

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from megatron_dapo.rollout.launcher import CPU_ENGINE_MODULE
from tests.helpers.demo_run import ENV, REPO, read_steps, train_command

pytestmark = pytest.mark.slow

# Steps take 0.2 to 2 s here. An engine killed in step k is found out by step k + 1's check at the latest,
# restarted there, synced at its end and back in dispatch from step k + 2: the other may die only then (two
# servers survive one failure at a time). Enough steps remain after the second kill for its restart.
STEPS = 14
KILLS = 2
PROMPTS_PER_STEP = 4  # the FAST settings of train_command: 4 prompts x 4 samples, 2 updates of 8 samples


def test_an_engine_killed_mid_step_is_restarted_and_no_step_loses_its_batch(demo_inputs, tmp_path):
    steps, output = _run_with_kills(demo_inputs, tmp_path, KILLS)
    for step in range(1, STEPS + 1):
        metrics = steps[step]
        groups = sum(metrics[f"sampling/groups_{name}"] for name in ("kept", "carried_in"))
        assert groups - metrics["sampling/groups_carried_out"] == PROMPTS_PER_STEP, (step, metrics)
        assert metrics["train/updates"] == 2, (step, metrics)
    failures = sum(steps[step]["rollout/server_failures"] for step in range(1, STEPS + 1))
    restarts = sum(steps[step]["rollout/server_restarts"] for step in range(1, STEPS + 1))
    assert failures == restarts == KILLS, (failures, restarts)
    assert "taken out of dispatch" in output and "restarted" in output


def test_in_deterministic_mode_the_kills_change_no_metric(demo_inputs, tmp_path):
    """A moved sample starts over on the other engine with the same seed and weights: same tokens."""
    deterministic = ("train.deterministic=true", "rollout.max_running_requests=1")
    undisturbed, _ = _run_with_kills(demo_inputs, tmp_path / "undisturbed", 0, *deterministic)
    disturbed, _ = _run_with_kills(demo_inputs, tmp_path / "disturbed", KILLS, *deterministic)
    assert sum(metrics.get("rollout/server_restarts", 0) for metrics in disturbed.values()) == KILLS
    for step in range(STEPS + 1):
        expected, found = _comparable(undisturbed[step]), _comparable(disturbed[step])
        assert found == expected, (
            step,
            {k: (expected.get(k), v) for k, v in found.items() if v != expected.get(k)},
        )


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a kill may not change: all but times, speeds and the failure counters."""
    return {
        name: value
        for name, value in metrics.items()
        if not name.startswith(("timing/", "rollout/server_", "weight_sync/")) and "per_s" not in name
    }


def _run_with_kills(
    demo_inputs: dict[str, Path], tmp_path: Path, kills: int, *overrides: str
) -> tuple[dict[int, dict[str, float]], str]:
    """A run of STEPS steps on two engines, `kills` of which are killed one after the other: its metrics by
    step and its output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    command = train_command(
        demo_inputs,
        run_dir,
        f"train.steps={STEPS}",
        "rollout.num_servers=2",
        "eval.every_steps=0",
        *overrides,
    )
    log = tmp_path / "train.log"
    with log.open("w") as out:
        trainer = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            kill_steps = []
            for kill in range(kills):
                ready = _back_in_dispatch(kill) if kill else lambda steps: 1 in steps
                kill_steps.append(_kill_engine_after(ready, trainer, run_dir))
            code = trainer.wait(timeout=600)
        finally:
            trainer.kill()
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert all(step is not None and step <= STEPS - 3 for step in kill_steps), (kill_steps, output[-3000:])
    steps = read_steps(run_dir)
    assert sorted(steps) == list(range(STEPS + 1))  # 0: the baseline evaluation
    return steps, output


def _back_in_dispatch(restarts: int) -> Callable[[dict[int, dict[str, float]]], bool]:
    """Whether the logged steps show `restarts` restarts and a step begun after the last of them."""

    def ready(steps: dict[int, dict[str, float]]) -> bool:
        total = 0.0
        for step in sorted(steps):
            total += steps[step].get("rollout/server_restarts", 0.0)
            if total >= restarts:
                return step + 1 in steps
        return False

    return ready


def _kill_engine_after(
    condition: Callable[[dict[int, dict[str, float]]], bool], trainer: subprocess.Popen, run_dir: Path
) -> int | None:
    """Once the logged steps meet `condition`, SIGKILL one of the trainer's two engines after a random
    delay; the last step logged before the kill (None: the run ended first)."""
    while not condition(steps := _logged_steps(run_dir)):
        if trainer.poll() is not None:
            return None
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    engines = [child for child in psutil.Process(trainer.pid).children(recursive=True) if _is_engine(child)]
    assert len(engines) == 2, f"live engines before a kill: {engines}"
    os.kill(random.choice(engines).pid, signal.SIGKILL)
    return max(_logged_steps(run_dir), default=max(steps, default=0))


def _is_engine(process: psutil.Process) -> bool:
    """A live CPU engine (a killed one stays a zombie until the trainer restarts it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE and CPU_ENGINE_MODULE in process.cmdline()
    except psutil.Error:  # ended meanwhile
        return False


def _logged_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    try:
        return read_steps(run_dir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half written
        return {}
