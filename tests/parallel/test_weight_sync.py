"""Weight sync from a Megatron model on 4 processes (gloo) into two real CPU engine processes, over HTTP only.

After each sync from a policy whose every tensor differs from what the engines held, each engine's log-probs
of its own samples equal the Megatron model's and the Hugging Face model's. The model has tied embeddings, so
the last stage holds a copy of the embedding that must not be sent a second time.

- One node (TensorTransport without a colocation): the stage senders hand both engines the same handles,
  at TP=2 x PP=2 in both load formats, and at TP=2 x DP=2 (the second replica sends nothing).
- Two simulated nodes (a colocation given each rank's node explicitly): ranks 0-1 run on node0, ranks 2-3 on
  node1; engine 0 shares GPU 0 of node0 (rank 0), engine 1 GPU 1 of node1 (rank 3). At TP=2 x PP=2 each node
  holds one stage and receives the other; at TP=2 x DP=2 each holds a replica. An engine must get its
  payloads from the rank on its GPU: the segment a payload names carries its maker's random token.
  Servers of TP size 2 (which the CPU engine cannot be) are in-process recorders: payload j from GPU j.
- Broadcast (/init_weights_update_group + /update_weights_from_distributed) into both engines, one named
  group per stage, held across syncs, joined on the engines' side as SGLang's servers join.
- An engine that refuses its buckets fails the sync on every rank, whichever the transport; a broadcast
  sync afterwards, once the engine is back, succeeds.
"""

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, read_config
from megatron_dapo.data.packing import Sample, pack
from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_mapping import HFMapping
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims, init_parallel
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.host_payload import parse_host_payload, read_host_payload
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.sync import is_sender, sync_weights
from megatron_dapo.sync.broadcast import BroadcastTransport
from megatron_dapo.sync.placement import Colocation, ServerPlacement
from megatron_dapo.sync.report import WeightSyncError
from megatron_dapo.sync.tensor import TensorTransport
from megatron_dapo.trainer.policy.train_step import forward_logprobs
from tests.helpers.distributed_pool import DistributedPool
from tests.helpers.tiny_models import reference_logprobs, save_tiny_checkpoint, tiny_config, tiny_hf_model

pytestmark = pytest.mark.slow

TP2_PP2, TP2_DP2 = ParallelDims(tp=2, pp=2), ParallelDims(tp=2)
CONFIG = tiny_config("qwen2", tie=True)  # q/k/v biases, GQA, tied embeddings; one layer per stage
BUCKET_BYTES = 4096  # several buckets per stage
LOGPROB_TOLERANCE = 1e-4  # fp32 everywhere
PROMPTS = ((3, 14, 15, 9, 26), (53, 58, 96, 2))
EXPECTED_TENSORS = sum(len(entry.hf) for entry in HFMapping(GPTArch.from_hf_config(CONFIG)).tensors)

# The simulated nodes: where each rank runs, and which rank shares each engine's GPU.
NODE_OF_RANK, GPU_OF_RANK = ("node0", "node0", "node1", "node1"), (0, 1, 0, 1)
ENGINE_GPUS = (("node0", 0), ("node1", 1))
ENGINE_RANKS = (0, 3)

# The engines' starting weights (seed 0) and, per sync, the policy pushed to them.
POLICY_NAMES = ("start", "one-node-per-tensor", "one-node-flattened", "one-node-dp", "two-nodes-pp")
POLICY_NAMES += ("two-nodes-dp", "recorders", "broadcast-a", "broadcast-b", "broadcast-c", "after-failure")
POLICIES = {name: seed for seed, name in enumerate(POLICY_NAMES)}


@dataclass(frozen=True)
class Push:
    """Syncs to run in a row, through one transport, then sampling from every engine."""

    kind: str  # "one-node", "two-nodes" or "broadcast"
    dims: ParallelDims
    load_format: str | None
    syncs: tuple[tuple[Path, int], ...]  # (policy checkpoint, weight version)
    urls: tuple[str, ...]


def make_transport(kind: str, load_format: str | None, urls, server_gpus=ENGINE_GPUS, tp_size: int = 1):
    """Every rank: the transport of `kind` (a colocation over the simulated nodes is a collective); the
    colocated servers start at `server_gpus` (node, GPU)."""
    if kind == "one-node":
        return TensorTransport(load_format=load_format)
    if kind == "broadcast":
        return BroadcastTransport(
            urls, load_format=load_format, backend="gloo", timeout=timedelta(seconds=60)
        )
    servers = [
        ServerPlacement(url, node, gpu, tp_size) for url, (node, gpu) in zip(urls, server_gpus, strict=True)
    ]
    colocation = Colocation.from_placement(servers, NODE_OF_RANK, GPU_OF_RANK)
    return TensorTransport(engine_tp_size=tp_size, load_format=load_format, colocation=colocation)


