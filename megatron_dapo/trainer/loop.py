"""The DAPO training loop: generate -> filter -> old log-probs -> train -> sync -> evaluate -> save.

Two roles do the work and this file only calls them: the rollout role (trainer/rollout/, global rank 0: the
engine, the prompt stream, dynamic sampling, evaluation) and the policy role (trainer/policy/, every rank:
the Megatron policy and its updates). Each step's batch goes from the one to the other as tensors, each
data-parallel rank receiving its own share (trainer/distribute.py); the weights go back through the
publisher (sync/publisher.py); trainer/setup.py builds them all. Asynchronous DAPO (rollout.max_staleness
> 0) runs these same calls: the rollout role collects the next step's batch while this one trains, and
pauses around each weight update (one loop, not a second: the overlap lives where the generation does).
Every phase of a step (rollout, old log-probs, each update, weight sync, evaluation, save) runs under the
stall watchdog's deadline (trainer/watchdog.py), so that a hang ends in stacks, a report and a requeue.
"""

import contextlib
import logging
import time
from collections import defaultdict

import torch.distributed as dist

from megatron_dapo.config import DapoConfig
from megatron_dapo.trainer.batch import RankBatch
from megatron_dapo.trainer.setup import build_run

logger = logging.getLogger("megatron_dapo.train")

Metrics = dict[str, dict[str, float]]  # group ("rollout", "train", ...) -> name -> value


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
        run = build_run(self.cfg, self._closing)
        self.rollout, self.policy, self.publisher = run.rollout, run.policy, run.publisher
        self.distribute, self.watchdog, self.tracker, self.stop = (
            run.distribute,
            run.watchdog,
            run.tracker,
            run.stop,
        )
        self.hf_config, self.checkpoint_root, self.step = run.hf_config, run.checkpoint_root, run.step
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
