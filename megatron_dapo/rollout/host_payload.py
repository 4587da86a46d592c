"""The CPU engine's weight payload: a JSON header, and the bytes in a shared-memory segment of this transfer.

SGLang's /update_weights_from_tensor carries pickles (rollout/weight_payload.py), and unpickling lets the
sender name any /dev/shm object or call what the pickle names. The CPU engine therefore reads only this
format, which it parses without unpickling. Each `serialized_named_tensors` entry is the JSON text

    {"format": "megatron_dapo.host_memory.v1", "segment": "dapo-<32 hex>-<n>", "bytes": N,
     "tensors": [{"name": str, "dtype": "bfloat16", "shape": [int, ...], "offset": int}, ...]}

where `segment` is a file of N bytes in the engine's shared-memory directory (--weight-shm-dir, /dev/shm by
default) that the trainer created for this one bucket, and each tensor is shape's elements of dtype, in
native byte order, from byte `offset` (a multiple of the dtype's size). Both load formats carry this same
header; the engine checks load_format and then ignores it.

Who does what with the segment: the trainer (`SegmentWriter`) creates it (O_EXCL, mode 0600) under a random
per-writer token, writes it, posts the header to every receiver and unlinks it once all have answered, in
success or failure. The engine (`read_host_payload`) opens nothing but a name of that pattern in its own
directory, after checking that it is a regular file (never a symlink: O_NOFOLLOW) of its own user with one
link and exactly the header's size; it opens it read-only and maps it privately (copy-on-write, so that
nothing could reach the file), which it never writes, grows or unlinks. Mapping rather than reading saves a
copy (2-4x faster for 400 MB); the price is that a process of the engine's own user that truncates the
segment while it is mapped crashes the engine (SIGBUS), which that user could do by other means anyway.
A trainer killed mid-transfer leaves its one segment behind (`dapo-*`).
"""

import errno
import io
import itertools
import json
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET, ProtocolError

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_SHM_DIR = "/dev/shm"
FORMAT = "megatron_dapo.host_memory.v1"
SEGMENT_PATTERN = re.compile(r"dapo-[0-9a-f]{32}-[0-9]{1,12}")  # no "/", no "..": a name in the directory
MAX_DIMS = 8  # far above any weight's; bounds the work one header entry can ask for
# The dtypes a header may name, by the names str(torch dtype) gives them; nothing is looked up on torch.
DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32, torch.bfloat16, torch.float16, torch.float64,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    )
}  # fmt: skip
FIELD = "serialized_named_tensors"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the segment's start

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class HostPayload:
    """A checked header: entries that lie inside `nbytes`, disjoint and aligned; nothing opened yet."""

    segment: str
    nbytes: int
    tensors: tuple[TensorEntry, ...]


# ---------------------------------------------------------------- the trainer's side


