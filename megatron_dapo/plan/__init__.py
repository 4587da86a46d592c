"""Will a DAPO run fit, and how long will a step take? `dapo-plan` answers before a GPU hour is spent.

For a model (a Hugging Face config.json, or a named shape) on a cluster (nodes × GPUs × GPU memory) under a
run config (`load_config`), it prints the per-GPU memory of the first and last pipeline stages, the SGLang
KV-cache capacity, the parallel layout, and an estimate of the time of one RL step. A configuration that
cannot fit is flagged with changes that would make it fit (each checked by planning again); exit status 3
(DOES_NOT_FIT), 2 for a config or model it cannot read, so that a crash (1) is never taken for a verdict.

What the memory figures rest on:
- Parameters in `model.dtype`; gradients in fp32 (Megatron's grad_reduce_in_fp32, standard with bf16); fp32
  master weights (unless the model is fp32) and Adam's two fp32 moments, sharded over DP × CP by Megatron's
  distributed optimizer. The vocabulary is padded to a multiple of lcm(128, TP), as model/arch.py does.
- Activations: the tensors each decoder layer keeps for backward (`saved_per_token`) for one packed
  micro-batch of `train.tokens_per_microbatch` tokens per GPU, after the CP split (and split over TP
  where sequence parallelism shards them). 1F1B keeps `pp - stage` micro-batches in flight on a stage.
  Full recompute keeps each layer's input and rebuilds one layer at a time in backward. Two kernel sets:
  "te" (GPU: Transformer Engine's fused norm+linear and flash attention, which keeps no [s × s] scores)
  and "local" (CPU: megatron's local spec, unfused RMSNorm, math attention that keeps the [heads, s, s]
  probabilities; measured in fp32, the CPU path's dtype).
- Log-prob buffers (model/logprobs.py): the plain path holds the [T, V/tp] logits plus two fp32 [T, V/tp]
  buffers; the chunked path the same for `model.logprob_chunk_tokens` rows, plus [T, H] and [V/tp, H]
  gradients.
- A fixed reserve per GPU (`--reserved-gib`) for the CUDA context, NCCL buffers, allocator fragmentation and
  the transient gradients of activations in backward, which are not modelled.
- SGLang: bf16 weights split over the server's TP, a bf16 KV cache, `rollout.mem_fraction` of GPU memory
  for both. Colocated, the training state (parameters, gradients, optimizer) stays on the GPU during rollout.
The time estimate rests on the throughput flags of `Assumptions`; it ignores evaluation, and weight sync
when colocated. A server's decode step grows with the sequences it holds, so a synchronous rollout pays for
its drain: servers emptying until the longest sample finishes alone (decode.py; benchmarks/async_rollout.py
simulates the same servers step by step). With rollout.max_staleness > 0 on dedicated rollout nodes it
adds the asynchronous step, in which generation overlaps training (timing.overlapped_step_s).

Modules, in the order a plan is made: shape (the model), assumptions, layout (the GPUs' split and what stops
it), parameters, memory (training, per pipeline stage), rollout (SGLang), decode (server speed, the drain),
timing, fit (`make_plan`), fixes, report (`format_plan`). The command line is megatron_dapo/cli/plan.py.
"""

from megatron_dapo.model.arch import padded_vocab_size
from megatron_dapo.plan.assumptions import Assumptions, Kernels
from megatron_dapo.plan.decode import ServerSpeed, server_speed
from megatron_dapo.plan.fit import DOES_NOT_FIT, Plan, make_plan
from megatron_dapo.plan.fixes import candidate_fixes, find_fixes
from megatron_dapo.plan.layout import Cluster, Layout, Problem, make_layout
from megatron_dapo.plan.memory import (
    CHUNK_TOKENS,
    GIB,
    StageMemory,
    layer_activation_bytes,
    logprob_bytes,
    saved_per_token,
    stage_activation_bytes,
)
from megatron_dapo.plan.parameters import count_parameters, layer_parameters, stage_parameters
from megatron_dapo.plan.report import format_plan
from megatron_dapo.plan.rollout import RolloutMemory, rollout_memory
from megatron_dapo.plan.shape import NAMED_MODELS, ModelShape, load_model_shape
from megatron_dapo.plan.timing import StepTime, overlapped_step_s, step_time

__all__ = [
    "CHUNK_TOKENS",
    "DOES_NOT_FIT",
    "GIB",
    "NAMED_MODELS",
    "Assumptions",
    "Cluster",
    "Kernels",
    "Layout",
    "ModelShape",
    "Plan",
    "Problem",
    "RolloutMemory",
    "ServerSpeed",
    "StageMemory",
    "StepTime",
    "candidate_fixes",
    "count_parameters",
    "find_fixes",
    "format_plan",
    "layer_activation_bytes",
    "layer_parameters",
    "load_model_shape",
    "logprob_bytes",
    "make_layout",
    "make_plan",
    "overlapped_step_s",
    "padded_vocab_size",
    "rollout_memory",
    "saved_per_token",
    "server_speed",
    "stage_activation_bytes",
    "stage_parameters",
    "step_time",
]
