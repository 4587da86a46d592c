"""The demo's warm start, in miniature: loss falls, the saved directory loads, the cache is reused."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_dapo.demo import warm_start as warm_start_module
from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems
from megatron_dapo.demo.tokenizer import build_demo_tokenizer
from megatron_dapo.demo.warm_start import (
    METADATA_FILE,
    WarmStartSettings,
    build_model,
    held_out_problems,
    sampled_accuracy,
    sft_batch,
    sft_problems,
    train_sft,
    warm_start,
    warm_start_response,
)

TINY = WarmStartSettings(
    task=ArithmeticTask(max_operands=2),
    num_layers=1,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    ffn_hidden_size=64,
    sft_steps=40,
    sequences_per_step=16,
    warmup_steps=5,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def test_sft_batch_labels_only_the_response_and_eos(tokenizer) -> None:
    records = generate_problems(TINY.task, 3, seed=0)
    responses = ["Answer: 1", "9", "Answer: -20"]
    batch = sft_batch(records, responses, tokenizer)
    for row, (record, response) in enumerate(zip(records, responses, strict=True)):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == response + "<|end|>"
        length = int(batch["attention_mask"][row].sum())
        text = tokenizer.decode(batch["input_ids"][row][:length].tolist())
        assert text == f"<|user|>{record.problem}<|end|><|assistant|>{response}<|end|>"


def test_warm_start_responses_mix_the_answer_line_with_bare_equations() -> None:
    records = generate_problems(TINY.task, 2000, seed=1)
    rng = random.Random(0)
    responses = [warm_start_response(r, WarmStartSettings(answer_line_rate=0.25), rng) for r in records]
    answer_lines = sum(
        response == f"Answer: {r.ground_truth}" for r, response in zip(records, responses, strict=True)
    )
    equations = sum(
        response == f"{r.problem}={r.ground_truth}" for r, response in zip(records, responses, strict=True)
    )
    assert answer_lines + equations == len(records)
    assert 0.2 < answer_lines / len(records) < 0.3


def test_sft_loss_decreases(tokenizer) -> None:
    losses = train_sft(build_model(TINY, tokenizer), tokenizer, TINY, progress=False)
    assert len(losses) == TINY.sft_steps
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_warm_start_saves_a_loadable_directory_and_reuses_it(tmp_path: Path, monkeypatch) -> None:
    directory = warm_start(tmp_path, TINY, eval_prompts=4, samples_per_prompt=2, progress=False)
    assert directory.name == f"warm_start-{TINY.cache_key()}"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        METADATA_FILE,
    ):
        assert (directory / name).is_file(), name
    metadata = json.loads((directory / METADATA_FILE).read_text())
    assert metadata["settings"]["sft_steps"] == TINY.sft_steps and 0.0 <= metadata["sampled_accuracy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    batch = sft_batch(generate_problems(TINY.task, 2, seed=3), ["Answer: 1", "Answer: 2"], tokenizer)
    assert torch.isfinite(model(**batch).loss)
    assert not list(tmp_path.glob("*.partial-*"))

    monkeypatch.setattr(warm_start_module, "train_sft", lambda *args, **kwargs: pytest.fail("retrained"))
    assert warm_start(tmp_path, TINY, progress=False) == directory
    other = WarmStartSettings(**{**TINY.__dict__, "seed": 1})
    assert other.cache_key() != TINY.cache_key()


class ScriptedModel:
    """Stands in for a policy: one fixed response per prompt, to check the accuracy bookkeeping."""

    def __init__(self, tokenizer, responses: list[str]) -> None:
        self.tokenizer = tokenizer
        self.responses = responses

    def eval(self) -> None:
        pass

    def generate(self, input_ids, attention_mask, num_return_sequences, **kwargs):
        width = input_ids.shape[1]
        rows = []
        for prompt_row, response in enumerate(self.responses):
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [
                self.tokenizer.eos_token_id
            ]
            rows += [input_ids[prompt_row].tolist() + ids] * num_return_sequences
        length = max(len(row) for row in rows)
        assert all(len(row) > width for row in rows)
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (length - len(row)) for row in rows])


def test_sampled_accuracy_scores_with_the_reward(tokenizer) -> None:
    records = generate_problems(ArithmeticTask(), 4, seed=2)
    responses = [
        f"Answer: {records[0].ground_truth}",
        f"{records[1].problem}={records[1].ground_truth}",  # right number, but no Answer line
        f"Answer: {int(records[2].ground_truth) + 1}",
        f"x\nAnswer: {records[3].ground_truth}",
    ]
    model = ScriptedModel(tokenizer, responses)
    assert sampled_accuracy(model, tokenizer, records, samples_per_prompt=3) == pytest.approx(0.5)


def test_warm_start_never_trains_on_the_held_out_problems():
    settings = WarmStartSettings()
    held_out = {record.problem for record in held_out_problems(settings.task)}
    drawn, kept = set(), set()
    for seed in range(200):
        kept.update(r.problem for r in sft_problems(settings, random.Random(seed), held_out))
        drawn.update(r.problem for r in sft_problems(settings, random.Random(seed), set()))
    assert drawn & held_out  # the task is small: unfiltered, the stream would repeat them
    assert kept and not kept & held_out
    assert kept == drawn - held_out
