"""A killed CPU engine: its samples move to the other server, and the pool detects and restarts it. A killed
trainer: the engine it launched, and every process it left behind, end with it."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

from megatron_dapo.rollout.engine import EngineUnavailableError
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import RetryPolicy, SGLangClient
from megatron_dapo.rollout.types import FinishReason, SamplingParams
from tests.helpers.processes import wait_until_gone
from tests.helpers.tiny_models import save_tiny_qwen2

pytestmark = pytest.mark.slow

CONTEXT_TOKENS = 2048
RETRY = RetryPolicy(max_retries=2, backoff_s=0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("model"), max_position_embeddings=CONTEXT_TOKENS)


@pytest.fixture(scope="module")
def pool(model_dir, tmp_path_factory):
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
            # Long enough to be still running at the kill on an idle machine (300 tokens could finish first).
            long = SamplingParams(temperature=1.0, max_new_tokens=1500, seed=1)
            task = asyncio.ensure_future(client.generate([1, 2, 3], long, n=2))  # to the first server
            await asyncio.sleep(0.5)
            assert not task.done(), "the request ended before the kill: the test would not cover a restart"
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


# A trainer stand-in: launches a CPU engine as the trainer does (ServerPool on a BackgroundLoop), pushes
# weights through a shared-memory segment, prints the engine's pid and waits to be killed.
TRAINER = """
import sys, threading
from transformers import AutoModelForCausalLM
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.host_payload import SegmentWriter

model_dir, log_file = sys.argv[1:]
spec = ServerSpec(model_dir, free_port(), engine="cpu", log_file=log_file, env={"OMP_NUM_THREADS": "1"})
pool, loop = ServerPool([spec], start_timeout_s=180), BackgroundLoop()
loop.run(pool.start())
model = AutoModelForCausalLM.from_pretrained(model_dir)
named = [(name, p.detach().clone()) for name, p in model.named_parameters()]

async def push():
    async with SGLangClient(pool.urls) as client:
        with SegmentWriter().payload(named) as header:
            await client.update_weights_from_tensor([header], weight_version=1)

loop.run(push())
print(pool.servers[0].process.pid, flush=True)
threading.Event().wait()
"""


def test_a_killed_trainer_leaves_no_process_behind(model_dir, tmp_path):
    command = [sys.executable, "-c", TRAINER, str(model_dir), str(tmp_path / "engine.log")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as trainer:
        engine = psutil.Process(int(trainer.stdout.readline()))
        left = psutil.Process(trainer.pid).children(recursive=True)  # the engine and its children
        assert engine in left and engine.status() != psutil.STATUS_ZOMBIE
        trainer.kill()  # SIGKILL: nothing of the trainer's own clean-up runs
    try:
        running = wait_until_gone(left, timeout_s=30)
        assert running == [], [(p.pid, p.name()) for p in running]
    finally:
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
