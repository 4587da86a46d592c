"""Dynamic sampling: streaming filter + abort + carry-over (this project) vs whole-batch regeneration (verl).

A simulated engine runs a fixed number of concurrent sequences; each running sequence emits one token per
tick; queued samples start as slots free up. Prompts have accuracies spread over [0, 1] and long-tailed
response lengths (log-normal, longer for harder prompts, cut at the maximum response length). Both methods
draw the same prompts, in the same order, from the same seeded stream, and fill the same number of steps:

- streaming: megatron_dapo.algo.DynamicSampler decides how many prompts to submit as groups finish; groups
  with 0 < #correct < G are kept as they finish; once the batch is full, in-flight generations are aborted
  (their tokens are lost) and surplus finished groups are carried into the next step;
- regeneration (verl's DAPO recipe): generate `--regen-factor` x prompts_per_step prompts, wait for all,
  filter, generate another such batch while short, train on the first prompts_per_step kept groups and
  discard the rest.

Reported per method: tokens generated and not trained on (filtered groups, aborted generations, discarded
surplus) and simulated wall time of the rollout phase in ticks. Training time is the same for both and left
out. Run: python benchmarks/dynamic_sampling.py [--steps 8] [--concurrency 2048] ...
"""

import argparse
import heapq
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megatron_dapo.algo import DynamicSampler, is_informative


@dataclass
class Group:
    """One prompt's samples: lengths in tokens and correctness, drawn when the prompt is created."""

    prompt: int
    lengths: np.ndarray
    correct: np.ndarray
    done: int = 0  # samples finished
    done_tokens: int = 0  # tokens of the finished samples


