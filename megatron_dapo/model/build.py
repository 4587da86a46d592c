"""Build this rank's pipeline stage of a Megatron GPTModel from a Hugging Face config: Qwen2/2.5, Qwen3, Llama

`gpt_arch` reads the architecture from config.json (a dict or a `PretrainedConfig`, transformers 4 or 5 field
names) and rejects what the Megatron model would compute differently; `build_gpt_model` turns it into a
TransformerConfig and a GPTModel: local layer spec (plain PyTorch, our packed/CP attention) without CUDA,
Transformer Engine spec with it.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dapo.model import compat
from megatron_dapo.model.attention import PackedCausalAttention
from megatron_dapo.parallel.state import ParallelDims

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "rms_norm_eps",
)
# megatron's llama3 RoPE scaling fixes these three values (every released Llama 3.x config uses them).
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Padding the vocabulary to a multiple of 128 (and of TP) keeps its padded size the same for every power-of-2
# TP, so a checkpoint reshards across TP without re-padding.
_VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" (positions / factor) or "llama3" (banded inverse frequencies)."""

    kind: str
    factor: float


@dataclass(frozen=True)
class GPTArch:
    """The architecture fields megatron needs, normalised across Qwen2/2.5, Qwen3 and Llama configs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    init_std: float


def gpt_arch(hf_config: Any) -> GPTArch:
    """Read a Hugging Face config (config.json dict, or PretrainedConfig); reject what we cannot build."""
    cfg = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r} is not supported: use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if cfg.get("use_sliding_window"):
        raise ValueError(
            "config.json use_sliding_window=true is not supported: sliding-window attention is absent"
        )
    if cfg.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (Megatron's MLP here has no biases)")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise ValueError("config.json attention_bias=true is not supported: only Qwen2's QKV bias is")
    missing = [key for key in _REQUIRED_FIELDS if key not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: it does not describe a {model_type} model")
    heads = cfg["num_attention_heads"]
    return GPTArch(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        ffn_hidden_size=cfg["intermediate_size"],
        norm_eps=cfg["rms_norm_eps"],
        rope_theta=_rope_parameters(cfg).get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(_rope_parameters(cfg)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        init_std=cfg.get("initializer_range", 0.02),
    )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x configs use rope_theta + rope_scaling."""
    if cfg.get("rope_parameters"):
        return dict(cfg["rope_parameters"])
    params = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        params["rope_theta"] = cfg["rope_theta"]
    return params


def _rope_scaling(params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        differing = {k: params.get(k) for k, v in _MEGATRON_LLAMA3_ROPE.items() if params.get(k, v) != v}
        if differing:
            raise ValueError(
                f"config.json llama3 rope scaling with {differing} is not supported: megatron-core fixes "
                f"{_MEGATRON_LLAMA3_ROPE}"
            )
        return RopeScaling("llama3", float(params["factor"]))
    raise ValueError(
        f"config.json rope type {kind!r} is not supported: use a model without RoPE scaling, or with "
        "'linear' or 'llama3' scaling"
    )


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rows in the Megatron model: a multiple of lcm(128, tp) (extra rows are never predicted)."""
    multiple = math.lcm(_VOCAB_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def check_parallel_fits(arch: GPTArch, dims: ParallelDims) -> None:
    """Fail at start, saying what to change, when the model cannot be split as asked."""
    problems = []
    if arch.num_attention_heads % dims.tp:
        problems.append(
            f"num_attention_heads={arch.num_attention_heads} is not divisible by parallel.tp={dims.tp}"
        )
    if arch.num_query_groups % dims.tp:
        problems.append(
            f"num_key_value_heads={arch.num_query_groups} is not divisible by parallel.tp={dims.tp}"
        )
    if arch.ffn_hidden_size % dims.tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size} is not divisible by parallel.tp={dims.tp}")
    if arch.num_layers % dims.pp:
        problems.append(f"num_hidden_layers={arch.num_layers} is not divisible by parallel.pp={dims.pp}")
    if problems:
        raise ValueError(
            "model does not fit the parallel layout: " + "; ".join(problems) + ": change parallel.tp/pp"
        )


def transformer_config(arch: GPTArch, dims: ParallelDims, *, params_dtype: torch.dtype) -> TransformerConfig:
    """megatron TransformerConfig for `arch` split as `dims`; per-token loss mode, no dropout."""
    check_parallel_fits(arch, dims)
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        sequence_parallel=dims.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # The loss function returns (sum, token count); megatron divides by the global count once.
        calculate_per_token_loss=True,
        # Packed micro-batches differ in length, so pipeline stages exchange shapes first.
        variable_seq_lengths=True,
        # No MoE here; 0.16 nonetheless refuses variable_seq_lengths with its default "allgather" dispatcher.
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not cuda,
        # Fused kernels exist only on GPU; on CPU megatron's plain-PyTorch paths run instead.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=cuda,
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda,
        persist_layer_norm=False,
    )


def build_gpt_model(
    hf_config: Any,
    dims: ParallelDims,
    pg_collection: ProcessGroupCollection,
    *,
    params_dtype: torch.dtype = torch.float32,
) -> GPTModel:
    """This rank's pipeline stage of the GPT model described by `hf_config` (megatron's random init)."""
    sizes = (pg_collection.tp.size(), pg_collection.pp.size(), pg_collection.cp.size())
    if sizes != (dims.tp, dims.pp, dims.cp):
        raise ValueError(
            f"process groups have tp/pp/cp sizes {sizes} but dims ask for {dims}: use init_parallel(dims)"
        )
    arch = gpt_arch(hf_config)
    config = transformer_config(arch, dims, params_dtype=params_dtype)
    if torch.cuda.is_available():
        layer_spec = compat.transformer_engine_layer_spec(qk_layernorm=arch.qk_norm)
    else:
        layer_spec = compat.local_layer_spec(qk_layernorm=arch.qk_norm, core_attention=PackedCausalAttention)
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    scaling = arch.rope_scaling
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(arch.vocab_size, dims.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=scaling is not None and scaling.kind == "llama3",
        rope_scaling_factor=scaling.factor if scaling is not None and scaling.kind == "llama3" else 8.0,
        seq_len_interpolation_factor=scaling.factor
        if scaling is not None and scaling.kind == "linear"
        else None,
        pg_collection=pg_collection,
    )
