"""Shared test fixtures: where the shared data lives, and a fresh random seed per test."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: place ../shared beside the project checkout")
    return SHARED_DATA
