"""The config tree: YAML layering, dotted overrides, presets, and errors that name the key and the fix."""

import itertools

import pytest
import yaml

from megatron_dapo.config import PRESETS, ConfigError, DapoConfig, from_dict, load_config


def test_defaults_are_the_paper_settings():
    cfg = DapoConfig()
    a = cfg.algorithm
    assert (a.clip_eps_low, a.clip_eps_high, a.samples_per_prompt) == (0.2, 0.28, 16)
    assert (cfg.rollout.max_response_tokens, a.overlong_buffer_tokens) == (20480, 4096)
    assert cfg.train.prompts_per_step * a.samples_per_prompt // cfg.train.samples_per_minibatch == 16
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps) == (1e-6, 20)
    assert (cfg.eval.samples_per_problem, cfg.eval.temperature, cfg.eval.top_p) == (32, 1.0, 0.7)


def test_yaml_inherit_preset_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout:\n  temperature: 0.9\n  top_p: 0.8\ntrain:\n  steps: 7\n")
    (tmp_path / "run.yaml").write_text(
        "inherit: base.yaml\npreset: clip_higher\nrollout:\n  top_p: 0.95\nalgorithm:\n  dual_clip: 3\n"
    )
    cfg = load_config(
        tmp_path / "run.yaml", ["train.steps=9", "rollout.server_urls=[http://a:1, http://b:2]"]
    )
    assert cfg.rollout.temperature == 0.9  # inherited
    assert cfg.rollout.top_p == 0.95  # the file beats what it inherits
    assert cfg.train.steps == 9  # the command line beats the file
    assert cfg.rollout.server_urls == ["http://a:1", "http://b:2"]
    assert cfg.algorithm.clip_eps_high == 0.28 and cfg.algorithm.loss_aggregation == "sample"  # the preset
    assert cfg.algorithm.dual_clip == 3.0 and isinstance(cfg.algorithm.dual_clip, float)


def test_presets_add_one_technique_per_row():
    rows = list(PRESETS)
    assert rows == ["naive_grpo", "overlong_filtering", "clip_higher", "soft_overlong", "token_level", "dapo"]
    changed = [{k for k in PRESETS[b] if PRESETS[b][k] != PRESETS[a][k]} for a, b in itertools.pairwise(rows)]
    assert changed == [
        {"overlong_filtering"},
        {"clip_eps_high"},
        {"overlong_filtering", "overlong_penalty"},
        {"loss_aggregation"},
        {"dynamic_sampling"},
    ]
    naive = from_dict({"preset": "naive_grpo"}).algorithm
    assert naive.clip_eps_high == naive.clip_eps_low and not naive.dynamic_sampling
    dapo = from_dict({"preset": "dapo"}).algorithm
    default = DapoConfig().algorithm
    assert all(getattr(dapo, k) == getattr(default, k) for k in PRESETS["dapo"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.topp=0.7", "unknown key rollout.topp; did you mean rollout.top_p?"),
        ("algorithm.clip_eps_low=1.5", "algorithm.clip_eps_low: must be in [0, 1)"),
        ("algorithm.loss_aggregation=mean", "algorithm.loss_aggregation: 'mean' is not allowed"),
        ("train.samples_per_minibatch=500", "train.samples_per_minibatch: must divide"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("model.dtype=fp8", "model.dtype: 'fp8' is not allowed"),
        ("algorithm.overlong_buffer_tokens=30000", "algorithm.overlong_buffer_tokens: must be in (0,"),
        ("preset=best", "preset: unknown preset 'best'"),
        ("rollout", "write it as section.field=value"),
        ("bogus.field=1", "unknown key bogus"),
        ("algorithm.dual_clip=0.5", "algorithm.dual_clip: must be > 1"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel: needs parallel.tensor > 1"),
        ("train.tokens_per_microbatch=16384", "train.tokens_per_microbatch: must hold the longest sample"),
    ],
)
def test_bad_values_name_the_key_and_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_yaml_round_trip():
    cfg = load_config(None, ["preset=token_level", "rollout.top_k=20"])
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_a_files_preset_beats_what_it_inherits(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "preset: dapo\nalgorithm:\n  clip_eps_high: 0.3\n  samples_per_prompt: 8\n"
    )
    (tmp_path / "row.yaml").write_text("inherit: base.yaml\npreset: naive_grpo\n")
    a = load_config(tmp_path / "row.yaml").algorithm
    assert a.clip_eps_high == 0.2 and a.loss_aggregation == "sample"  # the child's preset beats the parent
    assert a.samples_per_prompt == 8  # what the preset does not name is inherited
    b = load_config(tmp_path / "base.yaml", ["preset=clip_higher", "algorithm.clip_eps_high=0.25"]).algorithm
    assert b.loss_aggregation == "sample" and b.clip_eps_high == 0.25
