"""Training memory per GPU on a pipeline stage: parameters, gradients, optimizer state, the activations kept
for backward and the log-prob buffers."""

import functools
from dataclasses import dataclass

from megatron_dapo.config import DapoConfig, ModelConfig
from megatron_dapo.model.arch import padded_vocab_size
from megatron_dapo.plan.assumptions import Assumptions, Kernels
from megatron_dapo.plan.layout import Layout
from megatron_dapo.plan.parameters import stage_parameters
from megatron_dapo.plan.shape import ModelShape

GIB = 2**30
CHUNK_TOKENS = ModelConfig().logprob_chunk_tokens  # the chunked path, as the plan's alternative to plain
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class StageMemory:
    """Bytes per GPU on one pipeline stage; `activations_other` and `logprobs_other` are the alternatives not
    chosen by the config (no recompute vs recompute, plain vs chunked log-probs)."""

    stage: str
    parameters: int
    parameter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    activations_other: float
    logprob_bytes: float
    logprobs_other: float
    reserved_bytes: float

    @property
    def resident_bytes(self) -> float:
        """What stays on the GPU between steps: parameters, gradients, optimizer state."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.resident_bytes + self.activation_bytes + self.logprob_bytes + self.reserved_bytes


@dataclass(frozen=True)
class Saved:
    """Elements one decoder layer keeps for backward, per token."""

    what: str
    elements: float
    tp_split: bool  # always split over TP (per-head and per-ffn-channel tensors)
    fp32: bool = False  # kept in fp32 whatever the model dtype


def saved_per_token(shape: ModelShape, kernels: Kernels, seq_tokens: int) -> list[Saved]:
    """What one decoder layer keeps for backward per token; `seq_tokens`: the longest sequence attended over.

    Tensors of width H (norm inputs and outputs) are whole on every TP rank unless sequence parallelism
    splits them.
    """
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    heads, groups = shape.num_attention_heads, shape.num_query_groups
    if kernels == "te":
        saved = [
            Saved("norm inputs and outputs (two fused norm+linear)", 4 * h, tp_split=False),
            Saved("norm 1/rms", 2, tp_split=False, fp32=True),
            Saved("q, k, v after RoPE", (heads + 2 * groups) * d, tp_split=True),
            Saved("attention output", heads * d, tp_split=True),
            Saved("flash-attention log-sum-exp", heads, tp_split=True, fp32=True),
            Saved("fc1 output (gate, up)", 2 * f, tp_split=True),
            Saved("SwiGLU output", f, tp_split=True),
        ]
        qk_norm = [Saved("q/k norm inputs", (heads + groups) * d, tp_split=True)]
    else:
        saved = [
            Saved("norm inputs, normalised inputs, outputs (two RMSNorm)", 6 * h, tp_split=False),
            Saved("norm 1/rms", 2, tp_split=False),
            Saved("RoPE cos/sin of q and k", 4 * d, tp_split=False),
            Saved("q, and k, v expanded to every head", 3 * heads * d, tp_split=True),
            Saved("attention probabilities", heads * seq_tokens, tp_split=True),
            Saved("attention output", heads * d, tp_split=True),
            Saved("fc1 output and SwiGLU intermediates", 5 * f, tp_split=True),
        ]
        qk_norm = [Saved("q/k norm inputs and normalised inputs", 2 * (heads + groups) * d, tp_split=True)]
    return saved + (qk_norm if shape.qk_layernorm else [])


def layer_activation_bytes(
    shape: ModelShape, kernels: Kernels, tokens: int, seq_tokens: int, dtype_bytes: int, tp: int, sp: bool
) -> float:
    """Bytes one decoder layer keeps for backward for `tokens` tokens on one rank."""
    total = 0.0
    for item in saved_per_token(shape, kernels, seq_tokens):
        split = tp if (item.tp_split or sp) else 1
        total += item.elements / split * (4 if item.fp32 else dtype_bytes)
    return total * tokens


def stage_activation_bytes(
    shape: ModelShape,
    kernels: Kernels,
    *,
    tokens: int,
    seq_tokens: int,
    dtype_bytes: int,
    tp: int,
    pp: int,
    sp: bool,
    stage: int,
    recompute: bool,
) -> float:
    """Peak bytes of saved activations on a GPU of `stage` under 1F1B (pp - stage micro-batches in flight)."""
    in_flight = pp - stage
    layers = shape.num_layers // pp
    layer = layer_activation_bytes(shape, kernels, tokens, seq_tokens, dtype_bytes, tp, sp)
    if recompute:
        # Each layer's input is kept; backward rebuilds one layer's activations at a time.
        layer_input = tokens * shape.hidden_size / (tp if sp else 1) * dtype_bytes
        held = in_flight * layers * layer_input + layer
    else:
        held = in_flight * layers * layer
    if stage == 0:
        held += in_flight * tokens * 8  # token ids (int64) kept by the embedding
    if stage == pp - 1:
        per_token = (2 if kernels == "te" else 3) * shape.hidden_size * dtype_bytes / (tp if sp else 1)
        held += tokens * per_token + tokens * 4  # final norm input/output and 1/rms
    return held


def logprob_bytes(shape: ModelShape, *, tokens: int, chunk_tokens: int, dtype_bytes: int, tp: int) -> float:
    """Peak of model/logprobs.py: logits in the model dtype plus two fp32 buffers of their shape, for all
    `tokens` (chunk_tokens=0: the plain path) or for one chunk plus the [T, H] and [V/tp, H] gradients."""
    vocab_shard = padded_vocab_size(shape.vocab_size, tp) // tp
    per_row = vocab_shard * (dtype_bytes + 8)
    if chunk_tokens <= 0:
        return tokens * per_row
    gradients = (tokens + vocab_shard) * shape.hidden_size * dtype_bytes
    return min(chunk_tokens, tokens) * per_row + gradients


def stage_memory(
    cfg: DapoConfig, shape: ModelShape, layout: Layout, assume: Assumptions
) -> list[StageMemory]:
    """The first and the last pipeline stage (one stage without PP): the others hold less."""
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    grad_bytes = 4 if assume.grad_fp32 else dtype_bytes
    optimizer_bytes = 8 + (0 if dtype_bytes == 4 else 4)  # Adam moments (+ fp32 master weights)
    optimizer_shards = layout.dp * layout.cp if assume.distributed_optimizer else 1
    tokens = cfg.train.tokens_per_microbatch  # per GPU, after the CP split (data/packing.py)
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    seq_tokens = min(tokens * layout.cp, longest)
    recompute, chunk = cfg.model.recompute_activations, cfg.model.logprob_chunk_tokens
    names = {0: "first", layout.pp - 1: "last"} if layout.pp > 1 else {0: "only"}
    activation = functools.partial(
        stage_activation_bytes, shape, assume.kernels, tokens=tokens, seq_tokens=seq_tokens,
        dtype_bytes=dtype_bytes, tp=layout.tp, pp=layout.pp, sp=layout.sequence_parallel,
    )  # fmt: skip
    stages = []
    for stage, name in names.items():
        parameters = stage_parameters(shape, layout.tp, layout.pp, stage)
        activations = {
            with_recompute: activation(stage=stage, recompute=with_recompute)
            for with_recompute in (True, False)
        }
        last = stage == layout.pp - 1
        logprobs = {
            chunk_tokens: logprob_bytes(
                shape, tokens=tokens, chunk_tokens=chunk_tokens, dtype_bytes=dtype_bytes, tp=layout.tp
            )
            if last
            else 0.0
            for chunk_tokens in (chunk, 0 if chunk else CHUNK_TOKENS)
        }
        stages.append(
            StageMemory(
                stage=name,
                parameters=parameters,
                parameter_bytes=parameters * dtype_bytes,
                gradient_bytes=parameters * grad_bytes,
                optimizer_bytes=parameters * optimizer_bytes / optimizer_shards,
                activation_bytes=activations[recompute],
                activations_other=activations[not recompute],
                logprob_bytes=logprobs[chunk],
                logprobs_other=logprobs[0 if chunk else CHUNK_TOKENS],
                reserved_bytes=assume.reserved_gib * GIB,
            )
        )
    return stages
