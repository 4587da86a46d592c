"""Per-token log-probs and entropy of token sequences under a checkpoint, at any TP/PP/CP: the library of
dapo-logprobs (megatron_dapo/cli/logprobs.py).

Each input line is {"input_ids": [...], "response_start": k}; each output line, in input order, is
{"logprobs": [...], "entropy": [...]} for tokens k..end: log p(token_i | tokens before i) under
softmax(logits / temperature), and the entropy of that distribution. The checkpoint is a Hugging Face
model directory or a Megatron checkpoint of this project; the log says which it loaded. Use it to compare the
trainer's numbers with the rollout engine's (train/inference mismatch), at the parallel layout of the run.
"""

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, read_config
from megatron_dapo.checkpoint.meta import META_FILE, hf_assets_dir, read_meta
from megatron_dapo.checkpoint.model_io import load_model
from megatron_dapo.data.packing import Sample, pack, plan_microbatches, sequence_pad_multiple
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims, destroy_parallel, init_parallel
from megatron_dapo.trainer.policy.train_step import forward_logprobs


def read_samples(path: Path) -> list[Sample]:
    """Input lines -> samples; a malformed line is reported with its number."""
    samples = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ids = record["input_ids"]
                if not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise ValueError("input_ids must be non-negative integers")
                samples.append(Sample(ids, int(record["response_start"])))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f'{path}:{number}: expected {{"input_ids": [int, ...], "response_start": k}} with '
                    f"1 <= k <= len(input_ids): {error!r}"
                ) from error
    if not samples:
        raise ValueError(f"{path}: no input lines")
    return samples


def write_logprobs(
    checkpoint: Path,
    input_path: Path,
    output: Path,
    dims: ParallelDims,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    tokens_per_microbatch: int = 8192,
    chunk_tokens: int | None = None,
) -> None:
    """Score every line of `input_path` under `checkpoint` at layout `dims` (this process is one of its
    ranks); rank 0 writes the results to `output` in input order."""
    pg = init_parallel(dims)
    try:
        start = time.perf_counter()
        is_megatron = (checkpoint / META_FILE).is_file()
        config = read_config(hf_assets_dir(checkpoint) if is_megatron else checkpoint)
        samples = read_samples(input_path)
        for number, sample in enumerate(samples, 1):
            if max(sample.token_ids) >= config["vocab_size"]:
                raise ValueError(f"{input_path}:{number}: a token id is >= vocab_size={config['vocab_size']}")
        model = _load_model(checkpoint, is_megatron, config, dims, pg, dtype)
        distribution = TokenDistribution(config["vocab_size"], temperature, chunk_tokens)
        results = _score(model, samples, distribution, dims, pg, tokens_per_microbatch)
        if dist.get_rank() == 0:
            write_output(output, results)
            tokens = sum(len(s.token_ids) - s.response_start for s in samples)
            _log(
                f"wrote {len(samples)} lines ({tokens} response tokens) to {output} "
                f"in {time.perf_counter() - start:.1f} s"
            )
    finally:
        destroy_parallel()


def _load_model(
    checkpoint: Path, is_megatron: bool, config: dict, dims: ParallelDims, pg, dtype: torch.dtype
) -> torch.nn.Module:
    """The Megatron model at layout `dims` with the weights of a Hugging Face directory or a checkpoint."""
    model = build_gpt_model(config, dims, pg, params_dtype=dtype)
    if is_megatron:
        meta = read_meta(checkpoint)
        _log(
            f"loading Megatron checkpoint {checkpoint} (saved at TP={meta.tensor_parallel}, "
            f"PP={meta.pipeline_parallel})"
        )
        load_model(model, checkpoint)
    else:
        _log(f"loading Hugging Face checkpoint {checkpoint}")
        load_hf_weights(model, config, SafetensorsDir(checkpoint).get, pg)
    model.eval()
    return model


def _score(
    model: torch.nn.Module,
    samples: list[Sample],
    distribution: TokenDistribution,
    dims: ParallelDims,
    pg,
    tokens_per_microbatch: int,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(log-probs, entropy) of every sample's response, in input order, on rank 0; None on the others."""
    pad = sequence_pad_multiple(dims.cp)
    plan = plan_microbatches(
        [len(s.token_ids) for s in samples],
        dp_size=pg.dp.size(),
        tokens_per_microbatch=tokens_per_microbatch,
        cp=dims.cp,
        pad_multiple=pad,
    )[pg.dp.rank()]
    results = forward_logprobs(model, [pack(samples, ids, pad) for ids in plan], distribution, pg)
    mine = [i for ids in plan for i in ids]
    # One rank of each data-parallel group sends its samples' results to rank 0, which writes them in order.
    leads_dp_group = pg.tp.rank() == 0 and pg.cp.rank() == 0 and pg.pp.rank() == 0
    part = dict(zip(mine, results, strict=True)) if leads_dp_group else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {index: pair for p in parts for index, pair in p.items()}
    return [merged[i] for i in range(len(samples))]


def write_output(path: Path, results: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for logprobs, entropy in results:
            out.write(
                json.dumps({"logprobs": logprobs.float().tolist(), "entropy": entropy.float().tolist()})
            )
            out.write("\n")


def _log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[dapo-logprobs] {message}", flush=True)


if __name__ == "__main__":  # `torchrun -m megatron_dapo.logprobs`, as the README runs it
    from megatron_dapo.cli.logprobs import main

    main()
