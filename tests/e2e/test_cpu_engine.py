"""The CPU engine as a separate process, driven over HTTP through the project's client only.

The `check_*` coroutines are the conformance checks of any server speaking SGLang's protocol; tests/gpu runs
the same ones against real SGLang servers. One engine serves the whole module.
"""

import asyncio
import base64
import contextlib
import pickle
import time
from collections.abc import Iterator
from datetime import timedelta

import aiohttp
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.api_key import api_key_from_env, authorization_header
from megatron_dapo.rollout.engine import EngineRequestError
from megatron_dapo.rollout.host_payload import SegmentWriter
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.testing import reference_logprobs, save_tiny_qwen2
from megatron_dapo.rollout.types import FinishReason, SamplingParams
from megatron_dapo.rollout.weight_payload import serialize_flattened_bucket, serialize_named_tensors

pytestmark = pytest.mark.slow

CONTEXT_TOKENS = 2048  # long enough that a request still runs when the abort arrives
LOGPROB_TOLERANCE = 1e-4  # fp32 engine against the fp32 Hugging Face model
PROMPT = (3, 14, 15, 9, 26, 5)


# ---------------------------------------------------------------- reference decoding


@torch.inference_mode()
def greedy_reference(model: torch.nn.Module, prompt, max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def assert_logprobs_match(model, prompt, completion, temperature: float, tolerance: float) -> None:
    assert len(completion.logprobs) == len(completion.token_ids)
    expected = reference_logprobs(model, prompt, completion.token_ids, temperature)
    worst = max((abs(a - b) for a, b in zip(completion.logprobs, expected, strict=True)), default=0.0)
    assert worst <= tolerance, f"log-probs differ from the Hugging Face model's by {worst:.2e}"


# ---------------------------------------------------------------- conformance checks (also run on SGLang)


async def check_samples_and_logprobs(client: SGLangClient, reference, tolerance: float) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=24, seed=7)
    completions = await client.generate(PROMPT, params, n=4)
    assert len(completions) == 4
    assert len({tuple(completion.token_ids) for completion in completions}) == 4  # n distinct samples
    for completion in completions:
        assert completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == 24
        assert_logprobs_match(reference, PROMPT, completion, temperature=0.8, tolerance=tolerance)


async def check_greedy(client: SGLangClient, reference, tolerance: float) -> None:
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=16))
    assert completion.token_ids == greedy_reference(reference, PROMPT, 16)
    assert_logprobs_match(
        reference, PROMPT, completion, temperature=1.0, tolerance=tolerance
    )  # greedy: T = 1


async def check_stop_and_length(client: SGLangClient) -> None:
    even = tuple(range(0, 64, 2))
    stopping = SamplingParams(temperature=1.0, max_new_tokens=64, stop_token_ids=even, seed=3)
    for completion in await client.generate(PROMPT, stopping, n=4):
        assert completion.finish_reason is FinishReason.STOP
        assert completion.token_ids[-1] in even  # the stop token is returned, with its log-prob
        assert all(token % 2 == 1 for token in completion.token_ids[:-1])
    for completion in await client.generate(PROMPT, SamplingParams(max_new_tokens=5, seed=4), n=2):
        assert completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == 5


async def check_seeded_sampling_is_reproducible(client: SGLangClient) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)
    first = await client.generate(PROMPT, params, n=2)
    again = await client.generate(PROMPT, params, n=2)
    other = await client.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=12, seed=12), n=2)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


async def check_abort(client: SGLangClient, running_s: float) -> None:
    """One request aborted by id, another by abort_all: both end early with finish reason ABORT."""
    long = SamplingParams(temperature=1.0, max_new_tokens=CONTEXT_TOKENS - len(PROMPT) - 1, seed=5)
    surplus = asyncio.ensure_future(client.generate(PROMPT, long, n=2, request_id="surplus"))
    other = asyncio.ensure_future(client.generate(PROMPT[:3], long, request_id="other"))
    await asyncio.sleep(running_s)
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
    await asyncio.sleep(running_s)
    cancelled.cancel()
    deadline = asyncio.get_running_loop().time() + 8  # SGLang polls for disconnects every 4 s
    while True:
        try:
            await client.flush_cache()
            break
        except EngineRequestError:
            assert asyncio.get_running_loop().time() < deadline, "the cancelled request kept running"
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def weight_payload(named, device: str, load_format: str | None = None) -> Iterator[str]:
    """What a trainer sends: SGLang's CUDA IPC pickle to a server on GPUs, a host-memory segment (removed when
    the block ends) to the CPU engine."""
    if device == "cpu":
        with SegmentWriter().payload(named) as header:
            yield header
    else:
        yield (serialize_flattened_bucket if load_format else serialize_named_tensors)(named)


