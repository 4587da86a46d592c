"""The one reader of a Hugging Face config.json: the architecture facts of Qwen2/2.5, Qwen3 and Llama models.

`GPTArch.from_hf_config` reads a config (a config.json dict, or a `PretrainedConfig`; transformers 4 or 5
field names), fills what config.json leaves out with the transformers class defaults (what Hugging Face
itself would use), and rejects what the Megatron model would compute differently. The model builder, the
checkpoint mapping, the converters and the planner all read configs through it; it imports neither megatron
nor torch, so the planner and the converters stay light.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
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
    """The architecture fields megatron and the checkpoint mapping need, normalised across model families."""

    model_type: str  # "llama", "qwen2" or "qwen3"
    vocab_size: int  # the true vocabulary, without Megatron's padding
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int  # channels per attention head (Qwen3 sets it apart from hidden_size // heads)
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool  # Qwen2/2.5 have q/k/v biases
    qk_layernorm: bool  # Qwen3 normalises queries and keys per head
    tie_word_embeddings: bool
    max_position_embeddings: int
    init_std: float

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "GPTArch":
        """Read a config.json dict or a `PretrainedConfig`; reject what we cannot build."""
        cfg = _with_class_defaults(hf_config)
        model_type = cfg["model_type"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU) is supported"
            )
        if cfg.get("use_sliding_window"):
            raise ValueError(
                "config.json use_sliding_window=true is not supported: sliding-window attention is absent"
            )
        if cfg.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true is not supported (Megatron's MLP here has no biases)")
        if model_type != "qwen2" and cfg.get("attention_bias"):
            raise ValueError(
                f"config.json attention_bias=true is not supported for {model_type} (an o_proj bias): only "
                "Qwen2's q/k/v biases are"
            )
        heads = cfg["num_attention_heads"]
        groups = cfg.get("num_key_value_heads") or heads
        if heads % groups:
            raise ValueError(
                f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}"
            )
        rope = _rope_parameters(cfg)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            ffn_hidden_size=cfg["intermediate_size"],
            norm_eps=cfg["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(rope),
            qkv_bias=model_type == "qwen2",
            qk_layernorm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg["max_position_embeddings"],
            init_std=cfg.get("initializer_range", 0.02),
        )

    def parallel_problems(self, tp: int, pp: int = 1) -> list[str]:
        """Why megatron cannot split this model over TP=`tp` x PP=`pp`, each saying which sizes would work."""
        tp_split = {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "intermediate_size": self.ffn_hidden_size,
        }
        if tp < 1 or pp < 1:  # a negative size would divide everything, zero nothing
            return [f"parallel sizes must be at least 1, got tensor {tp} and pipeline {pp} (--tp/--pp)"]
        problems = []
        undivided = [f"{name}={value}" for name, value in tp_split.items() if value % tp]
        if undivided:
            valid = _divisors(math.gcd(*tp_split.values()))
            problems.append(
                f"tensor parallel size {tp} does not divide {', '.join(undivided)} of config.json: set "
                f"parallel.tensor (--tp when converting) to one of {valid}"
            )
        if self.num_layers % pp:
            problems.append(
                f"pipeline parallel size {pp} does not divide num_hidden_layers={self.num_layers} of "
                "config.json: set parallel.pipeline (--pp when converting) to one of "
                f"{_divisors(self.num_layers)}"
            )
        return problems

    def check_parallel(self, tp: int, pp: int = 1) -> None:
        """Fail at start, saying what to change, when the model cannot be split as asked."""
        problems = self.parallel_problems(tp, pp)
        if problems:
            raise ValueError("; ".join(problems))


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rows in the Megatron model: a multiple of lcm(128, tp) (extra rows are never predicted)."""
    multiple = math.lcm(_VOCAB_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def _with_class_defaults(hf_config: Any) -> dict[str, Any]:
    """The config as a dict, every field the transformers class defines filled in (config.json written by
    `save_pretrained` leaves defaults out: Qwen3's head_dim of 128, for one, differs from hidden / heads)."""
    is_dict = isinstance(hf_config, Mapping)
    model_type = hf_config.get("model_type") if is_dict else getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = (
            hf_config.get("architectures") if is_dict else getattr(hf_config, "architectures", None)
        )
        raise ValueError(
            f"unknown architecture: config.json has model_type={model_type!r} "
            f"(architectures={architectures}); supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not is_dict:
        return hf_config.to_dict()
    from transformers import AutoConfig  # imports torch: only when a dict is read

    fields = {key: value for key, value in hf_config.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception as error:  # transformers' validators raise several exception types
        raise ValueError(f"config.json is invalid for model_type={model_type!r}: {error}") from error


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x configs use rope_theta + rope_scaling."""
    if cfg.get("rope_parameters"):
        return dict(cfg["rope_parameters"])
    params = dict(cfg.get("rope_scaling") or {})
    if cfg.get("rope_theta") is not None:
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
