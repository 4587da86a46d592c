"""Start, watch and restart rollout servers: `sglang.launch_server` on GPUs, the CPU engine elsewhere.

Each server runs in a process session of its own, so stopping it stops the processes it spawned (SGLang's
scheduler and detokenizer) through its process group, never by name. A restarted server holds the weights it
was launched with: the trainer must push its current weights again before using it. A server also ends when
the process that launched it dies, even by SIGKILL (see `_parent_death_signal`).

A pool's servers share one API key (rollout/api_key.py): the one given, else $DAPO_API_KEY, else a new one.
Each server finds it in its environment as DAPO_API_KEY (where the CPU engine reads it, out of the process
list); SGLang, which reads only its flag, also gets `--api-key`. Clients take `pool.api_key`.
"""

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import aiohttp

from megatron_dapo.rollout.api_key import API_KEY_ENV, api_key_from_env, new_api_key

SGLANG_MODULE = "sglang.launch_server"
CPU_ENGINE_MODULE = "megatron_dapo.rollout.cpu_engine"
ROUTER_MODULE = "sglang_router.launch_router"
HEALTH_ROUTE = "/health"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ServerStartError(RuntimeError):
    """A server exited or never became healthy; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """One inference server, with the flags both engines share (SGLang's names)."""

    model_path: str
    port: int
    engine: Literal["sglang", "cpu"] = "sglang"
    host: str = "127.0.0.1"  # the server unpickles weight payloads: keep it local
    tp_size: int = 1  # GPUs per server (the CPU engine takes 1)
    mem_fraction_static: float | None = None  # SGLang: share of GPU memory for weights and KV cache
    enable_memory_saver: bool = False  # SGLang: lets the server release GPU memory to a colocated trainer
    base_gpu_id: int | None = None  # SGLang: first GPU of this server
    random_seed: int | None = None
    log_level: str = "info"
    log_file: str | None = None  # the server's stdout and stderr, appended; None: inherited
    extra_args: tuple[str, ...] = ()  # passed through verbatim
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. OMP_NUM_THREADS for a CPU engine
    api_key: str | None = field(default=None, repr=False)  # set by ServerPool; SGLang gets it as a flag

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.engine == "cpu" and self.base_gpu_id is not None:
            raise ValueError("base_gpu_id: the CPU engine uses no GPU; leave it None")
        module = SGLANG_MODULE if self.engine == "sglang" else CPU_ENGINE_MODULE
        command = [sys.executable, "-m", module, "--model-path", self.model_path, "--host", self.host]
        command += ["--port", str(self.port), "--tp-size", str(self.tp_size), "--log-level", self.log_level]
        if self.mem_fraction_static is not None:
            command += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.enable_memory_saver:
            command.append("--enable-memory-saver")
        if self.base_gpu_id is not None:
            command += ["--base-gpu-id", str(self.base_gpu_id)]
        if self.random_seed is not None:
            command += ["--random-seed", str(self.random_seed)]
        if self.api_key and self.engine == "sglang":
            command += ["--api-key", self.api_key]
        if self.engine == "cpu":
            command += ["--parent-pid", str(os.getpid())]  # the engine exits when this process dies
        return command + list(self.extra_args)


def server_layout(
    model_path: str | Path,
    *,
    engine: Literal["sglang", "cpu"],
    num_servers: int,
    tp_size: int,
    log_dir: Path,
    seed: int | None = None,
    host: str = "127.0.0.1",
    base_port: int = 0,
    mem_fraction: float | None = None,
    memory_saver: bool = False,
    max_running_requests: int = 0,
    cpu_threads: int | None = None,
) -> list[ServerSpec]:
    """`num_servers` servers of one model, side by side: server i on port base_port + i (0: free ports), on
    GPUs i * tp_size onwards (SGLang), its log in log_dir/server_i.log (log_dir is created).

    mem_fraction and memory_saver are SGLang's and left out for the CPU engine; cpu_threads sets the CPU
    engine's OMP_NUM_THREADS (None: its default). max_running_requests 0: the engine's default.
    """
    sglang = engine == "sglang"
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    extra_args = ("--max-running-requests", str(max_running_requests)) if max_running_requests else ()
    threads = {"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads is not None and not sglang else {}
    return [
        ServerSpec(
            model_path=str(model_path),
            port=base_port + i if base_port else free_port(host),
            engine=engine,
            host=host,
            tp_size=tp_size,
            mem_fraction_static=mem_fraction if sglang else None,
            enable_memory_saver=sglang and memory_saver,
            base_gpu_id=i * tp_size if sglang else None,
            random_seed=seed,
            log_file=str(log_dir / f"server_{i}.log"),
            extra_args=extra_args,
            env=threads,
        )
        for i in range(num_servers)
    ]


@dataclass(frozen=True)
class RouterSpec:
    """An sglang-router in front of the servers (package sglang-router; GPU installs only)."""

    worker_urls: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"  # the router's default: routes by prompt prefix, balances load
    log_file: str | None = None
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", ROUTER_MODULE, "--worker-urls", *self.worker_urls]
        return [
            *command,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--policy",
            self.policy,
            *self.extra_args,
        ]


class _Launchable(Protocol):
    url: str
    log_file: str | None
    env: Mapping[str, str]

    def command(self) -> list[str]: ...


class ManagedServer:
    """One server process: start, health wait, stop, restart."""

    def __init__(self, spec: _Launchable, api_key: str | None = None):
        self.spec = spec
        self.api_key = api_key  # handed to the server as DAPO_API_KEY
        self.url = spec.url
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.url} is already running (pid {self.process.pid})")
        log = open(self.spec.log_file, "ab") if self.spec.log_file else None  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                self.spec.command(),
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                env={**os.environ, **self.spec.env, **({API_KEY_ENV: self.api_key} if self.api_key else {})},
                start_new_session=True,  # its own process group, for stop()
                preexec_fn=_parent_death_signal(),
            )
        finally:
            if log:
                log.close()  # the child holds its own descriptor

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    async def wait_until_healthy(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                if self.exited():
                    code = None if self.process is None else self.process.returncode
                    raise ServerStartError(f"{self.url} exited with code {code}{self._log_tail()}")
                if await _answers_health(session, self.url, timeout_s=5.0):
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise ServerStartError(
                        f"{self.url} not healthy after {timeout_s:.0f} s{self._log_tail()}"
                    )
                await asyncio.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left (or outlived the leader)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
            os.killpg(self.process.pid, sig)

    async def restart(self, timeout_s: float) -> None:
        self.stop()
        self.start()
        await self.wait_until_healthy(timeout_s)

    def _log_tail(self, chars: int = 3000) -> str:
        if not self.spec.log_file or not Path(self.spec.log_file).exists():
            return ""
        return "; log tail:\n" + Path(self.spec.log_file).read_text(errors="replace")[-chars:]


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a preexec_fn making the kernel send SIGTERM to the server when its parent dies, even by SIGKILL
    (SIGTERM lets it end its own children: SGLang kills its process tree, the CPU engine its descendants).

    The kernel sends it when the *thread* that started the server exits, not the process. That is safe for
    how servers are started: from the thread that runs the event loop owning their ServerPool (the trainer's
    BackgroundLoop, the asyncio.run of dapo-eval and the tests), which stops its servers before that loop
    ends (EngineConnection.close stops the pool, then the loop). Do not start servers from a short-lived
    thread. Everything the child runs is prepared here, before the fork: the child only calls two functions.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, request, sigterm = os.getpid(), PR_SET_PDEATHSIG, int(signal.SIGTERM)

    def request_signal() -> None:
        prctl(request, sigterm)
        if os.getppid() != parent:  # the parent died before the request: no signal will ever come
            os._exit(1)

    return request_signal


async def _answers_health(session: aiohttp.ClientSession, url: str, timeout_s: float) -> bool:
    try:
        async with session.get(
            url + HEALTH_ROUTE, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class ServerPool:
    """The rollout servers of a run, and their router if any: `async with ServerPool(specs) as pool`."""

    def __init__(
        self,
        specs: Sequence[_Launchable],
        router: RouterSpec | None = None,
        start_timeout_s: float = 900,
        api_key: str | None = None,
    ):
        self.api_key = api_key or api_key_from_env() or new_api_key()  # never logged
        self.servers = [ManagedServer(_with_api_key(spec, self.api_key), self.api_key) for spec in specs]
        self.router = ManagedServer(router, self.api_key) if router else None
        self.start_timeout_s = start_timeout_s  # model loading (and SGLang's CUDA graphs) can take minutes

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    async def start(self) -> None:
        """Start every server at once and wait until all are healthy; on failure stop them all."""
        try:
            for server in self.servers:
                server.start()
            await asyncio.gather(
                *(server.wait_until_healthy(self.start_timeout_s) for server in self.servers)
            )
            if self.router:
                self.router.start()
                await self.router.wait_until_healthy(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise

    async def restart_dead(self, probe_timeout_s: float = 30.0) -> list[str]:
        """Restart every server whose process has exited or that fails /health; returns their URLs."""
        async with aiohttp.ClientSession() as session:
            healthy = await asyncio.gather(
                *(
                    _answers_health(session, server.url, probe_timeout_s) if not server.exited() else _false()
                    for server in self.servers
                )
            )
        dead = [server.url for server, ok in zip(self.servers, healthy, strict=True) if not ok]
        await asyncio.gather(*map(self.restart, dead))
        return dead

    async def restart(self, url: str) -> None:
        """Stop the server at `url` (whatever its state), start it again and wait until it is healthy."""
        [server] = [server for server in self.servers if server.url == url]
        await server.restart(self.start_timeout_s)

    def stop(self) -> None:
        for server in ([self.router] if self.router else []) + self.servers:
            server.stop()

    async def __aenter__(self) -> "ServerPool":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop()


def _with_api_key(spec: _Launchable, api_key: str) -> _Launchable:
    """A ServerSpec carries the key for its SGLang flag; other specs find it in their environment only."""
    return replace(spec, api_key=api_key) if isinstance(spec, ServerSpec) else spec


async def _false() -> bool:
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process may still take it before the server binds)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
