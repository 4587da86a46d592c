"""Prompt construction: the DAPO prompt template, then the tokenizer's chat template, then token ids.

A record carries either a raw problem (the template is applied here) or chat messages that already hold
the template (the DAPO eval layout), which are used exactly as given.
"""

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from megatron_dapo.data.record import PromptRecord

# The paper's prompt, byte for byte as in the DAPO reference data (aime-2024.parquet, DAPO-Math-17k).
DAPO_PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
PROBLEM_PLACEHOLDER = "{problem}"
# data.format=arithmetic, the CPU demo's task (megatron_dapo/demo/arithmetic.py): the problem is the whole
# prompt, as a tiny model reads no instructions and short prompts keep the demo fast. Here rather than in the
# demo because the trainer maps that format to it, and the library never imports the demo.
ARITHMETIC_PROMPT_TEMPLATE = "{problem}"


def apply_prompt_template(problem: str, template: str = DAPO_PROMPT_TEMPLATE) -> str:
    """The user message for a raw problem.

    Plain substitution rather than str.format: templates and problems are full of LaTeX braces.
    """
    if template.count(PROBLEM_PLACEHOLDER) != 1:
        raise ValueError(
            f"prompt template must contain {PROBLEM_PLACEHOLDER} exactly once, "
            f"found {template.count(PROBLEM_PLACEHOLDER)} in {template!r}"
        )
    return template.replace(PROBLEM_PLACEHOLDER, problem)


def is_templated(text: str, template: str = DAPO_PROMPT_TEMPLATE) -> bool:
    """Whether `text` is `template` applied to some problem (prefix and suffix both match)."""
    prefix, suffix = template.split(PROBLEM_PLACEHOLDER)
    return len(text) >= len(prefix) + len(suffix) and text.startswith(prefix) and text.endswith(suffix)


def prompt_messages(record: PromptRecord, template: str = DAPO_PROMPT_TEMPLATE) -> list[dict[str, str]]:
    """The chat to send: the record's own messages, or one user message holding the templated problem."""
    if record.messages is not None:
        return [dict(message) for message in record.messages]
    return [{"role": "user", "content": apply_prompt_template(record.problem, template)}]


def prompt_text(
    record: PromptRecord,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = DAPO_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
) -> str:
    """The exact prompt string the model sees, generation prompt included when chatting."""
    messages = prompt_messages(record, template)
    if use_chat_template:
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template: set "
                "data.apply_chat_template=false to prompt a base model with the raw templated text"
            )
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if len(messages) != 1:
        raise ValueError(
            f"row {record.index}: {len(messages)} chat messages cannot be sent as raw text; "
            "set data.apply_chat_template=true or give one user message per row"
        )
    return messages[0]["content"]


def encode_prompts(
    records: Sequence[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = DAPO_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
) -> list[list[int]]:
    """Prompt token ids for each record, in one batched tokenizer call.

    A rendered chat template already holds every special token it wants (Llama's BOS included), so no
    more are added; raw text gets the tokenizer's usual special tokens, as a base model saw in pretraining.
    """
    texts = [
        prompt_text(record, tokenizer, template=template, use_chat_template=use_chat_template)
        for record in records
    ]
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=not use_chat_template)
    return [list(ids) for ids in encoded["input_ids"]]
