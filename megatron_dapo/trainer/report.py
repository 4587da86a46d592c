"""The training curves of one or more runs in one PNG (the command line: dapo-report, cli/report.py).

Several runs are overlaid, one colour per run, to compare the ablation presets. Each run's metrics come from
its metrics.jsonl (trainer/tracking.py), or from its TensorBoard event files when that file is absent.
"""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from megatron_dapo.trainer.tracking import METRICS_FILE, TENSORBOARD_DIR


class Series(NamedTuple):
    steps: list[int]
    values: list[float]


# panel title: the metrics drawn in it (a line style each). Eval metrics get a panel of their own.
PANELS: dict[str, tuple[str, ...]] = {
    "accuracy / reward": ("rollout/accuracy", "rollout/reward_mean"),
    "entropy": ("train/entropy",),
    "response length (tokens)": ("rollout/response_length_mean",),
    "clip fraction": ("train/clip_fraction_upper", "train/clip_fraction_lower"),
    "truncation ratio": ("rollout/truncation_ratio",),
    "groups (share of finished)": (
        "sampling/kept_group_share",
        "sampling/groups_all_correct_share",
        "sampling/groups_all_wrong_share",
    ),
}
_LINE_STYLES = ("-", "--", ":", "-.")


def read_metrics(run_dir: Path) -> dict[str, Series]:
    """Every scalar of a run as a series sorted by step; a value logged twice at one step keeps the last."""
    run_dir = Path(run_dir)
    by_name: dict[str, dict[int, float]] = {}
    if (run_dir / METRICS_FILE).exists():
        lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
                for name, value in record.items():
                    by_name.setdefault(name, {})[step] = float(value)
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # any line not {"step": n, ...}
                where = f"{run_dir / METRICS_FILE}:{number}"
                raise ValueError(f"{where}: expected a JSON object of a step and numbers ({err!r})") from None
    else:
        by_name = _read_tensorboard(run_dir)
    if not by_name:
        raise FileNotFoundError(
            f"{run_dir}: no metrics found (neither {METRICS_FILE} nor TensorBoard event files with scalars)"
        )
    return {
        name: Series(sorted(points), [points[s] for s in sorted(points)]) for name, points in by_name.items()
    }


def _read_tensorboard(run_dir: Path) -> dict[str, dict[int, float]]:
    event_dir = run_dir / TENSORBOARD_DIR if (run_dir / TENSORBOARD_DIR).is_dir() else run_dir
    # size_guidance 0 keeps every point (the default samples 10,000 per tag); the accumulator also applies
    # the purge step a resumed run wrote, so steps logged twice appear once.
    events = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()[SCALARS]}


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _eval_scores(names: set[str]) -> list[str]:
    """The evaluation's accuracies, which share a 0-1 axis: avg@n, cons@n and the largest-k pass@k."""
    kinds = {name: name.rsplit("/", 1)[1].split("@")[0] for name in names if name.startswith("eval/")}
    scores = sorted(name for name, kind in kinds.items() if kind in ("avg", "cons"))
    passes = [name for name, kind in kinds.items() if kind == "pass"]
    widest = max(passes, key=lambda name: int(name.rsplit("@", 1)[1]), default=None)
    return scores + ([widest] if widest else [])


def render_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Draw every panel for which some run has data into `out` (PNG); returns `out`."""
    runs = {label: read_metrics(d) for label, d in zip(run_labels(run_dirs), run_dirs, strict=True)}
    eval_names = _eval_scores({name for metrics in runs.values() for name in metrics})
    # titled by its metric when there is one, as the legend then names only the runs
    panels = {**PANELS, eval_names[0] if len(eval_names) == 1 else "evaluation": tuple(eval_names)}
    panels = {
        title: names
        for title, names in panels.items()
        if any(name in metrics for metrics in runs.values() for name in names)
    }
    if not panels:
        raise ValueError(
            f"none of the runs {list(runs)} has any of the metrics {sorted(sum(PANELS.values(), ()))}"
        )

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    # A bare Figure rather than pyplot: no global backend, nothing left open, safe on nodes without a display.
    fig = Figure(figsize=(5.5 * columns, 3.8 * rows), layout="tight")
    axes = fig.subplots(rows, columns, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, names) in zip(axes.flat, panels.items(), strict=False):
        for run_index, (label, metrics) in enumerate(runs.items()):
            for name_index, name in enumerate(names):
                if name not in metrics:
                    continue
                series = metrics[name]
                # the run's name where there are several runs, the metric's where the panel holds several
                legend = [label] if len(runs) > 1 else []
                legend += [name.split("/", 1)[1]] if len(names) > 1 else []
                ax.plot(
                    series.steps,
                    series.values,
                    color=colors[run_index % len(colors)],
                    linestyle=_LINE_STYLES[name_index % len(_LINE_STYLES)],
                    marker="o" if len(series.steps) < 30 else None,
                    markersize=3,
                    label=" ".join(legend) or None,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(", ".join(runs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
