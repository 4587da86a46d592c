"""The one record type every prompt source yields: dataset files and the demo's arithmetic task alike."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRecord:
    """One problem with its reference answer.

    Exactly one of `problem` (raw text; the prompt template is applied later) and `messages` (a chat that
    already holds its template, used as given) is set.
    """

    index: int  # row in the source file, 0-based: what bad-row reports and the data-loader position name
    ground_truth: str  # reference answer, compared by the reward
    problem: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if (self.problem is None) == (self.messages is None):
            raise ValueError(f"row {self.index}: a record needs exactly one of problem and messages")
