"""Weight payloads of /update_weights_from_tensor: both load formats, SGLang-built buckets, refused pickles;
and the byte layout of a flattened bucket broadcast to /update_weights_from_distributed.

Cross-process loading (the real use) is covered by tests/e2e/test_cpu_engine.py; these run in one process.
CUDA payloads (GPU UUIDs) are covered by tests/gpu/test_weight_sync_gpu.py.
"""

import base64
import contextlib
import dataclasses
import io
import os
import pickle
import sys
import types
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET, ProtocolError
from megatron_dapo.rollout.weight_payload import (
    concat_bytes,
    concat_bytes_size,
    deserialize_named_tensors,
    serialize_flattened_bucket,
    serialize_named_tensors,
    split_bytes,
)


@contextlib.contextmanager
def sharing_strategy(strategy: str):
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(strategy)
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def _named_tensors(generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    return [
        ("model.embed_tokens.weight", torch.randn(7, 4, generator=generator)),
        ("model.norm.weight", torch.randn(5, generator=generator).to(torch.bfloat16)),  # 10 bytes: misaligns
        ("model.layers.0.mlp.counts", torch.randint(0, 100, (2, 3), generator=generator)),
        ("model.layers.0.self_attn.o_proj.weight", torch.randn(3, 2, generator=generator).to(torch.float16)),
        ("empty", torch.zeros(0, 4)),
    ]


def _assert_same(loaded, expected):
    assert [name for name, _ in loaded] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(loaded, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_per_tensor_payload_round_trips():
    named = _named_tensors(torch.Generator().manual_seed(0))
    named.append(("strided_view", torch.arange(12.0).reshape(3, 4)[:, 1:3]))
    _assert_same(deserialize_named_tensors(serialize_named_tensors(named), None), named)


def test_flattened_bucket_round_trips_mixed_and_single_dtypes():
    named = _named_tensors(torch.Generator().manual_seed(1))
    _assert_same(deserialize_named_tensors(serialize_flattened_bucket(named), FLATTENED_BUCKET), named)
    single = [(name, tensor.float()) for name, tensor in named]
    _assert_same(deserialize_named_tensors(serialize_flattened_bucket(single), FLATTENED_BUCKET), single)


def _unpickled(payload: str):
    return pickle.loads(base64.b64decode(payload))


def test_flattened_bucket_layout_is_sglangs():
    """One dtype: flat in that dtype with element offsets (any SGLang); mixed: uint8 with byte offsets."""
    a, b = torch.randn(2, 3), torch.randn(4)
    bucket = _unpickled(serialize_flattened_bucket([("a", a), ("b", b)]))
    assert set(bucket) == {"flattened_tensor", "metadata"}
    assert bucket["flattened_tensor"].dtype == torch.float32 and bucket["flattened_tensor"].numel() == 10
    first, second = bucket["metadata"]
    assert isinstance(first, types.SimpleNamespace)  # SGLang's SafeUnpickler allows the `types` module
    assert vars(first) == {
        "name": "a", "shape": torch.Size([2, 3]), "dtype": torch.float32,
        "start_idx": 0, "end_idx": 6, "numel": 6,
    }  # fmt: skip
    assert (second.start_idx, second.end_idx) == (6, 10)
    mixed = _unpickled(serialize_flattened_bucket([("h", torch.ones(3, dtype=torch.float16)), ("a", a)]))
    assert mixed["flattened_tensor"].dtype == torch.uint8
    half, full = mixed["metadata"]
    assert (half.start_idx, half.end_idx) == (0, 6)
    assert full.start_idx % 4 == 0 and full.end_idx - full.start_idx == 24  # aligned for view(float32)


def test_bucket_built_by_sglang_is_read(monkeypatch):
    """A payload pickled with SGLang's own FlattenedTensorMetadata class loads where SGLang is absent."""

    @dataclasses.dataclass
    class FlattenedTensorMetadata:
        name: str
        shape: torch.Size
        dtype: torch.dtype
        start_idx: int
        end_idx: int
        numel: int

    # Stand-in modules so that pickling records the class under SGLang's module path.
    module_path = "sglang.srt.weight_sync.tensor_bucket"
    FlattenedTensorMetadata.__module__ = module_path
    FlattenedTensorMetadata.__qualname__ = "FlattenedTensorMetadata"
    parts = module_path.split(".")
    for depth in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    sys.modules[module_path].FlattenedTensorMetadata = FlattenedTensorMetadata
    tensor = torch.randn(2, 2)
    buffer = io.BytesIO()
    with sharing_strategy("file_system"):
        flat = tensor.reshape(-1).clone().share_memory_()
        ForkingPickler(buffer).dump(
            {
                "flattened_tensor": flat,
                "metadata": [FlattenedTensorMetadata("w", tensor.shape, tensor.dtype, 0, 4, 4)],
            }
        )
    monkeypatch.undo()  # the receiver has no SGLang
    payload = base64.b64encode(buffer.getvalue()).decode()
    _assert_same(deserialize_named_tensors(payload, FLATTENED_BUCKET), [("w", tensor)])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_foreign_pickles_are_refused():
    for obj in (
        _Exploit(),
        # A plain pickle rebuilds tensors through torch.load, which can run arbitrary code: refused as well.
        [("w", torch.ones(2))],
    ):
        with pytest.raises(ProtocolError, match="refusing to unpickle"):
            deserialize_named_tensors(base64.b64encode(pickle.dumps(obj)).decode(), None)


def test_malformed_payloads_are_reported():
    with pytest.raises(ProtocolError, match="cannot decode"):
        deserialize_named_tensors("not base64!", None)
    # A payload is single-use: loading it releases its shared memory, so each case gets a fresh one.
    with pytest.raises(ProtocolError, match="flattened bucket is a dict"):
        deserialize_named_tensors(serialize_named_tensors([("w", torch.ones(2))]), FLATTENED_BUCKET)
    with pytest.raises(ProtocolError, match="load_format"):
        deserialize_named_tensors(serialize_named_tensors([("w", torch.ones(2))]), "direct")
    with pytest.raises(ProtocolError, match="list of \\(name, tensor\\)"):
        deserialize_named_tensors(serialize_flattened_bucket([("w", torch.ones(2))]), None)


def test_file_descriptor_sharing_is_explained():
    """Tensors pickled under the default strategy reach only child processes: the error says what to do."""
    buffer = io.BytesIO()
    with sharing_strategy("file_descriptor"):
        ForkingPickler(buffer).dump([("w", torch.ones(3))])
    with pytest.raises(ProtocolError, match="file descriptor"):
        deserialize_named_tensors(base64.b64encode(buffer.getvalue()).decode(), None)


def test_shared_memory_is_freed_once_loaded_tensors_are_dropped():
    prefix = f"torch_{os.getpid()}_"
    before = {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    loaded = deserialize_named_tensors(
        serialize_flattened_bucket([("w", torch.randn(1000))]), FLATTENED_BUCKET
    )
    assert {name for name in os.listdir("/dev/shm") if name.startswith(prefix)} - before
    del loaded
    assert {name for name in os.listdir("/dev/shm") if name.startswith(prefix)} == before
    # The caller's own tensors never move into shared memory.
    weight = torch.randn(10)
    serialize_named_tensors([("w", weight)])
    assert not weight.is_shared()


def test_broadcast_bytes_round_trip_unaligned_mixed_dtypes():
    named = _named_tensors(torch.Generator().manual_seed(2))
    flat = concat_bytes([tensor for _, tensor in named])
    shapes, dtypes = [list(t.shape) for _, t in named], [t.dtype for _, t in named]
    assert flat.dtype == torch.uint8 and flat.numel() == concat_bytes_size(shapes, dtypes)
    expected = sum(t.numel() * t.element_size() for _, t in named)
    assert flat.numel() == expected  # unpadded, as SGLang's receivers slice it
    _assert_same(list(zip([n for n, _ in named], split_bytes(flat, shapes, dtypes), strict=True)), named)


@pytest.mark.parametrize("serialize", [serialize_named_tensors, serialize_flattened_bucket])
def test_a_payload_loads_once_per_receiver_it_was_made_for(serialize):
    """Several servers (or TP ranks) load one CPU payload: each load releases one of the sender's holds."""
    prefix = f"torch_{os.getpid()}_"
    before = {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    load_format = FLATTENED_BUCKET if serialize is serialize_flattened_bucket else None
    named = [("w", torch.randn(50))]
    payload = serialize(named, receivers=2)
    for _ in range(2):  # one receiver after the other, the first done before the second opens the files
        _assert_same(deserialize_named_tensors(payload, load_format), named)
    assert {name for name in os.listdir("/dev/shm") if name.startswith(prefix)} == before
    with pytest.raises(ProtocolError, match="cannot decode"):  # a third receiver was not provided for
        deserialize_named_tensors(payload, load_format)
    with pytest.raises(ValueError, match="receivers"):
        serialize(named, receivers=0)
