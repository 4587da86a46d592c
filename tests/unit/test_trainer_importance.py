"""The policy role's importance correction on a real tiny policy, with an engine whose weights are partly
stale: train/is_* against a reference from the trainer's weights in Hugging Face, and the correction acting
on the update itself (a rejected sample leaves the gradient)."""

import math

import pytest
import torch

from tests.helpers.policy_steps import MODEL_SEED, engine_model, first_step_metrics, policy_config, step_batch
from tests.helpers.tiny_models import (
    hf_response_logprobs,
    save_tiny_checkpoint,
    single_process_groups,
    tiny_config,
    tiny_hf_model,
)

STALE_SEED = 13
SEQUENCE_MASK = ("algorithm.rollout_is_level=sequence", "algorithm.rollout_is_mode=mask")


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_checkpoint(
        tiny_hf_model(tiny_config("qwen2"), seed=MODEL_SEED), tmp_path_factory.mktemp("tiny")
    )


@pytest.fixture(scope="module")
def batch():
    return step_batch(engine_model(stale_seed=STALE_SEED))


@pytest.fixture(scope="module")
def log_ratios(batch) -> list[list[float]]:
    """log pi_old - log pi_rollout of each sample's tokens, pi_old from the trainer's weights in HF (fp32)."""
    trainer = engine_model()
    with torch.no_grad():
        old = [hf_response_logprobs(trainer, sample)[0] for sample in batch.samples]
    return [(o.double() - r.double()).tolist() for o, r in zip(old, batch.rollout_logprobs, strict=True)]


@pytest.fixture(scope="module")
def uncorrected(groups, hf_dir, batch):
    return first_step_metrics(policy_config(hf_dir), groups, batch)


def test_sequence_mask_rejects_whole_samples_and_changes_the_update(
    groups, hf_dir, batch, log_ratios, uncorrected
):
    cap = 2.5
    metrics = first_step_metrics(
        policy_config(hf_dir, f"algorithm.rollout_is_cap={cap}", *SEQUENCE_MASK), groups, batch
    )
    kept = [1 / cap <= math.exp(math.fsum(sample)) <= cap for sample in log_ratios]
    assert any(kept) and not all(kept)  # the stale engine puts samples on both sides of the band
    tokens = sum(map(len, log_ratios))
    rejected = sum(len(sample) for sample, k in zip(log_ratios, kept, strict=True) if not k)
    assert metrics["is_masked_share"] == pytest.approx(rejected / tokens, abs=1e-12)
    assert metrics["is_weight_mean"] == pytest.approx(1 - rejected / tokens, abs=1e-12)
    # the rejected samples leave the loss: fewer tokens train, and the update differs
    assert metrics["updates_skipped"] == 0
    assert metrics["loss"] != pytest.approx(uncorrected["loss"], rel=1e-3)
    assert metrics["grad_norm"] != pytest.approx(uncorrected["grad_norm"], rel=1e-3)
    assert "is_weight_mean" not in uncorrected  # off by default, and then not logged


def test_a_band_no_sample_fits_leaves_no_gradient(groups, hf_dir, batch):
    overrides = ("algorithm.rollout_is_cap=1.0001", "algorithm.rollout_is_lower=0.9999", *SEQUENCE_MASK)
    metrics = first_step_metrics(policy_config(hf_dir, *overrides), groups, batch)
    assert metrics["is_masked_share"] == 1.0 and metrics["is_weight_mean"] == 0.0
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0  # not NaN: the denominator is clamped


def test_token_truncation_weights_follow_the_reference(groups, hf_dir, batch, log_ratios, uncorrected):
    cap = 1.2
    metrics = first_step_metrics(policy_config(hf_dir, f"algorithm.rollout_is_cap={cap}"), groups, batch)
    weights = [min(math.exp(d), cap) for sample in log_ratios for d in sample]
    assert any(w == cap for w in weights) and any(w < cap for w in weights)
    assert metrics["is_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert metrics["is_masked_share"] == 0.0
    assert metrics["grad_norm"] != pytest.approx(uncorrected["grad_norm"], rel=1e-3)
