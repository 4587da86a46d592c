"""Skipping saturated prompts (issue 13): a prompt whose last group was all correct or all wrong is skipped,
with a set probability, when the prompt stream reaches it again, until it has been skipped a set number of
epochs in a row.

Dynamic sampling filters such groups only after paying for their generation; a skipped prompt costs nothing.
A skipped prompt comes back (after the expiry, or by chance when the probability is below 1), so the policy
can still forget and relearn it; when it is generated again its new outcome replaces the old one.

The memory is three arrays over the dataset's rows: the last outcome, the step it was seen at, and the skips
since. Each decision draws from a generator seeded by (seed, row, step seen, skips so far), so the decisions
follow from the memory alone: a run resumed from `state_dict` decides exactly as an uninterrupted one.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch


class Outcome(IntEnum):
    """What a prompt's last judged group showed."""

    UNSEEN = 0
    INFORMATIVE = 1  # 0 < #correct < G: the group trains the policy
    ALL_CORRECT = 2
    ALL_WRONG = 3


def group_outcome(correct: Sequence[bool]) -> Outcome:
    num_correct = sum(bool(c) for c in correct)
    if num_correct == len(correct):
        return Outcome.ALL_CORRECT
    return Outcome.ALL_WRONG if num_correct == 0 else Outcome.INFORMATIVE


@dataclass(frozen=True)
class SkipSettings:
    """How saturated prompts are skipped (config: algorithm.skip_*)."""

    p_all_correct: float  # probability of skipping, each time the stream reaches it, an all-correct prompt
    p_all_wrong: float  # the same for a prompt whose last group was all wrong
    expiry_epochs: int  # a prompt skipped this many epochs in a row is offered again; 0: never

    def __post_init__(self) -> None:
        for name in ("p_all_correct", "p_all_wrong"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"algorithm.skip_{name} must be a probability in [0, 1], got {value}")
        if self.expiry_epochs < 0:
            raise ValueError(
                f"algorithm.skip_expiry_epochs must be >= 0 (0: never), got {self.expiry_epochs}"
            )


class SaturationPolicy:
    """Per-row memory of the last group's outcome, and the skip decisions drawn from it."""

    def __init__(self, num_rows: int, settings: SkipSettings, *, seed: int) -> None:
        if num_rows < 1:
            raise ValueError(f"a saturation policy needs at least one row, got {num_rows}")
        self.settings = settings
        self.seed = seed
        self.outcome = np.zeros(num_rows, dtype=np.int8)  # Outcome of the row's last judged group
        self.seen_step = np.zeros(num_rows, dtype=np.int64)  # rollout step that group was judged at
        self.skips = np.zeros(num_rows, dtype=np.int32)  # times skipped since then

    def record(self, row: int, correct: Sequence[bool], step: int) -> None:
        """Remember a judged group (kept or filtered) of prompt `row`, seen at rollout `step`."""
        self.outcome[row] = group_outcome(correct)
        self.seen_step[row] = step
        self.skips[row] = 0

    def _skip_probability(self, row: int) -> float:
        s = self.settings
        if s.expiry_epochs and self.skips[row] >= s.expiry_epochs:
            return 0.0  # skipped long enough: offered until it is judged again
        outcome = self.outcome[row]
        if outcome == Outcome.ALL_CORRECT:
            return s.p_all_correct
        return s.p_all_wrong if outcome == Outcome.ALL_WRONG else 0.0

    def should_skip(self, row: int) -> bool:
        """Whether to skip prompt `row` now that the stream reached it; a skip is counted towards expiry."""
        probability = self._skip_probability(row)
        if probability == 0.0:
            return False
        seed = [self.seed, row, int(self.seen_step[row]), int(self.skips[row])]
        draw = np.random.default_rng(seed).random()
        skip = bool(draw < probability)
        self.skips[row] += skip
        return skip

    def excludes_forever(self, rows: np.ndarray) -> bool:
        """True when every one of `rows` is skipped with certainty and for good: the stream yields nothing."""
        s = self.settings
        if s.expiry_epochs:
            return False
        outcome = self.outcome[rows]
        certain = ((outcome == Outcome.ALL_CORRECT) & (s.p_all_correct == 1.0)) | (
            (outcome == Outcome.ALL_WRONG) & (s.p_all_wrong == 1.0)
        )
        return bool(certain.all())

    def counts(self) -> dict[str, int]:
        """Rows remembered as all correct and as all wrong."""
        return {
            "all_correct": int((self.outcome == Outcome.ALL_CORRECT).sum()),
            "all_wrong": int((self.outcome == Outcome.ALL_WRONG).sum()),
        }

    def state_dict(self) -> dict[str, Any]:
        """The memory as tensors (a few bytes per row; 17,917 rows take ~230 kB)."""
        return {
            "outcome": torch.from_numpy(self.outcome.copy()),
            "seen_step": torch.from_numpy(self.seen_step.copy()),
            "skips": torch.from_numpy(self.skips.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = len(state["outcome"])
        if rows != len(self.outcome):
            raise ValueError(
                f"skip_saturated checkpoint remembers {rows} rows but this dataset has {len(self.outcome)}: "
                "resume with the same dataset and data.on_bad_row as the run that saved it"
            )
        self.outcome = np.asarray(state["outcome"], dtype=np.int8).copy()
        self.seen_step = np.asarray(state["seen_step"], dtype=np.int64).copy()
        self.skips = np.asarray(state["skips"], dtype=np.int32).copy()
