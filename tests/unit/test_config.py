"""The config tree: YAML layering, dotted overrides, presets, and errors that name the key and the fix."""

import dataclasses
import itertools
import math
import random
import re
import typing

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_dapo.cli import demo, plan, train
from megatron_dapo.config import (
    PRESETS,
    RANGES,
    ConfigError,
    DapoConfig,
    Interval,
    from_dict,
    load_config,
    validate_launch,
)


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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.rollout_is_level=sequence"],
            "algorithm.rollout_is_level: sequence needs algorithm.rollout_is_cap",
        ),
        (
            ["algorithm.rollout_is_mode=mask"],
            "algorithm.rollout_is_mode: mask needs algorithm.rollout_is_cap",
        ),
        (
            ["algorithm.rollout_is_lower=0.5"],
            "algorithm.rollout_is_lower: 0.5 needs algorithm.rollout_is_cap",
        ),
        (
            ["algorithm.rollout_is_cap=2", "algorithm.rollout_is_lower=0.5"],
            "algorithm.rollout_is_lower: applies to algorithm.rollout_is_mode=mask only",
        ),
        (
            ["algorithm.rollout_is_cap=2", "algorithm.rollout_is_level=geometric"],
            "algorithm.rollout_is_level: geometric is a rejection criterion",
        ),
        (
            ["algorithm.rollout_is_cap=1", "algorithm.rollout_is_mode=mask"],
            "algorithm.rollout_is_cap: mask mode keeps ratios in [rollout_is_lower, rollout_is_cap] = [1, 1]",
        ),
        (
            [
                "algorithm.rollout_is_cap=1.001",
                "algorithm.rollout_is_mode=mask",
                "algorithm.rollout_is_lower=0",
            ],
            "algorithm.rollout_is_lower: must be in (0, 1)",
        ),
        (["algorithm.rollout_is_level=batch"], "algorithm.rollout_is_level: 'batch' is not allowed"),
    ],
)
def test_importance_settings_that_cannot_work_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.rollout_is_cap=2"],
        ["algorithm.rollout_is_cap=2", "algorithm.rollout_is_level=sequence"],
        [
            "algorithm.rollout_is_cap=3",
            "algorithm.rollout_is_level=sequence",
            "algorithm.rollout_is_mode=mask",
        ],
        [
            "algorithm.rollout_is_cap=1.001",
            "algorithm.rollout_is_level=geometric",
            "algorithm.rollout_is_mode=mask",
            "algorithm.rollout_is_lower=0.999",
        ],
    ],
)
def test_importance_settings_that_work_load(overrides):
    a = load_config(None, overrides).algorithm
    assert (a.rollout_is_cap, a.rollout_is_level, a.rollout_is_mode) != (None, "token", "truncate")


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


# ---- values that cannot work stop every entry point at start (issue 16, item 7) --------------------------

