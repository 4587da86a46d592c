"""What a weight sync cost, stage by stage, and how it failed: the same report and error on every rank."""

from dataclasses import dataclass

from megatron_dapo.rollout.engine import EngineError


@dataclass(frozen=True)
class StageReport:
    """What one pipeline stage's tensors cost in one sync (with several senders, the slowest one's time)."""

    stage: int
    tensors: int  # Hugging Face tensors
    bytes: int  # in the engine's dtype
    buckets: int
    seconds: float  # the stage's turn: gathering, mapping, packing, and the engine taking the buckets
    engine_seconds: float  # of which the engine calls (serialization or broadcast included)


@dataclass(frozen=True)
class SyncReport:
    """One sync, the same on every rank; `metrics()` for the trainer's logs. Sizes are per server."""

    weight_version: int
    stages: tuple[StageReport, ...]  # in stage order
    seconds: float  # the whole call, on this rank

    @property
    def bytes(self) -> int:
        return sum(stage.bytes for stage in self.stages)

    @property
    def buckets(self) -> int:
        return sum(stage.buckets for stage in self.stages)

    @property
    def tensors(self) -> int:
        return sum(stage.tensors for stage in self.stages)

    def metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        metrics = {
            f"{prefix}seconds": self.seconds,
            f"{prefix}gigabytes": self.bytes / 1e9,
            f"{prefix}gigabytes_per_second": self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0,
            f"{prefix}buckets": float(self.buckets),
        }
        for stage in self.stages:
            metrics[f"{prefix}stage{stage.stage}_seconds"] = stage.seconds
            metrics[f"{prefix}stage{stage.stage}_engine_seconds"] = stage.engine_seconds
            metrics[f"{prefix}stage{stage.stage}_gigabytes"] = stage.bytes / 1e9
        return metrics


class WeightSyncError(RuntimeError):
    """A sync failed (an engine refused a bucket, say); raised on every rank with the same message."""


class ServerGroupError(EngineError):
    """A failure that the ranks on one server's GPUs share: the poster's description, raised on each."""


def describe(error: Exception) -> str:
    return str(error) if isinstance(error, ServerGroupError) else f"{type(error).__name__}: {error}"
