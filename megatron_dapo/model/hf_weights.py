"""Fill this rank's GPTModel stage with Hugging Face weights, a tensor at a time, via model/hf_mapping.

Every rank reads the Hugging Face tensors its parameters are made of and keeps its own TP shard; nothing is
communicated, and no more than one parameter's Hugging Face tensors are in memory at once.
"""

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.hf_mapping import HFMapping, Layout, to_global_name

HFTensors = Callable[[str], torch.Tensor]


@torch.no_grad()
def load_hf_weights(
    model: GPTModel, hf_config: Any, tensors: HFTensors, pg_collection: ProcessGroupCollection
) -> None:
    """Copy Hugging Face weights into this rank's stage and TP shard of `model`.

    `tensors(name)` reads one Hugging Face tensor, e.g. `SafetensorsDir(hf_dir).get` (checkpoint/hf_dir.py).
    """
    dims = GPTArch.from_hf_config(hf_config)
    mapping = HFMapping(dims)
    tp_size, tp_rank = pg_collection.tp.size(), pg_collection.tp.rank()
    pp_size, pp_rank = pg_collection.pp.size(), pg_collection.pp.rank()
    for name, param in model.named_parameters():
        entry = mapping.get(to_global_name(name, dims.num_layers, pp_size, pp_rank))
        padded = param.shape[0] * tp_size if entry.layout is Layout.VOCAB else None
        shards = mapping.to_megatron(
            entry,
            [tensors(n) for n in entry.hf],
            tp_size=tp_size,
            padded_vocab_size=padded,
            dtype=param.dtype,
        )
        if shards[tp_rank].shape != param.shape:
            raise ValueError(
                f"{name}: Hugging Face weights give a shard of shape {tuple(shards[tp_rank].shape)}, the "
                f"model has {tuple(param.shape)}: the checkpoint does not match the config it was built from"
            )
        param.copy_(shards[tp_rank])
