"""/update_weights_from_tensor of the CPU engine against every payload a hostile local client can craft.

The engine's real HTTP handler runs in this process (aiohttp's TestServer) with a temporary directory as its
shared-memory directory. Each request must answer 400, apply nothing, and leave every file it names, in that
directory and in /dev/shm, where it was with the same bytes. Then the trainer's own payload still loads.
"""

import asyncio
import base64
import io
import json
import os
import pickle
import secrets
import stat
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp.test_utils import TestServer

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.scheduler import Scheduler
from megatron_dapo.rollout.cpu_engine.server import EngineServer, ServerSettings
from megatron_dapo.rollout.host_payload import SegmentWriter
from tests.helpers.tiny_models import save_tiny_qwen2

NORM = "model.norm.weight"  # [32] float32 in the tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


class TensorOf128:
    """torch.Tensor(128): an allowed global of the old unpickler, called, returns uninitialised memory."""

    def __reduce__(self):
        return (torch.Tensor, (128,))


def pickle_naming_shm_file() -> tuple[str, str]:
    """(name, payload): a real CPU-tensor payload of torch's file_system sharing, whose
    rebuild_storage_filename handle is swapped for `name`, a file that the caller creates in /dev/shm."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        tensor = torch.empty(32, dtype=torch.float32).share_memory_()
        handle = tensor.untyped_storage()._share_filename_cpu_()[1]
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump([(NORM, tensor)])
        tensor.untyped_storage()._shared_decref()  # the hold pickling took for a receiver: there is none
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    name = ("/dapo-victim-" + secrets.token_hex(32))[: len(handle)]  # same length: the pickle stays valid
    raw = buffer.getvalue()
    assert raw.count(handle) == 1
    return name[1:], base64.b64encode(raw.replace(handle, name.encode())).decode()


def header(segment: str, nbytes: int, *tensors: dict) -> str:
    body = {"format": "megatron_dapo.host_memory.v1", "segment": segment, "bytes": nbytes}
    return json.dumps({**body, "tensors": list(tensors)})


def norm_entry(**changes) -> dict:
    return {"name": NORM, "dtype": "float32", "shape": [32], "offset": 0, **changes}


class Files:
    """Files a request may name, with the bytes each must still hold afterwards."""

    def __init__(self) -> None:
        self.expected: dict[Path, bytes] = {}

    def add(self, path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        self.expected[path] = data
        return path

    def check(self, case: str) -> None:
        for path, data in self.expected.items():
            assert path.is_file() and path.read_bytes() == data, f"{case}: {path} changed or vanished"


def hostile_payloads(shm: Path, files: Files) -> dict[str, tuple[str, str | None]]:
    """case -> (serialized payload, load_format), with the files they name created in `shm` (and /dev/shm)."""
    victim = files.add(shm / "victim", os.urandom(128))
    token = secrets.token_hex(16)
    good = files.add(shm / f"dapo-{token}-0", torch.randn(32).numpy().tobytes())  # a well-formed segment
    (shm / f"dapo-{token}-1").symlink_to(victim)
    os.link(victim, shm / f"dapo-{token}-2")
    os.mkfifo(shm / f"dapo-{token}-3")  # opening it to read would block until a writer comes
    os.mknod(shm / f"dapo-{token}-6", stat.S_IFSOCK | 0o600)  # a Unix socket's node
    (shm / f"dapo-{token}-7").mkdir()
    files.add(shm / f"dapo-{token}-4", torch.randn(32).half().numpy().tobytes() * 2)
    nan = torch.randn(32)
    nan[7] = float("nan")
    files.add(shm / f"dapo-{token}-5", nan.numpy().tobytes())
    shm_name, storage_pickle = pickle_naming_shm_file()
    files.add(shm / shm_name, os.urandom(128))
    files.add(Path("/dev/shm") / shm_name, os.urandom(128))
    return {
        "pickled rebuild_storage_filename": (storage_pickle, None),
        "pickled torch.Tensor(128)": (base64.b64encode(pickle.dumps([(NORM, TensorOf128())])).decode(), None),
        "pickled, flattened": (
            base64.b64encode(pickle.dumps({"flattened_tensor": 1})).decode(),
            "flattened_bucket",
        ),
        "a file outside the prefix": (header("victim", 128, norm_entry()), None),
        "a path up": (header(f"../{shm.name}/victim", 128, norm_entry()), None),
        "an absolute path": (header(str(victim), 128, norm_entry()), None),
        "the /dev/shm file by name": (header(shm_name, 128, norm_entry()), None),
        "a symlink": (header(f"dapo-{token}-1", 128, norm_entry()), None),
        "a hard link": (header(f"dapo-{token}-2", 128, norm_entry()), None),
        "a FIFO": (header(f"dapo-{token}-3", 128, norm_entry()), None),
        "a Unix socket": (header(f"dapo-{token}-6", 128, norm_entry()), None),
        "a directory": (header(f"dapo-{token}-7", 128, norm_entry()), None),
        "no such segment": (header(f"dapo-{token}-99", 128, norm_entry()), None),
        "size mismatch": (header(good.name, 64, norm_entry(shape=[16])), None),
        "past the end": (header(good.name, 128, norm_entry(offset=4)), None),
        "overlap": (
            header(good.name, 128, norm_entry(shape=[16]), norm_entry(name="x", offset=32, shape=[16])),
            None,
        ),
        "negative shape": (header(good.name, 128, norm_entry(shape=[-32])), None),
        "huge shape": (header(good.name, 128, norm_entry(shape=[2**40, 2**40])), None),
        "wrong shape for the model": (header(good.name, 128, norm_entry(shape=[4, 8])), None),
        "another dtype": (header(f"dapo-{token}-4", 128, norm_entry(dtype="float16")), None),
        "non-finite": (header(f"dapo-{token}-5", 128, norm_entry()), None),
        "a partial update": (
            header(
                good.name,
                128,
                norm_entry(shape=[16]),
                norm_entry(name="lm_head.weight", offset=64, shape=[16]),
            ),
            None,
        ),
    }


def make_engine(model_dir: Path, shm: Path) -> EngineServer:
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    scheduler = Scheduler(runner, eos_token_ids=frozenset(), max_running_requests=8, seed=0)
    settings = ServerSettings(weight_shm_dir=str(shm))
    return EngineServer(runner, scheduler, None, str(model_dir), None, "0", settings)


async def post(session: aiohttp.ClientSession, url: str, payload: str, load_format) -> tuple[int, dict]:
    body = protocol.update_weights_from_tensor_body([payload], load_format, True, 1)
    async with session.post(url + protocol.UPDATE_WEIGHTS_FROM_TENSOR, json=body) as response:
        return response.status, await response.json()


def test_hostile_payloads_are_refused_and_touch_nothing(model_dir, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    files = Files()
    payloads = hostile_payloads(shm, files)
    engine = make_engine(model_dir, shm)
    before = {name: tensor.clone() for name, tensor in engine.runner.model.state_dict().items()}

    async def scenario():
        async with TestServer(engine.app()) as server, aiohttp.ClientSession() as session:
            url = str(server.make_url("")).rstrip("/")
            for case, (payload, load_format) in payloads.items():
                status, answer = await asyncio.wait_for(post(session, url, payload, load_format), 30)
                assert status == 400 and answer["success"] is False, (case, answer)
                if case in ("another dtype", "non-finite", "wrong shape for the model"):
                    assert NORM in answer["message"], (case, answer)
                files.check(case)
            state = engine.runner.model.state_dict()
            assert all(torch.equal(state[name], tensor) for name, tensor in before.items())  # nothing applied
            assert engine.weight_version == "0"
            # The trainer's own payload loads, and reads exactly its weights.
            named = [(name, torch.randn_like(tensor)) for name, tensor in before.items()]
            with SegmentWriter(str(shm)).payload(named) as good:
                status, answer = await post(session, url, good, None)
            assert status == 200 and answer["success"] is True, answer
            return named

    try:
        named = asyncio.run(scenario())
        files.check("after all")
    finally:
        for path in files.expected:
            if path.parent == Path("/dev/shm"):
                path.unlink()
    state = engine.runner.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in named)
    assert engine.weight_version == "1"
