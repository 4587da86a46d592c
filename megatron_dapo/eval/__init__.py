"""Evaluate a checkpoint the way the paper does: k samples per problem, avg@k, pass@k and cons@k.

    dapo-eval --model HF_DIR_OR_MEGATRON_CKPT --data aime2024 --out eval/aime24 \\
        [--samples 32 --temperature 1.0 --top-p 0.7] [--engine sglang|cpu --num-servers N --server-tp T]
        [--server-url URL ...]

The trainer calls `evaluate` with its own running engine; the command starts servers (or uses running ones),
evaluates each `--data` file and writes `results.json`, `samples.jsonl` and a table on stdout.

- avg@n: mean accuracy over all n samples of all problems (the paper's avg@32); equal to pass@1.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over problems.
- cons@n: share of problems whose majority normalised answer (ties: the first to appear) is right.

Where this departs from the paper's evaluation:
- Rows that are the same prompt with the same answer are merged into one problem: the reference's AIME file
  (aime2024_dapo.parquet) repeats each of its 30 problems 32 times, for one sample per row; here each
  problem gets n samples. avg@n is the same estimate, and pass@k and cons@n become meaningful.

Modules: results (what is reported, and `summarize`), run (`evaluate` through an engine; samples are scored
by reward/responses.py, as in training), sets (evaluation files as distinct problems), model_dir (a Hugging
Face directory or a Megatron checkpoint), outputs (results.json, samples.jsonl, the table), job (one dapo-eval
run end to end). The command line is megatron_dapo/cli/eval.py.
"""

from megatron_dapo.eval.job import (
    PAPER_MAX_NEW_TOKENS,
    PAPER_SAMPLES_PER_PROBLEM,
    PAPER_TEMPERATURE,
    PAPER_TOP_P,
    RUN_ERRORS,
    EvalJob,
    run_job,
    server_specs,
)
from megatron_dapo.eval.model_dir import is_megatron_checkpoint, served_model_dir
from megatron_dapo.eval.outputs import RESULTS_FILE, SAMPLES_FILE, format_table, sample_rows, write_outputs
from megatron_dapo.eval.results import EvalResult, ProblemResult, SampleResult, default_ks, summarize
from megatron_dapo.eval.run import evaluate, evaluate_sets, gather_or_cancel, score_problem
from megatron_dapo.eval.sets import EvalSet, dataset_names, load_eval_set, merge_duplicates

__all__ = [
    "PAPER_MAX_NEW_TOKENS",
    "PAPER_SAMPLES_PER_PROBLEM",
    "PAPER_TEMPERATURE",
    "PAPER_TOP_P",
    "RESULTS_FILE",
    "RUN_ERRORS",
    "SAMPLES_FILE",
    "EvalJob",
    "EvalResult",
    "EvalSet",
    "ProblemResult",
    "SampleResult",
    "dataset_names",
    "default_ks",
    "evaluate",
    "evaluate_sets",
    "format_table",
    "gather_or_cancel",
    "is_megatron_checkpoint",
    "load_eval_set",
    "merge_duplicates",
    "run_job",
    "sample_rows",
    "score_problem",
    "served_model_dir",
    "server_specs",
    "summarize",
    "write_outputs",
]
