"""dapo-plan: parameter counts against transformers, memory arithmetic, refusals with working fixes, CLI."""

import dataclasses
import heapq
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_dapo.cli.plan import main
from megatron_dapo.config import load_config
from megatron_dapo.plan import (
    DOES_NOT_FIT,
    GIB,
    NAMED_MODELS,
    Assumptions,
    Cluster,
    count_parameters,
    load_model_shape,
    make_plan,
    padded_vocab_size,
    stage_parameters,
)
from megatron_dapo.plan.decode import ServerSpeed, drain_rollout_s, mean_residual_tokens

PAPER_32B = "examples/dapo_qwen32b.yaml"


def _hf_parameter_count(hf_config: dict) -> int:
    """Parameters of the transformers model, built on the meta device (no memory)."""
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


_QWEN2 = dict(model_type="qwen2", hidden_size=48, intermediate_size=136, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, vocab_size=301)  # fmt: skip
_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
TINY = {
    "qwen2": {**_QWEN2, "tie_word_embeddings": False},
    "qwen2-tied": {**_QWEN2, "tie_word_embeddings": True},
    "llama": {**_SMALL, "model_type": "llama", "num_key_value_heads": 4, "vocab_size": 257},
    "qwen3": {**_SMALL, "model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 200},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_parameter_count_equals_transformers(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY[name]))
    assert count_parameters(load_model_shape(str(tmp_path))) == _hf_parameter_count(TINY[name])


@pytest.mark.parametrize("name", sorted(NAMED_MODELS))
def test_named_shapes_are_the_released_models(name):
    shape = load_model_shape(name)
    assert shape.vocab_size == 152064 and shape.qkv_bias and not shape.tie_word_embeddings
    assert count_parameters(shape) == _hf_parameter_count(NAMED_MODELS[name])


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied"])
def test_stages_hold_every_parameter_once(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY[name]))
    shape = load_model_shape(str(tmp_path))
    hidden, padding = shape.hidden_size, padded_vocab_size(shape.vocab_size, 1) - shape.vocab_size
    assert padding == 384 - 301
    for pp in (1, 3):
        held = sum(stage_parameters(shape, 1, pp, stage) for stage in range(pp))
        if not shape.tie_word_embeddings:
            expected = count_parameters(shape) + 2 * padding * hidden  # embedding and output layer padded
        elif pp == 1:
            expected = count_parameters(shape) + padding * hidden  # one shared, padded matrix
        else:
            expected = (
                count_parameters(shape) + (2 * padding + shape.vocab_size) * hidden
            )  # a copy on the last
        assert held == expected
    # TP 2: norms are whole on each rank; everything else is split in two.
    norms = shape.num_layers * 2 * hidden + hidden
    whole = stage_parameters(shape, 1, 1, 0)
    assert 2 * stage_parameters(shape, 2, 1, 0) - norms == whole


def test_paper_setup_fits_16_nodes_with_hand_checked_figures():
    cfg = load_config(PAPER_32B)
    shape = load_model_shape("qwen2.5-32b")
    plan = make_plan(cfg, shape, Cluster(nodes=16, gpus_per_node=8), Assumptions())
    assert plan.fits, plan.problems
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.servers) == (8, 2, 1, 8, 32)
    first = plan.stages[0]
    # Per GPU: bf16 weights (2 B), fp32 gradients (4 B), fp32 master + Adam moments (12 B) over DP 8.
    assert first.parameter_bytes == 2 * first.parameters
    assert first.gradient_bytes == 4 * first.parameters
    assert first.optimizer_bytes == pytest.approx(12 * first.parameters / 8)
    # 32 of 64 layers per stage, split over TP 8: about 32.76 B / 16 parameters per GPU.
    assert first.parameters == pytest.approx(32.76e9 / 16, rel=0.03)
    # Recompute keeps 2 micro-batches x 32 layers of [32768/8 tokens, 5120] bf16 inputs on the first stage.
    layer_inputs = 2 * 32 * 32768 / 8 * 5120 * 2
    assert layer_inputs < first.activation_bytes < layer_inputs + 2 * GIB
    # SGLang TP 4: K and V of 64 layers x 2 KV heads x 128 channels in bf16 per token per GPU.
    assert plan.rollout.kv_bytes_per_token == 2 * 64 * 2 * 128 * 2
    pool = 79.6 * GIB * 0.65 - count_parameters(shape) * 2 / 4
    assert plan.rollout.full_length_sequences_per_server == int(pool // (2 * 64 * 2 * 128 * 2)) // 22528


def test_step_time_follows_the_stated_assumptions():
    cfg = load_config(PAPER_32B)
    assume = Assumptions(decode_tokens_per_s_per_gpu=1000, tail_ms_per_token=20, mean_response_fraction=0.25)
    plan = make_plan(cfg, load_model_shape("qwen2.5-32b"), Cluster(nodes=16), assume)
    generated = 512 * 16 / 0.5 * 5120  # dynamic sampling keeps half the groups
    assert plan.time.generated_tokens == generated
    # By hand: 32 TP-4 servers; a full one (capacity sequences) decodes 4,000 tokens/s, one sequence alone a
    # token per 20 ms; the drain costs the base step per token of the longest sample beyond the mean residual.
    capacity = plan.rollout.mean_length_sequences_per_server
    per_sequence = (capacity / 4000 - 0.02) / (capacity - 1)
    residual = mean_residual_tokens(5120, assume.response_length_sigma, 20480)
    drain = (0.02 - per_sequence) * (20480 - residual)
    assert plan.time.rollout_s == pytest.approx(generated / (1000 * 128) + drain)
    assert 250 < drain < 400  # the tail is a third of the rollout, not hidden under the decode time
    slower = make_plan(
        cfg, load_model_shape("qwen2.5-32b"), Cluster(nodes=16), dataclasses.replace(assume, mfu=0.175)
    )
    assert slower.time.training_s == pytest.approx(2 * plan.time.training_s)


def test_mean_residual_matches_sampled_lengths():
    """E[L²] / 2E[L] of cut log-normal lengths, the median found from the mean, against a large sample."""
    rng = np.random.default_rng()
    cap, sigma = float(rng.integers(4000, 30000)), rng.uniform(0.3, 1.2)
    lengths = np.minimum(np.exp(rng.normal(np.log(cap / rng.uniform(2, 8)), sigma, 2_000_000)), cap)
    expected = (lengths**2).mean() / (2 * lengths.mean())
    assert mean_residual_tokens(lengths.mean(), sigma, cap) == pytest.approx(expected, rel=0.01)
    assert mean_residual_tokens(cap, sigma, cap) == cap / 2  # every sample at the cap


def _lockstep_server_s(lengths: np.ndarray, speed: ServerSpeed) -> float:
    """An independent reference: one server, a FIFO queue, each step step_s(n) for n running samples."""
    queue, running, clock, seconds = list(lengths[::-1]), [], 0.0, 0.0
    while running or queue:
        while queue and len(running) < speed.capacity:
            heapq.heappush(running, clock + queue.pop())
        finish = heapq.heappop(running)
        seconds += (finish - clock) * speed.step_s(len(running) + 1)
        clock = finish
    return seconds


def test_drain_matches_a_lockstep_server():
    """The closed-form synchronous rollout against a step-by-step server, at the paper's ratio of samples to
    slots (about five per slot) and with a few percent of samples at the cap."""
    rng = np.random.default_rng()
    capacity, cap, sigma = int(rng.integers(60, 160)), int(rng.integers(1000, 4000)), rng.uniform(0.8, 1.1)
    lengths = np.minimum(np.exp(rng.normal(np.log(cap / 4), sigma, 5 * capacity)), cap).round().clip(1)
    speed = ServerSpeed(rng.uniform(0.01, 0.03), rng.uniform(5e-5, 2e-4), capacity)
    full = lengths.sum() / speed.tokens_per_s(capacity)
    model = drain_rollout_s(lengths.sum(), speed, cap, mean_residual_tokens(lengths.mean(), sigma, cap))
    simulated = _lockstep_server_s(lengths, speed)
    assert model == pytest.approx(simulated, rel=0.1)
    assert 0.85 < (model - full) / (simulated - full) < 1.5  # the tail itself, not just the full part


def test_async_ranks_ahead_of_colocated_sync_on_the_paper_run():
    """The simulation (benchmarks/async_rollout.py) finds async at 80 rollout GPUs faster than colocated sync;
    the planner must rank them the same way (it did not while it ignored the drain)."""
    shape = load_model_shape("qwen2.5-32b")
    colocated = make_plan(load_config(PAPER_32B), shape, Cluster(nodes=16), Assumptions()).time
    cfg = load_config(PAPER_32B, ["rollout.colocate=false", "rollout.max_staleness=1"])
    overlapped = make_plan(cfg, shape, DEDICATED, Assumptions()).time
    assert overlapped.async_s < colocated.step_s


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["parallel.tensor=3"], "does not divide num_attention_heads"),
        (["parallel.pipeline=3"], "does not divide num_hidden_layers"),
        (["rollout.mem_fraction=0.2"], "KV cache"),
        (["rollout.mem_fraction=0.9"], "colocated rollout needs"),
        (["model.recompute_activations=false", "train.tokens_per_microbatch=65536"], "training needs"),
    ],
)
def test_impossible_plans_are_refused_with_a_fix_that_works(overrides, problem, capsys):
    args = ["--config", PAPER_32B, "--model", "qwen2.5-32b", "--nodes", "16", "--json", *overrides]
    assert main(args) == DOES_NOT_FIT
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and any(problem in p["what"] for p in report["problems"])
    assert report["fixes"]
    for fix in report["fixes"]:
        assert main([*args, *fix.split()]) == 0, fix
        capsys.readouterr()


