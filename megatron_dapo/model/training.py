"""Wrap this rank's GPTModel stage for training: megatron's DistributedDataParallel and optimizer.

Gradients accumulate in fp32 buffers over all micro-batches and are reduced across data-parallel (and
context-parallel) ranks once, after the last micro-batch, by megatron's `finalize_model_grads`, which divides
them by the global token count the loss function reported (per-token loss mode).
"""

from dataclasses import replace

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.process_groups_config import ProcessGroupCollection


def setup_training(
    model: GPTModel, optimizer_config: OptimizerConfig, pg_collection: ProcessGroupCollection
) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """(DDP-wrapped model, Megatron optimizer); the model's config gets the schedule's gradient hooks."""
    config = model.config
    # The optimizer keeps fp32 main parameters for bf16/fp16 models: its precision follows the model's.
    optimizer_config = replace(
        optimizer_config, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype
    )
    if optimizer_config.clip_grad < 0:
        raise ValueError(
            f"optimizer.clip_grad must be >= 0 (0 disables clipping), got {optimizer_config.clip_grad}"
        )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(
        config=config, ddp_config=ddp_config, module=model, pg_collection=pg_collection
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp])
    # The pipeline schedule calls these: skip the DP reduction until the last micro-batch, then reduce and
    # divide by the token count; scale the loss for fp16 (no-op otherwise).
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer
