"""The CPU engine's conformance checks against a real SGLang server (needs CUDA and sglang installed).

Same client, same checks, same tiny model as tests/e2e/test_cpu_engine.py. SGLang runs it in float32 with its
torch-native attention and sampling backends so that log-probs compare with the float32 Hugging Face model.
Seeded reproducibility is not checked: SGLang honours sampling_seed only in its deterministic mode.
"""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.testing import save_tiny_qwen2
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.rollout.weight_payload import serialize_named_tensors
from tests.e2e.test_cpu_engine import (
    CONTEXT_TOKENS,
    PROMPT,
    check_abort,
    check_greedy,
    check_samples_and_logprobs,
    check_stop_and_length,
    check_weight_updates,
    greedy_reference,
)

pytestmark = pytest.mark.gpu

LOGPROB_TOLERANCE = 1e-3  # GPU float32 kernels against the CPU float32 model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("sglang_model"), max_position_embeddings=CONTEXT_TOKENS)


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
def sglang(model_dir, tmp_path_factory):
    spec = ServerSpec(
        model_path=str(model_dir),
        port=free_port(),
        engine="sglang",
        mem_fraction_static=0.3,
        enable_memory_saver=True,
        random_seed=0,
        log_file=str(tmp_path_factory.mktemp("sglang_log") / "sglang.log"),
        extra_args=(
            "--dtype", "float32", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
            "--disable-cuda-graph",
        ),
    )  # fmt: skip
    pool = ServerPool([spec], start_timeout_s=600)
    asyncio.run(pool.start())
    yield pool
    pool.stop()


def run(pool: ServerPool, check, *args) -> None:
    async def with_client():
        async with SGLangClient(pool.urls) as client:
            await check(client, *args)

    asyncio.run(with_client())


def test_n_samples_with_logprobs_of_the_model(sglang, reference):
    run(sglang, check_samples_and_logprobs, reference, LOGPROB_TOLERANCE)


def test_greedy_decoding_matches_the_model(sglang, reference):
    run(sglang, check_greedy, reference, LOGPROB_TOLERANCE)


def test_stop_and_length_finish_reasons(sglang):
    run(sglang, check_stop_and_length)


def test_abort_ends_requests_in_flight(sglang):
    run(sglang, check_abort, 0.3)


def test_weight_updates_in_both_formats(sglang, reference, other_model):
    run(sglang, check_weight_updates, reference, other_model, LOGPROB_TOLERANCE, "cuda")


async def _release_update_resume(client: SGLangClient, reference) -> None:
    """The colocated cycle: free the GPU for training, take it back, push weights, generate."""
    await client.release_memory()
    await client.resume_memory(["weights"])
    named = [(name, tensor.cuda()) for name, tensor in reference.state_dict().items()]
    await client.update_weights_from_tensor([serialize_named_tensors(named)], weight_version=7)
    await client.resume_memory(["kv_cache", "cuda_graph"])
    [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert completion.token_ids == greedy_reference(reference, PROMPT, 8) and completion.weight_version == 7


def test_release_update_resume_cycle(sglang, reference):
    run(sglang, _release_update_resume, reference)
