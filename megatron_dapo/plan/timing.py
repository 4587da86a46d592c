"""The time of one RL step: rollout from decode throughput, training from FLOPs at an assumed utilisation;
and, with rollout.max_staleness > 0 on dedicated rollout GPUs, the overlapped (asynchronous) step."""

from dataclasses import dataclass

from megatron_dapo.config import DapoConfig
from megatron_dapo.plan.assumptions import Assumptions, mean_response_tokens, mean_sequence_tokens
from megatron_dapo.plan.layout import Layout
from megatron_dapo.plan.parameters import count_parameters
from megatron_dapo.plan.shape import ModelShape


@dataclass
class StepTime:
    """Seconds of one RL step, from the Assumptions."""

    generated_tokens: float
    trained_tokens: float
    decode_s: float  # the generated tokens at full decode throughput on the rollout GPUs
    tail_s: float  # the longest sample decoded alone (a server holding one sequence)
    training_s: float
    train_flops_per_token: float
    weight_sync_s: float  # bf16 weights to dedicated servers over the network; 0 colocated (not modelled)
    async_s: float | None  # the overlapped step (rollout.max_staleness > 0, dedicated); None otherwise

    @property
    def rollout_s(self) -> float:
        """A synchronous step waits for its longest sample."""
        return max(self.decode_s, self.tail_s)

    @property
    def step_s(self) -> float:
        """The synchronous loop: generate, then train, then send the weights."""
        return self.rollout_s + self.training_s + self.weight_sync_s


def overlapped_step_s(decode_s: float, tail_s: float, training_s: float, sync_s: float, eta: int) -> float:
    """Steady state of the asynchronous loop: rollout and training run at once on their own GPUs, so the
    slower side sets the pace. A sample may be trained up to `eta` steps after the one its first token
    was generated for, so the longest sample has eta + 1 steps to finish. Both sides stop for the weight
    update (the trainer sends, the servers pause and load)."""
    rollout_side = max(decode_s, tail_s / (eta + 1))
    return max(rollout_side, training_s) + sync_s


def step_time(shape: ModelShape, cfg: DapoConfig, layout: Layout, assume: Assumptions) -> StepTime:
    """Rollout: the larger of decode throughput over all rollout GPUs and the longest sample decoded alone.
    Training: FLOPs at `mfu` of `peak_tflops`: 6N + attention per token (plus 2N again with recompute), and
    a forward for the old log-probs."""
    parameters = count_parameters(shape)
    response = mean_response_tokens(cfg, assume)
    samples = cfg.train.prompts_per_step * cfg.algorithm.samples_per_prompt
    sampled = samples / assume.kept_group_fraction if cfg.algorithm.dynamic_sampling else samples
    generated = sampled * response
    decode_s = generated / (assume.decode_rate(parameters) * layout.rollout_gpus)
    tail_s = cfg.rollout.max_response_tokens * assume.tail_ms_per_token / 1000
    matmul = parameters - shape.vocab_size * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
    sequence = mean_sequence_tokens(cfg, assume)
    # Causal attention: each token meets sequence/2 keys; QKᵀ and AV cost 2 FLOPs per multiply-add each.
    attention = 2 * shape.num_layers * shape.num_attention_heads * shape.head_dim * sequence
    forward = 2 * matmul + attention
    passes = 4 if cfg.model.recompute_activations else 3  # forward + backward (2x) [+ recomputed forward]
    per_token = passes * forward + forward  # + the forward that gives the old log-probs
    trained = samples * sequence
    training_s = trained * per_token / (layout.train_gpus * assume.peak_tflops * 1e12 * assume.mfu)
    sync_s = 0.0 if layout.colocated else 2 * parameters / (assume.weight_sync_gb_per_s * 1e9)
    eta = cfg.rollout.max_staleness
    overlapped = None
    if eta > 0 and not layout.colocated:
        overlapped = overlapped_step_s(decode_s, tail_s, training_s, sync_s, eta)
    return StepTime(generated, trained, decode_s, tail_s, training_s, per_token, sync_s, overlapped)
