"""megatron-dapo: DAPO reinforcement learning with a Megatron-core policy and SGLang rollouts."""

import warnings

__version__ = "0.1.0"

# megatron-core warns when it imports without Transformer Engine or Apex, and when its own TransformerConfig
# defaults meet its newer cuda_graph_scope check: expected on CPU machines, where the project uses the local
# layer spec and torch's optimizers on purpose, and noise to a user reading the demo's output.
for _message in (r".*Apex (is|are) not installed", r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
