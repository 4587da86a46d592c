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
"""

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from megatron_dapo.checkpoint.meta import META_FILE, hf_assets_dir
from megatron_dapo.data.catalog import DATASETS, dataset_file
from megatron_dapo.data.dataset import (
    LAYOUTS,
    BadDataError,
    OnBadRow,
    TokenizedPrompt,
    load_prompts,
)
from megatron_dapo.data.template import DAPO_PROMPT_TEMPLATE
from megatron_dapo.data.tokenizer import load_tokenizer as load_tokenizer_dir
from megatron_dapo.reward import (
    avg_at_k,
    compute_score,
    cons_at_k,
    normalize_ground_truth,
    pass_at_k,
)
from megatron_dapo.rollout.engine import EngineError, RolloutEngine
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, ServerStartError, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The paper's evaluation (DAPO.md): AIME 2024, 32 samples per problem, temperature 1.0, top-p 0.7, and the
# training length limit L_max.
PAPER_SAMPLES_PER_PROBLEM = 32
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 0.7
PAPER_MAX_NEW_TOKENS = 20480

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
# What the command reports as one line rather than a traceback: each message says what to fix.
USER_ERRORS = (BadDataError, EngineError, FileNotFoundError, FileExistsError, ServerStartError, ValueError)


# ---- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """One scored response."""

    sample: int  # 0..n-1 within its problem, in the engine's order
    response: str  # decoded, special tokens left out
    pred: str  # normalised answer; "" when the response has none
    correct: bool
    finish_reason: FinishReason
    response_tokens: int  # tokens generated, the stop token included


@dataclass(frozen=True)
class ProblemResult:
    """All samples of one problem."""

    problem: int  # position in the evaluated prompts
    index: int  # row in the dataset file
    ground_truth: str
    samples: tuple[SampleResult, ...]

    @property
    def num_correct(self) -> int:
        return sum(sample.correct for sample in self.samples)


@dataclass(frozen=True)
class EvalResult:
    """Metrics over all problems, and every sample behind them."""

    samples_per_problem: int  # n
    avg_at_n: float  # mean accuracy over all samples
    pass_at_k: dict[int, float]  # k -> mean over problems of the unbiased pass@k
    cons_at_n: float  # share of problems whose majority answer is right
    response_tokens_mean: float  # tokens per response
    truncation_ratio: float  # share of responses cut at max_new_tokens
    problems: tuple[ProblemResult, ...]

    @property
    def num_samples(self) -> int:
        return len(self.problems) * self.samples_per_problem

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging, e.g. {"avg@32": ..., "pass@1": ..., "cons@32": ...}."""
        n = self.samples_per_problem
        return {
            f"avg@{n}": self.avg_at_n,
            **{f"pass@{k}": value for k, value in self.pass_at_k.items()},
            f"cons@{n}": self.cons_at_n,
            "response_length_mean": self.response_tokens_mean,
            "truncation_ratio": self.truncation_ratio,
        }


def default_ks(samples_per_problem: int) -> tuple[int, ...]:
    """1, 2, 4, ... below n, then n: the pass@k curve at a glance."""
    ks = [2**i for i in range(samples_per_problem.bit_length()) if 2**i < samples_per_problem]
    return (*ks, samples_per_problem)


def summarize(problems: Sequence[ProblemResult], ks: Sequence[int] | None = None) -> EvalResult:
    """Aggregate scored problems, each with the same number of samples n; `ks` defaults to default_ks(n)."""
    if not problems:
        raise ValueError("summarize needs at least one problem")
    n = len(problems[0].samples)
    if any(len(problem.samples) != n for problem in problems):
        raise ValueError("every problem must have the same number of samples")
    ks = default_ks(n) if ks is None else tuple(ks)
    if not all(1 <= k <= n for k in ks):
        raise ValueError(f"ks={ks}: every k must be between 1 and samples_per_problem={n}")
    samples = [sample for problem in problems for sample in problem.samples]
    return EvalResult(
        samples_per_problem=n,
        avg_at_n=_mean(avg_at_k([s.correct for s in problem.samples]) for problem in problems),
        pass_at_k={k: _mean(pass_at_k(n, problem.num_correct, k) for problem in problems) for k in ks},
        cons_at_n=_mean(
            cons_at_k([s.pred for s in problem.samples], normalize_ground_truth(problem.ground_truth))
            for problem in problems
        ),
        response_tokens_mean=_mean(sample.response_tokens for sample in samples),
        truncation_ratio=_mean(sample.finish_reason is FinishReason.LENGTH for sample in samples),
        problems=tuple(problems),
    )


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


