"""Converted checkpoints in real GPTModels at TP=2 x PP=2 (4 gloo processes, one world for the module).

For tiny random Qwen2, Qwen3 (tied embeddings) and Llama models: the checkpoint converted at TP=2/PP=2 and the
one converted at TP=1/PP=1 both load into the TP=2 x PP=2 model, whose log-probs then equal the Hugging Face
model's (fp32); the checkpoint megatron-core itself saves from that model has the converter's chunk layout and
converts back to the original Hugging Face tensors bit for bit.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from megatron_dapo.checkpoint import convert
from megatron_dapo.checkpoint.torch_dist import CheckpointReader
from megatron_dapo.rollout.launcher import free_port
from tests.helpers.tiny_models import hf_tensors, save_tiny_hf_model

pytestmark = pytest.mark.slow

CASES = {"qwen2": ("qwen2", False), "qwen3_tied": ("qwen3", True), "llama": ("llama", False)}
LAYOUTS = ("tp2pp2", "tp1pp1")  # the layout each checkpoint was converted at; all load at TP=2 x PP=2
WORLD_SIZE = 4
BATCH, SEQ = 2, 10


def _pipeline_logprobs(model, tokens: torch.Tensor, pg, vocab_size: int) -> torch.Tensor | None:
    """Forward through the pipeline by hand (stage to stage with send/recv); log-probs [b, s, V] on the last
    stage, gathered over TP and cut to the true vocabulary; None elsewhere."""
    pp_rank, pp_size = pg.pp.rank(), pg.pp.size()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if pp_rank > 0:
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=dist.get_global_rank(pg.pp, pp_rank - 1))
        model.set_input_tensor(hidden)
    output = model(tokens, positions, None)
    if pp_rank < pp_size - 1:
        dist.send(output.contiguous(), dst=dist.get_global_rank(pg.pp, pp_rank + 1))
        return None
    shards = [torch.empty_like(output) for _ in range(pg.tp.size())]
    dist.all_gather(shards, output.contiguous(), group=pg.tp)
    return torch.log_softmax(torch.cat(shards, dim=-1)[..., :vocab_size].double(), dim=-1)


def _worker(rank: int, port: int, root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE)
    )
    from megatron_dapo.checkpoint.model_io import load_model, save_model
    from megatron_dapo.model.build import build_gpt_model
    from megatron_dapo.parallel.state import ParallelDims, destroy_parallel, init_parallel

    dims = ParallelDims(tp=2, pp=2)
    pg = init_parallel(dims)
    results = {}
    with torch.no_grad():
        for case in CASES:
            hf_dir = root / case / "hf"
            config = transformers.AutoConfig.from_pretrained(hf_dir)
            model = build_gpt_model(config, dims, pg, params_dtype=torch.float32)
            tokens = torch.load(root / case / "tokens.pt")
            for layout in LAYOUTS:
                load_model(model, root / case / layout)
                results[case, layout] = _pipeline_logprobs(model, tokens, pg, config.vocab_size)
            save_model(model, root / case / "saved_by_megatron", hf_dir=hf_dir)
    torch.save(results, root / f"results_rank{rank}.pt")
    destroy_parallel()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Convert every case, run the 4-process world once; returns (root, log-probs, HF references)."""
    root = tmp_path_factory.mktemp("convert_parallel")
    references = {}
    for case, (model_type, tie) in CASES.items():
        hf_dir = save_tiny_hf_model(root / case / "hf", model_type, tie=tie)
        convert.hf_to_megatron(hf_dir, root / case / "tp2pp2", tp=2, pp=2)
        convert.hf_to_megatron(hf_dir, root / case / "tp1pp1", tp=1, pp=1)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        tokens = torch.randint(
            0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3)
        )
        torch.save(tokens, root / case / "tokens.pt")
        with torch.no_grad():
            references[case] = torch.log_softmax(model(tokens).logits.double(), dim=-1)
    mp.spawn(_worker, args=(free_port(), root), nprocs=WORLD_SIZE, join=True)
    # Global rank 3 is the last pipeline stage's TP rank 1 ... any last-stage rank holds the gathered result.
    logprobs = torch.load(root / f"results_rank{WORLD_SIZE - 1}.pt")
    return root, logprobs, references


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_converted_checkpoint_gives_hf_logprobs(world, case, layout):
    _, logprobs, references = world
    assert logprobs[case, layout].shape == references[case].shape
    torch.testing.assert_close(logprobs[case, layout], references[case], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_megatron_saved_checkpoint_matches_converter_layout_and_converts_back(world, case):
    root, _, _ = world
    saved, converted = (
        CheckpointReader(root / case / "saved_by_megatron"),
        CheckpointReader(root / case / "tp2pp2"),
    )
    for key, md in converted.metadata.state_dict_metadata.items():
        theirs = saved.tensor_metadata(key)
        assert theirs.size == md.size, key
        assert sorted(tuple(c.offsets) for c in theirs.chunks) == sorted(
            tuple(c.offsets) for c in md.chunks
        ), key

    convert.megatron_to_hf(root / case / "saved_by_megatron", root / case / "back")
    original, back = hf_tensors(root / case / "hf"), hf_tensors(root / case / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
