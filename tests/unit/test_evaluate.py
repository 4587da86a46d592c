"""Evaluation: metrics against an independent computation on random scripted samples, ties, concurrency,
seeds, failures, output files, evaluation sets and model directories. The engine is a scripted fake."""

import asyncio
import json
import logging
import random
import re
from collections.abc import Sequence
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dapo import eval as ev
from megatron_dapo.checkpoint.meta import META_FILE
from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.data.dataset import BadDataError, TokenizedPrompt, tokenize_records
from megatron_dapo.data.record import PromptRecord
from megatron_dapo.data.template import apply_prompt_template
from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.demo.tokenizer import build_demo_tokenizer, save_demo_tokenizer
from megatron_dapo.rollout.engine import EngineError
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from tests.helpers.tiny_models import save_tiny_qwen2

PARAMS = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def make_prompts(tokenizer, ground_truths: Sequence[str]) -> list[TokenizedPrompt]:
    records = [
        PromptRecord(index=i, ground_truth=gt, problem=f"problem {i}") for i, gt in enumerate(ground_truths)
    ]
    prompts, too_long = tokenize_records(records, tokenizer, max_prompt_tokens=10**6)
    assert not too_long
    return prompts


class ScriptedEngine:
    """Answers each prompt with its scripted (response text, finish reason) list, in order."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[tuple[str, FinishReason]]]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.calls: list[tuple[tuple[int, ...], SamplingParams, int]] = []

    def completion(self, text: str, finish_reason: FinishReason) -> Completion:
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        if finish_reason is FinishReason.STOP:
            token_ids.append(self.tokenizer.eos_token_id)  # engines return the stop token
        return Completion(token_ids, [-0.5] * len(token_ids), finish_reason)

    async def generate(self, input_ids, params, n=1, *, request_id=None) -> list[Completion]:
        self.calls.append((tuple(input_ids), params, n))
        await asyncio.sleep(0)
        script = self.scripts[tuple(input_ids)]
        assert len(script) == n
        return [self.completion(text, reason) for text, reason in script]


def run_evaluate(engine, prompts, n, **kwargs) -> ev.EvalResult:
    return asyncio.run(
        ev.evaluate(
            engine,
            prompts,
            samples_per_problem=n,
            params=kwargs.pop("params", PARAMS),
            tokenizer=engine.tokenizer,
            progress_desc=None,
            **kwargs,
        )
    )


# ---- metrics against an independent computation ---------------------------------------------------------


def random_sample(rng: random.Random, ground_truth: str) -> tuple[str, str, str]:
    """(response, what it answers, kind): a right answer in several surface forms, a wrong one, a boxed
    right answer without Answer line, or no answer at all."""
    kind = rng.choice(["right", "right", "wrong", "boxed", "none"])
    filler = "x" * rng.randrange(0, 40)
    if kind == "right":
        form = rng.choice(["{}", "${}$", "\\boxed{{{}}}", "{}."])
        return f"{filler} so\nAnswer: {form.format(ground_truth)}", ground_truth, kind
    if kind == "wrong":
        wrong = rng.choice(["1", "2", "999"])  # few wrong answers, so that they win and tie votes
        return f"{filler}\nAnswer: {wrong}", wrong, kind
    if kind == "boxed":
        return f"{filler} hence \\boxed{{{ground_truth}}}", ground_truth, kind
    return f"{filler} no idea", "", kind


def expected_metrics(answers: list[list[str]], ground_truths: list[str], reasons, lengths, ks) -> dict:
    """The metrics from first principles: exact fractions for pass@k, a plain vote count for cons."""
    n = len(answers[0])
    correct = [[a == gt for a in row] for row, gt in zip(answers, ground_truths, strict=True)]
    metrics = {f"avg@{n}": sum(map(sum, correct)) / (n * len(correct))}
    for k in ks:
        total = sum(1 - Fraction(comb(n - sum(row), k), comb(n, k)) for row in correct)
        metrics[f"pass@{k}"] = float(total / len(correct))
    right_votes = 0
    for row, gt in zip(answers, ground_truths, strict=True):
        counts = {a: row.count(a) for a in row if a}
        if counts:
            best = max(counts.values())
            winner = next(a for a in row if a and counts[a] == best)  # the first to reach the top count
            right_votes += winner == gt
    metrics[f"cons@{n}"] = right_votes / len(answers)
    flat_reasons = [r for row in reasons for r in row]
    flat_lengths = [t for row in lengths for t in row]
    metrics["response_length_mean"] = sum(flat_lengths) / len(flat_lengths)
    metrics["truncation_ratio"] = sum(r is FinishReason.LENGTH for r in flat_reasons) / len(flat_reasons)
    return metrics


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("boxed_fallback", [False, True])
def test_metrics_match_an_independent_computation(tokenizer, seed: int, boxed_fallback: bool) -> None:
    rng = random.Random(seed)
    num_problems, n = rng.randint(1, 9), rng.choice([1, 2, 3, 5, 8, 16])
    ground_truths = [str(rng.choice([7, 25, 1000, 33])) for _ in range(num_problems)]
    prompts = make_prompts(tokenizer, ground_truths)
    scripts, answers, reasons, lengths = {}, [], [], []
    for prompt, gt in zip(prompts, ground_truths, strict=True):
        samples = [random_sample(rng, gt) for _ in range(n)]
        finish = [rng.choice([FinishReason.STOP, FinishReason.LENGTH]) for _ in range(n)]
        scripts[prompt.token_ids] = [
            (text, reason) for (text, _, _), reason in zip(samples, finish, strict=True)
        ]
        answers.append([a if kind != "boxed" or boxed_fallback else "" for _, a, kind in samples])
        reasons.append(finish)
        lengths.append(
            [len(text) + (r is FinishReason.STOP) for (text, _, _), r in zip(samples, finish, strict=True)]
        )
    engine = ScriptedEngine(tokenizer, scripts)

    result = run_evaluate(engine, prompts, n, boxed_fallback=boxed_fallback)

    expected = expected_metrics(answers, ground_truths, reasons, lengths, ev.default_ks(n))
    assert result.metrics().keys() == expected.keys()
    for name, value in expected.items():
        assert result.metrics()[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert result.pass_at_k[1] == pytest.approx(result.avg_at_n, rel=1e-12)
    assert [p.index for p in result.problems] == list(range(num_problems))
    for problem, row, reason_row in zip(result.problems, answers, reasons, strict=True):
        assert [s.pred for s in problem.samples] == row
        assert [s.correct for s in problem.samples] == [a == problem.ground_truth for a in row]
        assert [s.finish_reason for s in problem.samples] == reason_row
        assert all("<|end|>" not in s.response for s in problem.samples)  # special tokens left out


def test_default_ks() -> None:
    assert ev.default_ks(32) == (1, 2, 4, 8, 16, 32)
    assert ev.default_ks(6) == (1, 2, 4, 6)
    assert ev.default_ks(1) == (1,)


def test_custom_ks_and_their_bounds(tokenizer) -> None:
    prompts = make_prompts(tokenizer, ["7"])
    engine = ScriptedEngine(tokenizer, {prompts[0].token_ids: [("Answer: 7", FinishReason.STOP)] * 4})
    result = run_evaluate(engine, prompts, 4, ks=(3,))
    assert result.pass_at_k == {3: 1.0}
    with pytest.raises(ValueError, match=r"ks=\(5,\).*samples_per_problem=4"):
        run_evaluate(engine, prompts, 4, ks=(5,))


# ---- majority vote -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("responses", "cons"),
    [
        (["Answer: 7", "Answer: 25", "Answer: $25$", "Answer: \\boxed{7}"], 1.0),  # 2-2 tie: 7 came first
        (["Answer: 25", "Answer: 7", "Answer: 7", "Answer: 25"], 0.0),  # 2-2 tie: 25 came first
        (["no answer", "none", "Answer: 7.", "nothing"], 1.0),  # missing answers never vote
        (["no answer", "none", "nothing", "nope"], 0.0),
        (["Answer: 25", "Answer: 25", "Answer: 7", "Answer: 7.0"], 0.0),  # "7.0" is not "7": 25 leads
    ],
)
def test_majority_vote_ties_and_missing_answers(tokenizer, responses: list[str], cons: float) -> None:
    prompts = make_prompts(tokenizer, ["7"])
    engine = ScriptedEngine(tokenizer, {prompts[0].token_ids: [(r, FinishReason.STOP) for r in responses]})
    result = run_evaluate(engine, prompts, len(responses))
    assert result.cons_at_n == cons


# ---- how the engine is driven ------------------------------------------------------------------------------


class BarrierEngine(ScriptedEngine):
    """Answers only once every expected prompt is in flight: sequential submission would time out."""

    def __init__(self, tokenizer, scripts, expected_in_flight: int):
        super().__init__(tokenizer, scripts)
        self.expected_in_flight = expected_in_flight
        self.all_in = asyncio.Event()

    async def generate(self, input_ids, params, n=1, *, request_id=None) -> list[Completion]:
        self.calls.append((tuple(input_ids), params, n))
        if len(self.calls) == self.expected_in_flight:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), timeout=5)
        return [self.completion(text, reason) for text, reason in self.scripts[tuple(input_ids)]]


def test_every_problem_is_in_flight_at_once_with_distinct_seeds(tokenizer) -> None:
    prompts = make_prompts(tokenizer, ["7", "8", "9", "10", "11"])
    scripts = {p.token_ids: [("Answer: 7", FinishReason.STOP)] * 3 for p in prompts}
    engine = BarrierEngine(tokenizer, scripts, expected_in_flight=len(prompts))
    run_evaluate(engine, prompts, 3, params=SamplingParams(seed=100))
    seeds = {ids: params.seed for ids, params, _ in engine.calls}
    assert [seeds[p.token_ids] for p in prompts] == [100, 103, 106, 109, 112]  # sample i: seed + i

    engine = BarrierEngine(tokenizer, scripts, expected_in_flight=len(prompts))
    run_evaluate(engine, prompts, 3)
    assert all(params == PARAMS for _, params, _ in engine.calls)  # unseeded stays unseeded


def test_an_aborted_sample_fails_the_evaluation(tokenizer) -> None:
    prompts = make_prompts(tokenizer, ["7"])
    script = [("Answer: 7", FinishReason.STOP), ("Answer:", FinishReason.ABORT)]
    engine = ScriptedEngine(tokenizer, {prompts[0].token_ids: script})
    with pytest.raises(EngineError, match="row 0: sample 1 was aborted"):
        run_evaluate(engine, prompts, 2)


class FailingEngine(ScriptedEngine):
    """The first prompt fails; the others run until cancelled (or fail the test after 10 s)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, {})
        self.cancelled = 0

    async def generate(self, input_ids, params, n=1, *, request_id=None) -> list[Completion]:
        self.calls.append((tuple(input_ids), params, n))
        if len(self.calls) == 1:
            await asyncio.sleep(0.01)
            raise EngineError("server down")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("never cancelled")


