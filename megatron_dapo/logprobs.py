"""dapo-logprobs: per-token log-probs and entropy of token sequences under a checkpoint, at any TP/PP/CP.

    torchrun --nproc-per-node N -m megatron_dapo.logprobs --checkpoint DIR --input IN.jsonl \\
        --output OUT.jsonl --tp T --pp P --cp C [--temperature X]

Each input line is {"input_ids": [...], "response_start": k}; each output line, in input order, is
{"logprobs": [...], "entropy": [...]} for tokens k..end: log p(token_i | tokens before i) under
softmax(logits / temperature), and the entropy of that distribution. DIR is a Hugging Face model directory
or a Megatron checkpoint of this project; the command says which it loaded. Use it to compare the trainer's
numbers with the rollout engine's (train/inference mismatch), at the parallel layout of the run.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, read_config
from megatron_dapo.checkpoint.meta import META_FILE, hf_assets_dir, read_meta
from megatron_dapo.checkpoint.model_io import load_model
from megatron_dapo.data.packing import Sample, pack, plan_microbatches, sequence_pad_multiple
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims, destroy_parallel, init_parallel
from megatron_dapo.trainer.policy.train_step import forward_logprobs


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


def read_samples(path: Path) -> list[Sample]:
    """Input lines -> samples; a malformed line is reported with its number."""
    samples = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ids = record["input_ids"]
                if not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise ValueError("input_ids must be non-negative integers")
                samples.append(Sample(ids, int(record["response_start"])))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f'{path}:{number}: expected {{"input_ids": [int, ...], "response_start": k}} with '
                    f"1 <= k <= len(input_ids): {error!r}"
                ) from error
    if not samples:
        raise ValueError(f"{path}: no input lines")
    return samples


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dims = ParallelDims(tp=args.tp, pp=args.pp, cp=args.cp)
    # Bad input or checkpoint (ValueError, KeyError): the message says what to change.
    with exit_on_user_error("dapo-logprobs", ValueError, KeyError):
        pg = init_parallel(dims)
        try:
            run(args, dims, pg)
        finally:
            destroy_parallel()


def run(args: argparse.Namespace, dims: ParallelDims, pg) -> None:
    start = time.perf_counter()
    is_megatron = (args.checkpoint / META_FILE).is_file()
    config = read_config(hf_assets_dir(args.checkpoint) if is_megatron else args.checkpoint)
    samples = read_samples(args.input)
    for number, sample in enumerate(samples, 1):
        if max(sample.token_ids) >= config["vocab_size"]:
            raise ValueError(f"{args.input}:{number}: a token id is >= vocab_size={config['vocab_size']}")
    model = build_gpt_model(config, dims, pg, params_dtype=getattr(torch, args.dtype))
    if is_megatron:
        meta = read_meta(args.checkpoint)
        _log(
            f"loading Megatron checkpoint {args.checkpoint} (saved at TP={meta.tensor_parallel}, "
            f"PP={meta.pipeline_parallel})"
        )
        load_model(model, args.checkpoint)
    else:
        _log(f"loading Hugging Face checkpoint {args.checkpoint}")
        load_hf_weights(model, config, SafetensorsDir(args.checkpoint).get, pg)
    model.eval()

    pad = sequence_pad_multiple(dims.cp)
    plan = plan_microbatches(
        [len(s.token_ids) for s in samples],
        dp_size=pg.dp.size(),
        tokens_per_microbatch=args.tokens_per_microbatch,
        cp=dims.cp,
        pad_multiple=pad,
    )[pg.dp.rank()]
    distribution = TokenDistribution(config["vocab_size"], args.temperature, args.chunk_tokens)
    results = forward_logprobs(model, [pack(samples, ids, pad) for ids in plan], distribution, pg)
    mine = [i for ids in plan for i in ids]
    # One rank of each data-parallel group sends its samples' results to rank 0, which writes them in order.
    leads_dp_group = pg.tp.rank() == 0 and pg.cp.rank() == 0 and pg.pp.rank() == 0
    part = dict(zip(mine, results, strict=True)) if leads_dp_group else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if dist.get_rank() == 0:
        merged = {index: pair for p in parts for index, pair in p.items()}
        write_output(args.output, [merged[i] for i in range(len(samples))])
        tokens = sum(len(s.token_ids) - s.response_start for s in samples)
        _log(
            f"wrote {len(samples)} lines ({tokens} response tokens) to {args.output} "
            f"in {time.perf_counter() - start:.1f} s"
        )


def write_output(path: Path, results: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for logprobs, entropy in results:
            out.write(
                json.dumps({"logprobs": logprobs.float().tolist(), "entropy": entropy.float().tolist()})
            )
            out.write("\n")


def _log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[dapo-logprobs] {message}", flush=True)


if __name__ == "__main__":
    main()
