"""`torchrun -m megatron_dapo.logprobs` as users run it: HF and Megatron checkpoints, against transformers."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_dapo.checkpoint.convert import hf_to_megatron
from megatron_dapo.logprobs import read_samples
from tests.helpers.tiny_models import (
    hf_response_logprobs,
    random_samples,
    save_tiny_checkpoint,
    tiny_config,
    tiny_hf_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf_model = tiny_hf_model(tiny_config("qwen2", tie=True), seed=4)
    samples = random_samples(5, seed=6)
    samples[0] = type(samples[0])(samples[0].token_ids, len(samples[0].token_ids))  # an empty response
    input_path = root / "in.jsonl"
    input_path.write_text(
        "".join(
            json.dumps({"input_ids": list(s.token_ids), "response_start": s.response_start}) + "\n"
            for s in samples
        )
    )
    return hf_model, save_tiny_checkpoint(hf_model, root / "hf"), samples, input_path


def torchrun(*args: str, nproc: int) -> subprocess.CompletedProcess:
    """The command in its own session, so a timeout ends torchrun's workers too."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "megatron_dapo.logprobs", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_cli(*args: str, nproc: int) -> subprocess.CompletedProcess:
    result = torchrun(*args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def check_output(path, hf_model, samples, temperature):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(samples)
    with torch.no_grad():
        for line, sample in zip(lines, samples, strict=True):
            want_logprobs, want_entropy = hf_response_logprobs(hf_model, sample, temperature)
            torch.testing.assert_close(torch.tensor(line["logprobs"]), want_logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(line["entropy"]), want_entropy, atol=1e-4, rtol=0)


def test_hf_checkpoint_at_tp2(checkpoint, tmp_path):
    hf_model, hf_dir, samples, input_path = checkpoint
    out = tmp_path / "out.jsonl"
    args = ["--checkpoint", str(hf_dir), "--input", str(input_path), "--output", str(out), "--tp", "2"]
    result = run_cli(*args, "--temperature", "0.6", nproc=2)
    assert f"loading Hugging Face checkpoint {hf_dir}" in result.stdout
    check_output(out, hf_model, samples, 0.6)


def test_megatron_checkpoint_at_cp2(checkpoint, tmp_path):
    hf_model, hf_dir, samples, input_path = checkpoint
    megatron_dir = tmp_path / "megatron"
    hf_to_megatron(hf_dir, megatron_dir, tp=2, pp=1)
    out = tmp_path / "out.jsonl"
    args = ["--checkpoint", str(megatron_dir), "--input", str(input_path), "--output", str(out), "--cp", "2"]
    result = run_cli(*args, "--chunk-tokens", "7", nproc=2)
    assert f"loading Megatron checkpoint {megatron_dir} (saved at TP=2, PP=1)" in result.stdout
    check_output(out, hf_model, samples, 1.0)


def test_bad_input_line_is_reported_with_its_number(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"input_ids": [1, 2, 3], "response_start": 1}\n{"input_ids": [1, 2], "response_start": 0}\n'
    )
    with pytest.raises(ValueError, match=f"{bad}:2: expected"):
        read_samples(bad)
