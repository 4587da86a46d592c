"""The trainer's data step: bad rows are named by row number and skipped or refused per data.on_bad_row;
the demo's arithmetic format prompts with the bare problem, others with the paper's template."""

import json
import logging

import pytest

from megatron_dapo.config import load_config
from megatron_dapo.data.arithmetic import ARITHMETIC_PROMPT_TEMPLATE
from megatron_dapo.data.dataset import BadDataError
from megatron_dapo.data.demo_tokenizer import build_demo_tokenizer
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE, apply_prompt_template
from megatron_dapo.trainer.data import load_eval_prompts, load_train_prompts, prompt_format

TOKENIZER = build_demo_tokenizer()
ROWS = [
    {"problem": "1+2", "answer": "3"},
    {"problem": "4*5"},  # row 1: no answer
    {"problem": "  ", "answer": "0"},  # row 2: empty prompt
    {"problem": "9-" * 40 + "1", "answer": "-"},  # row 3: far over max_prompt_tokens
    {"problem": "7+7", "answer": "14"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_ids(content: str) -> tuple[int, ...]:
    text = TOKENIZER.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tuple(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def config(path, on_bad_row, **extra):
    overrides = [
        f"data.train_path={path}",
        "data.format=arithmetic",
        "data.max_prompt_tokens=32",
        f"data.on_bad_row={on_bad_row}",
        "rollout.max_response_tokens=16",
        "algorithm.overlong_buffer_tokens=4",
        *[f"{key}={value}" for key, value in extra.items()],
    ]
    return load_config(None, overrides)


def test_bad_rows_are_refused_with_their_row_numbers(tmp_path):
    cfg = config(write_rows(tmp_path / "train.jsonl", ROWS), "error")
    with pytest.raises(BadDataError) as error:
        load_train_prompts(cfg, TOKENIZER)
    message = str(error.value)
    for row in (1, 2, 3):
        assert f"row {row}:" in message
    assert "row 0:" not in message and "row 4:" not in message
    assert "data.on_bad_row=skip" in message  # the fix is named


def test_bad_rows_are_skipped_and_reported(tmp_path, caplog):
    cfg = config(write_rows(tmp_path / "train.jsonl", ROWS), "skip")
    with caplog.at_level(logging.WARNING):
        prompts = load_train_prompts(cfg, TOKENIZER)
    assert [p.record.index for p in prompts] == [0, 4]
    assert "row 1:" in caplog.text and "row 2:" in caplog.text and "row 3:" in caplog.text


def test_the_arithmetic_format_prompts_with_the_bare_problem(tmp_path):
    cfg = config(write_rows(tmp_path / "train.jsonl", ROWS[:1]), "error")
    [prompt] = load_train_prompts(cfg, TOKENIZER)
    assert prompt.token_ids == chat_ids("1+2")
    assert prompt_format("arithmetic") == ("problem_answer", ARITHMETIC_PROMPT_TEMPLATE)
    assert prompt_format("dapo") == ("dapo", DAPO_PROMPT_TEMPLATE)


def test_eval_prompts_follow_the_training_format_and_merge_duplicates(tmp_path):
    eval_rows = [
        {"problem": "2+2", "answer": "4"},
        {"problem": "2+2", "answer": "4"},
        {"problem": "3", "answer": "3"},
    ]
    cfg = config(
        write_rows(tmp_path / "train.jsonl", ROWS[:1]),
        "error",
        **{
            "eval.path": write_rows(tmp_path / "eval.jsonl", eval_rows),
            "data.format": "problem_answer",
            "data.max_prompt_tokens": 512,  # the paper's template is long in characters
        },
    )
    prompts = load_eval_prompts(cfg, TOKENIZER)
    assert [p.record.problem for p in prompts] == ["2+2", "3"]
    assert prompts[0].token_ids == chat_ids(apply_prompt_template("2+2", DAPO_PROMPT_TEMPLATE))
    assert load_eval_prompts(config(tmp_path / "train.jsonl", "error"), TOKENIZER) == []


def test_a_missing_training_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.train_path"):
        load_train_prompts(load_config(None, []), TOKENIZER)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        load_train_prompts(config(tmp_path / "nowhere.jsonl", "skip"), TOKENIZER)
