"""`python -m megatron_dapo.demo [--out DIR] [--steps N] [--preset NAME]`: DAPO from start to finish on a CPU.

dapo-demo: a tiny Qwen2 model, warm-started on arithmetic, trained with the real loop; the demo itself is
megatron_dapo/demo/run.py.
"""

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_dapo.algo import DynamicSamplingError
from megatron_dapo.config import PRESETS
from megatron_dapo.demo.run import TRAIN_PROBLEMS, run_demo
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.rollout.launcher import ServerStartError

# Torch threads of this process (warm start and trainer); the CPU engine runs one more. On the 2-core machine,
# shared with other work, a warm-start step took 0.11-0.15 s with one thread and 3.3 s with two: busy cores
# make OpenMP threads wait for each other.
THREADS = 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dapo-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="run directory (inputs and outputs)"
    )
    parser.add_argument("--steps", type=int, help="rollout steps (default: examples/demo_cpu.yaml's)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="dapo", help="a row of the paper's ablation"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/demo_cache"), help="warm-started models")
    parser.add_argument(
        "--train-problems",
        type=int,
        default=TRAIN_PROBLEMS,
        help="problems generated for the training set (fewer: several epochs over it, like a small data set)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    args = parser.parse_args(argv)
    # The CPU demo, wherever it runs: hidden GPUs keep it on the CPU path (gloo, local layer spec, CPU engine)
    # on a machine that has some. Set before anything asks torch about CUDA; the engine inherits it.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(THREADS)
    overrides = [*([f"train.steps={args.steps}"] if args.steps is not None else []), *args.overrides]
    with exit_on_user_error("dapo-demo", DynamicSamplingError, ServerStartError):
        summary = run_demo(
            args.out,
            preset=args.preset,
            cache_dir=args.cache_dir,
            overrides=overrides,
            train_problems=args.train_problems,
        )
    print(
        f"\nDAPO demo ({summary['preset']}, {summary['steps']} steps, {summary['wall_time_s']:.0f} s): "
        f"held-out accuracy {summary['accuracy_start']:.1%} at the start -> {summary['accuracy_end']:.1%} at "
        "the end\n"
        f"report: {summary['report']}  summary: {args.out / 'summary.json'}"
    )


if __name__ == "__main__":
    main()
