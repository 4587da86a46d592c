"""`python -m megatron_dapo.demo` as a newcomer runs it, shortened: inputs prepared, training through the real
loop, summary.json, the PNG report, the start and end accuracy printed.

The demo's own warm start takes minutes; here its cache entry is filled beforehand with the tests' small
warm-started model, so the demo finds it there as a second run of the demo would.
"""

import json
import shutil
import sys

import pytest

from megatron_dapo.demo.run import WARM_START
from tests.helpers.demo_run import run

pytestmark = pytest.mark.slow


def test_the_demo_trains_and_reports(demo_inputs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo_inputs["model"], cache / f"warm_start-{WARM_START.cache_key()}")
    out = tmp_path / "demo"
    command = [
        *(
            sys.executable,
            "-m",
            "megatron_dapo.demo",
            "--out",
            str(out),
            "--steps",
            "2",
            "--cache-dir",
            str(cache),
        ),
        *("train.prompts_per_step=4", "train.samples_per_minibatch=16", "eval.samples_per_problem=2"),
    ]
    code, output = run(command, tmp_path / "demo.log")
    assert code == 0, output[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "dapo" and summary["steps"] == 2
    # The summary's figures are the evaluations the trainer logged: before any update (step 0) and after the
    # last step, read here from metrics.jsonl independently of the demo's own reader.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = {row["step"]: row["eval/avg@2"] for row in rows if "eval/avg@2" in row}
    assert sorted(evaluated) == [0, 2]
    assert (summary["accuracy_start"], summary["accuracy_end"]) == (evaluated[0], evaluated[2])
    held_out_rows = [json.loads(line) for line in (out / "data" / "eval.jsonl").read_text().splitlines()]
    problems = len({(row["problem"], row["answer"]) for row in held_out_rows})  # repeated rows are merged
    assert summary["accuracy_metric"] == f"eval/avg@2 on {problems} held-out problems"
    for accuracy in evaluated.values():  # a mean over 2 samples of each problem: a multiple of 1/(2N)
        correct = accuracy * 2 * problems
        assert abs(correct - round(correct)) < 1e-6, accuracy
    assert (
        f"{summary['accuracy_start']:.1%} at the start -> {summary['accuracy_end']:.1%} at the end" in output
    )
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "model" / "config.json").is_file() and (out / "data" / "train.jsonl").is_file()
    held_out = {row["problem"] for row in held_out_rows}
    trained = {
        json.loads(line)["problem"] for line in (out / "data" / "train.jsonl").read_text().splitlines()
    }
    assert held_out and not held_out & trained  # the evaluation problems are never trained on
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
