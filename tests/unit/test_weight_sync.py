"""Weight sync at TP=1/PP=1, in one process: the engine side is the CPU engine's own payload reading and
weight loading (host_payload + ModelRunner), without its HTTP server (tests/parallel drives the real one).
Also the placement of colocated servers (which training rank shares which server GPU), a pure function.
"""

import asyncio
import socket
from dataclasses import dataclass

import pytest
import torch

from megatron_dapo.data.packing import pack
from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_mapping import HFMapping
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.parallel.state import ParallelDims
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.engine import EngineRequestError
from megatron_dapo.rollout.host_payload import parse_host_payload, read_host_payload
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.sync import is_sender, sync_weights
from megatron_dapo.sync.broadcast import BroadcastTransport
from megatron_dapo.sync.buckets import buckets
from megatron_dapo.sync.placement import Colocation, ServerPlacement, node_name, servers_from_urls
from megatron_dapo.sync.report import StageReport, SyncReport, WeightSyncError
from megatron_dapo.sync.tensor import TensorTransport
from megatron_dapo.trainer.policy.train_step import forward_logprobs
from tests.helpers.tiny_models import (
    hf_response_logprobs,
    random_samples,
    save_tiny_checkpoint,
    single_process_groups,
    tiny_config,
    tiny_hf_model,
)

LOGPROB_TOLERANCE = 1e-4  # fp32 engine against the fp32 Megatron and Hugging Face models


@dataclass(frozen=True)
class Call:
    names: list[str]
    payloads: int
    weight_version: int
    load_format: str | None
    flush_cache: bool
    url: str | None


class InProcessEngine:
    """The weight-loading half of the CPU engine, called like the engine client."""

    def __init__(self, model_dir, allow_weight_cast: bool = False):
        self.runner = ModelRunner(str(model_dir), torch.float32, None, allow_weight_cast=allow_weight_cast)
        self.calls: list[Call] = []

    async def update_weights_from_tensor(
        self, serialized_named_tensors, *, weight_version, load_format=None, flush_cache=True, url=None
    ):
        named = read_host_payload(parse_host_payload(serialized_named_tensors[0], load_format))
        self.runner.load_weights(named)
        call = Call(
            [n for n, _ in named],
            len(serialized_named_tensors),
            weight_version,
            load_format,
            flush_cache,
            url,
        )
        self.calls.append(call)


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


@pytest.fixture(scope="module")
def engine_loop():
    with BackgroundLoop() as loop:
        yield loop


