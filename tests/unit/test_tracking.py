"""Per-step metrics: the jsonl and TensorBoard records, resume without duplicated steps, the progress bar."""

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from megatron_dapo.trainer.tracking import METRICS_FILE, TENSORBOARD_DIR, MetricsTracker, flatten_metrics


def _groups(step: int, run: int) -> dict[str, dict[str, float]]:
    """Values that differ per step and per run, so a stale line is told apart from a fresh one."""
    return {
        "rollout": {"accuracy": step / 10 + run / 100, "response_length_mean": 100.0 * step},
        "train": {"entropy": 1.0 / step},
        "timing": {"tokens_per_s": 1000.0 + step},
    }


def _tensorboard_points(run_dir) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar as TensorBoard shows it: its steps and values in the order read, repeats included."""
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={SCALARS: 0})
    events.Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()[SCALARS]
    }


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_every_step_is_one_json_line_and_a_tensorboard_scalar(tmp_path):
    with MetricsTracker(tmp_path, is_writer=True, total_steps=3, progress_bar=False) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, _groups(step, run=0))
    assert _lines(tmp_path) == [{"step": s, **flatten_metrics(_groups(s, run=0))} for s in (1, 2, 3)]
    scalars = _tensorboard_points(tmp_path)
    steps, values = scalars["train/entropy"]
    assert steps == [1, 2, 3] and values == pytest.approx([1.0, 0.5, 1 / 3])
    assert sorted(scalars) == [
        "rollout/accuracy",
        "rollout/response_length_mean",
        "timing/tokens_per_s",
        "train/entropy",
    ]


def test_only_the_writer_rank_writes(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsTracker(run_dir, is_writer=False, total_steps=3) as tracker:
        tracker.log(1, _groups(1, run=0))
    assert not run_dir.exists()


def test_resume_drops_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    with MetricsTracker(tmp_path, is_writer=True, total_steps=6, progress_bar=False) as tracker:
        for step in range(1, 6):
            tracker.log(step, _groups(step, run=0))
    # checkpoint after step 3: steps 4 and 5 are redone by the resumed run (with other values)
    with MetricsTracker(tmp_path, is_writer=True, total_steps=6, first_step=4, progress_bar=False) as tracker:
        for step in range(4, 7):
            tracker.log(step, _groups(step, run=1))

    expected = {s: _groups(s, run=0 if s < 4 else 1)["rollout"]["accuracy"] for s in range(1, 7)}
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert {line["step"]: line["rollout/accuracy"] for line in lines} == pytest.approx(expected)
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    # TensorBoard honours the purge step the resumed run wrote: steps 4 and 5 hold the new values only
    steps, values = _tensorboard_points(tmp_path)["rollout/accuracy"]
    assert steps == list(expected) and values == pytest.approx(list(expected.values()))


def test_a_line_cut_by_a_kill_is_dropped_on_resume_but_a_broken_middle_is_an_error(tmp_path):
    good = json.dumps({"step": 1, "train/entropy": 0.5})
    (tmp_path / METRICS_FILE).write_text(good + "\n" + '{"step": 2, "train/ent')
    MetricsTracker(tmp_path, is_writer=True, total_steps=3, first_step=2, tensorboard=False).close()
    assert _lines(tmp_path) == [{"step": 1, "train/entropy": 0.5}]

    (tmp_path / METRICS_FILE).write_text("not json\n" + good + "\n")
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:1 is not JSON"):
        MetricsTracker(tmp_path, is_writer=True, total_steps=3, first_step=2, tensorboard=False)


def test_a_fresh_run_starts_a_fresh_file_and_non_finite_values_are_kept(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 7, "train/loss": 1.0}) + "\n")
    with MetricsTracker(
        tmp_path, is_writer=True, total_steps=3, tensorboard=False, progress_bar=False
    ) as tracker:
        tracker.log(1, {"train": {"loss": math.nan, "grad_norm": math.inf}})
    (line,) = _lines(tmp_path)
    assert line["step"] == 1 and math.isnan(line["train/loss"]) and line["train/grad_norm"] == math.inf
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_unknown_group_is_rejected_on_every_rank(tmp_path):
    for is_writer in (True, False):
        with (
            MetricsTracker(tmp_path, is_writer=is_writer, total_steps=1, tensorboard=False) as tracker,
            pytest.raises(ValueError, match="metric group 'rolout' is not one of"),
        ):
            tracker.log(1, {"rolout": {"accuracy": 0.5}})


def test_progress_bar_shows_the_key_numbers(tmp_path, capsys):
    with MetricsTracker(tmp_path, is_writer=True, total_steps=4, tensorboard=False) as tracker:
        tracker.log(1, _groups(1, run=0))
        tracker.log(2, _groups(2, run=0))
        tracker.log(2, {"eval": {"avg@32": 0.25}})  # a second call for the same step keeps the numbers
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "2/4" in final
    for text in ("step 2", "acc 0.2", "entropy 0.5", "len 200", "tok/s 1002"):
        assert text in final, (text, final)
