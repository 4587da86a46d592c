"""How Hugging Face-named tensors travel to SGLang's weight-update endpoints, sender and receiver side.

/update_weights_from_tensor carries serialized tensors, in both of its load formats (below);
/init_weights_update_group + /update_weights_from_distributed carry them over a process group of the trainer
and the servers (`init_weight_update_group`, and the byte layout of a flattened bucket in one broadcast).

A payload is what SGLang's MultiprocessingSerializer makes: the base64 text of a `ForkingPickler` pickle, in
which torch's multiprocessing reductions replace every tensor by a handle to shared memory (a CUDA IPC handle
for GPU tensors, a /dev/shm file name for CPU tensors) rather than by its bytes. Receiver and sender must
therefore share a machine, and a sender of CUDA tensors must keep them alive until the receiver has answered.

- load_format None: the pickled object is a list of (name, tensor).
- load_format "flattened_bucket" (SGLang's FlattenedTensorBucket): a dict {"flattened_tensor", "metadata"};
  the metadata objects carry name, shape, dtype, start_idx, end_idx, numel. A one-dtype bucket is flattened
  in its own dtype with element offsets, which every SGLang version rebuilds; a mixed-dtype bucket is
  flattened to uint8 with byte offsets, which needs an SGLang whose FlattenedTensorBucket has
  `supports_multi_dtypes`. Metadata are `types.SimpleNamespace`: SGLang reads only their attributes and its
  SafeUnpickler allows `types`, so the payload needs no SGLang class on the sending side.

CUDA tensors name their GPU by its UUID where torch writes the device index, as SGLang's senders do once
`monkey_patch_torch_reductions` has run: the receiving process looks the UUID up among its own devices, since
a device index depends on the CUDA_VISIBLE_DEVICES of each process, which the trainer and the server need not
share. SGLang's receivers read a UUID or an index; a plain torch receiver reads only an index, and is never
the intended reader of these payloads.

CPU tensors travel through /dev/shm files ("file_system" sharing): the default "file_descriptor" sharing only
works between a process and its children, never between the trainer and an engine server. Each CPU tensor is
copied once into shared memory, so /dev/shm must hold one bucket (Docker's default of 64 MB does not hold a
large one: raise it with --shm-size). The payload holds one reference to its files per receiver, each released
as that receiver loads it (so a payload for several servers or TP ranks says how many, `receivers`); the files
go once every receiver has loaded and dropped them. References never loaded keep the files until the sending
process exits. CUDA handles need no such count: torch counts the processes that open them.

Security: unpickling runs code named in the payload. The receiver here resolves only the few torch rebuild
functions a tensor payload needs and refuses everything else, but it still maps shared-memory files named by
the sender: the endpoint that accepts payloads must only ever be reachable by the trainer (127.0.0.1).
"""

import base64
import io
import pickle
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.multiprocessing import reductions

from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET, ProtocolError

NamedTensors = list[tuple[str, torch.Tensor]]
_CUDA_DEVICE_ARG = 6  # position of the device in the arguments of torch's rebuild_cuda_tensor

# Everything a tensor payload of either format names, and nothing that can run other code.
_ALLOWED_GLOBALS = {
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch.nn.parameter", "Parameter"),
    ("types", "SimpleNamespace"),
}
# SGLang's own metadata class (a payload built by SGLang's FlattenedTensorBucket): read as a namespace.
_SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")


class _TensorPayloadUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == _SGLANG_METADATA:
            return types.SimpleNamespace
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name == "rebuild_storage_fd":
            raise ProtocolError(
                "serialized_named_tensors",
                "CPU tensors were shared by file descriptor, which works only between a process and its"
                " children; serialize with megatron_dapo.rollout.weight_payload (shares /dev/shm files)",
            )
        if name == "rebuild_cuda_tensor":
            raise ProtocolError("serialized_named_tensors", "CUDA tensors cannot be loaded by the CPU engine")
        raise ProtocolError("serialized_named_tensors", f"refusing to unpickle {module}.{name}")


@contextmanager
def _file_system_sharing() -> Iterator[None]:
    """torch's sharing strategy is process-global: switch it only while pickling, then restore it."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def _shareable(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the receiver can map: CUDA tensors as they are, CPU tensors copied into /dev/shm.

    The copy keeps the caller's own storage (a model parameter, say) out of shared memory.
    """
    tensor = tensor.detach()
    if tensor.is_cuda:
        return tensor
    shared = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
    return shared.copy_(tensor)


def _reduce_tensor_naming_gpu_by_uuid(tensor: torch.Tensor):
    """torch's own reduction of a tensor, with a CUDA tensor's device index replaced by its GPU's UUID."""
    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor:
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1 :])
    return rebuild, args


def _dumps(obj: object, shared: Sequence[torch.Tensor], receivers: int) -> str:
    """The payload of `obj`, whose tensors `shared` are in shared memory, for `receivers` processes."""
    if receivers < 1:
        raise ValueError(f"receivers must be >= 1 (the processes that load the payload), got {receivers}")
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    # This pickler's own dispatch table: nothing else this process pickles sees the UUIDs.
    for tensor_type in (torch.Tensor, torch.nn.Parameter):
        pickler.dispatch_table[tensor_type] = _reduce_tensor_naming_gpu_by_uuid
    pickler.dump(obj)
    # Pickling took one hold on each CPU storage and every load releases one: one hold per receiver, as
    # pickling the payload once per receiver would take.
    for tensor in shared:
        if not tensor.is_cuda:
            for _ in range(receivers - 1):
                tensor.untyped_storage()._shared_incref()
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]], *, receivers: int = 1) -> str:
    """Payload of load_format None: one handle per tensor; `receivers` processes may each load it once."""
    with _file_system_sharing():
        named = [(name, _shareable(tensor)) for name, tensor in named_tensors]
        return _dumps(named, [tensor for _, tensor in named], receivers)


