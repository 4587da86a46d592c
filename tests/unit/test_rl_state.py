"""The atomic checkpoint directory protocol, its checksums checked at resume, and the RL state's exact round
trip (RNG included)."""

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_dapo.algo.sampling import DynamicSampler
from megatron_dapo.checkpoint.manifest import MANIFEST, CorruptCheckpointError
from megatron_dapo.checkpoint.rl_state import (
    COMPLETE,
    RLState,
    begin_save,
    checkpoint_step,
    complete_checkpoints,
    finish_save,
    latest_complete,
    load_rl_state,
    prune,
    save_rl_state,
    step_dir,
)
from megatron_dapo.config import CheckpointConfig, ConfigError
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.types import Completion, FinishReason
from megatron_dapo.trainer.policy.checkpointing import checkpoint_to_resume, resume_point

MODEL_FILE = "model.bin"  # stands in for model_io's files


def _draws() -> tuple:
    return (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    )


def _state(step: int) -> RLState:
    sampler = DynamicSampler(prompts_per_step=2)
    groups = [
        [Completion([7, 8, i], [-0.5, -1.0, -0.25], FinishReason.STOP)] for i in range(3)
    ]  # the loop's own objects, carried over as they are
    for group, correct in zip(groups, ([True, False], [False, True], [True, False]), strict=True):
        sampler.add(group, correct)
    sampler.take_batch()  # the third group is carried into the next step
    return RLState(
        step=step,
        loader={"epoch": 1, "offset": 37, "seed": 5, "shuffle": True, "num_prompts": 100},
        sampler=sampler.state_dict(),
        scheduler={"num_steps": step, "max_lr": 1e-6},
        extra={"updates": 16 * step, "weights": torch.randn(3)},
    )


def _save(root: Path, step: int, *, crash_before_publish: bool = False) -> Path:
    """The protocol as one rank runs it; a crash leaves the temporary directory behind."""
    tmp = begin_save(root, step)
    (tmp / MODEL_FILE).write_bytes(os.urandom(random.randrange(300_000, 400_000)))
    save_rl_state(tmp, _state(step), rank=0)
    save_rl_state(tmp, _state(step), rank=1)  # every rank writes files of its own
    if crash_before_publish:
        return tmp
    return finish_save(tmp)


def test_rl_state_round_trip_and_rng_continue_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    saved = _state(10)
    save_rl_state(tmp_path, saved, rank=0)
    expected = _draws()
    _draws()  # the run goes on (or a fresh process starts) before resuming

    loaded = load_rl_state(tmp_path, rank=0)
    assert _draws() == expected
    assert (loaded.step, loaded.loader, loaded.scheduler) == (saved.step, saved.loader, saved.scheduler)
    assert loaded.extra["updates"] == 160 and torch.equal(loaded.extra["weights"], saved.extra["weights"])
    resumed = DynamicSampler(prompts_per_step=2)
    resumed.load_state_dict(loaded.sampler)
    (carried,) = loaded.sampler["carried"]
    assert carried[0].token_ids == [7, 8, 2] and carried[0].finish_reason is FinishReason.STOP
    assert resumed.state_dict() == saved.sampler


def test_rng_is_per_rank(tmp_path):
    torch.manual_seed(0)
    save_rl_state(tmp_path, _state(1), rank=0)
    rank0_next = torch.rand(2)
    torch.manual_seed(99)
    save_rl_state(tmp_path, _state(1), rank=1)
    rank1_next = torch.rand(2)

    load_rl_state(tmp_path, rank=0)
    assert torch.equal(torch.rand(2), rank0_next)
    load_rl_state(tmp_path, rank=1)
    assert torch.equal(torch.rand(2), rank1_next)
    with pytest.warns(UserWarning, match="no RNG state for rank 2"):
        assert load_rl_state(tmp_path, rank=2).step == 1


