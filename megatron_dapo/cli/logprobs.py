"""dapo-logprobs: per-token log-probs and entropy of token sequences under a checkpoint, at any TP/PP/CP.

    torchrun --nproc-per-node N -m megatron_dapo.logprobs --checkpoint DIR --input IN.jsonl \\
        --output OUT.jsonl --tp T --pp P --cp C [--temperature X]

DIR is a Hugging Face model directory or a Megatron checkpoint of this project. The line formats and the
computation: megatron_dapo/logprobs.py.
"""

import argparse
import math
from pathlib import Path

import torch

from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.logprobs import write_logprobs
from megatron_dapo.parallel.state import ParallelDims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dapo-logprobs", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="Hugging Face directory or Megatron ckpt"
    )
    parser.add_argument(
        "--input", type=Path, required=True, help='JSONL: {"input_ids": [...], "response_start": k}'
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="JSONL written here, one line per input line"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--temperature", type=float, default=1.0, help="the rollout's sampling temperature")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16" if torch.cuda.is_available() else "float32",
        help="parameter dtype (default: bfloat16 on GPU, as training runs; float32 on CPU)",
    )
    parser.add_argument("--tokens-per-microbatch", type=int, default=8192, help="per-GPU token budget")
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="memory-bounded log-probs, this many tokens at a time"
    )
    args = parser.parse_args(argv)
    for flag in ("tp", "pp", "cp", "tokens_per_microbatch", "chunk_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < args.temperature < math.inf:  # NaN compares false: refused
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Bad input or checkpoint (ValueError, KeyError): the message says what to change.
    with exit_on_user_error("dapo-logprobs", ValueError, KeyError):
        write_logprobs(
            args.checkpoint,
            args.input,
            args.output,
            ParallelDims(tp=args.tp, pp=args.pp, cp=args.cp),
            temperature=args.temperature,
            dtype=getattr(torch, args.dtype),
            tokens_per_microbatch=args.tokens_per_microbatch,
            chunk_tokens=args.chunk_tokens,
        )


if __name__ == "__main__":
    main()
