"""What every transport shares: the `WeightTransport` interface, the load formats, who sends, and engine calls
made from the training thread on the engine client's event loop (which runs in another thread)."""

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor

from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET

LOAD_FORMATS = (None, FLATTENED_BUCKET)  # per-tensor handles, or one flat buffer per bucket

NamedTensors = list[tuple[str, Tensor]]
T = TypeVar("T")


class WeightTransport(Protocol):
    # True: every rank builds every stage's tensors and calls `send` with each bucket (a collective);
    # False: each stage's sender alone builds and sends that stage's buckets.
    whole_model_on_every_rank: bool

    def is_sender(self, pg_collection: ProcessGroupCollection) -> bool:
        """Whether this rank calls the engine (and so needs the engine client and loop)."""
        ...

    def send(
        self,
        bucket: NamedTensors,
        engine: RolloutEngine | None,
        loop: asyncio.AbstractEventLoop | None,
        *,
        stage: int,
        weight_version: int,
        flush_cache: bool,
    ) -> None:
        """Hand one bucket to the servers; return once they have loaded it. On failure, raise only after
        this rank has joined the collectives `send` runs, so that the others can go on."""
        ...


def is_stage_sender(pg_collection: ProcessGroupCollection) -> bool:
    return pg_collection.tp.rank() == 0 and pg_collection.dp_cp.rank() == 0


def check_load_format(load_format: str | None) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format={load_format!r}: use None (one handle per tensor) or {FLATTENED_BUCKET!r}"
        )


def submit(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
    """Start an engine call on `loop`; the caller waits on the future while it does its own part."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop)


def check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Engine calls wait on `loop` from this thread: it must be running, in another thread."""
    try:
        this_thread = asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread: the expected case
        this_thread = None
    if this_thread is loop:
        raise RuntimeError(
            "sync_weights blocks its thread and `loop` runs in this same thread: run the engine client's "
            "loop in another thread (e.g. BackgroundLoop) and call sync_weights from the training thread"
        )
    if not loop.is_running():
        raise RuntimeError("`loop` is not running: engine calls would never complete (see BackgroundLoop)")
