"""Changes that make a plan fit, each verified by planning again."""

import dataclasses
import math

from megatron_dapo.config import ConfigError, DapoConfig, load_config
from megatron_dapo.plan.assumptions import Assumptions
from megatron_dapo.plan.fit import make_plan
from megatron_dapo.plan.layout import Cluster
from megatron_dapo.plan.memory import CHUNK_TOKENS
from megatron_dapo.plan.shape import ModelShape


def candidate_fixes(cfg: DapoConfig, shape: ModelShape, cluster: Cluster) -> list[str]:
    """Single config changes worth trying, the cheapest in speed first, as dotted overrides."""
    m, p, r, t = cfg.model, cfg.parallel, cfg.rollout, cfg.train
    fixes = []
    if not m.recompute_activations:
        fixes.append("model.recompute_activations=true")
    if p.tensor > 1 and not p.sequence_parallel:
        fixes.append("parallel.sequence_parallel=true")
    if m.logprob_chunk_tokens == 0:
        fixes.append(f"model.logprob_chunk_tokens={CHUNK_TOKENS}")
    fitted_tokens = _round_up(-(-(cfg.data.max_prompt_tokens + r.max_response_tokens) // p.context), 1024)
    if fitted_tokens != t.tokens_per_microbatch:
        fixes.append(f"train.tokens_per_microbatch={fitted_tokens}")
    tp_sizes = _divisors(math.gcd(shape.num_query_groups, shape.num_attention_heads, shape.ffn_hidden_size))
    fixes += [f"parallel.tensor={tp}" for tp in tp_sizes if tp > p.tensor and tp <= cluster.gpus_per_node]
    fixes += [f"parallel.pipeline={pp}" for pp in _divisors(shape.num_layers) if pp > p.pipeline]
    fixes += [f"parallel.pipeline={pp}" for pp in reversed(_divisors(shape.num_layers)) if pp < p.pipeline]
    if r.backend == "sglang":
        fixes += [f"rollout.server_tp={tp}" for tp in _divisors(cluster.gpus_per_node) if tp > r.server_tp]
        fixes += [f"rollout.mem_fraction={f}" for f in (0.6, 0.5, 0.4, 0.8, 0.85) if f != r.mem_fraction]
    fixes += [f"parallel.context={cp}" for cp in (2, 4, 8) if cp > p.context]
    return fixes


def find_fixes(
    config_path: str | None, overrides: list[str], shape: ModelShape, cluster: Cluster, assume: Assumptions
) -> list[str]:
    """Changes that make the plan fit, each verified by planning again: up to three single overrides, else one
    chain of overrides (space-separated) built greedily from the candidates, else more nodes."""
    cfg = load_config(config_path, overrides)
    candidates = candidate_fixes(cfg, shape, cluster)
    singles = [
        fix for fix in candidates if _badness(config_path, [*overrides, fix], shape, cluster, assume) == 0
    ]
    if singles:
        return singles[:3]
    chain: dict[str, str] = {}  # key -> override, so a later value of the same key replaces the earlier
    best = _badness(config_path, overrides, shape, cluster, assume)
    for fix in candidates:
        trial = {**chain, fix.partition("=")[0]: fix}
        badness = _badness(config_path, [*overrides, *trial.values()], shape, cluster, assume)
        if badness < best:
            chain, best = trial, badness
        if best == 0:
            return [" ".join(chain.values())]
    for factor in (2, 4, 8):
        bigger = dataclasses.replace(cluster, nodes=cluster.nodes * factor)
        if _badness(config_path, overrides, shape, bigger, assume) == 0:
            return [f"--nodes {bigger.nodes} (sbatch --nodes={bigger.nodes})"]
    return []


def _badness(
    config_path: str | None, overrides: list[str], shape: ModelShape, cluster: Cluster, assume: Assumptions
) -> float:
    """0 when the plan fits; a problem that is not memory outweighs any number of bytes over."""
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError:
        return math.inf
    problems = make_plan(cfg, shape, cluster, assume).problems
    return sum(p.excess_bytes or 1e30 for p in problems)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
