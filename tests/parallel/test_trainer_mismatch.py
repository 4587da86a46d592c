"""The mismatch metrics cover the whole step, whatever the layout: two data-parallel ranks, or two
context-parallel ranks sharing each sample, report what one process reports (2 gloo processes). So does a
sequence-level importance correction, whose ratio needs all of a sample's tokens: its metrics, loss and
gradient norm are one process's too."""

import pytest

from megatron_dapo.parallel.state import init_parallel
from megatron_dapo.trainer.policy.build import parallel_dims
from tests.helpers.distributed_pool import DistributedPool
from tests.helpers.policy_steps import MODEL_SEED, engine_model, first_step_metrics, policy_config, step_batch
from tests.helpers.tiny_models import save_tiny_checkpoint, tiny_config, tiny_hf_model

pytestmark = pytest.mark.slow

STALE_SEED = 21

NAMES = (
    "mismatch_kl",
    "mismatch_logprob_diff_mean",
    "mismatch_logprob_diff_max",
    "mismatch_ratio_outside_share",
    "first_update_ratio_max_abs_dev",
)
CORRECTED = (
    "algorithm.rollout_is_cap=2.5",
    "algorithm.rollout_is_level=sequence",
    "algorithm.rollout_is_mode=mask",
)
CORRECTED_NAMES = ("is_weight_mean", "is_masked_share", "loss", "grad_norm")


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(world_size=2) as p:
        yield p


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_checkpoint(
        tiny_hf_model(tiny_config("qwen2"), seed=MODEL_SEED), tmp_path_factory.mktemp("tiny")
    )


def step_metrics(hf_dir, stale_seed: int, names: tuple[str, ...], *overrides: str) -> dict[str, float]:
    cfg = policy_config(hf_dir, *overrides)
    pg = init_parallel(parallel_dims(cfg))
    metrics = first_step_metrics(cfg, pg, step_batch(engine_model(stale_seed)))
    return {name: metrics[name] for name in names}


@pytest.fixture(scope="module")
def one_process(hf_dir):
    """The metrics of one process holding the whole step, with one tensor of the engine stale: without
    and with the sequence-level correction."""
    with DistributedPool(world_size=1) as single:
        (metrics,) = single.run(step_metrics, hf_dir, STALE_SEED, NAMES)
        (corrected,) = single.run(step_metrics, hf_dir, STALE_SEED, CORRECTED_NAMES, *CORRECTED)
    return metrics, corrected


@pytest.mark.parametrize("layout", [[], ["parallel.context=2"]], ids=["dp2", "cp2"])
def test_every_layout_reports_the_whole_step(pool, one_process, hf_dir, layout):
    one_process, _ = one_process
    ranks = pool.run(step_metrics, hf_dir, STALE_SEED, NAMES, *layout)
    assert ranks[0] == ranks[1]  # every rank logs the same numbers
    # pi_old is recomputed in other micro-batches here, so equal up to fp32 rounding
    assert ranks[0] == pytest.approx(one_process, rel=1e-5, abs=1e-7)
    assert one_process["mismatch_kl"] > 0.01 and 0 < one_process["mismatch_ratio_outside_share"] < 1
    assert ranks[0]["first_update_ratio_max_abs_dev"] == 0.0


@pytest.mark.parametrize("layout", [[], ["parallel.context=2"]], ids=["dp2", "cp2"])
def test_a_sequence_level_correction_is_the_same_in_every_layout(pool, one_process, hf_dir, layout):
    _, corrected = one_process
    ranks = pool.run(step_metrics, hf_dir, STALE_SEED, CORRECTED_NAMES, *CORRECTED, *layout)
    assert ranks[0] == ranks[1]
    assert ranks[0] == pytest.approx(corrected, rel=1e-5, abs=1e-7)
    assert 0 < corrected["is_masked_share"] < 1  # some samples rejected, some kept
