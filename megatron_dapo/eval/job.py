"""One dapo-eval run end to end: the model's tokenizer, the evaluation sets, the servers (launched, or running
ones), the evaluation, and the output files."""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_dapo.data.dataset import OnBadRow
from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.eval.model_dir import is_megatron_checkpoint, served_model_dir
from megatron_dapo.eval.outputs import RESULTS_FILE, write_outputs
from megatron_dapo.eval.results import EvalResult
from megatron_dapo.eval.run import evaluate_sets
from megatron_dapo.eval.sets import dataset_names, load_eval_set
from megatron_dapo.rollout.deadline import DEFAULT_DEADLINES, DeadlinePolicy
from megatron_dapo.rollout.engine import EngineError, EngineUnavailableError
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, ServerStartError, server_layout
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import SamplingParams

logger = logging.getLogger(__name__)

# The paper's evaluation (DAPO.md): AIME 2024, 32 samples per problem, temperature 1.0, top-p 0.7, and the
# training length limit L_max.
PAPER_SAMPLES_PER_PROBLEM = 32
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 0.7
PAPER_MAX_NEW_TOKENS = 20480

# Besides bad input, what ends an evaluation with its message rather than a traceback (ValueError: a model
# directory or tokenizer that cannot serve, found while loading).
RUN_ERRORS = (EngineError, ServerStartError, ValueError)


@dataclass(frozen=True)
class EvalJob:
    """What one run evaluates, and how: the settings of the dapo-eval command line."""

    model: Path  # Hugging Face directory, or a Megatron checkpoint of this project
    data: Sequence[Path]  # evaluation files, or shipped data sets by name
    out: Path  # directory for results.json, samples.jsonl and the launched servers' logs
    overwrite: bool  # replace an existing results.json in `out`
    samples_per_problem: int
    params: SamplingParams
    chat_template: bool  # False: raw prompt text, for base models
    layout: str  # column layout of the files ("auto" or one of data.dataset.LAYOUTS)
    max_prompt_tokens: int  # longer prompts are bad rows
    on_bad_row: OnBadRow
    boxed_fallback: bool  # read the last \boxed{} when there is no Answer line
    server_urls: Sequence[str]  # running servers serving `model`; empty: launch servers
    engine: str  # servers to launch: "sglang" or "cpu"
    num_servers: int  # servers to launch
    server_tp: int  # GPUs per launched SGLang server
    deadlines: DeadlinePolicy = DEFAULT_DEADLINES  # when a sample gives up on its server


def server_specs(job: EvalJob, model_dir: Path) -> list[ServerSpec]:
    """The servers to launch, each on a free local port; their logs go to out/servers/."""
    return server_layout(
        model_dir,
        engine=job.engine,
        num_servers=job.num_servers,
        tp_size=job.server_tp,
        log_dir=job.out / "servers",
        seed=job.params.seed,
    )


async def leave_out_silent_servers(client: SGLangClient) -> None:
    """Running servers that fail /health now take no request: one that accepts connections and never
    answers would otherwise hold its share of the samples until their deadlines."""
    for url, answers in (await client.health()).items():
        if not answers:
            client.mark_down(url, "no answer to /health")
    if len(client.down_servers()) == len(client.server_urls):
        raise EngineUnavailableError(
            ",".join(client.server_urls), "no server answers /health: check --server-url and the servers"
        )


async def run_job(job: EvalJob) -> dict[str, EvalResult]:
    """Evaluate every data set of `job` and write its outputs; each set's results by name."""
    start = time.perf_counter()
    if (job.out / RESULTS_FILE).exists() and not job.overwrite:
        raise FileExistsError(f"{job.out / RESULTS_FILE} exists: choose another --out, or pass --overwrite")
    megatron = is_megatron_checkpoint(job.model)  # first: names --model when it is neither kind
    tokenizer = load_tokenizer(job.model)
    if job.chat_template and not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {job.model} has no chat template: pass --no-chat-template")
    eval_sets = [
        load_eval_set(
            path,
            tokenizer,
            name=name,
            max_prompt_tokens=job.max_prompt_tokens,
            on_bad_row=job.on_bad_row,
            layout=job.layout,
            use_chat_template=job.chat_template,
        )
        for path, name in zip(job.data, dataset_names(job.data), strict=True)
    ]
    kwargs = dict(
        samples_per_problem=job.samples_per_problem,
        params=job.params,
        tokenizer=tokenizer,
        boxed_fallback=job.boxed_fallback,
    )
    if job.server_urls:
        logger.info("using running servers %s: they must serve %s", job.server_urls, job.model)
        async with SGLangClient(job.server_urls, deadlines=job.deadlines) as client:
            await leave_out_silent_servers(client)
            results = await evaluate_sets(client, eval_sets, **kwargs)
    else:
        with served_model_dir(job.model) as model_dir:
            async with (
                ServerPool(server_specs(job, model_dir)) as pool,
                SGLangClient(pool.urls, api_key=pool.api_key, deadlines=job.deadlines) as client,
            ):
                results = await evaluate_sets(client, eval_sets, **kwargs)
    run_info = {
        "model": str(job.model),
        "megatron_checkpoint": megatron,
        "sampling": {"samples_per_problem": job.samples_per_problem, **asdict(job.params)},
        "chat_template": job.chat_template,
        "boxed_fallback": job.boxed_fallback,
        "engine": "running servers" if job.server_urls else job.engine,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    write_outputs(job.out, results, eval_sets, run_info)
    return results
