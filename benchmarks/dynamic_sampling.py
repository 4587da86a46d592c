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

`--mode epochs` (issue 13) streams a fixed prompt set for several epochs while every prompt's accuracy rises
with the step, once without and once with algorithm.skip_saturated (the trainer's PromptLoader and
saturation policy, the config's defaults unless --skip-* say otherwise), and reports per third of the run
the share of generated tokens spent on filtered groups and the simulated time to fill each batch.
"""

import argparse
import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from megatron_dapo.algo import DynamicSampler, SkipSettings, is_informative
from megatron_dapo.config import AlgorithmConfig
from megatron_dapo.data.dataset import PromptLoader, TokenizedPrompt
from megatron_dapo.data.record import PromptRecord


@dataclass
class Group:
    """One prompt's samples: lengths in tokens and correctness, drawn when the prompt is created."""

    prompt: int
    lengths: np.ndarray
    correct: np.ndarray
    done: int = 0  # samples finished
    done_tokens: int = 0  # tokens of the finished samples
    row: int = -1  # the prompt's row in a fixed prompt set (--mode epochs); -1: a fresh prompt


class PromptStream:
    """The same seeded sequence of prompts for every method."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = np.random.default_rng(args.seed)
        self.args = args
        self.count = 0

    def next(self) -> Group:
        accuracy = self.rng.beta(*self.args.accuracy_beta)
        self.count += 1
        return Group(self.count - 1, *draw_samples(self.rng, self.args, accuracy))


def draw_samples(rng: np.random.Generator, a: argparse.Namespace, accuracy: float) -> tuple[np.ndarray, ...]:
    """One group's response lengths and correctness for a prompt answered right with `accuracy`."""
    # harder prompts (low accuracy) get longer answers: the long tail is mostly wrong answers
    log_median = np.log(a.median_tokens) + a.difficulty_shift * (0.5 - accuracy)
    lengths = np.exp(rng.normal(log_median, a.length_sigma, a.samples_per_prompt))
    lengths = np.clip(lengths.astype(np.int64), 1, a.max_response_tokens)
    correct = rng.random(a.samples_per_prompt) < accuracy
    return lengths, correct


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
    skipped: int = 0  # prompts the stream skipped as saturated (algorithm.skip_saturated)

    def add(self, other: "Totals") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def tokens(group: Group) -> int:
    return int(group.lengths.sum())


def streaming_step(
    sampler: DynamicSampler[Group], next_group: Callable[[], Group], concurrency: int
) -> tuple[Totals, list[Group]]:
    """One rollout step the streaming way; its token accounting and every group judged in it."""
    totals, engine, in_flight, judged = Totals(), Engine(concurrency), {}, []
    while not sampler.full:
        for _ in range(sampler.prompts_to_submit(in_flight=len(in_flight))):
            group = next_group()
            in_flight[group.prompt] = group
            engine.submit(group)
        for group in engine.next_finished_groups():
            del in_flight[group.prompt]
            judged.append(group)
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
    return totals, judged


def run_streaming(args: argparse.Namespace) -> Totals:
    stream, totals = PromptStream(args), Totals()
    sampler: DynamicSampler[Group] = DynamicSampler(args.prompts_per_step, max_rounds=args.max_rounds)
    for _ in range(args.steps):
        totals.add(streaming_step(sampler, stream.next, args.concurrency)[0])
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


class PromptSet:
    """A fixed set of prompts read epoch after epoch through the trainer's own PromptLoader (and, when `skip`
    is set, its saturation policy). Prompt i is answered right at step t with probability
    sigmoid(logit_i + rise * t): the policy improves on every prompt as training goes on, whatever it trains
    on. So this measures what skipping saves, not what it costs in learning (the CPU demo measures that)."""

    def __init__(self, args: argparse.Namespace, skip: SkipSettings | None) -> None:
        self.args = args
        self.logits = np.random.default_rng([args.seed, 1]).normal(
            args.logit_mean, args.logit_std, args.num_prompts
        )
        records = [PromptRecord(index=i, ground_truth="0", problem="-") for i in range(args.num_prompts)]
        self.loader = PromptLoader([TokenizedPrompt(r, ()) for r in records], seed=args.seed, skip=skip)
        self.rng = np.random.default_rng([args.seed, 2])
        self.step = 0
        self.count = 0

    def accuracy(self, rows: np.ndarray | int) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.logits[rows] + self.args.rise * self.step)))

    def next(self) -> Group:
        row = self.loader.take(1)[0].record.index
        self.count += 1
        return Group(self.count - 1, *draw_samples(self.rng, self.args, float(self.accuracy(row))), row=row)


@dataclass
class EpochStep:
    totals: Totals
    epoch: float  # epochs of the prompt set read so far (generated or skipped)
    set_accuracy: float  # the simulated policy's mean accuracy over the whole set at this step