# ---- evaluation through an engine ---------------------------------------------------------------------


def score_completions(
    problem: int,
    prompt: TokenizedPrompt,
    completions: Sequence[Completion],
    tokenizer: PreTrainedTokenizerBase,
    *,
    boxed_fallback: bool = False,
) -> ProblemResult:
    """Decode and score one problem's samples with the DAPO rule."""
    responses = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    samples = []
    for i, (completion, response) in enumerate(zip(completions, responses, strict=True)):
        if completion.finish_reason is FinishReason.ABORT:
            # An evaluation with aborted samples would report numbers of a different sampling: refuse it.
            raise EngineError(f"row {prompt.record.index}: sample {i} was aborted by the engine")
        reward = compute_score(response, prompt.record.ground_truth, boxed_fallback=boxed_fallback)
        samples.append(
            SampleResult(
                sample=i,
                response=response,
                pred=reward.pred,
                correct=reward.correct,
                finish_reason=completion.finish_reason,
                response_tokens=len(completion.token_ids),
            )
        )
    return ProblemResult(problem, prompt.record.index, prompt.record.ground_truth, tuple(samples))


async def evaluate(
    engine: RolloutEngine,
    prompts: Sequence[TokenizedPrompt],
    *,
    samples_per_problem: int,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    boxed_fallback: bool = False,
    ks: Sequence[int] | None = None,
    progress_desc: str | None = "eval",
) -> EvalResult:
    """Sample `samples_per_problem` responses to every prompt through `engine`, score and aggregate them.

    Every prompt is submitted at once: the engine dispatches them over its servers. With `params.seed` set,
    problem p samples with seeds seed + p * n + i, so that no two samples share a seed. `progress_desc`
    None: no progress bar.
    """
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem={samples_per_problem}: need at least one sample per problem")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    for prompt in prompts:  # fail before generating, not after: an answer no response could match
        try:
            normalize_ground_truth(prompt.record.ground_truth)
        except ValueError as error:
            raise ValueError(f"row {prompt.record.index}: {error}") from None
    n = samples_per_problem
    # disable=None: a bar on a terminal only, not in log files.
    disable = True if progress_desc is None else None
    with tqdm(total=len(prompts) * n, desc=progress_desc, unit="sample", disable=disable) as bar:

        async def one_problem(position: int, prompt: TokenizedPrompt) -> ProblemResult:
            seeded = params if params.seed is None else replace(params, seed=params.seed + position * n)
            completions = await engine.generate(prompt.token_ids, seeded, n=n)
            result = score_completions(
                position, prompt, completions, tokenizer, boxed_fallback=boxed_fallback
            )
            bar.update(n)
            return result

        problems = await gather_or_cancel(one_problem(i, prompt) for i, prompt in enumerate(prompts))
    return summarize(problems, ks)