async def check_weight_updates(client: SGLangClient, reference, other, tolerance: float, device: str) -> None:
    """Both payload formats load Hugging Face-named tensors: outputs become the pushed model's."""
    named = [(name, tensor.to(device)) for name, tensor in other.state_dict().items()]
    with weight_payload(named, device) as payload:
        await client.update_weights_from_tensor([payload], weight_version=1)
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert completion.token_ids == greedy_reference(other, PROMPT, 12) and completion.weight_version == 1
    assert_logprobs_match(other, PROMPT, completion, temperature=1.0, tolerance=tolerance)
    # Back to the original weights in two flattened buckets, the cache flushed only after the last one.
    named = [(name, tensor.to(device)) for name, tensor in reference.state_dict().items()]
    half = len(named) // 2
    with weight_payload(named[:half], device, "flattened_bucket") as payload:
        await client.update_weights_from_tensor(
            [payload], weight_version=2, load_format="flattened_bucket", flush_cache=False
        )
    with weight_payload(named[half:], device, "flattened_bucket") as payload:
        await client.update_weights_from_tensor([payload], weight_version=2, load_format="flattened_bucket")
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert completion.token_ids == greedy_reference(reference, PROMPT, 12) and completion.weight_version == 2
    assert client.weight_version == 2


# ---------------------------------------------------------------- the CPU engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("engine_model"), max_position_embeddings=CONTEXT_TOKENS)


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    directory = save_tiny_qwen2(
        tmp_path_factory.mktemp("other_model"), seed=1, max_position_embeddings=CONTEXT_TOKENS
    )
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("engine_log") / "cpu_engine.log"
    spec = ServerSpec(
        model_path=str(model_dir),
        port=free_port(),
        engine="cpu",
        random_seed=1234,
        log_file=str(log_file),
        env={"OMP_NUM_THREADS": "1"},  # tiny matrices: more threads only contend with the test process
    )
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    yield pool
    pool.stop()


def run(engine: ServerPool, check, *args) -> None:
    async def with_client():
        async with SGLangClient(engine.urls) as client:
            await check(client, *args)

    asyncio.run(with_client())


def test_n_samples_with_logprobs_of_the_model(engine, reference):
    run(engine, check_samples_and_logprobs, reference, LOGPROB_TOLERANCE)


def test_greedy_decoding_matches_the_model(engine, reference):
    run(engine, check_greedy, reference, LOGPROB_TOLERANCE)


def test_stop_and_length_finish_reasons(engine):
    run(engine, check_stop_and_length)


def test_seeded_sampling_is_reproducible(engine):
    run(engine, check_seeded_sampling_is_reproducible)


def test_abort_ends_requests_in_flight(engine):
    run(engine, check_abort, 1.0)


def test_weight_updates_in_both_formats(engine, reference, other_model):
    run(engine, check_weight_updates, reference, other_model, LOGPROB_TOLERANCE, "cpu")


async def _concurrent_requests_are_batched(client: SGLangClient, reference) -> None:
    prompts = [PROMPT[:2], PROMPT, (7, 7, 7, 1, 2, 3, 4, 5, 6), (60,)]
    lengths = [3, 10, 17, 6]  # rows leave the batch at different steps
    results = await asyncio.gather(
        *(
            client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=length))
            for prompt, length in zip(prompts, lengths, strict=True)
        ),
        client.generate((1, 2, 3, 4), SamplingParams(temperature=0.7, max_new_tokens=8, seed=1), n=3),
    )
    for prompt, length, [completion] in zip(prompts, lengths, results[:-1], strict=True):
        assert completion.token_ids == greedy_reference(reference, prompt, length)
    samples = results[-1]
    assert sum(completion.meta["cached_tokens"] > 0 for completion in samples) >= 2  # one prefill, shared
    for completion in samples:
        assert_logprobs_match(
            reference, (1, 2, 3, 4), completion, temperature=0.7, tolerance=LOGPROB_TOLERANCE
        )


def test_concurrent_requests_are_batched_exactly(engine, reference):
    run(engine, _concurrent_requests_are_batched, reference)


async def _release_and_resume(client: SGLangClient, reference) -> None:
    await client.release_memory()
    with pytest.raises(EngineRequestError, match="released"):
        await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
    await client.resume_memory(["weights"])
    named = list(reference.state_dict().items())  # released weights came back empty: push them
    with weight_payload(named, "cpu") as payload:
        await client.update_weights_from_tensor([payload], weight_version=3)
    await client.resume_memory(["kv_cache", "cuda_graph"])
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert completion.token_ids == greedy_reference(reference, PROMPT, 8) and completion.weight_version == 3


def test_release_and_resume_memory(engine, reference):
    run(engine, _release_and_resume, reference)


