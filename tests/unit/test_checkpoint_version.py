"""A Megatron checkpoint records the megatron-core release that saved it; one saved by a newer release than
the installed one is refused with the ways through (the conversion tools, which read it, or an upgrade)."""

import json
import random

import pytest
import torch
from packaging.version import Version

from megatron_dapo.checkpoint import convert
from megatron_dapo.checkpoint.meta import META_FILE, installed_megatron_core, read_meta
from megatron_dapo.checkpoint.model_io import load_model, save_model
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.parallel.state import ParallelDims
from tests.helpers.tiny_models import single_process_groups, tiny_config, tiny_hf_model

CONFIG = tiny_config("qwen2")


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as pg:
        yield pg


def _model(groups, seed: int):
    model = build_gpt_model(CONFIG, ParallelDims(), groups)
    load_hf_weights(model, CONFIG, tiny_hf_model(CONFIG, seed=seed).state_dict().__getitem__, groups)
    return model


def _assert_same_weights(expected, actual) -> None:
    pairs = zip(expected.state_dict().items(), actual.state_dict().items(), strict=True)
    for (name, a), (_, b) in pairs:
        if isinstance(a, torch.Tensor):  # not the modules' extra state
            assert torch.equal(a, b), name


def _edit_meta(ckpt, **changes) -> None:
    """Rewrite dapo_checkpoint.json with `changes` (a value of None deletes the key)."""
    path = ckpt / META_FILE
    record = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({key: value for key, value in record.items() if value is not None}))


def _shifted(version: str, minor: int = 0, micro: int = 0) -> str:
    major, old_minor, old_micro = (*Version(version).release, 0, 0)[:3]
    return f"{major}.{old_minor + minor}.{old_micro + micro}"


def test_newer_megatron_core_checkpoint_is_refused_with_the_ways_through(groups, tmp_path):
    seeds = random.Random().sample(range(1000), 2)
    saved = _model(groups, seeds[0])
    CONFIG.save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    save_model(saved, ckpt, hf_dir=tmp_path / "hf")
    installed = installed_megatron_core()
    assert read_meta(ckpt).megatron_core == installed

    # The same release, a newer patch of it, or an older release: loads, weight for weight.
    for version in (installed, _shifted(installed, micro=1), "0.1.0"):
        _edit_meta(ckpt, megatron_core=version)
        loaded = _model(groups, seeds[1])
        load_model(loaded, ckpt)
        _assert_same_weights(saved, loaded)

    newer = _shifted(installed, minor=1)
    _edit_meta(ckpt, megatron_core=newer)
    with pytest.raises(ValueError) as error:
        load_model(_model(groups, seeds[1]), ckpt)
    message = str(error.value)
    assert f"megatron-core {newer}, newer than the installed {installed}" in message
    assert f"`dapo-reshard {ckpt} OUT_DIR`" in message
    assert f"`dapo-convert-megatron-to-hf {ckpt} OUT_DIR`" in message
    assert f"pip install 'megatron-core>={newer}'" in message

    # The ways through work: the tools read the checkpoint whatever release saved it, and write a layout
    # every release reads.
    convert.megatron_to_hf(ckpt, tmp_path / "hf_out")
    assert (tmp_path / "hf_out" / "model.safetensors").is_file()
    convert.reshard(ckpt, tmp_path / "resharded", tp=1, pp=1)
    loaded = _model(groups, seeds[1])
    load_model(loaded, tmp_path / "resharded")
    _assert_same_weights(saved, loaded)


def test_converted_and_older_checkpoints_load_without_a_recorded_release(groups, tmp_path):
    seed = random.Random().randrange(1000)
    tiny_hf_model(CONFIG, seed=seed).save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    convert.hf_to_megatron(tmp_path / "hf", ckpt)
    assert read_meta(ckpt).megatron_core is None  # the tools write a layout every release reads
    _edit_meta(ckpt, megatron_core=None)  # as written before the field existed
    loaded = _model(groups, seed + 1)
    load_model(loaded, ckpt)
    _assert_same_weights(_model(groups, seed), loaded)
