"""Peak memory and time of the log-prob paths, forward + backward, measured in one run.

Paths (megatron_dapo.model.logprobs), each giving per-token log-probs and entropy of one packed sequence and
the gradients w.r.t. the hidden states and the output weight shard:
  plain    logits = hidden @ weight.T under autograd (Megatron's output layer), then logprobs_from_logits
  chunked  logprobs_from_hidden: chunk by chunk, backward recomputes each chunk's logits
  fused    token_loss_from_hidden: the per-token loss gradient is formed in the forward, no recompute
The loss is sum_t(a_t logprob_t + b_t entropy_t), fixed random a, b: the form of any per-token policy loss.

TP is simulated in one process: each row holds one rank's shard of the padded vocabulary ([V_pad/tp, H]); the
two small per-chunk all-reduces of a real TP group are not timed.

Memory is the peak above what was allocated before the forward (hidden, weight, labels), so it includes the
gradients (hidden and weight) that every path must produce; "work" is the peak less those gradients.
  cuda: torch.cuda.max_memory_allocated.
  cpu:  the running total of torch's CPU allocator as reported to the profiler at every allocation
        (profile_memory=True), in a separate untimed run; scratch memory inside BLAS/oneDNN is not counted.

Full shapes (GPU):  python benchmarks/logprob_memory.py --device cuda --dtype bf16
Reduced (CPU):      python benchmarks/logprob_memory.py --device cpu --seq-lens 2048,4096 --hidden 1024 \
                        --tp 8 --clock cpu --threads 1
"""

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from megatron_dapo.model.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    logprobs_from_hidden,
    logprobs_from_logits,
    token_loss_from_hidden,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB_PAD_MULTIPLE = 128  # Megatron's make_vocab_size_divisible_by: the vocab is padded to 128 x TP


@dataclass
class Problem:
    hidden: torch.Tensor  # [T, H], requires grad
    weight: torch.Tensor  # [V_pad/tp, H], requires grad
    labels: torch.Tensor  # [T]
    grad_logprob: torch.Tensor  # [T] a_t
    grad_entropy: torch.Tensor  # [T] b_t
    temperature: float


def make_problem(seq_tokens: int, hidden_size: int, local_vocab: int, dtype, device) -> Problem:
    gen = torch.Generator(device="cpu").manual_seed(seq_tokens + local_vocab)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return Problem(
        hidden=randn(seq_tokens, hidden_size).requires_grad_(),
        weight=randn(local_vocab, hidden_size, scale=hidden_size**-0.5).requires_grad_(),
        labels=torch.randint(0, local_vocab, (seq_tokens,), generator=gen).to(device),
        grad_logprob=torch.randn(seq_tokens, generator=gen).to(device),
        grad_entropy=torch.randn(seq_tokens, generator=gen).to(device),
        temperature=0.9,
    )


def run_plain(p: Problem) -> None:
    logits = p.hidden @ p.weight.t()
    logprob, entropy = logprobs_from_logits(logits, p.labels, temperature=p.temperature)
    del logits
    ((logprob * p.grad_logprob).sum() + (entropy * p.grad_entropy).sum()).backward()


def run_chunked(p: Problem, chunk_tokens: int) -> None:
    logprob, entropy = logprobs_from_hidden(
        p.hidden, p.weight, p.labels, temperature=p.temperature, chunk_tokens=chunk_tokens
    )
    ((logprob * p.grad_logprob).sum() + (entropy * p.grad_entropy).sum()).backward()


def run_fused(p: Problem, chunk_tokens: int) -> None:
    def token_loss(logprob, entropy, tokens):
        return (logprob * p.grad_logprob[tokens]).sum() + (entropy * p.grad_entropy[tokens]).sum()

    loss, _, _ = token_loss_from_hidden(
        p.hidden, p.weight, p.labels, token_loss, temperature=p.temperature, chunk_tokens=chunk_tokens
    )
    loss.backward()


