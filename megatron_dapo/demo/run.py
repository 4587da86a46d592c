"""The CPU demo (`python -m megatron_dapo.demo`, cli/demo.py): DAPO from start to finish on a CPU.

A tiny Qwen2 model, warm-started on arithmetic (demo/warm_start.py, cached), trained with the real loop:
Megatron policy (one gloo process), the CPU engine, weight sync, dynamic sampling, evaluation on held-out
problems. Writes into the run directory: model/ and data/ (the inputs), metrics.jsonl, tensorboard/,
checkpoints/, report.png and summary.json (accuracy at start and end, steps, wall time, preset). The settings
are examples/demo_cpu.yaml; `bash launch/local.sh` trains with them too, once the demo has prepared the
directory.
"""

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_dapo.config import ConfigError, DapoConfig, load_config
from megatron_dapo.demo.arithmetic import generate_problems, write_jsonl
from megatron_dapo.demo.warm_start import WarmStartSettings, held_out_problems, warm_start
from megatron_dapo.trainer.report import read_metrics, render_report
from megatron_dapo.trainer.tracking import METRICS_FILE

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo_cpu.yaml"
TRAIN_PROBLEMS = 20_000  # the training stream; any held-out problem is removed from it
TRAIN_SEED = 1
WARM_START = WarmStartSettings()  # its task is the demo's task


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
    if any(o.startswith("logging.dir=") for o in overrides):
        raise ConfigError("logging.dir: the demo writes its run to --out; use --out DIR instead")
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
