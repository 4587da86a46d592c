"""The conformance checks of a server speaking SGLang's protocol, driven through the project's client only.

Written once, run against the CPU engine (tests/e2e/test_cpu_engine.py) and against real SGLang servers
(tests/gpu/test_sglang_client.py): each of those modules builds an `EngineUnderTest` in its `engine` fixture
and parametrises one test over CONFORMANCE_CHECKS. Every check is `async check(client, engine)` and leaves the
server serving the reference model's weights, so the checks can run in any order on one server.
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megatron_dapo.rollout.engine import EngineRequestError
from megatron_dapo.rollout.host_payload import SegmentWriter
from megatron_dapo.rollout.launcher import ServerPool
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from megatron_dapo.rollout.weight_payload import serialize_flattened_bucket, serialize_named_tensors
from tests.helpers.tiny_models import reference_logprobs, save_tiny_qwen2

CONTEXT_TOKENS = 2048  # long enough that a request still runs when the abort arrives
PROMPT = (3, 14, 15, 9, 26, 5)


@dataclass(frozen=True)
class EngineUnderTest:
    """A running server and what its outputs are compared with."""

    pool: ServerPool
    reference: torch.nn.Module  # the served model, float32 Hugging Face
    other: torch.nn.Module  # a second model of the same shapes, pushed as a weight update
    logprob_tolerance: float  # largest |engine log-prob - reference log-prob|
    device: str  # where weight payloads live: "cpu" (host segments) or "cuda" (CUDA IPC)
    abort_after_s: float  # how long a request runs before the abort checks abort it

    def run(self, check: "Check") -> None:
        """check(client, self) with a client of this server, in a fresh event loop."""

        async def with_client() -> None:
            async with SGLangClient(self.pool.urls) as client:
                await check(client, self)

        asyncio.run(with_client())


Check = Callable[[SGLangClient, EngineUnderTest], Awaitable[None]]


def save_engine_model(directory: Path, seed: int = 0) -> Path:
    """The tiny Qwen2 the checks serve, with room for CONTEXT_TOKENS."""
    return save_tiny_qwen2(directory, seed=seed, max_position_embeddings=CONTEXT_TOKENS)


def load_model(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# ---------------------------------------------------------------- references


@torch.inference_mode()
def greedy_reference(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def assert_logprobs_match(
    model: torch.nn.Module,
    prompt: Sequence[int],
    completion: Completion,
    temperature: float,
    tolerance: float,
) -> None:
    assert len(completion.logprobs) == len(completion.token_ids)
    expected = reference_logprobs(model, prompt, completion.token_ids, temperature)
    worst = max((abs(a - b) for a, b in zip(completion.logprobs, expected, strict=True)), default=0.0)
    assert worst <= tolerance, f"log-probs differ from the Hugging Face model's by {worst:.2e}"


@contextlib.contextmanager
def weight_payload(
    named: list[tuple[str, torch.Tensor]], device: str, load_format: str | None = None
) -> Iterator[str]:
    """What a trainer sends: SGLang's CUDA IPC pickle to a server on GPUs, a host-memory segment (removed when
    the block ends) to the CPU engine."""
    if device == "cpu":
        with SegmentWriter().payload(named) as header:
            yield header
    else:
        yield (serialize_flattened_bucket if load_format else serialize_named_tensors)(named)


def on_device(model: torch.nn.Module, device: str) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor.to(device)) for name, tensor in model.state_dict().items()]


# ---------------------------------------------------------------- the checks


async def n_samples_with_logprobs_of_the_model(client: SGLangClient, engine: EngineUnderTest) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=24, seed=7)
    completions = await client.generate(PROMPT, params, n=4)
    assert len(completions) == 4
    assert len({tuple(completion.token_ids) for completion in completions}) == 4  # n distinct samples
    for completion in completions:
        assert completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == 24
        assert_logprobs_match(
            engine.reference, PROMPT, completion, temperature=0.8, tolerance=engine.logprob_tolerance
        )


async def greedy_decoding_matches_the_model(client: SGLangClient, engine: EngineUnderTest) -> None:
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=16))
    assert completion.token_ids == greedy_reference(engine.reference, PROMPT, 16)
    assert_logprobs_match(
        engine.reference, PROMPT, completion, temperature=1.0, tolerance=engine.logprob_tolerance
    )  # greedy: T = 1


async def stop_and_length_finish_reasons(client: SGLangClient, engine: EngineUnderTest) -> None:
    even = tuple(range(0, 64, 2))
    stopping = SamplingParams(temperature=1.0, max_new_tokens=64, stop_token_ids=even, seed=3)
    for completion in await client.generate(PROMPT, stopping, n=4):
        assert completion.finish_reason is FinishReason.STOP
        assert completion.token_ids[-1] in even  # the stop token is returned, with its log-prob
        assert all(token % 2 == 1 for token in completion.token_ids[:-1])
    for completion in await client.generate(PROMPT, SamplingParams(max_new_tokens=5, seed=4), n=2):
        assert completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == 5


async def abort_ends_requests_in_flight(client: SGLangClient, engine: EngineUnderTest) -> None:
    """One request aborted by id, another by abort_all: both end early with finish reason ABORT."""
    long = SamplingParams(temperature=1.0, max_new_tokens=CONTEXT_TOKENS - len(PROMPT) - 1, seed=5)
    surplus = asyncio.ensure_future(client.generate(PROMPT, long, n=2, request_id="surplus"))
    other = asyncio.ensure_future(client.generate(PROMPT[:3], long, request_id="other"))
    await asyncio.sleep(engine.abort_after_s)
    await client.abort("surplus")
    for completion in await surplus:
        assert completion.finish_reason is FinishReason.ABORT
        assert len(completion.token_ids) < long.max_new_tokens
        assert len(completion.logprobs) == len(completion.token_ids)
    assert not other.done()
    await client.abort_all()
    [completion] = await other
    assert completion.finish_reason is FinishReason.ABORT and len(completion.token_ids) < long.max_new_tokens
    # A cancelled generate() closes its connection, which aborts the request on the server: once idle, the
    # server accepts /flush_cache (refused while requests run).
    cancelled = asyncio.ensure_future(client.generate(PROMPT, long, request_id="cancelled"))
    await asyncio.sleep(engine.abort_after_s)
    cancelled.cancel()
    deadline = asyncio.get_running_loop().time() + 8  # SGLang polls for disconnects every 4 s
    while True:
        try:
            await client.flush_cache()
            break
        except EngineRequestError:
            assert asyncio.get_running_loop().time() < deadline, "the cancelled request kept running"
            await asyncio.sleep(0.2)


async def weight_updates_in_both_formats(client: SGLangClient, engine: EngineUnderTest) -> None:
    """Both payload formats load Hugging Face-named tensors: outputs become the pushed model's, and the
    weight version the server reports is the pushed one."""
    with weight_payload(on_device(engine.other, engine.device), engine.device) as payload:
        await client.update_weights_from_tensor([payload], weight_version=1)
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert (
        completion.token_ids == greedy_reference(engine.other, PROMPT, 12) and completion.weight_version == 1
    )
    assert_logprobs_match(
        engine.other, PROMPT, completion, temperature=1.0, tolerance=engine.logprob_tolerance
    )
    # Back to the original weights in two flattened buckets, the cache flushed only after the last one.
    named = on_device(engine.reference, engine.device)
    half = len(named) // 2
    with weight_payload(named[:half], engine.device, "flattened_bucket") as payload:
        await client.update_weights_from_tensor(
            [payload], weight_version=2, load_format="flattened_bucket", flush_cache=False
        )
    with weight_payload(named[half:], engine.device, "flattened_bucket") as payload:
        await client.update_weights_from_tensor([payload], weight_version=2, load_format="flattened_bucket")
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert completion.token_ids == greedy_reference(engine.reference, PROMPT, 12)
    assert completion.weight_version == 2 and client.weight_version == 2


async def release_update_resume_cycle(client: SGLangClient, engine: EngineUnderTest) -> None:
    """The colocated cycle: free the memory for training, take it back, push weights, generate."""
    await client.release_memory()
    await resume_with_reference_weights(client, engine, weight_version=3)


async def resume_with_reference_weights(
    client: SGLangClient, engine: EngineUnderTest, weight_version: int
) -> None:
    """After release_memory: weights back (they come back empty: push the reference's), then the cache; the
    server generates as the reference model again."""
    await client.resume_memory(["weights"])
    with weight_payload(on_device(engine.reference, engine.device), engine.device) as payload:
        await client.update_weights_from_tensor([payload], weight_version=weight_version)
    await client.resume_memory(["kv_cache", "cuda_graph"])
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert completion.token_ids == greedy_reference(engine.reference, PROMPT, 8)
    assert completion.weight_version == weight_version


async def pause_for_a_weight_update_then_continue(client: SGLangClient, engine: EngineUnderTest) -> None:
    """The asynchronous trainer's weight update (trainer/rollout/collector.py pause/resume): "abort" returns
    the running sample's tokens so far; requests sent while paused wait; weights load without waiting for
    paused requests; after /continue_generation a retracted sample decodes on with the new weights."""
    long = SamplingParams(temperature=1.0, max_new_tokens=CONTEXT_TOKENS - len(PROMPT) - 1, seed=7)
    running = asyncio.ensure_future(client.generate(PROMPT, long, request_id="paused-abort"))
    await asyncio.sleep(engine.abort_after_s)
    await client.pause_generation("abort")
    [partial] = await running
    assert partial.finish_reason is FinishReason.ABORT and 0 < len(partial.token_ids) < long.max_new_tokens
    assert_logprobs_match(engine.reference, PROMPT, partial, 1.0, engine.logprob_tolerance)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    waiting = asyncio.ensure_future(client.generate(PROMPT, greedy))
    await asyncio.sleep(engine.abort_after_s)
    assert not waiting.done(), "a request sent while paused must wait for /continue_generation"
    with weight_payload(on_device(engine.other, engine.device), engine.device) as payload:
        await client.update_weights_from_tensor([payload], weight_version=4)
    await client.continue_generation()
    [after] = await waiting
    assert after.token_ids == greedy_reference(engine.other, PROMPT, 8) and after.weight_version == 4

    running = asyncio.ensure_future(client.generate(PROMPT, long, request_id="paused-retract"))
    await asyncio.sleep(engine.abort_after_s)
    await client.pause_generation("retract")
    with weight_payload(on_device(engine.reference, engine.device), engine.device) as payload:
        await client.update_weights_from_tensor([payload], weight_version=5)
    await client.continue_generation()
    await asyncio.sleep(engine.abort_after_s)
    await client.abort("paused-retract")
    [spanning] = await running
    assert spanning.weight_version == 5
    if spanning.token_weight_versions:  # engines that report each token's version (newer SGLang, ours)
        split = spanning.token_weight_versions.index(5)
        assert set(spanning.token_weight_versions[:split]) == {4} and split > 0
        after_update = Completion(spanning.token_ids[split:], spanning.logprobs[split:], FinishReason.ABORT)
        prefix = (*PROMPT, *spanning.token_ids[:split])
        assert_logprobs_match(engine.reference, prefix, after_update, 1.0, engine.logprob_tolerance)


async def seeded_sampling_is_reproducible(client: SGLangClient, engine: EngineUnderTest) -> None:
    """Not in CONFORMANCE_CHECKS: SGLang honours sampling_seed only in its deterministic mode."""
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)
    first = await client.generate(PROMPT, params, n=2)
    again = await client.generate(PROMPT, params, n=2)
    other = await client.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=12, seed=12), n=2)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


CONFORMANCE_CHECKS = (
    n_samples_with_logprobs_of_the_model,
    greedy_decoding_matches_the_model,
    stop_and_length_finish_reasons,
    abort_ends_requests_in_flight,
    weight_updates_in_both_formats,
    release_update_resume_cycle,
    pause_for_a_weight_update_then_continue,
)


def check_name(check: Check) -> str:
    """The test id of a check: its function name."""
    return check.__name__
