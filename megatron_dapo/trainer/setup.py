"""A training run's parts, built in the order that loses nothing on bad input: the launch checked, process
groups, the rollout role (its data first: a bad row is reported before a model is built or a server started),
the stall watchdog, the policy (resumed from the latest complete checkpoint, if any), the engine, the weight
publisher, metrics and the stop signal. The loop (trainer/loop.py) only calls them."""

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from megatron_dapo.trainer.watchdog import Watchdog, watchdog_for

logger = logging.getLogger("megatron_dapo.train")

# Ranks other than 0 wait in a collective while rank 0 generates; a step's rollout can take long.
COLLECTIVE_TIMEOUT_MINUTES = 180


@dataclass
class Run:
    """What the loop calls; `closing` closes it all, in reverse order of opening."""

    rollout: RolloutRole | None  # global rank 0 only
    policy: PolicyRole
    publisher: WeightPublisher
    distribute: Callable[[list[RankBatch] | None], RankBatch]  # rank 0's shares -> this rank's
    watchdog: Watchdog
    tracker: MetricsTracker
    stop: StopRequest
    hf_config: dict
    checkpoint_root: Path
    step: int  # steps completed: 0, or the resumed checkpoint's


def build_run(cfg: DapoConfig, closing: contextlib.ExitStack) -> Run:
    validate_launch(cfg, world_size=launched_world_size(), cuda=torch.cuda.is_available())
    pg = init_parallel(parallel_dims(cfg), seed=cfg.train.seed, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES)
    closing.callback(destroy_parallel)
    rank = dist.get_rank()
    run_dir = Path(cfg.logging.dir)
    checkpoint_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    hf_config = read_config(Path(cfg.model.hf_path))
    rollout = RolloutRole(cfg) if rank == 0 else None
    if rollout is not None:
        closing.callback(rollout.close)
    # After the data: a run refused for a bad row leaves no directory behind.
    watchdog = watchdog_for(cfg, rank=rank, world_size=dist.get_world_size())
    closing.callback(watchdog.close)
    resume_from = checkpoint_to_resume(checkpoint_root, cfg.checkpoint)
    initial = resume_from or (Path(cfg.model.load) if cfg.model.load else None)
    policy = PolicyRole(cfg, hf_config, pg, weights=initial, watch=watchdog.phase)
    step = 0
    if resume_from is not None:
        state = policy.resume(resume_from, rank=rank)
        if rollout is not None:
            rollout.load_state_dict(
                {"loader": state.loader, "sampler": state.sampler, **state.extra.get("rollout", {})}
            )
            logger.info("resumed from %s (step %d)", resume_from, state.step)
        step = state.step
    engine = rollout.start_engine(run_dir / "logs") if rollout is not None else None
    publisher = WeightPublisher(cfg, pg, engine, closing)
    first_step = step + 1 if resume_from else 0
    tracker = closing.enter_context(MetricsTracker.for_run(cfg, is_writer=rank == 0, first_step=first_step))
    stop = StopRequest()
    closing.callback(stop.close)
    distribute = partial(distribute_batch, pg=pg)
    return Run(
        rollout, policy, publisher, distribute, watchdog, tracker, stop, hf_config, checkpoint_root, step
    )
