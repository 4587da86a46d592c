"""Dataset loading: every shared file, bad-row reports with row numbers, resumable shuffling."""

import json
import logging
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dapo.cli import eval as eval_cli
from megatron_dapo.data import prepare
from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.data.dataset import (
    BadDataError,
    PromptLoader,
    TokenizedPrompt,
    load_prompts,
    read_records,
)
from megatron_dapo.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
from megatron_dapo.data.record import PromptRecord

# shipped name, rows (megatron_dapo/data/sets/README.md), {row: ground truth} read by eye from the files
SHIPPED_SETS = [
    ("aime2024-dapo", 960, {0: "540"}),
    ("dapo-math-17k", 17_917, {0: "34", 1: "113", 2: "-3", 8: "509"}),
    ("aime2024", 30, {0: "204", 7: "025", 15: "073"}),
    ("aime2025", 30, {0: "70", 1: "588"}),
    ("amc23", 40, {0: "27", 3: "3159", 15: "-1"}),
    ("math500", 500, {0: "\\left( 3, \\frac{\\pi}{2} \\right)", 1: "p - q", 2: "\\frac{14}{3}"}),
    ("gsm8k", 1_319, {0: "18", 146: "2125", 201: "114200"}),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(("name", "num_rows", "ground_truths"), SHIPPED_SETS)
def test_shipped_sets_load_completely_by_name(name: str, num_rows: int, ground_truths: dict) -> None:
    records, bad_rows = read_records(name)
    assert bad_rows == []
    assert len(records) == num_rows
    assert [record.index for record in records] == list(range(num_rows))
    for row, ground_truth in ground_truths.items():
        assert records[row].ground_truth == ground_truth


def test_dapo_layouts_raw_problem_versus_templated_messages() -> None:
    train, _ = read_records(dataset_file("dapo-math-17k"))
    assert train[0].messages is None
    assert train[0].problem.startswith("In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$")
    evaluation, _ = read_records(dataset_file("aime2024-dapo"))
    raw = pq.read_table(dataset_file("aime2024-dapo")).slice(0, 1).to_pylist()[0]
    assert evaluation[0].problem is None
    assert list(evaluation[0].messages) == raw["prompt"]


def test_problem_text_of_jsonl_layouts() -> None:
    records, _ = read_records(dataset_file("gsm8k"))
    assert records[0].problem.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    records, _ = read_records(dataset_file("aime2025"))
    assert (
        records[0].problem
        == "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$"
    )


def test_bad_rows_are_reported_with_row_and_field(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"problem": "1+1", "answer": "2"},
            {"problem": "2+2"},  # row 1: no answer
            {"problem": "   ", "answer": "3"},  # row 2: empty prompt
            {"problem": "4+4", "answer": None},  # row 3: null answer
            {"problem": "9" * 60, "answer": "9"},  # row 4: too long once tokenized
            {"problem": "5+5", "answer": ""},  # row 5: empty answer
            {"problem": "6+6", "answer": 12},
        ],
    )
    with pytest.raises(BadDataError) as error:
        load_prompts(path, tokenizer, max_prompt_tokens=40, on_bad_row="error", template="{problem}")
    message = str(error.value)
    assert "5 of 7 rows are unusable" in message
    assert "row 1: answer: missing answer" in message
    assert "row 2: problem: empty prompt" in message
    assert "row 3: answer: missing answer" in message
    assert "row 4: prompt: 63 tokens once templated, over max_prompt_tokens=40" in message
    assert "row 5: answer: empty answer" in message
    assert "row 0" not in message and "row 6" not in message
    assert "data.on_bad_row=skip" in message


def test_skip_keeps_good_rows_and_logs_bad_ones(tmp_path: Path, tokenizer, caplog) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"problem": "1+1", "answer": "2"}, {"problem": "", "answer": "0"}, {"problem": "3*3", "answer": 9}],
    )
    with caplog.at_level(logging.WARNING):
        prompts, rows = load_prompts(
            path, tokenizer, max_prompt_tokens=64, on_bad_row="skip", template="{problem}"
        )
    assert rows == 3
    assert [(p.record.index, p.record.ground_truth) for p in prompts] == [(0, "2"), (2, "9")]
    assert "row 1: problem: empty prompt" in caplog.text
    assert tokenizer.decode(prompts[1].token_ids) == "<|user|>3*3<|end|><|assistant|>"


