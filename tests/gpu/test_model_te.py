"""The GPU path: Transformer Engine layer spec and attention (THD packing, CP), NCCL, bf16 parameters.

The checks of tests/unit/test_model_hf.py and tests/parallel/test_model_parallel.py, run through the same
functions on two GPUs. TE's packed-sequence attention runs in bf16/fp16 only, so tolerances are bf16's: a
mapping or layout error moves log-probs by O(1), far beyond them.
"""

import pytest
import torch

from megatron_dapo.parallel.state import ParallelDims
from tests.helpers.distributed_pool import DistributedPool
from tests.helpers.model_runs import TEMPERATURE, RunSpec, reference_run, split_run
from tests.helpers.tiny_models import (
    hf_response_logprobs,
    random_samples,
    save_tiny_checkpoint,
    tiny_config,
    tiny_hf_model,
)

pytestmark = pytest.mark.gpu(2)

VS_HF_FP32 = 0.1  # bf16 Megatron against the fp32 Hugging Face model
VS_SINGLE_GPU = 5e-2  # bf16 at a split against bf16 on one GPU
MODELS = {
    "qwen2": tiny_config("qwen2", tie=True),
    "qwen3": tiny_config("qwen3", head_dim=16),  # TE's fused attention wants head_dim % 8 == 0
    "llama": tiny_config("llama", rope_theta=500000.0),
}
SPLITS = {
    "tp2": ParallelDims(tp=2),
    "pp2": ParallelDims(pp=2),
    "cp2": ParallelDims(cp=2),
    "dp2": ParallelDims(),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_models")
    samples = random_samples(9, seed=21)
    hf_models = {name: tiny_hf_model(config, seed=7) for name, config in MODELS.items()}
    specs = {
        name: RunSpec(save_tiny_checkpoint(model, root / name), samples, 48, 8, params_dtype=torch.bfloat16)
        for name, model in hf_models.items()
    }
    with DistributedPool(2, backend="nccl") as pool:
        references = {name: pool.run(reference_run, spec)[0] for name, spec in specs.items()}
        yield pool, specs, hf_models, references


@pytest.mark.parametrize("model", list(MODELS))
def test_single_gpu_logprobs_match_hf(setup, model):
    _, specs, hf_models, references = setup
    with torch.no_grad():
        for index, sample in enumerate(specs[model].samples):
            want_logprobs, want_entropy = hf_response_logprobs(hf_models[model], sample, TEMPERATURE)
            logprobs, entropy = references[model]["logprobs"][index]
            torch.testing.assert_close(logprobs.float(), want_logprobs, atol=VS_HF_FP32, rtol=0)
            torch.testing.assert_close(entropy.float(), want_entropy, atol=VS_HF_FP32, rtol=0)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("split", list(SPLITS))
def test_split_matches_single_gpu(setup, split, model):
    pool, specs, _, references = setup
    results = pool.run(split_run, specs[model], SPLITS[split])
    reference = references[model]
    for path in ("plain", "chunked"):
        for result in results:
            for sample, (logprobs, entropy) in result[f"logprobs_{path}"].items():
                want_logprobs, want_entropy = reference["logprobs"][sample]
                torch.testing.assert_close(
                    logprobs.float(), want_logprobs.float(), atol=VS_SINGLE_GPU, rtol=0
                )
                torch.testing.assert_close(entropy.float(), want_entropy.float(), atol=VS_SINGLE_GPU, rtol=0)
    step = results[0]["sgd_step"]
    assert step.applied
    assert step.grad_norm == pytest.approx(reference["grad_norm"], rel=5e-2)
    scale = min(1.0, 0.05 / (reference["grad_norm"] + 1e-6))
    grads = {}
    for result in results:
        grads.update(result["grads"])
    for name, grad in grads.items():
        want = scale * reference["grads"][name].float()
        torch.testing.assert_close(
            grad.float(), want, atol=5e-2 * want.abs().max().item(), rtol=5e-2, msg=name
        )