def test_a_failure_cancels_the_other_problems(tokenizer) -> None:
    prompts = make_prompts(tokenizer, ["7", "8", "9"])
    engine = FailingEngine(tokenizer)
    with pytest.raises(EngineError, match="server down"):
        run_evaluate(engine, prompts, 2)
    assert engine.cancelled == 2


def test_an_unusable_ground_truth_fails_before_generating(tokenizer) -> None:
    prompts = make_prompts(tokenizer, ["7", "$"])
    engine = ScriptedEngine(tokenizer, {})
    with pytest.raises(ValueError, match="row 1: ground_truth '\\$' is empty after normalisation"):
        run_evaluate(engine, prompts, 2)
    assert engine.calls == []


# ---- output files ------------------------------------------------------------------------------------------


def test_output_files_hold_every_sample_and_the_metrics(tokenizer, tmp_path: Path) -> None:
    rng = random.Random(11)
    data = {"aime": ["7", "25", "33"], "amc": ["1000", "2"]}
    sets, scripts = [], {}
    for name, ground_truths in data.items():
        # Distinct problem texts per set, so that the prompts (the scripts' keys) differ.
        records = [PromptRecord(i, gt, problem=f"{name} {i}") for i, gt in enumerate(ground_truths)]
        prompts, _ = tokenize_records(records, tokenizer, max_prompt_tokens=10**6)
        sets.append(ev.EvalSet(name, tmp_path / f"{name}.jsonl", tuple(prompts), len(prompts), 0, 0))
        for prompt in prompts:
            scripts[prompt.token_ids] = [
                (random_sample(rng, prompt.record.ground_truth)[0], rng.choice(list(FinishReason)[:2]))
                for _ in range(4)
            ]
    engine = ScriptedEngine(tokenizer, scripts)
    results = asyncio.run(
        ev.evaluate_sets(engine, sets, samples_per_problem=4, params=PARAMS, tokenizer=tokenizer)
    )
    out = tmp_path / "out"
    ev.write_outputs(out, results, sets, {"model": "m"})

    summary = json.loads((out / ev.RESULTS_FILE).read_text())
    assert summary["model"] == "m" and summary["datasets"].keys() == data.keys()
    for name in data:
        assert summary["datasets"][name]["metrics"] == results[name].metrics()
        assert summary["datasets"][name]["problems"] == len(data[name])
        assert summary["datasets"][name]["samples"] == 4 * len(data[name])
    rows = [json.loads(line) for line in (out / ev.SAMPLES_FILE).read_text().splitlines()]
    assert len(rows) == 4 * 5
    for row in rows:
        sample = results[row["dataset"]].problems[row["problem"]].samples[row["sample"]]
        assert row["ground_truth"] == data[row["dataset"]][row["index"]]
        assert (row["response"], row["pred"], row["correct"]) == (
            sample.response,
            sample.pred,
            sample.correct,
        )
        assert row["finish_reason"] == str(sample.finish_reason) and row["finish_reason"] in (
            "stop",
            "length",
        )
        assert row["response_tokens"] == sample.response_tokens
    table = ev.format_table(results)
    assert table.splitlines()[0].split()[:4] == ["dataset", "problems", "avg@4", "pass@1"]
    assert f"{100 * results['amc'].avg_at_n:.1f}" in table.splitlines()[2]


