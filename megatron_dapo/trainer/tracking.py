"""Per-step metrics: TensorBoard scalars, a `metrics.jsonl` that needs no TensorBoard to read, a progress bar.

The loop hands over one mapping per step, grouped by what the numbers describe:

    tracker.log(step, {"rollout": finalize_metrics(rollout_sums), "train": {...}, "timing": {...}})

Each scalar becomes `group/name` (TensorBoard draws one section per group). The progress bar shows the
names in `_BAR_FIELDS` below; the PNG report draws those in trainer/report.py's `PANELS` and any eval/*.

Steps are numbered from 1 (step 0, if logged, is before any update, e.g. a baseline evaluation). A run that
resumes passes the first step it will log; everything logged at that step or later by the interrupted run is
dropped, so no step appears twice.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from megatron_dapo.config import DapoConfig

GROUPS = ("rollout", "train", "timing", "eval", "sampling", "weight_sync")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# progress-bar label: metric
_BAR_FIELDS = {
    "acc": "rollout/accuracy",
    "reward": "rollout/reward_mean",
    "entropy": "train/entropy",
    "len": "rollout/response_length_mean",
    "tok/s": "timing/tokens_per_s",
}


def flatten_metrics(groups: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{"train": {"entropy": 0.5}} -> {"train/entropy": 0.5}; an unknown group is an error."""
    flat = {}
    for group, metrics in groups.items():
        if group not in GROUPS:
            raise ValueError(f"metric group {group!r} is not one of {GROUPS}: log it under one of those")
        for name, value in metrics.items():
            flat[f"{group}/{name}"] = float(value)
    return flat


def truncate_metrics_file(path: Path, first_step: int) -> None:
    """Drop the lines of steps >= `first_step` (what an interrupted run logged after its last checkpoint).

    A last line cut short by a kill mid-write is dropped too; a broken line anywhere else is an error.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not JSON; fix or delete that line, then resume") from None
        if record["step"] < first_step:
            kept.append(line + "\n")
    # Rewrite through a temporary file: a kill during truncation must not lose the steps being kept.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class MetricsTracker:
    """Writes each step's scalars on the writer rank (global rank 0); on every other rank it does nothing."""

    @classmethod
    def for_run(cls, cfg: DapoConfig, *, is_writer: bool, first_step: int) -> "MetricsTracker":
        """The tracker of a training run, as its logging section says."""
        return cls(
            Path(cfg.logging.dir),
            is_writer=is_writer,
            total_steps=cfg.train.steps,
            first_step=first_step,
            tensorboard=cfg.logging.tensorboard,
            progress_bar=cfg.logging.progress_bar,
        )

    def __init__(
        self,
        run_dir: Path,
        *,
        is_writer: bool,
        total_steps: int,
        first_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ) -> None:
        self.is_writer = is_writer
        self._latest: dict[str, float] = {}
        self._jsonl = self._tensorboard = self._bar = None
        if not is_writer:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / METRICS_FILE
        truncate_metrics_file(metrics_path, first_step)
        self._jsonl = metrics_path.open("a")
        if tensorboard:
            # A new event file per run; its purge step tells TensorBoard to hide what the interrupted run
            # wrote at steps >= first_step in the older files.
            self._tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=first_step)
        if progress_bar:
            self._bar = tqdm(
                total=total_steps, initial=max(first_step - 1, 0), unit="step", dynamic_ncols=True
            )

    def log(self, step: int, groups: Mapping[str, Mapping[str, float]]) -> None:
        """Record `groups` (see the module docstring) at `step`; may be called more than once per step."""
        flat = flatten_metrics(groups)
        if not self.is_writer:
            return
        # Flushed every step: a killed run keeps every line up to its last step (json writes NaN as NaN).
        self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in flat.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
            self._tensorboard.flush()
        if self._bar is not None:
            self._latest.update(flat)
            self._bar.set_postfix_str(self._bar_text(step), refresh=False)
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.refresh()

    def _bar_text(self, step: int) -> str:
        parts = [f"step {step}"]
        for label, name in _BAR_FIELDS.items():
            value = self._latest.get(name)
            if value is not None and math.isfinite(value):
                parts.append(f"{label} {value:.4g}")
        return " ".join(parts)

    def close(self) -> None:
        for closable in (self._jsonl, self._tensorboard, self._bar):
            if closable is not None:
                closable.close()
        self._jsonl = self._tensorboard = self._bar = None

    def __enter__(self) -> "MetricsTracker":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