def clear_grads(p: Problem) -> None:
    p.hidden.grad = None
    p.weight.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times_s(
    fns: dict[str, Callable[[], None]],
    p: Problem,
    device: torch.device,
    rounds: int,
    clock: Callable[[], float],
) -> dict[str, float]:
    """Best time of each fn over `rounds` rounds, after a warm-up; every round runs each fn once, so changing
    load from other processes on a shared machine affects all of them alike."""
    times = {name: [] for name in fns}
    for round_index in range(rounds + 1):
        for name, fn in fns.items():
            clear_grads(p)
            sync(device)
            start = clock()
            fn()
            sync(device)
            if round_index:
                times[name].append(clock() - start)
    clear_grads(p)
    return {name: min(values) for name, values in times.items()}


def peak_bytes(fn: Callable[[], None], p: Problem, device: torch.device) -> int:
    """Peak allocated memory during fn above what was allocated before it."""
    clear_grads(p)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        peak = max_cpu_allocated(prof)
    clear_grads(p)
    return peak


def max_cpu_allocated(prof: profile) -> int:
    """Highest running total of the CPU allocator over the profiled region, relative to its start."""
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields))
    allocations.sort(key=lambda item: item[0])
    if not allocations:
        return 0
    first = allocations[0][1]
    start_total = first.total_allocated - first.alloc_size
    return max(fields.total_allocated for _, fields in allocations) - start_total


def padded_local_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab // multiple) * multiple // tp


def measure(seq_tokens: int, tp: int, args: argparse.Namespace, device: torch.device) -> None:
    """Print one row per path for one shape: time, peak memory, and ratios against the plain path."""
    local_vocab = padded_local_vocab(args.vocab, tp)
    problem = make_problem(seq_tokens, args.hidden, local_vocab, DTYPES[args.dtype], device)
    fns = {"plain": partial(run_plain, problem)}
    for chunk_tokens in map(int, args.chunk_tokens.split(",")):
        fns[f"chunked/{chunk_tokens}"] = partial(run_chunked, problem, chunk_tokens)
        fns[f"fused/{chunk_tokens}"] = partial(run_fused, problem, chunk_tokens)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    seconds = best_times_s(fns, problem, device, args.rounds, clock)
    grads_bytes = (problem.hidden.numel() + problem.weight.numel()) * problem.hidden.element_size()
    mib = 2**20
    for name, fn in fns.items():
        peak = peak_bytes(fn, problem, device)
        work = peak - grads_bytes
        if name == "plain":
            plain_work = work
        print(
            f"{seq_tokens:>7} {tp:>3} {local_vocab:>7} {name:>12} {seconds[name]:>8.3f} "
            f"{seconds[name] / seconds['plain']:>7.2f} {peak / mib:>9.0f} {work / mib:>9.0f} "
            f"{work / plain_work:>10.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-lens", default="4096,8192,20480", help="tokens per sequence, comma-separated")
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--vocab", type=int, default=151936, help="true vocabulary size (before TP padding)")
    parser.add_argument(
        "--tp", default="1,8", help="TP sizes, comma-separated; one rank's shard is simulated"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--chunk-tokens", default=str(DEFAULT_CHUNK_TOKENS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (best of), after a warm-up")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, steadier than wall time on a shared machine (with --threads 1)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures CPU work: time GPU runs with the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"# {name}; torch {torch.__version__}; {args.dtype}; hidden {args.hidden}; vocab {args.vocab}; "
        f"time: {args.clock} clock, best of {args.rounds} interleaved rounds; "
        "memory: peak above the inputs (MiB); work: peak less the hidden and weight gradients; "
        "path/N: chunks of N tokens"
    )
    print(
        f"{'tokens':>7} {'tp':>3} {'V/tp':>7} {'path':>12} {'time s':>8} {'x plain':>7} "
        f"{'peak MiB':>9} {'work MiB':>9} {'work/plain':>10}"
    )
    for seq_tokens in map(int, args.seq_lens.split(",")):
        for tp in map(int, args.tp.split(",")):
            measure(seq_tokens, tp, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