def payload_maker(payload: str) -> str:
    """The prefix of the writer that made a payload's segment (each rank's transport has its own token)."""
    return json.loads(payload)["segment"].rsplit("-", 1)[0] + "-"


def segment_prefix(transport) -> str | None:
    return transport.segments.prefix if isinstance(transport, TensorTransport) else None


class RecordingClient(SGLangClient):
    """The engine client, noting which server each payload list went to and which processes made it."""

    def __init__(self, urls):
        super().__init__(urls)
        self.posts: list[tuple[str | None, list[set[int]]]] = []

    async def update_weights_from_tensor(self, serialized_named_tensors, *, url=None, **kwargs):
        self.posts.append((url, [payload_maker(payload) for payload in serialized_named_tensors]))
        await super().update_weights_from_tensor(serialized_named_tensors, url=url, **kwargs)


def load_policy(model, config, hf_dir: Path, pg) -> None:
    load_hf_weights(model, config, SafetensorsDir(hf_dir).get, pg)


def push_and_sample(push: Push) -> dict:
    """Every rank: build the model, then `push_into`."""
    pg = init_parallel(push.dims)
    config = read_config(push.syncs[0][0])
    return push_into(build_gpt_model(config, push.dims, pg), config, pg, push)


def push_into(model, config, pg, push: Push) -> dict:
    """Every rank: load each policy and sync it; then rank 0 samples from each engine over HTTP, and every
    rank scores the samples with the Megatron model."""
    transport = make_transport(push.kind, push.load_format, push.urls)
    client = RecordingClient(push.urls)
    sender = is_sender(pg, transport)
    reports = []
    with BackgroundLoop() as loop:
        for hf_dir, version in push.syncs:
            load_policy(model, config, hf_dir, pg)
            reports.append(
                sync_weights(
                    model,
                    config,
                    pg,
                    transport,
                    client if sender else None,
                    loop.loop,
                    weight_version=version,
                    dtype=torch.float32,
                    bucket_bytes=BUCKET_BYTES,
                )
            )
        if isinstance(transport, BroadcastTransport):
            transport.close(client if sender else None, loop.loop)
        samples = [loop.run(sample_each(push.urls)) if dist.get_rank() == 0 else None]
        loop.run(client.close())
    dist.broadcast_object_list(samples, src=0)
    return {
        "reports": reports,
        "samples": samples[0],
        "megatron": score(model, config, pg, samples[0]),
        "posts": client.posts,
        "prefix": segment_prefix(transport),
    }


