"""Processes in one process group that live for a whole test module: spawn once, run many functions.

Spawning a process that imports megatron-core costs seconds on the CI machine, so a module starts one pool per
world size and sends it each test's work:

    @pytest.fixture(scope="module")
    def pool():
        with DistributedPool(world_size=2) as p:
            yield p

    def test_something(pool):
        results = pool.run(check_something, arg)   # check_something(*args) runs on every rank

`run` calls a module-level function (picklable by reference) on every rank, with the default process group
(gloo on 127.0.0.1; `backend="nccl"` on GPUs) already initialised, and returns the ranks' return values in
rank order. An exception on any rank fails the call with that rank's traceback; a rank that does not answer
within the timeout (e.g. stuck in a collective another rank never reached) fails it too, and the pool is torn
down. After each call megatron's
parallel state, if a function set it up, is destroyed, so every call starts clean.
"""

import contextlib
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from megatron_dapo.rollout.launcher import free_port

_OK, _ERROR = "ok", "error"


class DistributedPool:
    """`world_size` worker processes joined in one process group (gloo; "nccl" gives rank r GPU r)."""

    def __init__(self, world_size: int, timeout_s: float = 300.0, backend: str = "gloo") -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")
        port = free_port()
        self._pipes = []
        self._processes = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker, args=(rank, world_size, port, backend, child), daemon=True
            )
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """fn(*args, **kwargs) on every rank; the return values in rank order."""
        if not self._processes:
            raise RuntimeError("the pool was closed after an earlier failure")
        for pipe in self._pipes:
            pipe.send((fn, args, kwargs))
        results, errors = [], []
        for rank, pipe in enumerate(self._pipes):
            if not pipe.poll(self.timeout_s):
                errors.append(f"rank {rank}: no answer within {self.timeout_s:.0f} s")
                continue
            try:
                status, value = pipe.recv()
            except EOFError:
                errors.append(f"rank {rank}: the process died (exit code {self._processes[rank].exitcode})")
                continue
            if status == _ERROR:
                errors.append(f"rank {rank}:\n{value}")
            results.append(value)
        if errors:
            self.close()
            raise RuntimeError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._pipes, self._processes = [], []

    def __enter__(self) -> "DistributedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker(rank: int, world_size: int, port: int, backend: str, pipe) -> None:
    # Several ranks share the CI machine's cores: one thread each avoids oversubscription.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=5))
    while True:
        task = pipe.recv()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            pipe.send((_OK, fn(*args, **kwargs)))
        except BaseException:
            pipe.send((_ERROR, traceback.format_exc()))
        finally:
            _reset_megatron()
    dist.destroy_process_group()


def _reset_megatron() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
