"""A training step applies a finite update and skips (and reports) one with a non-finite loss or gradient;
with activation recompute it gives the same update while keeping fewer tensors for backward."""

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_dapo.data.packing import pack
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.model.training import setup_training
from megatron_dapo.parallel.state import ParallelDims
from megatron_dapo.trainer.policy.train_step import train_step
from tests.helpers.model_runs import WeightedLogprobObjective
from tests.helpers.tiny_models import random_samples, single_process_groups, tiny_config, tiny_hf_model


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


POISONS = {
    "nan-loss-and-grad": lambda loss: loss * float("nan"),
    "inf-loss-and-grad": lambda loss: loss * float("inf"),
    "inf-loss-finite-grad": lambda loss: loss + float("inf"),  # only the loss check can catch this one
}


class PoisonedObjective(WeightedLogprobObjective):
    """The weighted log-prob loss, poisoned on the micro-batch holding sample 0."""

    def __init__(self, poison):
        self.poison = poison

    def token_loss(self, batch, logprobs, entropy, tokens):
        loss = super().token_loss(batch, logprobs, entropy, tokens)
        return self.poison(loss) if 0 in batch.sample_ids else loss


def step(groups, objective, chunk_tokens=None):
    config = tiny_config("qwen2")
    model = build_gpt_model(config, ParallelDims(), groups)
    load_hf_weights(model, config, tiny_hf_model(config).state_dict().__getitem__, groups)
    ddp, optimizer = setup_training(model, OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    samples = random_samples(4, seed=5)
    batches = [pack(samples, [0, 1]), pack(samples, [2, 3])]
    distribution = TokenDistribution(config.vocab_size, 1.0, chunk_tokens)
    result = train_step(ddp, optimizer, batches, objective, distribution, groups)
    changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    return result, changed


@pytest.mark.parametrize("chunk_tokens", [None, 8])
def test_finite_step_is_applied(groups, chunk_tokens):
    result, changed = step(groups, WeightedLogprobObjective(), chunk_tokens)
    assert result.applied and changed
    assert result.metrics["denominator"] > 0
    assert torch.isfinite(torch.tensor([result.loss, result.grad_norm])).all()


@pytest.mark.parametrize("poison", list(POISONS))
def test_non_finite_step_is_skipped_and_reported(groups, poison):
    result, changed = step(groups, PoisonedObjective(POISONS[poison]), chunk_tokens=8)
    assert not result.applied
    assert not changed
    assert not torch.isfinite(torch.tensor(result.loss))


def recompute_step(groups, recompute: bool, chunk_tokens):
    """(step result, gradients, tensors saved for backward by one forward) of the tiny model."""
    config = tiny_config("qwen2")
    model = build_gpt_model(config, ParallelDims(), groups, recompute_activations=recompute)
    load_hf_weights(model, config, tiny_hf_model(config).state_dict().__getitem__, groups)
    samples = random_samples(4, seed=5)
    batch = pack(samples, [0, 1, 2, 3])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(batch.tokens[None], batch.positions[None], None, packed_seq_params=batch.packed_seq_params())
    ddp, optimizer = setup_training(model, OptimizerConfig(optimizer="sgd", lr=1e-2, clip_grad=0.0), groups)
    distribution = TokenDistribution(config.vocab_size, 0.7, chunk_tokens)
    batches = [pack(samples, [0, 1]), pack(samples, [2, 3])]
    result = train_step(ddp, optimizer, batches, WeightedLogprobObjective(), distribution, groups)
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    return result, grads, len(saved)


@pytest.mark.parametrize("chunk_tokens", [None, 8])
def test_recompute_gives_the_same_step_and_saves_fewer_tensors(groups, chunk_tokens):
    plain, plain_grads, plain_saved = recompute_step(groups, False, chunk_tokens)
    recomputed, grads, saved = recompute_step(groups, True, chunk_tokens)
    assert recomputed.applied and recomputed.loss == pytest.approx(plain.loss, rel=1e-6)
    assert recomputed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Recompute keeps each layer's inputs instead of every intermediate of the layer.
    assert saved < plain_saved / 2
