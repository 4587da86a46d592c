"""Evaluation files as distinct problems: read, validated, tokenized, repeated rows merged, named apart."""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.data.dataset import OnBadRow, TokenizedPrompt, load_prompts
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation file, as distinct problems ready to prompt."""

    name: str  # what tables and samples.jsonl call it
    path: Path
    prompts: tuple[TokenizedPrompt, ...]  # distinct problems, in file order
    rows: int  # rows in the file
    skipped_rows: int  # unusable rows left out (the loader reported them)
    duplicate_rows: int  # rows merged into an earlier identical problem


def merge_duplicates(prompts: Sequence[TokenizedPrompt]) -> list[TokenizedPrompt]:
    """The first of each group of rows with the same problem (or messages) and answer: a problem repeated k
    times for avg@k is one problem sampled k times. The same problem with another answer stays separate."""
    distinct: dict[str, TokenizedPrompt] = {}
    for prompt in prompts:
        record = prompt.record
        # Compared as text, not token ids: a lossy tokenizer must not merge different problems.
        key = json.dumps([record.problem, record.messages, record.ground_truth])
        distinct.setdefault(key, prompt)
    return list(distinct.values())


def load_eval_set(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str | None = None,
    max_prompt_tokens: int,
    on_bad_row: OnBadRow = "skip",
    layout: str = "auto",
    template: str = DAPO_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
) -> EvalSet:
    """Read, validate and tokenize an evaluation file; bad rows are reported and skipped (or raise, with
    on_bad_row="error"), duplicates merged. `name` defaults to the file name without its suffix."""
    path = dataset_file(path)
    prompts, rows = load_prompts(
        path,
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        on_bad_row=on_bad_row,
        layout=layout,
        template=template,
        use_chat_template=use_chat_template,
    )
    distinct = merge_duplicates(prompts)
    if len(distinct) < len(prompts):
        logger.info(
            "%s: %d rows are %d distinct problems (duplicates merged)", path, len(prompts), len(distinct)
        )
    return EvalSet(
        name=name or path.stem,
        path=path,
        prompts=tuple(distinct),
        rows=rows,
        skipped_rows=rows - len(prompts),
        duplicate_rows=len(prompts) - len(distinct),
    )


def dataset_names(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path (suffix dropped) that tells the files apart: "aime2024", or
    "aime24/test" and "amc23/test" for a harness's one-folder-per-benchmark layout."""
    resolved = [dataset_file(path).resolve() for path in paths]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"--data lists the same file twice: {[str(path) for path in paths]}")
    depth = 1
    while len({path.parts[-depth:] for path in resolved}) < len(resolved):
        depth += 1  # ends at the latest at the full paths, which are distinct
    names = [str(Path(*path.parts[-depth:])) for path in resolved]
    stems = [str(Path(name).with_suffix("")) for name in names]
    return stems if len(set(stems)) == len(stems) else names
