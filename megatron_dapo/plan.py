"""Will a DAPO run fit, and how long will a step take? `dapo-plan` answers before a GPU hour is spent.

For a model (a Hugging Face config.json, or a named shape) on a cluster (nodes × GPUs × GPU memory) under a
run config (`load_config`), it prints the per-GPU memory of the first and last pipeline stages, the SGLang
KV-cache capacity, the parallel layout, and an estimate of the time of one RL step. A configuration that
cannot fit is flagged with changes that would make it fit (each checked by planning again); exit status 1.

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
The time estimate rests on the throughput flags of `Assumptions`; it ignores weight sync and evaluation.
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_dapo.config import ConfigError, DapoConfig, ModelConfig, load_config
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.model.arch import GPTArch, padded_vocab_size

GIB = 2**30
CHUNK_TOKENS = ModelConfig().logprob_chunk_tokens  # the chunked path, as the plan's alternative to plain
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
Kernels = Literal["te", "local"]

# config.json fields of the released models (Hugging Face Qwen/Qwen2.5-7B and Qwen/Qwen2.5-32B).
NAMED_MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "qwen2.5-32b": {
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory and FLOPs depend on."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # true vocabulary, unpadded
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool


def load_model_shape(spec: str) -> ModelShape:
    """A named shape (NAMED_MODELS), a config.json, or a Hugging Face model directory holding one."""
    if spec in NAMED_MODELS:
        return _shape_from_hf_config(spec, NAMED_MODELS[spec])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--model {spec!r}: not a named shape ({', '.join(NAMED_MODELS)}), a config.json or a model "
            "directory"
        )
    return _shape_from_hf_config(spec, json.loads(path.read_text()))


def _shape_from_hf_config(name: str, hf_config: dict[str, Any]) -> ModelShape:
    dims = GPTArch.from_hf_config(hf_config)
    return ModelShape(
        name=name,
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        head_dim=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        vocab_size=dims.vocab_size,
        tie_word_embeddings=dims.tie_word_embeddings,
        qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_layernorm,
    )


@dataclass(frozen=True)
class Cluster:
    """The job's nodes; `rollout_nodes` of them run dedicated SGLang servers (0: colocated)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.6  # what nvidia-smi reports for an 80 GB H100 (81,559 MiB)
    rollout_nodes: int = 0


@dataclass(frozen=True)
class Assumptions:
    """What the estimates rest on, each a command-line flag; change them to what your cluster measures."""

    kernels: Kernels = "te"
    distributed_optimizer: bool = True  # Megatron's distributed optimizer shards master weights and moments
    grad_fp32: bool = True  # gradients accumulated and reduced in fp32
    reserved_gib: float = 6.0  # per GPU: CUDA context, NCCL buffers, fragmentation, transient gradients
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H100 SXM)
    mfu: float = 0.35  # model-FLOPs utilisation of training (forward and backward)
    decode_tokens_per_s_per_gpu: float = 0.0  # 0: 32e12 / parameters (~1,000 tok/s per H100 for a 32B model)
    tail_ms_per_token: float = 20.0  # decode step time while the longest samples finish (small batch)
    mean_prompt_tokens: int = 150  # DAPO-Math-17k with the DAPO template and Qwen's tokenizer: 145
    mean_response_fraction: float = 0.25  # mean response length / rollout.max_response_tokens
    kept_group_fraction: float = 0.5  # dynamic sampling: share of sampled groups with 0 < #correct < G

    def decode_rate(self, parameters: int) -> float:
        return self.decode_tokens_per_s_per_gpu or 32e12 / parameters


@dataclass
class Layout:
    """How the GPUs are split: the training grid and the SGLang servers."""

    train_nodes: int
    train_gpus: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    colocated: bool
    rollout_gpus: int
    server_tp: int
    servers: int


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


@dataclass
class RolloutMemory:
    """One SGLang server's memory per GPU, and the sequences its KV cache holds at once."""

    weight_bytes: float
    kv_pool_bytes: float
    kv_bytes_per_token: int  # per GPU of the server
    tokens_per_server: int
    longest_sequence_tokens: int
    full_length_sequences_per_server: int
    mean_length_sequences_per_server: int


