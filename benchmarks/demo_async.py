"""The CPU demo, synchronous vs asynchronous (issue 14's second table): wall time to the synchronous run's
final held-out accuracy, and final accuracy.

    python benchmarks/demo_async.py --out runs/demo_async [--seeds 1 2] [--steps 40] [--modes sync async]

Each run trains examples/demo_cpu.yaml (the demo's inputs, prepared once by megatron_dapo/demo/run.py; the
warm start comes from --cache-dir) with `python -m megatron_dapo.train` pinned to one core (taskset) and a
fresh CPU engine pinned to another, one thread each, the trainer reaching it through rollout.server_urls.
Runs go one at a time, a seed's modes one after the other (the machine's load drifts). Wall times per step
are the TensorBoard events' wall_time: the clock when the trainer wrote that step's row, after its update,
weight sync and (every eval.every_steps) evaluation; "training" counts from the step-0 row (setup and the
baseline evaluation done) to the last step's row. The time to the target is that of the first evaluation
reaching it, so it moves in steps of eval.every_steps. Prints the table and writes it to OUT/demo_async.md
(the numbers: OUT/demo_async.json).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from megatron_dapo.config import load_config
from megatron_dapo.demo.run import DEMO_CONFIG, prepare_inputs
from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key
from megatron_dapo.rollout.launcher import CPU_ENGINE_MODULE, free_port
from megatron_dapo.trainer.report import read_metrics
from megatron_dapo.trainer.tracking import TENSORBOARD_DIR

EVAL_METRIC = "eval/avg@8"  # examples/demo_cpu.yaml: 8 samples per held-out problem
ASYNC = ("rollout.max_staleness=1", "rollout.partial=true")
MODES = {
    "sync": (),
    "async": ASYNC,
    "async_seqmask": (  # plus the sequence-level off-policy mask of issue 14
        *ASYNC,
        "algorithm.rollout_is_level=sequence",
        "algorithm.rollout_is_mode=mask",
        "algorithm.rollout_is_cap=5",
    ),
}
TRAINER_CORE, ENGINE_CORE = "0", "1"
# One thread per process, as the demo runs; no GPU, as the demo (cli/demo.py) hides them too.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", API_KEY_ENV: new_api_key()}


def pinned(core: str, module: str, *args: str) -> list[str]:
    """`python -m module args` on one core."""
    return ["taskset", "-c", core, sys.executable, "-m", module, *args]


def start_engine(model: Path, seed: int, log: Path) -> tuple[subprocess.Popen, str]:
    """A CPU engine on its own core and a free port; returns it once /health answers."""
    port = free_port("127.0.0.1")
    command = pinned(ENGINE_CORE, CPU_ENGINE_MODULE, "--model-path", str(model), "--port", str(port))
    command += ["--random-seed", str(seed), "--log-level", "warning"]
    with log.open("w") as out:  # the child keeps its own descriptor
        engine = subprocess.Popen(
            command, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            raise RuntimeError(f"the CPU engine exited ({engine.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return engine, url
        except OSError:
            time.sleep(0.5)
    stop_engine(engine)
    raise RuntimeError(f"the CPU engine did not answer {url}/health within 120 s; see {log}")


def stop_engine(engine: subprocess.Popen) -> None:
    """Its process group (its own session): the engine and anything it started."""
    os.killpg(engine.pid, signal.SIGTERM)
    engine.wait(timeout=30)


def children_cpu_s() -> float:
    """User + system CPU seconds of the child processes reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(out: Path, inputs: dict[str, Path], mode: str, seed: int, steps: int) -> Path:
    """One run in OUT/MODE-seedS; its total wall time (engine start to trainer exit) in run.json there."""
    run_dir = out / f"{mode}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory left over would be resumed
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    engine, url = start_engine(inputs["model"], seed, out / f"{mode}-seed{seed}.engine.log")
    command = pinned(TRAINER_CORE, "megatron_dapo.train", "--config", str(DEMO_CONFIG))
    command += [f"model.hf_path={inputs['model']}"]
    command += [f"data.train_path={inputs['train']}", f"eval.path={inputs['eval']}", f"logging.dir={run_dir}"]
    command += [f"rollout.server_urls=[{url}]", f"train.steps={steps}", f"train.seed={seed}"]
    command += ["logging.progress_bar=false", *MODES[mode]]
    cpu_before = children_cpu_s()
    try:
        with (out / f"{mode}-seed{seed}.log").open("w") as log:
            subprocess.run(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, check=True)
    finally:
        trainer_cpu = children_cpu_s() - cpu_before  # the engine is not reaped yet: the trainer's alone
        stop_engine(engine)
    total = time.perf_counter() - started
    record = {"total_s": total, "trainer_cpu_s": trainer_cpu, "command": command}
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"  {mode} seed {seed}: {total:.0f} s", flush=True)
    return run_dir


def step_clock(run_dir: Path) -> dict[int, float]:
    """step -> wall clock (s since the epoch) of the step's first TensorBoard scalar (its main row)."""
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={SCALARS: 0})
    events.Reload()
    clock: dict[int, float] = {}
    for tag in events.Tags()[SCALARS]:
        for event in events.Scalars(tag):
            clock[event.step] = min(clock.get(event.step, event.wall_time), event.wall_time)
    return clock