async def sample_each(urls) -> dict[str, list]:
    """Per engine, (prompt, completion) pairs sampled from it."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    samples = {}
    for url in urls:
        async with SGLangClient([url]) as client:
            samples[url] = [
                (prompt, c) for prompt in PROMPTS for c in await client.generate(prompt, params, n=2)
            ]
    return samples


def score(model, config, pg, samples: dict[str, list]) -> dict[str, list[torch.Tensor]]:
    """The Megatron model's log-probs of every engine's samples."""
    flat = [
        (url, Sample(list(prompt) + c.token_ids, len(prompt)))
        for url in samples
        for prompt, c in samples[url]
    ]
    batch = pack([sample for _, sample in flat], list(range(len(flat))))
    scored = forward_logprobs(model, [batch], TokenDistribution(config["vocab_size"]), pg)
    by_url: dict[str, list[torch.Tensor]] = {url: [] for url in samples}
    for (url, _), (logprobs, _) in zip(flat, scored, strict=True):
        by_url[url].append(logprobs)
    return by_url


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
def engines(checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine_logs")
    specs = [
        ServerSpec(
            model_path=str(checkpoints["start"]),
            port=free_port(),
            engine="cpu",
            random_seed=index,
            log_file=str(logs / f"cpu_engine_{index}.log"),
            extra_args=("--skip-tokenizer-init",),
            env={"OMP_NUM_THREADS": "1"},
        )
        for index in range(2)
    ]
    pool = ServerPool(specs, start_timeout_s=180)
    asyncio.run(pool.start())
    yield tuple(pool.urls)
    pool.stop()


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(world_size=4) as p:
        yield p


def check_engines_serve(result: dict, policy, start, version: int) -> None:
    """Every engine's samples: of `version`, with the policy's log-probs, by the engine and by Megatron."""
    for url, samples in result["samples"].items():
        for (prompt, completion), megatron in zip(samples, result["megatron"][url], strict=True):
            assert completion.weight_version == version and completion.token_ids
            want = _logprobs(policy, prompt, completion.token_ids)
            engine_logprobs = torch.tensor(completion.logprobs, dtype=torch.float64)
            torch.testing.assert_close(engine_logprobs, want, atol=LOGPROB_TOLERANCE, rtol=0)
            torch.testing.assert_close(megatron.double(), want, atol=LOGPROB_TOLERANCE, rtol=0)
            before = _logprobs(start, prompt, completion.token_ids)
            assert (before - want).abs().max() > 1e-2  # the engines' starting weights would not have passed


def check_reports(results: list[dict], dims: ParallelDims) -> None:
    for report_index, report in enumerate(results[0]["reports"]):
        assert all(result["reports"][report_index].stages == report.stages for result in results)  # all alike
        assert [stage.stage for stage in report.stages] == list(range(dims.pp))
        assert all(stage.buckets > 1 for stage in report.stages)
        assert report.tensors == EXPECTED_TENSORS  # each tensor once: the last stage's tied copy is not sent


def _logprobs(model, prompt, tokens) -> torch.Tensor:
    return torch.tensor(reference_logprobs(model, prompt, tokens, temperature=1.0), dtype=torch.float64)


# ---------------------------------------------------------------- one node: stage senders

# name -> (dims, load format); each pushes its own policy, as the next weight version
ONE_NODE = {
    "one-node-per-tensor": (TP2_PP2, None),
    "one-node-flattened": (TP2_PP2, FLATTENED_BUCKET),
    "one-node-dp": (TP2_DP2, FLATTENED_BUCKET),
}


@pytest.mark.parametrize("name", list(ONE_NODE))
def test_one_node_stage_senders_reach_every_engine(pool, engines, checkpoints, hf_models, name):
    dims, load_format = ONE_NODE[name]
    version = list(POLICIES).index(name)
    results = pool.run(
        push_and_sample, Push("one-node", dims, load_format, ((checkpoints[name], version),), engines)
    )
    check_reports(results, dims)
    check_engines_serve(results[0], hf_models[name], hf_models["start"], version)
    senders = [rank for rank, result in enumerate(results) if result["posts"]]
    assert senders == ([0, 2] if dims.pp == 2 else [0])  # TP rank 0 of each stage, first replica
    assert all(url is None for result in results for url, _ in result["posts"])  # to every engine at once


# ---------------------------------------------------------------- two simulated nodes: colocated


@pytest.mark.parametrize("name", ["two-nodes-pp", "two-nodes-dp"])
def test_two_nodes_each_engine_fed_from_its_own_gpu(pool, engines, checkpoints, hf_models, name):
    dims = TP2_PP2 if name == "two-nodes-pp" else TP2_DP2
    version = list(POLICIES).index(name)
    push = Push("two-nodes", dims, FLATTENED_BUCKET, ((checkpoints[name], version),), engines)
    results = pool.run(push_and_sample, push)
    check_reports(results, dims)
    check_engines_serve(results[0], hf_models[name], hf_models["start"], version)
    for rank, result in enumerate(results):
        if rank not in ENGINE_RANKS:
            assert result["posts"] == []
            continue
        url = engines[ENGINE_RANKS.index(rank)]
        assert result["posts"] and all(post == (url, [result["prefix"]]) for post in result["posts"])
        assert NODE_OF_RANK[rank] == ENGINE_GPUS[ENGINE_RANKS.index(rank)][0]


class Recorder:
    """A server of TP size 2 in the poster's process: loads every TP rank's payload and notes its maker."""

    def __init__(self):
        self.calls: list[tuple[str, list[set[int]], list[dict[str, torch.Tensor]]]] = []

    async def update_weights_from_tensor(self, payloads, *, weight_version, load_format, flush_cache, url):
        makers = [payload_maker(payload) for payload in payloads]
        loaded = [dict(read_host_payload(parse_host_payload(payload, load_format))) for payload in payloads]
        self.calls.append((url, makers, loaded))


def push_to_recorders(hf_dir: Path, urls) -> dict:
    pg = init_parallel(TP2_PP2)
    config = read_config(hf_dir)
    model = build_gpt_model(config, TP2_PP2, pg)
    load_policy(model, config, hf_dir, pg)
    transport = make_transport("two-nodes", FLATTENED_BUCKET, urls, (("node0", 0), ("node1", 0)), tp_size=2)
    recorder = Recorder() if is_sender(pg, transport) else None
    with BackgroundLoop() as loop:
        sync_weights(
            model, config, pg, transport, recorder, loop.loop, weight_version=1, dtype=torch.float32,
            bucket_bytes=BUCKET_BYTES,
        )  # fmt: skip
    return {"calls": recorder.calls if recorder else None, "prefix": segment_prefix(transport)}


def test_two_nodes_each_server_tp_rank_fed_from_its_own_gpu(pool, checkpoints, hf_models):
    urls = ("http://tp2-server-a", "http://tp2-server-b")  # on GPUs 0-1 of node0, and of node1
    results = pool.run(push_to_recorders, checkpoints["recorders"], urls)
    policy = hf_models["recorders"].state_dict()
    prefixes = [result["prefix"] for result in results]
    posters = [rank for rank, result in enumerate(results) if result["calls"] is not None]
    assert posters == [0, 2]  # the rank on each server's first GPU
    for poster, url in zip(posters, urls, strict=True):
        calls = results[poster]["calls"]
        assert len(calls) > 2 and {call_url for call_url, _, _ in calls} == {url}
        for _, makers, loaded in calls:
            assert makers == [prefixes[poster], prefixes[poster + 1]]  # TP rank j: the copy on GPU j
            assert all(torch.equal(loaded[1][name], tensor) for name, tensor in loaded[0].items())
        received = {name: tensor for _, _, loaded in calls for name, tensor in loaded[0].items()}
        assert sum(len(loaded[0]) for _, _, loaded in calls) == len(received) == EXPECTED_TENSORS
        for name, tensor in received.items():
            assert torch.equal(tensor, policy[name]), name


# ---------------------------------------------------------------- broadcast to both engines


def test_broadcast_reaches_both_engines_from_every_stage(pool, engines, checkpoints, hf_models):
    per_tensor = ((checkpoints["broadcast-a"], 21), (checkpoints["broadcast-b"], 22))  # the groups live on
    results = pool.run(push_and_sample, Push("broadcast", TP2_PP2, None, per_tensor, engines))
    check_reports(results, TP2_PP2)
    check_engines_serve(results[0], hf_models["broadcast-b"], hf_models["start"], 22)

    flattened = ((checkpoints["broadcast-c"], 23),)
    results = pool.run(push_and_sample, Push("broadcast", TP2_PP2, FLATTENED_BUCKET, flattened, engines))
    check_reports(results, TP2_PP2)
    check_engines_serve(results[0], hf_models["broadcast-c"], hf_models["start"], 23)


# ---------------------------------------------------------------- failures


def fail_then_recover(hf_dir: Path, recovery_dir: Path, urls) -> dict:
    """Every rank: with engine 1's weights released, a sync through each transport; then, engine 1 back,
    a broadcast sync and samples."""
    pg = init_parallel(TP2_PP2)
    config = read_config(hf_dir)
    model = build_gpt_model(config, TP2_PP2, pg)
    load_policy(model, config, hf_dir, pg)
    errors = {}
    with BackgroundLoop() as loop:
        if dist.get_rank() == 0:
            loop.run(_on_engine(urls[1], "release_memory"))
        dist.barrier()
        for kind in ("one-node", "two-nodes", "broadcast"):
            transport = make_transport(kind, FLATTENED_BUCKET, urls)
            client = SGLangClient(urls) if is_sender(pg, transport) else None
            try:
                sync_weights(
                    model, config, pg, transport, client, loop.loop, weight_version=30, dtype=torch.float32,
                    bucket_bytes=BUCKET_BYTES,
                )  # fmt: skip
            except WeightSyncError as error:
                errors[kind] = str(error)
            if kind == "broadcast":
                transport.close(client, loop.loop)  # the failed groups were dropped already
            if client is not None:
                loop.run(client.close())
        if dist.get_rank() == 0:
            loop.run(_on_engine(urls[1], "resume_memory"))
        dist.barrier()
    recovery = Push("broadcast", TP2_PP2, FLATTENED_BUCKET, ((recovery_dir, 31),), urls)
    return {"errors": errors, **push_into(model, config, pg, recovery)}


async def _on_engine(url: str, method: str) -> None:
    async with SGLangClient([url]) as client:
        await getattr(client, method)()


def test_a_refusing_engine_fails_the_sync_on_every_rank(pool, engines, checkpoints, hf_models):
    results = pool.run(fail_then_recover, checkpoints["start"], checkpoints["after-failure"], engines)
    for kind in ("one-node", "two-nodes", "broadcast"):
        message = results[0]["errors"].get(kind)
        assert message is not None and all(result["errors"][kind] == message for result in results), kind
        assert "weight sync to version 30 failed" in message and engines[1] in message, message
        assert "weights are released" in message, message
    assert "(rank 3)" in results[0]["errors"]["two-nodes"]  # engine 1's own rank; the others went on
    check_engines_serve(results[0], hf_models["after-failure"], hf_models["start"], 31)
