"""One typed config tree for a DAPO run: YAML files, dotted command-line overrides, presets, validation.

A config file is YAML whose top-level keys are the sections below. Two extra keys layer files:
`inherit: other.yaml` (a path relative to the file) loads that file first, and `preset: NAME` applies one of
the PRESETS (the rows of the paper's ablation table) to the algorithm section before the file's own values.
Overrides on the command line are `section.field=value`, the value parsed as YAML (`rollout.top_p=0.7`).
Every unknown key and impossible value is rejected before anything starts, with the key and the fix named:
each numeric field against its allowed interval (RANGES), then the settings that depend on each other.
"""

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_dapo.errors import UserError


class ConfigError(UserError):
    """A config that cannot work; the message names the key and what to change."""


@dataclass
class AlgorithmConfig:
    """The DAPO objective; each of the paper's four techniques is a switch here."""

    samples_per_prompt: int = 16  # G: responses sampled per prompt, normalised as one group
    scale_advantage_by_std: bool = True  # divide group-centred rewards by the group's std (GRPO, DAPO)
    clip_eps_low: float = 0.2  # ratio may fall to 1 - eps_low
    clip_eps_high: float = 0.28  # ratio may rise to 1 + eps_high (clip-higher when > eps_low)
    dual_clip: float | None = None  # c > 1 caps the loss of negative-advantage tokens at c·|A|; None: off
    loss_aggregation: Literal["token", "sample", "sequence_sum"] = "token"  # token: DAPO; sample: GRPO
    overlong_filtering: bool = False  # truncated samples contribute no gradient
    overlong_penalty: bool = True  # soft overlong punishment added to the rule reward
    overlong_buffer_tokens: int = 4096  # L_cache: the penalty ramps over the last this-many tokens
    dynamic_sampling: bool = True  # keep only groups with 0 < #correct < G, sample more until full
    max_sampling_rounds: int = 10  # give up (with an error) after this many rounds cannot fill a batch
    rollout_is_cap: float | None = None  # truncated importance weight π_old/π_rollout, capped; None: off
    boxed_fallback: bool = False  # reward: read \boxed{} when no "Answer:" line exists (the paper: no)
    # Skip prompts whose last group was all correct / all wrong when the stream reaches them again (not in
    # the paper; algo/saturation.py, issue 13). Each skip is drawn with the probability below, so a skipped
    # prompt returns after 1 / (1 - p) epochs on average and can be relearned; skip_expiry_epochs > 0 also
    # brings it back after that many epochs skipped in a row. Defaults: benchmarks/dynamic_sampling.py
    # --mode epochs, where 0.9 / 0.9 / never cut the filtered share of generated tokens mid-training from
    # 49% to 22% (an expiry of 2-6 epochs: 36-22%, returning prompts in waves; p_all_wrong 0.5: 34%).
    skip_saturated: bool = False
    skip_p_all_correct: float = 0.9  # probability of skipping a prompt whose last group was all correct
    skip_p_all_wrong: float = 0.9  # probability of skipping a prompt whose last group was all wrong
    skip_expiry_epochs: int = 0  # epochs skipped in a row after which the prompt is offered; 0: never


@dataclass
class DataConfig:
    """Where prompts come from and how they become token ids."""

    train_path: str = ""  # parquet or jsonl (DAPO-Math-17k layout, or any layout data/ detects)
    format: Literal["auto", "dapo", "dapo_chat", "problem_answer", "gsm8k", "arithmetic"] = "auto"
    max_prompt_tokens: int = 2048  # longer prompts are reported and handled per on_bad_row
    on_bad_row: Literal["skip", "error"] = "skip"  # skip: report and drop; error: refuse to start
    apply_chat_template: bool = True  # false for base models without a chat template
    tokenizer_path: str = ""  # default: model.hf_path
    shuffle: bool = True


@dataclass
class ModelConfig:
    """The policy: a Hugging Face architecture, trained as a Megatron-core GPT model."""

    hf_path: str = ""  # HF directory: config.json and tokenizer, and the weights when `load` is empty
    load: str = ""  # Megatron checkpoint to start from (tools/convert_hf_to_megatron.py); overrides weights
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    recompute_activations: bool = False  # full activation recompute: long sequences at ~1.3x compute
    logprob_chunk_tokens: int = 1024  # memory-bounded log-probs, this many tokens per chunk; 0: plain path


@dataclass
class ParallelConfig:
    """Model-parallel degrees; data parallel is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False  # GPU only (the CPU norm refuses it)


@dataclass
class RolloutConfig:
    """Generation: SGLang servers on GPUs, or the project's CPU engine speaking the same protocol."""

    backend: Literal["sglang", "cpu"] = "sglang"
    server_urls: list[str] = field(default_factory=list)  # running servers; empty: launch our own
    num_servers: int = 1  # servers to launch when server_urls is empty
    server_tp: int = 1  # tensor parallel size of each SGLang server
    mem_fraction: float = 0.7  # SGLang --mem-fraction-static
    colocate: bool = True  # servers share GPUs with training (release memory while training)
    host: str = "127.0.0.1"
    base_port: int = 30000  # launched servers listen on base_port + i; 0: on free ports
    max_response_tokens: int = 20480  # L_max: generation stops here (the sample is then truncated)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_inflight_prompts: int = 0  # prompts in flight at once; 0: prompts_per_step x 2
    max_running_requests: int = 0  # sequences each server decodes at once; 0: the engine's default
    weight_sync_bucket_mb: int = 512  # weights travel to the engine in buckets of about this size


