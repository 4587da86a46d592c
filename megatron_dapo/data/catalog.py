"""The data sets shipped inside the package (data/sets/, provenance in its README.md), found by name.

A clone or a pip install has them with no network: `data.train_path=dapo-math-17k`, `dapo-eval --data
aime2024`, `dapo-prepare-data --source dapo-math-17k`. An existing file of the same name wins over a
shipped set, so a user's own `aime2024` file is never shadowed.
"""

import hashlib
from functools import cache
from pathlib import Path

SETS_DIR = Path(__file__).resolve().with_name("sets")
CHECKSUMS_FILE = SETS_DIR / "SHA256SUMS"

# Name -> file in SETS_DIR.
DATASETS = {
    "dapo-math-17k": "dapo_math_17k.parquet",
    "aime2024": "aime2024.jsonl",
    "aime2024-dapo": "aime2024_dapo.parquet",
    "aime2025": "aime2025.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
}


def dataset_file(name_or_path: str | Path) -> Path:
    """An existing file as given, else the shipped data set of that name (checksum verified once)."""
    path = Path(name_or_path)
    if path.is_file() or str(name_or_path) not in DATASETS:
        return path
    return _verified(DATASETS[str(name_or_path)])


def describe_missing(name_or_path: str | Path) -> str:
    """Why a dataset argument names nothing, with what it could have named."""
    return (
        f"dataset file not found: {name_or_path} "
        f"(neither a file nor a shipped data set: {', '.join(DATASETS)})"
    )


def expected_checksums() -> dict[str, str]:
    """File name -> sha256 hex digest, as SHA256SUMS lists them."""
    lines = CHECKSUMS_FILE.read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def _verified(file_name: str) -> Path:
    """The shipped file, refused if it differs from its checksum: a damaged install must not train."""
    path = SETS_DIR / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package: reinstall megatron-dapo")
    expected = expected_checksums()[file_name]
    if sha256(path) != expected:
        raise ValueError(f"{path} does not match its checksum in {CHECKSUMS_FILE}: reinstall megatron-dapo")
    return path
