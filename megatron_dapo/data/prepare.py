"""A data set shipped with the package, a local file, or DAPO-Math-17k or AIME 2024 fetched from the Hugging
Face hub, converted into the project's canonical layout (the command line: cli/prepare_data.py).

Canonical layout (.parquet or .jsonl): one row per problem with `problem` (raw text, no prompt template:
the template is applied at training time), `answer` (string) and `source_index` (the row's id in the
source). Rows repeated under one id (the hub's 17k set holds every problem 100 times, the AIME eval file
32 times) are kept once; problems that appear under several ids with different answers are reported.
"""

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_dapo.data.dataset import (
    BadRow,
    lookup,
    parse_rows,
    read_rows,
    resolve_layout,
)
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE, PROBLEM_PLACEHOLDER, is_templated
from megatron_dapo.errors import UserError

# Shipped name (data/catalog.py) -> (hub dataset repository, file in it), for --from-hub.
HUB_SOURCES = {
    "dapo-math-17k": ("BytedTsinghua-SIA/DAPO-Math-17k", "data/dapo-math-17k.parquet"),
    "aime2024-dapo": ("BytedTsinghua-SIA/AIME-2024", "data/aime-2024.parquet"),
}
DEFAULT_ID_KEY = "extra_info.index"  # where the DAPO files keep a problem's id


@dataclass(frozen=True)
class CanonicalRow:
    problem: str
    answer: str
    source_index: str


@dataclass(frozen=True)
class Conversion:
    """What a conversion kept and what it found wrong."""

    rows: list[CanonicalRow]
    rows_read: int
    duplicates_dropped: int
    bad_rows: list[BadRow]
    conflicts: dict[str, list[tuple[str, str]]]  # problem -> [(source_index, answer)], 2+ distinct answers


def download(name: str, cache_dir: str | None = None) -> Path:
    """Local path of a known hub dataset file, downloaded once into the Hugging Face cache."""
    repo_id, filename = HUB_SOURCES[name]
    from huggingface_hub import hf_hub_download  # optional: only this path needs the hub client

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache_dir))
    except Exception as error:  # offline, DNS, HTTP or cache errors all end the same way for the user
        raise UserError(
            f"could not download {filename} of the hub dataset {repo_id} ({type(error).__name__}: {error}).\n"
            f"Without a network, fetch https://huggingface.co/datasets/{repo_id}/resolve/main/{filename} "
            "elsewhere and run: dapo-prepare-data --source PATH_TO_THAT_FILE --out OUT"
        ) from error


def _raw_problem(messages: tuple[dict[str, str], ...]) -> str | None:
    """The problem inside a one-message chat that holds the DAPO template, or None."""
    if len(messages) != 1 or not is_templated(messages[0]["content"]):
        return None
    prefix, suffix = DAPO_PROMPT_TEMPLATE.split(PROBLEM_PLACEHOLDER)
    return messages[0]["content"][len(prefix) : len(messages[0]["content"]) - len(suffix)]


def convert(
    path: str | Path,
    *,
    layout: str = "auto",
    prompt_key: str | None = None,
    answer_key: str | None = None,
    id_key: str = DEFAULT_ID_KEY,
) -> Conversion:
    """Canonical rows of a local dataset file: one per id, raw problem text, bad rows set aside."""
    rows = read_rows(path)
    records, bad_rows = parse_rows(rows, resolve_layout(rows, layout, prompt_key, answer_key, str(path)))
    canonical: dict[str, CanonicalRow] = {}
    duplicates = 0
    for record in records:
        problem = record.problem if record.messages is None else _raw_problem(record.messages)
        if problem is None:
            reason = "not the DAPO template applied to one problem, so the raw problem cannot be recovered"
            bad_rows.append(BadRow(record.index, "prompt", reason))
            continue
        source_id = lookup(rows[record.index], id_key)
        source_index = str(record.index if source_id is None else source_id)
        row = CanonicalRow(problem=problem, answer=record.ground_truth, source_index=source_index)
        if source_index not in canonical:
            canonical[source_index] = row
        elif canonical[source_index] == row:
            duplicates += 1
        else:
            reason = f"id {source_index} repeats with a different problem or answer"
            bad_rows.append(BadRow(record.index, id_key, reason))
    answers_by_problem = defaultdict(list)
    for row in canonical.values():
        answers_by_problem[row.problem].append((row.source_index, row.answer))
    conflicts = {
        problem: answers
        for problem, answers in answers_by_problem.items()
        if len({answer for _, answer in answers}) > 1
    }
    return Conversion(list(canonical.values()), len(rows), duplicates, bad_rows, conflicts)


def write_rows(rows: Sequence[CanonicalRow], out: Path) -> None:
    """Write .parquet or .jsonl atomically: a crash leaves no half-written file under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    columns = {name: [getattr(row, name) for row in rows] for name in ("problem", "answer", "source_index")}
    if out.suffix == ".parquet":
        pq.write_table(pa.table(columns), partial)
    else:
        with partial.open("w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    os.replace(partial, out)


def report(conversion: Conversion, max_listed: int) -> str:
    lines = [
        f"rows read: {conversion.rows_read}",
        f"repeated rows dropped (same id, same problem and answer): {conversion.duplicates_dropped}",
        f"unusable rows dropped: {len({bad.index for bad in conversion.bad_rows})}",
        f"problems written: {len(conversion.rows)}",
        f"problems with conflicting answers under different ids (kept): {len(conversion.conflicts)}",
    ]
    for problem, answers in list(conversion.conflicts.items())[:max_listed]:
        listed = ", ".join(f"id {source_index}: {answer}" for source_index, answer in answers)
        lines.append(f"  {problem[:70]!r}... -> {listed}")
    return "\n".join(lines)
