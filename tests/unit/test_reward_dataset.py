"""The reward over the real ground truths: DAPO-Math-17k and AIME 2024 (zero-padded answers)."""

import json

import pyarrow.parquet as pq

from megatron_dapo.data.catalog import dataset_file
from megatron_dapo.reward import compute_score


def test_every_dapo_math_17k_ground_truth() -> None:
    table = pq.read_table(dataset_file("dapo-math-17k"), columns=["reward_model"])
    ground_truths = [row["ground_truth"] for row in table.column("reward_model").to_pylist()]
    assert len(ground_truths) == 17_917
    failures = []
    for row, gt in enumerate(ground_truths):
        wrong = str(int(gt) + 1)  # every answer in this set is an integer
        right = compute_score(f"Some reasoning.\nAnswer: {gt}", gt)
        if right.score != 1.0 or compute_score(f"Some reasoning.\nAnswer: {wrong}", gt).score != -1.0:
            failures.append((row, gt))
    assert not failures, failures[:10]


def test_aime_2024_padded_answers() -> None:
    rows = [json.loads(line) for line in (dataset_file("aime2024")).read_text().splitlines()]
    assert len(rows) == 30 and any(r["answer"].startswith("0") for r in rows)
    for row in rows:
        gt = row["answer"]
        unpadded = str(int(gt))
        assert compute_score(f"Answer: {unpadded}", gt).correct
        assert compute_score(f"so \\boxed{{{gt}}}", unpadded, boxed_fallback=True).correct
        assert not compute_score(f"Answer: {int(gt) + 1}", gt).correct
