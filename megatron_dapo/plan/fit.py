"""The plan put together: layout, memory, SGLang and time for one config on one cluster, and what stops it."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_dapo.config import DapoConfig
from megatron_dapo.plan.assumptions import Assumptions
from megatron_dapo.plan.layout import Cluster, Layout, Problem, layout_problems, layout_warnings, make_layout
from megatron_dapo.plan.memory import GIB, StageMemory, stage_memory
from megatron_dapo.plan.parameters import count_parameters
from megatron_dapo.plan.rollout import RolloutMemory, rollout_memory, rollout_problems
from megatron_dapo.plan.shape import ModelShape
from megatron_dapo.plan.timing import StepTime, step_time

DOES_NOT_FIT = 3  # exit status; 1 is Python's for an uncaught exception


@dataclass
class Plan:
    shape: ModelShape
    cluster: Cluster
    assumptions: Assumptions
    layout: Layout
    parameters: int  # the model's, unpadded, as Hugging Face counts them
    stages: list[StageMemory]
    rollout: RolloutMemory | None  # None for the CPU engine
    time: StepTime | None  # None for the CPU engine
    problems: list[Problem]
    warnings: list[str]
    config: DapoConfig
    fixes: list[str] = field(default_factory=list)  # overrides verified to make it fit (find_fixes)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "fixes": self.fixes,
            "warnings": self.warnings,
            "model": {**dataclasses.asdict(self.shape), "parameters": self.parameters},
            "cluster": dataclasses.asdict(self.cluster),
            "layout": dataclasses.asdict(self.layout),
            "memory": [
                {**dataclasses.asdict(s), "resident_bytes": s.resident_bytes, "total_bytes": s.total_bytes}
                for s in self.stages
            ],
            "rollout": dataclasses.asdict(self.rollout) if self.rollout else None,
            "time": self._time_dict(),
            "assumptions": dataclasses.asdict(self.assumptions),
            "config": self.config.to_dict(),
        }

    def _time_dict(self) -> dict[str, Any] | None:
        if self.time is None:
            return None
        return {**dataclasses.asdict(self.time), "rollout_s": self.time.rollout_s, "step_s": self.time.step_s}


def make_plan(cfg: DapoConfig, shape: ModelShape, cluster: Cluster, assume: Assumptions) -> Plan:
    """Memory, layout and time for `cfg` on `cluster`; `problems` lists what stops it (without fixes)."""
    layout = make_layout(cfg, cluster)
    problems = layout_problems(cfg, shape, cluster, layout)
    warnings = layout_warnings(cfg, cluster, layout, assume)
    stages = [] if problems else stage_memory(cfg, shape, layout, assume)
    gpu_bytes = cluster.gpu_memory_gib * GIB
    for stage in stages:
        if stage.total_bytes > gpu_bytes:
            problems.append(
                Problem(
                    f"training needs {stage.total_bytes / GIB:.1f} GiB per GPU on the {stage.stage} "
                    f"pipeline stage; a GPU has {cluster.gpu_memory_gib:g} GiB",
                    stage.total_bytes - gpu_bytes,
                )
            )
    sglang = cfg.rollout.backend == "sglang"
    rollout = rollout_memory(shape, cfg, gpu_bytes, assume) if sglang else None
    if rollout is not None:
        problems += rollout_problems(cfg, cluster, layout, rollout, stages, assume)
    time = None
    if rollout is not None and stages:
        time = step_time(shape, cfg, layout, assume, rollout.mean_length_sequences_per_server)
    return Plan(
        shape=shape,
        cluster=cluster,
        assumptions=assume,
        layout=layout,
        parameters=count_parameters(shape),
        stages=stages,
        rollout=rollout,
        time=time,
        problems=problems,
        warnings=warnings,
        config=cfg,
    )
