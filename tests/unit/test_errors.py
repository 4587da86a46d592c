"""The one way commands report bad input (errors.py), and the command-line flags it guards."""

import random

import pytest

from megatron_dapo import logprobs
from megatron_dapo.cli import eval as eval_cli
from megatron_dapo.errors import UserError, exit_on_user_error


def test_a_user_error_is_one_line_and_status_2(capsys):
    word = random.Random().choice(["rollout.top_p", "data.train_path", "--tp"])
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error("dapo-x"):
        raise UserError(f"{word}: must be in (0, 1]")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"dapo-x: error: {word}: must be in (0, 1]\n"
    with pytest.raises(SystemExit), exit_on_user_error("dapo-x", KeyError):
        raise KeyError(f"tensor {word!r} is missing")
    assert capsys.readouterr().err == f"dapo-x: error: tensor {word!r} is missing\n"  # not quoted twice


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError), exit_on_user_error("dapo-x"):
        _ = 1 / 0


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tp", "0"], "--tp"),
        (["--pp", "-2"], "--pp"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--chunk-tokens", "-1"], "--chunk-tokens"),
        (["--tokens-per-microbatch", "0"], "--tokens-per-microbatch"),
    ],
)
def test_dapo_logprobs_refuses_impossible_flags(flags, named, tmp_path, user_error):
    argv = ["--checkpoint", str(tmp_path), "--input", "in.jsonl", "--output", "out.jsonl", *flags]
    assert f"dapo-logprobs: error: {named}" in user_error(logprobs.main, argv)


@pytest.mark.parametrize(
    "flags", [["--top-p", "1.5"], ["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "nan"]]
)
def test_dapo_eval_refuses_impossible_sampling(flags, tmp_path, user_error):
    argv = ["--model", str(tmp_path), "--data", "a.jsonl", "--out", str(tmp_path / "out"), *flags]
    assert "dapo-eval: error: need --temperature >= 0 and 0 < --top-p <= 1" in user_error(eval_cli.main, argv)