def test_memory_fix_prefers_recompute(capsys):
    args = ["--config", PAPER_32B, "--model", "qwen2.5-32b", "--nodes", "16"]
    assert (
        main([*args, "model.recompute_activations=false", "train.tokens_per_microbatch=65536"])
        == DOES_NOT_FIT
    )
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "model.recompute_activations=true" in out.split("makes it fit")[1]


def test_too_few_nodes_suggests_more(capsys):
    args = ["--config", PAPER_32B, "--model", "qwen2.5-32b", "--json"]
    assert main([*args, "--nodes", "1"]) == DOES_NOT_FIT
    (fix,) = json.loads(capsys.readouterr().out)["fixes"]
    nodes = fix.split()[1]
    assert fix == f"--nodes {nodes} (sbatch --nodes={nodes})" and int(nodes) > 1
    assert main([*args, "--nodes", nodes]) == 0


def test_dedicated_rollout_must_match_the_config(capsys):
    args = [
        "--config",
        PAPER_32B,
        "--model",
        "qwen2.5-32b",
        "--nodes",
        "20",
        "--rollout-nodes",
        "4",
        "--json",
    ]
    assert main(args) == DOES_NOT_FIT
    assert "rollout.colocate=false" in json.loads(capsys.readouterr().out)["problems"][0]["what"]
    assert main([*args, "rollout.colocate=false"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"]["train_gpus"] == 128 and report["layout"]["servers"] == 8
    assert report["config"]["rollout"]["colocate"] is False


def test_table_and_model_from_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY["qwen2"]))
    args = ["--nodes", "1", "--gpus-per-node", "2", "--kernels", "local", f"model.hf_path={tmp_path}",
            "rollout.backend=cpu", "rollout.max_response_tokens=96", "algorithm.overlong_buffer_tokens=32",
            "train.tokens_per_microbatch=256", "data.max_prompt_tokens=64"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the CPU engine" in out and "FITS" in out and "only stage" in out and "SGLang, per GPU" not in out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--model", "qwen9-1t"], "not a named shape"),
        ([], "pass --model"),
        (["--model", "qwen2.5-7b", "rollout.top_p=2"], "rollout.top_p"),
        (["--model", "qwen2.5-7b", "--rollout-nodes", "1"], "--rollout-nodes"),
        (["--model", "qwen2.5-7b", "--gpu-memory-gib", "nan"], "--gpu-memory-gib"),
        (["--model", "qwen2.5-7b", "--mfu", "1.5"], "--mfu"),
        (["--model", "qwen2.5-7b", "--peak-tflops", "inf"], "--peak-tflops"),
        (["--model", "qwen2.5-7b", "--mean-prompt-tokens", "-3"], "--mean-prompt-tokens"),
        (["--model", "qwen2.5-7b", "--weight-sync-gb-per-s", "0"], "--weight-sync-gb-per-s"),
        (["--model", "qwen2.5-7b", "rollout.max_staleness=17"], "rollout.max_staleness"),
    ],
)
def test_unreadable_input_exits_2(argv, named, user_error):
    assert named in user_error(main, argv)


