"""The sizes of a model that memory and FLOPs depend on, from a named shape or a config.json."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_dapo.model.arch import GPTArch

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
