"""The CPU demo's starting policy: a tiny Qwen2 model given a short supervised warm start on arithmetic.

RL can only improve a policy that is sometimes right. Like a pretrained base model, the warm-started one
can do some of the arithmetic but seldom writes the answer line the reward reads ("Answer: 33"); most of
the time it answers with the bare equation ("12+7*3=33"), which scores as wrong. DAPO first teaches it the
format (accuracy jumps within a few steps), then improves the arithmetic itself. The result is a Hugging
Face directory cached under a hash of the settings, so reruns reuse it; `python -m
megatron_dapo.cli.warm_start` trains one alone.
"""

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from megatron_dapo.data.record import PromptRecord
from megatron_dapo.data.template import ARITHMETIC_PROMPT_TEMPLATE, encode_prompts
from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems, response_text
from megatron_dapo.demo.tokenizer import build_demo_tokenizer
from megatron_dapo.reward import compute_score

# Part of the cache key: bump when the training recipe changes, so stale models are not reused.
RECIPE_VERSION = 3
METADATA_FILE = "warm_start.json"
EVAL_SEED = 2**31 - 1  # problems for measuring accuracy, drawn apart from the training stream
HELD_OUT_PROBLEMS = 128  # drawn, before duplicates are merged


@dataclass(frozen=True)
class WarmStartSettings:
    """Everything that determines the warm-started model (and so its cache key)."""

    task: ArithmeticTask = field(default_factory=ArithmeticTask)
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    ffn_hidden_size: int = 256
    # Share of the training responses that read "Answer: 33"; the rest are the bare "12+7*3=33".
    answer_line_rate: float = 0.3
    sft_steps: int = 800
    sequences_per_step: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0

    def cache_key(self) -> str:
        content = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]


def held_out_problems(task: ArithmeticTask) -> list[PromptRecord]:
    """The problems accuracy is measured on: neither the warm start nor the RL stream ever trains on them."""
    return generate_problems(task, HELD_OUT_PROBLEMS, seed=EVAL_SEED)


def sft_problems(settings: WarmStartSettings, rng: random.Random, held_out: set[str]) -> list[PromptRecord]:
    """One supervised step's problems, fresh from `rng`, without the held-out ones."""
    records = generate_problems(settings.task, settings.sequences_per_step, seed=rng.getrandbits(64))
    return [record for record in records if record.problem not in held_out]


def build_model(settings: WarmStartSettings, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 whose vocabulary is the demo tokenizer's."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.ffn_hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        # The engine's context: room for real benchmark prompts (dapo-eval --data aime2024 is ~800 of the
        # demo's character tokens). With RoPE, weights and short sequences are the same at any value.
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings.seed)
    return Qwen2ForCausalLM(config)


def warm_start_response(record: PromptRecord, settings: WarmStartSettings, rng: random.Random) -> str:
    """The response the warm start teaches for one problem."""
    if rng.random() < settings.answer_line_rate:
        return response_text(record)
    return f"{record.problem}={record.ground_truth}"


def sft_batch(
    records: Sequence[PromptRecord], responses: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Prompt + reference response + EOS, right-padded; labels only on the response (-100 elsewhere).

    Prompts go through the same chat-template path as in RL, so the warm start and DAPO see one format.
    """
    prompts = encode_prompts(records, tokenizer, template=ARITHMETIC_PROMPT_TEMPLATE)
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    sequences = [
        prompt + response + [tokenizer.eos_token_id]
        for prompt, response in zip(prompts, response_ids, strict=True)
    ]
    length = max(len(sequence) for sequence in sequences)  # tokens
    input_ids = torch.full((len(records), length), tokenizer.pad_token_id)
    labels = torch.full((len(records), length), -100)
    attention_mask = torch.zeros((len(records), length), dtype=torch.long)
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(sequence[len(prompt) :])
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_sft(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    settings: WarmStartSettings,
    *,
    progress: bool = True,
) -> list[float]:
    """Supervised steps on fresh problems each step; returns the loss (nats/token) of every step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=0.0
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps)
    )
    model.train()
    rng = random.Random(settings.seed)
    held_out = {record.problem for record in held_out_problems(settings.task)}
    losses = []
    steps = tqdm(range(settings.sft_steps), desc="warm start", disable=not progress)
    for _ in steps:
        records = sft_problems(settings, rng, held_out)
        responses = [warm_start_response(record, settings, rng) for record in records]
        loss = model(**sft_batch(records, responses, tokenizer)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        steps.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


@torch.no_grad()
def sampled_accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[PromptRecord],
    *,
    samples_per_prompt: int,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Share of sampled responses the DAPO reward scores correct (pure sampling: no top-k, no top-p)."""
    model.eval()
    prompts = encode_prompts(records, tokenizer, template=ARITHMETIC_PROMPT_TEMPLATE)
    width = max(len(prompt) for prompt in prompts)  # left padding: generation continues on the right
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples_per_prompt,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    responses = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    correct = [
        compute_score(response, records[i // samples_per_prompt].ground_truth).correct
        for i, response in enumerate(responses)
    ]
    return sum(correct) / len(correct)


def warm_start(
    cache_dir: str | Path,
    settings: WarmStartSettings = WarmStartSettings(),
    *,
    eval_prompts: int = 64,
    samples_per_prompt: int = 16,
    progress: bool = True,
) -> Path:
    """The warm-started model directory for `settings`, trained now or reused from the cache.

    The directory is written under a temporary name and renamed when complete, so an interrupted run
    never leaves a half-written model that a later run would reuse.
    """
    final = Path(cache_dir) / f"warm_start-{settings.cache_key()}"
    if (final / METADATA_FILE).is_file():
        return final
    started = time.perf_counter()
    tokenizer = build_demo_tokenizer()
    model = build_model(settings, tokenizer)
    losses = train_sft(model, tokenizer, settings, progress=progress)
    sft_seconds = time.perf_counter() - started
    eval_records = held_out_problems(settings.task)[:eval_prompts]
    accuracy = sampled_accuracy(model, tokenizer, eval_records, samples_per_prompt=samples_per_prompt)
    partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    metadata = {
        "settings": asdict(settings),
        "recipe_version": RECIPE_VERSION,
        "final_loss": losses[-1],
        "sft_seconds": round(sft_seconds, 1),
        "sampled_accuracy": accuracy,  # temperature 1.0, eval_prompts x samples_per_prompt samples
        "accuracy_samples": eval_prompts * samples_per_prompt,
    }
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if final.exists():  # another process finished the same settings first: keep theirs
        shutil.rmtree(partial)
    else:
        os.replace(partial, final)
    return final
