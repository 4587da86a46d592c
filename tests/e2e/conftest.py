"""The e2e modules' shared fixture: the demo's warm-started model and data, made once per module."""

from pathlib import Path

import pytest

from tests.helpers.demo_run import make_demo_inputs


@pytest.fixture(scope="module")
def demo_inputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_demo_inputs(request, tmp_path_factory)
