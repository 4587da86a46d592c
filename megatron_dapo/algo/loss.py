"""The DAPO policy loss: clip-higher surrogate per token, and its aggregation over a packed mini-batch.

Micro-batches are THD-packed: the tokens of several samples laid end to end in one [T] row. Samples are
given by `cu_seqlens` [S+1] (int, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T), as in Megatron's
PackedSeqParams: sample s owns tokens cu_seqlens[s] : cu_seqlens[s+1]. Prompt and padding tokens stay in
place with loss_mask 0.

Aggregation divides by a GLOBAL denominator, counted over the whole mini-batch (every micro-batch on every
data-parallel rank) before the first forward: `local_denominator` gives one micro-batch's share, the caller
sums the shares of its micro-batches and all-reduces over DP once per mini-batch. Each micro-batch then
returns `aggregate_loss(...)`, and the SUM over all micro-batches and ranks is the mini-batch loss, exactly,
for any split. A framework that averages over micro-batches or DP ranks must be compensated by the caller
(multiply by their count); with Megatron's `calculate_per_token_loss`, pass `global_denominator=1` and return
the local denominator as the token count: Megatron then divides the summed gradients by the all-reduced total.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossAggregation = Literal["token", "sample", "sequence_sum"]
LOSS_AGGREGATIONS: tuple[str, ...] = ("token", "sample", "sequence_sum")

# exp(20) ~ 5e8: far beyond any clip range, yet finite, so a zero advantage times the ratio is 0, not NaN.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossOutput:
    """Per-token loss and the per-token facts the metrics need. All [T]; masks are not yet loss-masked."""

    loss: Tensor  # the negated clipped objective (times the importance weight): minimise this
    ratio: Tensor  # pi_theta / pi_old, detached
    clipped_upper: Tensor  # bool: A > 0 and ratio > 1 + eps_high, so the token gets no gradient
    clipped_lower: Tensor  # bool: A < 0 and ratio < 1 - eps_low, so the token gets no gradient
    dual_clipped: Tensor  # bool: A < 0 and ratio > dual_clip, so the token gets no gradient


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    importance_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, r = exp(logprobs - old_logprobs).

    logprobs: [T] under the policy being trained (carries the gradient).
    old_logprobs: [T] under the policy that generated the batch, as recomputed by the trainer (no gradient).
    advantages: [T], the sample's advantage repeated on each of its tokens.
    dual_clip: c > 1 bounds the loss of negative-advantage tokens at -c A (Ye et al., 2020); None disables it.
    importance_weights: [T], multiplies each token's loss: the correction for the engine sampling from
        other numerics or older weights than pi_old (algo/importance.py); None: none.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape) or logprobs.dim() != 1:
        raise ValueError(
            "logprobs, old_logprobs and advantages must be 1-D and equal in shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}"
        )
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")

    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    ratio = torch.exp((logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)

    r = ratio.detach()
    positive, negative = advantages > 0, advantages < 0
    clipped_upper = positive & (r > 1 + eps_high)
    clipped_lower = negative & (r < 1 - eps_low)
    dual_clipped = torch.zeros_like(positive)
    if dual_clip is not None:
        dual_clipped = negative & (r > dual_clip)
        loss = torch.where(dual_clipped, -dual_clip * advantages, loss)

    if importance_weights is not None:
        if importance_weights.shape != logprobs.shape:
            shapes = f"{tuple(importance_weights.shape)} != logprobs {tuple(logprobs.shape)}"
            raise ValueError(f"importance_weights shape {shapes}")
        loss = loss * importance_weights.detach()
    return PolicyLossOutput(loss, r, clipped_upper, clipped_lower, dual_clipped)


def token_sample_index(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """[T] index of the sample that owns each token, after checking that cu_seqlens [S+1] packs T tokens."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [S+1], got {tuple(cu_seqlens.shape)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the token count {num_tokens}, got {cu_seqlens.tolist()[:8]}..."
        )
    samples = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(samples, lengths, output_size=num_tokens)


