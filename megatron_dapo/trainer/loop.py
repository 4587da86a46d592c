"""The DAPO training loop: generate -> filter -> old log-probs -> train -> sync -> evaluate -> save.

`Trainer.fit` is the loop and reads like the paper's algorithm; each line is one method below it. Global
rank 0 drives the rollout engine (and launches it when no server is given); every rank trains its share.
"""

import contextlib
import logging
import math
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megatron_dapo.algo import DynamicSampler, finalize_metrics, merge_metric_sums
from megatron_dapo.checkpoint.hf_dir import read_config
from megatron_dapo.checkpoint.rl_state import RLState, latest_complete, load_rl_state
from megatron_dapo.config import ConfigError, DapoConfig, validate_launch
from megatron_dapo.data.dataset import PromptLoader
from megatron_dapo.data.packing import PackedBatch, sequence_pad_multiple
from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.evaluate import evaluate
from megatron_dapo.parallel.state import destroy_parallel, init_parallel, launched_world_size
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.sync import is_sender, sync_weights
from megatron_dapo.sync.broadcast import BroadcastTransport
from megatron_dapo.sync.placement import Colocation, servers_from_urls
from megatron_dapo.sync.tensor import TensorTransport
from megatron_dapo.sync.transport import WeightTransport
from megatron_dapo.trainer.batch import RankBatch, StepBatch
from megatron_dapo.trainer.checkpointing import (
    load_optimizer,
    optimizer_metadata,
    resume_point,
    save_checkpoint,
)
from megatron_dapo.trainer.data import load_eval_prompts, load_train_prompts
from megatron_dapo.trainer.distribute import distribute_batch
from megatron_dapo.trainer.engine import EngineConnection
from megatron_dapo.trainer.objective import DapoObjective, ObjectiveSettings, token_targets
from megatron_dapo.trainer.policy import build_policy, parallel_dims
from megatron_dapo.trainer.rollout import RewardSettings, RolloutCollector, RolloutSettings
from megatron_dapo.trainer.signals import StopRequest
from megatron_dapo.trainer.tracking import MetricsTracker
from megatron_dapo.trainer.train_step import StepResult, forward_logprobs, train_step

logger = logging.getLogger("megatron_dapo.train")

Metrics = dict[str, dict[str, float]]  # group ("rollout", "train", ...) -> name -> value
# Ranks other than 0 wait in a collective while rank 0 generates; a step's rollout can take long.
COLLECTIVE_TIMEOUT_MINUTES = 180


