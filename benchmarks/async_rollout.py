"""Asynchronous DAPO at the paper's scale, simulated (issue 14): synchronous, partial rollouts, and rollout
overlapping training under a staleness bound, side by side at the same total GPU count.

The prompt stream and response lengths are those of benchmarks/dynamic_sampling.py (512 prompts x 16
samples per step, lengths <= 20,480); the servers are benchmarks/sim_servers.py's, whose decode step
a + b·n is the planner's (megatron_dapo/plan/decode.py; the long tail is slow per GPU). Every figure of the
hardware comes from the planner on examples/dapo_qwen32b.yaml: one sequence decodes at
--tail-ms-per-token, a full server at --decode-tokens-per-s-per-gpu, a server's capacity is its KV cache
at the mean length, training costs the planner's GPU-seconds per trained token, weights cost the planner's
weight sync. The planner is told the stream's mean length, length spread and keep rate, and its step
estimates are printed beside the simulated ones.

- synchronous (today's loop, colocated): all GPUs generate until dynamic sampling fills the batch, abort
  what is in flight, then all GPUs train; surplus finished groups carry over (staleness 1).
- partial only (colocated): the same, but the samples in flight are interrupted, not aborted, and continue
  in the next step's rollout (prefill of prompt + partial response under the new weights).
- async η (rollout.colocate=false, rollout.max_staleness=η): servers on their own nodes generate all the
  time; the trainer takes a batch as soon as one is full; a group whose first token came from weights
  older than s - 1 - η can no longer be trained at step s and is dropped (all its tokens). At each weight
  update the servers pause; running samples continue in place, or (+ partial) are interrupted and resumed.
  Submission keeps the kept groups expected from what is in flight at the batches still open to the
  current weights (η of them). The split of nodes between rollout and training is searched around the
  planner's best estimate (--splits of them).

Waste = tokens generated and never trained on: filtered (groups of all-correct or all-wrong samples),
dropped-stale (async: groups past the bound), aborted (synchronous: in flight when the batch filled).
Run: python benchmarks/async_rollout.py [--steps 6] [--warmup 3] [--splits 3] [--modes ...]
"""

import argparse
import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dynamic_sampling import PromptStream, add_stream_args
from sim_servers import Engine, Flight, Sample, ServerModel

from megatron_dapo.algo import DynamicSampler, is_informative
from megatron_dapo.config import load_config
from megatron_dapo.plan import GIB, Assumptions, Cluster, load_model_shape, make_plan, rollout_memory

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dapo_qwen32b.yaml"


@dataclass(frozen=True)
class Mode:
    name: str
    colocated: bool
    max_staleness: int  # η; the colocated loops carry groups one step and bound nothing
    partial: bool


MODES = {
    "sync": Mode("synchronous", True, 0, False),
    "partial": Mode("partial only", True, 0, True),
    "async1": Mode("async η=1", False, 1, False),
    "async1p": Mode("async η=1 + partial", False, 1, True),
    "async2": Mode("async η=2", False, 2, False),
    "async2p": Mode("async η=2 + partial", False, 2, True),
}


@dataclass
class Hardware:
    """What the planner says about the cluster and the model."""

    colocated: ServerModel
    dedicated: ServerModel  # more KV cache: no training state beside it
    gpus: int
    gpus_per_node: int
    server_tp: int
    gpu_s_per_token: float  # training GPU-seconds per trained token (prompt + response)
    weight_sync_s: float
    prompt_tokens: int
    planner_sync_s: float  # the planner's synchronous (colocated) step, seconds
    split_estimates: dict[int, dict[int, float]]  # η -> rollout nodes -> the planner's async step, seconds

    def train_s(self, flights: list[Flight], gpus: int) -> float:
        samples = sum(len(f.samples) for f in flights)
        tokens = sum(f.tokens() for f in flights) + samples * self.prompt_tokens
        return tokens * self.gpu_s_per_token / gpus


