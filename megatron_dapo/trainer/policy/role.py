"""The policy role: every rank builds (or resumes) its share of the Megatron policy and trains it on the
share of each step that reaches it (trainer/distribute.py): pi_old first, then one clipped update per
mini-batch. It also saves and loads the whole run state, collectively."""

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.algo import (
    ImportanceCorrection,
    finalize_metrics,
    importance_metric_sums,
    importance_weights,
    merge_metric_sums,
    mismatch_metric_sums,
)
from megatron_dapo.checkpoint.rl_state import RLState, load_rl_state
from megatron_dapo.config import DapoConfig
from megatron_dapo.data.packing import PackedBatch, sequence_pad_multiple
from megatron_dapo.trainer.batch import RankBatch, StepBatch
from megatron_dapo.trainer.policy.build import build_policy
from megatron_dapo.trainer.policy.checkpointing import load_optimizer, optimizer_metadata, save_checkpoint
from megatron_dapo.trainer.policy.objective import DapoObjective, ObjectiveSettings, token_targets
from megatron_dapo.trainer.policy.train_step import StepResult, all_reduce_sums, forward_logprobs, train_step

logger = logging.getLogger("megatron_dapo.train")

Metrics = dict[str, dict[str, float]]  # group ("train", "timing", ...) -> name -> value
# Runs a part of the step under a name, e.g. the stall watchdog's deadline (trainer/watchdog.py):
# watch(phase, part) -> context manager.
PhaseHook = Callable[[str, str], contextlib.AbstractContextManager[object]]


def unwatched(phase: str, part: str) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext()


