"""The trained policy: this rank's Megatron GPT stage with its weights, DDP, the Megatron AdamW optimizer and
the paper's learning-rate schedule (linear warm-up over rollout steps, then constant)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir
from megatron_dapo.checkpoint.model_io import load_model
from megatron_dapo.config import DapoConfig, OptimizerConfig
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.policy import TokenDistribution
from megatron_dapo.model.training import setup_training
from megatron_dapo.parallel.state import ParallelDims


@dataclass
class Policy:
    model: GPTModel  # this rank's stage, unwrapped: what checkpoints and weight sync read
    ddp: DistributedDataParallel  # what trains
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    distribution: TokenDistribution  # softmax(logits / T) over the true vocabulary: what the rollout sampled


def parallel_dims(cfg: DapoConfig) -> ParallelDims:
    p = cfg.parallel
    return ParallelDims(tp=p.tensor, pp=p.pipeline, cp=p.context, sequence_parallel=p.sequence_parallel)


def build_policy(
    cfg: DapoConfig, hf_config: dict[str, Any], pg: ProcessGroupCollection, *, weights: Path | None
) -> Policy:
    """The policy, its weights from `weights` (a Megatron checkpoint: model.load or a resumed step), else from
    the Hugging Face directory model.hf_path. Weights load before the optimizer exists, so that its fp32
    main copies start from them."""
    model = build_gpt_model(
        hf_config,
        parallel_dims(cfg),
        pg,
        params_dtype=getattr(torch, cfg.model.dtype),
        recompute_activations=cfg.model.recompute_activations,
    )
    if weights is not None:
        load_model(model, weights)
    else:
        load_hf_weights(model, hf_config, SafetensorsDir(Path(cfg.model.hf_path)).get, pg)
    ddp, optimizer = setup_training(model, megatron_optimizer_config(cfg.optimizer), pg)
    return Policy(
        model=model,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=lr_schedule(optimizer, cfg.optimizer, total_steps=cfg.train.steps),
        distribution=TokenDistribution(
            vocab_size=hf_config["vocab_size"],
            temperature=cfg.rollout.temperature,
            chunk_tokens=cfg.model.logprob_chunk_tokens or None,
        ),
    )


def megatron_optimizer_config(cfg: OptimizerConfig) -> MegatronOptimizerConfig:
    """AdamW (Megatron's "adam" decouples weight decay) as the config section says."""
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.distributed,
    )


def lr_schedule(
    optimizer: MegatronOptimizer, cfg: OptimizerConfig, total_steps: int
) -> OptimizerParamScheduler:
    """Megatron's scheduler counting ROLLOUT steps: the trainer steps it once before each step's updates, so
    step k (from 1) trains at lr * min(1, k / warmup_steps) and the first step already moves the policy."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=0.0,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(
            total_steps, cfg.warmup_steps + 1
        ),  # unused by "constant", but must exceed warm-up
        lr_decay_style="constant",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