@dataclass
class StepTime:
    """Seconds of one RL step, from the Assumptions."""

    generated_tokens: float
    trained_tokens: float
    rollout_s: float
    training_s: float
    train_flops_per_token: float

    @property
    def step_s(self) -> float:
        return self.rollout_s + self.training_s


@dataclass
class Problem:
    """Why the plan cannot run; `excess_bytes` says by how much when it is memory."""

    what: str
    excess_bytes: float = 0.0


@dataclass
class Plan:
    shape: ModelShape
    cluster: Cluster
    assumptions: Assumptions
    layout: Layout
    parameters: int  # the model's, unpadded, as Hugging Face counts them
    stages: list[StageMemory]
    rollout: RolloutMemory | None  # None for the CPU engine
    time: StepTime | None  # None for the CPU engine
    problems: list[Problem]
    warnings: list[str]
    config: DapoConfig
    fixes: list[str] = field(default_factory=list)  # overrides verified to make it fit (find_fixes)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "fixes": self.fixes,
            "warnings": self.warnings,
            "model": {**dataclasses.asdict(self.shape), "parameters": self.parameters},
            "cluster": dataclasses.asdict(self.cluster),
            "layout": dataclasses.asdict(self.layout),
            "memory": [
                {**dataclasses.asdict(s), "resident_bytes": s.resident_bytes, "total_bytes": s.total_bytes}
                for s in self.stages
            ],
            "rollout": dataclasses.asdict(self.rollout) if self.rollout else None,
            "time": {**dataclasses.asdict(self.time), "step_s": self.time.step_s} if self.time else None,
            "assumptions": dataclasses.asdict(self.assumptions),
            "config": self.config.to_dict(),
        }


# ---- parameters --------------------------------------------------------------------------------------------


