"""The rollout engine of a run: the servers named in rollout.server_urls, or servers launched here (SGLang on
GPUs, the CPU engine otherwise) and stopped at exit; one async client per weight-sync sender, on an event
loop of its own thread (rollout/background.py's BackgroundLoop), so that the training thread can block on it.
"""

import contextlib
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

from megatron_dapo.config import RolloutConfig
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.deadline import DEFAULT_DEADLINES, DeadlinePolicy
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, server_layout
from megatron_dapo.rollout.sglang_client import SGLangClient

# The CPU engine shares the machine's cores with the trainer, which waits while it generates: one thread
# each keeps them from fighting over the cores (rollout/cpu_engine/__main__.py measured 6 ms vs 320 ms).
CPU_ENGINE_THREADS = 1
T = TypeVar("T")


def server_specs(cfg: RolloutConfig, model_path: str, log_dir: Path, seed: int) -> list[ServerSpec]:
    """One server per rollout.num_servers, each on rollout.server_tp GPUs (SGLang) or one process (CPU)."""
    return server_layout(
        model_path,
        engine=cfg.backend,
        num_servers=cfg.num_servers,
        tp_size=cfg.server_tp,
        log_dir=log_dir,
        seed=seed,
        host=cfg.host,
        base_port=cfg.base_port,
        mem_fraction=cfg.mem_fraction,
        memory_saver=cfg.colocate,
        max_running_requests=cfg.max_running_requests,
        cpu_threads=CPU_ENGINE_THREADS,
    )


def request_deadlines(cfg: RolloutConfig) -> DeadlinePolicy:
    return DeadlinePolicy(
        floor_s=cfg.request_deadline_floor_s,
        min_tokens_per_s=cfg.request_min_tokens_per_s,
        slack=cfg.request_deadline_slack,
    )


class EngineConnection:
    """An engine client and the event loop it runs on; `close` ends both and stops servers launched here."""

    def __init__(
        self,
        urls: list[str],
        *,
        pool: ServerPool | None = None,
        loop: BackgroundLoop | None = None,
        api_key: str | None = None,
        deadlines: DeadlinePolicy = DEFAULT_DEADLINES,
    ):
        self.urls, self.pool = urls, pool
        self.api_key = api_key  # None: the client reads $DAPO_API_KEY
        self.loop = loop or BackgroundLoop()
        self.client = SGLangClient(urls, api_key=api_key, deadlines=deadlines)

    @classmethod
    def start(cls, cfg: RolloutConfig, *, model_path: str, log_dir: Path, seed: int) -> "EngineConnection":
        """Connect to rollout.server_urls, or launch rollout.num_servers servers (logs in `log_dir`)."""
        deadlines = request_deadlines(cfg)
        if cfg.server_urls:
            return cls(list(cfg.server_urls), deadlines=deadlines)
        if cfg.backend == "sglang" and not torch.cuda.is_available():
            raise RuntimeError("rollout.backend=sglang needs GPUs: set rollout.backend=cpu on this machine")
        loop = BackgroundLoop()
        pool = ServerPool(server_specs(cfg, model_path, log_dir, seed))
        try:
            loop.run(pool.start())  # stops every server itself when one fails to start
        except BaseException:
            loop.close()
            raise
        return cls(pool.urls, pool=pool, loop=loop, api_key=pool.api_key, deadlines=deadlines)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run an engine call from the training thread and wait for it."""
        return self.loop.run(coroutine)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start an engine call from the training thread; it runs while the thread goes on."""
        return self.loop.submit(coroutine)

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every step runs even if one fails
            stack.callback(self.loop.close)
            if self.pool is not None:
                stack.callback(self.pool.stop)
            self.loop.run(self.client.close())
