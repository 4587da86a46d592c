"""The time of one RL step: rollout from the servers' decode speed and the long tail (plan/decode.py),
training from FLOPs at an assumed utilisation; and, with rollout.max_staleness > 0 on dedicated rollout GPUs,
the overlapped (asynchronous) step."""

from dataclasses import dataclass

from megatron_dapo.config import DapoConfig
from megatron_dapo.plan.assumptions import Assumptions, mean_response_tokens, mean_sequence_tokens
from megatron_dapo.plan.decode import ServerSpeed, drain_rollout_s, mean_residual_tokens, server_speed
from megatron_dapo.plan.layout import Layout
from megatron_dapo.plan.parameters import count_parameters
from megatron_dapo.plan.shape import ModelShape


@dataclass
class StepTime:
    """Seconds of one RL step, from the Assumptions."""

    generated_tokens: float
    trained_tokens: float
    server: ServerSpeed  # one SGLang server's decode step time
    decode_s: float  # the generated tokens on full servers
    drain_s: float  # then, synchronous: servers emptying until the longest sample finishes alone
    longest_s: float  # the longest sample on a full server (asynchronous: within eta + 1 steps)
    training_s: float
    train_flops_per_token: float
    weight_sync_s: float  # bf16 weights to dedicated servers over the network; 0 colocated (not modelled)
    async_s: float | None  # the overlapped step (rollout.max_staleness > 0, dedicated); None otherwise

    @property
    def rollout_s(self) -> float:
        """A synchronous step waits for its longest sample."""
        return self.decode_s + self.drain_s

    @property
    def step_s(self) -> float:
        """The synchronous loop: generate, then train, then send the weights."""
        return self.rollout_s + self.training_s + self.weight_sync_s


def overlapped_step_s(decode_s: float, longest_s: float, training_s: float, sync_s: float, eta: int) -> float:
    """Steady state of the asynchronous loop: rollout and training run at once on their own GPUs, so the
    slower side sets the pace. The servers never drain (the next steps' prompts keep them full), but a sample
    may be trained up to `eta` steps after the one its first token was generated for, so the longest sample
    has eta + 1 steps to finish. Both sides stop for the weight update (the trainer sends, the servers pause
    and load)."""
    rollout_side = max(decode_s, longest_s / (eta + 1))
    return max(rollout_side, training_s) + sync_s


def step_time(
    shape: ModelShape, cfg: DapoConfig, layout: Layout, assume: Assumptions, server_capacity: int
) -> StepTime:
    """Rollout: the generated tokens on `layout.servers` servers of `server_capacity` sequences, kept full,
    then (synchronous) the drain until the longest sample finishes. Training: FLOPs at `mfu` of
    `peak_tflops`: 6N + attention per token (plus 2N again with recompute), and a forward for the old
    log-probs."""
    parameters = count_parameters(shape)
    response = mean_response_tokens(cfg, assume)
    samples = cfg.train.prompts_per_step * cfg.algorithm.samples_per_prompt
    sampled = samples / assume.kept_group_fraction if cfg.algorithm.dynamic_sampling else samples
    generated = sampled * response
    server = server_speed(assume, parameters, layout.server_tp, server_capacity)
    per_server = generated / layout.servers
    decode_s = per_server / server.tokens_per_s(server.capacity)
    longest = cfg.rollout.max_response_tokens
    residual = mean_residual_tokens(response, assume.response_length_sigma, longest)
    drain_s = drain_rollout_s(per_server, server, longest, residual) - decode_s
    longest_s = longest * server.step_s(server.capacity)
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
        overlapped = overlapped_step_s(decode_s, longest_s, training_s, sync_s, eta)
    return StepTime(
        generated, trained, server, decode_s, drain_s, longest_s, training_s, per_token, sync_s, overlapped
    )
