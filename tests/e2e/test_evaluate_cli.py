"""`dapo-eval` as a user runs it: a subprocess starting the CPU engine on a tiny Qwen2, writing its outputs.

The model is a bigram table written into real Qwen2 weights (attention and MLP outputs zeroed, so each
position sees only its own token): after the prompt it says "Answer:", then "7", then stops or repeats "7"
with equal odds. Its samples are thus right or wrong by chance against the answers "7" and "77", and always
wrong against "8", which makes the metrics non-trivial; every number is recomputed from samples.jsonl.
"""

import json
import os
import shutil
import subprocess
from collections import Counter
from math import comb
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

pytestmark = pytest.mark.slow

VOCAB = {"<unk>": 0, "<eos>": 1, "Answer:": 2, "7": 3}  # every prompt word but "Answer:" is <unk>
BIGRAM_LOGITS = {  # previous token -> logits of the next one (vocab order)
    "<unk>": [0.0, 0.0, 20.0, 0.0],
    "<eos>": [0.0, 0.0, 0.0, 0.0],
    "Answer:": [0.0, 0.0, 0.0, 20.0],
    "7": [-20.0, 0.0, -20.0, 0.0],  # <eos> or "7", even odds
}
HIDDEN_SIZE = 32
PROBLEMS = [("seven", "7"), ("seventy seven", "77"), ("eight", "8")]
SAMPLES_PER_PROBLEM = 2
MAX_NEW_TOKENS = 5
SEED = 3  # with this seed the six samples are a mix of right and wrong


def save_bigram_qwen2(directory: Path) -> Path:
    """A 1-layer Qwen2 that is the BIGRAM_LOGITS table, and its word-level tokenizer with a chat template."""
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=VOCAB["<eos>"],
        bos_token_id=None,
        dtype="float32",
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # Embedding i = e_i: the final RMSNorm turns it into sqrt(H) * e_i, so lm_head column i is the
        # logits after token i divided by sqrt(H).
        model.model.embed_tokens.weight.copy_(torch.eye(len(VOCAB), HIDDEN_SIZE))
        model.lm_head.weight.zero_()
        for token, logits in BIGRAM_LOGITS.items():
            model.lm_head.weight[:, VOCAB[token]] = torch.tensor(logits) / HIDDEN_SIZE**0.5
    model.save_pretrained(directory)
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        chat_template="{% for message in messages %}{{ message['content'] }} {% endfor %}",
    ).save_pretrained(directory)
    return directory


def recomputed_metrics(rows: list[dict], n: int) -> dict[str, float]:
    """avg@n, pass@k, cons@n from the per-sample rows alone."""
    by_problem: dict[int, list[dict]] = {}
    for row in rows:
        by_problem.setdefault(row["problem"], []).append(row)
    correct = [sum(row["correct"] for row in samples) for samples in by_problem.values()]
    metrics = {f"avg@{n}": sum(correct) / (n * len(correct))}
    for k in (1, 2):
        metrics[f"pass@{k}"] = sum(1 - comb(n - c, k) / comb(n, k) for c in correct) / len(correct)
    votes = []
    for samples in by_problem.values():
        counts = Counter(row["pred"] for row in samples if row["pred"])
        winner = max(counts, key=lambda pred: (counts[pred], -[r["pred"] for r in samples].index(pred)))
        votes.append(winner == samples[0]["ground_truth"] if counts else False)
    metrics[f"cons@{n}"] = sum(votes) / len(votes)
    metrics["response_length_mean"] = sum(row["response_tokens"] for row in rows) / len(rows)
    metrics["truncation_ratio"] = sum(row["finish_reason"] == "length" for row in rows) / len(rows)
    return metrics


def test_dapo_eval_with_the_cpu_engine(tmp_path: Path) -> None:
    model_dir = save_bigram_qwen2(tmp_path / "model")
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    out = tmp_path / "out"
    command = shutil.which("dapo-eval")
    assert command, "dapo-eval is not on PATH: install the project with `pip install -e .`"
    result = subprocess.run(
        [
            *(command, "--model", str(model_dir), "--data", str(data), "--out", str(out), "--engine", "cpu"),
            *(
                "--samples",
                str(SAMPLES_PER_PROBLEM),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--seed",
                str(SEED),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny matrices: threads only contend for the 2 cores
    )
    assert result.returncode == 0, f"dapo-eval failed:\n{result.stderr[-3000:]}"
    assert "avg@2" in result.stdout and "tiny" in result.stdout  # the table

    summary = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    sampling = summary["sampling"]
    assert (sampling["samples_per_problem"], sampling["temperature"], sampling["top_p"]) == (2, 1.0, 0.7)
    tiny = summary["datasets"]["tiny"]
    assert (tiny["rows"], tiny["problems"], tiny["samples"], tiny["skipped_rows"]) == (3, 3, 6, 0)
    assert len(rows) == 6
    assert sorted((row["problem"], row["sample"]) for row in rows) == [
        (p, s) for p in range(3) for s in range(2)
    ]
    for row in rows:
        assert row["ground_truth"] == PROBLEMS[row["problem"]][1] and row["index"] == row["problem"]
        # The bigram speaks "Answer: 7 ... 7" and ends with <eos> (dropped when decoding) or at the limit,
        # which SGLang calls "length" even when the last token is <eos>.
        assert row["response"] == "Answer: " + " ".join(["7"] * len(row["pred"]))
        if row["finish_reason"] == "stop":
            assert row["response_tokens"] == 1 + len(row["pred"]) + 1
        else:
            assert row["finish_reason"] == "length" and row["response_tokens"] == MAX_NEW_TOKENS
        assert row["correct"] == (row["pred"] == row["ground_truth"])
    assert 0 < sum(row["correct"] for row in rows) < len(rows), "choose a SEED giving right and wrong samples"

    expected = recomputed_metrics(rows, SAMPLES_PER_PROBLEM)
    assert tiny["metrics"].keys() == expected.keys()
    for name, value in expected.items():
        assert tiny["metrics"][name] == pytest.approx(value, abs=1e-12), name
    assert (out / "servers" / "server_0.log").is_file()
