"""Server command lines, and the process handling of the launcher on a stand-in server (no model)."""

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest

from megatron_dapo.config import RolloutConfig
from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key
from megatron_dapo.rollout.launcher import (
    ManagedServer,
    RouterSpec,
    ServerPool,
    ServerSpec,
    ServerStartError,
    free_port,
)
from megatron_dapo.trainer.rollout.engine import server_specs
from tests.helpers.processes import wait_until_gone

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
    assert spec.command()[-2:] == ["--parent-pid", str(os.getpid())]  # it exits when this process dies
    with pytest.raises(ValueError, match="base_gpu_id"):
        ServerSpec(model_path="/tmp/tiny", port=1, engine="cpu", base_gpu_id=0).command()


def test_router_command_line():
    router = RouterSpec(worker_urls=("http://127.0.0.1:1", "http://127.0.0.1:2"), port=30000)
    assert router.command() == [
        sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", "http://127.0.0.1:1",
        "http://127.0.0.1:2", "--host", "127.0.0.1", "--port", "30000", "--policy", "cache_aware",
    ]  # fmt: skip


def test_the_trainer_lays_out_sglang_servers_side_by_side(tmp_path):
    rng = random.Random()
    num, tp, port, seed = rng.randint(2, 4), rng.randint(1, 4), rng.randint(20000, 40000), rng.randint(0, 999)
    running, fraction = rng.randint(1, 64), rng.uniform(0.1, 0.9)
    cfg = RolloutConfig(
        num_servers=num, server_tp=tp, base_port=port, mem_fraction=fraction, max_running_requests=running
    )
    specs = server_specs(cfg, "/models/qwen", tmp_path / "logs", seed)
    assert [(s.port, s.base_gpu_id, s.log_file) for s in specs] == [
        (port + i, i * tp, str(tmp_path / "logs" / f"server_{i}.log")) for i in range(num)
    ]
    assert (tmp_path / "logs").is_dir()
    shared = {(s.model_path, s.engine, s.host, s.tp_size, s.mem_fraction_static) for s in specs}
    assert shared == {("/models/qwen", "sglang", "127.0.0.1", tp, fraction)}
    assert {s.random_seed for s in specs} == {seed}
    assert all(s.enable_memory_saver and not s.env for s in specs)  # colocated by default
    assert {s.extra_args for s in specs} == {("--max-running-requests", str(running))}


def test_cpu_engines_take_no_gpu_settings_and_one_thread(tmp_path):
    cfg = RolloutConfig(backend="cpu", num_servers=3, base_port=0, mem_fraction=0.5, colocate=True)
    specs = server_specs(cfg, "/models/tiny", tmp_path, seed=1)
    assert len({s.port for s in specs}) == 3 and all(s.port > 0 for s in specs)  # free ports
    assert all(s.base_gpu_id is None and s.mem_fraction_static is None for s in specs)
    assert not any(s.enable_memory_saver or s.extra_args for s in specs)
    assert all(dict(s.env) == {"OMP_NUM_THREADS": "1"} for s in specs)
    assert all("--base-gpu-id" not in s.command() for s in specs)


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


# A trainer stand-in: starts the server on a thread that lives on (the trainer's event loop thread), prints
# the server's pid, and waits to be killed.
LAUNCHING_PARENT = """
import asyncio, sys, threading
from megatron_dapo.rollout.launcher import ManagedServer

class Spec:
    url, log_file, env = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[3], {}
    def command(self):
        return [sys.executable, "-c", sys.argv[2], sys.argv[1]]

def launch():
    server = ManagedServer(Spec())
    server.start()
    asyncio.run(server.wait_until_healthy(60))
    print(server.process.pid, flush=True)
    threading.Event().wait()

thread = threading.Thread(target=launch)
thread.start()
thread.join()  # the main thread stays: Python 3.12 refuses preexec_fn once it has ended
"""


def test_a_server_dies_with_the_process_that_launched_it(tmp_path):
    """The stand-in server watches nothing: only the parent-death signal the launcher requested can end it."""
    command = [
        sys.executable,
        "-c",
        LAUNCHING_PARENT,
        str(free_port()),
        HEALTH_ONLY_SERVER,
        str(tmp_path / "log"),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as parent:
        server = psutil.Process(int(parent.stdout.readline()))
        assert server.ppid() == parent.pid and server.status() != psutil.STATUS_ZOMBIE
        parent.kill()  # SIGKILL: none of the parent's own clean-up runs
    try:
        assert wait_until_gone([server], timeout_s=30) == []
    finally:
        _kill_if_running(server)


# A process started as the CPU engine is (with --parent-pid), but by a parent that requests no parent-death
# signal; it starts a child of its own, as the engine may (a multiprocessing worker, a resource tracker).
WATCHING_CHILD = """
import subprocess, sys, time
from megatron_dapo.rollout.cpu_engine.lifeline import exit_with_parent
exit_with_parent(int(sys.argv[1]), poll_s=0.1)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""
PLAIN_PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
print(child.pid, flush=True)
child.wait()
"""


def test_the_cpu_engine_lifeline_ends_it_and_its_children_with_its_parent():
    with subprocess.Popen(
        [sys.executable, "-c", PLAIN_PARENT, WATCHING_CHILD], stdout=subprocess.PIPE, text=True
    ) as parent:
        child = psutil.Process(int(parent.stdout.readline()))
        grandchild = psutil.Process(int(parent.stdout.readline()))
        assert grandchild.ppid() == child.pid and child.ppid() == parent.pid
        parent.kill()
    try:
        assert wait_until_gone([child, grandchild], timeout_s=30) == []
    finally:
        for process in (child, grandchild):
            _kill_if_running(process)


def _kill_if_running(process: psutil.Process) -> None:
    """A failed test leaves no process behind."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()