# ---- evaluation sets ---------------------------------------------------------------------------------------


def test_the_dapo_aime_file_is_thirty_problems(tokenizer) -> None:
    eval_set = ev.load_eval_set(dataset_file("aime2024-dapo"), tokenizer, max_prompt_tokens=10**6)
    assert (eval_set.name, eval_set.rows, eval_set.skipped_rows) == ("aime2024_dapo", 960, 0)
    assert (len(eval_set.prompts), eval_set.duplicate_rows) == (30, 930)
    assert len({p.token_ids for p in eval_set.prompts}) == 30  # 30 different prompts


def test_bad_rows_are_reported_and_skipped_or_refused(tokenizer, tmp_path: Path, caplog) -> None:
    rows = [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "no answer here"},
        {"problem": "  ", "answer": "3"},
        {"problem": "1+1?", "answer": "2"},  # a duplicate
        {"problem": "1+1?", "answer": "3"},  # the same prompt with another answer: its own problem
        {"problem": "é?", "answer": "2"},  # the same tokens as the next row (<|unk|>?), another problem
        {"problem": "ü?", "answer": "2"},
        {"problem": "x" * 200, "answer": "4"},  # too long
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    limit = (
        len(apply_prompt_template("")) + 100
    )  # characters are tokens: room for all problems but the long one
    with caplog.at_level(logging.WARNING):
        eval_set = ev.load_eval_set(path, tokenizer, max_prompt_tokens=limit, use_chat_template=False)
    assert "row 1: answer: missing answer" in caplog.text and "row 7: prompt" in caplog.text
    assert (eval_set.rows, eval_set.skipped_rows, eval_set.duplicate_rows) == (8, 3, 1)
    assert [(p.record.index, p.record.ground_truth) for p in eval_set.prompts] == [
        (0, "2"),
        (4, "3"),
        (5, "2"),
        (6, "2"),
    ]
    assert eval_set.prompts[2].token_ids == eval_set.prompts[3].token_ids
    with pytest.raises(BadDataError, match="row 2: problem: empty prompt"):
        ev.load_eval_set(
            path, tokenizer, max_prompt_tokens=limit, on_bad_row="error", use_chat_template=False
        )


