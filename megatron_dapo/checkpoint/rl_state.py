"""The RL half of a checkpoint, and the atomic directory protocol the whole checkpoint is written under.

Layout: `ROOT/step_{N:08d}/` holds the model and optimizer (checkpoint/model_io.py), `rl_state/` (this
module), the checksums of all those files (checkpoint/manifest.py) and a `COMPLETE` marker. A save writes
into `ROOT/step_{N:08d}.tmp-<uuid>/` and becomes visible only by a rename at the very end, so a crash at any
moment leaves the previous checkpoint as the latest complete one; the abandoned temporary directory is never
read and is deleted by the next run's `remove_abandoned_saves` (or a later `prune`).

Who calls what (the caller owns the barriers and the broadcast; nothing here touches a process group):

    rank 0, at start: remove_abandoned_saves(root)
    tmp = begin_save(root, step) on rank 0, broadcast to all ranks
    every rank: write the model and optimizer into tmp, then save_rl_state(tmp, state, rank=rank)
    barrier                                   # every rank's files are closed
    (optionally each rank checksums a share of manifest.checkpoint_files(tmp), gathered on rank 0)
    rank 0: finish_save(tmp, checksums); prune(root, keep_last)
    barrier                                   # no rank moves on before the checkpoint exists

Resume: `latest_complete(root)` (any rank; all see the same directory), its files checked against
`manifest.read_manifest` (set a corrupt one aside with `set_aside` to fall back to the one before), then
`load_rl_state(ckpt, rank=rank)` on every rank.
"""

import os
import random
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_dapo.checkpoint.manifest import Entry, checkpoint_files, describe, write_manifest

COMPLETE = "COMPLETE"
RL_STATE_DIR = "rl_state"
_FINAL = re.compile(r"step_(\d{8})")
_TEMP = re.compile(r"step_(\d{8})\.tmp-[0-9a-f]+")


@dataclass
class RLState:
    """All a run needs, besides model and optimizer, to continue exactly; the same on every rank."""

    step: int  # rollout steps completed
    loader: dict[str, Any]  # the prompt loader's state_dict (its position in the stream)
    sampler: dict[str, Any]  # DynamicSampler.state_dict(): the carried-over groups
    scheduler: dict[str, Any]  # the LR scheduler's state_dict
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the loop wants back


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: create and return the temporary directory every rank writes this checkpoint into."""
    tmp = Path(root) / f"{step_dir(root, step).name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    return tmp


def finish_save(tmp: Path, checksums: dict[str, Entry] | None = None) -> Path:
    """Rank 0, after every rank has written: make `tmp` the complete checkpoint; returns its final path.
    `checksums` (manifest.describe of every file, e.g. hashed by all ranks) are computed here when None.

    Order matters for a crash at any point: the files reach the disk, then their checksums, then the
    COMPLETE marker, then the rename publishes the directory, then the root's entry for it reaches the disk.
    """
    tmp = Path(tmp)
    match = _TEMP.fullmatch(tmp.name)
    if match is None:
        raise ValueError(f"{tmp} is not a directory made by begin_save")
    final = step_dir(tmp.parent, int(match.group(1)))
    if final.exists():
        raise FileExistsError(f"{final} already exists: delete it to save step {int(match.group(1))} again")
    # torch.save and dist_checkpointing close their files without fsync; without this a power loss after
    # the rename could leave a "complete" checkpoint with empty files.
    for path in tmp.rglob("*"):
        _fsync(path)
    if checksums is None:
        checksums = describe(tmp, checkpoint_files(tmp))
    _fsync(write_manifest(tmp, checksums))
    marker = tmp / COMPLETE
    marker.write_text(f"{int(match.group(1))}\n")
    _fsync(marker)
    _fsync(tmp)
    tmp.rename(final)
    _fsync(final.parent)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(ckpt_dir: Path) -> int:
    """The step of a complete checkpoint directory, from its name."""
    match = _FINAL.fullmatch(Path(ckpt_dir).name)
    if match is None:
        raise ValueError(f"{ckpt_dir} is not named step_NNNNNNNN")
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first; temporary directories are never among them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _FINAL.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none (a fresh start)."""
    checkpoints = complete_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def prune(root: Path, keep_last: int, *, stale_after_s: float = 3600.0) -> list[Path]:
    """Rank 0, after `finish_save`: delete all but the newest `keep_last` complete checkpoints (0 keeps all),
    and abandoned temporary directories; returns what was deleted.

    A temporary directory is deleted only when it cannot be a save in progress: its step is not newer than the
    newest complete checkpoint (saves go forward) and nothing in it has changed for `stale_after_s`.
    """
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return []
    doomed = checkpoints[:-keep_last] if keep_last > 0 else []
    newest_step = checkpoint_step(checkpoints[-1])
    for tmp in Path(root).iterdir():
        match = _TEMP.fullmatch(tmp.name)
        if match and int(match.group(1)) <= newest_step and _idle_s(tmp) > stale_after_s:
            doomed.append(tmp)
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_abandoned_saves(root: Path) -> list[Path]:
    """Rank 0, when a run starts (before any save): delete the temporary directories that killed saves left
    in `root`, only those named as begin_save names them; returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    abandoned = sorted(
        p for p in root.iterdir() if _TEMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )
    for path in abandoned:
        shutil.rmtree(path)
    return abandoned


def set_aside(ckpt_dir: Path) -> Path:
    """Rank 0: rename a corrupt checkpoint so that it is no longer complete (the run resumes from the one
    before and can save its step again) but stays on disk for inspection; returns the new path."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir.with_name(f"{ckpt_dir.name}.corrupt-{uuid.uuid4().hex[:8]}")
    ckpt_dir.rename(target)
    return target


def _idle_s(directory: Path) -> float:
    """Seconds since anything in `directory` was last written."""
    newest = max([directory.stat().st_mtime] + [p.stat().st_mtime for p in directory.rglob("*")])
    return time.time() - newest


def rng_state() -> dict[str, Any]:
    """This process's random generators: Python, NumPy's global one, torch CPU and (where present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_file(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / RL_STATE_DIR / "state.pt"


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / RL_STATE_DIR / f"rng_rank{rank:05d}.pt"


def save_rl_state(ckpt_dir: Path, state: RLState, *, rank: int) -> None:
    """Every rank: write this rank's RNG states; rank 0 also writes `state` (the same on every rank)."""
    (Path(ckpt_dir) / RL_STATE_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), _rng_file(ckpt_dir, rank))
    if rank == 0:
        # A plain dict of the fields, not dataclasses.asdict: that would turn the loop's own objects (the
        # carried groups) into dicts too.
        torch.save({f.name: getattr(state, f.name) for f in fields(state)}, _state_file(ckpt_dir))


def load_rl_state(ckpt_dir: Path, *, rank: int) -> RLState:
    """Every rank: return the saved RLState and restore this rank's RNG states to those at the save.

    The files hold pickled Python objects (the carried groups): load only checkpoints you trust. A rank the
    checkpoint has no RNG state for (resuming on more ranks) keeps its current RNG, with a warning.
    """
    state_file = _state_file(ckpt_dir)
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {ckpt_dir} is not a complete RL checkpoint")
    state = RLState(**torch.load(state_file, weights_only=False))
    rng_file = _rng_file(ckpt_dir, rank)
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        warnings.warn(
            f"{ckpt_dir} has no RNG state for rank {rank} (saved on fewer ranks): this rank continues with "
            "its current random generators, so the run is not bit-identical to an uninterrupted one",
            stacklevel=2,
        )
    return state
