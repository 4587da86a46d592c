"""The checkpoint converters' command lines; the conversions are megatron_dapo/checkpoint/convert.py.

dapo-convert-hf-to-megatron HF_DIR OUT_DIR --tp 8 --pp 4
dapo-convert-megatron-to-hf MEGATRON_DIR OUT_DIR
dapo-reshard MEGATRON_DIR OUT_DIR --tp 4 --pp 2
"""

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_dapo.checkpoint.convert import (
    DEFAULT_MAX_SHARD_BYTES,
    Summary,
    hf_to_megatron,
    megatron_to_hf,
    reshard,
)
from megatron_dapo.errors import exit_on_user_error

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * powers[unit])


def _parser(prog: str, description: str, source: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("source", metavar=source, type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast the weights (default: the source checkpoint's dtype)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    return parser


def _add_parallel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor parallel size to lay the checkpoint out for"
    )
    parser.add_argument(
        "--pp", type=int, default=1, help="pipeline parallel size to lay the checkpoint out for"
    )


def _run(parser: argparse.ArgumentParser, convert: Callable[[], Summary]) -> None:
    """Run a conversion; bad input ends the process with its message, not a traceback (ValueError: weights
    that do not fit config.json or the parallel sizes; KeyError: a tensor missing from a checkpoint)."""
    with exit_on_user_error(parser.prog, ValueError, KeyError):
        print(convert())


def hf_to_megatron_main(argv: list[str] | None = None) -> None:
    parser = _parser(
        "dapo-convert-hf-to-megatron",
        "Convert a Hugging Face checkpoint to a Megatron torch_dist checkpoint.",
        "HF_DIR",
    )
    _add_parallel(parser)
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    _run(
        parser,
        lambda: hf_to_megatron(
            args.source, args.out_dir, tp=args.tp, pp=args.pp, dtype=dtype, overwrite=args.overwrite
        ),
    )


def megatron_to_hf_main(argv: list[str] | None = None) -> None:
    parser = _parser(
        "dapo-convert-megatron-to-hf",
        "Convert a Megatron torch_dist checkpoint (any TP/PP) to Hugging Face safetensors.",
        "MEGATRON_DIR",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help=f"largest safetensors file, e.g. 2GB (default {DEFAULT_MAX_SHARD_BYTES // 10**9}GB); the memory "
        "used is about this much plus one tensor",
    )
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    _run(
        parser,
        lambda: megatron_to_hf(
            args.source,
            args.out_dir,
            dtype=dtype,
            max_shard_bytes=args.max_shard_size,
            overwrite=args.overwrite,
        ),
    )


def reshard_main(argv: list[str] | None = None) -> None:
    parser = _parser(
        "dapo-reshard", "Lay a Megatron torch_dist checkpoint out for another TP/PP.", "MEGATRON_DIR"
    )
    _add_parallel(parser)
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    _run(
        parser,
        lambda: reshard(
            args.source, args.out_dir, tp=args.tp, pp=args.pp, dtype=dtype, overwrite=args.overwrite
        ),
    )