def serialize_flattened_bucket(
    named_tensors: Sequence[tuple[str, torch.Tensor]], *, receivers: int = 1
) -> str:
    """Payload of load_format "flattened_bucket": all tensors in one flat buffer, a single handle;
    `receivers` processes may each load it once."""
    if not named_tensors:
        raise ValueError("a flattened bucket needs at least one tensor")
    dtypes = {tensor.dtype for _, tensor in named_tensors}
    flat_dtype = dtypes.pop() if len(dtypes) == 1 else torch.uint8
    device = named_tensors[0][1].device
    if any(tensor.device != device for _, tensor in named_tensors):
        raise ValueError("a flattened bucket holds tensors of one device")
    pieces, metadata, offset = [], [], 0
    for name, tensor in named_tensors:
        piece = tensor.detach().reshape(-1)
        if flat_dtype == torch.uint8 and tensor.dtype != torch.uint8:
            piece = piece.view(torch.uint8)
            # The receiver views bytes as the tensor's dtype, which needs an offset aligned to its size.
            padding = -offset % tensor.element_size()
            if padding:
                pieces.append(torch.zeros(padding, dtype=torch.uint8, device=device))
                offset += padding
        pieces.append(piece)
        metadata.append(
            types.SimpleNamespace(
                name=name,
                shape=tensor.shape,
                dtype=tensor.dtype,
                start_idx=offset,
                end_idx=offset + piece.numel(),
                numel=piece.numel(),
            )
        )
        offset += piece.numel()
    with _file_system_sharing():
        if device.type == "cuda":
            flat = torch.cat(pieces)
        else:
            # Concatenate straight into shared memory: one copy, not two.
            flat = torch.empty(offset, dtype=flat_dtype).share_memory_()
            torch.cat(pieces, out=flat)
        return _dumps({"flattened_tensor": flat, "metadata": metadata}, [flat], receivers)


def deserialize_named_tensors(payload: str, load_format: str | None) -> NamedTensors:
    """The (name, tensor) pairs of one TP rank's payload, in either load format.

    Loading releases one of the sender's holds on its shared memory: a payload loads as many times as it
    was made for (`receivers`), by as many processes.
    """
    if load_format not in (None, FLATTENED_BUCKET):
        raise ProtocolError(
            "load_format", f"unknown load format {load_format!r}; use None or {FLATTENED_BUCKET!r}"
        )
    try:
        obj = _TensorPayloadUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    except ProtocolError:
        raise
    except Exception as error:  # a truncated or foreign payload: report it, never crash the server
        raise ProtocolError("serialized_named_tensors", f"cannot decode the payload: {error}") from error
    if load_format == FLATTENED_BUCKET:
        return _unflatten(obj)
    if not isinstance(obj, list) or not all(
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
        for item in obj
    ):
        raise ProtocolError("serialized_named_tensors", "load_format None expects a list of (name, tensor)")
    return obj


def _unflatten(obj: object) -> NamedTensors:
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ProtocolError(
            "serialized_named_tensors", "a flattened bucket is a dict {flattened_tensor, metadata}"
        )
    flat = obj["flattened_tensor"]
    named = []
    for meta in obj["metadata"]:
        piece = flat[meta.start_idx : meta.end_idx]
        if piece.dtype == meta.dtype:
            tensor = piece.reshape(meta.shape)
        elif piece.dtype == torch.uint8:  # mixed-dtype bucket: byte offsets
            tensor = piece.view(meta.dtype).reshape(meta.shape)
        else:  # older SGLang buckets: one dtype, cast on arrival
            tensor = piece.reshape(meta.shape).to(meta.dtype)
        named.append((meta.name, tensor))
    return named


# ---------------------------------------------------------------- /update_weights_from_distributed


def init_weight_update_group(
    *,
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta,
) -> dist.ProcessGroup:
    """Join the named process group of a broadcast weight update as SGLang's servers join it.

    SGLang's `init_custom_process_group`: a TCP store at master_address:master_port (rank 0 hosts it), keys
    under the prefix `group_name`, a group outside the default world (a server has none; a trainer has its
    own), whose ranks are its own: rank r of the group is `src`/`group_src` r. torch builds such groups only
    through these private helpers (SGLang, verl and slime use the same), and every member must derive the
    same store keys from them. One process may hold several groups, under different names.
    """
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        dist.Backend(backend),
        dist.PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    _world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


def concat_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A flattened bucket as one broadcast carries it: the tensors' bytes in order, unpadded (uint8)."""
    return torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for tensor in tensors])


def split_bytes(
    flat: torch.Tensor, shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]
) -> list[torch.Tensor]:
    """The tensors of `concat_bytes`, given their shapes and dtypes."""
    tensors, offset = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        size = torch.Size(shape).numel() * dtype.itemsize
        # clone: a byte offset need not be aligned to the dtype, which view() requires.
        tensors.append(flat[offset : offset + size].clone().view(dtype).reshape(shape))
        offset += size
    return tensors


def concat_bytes_size(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> int:
    """Bytes of the `concat_bytes` buffer of these shapes and dtypes: what a receiver allocates."""
    return sum(
        torch.Size(shape).numel() * dtype.itemsize for shape, dtype in zip(shapes, dtypes, strict=True)
    )
