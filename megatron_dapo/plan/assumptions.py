"""What the estimates rest on that no config says: kernels, optimizer, throughput and mean lengths."""

from dataclasses import dataclass
from typing import Literal

from megatron_dapo.config import DapoConfig

Kernels = Literal["te", "local"]


@dataclass(frozen=True)
class Assumptions:
    """What the estimates rest on, each a command-line flag; change them to what your cluster measures."""

    kernels: Kernels = "te"
    distributed_optimizer: bool = True  # Megatron's distributed optimizer shards master weights and moments
    grad_fp32: bool = True  # gradients accumulated and reduced in fp32
    reserved_gib: float = 6.0  # per GPU: CUDA context, NCCL buffers, fragmentation, transient gradients
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H100 SXM)
    mfu: float = 0.35  # model-FLOPs utilisation of training (forward and backward)
    decode_tokens_per_s_per_gpu: float = 0.0  # a full server; 0: 32e12 / parameters (~1,000 tok/s, H100, 32B)
    tail_ms_per_token: float = 20.0  # a decode step with one sequence: the last sample of a step, alone
    weight_sync_gb_per_s: float = 10.0  # bf16 weights from the trainer to dedicated servers, effective
    mean_prompt_tokens: int = 150  # DAPO-Math-17k with the DAPO template and Qwen's tokenizer: 145
    mean_response_fraction: float = 0.25  # mean response length / rollout.max_response_tokens
    response_length_sigma: float = 0.9  # spread of ln(response length); lengths log-normal, cut at the max
    kept_group_fraction: float = 0.5  # dynamic sampling: share of sampled groups with 0 < #correct < G

    def decode_rate(self, parameters: int) -> float:
        return self.decode_tokens_per_s_per_gpu or 32e12 / parameters


def mean_response_tokens(cfg: DapoConfig, assume: Assumptions) -> float:
    return assume.mean_response_fraction * cfg.rollout.max_response_tokens


def mean_sequence_tokens(cfg: DapoConfig, assume: Assumptions) -> float:
    return assume.mean_prompt_tokens + mean_response_tokens(cfg, assume)
