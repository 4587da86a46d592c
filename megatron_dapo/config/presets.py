"""The paper's ablation table as presets: `preset: NAME` in a file, or `preset=NAME` on the command line."""

from typing import Any

# The paper's ablation table, row by row (DAPO.md): each row adds one technique to the row above. The soft
# overlong punishment row replaces overlong filtering rather than adding to it: the authors' own recipe notes
# that their best runs used the punishment without filtering.
_NAIVE_GRPO = {
    "clip_eps_low": 0.2,
    "clip_eps_high": 0.2,
    "loss_aggregation": "sample",
    "overlong_filtering": False,
    "overlong_penalty": False,
    "dynamic_sampling": False,
}
_ROWS = [
    ("naive_grpo", {}),
    ("overlong_filtering", {"overlong_filtering": True}),
    ("clip_higher", {"clip_eps_high": 0.28}),
    ("soft_overlong", {"overlong_filtering": False, "overlong_penalty": True}),
    ("token_level", {"loss_aggregation": "token"}),
    ("dapo", {"dynamic_sampling": True}),
]


def _cumulative_presets() -> dict[str, dict[str, Any]]:
    presets, current = {}, dict(_NAIVE_GRPO)
    for name, change in _ROWS:
        current = {**current, **change}
        presets[name] = current
    return presets


PRESETS: dict[str, dict[str, Any]] = _cumulative_presets()
PAPER_AIME24 = {  # AIME 2024 avg@32 the paper reports for each row (Qwen2.5-32B base)
    "naive_grpo": 30,
    "overlong_filtering": 36,
    "clip_higher": 38,
    "soft_overlong": 41,
    "token_level": 42,
    "dapo": 50,
}
