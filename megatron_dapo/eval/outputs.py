"""What dapo-eval leaves behind: results.json (settings and metrics), samples.jsonl (every sample), and a
table of accuracies for the terminal."""

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_dapo.eval.results import EvalResult
from megatron_dapo.eval.sets import EvalSet

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


def sample_rows(dataset: str, result: EvalResult) -> Iterator[dict[str, Any]]:
    """The samples.jsonl lines of one dataset."""
    for problem in result.problems:
        for sample in problem.samples:
            yield {
                "dataset": dataset,
                "problem": problem.problem,
                "index": problem.index,
                "ground_truth": problem.ground_truth,
                **asdict(sample),
                "finish_reason": str(sample.finish_reason),
            }


def write_outputs(
    out_dir: Path, results: Mapping[str, EvalResult], eval_sets: Sequence[EvalSet], run_info: dict[str, Any]
) -> None:
    """results.json (run settings and each dataset's metrics) and samples.jsonl (every sample)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {
        eval_set.name: {
            "path": str(eval_set.path),
            "rows": eval_set.rows,
            "skipped_rows": eval_set.skipped_rows,
            "duplicate_rows": eval_set.duplicate_rows,
            "problems": len(eval_set.prompts),
            "samples": results[eval_set.name].num_samples,
            "metrics": results[eval_set.name].metrics(),
        }
        for eval_set in eval_sets
    }
    summary = {**run_info, "datasets": datasets}
    (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    with (out_dir / SAMPLES_FILE).open("w", encoding="utf-8") as lines:
        for name, result in results.items():
            for row in sample_rows(name, result):
                lines.write(json.dumps(row, ensure_ascii=False) + "\n")


def format_table(results: Mapping[str, EvalResult]) -> str:
    """Accuracies in percent, one dataset per line."""
    metric_names = list(dict.fromkeys(name for result in results.values() for name in result.metrics()))
    header = ["dataset", "problems", *metric_names]
    rows = []
    for name, result in results.items():
        metrics = result.metrics()
        cells = [name, str(len(result.problems))]
        for metric in metric_names:
            if metric not in metrics:
                cells.append("-")
            elif metric == "response_length_mean":
                cells.append(f"{metrics[metric]:.0f}")
            else:
                cells.append(f"{100 * metrics[metric]:.1f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n(accuracies and truncation ratio in %, response length in tokens)"
