"""dapo-plan: will a DAPO run fit, and how long will a step take (the library: megatron_dapo/plan/).

Exit status 0: it fits; 2: a config or model it cannot read; 3 (DOES_NOT_FIT): it does not fit.
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from megatron_dapo.config import DapoConfig, load_config
from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.plan import (
    DOES_NOT_FIT,
    NAMED_MODELS,
    Assumptions,
    Cluster,
    find_fixes,
    format_plan,
    load_model_shape,
    make_plan,
)


def _parser() -> argparse.ArgumentParser:
    defaults = Assumptions()
    cluster = Cluster()
    parser = argparse.ArgumentParser(
        prog="dapo-plan",
        description="Per-GPU memory, parallel layout and step time of a DAPO run; exits 3 if it cannot fit",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    parser.add_argument("--config", help="run config YAML (load_config)")
    parser.add_argument(
        "--model",
        help=f"named shape ({', '.join(NAMED_MODELS)}), a config.json or an HF directory; "
        "default: model.hf_path of the config",
    )
    parser.add_argument(
        "--nodes", type=int, default=cluster.nodes, help="nodes in the job, rollout nodes included"
    )
    parser.add_argument("--gpus-per-node", type=int, default=cluster.gpus_per_node)
    parser.add_argument("--gpu-memory-gib", type=float, default=cluster.gpu_memory_gib)
    parser.add_argument(
        "--rollout-nodes", type=int, default=0, help="nodes dedicated to SGLang; 0: colocated"
    )
    group = parser.add_argument_group("assumptions")
    group.add_argument(
        "--kernels",
        choices=["te", "local"],
        default=defaults.kernels,
        help="te: GPU (Transformer Engine, flash attention); local: megatron's local spec (CPU)",
    )
    group.add_argument(
        "--distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=defaults.distributed_optimizer,
    )
    group.add_argument("--grad-fp32", action=argparse.BooleanOptionalAction, default=defaults.grad_fp32)
    for name in (
        "reserved_gib",
        "peak_tflops",
        "mfu",
        "decode_tokens_per_s_per_gpu",
        "tail_ms_per_token",
        "weight_sync_gb_per_s",
        "mean_response_fraction",
        "response_length_sigma",
        "kept_group_fraction",
    ):
        group.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    group.add_argument("--mean-prompt-tokens", type=int, default=defaults.mean_prompt_tokens)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    parser.add_argument("--save-json", metavar="PATH", help="also write the plan as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with exit_on_user_error("dapo-plan", ValueError):  # ValueError: a model shape or cluster it cannot use
        cfg = load_config(args.config, args.overrides)
        shape = load_model_shape(args.model or _model_from_config(cfg))
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.rollout_nodes)
        _check_cluster(cluster)
        assume = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
        _check_assumptions(assume)
    plan = make_plan(cfg, shape, cluster, assume)
    if not plan.fits:
        plan.fixes = find_fixes(args.config, args.overrides, shape, cluster, assume)
    report = plan.to_dict()
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else DOES_NOT_FIT


def _model_from_config(cfg: DapoConfig) -> str:
    if not cfg.model.hf_path:
        raise ValueError("no model: pass --model (a named shape or a config.json) or set model.hf_path")
    return cfg.model.hf_path


def _check_cluster(cluster: Cluster) -> None:
    for name in ("nodes", "gpus_per_node"):
        if getattr(cluster, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= cluster.rollout_nodes < cluster.nodes:
        raise ValueError(f"--rollout-nodes must be in [0, --nodes={cluster.nodes})")
    if not 0 < cluster.gpu_memory_gib < math.inf:
        raise ValueError(f"--gpu-memory-gib must be > 0, got {cluster.gpu_memory_gib}")


_FRACTIONS = ("mfu", "mean_response_fraction", "kept_group_fraction")
_DIVISORS = ("peak_tflops", "weight_sync_gb_per_s")  # rates the plan divides by: 0 has no meaning


def _check_assumptions(assume: Assumptions) -> None:
    """Every number is finite and >= 0 (0 means "derive it" where a field says so), fractions in (0, 1],
    the rates the plan divides by > 0."""
    for name in (f.name for f in dataclasses.fields(Assumptions)):
        value = getattr(assume, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flag = f"--{name.replace('_', '-')}"
        if name in _FRACTIONS and not 0 < value <= 1:
            raise ValueError(f"{flag} must be in (0, 1], got {value}")
        if name in _DIVISORS and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


if __name__ == "__main__":
    sys.exit(main())
