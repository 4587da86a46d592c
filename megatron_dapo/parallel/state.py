"""Process groups for tensor, pipeline, context and data parallelism, over megatron-core's parallel_state.

`init_parallel` is the only place that touches megatron's global parallel state; everything after it takes the
process groups it returns (a megatron `ProcessGroupCollection`) as arguments.
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_dapo.parallel.cpu_shims import apply_cpu_shims


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of the policy; the data-parallel degree is what the world size leaves over."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for `world_size` processes; raises a clear error when it does not divide."""
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def validate(self, world_size: int) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = "
                f"{self.model_parallel_size}: launch a multiple of {self.model_parallel_size} processes "
                "(torchrun --nproc-per-node) or change parallel.tp/pp/cp"
            )
        if self.sequence_parallel and not torch.cuda.is_available():
            raise ValueError(
                "parallel.sequence_parallel=true needs CUDA (megatron's CPU norm refuses it): "
                "set parallel.sequence_parallel=false on CPU"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1: set it to false")


def init_parallel(
    dims: ParallelDims, *, seed: int = 1234, timeout_minutes: int = 30
) -> ProcessGroupCollection:
    """Join the job's process group (env:// as set by torchrun) and build megatron's TP/PP/CP/DP groups.

    Uses NCCL where CUDA is present and gloo otherwise; applies the CPU shims in the second case. Started
    without torchrun (no RANK in the environment), the job is one process.
    """
    apply_cpu_shims()
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    dims.validate(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed on every rank: megatron derives the per-TP-rank streams from it.
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def launched_world_size() -> int:
    """The job's process count, known before `init_parallel` joins it: torchrun's, else this one process."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if _launched_by_torchrun() else 1


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (tests and the CLI call this on exit)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
