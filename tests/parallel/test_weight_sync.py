"""Weight sync from a Megatron model at TP=2 x PP=2 (and TP=2 x DP=2; 4 processes, gloo) into rollout servers.

/update_weights_from_tensor goes to a real CPU engine process started here, queried over HTTP only: after a
sync from a policy whose every tensor differs from the engine's previous weights, the engine's log-probs of
its own samples equal the Megatron model's and the Hugging Face model's. The model has tied embeddings, so
the last stage holds a copy of the embedding that must not be sent a second time.

/update_weights_from_distributed cannot go to the CPU engine: it joins the weight-update group as a default
process group, under other store keys than SGLang's servers use, so a trainer that joins as SGLang expects
never meets it. Stand-in server ranks take its place here: processes that join and receive exactly as
SGLang's TP workers do (`init_custom_process_group`, `update_weights_from_distributed` in either format).
"""

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, read_config
from megatron_dapo.checkpoint.hf_mapping import HFMapping, ModelDims
from megatron_dapo.data.packing import Sample, pack
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims, init_parallel
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.testing import reference_logprobs
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.rollout.weight_sync import (
    BackgroundLoop,
    BroadcastTransport,
    TensorTransport,
    is_sender,
    sync_weights,
)
from megatron_dapo.trainer.train_step import forward_logprobs
from tests.parallel.launcher import DistributedPool
from tests.parallel.tiny_models import save_tiny_checkpoint, tiny_config, tiny_hf_model

pytestmark = pytest.mark.slow

DIMS = ParallelDims(tp=2, pp=2)
CONFIG = tiny_config("qwen2", tie=True)  # q/k/v biases, GQA, tied embeddings; one layer per stage
BUCKET_BYTES = 4096  # several buckets per stage
LOGPROB_TOLERANCE = 1e-4  # fp32 everywhere
PROMPTS = ((3, 14, 15, 9, 26), (53, 58, 96, 2))
# The engine's starting weights (seed 0) and, per sync, the policy pushed to it.
POLICIES = {"start": 0, "tp2pp2-per-tensor": 1, "tp2pp2-flattened": 2, "tp2dp2-flattened": 3, "broadcast": 4}
# Tensor-path syncs, in this order (each pushes a new policy and version): name -> (dims, load format)
TENSOR_SYNCS = {
    "tp2pp2-per-tensor": (DIMS, None),
    "tp2pp2-flattened": (DIMS, FLATTENED_BUCKET),
    "tp2dp2-flattened": (ParallelDims(tp=2), FLATTENED_BUCKET),  # the second replica sends nothing
}
EXPECTED_TENSORS = sum(len(entry.hf) for entry in HFMapping(ModelDims.from_hf_config(CONFIG)).tensors)


@dataclass(frozen=True)
class Push:
    hf_dir: Path
    url: str
    dims: ParallelDims
    load_format: str | None
    weight_version: int


def push_and_sample(push: Push) -> dict:
    """Every rank: load the policy, sync it into the engine; then sample from the engine (rank 0, over HTTP)
    and score the samples with the Megatron model."""
    pg = init_parallel(push.dims)
    config = read_config(push.hf_dir)
    model = build_gpt_model(config, push.dims, pg)
    load_hf_weights(model, config, SafetensorsDir(push.hf_dir).get, pg)
    client = SGLangClient([push.url])
    with BackgroundLoop() as loop:
        report = sync_weights(
            model,
            config,
            pg,
            TensorTransport(load_format=push.load_format),
            client if is_sender(pg) else None,
            loop.loop,
            weight_version=push.weight_version,
            dtype=torch.float32,
            bucket_bytes=BUCKET_BYTES,
        )
        completions = [loop.run(_sample(client))] if dist.get_rank() == 0 else [None]
        loop.run(client.close())
    dist.broadcast_object_list(completions, src=0)
    samples = [Sample(list(prompt) + c.token_ids, len(prompt)) for prompt, c in completions[0]]
    scored = forward_logprobs(
        model, [pack(samples, list(range(len(samples))))], TokenDistribution(config["vocab_size"]), pg
    )
    return {"report": report, "completions": completions[0], "megatron": [lp for lp, _ in scored]}


