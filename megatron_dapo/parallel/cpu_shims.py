"""Make stock megatron-core (0.16 to 0.19) run on a CUDA-less machine (gloo, CPU tensors).

megatron-core assumes a GPU in a few dozen places: it asks `torch.cuda.current_device()` for the device of new
tensors, builds scalars with `device="cuda"`, keeps RNG states through `torch.cuda`, calls
`torch.cuda.synchronize()` (and, from 0.19, `torch.cuda.current_stream()`), moves tensors with `.cuda()` and
checks dtypes by comparing `tensor.type()` with 'torch.cuda.FloatTensor'. Every one of those calls fails on a
CPU-only torch, so each shim below only redirects a call that could not have succeeded; none changes what a
GPU machine runs, because `apply_cpu_shims()` does nothing when CUDA is available. All shims live here, and
nowhere else.

Without Transformer Engine or Apex (so on every CPU machine) megatron's DistributedOptimizer runs over
torch's AdamW, and its checkpoint load path for that optimizer breaks in three places; the last shim repairs
them, for the 'dp_reshardable' format the trainer saves on CPU (trainer/checkpointing.py).
"""

import importlib
from collections.abc import Callable
from typing import Any

import torch

_applied = False

# megatron modules that create tensors with a hard-coded device="cuda".
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
)
_TENSOR_FACTORIES = ("zeros", "tensor")


def apply_cpu_shims() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU; idempotent, a no-op when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_rng_tracker()
    _patch_distributed_optimizer_load()
    for name in _CUDA_FACTORY_MODULES:
        module = importlib.import_module(name)
        module.torch = _CpuTorch()
    _applied = True


def cpu_shims_applied() -> bool:
    return _applied


def _patch_torch_cuda() -> None:
    # Every megatron call site uses current_device() as a `device=` argument or a `.to()` target.
    torch.cuda.current_device = lambda: "cpu"
    # CPU work is synchronous: there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core 0.19's start_grad_sync waits on the current stream for CUDA-graph events; torch's CPU
    # stream stands in (its wait_event, wait_stream and record_event do nothing, as CPU work is in order).
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()


def _patch_tensor_methods() -> None:
    # `.cuda()` moves a tensor to "the" device; on a CPU-only machine that device is the CPU.
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self
    # megatron checks dtypes as type strings ('torch.cuda.FloatTensor'): report CPU tensors under CUDA names.
    type_of = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs:
            return (
                type_of(self).replace("torch.", "torch.cuda.", 1)
                if self.device.type == "cpu"
                else type_of(self)
            )
        return type_of(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type


def _patch_rng_tracker() -> None:
    """Keep the tracker's named RNG states as CPU generator states (megatron reads them from torch.cuda)."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )

    def add(self: Any, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mp_random.CudaRNGStatesTracker.add = add
    # model_parallel_cuda_manual_seed seeds "the GPU" with the data-parallel seed: here the CPU generator.
    torch.cuda.manual_seed = torch.manual_seed


def _patch_distributed_optimizer_load() -> None:
    """Let the DistributedOptimizer over torch's AdamW load a 'dp_reshardable' checkpoint exactly."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    load_state_dict = DistributedOptimizer.load_state_dict

    def sharded_state_dict_of_initialised_state(
        self: DistributedOptimizer, model_sharded_state_dict: Any, is_loading: bool = False, **kwargs: Any
    ) -> Any:
        # The template to load into is built from the optimizer's own state, which a fresh torch AdamW does
        # not have yet (megatron then fails reading its step): a step on zero gradients creates it. What
        # that step does to the main params (weight decay) is overwritten by the checkpoint's params.
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, **kwargs)

    def load_state_dict_with_own_steps(self: DistributedOptimizer, state_dict: dict[str, Any]) -> None:
        # The 'dp_reshardable' reader copies into the main params, leaves that require grad.
        with torch.no_grad():
            load_state_dict(self, state_dict)
        # megatron hands every param one shared `step` tensor (which torch's AdamW, stepping the params one
        # at a time, would advance once per param), then overwrites it with the step of the template built
        # before loading. The checkpoint's step is the one in its param groups: give each param its own.
        (step,) = {group["step"] for group in state_dict["optimizer"]["param_groups"]}
        for state in self.optimizer.state.values():
            state["step"] = torch.tensor(step, dtype=torch.float32)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict_of_initialised_state
    DistributedOptimizer.load_state_dict = load_state_dict_with_own_steps


class _CpuTorch:
    """`torch` as seen by one megatron module: tensor factories asked for device="cuda" build on the CPU."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _TENSOR_FACTORIES:
            return _on_cpu(attr)
        return attr


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def build(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "cpu")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return build
