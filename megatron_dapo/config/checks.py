"""What a config may hold: each numeric field's interval (RANGES), the settings that depend on each other,
and what the processes a run was launched with can hold. Each refusal names the key and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from megatron_dapo.errors import UserError

if TYPE_CHECKING:
    from megatron_dapo.config.tree import DapoConfig


class ConfigError(UserError):
    """A config that cannot work; the message names the key and what to change."""


@dataclass(frozen=True)
class Interval:
    """The values a numeric field may take; an infinite end is never included, so NaN and inf never pass."""

    low: float
    high: float = math.inf
    ends: Literal["[]", "[)", "(]", "()"] = "[)"  # which ends are included, as in interval notation
    note: str = ""  # what a special value means ("0: off")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.ends[0] == "[" else value > self.low
        below = value <= self.high if self.ends[1] == "]" else value < self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.ends[0] == '[' else '>'} {_number(self.low)}"
        return f"in {self.ends[0]}{_number(self.low)}, {_number(self.high)}{self.ends[1]}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_AT_LEAST_1 = Interval(1)
_POSITIVE = Interval(0, ends="()")
_PROBABILITY = Interval(0, 1, "(]")
# Every numeric field of the tree and the values it may take (a test checks that none is missing). None, in an
# optional field, means "off" and is not checked. Settings that depend on each other: `validate`.
RANGES: dict[str, Interval] = {
    "algorithm.samples_per_prompt": _AT_LEAST_1,
    "algorithm.clip_eps_low": Interval(0, 1),
    "algorithm.clip_eps_high": Interval(0),
    "algorithm.dual_clip": Interval(1, ends="()", note="; null disables it"),
    "algorithm.overlong_buffer_tokens": Interval(0),
    "algorithm.max_sampling_rounds": _AT_LEAST_1,
    "algorithm.rollout_is_cap": Interval(1, note="; null disables it"),
    "algorithm.rollout_is_lower": Interval(0, 1, "()", note="; null: 1 / rollout_is_cap"),
    "algorithm.skip_p_all_correct": Interval(0, 1, "[]"),
    "algorithm.skip_p_all_wrong": Interval(0, 1, "[]"),
    "algorithm.skip_expiry_epochs": Interval(0, note=" (0: never)"),
    "data.max_prompt_tokens": _AT_LEAST_1,
    "model.logprob_chunk_tokens": Interval(0, note=" (0: the plain path)"),
    "parallel.tensor": _AT_LEAST_1,
    "parallel.pipeline": _AT_LEAST_1,
    "parallel.context": _AT_LEAST_1,
    "rollout.num_servers": _AT_LEAST_1,
    "rollout.server_tp": _AT_LEAST_1,
    "rollout.mem_fraction": Interval(0, 1, "()"),
    "rollout.base_port": Interval(0, 65535, "[]", " (0: free ports)"),
    "rollout.max_response_tokens": _AT_LEAST_1,
    "rollout.temperature": Interval(0, ends="()", note=" (training samples from the policy)"),
    "rollout.top_p": _PROBABILITY,
    "rollout.top_k": Interval(-1, note=" (-1: off)"),  # and not 0: see validate
    "rollout.max_inflight_prompts": Interval(0, note=" (0: prompts_per_step x 2)"),
    "rollout.max_running_requests": Interval(0, note=" (0: the engine's default)"),
    "rollout.weight_sync_bucket_mb": _AT_LEAST_1,
    "rollout.request_deadline_floor_s": _POSITIVE,
    "rollout.request_min_tokens_per_s": _POSITIVE,
    "rollout.request_deadline_slack": _AT_LEAST_1,
    "rollout.max_staleness": Interval(0, 16, "[]", " (0: synchronous)"),
    "optimizer.lr": _POSITIVE,
    "optimizer.warmup_steps": Interval(0),
    "optimizer.weight_decay": Interval(0),
    "optimizer.adam_beta1": Interval(0, 1),
    "optimizer.adam_beta2": Interval(0, 1),
    "optimizer.adam_eps": _POSITIVE,
    "optimizer.clip_grad": Interval(0, note=" (0 disables clipping)"),
    "train.prompts_per_step": _AT_LEAST_1,
    "train.samples_per_minibatch": _AT_LEAST_1,
    "train.tokens_per_microbatch": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1,
    "train.seed": Interval(0, 2**32 - 1, "[]"),  # numpy refuses negative seeds; 32 bits suit every consumer
    "train.mismatch_kl_warn": _POSITIVE,
    "train.stall_timeout_s": Interval(0, note=" (0: no deadline)"),
    "train.rollout_stall_timeout_s": Interval(0, note=" (0: no deadline)"),
    "checkpoint.save_every_steps": Interval(0, note=" (0: never)"),
    "checkpoint.keep_last": Interval(0, note=" (0 keeps all)"),
    "eval.every_steps": Interval(0, note=" (0: never)"),
    "eval.samples_per_problem": _AT_LEAST_1,
    "eval.temperature": Interval(0, note=" (0: greedy)"),
    "eval.top_p": _PROBABILITY,
    "eval.max_response_tokens": Interval(0, note=" (0: rollout.max_response_tokens)"),
}


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_ranges(cfg: DapoConfig) -> None:
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value is None or value in allowed, key, f"must be {allowed}{allowed.note}, got {value}")


def validate(cfg: DapoConfig) -> None:
    """Reject settings that cannot work, naming the key and the fix."""
    _check_ranges(cfg)
    a, r, t, p = cfg.algorithm, cfg.rollout, cfg.train, cfg.parallel
    _require(
        not a.dynamic_sampling or a.samples_per_prompt >= 2,
        "algorithm.dynamic_sampling",
        "needs samples_per_prompt >= 2 (a group of one is always all-correct or all-wrong)",
    )
    _require(
        not a.overlong_penalty or 0 < a.overlong_buffer_tokens < r.max_response_tokens,
        "algorithm.overlong_buffer_tokens",
        f"must be in (0, rollout.max_response_tokens={r.max_response_tokens}) when overlong_penalty is on",
    )
    _require(r.top_k != 0, "rollout.top_k", "must be -1 (off) or >= 1")
    _check_importance(cfg)
    samples_per_step = t.prompts_per_step * a.samples_per_prompt
    _require(
        samples_per_step % t.samples_per_minibatch == 0,
        "train.samples_per_minibatch",
        f"must divide prompts_per_step x samples_per_prompt = {samples_per_step}",
    )
    longest_sample = cfg.data.max_prompt_tokens + r.max_response_tokens  # tokens, before the CP split
    _require(
        t.tokens_per_microbatch * p.context >= longest_sample,
        "train.tokens_per_microbatch",
        f"must hold the longest sample (data.max_prompt_tokens + rollout.max_response_tokens = "
        f"{longest_sample} tokens) split over parallel.context={p.context}: raise it to at least "
        f"{-(-longest_sample // p.context)}, raise parallel.context, or lower those limits",
    )
    _require(
        r.max_staleness == 0 or r.backend == "cpu" or not r.colocate,
        "rollout.max_staleness",
        "generates while the policy trains, so the servers need GPUs of their own: set "
        "rollout.colocate=false (launch/*.sh: ROLLOUT_PLACEMENT=dedicated), or max_staleness=0",
    )
    _require(
        not p.sequence_parallel or p.tensor > 1,
        "parallel.sequence_parallel",
        "needs parallel.tensor > 1 (it shards activations over the TP group)",
    )


def _check_importance(cfg: DapoConfig) -> None:
    """The importance correction's settings only make sense together (algo/importance.py)."""
    a = cfg.algorithm
    if a.rollout_is_cap is None:
        for key, value, default in (
            ("rollout_is_level", a.rollout_is_level, "token"),
            ("rollout_is_mode", a.rollout_is_mode, "truncate"),
            ("rollout_is_lower", a.rollout_is_lower, None),
        ):
            _require(
                value == default,
                f"algorithm.{key}",
                f"{value} needs algorithm.rollout_is_cap (the upper threshold, e.g. 2): set the cap, or "
                f"leave {key} at {'null' if default is None else default}",
            )
        return
    _require(
        a.rollout_is_lower is None or a.rollout_is_mode == "mask",
        "algorithm.rollout_is_lower",
        "applies to algorithm.rollout_is_mode=mask only: set the mode to mask, or drop the lower threshold",
    )
    _require(
        a.rollout_is_level != "geometric" or a.rollout_is_mode == "mask",
        "algorithm.rollout_is_level",
        "geometric is a rejection criterion (a per-token average, not an importance weight): "
        "use it with algorithm.rollout_is_mode=mask",
    )
    lower = 1 / a.rollout_is_cap if a.rollout_is_lower is None else a.rollout_is_lower
    _require(
        a.rollout_is_mode != "mask" or lower < a.rollout_is_cap,
        "algorithm.rollout_is_lower" if a.rollout_is_lower is not None else "algorithm.rollout_is_cap",
        f"mask mode keeps ratios in [rollout_is_lower, rollout_is_cap] = [{lower:g}, {a.rollout_is_cap:g}]: "
        "the lower threshold must be below the cap (with the default lower of 1 / cap: a cap above 1)",
    )


def validate_launch(cfg: DapoConfig, *, world_size: int, cuda: bool) -> None:
    """Reject settings the processes the run was launched with cannot hold, before any process group forms."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    _require(
        world_size % model_parallel == 0,
        ", ".join(
            f"parallel.{n}={getattr(p, n)}" for n in ("tensor", "pipeline", "context") if getattr(p, n) > 1
        ),
        f"tensor x pipeline x context = {model_parallel} must divide the {world_size} processes launched: "
        f"launch a multiple of {model_parallel} (torchrun --nproc-per-node), or lower these degrees",
    )
    _require(
        cuda or not p.sequence_parallel,
        "parallel.sequence_parallel",
        "needs CUDA (megatron's CPU norm refuses it): set it to false on CPU",
    )
