"""The one config.json reader: fields of each family, class defaults, refusals and parallel checks that name
the fix, vocabulary padding; and it stays light (no megatron) for the planner and the converters."""

import subprocess
import sys

import pytest

from megatron_dapo.model.arch import GPTArch, padded_vocab_size
from tests.helpers.tiny_models import tiny_config


def test_architecture_fields_are_read_from_each_family():
    qwen3 = GPTArch.from_hf_config(tiny_config("qwen3"))
    assert (qwen3.head_dim, qwen3.qk_layernorm, qwen3.qkv_bias) == (12, True, False)
    qwen2 = GPTArch.from_hf_config(tiny_config("qwen2", tie=True))
    assert (qwen2.head_dim, qwen2.qkv_bias, qwen2.tie_word_embeddings) == (8, True, True)
    llama = GPTArch.from_hf_config(tiny_config("llama", rope_theta=500000.0))
    assert (llama.rope_theta, llama.num_query_groups, llama.norm_eps) == (500000.0, 2, 1e-5)


def test_a_config_object_and_its_json_read_the_same():
    for model_type in ("qwen2", "qwen3", "llama"):
        config = tiny_config(model_type)
        assert GPTArch.from_hf_config(config.to_dict()) == GPTArch.from_hf_config(config)


def test_config_json_without_defaults_takes_the_class_defaults():
    """save_pretrained leaves default values out; Hugging Face then uses the class's, and so must we."""
    qwen2 = GPTArch.from_hf_config(tiny_config("qwen2").to_diff_dict())
    assert qwen2.head_dim == 8 and qwen2.qkv_bias and not qwen2.tie_word_embeddings
    qwen3 = tiny_config("qwen3").to_diff_dict()
    del qwen3["head_dim"]
    assert GPTArch.from_hf_config(qwen3).head_dim == 128  # Qwen3Config's default, not hidden / heads = 8


def test_transformers_4_config_json_fields_are_read():
    """config.json written by transformers 4: rope_theta and rope_scaling at top level."""
    config = tiny_config("llama").to_dict()
    config.pop("rope_parameters")
    config.update(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0})
    llama = GPTArch.from_hf_config(config)
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
        GPTArch.from_hf_config(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "mistral", r"unknown architecture: .* model_type='mistral' \(architectures=\['Qwen2"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope type 'yarn' is not supported"),
        ("hidden_act", "gelu", "only 'silu'"),
        ("use_sliding_window", True, "use_sliding_window"),
        ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ],
)
def test_unsupported_configs_are_rejected(field, value, message):
    config = tiny_config("qwen2", architectures=["Qwen2ForCausalLM"]).to_dict()
    config.pop("rope_parameters")
    config[field] = value
    with pytest.raises(ValueError, match=message):
        GPTArch.from_hf_config(config)


def test_o_proj_bias_is_rejected_outside_qwen2():
    with pytest.raises(ValueError, match="attention_bias=true is not supported for llama"):
        GPTArch.from_hf_config(tiny_config("llama", attention_bias=True))


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, r"tensor parallel size 3 does not divide num_attention_heads=4, num_key_value_heads=2 of"),
        (4, 1, r"does not divide num_key_value_heads=2 of config.json: set parallel.tensor .* \[1, 2\]$"),
        (1, 3, r"pipeline parallel size 3 .* num_hidden_layers=2 .* set parallel.pipeline .* \[1, 2\]$"),
    ],
)
def test_parallel_sizes_that_do_not_split_the_model_name_the_fix(tp, pp, message):
    arch = GPTArch.from_hf_config(tiny_config("qwen2"))
    with pytest.raises(ValueError, match=message):
        arch.check_parallel(tp, pp)
    arch.check_parallel(2, 2)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_vocabulary_is_padded_to_a_multiple_of_tp(tp):
    padded = padded_vocab_size(97, tp)
    assert padded >= 97 and padded % tp == 0 and padded % 128 == 0


def test_padded_size_is_the_same_for_every_power_of_two_tp():
    assert {padded_vocab_size(151_936, tp) for tp in (1, 2, 4, 8)} == {151_936}


def test_planner_and_mapping_import_without_megatron():
    code = (
        "import sys, megatron_dapo.plan, megatron_dapo.model.hf_mapping\n"
        "assert not any(m.split('.')[0] == 'megatron' for m in sys.modules), 'megatron was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
