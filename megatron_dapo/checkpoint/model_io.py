"""Save a built (TP/PP-sharded) GPTModel to a Megatron checkpoint directory and load it back, on every rank.

The directory is a megatron-core torch_dist checkpoint plus this project's metadata (checkpoint/meta.py), the
layout tools/convert_hf_to_megatron.py writes, so converted, trained and resharded checkpoints are
interchangeable and load at any TP/PP. Hugging Face weights go into a built model through model/hf_weights.py,
with the same mapping.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.models.gpt import GPTModel

from megatron_dapo.checkpoint.meta import (
    CheckpointMeta,
    check_megatron_core,
    installed_megatron_core,
    write_meta,
)

# Module extra state (Transformer Engine's FP8 metadata; None in the local spec) is not model weights: the
# conversion tools do not write it, and a model loads without it.
_EXTRA_STATE = "_extra_state"


def checkpoint_meta(model: GPTModel) -> CheckpointMeta:
    """The metadata describing `model`'s layout, to write beside its weights."""
    return CheckpointMeta(
        tensor_parallel=model.pg_collection.tp.size(),
        pipeline_parallel=model.pg_collection.pp.size(),
        padded_vocab_size=model.vocab_size,
        dtype=str(model.config.params_dtype).removeprefix("torch."),
        megatron_core=installed_megatron_core(),
    )


def save_model(model: GPTModel, ckpt_dir: Path, *, hf_dir: Path) -> None:
    """Collective: write this rank's part of `model` into `ckpt_dir`; rank 0 adds the metadata and the config
    and tokenizer files of `hf_dir`."""
    ckpt_dir = Path(ckpt_dir)
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the directory exists before any rank writes into it
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    if dist.get_rank() == 0:
        write_meta(ckpt_dir, checkpoint_meta(model), hf_dir)
    dist.barrier()  # complete on return, on every rank


@torch.no_grad()
def load_model(model: GPTModel, ckpt_dir: Path) -> None:
    """Collective: fill `model` (this rank's stage and TP shard) from a Megatron checkpoint of any TP/PP.

    Every weight must be in the checkpoint; only module extra state may be absent. A checkpoint saved by a
    newer megatron-core than the installed one is refused with the ways through (checkpoint/meta.py).
    """
    check_megatron_core(ckpt_dir)
    # megatron calls keys that are requested but absent from the checkpoint "unexpected"; it drops them.
    loaded, _, absent = dist_checkpointing.load(
        model.sharded_state_dict(), str(ckpt_dir), strict=StrictHandling.RETURN_UNEXPECTED
    )
    absent_weights = sorted(key for key in absent if not key.endswith(_EXTRA_STATE))
    if absent_weights:
        raise KeyError(
            f"{ckpt_dir} lacks model tensors {absent_weights}: it is not a checkpoint of this model"
        )
    result = model.load_state_dict(loaded, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(_EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise KeyError(f"loading {ckpt_dir}: missing {missing}, unexpected {result.unexpected_keys}")
