"""Weight sync's CUDA paths (need CUDA; the SGLang tests also need sglang installed).

- CUDA IPC payloads name the GPU by UUID and rebuild, in another process, as SGLang's receiver rebuilds them
  (the same serializer makes the payloads of tests/gpu/test_sglang_client.py).
- Colocated: a Megatron model on GPU 0 syncs into an SGLang server on the same GPU through CUDA IPC handles,
  in both load formats, and through the many-node path (a colocation); the server's log-probs then equal the
  Hugging Face model's.
- Separate GPUs: the same through an NCCL group and /update_weights_from_distributed (two GPUs).
SGLang runs in float32 with its torch-native backends, as in test_sglang_client.py, so that log-probs compare
with the float32 Hugging Face model.
"""

import asyncio
import base64
import io
import multiprocessing as mp
import pickle
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.parallel.state import ParallelDims
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.rollout.weight_payload import serialize_named_tensors
from megatron_dapo.sync import sync_weights
from megatron_dapo.sync.broadcast import BroadcastTransport
from megatron_dapo.sync.placement import Colocation, ServerPlacement, node_name
from megatron_dapo.sync.tensor import TensorTransport
from tests.helpers.tiny_models import (
    reference_logprobs,
    save_tiny_checkpoint,
    single_process_groups,
    tiny_config,
    tiny_hf_model,
)

pytestmark = pytest.mark.gpu

CONFIG = tiny_config("qwen2", tie=True)
LOGPROB_TOLERANCE = 1e-3  # GPU float32 kernels against the CPU float32 model
PROMPT = (3, 14, 15, 9, 26, 5)
SGLANG_FLOAT32 = (
    "--dtype", "float32", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--skip-tokenizer-init",
)  # fmt: skip


# ---------------------------------------------------------------- CUDA IPC payloads


def _rebuild_in_another_process(payload: str, queue) -> None:
    """What a receiver patched like SGLang's (`monkey_patch_torch_reductions`) does with the payload."""
    from torch.multiprocessing import reductions

    original = reductions.rebuild_cuda_tensor

    def rebuild_from_uuid(*args):
        uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        assert isinstance(args[6], str), "the sender wrote a device index, not a UUID"
        return original(*args[:6], uuids.index(args[6]), *args[7:])

    reductions.rebuild_cuda_tensor = rebuild_from_uuid
    named = pickle.load(io.BytesIO(base64.b64decode(payload)))
    queue.put([(name, tensor.tolist()) for name, tensor in named])  # by value: this process ends next


def test_cuda_ipc_payload_rebuilds_from_the_gpu_uuid():
    named = [("a", torch.randn(4, 5, device="cuda")), ("b", torch.arange(7, device="cuda"))]
    payload = serialize_named_tensors(named)
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_rebuild_in_another_process, args=(payload, queue))
    process.start()
    received = queue.get(timeout=120)  # `named` stays alive meanwhile: the handles point into it
    process.join(timeout=60)
    assert process.exitcode == 0
    for (name, tensor), (got_name, got) in zip(named, received, strict=True):
        assert name == got_name and tensor.tolist() == got


# ---------------------------------------------------------------- into SGLang


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    seeds = {"start": 0, "policy1": 1, "policy2": 2}
    return {
        name: save_tiny_checkpoint(tiny_hf_model(CONFIG, seed=seed), root / name)
        for name, seed in seeds.items()
    }


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


def start_sglang(model_dir, log_dir, gpu: int):
    spec = ServerSpec(
        model_path=str(model_dir),
        port=free_port(),
        engine="sglang",
        mem_fraction_static=0.3,
        base_gpu_id=gpu,
        random_seed=0,
        log_file=str(log_dir / "sglang.log"),
        extra_args=SGLANG_FLOAT32,
    )
    pool = ServerPool([spec], start_timeout_s=600)
    asyncio.run(pool.start())
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def colocated_server(checkpoints, tmp_path_factory):
    yield from start_sglang(checkpoints["start"], tmp_path_factory.mktemp("colocated"), gpu=0)


@pytest.fixture(scope="module")
def separate_server(checkpoints, tmp_path_factory):
    yield from start_sglang(checkpoints["start"], tmp_path_factory.mktemp("separate"), gpu=1)


def sync_and_check(groups, policy_dir, server: ServerPool, transport, version: int) -> None:
    """Sync a Megatron model (GPU 0) holding `policy_dir`'s weights; check the server's log-probs."""
    model = build_gpt_model(CONFIG, ParallelDims(), groups).cuda()
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    load_hf_weights(model, CONFIG, policy.state_dict().__getitem__, groups)
    client = SGLangClient(server.urls)
    with BackgroundLoop() as loop:
        report = sync_weights(
            model,
            CONFIG,
            groups,
            transport,
            client,
            loop.loop,
            weight_version=version,
            dtype=torch.float32,
            bucket_bytes=8192,
        )
        [completion] = loop.run(client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12)))
        if isinstance(transport, BroadcastTransport):
            transport.close(client, loop.loop)
        loop.run(client.close())
    assert report.buckets > 1 and completion.weight_version == version
    want = torch.tensor(reference_logprobs(policy, PROMPT, completion.token_ids, 1.0), dtype=torch.float64)
    got = torch.tensor(completion.logprobs, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=LOGPROB_TOLERANCE, rtol=0)


# Each sync pushes another policy than the server holds, under a new version.
SYNCS = {None: ("policy1", 1), FLATTENED_BUCKET: ("policy2", 2)}


@pytest.mark.parametrize("load_format", list(SYNCS))
def test_colocated_sync_through_cuda_ipc(groups, checkpoints, colocated_server, load_format):
    policy, version = SYNCS[load_format]
    transport = TensorTransport(load_format=load_format)  # the server shares GPU 0 with the model
    sync_and_check(groups, checkpoints[policy], colocated_server, transport, version)


def test_colocation_hands_the_server_the_copy_on_its_gpu(groups, checkpoints, colocated_server):
    """The many-node path on one node: found by host name and CUDA device, the rank on the server's GPU
    builds the whole model and posts a handle to its own copy."""
    here = node_name(socket.gethostname())
    server = ServerPlacement(colocated_server.urls[0], here, base_gpu_id=0, tp_size=1)
    transport = TensorTransport(colocation=Colocation.discover([server]))
    sync_and_check(groups, checkpoints["policy1"], colocated_server, transport, version=3)


def test_gpu_model_syncs_into_the_cpu_engine(groups, checkpoints, tmp_path):
    """rollout.backend=cpu on a GPU machine: buckets reach the CPU engine as host memory, not CUDA handles."""
    spec = ServerSpec(model_path=str(checkpoints["start"]), port=free_port(), engine="cpu",
                      log_file=str(tmp_path / "cpu_engine.log"))  # fmt: skip
    pool = ServerPool([spec])
    asyncio.run(pool.start())
    try:
        sync_and_check(groups, checkpoints["policy1"], pool, TensorTransport(host_memory=True), version=4)
    finally:
        pool.stop()


@pytest.mark.gpu(2)
@pytest.mark.parametrize("load_format", list(SYNCS))
def test_separate_gpus_sync_through_nccl(groups, checkpoints, separate_server, load_format):
    policy, version = SYNCS[load_format]
    transport = BroadcastTransport(separate_server.urls, load_format=load_format, backend="nccl")
    sync_and_check(groups, checkpoints[policy], separate_server, transport, version)
