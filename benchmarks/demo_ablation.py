"""The paper's ablation, small: the CPU demo under each preset, compared where DAPO says they differ.

    python benchmarks/demo_ablation.py --out runs/demo_ablation [--seeds 1 2] [--steps 40]

Runs `python -m megatron_dapo.demo` (examples/demo_cpu.yaml) once per preset and seed, one run at a time, then
prints and writes (OUT/ablation.md) three comparisons of adjacent rows of the paper's table, averaged over
seeds, and draws the compared curves (seed means) into OUT/ablation.png; `dapo-report OUT/*-seed1` draws
every curve of the runs themselves:

- symmetric clip (overlong_filtering: eps 0.2 / 0.2) vs clip-higher (clip_higher: 0.2 / 0.28): policy entropy
  (the paper: clip-higher keeps it from collapsing), clip fractions;
- sample-level (soft_overlong) vs token-level loss (token_level): response length (the paper: token-level
  keeps long degenerate responses from growing);
- without (token_level) vs with dynamic sampling (dapo): rollout steps, and tokens generated, until the
  held-out accuracy first reaches --target.

Late-run means are over the second half of the steps. Everything here is measured on this run's machine;
the numbers move with the seeds, which is why each row gives the spread over them.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from megatron_dapo.trainer.report import Series, read_metrics

PRESETS = ("overlong_filtering", "clip_higher", "soft_overlong", "token_level", "dapo")
EVAL_METRIC = "eval/avg@8"  # examples/demo_cpu.yaml: 8 samples per held-out problem


def run_preset(
    out: Path, preset: str, seed: int, steps: int, cache_dir: Path, extra: Sequence[str] = (), name: str = ""
) -> Path:
    """One demo run (in its own process, like a user's); returns its run directory, OUT/NAME-seedS (NAME:
    the preset's unless given). `extra`: more options and overrides of `python -m megatron_dapo.demo`."""
    name = name or preset
    run_dir = out / f"{name}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "megatron_dapo.demo",
        "--out",
        str(run_dir),
        "--preset",
        preset,
        "--steps",
        str(steps),
        "--cache-dir",
        str(cache_dir),
        *extra,  # before the overrides below: options first, then every positional override together
        f"train.seed={seed}",
        "eval.every_steps=2",  # finer steps-to-target
        "logging.progress_bar=false",
    ]
    started = time.perf_counter()
    with (out / f"{name}-seed{seed}.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  {name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def late_mean(series: Series | None) -> float:
    """Mean over the second half of the steps."""
    if series is None:
        return float("nan")
    half = series.steps[-1] / 2
    values = [v for s, v in zip(series.steps, series.values, strict=True) if s > half]
    return statistics.fmean(values)


def steps_to(series: Series, target: float) -> float:
    """First step whose value reaches `target`; inf when none does."""
    return next((s for s, v in zip(series.steps, series.values, strict=True) if v >= target), float("inf"))


def tokens_to(metrics: dict[str, Series], step: float) -> float:
    """Tokens generated (trained on or not, aborted included) up to and including `step`."""
    if step == float("inf"):
        return float("inf")
    tokens = metrics["sampling/tokens_generated"]
    return sum(v for s, v in zip(tokens.steps, tokens.values, strict=True) if s <= step)


def summarize(run_dir: Path, target: float) -> dict[str, float]:
    metrics = read_metrics(run_dir)
    accuracy = metrics[EVAL_METRIC]
    reached = steps_to(accuracy, target)
    return {
        "final_accuracy": accuracy.values[-1],
        "entropy": late_mean(metrics.get("train/entropy")),
        "clip_upper": late_mean(metrics.get("train/clip_fraction_upper")),
        "clip_lower": late_mean(metrics.get("train/clip_fraction_lower")),
        "response_length": late_mean(metrics.get("rollout/response_length_mean")),
        "steps_to_target": reached,
        "tokens_to_target": tokens_to(metrics, reached),
    }


def cell(values: Sequence[float], digits: int) -> str:
    """Mean over seeds, with the range when there are several."""
    finite = [v for v in values if v != float("inf")]
    if len(finite) < len(values):
        return (
            f"not reached in {len(values) - len(finite)} of {len(values)} runs" if finite else "not reached"
        )
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


# (title, (row without, row with), ((metric, decimals), ...))
COMPARISONS = (
    (
        "symmetric clip vs clip-higher",
        ("overlong_filtering", "clip_higher"),
        (("entropy", 3), ("clip_upper", 4), ("clip_lower", 4), ("final_accuracy", 3)),
    ),
    (
        "sample-level vs token-level loss",
        ("soft_overlong", "token_level"),
        (("response_length", 2), ("entropy", 3), ("final_accuracy", 3)),
    ),
    (
        "without vs with dynamic sampling",
        ("token_level", "dapo"),
        (("steps_to_target", 0), ("tokens_to_target", 0), ("final_accuracy", 3)),
    ),
)


def table(results: dict[str, list[dict[str, float]]], target: float) -> str:
    lines = []
    for title, presets, columns in COMPARISONS:
        names = [name.replace("_target", f"_{target:.0%}") for name, _ in columns]
        lines += [
            f"### {title}",
            "",
            "| preset | " + " | ".join(names) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for preset in presets:
            cells = [cell([run[name] for run in results[preset]], digits) for name, digits in columns]
            lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# panel title: metric, each drawn as the mean over seeds, one line per preset
FIGURE_PANELS = {
    "held-out accuracy (eval/avg@8)": EVAL_METRIC,
    "policy entropy (nats/token)": "train/entropy",
    "response length (tokens)": "rollout/response_length_mean",
    "tokens generated per step": "sampling/tokens_generated",
}


def draw(run_dirs: dict[str, list[Path]], out: Path) -> Path:
    """The compared curves, averaged over seeds, one line per preset (every run's own curves: dapo-report)."""
    fig = Figure(figsize=(11, 7.5), layout="tight")
    for ax, (title, name) in zip(fig.subplots(2, 2).flat, FIGURE_PANELS.items(), strict=True):
        for preset, dirs in run_dirs.items():
            runs = [read_metrics(d)[name] for d in dirs]
            # every run logs the same steps (an eval every 2 steps, the others every step)
            mean = [statistics.fmean(values) for values in zip(*(run.values for run in runs), strict=True)]
            ax.plot(runs[0].steps, mean, label=preset, marker="o" if len(mean) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="train.seed of each run per preset")
    parser.add_argument("--steps", type=int, default=40, help="rollout steps per run")
    parser.add_argument("--target", type=float, default=0.35, help="held-out accuracy for steps-to-target")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/demo_cache"), help="warm-started models")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"{len(PRESETS)} presets x {len(args.seeds)} seeds, {args.steps} steps each, into {args.out}",
        flush=True,
    )
    run_dirs = {
        preset: [run_preset(args.out, preset, seed, args.steps, args.cache_dir) for seed in args.seeds]
        for preset in PRESETS
    }
    results = {preset: [summarize(d, args.target) for d in dirs] for preset, dirs in run_dirs.items()}
    text = table(results, args.target)
    (args.out / "ablation.md").write_text(text)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    png = draw(run_dirs, args.out / "ablation.png")
    print(f"\n{text}\nseeds {args.seeds}, {args.steps} steps; curves: {png}")


if __name__ == "__main__":
    main()
