"""The DAPO algorithm as pure PyTorch functions: advantages, policy loss, overlong shaping, dynamic sampling,
importance correction, metrics. No process groups here: callers pass global counts in."""

from megatron_dapo.algo.advantage import group_advantages
from megatron_dapo.algo.importance import (
    IMPORTANCE_LEVELS,
    IMPORTANCE_MODES,
    ImportanceCorrection,
    importance_metric_sums,
    importance_weights,
)
from megatron_dapo.algo.loss import (
    LOSS_AGGREGATIONS,
    LossAggregation,
    PolicyLossOutput,
    aggregate_loss,
    local_denominator,
    policy_loss,
    token_sample_index,
)
from megatron_dapo.algo.metrics import (
    finalize_metrics,
    group_metric_sums,
    merge_metric_sums,
    rollout_metric_sums,
    token_metric_sums,
)
from megatron_dapo.algo.mismatch import RATIO_BAND, mismatch_metric_sums
from megatron_dapo.algo.overlong import overlong_filter_mask, overlong_penalty, overlong_penalty_tensor
from megatron_dapo.algo.sampling import DynamicSampler, DynamicSamplingError, is_informative
from megatron_dapo.algo.saturation import Outcome, SaturationPolicy, SkipSettings, group_outcome

__all__ = [
    "IMPORTANCE_LEVELS",
    "IMPORTANCE_MODES",
    "LOSS_AGGREGATIONS",
    "RATIO_BAND",
    "DynamicSampler",
    "DynamicSamplingError",
    "ImportanceCorrection",
    "LossAggregation",
    "Outcome",
    "PolicyLossOutput",
    "SaturationPolicy",
    "SkipSettings",
    "aggregate_loss",
    "finalize_metrics",
    "group_advantages",
    "group_metric_sums",
    "group_outcome",
    "importance_metric_sums",
    "importance_weights",
    "is_informative",
    "local_denominator",
    "merge_metric_sums",
    "mismatch_metric_sums",
    "overlong_filter_mask",
    "overlong_penalty",
    "overlong_penalty_tensor",
    "policy_loss",
    "rollout_metric_sums",
    "token_metric_sums",
    "token_sample_index",
]
