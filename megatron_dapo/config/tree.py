"""The config tree: one dataclass per section, each field with its unit and, where the paper names it, its
symbol. Building a DapoConfig validates it (checks.py)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from megatron_dapo.config.checks import validate


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
    # Importance correction for the engine's sampling policy π_rollout vs π_old (algo/importance.py):
    rollout_is_cap: float | None = None  # upper threshold on the ratio π_old/π_rollout; None: off
    rollout_is_level: Literal["token", "sequence", "geometric"] = "token"  # ratio per token, or per sample
    rollout_is_mode: Literal["truncate", "mask"] = "truncate"  # weight min(ratio, cap), or 0/1 in the band
    rollout_is_lower: float | None = None  # mask mode's lower threshold; None: 1 / rollout_is_cap
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
    # A sample not answered within floor + max_response_tokens x slack / speed (the slowest of the server's
    # recent samples, in tokens/s; min_tokens_per_s until one has finished), counted from its dispatch or
    # the server's latest finished sample, moves to another server, and its server leaves dispatch until
    # the check before the next step (rollout/deadline.py, rollout/failover.py).
    request_deadline_floor_s: float = 120.0
    request_min_tokens_per_s: float = 10.0
    request_deadline_slack: float = 3.0
    # Asynchronous DAPO (README "Synchronous or asynchronous"): eta > 0 generates the next step's groups
    # while the policy trains, and no trained token comes from weights more than eta versions behind the
    # step's policy. 0: the synchronous loop. On GPUs it needs colocate=false (servers on their own GPUs).
    max_staleness: int = 0
    partial: bool = False  # interrupted samples keep their tokens and continue under newer weights
    stale_groups: Literal["drop", "regenerate"] = "drop"  # a group past max_staleness: regenerate its prompt


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
    # A step whose train/mismatch_kl (KL(pi_rollout || pi_old), nats per response token) exceeds this logs a
    # warning: the engine samples from other weights than the trainer's (a stale tensor after weight sync, a
    # precision gap). The CPU engine and trainer, both fp32 at the same weights, stay far below 1e-4.
    mismatch_kl_warn: float = 0.01
    # Stall watchdog (trainer/watchdog.py): a phase of a step running past its deadline dumps every rank's
    # Python stacks to logging.dir/logs/watchdog/ and exits with code 75, for the job to be requeued. Keep
    # both below the 180-minute collective timeout (trainer/loop.py), which would otherwise end the run first.
    stall_timeout_s: float = 1800.0  # old log-probs, each update, weight sync, checkpoint save; 0: none
    rollout_stall_timeout_s: float = 7200.0  # generation: the step's rollout, evaluation; 0: none


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
