"""Weight sync: the policy's Megatron TP/PP shards to the rollout engine, in Hugging Face layout, in buckets.

Every training rank calls `sync_weights` after each optimizer step: it is a collective. The TP ranks of a
stage all-gather each parameter in turn (so memory holds one parameter, not the model), map it to Hugging
Face names and layouts with model/hf_mapping, cast it to the engine's dtype and pack the tensors into
buckets of about `bucket_bytes`; a bucket goes to the engine, which answers before the next one is built.
Each Hugging Face tensor is sent once per server, by the one stage that holds it: the final norm by the last
stage, the embedding by the first; with tied embeddings the last stage's output layer is the embedding's copy
and is skipped. Stages go in turn, first to last, and the cache is flushed with the last bucket.

The package, one idea a module:
- gather.py: a stage's (or, colocated on several nodes, every stage's) weights as whole HF tensors;
- buckets.py: the tensors in buckets, handed to the transport one at a time;
- transport.py: the `WeightTransport` interface; tensor.py (`TensorTransport`: CUDA IPC handles for
  colocated servers, shared-memory segments for the CPU engine) and broadcast.py (`BroadcastTransport`:
  NCCL broadcast to servers on GPUs of their own), as SGLang defines them;
- placement.py: which training rank shares each GPU of each colocated server;
- report.py: what a sync cost, the same on every rank, and `WeightSyncError`.
The payload formats are the engine protocol's and live with it: rollout/weight_payload.py (SGLang's CUDA IPC
pickles and the broadcast's flattened bytes) and rollout/host_payload.py (the CPU engine's segments).

Failures: an engine that refuses a bucket fails the sync on every rank, never hangs the others. The rank
that saw the error stops sending but keeps joining the collectives (gathers, broadcasts) until the sync's
last one, which carries every rank's outcome; every rank then raises the same `WeightSyncError`.

Engine calls are coroutines of the async client (rollout/sglang_client.py). `sync_weights` blocks the calling
thread, which must be the training thread (it runs collectives and, on GPUs, owns the CUDA device); the
coroutines run on `loop`, an event loop running in another thread: the trainer's rollout loop, or a
`BackgroundLoop` (rollout/background.py) for a synchronous trainer. Only sender ranks (`is_sender`) need the
client and the loop. Generation must be idle during a sync: a request running across it would mix two
policies.
"""

import asyncio
import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.hf_mapping import HFMapping
from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.sync.buckets import DEFAULT_BUCKET_BYTES, Sending
from megatron_dapo.sync.gather import every_rank_hf_tensors, parameters_of_every_stage, stage_hf_tensors
from megatron_dapo.sync.report import StageReport, SyncReport, WeightSyncError
from megatron_dapo.sync.transport import WeightTransport, check_loop, is_stage_sender


def is_sender(pg_collection: ProcessGroupCollection, transport: WeightTransport | None = None) -> bool:
    """Whether this rank calls the engine in `sync_weights` (and so needs the engine client and loop).

    Without a transport: whether it sends its pipeline stage's weights, which is the answer of every
    transport but a TensorTransport with a colocation (where the rank on each server's first GPU sends).
    """
    return transport.is_sender(pg_collection) if transport is not None else is_stage_sender(pg_collection)


@torch.no_grad()
def sync_weights(
    model: nn.Module,
    hf_config: Any,
    pg_collection: ProcessGroupCollection,
    transport: WeightTransport,
    engine: RolloutEngine | None,
    loop: asyncio.AbstractEventLoop | None,
    *,
    weight_version: int,
    dtype: torch.dtype,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> SyncReport:
    """Push the policy's weights to the engine; call on every training rank. See the module docstring.

    `model` is this rank's stage (DDP / Float16Module wrappers allowed) of the model built from `hf_config`;
    `dtype` is the engine's (its --dtype); `weight_version` is the trainer's step, which the engine reports
    with every completion it generates afterwards. `engine` and `loop` are needed on sender ranks only
    (`is_sender(pg_collection, transport)`). Raises WeightSyncError on every rank if an engine call failed.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes} (a few hundred MB suits GPUs)")
    start = time.perf_counter()
    stage, stages = pg_collection.pp.rank(), pg_collection.pp.size()
    sender = transport.is_sender(pg_collection)
    if sender and (engine is None or loop is None):
        raise ValueError(
            f"rank {dist.get_rank()} calls the engine in weight syncs (is_sender): give it the engine client "
            "and the event loop that client runs on"
        )
    if sender:
        check_loop(loop)
    mapping = HFMapping(GPTArch.from_hf_config(hf_config))
    sending = Sending(transport, engine if sender else None, loop, weight_version, bucket_bytes)
    if transport.whole_model_on_every_rank:
        parameters = parameters_of_every_stage(model, mapping, pg_collection)
        for turn in range(stages):
            named = every_rank_hf_tensors(model, mapping, pg_collection, dtype, turn, parameters[turn])
            sending.stage(named, turn, flush_at_end=turn == stages - 1, joins_every_send=True)
    elif pg_collection.dp_cp.rank() == 0:
        # Stages take turns, first to last: broadcasts to the same servers in several groups at once could
        # deadlock (each server waits in one group while a sender waits for it in another), and the cache
        # is flushed once, after the last bucket of the last stage.
        for turn in range(stages):
            if turn == stage:
                named = stage_hf_tensors(model, mapping, pg_collection, dtype)
                sending.stage(named, stage, flush_at_end=stage == stages - 1, joins_every_send=False)
            dist.barrier(group=pg_collection.pp)
    return _finish(sending, start)


def _finish(sending: Sending, start: float) -> SyncReport:
    """Every rank's reports and outcome, on every rank: the sync's end for all (no rank trains before every
    server holds the new weights), and the one place where a failure anywhere becomes an error everywhere."""
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (sending.reports, sending.error))
    failures: dict[str, list[int]] = {}
    for rank, (_, error) in enumerate(outcomes):
        if error is not None:
            failures.setdefault(error, []).append(rank)
    if failures:
        shown = "; ".join(
            f"{error} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            for error, ranks in list(failures.items())[:3]
        )
        more = f"; and {len(failures) - 3} more failures" if len(failures) > 3 else ""
        raise WeightSyncError(f"weight sync to version {sending.weight_version} failed: {shown}{more}")
    by_stage: dict[int, list[StageReport]] = {}
    for reports, _ in outcomes:
        for report in reports:
            by_stage.setdefault(report.stage, []).append(report)
    # Each sender sent a stage's tensors to its own servers: the same sizes; the slowest one sets the time.
    stages = tuple(
        dataclasses.replace(
            by_stage[stage][0],
            seconds=max(report.seconds for report in by_stage[stage]),
            engine_seconds=max(report.engine_seconds for report in by_stage[stage]),
        )
        for stage in sorted(by_stage)
    )
    return SyncReport(sending.weight_version, stages, time.perf_counter() - start)