def layer_parameters(shape: ModelShape, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (norms replicated, the rest split over TP)."""
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    qkv_rows = (shape.num_attention_heads + 2 * shape.num_query_groups) * d
    split = qkv_rows * h + shape.num_attention_heads * d * h + 3 * f * h
    if shape.qkv_bias:
        split += qkv_rows
    replicated = 2 * h + (2 * d if shape.qk_layernorm else 0)
    return split // tp + replicated


def count_parameters(shape: ModelShape) -> int:
    """All parameters of the unpadded model (what Hugging Face counts)."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return shape.num_layers * layer_parameters(shape, 1) + embeddings + shape.hidden_size


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters on one GPU of pipeline stage `stage`: its layers, plus the embedding (first stage), the
    final norm and the output layer (last stage; tied embeddings keep a copy there when PP > 1)."""
    vocab_rows = padded_vocab_size(shape.vocab_size, tp) // tp * shape.hidden_size
    count = shape.num_layers // pp * layer_parameters(shape, tp)
    if stage == 0:
        count += vocab_rows
    if stage == pp - 1:
        count += shape.hidden_size
        if not (shape.tie_word_embeddings and pp == 1):
            count += vocab_rows
    return count


# ---- activations -------------------------------------------------------------------------------------------


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


# ---- SGLang ------------------------------------------------------------------------------------------------


def rollout_memory(
    shape: ModelShape, cfg: DapoConfig, gpu_memory_bytes: float, assume: Assumptions
) -> RolloutMemory:
    """Per GPU of one SGLang server of TP `rollout.server_tp`: bf16 weights, then the KV pool in what
    `rollout.mem_fraction` of the GPU leaves."""
    server_tp = cfg.rollout.server_tp
    weight_bytes = count_parameters(shape) * 2 / server_tp
    kv_pool = gpu_memory_bytes * cfg.rollout.mem_fraction - weight_bytes
    # A TP rank holds ceil(groups / tp) KV heads: SGLang replicates them when TP exceeds the KV heads.
    kv_heads = -(-shape.num_query_groups // server_tp)
    kv_per_token = 2 * shape.num_layers * kv_heads * shape.head_dim * 2
    tokens = max(0, int(kv_pool // kv_per_token))
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    return RolloutMemory(
        weight_bytes=weight_bytes,
        kv_pool_bytes=kv_pool,
        kv_bytes_per_token=kv_per_token,
        tokens_per_server=tokens,
        longest_sequence_tokens=longest,
        full_length_sequences_per_server=tokens // longest,
        mean_length_sequences_per_server=int(tokens // _mean_sequence_tokens(cfg, assume)),
    )


# ---- time --------------------------------------------------------------------------------------------------


def step_time(shape: ModelShape, cfg: DapoConfig, layout: Layout, assume: Assumptions) -> StepTime:
    """Rollout: the larger of decode throughput over all rollout GPUs and the longest sample decoded alone.
    Training: FLOPs at `mfu` of `peak_tflops`: 6N + attention per token (plus 2N again with recompute), and
    a forward for the old log-probs."""
    parameters = count_parameters(shape)
    response = _mean_response_tokens(cfg, assume)
    samples = cfg.train.prompts_per_step * cfg.algorithm.samples_per_prompt
    sampled = samples / assume.kept_group_fraction if cfg.algorithm.dynamic_sampling else samples
    generated = sampled * response
    rollout_s = max(
        generated / (assume.decode_rate(parameters) * layout.rollout_gpus),
        cfg.rollout.max_response_tokens * assume.tail_ms_per_token / 1000,
    )
    matmul = parameters - shape.vocab_size * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
    sequence = _mean_sequence_tokens(cfg, assume)
    # Causal attention: each token meets sequence/2 keys; QKᵀ and AV cost 2 FLOPs per multiply-add each.
    attention = 2 * shape.num_layers * shape.num_attention_heads * shape.head_dim * sequence
    forward = 2 * matmul + attention
    passes = 4 if cfg.model.recompute_activations else 3  # forward + backward (2x) [+ recomputed forward]
    per_token = passes * forward + forward  # + the forward that gives the old log-probs
    trained = samples * sequence
    training_s = trained * per_token / (layout.train_gpus * assume.peak_tflops * 1e12 * assume.mfu)
    return StepTime(generated, trained, rollout_s, training_s, per_token)


def _mean_response_tokens(cfg: DapoConfig, assume: Assumptions) -> float:
    return assume.mean_response_fraction * cfg.rollout.max_response_tokens


def _mean_sequence_tokens(cfg: DapoConfig, assume: Assumptions) -> float:
    return assume.mean_prompt_tokens + _mean_response_tokens(cfg, assume)


# ---- the plan ----------------------------------------------------------------------------------------------


def make_layout(cfg: DapoConfig, cluster: Cluster) -> Layout:
    p = cfg.parallel
    train_nodes = cluster.nodes - cluster.rollout_nodes
    train_gpus = train_nodes * cluster.gpus_per_node
    model_parallel = p.tensor * p.pipeline * p.context
    colocated = cluster.rollout_nodes == 0
    rollout_gpus = (train_nodes if colocated else cluster.rollout_nodes) * cluster.gpus_per_node
    return Layout(
        train_nodes=train_nodes,
        train_gpus=train_gpus,
        tp=p.tensor,
        pp=p.pipeline,
        cp=p.context,
        dp=max(train_gpus // model_parallel, 0),
        sequence_parallel=p.sequence_parallel,
        colocated=colocated,
        rollout_gpus=rollout_gpus,
        server_tp=cfg.rollout.server_tp,
        servers=rollout_gpus // cfg.rollout.server_tp,
    )


def make_plan(cfg: DapoConfig, shape: ModelShape, cluster: Cluster, assume: Assumptions) -> Plan:
    """Memory, layout and time for `cfg` on `cluster`; `problems` lists what stops it (without fixes)."""
    layout = make_layout(cfg, cluster)
    problems = _layout_problems(cfg, shape, cluster, layout)
    warnings = _layout_warnings(cfg, cluster, layout, assume)
    stages = [] if problems else _stage_memory(cfg, shape, layout, assume)
    gpu_bytes = cluster.gpu_memory_gib * GIB
    for stage in stages:
        if stage.total_bytes > gpu_bytes:
            problems.append(
                Problem(
                    f"training needs {stage.total_bytes / GIB:.1f} GiB per GPU on the {stage.stage} "
                    f"pipeline stage; a GPU has {cluster.gpu_memory_gib:g} GiB",
                    stage.total_bytes - gpu_bytes,
                )
            )
    sglang = cfg.rollout.backend == "sglang"
    rollout = rollout_memory(shape, cfg, gpu_bytes, assume) if sglang else None
    if rollout is not None:
        problems += _rollout_problems(cfg, cluster, layout, rollout, stages, assume)
    time = step_time(shape, cfg, layout, assume) if sglang and stages else None
    return Plan(
        shape=shape,
        cluster=cluster,
        assumptions=assume,
        layout=layout,
        parameters=count_parameters(shape),
        stages=stages,
        rollout=rollout,
        time=time,
        problems=problems,
        warnings=warnings,
        config=cfg,
    )


def _stage_memory(
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


def _layout_problems(cfg: DapoConfig, shape: ModelShape, cluster: Cluster, layout: Layout) -> list[Problem]:
    problems = []
    if cluster.rollout_nodes and cfg.rollout.colocate:
        problems.append(Problem("--rollout-nodes gives dedicated rollout nodes: set rollout.colocate=false"))
    if not cluster.rollout_nodes and not cfg.rollout.colocate and cfg.rollout.backend == "sglang":
        problems.append(
            Problem("rollout.colocate=false needs dedicated rollout nodes: pass --rollout-nodes N")
        )
    if layout.train_nodes < 1:
        problems.append(
            Problem(f"{cluster.rollout_nodes} rollout nodes leave no training node of {cluster.nodes}")
        )
        return problems
    model_parallel = layout.tp * layout.pp * layout.cp
    if layout.train_gpus % model_parallel:
        problems.append(
            Problem(f"{layout.train_gpus} training GPUs are not divisible by TP x PP x CP = {model_parallel}")
        )
    for what, value in (
        ("num_attention_heads", shape.num_attention_heads),
        ("num_key_value_heads", shape.num_query_groups),
        ("intermediate_size", shape.ffn_hidden_size),
    ):
        if value % layout.tp:
            problems.append(Problem(f"parallel.tensor={layout.tp} does not divide {what}={value}"))
    if shape.num_layers % layout.pp:
        problems.append(
            Problem(f"parallel.pipeline={layout.pp} does not divide num_hidden_layers={shape.num_layers}")
        )
    if cfg.rollout.backend == "sglang":
        server_tp = cfg.rollout.server_tp
        if cluster.gpus_per_node % server_tp or shape.num_attention_heads % server_tp:
            problems.append(
                Problem(
                    f"rollout.server_tp={server_tp} must divide the GPUs per node ({cluster.gpus_per_node}) "
                    f"and num_attention_heads ({shape.num_attention_heads})"
                )
            )
    return problems


def _layout_warnings(cfg: DapoConfig, cluster: Cluster, layout: Layout, assume: Assumptions) -> list[str]:
    warnings = []
    if assume.kernels == "local" and cfg.model.dtype != "float32":
        # Measured on CPU: the residual stream, norm statistics and attention stay fp32 there.
        warnings.append("local kernels in 16-bit keep norms and attention in fp32: activations are ~1/3 more")
    if layout.tp > cluster.gpus_per_node:
        warnings.append(f"TP {layout.tp} spans nodes: tensor-parallel all-reduces then cross the network")
    mean_tokens = _mean_sequence_tokens(cfg, assume) * cfg.train.samples_per_minibatch
    microbatches = mean_tokens / max(layout.dp, 1) / (cfg.train.tokens_per_microbatch * layout.cp)
    if layout.pp > 1 and microbatches < layout.pp:
        warnings.append(
            f"about {microbatches:.1f} micro-batches per mini-batch per DP rank for PP {layout.pp}: "
            "the pipeline bubble dominates"
        )
    return warnings


def _rollout_problems(
    cfg: DapoConfig,
    cluster: Cluster,
    layout: Layout,
    rollout: RolloutMemory,
    stages: list[StageMemory],
    assume: Assumptions,
) -> list[Problem]:
    problems = []
    if rollout.full_length_sequences_per_server < 1:
        problems.append(
            Problem(
                f"an SGLang server's KV cache ({max(rollout.kv_pool_bytes, 0) / GIB:.1f} GiB per GPU) cannot "
                f"hold one {rollout.longest_sequence_tokens}-token sequence"
            )
        )
    if layout.colocated and stages:
        gpu_bytes = cluster.gpu_memory_gib * GIB
        resident = max(s.resident_bytes for s in stages)
        during_rollout = resident + cfg.rollout.mem_fraction * gpu_bytes + assume.reserved_gib * GIB
        if during_rollout > gpu_bytes:
            problems.append(
                Problem(
                    f"colocated rollout needs {during_rollout / GIB:.1f} GiB per GPU: the training state "
                    f"({resident / GIB:.1f} GiB) stays while SGLang holds rollout.mem_fraction="
                    f"{cfg.rollout.mem_fraction:g} of {cluster.gpu_memory_gib:g} GiB",
                    during_rollout - gpu_bytes,
                )
            )
    return problems


# ---- fixes -------------------------------------------------------------------------------------------------


def candidate_fixes(cfg: DapoConfig, shape: ModelShape, cluster: Cluster) -> list[str]:
    """Single config changes worth trying, the cheapest in speed first, as dotted overrides."""
    m, p, r, t = cfg.model, cfg.parallel, cfg.rollout, cfg.train
    fixes = []
    if not m.recompute_activations:
        fixes.append("model.recompute_activations=true")
    if p.tensor > 1 and not p.sequence_parallel:
        fixes.append("parallel.sequence_parallel=true")
    if m.logprob_chunk_tokens == 0:
        fixes.append(f"model.logprob_chunk_tokens={CHUNK_TOKENS}")
    fitted_tokens = _round_up(-(-(cfg.data.max_prompt_tokens + r.max_response_tokens) // p.context), 1024)
    if fitted_tokens != t.tokens_per_microbatch:
        fixes.append(f"train.tokens_per_microbatch={fitted_tokens}")
    tp_sizes = _divisors(math.gcd(shape.num_query_groups, shape.num_attention_heads, shape.ffn_hidden_size))
    fixes += [f"parallel.tensor={tp}" for tp in tp_sizes if tp > p.tensor and tp <= cluster.gpus_per_node]
    fixes += [f"parallel.pipeline={pp}" for pp in _divisors(shape.num_layers) if pp > p.pipeline]
    fixes += [f"parallel.pipeline={pp}" for pp in reversed(_divisors(shape.num_layers)) if pp < p.pipeline]
    if r.backend == "sglang":
        fixes += [f"rollout.server_tp={tp}" for tp in _divisors(cluster.gpus_per_node) if tp > r.server_tp]
        fixes += [f"rollout.mem_fraction={f}" for f in (0.6, 0.5, 0.4, 0.8, 0.85) if f != r.mem_fraction]
    fixes += [f"parallel.context={cp}" for cp in (2, 4, 8) if cp > p.context]
    return fixes


def find_fixes(
    config_path: str | None, overrides: list[str], shape: ModelShape, cluster: Cluster, assume: Assumptions
) -> list[str]:
    """Changes that make the plan fit, each verified by planning again: up to three single overrides, else one
    chain of overrides (space-separated) built greedily from the candidates, else more nodes."""
    cfg = load_config(config_path, overrides)
    candidates = candidate_fixes(cfg, shape, cluster)
    singles = [
        fix for fix in candidates if _badness(config_path, [*overrides, fix], shape, cluster, assume) == 0
    ]
    if singles:
        return singles[:3]
    chain: dict[str, str] = {}  # key -> override, so a later value of the same key replaces the earlier
    best = _badness(config_path, overrides, shape, cluster, assume)
    for fix in candidates:
        trial = {**chain, fix.partition("=")[0]: fix}
        badness = _badness(config_path, [*overrides, *trial.values()], shape, cluster, assume)
        if badness < best:
            chain, best = trial, badness
        if best == 0:
            return [" ".join(chain.values())]
    for factor in (2, 4, 8):
        bigger = dataclasses.replace(cluster, nodes=cluster.nodes * factor)
        if _badness(config_path, overrides, shape, bigger, assume) == 0:
            return [f"--nodes {bigger.nodes} (sbatch --nodes={bigger.nodes})"]
    return []


def _badness(
    config_path: str | None, overrides: list[str], shape: ModelShape, cluster: Cluster, assume: Assumptions
) -> float:
    """0 when the plan fits; a problem that is not memory outweighs any number of bytes over."""
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError:
        return math.inf
    problems = make_plan(cfg, shape, cluster, assume).problems
    return sum(p.excess_bytes or 1e30 for p in problems)


# ---- report ------------------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """The human-readable table."""
    lines = [_title(plan), "", *_layout_lines(plan)]
    if plan.stages:
        lines += ["", *_memory_table(plan)]
    if plan.rollout is not None:
        lines += ["", *_rollout_lines(plan)]
    if plan.time is not None:
        lines += ["", *_time_lines(plan)]
    lines += ["", "Assumptions (flags of dapo-plan)", *_assumption_lines(plan), ""]
    lines += [f"warning: {w}" for w in plan.warnings]
    if plan.fits:
        return "\n".join([*lines, "FITS"])
    lines += ["DOES NOT FIT", *(f"  - {problem.what}" for problem in plan.problems)]
    if plan.fixes:
        lines += ["Each of these makes it fit (as config overrides):", *(f"  {fix}" for fix in plan.fixes)]
    else:
        lines.append(
            "Neither a change of parallel sizes, recompute, tokens or SGLang memory, nor 8x the nodes fits."
        )
    return "\n".join(lines)


def _title(plan: Plan) -> str:
    c = plan.cluster
    where = "colocated" if plan.layout.colocated else "on dedicated nodes"
    return (
        f"DAPO plan: {plan.shape.name} ({plan.parameters / 1e9:.2f} B parameters) on {c.nodes} node(s) x "
        f"{c.gpus_per_node} GPUs x {c.gpu_memory_gib:g} GiB, rollout {where}"
    )


def _layout_lines(plan: Plan) -> list[str]:
    lay = plan.layout
    grid = f"TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp}"
    lines = [
        "Parallel layout",
        f"  training   {lay.train_gpus} GPUs on {lay.train_nodes} node(s): {grid}, "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'}",
    ]
    if plan.config.rollout.backend != "sglang":
        return [*lines, "  rollout    the CPU engine (rollout.backend=cpu)"]
    where = (
        "on the training GPUs (memory saver)" if lay.colocated else f"on {plan.cluster.rollout_nodes} node(s)"
    )
    return [*lines, f"  rollout    {lay.servers} SGLang server(s) x TP {lay.server_tp} {where}"]


def _memory_table(plan: Plan) -> list[str]:
    cfg, a = plan.config, plan.assumptions
    shards = plan.layout.dp * plan.layout.cp if a.distributed_optimizer else 1
    recompute = "on" if cfg.model.recompute_activations else "off"
    other_recompute = "off" if cfg.model.recompute_activations else "on"
    chunk = cfg.model.logprob_chunk_tokens
    rows = [
        (f"parameters ({cfg.model.dtype})", "parameter_bytes"),
        (f"gradients ({'fp32' if a.grad_fp32 else cfg.model.dtype})", "gradient_bytes"),
        (f"optimizer: fp32 master + Adam, /{shards}", "optimizer_bytes"),
        (f"activations, recompute {recompute}", "activation_bytes"),
        (f"  (recompute {other_recompute} would be)", "activations_other"),
        (f"log-probs, {f'chunks of {chunk}' if chunk else 'plain path'}", "logprob_bytes"),
        (f"  ({'plain path' if chunk else f'chunks of {CHUNK_TOKENS}'} would be)", "logprobs_other"),
        ("reserve", "reserved_bytes"),
        ("total", "total_bytes"),
    ]
    tokens = cfg.train.tokens_per_microbatch
    lines = [
        f"Memory per GPU, GiB ({tokens:,} tokens per micro-batch, {a.kernels} kernels)",
        f"  {'':44}" + "".join(f"{s.stage + ' stage':>14}" for s in plan.stages),
    ]
    for label, attr in rows:
        lines.append(f"  {label:44}" + "".join(f"{getattr(s, attr) / GIB:14.2f}" for s in plan.stages))
    lines.append(f"  {'GPU memory':44}" + f"{plan.cluster.gpu_memory_gib:14.2f}" * len(plan.stages))
    return lines


def _rollout_lines(plan: Plan) -> list[str]:
    r, lay = plan.rollout, plan.layout
    assert r is not None
    pool_gib = max(r.kv_pool_bytes, 0) / GIB
    full, longest = r.full_length_sequences_per_server, r.longest_sequence_tokens
    fraction = plan.config.rollout.mem_fraction
    lines = [
        f"SGLang, per GPU of a TP-{lay.server_tp} server (rollout.mem_fraction={fraction:g})",
        f"  weights {r.weight_bytes / GIB:.1f} GiB, KV-cache pool {pool_gib:.1f} GiB, "
        f"{r.kv_bytes_per_token / 1024:g} KiB per token",
        f"  {r.tokens_per_server:,} tokens per server: {full:,} concurrent {longest:,}-token sequences "
        f"({full * lay.servers:,} in all), {r.mean_length_sequences_per_server:,} at the mean length",
    ]
    if lay.colocated and plan.stages:
        resident = max(s.resident_bytes for s in plan.stages) / GIB
        sglang = fraction * plan.cluster.gpu_memory_gib
        total = resident + sglang + plan.assumptions.reserved_gib
        lines.append(
            f"  during rollout: training state {resident:.1f} + SGLang {sglang:.1f} + reserve "
            f"{plan.assumptions.reserved_gib:g} = {total:.1f} GiB of {plan.cluster.gpu_memory_gib:g}"
        )
    return lines


def _time_lines(plan: Plan) -> list[str]:
    t, c = plan.time, plan.cluster
    assert t is not None
    steps = plan.config.train.steps
    hours = steps * t.step_s / 3600
    return [
        "Time per RL step (estimate; see the assumptions)",
        f"  rollout   {t.rollout_s:8.0f} s  ({t.generated_tokens / 1e6:.1f} M generated tokens)",
        f"  training  {t.training_s:8.0f} s  ({t.trained_tokens / 1e6:.1f} M tokens, "
        f"{t.train_flops_per_token / 1e9:.0f} GFLOP per token with the old-log-prob forward)",
        f"  step      {t.step_s:8.0f} s; {steps} steps: {hours:.0f} h, "
        f"{hours * c.nodes * c.gpus_per_node:,.0f} GPU-hours",
    ]


def _assumption_lines(plan: Plan) -> list[str]:
    a, cfg = plan.assumptions, plan.config
    optimizer = "--distributed-optimizer" if a.distributed_optimizer else "--no-distributed-optimizer"
    grads = "--grad-fp32" if a.grad_fp32 else "--no-grad-fp32"
    derived = "" if a.decode_tokens_per_s_per_gpu else " (32e12 / parameters)"
    unused = "" if cfg.algorithm.dynamic_sampling else " (unused: no dynamic sampling)"
    return [
        f"  --kernels {a.kernels}; {optimizer}; {grads}; --reserved-gib {a.reserved_gib:g}",
        f"  --peak-tflops {a.peak_tflops:g} at --mfu {a.mfu:g}; FLOPs per token: 6N + 6·layers·heads·d·seq",
        f"  --decode-tokens-per-s-per-gpu {a.decode_rate(plan.parameters):,.0f}{derived}; "
        f"--tail-ms-per-token {a.tail_ms_per_token:g}",
        f"  --mean-prompt-tokens {a.mean_prompt_tokens}; --mean-response-fraction "
        f"{a.mean_response_fraction:g} (of {cfg.rollout.max_response_tokens:,}); "
        f"--kept-group-fraction {a.kept_group_fraction:g}{unused}",
        "  not modelled: weight sync, evaluation, SGLang's CUDA graphs",
    ]


# ---- command line ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = Assumptions()
    cluster = Cluster()
    parser = argparse.ArgumentParser(
        prog="dapo-plan",
        description="Per-GPU memory, parallel layout and step time of a DAPO run; exits 1 if it cannot fit",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    parser.add_argument("--config", help="run config YAML (load_config)")
    parser.add_argument(
        "--model",
        help=f"named shape ({', '.join(NAMED_MODELS)}), a config.json or an HF directory; "
        "default: model.hf_path of the config",
    )
    parser.add_argument(
        "--nodes", type=int, default=cluster.nodes, help="nodes in the job, rollout nodes included"
    )
    parser.add_argument("--gpus-per-node", type=int, default=cluster.gpus_per_node)
    parser.add_argument("--gpu-memory-gib", type=float, default=cluster.gpu_memory_gib)
    parser.add_argument(
        "--rollout-nodes", type=int, default=0, help="nodes dedicated to SGLang; 0: colocated"
    )
    group = parser.add_argument_group("assumptions")
    group.add_argument(
        "--kernels",
        choices=["te", "local"],
        default=defaults.kernels,
        help="te: GPU (Transformer Engine, flash attention); local: megatron's local spec (CPU)",
    )
    group.add_argument(
        "--distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=defaults.distributed_optimizer,
    )
    group.add_argument("--grad-fp32", action=argparse.BooleanOptionalAction, default=defaults.grad_fp32)
    for name in (
        "reserved_gib",
        "peak_tflops",
        "mfu",
        "decode_tokens_per_s_per_gpu",
        "tail_ms_per_token",
        "mean_response_fraction",
        "kept_group_fraction",
    ):
        group.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    group.add_argument("--mean-prompt-tokens", type=int, default=defaults.mean_prompt_tokens)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    parser.add_argument("--save-json", metavar="PATH", help="also write the plan as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with exit_on_user_error("dapo-plan", ValueError):  # ValueError: a model shape or cluster it cannot use
        cfg = load_config(args.config, args.overrides)
        shape = load_model_shape(args.model or _model_from_config(cfg))
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.rollout_nodes)
        _check_cluster(cluster)
        assume = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
        _check_assumptions(assume)
    plan = make_plan(cfg, shape, cluster, assume)
    if not plan.fits:
        plan.fixes = find_fixes(args.config, args.overrides, shape, cluster, assume)
    report = plan.to_dict()
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def _model_from_config(cfg: DapoConfig) -> str:
    if not cfg.model.hf_path:
        raise ValueError("no model: pass --model (a named shape or a config.json) or set model.hf_path")
    return cfg.model.hf_path


def _check_cluster(cluster: Cluster) -> None:
    for name in ("nodes", "gpus_per_node"):
        if getattr(cluster, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= cluster.rollout_nodes < cluster.nodes:
        raise ValueError(f"--rollout-nodes must be in [0, --nodes={cluster.nodes})")
    if not 0 < cluster.gpu_memory_gib < math.inf:
        raise ValueError(f"--gpu-memory-gib must be > 0, got {cluster.gpu_memory_gib}")


_FRACTIONS = ("mfu", "mean_response_fraction", "kept_group_fraction")


def _check_assumptions(assume: Assumptions) -> None:
    """Every number is finite and >= 0 (0 means "derive it" where a field says so), fractions in (0, 1]."""
    for name in (f.name for f in dataclasses.fields(Assumptions)):
        value = getattr(assume, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flag = f"--{name.replace('_', '-')}"
        if name in _FRACTIONS and not 0 < value <= 1:
            raise ValueError(f"{flag} must be in (0, 1], got {value}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


if __name__ == "__main__":
    sys.exit(main())
