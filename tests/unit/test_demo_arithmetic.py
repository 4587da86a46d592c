"""The demo's arithmetic task: answers against an independent evaluator, seeding, knobs, jsonl round trip."""

import ast
import operator
from pathlib import Path

import pytest

from megatron_dapo.data.dataset import read_records
from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems, response_text, write_jsonl
from megatron_dapo.reward import compute_score

BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(expression: str) -> int:
    """Python's own parse tree (precedence and associativity included), walked without eval."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
            return BINARY_OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize(
    "task",
    [
        ArithmeticTask(),
        ArithmeticTask(min_operands=4, max_operands=6, max_operand=99, operators="+-*"),
        ArithmeticTask(min_operands=2, max_operands=2, max_operand=20, operators="-"),
        ArithmeticTask(min_operands=3, max_operands=5, max_operand=12, operators="*+"),
    ],
)
def test_answers_match_an_independent_evaluation(task: ArithmeticTask) -> None:
    records = generate_problems(task, 2000, seed=11)
    for record in records:
        assert record.ground_truth == str(reference_value(record.problem))
        numbers = [
            int(n) for n in record.problem.replace("+", " ").replace("-", " ").replace("*", " ").split()
        ]
        assert task.min_operands <= len(numbers) <= task.max_operands
        assert all(0 <= n <= task.max_operand for n in numbers)
        assert set(record.problem) - set("0123456789") <= set(task.operators)
    assert len({record.problem for record in records}) > 100


def test_generation_is_seeded() -> None:
    task = ArithmeticTask()
    assert generate_problems(task, 50, seed=1) == generate_problems(task, 50, seed=1)
    assert generate_problems(task, 50, seed=1) != generate_problems(task, 50, seed=2)
    assert [r.index for r in generate_problems(task, 5, seed=1)] == [0, 1, 2, 3, 4]


def test_reference_response_earns_the_dapo_reward() -> None:
    for record in generate_problems(ArithmeticTask(), 200, seed=5):
        assert compute_score(response_text(record), record.ground_truth).correct
        wrong = str(int(record.ground_truth) + 1)
        assert not compute_score(f"Answer: {wrong}", record.ground_truth).correct


def test_jsonl_round_trip_through_the_loader(tmp_path: Path) -> None:
    records = generate_problems(ArithmeticTask(max_operand=30), 40, seed=9)
    loaded, bad_rows = read_records(write_jsonl(records, tmp_path / "arithmetic.jsonl"))
    assert bad_rows == []
    assert loaded == records


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"min_operands": 1}, "min_operands"),
        ({"min_operands": 4, "max_operands": 3}, "max_operands"),
        ({"max_operand": 0}, "max_operand"),
        ({"operators": "/"}, "operators"),
        ({"operators": ""}, "operators"),
    ],
)
def test_impossible_knobs_are_rejected(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**knobs)