def run_epochs(args: argparse.Namespace, skip: SkipSettings | None) -> list[EpochStep]:
    """Streaming dynamic sampling over several epochs of one prompt set; every judged group is recorded
    in the saturation policy, as trainer/rollout.py does."""
    prompts = PromptSet(args, skip)
    sampler: DynamicSampler[Group] = DynamicSampler(args.prompts_per_step, max_rounds=args.max_rounds)
    steps = []
    for step in range(args.steps):
        prompts.step, count, skipped = step, prompts.count, prompts.loader.skipped_saturated
        totals, judged = streaming_step(sampler, prompts.next, args.concurrency)
        if prompts.loader.saturation is not None:
            for group in judged:
                prompts.loader.saturation.record(group.row, group.correct.tolist(), step)
        totals.prompts = prompts.count - count
        totals.skipped = prompts.loader.skipped_saturated - skipped
        epoch = prompts.loader.epoch + prompts.loader.offset / args.num_prompts
        steps.append(EpochStep(totals, epoch, float(prompts.accuracy(np.arange(args.num_prompts)).mean())))
    return steps


def print_epoch_table(runs: dict[str, list[EpochStep]], args: argparse.Namespace, seconds: float) -> None:
    """Per third of the run (early, mid, late training), each option side by side."""
    print(
        "| steps | option | set accuracy | epochs read | prompts generated | prompts skipped "
        "| generated Mtok | filtered share | not trained on | ticks per step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    thirds = np.array_split(np.arange(args.steps), 3)
    for phase in thirds:
        for name, steps in runs.items():
            part, total = [steps[i] for i in phase], Totals()
            for step in part:
                total.add(step.totals)
            print(
                f"| {phase[0] + 1}-{phase[-1] + 1} | {name} | {part[-1].set_accuracy:.2f} | "
                f"{part[-1].epoch:.1f} | {total.prompts:,} | {total.skipped:,} | "
                f"{total.generated / 1e6:.1f} | "
                f"{100 * total.filtered / total.generated:.0f}% | "
                f"{100 * (total.filtered + total.aborted) / total.generated:.0f}% | "
                f"{total.ticks / len(part):,.0f} |"
            )
    print(
        f"\n({args.steps} steps of {args.prompts_per_step} prompts x {args.samples_per_prompt} samples over "
        f"{args.num_prompts:,} prompts, logit ~ N({args.logit_mean}, {args.logit_std}) rising "
        f"{args.rise}/step, {args.concurrency} concurrent sequences, seed {args.seed}; filtered share: "
        "tokens of all-correct / all-wrong groups over tokens generated; not trained on: filtered + aborted; "
        f"simulated in {seconds:.0f} s)"
    )


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


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """The batch and the prompt stream's flags, shared with benchmarks/async_rollout.py."""
    p.add_argument("--prompts-per-step", type=int, default=512)
    p.add_argument("--samples-per-prompt", type=int, default=16)
    p.add_argument("--max-response-tokens", type=int, default=20_480)
    p.add_argument("--median-tokens", type=float, default=4_000, help="median response length, tokens")
    p.add_argument("--length-sigma", type=float, default=0.8, help="log-normal spread of response lengths")
    p.add_argument(
        "--difficulty-shift", type=float, default=1.0, help="log-length added for a prompt at accuracy 0"
    )
    p.add_argument("--accuracy-beta", type=float, nargs=2, default=[0.2, 0.2], metavar=("A", "B"))
    p.add_argument("--max-rounds", type=int, default=10, help="dynamic sampling: rounds allowed per step")
    p.add_argument("--seed", type=int, default=0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mode",
        choices=["methods", "epochs"],
        default="methods",
        help="methods: streaming vs regeneration; epochs: a prompt set read for several epochs as accuracy "
        "rises, without and with algorithm.skip_saturated",
    )
    p.add_argument("--steps", type=int, help="rollout steps to fill (default: 8; --mode epochs: 90)")
    p.add_argument("--concurrency", type=int, default=2048, help="sequences the engine runs at once")
    add_stream_args(p)
    p.add_argument("--regen-factor", type=int, default=3, help="regeneration: prompts generated per batch, x")
    defaults = AlgorithmConfig()
    epochs = p.add_argument_group("--mode epochs")
    epochs.add_argument("--num-prompts", type=int, default=17_917, help="prompt set (DAPO-Math-17k's size)")
    epochs.add_argument("--logit-mean", type=float, default=-1.0, help="mean logit of a prompt's accuracy")
    epochs.add_argument("--logit-std", type=float, default=5.0, help="spread of the logits over prompts")
    epochs.add_argument("--rise", type=float, default=0.05, help="logit gained per rollout step")
    epochs.add_argument("--skip-p-all-correct", type=float, default=defaults.skip_p_all_correct)
    epochs.add_argument("--skip-p-all-wrong", type=float, default=defaults.skip_p_all_wrong)
    epochs.add_argument("--skip-expiry-epochs", type=int, default=defaults.skip_expiry_epochs)
    args = p.parse_args()
    args.steps = args.steps or (90 if args.mode == "epochs" else 8)
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    if args.mode == "epochs":
        skip = SkipSettings(args.skip_p_all_correct, args.skip_p_all_wrong, args.skip_expiry_epochs)
        on = f"skip (p {skip.p_all_correct}/{skip.p_all_wrong}, expiry {skip.expiry_epochs})"
        runs = {"off": run_epochs(args, None), on: run_epochs(args, skip)}
        print_epoch_table(runs, args, time.perf_counter() - start)
        return
    streaming = run_streaming(args)
    regeneration = run_regeneration(args)
    for t in (streaming, regeneration):  # every generated token is accounted for exactly once
        assert t.generated == t.trained + t.filtered + t.aborted + t.discarded, t
    print_table(streaming, regeneration, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