def stream_assumptions(args: argparse.Namespace, groups: int = 4000) -> dict[str, float]:
    """The planner's length and keep-rate assumptions measured on this benchmark's prompt stream (its own
    seeded draw), so that the planner and the simulation start from the same inputs."""
    stream = PromptStream(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    drawn = [stream.next() for _ in range(groups)]
    lengths = np.concatenate([g.lengths for g in drawn])
    return {
        "mean_response_fraction": float(lengths.mean()) / args.max_response_tokens,
        "response_length_sigma": float(np.log(lengths).std()),
        "kept_group_fraction": sum(is_informative(g.correct.tolist()) for g in drawn) / groups,
    }


def plan_hardware(args: argparse.Namespace) -> Hardware:
    """The planner's figures for the example's colocated run, and its async estimate for every split. Its
    servers are the simulation's: the planner's decode step (plan/decode.py), colocated and dedicated."""
    shape = load_model_shape(args.model)
    assume = Assumptions(**{k: getattr(args, k) for k in _ASSUMPTIONS}, **stream_assumptions(args))
    batch = [
        f"train.prompts_per_step={args.prompts_per_step}",
        f"algorithm.samples_per_prompt={args.samples_per_prompt}",
        f"rollout.max_response_tokens={args.max_response_tokens}",
    ]
    plan = make_plan(
        load_config(str(args.config), batch), shape, Cluster(args.nodes, args.gpus_per_node), assume
    )
    if not plan.fits or plan.rollout is None or plan.time is None:
        raise SystemExit(f"the planner says {args.config} does not fit {args.nodes} nodes: {plan.problems}")
    speed, server_tp = plan.time.server, plan.config.rollout.server_tp
    if not speed.step_per_sequence_s > 0:
        raise SystemExit(
            "--tail-ms-per-token must be below a full server's decode step "
            f"({1000 * speed.step_s(speed.capacity):.1f} ms for {speed.capacity} sequences at "
            "--decode-tokens-per-s-per-gpu)"
        )
    colocated = ServerModel(
        speed=speed,
        prefill_s_per_token=1 / (args.prefill_tokens_per_s_per_gpu * server_tp),
        prompt_tokens=assume.mean_prompt_tokens,
    )
    dedicated = [*batch, "rollout.colocate=false", f"rollout.mem_fraction={args.dedicated_mem_fraction}"]
    # The same servers with more KV cache run more sequences at once, so decode faster: tell the planner.
    room = rollout_memory(
        shape, load_config(str(args.config), dedicated), GIB * Cluster().gpu_memory_gib, assume
    )
    faster = speed.tokens_per_s(room.mean_length_sequences_per_server) / server_tp
    dedicated_assume = dataclasses.replace(assume, decode_tokens_per_s_per_gpu=faster)
    estimates: dict[int, dict[int, float]] = {}
    split_time = None
    for eta in sorted({m.max_staleness for m in MODES.values() if not m.colocated}):
        eta_cfg = load_config(str(args.config), [*dedicated, f"rollout.max_staleness={eta}"])
        estimates[eta] = {}
        for nodes in range(1, args.nodes):
            cluster = Cluster(args.nodes, args.gpus_per_node, rollout_nodes=nodes)
            split = make_plan(eta_cfg, shape, cluster, dedicated_assume)
            if split.fits and split.time is not None and split.time.async_s is not None:
                estimates[eta][nodes], split_time = split.time.async_s, split.time
    if split_time is None:
        raise SystemExit(f"the planner finds no split of {args.nodes} nodes that fits {args.config}")
    return Hardware(
        colocated=colocated,
        dedicated=dataclasses.replace(colocated, speed=split_time.server),
        gpus=args.nodes * args.gpus_per_node,
        gpus_per_node=args.gpus_per_node,
        server_tp=server_tp,
        gpu_s_per_token=plan.time.training_s * plan.layout.train_gpus / plan.time.trained_tokens,
        weight_sync_s=split_time.weight_sync_s,
        prompt_tokens=assume.mean_prompt_tokens,
        planner_sync_s=plan.time.step_s,
        split_estimates=estimates,
    )


@dataclass
class Ledger:
    """What happens inside the measured window (after the warm-up steps)."""

    start: float = math.inf
    end: float = math.inf
    trained: float = 0.0
    filtered: float = 0.0
    dropped: float = 0.0  # stale
    aborted: float = 0.0
    staleness: Counter = field(default_factory=Counter)  # trained tokens by staleness
    trainer_idle_s: float = 0.0
    engine_idle_s: float = 0.0  # server-seconds
    decoded: float = 0.0  # tokens
    server_s: float = 0.0  # server-seconds in the window

    def waste(self, now: float, kind: str, flights: list[Flight]) -> None:
        if now >= self.start:
            setattr(self, kind, getattr(self, kind) + sum(f.tokens() for f in flights))

    def train(self, now: float, flights: list[Flight], step: int) -> None:
        if now < self.start:
            return
        for flight in flights:
            for sample in flight.samples:
                for version, tokens in sample.segments:
                    self.staleness[step - 1 - version] += tokens
                    self.trained += tokens

    def wait(self, since: float, until: float) -> None:
        self.trainer_idle_s += max(0.0, until - max(since, self.start))

    def snapshot(self, engine: Engine, now: float, sign: int) -> None:
        """Called at the window's start (sign -1) and end (+1)."""
        engine.advance_all(now)
        self.engine_idle_s += sign * sum(s.idle_s for s in engine.servers)
        self.decoded += sign * sum(s.generated for s in engine.servers)
        if sign < 0:
            self.start = now
        else:
            self.end = now
            self.server_s = len(engine.servers) * (self.end - self.start)


@dataclass
class Result:
    mode: Mode
    rollout_gpus: int
    train_gpus: int
    step_s: float
    ledger: Ledger


def run_sync(mode: Mode, hw: Hardware, args: argparse.Namespace) -> Result:
    """Colocated: generate (streaming dynamic sampling), abort or interrupt what is in flight, train."""
    engine = Engine(hw.gpus // hw.server_tp, hw.colocated)
    stream, ledger, now = PromptStream(args), Ledger(), 0.0
    sampler: DynamicSampler[Flight] = DynamicSampler(args.prompts_per_step, max_rounds=args.max_rounds)
    in_flight: dict[int, Flight] = {}
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:
            ledger.snapshot(engine, now, -1)
        engine.version = step - 1
        engine.fill(now)  # partial samples of the last step first
        rollout_start = now
        while not sampler.full:
            for _ in range(sampler.prompts_to_submit(in_flight=len(in_flight))):
                flight = engine.submit(stream.next(), now)
                in_flight[flight.group.prompt] = flight
            now, finished = engine.pop_finished()
            for flight in _completed(finished):
                del in_flight[flight.group.prompt]
                if not sampler.add(flight, flight.group.correct.tolist()):
                    ledger.waste(now, "filtered", [flight])
        if mode.partial:
            engine.interrupt_all(now)
        else:
            engine.cancel(in_flight.values(), now)
            ledger.waste(now, "aborted", list(in_flight.values()))
            in_flight.clear()
        batch, _ = sampler.take_batch()
        ledger.train(now, batch, step)
        ledger.wait(rollout_start, now)
        now += hw.train_s(batch, hw.gpus) + hw.weight_sync_s
    ledger.snapshot(engine, now, +1)
    return Result(mode, hw.gpus, hw.gpus, (ledger.end - ledger.start) / args.steps, ledger)


def _completed(finished: list[Sample]) -> list[Flight]:
    """The groups whose last sample is among `finished` (dynamic sampling judges whole groups)."""
    done = []
    for sample in finished:
        sample.flight.finished += 1
        if sample.flight.finished == len(sample.flight.samples):
            done.append(sample.flight)
    return done


class AsyncLoop:
    """Dedicated nodes: the engine never stops; the trainer takes a batch whenever one is full."""

    def __init__(self, mode: Mode, hw: Hardware, args: argparse.Namespace, rollout_nodes: int) -> None:
        self.mode, self.hw, self.args = mode, hw, args
        self.rollout_gpus = rollout_nodes * hw.gpus_per_node
        self.train_gpus = hw.gpus - self.rollout_gpus
        self.engine = Engine(self.rollout_gpus // hw.server_tp, hw.dedicated)
        self.stream, self.ledger = PromptStream(args), Ledger()
        self.ready: list[Flight] = []  # kept groups not yet trained, in completion order
        self.in_flight: dict[int, Flight] = {}
        self.kept, self.seen = 0, 0
        self.step = 0  # the step trained last or now
        self.trainer = ("free", 0.0)  # the trainer's next event and its time; "free": waiting since
        self.now = 0.0

    def run(self) -> Result:
        while True:
            kind, when = self.trainer
            if kind == "free" and len(self.ready) >= self.args.prompts_per_step:
                self.take_batch()
                continue
            self.top_up()
            if kind != "free" and when <= self.engine.next_time():
                self.now = when
                if kind == "trained":  # the trainer sends the weights; the servers pause to load them
                    self.engine.update_weights(when, self.hw.weight_sync_s, self.step, self.mode.partial)
                    self.trainer = ("synced", when + self.hw.weight_sync_s)
                elif self.step == self.args.warmup + self.args.steps:
                    break
                else:
                    self.trainer = ("free", when)
                continue
            if self.engine.next_time() == math.inf:
                raise RuntimeError(f"{self.mode.name}: nothing in flight and no batch to train")
            self.now, finished = self.engine.pop_finished()
            self.collect(finished)
        self.ledger.snapshot(self.engine, self.now, +1)
        step_s = (self.ledger.end - self.ledger.start) / self.args.steps
        return Result(self.mode, self.rollout_gpus, self.train_gpus, step_s, self.ledger)

    def take_batch(self) -> None:
        """Train the stalest full batch; then drop what can no longer join the next one (first token from
        weights older than step - η)."""
        now = self.now
        if self.step == self.args.warmup:
            self.ledger.snapshot(self.engine, now, -1)
        self.step += 1
        self.ledger.wait(self.trainer[1], now)
        self.ready.sort(key=lambda f: f.oldest)
        batch, self.ready = self.ready[: self.args.prompts_per_step], self.ready[self.args.prompts_per_step :]
        self.ledger.train(now, batch, self.step)
        limit = self.step - self.mode.max_staleness
        stale = [f for f in self.ready if f.oldest < limit]
        self.ready = [f for f in self.ready if f.oldest >= limit]
        doomed = [f for f in self.in_flight.values() if f.oldest is not None and f.oldest < limit]
        self.engine.cancel(doomed, now)
        for flight in doomed:
            del self.in_flight[flight.group.prompt]
        self.ledger.waste(now, "dropped", stale + doomed)
        self.trainer = ("trained", now + self.hw.train_s(batch, self.train_gpus))

    def top_up(self) -> None:
        """Keep the kept groups expected from what is in flight at the batches still open to the engine's
        weights (batches step + 1 .. version + 1 + η)."""
        rate = (self.kept + 1) / (self.seen + 1)
        open_batches = self.engine.version + 1 + self.mode.max_staleness - self.step
        missing = open_batches * self.args.prompts_per_step - len(self.ready) - len(self.in_flight) * rate
        for _ in range(max(0, math.ceil(missing / rate))):
            flight = self.engine.submit(self.stream.next(), self.now)
            self.in_flight[flight.group.prompt] = flight

    def collect(self, finished: list[Sample]) -> None:
        for flight in _completed(finished):
            del self.in_flight[flight.group.prompt]
            self.seen += 1
            if is_informative(flight.group.correct.tolist()):
                self.kept += 1
                self.ready.append(flight)
            else:
                self.ledger.waste(self.now, "filtered", [flight])


def run_mode(mode: Mode, hw: Hardware, args: argparse.Namespace) -> tuple[Result, dict[int, float]]:
    """The colocated loops run once; an async mode runs on the --splits splits the planner ranks best, and
    returns the best with every split's step time (rollout nodes -> seconds)."""
    if mode.colocated:
        return run_sync(mode, hw, args), {}
    estimates = hw.split_estimates[mode.max_staleness]
    candidates = sorted(estimates, key=estimates.get)[: args.splits]
    results = {nodes: AsyncLoop(mode, hw, args, nodes).run() for nodes in sorted(candidates)}
    best = min(results.values(), key=lambda r: r.step_s)
    return best, {nodes: r.step_s for nodes, r in results.items()}


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def print_table(results: list[tuple[Result, dict[int, float]]], hw: Hardware) -> None:
    """A Markdown table, to paste into the issue note as is."""
    base = results[0][0].step_s
    print(
        "| mode | GPUs rollout / train | s per step | vs sync | trainer idle | engine idle | decode eff. "
        "| not trained: filtered | dropped-stale | aborted | staleness 0 / 1 / 2 / 3+ |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for result, _ in results:
        led, step_s = result.ledger, result.step_s
        total = led.trained + led.filtered + led.dropped + led.aborted
        stale = [led.staleness[k] for k in range(3)] + [sum(v for k, v in led.staleness.items() if k >= 3)]
        where = "all (colocated)" if result.mode.colocated else f"{result.rollout_gpus} / {result.train_gpus}"
        server = hw.colocated if result.mode.colocated else hw.dedicated
        print(
            f"| {result.mode.name} | {where} | {step_s:,.0f} | {base / step_s:.2f}x | "
            f"{_share(led.trainer_idle_s, led.end - led.start)} | "
            f"{_share(led.engine_idle_s, led.server_s)} | "
            f"{_share(led.decoded, led.server_s * server.full_tokens_per_s())} | "
            f"{_share(led.filtered, total)} | "
            f"{_share(led.dropped, total)} | {_share(led.aborted, total)} | "
            f"{' / '.join(_share(v, led.trained) for v in stale)} |"
        )
    print()
    for result, splits in results:
        if splits:
            tried = ", ".join(f"{n * hw.gpus_per_node} GPUs {s:,.0f} s" for n, s in splits.items())
            print(f"{result.mode.name}: rollout split tried (s per step): {tried}")
    print(
        "planner (η=1) per split: "
        + ", ".join(f"{n * hw.gpus_per_node}: {s:,.0f} s" for n, s in sorted(hw.split_estimates[1].items()))
    )
    print("planner vs simulated, s per step (same inputs): " + "; ".join(_planner_vs_simulated(results, hw)))
    goal = [
        r
        for r, _ in results
        if not r.mode.colocated
        and r.mode.max_staleness <= 2
        and base / r.step_s >= 2
        and (r.ledger.dropped + r.ledger.aborted)
        < 0.05 * (r.ledger.trained + r.ledger.filtered + r.ledger.dropped + r.ledger.aborted)
    ]
    met = ", ".join(r.mode.name for r in goal) if goal else "NOT MET by any mode"
    print(f"goal (>= 2x the synchronous step throughput at η <= 2, non-filtered waste < 5%): {met}")


def _planner_vs_simulated(results: list[tuple[Result, dict[int, float]]], hw: Hardware) -> list[str]:
    """Each mode's simulated step beside the planner's estimate for the same placement and split."""
    pairs = []
    for result, _ in results:
        if result.mode.colocated:
            planned = hw.planner_sync_s
        else:
            planned = hw.split_estimates[result.mode.max_staleness][result.rollout_gpus // hw.gpus_per_node]
        pairs.append(
            f"{result.mode.name} {planned:,.0f} vs {result.step_s:,.0f} ({planned / result.step_s - 1:+.0%})"
        )
    return pairs


def _footnote(hw: Hardware, args: argparse.Namespace, seconds: float) -> str:
    s, d = hw.colocated, hw.dedicated
    return (
        f"({args.steps} measured steps after {args.warmup} warm-up steps of {args.prompts_per_step} "
        f"prompts x {args.samples_per_prompt} samples, lengths <= {args.max_response_tokens:,}, accuracy ~ "
        f"Beta{tuple(args.accuracy_beta)}, seed {args.seed}; {hw.gpus} GPUs, SGLang TP {hw.server_tp} "
        f"servers of {s.capacity} sequences colocated, {d.capacity} dedicated (rollout.mem_fraction "
        f"{args.dedicated_mem_fraction:g}), decode step {1000 * s.speed.step_base_s:.1f} + "
        f"{1000 * s.speed.step_per_sequence_s:.3f}·n ms for n sequences, prefill "
        f"{args.prefill_tokens_per_s_per_gpu:,.0f} tok/s per GPU; training {hw.gpu_s_per_token * 1e3:.3f} "
        "GPU-ms per trained token and weight sync "
        f"{hw.weight_sync_s:.1f} s (planner, {args.config.name}); idle: share of the window the trainer "
        "waited / server-seconds with nothing to decode or paused for weights; decode eff.: tokens decoded / "
        "what full servers would decode; waste and staleness: shares of tokens whose fate was decided in the "
        f"window / of trained tokens; simulated in {seconds:.0f} s)"
    )


_ASSUMPTIONS = ("tail_ms_per_token", "decode_tokens_per_s_per_gpu", "mfu", "weight_sync_gb_per_s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="steps before the measured window")
    p.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=["sync", "partial", "async1", "async2p"]
    )
    p.add_argument("--splits", type=int, default=3, help="async: splits tried, the planner's best first")
    add_stream_args(p)
    hw = p.add_argument_group("hardware (the planner's assumptions; defaults: dapo-plan's)")
    hw.add_argument("--config", type=Path, default=EXAMPLE)
    hw.add_argument("--model", default="qwen2.5-32b")
    hw.add_argument("--nodes", type=int, default=16)
    hw.add_argument("--gpus-per-node", type=int, default=8)
    defaults = Assumptions()
    for name in _ASSUMPTIONS:
        hw.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    hw.add_argument(
        "--dedicated-mem-fraction",
        type=float,
        default=0.85,
        help="rollout.mem_fraction of the async runs' servers, alone on their GPUs (the example's 0.65 "
        "leaves room for the colocated training state)",
    )
    hw.add_argument("--prefill-tokens-per-s-per-gpu", type=float, default=7_500.0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    hw = plan_hardware(args)
    modes = [MODES[name] for name in args.modes]
    if not modes[0].colocated:
        raise SystemExit("--modes: list sync (or partial) first, the baseline the others are compared with")
    results = [run_mode(mode, hw, args) for mode in modes]
    print_table(results, hw)
    print(_footnote(hw, args, time.perf_counter() - start))


if __name__ == "__main__":
    main()
