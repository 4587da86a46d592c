"""Configs that cannot work fail at start with a message naming what to change; the vocabulary is padded."""

import pytest
import torch

from megatron_dapo.model.build import gpt_arch, padded_vocab_size, transformer_config
from megatron_dapo.parallel.state import ParallelDims
from tests.parallel.tiny_models import tiny_config


def arch(**overrides):
    config = tiny_config("qwen2", **overrides).to_dict()
    return gpt_arch(config)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (ParallelDims(tp=3), "num_attention_heads=4 is not divisible by parallel.tp=3"),
        (ParallelDims(tp=4), "num_key_value_heads=2 is not divisible by parallel.tp=4"),
        (ParallelDims(pp=3), "num_hidden_layers=2 is not divisible by parallel.pp=3"),
    ],
)
def test_model_that_does_not_split_is_refused(dims, message):
    with pytest.raises(ValueError, match=message):
        transformer_config(arch(), dims, params_dtype=torch.float32)


def test_world_size_must_be_a_multiple_of_the_model_parallel_size():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp\\*cp = 2\\*2\\*1 = 4"):
        ParallelDims(tp=2, pp=2).dp(6)
    assert ParallelDims(tp=2, cp=2).dp(8) == 2


def test_sequence_parallel_is_refused_on_cpu():
    with pytest.raises(ValueError, match=r"set parallel\.sequence_parallel=false on CPU"):
        ParallelDims(tp=2, sequence_parallel=True).validate(2)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_vocabulary_is_padded_to_a_multiple_of_tp(tp):
    padded = padded_vocab_size(97, tp)
    assert padded >= 97 and padded % tp == 0 and padded % 128 == 0


def test_padded_size_is_the_same_for_every_power_of_two_tp():
    assert {padded_vocab_size(151_936, tp) for tp in (1, 2, 4, 8)} == {151_936}


def test_architecture_fields_are_read_from_each_family():
    qwen3 = gpt_arch(tiny_config("qwen3"))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias) == (12, True, False)
    qwen2 = gpt_arch(tiny_config("qwen2", tie=True))
    assert (qwen2.head_dim, qwen2.qkv_bias, qwen2.tie_word_embeddings) == (8, True, True)
    llama = gpt_arch(tiny_config("llama", rope_theta=500000.0))
    assert (llama.rope_theta, llama.num_query_groups, llama.norm_eps) == (500000.0, 2, 1e-5)


def test_transformers_4_config_json_fields_are_read():
    """config.json written by transformers 4: rope_theta and rope_scaling at top level."""
    config = tiny_config("llama").to_dict()
    config.pop("rope_parameters")
    config.update(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0})
    llama = gpt_arch(config)
    assert llama.rope_theta == 123.0
    assert (llama.rope_scaling.kind, llama.rope_scaling.factor) == ("linear", 2.0)


def test_llama3_scaling_with_other_band_limits_is_refused():
    config = tiny_config(
        "llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    with pytest.raises(ValueError, match="low_freq_factor"):
        gpt_arch(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "gpt2", "model_type='gpt2' is not supported"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope type 'yarn' is not supported"),
        ("hidden_act", "gelu", "only 'silu'"),
        ("use_sliding_window", True, "use_sliding_window"),
        ("hidden_size", None, "config.json lacks hidden_size"),
    ],
)
def test_unsupported_configs_are_rejected(field, value, message):
    config = tiny_config("qwen2").to_dict()
    config.pop("rope_parameters")
    if value is None:
        del config[field]
    else:
        config[field] = value
    with pytest.raises(ValueError, match=message):
        gpt_arch(config)
