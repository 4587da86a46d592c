"""Prompt datasets from parquet or jsonl: layout detection, row validation, tokenization, resumable shuffling.

Every bad row (no answer, an answer that normalises to nothing, empty prompt, prompt over the token limit) is
found before training starts and reported by its row number and field; `on_bad_row` then skips them or
rejects the whole file.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from megatron_dapo.algo.saturation import SaturationPolicy, SkipSettings
from megatron_dapo.data.catalog import dataset_file, describe_missing
from megatron_dapo.data.record import PromptRecord
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE, encode_prompts, is_templated
from megatron_dapo.errors import UserError
from megatron_dapo.reward.score import normalize_ground_truth

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "error"]


class BadDataError(UserError):
    """A dataset that cannot be used as configured; the message lists the rows at fault."""


@dataclass(frozen=True)
class Layout:
    """Where a file keeps the prompt and the answer, and how to read them."""

    name: str
    prompt_key: str  # dotted path: "reward_model.ground_truth" reads row["reward_model"]["ground_truth"]
    answer_key: str
    prompt_kind: Literal["problem", "messages"]  # raw problem text, or chat messages used as given
    answer_format: Literal["plain", "gsm8k"]  # gsm8k: the answer is the number after the last "####"


LAYOUTS = {
    layout.name: layout
    for layout in (
        # DAPO-Math-17k: `prompt` is the raw problem (text, or one user message holding it).
        Layout("dapo", "prompt", "reward_model.ground_truth", "problem", "plain"),
        # DAPO eval files (aime-2024.parquet) and the hub's 17k copy: the template is already in the messages.
        Layout("dapo_chat", "prompt", "reward_model.ground_truth", "messages", "plain"),
        # AIME 2024/2025, MATH-500, AMC 2023, the demo's arithmetic task.
        Layout("problem_answer", "problem", "answer", "problem", "plain"),
        Layout("gsm8k", "question", "answer", "problem", "gsm8k"),
    )
}


@dataclass(frozen=True)
class BadRow:
    """One unusable row, named so that a user can find and fix it."""

    index: int  # row in the file, 0-based
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class TokenizedPrompt:
    """A record with the exact token ids the policy is prompted with."""

    record: PromptRecord
    token_ids: tuple[int, ...]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a .parquet or .jsonl file, or of a shipped data set named as in data/catalog.py, as dicts
    (blank jsonl lines are not rows)."""
    path = dataset_file(path)
    if not path.is_file():
        raise FileNotFoundError(describe_missing(path))
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except pa.ArrowException as error:
            raise BadDataError(f"{path}: not a parquet file pyarrow can read ({error})") from None
    if path.suffix == ".jsonl":
        rows = []
        with path.open("rb") as lines:
            for line_number, raw_line in enumerate(lines, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadDataError(
                        f"{path}, line {line_number}: not UTF-8 text; save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise BadDataError(f"{path}, line {line_number}: not valid JSON ({error})") from error
                if not isinstance(row, dict):
                    raise BadDataError(f"{path}, line {line_number}: a row must be a JSON object")
                rows.append(row)
        return rows
    raise BadDataError(f"{path}: unsupported dataset format {path.suffix!r}; use .parquet or .jsonl")


def detect_layout(row: dict[str, Any]) -> Layout | None:
    """The known layout a file's first row matches, or None."""
    if "prompt" in row and "reward_model" in row:
        prompt = row["prompt"]
        first = prompt[0] if isinstance(prompt, list) and prompt else None
        templated = isinstance(first, dict) and is_templated(str(first.get("content", "")))
        if isinstance(prompt, list) and (len(prompt) > 1 or templated):
            return LAYOUTS["dapo_chat"]
        return LAYOUTS["dapo"]
    if "problem" in row and "answer" in row:
        return LAYOUTS["problem_answer"]
    if "question" in row and "####" in str(row.get("answer", "")):
        return LAYOUTS["gsm8k"]
    return None


def resolve_layout(
    rows: Sequence[dict[str, Any]], layout: str, prompt_key: str | None, answer_key: str | None, source: str
) -> Layout:
    """The named or detected layout, with the configured field names taking precedence."""
    if layout == "auto":
        chosen = detect_layout(rows[0]) if rows else None
        if chosen is None and prompt_key and answer_key:
            chosen = LAYOUTS["problem_answer"]
        if chosen is None:
            columns = sorted(rows[0]) if rows else []
            raise BadDataError(
                f"{source}: cannot tell the layout from columns {columns}; set data.format to one of "
                f"{sorted(LAYOUTS)}, or name the columns with prompt_key and answer_key"
            )
    elif layout in LAYOUTS:
        chosen = LAYOUTS[layout]
    else:
        raise BadDataError(f"unknown data.format {layout!r}; choose 'auto' or one of {sorted(LAYOUTS)}")
    return replace(
        chosen, prompt_key=prompt_key or chosen.prompt_key, answer_key=answer_key or chosen.answer_key
    )


def lookup(row: dict[str, Any], dotted_key: str) -> Any:
    """row[a][b] for "a.b"; None when any level is missing."""
    value: Any = row
    for key in dotted_key.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _parse_answer(value: Any, answer_format: str) -> tuple[str | None, str]:
    """(ground truth, "") or (None, why it is unusable)."""
    if value is None:
        return None, "missing answer"
    if isinstance(value, float):
        # AMC 2023 stores integer answers as floats (27.0): the ground truth is "27".
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            return None, "no final answer after '####'"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not text:
        return None, "empty answer"
    try:
        normalize_ground_truth(text)  # "$" or "dollars": no response could ever match it
    except ValueError as error:
        return None, str(error)
    return text, ""


def _parse_prompt(value: Any, prompt_kind: str) -> tuple[dict[str, Any] | None, str]:
    """(record fields, "") or (None, why the prompt is unusable)."""
    is_chat = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if prompt_kind == "messages":
        if not is_chat:
            return None, "expected a list of chat messages with string role and content"
        if not any(m["content"].strip() for m in value):
            return None, "empty prompt"
        return {"messages": tuple({"role": m["role"], "content": m["content"]} for m in value)}, ""
    if is_chat and len(value) == 1 and value[0]["role"] == "user":
        value = value[0]["content"]
    if value is None or value == []:
        return None, "empty prompt"
    if not isinstance(value, str):
        return None, "expected the problem as text (or one user message)"
    if not value.strip():
        return None, "empty prompt"
    return {"problem": value}, ""


def parse_rows(rows: Sequence[dict[str, Any]], layout: Layout) -> tuple[list[PromptRecord], list[BadRow]]:
    """Records for the usable rows, and a BadRow for each of the others."""
    records, bad_rows = [], []
    for index, row in enumerate(rows):
        prompt, prompt_error = _parse_prompt(lookup(row, layout.prompt_key), layout.prompt_kind)
        answer, answer_error = _parse_answer(lookup(row, layout.answer_key), layout.answer_format)
        if prompt_error:
            bad_rows.append(BadRow(index, layout.prompt_key, prompt_error))
        if answer_error:
            bad_rows.append(BadRow(index, layout.answer_key, answer_error))
        if prompt is not None and answer is not None:
            records.append(PromptRecord(index=index, ground_truth=answer, **prompt))
    return records, bad_rows


def read_records(
    path: str | Path, *, layout: str = "auto", prompt_key: str | None = None, answer_key: str | None = None
) -> tuple[list[PromptRecord], list[BadRow]]:
    """Records of a dataset file and its bad rows (no tokenizer needed: prompt lengths are not checked)."""
    rows = read_rows(path)
    chosen = resolve_layout(rows, layout, prompt_key, answer_key, str(path))
    logger.info("%s: %d rows, layout %s", path, len(rows), chosen.name)
    return parse_rows(rows, chosen)


def tokenize_records(
    records: Sequence[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_tokens: int,
    template: str = DAPO_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
) -> tuple[list[TokenizedPrompt], list[BadRow]]:
    """Prompt token ids of each record; prompts longer than `max_prompt_tokens` become bad rows."""
    token_ids = encode_prompts(records, tokenizer, template=template, use_chat_template=use_chat_template)
    prompts, bad_rows = [], []
    for record, ids in zip(records, token_ids, strict=True):
        if len(ids) > max_prompt_tokens:
            field = "prompt" if record.messages is None else "messages"
            reason = f"{len(ids)} tokens once templated, over max_prompt_tokens={max_prompt_tokens}"
            bad_rows.append(BadRow(record.index, field, reason))
        else:
            prompts.append(TokenizedPrompt(record, tuple(ids)))
    return prompts, bad_rows


def handle_bad_rows(
    bad_rows: Sequence[BadRow], *, on_bad_row: OnBadRow, source: str, total_rows: int, max_reported: int = 20
) -> None:
    """Raise with the bad rows listed ("error"), or log them and go on without them ("skip")."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"data.on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    if not bad_rows:
        return
    ordered = sorted(bad_rows, key=lambda bad: bad.index)
    listed = "\n  ".join(str(bad) for bad in ordered[:max_reported])
    more = f"\n  ... and {len(ordered) - max_reported} more" if len(ordered) > max_reported else ""
    distinct_rows = len({bad.index for bad in ordered})
    summary = f"{source}: {distinct_rows} of {total_rows} rows are unusable:\n  {listed}{more}"
    if on_bad_row == "error":
        raise BadDataError(f"{summary}\nFix these rows, or set data.on_bad_row=skip to train without them.")
    logger.warning("%s\nSkipping them (data.on_bad_row=skip).", summary)


def load_prompts(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_tokens: int,
    on_bad_row: OnBadRow = "error",
    layout: str = "auto",
    prompt_key: str | None = None,
    answer_key: str | None = None,
    template: str = DAPO_PROMPT_TEMPLATE,
    use_chat_template: bool = True,
    max_reported: int = 20,
) -> tuple[list[TokenizedPrompt], int]:
    """A validated, tokenized prompt dataset, ready before training starts, and the file's row count."""
    records, bad_rows = read_records(path, layout=layout, prompt_key=prompt_key, answer_key=answer_key)
    total_rows = len(records) + len({bad.index for bad in bad_rows})
    prompts, too_long = tokenize_records(
        records,
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        template=template,
        use_chat_template=use_chat_template,
    )
    handle_bad_rows(
        bad_rows + too_long,
        on_bad_row=on_bad_row,
        source=str(path),
        total_rows=total_rows,
        max_reported=max_reported,
    )
    if not prompts:
        raise BadDataError(f"{path}: no usable rows")
    return prompts, total_rows


class PromptLoader:
    """An endless stream of prompts: a fresh seeded permutation every epoch, resumable from a checkpoint.

    Dynamic sampling asks for prompts a few at a time, so the stream is consumed with `take(count)`, which
    runs across epoch boundaries; the position is (epoch, offset into that epoch's permutation). With `skip`
    (algorithm.skip_saturated) the stream passes over prompts whose last group was saturated, as
    algo/saturation.py decides; the caller records each judged group in `self.saturation`.
    """

    def __init__(
        self,
        prompts: Sequence[TokenizedPrompt],
        *,
        seed: int,
        shuffle: bool = True,
        skip: SkipSettings | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("PromptLoader needs at least one prompt")
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0  # prompts of this epoch already handed out or skipped
        self._order = self._epoch_order(0)
        self._rows = np.array([prompt.record.index for prompt in prompts])
        num_rows = int(self._rows.max()) + 1  # the memory is indexed by row in the file
        self.saturation = None if skip is None else SaturationPolicy(num_rows, skip, seed=seed)
        self.skipped_saturated = 0  # prompts skipped since this process started

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def take(self, count: int) -> list[TokenizedPrompt]:
        """The next `count` prompts of the stream (saturated ones skipped when `skip` is set)."""
        taken: list[TokenizedPrompt] = []
        skipped_in_a_row = 0
        while len(taken) < count:
            if self.offset == len(self.prompts):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            prompt = self.prompts[self._order[self.offset]]
            self.offset += 1
            if self.saturation is None or not self.saturation.should_skip(prompt.record.index):
                taken.append(prompt)
                skipped_in_a_row = 0
                continue
            self.skipped_saturated += 1
            skipped_in_a_row += 1
            if skipped_in_a_row % len(self.prompts) == 0 and self.saturation.excludes_forever(self._rows):
                raise RuntimeError(
                    f"every one of the {len(self.prompts)} prompts was saturated when last generated and is "
                    "skipped for good: lower algorithm.skip_p_all_correct / skip_p_all_wrong below 1, set "
                    "algorithm.skip_expiry_epochs, or add harder (or easier) prompts"
                )
        return taken

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_prompts": len(self.prompts),
            **({"saturation": self.saturation.state_dict()} if self.saturation else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where a checkpoint left off; the dataset and seed must be the ones it was saved with."""
        for key, current in (
            ("num_prompts", len(self.prompts)),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            if state[key] != current:
                raise ValueError(
                    f"data-loader checkpoint has {key}={state[key]} but this run has {key}={current}: resume "
                    "with the same dataset, data.on_bad_row and seed as the run that saved it"
                )
        if not 0 <= state["offset"] <= len(self.prompts):
            raise ValueError(
                f"data-loader checkpoint offset {state['offset']} is outside 0..{len(self.prompts)}"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._epoch_order(self.epoch)
        if self.saturation is not None and "saturation" in state:
            self.saturation.load_state_dict(state["saturation"])
        elif self.saturation is not None:  # saved before skip_saturated was turned on
            logger.info("the checkpoint has no skip_saturated memory: every prompt starts unseen")
