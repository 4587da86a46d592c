"""The CPU shims make megatron's CUDA-only calls work without CUDA, and are never applied with CUDA."""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mp_random

from megatron_dapo.parallel import cpu_shims

# What the shims do is described on the CPU-only machine; where CUDA is present they are never applied (the
# first test), and tests/gpu covers the real CUDA calls.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="describes the CPU-only machine")


def test_shims_are_not_applied_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_shims, "_applied", False)
    # Sentinels where the shims would write: a shim applied anyway would replace them.
    sentinels = {
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "synchronize"): lambda device=None: None,
        (torch.cuda, "current_stream"): lambda device=None: None,
        (torch.Tensor, "cuda"): lambda self, *a, **k: self,
        (torch.Tensor, "type"): lambda self, *a, **k: "sentinel",
        (mp_random, "_get_cuda_rng_state"): lambda *a, **k: None,
        (schedules, "torch"): object(),
        (DistributedOptimizer, "sharded_state_dict"): lambda *a, **k: None,
        (DistributedOptimizer, "load_state_dict"): lambda *a, **k: None,
    }
    for (owner, name), value in sentinels.items():
        monkeypatch.setattr(owner, name, value)
    cpu_shims.apply_cpu_shims()
    assert not cpu_shims.cpu_shims_applied()
    for (owner, name), value in sentinels.items():
        assert getattr(owner, name) is value, (
            f"{owner.__name__}.{name} was patched although CUDA is available"
        )


@cpu_only
def test_shims_make_megatron_cuda_calls_run_on_cpu():
    cpu_shims.apply_cpu_shims()
    cpu_shims.apply_cpu_shims()  # idempotent: a second call must not wrap the wrappers
    assert cpu_shims.cpu_shims_applied()
    assert torch.cuda.current_device() == "cpu"
    x = torch.randn(3)
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversions keep working
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()  # megatron-core 0.19's start_grad_sync waits on it
    stream.wait_stream(stream)


@cpu_only
def test_rng_tracker_keeps_cpu_states():
    cpu_shims.apply_cpu_shims()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first), "the same seed gives the same stream"
    tracker.reset()