def test_finish_save_publishes_a_complete_checkpoint(tmp_path):
    final = _save(tmp_path, 10)
    assert final == step_dir(tmp_path, 10) == tmp_path / "step_00000010"
    assert (final / COMPLETE).is_file() and (final / MODEL_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]  # no temporary directory left
    assert latest_complete(tmp_path) == final and checkpoint_step(final) == 10
    assert load_rl_state(final, rank=0).step == 10


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    assert latest_complete(tmp_path) is None
    previous = _save(tmp_path, 10)
    tmp = _save(tmp_path, 20, crash_before_publish=True)
    assert tmp.is_dir() and (tmp / "rl_state").is_dir()  # everything written, only the rename missing
    assert latest_complete(tmp_path) == previous
    assert complete_checkpoints(tmp_path) == [previous]
    # a final-named directory without the marker (e.g. a partial copy) is not complete either
    (tmp_path / "step_00000030").mkdir()
    assert latest_complete(tmp_path) == previous
    # the resumed run saves step 20 again, into a new temporary directory, and that one wins
    resaved = _save(tmp_path, 20)
    assert latest_complete(tmp_path) == resaved == step_dir(tmp_path, 20)


def test_prune_keeps_the_newest_and_temp_dirs_that_may_be_in_use(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    stale = _save(tmp_path, 20, crash_before_publish=True)
    an_hour_ago = time.time() - 3700
    for path in [stale, *stale.rglob("*")]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    recent = _save(tmp_path, 30, crash_before_publish=True)  # maybe another writer, still busy
    ahead = _save(tmp_path, 40, crash_before_publish=True)  # a save in progress, beyond the newest
    for path in [ahead, *ahead.rglob("*")]:
        os.utime(path, (an_hour_ago, an_hour_ago))

    assert prune(tmp_path, keep_last=0) == [stale]  # 0 keeps every complete checkpoint
    assert prune(tmp_path, keep_last=2) == [step_dir(tmp_path, 10)]
    assert [checkpoint_step(p) for p in complete_checkpoints(tmp_path)] == [20, 30]
    assert recent.is_dir() and ahead.is_dir()
    assert prune(tmp_path, keep_last=1) == [step_dir(tmp_path, 20)]
    assert latest_complete(tmp_path) == step_dir(tmp_path, 30)


def test_finish_save_refuses_to_overwrite_or_publish_a_foreign_directory(tmp_path):
    _save(tmp_path, 10)
    with pytest.raises(FileExistsError, match="step_00000010 already exists"):
        _save(tmp_path, 10)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="not a directory made by begin_save"):
        finish_save(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="not a complete RL checkpoint"):
        load_rl_state(tmp_path / "elsewhere", rank=0)


# ---------------------------------------------------------------- checksums, checked at resume


