"""`python -m megatron_dapo.demo [--out DIR] [--steps N] [--preset NAME]`: DAPO from start to finish on a CPU.

A tiny Qwen2 model, warm-started on arithmetic (demo/warm_start.py, cached), trained with the real loop:
Megatron policy (one gloo process), the CPU engine, weight sync, dynamic sampling, evaluation on held-out
problems. Writes into DIR: model/ and data/ (the inputs), metrics.jsonl, tensorboard/, checkpoints/,
report.png and summary.json (accuracy at start and end, steps, wall time, preset). The settings are
examples/demo_cpu.yaml; `bash launch/local.sh` trains with them too, once the demo has prepared DIR.
"""

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_dapo.algo import DynamicSamplingError
from megatron_dapo.config import PRESETS, DapoConfig, load_config
from megatron_dapo.data.arithmetic import generate_problems, write_jsonl
from megatron_dapo.demo.warm_start import WarmStartSettings, held_out_problems, warm_start
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.rollout.launcher import ServerStartError
from megatron_dapo.trainer.report import read_metrics, render_report
from megatron_dapo.trainer.tracking import METRICS_FILE

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo_cpu.yaml"
TRAIN_PROBLEMS = 20_000  # the training stream; any held-out problem is removed from it
TRAIN_SEED = 1
WARM_START = WarmStartSettings()  # its task is the demo's task
# Torch threads of this process (warm start and trainer); the CPU engine runs one more. On the 2-core machine,
# shared with other work, a warm-start step took 0.11-0.15 s with one thread and 3.3 s with two: busy cores
# make OpenMP threads wait for each other.
THREADS = 1


# What a demo run writes into its directory besides its inputs; cleared first, so every run starts afresh.
OUTPUTS = ("checkpoints", "tensorboard", "logs", METRICS_FILE, "report.png", "summary.json")


def input_paths(out: Path) -> dict[str, Path]:
    """Where `prepare_inputs` puts the model and the problems: known before they exist, so that the config
    is checked before the warm start runs."""
    data = out / "data"
    return {"model": out / "model", "train": data / "train.jsonl", "eval": data / "eval.jsonl"}


def prepare_inputs(out: Path, cache_dir: Path, train_problems: int = TRAIN_PROBLEMS) -> dict[str, Path]:
    """The warm-started model (trained once, then taken from the cache) and the train / held-out problems."""
    paths = input_paths(out)
    shutil.rmtree(paths["model"], ignore_errors=True)
    shutil.copytree(warm_start(cache_dir, WARM_START), paths["model"])
    held_out = held_out_problems(WARM_START.task)
    unseen = {record.problem for record in held_out}
    train = [
        r
        for r in generate_problems(WARM_START.task, train_problems, seed=TRAIN_SEED)
        if r.problem not in unseen
    ]
    write_jsonl(train, paths["train"])
    write_jsonl(held_out, paths["eval"])
    return paths


def demo_config(out: Path, inputs: dict[str, Path], overrides: Sequence[str] = ()) -> DapoConfig:
    """examples/demo_cpu.yaml with this run's paths, then the caller's overrides."""
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(
            f"{DEMO_CONFIG} not found: run the demo from a clone of the repository (pip install -e '.[cpu]')"
        )
    paths = [
        f"model.hf_path={inputs['model']}",
        f"data.train_path={inputs['train']}",
        f"eval.path={inputs['eval']}",
        f"logging.dir={out}",
    ]
    return load_config(DEMO_CONFIG, [*paths, *overrides])


def accuracy_curve(run_dir: Path, samples_per_problem: int) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of every evaluation of a run."""
    series = read_metrics(run_dir).get(f"eval/avg@{samples_per_problem}")
    if series is None:
        raise ValueError(f"{run_dir / METRICS_FILE} has no eval/avg@{samples_per_problem}: no evaluation ran")
    return list(zip(series.steps, series.values, strict=True))


def clear_outputs(out: Path) -> None:
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_demo(
    out: Path,
    *,
    preset: str,
    cache_dir: Path,
    overrides: Sequence[str] = (),
    train_problems: int = TRAIN_PROBLEMS,
) -> dict:
    """Prepare, train, report; returns the summary also written to out/summary.json."""
    # Imported here: megatron-core takes seconds to load, and `--help` should not wait for it.
    from megatron_dapo.trainer.loop import Trainer

    started = time.perf_counter()
    cfg = demo_config(out, input_paths(out), [f"preset={preset}", *overrides])  # a typo fails here, at once
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    prepare_inputs(out, cache_dir, train_problems)
    with Trainer(cfg) as trainer:
        trainer.fit()
    curve = accuracy_curve(out, cfg.eval.samples_per_problem)
    summary = {
        "preset": preset,
        "steps": curve[-1][0],
        "accuracy_start": curve[0][1],
        "accuracy_end": curve[-1][1],
        "accuracy_metric": f"eval/avg@{cfg.eval.samples_per_problem} on {_problems(cfg)} held-out problems",
        "wall_time_s": round(time.perf_counter() - started, 1),
        "report": str(render_report([out], out / "report.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _problems(cfg: DapoConfig) -> int:
    """Distinct held-out problems: evaluation merges rows that repeat a problem with its answer."""
    rows = [json.loads(line) for line in Path(cfg.eval.path).read_text().splitlines() if line.strip()]
    return len({(row["problem"], row["answer"]) for row in rows})


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
