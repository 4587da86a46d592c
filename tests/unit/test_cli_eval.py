"""dapo-eval's command line (megatron_dapo/cli/eval.py): the paper's defaults, refused values, one-line
errors, and every flag reaching the run it asks for."""

import random
import re
from pathlib import Path

import pytest

from megatron_dapo import eval as ev
from megatron_dapo.cli import eval as eval_cli
from megatron_dapo.rollout.types import SamplingParams


def test_a_wrong_model_path_is_one_clear_line(tmp_path: Path, user_error) -> None:
    err = user_error(
        eval_cli.main, ["--model", str(tmp_path), "--data", "a.jsonl", "--out", str(tmp_path / "out")]
    )
    assert re.match(r"dapo-eval: error: --model .* neither a Hugging Face model directory", err)


def test_command_line_defaults_are_the_papers_evaluation() -> None:
    args = eval_cli.parse_args(
        ["--model", "m", "--data", "a.jsonl", "--data", "b.parquet", "c.jsonl", "--out", "o"]
    )
    assert (args.samples, args.temperature, args.top_p, args.max_new_tokens) == (32, 1.0, 0.7, 20480)
    assert args.data == [Path("a.jsonl"), Path("b.parquet"), Path("c.jsonl")]
    assert (
        args.chat_template and args.on_bad_row == "skip" and args.engine == "sglang" and not args.server_url
    )
    assert not eval_cli.parse_args(
        ["--model", "m", "--data", "a", "--out", "o", "--no-chat-template"]
    ).chat_template


@pytest.mark.parametrize(
    "flags",
    [
        ["--samples", "0"],
        ["--top-p", "0"],
        ["--engine", "cpu", "--server-tp", "2"],
        ["--max-new-tokens", "-1"],
        ["--request-deadline-floor-s", "0"],
        ["--request-min-tokens-per-s", "nan"],
    ],
)
def test_command_line_refuses_bad_values(flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--model", "m", "--data", "a", "--out", "o", *flags])
    assert "error" in capsys.readouterr().err


def test_every_flag_reaches_the_job(tmp_path: Path) -> None:
    rng = random.Random()
    samples, seed, top_k, tokens = (
        rng.randint(2, 64),
        rng.randint(0, 10**6),
        rng.randint(1, 50),
        rng.randint(1, 99),
    )
    temperature, top_p = round(rng.uniform(0.1, 2), 3), round(rng.uniform(0.1, 1), 3)
    floor_s, min_tokens_per_s = round(rng.uniform(1, 500), 2), round(rng.uniform(0.5, 50), 2)
    args = eval_cli.parse_args(
        [
            *("--model", "m", "--data", "a.jsonl", "b.jsonl", "--out", str(tmp_path), "--overwrite"),
            *("--samples", str(samples), "--temperature", str(temperature), "--top-p", str(top_p)),
            *("--top-k", str(top_k), "--max-new-tokens", str(tokens), "--seed", str(seed)),
            *("--no-chat-template", "--layout", "problem_answer", "--max-prompt-tokens", "77"),
            *(
                "--on-bad-row",
                "error",
                "--boxed-fallback",
                "--server-url",
                "http://127.0.0.1:1",
                "http://h:2",
            ),
            *("--engine", "cpu", "--num-servers", "3"),
            *("--request-deadline-floor-s", str(floor_s)),
            *("--request-min-tokens-per-s", str(min_tokens_per_s)),
        ]
    )
    job = eval_cli.eval_job(args)
    assert (job.model, list(job.data), job.out, job.overwrite) == (
        Path("m"),
        [Path("a.jsonl"), Path("b.jsonl")],
        tmp_path,
        True,
    )
    assert job.samples_per_problem == samples
    assert job.params == SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=tokens, seed=seed
    )
    assert (job.chat_template, job.layout, job.max_prompt_tokens, job.on_bad_row, job.boxed_fallback) == (
        False,
        "problem_answer",
        77,
        "error",
        True,
    )
    assert list(job.server_urls) == ["http://127.0.0.1:1", "http://h:2"]
    assert (job.engine, job.num_servers, job.server_tp) == ("cpu", 3, 1)
    assert (job.deadlines.floor_s, job.deadlines.min_tokens_per_s) == (floor_s, min_tokens_per_s)
    specs = ev.server_specs(job, tmp_path / "hf")
    assert [spec.log_file for spec in specs] == [
        str(tmp_path / "servers" / f"server_{i}.log") for i in range(3)
    ]
    assert {(s.model_path, s.engine, s.random_seed, s.base_gpu_id) for s in specs} == {
        (str(tmp_path / "hf"), "cpu", seed, None)
    }