@dataclass
class OptimizerConfig:
    """AdamW through the Megatron optimizer; the paper's constant lr with linear warm-up."""

    lr: float = 1e-6
    warmup_steps: int = 20  # rollout steps of linear warm-up from 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0: off
    distributed: bool = True  # shard fp32 master weights and Adam moments over data parallel (ZeRO-1)


@dataclass
class TrainConfig:
    """Batch sizes, each named with its unit, and the run's length."""

    prompts_per_step: int = 512  # prompts whose groups form one rollout step's batch
    samples_per_minibatch: int = 512  # samples per gradient update: 512 x 16 / 512 = 16 updates per step
    tokens_per_microbatch: int = 32768  # per-rank token budget of one packed micro-batch
    steps: int = 1000  # rollout steps
    seed: int = 1234
    # Reproducible rollouts: finished groups are taken in submission order, and the surplus in flight when the
    # batch fills is awaited (and carried over) rather than aborted, so a rerun or a resumed run samples the
    # same batches. Slower; pair with rollout.max_running_requests=1 on the CPU engine, whose float rounding
    # otherwise depends on which requests share a batch.
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    """Where and how often the full RL state is saved; a run resumes from the latest complete save."""

    dir: str = ""  # empty: logging.dir / "checkpoints"
    save_every_steps: int = 10
    keep_last: int = 2  # older complete checkpoints are deleted; 0 keeps all
    resume: bool = True
    # A checkpoint whose files no longer match their checksums stops the run, naming the file: corruption
    # means failing storage or a stray writer, which a person should see before steps are silently redone.
    # true: resume from the newest intact checkpoint instead (a warning names the file; the corrupt one is
    # renamed step_N.corrupt-*), e.g. for unattended requeued jobs.
    resume_fallback: bool = False


@dataclass
class LoggingConfig:
    """Run directory, TensorBoard scalars and the console progress bar."""

    dir: str = "runs/dapo"
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Periodic evaluation: the paper's AIME 2024 avg@32 at temperature 1.0, top-p 0.7."""

    path: str = ""  # empty: no evaluation
    every_steps: int = 5
    samples_per_problem: int = 32
    temperature: float = 1.0
    top_p: float = 0.7
    max_response_tokens: int = 0  # 0: rollout.max_response_tokens


@dataclass
class DapoConfig:
    """A whole run."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DapoConfig:
    """Build a validated config from an optional YAML file and `section.field=value` overrides.

    A `preset=NAME` override applies the preset over everything the files set, then later overrides apply.
    """
    raw = _load_yaml_tree(Path(path), ()) if path else {}
    for override in overrides or []:
        if override.partition("=")[0].strip() == "preset":
            raw = _merge(raw, _expand_preset({"preset": _override_value(override)}))
        else:
            _apply_override(raw, override)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> DapoConfig:
    """Build a validated config from a nested dict; a top-level `preset` key is expanded first."""
    return _build(DapoConfig, _expand_preset(raw), "")


def _expand_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """Replace a `preset` key by the algorithm values it stands for; the tree's own algorithm values win."""
    tree = dict(tree)
    name = tree.pop("preset", None)
    if name is None:
        return tree
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    tree["algorithm"] = {**PRESETS[name], **(tree.get("algorithm") or {})}
    return tree


def _load_yaml_tree(path: Path, inherited_by: tuple[Path, ...]) -> dict[str, Any]:
    """A file's tree over the tree it inherits; its preset applies at its own level, so it beats the parent's
    algorithm values and loses to its own. `inherited_by`: the files that led here, to refuse a loop."""
    if path in inherited_by:
        chain = " -> ".join(str(p) for p in (*inherited_by, path))
        raise ConfigError(f"inherit: {chain} is a loop: remove one of these inherit keys")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    tree = _parse_yaml(_read_text(path), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("inherit", None)
    tree = _expand_preset(tree)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: inherit must name one YAML file (relative to this one), got {parent!r}")
    return _merge(_load_yaml_tree((path.parent / parent).resolve(), (*inherited_by, path.resolve())), tree)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8 YAML") from None


def _parse_yaml(text: str, source: str) -> Any:
    """YAML text -> value; a syntax error becomes one line saying where."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _override_value(override: str) -> Any:
    return _parse_yaml(override.partition("=")[2], f"override {override!r}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_maps else value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, _ = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: write it as section.field=value, e.g. rollout.top_p=0.7")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
    node[leaf] = _override_value(override)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {_join(where, close[0])}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {_join(where, key)}{hint}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], raw[name], _join(where, name)) for name in fields if name in raw}
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], item, where) for item in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {hint}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


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
        not p.sequence_parallel or p.tensor > 1,
        "parallel.sequence_parallel",
        "needs parallel.tensor > 1 (it shards activations over the TP group)",
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
