"""dapo-eval: avg@k / pass@k / cons@k of a checkpoint (the library: megatron_dapo/eval/).

Exit status 0: evaluated; 2: bad input, or a model, server or engine that cannot serve (one line on stderr).
"""

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from megatron_dapo.data.catalog import DATASETS
from megatron_dapo.data.dataset import LAYOUTS
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.eval import (
    PAPER_MAX_NEW_TOKENS,
    PAPER_SAMPLES_PER_PROBLEM,
    PAPER_TEMPERATURE,
    PAPER_TOP_P,
    RESULTS_FILE,
    RUN_ERRORS,
    SAMPLES_FILE,
    EvalJob,
    format_table,
    run_job,
)
from megatron_dapo.rollout.deadline import DEFAULT_DEADLINES
from megatron_dapo.rollout.types import SamplingParams


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dapo-eval",
        description="avg@k / pass@k / cons@k of a checkpoint through SGLang servers or the CPU engine.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="Hugging Face directory, or a Megatron checkpoint of this project",
    )
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help=f"parquet or jsonl files, or shipped data sets by name ({', '.join(DATASETS)}); repeatable",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help=f"directory for {RESULTS_FILE} and {SAMPLES_FILE}"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace an existing {RESULTS_FILE} in --out"
    )
    sampling = parser.add_argument_group("sampling (defaults: the paper's evaluation)")
    sampling.add_argument(
        "--samples", type=int, default=PAPER_SAMPLES_PER_PROBLEM, help="samples per problem"
    )
    sampling.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE)
    sampling.add_argument("--top-p", type=float, default=PAPER_TOP_P)
    sampling.add_argument("--top-k", type=int, default=-1, help="-1: off")
    sampling.add_argument("--max-new-tokens", type=int, default=PAPER_MAX_NEW_TOKENS)
    sampling.add_argument(
        "--seed", type=int, help="seed every sample (SGLang needs a release that knows sampling_seed)"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="raw prompt text, for base models",
    )
    data.add_argument(
        "--layout", default="auto", choices=["auto", *LAYOUTS], help="column layout of the files"
    )
    data.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are bad rows")
    data.add_argument(
        "--on-bad-row",
        choices=["skip", "error"],
        default="skip",
        help="skip (after reporting) or refuse bad rows",
    )
    data.add_argument(
        "--boxed-fallback", action="store_true", help="read the last \\boxed{} when there is no Answer line"
    )
    servers = parser.add_argument_group("servers")
    servers.add_argument(
        "--server-url",
        nargs="+",
        action="extend",
        default=[],
        help="running servers serving --model (no launch); their API key, if any, in $DAPO_API_KEY",
    )
    servers.add_argument("--engine", choices=["sglang", "cpu"], default="sglang", help="servers to launch")
    servers.add_argument("--num-servers", type=int, default=1, help="servers to launch")
    servers.add_argument("--server-tp", type=int, default=1, help="GPUs per launched SGLang server")
    servers.add_argument(
        "--request-deadline-floor-s",
        type=float,
        default=DEFAULT_DEADLINES.floor_s,
        help="a sample may take this long plus max-new-tokens x 3 / the server's measured tokens/s; "
        "past that it moves to another server",
    )
    servers.add_argument(
        "--request-min-tokens-per-s",
        type=float,
        default=DEFAULT_DEADLINES.min_tokens_per_s,
        help="the speed assumed of a server until one of its samples has finished",
    )
    args = parser.parse_args(argv)
    for flag in ("request_deadline_floor_s", "request_min_tokens_per_s"):
        if not 0 < getattr(args, flag) < math.inf:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("samples", "max_new_tokens", "num_servers", "server_tp", "max_prompt_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not (0 <= args.temperature < math.inf and 0 < args.top_p <= 1):  # NaN compares false: refused
        parser.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    if args.engine == "cpu" and args.server_tp != 1:
        parser.error("--server-tp: the CPU engine runs on one process; leave it at 1")
    return args


def eval_job(args: argparse.Namespace) -> EvalJob:
    """The run the flags ask for."""
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    return EvalJob(
        model=args.model,
        data=args.data,
        out=args.out,
        overwrite=args.overwrite,
        samples_per_problem=args.samples,
        params=params,
        chat_template=args.chat_template,
        layout=args.layout,
        max_prompt_tokens=args.max_prompt_tokens,
        on_bad_row=args.on_bad_row,
        boxed_fallback=args.boxed_fallback,
        server_urls=args.server_url,
        engine=args.engine,
        num_servers=args.num_servers,
        server_tp=args.server_tp,
        deadlines=replace(
            DEFAULT_DEADLINES,
            floor_s=args.request_deadline_floor_s,
            min_tokens_per_s=args.request_min_tokens_per_s,
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error("dapo-eval", *RUN_ERRORS):
        results = asyncio.run(run_job(eval_job(args)))
    print(format_table(results))
    print(f"wrote {args.out / RESULTS_FILE} and {args.out / SAMPLES_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
