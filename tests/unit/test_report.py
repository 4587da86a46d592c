"""dapo-report: series read from metrics.jsonl or TensorBoard, and a readable PNG of one or several runs."""

import json
import random
import struct

import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron_dapo.cli.report import main
from megatron_dapo.trainer.report import read_metrics, render_report, run_labels


def _write_run(run_dir, seed: int, steps: int = 40) -> dict[int, dict[str, float]]:
    """A synthetic run: noisy rising accuracy, falling entropy, an eval every 10 steps on its own line."""
    rng = random.Random(seed)
    records = {}
    lines = []
    for step in range(1, steps + 1):
        record = {
            "rollout/accuracy": min(1.0, 0.2 + step / 60 + rng.uniform(-0.05, 0.05)),
            "rollout/reward_mean": rng.uniform(-1, 1),
            "rollout/response_length_mean": 80 + 3 * step + rng.uniform(-10, 10),
            "rollout/truncation_ratio": rng.uniform(0, 0.1),
            "train/entropy": 1.5 - step / 50 + rng.uniform(-0.1, 0.1),
            "train/clip_fraction_upper": rng.uniform(0, 0.01),
            "train/clip_fraction_lower": rng.uniform(0, 0.005),
            "sampling/kept_group_share": rng.uniform(0.3, 0.8),
            "timing/tokens_per_s": rng.uniform(900, 1100),
        }
        records[step] = record
        lines.append(json.dumps({"step": step, **record}))
        if step % 10 == 0:
            records[step] = {**record, "eval/avg@32": step / 100}
            lines.append(json.dumps({"step": step, "eval/avg@32": step / 100}))
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return records


def test_read_metrics_returns_each_series_by_step(tmp_path):
    records = _write_run(tmp_path / "run", seed=0)
    series = read_metrics(tmp_path / "run")
    assert set(series) == set(records[10])
    assert series["rollout/accuracy"].steps == list(range(1, 41))
    assert series["rollout/accuracy"].values == [records[s]["rollout/accuracy"] for s in range(1, 41)]
    assert series["eval/avg@32"] == ([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4])


def test_read_metrics_falls_back_to_tensorboard(tmp_path):
    with SummaryWriter(str(tmp_path / "tensorboard")) as writer:
        for step in (1, 2, 3):
            writer.add_scalar("train/entropy", 1.0 / step, step)
    series = read_metrics(tmp_path)
    assert series["train/entropy"].steps == [1, 2, 3]
    assert series["train/entropy"].values == pytest.approx([1.0, 0.5, 1 / 3])
    assert read_metrics(tmp_path / "tensorboard") == series  # the event directory itself, given directly
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics found"):
        read_metrics(empty)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_report_of_two_runs_is_a_png_with_every_panel(tmp_path):
    _write_run(tmp_path / "clip_higher", seed=1)
    _write_run(tmp_path / "naive_grpo", seed=2)
    out = render_report([tmp_path / "clip_higher", tmp_path / "naive_grpo"], tmp_path / "out" / "report.png")
    # 7 panels (6 + evaluation) in a 3-column grid of 550 x 380 pixels each
    assert _png_size(out) == (1650, 1140)
    assert out.stat().st_size > 50_000


def test_cli_and_panels_without_data_are_left_out(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    lines = [json.dumps({"step": s, "rollout/accuracy": s / 10, "train/entropy": 1 / s}) for s in (1, 2, 3)]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines))
    main([str(tmp_path / "run"), "--out", str(tmp_path / "r.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.png")
    assert _png_size(tmp_path / "r.png") == (1100, 380)  # accuracy and entropy only
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])


def test_run_labels_disambiguate_equal_names(tmp_path):
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "other"]) == ["run", "other"]
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == [
        str(tmp_path / "a" / "run"),
        str(tmp_path / "b" / "run"),
    ]


def test_the_evaluation_panel_draws_accuracies_only():
    from megatron_dapo.trainer.report import _eval_scores

    names = {f"eval/pass@{k}" for k in (1, 2, 4, 16)} | {"eval/avg@16", "eval/cons@16", "train/entropy"}
    names |= {"eval/response_length_mean", "eval/truncation_ratio", "eval/aime24/avg@32"}
    assert _eval_scores(names) == ["eval/aime24/avg@32", "eval/avg@16", "eval/cons@16", "eval/pass@16"]


def test_a_metrics_line_that_is_not_a_step_is_named(tmp_path, user_error):
    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random()
    lines = [json.dumps({"step": s, "rollout/accuracy": rng.random()}) for s in range(1, rng.randint(3, 9))]
    bad = rng.randrange(len(lines))
    lines[bad] = rng.choice(['{"rollout/accuracy": 0.5}', "[1, 2]", '{"step": 3, "x": "high"}', "{"])
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    err = user_error(main, [str(run), "--out", str(tmp_path / "r.png")])
    assert err.startswith(f"dapo-report: error: {run / 'metrics.jsonl'}:{bad + 1}: expected a JSON object"), (
        err
    )
    assert not (tmp_path / "r.png").exists()