class SegmentWriter:
    """Makes each bucket's segment under one random token (one writer per sender), and removes it."""

    def __init__(self, shm_dir: str = DEFAULT_SHM_DIR):
        self.shm_dir = shm_dir
        self.prefix = f"dapo-{secrets.token_hex(16)}-"
        self._count = itertools.count()

    @contextmanager
    def payload(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Iterator[str]:
        """The header of a new segment holding `named_tensors` (on any device); the segment is removed when
        the block ends, so post the header and wait for every receiver's answer inside it."""
        if not named_tensors:
            raise ValueError("a host-memory payload needs at least one tensor")
        entries, offset = [], 0
        for name, tensor in named_tensors:
            offset += -offset % tensor.element_size()  # the reader views bytes as the dtype: align
            entry = {"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
            entries.append({**entry, "offset": offset})
            offset += tensor.numel() * tensor.element_size()
        segment = f"{self.prefix}{next(self._count)}"
        path = os.path.join(self.shm_dir, segment)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        file = open(os.open(path, flags, 0o600), "wb")  # noqa: SIM115 (closed before the yield)
        try:
            with file:
                _write(file, named_tensors, entries, offset, path)
            yield json.dumps({"format": FORMAT, "segment": segment, "bytes": offset, "tensors": entries})
        finally:
            os.unlink(path)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot travel in a host-memory payload (one of {sorted(DTYPES)})")
    return name


def _write(
    file: io.BufferedWriter,
    named_tensors: Sequence[tuple[str, torch.Tensor]],
    entries: list[dict],
    nbytes: int,
    path: str,
) -> None:
    try:
        file.truncate(nbytes)  # the alignment gaps read as zeros
        for (_, tensor), entry in zip(named_tensors, entries, strict=True):
            file.seek(entry["offset"])
            _write_tensor(file, tensor)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"{path}: no room for a {nbytes / 2**20:.0f} MiB weight bucket in {os.path.dirname(path)};"
                " enlarge it (Docker: --shm-size) or lower rollout.weight_sync_bucket_mb",
            ) from error
        raise


def _write_tensor(file: io.BufferedWriter, tensor: torch.Tensor) -> None:
    # One tensor at a time on the host: a GPU bucket never has a second whole copy.
    file.write(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().data)


# ---------------------------------------------------------------- the engine's side


def parse_host_payload(text: str, load_format: str | None) -> HostPayload:
    """Check a header without touching any file: its fields, and that every tensor lies in the segment."""
    if load_format not in (None, FLATTENED_BUCKET):
        raise ProtocolError(
            "load_format", f"unknown load format {load_format!r}; use None or {FLATTENED_BUCKET!r}"
        )
    if not text.lstrip().startswith("{"):
        raise ProtocolError(
            FIELD,
            "not a host-memory payload (a JSON header): the CPU engine never unpickles; send the header of "
            "megatron_dapo.rollout.host_payload.SegmentWriter",
        )
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(FIELD, f"the header is not JSON: {error}") from error
    _check_keys(header, {"format", "segment", "bytes", "tensors"}, FIELD)
    if header["format"] != FORMAT:
        raise ProtocolError(f"{FIELD}.format", f"{header['format']!r}: this engine reads {FORMAT!r}")
    segment = header["segment"]
    if not isinstance(segment, str) or not SEGMENT_PATTERN.fullmatch(segment):
        raise ProtocolError(f"{FIELD}.segment", f"{segment!r} is not a segment name (dapo-<32 hex>-<n>)")
    nbytes = _natural(header["bytes"], f"{FIELD}.bytes")
    tensors = header["tensors"]
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError(f"{FIELD}.tensors", "must be a non-empty list")
    entries = tuple(_entry(raw, f"{FIELD}.tensors[{index}]", nbytes) for index, raw in enumerate(tensors))
    _check_disjoint(entries)
    return HostPayload(segment, nbytes, entries)


def _entry(raw: object, where: str, nbytes: int) -> TensorEntry:
    _check_keys(raw, {"name", "dtype", "shape", "offset"}, where)
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name", "must be a non-empty string")
    where = f"{where} ({name})"
    if raw["dtype"] not in DTYPES:
        raise ProtocolError(where, f"dtype {raw['dtype']!r} is not one of {sorted(DTYPES)}")
    shape = raw["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(where, f"shape must be a list of at most {MAX_DIMS} sizes, got {shape!r}")
    entry = TensorEntry(
        name, DTYPES[raw["dtype"]], tuple(_natural(size, f"{where} shape") for size in shape),
        _natural(raw["offset"], f"{where} offset"),
    )  # fmt: skip
    if entry.offset % entry.dtype.itemsize:
        raise ProtocolError(where, f"offset {entry.offset} is not a multiple of {entry.dtype.itemsize}")
    if entry.offset + entry.nbytes > nbytes:
        raise ProtocolError(
            where, f"bytes {entry.offset}..{entry.offset + entry.nbytes} lie outside the segment's {nbytes}"
        )
    return entry


def _check_keys(value: object, keys: set[str], where: str) -> None:
    if not isinstance(value, dict) or set(value) != keys:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ProtocolError(where, f"must be an object with exactly the keys {sorted(keys)}, got {got}")


def _natural(value: object, where: str) -> int:
    if type(value) is not int or value < 0:  # bool is an int: refused as well
        raise ProtocolError(where, f"must be a non-negative integer, got {value!r}")
    return value


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def _check_disjoint(entries: tuple[TensorEntry, ...]) -> None:
    names: set[str] = set()
    for entry in entries:
        if entry.name in names:
            raise ProtocolError(f"{FIELD} ({entry.name})", "named twice in one payload")
        names.add(entry.name)
    end, previous = 0, None
    for entry in sorted((entry for entry in entries if entry.nbytes), key=lambda entry: entry.offset):
        if entry.offset < end:
            raise ProtocolError(f"{FIELD} ({entry.name})", f"overlaps {previous} in the segment")
        end, previous = entry.offset + entry.nbytes, entry.name


def read_host_payload(
    payload: HostPayload, shm_dir: str = DEFAULT_SHM_DIR, owner: int | None = None
) -> NamedTensors:
    """The tensors of a checked header: views of its segment in `shm_dir`, mapped copy-on-write (see the
    module docstring); the mapping goes when the last of them does.

    `owner`: the uid the segment must belong to, this process's by default (the trainer runs as the engine).
    """
    path = os.path.join(shm_dir, payload.segment)
    where = f"{FIELD}.segment {payload.segment}"
    try:
        before = os.lstat(path)
    except FileNotFoundError as error:
        raise ProtocolError(where, f"no such segment in {shm_dir}") from error
    _check_segment(before, payload.nbytes, os.geteuid() if owner is None else owner, where)
    # O_NONBLOCK: should the name become a FIFO after the check, opening it must not hang the model thread.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise ProtocolError(where, "was replaced while being opened")
        _check_segment(opened, payload.nbytes, before.st_uid, where)
        flat = torch.empty(0, dtype=torch.uint8)  # mmap refuses an empty file
        if payload.nbytes:
            flat = torch.frombuffer(mmap.mmap(fd, payload.nbytes, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    finally:
        os.close(fd)
    return [
        (entry.name, flat[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape))
        for entry in payload.tensors
    ]


def _check_segment(status: os.stat_result, nbytes: int, owner: int, where: str) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise ProtocolError(where, "is not a regular file (a symlink, FIFO, socket or device)")
    if status.st_uid != owner:
        raise ProtocolError(where, f"belongs to uid {status.st_uid}, not to the engine's user ({owner})")
    if status.st_nlink != 1:
        raise ProtocolError(where, f"has {status.st_nlink} links; a trainer's segment has one")
    if status.st_size != nbytes:
        raise ProtocolError(where, f"holds {status.st_size} bytes, the header says {nbytes}")