def summarize(run_dir: Path, target: float) -> dict[str, float]:
    metrics, clock = read_metrics(run_dir), step_clock(run_dir)
    accuracy = metrics[EVAL_METRIC]
    reached = next((s for s, v in zip(accuracy.steps, accuracy.values, strict=True) if v >= target), None)
    return {
        **{k: v for k, v in json.loads((run_dir / "run.json").read_text()).items() if k != "command"},
        "train_s": clock[max(clock)] - clock[0],
        "to_target_s": clock[reached] - clock[0] if reached is not None else float("inf"),
        "target": target,
        "final_accuracy": accuracy.values[-1],
        "offpolicy_token_share": statistics.fmean(metrics["rollout/offpolicy_token_share"].values)
        if "rollout/offpolicy_token_share" in metrics
        else 0.0,
        "wait_rollout_s": statistics.fmean(metrics["timing/wait_rollout_s"].values),
    }


COLUMNS = (  # name, header, format
    ("total_s", "total (s)", "{:.0f}"),
    ("train_s", "training (s)", "{:.0f}"),
    ("to_target_s", "to target (s)", "{:.0f}"),
    ("target", "target", "{:.3f}"),
    ("final_accuracy", "final avg@8", "{:.3f}"),
    ("offpolicy_token_share", "off-policy tokens", "{:.3f}"),
    ("wait_rollout_s", "wait rollout (s/step)", "{:.2f}"),
    ("trainer_cpu_s", "trainer CPU (s)", "{:.0f}"),
)


def mean_cell(values: Sequence[float], fmt: str) -> str:
    """Mean over seeds; a time to the target that some run never reached is not averaged."""
    missed = sum(v == float("inf") for v in values)
    return f"not reached in {missed} of {len(values)}" if missed else fmt.format(statistics.fmean(values))


def ratios(results: dict[str, dict[int, dict[str, float]]], mode: str, name: str) -> list[float]:
    """Per seed: the mode's `name` over the sync run's."""
    return [row[name] / results["sync"][seed][name] for seed, row in results[mode].items()]


def table(results: dict[str, dict[int, dict[str, float]]], goal: float) -> str:
    headers = [h for _, h, _ in COLUMNS] + ["training / sync", "to target / sync"]
    lines = ["| mode | seed | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for mode, by_seed in results.items():
        train, target = ratios(results, mode, "train_s"), ratios(results, mode, "to_target_s")
        for (seed, row), *rs in zip(by_seed.items(), train, target, strict=True):
            cells = [fmt.format(row[name]) for name, _, fmt in COLUMNS] + [f"{r:.2f}" for r in rs]
            lines.append(f"| {mode} | {seed} | " + " | ".join(cells) + " |")
        means = [mean_cell([row[name] for row in by_seed.values()], fmt) for name, _, fmt in COLUMNS]
        means += [mean_cell(train, "{:.2f}"), mean_cell(target, "{:.2f}")]
        if mode != "sync":
            met = statistics.fmean(target) <= goal
            means[-1] = f"**{means[-1]}** (goal <= {goal}: {'met' if met else 'not met'})"
        lines.append(f"| {mode} | mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_async"))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2], help="train.seed of each run per mode"
    )
    parser.add_argument("--steps", type=int, default=40, help="rollout steps per run")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--goal", type=float, default=0.7, help="async / sync wall time to the target")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/demo_cache"), help="warm-started models")
    args = parser.parse_args(argv)
    modes = ["sync", *(m for m in args.modes if m != "sync")]  # sync first: it sets each seed's target
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args.out / "inputs", args.cache_dir)
    print(
        f"{len(modes)} modes x {len(args.seeds)} seeds, {args.steps} steps each, into {args.out}", flush=True
    )
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:  # the modes of a seed side by side: the machine's load drifts
        for mode in modes:
            run_dir = run_one(args.out, inputs, mode, seed, args.steps)
            target = results["sync"][seed]["final_accuracy"] if mode != "sync" else None
            if target is None:  # the sync run's target is its own final accuracy
                target = read_metrics(run_dir)[EVAL_METRIC].values[-1]
            results.setdefault(mode, {})[seed] = summarize(run_dir, target)
    caption = (
        f"The CPU demo (examples/demo_cpu.yaml, {args.steps} steps, evaluation every "
        f"{load_config(DEMO_CONFIG).eval.every_steps} steps), trainer on core "
        f"{TRAINER_CORE} and CPU engine on core {ENGINE_CORE} (taskset, one thread each). target: the sync "
        f"run's final {EVAL_METRIC} (same seed); to target: from the step-0 row to the first evaluation "
        "reaching it; training: step-0 row to last row; times from TensorBoard event wall_time; total: "
        "engine start to trainer exit; trainer CPU: user + system seconds of the trainer process, all its "
        "threads. Modes: "
        + "; ".join(f"{mode}: {' '.join(MODES[mode]) or 'the config as is'}" for mode in modes)
        + "."
    )
    text = f"{caption}\n\n{table(results, args.goal)}\n"
    (args.out / "demo_async.md").write_text(text)
    (args.out / "demo_async.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{text}")


if __name__ == "__main__":
    main()
