"""One rollout step of a real policy role on a tiny random model, with the rollout log-probs from a Hugging
Face twin whose weights may differ from the trainer's: what the mismatch tests run on one rank or several."""

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.checkpoint.hf_dir import read_config
from megatron_dapo.config import load_config
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.policy.role import PolicyRole
from tests.helpers.tiny_models import hf_response_logprobs, random_samples, tiny_config, tiny_hf_model

MODEL_SEED = 3
STALE_TENSOR = "model.layers.1.mlp.down_proj.weight"
WARN_ABOVE = 1e-4


def engine_model(stale_seed: int | None = None):
    """The engine's model: the trainer's weights, but STALE_TENSOR perturbed when `stale_seed` is given."""
    model = tiny_hf_model(tiny_config("qwen2"), seed=MODEL_SEED)
    if stale_seed is not None:
        tensor = model.state_dict()[STALE_TENSOR]
        with torch.no_grad():
            tensor += 0.3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(stale_seed))
    return model


def step_batch(engine, num_samples: int = 8, weight_version: int = 0) -> StepBatch:
    """Random samples, with their rollout log-probs under `engine` (fp32, temperature 1), marked as generated
    by the weights of `weight_version` (0: the first step's own)."""
    samples = random_samples(num_samples, seed=11)
    with torch.no_grad():
        rollout = [hf_response_logprobs(engine, sample)[0].float() for sample in samples]
    return StepBatch(
        samples=samples,
        advantages=torch.randn(num_samples, generator=torch.Generator().manual_seed(12)),
        truncated=torch.zeros(num_samples, dtype=torch.bool),
        rollout_logprobs=rollout,
        weight_versions=torch.full((num_samples,), weight_version, dtype=torch.int64),
    )


def policy_config(hf_dir, *overrides: str):
    return load_config(
        None,
        [
            f"model.hf_path={hf_dir}",
            "model.dtype=float32",
            "rollout.temperature=1.0",
            "data.max_prompt_tokens=24",
            "rollout.max_response_tokens=24",  # random_samples are at most 40 tokens long
            "algorithm.overlong_buffer_tokens=4",
            "train.samples_per_minibatch=4",  # two updates
            "train.tokens_per_microbatch=64",
            f"train.mismatch_kl_warn={WARN_ABOVE:f}",
            "optimizer.lr=0.01",
            "optimizer.warmup_steps=0",
            *overrides,
        ],
    )


def first_step_metrics(cfg, pg: ProcessGroupCollection, batch: StepBatch) -> dict[str, float]:
    """A fresh policy role's first step on `batch` (each data-parallel rank on its share): "train" metrics."""
    role = PolicyRole(cfg, read_config(cfg.model.hf_path), pg, weights=None)
    return role.train(role.shard(batch)[pg.dp.rank()])["train"]
