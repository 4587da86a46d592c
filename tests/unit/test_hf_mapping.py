"""The Megatron <-> Hugging Face mapping against independent constructions on tiny random HF models."""

import pytest
import torch
import transformers

from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.hf_mapping import (
    HFMapping,
    Layout,
    canonical_name,
    checkpoint_key,
    layers_of_stage,
    merge_tp,
    split_tp,
    to_global_name,
)

CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
}


def tiny_config(model_type: str, *, groups: int = 2, tie: bool = False) -> transformers.PretrainedConfig:
    extra = {"head_dim": 12} if model_type == "qwen3" else {}  # Qwen3's head_dim differs from hidden / heads
    return CONFIGS[model_type](
        vocab_size=101,  # odd on purpose: padding is never a no-op
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=groups,
        tie_word_embeddings=tie,
        **extra,
    )


def tiny_hf_state(config: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Norm weights start at one: randomise them too, so a swapped norm would be caught.
    return {name: torch.randn_like(t) for name, t in model.state_dict().items()}


def reference_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's fused QKV written out row block by row block, as the attention reads it."""
    rows = []
    for g in range(groups):
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            rows.append(q[h * head_dim : (h + 1) * head_dim])
        rows.append(k[g * head_dim : (g + 1) * head_dim])
        rows.append(v[g * head_dim : (g + 1) * head_dim])
    return torch.cat(rows)


def reference_shards(
    entry, hf: list[torch.Tensor], dims: GPTArch, tp: int, padded: int
) -> list[torch.Tensor]:
    """Each TP rank's shard built from the rank's own slice of the HF tensors, never from a fused tensor."""
    shards = []
    for r in range(tp):
        if entry.layout is Layout.QKV:
            qpg, d = dims.num_attention_heads // dims.num_query_groups, dims.head_dim
            g0, g1 = r * dims.num_query_groups // tp, (r + 1) * dims.num_query_groups // tp
            q, k, v = hf[0][g0 * qpg * d : g1 * qpg * d], hf[1][g0 * d : g1 * d], hf[2][g0 * d : g1 * d]
            shards.append(reference_qkv(q, k, v, (g1 - g0) * qpg, g1 - g0, d))
        elif entry.layout is Layout.GATE_UP:
            n = dims.ffn_hidden_size // tp
            shards.append(torch.cat([hf[0][r * n : (r + 1) * n], hf[1][r * n : (r + 1) * n]]))
        elif entry.layout is Layout.ROW:
            n = hf[0].shape[1] // tp
            shards.append(hf[0][:, r * n : (r + 1) * n])
        elif entry.layout is Layout.VOCAB:
            n = padded // tp
            rows = torch.zeros(padded, dims.hidden_size)
            rows[: dims.vocab_size] = hf[0]
            shards.append(rows[r * n : (r + 1) * n])
        else:
            shards.append(hf[0])
    return shards


CASES = [
    ("qwen2", 2, False),
    ("qwen2", 1, True),
    ("qwen3", 2, True),
    ("qwen3", 4, False),
    ("llama", 1, False),
    ("llama", 4, True),
]


@pytest.mark.parametrize(("model_type", "groups", "tie"), CASES)
def test_every_tensor_matches_reference_and_round_trips(model_type, groups, tie):
    config = tiny_config(model_type, groups=groups, tie=tie)
    hf_state = tiny_hf_state(config)
    mapping = HFMapping(GPTArch.from_hf_config(config))
    dims = mapping.dims

    covered = [name for entry in mapping.tensors for name in entry.hf]
    assert sorted(covered) == sorted(n for n in hf_state if not (tie and n == "lm_head.weight"))

    for tp in (1, 2, groups):
        if groups % tp:
            continue
        padded = 104 * tp  # 101 real rows, then padding: 104 rows per TP rank
        for entry in mapping.tensors:
            hf = [hf_state[n] for n in entry.hf]
            shards = mapping.to_megatron(entry, hf, tp_size=tp, padded_vocab_size=padded)
            expected = reference_shards(entry, hf, dims, tp, padded)
            assert len(shards) == tp
            for got, want in zip(shards, expected, strict=True):
                assert torch.equal(got, want), (entry.megatron, tp)
            back = mapping.to_hf(entry, shards)
            assert [n for n, _ in back] == list(entry.hf)
            for (_, got), want in zip(back, hf, strict=True):
                assert torch.equal(got, want), (entry.megatron, tp)


def test_megatron_shapes_follow_config():
    config = tiny_config("qwen3", groups=2)
    mapping = HFMapping(GPTArch.from_hf_config(config))
    hf_state = tiny_hf_state(config)
    for entry in mapping.tensors:
        (full,) = mapping.to_megatron(entry, [hf_state[n] for n in entry.hf], padded_vocab_size=128)
        assert tuple(full.shape) == mapping.megatron_shape(entry, 128), entry.megatron
    qkv = mapping.get("decoder.layers.1.self_attention.linear_qkv.weight")
    assert mapping.megatron_shape(qkv) == ((4 + 2 * 2) * 12, 32)


def test_tied_output_layer_reads_embedding_and_is_never_written_back():
    config = tiny_config("qwen2", tie=True)
    mapping = HFMapping(GPTArch.from_hf_config(config))
    assert "output_layer.weight" not in [e.megatron for e in mapping.tensors]
    entry = mapping.get("output_layer.weight")
    assert entry.tied_copy and entry.hf == ("model.embed_tokens.weight",)
    emb = torch.randn(101, 32)
    shards = mapping.to_megatron(entry, [emb], tp_size=2, padded_vocab_size=128)
    assert torch.equal(torch.cat(shards)[:101], emb)
    assert mapping.to_hf(entry, shards) == []
    assert mapping.for_hf("lm_head.weight") is None


def test_dtype_cast_both_ways():
    mapping = HFMapping(GPTArch.from_hf_config(tiny_config("llama")))
    entry = mapping.get("decoder.layers.0.mlp.linear_fc1.weight")
    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    (full,) = mapping.to_megatron(entry, [gate, up], dtype=torch.bfloat16)
    assert full.dtype == torch.bfloat16
    back = mapping.to_hf(entry, [full], dtype=torch.float32)
    assert torch.equal(back[0][1], gate.bfloat16().float())


def test_names_of_te_spec_wrappers_and_checkpoint_keys():
    mapping = HFMapping(GPTArch.from_hf_config(tiny_config("qwen3")))
    te_norm = "module.module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_name(te_norm) == "decoder.layers.1.input_layernorm.weight"
    assert mapping.get(te_norm).hf == ("model.layers.1.input_layernorm.weight",)
    fc1_norm = mapping.get("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")
    assert fc1_norm.hf == ("model.layers.0.post_attention_layernorm.weight",)
    assert checkpoint_key(fc1_norm) == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert checkpoint_key(mapping.get("decoder.layers.1.self_attention.q_layernorm.weight")) == (
        "decoder.layers.self_attention.q_layernorm.weight"
    )
    assert checkpoint_key(mapping.get("output_layer.weight")) == "output_layer.weight"
    assert mapping.for_hf("model.layers.1.self_attn.k_proj.weight").megatron == (
        "decoder.layers.1.self_attention.linear_qkv.weight"
    )
    assert mapping.for_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_pipeline_stage_layer_indices():
    assert list(layers_of_stage(8, 4, 2)) == [4, 5]
    assert (
        to_global_name("decoder.layers.1.mlp.linear_fc2.weight", 8, 4, 3)
        == "decoder.layers.7.mlp.linear_fc2.weight"
    )
    assert to_global_name("module.output_layer.weight", 8, 4, 3) == "output_layer.weight"
    with pytest.raises(ValueError, match="does not divide num_layers=6"):
        layers_of_stage(6, 4, 0)


def test_gate_up_split_merge_is_per_half():
    full = torch.arange(8 * 3).reshape(8, 3)  # gate rows 0-3, up rows 4-7
    shards = split_tp(Layout.GATE_UP, full, 2)
    assert shards[0][:, 0].tolist() == [0, 3, 12, 15]  # gate rows 0-1, then up rows 4-5
    assert torch.equal(merge_tp(Layout.GATE_UP, shards), full)


def test_tp_shards_never_split_a_query_group():
    mqa = HFMapping(GPTArch.from_hf_config(tiny_config("llama", groups=1)))
    qkv = mqa.get("decoder.layers.0.self_attention.linear_qkv.weight")
    with pytest.raises(ValueError, match="does not divide num_key_value_heads=1"):
        mqa.to_megatron(qkv, [torch.randn(32, 32), torch.randn(8, 32), torch.randn(8, 32)], tp_size=2)


def test_weight_shape_mismatch_names_the_tensor():
    mapping = HFMapping(GPTArch.from_hf_config(tiny_config("qwen2")))
    entry = mapping.get("decoder.layers.0.self_attention.linear_proj.weight")
    with pytest.raises(ValueError, match=r"config/weights mismatch: model.layers.0.self_attn.o_proj.weight"):
        mapping.to_megatron(entry, [torch.randn(32, 16)])
