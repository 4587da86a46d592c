"""What the trainer asks of a rollout engine, whichever servers answer (SGLang on GPUs, the CPU engine).

Everything is async: the trainer keeps many generate() calls in flight (one per prompt) and, under DAPO's
dynamic sampling, aborts the surplus once the batch is full. Weight versions are integers the trainer bumps
at every sync; each Completion reports the version that generated it.
"""

from collections.abc import Sequence
from typing import Protocol

from megatron_dapo.rollout.types import Completion, SamplingParams


class EngineError(RuntimeError):
    """A rollout server failed a request."""


class EngineUnavailableError(EngineError):
    """A server could not be reached, even after retries: it is down, or none is left to take the request."""

    def __init__(self, url: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url = url


class EngineTimeoutError(EngineUnavailableError):
    """A server took no answer past the request's deadline: it is stuck, or far slower than measured."""


class EngineRequestError(EngineError):
    """A server answered with an error status; retrying the same request would fail the same way."""

    def __init__(self, url: str, route: str, status: int, detail: str):
        super().__init__(f"{url}{route} answered {status}: {detail[:500]}")
        self.url, self.route, self.status = url, route, status


class RolloutEngine(Protocol):
    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, n: int = 1, *, request_id: str | None = None
    ) -> list[Completion]:
        """n samples of one prompt (token ids), in order. An aborted request returns its partial samples
        with finish reason ABORT. request_id names the call for abort(); a fresh one is made if omitted."""
        ...

    async def abort(self, request_id: str) -> None:
        """End one generate() call early; returns once all its samples have ended. No-op if it has ended."""
        ...

    async def abort_all(self) -> None:
        """End every generate() call in flight on every server."""
        ...

    async def pause_generation(self, mode: str = "abort") -> None:
        """Stop generating on every server: "abort" ends requests, "retract" and "in_place" hold them."""
        ...

    async def continue_generation(self) -> None:
        """Generate again on every server; held requests go on under the weights loaded meanwhile."""
        ...

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: Sequence[str],
        *,
        weight_version: int,
        load_format: str | None = None,
        flush_cache: bool = True,
        url: str | None = None,
    ) -> None:
        """Load one bucket of Hugging Face-named tensors (one payload per TP rank of the server, from
        rollout.weight_payload) into server `url`, or into every server when url is None."""
        ...

    async def init_weights_update_group(
        self,
        url: str,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        """Make server `url` join the trainer's process group for broadcast weight updates; the trainer's
        rank 0 must join the same group concurrently."""
        ...

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        *,
        weight_version: int,
        group_name: str,
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Announce tensors that the trainer's rank 0 broadcasts in the group, concurrently with this call."""
        ...

    async def destroy_weights_update_group(self, group_name: str) -> None: ...

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free engine memory (tags "weights", "kv_cache"; None: all) while the trainer uses the GPUs."""
        ...

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take the memory back; released weights hold no values until the next weight update."""
        ...

    async def flush_cache(self) -> None:
        """Drop cached prompt KV (fails while requests run, as in SGLang)."""
        ...

    async def health(self) -> dict[str, bool]:
        """Whether each server answers /health."""
        ...
