"""A Megatron model built and loaded from a Hugging Face checkpoint gives the HF model's log-probs (fp32)."""

import pytest
import torch
import transformers

from megatron_dapo.data.packing import pack
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims
from megatron_dapo.trainer.policy.train_step import forward_logprobs
from tests.helpers.tiny_models import (
    LLAMA3_ROPE,
    hf_response_logprobs,
    random_samples,
    single_process_groups,
    tiny_config,
    tiny_hf_model,
)

CASES = {
    "qwen2-untied": tiny_config("qwen2"),
    "qwen2-tied": tiny_config("qwen2", tie=True),
    "qwen3": tiny_config("qwen3"),
    "llama-llama3-rope": tiny_config("llama", **LLAMA3_ROPE),
    "llama-linear-rope": tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_match_hf(groups, case):
    config = CASES[case]
    hf_model = tiny_hf_model(config, seed=1)
    model = build_gpt_model(config, ParallelDims(), groups)
    load_hf_weights(model, config, hf_model.state_dict().__getitem__, groups)
    samples = random_samples(4, seed=2)
    temperature = 0.7
    distribution = TokenDistribution(vocab_size=config.vocab_size, temperature=temperature)
    got = forward_logprobs(model, [pack(samples, [0, 1, 2, 3])], distribution, groups)
    with torch.no_grad():
        for sample, (logprobs, entropy) in zip(samples, got, strict=True):
            want_logprobs, want_entropy = hf_response_logprobs(hf_model, sample, temperature)
            torch.testing.assert_close(logprobs, want_logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(entropy, want_entropy, atol=1e-4, rtol=0)


def test_llama3_rope_frequencies_match_hf(groups):
    """Positions in a test are short; compare the scaled inverse frequencies themselves."""
    config = CASES["llama-llama3-rope"]
    model = build_gpt_model(config, ParallelDims(), groups)
    hf_rope = transformers.AutoModelForCausalLM.from_config(config).model.rotary_emb
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, hf_rope.inv_freq.float(), atol=0, rtol=1e-6)