async def _sample(client: SGLangClient) -> list:
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    return [(prompt, c) for prompt in PROMPTS for c in await client.generate(prompt, params, n=2)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policies")
    return {
        name: save_tiny_checkpoint(tiny_hf_model(CONFIG, seed=seed), root / name)
        for name, seed in POLICIES.items()
    }


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    spec = ServerSpec(
        model_path=str(checkpoints["start"]),
        port=free_port(),
        engine="cpu",
        random_seed=0,
        log_file=str(tmp_path_factory.mktemp("engine_log") / "cpu_engine.log"),
        extra_args=("--skip-tokenizer-init",),
        env={"OMP_NUM_THREADS": "1"},
    )
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(world_size=4) as p:
        yield p


@pytest.mark.parametrize("name", list(TENSOR_SYNCS))
def test_engine_samples_from_the_synced_policy(pool, engine, checkpoints, hf_models, name):
    dims, load_format = TENSOR_SYNCS[name]
    version = list(TENSOR_SYNCS).index(name) + 1
    results = pool.run(push_and_sample, Push(checkpoints[name], engine.urls[0], dims, load_format, version))

    report = results[0]["report"]
    assert all(result["report"].stages == report.stages for result in results)  # the same on every rank
    assert [stage.stage for stage in report.stages] == list(range(dims.pp))
    assert all(stage.buckets > 1 for stage in report.stages)
    assert report.tensors == EXPECTED_TENSORS  # each tensor once: the last stage's tied copy is not sent

    policy, start = hf_models[name], hf_models["start"]
    for (prompt, completion), megatron in zip(results[0]["completions"], results[0]["megatron"], strict=True):
        assert completion.weight_version == version and completion.token_ids
        want = _logprobs(policy, prompt, completion.token_ids)
        engine_logprobs = torch.tensor(completion.logprobs, dtype=torch.float64)
        torch.testing.assert_close(engine_logprobs, want, atol=LOGPROB_TOLERANCE, rtol=0)
        torch.testing.assert_close(megatron.double(), want, atol=LOGPROB_TOLERANCE, rtol=0)
        before = _logprobs(start, prompt, completion.token_ids)
        assert (before - want).abs().max() > 1e-2  # the engine's starting weights would not have passed


def _logprobs(model, prompt, tokens) -> torch.Tensor:
    return torch.tensor(reference_logprobs(model, prompt, tokens, temperature=1.0), dtype=torch.float64)


# ---------------------------------------------------------------- broadcast to stand-in SGLang server ranks

# One TP rank of an SGLang server, as its weight updater behaves: join the group as init_custom_process_group
# does, then per request receive per tensor, or one uint8 buffer of all the bytes (flattened bucket).
_SERVER_RANK = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

address, port, world_size, rank, group_name, backend, out = sys.argv[1:]
timeout = timedelta(seconds=60)
rendezvous_url = f"tcp://{address}:{port}"
store, rank, world_size = next(rendezvous(rendezvous_url, int(rank), int(world_size), timeout=timeout))
store.set_timeout(timeout)
store = dist.PrefixStore(group_name, store)
group, _ = _new_process_group_helper(
    world_size, rank, [], dist.Backend(backend), store, group_name=group_name, timeout=timeout
)
_world.pg_group_ranks[group] = {r: r for r in range(world_size)}
print("joined", flush=True)
received = {}
for line in sys.stdin:
    request = json.loads(line)
    if request is None:
        break
    tensors = [torch.empty(s, dtype=getattr(torch, d)) for s, d in zip(request["shapes"], request["dtypes"])]
    if request["load_format"] == "flattened_bucket":
        flat = torch.empty(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=group)
        offset = 0
        for t in tensors:
            t.view(-1).view(torch.uint8).copy_(flat[offset : offset + t.numel() * t.element_size()])
            offset += t.numel() * t.element_size()
    else:
        for t in tensors:
            dist.broadcast(t, src=0, group=group)
    received.setdefault(request["weight_version"], []).extend(zip(request["names"], tensors))
    print("loaded", flush=True)
dist.destroy_process_group(group)
torch.save(received, out)
print("destroyed", flush=True)
"""


class StandInServer:
    """The weight-update calls of one SGLang server of `tp_size` GPUs, each GPU a `_SERVER_RANK` process."""

    def __init__(self, tp_size: int, workdir: Path):
        self.tp_size, self.workdir = tp_size, workdir
        self.ranks: list[subprocess.Popen] = []
        self.received: list[dict] = []  # per server rank: weight version -> [(name, tensor)]

    async def init_weights_update_group(
        self, url, *, master_address, master_port, rank_offset, world_size, group_name, backend
    ):
        for rank in range(rank_offset, rank_offset + self.tp_size):
            args = [master_address, master_port, world_size, rank, group_name, backend, self._out(rank)]
            command = [sys.executable, "-c", _SERVER_RANK, *map(str, args)]
            self.ranks.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        await asyncio.to_thread(self._expect, "joined")

    async def update_weights_from_distributed(
        self, names, dtypes, shapes, *, weight_version, group_name, load_format=None, flush_cache=True
    ):
        request = {"names": names, "dtypes": dtypes, "shapes": shapes, "load_format": load_format}
        self._tell({**request, "weight_version": weight_version})
        await asyncio.to_thread(self._expect, "loaded")

    async def destroy_weights_update_group(self, group_name):
        self._tell(None)
        await asyncio.to_thread(self._expect, "destroyed")
        for rank, process in enumerate(self.ranks, start=1):
            process.wait(timeout=30)
            self.received.append(torch.load(self._out(rank)))

    def _out(self, rank: int) -> str:
        return str(self.workdir / f"rank{rank}.pt")

    def _tell(self, message) -> None:
        for process in self.ranks:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()

    def _expect(self, word: str) -> None:
        for process in self.ranks:
            line = process.stdout.readline().strip()
            if line != word:
                raise RuntimeError(
                    f"stand-in server rank answered {line!r} (exit code {process.poll()}), not {word}"
                )


# Per transport (load format): the weight versions synced through its groups, which live across syncs.
BROADCAST_SYNCS = {None: (1, 2), FLATTENED_BUCKET: (3,)}


def push_by_broadcast(hf_dir: Path, workdir: Path) -> list[dict]:
    """Every rank: sync the policy through one group per stage, to a server of two stand-in ranks."""
    pg = init_parallel(DIMS)
    config = read_config(hf_dir)
    model = build_gpt_model(config, DIMS, pg)
    load_hf_weights(model, config, SafetensorsDir(hf_dir).get, pg)
    results = []
    with BackgroundLoop() as loop:
        for load_format, versions in BROADCAST_SYNCS.items():
            transport = BroadcastTransport(
                ["http://stand-in"],
                engine_tp_size=2,
                load_format=load_format,
                backend="gloo",
                timeout=timedelta(seconds=60),
            )
            server = None
            if is_sender(pg):
                server = StandInServer(tp_size=2, workdir=workdir / f"{load_format}-stage{pg.pp.rank()}")
                server.workdir.mkdir(parents=True)
            reports = [
                sync_weights(
                    model,
                    config,
                    pg,
                    transport,
                    server,
                    loop.loop,
                    weight_version=version,
                    dtype=torch.float32,
                    bucket_bytes=BUCKET_BYTES,
                )
                for version in versions
            ]
            transport.close(server, loop.loop)
            results.append({"reports": reports, "received": server.received if server else None})
    return results


def test_broadcast_reaches_every_server_rank_from_every_stage(pool, checkpoints, hf_models, tmp_path):
    results = pool.run(push_by_broadcast, checkpoints["broadcast"], tmp_path)
    policy = hf_models["broadcast"].state_dict()
    expected = sorted(
        name for entry in HFMapping(ModelDims.from_hf_config(CONFIG)).tensors for name in entry.hf
    )
    senders = [rank_results for rank_results in results if rank_results[0]["received"] is not None]
    assert len(senders) == 2  # one per stage
    for index, versions in enumerate(BROADCAST_SYNCS.values()):
        for result in results:
            assert [report.tensors for report in result[index]["reports"]] == [EXPECTED_TENSORS] * len(
                versions
            )
        for server_rank in range(2):
            for version in versions:
                # Together the two stages' senders sent every tensor exactly once, to each server rank.
                named = [
                    pair for sender in senders for pair in sender[index]["received"][server_rank][version]
                ]
                assert sorted(name for name, _ in named) == expected
                for name, tensor in named:
                    assert torch.equal(tensor, policy[name]), name
