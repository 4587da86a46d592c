"""tests/gpu runs only where CUDA is present: the one place a skip is acceptable.

Every test here carries the `gpu` marker; `@pytest.mark.gpu(n)` asks for n devices (default 1).
"""

from pathlib import Path

import pytest
import torch

_GPU_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if _GPU_DIR not in Path(str(item.path)).resolve().parents:
            continue
        marker = item.get_closest_marker("gpu")
        needed = marker.args[0] if marker is not None and marker.args else 1
        if devices == 0:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (tests/gpu runs only where CUDA is present)"))
        elif devices < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA devices, found {devices}"))