class Trainer:
    """Builds the run (or resumes it from its latest complete checkpoint) and trains it: `with Trainer(cfg)
    as trainer: trainer.fit()`."""

    def __init__(self, cfg: DapoConfig) -> None:
        self.cfg = cfg
        self._closing = contextlib.ExitStack()  # what was opened, closed in reverse order
        try:
            self._setup()
        except BaseException:
            self._closing.close()
            raise

    def fit(self) -> None:
        """One rollout step per iteration, until train.steps or a stop signal."""
        if self.step == 0 and (baseline := self.evaluate()):
            self.tracker.log(0, baseline)  # before any update
        while self.step < self.cfg.train.steps:
            self.step += 1
            metrics: Metrics = defaultdict(dict)
            # G samples per prompt, rewarded; dynamic sampling keeps groups with 0 < #correct < G
            share = self.generate(metrics)  # this data-parallel rank's samples, with their advantages
            self.train(share, metrics)  # pi_old log-probs, then one clipped update per mini-batch
            self.sync_weights(metrics)  # the engine samples the next step from the new policy
            if self._due(self.cfg.eval.every_steps):
                _merge(metrics, self.evaluate())
            stop = self.stop.requested()
            self.tracker.log(self.step, metrics)
            if stop or self._due(self.cfg.checkpoint.save_every_steps):
                self.save()
            if stop:
                by = self.stop.received.name if self.stop.received else "a signal to another rank"
                logger.info("stopped by %s after step %d; run the same command to resume", by, self.step)
                return

    # ---- the steps of the loop ---------------------------------------------------------------------------

    def generate(self, metrics: Metrics) -> RankBatch:
        """Rank 0 runs the step's rollout and normalises advantages over each whole group; every rank then
        receives its own data-parallel share, as tensors (trainer/distribute.py)."""
        shares = None
        if self.rank == 0:
            groups, rollout_metrics = self.engine.run(self.collector.collect(self.step))
            _merge(metrics, rollout_metrics)
            if self.colocated:  # training needs the GPU memory the servers hold
                self.engine.run(self.engine.client.release_memory())
                self._engine_released = True
            batch = StepBatch.from_groups(groups, scale_by_std=self.cfg.algorithm.scale_advantage_by_std)
            p = self.cfg.parallel
            shares = batch.shard(
                samples_per_minibatch=self.cfg.train.samples_per_minibatch,
                dp_size=self.pg.dp.size(),
                tokens_per_microbatch=self.cfg.train.tokens_per_microbatch,
                cp=p.context,
                pad_multiple=self.pad_multiple,
            )
        return distribute_batch(shares, self.pg)

    def train(self, share: RankBatch, metrics: Metrics) -> None:
        """pi_old for every mini-batch first (forward only), then one gradient update per mini-batch."""
        started = time.perf_counter()
        self.policy.scheduler.step(1)  # warm-up counts rollout steps
        minibatches = share.microbatches(self.pad_multiple)
        old_logprobs = [self._old_logprobs(microbatches) for microbatches in minibatches]
        metrics["timing"]["old_logprobs_s"] = time.perf_counter() - started
        results = [
            train_step(
                self.policy.ddp,
                self.policy.optimizer,
                microbatches,
                self._objective(share.data, microbatches, old),
                self.policy.distribution,
                self.pg,
            )
            for microbatches, old in zip(minibatches, old_logprobs, strict=True)
        ]
        for update, result in enumerate(results, 1):
            if not result.applied:
                logger.warning(
                    "step %d, update %d: loss %s, grad norm %s are not finite: update skipped",
                    self.step, update, result.loss, result.grad_norm,
                )  # fmt: skip
        metrics["train"] = _update_metrics(results, lr=self.policy.optimizer.param_groups[0]["lr"])
        metrics["timing"]["train_s"] = time.perf_counter() - started

    def sync_weights(self, metrics: Metrics | None = None) -> None:
        """Collective: the policy's weights to the engine, as weight version `step`."""
        released = self.rank == 0 and self._engine_released
        if released:  # weights first, so that the KV cache does not take their memory
            self.engine.run(self.engine.client.resume_memory(["weights"]))
        report = sync_weights(
            self.policy.model,
            self.hf_config,
            self.pg,
            self.transport,
            self.engine.client if self.engine else None,
            self.engine.loop.loop if self.engine else None,
            weight_version=self.step,
            dtype=self.engine_dtype,
            bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 2**20,
        )
        if released:
            self.engine.run(self.engine.client.resume_memory(["kv_cache"]))
            self._engine_released = False
        if metrics is not None:
            metrics["weight_sync"] = report.metrics(prefix="")
            metrics["timing"]["weight_sync_s"] = report.seconds

    def evaluate(self) -> Metrics:
        """Rank 0 samples the evaluation set through the engine (the paper: avg@32, T 1.0, top-p 0.7)."""
        if self.rank != 0 or not self.eval_prompts:
            return {}
        started = time.perf_counter()
        e = self.cfg.eval
        params = SamplingParams(
            temperature=e.temperature,
            top_p=e.top_p,
            max_new_tokens=e.max_response_tokens or self.cfg.rollout.max_response_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=self.cfg.train.seed,  # the same seeds at every evaluation: differences come from the policy
        )
        result = self.engine.run(
            evaluate(
                self.engine.client,
                self.eval_prompts,
                samples_per_problem=e.samples_per_problem,
                params=params,
                tokenizer=self.tokenizer,
                boxed_fallback=self.cfg.algorithm.boxed_fallback,
                progress_desc=None,
            )
        )
        return {"eval": result.metrics(), "timing": {"eval_s": time.perf_counter() - started}}

    def save(self) -> None:
        """Collective: the whole run state at this step, atomically (checkpoint/rl_state.py)."""
        started = time.perf_counter()
        state = RLState(
            step=self.step,
            loader=self.loader.state_dict() if self.rank == 0 else {},
            sampler=self.sampler.state_dict() if self.rank == 0 else {},
            scheduler=self.policy.scheduler.state_dict(),
            extra={"optimizer_metadata": optimizer_metadata()},
        )
        path = save_checkpoint(
            self.checkpoint_root,
            self.step,
            self.policy,
            state,
            hf_dir=Path(self.cfg.model.hf_path),
            keep_last=self.cfg.checkpoint.keep_last,
        )
        logger.info("saved %s", path)
        self.tracker.log(self.step, {"timing": {"save_s": time.perf_counter() - started}})

    # ---- helpers ---------------------------------------------------------------------------------------

    def _due(self, every_steps: int) -> bool:
        return every_steps > 0 and (self.step % every_steps == 0 or self.step == self.cfg.train.steps)

    def _old_logprobs(self, microbatches: list[PackedBatch]) -> dict[int, torch.Tensor]:
        """log pi_old of each response token of this rank's samples, by sample id."""
        results = forward_logprobs(self.policy.ddp, microbatches, self.policy.distribution, self.pg)
        ids = [i for batch in microbatches for i in batch.sample_ids if i >= 0]
        return {i: logprobs for i, (logprobs, _) in zip(ids, results, strict=True)}

    def _objective(
        self, batch: StepBatch, microbatches: list[PackedBatch], old_logprobs: dict[int, torch.Tensor]
    ) -> DapoObjective:
        device = next(self.policy.ddp.parameters()).device
        targets = {
            mb.sample_ids: token_targets(mb, batch, old_logprobs, self.objective_settings, self.pg.cp, device)
            for mb in microbatches
        }
        return DapoObjective(targets, self.objective_settings)

    # ---- set-up ----------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        validate_launch(cfg, world_size=launched_world_size(), cuda=torch.cuda.is_available())
        self.pg = init_parallel(
            parallel_dims(cfg), seed=cfg.train.seed, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES
        )
        self._closing.callback(destroy_parallel)
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.logging.dir)
        self.checkpoint_root = (
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        )
        self.hf_config = read_config(Path(cfg.model.hf_path))
        if self.rank == 0:
            self._load_data()  # first: a bad row is reported before the model is built or a server started
        latest = latest_complete(self.checkpoint_root)
        if latest is not None and not cfg.checkpoint.resume:
            raise ConfigError(
                f"checkpoint.resume=false but {self.checkpoint_root} holds checkpoints (the latest: "
                f"{latest.name}): set checkpoint.resume=true to continue that run, or give this one "
                "another logging.dir"
            )
        resume_from = resume_point(self.checkpoint_root, fallback=cfg.checkpoint.resume_fallback)
        initial = resume_from or (Path(cfg.model.load) if cfg.model.load else None)
        self.policy = build_policy(cfg, self.hf_config, self.pg, weights=initial)
        self.step = 0
        if resume_from is not None:
            self._resume(resume_from)
        self.objective_settings = _objective_settings(cfg)
        p = cfg.parallel
        self.pad_multiple = sequence_pad_multiple(p.context, p.tensor, p.sequence_parallel)
        self._connect_engine()
        self.tracker = self._closing.enter_context(
            MetricsTracker(
                self.run_dir,
                is_writer=self.rank == 0,
                total_steps=cfg.train.steps,
                first_step=self.step + 1 if resume_from else 0,
                tensorboard=cfg.logging.tensorboard,
                progress_bar=cfg.logging.progress_bar,
            )
        )
        self.stop = StopRequest()
        self._closing.callback(self.stop.close)
        self.sync_weights()  # the servers may hold other weights (a resumed run, or servers given by URL)

    def _load_data(self) -> None:
        """Rank 0: the tokenizer, the prompt stream and its sampler, the evaluation problems."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(Path(cfg.data.tokenizer_path or cfg.model.hf_path))
        prompts = load_train_prompts(cfg, self.tokenizer)
        self.loader = PromptLoader(prompts, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self.eval_prompts = load_eval_prompts(cfg, self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = (eos,) if eos is not None else ()
        self.sampler = DynamicSampler(
            cfg.train.prompts_per_step,
            enabled=cfg.algorithm.dynamic_sampling,
            max_rounds=cfg.algorithm.max_sampling_rounds,
        )

    def _resume(self, ckpt: Path) -> None:
        """Every rank: optimizer, scheduler and step counters; rank 0 also the prompt stream and the
        carried-over groups. The model weights were loaded when the policy was built."""
        state = load_rl_state(ckpt, rank=self.rank)
        load_optimizer(ckpt, self.policy, state.extra["optimizer_metadata"])
        self.policy.scheduler.load_state_dict(state.scheduler)
        if self.rank == 0:
            self.loader.load_state_dict(state.loader)
            self.sampler.load_state_dict(state.sampler)
        self.step = state.step
        if self.rank == 0:
            logger.info("resumed from %s (step %d)", ckpt, self.step)

    def _connect_engine(self) -> None:
        """Rank 0 starts (or finds) the servers; every weight-sync sender connects to them."""
        r = self.cfg.rollout
        self.colocated = r.colocate and torch.cuda.is_available()
        self._engine_released = False  # the servers gave their GPU memory to training
        self.engine_dtype = getattr(torch, self.cfg.model.dtype) if r.backend == "sglang" else torch.float32
        servers: list[Any] = [None]  # (urls, API key): senders need the key of servers launched here
        self.engine: EngineConnection | None = None
        if self.rank == 0:
            self.engine = EngineConnection.start(
                r, model_path=self.cfg.model.hf_path, log_dir=self.run_dir / "logs", seed=self.cfg.train.seed
            )
            self._closing.callback(self.engine.close)
            servers = [(self.engine.urls, self.engine.api_key)]
        dist.broadcast_object_list(servers, src=0)
        urls, api_key = servers[0]
        self.transport = self._weight_transport(urls)
        if self.rank != 0 and is_sender(self.pg, self.transport):
            self.engine = EngineConnection(urls, api_key=api_key)
            self._closing.callback(self.engine.close)
        if self.rank == 0:
            settings = RolloutSettings(
                samples_per_prompt=self.cfg.algorithm.samples_per_prompt,
                params=SamplingParams(
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    max_new_tokens=r.max_response_tokens,
                    stop_token_ids=self.stop_token_ids,
                ),
                max_inflight_prompts=r.max_inflight_prompts or 2 * self.cfg.train.prompts_per_step,
                seed=self.cfg.train.seed,
                deterministic=self.cfg.train.deterministic,
                reward=_reward_settings(self.cfg),
            )
            self.collector = RolloutCollector(
                self.engine.client, self.loader, self.sampler, self.tokenizer, settings
            )

    def _weight_transport(self, urls: list[str]) -> WeightTransport:
        """Collective. Shared GPUs: handles to memory (CUDA IPC, or /dev/shm for the CPU engine); servers on
        their own GPUs: an NCCL broadcast. Colocated servers named by node host names (the Slurm launch) run
        on several nodes: each then takes its weights from the training ranks on its own GPUs."""
        r = self.cfg.rollout
        if not (self.colocated or r.backend == "cpu"):
            return BroadcastTransport(urls, engine_tp_size=r.server_tp, master_address=socket.gethostname())
        colocation = None
        if self.colocated and not all(_is_loopback(url) for url in urls):
            servers = servers_from_urls(urls, base_port=r.base_port, server_tp=r.server_tp)
            colocation = Colocation.discover(servers)
        return TensorTransport(
            engine_tp_size=r.server_tp,
            colocation=colocation,
            host_memory=r.backend == "cpu",
        )

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _objective_settings(cfg: DapoConfig) -> ObjectiveSettings:
    a = cfg.algorithm
    return ObjectiveSettings(
        eps_low=a.clip_eps_low,
        eps_high=a.clip_eps_high,
        dual_clip=a.dual_clip,
        aggregation=a.loss_aggregation,
        overlong_filtering=a.overlong_filtering,
        importance_cap=a.rollout_is_cap,
    )


def _reward_settings(cfg: DapoConfig) -> RewardSettings:
    a = cfg.algorithm
    return RewardSettings(
        max_response_tokens=cfg.rollout.max_response_tokens,
        overlong_buffer_tokens=a.overlong_buffer_tokens if a.overlong_penalty else None,
        boxed_fallback=a.boxed_fallback,
    )


def _update_metrics(results: list[StepResult], *, lr: float) -> dict[str, float]:
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


def _is_loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _merge(metrics: Metrics, more: Metrics) -> None:
    for group, values in more.items():
        metrics[group].update(values)
