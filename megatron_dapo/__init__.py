"""megatron-dapo: DAPO reinforcement learning with a Megatron-core policy and SGLang rollouts."""

__version__ = "0.1.0"
