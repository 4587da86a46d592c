"""How a step's batch reaches the training ranks: the old pickled broadcast of every group to every rank,
against each data-parallel rank receiving its own share as tensors (trainer/distribute.py).

Both paths move the same step, in one run of `--ranks` gloo processes on this machine: `--prompts` prompts x
`--samples` samples, prompts of ~145 tokens (DAPO-Math-17k's mean under Qwen's tokenizer), response lengths
log-normal with mean `--mean-response` tokens, capped at 20,480 (the paper's scale by default). Reported per
rank: bytes received and seconds from the call to holding the step (old: the groups; new: the rank's share).
Rank 0's cost of preparing (old: nothing; new: advantages and the micro-batch plan) is in its row.

Run: python benchmarks/batch_distribution.py [--prompts 512] [--samples 16] [--ranks 4] [--layout dp|tp2]
"""

import argparse
import math
import multiprocessing as mp
import os
import pickle
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

PROMPT_TOKENS = 145
MAX_RESPONSE = 20_480
VOCAB = 151_936


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--mean-response", type=float, default=4_450, help="mean response tokens")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layout", choices=["dp", "tp2"], default="dp", help="tp2: TP=2, DP=ranks/2")
    parser.add_argument("--minibatch", type=int, default=512, help="samples per mini-batch")
    parser.add_argument("--tokens-per-microbatch", type=int, default=32_768)
    return parser.parse_args()


def make_groups(args: argparse.Namespace):
    """The step as the rollout hands it over: Group objects holding tuples, as the old path pickled them."""
    from megatron_dapo.rollout.types import FinishReason
    from megatron_dapo.trainer.batch import Group, Response

    g = torch.Generator().manual_seed(0)
    sigma = 0.8  # log-normal spread; mu puts the mean at --mean-response
    mu = math.log(args.mean_response) - sigma**2 / 2
    groups = []
    for index in range(args.prompts):
        prompt = tuple(torch.randint(0, VOCAB, (PROMPT_TOKENS,), generator=g).tolist())
        lengths = torch.exp(mu + sigma * torch.randn(args.samples, generator=g)).clamp(1, MAX_RESPONSE)
        responses = []
        for j, length in enumerate(lengths.long().tolist()):
            tokens = tuple(torch.randint(0, VOCAB, (length,), generator=g).tolist())
            logprobs = tuple((-torch.rand(length, generator=g)).tolist())
            reason = FinishReason.LENGTH if length == MAX_RESPONSE else FinishReason.STOP
            correct = j % 2 == 0
            responses.append(Response(tokens, logprobs, reason, 1.0 if correct else -1.0, correct))
        groups.append(Group(index, prompt, tuple(responses)))
    return groups


def worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, timeout=timedelta(minutes=30))
    from megatron_dapo.parallel.state import ParallelDims, init_parallel
    from megatron_dapo.trainer.batch import StepBatch
    from megatron_dapo.trainer.distribute import distribute_batch, encode

    pg = init_parallel(ParallelDims(tp=2 if args.layout == "tp2" else 1))
    groups = make_groups(args) if rank == 0 else None

    # Old: every group, pickled, to every rank (what Trainer.generate did before).
    dist.barrier()
    started = time.perf_counter()
    payload = [groups]
    old_bytes = len(pickle.dumps(groups, protocol=pickle.HIGHEST_PROTOCOL)) if rank == 0 else 0
    pickled_s = time.perf_counter() - started
    started = time.perf_counter()
    dist.broadcast_object_list(payload, src=0)
    old_s = time.perf_counter() - started + pickled_s
    old_received = [old_bytes]
    dist.broadcast_object_list(old_received, src=0)
    del payload

    # New: rank 0 normalises and plans, each rank receives its share as tensors.
    dist.barrier()
    started = time.perf_counter()
    shares = None
    if rank == 0:
        batch = StepBatch.from_groups(groups, scale_by_std=True)
        shares = batch.shard(
            samples_per_minibatch=args.minibatch,
            dp_size=pg.dp.size(),
            tokens_per_microbatch=args.tokens_per_microbatch,
            cp=1,
            pad_multiple=1,
        )
    prepared_s = time.perf_counter() - started
    share = distribute_batch(shares, pg)
    new_s = time.perf_counter() - started
    header, buffer = encode(share)
    new_bytes = buffer.numel() + header.numel() * header.element_size()
    old_in = old_received[0] if rank else 0  # rank 0 is the source on both paths
    results.put((rank, pg.dp.rank(), old_in, old_s, new_bytes, new_s, prepared_s, len(share.data)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=worker, args=(r, args, port, results)) for r in range(args.ranks)]
    for process in processes:
        process.start()
    rows = sorted(results.get() for _ in processes)
    for process in processes:
        process.join()
    old_total = max(row[2] for row in rows)
    print(
        f"{args.prompts} prompts x {args.samples} samples, mean response {args.mean_response:.0f} tokens, "
        f"{args.ranks} gloo ranks ({args.layout}); old payload {old_total / 1e6:.1f} MB to every rank"
    )
    columns = ["rank", "dp rank", "samples", "old MB in", "old s", "new MB in", "new s", "new/old bytes"]
    print("| " + " | ".join([*columns, "of which prep s"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for rank, dp_rank, old_in, old_s, new_in, new_s, prepared_s, samples in rows:
        old_in = old_in or old_total  # rank 0 holds the step already; its share of the wire is the same
        print(
            f"| {rank} | {dp_rank} | {samples} | {old_in / 1e6:.1f} | {old_s:.2f} | {new_in / 1e6:.1f} | "
            f"{new_s:.2f} | {new_in / old_in:.3f} | {prepared_s:.2f} |"
        )


if __name__ == "__main__":
    main()
