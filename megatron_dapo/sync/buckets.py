"""Buckets: consecutive Hugging Face tensors in groups of about `bucket_bytes`, handed to the transport one at
a time (the engine answers before the next one is built), and this rank's record of what they cost."""

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

import torch.distributed as dist
from torch import Tensor

from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.sync.report import StageReport, describe
from megatron_dapo.sync.transport import NamedTensors, WeightTransport

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 2**20  # slime's default: few HTTP calls, one bucket of memory on the sender


def buckets(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[tuple[NamedTensors, bool]]:
    """(bucket, is_last): consecutive tensors in groups of at most `bucket_bytes`; a larger one goes alone.

    A bucket is complete when the next tensor does not fit, so knowing the last one costs no lookahead.
    """
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket, True


class Sending:
    """This rank's part in one sync: the buckets it sends, what they cost, and the first error, after which
    it sends no more but still builds the buckets (the gathers and broadcasts are collectives)."""

    def __init__(
        self,
        transport: WeightTransport,
        engine: RolloutEngine | None,
        loop: asyncio.AbstractEventLoop | None,
        weight_version: int,
        bucket_bytes: int,
    ):
        self.transport, self.engine, self.loop = transport, engine, loop
        self.weight_version, self.bucket_bytes = weight_version, bucket_bytes
        self.reports: list[StageReport] = []  # of the stages this rank sent, on sender ranks
        self.error: str | None = None

    def stage(
        self, named: Iterator[tuple[str, Tensor]], stage: int, *, flush_at_end: bool, joins_every_send: bool
    ) -> None:
        """Gather the stage's tensors and hand them over a bucket at a time. `joins_every_send`: every rank
        calls the transport (its sends are collectives); otherwise the sender alone does."""
        calls_send = joins_every_send or self.engine is not None
        start = time.perf_counter()
        tensors = nbytes = count = 0
        engine_seconds = 0.0
        for bucket, last in buckets(named, self.bucket_bytes):
            if not calls_send or self.error is not None:
                continue  # a rank that only takes part in the gathers, or one whose server failed
            send_start = time.perf_counter()
            try:
                self.transport.send(
                    bucket,
                    self.engine,
                    self.loop,
                    stage=stage,
                    weight_version=self.weight_version,
                    flush_cache=last and flush_at_end,
                )
            except Exception as error:
                self.error = f"stage {stage}: {describe(error)}"
                logger.error(
                    "weight sync v%d failed on rank %d: %s", self.weight_version, dist.get_rank(), self.error
                )
                continue
            engine_seconds += time.perf_counter() - send_start
            tensors += len(bucket)
            nbytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
            count += 1
        if self.engine is None:
            return
        seconds = time.perf_counter() - start
        logger.info(
            "weight sync v%d, stage %d: %d tensors, %.3f GB in %d buckets, %.2f s (engine %.2f s)",
            self.weight_version, stage, tensors, nbytes / 1e9, count, seconds, engine_seconds,
        )  # fmt: skip
        self.reports.append(StageReport(stage, tensors, nbytes, count, seconds, engine_seconds))