CASES = {
    # model, load format, bucket bytes, engine TP size, dtype of the sync, colocated server (every-rank path)
    "qwen2-per-tensor": ("qwen2", None, 4096, 1, torch.float32, False),
    "qwen3-tied-flattened": ("qwen3-tied", FLATTENED_BUCKET, 16384, 2, torch.float32, False),
    "llama-flattened-bf16": ("llama", FLATTENED_BUCKET, 8192, 1, torch.bfloat16, False),
    "qwen2-colocated": ("qwen2", FLATTENED_BUCKET, 4096, 1, torch.float32, True),
}
CONFIGS = {
    "qwen2": tiny_config("qwen2"),
    "qwen3-tied": tiny_config("qwen3", tie=True),
    "llama": tiny_config("llama"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_gets_the_megatron_weights(groups, engine_loop, tmp_path, case):
    model_type, load_format, bucket_bytes, engine_tp, dtype, colocated = CASES[case]
    config = CONFIGS[model_type]
    start = save_tiny_checkpoint(tiny_hf_model(config, seed=0), tmp_path / "start")
    engine = InProcessEngine(start, allow_weight_cast=dtype != torch.float32)  # a bf16 sync into fp32
    trained = tiny_hf_model(config, seed=1)  # what the policy has become: every tensor differs
    model = build_gpt_model(config, ParallelDims(), groups)
    load_hf_weights(model, config, trained.state_dict().__getitem__, groups)
    server = ServerPlacement("http://node-a:30000", "node-a", base_gpu_id=0, tp_size=engine_tp)
    colocation = Colocation.from_placement([server], ["node-a"], [0]) if colocated else None
    transport = TensorTransport(engine_tp_size=engine_tp, load_format=load_format, colocation=colocation)
    assert is_sender(groups, transport)

    report = sync_weights(
        model,
        config,
        groups,
        transport,
        engine,
        engine_loop.loop,
        weight_version=7,
        dtype=dtype,
        bucket_bytes=bucket_bytes,
    )

    # Every Hugging Face tensor arrived exactly once, in the sync's dtype, in several buckets.
    sent = [name for call in engine.calls for name in call.names]
    expected = {name for entry in HFMapping(GPTArch.from_hf_config(config)).tensors for name in entry.hf}
    assert sorted(sent) == sorted(expected)
    engine_state = engine.runner.model.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(engine_state[name], tensor.to(dtype).float()), name
    assert len(engine.calls) == report.buckets > 2
    assert [call.flush_cache for call in engine.calls] == [False] * (len(engine.calls) - 1) + [True]
    assert {(call.weight_version, call.payloads, call.load_format) for call in engine.calls} == {
        (7, engine_tp, load_format)
    }
    # One node: every server at once; colocated: each server from the rank on its first GPU.
    assert {call.url for call in engine.calls} == {server.url if colocated else None}
    assert report.tensors == len(sent) and len(report.stages) == 1
    assert report.bytes == sum(trained.state_dict()[name].numel() for name in expected) * dtype.itemsize

    if dtype == torch.float32:  # log-probs: the engine's model, the Megatron model and the reference agree
        samples = random_samples(3, seed=5)
        megatron = forward_logprobs(
            model, [pack(samples, [0, 1, 2])], TokenDistribution(config.vocab_size), groups
        )
        for sample, (megatron_logprobs, _) in zip(samples, megatron, strict=True):
            want, _ = hf_response_logprobs(trained, sample)
            with torch.no_grad():
                got, _ = hf_response_logprobs(engine.runner.model, sample)
            torch.testing.assert_close(got, want, atol=LOGPROB_TOLERANCE, rtol=0)
            torch.testing.assert_close(megatron_logprobs, want, atol=LOGPROB_TOLERANCE, rtol=0)


class RefusingEngine(InProcessEngine):
    """Loads buckets until the `refuse_at`-th call, which it answers as a server refusing it."""

    def __init__(self, model_dir, refuse_at: int):
        super().__init__(model_dir)
        self.refuse_at = refuse_at

    async def update_weights_from_tensor(self, serialized_named_tensors, **kwargs):
        if len(self.calls) + 1 == self.refuse_at:
            self.calls.append(None)
            raise EngineRequestError(
                kwargs.get("url") or "http://engine", "/update", 400, "weights are released"
            )
        await super().update_weights_from_tensor(serialized_named_tensors, **kwargs)


@pytest.mark.parametrize("colocated", [False, True])
def test_a_refused_bucket_fails_the_sync_and_ends_the_sending(groups, engine_loop, tmp_path, colocated):
    config = CONFIGS["qwen2"]
    engine = RefusingEngine(save_tiny_checkpoint(tiny_hf_model(config), tmp_path / "engine"), refuse_at=2)
    model = build_gpt_model(config, ParallelDims(), groups)
    server = ServerPlacement("http://node-a:30000", "node-a", base_gpu_id=0, tp_size=1)
    colocation = Colocation.from_placement([server], ["node-a"], [0]) if colocated else None
    transport = TensorTransport(colocation=colocation)
    with pytest.raises(WeightSyncError, match=r"version 3 failed: stage 0: EngineRequestError: .*released"):
        sync_weights(
            model, config, groups, transport, engine, engine_loop.loop, weight_version=3, dtype=torch.float32,
            bucket_bytes=4096,
        )  # fmt: skip
    assert len(engine.calls) == 2  # nothing is sent after the refusal


def test_buckets_hold_at_most_the_size_and_a_large_tensor_alone():
    sizes = [3, 3, 3, 10, 1, 1, 5]  # float32 elements
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    got = [([name for name, _ in bucket], last) for bucket, last in buckets(named, bucket_bytes=6 * 4)]
    assert got == [
        (["t0", "t1"], False),
        (["t2"], False),
        (["t3"], False),  # 40 bytes: larger than a bucket, sent alone
        (["t4", "t5"], False),
        (["t6"], True),
    ]
    assert list(buckets([], bucket_bytes=8)) == []


def test_report_metrics():
    report = SyncReport(
        weight_version=3,
        stages=(
            StageReport(0, 10, 2_000_000_000, 4, 2.0, 1.5),
            StageReport(1, 5, 1_000_000_000, 2, 1.0, 0.5),
        ),
        seconds=4.0,
    )
    assert (report.bytes, report.buckets, report.tensors) == (3_000_000_000, 6, 15)
    metrics = report.metrics()
    assert metrics["weight_sync/gigabytes_per_second"] == pytest.approx(0.75)
    assert metrics["weight_sync/stage1_engine_seconds"] == 0.5
    assert metrics["weight_sync/buckets"] == 6.0


def test_bad_arguments_are_named(groups, engine_loop, tmp_path):
    config = CONFIGS["qwen2"]
    model = build_gpt_model(config, ParallelDims(), groups)
    transport = TensorTransport()
    common = {"weight_version": 1, "dtype": torch.float32}
    with pytest.raises(ValueError, match="bucket_bytes"):
        sync_weights(model, config, groups, transport, None, engine_loop.loop, bucket_bytes=0, **common)
    with pytest.raises(ValueError, match="is_sender"):
        sync_weights(model, config, groups, transport, None, engine_loop.loop, **common)
    with pytest.raises(ValueError, match="load_format"):
        TensorTransport(load_format="safetensors")
    with pytest.raises(ValueError, match="engine_tp_size"):
        TensorTransport(engine_tp_size=0)
    with pytest.raises(ValueError, match="server_urls"):
        BroadcastTransport("http://127.0.0.1:30000")

    engine = InProcessEngine(save_tiny_checkpoint(tiny_hf_model(config), tmp_path / "engine"))

    async def from_the_loop_thread():
        sync_weights(model, config, groups, transport, engine, asyncio.get_running_loop(), **common)

    with pytest.raises(RuntimeError, match="another thread"):
        asyncio.run(from_the_loop_thread())
    stopped = asyncio.new_event_loop()
    with pytest.raises(RuntimeError, match="not running"):
        sync_weights(model, config, groups, transport, engine, stopped, **common)
    stopped.close()
    assert engine.calls == []


def test_servers_are_placed_as_the_slurm_launch_starts_them():
    urls = ["http://gpu-1:30000", "http://gpu-1:30001/", "http://GPU-2.cluster.local:30001"]
    assert servers_from_urls(urls, base_port=30000, server_tp=4) == [
        ServerPlacement("http://gpu-1:30000", "gpu-1", 0, 4),
        ServerPlacement("http://gpu-1:30001", "gpu-1", 4, 4),
        ServerPlacement("http://GPU-2.cluster.local:30001", "gpu-2", 4, 4),
    ]
    with pytest.raises(ValueError, match="names no node"):
        servers_from_urls(["http://127.0.0.1:30000"], base_port=30000, server_tp=1)
    with pytest.raises(ValueError, match="base_port"):
        servers_from_urls(["http://gpu-1:29999"], base_port=30000, server_tp=1)


def test_colocation_pairs_each_server_gpu_with_the_training_rank_on_it():
    # Two nodes of four GPUs; ranks are numbered node by node except that node b's are listed in reverse.
    nodes, gpus = ["a"] * 4 + ["b"] * 4, [0, 1, 2, 3, 3, 2, 1, 0]
    servers = [
        ServerPlacement(f"http://{node}:{port}", node, 2 * (port - 1), 2) for node in "ab" for port in (1, 2)
    ]
    colocation = Colocation.from_placement(servers, nodes, gpus)
    assert colocation.ranks == ((0, 1), (2, 3), (7, 6), (5, 4))


def test_colocation_is_discovered_from_host_names_and_devices(groups):
    server = ServerPlacement("http://here:30000", node_name(socket.gethostname()), base_gpu_id=0, tp_size=1)
    assert Colocation.discover([server]).ranks == ((0,),)  # this process: LOCAL_RANK 0 of this host


def test_colocation_refuses_what_cannot_be_colocated():
    nodes, gpus = ["a", "a", "b", "b"], [0, 1, 0, 1]
    with pytest.raises(ValueError, match="GPU 2 of node 'a' with no training rank"):
        Colocation.from_placement([ServerPlacement("http://a:1", "a", 1, 2)], nodes, gpus)
    with pytest.raises(ValueError, match="node 'c'"):
        Colocation.from_placement([ServerPlacement("http://c:1", "c", 0, 1)], nodes, gpus)
    with pytest.raises(ValueError, match="both use GPU 1 of a"):
        servers = [ServerPlacement("http://a:1", "a", 0, 2), ServerPlacement("http://a:2", "a", 1, 1)]
        Colocation.from_placement(servers, nodes, gpus)
    with pytest.raises(ValueError, match="ranks 0 and 1 both run on GPU 0 of node a"):
        Colocation.from_placement([], ["a", "a"], [0, 0])
    colocation = Colocation.from_placement([ServerPlacement("http://a:1", "a", 0, 2)], nodes, gpus)
    with pytest.raises(
        ValueError, match="engine_tp_size=1 but the colocation's servers have TP sizes \\[2\\]"
    ):
        TensorTransport(engine_tp_size=1, colocation=colocation)