@pytest.fixture(scope="module")
def world():
    """resume_point is collective: a one-rank gloo group (tests/parallel checks two ranks)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_manifest_holds_size_and_sha256_of_every_file(tmp_path):
    final = _save(tmp_path, 10)
    files = json.loads((final / MANIFEST).read_text())["files"]
    on_disk = {
        p.relative_to(final).as_posix(): p for p in final.rglob("*") if p.is_file() and p.name != MANIFEST
    }
    assert set(files) == set(on_disk) - {COMPLETE}
    assert {MODEL_FILE, "rl_state/state.pt", "rl_state/rng_rank00000.pt", "rl_state/rng_rank00001.pt"} <= set(
        files
    )
    for name, entry in files.items():
        data = on_disk[name].read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _overwrite_with_ff(path: Path) -> None:
    """100 KB of 0xFF (half of a smaller file) at a random offset, as a bad disk or a stray writer leaves."""
    length = min(100_000, path.stat().st_size // 2)
    with path.open("r+b") as file:
        file.seek(random.randrange(path.stat().st_size - length))
        file.write(b"\xff" * length)


def _truncate(path: Path) -> None:
    os.truncate(path, random.randrange(path.stat().st_size))


DAMAGE = {
    "0xFF": (_overwrite_with_ff, "does not match its sha256"),
    "truncated": (_truncate, "truncated"),
    "deleted": (Path.unlink, "is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", [MODEL_FILE, "rl_state/rng_rank00001.pt"])
def test_a_damaged_file_stops_the_resume_naming_it(world, tmp_path, damage, name):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    assert resume_point(tmp_path, fallback=False) == newest  # intact: no complaint
    harm, message = DAMAGE[damage]
    harm(newest / name)
    with pytest.raises(CorruptCheckpointError, match=rf"{newest / name} .*{message}.*resume_fallback=true"):
        resume_point(tmp_path, fallback=False)
    assert complete_checkpoints(tmp_path) == [step_dir(tmp_path, 10), newest]  # nothing moved or deleted


def test_with_fallback_the_run_resumes_from_the_previous_checkpoint(world, tmp_path, caplog):
    previous = _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    _overwrite_with_ff(newest / MODEL_FILE)
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, fallback=True) == previous
    assert (
        f"{newest / MODEL_FILE} does not match" in caplog.text
        and "resuming from step_00000010" in caplog.text
    )
    [aside] = tmp_path.glob("step_00000020.corrupt-*")  # kept for inspection, no longer complete
    assert (aside / MODEL_FILE).is_file() and latest_complete(tmp_path) == previous
    assert load_rl_state(previous, rank=0).step == 10
    assert _save(tmp_path, 20) == newest  # the resumed run can save step 20 again


def test_fallback_never_starts_afresh_when_no_checkpoint_is_intact(world, tmp_path):
    for step in (10, 20):
        _truncate(_save(tmp_path, step) / MODEL_FILE)
    with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint.*step_00000020.*step_00000010"):
        resume_point(tmp_path, fallback=True)
    assert len(complete_checkpoints(tmp_path)) == 2  # nothing renamed


def test_a_checkpoint_from_before_checksums_loads_with_a_warning(world, tmp_path, caplog):
    old = _save(tmp_path, 10)
    (old / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, fallback=False) == old
    assert f"{old} has no checksums" in caplog.text
    assert load_rl_state(old, rank=0).step == 10


@pytest.mark.parametrize("content", ["{not json", '{"algorithm": "sha256", "files": {"../x": {}}}', "[]"])
def test_a_damaged_manifest_is_named(world, tmp_path, content):
    final = _save(tmp_path, 10)
    (final / MANIFEST).write_text(content)
    with pytest.raises(CorruptCheckpointError, match=rf"{final / MANIFEST} is unreadable"):
        resume_point(tmp_path, fallback=False)


def test_a_start_removes_the_temporary_directories_of_killed_saves_and_nothing_else(world, tmp_path):
    root = tmp_path / "checkpoints"
    newest = _save(root, 10)
    killed = [_save(root, step, crash_before_publish=True) for step in (10, 20)]  # older and newer steps
    kept = [root / "step_00000020.tmp-notes", root / "notes.tmp-abc", root / "step_00000030"]
    for path in kept:
        path.mkdir()
    (root / "step_00000040.tmp-abc").write_text("a file, not a save")
    outside = begin_save(tmp_path, 20)  # same name pattern, but not in the checkpoint directory
    assert all(path.is_dir() for path in killed)

    assert resume_point(root, fallback=False) == newest
    assert not any(path.exists() for path in killed)
    assert all(path.is_dir() for path in kept) and outside.is_dir()
    assert (root / "step_00000040.tmp-abc").is_file() and load_rl_state(newest, rank=0).step == 10


def test_a_new_run_never_starts_over_another_runs_checkpoints(tmp_path):
    step = random.randint(1, 10**6)
    (tmp_path / f"step_{step:08d}").mkdir()
    (tmp_path / f"step_{step:08d}" / COMPLETE).write_text("")
    with pytest.raises(
        ConfigError, match=f"checkpoint.resume=false but .* \\(the latest: step_{step:08d}\\)"
    ):
        checkpoint_to_resume(tmp_path, CheckpointConfig(resume=False))
