"""dapo-train: DAPO (Yu et al., 2025, arXiv 2503.14476) with a Megatron-core policy and SGLang rollouts.

    python -m megatron_dapo.train --config examples/demo_cpu.yaml [section.field=value ...]
    torchrun --nproc-per-node 8 -m megatron_dapo.train --config examples/dapo_qwen32b.yaml

Each rollout step: generate G samples per prompt -> reward (+ soft overlong punishment) -> dynamic sampling
keeps groups with 0 < #correct < G -> old log-probs -> group-normalised advantages -> one clip-higher update
per mini-batch -> weight sync -> evaluation -> checkpoint (trainer/loop.py). SIGUSR1 or SIGTERM: checkpoint
at the end of the step and exit 0; the same command resumes from the latest complete checkpoint.

Where this departs from the paper and its verl reference implementation:
- Dynamic sampling streams (as slime does): prompts are submitted as the sampler asks, groups are filtered as
  they finish, the surplus still generating when the batch is full is aborted, and valid surplus groups are
  carried into the next step. verl regenerates whole batches and throws the surplus away.
- The token-level mean divides by the valid tokens of the whole mini-batch, over every micro-batch and data-
  parallel rank (Megatron's per-token loss mode); the public verl recipe divided per micro-batch.
- pi_old is recomputed by the trainer before the step's first update; the engine's own log-probs serve only
  the optional importance correction (algorithm.rollout_is_*: truncated or masked, per token or per sample;
  off by default as in the paper).
- Warm-up: rollout step k of the warm-up trains at lr * k / warmup_steps, so the first step already updates.
- Mini-batches are consecutive whole groups of the step's batch (groups arrive in shuffled prompt order).
- Advantages use the unbiased group standard deviation + 1e-6 (as verl); a group whose rewards are all equal
  (possible only without dynamic sampling) gets advantage 0 exactly.
- train.deterministic (for tests and debugging) takes groups in submission order and awaits the surplus
  instead of aborting it.
"""

import argparse
import logging
from collections.abc import Sequence

from megatron_dapo.algo import DynamicSamplingError
from megatron_dapo.checkpoint.manifest import CorruptCheckpointError
from megatron_dapo.config import load_config
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.rollout.launcher import ServerStartError
from megatron_dapo.trainer.loop import Trainer

# Besides bad input, what ends a run with a message saying what to change rather than with a traceback.
RUN_ERRORS = (DynamicSamplingError, ServerStartError, CorruptCheckpointError)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dapo-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (examples/); overrides apply on top of it")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. rollout.top_p=0.7")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    with exit_on_user_error("dapo-train", *RUN_ERRORS):
        cfg = load_config(args.config, args.overrides)
        with Trainer(cfg) as trainer:
            trainer.fit()


if __name__ == "__main__":
    main()
