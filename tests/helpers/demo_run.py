"""Training runs on the demo's setup, small: a warm-started tiny model cached across sessions, its data, the
`python -m megatron_dapo.train` command, and its metrics read back (the trainer and demo e2e tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems, write_jsonl
from megatron_dapo.demo.warm_start import EVAL_SEED, WarmStartSettings, warm_start

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo_cpu.yaml"
# Small and quick (about 15 s once, then cached): 2-operand sums, right on about a quarter of its samples.
TEST_WARM_START = WarmStartSettings(task=ArithmeticTask(max_operands=2), sft_steps=150, answer_line_rate=0.5)
# One thread per process, as the demo runs: the trainer and its engine share the machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = [
    "train.prompts_per_step=4",
    "algorithm.samples_per_prompt=4",
    "train.samples_per_minibatch=8",  # two updates per step
    "train.tokens_per_microbatch=256",
    "rollout.max_response_tokens=16",
    "algorithm.overlong_buffer_tokens=4",
    "optimizer.lr=3.0e-4",
    "eval.samples_per_problem=2",
    "logging.progress_bar=false",
]


def make_demo_inputs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The warm-started model (in pytest's cache: trained once per machine) and train / eval problems."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = request.config.cache.mkdir("megatron_dapo_warm_start")
        model = warm_start(cache, TEST_WARM_START, eval_prompts=16, samples_per_prompt=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    data = tmp_path_factory.mktemp("demo_data")
    held_out = generate_problems(TEST_WARM_START.task, 16, seed=EVAL_SEED)
    return {
        "model": model,
        "train": write_jsonl(generate_problems(TEST_WARM_START.task, 2000, seed=1), data / "train.jsonl"),
        "eval": write_jsonl(held_out, data / "eval.jsonl"),
    }


def train_command(inputs: dict[str, Path], run_dir: Path, *overrides: str) -> list[str]:
    """The trainer's command line on `inputs` (make_demo_inputs), writing to `run_dir`; overrides last."""
    paths = [
        f"model.hf_path={inputs['model']}",
        f"data.train_path={inputs['train']}",
        f"eval.path={inputs['eval']}",
        f"logging.dir={run_dir}",
    ]
    return [
        sys.executable,
        "-m",
        "megatron_dapo.train",
        "--config",
        str(DEMO_CONFIG),
        *paths,
        *FAST,
        *overrides,
    ]


def run(command: list[str], log: Path, timeout_s: float = 300) -> tuple[int, str]:
    """(exit code, output). Output goes through a file, not a pipe: torch's shared-memory manager, which the
    weight payloads start, inherits the trainer's output and outlives it while an engine maps its files."""
    with log.open("w") as out:
        code = subprocess.run(
            command, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO
        )
    return code.returncode, log.read_text()


def read_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as step -> every metric logged at that step (a step may span several lines)."""
    steps: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record.pop("step"), {}).update(record)
    return steps
