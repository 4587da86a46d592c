"""examples/: every config loads, the 32B one is the paper's run, every ablation row is reachable, each
recipe's config fits the cluster its launch script asks Slurm for."""

import re
from pathlib import Path

import pytest

from megatron_dapo.config import PAPER_AIME24, PRESETS, load_config
from megatron_dapo.plan import Assumptions, Cluster, load_model_shape, make_plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_loads(path):
    load_config(path)


def test_32b_example_is_the_papers_run():
    cfg = load_config(EXAMPLES / "dapo_qwen32b.yaml")
    a, r, t, o, e = cfg.algorithm, cfg.rollout, cfg.train, cfg.optimizer, cfg.eval
    assert cfg.model.hf_path.endswith("Qwen2.5-32B") and cfg.data.train_path == "dapo-math-17k"
    assert (t.prompts_per_step, a.samples_per_prompt, t.samples_per_minibatch) == (512, 16, 512)
    assert t.prompts_per_step * a.samples_per_prompt // t.samples_per_minibatch == 16  # updates per step
    assert (r.max_response_tokens, a.overlong_buffer_tokens) == (20480, 4096)
    assert (a.clip_eps_low, a.clip_eps_high, a.loss_aggregation) == (0.2, 0.28, "token")
    assert a.overlong_penalty and not a.overlong_filtering and a.dynamic_sampling
    assert (o.lr, o.warmup_steps) == (1e-6, 20)
    assert (r.temperature, r.top_p) == (1.0, 1.0)
    assert e.path == "aime2024" and (e.samples_per_problem, e.temperature, e.top_p) == (
        32,
        1.0,
        0.7,
    )


def test_7b_example_differs_from_the_32b_one_only_in_model_layout_and_run_dir():
    big, small = (
        load_config(EXAMPLES / "dapo_qwen32b.yaml").to_dict(),
        load_config(EXAMPLES / "dapo_qwen7b.yaml").to_dict(),
    )
    for section in ("algorithm", "data", "optimizer", "train", "eval"):
        assert small[section] == big[section], section
    assert small["model"]["hf_path"].endswith("Qwen2.5-7B")


@pytest.mark.parametrize("row", list(PRESETS))
def test_every_ablation_row_is_reachable_at_32b(row):
    cfg = load_config(EXAMPLES / "ablation" / f"{row}.yaml")
    algorithm = cfg.to_dict()["algorithm"]
    assert {key: algorithm[key] for key in PRESETS[row]} == PRESETS[row]
    paper = load_config(EXAMPLES / "dapo_qwen32b.yaml").to_dict()
    ablation = cfg.to_dict()
    for section in ("data", "model", "parallel", "rollout", "optimizer", "train", "eval"):
        assert ablation[section] == paper[section], section  # only the algorithm changes
    assert ablation["logging"]["dir"] == f"runs/ablation/{row}"  # no two rows share checkpoints
    assert row in PAPER_AIME24


def test_ablation_rows_cover_the_table_and_nothing_else():
    assert sorted(p.stem for p in (EXAMPLES / "ablation").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize(("recipe", "config", "model"), [
    ("dapo_qwen32b.sh", "dapo_qwen32b.yaml", "qwen2.5-32b"),
    ("dapo_qwen7b.sh", "dapo_qwen7b.yaml", "qwen2.5-7b"),
])  # fmt: skip
def test_each_recipe_config_fits_the_nodes_its_script_asks_for(recipe, config, model):
    script = (REPO / "launch" / recipe).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", script, flags=re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", script, flags=re.M).group(1))
    assert f"dapo_model_defaults {model}" in script
    models = (REPO / "launch" / "models.sh").read_text()
    assert f"CONFIG:=examples/{config}" in models and f"NODES:=${{SLURM_JOB_NUM_NODES:-{nodes}}}" in models
    plan = make_plan(
        load_config(EXAMPLES / config), load_model_shape(model), Cluster(nodes, gpus), Assumptions()
    )
    assert plan.fits, [p.what for p in plan.problems]


def test_the_async_32b_example_is_the_papers_run_on_dedicated_nodes():
    cfg = load_config(EXAMPLES / "dapo_qwen32b_async.yaml")
    paper = load_config(EXAMPLES / "dapo_qwen32b.yaml")
    assert (cfg.rollout.max_staleness, cfg.rollout.partial, cfg.rollout.colocate) == (1, True, False)
    assert cfg.algorithm.rollout_is_cap == 2.0 and cfg.train == paper.train
    header = (EXAMPLES / "dapo_qwen32b_async.yaml").read_text()
    nodes = int(re.search(r"--nodes=(\d+)", header).group(1))
    rollout_nodes = int(re.search(r"ROLLOUT_NODES=(\d+)", header).group(1))
    plan = make_plan(
        cfg, load_model_shape("qwen2.5-32b"), Cluster(nodes, rollout_nodes=rollout_nodes), Assumptions()
    )
    assert plan.fits, [p.what for p in plan.problems]
    assert plan.time.async_s < plan.time.step_s  # overlapping pays on this split
