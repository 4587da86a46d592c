"""How the loop reports a step's updates: skipped (non-finite) updates are counted and left out of the
averages; token metrics are pooled over the applied updates."""

import math

import pytest

from megatron_dapo.trainer.policy.role import update_metrics as _update_metrics
from megatron_dapo.trainer.policy.train_step import StepResult


def result(applied: bool, loss: float, grad_norm: float, tokens: float, entropy_sum: float) -> StepResult:
    sums = {"tokens": tokens, "entropy_sum": entropy_sum, "clip_upper_tokens": 1.0, "clip_lower_tokens": 0.0}
    return StepResult(applied=applied, loss=loss, grad_norm=grad_norm, metrics=sums)


def test_skipped_updates_are_counted_and_left_out():
    results = [
        result(True, 0.5, 2.0, tokens=10, entropy_sum=3.0),
        result(False, math.nan, math.inf, tokens=5, entropy_sum=math.nan),
        result(True, 1.5, 4.0, tokens=30, entropy_sum=5.0),
    ]
    metrics = _update_metrics(results, lr=1e-4)
    assert metrics["updates"] == 3 and metrics["updates_skipped"] == 1
    assert metrics["loss"] == pytest.approx(1.0) and metrics["grad_norm"] == pytest.approx(3.0)
    assert metrics["entropy"] == pytest.approx(8.0 / 40)  # pooled over tokens, not averaged per update
    assert metrics["clip_fraction_upper"] == pytest.approx(2 / 40)
    assert metrics["lr"] == 1e-4


def test_a_step_whose_updates_were_all_skipped_reports_nan_not_zero():
    metrics = _update_metrics([result(False, math.inf, math.nan, tokens=5, entropy_sum=1.0)], lr=1e-4)
    assert metrics["updates_skipped"] == 1
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert "entropy" not in metrics