def test_dataset_names_are_short_and_distinct(tmp_path: Path) -> None:
    assert ev.dataset_names([Path("d/aime2024.jsonl"), Path("d/math500.parquet")]) == ["aime2024", "math500"]
    assert ev.dataset_names([tmp_path / "aime24/test.jsonl", tmp_path / "amc23/test.jsonl"]) == [
        "aime24/test",
        "amc23/test",
    ]
    assert ev.dataset_names([Path("d/a.jsonl"), Path("d/a.parquet")]) == ["a.jsonl", "a.parquet"]
    with pytest.raises(ValueError, match="same file twice"):
        ev.dataset_names([Path("d/a.jsonl"), Path("d/../d/a.jsonl")])


# ---- model directories -------------------------------------------------------------------------------------


def test_a_plain_tokenizers_backend_survives_a_qwen2_config(tmp_path: Path) -> None:
    model_dir = save_tiny_qwen2(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    save_demo_tokenizer(model_dir)  # the CPU demo's layout: a qwen2 config.json beside a character tokenizer
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode("Answer: 7", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Answer: 7" and len(ids) == 9


def test_a_directory_without_a_tokenizer_is_named_with_the_fix(tmp_path: Path) -> None:
    model_dir = save_tiny_qwen2(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    checkpoint = tmp_path / "megatron"  # a Megatron checkpoint whose hf/ lost its tokenizer
    checkpoint.mkdir()
    (checkpoint / META_FILE).write_text("{}")
    for path, looked_in in (
        (model_dir, model_dir),
        (tmp_path / "none", tmp_path / "none"),
        (checkpoint, checkpoint / "hf"),
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: no tokenizer")) as error:
            load_tokenizer(path)
        assert f"in {looked_in}): give a Hugging Face model or tokenizer directory" in str(error.value)


def test_a_hugging_face_directory_is_served_as_is(tmp_path: Path) -> None:
    model_dir = save_tiny_qwen2(tmp_path / "model")
    with ev.served_model_dir(model_dir) as served:
        assert served == model_dir
    with (
        pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"),
        ev.served_model_dir(tmp_path),
    ):
        pass


def test_a_megatron_checkpoint_is_converted_to_a_temporary_directory(tmp_path: Path, caplog) -> None:
    from megatron_dapo.checkpoint.convert import hf_to_megatron

    hf_dir = save_tiny_qwen2(tmp_path / "hf", seed=5)
    hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert load_tokenizer(tmp_path / "megatron").encode("t3 t9") == [3, 9]
    with caplog.at_level(logging.WARNING), ev.served_model_dir(tmp_path / "megatron") as served:
        assert "is a Megatron checkpoint: converting it" in caplog.text
        converted, original = load_file(served / "model.safetensors"), load_file(hf_dir / "model.safetensors")
        assert converted.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(converted[name], tensor), name
    assert not served.exists()  # the temporary directory is gone