async def gather_or_cancel(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all at once; when one fails (or the caller is cancelled) cancel the others, which aborts their
    requests, and let them finish cancelling before the error goes up."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ---- datasets -----------------------------------------------------------------------------------------


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


# ---- the model ----------------------------------------------------------------------------------------


def is_megatron_checkpoint(model: Path) -> bool:
    """True for a Megatron checkpoint of this project, False for a Hugging Face directory, else an error."""
    if (Path(model) / META_FILE).is_file():
        return True
    if (Path(model) / "config.json").is_file():
        return False
    raise FileNotFoundError(
        f"--model {model}: neither a Hugging Face model directory (config.json) nor a Megatron checkpoint "
        f"of this project ({META_FILE})"
    )


@contextlib.contextmanager
def served_model_dir(model: Path) -> Iterator[Path]:
    """A Hugging Face directory of `model`: itself, or a Megatron checkpoint converted to a temporary one
    (deleted on exit)."""
    if not is_megatron_checkpoint(model):
        yield model
        return
    # Imported here: megatron-core takes seconds to load, and only a Megatron checkpoint needs it.
    from megatron_dapo.checkpoint.convert import megatron_to_hf

    with tempfile.TemporaryDirectory(prefix="dapo-eval-") as tmp:
        logger.warning(
            "%s is a Megatron checkpoint: converting it to a temporary Hugging Face directory in %s "
            "(set TMPDIR to put it elsewhere)",
            model,
            tmp,
        )
        logger.info("%s", megatron_to_hf(model, Path(tmp) / "hf"))
        yield Path(tmp) / "hf"


def load_tokenizer(model: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of `model`; a Megatron checkpoint keeps it in hf/, so it needs no conversion."""
    return load_tokenizer_dir(hf_assets_dir(model) if is_megatron_checkpoint(model) else model)


# ---- outputs ------------------------------------------------------------------------------------------


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


# ---- command line -------------------------------------------------------------------------------------


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
    args = parser.parse_args(argv)
    for flag in ("samples", "max_new_tokens", "num_servers", "server_tp", "max_prompt_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    if args.engine == "cpu" and args.server_tp != 1:
        parser.error("--server-tp: the CPU engine runs on one process; leave it at 1")
    return args


def server_specs(args: argparse.Namespace, model_dir: Path) -> list[ServerSpec]:
    """The servers to launch, each on a free local port; their logs go to --out/servers/."""
    (args.out / "servers").mkdir(parents=True, exist_ok=True)
    return [
        ServerSpec(
            model_path=str(model_dir),
            port=free_port(),
            engine=args.engine,
            tp_size=args.server_tp,
            base_gpu_id=i * args.server_tp if args.engine == "sglang" else None,
            random_seed=args.seed,
            log_file=str(args.out / "servers" / f"server_{i}.log"),
        )
        for i in range(args.num_servers)
    ]


async def evaluate_sets(
    engine: RolloutEngine,
    eval_sets: Sequence[EvalSet],
    *,
    samples_per_problem: int,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    boxed_fallback: bool = False,
) -> dict[str, EvalResult]:
    """Every set at once, so that no set waits for the slowest sample of another."""
    results = await gather_or_cancel(
        evaluate(
            engine,
            eval_set.prompts,
            samples_per_problem=samples_per_problem,
            params=params,
            tokenizer=tokenizer,
            boxed_fallback=boxed_fallback,
            progress_desc=eval_set.name,
        )
        for eval_set in eval_sets
    )
    return {eval_set.name: result for eval_set, result in zip(eval_sets, results, strict=True)}


async def run(args: argparse.Namespace) -> dict[str, EvalResult]:
    start = time.perf_counter()
    if (args.out / RESULTS_FILE).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / RESULTS_FILE} exists: choose another --out, or pass --overwrite")
    tokenizer = load_tokenizer(args.model)
    if args.chat_template and not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {args.model} has no chat template: pass --no-chat-template")
    eval_sets = [
        load_eval_set(
            path,
            tokenizer,
            name=name,
            max_prompt_tokens=args.max_prompt_tokens,
            on_bad_row=args.on_bad_row,
            layout=args.layout,
            use_chat_template=args.chat_template,
        )
        for path, name in zip(args.data, dataset_names(args.data), strict=True)
    ]
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    kwargs = dict(
        samples_per_problem=args.samples,
        params=params,
        tokenizer=tokenizer,
        boxed_fallback=args.boxed_fallback,
    )
    if args.server_url:
        logger.info("using running servers %s: they must serve %s", args.server_url, args.model)
        async with SGLangClient(args.server_url) as client:
            results = await evaluate_sets(client, eval_sets, **kwargs)
    else:
        with served_model_dir(args.model) as model_dir:
            async with (
                ServerPool(server_specs(args, model_dir)) as pool,
                SGLangClient(pool.urls, api_key=pool.api_key) as client,
            ):
                results = await evaluate_sets(client, eval_sets, **kwargs)
    run_info = {
        "model": str(args.model),
        "megatron_checkpoint": is_megatron_checkpoint(args.model),
        "sampling": {"samples_per_problem": args.samples, **asdict(params)},
        "chat_template": args.chat_template,
        "boxed_fallback": args.boxed_fallback,
        "engine": "running servers" if args.server_url else args.engine,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    write_outputs(args.out, results, eval_sets, run_info)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = asyncio.run(run(args))
    except USER_ERRORS as error:
        sys.exit(f"dapo-eval: {error}")
    print(format_table(results))
    print(f"wrote {args.out / RESULTS_FILE} and {args.out / SAMPLES_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
