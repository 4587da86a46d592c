"""Server command lines, and the process handling of the launcher on a stand-in server (no model)."""

import asyncio
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
import pytest

from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key
from megatron_dapo.rollout.launcher import (
    ManagedServer,
    RouterSpec,
    ServerPool,
    ServerSpec,
    ServerStartError,
    free_port,
)

# A server that only answers /health: what the launcher needs to see.
HEALTH_ONLY_SERVER = (
    "import sys; from aiohttp import web; app = web.Application();"
    "app.router.add_get('/health', lambda request: web.Response());"
    "print('serving', flush=True); web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)"
)


def test_sglang_command_line():
    spec = ServerSpec(
        model_path="/models/qwen",
        port=30001,
        tp_size=4,
        mem_fraction_static=0.6,
        enable_memory_saver=True,
        base_gpu_id=4,
        random_seed=7,
        extra_args=("--dtype", "bfloat16"),
    )
    assert spec.command() == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/qwen", "--host", "127.0.0.1",
        "--port", "30001", "--tp-size", "4", "--log-level", "info", "--mem-fraction-static", "0.6",
        "--enable-memory-saver", "--base-gpu-id", "4", "--random-seed", "7", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert spec.url == "http://127.0.0.1:30001"


def test_cpu_engine_command_line():
    spec = ServerSpec(model_path="/tmp/tiny", port=31000, engine="cpu", random_seed=1)
    assert spec.command()[:3] == [sys.executable, "-m", "megatron_dapo.rollout.cpu_engine"]
    assert "--random-seed" in spec.command() and "--base-gpu-id" not in spec.command()
    with pytest.raises(ValueError, match="base_gpu_id"):
        ServerSpec(model_path="/tmp/tiny", port=1, engine="cpu", base_gpu_id=0).command()


def test_router_command_line():
    router = RouterSpec(worker_urls=("http://127.0.0.1:1", "http://127.0.0.1:2"), port=30000)
    assert router.command() == [
        sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", "http://127.0.0.1:1",
        "http://127.0.0.1:2", "--host", "127.0.0.1", "--port", "30000", "--policy", "cache_aware",
    ]  # fmt: skip


@dataclass(frozen=True)
class ScriptSpec:
    script: str
    port: int
    log_file: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port)]


def test_start_stop_and_restart_of_a_dead_server(tmp_path):
    async def scenario():
        # ServerPool takes any spec with url, log_file, env and command(): here, the stand-in server.
        pool = ServerPool(
            [ScriptSpec(HEALTH_ONLY_SERVER, free_port(), str(tmp_path / "log"))], start_timeout_s=60
        )
        async with pool:
            [server] = pool.servers
            assert await pool.restart_dead() == []  # healthy: left alone
            first_pid = server.process.pid
            os.kill(first_pid, signal.SIGKILL)
            server.process.wait()
            assert await pool.restart_dead() == [server.url]
            assert server.process.pid != first_pid and not server.exited()
        assert server.exited()
        assert (tmp_path / "log").read_text().count("serving") == 2  # both runs appended to one log

    asyncio.run(scenario())


def test_a_server_that_exits_reports_its_log(tmp_path):
    async def scenario():
        script = "import sys; print('model not found', flush=True); sys.exit(3)"
        server = ManagedServer(ScriptSpec(script, free_port(), str(tmp_path / "log")))
        server.start()
        with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*model not found"):
            await server.wait_until_healthy(timeout_s=60)

    asyncio.run(scenario())


# Answers /health, and /key with the DAPO_API_KEY it was started with.
KEY_ECHO_SERVER = (
    "import os, sys; from aiohttp import web; app = web.Application();"
    "app.router.add_get('/health', lambda request: web.Response());"
    "app.router.add_get('/key', lambda request: web.Response(text=os.environ.get('DAPO_API_KEY', '')));"
    "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)"
)


def test_a_pool_makes_one_key_and_hands_it_to_every_server(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    async def scenario():
        specs = [ScriptSpec(KEY_ECHO_SERVER, free_port(), str(tmp_path / f"log{i}")) for i in range(2)]
        async with ServerPool(specs, start_timeout_s=60) as pool, aiohttp.ClientSession() as session:
            keys = []
            for url in pool.urls:
                async with session.get(url + "/key") as response:
                    keys.append(await response.text())
            return pool.api_key, keys

    key, keys = asyncio.run(scenario())
    assert re.fullmatch(r"[0-9a-f]{64}", key) and keys == [key, key]
    monkeypatch.setenv(API_KEY_ENV, "the-jobs-key")  # a key given to the job is used, not replaced
    assert ServerPool([]).api_key == "the-jobs-key"
    assert ServerPool([], api_key="explicit").api_key == "explicit"


def test_the_key_is_a_flag_for_sglang_only_and_never_in_a_spec_repr():
    key = new_api_key()
    pool = ServerPool(
        [ServerSpec(model_path="/m", port=1), ServerSpec(model_path="/m", port=2, engine="cpu")], api_key=key
    )
    sglang, cpu = (server.spec for server in pool.servers)
    assert sglang.command()[-2:] == ["--api-key", key]  # SGLang reads only its flag
    assert key not in " ".join(cpu.command())  # the CPU engine reads DAPO_API_KEY: not in the process list
    assert all(server.api_key == key for server in pool.servers)
    assert key not in repr(sglang) + repr(cpu)
