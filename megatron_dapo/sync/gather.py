"""The policy's weights in Hugging Face names and whole tensors, gathered a Megatron parameter at a time.

A stage's TP ranks all-gather each parameter in turn (so memory holds one parameter, not the model) and map
it with model/hf_mapping. Each Hugging Face tensor comes from the one stage that holds it: the final norm from
the last stage, the embedding from the first; with tied embeddings the last stage's output layer is the
embedding's copy and is skipped. For colocated servers on several nodes (`every_rank_hf_tensors`), a node
lacks the stages of other nodes' ranks; those cross the network as shards: stage s's ranks broadcast each
shard over their PP groups, then every TP group gathers it (slime's scheme). Every DP replica does this at
once, each within its own PP groups. With the 32B recipe (16 nodes of 8 GPUs, TP 8 = one node, PP 2) a node
receives the stage it lacks, half the model, spread over its 8 ranks and their NICs, and gathers over
NVLink: the least any scheme can move, as a node must receive what it does not hold. Broadcasting gathered
tensors over PP instead would move TP (8) times the bytes.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor, nn

from megatron_dapo.model.hf_mapping import HFMapping, Layout, TensorMap, to_global_name
from megatron_dapo.model.policy import unwrap


def stage_hf_tensors(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection, dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    """This stage's weights as (Hugging Face name, whole tensor in `dtype`), a Megatron parameter at a time.

    A collective of the TP group: every TP rank gathers and gets every tensor.
    """
    for name, param in _global_named_parameters(model, mapping, pg_collection):
        entry = mapping.get(name)
        if entry.tied_copy:  # the last stage's copy of the tied embedding: the first stage sends it
            continue
        # Cast before gathering: exact (merging only concatenates), and fewer bytes to gather.
        yield from _gathered_to_hf(mapping, entry, param.detach().to(dtype), pg_collection.tp)


def every_rank_hf_tensors(
    model: nn.Module,
    mapping: HFMapping,
    pg_collection: ProcessGroupCollection,
    dtype: torch.dtype,
    stage: int,
    parameters: Sequence[tuple[str, torch.Size]],
) -> Iterator[tuple[str, Tensor]]:
    """Stage `stage`'s weights as `stage_hf_tensors` gives them, on every rank: a collective of the PP and
    TP groups, in which the stage's ranks broadcast each shard over their PP groups before each TP group
    gathers it. `parameters`: the stage's (global Megatron name, this TP rank's shard shape), in order."""
    own = pg_collection.pp.rank() == stage
    local = dict(_global_named_parameters(model, mapping, pg_collection)) if own else {}
    device = next(unwrap(model).parameters()).device
    for name, shape in parameters:
        entry = mapping.get(name)
        if entry.tied_copy:
            continue
        shard = (
            local[name].detach().to(dtype).contiguous()
            if own
            else torch.empty(shape, dtype=dtype, device=device)
        )
        if pg_collection.pp.size() > 1:
            dist.broadcast(shard, group=pg_collection.pp, group_src=stage)
        yield from _gathered_to_hf(mapping, entry, shard, pg_collection.tp)


def _gathered_to_hf(
    mapping: HFMapping, entry: TensorMap, shard: Tensor, tp_group: dist.ProcessGroup
) -> list[tuple[str, Tensor]]:
    shards = [shard] if entry.layout is Layout.REPLICATED else _all_gather(shard, tp_group)
    return mapping.to_hf(entry, shards)


def _all_gather(local: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(shards, local, group=group)
    return shards


def _global_named_parameters(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection
) -> Iterator[tuple[str, nn.Parameter]]:
    """This stage's parameters under their global Megatron names (layer indices of the whole model)."""
    layers, stages, stage = mapping.dims.num_layers, pg_collection.pp.size(), pg_collection.pp.rank()
    for name, param in unwrap(model).named_parameters():
        yield to_global_name(name, layers, stages, stage), param


def parameters_of_every_stage(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection
) -> list[list[tuple[str, torch.Size]]]:
    """Per stage, its parameters and this TP rank's shard shapes, which the rank's PP peers (the same TP
    rank of the other stages) know: a rank receives a stage it does not hold into buffers of these shapes."""
    mine = [(name, param.shape) for name, param in _global_named_parameters(model, mapping, pg_collection)]
    every_stage: list[Any] = [None] * pg_collection.pp.size()
    dist.all_gather_object(every_stage, mine, group=pg_collection.pp)
    return every_stage
