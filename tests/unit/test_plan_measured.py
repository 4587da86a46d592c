"""The planner's per-GPU memory against what a CPU training step of a tiny Megatron model really holds.

A child process (this file run as a script: megatron's parallel state is process-global) builds the model
with model/build.py, wraps it in Megatron's DDP and distributed optimizer as training does, runs a step, and
reports bytes: parameters, gradient buffers and optimizer state as sums of tensor sizes (exact), and the
activations autograd keeps for backward, seen through saved-tensor hooks (their peak over forward and
backward with full recompute). fp32 checks the activation model of the CPU ("local") kernels; bf16 checks
the mixed-precision accounting (bf16 weights, fp32 gradients, fp32 master weights and Adam moments).
"""

import json
import os
import socket
import subprocess
import sys
import weakref

import pytest

from megatron_dapo.config import load_config
from megatron_dapo.plan import Assumptions, Cluster, load_model_shape, make_plan

TOKENS = 256  # one sequence filling one micro-batch
TINY = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 500,  # padded to 512 in the Megatron model
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}


@pytest.fixture(scope="module")
def measured() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _planned(tmp_path, dtype: str, recompute: bool):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    cfg = load_config(
        None,
        [
            f"model.dtype={dtype}",
            f"model.recompute_activations={str(recompute).lower()}",
            "rollout.backend=cpu",
            f"train.tokens_per_microbatch={TOKENS}",
            "data.max_prompt_tokens=64",
            f"rollout.max_response_tokens={TOKENS - 64}",
            "algorithm.overlong_buffer_tokens=32",
        ],
    )
    shape = load_model_shape(str(tmp_path))
    plan = make_plan(
        cfg, shape, Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=100), Assumptions(kernels="local")
    )
    (stage,) = plan.stages
    return stage


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameters_gradients_and_optimizer_state(measured, tmp_path, dtype):
    got, plan = measured[dtype], _planned(tmp_path, dtype, recompute=False)
    assert plan.parameters == got["parameters"]
    assert plan.parameter_bytes == pytest.approx(got["parameter_bytes"], rel=0.01)
    # Megatron pads its gradient buffer a little; the optimizer keeps a `step` counter per parameter group.
    assert plan.gradient_bytes == pytest.approx(got["gradient_bytes"], rel=0.01)
    assert plan.optimizer_bytes == pytest.approx(got["optimizer_bytes"], rel=0.01)


@pytest.mark.parametrize("recompute", [False, True])
def test_activations_within_20_percent(measured, tmp_path, recompute):
    got = measured["float32"]["recompute_peak" if recompute else "forward"]
    planned = _planned(tmp_path, "float32", recompute).activation_bytes
    assert planned == pytest.approx(got, rel=0.2), (planned, got)


# ---- the child process -------------------------------------------------------------------------------------


class _SavedTensors:
    """Bytes of the tensors autograd holds for backward (parameters excluded), now and at the peak."""

    def __init__(self, parameters) -> None:
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.holders: dict[int, int] = {}  # storage -> number of saved tensors on it
        self.current = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.parameter_storages:
            return tensor
        if not self.holders.get(key):
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.holders[key] = self.holders.get(key, 0) + 1
        handle = _Handle(tensor)
        weakref.finalize(handle, self._release, key, storage.nbytes())
        return handle

    def unpack(self, handle):
        return handle.tensor if isinstance(handle, _Handle) else handle

    def _release(self, key: int, nbytes: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            self.current -= nbytes


class _Handle:
    def __init__(self, tensor) -> None:
        self.tensor = tensor


def _measure_model(dtype, pg) -> dict:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_dapo.model.build import build_gpt_model
    from megatron_dapo.parallel.state import ParallelDims

    bf16 = dtype == torch.bfloat16
    tokens = torch.randint(0, TINY["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(TOKENS)[None]
    result = {}
    for recompute in (False, True):
        model = build_gpt_model(TINY, ParallelDims(), pg, params_dtype=dtype, recompute_activations=recompute)
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(
                use_distributed_optimizer=True, grad_reduce_in_fp32=True
            ),
            module=model,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, use_distributed_optimizer=True), [ddp]
        )
        saved = _SavedTensors(ddp.parameters())
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            logits = ddp(tokens, positions, attention_mask=None)
        result["recompute_forward" if recompute else "forward"] = saved.current
        loss = logits.float().logsumexp(-1).mean()  # outside the hooks: the loss is not the model's
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss.backward()  # recompute packs each layer's tensors again here
        result["recompute_peak" if recompute else "backward_peak"] = saved.peak
        ddp.finish_grad_sync()
        assert optimizer.step()[0], "the optimizer step failed"
    parameters = list(model.parameters())
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    state = sum(
        v.nbytes
        for o in optimizers
        for s in o.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    # fp32 master weights: the tensors the torch optimizer updates, when they are not the model's own.
    own = {p.untyped_storage().data_ptr() for p in parameters}
    master = sum(
        p.nbytes
        for o in optimizers
        for group in o.optimizer.param_groups
        for p in group["params"]
        if p.untyped_storage().data_ptr() not in own
    )
    return {
        **result,
        "parameters": sum(p.numel() for p in parameters),
        "parameter_bytes": sum(p.nbytes for p in parameters),
        "gradient_bytes": sum(buffer.grad_data.nbytes for buffer in ddp.buffers),
        "optimizer_bytes": state + master,
    }


def _measure() -> dict:
    import torch

    from megatron_dapo.parallel.state import ParallelDims, init_parallel

    pg = init_parallel(ParallelDims())
    return {"float32": _measure_model(torch.float32, pg), "bfloat16": _measure_model(torch.bfloat16, pg)}


if __name__ == "__main__":
    print(json.dumps(_measure()))
