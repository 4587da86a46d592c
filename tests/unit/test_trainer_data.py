"""The trainer's data step: bad rows are named by row number and skipped or refused per data.on_bad_row;
the demo's arithmetic format prompts with the bare problem, others with the paper's template."""

import json
import logging
import os
import random

import pytest

from megatron_dapo.cli import train
from megatron_dapo.config import load_config
from megatron_dapo.data.dataset import BadDataError
from megatron_dapo.data.template import (
    ARITHMETIC_PROMPT_TEMPLATE,
    DAPO_PROMPT_TEMPLATE,
    apply_prompt_template,
)
from megatron_dapo.demo.tokenizer import build_demo_tokenizer, save_demo_tokenizer
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


@pytest.fixture
def launch_env():
    """The trainer, started without torchrun, writes its one-process rendezvous into os.environ: undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _bad_files(tmp_path, rng: random.Random) -> dict[str, tuple[list[str], str]]:
    """Overrides that point dapo-train at an unusable file, with what its error must say."""
    good = write_rows(tmp_path / "good.jsonl", [{"problem": f"{rng.randint(1, 9)}+1", "answer": "7"}] * 3)
    (tmp_path / "random.parquet").write_bytes(rng.randbytes(rng.randint(64, 4096)))
    (tmp_path / "latin1.jsonl").write_bytes('{"problem": "1+1", "answer": "2 €"}\n'.encode("cp1252"))
    dollars = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": rng.choice(["$", "dollars"])}]
    write_rows(tmp_path / "dollars.jsonl", dollars)
    return {
        "not parquet": (
            [f"data.train_path={tmp_path / 'random.parquet'}"],
            "random.parquet: not a parquet file",
        ),
        "not utf-8": ([f"data.train_path={tmp_path / 'latin1.jsonl'}"], "latin1.jsonl, line 1: not UTF-8"),
        "empty answer": ([f"data.train_path={tmp_path / 'dollars.jsonl'}"], "row 1: answer: ground_truth"),
        "empty eval answer": (
            [f"data.train_path={good}", f"eval.path={tmp_path / 'dollars.jsonl'}"],
            "dollars.jsonl: 1 of 2 rows are unusable",
        ),
    }


@pytest.mark.parametrize("case", ["not parquet", "not utf-8", "empty answer", "empty eval answer"])
def test_dapo_train_names_an_unusable_file_before_building_anything(case, tmp_path, user_error, launch_env):
    """The training and evaluation files are read and checked before the model is built or a server
    started; each problem is one line (the bad rows listed under it) and exit status 2."""
    model = save_demo_tokenizer(tmp_path / "model")
    (model / "config.json").write_text("{}")  # read before the data; the model itself is never built
    overrides, expected = _bad_files(tmp_path, random.Random())[case]
    argv = [
        f"model.hf_path={model}",
        "data.format=problem_answer",
        "data.on_bad_row=error",
        "data.max_prompt_tokens=512",
        "logging.dir=" + str(tmp_path / "run"),
        *overrides,
    ]
    err = user_error(train.main, argv, one_line=False)
    assert err.startswith("dapo-train: error: ") and expected in err, err
    assert not (tmp_path / "run").exists()
