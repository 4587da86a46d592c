"""Shared test fixtures: where the shared data lives, and a fresh random seed per test.

The test session runs as one job does under launch/common.sh: one rollout API key in DAPO_API_KEY, which
the servers the tests launch, the clients, and the processes they spawn (training ranks, workers) all read.
"""

import os
from pathlib import Path

import pytest

from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key

os.environ.setdefault(API_KEY_ENV, new_api_key())
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: place ../shared beside the project checkout")
    return SHARED_DATA
