"""The CPU engine's host-memory payload (rollout/host_payload.py), trainer and engine side, in one process.

Every segment lives in a temporary directory that plays /dev/shm. The attacks over HTTP, against the engine
itself, are in test_cpu_engine_weight_attacks.py.
"""

import json
import os
import stat

import pytest
import torch

from megatron_dapo.rollout.host_payload import (
    SEGMENT_PATTERN,
    SegmentWriter,
    parse_host_payload,
    read_host_payload,
)
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET, ProtocolError
from tests.helpers.payloads import mixed_named_tensors


def _assert_same(loaded, expected) -> None:
    assert [name for name, _ in loaded] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(loaded, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def _read(header: str, shm_dir, load_format=None, owner=None):
    return read_host_payload(parse_host_payload(header, load_format), str(shm_dir), owner)


@pytest.mark.parametrize("load_format", [None, FLATTENED_BUCKET])
def test_round_trip_then_the_segment_is_gone(tmp_path, load_format):
    named = mixed_named_tensors(torch.Generator().manual_seed(0), views=True)
    writer = SegmentWriter(str(tmp_path))
    with writer.payload(named) as header:
        [segment] = os.listdir(tmp_path)
        assert SEGMENT_PATTERN.fullmatch(segment) and segment.startswith(writer.prefix)
        assert stat.S_IMODE(os.stat(tmp_path / segment).st_mode) == 0o600  # other users cannot read it
        for _ in range(3):  # every server and TP rank reads the same segment; reading removes nothing
            _assert_same(_read(header, tmp_path, load_format), named)
    assert os.listdir(tmp_path) == []  # the writer removed it
    assert SegmentWriter(str(tmp_path)).prefix != writer.prefix  # a random token per writer


def test_the_segment_is_removed_when_the_block_fails(tmp_path):
    writer = SegmentWriter(str(tmp_path))
    with pytest.raises(RuntimeError, match="engine refused"), writer.payload([("w", torch.randn(10))]):
        raise RuntimeError("engine refused")
    assert os.listdir(tmp_path) == []


def test_a_full_shm_directory_is_explained(tmp_path, monkeypatch):
    def no_room(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("megatron_dapo.rollout.host_payload._write_tensor", no_room)
    writer = SegmentWriter(str(tmp_path))
    with pytest.raises(OSError, match="--shm-size"), writer.payload([("w", torch.randn(10))]):
        pass
    assert os.listdir(tmp_path) == []


def _header(segment: str, nbytes: int, tensors: list) -> str:
    return json.dumps(
        {"format": "megatron_dapo.host_memory.v1", "segment": segment, "bytes": nbytes, "tensors": tensors}
    )


SEGMENT = "dapo-" + "ab" * 16 + "-0"
GOOD = {"name": "w", "dtype": "float32", "shape": [4], "offset": 0}
MALFORMED = {
    "pickle": ("gASVAAAAAAAAAACMBXRvcmNolIwGVGVuc29ylJOUS4CFlFKULg==", "never unpickles"),
    "not JSON": ("{not json", "not JSON"),
    "deep JSON": ("{" + '"a":[' * 100_000, "not JSON"),
    "wrong format": (
        json.dumps({"format": "x", "segment": SEGMENT, "bytes": 16, "tensors": [GOOD]}),
        "format",
    ),
    "extra key": (json.dumps({"format": 1, "segment": 1, "bytes": 1, "tensors": 1, "dir": "/"}), "keys"),
    "absolute name": (_header("/dev/shm/" + SEGMENT, 16, [GOOD]), "segment"),
    "dotted name": (_header("../" + SEGMENT, 16, [GOOD]), "segment"),
    "other name": (_header("torch_123_456_0", 16, [GOOD]), "segment"),
    "no tensors": (_header(SEGMENT, 16, []), "non-empty"),
    "negative size": (_header(SEGMENT, 16, [{**GOOD, "shape": [-4]}]), "non-negative"),
    "bool size": (_header(SEGMENT, 16, [{**GOOD, "shape": [True]}]), "non-negative"),
    "float offset": (_header(SEGMENT, 16, [{**GOOD, "offset": 0.0}]), "non-negative"),
    "huge shape": (_header(SEGMENT, 16, [{**GOOD, "shape": [2**62, 2**62]}]), "outside"),
    "past the end": (_header(SEGMENT, 16, [{**GOOD, "offset": 4}]), "outside"),
    "negative offset": (_header(SEGMENT, 16, [{**GOOD, "offset": -4}]), "non-negative"),
    "unaligned": (_header(SEGMENT, 32, [{**GOOD, "offset": 2}]), "multiple of 4"),
    "overlap": (_header(SEGMENT, 32, [GOOD, {**GOOD, "name": "v", "offset": 12}]), "overlaps w"),
    "twice": (_header(SEGMENT, 32, [GOOD, {**GOOD, "offset": 16}]), "named twice"),
    "dtype": (_header(SEGMENT, 16, [{**GOOD, "dtype": "Tensor"}]), "dtype 'Tensor'"),
    "many dims": (_header(SEGMENT, 16, [{**GOOD, "shape": [1] * 9}]), "at most 8"),
    "shape type": (_header(SEGMENT, 16, [{**GOOD, "shape": "4"}]), "shape"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_are_refused_before_any_file_is_touched(case):
    text, message = MALFORMED[case]
    with pytest.raises(ProtocolError, match=message):
        parse_host_payload(text, None)


def test_unknown_load_format_is_refused():
    with pytest.raises(ProtocolError, match="load_format"):
        parse_host_payload(_header(SEGMENT, 16, [GOOD]), "direct")


def test_segments_are_checked_before_they_are_opened(tmp_path):
    data = os.urandom(16)
    victim = tmp_path / "victim"
    victim.write_bytes(data)
    segment = tmp_path / SEGMENT
    header = _header(SEGMENT, 16, [GOOD])
    with pytest.raises(ProtocolError, match="no such segment"):
        _read(header, tmp_path)
    segment.symlink_to(victim)
    with pytest.raises(ProtocolError, match="not a regular file"):
        _read(header, tmp_path)
    segment.unlink()
    os.link(victim, segment)
    with pytest.raises(ProtocolError, match="2 links"):
        _read(header, tmp_path)
    segment.unlink()
    os.mkfifo(segment)
    with pytest.raises(ProtocolError, match="not a regular file"):
        _read(header, tmp_path)
    segment.unlink()
    segment.write_bytes(data + b"x")
    with pytest.raises(ProtocolError, match="holds 17 bytes, the header says 16"):
        _read(header, tmp_path)
    segment.write_bytes(data)
    with pytest.raises(ProtocolError, match="belongs to uid"):
        _read(header, tmp_path, owner=os.geteuid() + 1)
    [(_, tensor)] = _read(header, tmp_path)
    assert tensor.numpy().tobytes() == data
    tensor.add_(1.0)  # the mapping is copy-on-write: nothing reaches the file
    assert victim.read_bytes() == data and segment.read_bytes() == data  # read, never changed or removed
