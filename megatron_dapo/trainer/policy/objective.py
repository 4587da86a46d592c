"""The DAPO objective of one mini-batch, as train_step's PolicyObjective: algo/loss.py per token, over the
packed micro-batches of this rank.

Megatron runs in per-token loss mode: each micro-batch returns its summed loss and its share of the
mini-batch denominator, and Megatron divides the gradients, summed over all micro-batches and DP/CP ranks, by
the all-reduced denominator. So the token-level mean (DAPO) is taken over the whole mini-batch, never per
micro-batch; "sample" (GRPO) and "sequence_sum" divide by the number of samples in the same way.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dapo.algo import (
    LossAggregation,
    aggregate_loss,
    local_denominator,
    overlong_filter_mask,
    policy_loss,
    token_metric_sums,
)
from megatron_dapo.data.packing import PackedBatch
from megatron_dapo.parallel.context import split_for_cp
from megatron_dapo.trainer.batch import StepBatch


@dataclass(frozen=True)
class ObjectiveSettings:
    eps_low: float
    eps_high: float  # clip-higher when > eps_low
    dual_clip: float | None
    aggregation: LossAggregation
    overlong_filtering: bool  # truncated samples contribute no gradient


@dataclass(frozen=True)
class TokenTargets:
    """What the loss needs on each token of one micro-batch, on this CP rank's share (0 off the response)."""

    old_logprobs: Tensor  # [t] float32: log pi_old, recomputed by the trainer
    advantages: Tensor  # [t] float32
    importance_weights: Tensor | None  # [t] float32: each token's importance weight; None: no correction
    loss_mask: Tensor  # [t] bool: response tokens that train (truncated samples masked when filtering,
    # tokens or samples the importance correction rejects masked too)
    tokens_per_sample: Tensor  # [S] valid tokens of each whole packed sequence (not only this CP share)
    denominator: Tensor  # 0-d int64: this micro-batch's share of the mini-batch denominator


def token_targets(
    batch: PackedBatch,
    step: StepBatch,
    old_logprobs: Mapping[int, Tensor],
    settings: ObjectiveSettings,
    cp_group: dist.ProcessGroup,
    device: torch.device,
    importance_weights: Mapping[int, Tensor] | None = None,
) -> TokenTargets:
    """Per-token targets of one whole (not CP-split) micro-batch, then this rank's CP share of them.

    importance_weights: each sample's per-token weights (algo/importance.py), by sample id, formed from whole
    samples before the step's first update; a weight of 0 rejects its token, which then leaves the loss
    mask and so the denominator (a rejected sample counts as not drawn), as in the reference.
    """
    real = [i for i in batch.sample_ids if i >= 0]  # a filler micro-batch has none

    def per_token(values: Sequence[Tensor]) -> Tensor:
        return batch.scatter_response(list(values) if real else [torch.zeros(0)])

    cu_seqlens = batch.token_cu_seqlens()
    loss_mask = batch.loss_mask
    if settings.overlong_filtering and real:
        loss_mask = overlong_filter_mask(loss_mask, cu_seqlens, step.truncated[real])
    weights = None
    if importance_weights is not None:
        weights = per_token(importance_weights[i] for i in real)
        loss_mask = (loss_mask != 0) & (weights != 0)
    # The denominator is counted once, on the whole micro-batch; Megatron sums it over DP and CP ranks, so
    # only CP rank 0 reports it.
    denominator = local_denominator(loss_mask, cu_seqlens, settings.aggregation)
    if cp_group.rank() != 0:
        denominator = torch.zeros_like(denominator)

    def share(x: Tensor) -> Tensor:
        return split_for_cp(x, list(batch.seq_lens), cp_group).to(device)

    valid_per_sequence = torch.bincount(
        batch.sample_of_token, weights=loss_mask.double(), minlength=len(batch.seq_lens)
    )
    return TokenTargets(
        old_logprobs=share(per_token(old_logprobs[i].float() for i in real)),
        advantages=share(per_token(step.advantages[i].expand(step.response_tokens(i)) for i in real)),
        importance_weights=None if weights is None else share(weights),
        loss_mask=share(loss_mask),
        tokens_per_sample=valid_per_sequence.long().to(device),
        denominator=denominator.to(device),
    )


class DapoObjective:
    """Clip-higher surrogate (optionally dual-clipped and importance-weighted), aggregated as configured.

    Holds the targets of every micro-batch of this rank's mini-batch, found by the micro-batch's sample ids
    (train_step hands over copies moved and CP-split, so identity cannot be used).
    """

    def __init__(self, targets: Mapping[tuple[int, ...], TokenTargets], settings: ObjectiveSettings) -> None:
        self.targets = targets
        self.settings = settings

    def _loss(self, target: TokenTargets, logprobs: Tensor, tokens: slice):
        s = self.settings
        weights = target.importance_weights
        return policy_loss(
            logprobs,
            target.old_logprobs[tokens],
            target.advantages[tokens],
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            dual_clip=s.dual_clip,
            importance_weights=None if weights is None else weights[tokens],
        )

    def token_loss(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor, tokens: slice) -> Tensor:
        """Summed loss of tokens `tokens` (a chunk on the memory-bounded path), not yet divided by the
        mini-batch denominator: aggregate_loss with denominator 1, per-sample counts of whole samples."""
        target = self.targets[batch.sample_ids]
        # Tokens of one sequence are contiguous, so counting each sequence's tokens in the chunk gives the
        # chunk's own sequence boundaries (sequences outside it have length 0).
        counts = torch.bincount(batch.sample_of_token[tokens], minlength=len(batch.seq_lens))
        cu_seqlens = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return aggregate_loss(
            self._loss(target, logprobs, tokens).loss,
            target.loss_mask[tokens],
            cu_seqlens,
            self.settings.aggregation,
            1,
            tokens_per_sample=target.tokens_per_sample if self.settings.aggregation == "sample" else None,
        )

    def denominator(self, batch: PackedBatch) -> Tensor:
        return self.targets[batch.sample_ids].denominator

    def metrics(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        target = self.targets[batch.sample_ids]
        out = self._loss(target, logprobs, slice(0, logprobs.shape[0]))
        return token_metric_sums(out, logprobs, entropy, target.loss_mask)