def test_bad_row_report_lists_first_rows_only(tmp_path: Path, tokenizer) -> None:
    rows = [{"problem": f"{i}+0", "answer": None if i % 2 else str(i)} for i in range(60)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(BadDataError) as error:
        load_prompts(path, tokenizer, max_prompt_tokens=64, template="{problem}", max_reported=5)
    message = str(error.value)
    assert "30 of 60 rows are unusable" in message
    assert "row 9: answer" in message and "row 11: answer" not in message
    assert "... and 25 more" in message


def test_bad_rows_in_dapo_parquet_name_nested_field(tmp_path: Path) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": None}},
        {"prompt": [], "reward_model": {"ground_truth": "5"}},
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, bad_rows = read_records(path)
    assert [record.index for record in records] == [0]
    assert [str(bad) for bad in bad_rows] == [
        "row 1: reward_model.ground_truth: missing answer",
        "row 2: prompt: empty prompt",
    ]


def test_layout_override_and_configurable_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "custom.jsonl", [{"q": "2*3", "meta": {"gold": 6}}])
    with pytest.raises(BadDataError, match=re.escape("set data.format to one of")):
        read_records(path)
    records, _ = read_records(path, prompt_key="q", answer_key="meta.gold")
    assert records == [PromptRecord(index=0, problem="2*3", ground_truth="6")]
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "How many?", "answer": "work\n#### 1,024"}])
    records, _ = read_records(gsm, layout="gsm8k")
    assert records[0].ground_truth == "1024"
    records, bad_rows = read_records(gsm, layout="problem_answer", prompt_key="question")
    assert records[0].ground_truth == "work\n#### 1,024" and bad_rows == []
    with pytest.raises(BadDataError, match=re.escape("unknown data.format 'nope'")):
        read_records(gsm, layout="nope")


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        read_records(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(BadDataError, match="line 2: not valid JSON"):
        read_records(broken)
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(BadDataError, match=re.escape("use .parquet or .jsonl")):
        read_records(tmp_path / "data.csv")


def make_prompts(count: int) -> list[TokenizedPrompt]:
    return [
        TokenizedPrompt(PromptRecord(index=i, problem=str(i), ground_truth=str(i)), (i,))
        for i in range(count)
    ]


def indices(prompts: list[TokenizedPrompt]) -> list[int]:
    return [prompt.record.index for prompt in prompts]


def test_loader_epochs_are_seeded_permutations() -> None:
    prompts = make_prompts(23)
    first = indices(PromptLoader(prompts, seed=7).take(3 * 23))
    assert first == indices(PromptLoader(prompts, seed=7).take(3 * 23))
    epochs = [first[e * 23 : (e + 1) * 23] for e in range(3)]
    assert all(sorted(epoch) == list(range(23)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert first != indices(PromptLoader(prompts, seed=8).take(3 * 23))
    assert indices(PromptLoader(prompts, seed=7, shuffle=False).take(30)) == list(range(23)) + list(range(7))


def test_loader_resumes_exactly_from_state_dict() -> None:
    prompts = make_prompts(17)
    rng = random.Random(0)
    sizes = [rng.randint(1, 12) for _ in range(20)]
    reference = PromptLoader(prompts, seed=3)
    expected = [indices(reference.take(size)) for size in sizes]
    for cut in (1, 5, 13):
        loader = PromptLoader(prompts, seed=3)
        got = [indices(loader.take(size)) for size in sizes[:cut]]
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
        resumed = PromptLoader(prompts, seed=3)
        resumed.load_state_dict(state)
        got += [indices(resumed.take(size)) for size in sizes[cut:]]
        assert got == expected


def test_loader_refuses_a_state_from_another_dataset() -> None:
    state = PromptLoader(make_prompts(10), seed=1).state_dict()
    with pytest.raises(ValueError, match="num_prompts=10 but this run has num_prompts=9"):
        PromptLoader(make_prompts(9), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptLoader(make_prompts(10), seed=2).load_state_dict(state)


# ---- files and answers that cannot work (issue 16, item 7) -----------------------------------------------

EMPTY_ONCE_NORMALISED = ["$", "dollars", "\\$", " units ", "\\text{ dollars}", "square units", "mph"]


def test_answers_that_normalise_to_nothing_are_bad_rows(tmp_path: Path, tokenizer) -> None:
    """The reward would raise on them at the first step; they are bad rows when the file is read."""
    rng = random.Random()
    rows = [{"problem": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}", "answer": str(rng.randint(2, 198))}]
    rows *= 12
    bad = sorted(rng.sample(range(len(rows)), 4))
    for index in bad:
        rows[index] = {**rows[index], "answer": rng.choice(EMPTY_ONCE_NORMALISED)}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    records, bad_rows = read_records(path)
    assert [(b.index, b.field) for b in bad_rows] == [(index, "answer") for index in bad]
    assert all("empty after normalisation" in b.reason for b in bad_rows)
    assert [r.index for r in records] == [i for i in range(len(rows)) if i not in bad]
    with pytest.raises(BadDataError, match=f"row {bad[0]}: answer: ground_truth "):
        load_prompts(path, tokenizer, max_prompt_tokens=64, on_bad_row="error")


def test_a_file_that_is_not_parquet_or_not_utf8_is_one_line(tmp_path: Path) -> None:
    rng = random.Random()
    fake = tmp_path / "train.parquet"
    fake.write_bytes(rng.randbytes(rng.randint(100, 2000)))
    with pytest.raises(BadDataError) as error:
        read_records(fake)
    assert str(error.value).startswith(f"{fake}: not a parquet file") and "\n" not in str(error.value)
    lines = [json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) for i in range(rng.randint(3, 20))]
    latin = rng.randrange(len(lines))
    lines[latin] = '{"problem": "Combien coûte", "answer": "3"}'
    encoded = [line.encode("latin-1" if i == latin else "utf-8") for i, line in enumerate(lines)]
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(encoded) + b"\n")
    with pytest.raises(BadDataError, match=re.escape(f"latin1.jsonl, line {latin + 1}: not UTF-8 text")):
        read_records(tmp_path / "latin1.jsonl")


def test_the_commands_that_read_data_say_so_in_one_line(tmp_path: Path, user_error) -> None:
    fake = tmp_path / "problems.parquet"
    fake.write_bytes(random.Random().randbytes(512))
    err = user_error(prepare.main, ["--source", str(fake), "--out", str(tmp_path / "out.jsonl")])
    assert err.startswith(f"dapo-prepare-data: error: {fake}: not a parquet file")
    model = save_demo_tokenizer(tmp_path / "model")
    (model / "config.json").write_text("{}")  # a model directory: the data is read before the model
    err = user_error(
        eval_cli.main, ["--model", str(model), "--data", str(fake), "--out", str(tmp_path / "e")]
    )
    assert err.startswith(f"dapo-eval: error: {fake}: not a parquet file")