class PolicyRole:
    """This rank's stage of the policy, its optimizer and learning-rate schedule."""

    def __init__(
        self,
        cfg: DapoConfig,
        hf_config: dict[str, Any],
        pg: ProcessGroupCollection,
        *,
        weights: Path | None,
        watch: PhaseHook = unwatched,
    ) -> None:
        self.cfg, self.pg, self.watch = cfg, pg, watch
        self.policy = build_policy(cfg, hf_config, pg, weights=weights)
        self.settings = objective_settings(cfg)
        self.importance = importance_correction(cfg)
        p = cfg.parallel
        self.pad_multiple = sequence_pad_multiple(p.context, p.tensor, p.sequence_parallel)

    @property
    def model(self) -> torch.nn.Module:
        """This rank's stage, unwrapped: what checkpoints and weight sync read."""
        return self.policy.model

    def shard(self, batch: StepBatch) -> list[RankBatch]:
        """Rank 0: the step cut into one share per data-parallel rank, planned as training will run it."""
        return batch.shard(
            samples_per_minibatch=self.cfg.train.samples_per_minibatch,
            dp_size=self.pg.dp.size(),
            tokens_per_microbatch=self.cfg.train.tokens_per_microbatch,
            cp=self.cfg.parallel.context,
            pad_multiple=self.pad_multiple,
        )

    def train(self, share: RankBatch) -> Metrics:
        """Collective: pi_old for every mini-batch first (forward only), then one update per mini-batch."""
        started = time.perf_counter()
        self.policy.scheduler.step(1)  # warm-up counts rollout steps
        minibatches = share.microbatches(self.pad_multiple)
        with self.watch("old_logprobs", ""):
            old_logprobs = [self._old_logprobs(microbatches) for microbatches in minibatches]
            old_logprobs_s = time.perf_counter() - started
            mismatch = self._mismatch(share.data, old_logprobs)
            weights, importance = self._importance_weights(share.data, old_logprobs)
        results = []
        for update, (microbatches, old, is_weights) in enumerate(
            zip(minibatches, old_logprobs, weights, strict=True), 1
        ):
            with self.watch("update", f"{update}/{len(minibatches)}"):
                objective = self._objective(share.data, microbatches, old, is_weights)
                results.append(
                    train_step(
                        self.policy.ddp,
                        self.policy.optimizer,
                        microbatches,
                        objective,
                        self.policy.distribution,
                        self.pg,
                    )
                )
        for update, result in enumerate(results, 1):
            if not result.applied:
                logger.warning(
                    "update %d: loss %s, grad norm %s are not finite: update skipped",
                    update, result.loss, result.grad_norm,
                )  # fmt: skip
        lr = self.policy.optimizer.param_groups[0]["lr"]
        timing = {"old_logprobs_s": old_logprobs_s, "train_s": time.perf_counter() - started}
        train = update_metrics(results, lr=lr) | mismatch | importance
        # The first update's forward runs at pi_old's weights: a ratio off 1 means the two forwards differ.
        train["first_update_ratio_max_abs_dev"] = results[0].metrics["ratio_dev_max"]
        return {"train": train, "timing": timing}

    def save(self, root: Path, step: int, rollout_state: dict[str, Any]) -> Path:
        """Collective: the whole run state at `step`, atomically (checkpoint/rl_state.py). `rollout_state`
        is the rollout role's (given on rank 0 only)."""
        state = RLState(
            step=step,
            loader=rollout_state.get("loader", {}),
            sampler=rollout_state.get("sampler", {}),
            scheduler=self.policy.scheduler.state_dict(),
            extra={
                "optimizer_metadata": optimizer_metadata(),
                # the flights to continue and, overlapped, the next step's batch if already collected
                "rollout": {k: v for k, v in rollout_state.items() if k not in ("loader", "sampler")},
            },
        )
        return save_checkpoint(
            root,
            step,
            self.policy,
            state,
            hf_dir=Path(self.cfg.model.hf_path),
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def resume(self, ckpt: Path, rank: int) -> RLState:
        """Collective: optimizer and schedule of a step directory (the weights loaded with the model); returns
        the run state, whose loader and sampler parts the rollout role takes."""
        state = load_rl_state(ckpt, rank=rank)
        load_optimizer(ckpt, self.policy, state.extra["optimizer_metadata"])
        self.policy.scheduler.load_state_dict(state.scheduler)
        return state

    def _old_logprobs(self, microbatches: list[PackedBatch]) -> dict[int, torch.Tensor]:
        """log pi_old of each response token of this rank's samples, by sample id."""
        results = forward_logprobs(self.policy.ddp, microbatches, self.policy.distribution, self.pg)
        ids = [i for batch in microbatches for i in batch.sample_ids if i >= 0]
        return {i: logprobs for i, (logprobs, _) in zip(ids, results, strict=True)}

    def _mismatch(self, data: StepBatch, old_logprobs: list[dict[int, torch.Tensor]]) -> dict[str, float]:
        """Collective: train/mismatch_*, the engine's log-probs against pi_old over the response tokens of
        the samples the step's own weights generated (groups carried over from the step before came from
        older weights: what separates them from pi_old is training, not a mismatch); a warning above
        train.mismatch_kl_warn. Every rank of a DP group holds its samples' whole pi_old (forward_logprobs
        gathers CP shares), so reducing over DP alone counts each token once."""
        version = self.policy.scheduler.num_steps - 1  # the scheduler counts rollout steps, resumes included
        fresh = {i for i, v in enumerate(data.weight_versions.tolist()) if v == version}
        old_logprobs = [{i: lp for i, lp in minibatch.items() if i in fresh} for minibatch in old_logprobs]
        ids = [i for minibatch in old_logprobs for i in minibatch]
        # One call on every rank, even one without samples, so that all ranks reduce the same keys.
        empty = torch.zeros(0)
        old = torch.cat([empty, *(minibatch[i] for minibatch in old_logprobs for i in minibatch)])
        sums = mismatch_metric_sums(old, torch.cat([empty, *(data.rollout_logprobs[i] for i in ids)]))
        metrics = self._reduce_over_dp(sums)
        kl, limit = metrics.get("mismatch_kl", 0.0), self.cfg.train.mismatch_kl_warn
        if dist.get_rank() == 0 and not kl <= limit:  # a NaN warns too
            # The scheduler counts rollout steps, resumed ones included: this is the loop's step number.
            worst = metrics.get("mismatch_logprob_diff_max", math.nan)
            logger.warning(
                "step %d: train/mismatch_kl %.3g > train.mismatch_kl_warn %g (largest |log-prob diff| %.3g): "
                "the engine samples from other weights or numerics than pi_old; check weight sync",
                self.policy.scheduler.num_steps, kl, limit, worst,
            )  # fmt: skip
        return metrics

    def _importance_weights(
        self, data: StepBatch, old_logprobs: list[dict[int, torch.Tensor]]
    ) -> tuple[list[dict[int, torch.Tensor] | None], dict[str, float]]:
        """Collective when the correction is on: each mini-batch's importance weights by sample id, and
        train/is_* over the step. Formed once, before the first update, from whole samples (the ratio of a
        sequence needs all of its tokens, which a CP share does not hold); pi_old is whole on every rank
        of a DP group, so reducing over DP alone counts each token once."""
        if self.importance is None:
            return [None] * len(old_logprobs), {}
        weights = [
            weights_by_sample(minibatch, data.rollout_logprobs, self.importance) for minibatch in old_logprobs
        ]
        every = [w for minibatch in weights for w in minibatch.values()]
        return weights, self._reduce_over_dp(importance_metric_sums(torch.cat([torch.zeros(0), *every])))

    def _reduce_over_dp(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Collective: metric sums over the DP group, finalised (every rank must pass the same keys)."""
        device = next(self.policy.ddp.parameters()).device  # NCCL reduces device tensors only
        sums = {key: value.to(device) for key, value in sums.items()}
        all_reduce_sums(sums, self.pg.dp)
        return finalize_metrics(sums)

    def _objective(
        self,
        batch: StepBatch,
        microbatches: list[PackedBatch],
        old_logprobs: dict[int, torch.Tensor],
        weights: dict[int, torch.Tensor] | None,
    ) -> DapoObjective:
        device = next(self.policy.ddp.parameters()).device
        targets = {
            mb.sample_ids: token_targets(mb, batch, old_logprobs, self.settings, self.pg.cp, device, weights)
            for mb in microbatches
        }
        return DapoObjective(targets, self.settings)


def objective_settings(cfg: DapoConfig) -> ObjectiveSettings:
    a = cfg.algorithm
    return ObjectiveSettings(
        eps_low=a.clip_eps_low,
        eps_high=a.clip_eps_high,
        dual_clip=a.dual_clip,
        aggregation=a.loss_aggregation,
        overlong_filtering=a.overlong_filtering,
    )


def importance_correction(cfg: DapoConfig) -> ImportanceCorrection | None:
    a = cfg.algorithm
    if a.rollout_is_cap is None:
        return None
    return ImportanceCorrection(
        cap=a.rollout_is_cap, level=a.rollout_is_level, mode=a.rollout_is_mode, lower=a.rollout_is_lower
    )


def weights_by_sample(
    old_logprobs: dict[int, torch.Tensor],
    rollout_logprobs: list[torch.Tensor],
    correction: ImportanceCorrection,
) -> dict[int, torch.Tensor]:
    """Per-token importance weights of whole samples, by sample id (their responses laid end to end)."""
    ids = list(old_logprobs)
    lengths = torch.tensor([old_logprobs[i].numel() for i in ids], dtype=torch.long)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    empty = torch.zeros(0)
    old = torch.cat([empty, *(old_logprobs[i].float() for i in ids)])
    rollout = torch.cat([empty, *(rollout_logprobs[i].float() for i in ids)])
    weights = importance_weights(old, rollout, cu_seqlens, correction)
    return dict(zip(ids, weights.split(lengths.tolist()), strict=True))


def update_metrics(results: list[StepResult], *, lr: float) -> dict[str, float]:
    """The step's updates together: token metrics over all of them, loss and grad norm averaged."""
    applied = [r for r in results if r.applied]
    metrics = finalize_metrics(merge_metric_sums(r.metrics for r in applied)) if applied else {}
    metrics.update(
        loss=sum(r.loss for r in applied) / len(applied) if applied else math.nan,
        grad_norm=sum(r.grad_norm for r in applied) / len(applied) if applied else math.nan,
        lr=lr,
        updates=len(results),
        updates_skipped=len(results) - len(applied),
    )
    return metrics