def _valid_tokens_per_sample(loss_mask: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """([T] sample index of each token, [S] number of valid tokens in each sample)."""
    sample = token_sample_index(cu_seqlens, loss_mask.numel()).to(loss_mask.device)
    valid = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long, device=loss_mask.device)
    valid.index_add_(0, sample, (loss_mask != 0).long())
    return sample, valid


def local_denominator(loss_mask: Tensor, cu_seqlens: Tensor, mode: LossAggregation) -> Tensor:
    """This micro-batch's share of the global denominator: valid tokens ("token"), or samples with at least
    one valid token ("sample", "sequence_sum"; a sample fully masked by overlong filtering does not count).

    loss_mask: [T] bool or 0/1; cu_seqlens: [S+1]. Returns a 0-d int64 tensor. Under context parallelism,
    call it on the micro-batch before it is split across CP ranks.
    """
    if mode == "token":
        return (loss_mask != 0).sum()
    if mode in ("sample", "sequence_sum"):
        _, valid = _valid_tokens_per_sample(loss_mask, cu_seqlens)
        return (valid > 0).sum()
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def aggregate_loss(
    token_loss: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    mode: LossAggregation,
    global_denominator: float | Tensor,
    *,
    tokens_per_sample: Tensor | None = None,
) -> Tensor:
    """This micro-batch's share of the mini-batch loss; summed over all micro-batches and DP ranks it equals
      "token":        sum of every valid token's loss / number of valid tokens (DAPO),
      "sample":       mean over samples of (mean over the sample's valid tokens) (GRPO),
      "sequence_sum": mean over samples of (sum over the sample's valid tokens).

    token_loss: [T]; loss_mask: [T] bool or 0/1; cu_seqlens: [S+1] (see module docstring).
    global_denominator: the sum of `local_denominator` over the whole mini-batch; clamped to >= 1 so that a
        mini-batch with nothing valid gives loss 0.
    tokens_per_sample: [S] valid tokens of each whole sample, only for "sample" under context parallelism
        (a rank then holds part of each sample); by default counted from loss_mask.
    Returns a 0-d tensor.
    """
    if token_loss.shape != loss_mask.shape or token_loss.dim() != 1:
        raise ValueError(
            f"token_loss and loss_mask must be 1-D and equal in shape, got "
            f"{tuple(token_loss.shape)} and {tuple(loss_mask.shape)}"
        )
    if isinstance(global_denominator, (int, float)) and global_denominator < 0:
        raise ValueError(f"global_denominator must be >= 0, got {global_denominator}")
    if not isinstance(global_denominator, Tensor):
        global_denominator = torch.tensor(float(global_denominator))
    denominator = global_denominator.to(token_loss.dtype).clamp(min=1)
    # where, not multiply: 0 * inf is NaN. (The gradient still needs finite log-probs at masked positions.)
    masked = torch.where(loss_mask != 0, token_loss, torch.zeros_like(token_loss))

    if mode == "token":
        return masked.sum() / denominator
    if mode not in ("sample", "sequence_sum"):
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    sample, valid = _valid_tokens_per_sample(loss_mask, cu_seqlens)
    per_sample = torch.zeros(valid.numel(), dtype=token_loss.dtype, device=token_loss.device)
    per_sample = per_sample.index_add(0, sample, masked)
    if mode == "sample":
        if tokens_per_sample is not None:
            if tokens_per_sample.shape != valid.shape:
                shapes = f"{tuple(tokens_per_sample.shape)} != {tuple(valid.shape)}"
                raise ValueError(f"tokens_per_sample must have one count per sample [S]: {shapes}")
            valid = tokens_per_sample
        per_sample = per_sample / valid.clamp(min=1).to(token_loss.dtype)
    return per_sample.sum() / denominator
