"""One typed config tree for a DAPO run: YAML files, dotted command-line overrides, presets, validation.

A config file is YAML whose top-level keys are the sections below. Two extra keys layer files:
`inherit: other.yaml` (a path relative to the file) loads that file first, and `preset: NAME` applies one of
the PRESETS (the rows of the paper's ablation table) to the algorithm section before the file's own values.
Overrides on the command line are `section.field=value`, the value parsed as YAML (`rollout.top_p=0.7`).
Every unknown key and impossible value is rejected before anything starts, with the key and the fix named:
each numeric field against its allowed interval (RANGES), then the settings that depend on each other.
"""

from megatron_dapo.config.checks import RANGES, ConfigError, Interval, validate, validate_launch
from megatron_dapo.config.loading import from_dict, load_config
from megatron_dapo.config.presets import PAPER_AIME24, PRESETS
from megatron_dapo.config.tree import (
    AlgorithmConfig,
    CheckpointConfig,
    DapoConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)

__all__ = [
    "PAPER_AIME24",
    "PRESETS",
    "RANGES",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DapoConfig",
    "DataConfig",
    "EvalConfig",
    "Interval",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RolloutConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "validate",
    "validate_launch",
]
