"""`python -m megatron_dapo.train` end to end on the demo's setup, small: three steps that write metrics and a
checkpoint that converts to Hugging Face, and a bad dataset refused before anything starts.

The helpers here (a warm-started tiny model cached across sessions, its data, the command) serve the other
trainer e2e tests too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems, write_jsonl
from megatron_dapo.demo.warm_start import EVAL_SEED, WarmStartSettings, warm_start

pytestmark = pytest.mark.slow

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


def make_demo_inputs(request, tmp_path_factory) -> dict[str, Path]:
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


@pytest.fixture(scope="module")
def demo_inputs(request, tmp_path_factory) -> dict[str, Path]:
    return make_demo_inputs(request, tmp_path_factory)


def train_command(inputs: dict[str, Path], run_dir: Path, *overrides: str) -> list[str]:
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


def test_three_steps_log_metrics_and_save_a_checkpoint_that_converts(demo_inputs, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(
        demo_inputs, run_dir, "train.steps=3", "checkpoint.save_every_steps=3", "eval.every_steps=3"
    )
    # rollout.server_urls is empty: the trainer launches and stops its own engine
    code, output = run(command, tmp_path / "train.log")
    assert code == 0, output[-4000:]

    steps = read_steps(run_dir)
    assert sorted(steps) == [0, 1, 2, 3]
    assert "eval/avg@2" in steps[0] and "eval/avg@2" in steps[3]  # baseline and final evaluation
    for step in (1, 2, 3):
        metrics = steps[step]
        assert metrics["train/updates"] == 2 and metrics["train/updates_skipped"] == 0
        assert 0 < metrics["rollout/accuracy_kept"] < 1  # dynamic sampling kept only informative groups
        for name in (
            "train/entropy",
            "train/loss",
            "train/grad_norm",
            "weight_sync/gigabytes",
            "timing/rollout_s",
        ):
            assert name in metrics, name
        # The CPU engine and the trainer both compute in fp32 at the same weights (issue 12, item 3).
        assert 0 <= metrics["train/mismatch_kl"] < 1e-4, metrics["train/mismatch_kl"]
        assert metrics["train/mismatch_ratio_outside_share"] == 0
        assert metrics["train/first_update_ratio_max_abs_dev"] == 0  # the first update starts at pi_old
    assert "train/mismatch_kl" not in output  # no mismatch warning
    assert (run_dir / "logs" / "server_0.log").is_file()
    assert list((run_dir / "tensorboard").iterdir())

    checkpoint = run_dir / "checkpoints" / "step_00000003"
    assert (checkpoint / "COMPLETE").is_file()
    hf_dir = tmp_path / "hf"
    convert = [
        sys.executable,
        str(REPO / "tools" / "convert_megatron_to_hf.py"),
        str(checkpoint),
        str(hf_dir),
    ]
    code, output = run(convert, tmp_path / "convert.log")
    assert code == 0, output[-4000:]
    before = load_file(demo_inputs["model"] / "model.safetensors")
    after = {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and torch.isfinite(after[k]).all() for k in before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed, "three steps of training changed no weight"


def test_bad_rows_stop_the_run_before_anything_starts(demo_inputs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n{"problem": "", "answer": "0"}\n')
    run_dir = tmp_path / "run"
    command = train_command(demo_inputs, run_dir, f"data.train_path={data}", "data.on_bad_row=error")
    code, output = run(command, tmp_path / "train.log")
    assert code != 0
    assert "row 1: answer: missing answer" in output and "row 2: problem: empty prompt" in output
    assert "data.on_bad_row=skip" in output
    assert not (run_dir / "logs").exists()  # no engine was started, no model built
