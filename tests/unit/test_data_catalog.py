"""The shipped data sets: every file matches its checksum, names resolve from anywhere, a damaged file is
refused, an existing file wins over a name, and a wheel carries them all."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_dapo.data import catalog
from megatron_dapo.data.dataset import read_rows

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_file_matches_its_checksum_and_has_a_name() -> None:
    expected = catalog.expected_checksums()
    assert sorted(expected) == sorted(catalog.DATASETS.values())
    for file_name, digest in expected.items():
        assert catalog.sha256(catalog.SETS_DIR / file_name) == digest, file_name
    readme = (catalog.SETS_DIR / "README.md").read_text()
    assert all(f"`{name}`" in readme and file in readme for name, file in catalog.DATASETS.items())


def test_names_resolve_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert catalog.dataset_file("aime2025") == catalog.SETS_DIR / "aime2025.jsonl"
    assert len(read_rows("amc23")) == 40


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aime2024").write_text('{"problem": "1+1", "answer": "2"}\n')
    assert catalog.dataset_file("aime2024") == Path("aime2024")


def test_unknown_names_list_the_shipped_sets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"aime2204 \(neither a file nor a shipped data set: dapo-math-17k"
    ):
        read_rows("aime2204")


def test_a_damaged_shipped_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    sets = tmp_path / "sets"
    shutil.copytree(catalog.SETS_DIR, sets)
    with (sets / "math500.jsonl").open("r+b") as file:
        file.seek(1000)
        file.write(b"\xff" * 64)
    monkeypatch.setattr(catalog, "SETS_DIR", sets)
    monkeypatch.setattr(catalog, "CHECKSUMS_FILE", sets / "SHA256SUMS")
    catalog._verified.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"math500.jsonl does not match its checksum"):
            catalog.dataset_file("math500")
        assert catalog.dataset_file("gsm8k") == sets / "gsm8k_test.jsonl"
    finally:
        catalog._verified.cache_clear()


@pytest.mark.slow
def test_a_built_wheel_carries_every_shipped_file(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    skipped = shutil.ignore_patterns(".git", ".venv*", "build", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, source, ignore=skipped)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("megatron_dapo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file_name in [*catalog.DATASETS.values(), "SHA256SUMS", "README.md"]:
        assert f"megatron_dapo/data/sets/{file_name}" in names