def _join_as_sglang_does(port: int, group_name: str) -> dist.ProcessGroup:
    """Rank 0 of a 2-rank group, joined exactly as SGLang's `init_custom_process_group` joins (restated here
    as the reference the engine must meet): a TCP store at the address, keys under the group's name, a group
    beside the default one (this process has none)."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=60)
    store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        world_size, rank, [], dist.Backend("gloo"), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {0: 0, 1: 1}
    return group


async def _update_from_distributed(client: SGLangClient, reference, other) -> None:
    """The test process plays the trainer's senders of two pipeline stages, each rank 0 of a named group of
    its own; the engine joins both as rank 1 and holds them at once."""
    loop = asyncio.get_running_loop()
    groups = {}
    for group_name in ("stage0", "stage1"):
        port = free_port()
        # Both sides block until the other joins (or receives): the HTTP call and rank 0 run concurrently.
        _, groups[group_name] = await asyncio.gather(
            client.init_weights_update_group(
                client.server_urls[0], master_address="127.0.0.1", master_port=port, rank_offset=1,
                world_size=2, group_name=group_name, backend="gloo",
            ),
            loop.run_in_executor(None, _join_as_sglang_does, port, group_name),
        )  # fmt: skip
    try:
        syncs = ((other, 4, None, "stage0"), (reference, 5, "flattened_bucket", "stage1"))
        for model, version, load_format, group_name in syncs:
            named = list(model.state_dict().items())
            await asyncio.gather(
                client.update_weights_from_distributed(
                    [name for name, _ in named],
                    [str(tensor.dtype).removeprefix("torch.") for _, tensor in named],
                    [list(tensor.shape) for _, tensor in named],
                    weight_version=version,
                    group_name=group_name,
                    load_format=load_format,
                ),
                loop.run_in_executor(
                    None, _broadcast, [tensor for _, tensor in named], load_format, groups[group_name]
                ),
            )
            [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))
            assert completion.token_ids == greedy_reference(model, PROMPT, 8)
            assert completion.weight_version == version
        for group_name in groups:
            await client.destroy_weights_update_group(group_name)
        with pytest.raises(EngineRequestError, match="no group 'stage0'"):
            await client.destroy_weights_update_group("stage0")
    finally:
        for group in groups.values():
            dist.destroy_process_group(group)


def _broadcast(tensors: list[torch.Tensor], load_format: str | None, group: dist.ProcessGroup) -> None:
    if load_format is None:
        for tensor in tensors:
            dist.broadcast(tensor.contiguous(), group=group, group_src=0)
    else:  # one buffer of all the bytes, in order and unpadded, as SGLang's FlattenedTensorBucket lays them
        flat = torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for tensor in tensors])
        dist.broadcast(flat, group=group, group_src=0)


def test_weight_update_from_distributed_broadcast(engine, reference, other_model):
    run(engine, _update_from_distributed, reference, other_model)


async def _errors_name_their_cause(client: SGLangClient, reference) -> None:
    url = client.server_urls[0]
    async with aiohttp.ClientSession(headers=authorization_header(api_key_from_env())) as session:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "repetition_penalty": 1.3}}
        async with session.post(url + protocol.GENERATE, json=body) as response:
            assert response.status == 400 and "repetition_penalty" in await response.text()
        async with session.post(url + protocol.GENERATE, json={"input_ids": [1, 64]}) as response:
            assert response.status == 400 and "input_ids[0]" in await response.text()
    wrong_shape = [("model.norm.weight", torch.randn(7))]
    wrong_dtype = [("model.norm.weight", torch.randn(32, dtype=torch.float64))]
    for named, cause in ((wrong_shape, "shape"), (wrong_dtype, "dtype torch.float64")):
        refused = pytest.raises(EngineRequestError, match=rf"model\.norm\.weight: {cause}")
        with refused, weight_payload(named, "cpu") as payload:
            await client.update_weights_from_tensor([payload], weight_version=9)
    pickled = base64.b64encode(pickle.dumps([("model.norm.weight", torch.randn(32))])).decode()
    with pytest.raises(EngineRequestError, match="never unpickles"):
        await client.update_weights_from_tensor([pickled], weight_version=9)
    assert await client.health() == {url: True}
    info = await client.model_info(url)
    assert set(info) == protocol.MODEL_INFO_FIELDS and info["weight_version"] != "9"


def test_errors_name_their_cause(engine, reference):
    run(engine, _errors_name_their_cause, reference)


def test_a_join_nobody_answers_neither_stalls_generation_nor_delays_exit(model_dir, tmp_path):
    """Its own engine (the default 60 s join wait): requests are served while the join waits, and SIGTERM
    ends the engine at once (a join used to hold the model thread, and the exit, for up to 10 minutes)."""
    spec = ServerSpec(model_path=str(model_dir), port=free_port(), engine="cpu",
                      log_file=str(tmp_path / "engine.log"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    [server] = pool.servers
    try:

        async def generate_while_joining():
            async with SGLangClient(pool.urls, api_key=pool.api_key) as client:
                join = asyncio.ensure_future(
                    client.init_weights_update_group(
                        pool.urls[0], master_address="127.0.0.1", master_port=free_port(), rank_offset=1,
                        world_size=2, backend="gloo",
                    )
                )  # fmt: skip
                await asyncio.sleep(1.0)
                params = SamplingParams(temperature=0.0, max_new_tokens=6)
                [completion] = await asyncio.wait_for(client.generate(PROMPT, params), timeout=30)
                assert len(completion.token_ids) == 6 and not join.done()
                join.cancel()

        asyncio.run(generate_while_joining())
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        pool.stop()
