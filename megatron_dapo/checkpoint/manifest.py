"""Per-file checksums of a checkpoint, so that a corrupt or truncated file stops a resume by name instead of
loading "fine" and failing much later.

`MANIFEST` in a step directory maps every file's path (relative, POSIX) to its size and SHA-256; it is written
after every rank has closed its files and before the COMPLETE marker (rl_state.finish_save), so a checkpoint
is complete only with its checksums. SHA-256: hashlib's OpenSSL version uses the CPU's SHA extensions and was
faster than BLAKE2b on the (busy, 2-core) CI machine: 0.4-1.4 vs 0.3-0.8 GiB/s; a 1 GiB torch.save file took
1.3-2.3 s to hash against 10 s to write and fsync. Big runs split the hashing over the ranks
(trainer/checkpointing.py); the functions here take the list of files to hash.
"""

import hashlib
import json
from pathlib import Path

MANIFEST = "MANIFEST.json"
ALGORITHM = "sha256"
NOT_HASHED = frozenset({MANIFEST, "COMPLETE"})  # the manifest and rl_state.COMPLETE, written after it
Entry = dict[str, int | str]  # {"size": bytes, "sha256": hex digest}


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's file is missing, truncated or changed since the save (it does not match MANIFEST)."""


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Every regular file under `ckpt_dir` that the manifest covers, relative and sorted, largest first (so
    that a round-robin split over ranks gives each a similar amount to hash)."""
    ckpt_dir = Path(ckpt_dir)
    files = [
        p for p in ckpt_dir.rglob("*") if p.is_file() and p.relative_to(ckpt_dir).as_posix() not in NOT_HASHED
    ]
    files.sort(key=lambda p: (-p.stat().st_size, p.relative_to(ckpt_dir).as_posix()))
    return [p.relative_to(ckpt_dir).as_posix() for p in files]


def describe(ckpt_dir: Path, names: list[str]) -> dict[str, Entry]:
    """Size and checksum of each named file of `ckpt_dir`."""
    return {name: _entry(Path(ckpt_dir) / name) for name in names}


def _entry(path: Path) -> Entry:
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, ALGORITHM).hexdigest()
    return {"size": path.stat().st_size, ALGORITHM: digest}


def write_manifest(ckpt_dir: Path, entries: dict[str, Entry]) -> Path:
    """Write the manifest; `entries` must cover exactly the files now in `ckpt_dir`."""
    present = set(checkpoint_files(ckpt_dir))
    if present != set(entries):
        unhashed, gone = sorted(present - set(entries)), sorted(set(entries) - present)
        raise ValueError(f"{ckpt_dir}: checksums do not match the files (unhashed: {unhashed}, gone: {gone})")
    path = Path(ckpt_dir) / MANIFEST
    path.write_text(json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, indent=1))
    return path


def read_manifest(ckpt_dir: Path) -> dict[str, Entry] | None:
    """The saved entries, or None for a checkpoint written before checksums existed."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm {manifest['algorithm']!r}")
        entries = dict(manifest["files"])
        for name, entry in entries.items():
            _check_entry(name, entry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # any damage to the manifest
        raise CorruptCheckpointError(f"{path} is unreadable ({error!r})") from None
    return entries


def _check_entry(name: str, entry: Entry) -> None:
    """An entry as write_manifest writes it: a path inside the checkpoint, a size and a digest."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{name!r} is outside the checkpoint")
    if not isinstance(entry["size"], int) or not isinstance(entry[ALGORITHM], str):
        raise ValueError(f"{name!r}: {entry!r}")


def find_mismatch(ckpt_dir: Path, entries: dict[str, Entry]) -> str | None:
    """The first of `entries` whose file is missing or differs, described in one line; None if all match.
    The size is checked first: a truncated file is reported without reading it."""
    for name, expected in entries.items():
        path = Path(ckpt_dir) / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                return (
                    f"{path} has {size} bytes, the save wrote {expected['size']} (truncated or overwritten)"
                )
            if _entry(path)[ALGORITHM] != expected[ALGORITHM]:
                return f"{path} does not match its {ALGORITHM} in {MANIFEST} (changed after the save)"
        except OSError as error:  # reported like any other bad file: the other ranks wait for a verdict
            return f"{path} is unreadable ({error.strerror})"
    return None
