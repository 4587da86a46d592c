"""Read and write megatron-core `torch_dist` checkpoints from ONE process, one tensor at a time.

A torch_dist checkpoint is a torch.distributed.checkpoint (DCP) directory whose tensors are stored as
globally indexed chunks: megatron-core stacks the decoder layers on a leading axis (key
"decoder.layers.mlp.linear_fc2.weight" has shape [num_layers, ...]) and each TP rank writes its chunk. Any
chunk can therefore be written or read by any process, given its global offsets. The conversion tools do
exactly that, through DCP's planner interface: the writer computes a tensor only when DCP asks for its
bytes, and the reader fetches one layer's tensor, so a conversion holds about one tensor in memory, not the
model, and needs no process group.
"""

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_dapo.errors import UserError

# What megatron-core's dist_checkpointing.save writes besides the DCP files (megatron/core/dist_checkpointing:
# core.py CheckpointingConfig -> metadata.json; the common, non-sharded state -> common.pt).
MEGATRON_CONFIG_FILE = "metadata.json"
MEGATRON_COMMON_FILE = "common.pt"
_MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}

# DCP warns that it runs without a process group: single-process reading and writing is the point here.
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives in a torch_dist checkpoint and how its chunks are cut."""

    key: str
    shape: tuple[int, ...]  # the tensor itself (one layer's, for stacked keys)
    layer: int | None = None  # index on the stacked leading axis; None: the key is not stacked
    num_layers: int = 0  # length of the stacked axis
    split_dim: int = 0  # chunks are cut along this dim of `shape` ...
    num_chunks: int = 1  # ... into this many equal parts (megatron: one per TP rank, two per rank for fc1)

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.shape if self.layer is None else (self.num_layers, *self.shape)

    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Global (offsets, sizes) of the whole tensor."""
        if self.layer is None:
            return (0,) * len(self.shape), self.shape
        return (self.layer, *(0,) * len(self.shape)), (1, *self.shape)

    def chunks(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Global (offsets, sizes) of each chunk."""
        offsets, sizes = self.box()
        dim = self.split_dim + (self.layer is not None)
        if sizes[dim] % self.num_chunks != 0:
            raise ValueError(f"{self.key}: {self.num_chunks} chunks do not divide dim {dim} of {sizes}")
        step = sizes[dim] // self.num_chunks
        return [
            (
                tuple(o + i * step if d == dim else o for d, o in enumerate(offsets)),
                tuple(step if d == dim else s for d, s in enumerate(sizes)),
            )
            for i in range(self.num_chunks)
        ]


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans the writes from placements alone; computes a tensor when DCP first asks for one of its chunks."""

    def __init__(
        self,
        placements: Sequence[Placement],
        compute: Callable[[Placement], torch.Tensor],
        dtype: Callable[[Placement], torch.dtype],
    ):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._compute = compute
        self._items: list[WriteItem] = []
        self._where: dict[tuple[str, tuple[int, ...]], tuple[Placement, int]] = {}
        for placement in placements:
            for i, (offsets, sizes) in enumerate(placement.chunks()):
                self._items.append(
                    WriteItem(
                        index=MetadataIndex(placement.key, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                            properties=TensorProperties(dtype=dtype(placement)),
                            size=torch.Size(placement.global_shape),
                        ),
                    )
                )
                self._where[(placement.key, offsets)] = (placement, i)
        self._current: tuple[Placement | None, list[torch.Tensor]] = (None, [])

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        placement, i = self._where[(write_item.index.fqn, tuple(write_item.index.offset))]
        # Chunks of one tensor are planned one after another and DCP writes them in plan order (see
        # write_checkpoint), so keeping only the last computed tensor computes each tensor once.
        if self._current[0] != placement:
            self._current = (None, [])  # free the previous tensor before computing the next
            tensor = self._compute(placement)
            if tuple(tensor.shape) != placement.shape:
                raise ValueError(
                    f"{placement.key}: computed shape {tuple(tensor.shape)}, planned {placement.shape}"
                )
            stacked = tensor if placement.layer is None else tensor.unsqueeze(0)
            dim = placement.split_dim + (placement.layer is not None)
            self._current = (placement, list(stacked.chunk(placement.num_chunks, dim=dim)))
        return self._current[1][i].contiguous()


def write_checkpoint(
    out_dir: Path,
    placements: Sequence[Placement],
    compute: Callable[[Placement], torch.Tensor],
    dtype: Callable[[Placement], torch.dtype],
) -> None:
    """Write a torch_dist checkpoint megatron-core can load, computing tensors one at a time in order.

    `compute(placement)` returns the tensor of one placement, `dtype(placement)` its dtype (known before
    the tensor is computed: DCP records every dtype in the plan).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # One thread and no copy-ahead: DCP then resolves items one at a time in plan order (with copy-ahead, used
    # where CUDA is available, it sorts them by size, and each chunk would recompute its whole tensor).
    writer = FileSystemWriter(out_dir, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    planner = _StreamingSavePlanner(placements, compute, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        try:
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException as error:  # what `compute` raised (a damaged source, say), unwrapped
            raise _cause(error) from None
    (out_dir / MEGATRON_CONFIG_FILE).write_text(json.dumps(_MEGATRON_CONFIG))
    torch.save({}, out_dir / MEGATRON_COMMON_FILE)


def _cause(error: CheckpointException) -> BaseException:
    """The exception DCP wrapped: its failures are (exception, stack) pairs, one per rank; here one rank."""
    exception, _stack = next(iter(error.failures.values()))
    return exception


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Loads one box of one tensor into `target`, from whatever chunks the checkpoint stores it in."""

    def __init__(self, key: str, target: torch.Tensor, offsets: tuple[int, ...]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._key, self._target, self._offsets = key, target, offsets

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(torch.Size(self._offsets), self._target.shape)
        return LoadPlan(
            create_read_items_for_chunk_list(self._key, self.metadata.state_dict_metadata[self._key], [box])
        )

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self._target
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, offset, length)
        return view


class CheckpointReader:
    """Reads tensors of a torch_dist checkpoint (from megatron or from `write_checkpoint`) one at a time."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        if not (self.ckpt_dir / ".metadata").is_file():
            raise FileNotFoundError(
                f"{self.ckpt_dir} is not a torch_dist checkpoint (no .metadata file): "
                "pass the directory that megatron's dist_checkpointing.save wrote"
            )
        # One reader for every read: it parses the .metadata file (which lists every chunk) only once.
        self._storage = CachedMetadataFileSystemReader(self.ckpt_dir)
        try:
            self.metadata = self._storage.read_metadata()
        except Exception as error:  # a damaged pickle can raise nearly any exception type
            raise UserError(
                f"{self.ckpt_dir / '.metadata'}: damaged or truncated ({type(error).__name__}: {error})"
            ) from None

    def tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"tensor {key!r} is missing from the checkpoint {self.ckpt_dir}")
        return md

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The whole tensor `key`, or its slice `layer` on the stacked leading axis (without that axis)."""
        md = self.tensor_metadata(key)
        size = tuple(md.size)
        if layer is None:
            offsets, shape = (0,) * len(size), size
        else:
            offsets, shape = (layer, *(0,) * (len(size) - 1)), (1, *size[1:])
        target = torch.empty(shape, dtype=md.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            try:
                dcp.load(
                    {key: target},
                    storage_reader=self._storage,
                    planner=_SliceLoadPlanner(key, target, offsets),
                    no_dist=True,
                )
            except CheckpointException as error:
                cause = _cause(error)
                raise UserError(
                    f"{self.ckpt_dir}: cannot read tensor {key}, a file is damaged "
                    f"({type(cause).__name__}: {cause})"
                ) from None
        return target if layer is None else target[0]
