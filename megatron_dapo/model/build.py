"""Build this rank's pipeline stage of a Megatron GPTModel from a Hugging Face config: Qwen2/2.5, Qwen3, Llama

`build_gpt_model` reads the architecture through model/arch.py and turns it into a TransformerConfig and a
GPTModel: local layer spec (plain PyTorch, our packed/CP attention) without CUDA, Transformer Engine spec with
it.
"""

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dapo.model import compat
from megatron_dapo.model.arch import GPTArch, padded_vocab_size
from megatron_dapo.model.attention import PackedCausalAttention
from megatron_dapo.parallel.state import ParallelDims


def transformer_config(
    arch: GPTArch, dims: ParallelDims, *, params_dtype: torch.dtype, recompute_activations: bool = False
) -> TransformerConfig:
    """megatron TransformerConfig for `arch` split as `dims`; per-token loss mode, no dropout.

    `recompute_activations`: full recompute, one layer at a time (what plan/memory.py models): the forward
    keeps only each layer's input, and the backward re-runs a layer's forward just before its backward.
    """
    arch.check_parallel(dims.tp, dims.pp)
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
        qk_layernorm=arch.qk_layernorm,
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
        recompute_granularity="full" if recompute_activations else None,
        recompute_method="uniform" if recompute_activations else None,
        recompute_num_layers=1 if recompute_activations else None,
    )


def build_gpt_model(
    hf_config: Any,
    dims: ParallelDims,
    pg_collection: ProcessGroupCollection,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute_activations: bool = False,
) -> GPTModel:
    """This rank's pipeline stage of the GPT model described by `hf_config` (megatron's random init)."""
    sizes = (pg_collection.tp.size(), pg_collection.pp.size(), pg_collection.cp.size())
    if sizes != (dims.tp, dims.pp, dims.cp):
        raise ValueError(
            f"process groups have tp/pp/cp sizes {sizes} but dims ask for {dims}: use init_parallel(dims)"
        )
    arch = GPTArch.from_hf_config(hf_config)
    config = transformer_config(
        arch, dims, params_dtype=params_dtype, recompute_activations=recompute_activations
    )
    if torch.cuda.is_available():
        layer_spec = compat.transformer_engine_layer_spec(qk_layernorm=arch.qk_layernorm)
    else:
        layer_spec = compat.local_layer_spec(
            qk_layernorm=arch.qk_layernorm, core_attention=PackedCausalAttention
        )
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    scaling = arch.rope_scaling
    model = GPTModel(
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
    # The local spec's norms (torch.nn.RMSNorm) ignore params_dtype and stay fp32. Every parameter in one
    # dtype, as in Hugging Face's bf16 models and under the TE spec: megatron's distributed optimizer pairs a
    # model that mixes dtypes with the wrong main parameters when it saves or loads its state.
    return model.to(params_dtype)
