"""A killed CPU engine: its samples move to the other server, and the pool detects and restarts it."""

import asyncio
import os
import signal

import pytest

from megatron_dapo.rollout.engine import EngineUnavailableError
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import RetryPolicy, SGLangClient
from megatron_dapo.rollout.testing import save_tiny_qwen2
from megatron_dapo.rollout.types import FinishReason, SamplingParams

pytestmark = pytest.mark.slow

CONTEXT_TOKENS = 2048
RETRY = RetryPolicy(max_retries=2, backoff_s=0.1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    model_dir = save_tiny_qwen2(tmp_path_factory.mktemp("model"), max_position_embeddings=CONTEXT_TOKENS)
    logs = tmp_path_factory.mktemp("logs")
    specs = [
        ServerSpec(
            model_path=str(model_dir),
            port=free_port(),
            engine="cpu",
            random_seed=index,
            log_file=str(logs / f"engine{index}.log"),
            env={"OMP_NUM_THREADS": "1"},
        )
        for index in range(2)
    ]
    pool = ServerPool(specs, start_timeout_s=180)
    asyncio.run(pool.start())
    yield pool
    pool.stop()


def test_killed_server_is_detected_and_restarted(pool):
    async def scenario():
        first, second = pool.servers
        async with SGLangClient(pool.urls, retry=RETRY) as client:
            long = SamplingParams(temperature=1.0, max_new_tokens=300, seed=1)
            task = asyncio.ensure_future(client.generate([1, 2, 3], long, n=2))  # to the first server
            await asyncio.sleep(0.5)
            os.kill(first.process.pid, signal.SIGKILL)
            # The samples restart on the other server and finish there.
            completions = await task
            assert all(completion.meta["server"] == second.url for completion in completions)
            assert all(completion.finish_reason is FinishReason.LENGTH for completion in completions)
            assert await client.health() == {first.url: False, second.url: True}

            assert await pool.restart_dead() == [first.url]
            assert await client.health() == {first.url: True, second.url: True}
            client.mark_available(first.url)
            [completion] = await client.generate([4, 5], SamplingParams(max_new_tokens=4, seed=2))
            assert completion.meta["server"] == first.url  # back in dispatch (first among equals)

        # With no server left, the client says so instead of waiting forever.
        second.stop()
        os.kill(first.process.pid, signal.SIGKILL)
        async with SGLangClient(pool.urls, retry=RETRY) as client:
            with pytest.raises(EngineUnavailableError, match="no server is available"):
                await client.generate([1], SamplingParams(max_new_tokens=2))

    asyncio.run(scenario())
