"""The policy role measures how far the engine's log-probs are from its own pi_old: next to nothing when
the engine holds the trainer's weights, a jump and a warning when one of its tensors is stale. And the first
update of a step, run at pi_old's weights, sees a ratio of exactly 1."""

import logging
import math

import pytest
import torch

from tests.helpers.policy_steps import (
    MODEL_SEED,
    WARN_ABOVE,
    engine_model,
    first_step_metrics,
    policy_config,
    step_batch,
)
from tests.helpers.tiny_models import (
    hf_response_logprobs,
    save_tiny_checkpoint,
    single_process_groups,
    tiny_config,
    tiny_hf_model,
)


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_checkpoint(
        tiny_hf_model(tiny_config("qwen2"), seed=MODEL_SEED), tmp_path_factory.mktemp("tiny")
    )


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_same_weights_agree_and_the_first_update_starts_at_ratio_one(groups, hf_dir, chunk_tokens, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_dapo.train"):
        cfg = policy_config(hf_dir, f"model.logprob_chunk_tokens={chunk_tokens}")
        metrics = first_step_metrics(cfg, groups, step_batch(engine_model()))
    assert metrics["updates"] == 2 and metrics["updates_skipped"] == 0
    assert 0 <= metrics["mismatch_kl"] < 1e-8
    assert metrics["mismatch_logprob_diff_max"] < 1e-4
    assert metrics["mismatch_ratio_outside_share"] == 0
    assert metrics["first_update_ratio_max_abs_dev"] == 0.0  # bit-identical forwards, fp32 on CPU
    assert "mismatch_kl" not in caplog.text


def test_a_stale_tensor_makes_the_mismatch_jump_and_warn(groups, hf_dir, caplog):
    batch = step_batch(engine_model(stale_seed=13))
    with caplog.at_level(logging.WARNING, logger="megatron_dapo.train"):
        metrics = first_step_metrics(policy_config(hf_dir), groups, batch)
    # The reference: the trainer's weights in Hugging Face (fp32), token by token in Python floats.
    trainer = engine_model()
    with torch.no_grad():
        old = [hf_response_logprobs(trainer, sample)[0] for sample in batch.samples]
    diffs = (torch.cat(old).double() - torch.cat(batch.rollout_logprobs).double()).tolist()
    kl = sum(math.exp(d) - 1 - d for d in diffs) / len(diffs)
    assert metrics["mismatch_kl"] > 1e3 * WARN_ABOVE
    assert metrics["mismatch_kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["mismatch_logprob_diff_mean"] == pytest.approx(sum(map(abs, diffs)) / len(diffs), rel=1e-4)
    assert metrics["mismatch_logprob_diff_max"] == pytest.approx(max(map(abs, diffs)), rel=1e-4)
    assert metrics["first_update_ratio_max_abs_dev"] == 0.0  # pi_old is the trainer's own: unaffected
    warnings = [r.getMessage() for r in caplog.records if "train/mismatch_kl" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 1: ")
    assert f"{metrics['mismatch_kl']:.3g}" in warnings[0]
