"""Named tensors as SGLang's /update_weights_from_tensor carries them, in both of its load formats.

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

CPU tensors travel through /dev/shm files ("file_system" sharing): the default "file_descriptor" sharing only
works between a process and its children, never between the trainer and an engine server. Each CPU tensor is
copied once into shared memory, so /dev/shm must hold one bucket (Docker's default of 64 MB does not hold a
large one: raise it with --shm-size). The payload holds a reference to its files, released when the receiver
has loaded them; a payload that is never loaded keeps its files until the sending process exits.

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
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET, ProtocolError

NamedTensors = list[tuple[str, torch.Tensor]]

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


def _dumps(obj: object) -> str:
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Payload of load_format None: one handle per tensor."""
    with _file_system_sharing():
        return _dumps([(name, _shareable(tensor)) for name, tensor in named_tensors])


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Payload of load_format "flattened_bucket": all tensors in one flat buffer, a single handle."""
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
        return _dumps({"flattened_tensor": flat, "metadata": metadata})


def deserialize_named_tensors(payload: str, load_format: str | None) -> NamedTensors:
    """The (name, tensor) pairs of one TP rank's payload, in either load format.

    A payload loads once: loading releases the sender's hold on its shared memory.
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
