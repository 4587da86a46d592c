"""The TransformerConfig of a Hugging Face config: the parallel layout checked at start, recompute wired."""

import pytest
import torch

from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.build import transformer_config
from megatron_dapo.parallel.state import ParallelDims
from tests.helpers.tiny_models import tiny_config


def arch():
    return GPTArch.from_hf_config(tiny_config("qwen2").to_dict())


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (ParallelDims(tp=4), "tensor parallel size 4 does not divide num_key_value_heads=2"),
        (ParallelDims(pp=3), "pipeline parallel size 3 does not divide num_hidden_layers=2"),
    ],
)
def test_model_that_does_not_split_is_refused(dims, message):
    with pytest.raises(ValueError, match=message):
        transformer_config(arch(), dims, params_dtype=torch.float32)


def test_world_size_must_be_a_multiple_of_the_model_parallel_size():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp\\*cp = 2\\*2\\*1 = 4"):
        ParallelDims(tp=2, pp=2).dp(6)
    assert ParallelDims(tp=2, cp=2).dp(8) == 2


def test_sequence_parallel_is_refused_on_cpu_only(monkeypatch):
    """The decision, on either kind of machine: the answer of torch.cuda.is_available() is set here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"set parallel\.sequence_parallel=false on CPU"):
        ParallelDims(tp=2, sequence_parallel=True).validate(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ParallelDims(tp=2, sequence_parallel=True).validate(2)
    with pytest.raises(ValueError, match=r"sequence_parallel=true needs parallel\.tp > 1"):
        ParallelDims(tp=1, sequence_parallel=True).validate(1)


def test_recompute_is_full_and_one_layer_at_a_time():
    """What plan/memory.py assumes of activations: each layer's input kept, one layer rebuilt in backward."""
    on = transformer_config(arch(), ParallelDims(), params_dtype=torch.float32, recompute_activations=True)
    assert (on.recompute_granularity, on.recompute_method, on.recompute_num_layers) == ("full", "uniform", 1)
    off = transformer_config(arch(), ParallelDims(), params_dtype=torch.float32)
    assert off.recompute_granularity is None
