"""Save and resume the whole run under checkpoint/rl_state.py's atomic protocol.

A step directory holds the model (a torch_dist checkpoint with dapo_checkpoint.json, so it converts to
Hugging Face with dapo-convert-megatron-to-hf and loads at any TP/PP), the optimizer (Megatron's sharded
state, in `optimizer/`) and `rl_state/` (scheduler, data-loader position, carried-over groups, step, RNG),
and the checksums of all of them (checkpoint/manifest.py), which a resume checks before loading anything.
Every rank hashes a share of the files, at save and at resume: rank 0 alone would read the whole checkpoint.
"""

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_dapo.checkpoint.manifest import (
    CorruptCheckpointError,
    Entry,
    checkpoint_files,
    describe,
    find_mismatch,
    read_manifest,
)
from megatron_dapo.checkpoint.model_io import save_model
from megatron_dapo.checkpoint.rl_state import (
    RLState,
    begin_save,
    complete_checkpoints,
    finish_save,
    prune,
    remove_abandoned_saves,
    save_rl_state,
    set_aside,
)
from megatron_dapo.config import CheckpointConfig, ConfigError
from megatron_dapo.trainer.policy.build import Policy

OPTIMIZER_DIR = "optimizer"
logger = logging.getLogger("megatron_dapo.train")


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
    checksums = gather_checksums(ckpt)
    final = [None]
    if rank == 0:
        final = [finish_save(ckpt, checksums)]
        prune(Path(root), keep_last)
    dist.broadcast_object_list(final, src=0)  # also: no rank moves on before the checkpoint exists
    return Path(final[0])


def load_optimizer(ckpt: Path, policy: Policy, metadata: dict[str, str]) -> None:
    """Collective: the optimizer state of a step directory into the (already built) optimizer."""
    sharded = policy.optimizer.sharded_state_dict(
        policy.model.sharded_state_dict(), is_loading=True, metadata=metadata
    )
    policy.optimizer.load_state_dict(dist_checkpointing.load(sharded, str(Path(ckpt) / OPTIMIZER_DIR)))


def gather_checksums(ckpt: Path) -> dict[str, Entry]:
    """Collective, once every rank's files are closed: each rank hashes a share of the checkpoint's files;
    rank 0 gets all the checksums (the other ranks an empty dict)."""
    names = [checkpoint_files(ckpt) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing: every file, whichever rank wrote it
    shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(describe(ckpt, names[0][dist.get_rank() :: dist.get_world_size()]), shares, dst=0)
    return {name: entry for share in shares or [] for name, entry in share.items()}


def checkpoint_to_resume(root: Path, cfg: CheckpointConfig) -> Path | None:
    """Collective, at start: the verified checkpoint a run resumes from, or None; refuses to start a new run
    over another's checkpoints."""
    existing = complete_checkpoints(root)  # oldest first
    if existing and not cfg.resume:
        raise ConfigError(
            f"checkpoint.resume=false but {root} holds checkpoints (the latest: {existing[-1].name}): set "
            "checkpoint.resume=true to continue that run, or give this one another logging.dir"
        )
    return resume_point(root, fallback=cfg.resume_fallback)


def resume_point(root: Path, *, fallback: bool) -> Path | None:
    """Collective, at start: the newest complete checkpoint whose files match their checksums, or None (a
    fresh start); rank 0 first deletes the temporary directories of saves killed mid-way.

    A corrupt checkpoint raises CorruptCheckpointError naming the file; with `fallback` the newest intact one
    is used instead, with a warning, and the corrupt ones after it are renamed (kept for inspection) so that
    the run can save their steps again. Nothing is renamed when no checkpoint is intact.
    """
    if dist.get_rank() == 0:
        for path in remove_abandoned_saves(root):
            logger.info("deleted %s, left by a save that did not finish", path)
    listing = [complete_checkpoints(root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    corrupt: list[tuple[Path, str]] = []  # newest first, with what is wrong in each
    intact = None
    for ckpt in reversed(listing[0]):
        problem = _find_corruption(ckpt)
        if problem is None:
            intact = ckpt
            break
        if not fallback:
            raise CorruptCheckpointError(
                f"{problem}: checkpoint {ckpt.name} is corrupt; set checkpoint.resume_fallback=true to "
                "resume from the complete checkpoint before it, or move this one out of the checkpoint folder"
            )
        corrupt.append((ckpt, problem))
    if corrupt and intact is None:
        raise CorruptCheckpointError(f"no intact checkpoint in {root}: {'; '.join(p for _, p in corrupt)}")
    if dist.get_rank() == 0:
        for ckpt, problem in corrupt:
            aside = set_aside(ckpt)
            logger.warning(
                "%s: resuming from %s instead; %s moved to %s", problem, intact.name, ckpt.name, aside
            )
    dist.barrier()  # the corrupt checkpoints are out of the way before any rank saves
    return intact


def _find_corruption(ckpt: Path) -> str | None:
    """Collective: the first file of `ckpt` that does not match its checksum (each rank checks a share), in
    one line; None if all match, or for a checkpoint saved before checksums existed (with a warning)."""
    try:
        entries = read_manifest(ckpt)
    except CorruptCheckpointError as error:
        return str(error)  # the same on every rank: all read the same manifest
    if entries is None:
        if dist.get_rank() == 0:
            logger.warning("%s has no checksums (saved before they existed): loading it unverified", ckpt)
        return None
    names = sorted(entries, key=lambda name: -int(entries[name]["size"]))  # similar shares for every rank
    share = {name: entries[name] for name in names[dist.get_rank() :: dist.get_world_size()]}
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, find_mismatch(ckpt, share))
    return next((problem for problem in problems if problem is not None), None)
