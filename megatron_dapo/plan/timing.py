"""The time of one RL step: rollout from decode throughput, training from FLOPs at an assumed utilisation."""

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
    rollout_s: float
    training_s: float
    train_flops_per_token: float

    @property
    def step_s(self) -> float:
        return self.rollout_s + self.training_s


def step_time(shape: ModelShape, cfg: DapoConfig, layout: Layout, assume: Assumptions) -> StepTime:
    """Rollout: the larger of decode throughput over all rollout GPUs and the longest sample decoded alone.
    Training: FLOPs at `mfu` of `peak_tflops`: 6N + attention per token (plus 2N again with recompute), and
    a forward for the old log-probs."""
    parameters = count_parameters(shape)
    response = mean_response_tokens(cfg, assume)
    samples = cfg.train.prompts_per_step * cfg.algorithm.samples_per_prompt
    sampled = samples / assume.kept_group_fraction if cfg.algorithm.dynamic_sampling else samples
    generated = sampled * response
    rollout_s = max(
        generated / (assume.decode_rate(parameters) * layout.rollout_gpus),
        cfg.rollout.max_response_tokens * assume.tail_ms_per_token / 1000,
    )
    matmul = parameters - shape.vocab_size * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
    sequence = mean_sequence_tokens(cfg, assume)
    # Causal attention: each token meets sequence/2 keys; QKᵀ and AV cost 2 FLOPs per multiply-add each.
    attention = 2 * shape.num_layers * shape.num_attention_heads * shape.head_dim * sequence
    forward = 2 * matmul + attention
    passes = 4 if cfg.model.recompute_activations else 3  # forward + backward (2x) [+ recomputed forward]
    per_token = passes * forward + forward  # + the forward that gives the old log-probs
    trained = samples * sequence
    training_s = trained * per_token / (layout.train_gpus * assume.peak_tflops * 1e12 * assume.mfu)
    return StepTime(generated, trained, rollout_s, training_s, per_token)