def test_plain_logprob_path_is_planned_against_the_chunked_one(capsys):
    cfg = load_config(PAPER_32B, ["model.logprob_chunk_tokens=0"])
    shape = load_model_shape("qwen2.5-32b")
    last = make_plan(cfg, shape, Cluster(nodes=16), Assumptions()).stages[-1]
    chunked = make_plan(load_config(PAPER_32B), shape, Cluster(nodes=16), Assumptions()).stages[-1]
    # Plain: fp32 logits of every token of the micro-batch over the TP shard of the padded vocabulary.
    assert last.logprob_bytes >= 32768 * padded_vocab_size(shape.vocab_size, 8) / 8 * 4
    assert last.logprobs_other == chunked.logprob_bytes < last.logprob_bytes / 5
    assert main(["--config", PAPER_32B, "--model", "qwen2.5-32b", "--nodes", "16",
                 "model.logprob_chunk_tokens=0"]) in (0, 1)  # fmt: skip
    out = capsys.readouterr().out
    assert "log-probs, plain path" in out and "(chunks of 1024 would be)" in out


DEDICATED = Cluster(nodes=16, rollout_nodes=10)


@pytest.mark.parametrize("eta", [1, 2])
@pytest.mark.parametrize(
    ("overrides", "changes", "slowest"),
    [
        ([], {}, "decode"),
        (["train.prompts_per_step=16", "train.samples_per_minibatch=256"], {}, "longest"),  # few samples
        ([], {"mfu": 0.05}, "training"),
    ],
)
def test_async_step_is_the_slower_side_and_sync_the_sum(eta, overrides, changes, slowest):
    cfg = load_config(PAPER_32B, ["rollout.colocate=false", f"rollout.max_staleness={eta}", *overrides])
    shape = load_model_shape("qwen2.5-32b")
    assume = dataclasses.replace(Assumptions(), **changes)
    plan = make_plan(cfg, shape, DEDICATED, assume)
    t = plan.time
    # By hand: 512 x 16 samples of 5,120 tokens, half the groups kept, on 10 nodes x 8 GPUs; 20,480 tokens on
    # a full server (its step: capacity sequences at the decode rate); the bf16 weights over the bandwidth.
    rate = assume.decode_rate(count_parameters(shape))
    decode = cfg.train.prompts_per_step * 16 / 0.5 * 5120 / (rate * 80)
    longest = 20480 * plan.rollout.mean_length_sequences_per_server / (rate * 4)
    sync = 2 * count_parameters(shape) / (assume.weight_sync_gb_per_s * 1e9)
    sides = {"decode": decode, "longest": longest / (eta + 1), "training": t.training_s}
    assert max(sides, key=sides.get) == slowest  # the case really exercises its branch
    assert t.decode_s == pytest.approx(decode) and t.weight_sync_s == pytest.approx(sync)
    assert t.longest_s == pytest.approx(longest)
    assert t.async_s == pytest.approx(sides[slowest] + sync)
    assert t.step_s == pytest.approx(decode + t.drain_s + t.training_s + sync) and t.drain_s > 0
    assert t.async_s < t.step_s


def test_async_line_only_with_staleness_on_dedicated_nodes(capsys):
    args = ["--config", PAPER_32B, "--model", "qwen2.5-32b", "--nodes", "16"]
    dedicated = [*args, "--rollout-nodes", "10", "rollout.colocate=false"]
    assert main([*dedicated, "rollout.max_staleness=0"]) == 0
    out = capsys.readouterr().out
    assert "weights " in out and "async" not in out
    assert main([*dedicated, "rollout.max_staleness=1"]) == 0
    plan = make_plan(
        load_config(PAPER_32B, ["rollout.colocate=false", "rollout.max_staleness=1"]),
        load_model_shape("qwen2.5-32b"),
        DEDICATED,
        Assumptions(),
    )
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "async" in line]
    assert line.split()[:3] == ["async", f"{plan.time.async_s:.0f}", "s"]
    with pytest.raises(SystemExit) as refused:  # colocated servers cannot generate while training
        main([*args, "rollout.max_staleness=1"])
    assert refused.value.code == 2 and "rollout.colocate=false" in capsys.readouterr().err
