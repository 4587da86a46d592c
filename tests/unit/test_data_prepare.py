"""dapo-prepare-data: local conversion to the canonical layout, dedupe by id, conflicts, offline download."""

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_dapo.cli.prepare_data import main
from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.data.dataset import read_records
from megatron_dapo.data.prepare import convert
from megatron_dapo.data.template import apply_prompt_template

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dapo_math_17k_conversion_reports_the_conflicting_answers(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dapo17k.parquet"
    main(["--source", "dapo-math-17k", "--out", str(out)])  # the shipped copy, by name, offline
    report = capsys.readouterr().err
    assert "problems written: 17917" in report
    assert "problems with conflicting answers under different ids (kept): 11" in report
    assert "id 35: 64, id 179: 6" in report
    records, bad_rows = read_records(out)
    source, _ = read_records(dataset_file("dapo-math-17k"))
    assert bad_rows == [] and len(records) == 17_917
    assert [(r.problem, r.ground_truth) for r in records[:50]] == [
        (r.problem, r.ground_truth) for r in source[:50]
    ]


def test_templated_eval_file_becomes_one_raw_problem_per_id(tmp_path: Path) -> None:
    conversion = convert(dataset_file("aime2024-dapo"))
    assert (conversion.rows_read, conversion.duplicates_dropped, len(conversion.rows)) == (960, 930, 30)
    source = pq.read_table(dataset_file("aime2024-dapo")).to_pylist()
    by_id = {str(row["extra_info"]["index"]): row for row in source}
    for row in conversion.rows:
        original = by_id[row.source_index]
        assert row.problem == original["extra_info"]["raw_problem"]
        assert row.answer == original["reward_model"]["ground_truth"]
        assert apply_prompt_template(row.problem) == original["prompt"][0]["content"]


def hub_style_row(problem: str, answer: str, uid: str) -> dict:
    """A row as the hub's DAPO-Math-17k stores it: templated chat prompt, string id."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": apply_prompt_template(problem)}],
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": uid},
    }


def test_repeated_hub_rows_are_deduplicated_by_id(tmp_path: Path, user_error) -> None:
    unique = [
        ("What is $1+1$?", "2", "a1"),
        ("Find $x$ if $x^2=9$, $x>0$.", "3", "b2"),
        ("What is $1+1$?", "3", "c3"),
    ]
    rows = [hub_style_row(*problem) for _ in range(5) for problem in unique]
    rows.append(hub_style_row("Another problem entirely.", "7", "a1"))  # id a1 reused for a different problem
    rows.append({**hub_style_row("No answer here.", "1", "d4"), "reward_model": {"ground_truth": None}})
    path = tmp_path / "hub.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    conversion = convert(path)
    assert [(r.problem, r.answer, r.source_index) for r in conversion.rows] == list(unique)
    assert conversion.duplicates_dropped == 12
    assert conversion.conflicts == {"What is $1+1$?": [("a1", "2"), ("c3", "3")]}
    assert sorted(str(bad) for bad in conversion.bad_rows) == [
        "row 15: extra_info.index: id a1 repeats with a different problem or answer",
        "row 16: reward_model.ground_truth: missing answer",
    ]
    argv = ["--source", str(path), "--out", str(tmp_path / "out.jsonl"), "--on-bad-row", "error"]
    assert "row 16: reward_model.ground_truth: missing answer" in user_error(main, argv, one_line=False)
    main(["--source", str(path), "--out", str(tmp_path / "out.jsonl")])
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written[1] == {"problem": "Find $x$ if $x^2=9$, $x>0$.", "answer": "3", "source_index": "b2"}


def test_download_fails_clearly_when_offline(tmp_path: Path, monkeypatch, user_error) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "aime.parquet"
    argv = ["--source", "aime2024-dapo", "--from-hub", "--out", str(out), "--cache-dir", str(tmp_path)]
    message = user_error(main, argv, one_line=False)
    assert (
        "could not download data/aime-2024.parquet of the hub dataset BytedTsinghua-SIA/AIME-2024" in message
    )
    assert "dapo-prepare-data --source PATH_TO_THAT_FILE" in message
    assert not (tmp_path / "aime.parquet").exists()


def test_bad_arguments_are_named(tmp_path: Path, user_error) -> None:
    argv = ["--source", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x.parquet")]
    assert "neither a file nor a shipped data set" in user_error(main, argv)
    argv = ["--source", "amc23", "--from-hub", "--out", str(tmp_path / "x.parquet")]
    assert "--from-hub: --source must be one of dapo-math-17k, aime2024-dapo" in user_error(main, argv)
    argv = ["--source", "amc23", "--out", str(tmp_path / "x.csv")]
    assert "--out must end in .parquet or .jsonl" in user_error(main, argv)


def test_tools_wrapper_runs_the_same_command(tmp_path: Path) -> None:
    out = tmp_path / "amc23.jsonl"
    command = [
        sys.executable,
        "tools/prepare_data.py",
        "--source",
        str(dataset_file("amc23")),
        "--out",
        str(out),
    ]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    records, _ = read_records(out)
    assert len(records) == 40 and records[0].ground_truth == "27"
