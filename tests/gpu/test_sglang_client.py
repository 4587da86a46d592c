"""The engine conformance checks (tests/helpers/engine_checks.py) against a real SGLang server (needs CUDA
and sglang installed).

Same client, same checks, same tiny model as tests/e2e/test_cpu_engine.py. SGLang runs it in float32 with its
torch-native attention and sampling backends so that log-probs compare with the float32 Hugging Face model.
Seeded reproducibility is not checked: SGLang honours sampling_seed only in its deterministic mode.
"""

import asyncio
from collections.abc import Iterator

import pytest

from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from tests.helpers.engine_checks import (
    CONFORMANCE_CHECKS,
    EngineUnderTest,
    check_name,
    load_model,
    save_engine_model,
)

pytestmark = pytest.mark.gpu

LOGPROB_TOLERANCE = 1e-3  # GPU float32 kernels against the CPU float32 model


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[EngineUnderTest]:
    model_dir = save_engine_model(tmp_path_factory.mktemp("sglang_model"))
    other = load_model(save_engine_model(tmp_path_factory.mktemp("other_model"), seed=1))
    spec = ServerSpec(
        model_path=str(model_dir),
        port=free_port(),
        engine="sglang",
        mem_fraction_static=0.3,
        enable_memory_saver=True,
        random_seed=0,
        log_file=str(tmp_path_factory.mktemp("sglang_log") / "sglang.log"),
        extra_args=(
            "--dtype", "float32", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
            "--disable-cuda-graph",
        ),
    )  # fmt: skip
    pool = ServerPool([spec], start_timeout_s=600)
    asyncio.run(pool.start())
    yield EngineUnderTest(pool, load_model(model_dir), other, LOGPROB_TOLERANCE, "cuda", abort_after_s=0.3)
    pool.stop()


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=check_name)
def test_conformance(engine, check):
    """Each check the CPU engine passes too (tests/e2e/test_cpu_engine.py)."""
    engine.run(check)
