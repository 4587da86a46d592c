"""TP/PP/CP/DP runs equal the single-process result: log-probs, entropy, gradients, optimizer steps (fp32).

Each split runs through the real path (packing and micro-batch plan, CP split, megatron's schedules, DDP, the
Megatron optimizer); the reference computes the same loss directly, in one forward and backward, without
schedule, DDP or micro-batches. Models are tiny random Hugging Face checkpoints loaded through hf_mapping;
batches are packed sequences of unequal lengths, several micro-batches per rank.
"""

import pytest
import torch

from megatron_dapo.parallel.state import ParallelDims
from tests.helpers.distributed_pool import DistributedPool
from tests.helpers.model_runs import RunSpec, reference_run, resume_run, split_run
from tests.helpers.tiny_models import (
    LLAMA3_ROPE,
    random_samples,
    save_tiny_checkpoint,
    tiny_config,
    tiny_hf_model,
)

pytestmark = pytest.mark.slow

ATOL = 1e-5
# split name -> (world size, dims, model, memory-bounded training chunk or None)
SPLITS = {
    "tp2": (2, ParallelDims(tp=2), "qwen3", None),
    "pp2": (2, ParallelDims(pp=2), "qwen2-tied", 5),
    "cp2": (2, ParallelDims(cp=2), "llama", 6),
    "dp2": (2, ParallelDims(), "qwen2", None),  # also with megatron's DistributedOptimizer
    "tp2pp2": (4, ParallelDims(tp=2, pp=2), "qwen2-tied", 9),
}
MODELS = {
    "qwen3": tiny_config("qwen3"),
    "qwen2": tiny_config("qwen2"),
    "qwen2-tied": tiny_config("qwen2", tie=True),
    "llama": tiny_config("llama", **LLAMA3_ROPE),
}


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, RunSpec]:
    root = tmp_path_factory.mktemp("tiny_models")
    samples = random_samples(9, seed=11)
    return {
        name: RunSpec(
            hf_dir=save_tiny_checkpoint(tiny_hf_model(config, seed=3), root / name),
            samples=samples,
            tokens_per_microbatch=48,
            chunk_tokens=None,
        )
        for name, config in MODELS.items()
    }


class Runs:
    """Results computed once per module and world size, on first use."""

    def __init__(self, specs):
        self.specs = specs
        self.pools: dict[int, DistributedPool] = {}
        self.cache: dict[str, dict] = {}

    def pool(self, world_size: int) -> DistributedPool:
        if world_size not in self.pools:
            self.pools[world_size] = DistributedPool(world_size)
        return self.pools[world_size]

    def reference(self, model: str, world_size: int) -> dict:
        key = f"reference-{model}"
        if key not in self.cache:
            self.cache[key] = self.pool(world_size).run(reference_run, self.specs[model])[0]
        return self.cache[key]

    def split(self, name: str) -> tuple[list[dict], dict]:
        world_size, dims, model, chunk = SPLITS[name]
        if name not in self.cache:
            spec = self.specs[model]
            spec = RunSpec(
                spec.hf_dir, spec.samples, spec.tokens_per_microbatch, chunk, dims.dp(world_size) > 1
            )
            self.cache[name] = self.pool(world_size).run(split_run, spec, dims)
        return self.cache[name], self.reference(model, world_size)

    def close(self):
        for pool in self.pools.values():
            pool.close()


@pytest.fixture(scope="module")
def runs(specs):
    runs = Runs(specs)
    yield runs
    runs.close()


def merged(rank_results: list[dict], key: str) -> dict:
    out = {}
    for result in rank_results:
        out.update(result[key])
    return out


@pytest.mark.parametrize("split", list(SPLITS))
def test_several_microbatches_per_rank(runs, split):
    results, _ = runs.split(split)
    counts = {r["microbatches"] for r in results}
    assert len(counts) == 1 and counts.pop() >= 2


@pytest.mark.parametrize("path", ["plain", "chunked"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_logprobs_and_entropy_match_single_process(runs, split, path):
    results, reference = runs.split(split)
    for rank_result in results:  # every rank of every DP group returns its group's samples
        got = rank_result[f"logprobs_{path}"]
        for sample, (logprobs, entropy) in got.items():
            want_logprobs, want_entropy = reference["logprobs"][sample]
            torch.testing.assert_close(logprobs, want_logprobs, atol=ATOL, rtol=0)
            torch.testing.assert_close(entropy, want_entropy, atol=ATOL, rtol=0)
    covered = set().union(*(r[f"logprobs_{path}"] for r in results))
    assert covered == set(reference["logprobs"])


@pytest.mark.parametrize("split", list(SPLITS))
def test_gradients_match_single_process(runs, split):
    results, reference = runs.split(split)
    step = results[0]["sgd_step"]
    assert step.applied
    assert step.grad_norm == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert step.loss == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    # The step clipped the gradients in place by CLIP_GRAD / norm.
    scale = min(1.0, 0.05 / (reference["grad_norm"] + 1e-6))
    grads = merged(results, "grads")
    assert set(grads) == set(reference["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, scale * reference["grads"][name], atol=ATOL * scale, rtol=1e-5, msg=name
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_optimizer_step_matches_single_process(runs, split, optimizer):
    results, reference = runs.split(split)
    params = merged(results, f"{optimizer}_params")
    atol = 1e-6 if optimizer == "sgd" else ATOL
    for name, value in params.items():
        torch.testing.assert_close(value, reference[f"{optimizer}_params"][name], atol=atol, rtol=0, msg=name)


def test_distributed_optimizer_step_matches_single_process(runs):
    results, reference = runs.split("dp2")
    assert results[0]["adam-distributed_step"].applied
    for name, value in merged(results, "adam-distributed_params").items():
        torch.testing.assert_close(value, reference["adam_params"][name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distributed_optimizer_resumes_exactly(runs, specs, tmp_path, dtype):
    """DP=2: save, reload (CPU: the 'dp_reshardable' format), continue: the uninterrupted run, bit for bit."""
    for rank_result in runs.pool(2).run(resume_run, specs["qwen2"], dtype, tmp_path):
        uninterrupted, resumed = rank_result["uninterrupted"], rank_result["resumed"]
        assert resumed.keys() == uninterrupted.keys()
        steps = {value.item() for key, value in resumed.items() if key.endswith(".step")}
        assert steps == {4.0}  # every parameter's own Adam step count
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), key
