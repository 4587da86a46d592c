"""SGLang's weight payloads as the trainer makes them: the layout of a flattened bucket, CUDA tensors only;
and the byte layout of a flattened bucket broadcast to /update_weights_from_distributed.

Round trips of CUDA payloads (GPU UUIDs) are covered by tests/gpu/test_weight_sync_gpu.py; the CPU engine's
host-memory payload by test_rollout_host_payload.py.
"""

import types

import pytest
import torch

from megatron_dapo.rollout.weight_payload import (
    concat_bytes,
    concat_bytes_size,
    flattened_bucket,
    serialize_flattened_bucket,
    serialize_named_tensors,
    split_bytes,
)
from tests.helpers.payloads import mixed_named_tensors


def _assert_same(loaded, expected):
    assert [name for name, _ in loaded] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(loaded, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_flattened_bucket_layout_is_sglangs():
    """One dtype: flat in that dtype with element offsets (any SGLang); mixed: uint8 with byte offsets."""
    a, b = torch.randn(2, 3), torch.randn(4)
    bucket = flattened_bucket([("a", a), ("b", b)])
    assert set(bucket) == {"flattened_tensor", "metadata"}
    assert bucket["flattened_tensor"].dtype == torch.float32 and bucket["flattened_tensor"].numel() == 10
    first, second = bucket["metadata"]
    assert isinstance(first, types.SimpleNamespace)  # SGLang's SafeUnpickler allows the `types` module
    assert vars(first) == {
        "name": "a", "shape": torch.Size([2, 3]), "dtype": torch.float32,
        "start_idx": 0, "end_idx": 6, "numel": 6,
    }  # fmt: skip
    assert (second.start_idx, second.end_idx) == (6, 10)
    mixed = flattened_bucket([("h", torch.ones(3, dtype=torch.float16)), ("a", a)])
    assert mixed["flattened_tensor"].dtype == torch.uint8
    half, full = mixed["metadata"]
    assert (half.start_idx, half.end_idx) == (0, 6)
    assert full.start_idx % 4 == 0 and full.end_idx - full.start_idx == 24  # aligned for view(float32)
    flat = mixed["flattened_tensor"]
    assert torch.equal(flat[full.start_idx : full.end_idx].view(torch.float32).reshape(full.shape), a)
    assert torch.equal(bucket["flattened_tensor"][6:10], b)


def test_sglang_payloads_refuse_host_memory():
    """CPU tensors would travel as /dev/shm names that the receiver opens: they go as host-memory payloads."""
    for serialize in (serialize_named_tensors, serialize_flattened_bucket):
        with pytest.raises(ValueError, match="host_payload"):
            serialize([("w", torch.randn(3))])


def test_broadcast_bytes_round_trip_unaligned_mixed_dtypes():
    named = mixed_named_tensors(torch.Generator().manual_seed(2))
    flat = concat_bytes([tensor for _, tensor in named])
    shapes, dtypes = [list(t.shape) for _, t in named], [t.dtype for _, t in named]
    assert flat.dtype == torch.uint8 and flat.numel() == concat_bytes_size(shapes, dtypes)
    expected = sum(t.numel() * t.element_size() for _, t in named)
    assert flat.numel() == expected  # unpadded, as SGLang's receivers slice it
    _assert_same(list(zip([n for n, _ in named], split_bytes(flat, shapes, dtypes), strict=True)), named)
