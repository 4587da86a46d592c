"""What the rollout tests share: a tiny random Hugging Face model, the log-probs an engine must return, and a
wait for processes to end.

Used by the CPU-engine tests (tests/e2e), by the same checks against real SGLang servers (tests/gpu), and by
any test that needs a small HF checkpoint to serve.
"""

import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

TINY_VOCAB_SIZE = 64


def save_tiny_qwen2(directory: str | Path, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A random 2-layer Qwen2 (fp32) and a word-level tokenizer ("t0" ... "t63"), saved for from_pretrained.

    Neither the config nor the tokenizer names an EOS token, so generation stops only on the request's
    stop_token_ids or its length limit.
    """
    directory = Path(directory)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    vocab = {f"t{index}": index for index in range(TINY_VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(directory)
    return directory


@torch.inference_mode()
def reference_logprobs(
    model: torch.nn.Module, prompt: Sequence[int], completion: Sequence[int], temperature: float
) -> list[float]:
    """log softmax(logits / T) of each completion token after prompt + its predecessors, in one forward.

    What SGLang returns as output_token_logprobs (greedy requests: T = 1).
    """
    tokens = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=tokens).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def wait_until_gone(processes: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `processes` still running after `timeout_s` (none: all ended). A zombie counts as ended: an
    orphan's exit status waits for a reaper that a container's init may never be."""
    deadline = time.monotonic() + timeout_s
    while (running := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
