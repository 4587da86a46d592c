"""How Hugging Face-named tensors travel to SGLang's weight-update endpoints, from the trainer's side.

/update_weights_from_tensor carries serialized tensors, in both of its load formats (below);
/init_weights_update_group + /update_weights_from_distributed carry them over a process group of the trainer
and the servers (`init_weight_update_group`, and the byte layout of a flattened bucket in one broadcast).

A payload for SGLang is what its MultiprocessingSerializer makes: the base64 text of a `ForkingPickler`
pickle, in which torch's multiprocessing reductions replace every CUDA tensor by a CUDA IPC handle rather than
by its bytes. Receiver and sender must therefore share a machine, and the sender must keep the tensors alive
until the receiver has answered (torch counts the processes that open a handle).

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

Host memory (the CPU engine) never travels as a pickle: unpickling lets the sender name any /dev/shm object
and call what the pickle names. Its payload is rollout/host_payload.py's JSON header and shared segment.
"""

import base64
import io
import types
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
from torch.multiprocessing import reductions

_CUDA_DEVICE_ARG = 6  # position of the device in the arguments of torch's rebuild_cuda_tensor


def _reduce_tensor_naming_gpu_by_uuid(tensor: torch.Tensor):
    """torch's own reduction of a tensor, with a CUDA tensor's device index replaced by its GPU's UUID."""
    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor:
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1 :])
    return rebuild, args


def _dumps(obj: object, tensors: Sequence[torch.Tensor]) -> str:
    """The payload of `obj`, whose tensors are `tensors`: CUDA IPC handles, never host memory."""
    if not all(tensor.is_cuda for tensor in tensors):
        raise ValueError(
            "SGLang's payloads carry CUDA tensors; host memory goes to the CPU engine as a host-memory "
            "payload (megatron_dapo.rollout.host_payload.SegmentWriter)"
        )
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    # This pickler's own dispatch table: nothing else this process pickles sees the UUIDs.
    for tensor_type in (torch.Tensor, torch.nn.Parameter):
        pickler.dispatch_table[tensor_type] = _reduce_tensor_naming_gpu_by_uuid
    pickler.dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Payload of load_format None: one CUDA IPC handle per tensor."""
    named = [(name, tensor.detach()) for name, tensor in named_tensors]
    return _dumps(named, [tensor for _, tensor in named])


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Payload of load_format "flattened_bucket": all CUDA tensors in one flat buffer, a single handle."""
    bucket = flattened_bucket(named_tensors)
    return _dumps(bucket, [bucket["flattened_tensor"]])


def flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict:
    """SGLang's FlattenedTensorBucket as a dict {"flattened_tensor", "metadata"} (the module docstring)."""
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
    return {"flattened_tensor": torch.cat(pieces), "metadata": metadata}


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