class PromptStream:
    """The same seeded sequence of prompts for every method."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = np.random.default_rng(args.seed)
        self.args = args
        self.count = 0

    def next(self) -> Group:
        a = self.args
        accuracy = self.rng.beta(*a.accuracy_beta)
        # harder prompts (low accuracy) get longer answers: the long tail is mostly wrong answers
        log_median = np.log(a.median_tokens) + a.difficulty_shift * (0.5 - accuracy)
        lengths = np.exp(self.rng.normal(log_median, a.length_sigma, a.samples_per_prompt))
        lengths = np.clip(lengths.astype(np.int64), 1, a.max_response_tokens)
        correct = self.rng.random(a.samples_per_prompt) < accuracy
        self.count += 1
        return Group(self.count - 1, lengths, correct)


@dataclass
class Engine:
    """`concurrency` slots; a sample holds a slot for as many ticks as it has tokens. Event-driven."""

    concurrency: int
    now: int = 0
    queue: deque = field(default_factory=deque)  # (group, sample index) waiting for a slot
    running: list = field(default_factory=list)  # heap of (finish tick, start tick, prompt, group, sample)
    generated_tokens: int = 0  # every token any sample emitted, finished or aborted

    def submit(self, group: Group) -> None:
        self.queue.extend((group, i) for i in range(len(group.lengths)))
        self._fill_slots()

    def _fill_slots(self) -> None:
        while self.queue and len(self.running) < self.concurrency:
            group, i = self.queue.popleft()
            heapq.heappush(self.running, (self.now + int(group.lengths[i]), self.now, group.prompt, group, i))

    def next_finished_groups(self) -> list[Group]:
        """Advance to the next tick at which samples finish; return the groups that completed then."""
        finish = self.running[0][0]
        self.now = finish
        completed = []
        while self.running and self.running[0][0] == finish:
            _, start, _, group, _ = heapq.heappop(self.running)
            self.generated_tokens += finish - start
            group.done += 1
            group.done_tokens += finish - start
            if group.done == len(group.lengths):
                completed.append(group)
        self._fill_slots()
        return completed

    def abort_all(self) -> int:
        """Abort every queued and running sample; returns the tokens the running ones had emitted."""
        partial = sum(self.now - start for _, start, *_ in self.running)
        self.generated_tokens += partial
        self.running.clear()
        self.queue.clear()
        return partial


@dataclass
class Totals:
    generated: int = 0
    trained: int = 0
    filtered: int = 0  # tokens of all-correct / all-wrong groups
    aborted: int = 0  # tokens of generations cut off once the batch was full (finished samples included)
    discarded: int = 0  # tokens of kept groups thrown away as surplus
    ticks: int = 0
    prompts: int = 0
    trained_samples: int = 0
    carried_groups: int = 0


def tokens(group: Group) -> int:
    return int(group.lengths.sum())


def run_streaming(args: argparse.Namespace) -> Totals:
    stream, totals = PromptStream(args), Totals()
    sampler: DynamicSampler[Group] = DynamicSampler(args.prompts_per_step, max_rounds=args.max_rounds)
    for _ in range(args.steps):
        engine, in_flight = Engine(args.concurrency), {}
        while not sampler.full:
            for _ in range(sampler.prompts_to_submit(in_flight=len(in_flight))):
                group = stream.next()
                in_flight[group.prompt] = group
                engine.submit(group)
            for group in engine.next_finished_groups():
                del in_flight[group.prompt]
                if not sampler.add(group, group.correct.tolist()):
                    totals.filtered += tokens(group)
        # samples that finished inside groups that did not are lost with the abort, like the running ones
        totals.aborted += engine.abort_all() + sum(g.done_tokens for g in in_flight.values())
        batch, stats = sampler.take_batch()
        totals.trained += sum(tokens(g) for g in batch)
        totals.trained_samples += sum(len(g.lengths) for g in batch)
        totals.carried_groups += stats["groups_carried_out"]
        totals.generated += engine.generated_tokens
        totals.ticks += engine.now
    totals.prompts = stream.count
    # groups still carried after the last step are trained in the next one: neither trained here nor lost
    totals.generated -= sum(tokens(g) for g in sampler.state_dict()["carried"])
    return totals


def run_regeneration(args: argparse.Namespace) -> Totals:
    stream, totals = PromptStream(args), Totals()
    for _ in range(args.steps):
        kept: list[Group] = []
        for _ in range(args.max_rounds):
            engine = Engine(args.concurrency)
            for _ in range(args.regen_factor * args.prompts_per_step):
                engine.submit(stream.next())
            while engine.running:
                for group in engine.next_finished_groups():
                    if is_informative(group.correct.tolist()):
                        kept.append(group)
                    else:
                        totals.filtered += tokens(group)
            totals.generated += engine.generated_tokens
            totals.ticks += engine.now
            if len(kept) >= args.prompts_per_step:
                break
        else:
            raise RuntimeError(f"regeneration could not fill a batch in {args.max_rounds} generation batches")
        kept.sort(key=lambda g: g.prompt)  # verl filters the generated batch in data order, not finish order
        batch, surplus = kept[: args.prompts_per_step], kept[args.prompts_per_step :]
        totals.trained += sum(tokens(g) for g in batch)
        totals.trained_samples += sum(len(g.lengths) for g in batch)
        totals.discarded += sum(tokens(g) for g in surplus)
    totals.prompts = stream.count
    return totals


def print_table(streaming: Totals, regeneration: Totals, args: argparse.Namespace, seconds: float) -> None:
    """A Markdown table, so it can be pasted into an issue note as is."""
    rows = [
        ("streaming + abort + carry-over (ours)", streaming),
        ("whole-batch regeneration (verl)", regeneration),
    ]
    print(
        "| method | prompts | generated Mtok | not trained on Mtok | share | filtered | aborted | discarded "
        "| wall ticks | trained mean len |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in rows:
        wasted = t.generated - t.trained
        print(
            f"| {name} | {t.prompts:,} | {t.generated / 1e6:.1f} | {wasted / 1e6:.1f} | "
            f"{100 * wasted / t.generated:.0f}% | {t.filtered / 1e6:.1f} | {t.aborted / 1e6:.1f} | "
            f"{t.discarded / 1e6:.1f} | {t.ticks:,} | {t.trained / t.trained_samples:,.0f} |"
        )
    wasted_ratio = (streaming.generated - streaming.trained) / (regeneration.generated - regeneration.trained)
    print(
        f"\nratio streaming / regeneration: tokens not trained on {wasted_ratio:.2f}x, "
        f"wall time {streaming.ticks / regeneration.ticks:.2f}x, tokens generated "
        f"{streaming.generated / regeneration.generated:.2f}x"
    )
    print(
        f"({args.steps} steps of {args.prompts_per_step} prompts x {args.samples_per_prompt} samples, "
        f"{args.concurrency} concurrent sequences, lengths <= {args.max_response_tokens:,} tokens, "
        f"accuracy ~ Beta{tuple(args.accuracy_beta)}, seed {args.seed}; streaming carried "
        f"{streaming.carried_groups} groups between steps; trained len = mean response tokens of trained "
        f"samples; simulated in {seconds:.0f} s)"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="rollout steps to fill")
    p.add_argument("--prompts-per-step", type=int, default=512)
    p.add_argument("--samples-per-prompt", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2048, help="sequences the engine runs at once")
    p.add_argument("--max-response-tokens", type=int, default=20_480)
    p.add_argument("--median-tokens", type=float, default=4_000, help="median response length, tokens")
    p.add_argument("--length-sigma", type=float, default=0.8, help="log-normal spread of response lengths")
    p.add_argument(
        "--difficulty-shift", type=float, default=1.0, help="log-length added for a prompt at accuracy 0"
    )
    p.add_argument("--accuracy-beta", type=float, nargs=2, default=[0.2, 0.2], metavar=("A", "B"))
    p.add_argument("--regen-factor", type=int, default=3, help="regeneration: prompts generated per batch, x")
    p.add_argument("--max-rounds", type=int, default=10, help="both: rounds allowed before giving up")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    streaming = run_streaming(args)
    regeneration = run_regeneration(args)
    for t in (streaming, regeneration):  # every generated token is accounted for exactly once
        assert t.generated == t.trained + t.filtered + t.aborted + t.discarded, t
    print_table(streaming, regeneration, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
