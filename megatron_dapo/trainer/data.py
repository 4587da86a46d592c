"""The run's prompts: the training set and the evaluation set, validated and tokenized before anything costly
starts (model, servers), so a bad row is reported by its number at once, not hours into a run."""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from megatron_dapo.algo.saturation import SkipSettings
from megatron_dapo.config import DapoConfig
from megatron_dapo.data.arithmetic import ARITHMETIC_PROMPT_TEMPLATE
from megatron_dapo.data.dataset import TokenizedPrompt, load_prompts
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE
from megatron_dapo.eval import load_eval_set


def prompt_format(data_format: str) -> tuple[str, str]:
    """(dataset layout, prompt template) of a `data.format`: the demo's arithmetic task is a problem/answer
    file whose problem is the whole prompt; every other format takes the paper's template."""
    if data_format == "arithmetic":
        return "problem_answer", ARITHMETIC_PROMPT_TEMPLATE
    return data_format, DAPO_PROMPT_TEMPLATE


def load_train_prompts(cfg: DapoConfig, tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPrompt]:
    """The training prompts; bad rows are reported with their row numbers and skipped or refused per
    data.on_bad_row (data/dataset.py)."""
    if not cfg.data.train_path:
        raise FileNotFoundError("data.train_path is empty: set it to a parquet or jsonl file of prompts")
    layout, template = prompt_format(cfg.data.format)
    prompts, _ = load_prompts(
        Path(cfg.data.train_path),
        tokenizer,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        on_bad_row=cfg.data.on_bad_row,
        layout=layout,
        template=template,
        use_chat_template=cfg.data.apply_chat_template,
    )
    return prompts


def skip_settings(cfg: DapoConfig) -> SkipSettings | None:
    """How the prompt stream skips saturated prompts; None when algorithm.skip_saturated is off."""
    a = cfg.algorithm
    if not a.skip_saturated:
        return None
    return SkipSettings(a.skip_p_all_correct, a.skip_p_all_wrong, a.skip_expiry_epochs)


def load_eval_prompts(cfg: DapoConfig, tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPrompt]:
    """The evaluation problems (duplicate rows merged), prompted as in training; none when eval.path is
    empty. The layout is detected from the file, the prompt template follows data.format."""
    if not cfg.eval.path:
        return []
    _, template = prompt_format(cfg.data.format)
    eval_set = load_eval_set(
        cfg.eval.path,
        tokenizer,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        on_bad_row=cfg.data.on_bad_row,
        template=template,
        use_chat_template=cfg.data.apply_chat_template,
    )
    return list(eval_set.prompts)
