"""One policy update, and forward-only log-probs, through megatron-core's pipeline schedules.

Megatron owns pipelining and micro-batching; `forward_step` returns `(output, partial(loss_fn, batch))`. The
loss runs in megatron's per-token mode: each micro-batch returns (summed loss, its integer share of the
denominator), and megatron divides the gradients, summed over all micro-batches and data/context-parallel
ranks, by the all-reduced denominator: the token (or sample) count of the whole mini-batch. So a step gives
the same update for any TP/PP/CP/DP split and any micro-batching.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor, nn

from megatron_dapo.data.packing import PackedBatch
from megatron_dapo.model.policy import TokenDistribution, run_stage, token_logprobs, token_loss
from megatron_dapo.parallel.context import gather_from_cp


class PolicyObjective(Protocol):
    """The loss of a micro-batch as a sum of per-token terms (the memory-bounded path forms it by chunks).

    `batch` is this rank's share of the micro-batch (after the CP split).
    """

    def token_loss(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor, tokens: slice) -> Tensor:
        """Summed loss of `batch`'s tokens `tokens`, whose log-probs and entropy are given; NOT divided by the
        mini-batch denominator."""

    def denominator(self, batch: PackedBatch) -> Tensor:
        """This rank's integer share of the mini-batch denominator (e.g. its valid tokens)."""

    def metrics(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        """Sums to report (detached inputs); keys ending in "_max" are reduced with max."""


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False: the loss or the gradient was not finite and the update was skipped
    loss: float  # summed loss / denominator over the whole mini-batch
    grad_norm: float  # global gradient norm before clipping
    metrics: dict[str, float]  # the objective's sums over the mini-batch, and "loss_sum", "denominator"


def train_step(
    model: nn.Module,
    optimizer: MegatronOptimizer,
    microbatches: Sequence[PackedBatch],
    objective: PolicyObjective,
    distribution: TokenDistribution,
    pg_collection: ProcessGroupCollection,
) -> StepResult:
    """Forward-backward over this DP rank's micro-batches (whole sequences; split over CP here), then step.

    `model` and `optimizer` come from model/training.py's `setup_training`.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    device = next(model.parameters()).device
    local = [batch.cp_share(pg_collection.cp).to(device) for batch in microbatches]
    forward_step = partial(
        _forward_step, distribution=distribution, tp_group=pg_collection.tp, objective=objective
    )
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(local),
        model=[model],
        num_microbatches=len(local),
        seq_length=max(batch.tokens.numel() for batch in local),
        micro_batch_size=1,
        forward_only=False,
    )
    sums = _sum_reports(reports, device)

    # A non-finite loss anywhere skips the step everywhere. The flag stays on the device and is read only
    # after megatron's own grad-norm sync below, so checking it adds no stall.
    loss_not_finite = torch.zeros((), device=device)
    if sums:
        loss_not_finite = (~torch.isfinite(sums["loss_sum"])).float()
    dist.all_reduce(loss_not_finite, op=dist.ReduceOp.MAX)
    found_inf = optimizer.prepare_grads()  # unscales fp16 gradients; False otherwise
    clip = optimizer.config.clip_grad
    # Megatron reads the global norm on the host here, to compute the clip coefficient.
    grad_norm = optimizer.clip_grad_norm(clip) if clip > 0 else optimizer.get_grad_norm()
    applied = not found_inf and math.isfinite(grad_norm) and not loss_not_finite.item()
    if applied:
        optimizer.step_with_ready_grads()
    else:
        optimizer.zero_grad()

    metrics = _reduce_over_ranks(sums, pg_collection)
    loss = metrics["loss_sum"] / max(metrics["denominator"], 1.0)
    return StepResult(applied=applied, loss=loss, grad_norm=grad_norm, metrics=metrics)


@torch.no_grad()
def forward_logprobs(
    model: nn.Module,
    microbatches: Sequence[PackedBatch],
    distribution: TokenDistribution,
    pg_collection: ProcessGroupCollection,
) -> list[tuple[Tensor, Tensor]]:
    """(log-probs, entropy) of the response tokens of each sequence in `microbatches`, in order (fillers
    skipped), on every rank of this DP group, on the CPU. The old log-probs of an update."""
    device = next(model.parameters()).device
    local = [batch.cp_share(pg_collection.cp).to(device) for batch in microbatches]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, distribution=distribution, tp_group=pg_collection.tp),
        data_iterator=iter(local),
        model=[model],
        num_microbatches=len(local),
        seq_length=max(batch.tokens.numel() for batch in local),
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    results = []
    for index, (batch, local_batch) in enumerate(zip(microbatches, local, strict=True)):
        per_token = _from_last_stage(outputs[index] if outputs else None, local_batch, pg_collection.pp)
        logprobs, entropy = gather_from_cp(per_token, list(batch.seq_lens), pg_collection.cp).cpu().unbind(1)
        pairs = zip(batch.gather_response(logprobs), batch.gather_response(entropy), strict=True)
        results += [pair for pair, sample in zip(pairs, batch.sample_ids, strict=True) if sample >= 0]
    return results


def _forward_step(data_iterator, model, *, distribution, tp_group, objective=None):
    batch = next(data_iterator)
    output = run_stage(model, batch, distribution)
    return output, partial(_loss, batch, model, distribution, tp_group, objective)


def _loss(batch, model, distribution, tp_group, objective, output, non_loss_data=False):
    """Last stage. Forward only: [t, 2] (log-prob, entropy). Training: megatron's (loss, count, report)."""
    if non_loss_data:
        return torch.stack(token_logprobs(output, batch, model, distribution, tp_group), dim=1)
    loss_sum, logprobs, entropy = token_loss(
        output, batch, model, distribution, tp_group, partial(objective.token_loss, batch)
    )
    denominator = objective.denominator(batch)
    report = {"loss_sum": loss_sum.detach(), "denominator": denominator.detach()}
    report.update(objective.metrics(batch, logprobs, entropy))
    return loss_sum, denominator, report


def _sum_reports(reports: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """The micro-batches' reports (on the last stage; none elsewhere) -> float64 sum (or max) per key."""
    sums: dict[str, Tensor] = {}
    for report in reports:
        for key, value in report.items():
            value = value.detach().to(device, torch.float64)
            if key not in sums:
                sums[key] = value
            else:
                sums[key] = torch.maximum(sums[key], value) if key.endswith("_max") else sums[key] + value
    return sums


def all_reduce_sums(sums: dict[str, Tensor], group: dist.ProcessGroup) -> None:
    """In place, over `group`: SUM every key but those ending in "_max" (MAX). Every rank must hold the same
    keys, inserted in the same order."""
    for key, value in sums.items():
        op = dist.ReduceOp.MAX if key.endswith("_max") else dist.ReduceOp.SUM
        dist.all_reduce(value, op=op, group=group)


def _reduce_over_ranks(sums: dict[str, Tensor], pg_collection: ProcessGroupCollection) -> dict[str, float]:
    """Reduce over data- and context-parallel ranks on the last stage; hand the totals to every stage."""
    all_reduce_sums(sums, pg_collection.dp_cp)
    totals = [{key: value.item() for key, value in sums.items()}]
    pp = pg_collection.pp
    if pp.size() > 1:
        dist.broadcast_object_list(totals, group_src=pp.size() - 1, group=pp)
    return totals[0]


def _from_last_stage(per_token: Tensor | None, batch: PackedBatch, pp_group: dist.ProcessGroup) -> Tensor:
    """This rank's [t, 2] (log-prob, entropy) of `batch`, sent from the last pipeline stage to every stage."""
    if pp_group.size() == 1:
        return per_token
    if per_token is None:
        per_token = torch.empty(batch.tokens.numel(), 2, device=batch.tokens.device)
    dist.broadcast(per_token, group_src=pp_group.size() - 1, group=pp_group)
    return per_token
