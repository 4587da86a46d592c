"""algorithm.skip_saturated on the CPU demo: held-out accuracy against rollout steps and against tokens
generated, without and with the option, on a training set small enough to be read for several epochs.

    python benchmarks/demo_skip_saturated.py --out runs/demo_skip [--seeds 1 2] [--steps 40]
        [--train-problems 200] [section.field=value ...]

Runs `python -m megatron_dapo.demo` (dapo preset, examples/demo_cpu.yaml) once per seed without and once with
`algorithm.skip_saturated=true` (the config's default probabilities and expiry unless overridden), one run at
a time; writes OUT/skip_saturated.md (the table), .json and .png (the curves, seed means). The default demo
trains on 20,000 problems and never finishes an epoch, where skipping cannot act: hence --train-problems.
"""

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from demo_ablation import EVAL_METRIC, cell, run_preset, steps_to, tokens_to
from matplotlib.figure import Figure

from megatron_dapo.trainer.report import Series, read_metrics

VARIANTS = {"off": [], "skip": ["algorithm.skip_saturated=true"]}


def summarize(run_dir: Path, target: float) -> dict[str, float]:
    metrics = read_metrics(run_dir)
    accuracy = metrics[EVAL_METRIC]
    generated = metrics["sampling/tokens_generated"]
    reached = steps_to(accuracy, target)
    skipped = metrics.get("sampling/prompts_skipped_saturated")
    return {
        "final_accuracy": accuracy.values[-1],
        "best_accuracy": max(accuracy.values),
        "tokens_generated": sum(generated.values),
        "filtered_token_share": statistics.fmean(metrics["sampling/filtered_token_share"].values),
        "prompts_skipped": sum(skipped.values) if skipped else 0.0,
        "steps_to_target": reached,
        "tokens_to_target": tokens_to(metrics, reached),
    }


COLUMNS = (
    ("final_accuracy", 3),
    ("best_accuracy", 3),
    ("steps_to_target", 0),
    ("tokens_to_target", 0),
    ("tokens_generated", 0),
    ("filtered_token_share", 3),
    ("prompts_skipped", 0),
)


def table(results: dict[str, list[dict[str, float]]], target: float) -> str:
    names = [name.replace("_target", f"_{target:.0%}") for name, _ in COLUMNS]
    lines = ["| option | " + " | ".join(names) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for variant, runs in results.items():
        cells = [cell([run[name] for run in runs], digits) for name, digits in COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cumulative_tokens(metrics: dict[str, Series], steps: Sequence[int]) -> list[float]:
    """Tokens generated up to and including each of `steps`."""
    return [tokens_to(metrics, step) for step in steps]


def draw(run_dirs: dict[str, list[Path]], out: Path) -> Path:
    """Held-out accuracy (seed mean) against steps and against tokens generated, one line per variant."""
    fig = Figure(figsize=(11, 4), layout="tight")
    by_step, by_tokens = fig.subplots(1, 2)
    for variant, dirs in run_dirs.items():
        runs = [read_metrics(d) for d in dirs]
        steps = runs[0][EVAL_METRIC].steps  # every run evaluates at the same steps
        accuracy = [statistics.fmean(v) for v in zip(*(r[EVAL_METRIC].values for r in runs), strict=True)]
        tokens = [statistics.fmean(t) for t in zip(*(cumulative_tokens(r, steps) for r in runs), strict=True)]
        by_step.plot(steps, accuracy, marker="o", label=variant)
        by_tokens.plot([t / 1e6 for t in tokens], accuracy, marker="o", label=variant)
    by_step.set_xlabel("rollout step")
    by_tokens.set_xlabel("tokens generated (millions)")
    for ax in (by_step, by_tokens):
        ax.set_ylabel(f"held-out accuracy ({EVAL_METRIC})")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_skip"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="train.seed of each run")
    parser.add_argument("--steps", type=int, default=40, help="rollout steps per run")
    parser.add_argument("--train-problems", type=int, default=200, help="the training set, in problems")
    parser.add_argument("--target", type=float, default=0.35, help="held-out accuracy for steps-to-target")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/demo_cache"), help="warm-started models")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for both variants (section.field=value)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--train-problems", str(args.train_problems), *args.overrides]
    run_dirs = {
        variant: [
            run_preset(args.out, "dapo", seed, args.steps, args.cache_dir, [*extra, *more], name=variant)
            for seed in args.seeds
        ]
        for variant, more in VARIANTS.items()
    }
    results = {variant: [summarize(d, args.target) for d in dirs] for variant, dirs in run_dirs.items()}
    text = table(results, args.target)
    (args.out / "skip_saturated.md").write_text(text)
    (args.out / "skip_saturated.json").write_text(json.dumps(results, indent=2) + "\n")
    png = draw(run_dirs, args.out / "skip_saturated.png")
    print(
        f"\n{text}\nseeds {args.seeds}, {args.steps} steps, {args.train_problems} training problems; "
        f"curves: {png}"
    )


if __name__ == "__main__":
    main()