# The values of the issue, each with the key its one-line error must name.
IMPOSSIBLE_VALUES = [
    ("eval.top_p=1.5", "eval.top_p"),
    ("eval.temperature=-1", "eval.temperature"),
    ("eval.max_response_tokens=-3", "eval.max_response_tokens"),
    ("rollout.temperature=.inf", "rollout.temperature"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.adam_beta1=1.5", "optimizer.adam_beta1"),
    ("optimizer.weight_decay=-5", "optimizer.weight_decay"),
    ("optimizer.adam_eps=-1", "optimizer.adam_eps"),
    ("train.steps=-5", "train.steps"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("algorithm.clip_eps_high=.nan", "algorithm.clip_eps_high"),
    ("rollout.top_p=[", "override 'rollout.top_p=['"),  # malformed YAML
    ("rollout.bogus=1", "unknown key rollout.bogus"),
]


@pytest.mark.parametrize(("override", "named"), IMPOSSIBLE_VALUES)
def test_dapo_train_refuses_impossible_values_in_one_line(override, named, user_error):
    assert f"dapo-train: error: {named}" in user_error(train.main, [override])


@pytest.mark.parametrize(("override", "named"), IMPOSSIBLE_VALUES)
def test_the_demo_refuses_them_before_preparing_anything(override, named, user_error, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the demo sets it; keep it from leaking into other tests
    threads = torch.get_num_threads()
    try:
        err = user_error(demo.main, ["--out", str(tmp_path / "demo"), override])
    finally:
        torch.set_num_threads(threads)
    assert f"dapo-demo: error: {named}" in err
    assert not (tmp_path / "demo").exists()  # failed before the warm start and before clearing outputs


def test_dapo_plan_refuses_them_too(user_error):
    assert "dapo-plan: error: optimizer.adam_eps" in user_error(
        plan.main, ["--model", "qwen2.5-7b", "optimizer.adam_eps=-1"]
    )


def test_tensor_parallel_over_one_process_names_the_field(user_error, monkeypatch):
    """Started without torchrun the job is one process: TP=2 cannot be laid out, and says so before any
    process group forms."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # an earlier in-process run may have set them
        monkeypatch.delenv(name, raising=False)
    err = user_error(train.main, ["parallel.tensor=2"])
    assert err.startswith("dapo-train: error: parallel.tensor=2: tensor x pipeline x context = 2 must divide")
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("world_size", "cuda", "overrides", "named"),
    [
        (4, True, ["parallel.tensor=8"], "parallel.tensor=8"),
        (6, True, ["parallel.tensor=2", "parallel.pipeline=2"], "parallel.tensor=2, parallel.pipeline=2"),
        (3, True, ["parallel.context=2", "train.tokens_per_microbatch=20000"], "parallel.context=2"),
        (2, False, ["parallel.tensor=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    ],
)
def test_launch_checks_name_the_fields(world_size, cuda, overrides, named):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, world_size=world_size, cuda=cuda)
    assert str(err.value).startswith(f"{named}: ")
    validate_launch(cfg, world_size=world_size * 8 if cuda else 8, cuda=True)  # enough processes: accepted


def _numeric_fields(cls: type = DapoConfig, where: str = "") -> list[str]:
    """Every int or float field of the tree (optional ones included), as section.field."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            found += _numeric_fields(hint, key)
        elif set(typing.get_args(hint) or (hint,)) - {type(None)} <= {int, float} and hint is not bool:
            found.append(key)
    return found


def test_every_numeric_field_has_a_range():
    assert sorted(RANGES) == sorted(_numeric_fields())


def _outside(allowed: Interval, rng: random.Random) -> list[float]:
    """Random values just outside each finite end of `allowed`, and the ends themselves when excluded."""
    below = [allowed.low - rng.randint(1, 1000)] + ([allowed.low] if allowed.ends[0] == "(" else [])
    above = [] if allowed.high == math.inf else [allowed.high + rng.randint(1, 1000)]
    return below + above + ([allowed.high] if allowed.ends[1] == ")" and allowed.high < math.inf else [])


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_field_refuses_values_outside_its_range(key):
    rng = random.Random()
    section, name = key.split(".")
    is_float = typing.get_type_hints(type(getattr(DapoConfig(), section)))[name] is not int
    bad = _outside(RANGES[key], rng) + ([math.nan, math.inf, -math.inf] if is_float else [])
    for value in bad:
        value = value if is_float else int(value)
        with pytest.raises(ConfigError) as err:
            from_dict({section: {name: value}})
        message = str(err.value)
        assert message.startswith(f"{key}: must be ") and "\n" not in message, (value, message)


def test_a_malformed_config_file_is_one_line(tmp_path, user_error):
    (tmp_path / "bad.yaml").write_text("rollout:\n  top_p: 0.7\n   temperature: [1\n")
    err = user_error(train.main, ["--config", str(tmp_path / "bad.yaml")])
    assert err.startswith(f"dapo-train: error: {tmp_path / 'bad.yaml'}: not valid YAML at line ")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  steps: 3  # pas réglé\n".encode("latin-1"))
    err = user_error(train.main, ["--config", str(tmp_path / "latin1.yaml")])
    assert f"{tmp_path / 'latin1.yaml'}: not UTF-8 text" in err


def test_an_inherit_loop_is_one_line(tmp_path, user_error):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\ntrain:\n  steps: 3\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    err = user_error(train.main, ["--config", str(tmp_path / "a.yaml")])
    assert (
        f"inherit: {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'} is a loop" in err
    )
    (tmp_path / "self.yaml").write_text("inherit: self.yaml\n")
    assert "is a loop" in user_error(train.main, ["--config", str(tmp_path / "self.yaml")])


def test_scientific_notation_without_a_dot_is_a_number():
    """YAML 1.1 reads `1e-6` as text; a float field takes it as the number everyone means by it."""
    rng = random.Random()
    mantissa, exponent = rng.randint(1, 9), rng.randint(1, 9)
    cfg = load_config(
        None, [f"optimizer.lr={mantissa}e-{exponent}", f"optimizer.adam_eps={mantissa}E-{exponent}"]
    )
    assert cfg.optimizer.lr == cfg.optimizer.adam_eps == float(f"{mantissa}e-{exponent}")
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr: expected a number, got '1e-'")):
        load_config(None, ["optimizer.lr=1e-"])
    with pytest.raises(ConfigError, match=re.escape("train.steps: expected an integer")):
        load_config(None, ["train.steps=1e3"])  # an integer field stays strict


def test_overlapped_generation_needs_servers_on_their_own_gpus():
    with pytest.raises(ConfigError, match=r"rollout.max_staleness: .*rollout.colocate=false"):
        from_dict({"rollout": {"max_staleness": 1, "colocate": True, "backend": "sglang"}})
    from_dict({"rollout": {"max_staleness": 1, "colocate": False, "backend": "sglang"}})
    from_dict({"rollout": {"max_staleness": 2, "backend": "cpu"}})  # the CPU engine: no GPUs
    with pytest.raises(ConfigError, match=r"rollout.max_staleness: must be in \[0, 16\]"):
        from_dict({"rollout": {"max_staleness": 17, "colocate": False}})


def test_the_demo_refuses_a_run_directory_given_as_an_override(tmp_path):
    from megatron_dapo.demo.run import demo_config

    with pytest.raises(ConfigError, match=r"logging\.dir: .*--out"):
        demo_config(tmp_path, {"model": tmp_path, "train": tmp_path, "eval": tmp_path}, ["logging.dir=x"])
