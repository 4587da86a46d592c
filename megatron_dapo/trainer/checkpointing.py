"""Save and resume the whole run under checkpoint/rl_state.py's atomic protocol.

A step directory holds the model (a torch_dist checkpoint with dapo_checkpoint.json, so it converts to
Hugging Face with dapo-convert-megatron-to-hf and loads at any TP/PP), the optimizer (Megatron's sharded
state, in `optimizer/`) and `rl_state/` (scheduler, data-loader position, carried-over groups, step, RNG).
"""

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_dapo.checkpoint.model_io import save_model
from megatron_dapo.checkpoint.rl_state import RLState, begin_save, finish_save, prune, save_rl_state
from megatron_dapo.trainer.policy import Policy

OPTIMIZER_DIR = "optimizer"


def optimizer_metadata() -> dict[str, str]:
    """How the distributed optimizer lays its state out. On CPU only 'dp_reshardable' reloads (DESIGN.md); on
    GPUs the fully reshardable default lets a run resume at another parallel layout."""
    return {} if torch.cuda.is_available() else {"distrib_optim_sharding_type": "dp_reshardable"}


def save_checkpoint(
    root: Path, step: int, policy: Policy, state: RLState, *, hf_dir: Path, keep_last: int
) -> Path:
    """Collective: write step `step` into a temporary directory, then publish it (rank 0) and prune."""
    rank = dist.get_rank()
    tmp = [begin_save(root, step) if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    ckpt = Path(tmp[0])
    save_model(policy.model, ckpt, hf_dir=hf_dir)  # collective; rank 0 adds the metadata and HF config
    if rank == 0:
        (ckpt / OPTIMIZER_DIR).mkdir()
    dist.barrier()  # the optimizer directory exists before any rank writes into it
    sharded = policy.optimizer.sharded_state_dict(
        policy.model.sharded_state_dict(), metadata=state.extra["optimizer_metadata"]
    )
    dist_checkpointing.save(sharded, str(ckpt / OPTIMIZER_DIR))
    save_rl_state(ckpt, state, rank=rank)
    dist.barrier()  # every rank's files are closed
    final = [None]
    if rank == 0:
        final = [finish_save(ckpt)]
        prune(Path(root), keep_last)
    dist.broadcast_object_list(final, src=0)  # also: no rank moves on before the checkpoint exists
    return Path(final[0])


def load_optimizer(ckpt: Path, policy: Policy, metadata: dict[str, str]) -> None:
    """Collective: the optimizer state of a step directory into the (already built) optimizer."""
    sharded = policy.optimizer.sharded_state_dict(
        policy.model.sharded_state_dict(), is_loading=True, metadata=metadata
    )
    policy.optimizer.load_state_dict(dist_checkpointing.load(sharded, str(Path(ckpt) / OPTIMIZER_DIR)))
