"""Tiny random Hugging Face checkpoints, packed batches and reference log-probs for the model, conversion and
engine tests (single- and multi-process; the engine checks run against real SGLang servers too, tests/gpu)."""

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from megatron.core.process_groups_config import ProcessGroupCollection
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_dapo.data.packing import Sample
from megatron_dapo.demo.tokenizer import save_demo_tokenizer
from megatron_dapo.parallel.state import ParallelDims, destroy_parallel, init_parallel
from megatron_dapo.rollout.launcher import free_port

VOCAB_SIZE = 97  # odd: the Megatron vocabulary is always padded
TINY_VOCAB_SIZE = 64  # save_tiny_qwen2's: one token "t<i>" per id
CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
}


# Llama 3.x's RoPE scaling, the one megatron-core implements (model/arch.py).
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def tiny_config(
    model_type: str, *, tie: bool = False, layers: int = 2, **extra
) -> transformers.PretrainedConfig:
    """Two query heads per KV head (GQA), and for Qwen3 a head_dim apart from hidden_size / heads."""
    if model_type == "qwen3":
        extra.setdefault("head_dim", 12)
    return CONFIGS[model_type](
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **extra,
    )


def tiny_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A random fp32 model with every tensor random, norms and biases included (so none can be mixed up)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model.eval()


def save_tiny_checkpoint(model: transformers.PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_hf_model(
    out_dir: Path,
    model_type: str,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    shard_size: str = "",
) -> Path:
    """A random 4-layer GQA model (4 heads, 2 groups) plus the demo tokenizer, saved by `save_pretrained`."""
    extra = {"head_dim": 12} if model_type == "qwen3" else {}
    config = CONFIGS[model_type](
        vocab_size=110,  # not a multiple of 128: the Megatron side is padded
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(hash((model_type, tie)) % 2**31)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # norms start at one: randomise every tensor so that no swap goes unnoticed
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(out_dir, **({"max_shard_size": shard_size} if shard_size else {}))
    save_demo_tokenizer(out_dir)
    return out_dir


def save_tiny_qwen2(directory: str | Path, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A random 2-layer Qwen2 (fp32) and a word-level tokenizer ("t0" ... "t63"), saved for from_pretrained.

    Neither the config nor the tokenizer names an EOS token, so generation stops only on the request's
    stop_token_ids or its length limit.
    """
    directory = Path(directory)
    config = transformers.Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    vocab = {f"t{index}": index for index in range(TINY_VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(directory)
    return directory


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory, whatever its sharding."""
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def random_samples(count: int, seed: int, *, min_len: int = 5, max_len: int = 40) -> list[Sample]:
    """Sequences of unequal lengths, each with a prompt of at least one token and a response."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        tokens = torch.randint(0, VOCAB_SIZE, (length,), generator=generator).tolist()
        start = int(torch.randint(1, length, (1,), generator=generator))
        samples.append(Sample(tokens, start))
    return samples


def hf_response_logprobs(
    model: transformers.PreTrainedModel,
    sample: Sample,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs and entropy of the sample's response tokens under the HF model, in `dtype`."""
    ids = torch.tensor(sample.token_ids)[None]
    logits = model(input_ids=ids).logits[0].to(dtype) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    start = sample.response_start
    tokens = ids[0, start:]
    chosen = logp[start - 1 : -1].gather(1, tokens[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)[start - 1 : -1]
    return chosen, entropy


@torch.inference_mode()
def reference_logprobs(
    model: torch.nn.Module, prompt: Sequence[int], completion: Sequence[int], temperature: float
) -> list[float]:
    """What SGLang returns as output_token_logprobs (greedy requests: T = 1): log softmax(logits / T) of each
    completion token, in float64 so that the reference adds no rounding of its own."""
    sample = Sample(list(prompt) + list(completion), len(prompt))
    return hf_response_logprobs(model, sample, temperature, torch.float64)[0].tolist()


@contextlib.contextmanager
def single_process_groups() -> Iterator[ProcessGroupCollection]:
    """A one-process gloo world with megatron's parallel state, inside the test process (no spawn)."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    try:
        yield init_parallel(ParallelDims())
    finally:
        destroy_parallel()
