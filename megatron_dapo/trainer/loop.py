"""The DAPO training loop: generate -> filter -> old log-probs -> train -> sync -> evaluate -> save.

Two roles do the work and this file only calls them: the rollout role (trainer/rollout/, global rank 0: the
engine, the prompt stream, dynamic sampling, evaluation) and the policy role (trainer/policy/, every rank:
the Megatron policy and its updates). Each step's batch goes from the one to the other as tensors, each
data-parallel rank receiving its own share (trainer/distribute.py); the weights go back through the
publisher (sync/publisher.py). An overlapped loop is another file of calls on the same roles. Every phase
of a step (rollout, old log-probs, each update, weight sync, evaluation, save) runs under the stall
watchdog's deadline (trainer/watchdog.py), so that a hang ends in stacks, a report and a requeue.
"""

import contextlib
import logging
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.checkpoint.hf_dir import read_config
from megatron_dapo.config import DapoConfig, validate_launch
from megatron_dapo.parallel.state import destroy_parallel, init_parallel, launched_world_size
from megatron_dapo.sync.publisher import WeightPublisher
from megatron_dapo.trainer.batch import RankBatch
from megatron_dapo.trainer.distribute import distribute_batch
from megatron_dapo.trainer.policy.build import parallel_dims
from megatron_dapo.trainer.policy.checkpointing import checkpoint_to_resume
from megatron_dapo.trainer.policy.role import PolicyRole
from megatron_dapo.trainer.rollout.role import RolloutRole
from megatron_dapo.trainer.signals import StopRequest
from megatron_dapo.trainer.tracking import MetricsTracker
from megatron_dapo.trainer.watchdog import watchdog_for

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
            _merge(metrics, self.policy.train(share))  # pi_old, then one clipped update per mini-batch
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

    def generate(self, metrics: Metrics) -> RankBatch:
        """Rank 0 runs the rollout and cuts the step into data-parallel shares; each rank receives its own."""
        with self.watchdog.phase("rollout", self.step):  # every rank: the others wait in `distribute`
            shares = None
            if self.rollout is not None:
                self.rollout.check_servers(self.step - 1)  # the weight version of the last sync
                batch, rollout_metrics = self.rollout.generate(self.step)
                _merge(metrics, rollout_metrics)
                self.publisher.release_engine_memory()  # training needs the memory colocated servers hold
                shares = self.policy.shard(batch)
            return self.distribute(shares)

    def sync_weights(self, metrics: Metrics | None = None) -> None:
        """Collective: the policy's weights to the engine, as weight version `step`; generation running
        ahead of training pauses meanwhile."""
        if self.cfg.rollout.max_staleness > 0:
            with self.watchdog.phase("rollout", self.step):  # the other ranks wait in the barrier
                if self.rollout is not None:
                    self.rollout.pause()
                dist.barrier()
        with self.watchdog.phase("weight_sync", self.step):
            report = self.publisher.publish(self.policy.model, self.hf_config, self.step)
        if self.rollout is not None:
            self.rollout.resume(self.step)
        if metrics is not None:
            metrics["weight_sync"] = report.metrics(prefix="")
            metrics["timing"]["weight_sync_s"] = report.seconds

    def evaluate(self) -> Metrics:
        with self.watchdog.phase("eval", self.step):
            return self.rollout.evaluate() if self.rollout is not None else {}

    def save(self) -> None:
        """Collective: the whole run state at this step, atomically."""
        started = time.perf_counter()
        rollout_state = self.rollout.state_dict() if self.rollout is not None else {}
        with self.watchdog.phase("save", self.step):
            path = self.policy.save(self.checkpoint_root, self.step, rollout_state)
        logger.info("saved %s", path)
        self.tracker.log(self.step, {"timing": {"save_s": time.perf_counter() - started}})

    def _due(self, every_steps: int) -> bool:
        return every_steps > 0 and (self.step % every_steps == 0 or self.step == self.cfg.train.steps)

    def _setup(self) -> None:
        cfg = self.cfg
        validate_launch(cfg, world_size=launched_world_size(), cuda=torch.cuda.is_available())
        self.pg = init_parallel(
            parallel_dims(cfg), seed=cfg.train.seed, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES
        )
        self._closing.callback(destroy_parallel)
        self.distribute = partial(distribute_batch, pg=self.pg)
        self.run_dir = Path(cfg.logging.dir)
        self.checkpoint_root = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.hf_config = read_config(Path(cfg.model.hf_path))
        # First: a bad row is reported before the model is built or a server started.
        self.rollout = RolloutRole(cfg) if dist.get_rank() == 0 else None
        if self.rollout is not None:
            self._closing.callback(self.rollout.close)
        # After the data: a run refused for a bad row leaves no directory behind.
        self.watchdog = watchdog_for(cfg, rank=dist.get_rank(), world_size=dist.get_world_size())
        self._closing.callback(self.watchdog.close)
        resume_from = checkpoint_to_resume(self.checkpoint_root, cfg.checkpoint)
        initial = resume_from or (Path(cfg.model.load) if cfg.model.load else None)
        self.policy = PolicyRole(cfg, self.hf_config, self.pg, weights=initial, watch=self.watchdog.phase)
        self.step = 0
        if resume_from is not None:
            state = self.policy.resume(resume_from, rank=dist.get_rank())
            if self.rollout is not None:
                rollout_state = {"loader": state.loader, "sampler": state.sampler}
                self.rollout.load_state_dict(rollout_state | state.extra.get("rollout", {}))
                logger.info("resumed from %s (step %d)", resume_from, state.step)
            self.step = state.step
        engine = self.rollout.start_engine(self.run_dir / "logs") if self.rollout is not None else None
        self.publisher = WeightPublisher(cfg, self.pg, engine, self._closing)
        first_step = self.step + 1 if resume_from else 0
        self.tracker = self._closing.enter_context(
            MetricsTracker.for_run(cfg, is_writer=dist.get_rank() == 0, first_step=first_step)
        )
        self.stop = StopRequest()
        self._closing.callback(self.stop.close)
        self.sync_weights()  # the servers may hold other weights (a resumed run, or servers given by URL)

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _merge(metrics: Metrics, more: Metrics) -> None:
    for group, values in more.items():
        metrics[group].update(values)
