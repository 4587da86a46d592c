"""What each rank runs in the parallel model tests: a split run and the single-process reference.

Everything comes back in Hugging Face names and whole (TP-merged) shapes, so runs at any split compare
directly with each other and with the reference.
"""

import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig
from torch import Tensor

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, read_config
from megatron_dapo.checkpoint.rl_state import RLState, load_rl_state
from megatron_dapo.config import load_config
from megatron_dapo.data.packing import PackedBatch, Sample, pack, plan_microbatches, sequence_pad_multiple
from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.model.hf_mapping import HFMapping, to_global_name
from megatron_dapo.model.hf_weights import load_hf_weights
from megatron_dapo.model.logprobs import logprobs_from_logits
from megatron_dapo.model.policy import TokenDistribution, unwrap
from megatron_dapo.model.training import setup_training
from megatron_dapo.parallel.state import ParallelDims, init_parallel
from megatron_dapo.trainer.policy.build import Policy, build_policy, parallel_dims
from megatron_dapo.trainer.policy.checkpointing import (
    load_optimizer,
    optimizer_metadata,
    resume_point,
    save_checkpoint,
)
from megatron_dapo.trainer.policy.train_step import forward_logprobs, train_step

TEMPERATURE = 0.8
ENTROPY_COEFF = 0.1
LR = 1e-2
CLIP_GRAD = 0.05  # small enough to be active: the clip coefficient depends on the global norm
# Adam divides by sqrt(v) + eps, i.e. by |g| on the first step: for |g| far below eps the update is linear in
# g rather than its sign, so float noise in tiny gradients does not flip updates.
ADAM_EPS = 1e-4


def token_weight(sample_ids: Tensor, positions: Tensor) -> Tensor:
    """A fixed pseudo-advantage per token, from where the token is, so any split sees the same one."""
    return torch.sin(1.0 + 7.1 * sample_ids.double() + 0.37 * positions.double()).float()


class WeightedLogprobObjective:
    """Loss = sum over response tokens of -(w · log-prob) - c · entropy, per-token mean over the batch."""

    def token_loss(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor, tokens: slice) -> Tensor:
        weights = token_weight(_token_sample_ids(batch)[tokens], batch.positions[tokens])
        per_token = -(weights * logprobs) - ENTROPY_COEFF * entropy
        return torch.where(batch.loss_mask[tokens], per_token, 0.0).sum()

    def denominator(self, batch: PackedBatch) -> Tensor:
        return batch.loss_mask.sum()

    def metrics(self, batch: PackedBatch, logprobs: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        mask = batch.loss_mask
        return {"entropy_sum": entropy[mask].sum(), "logprob_min_max": (-logprobs[mask]).max()}


def _token_sample_ids(batch: PackedBatch) -> Tensor:
    return torch.tensor(batch.sample_ids, device=batch.tokens.device)[batch.sample_of_token]


@dataclass(frozen=True)
class RunSpec:
    hf_dir: Path
    samples: list[Sample]
    tokens_per_microbatch: int
    chunk_tokens: int | None  # memory-bounded path for the training step
    distributed_optimizer: bool = False  # also step with megatron's DistributedOptimizer
    params_dtype: torch.dtype = torch.float32


def split_run(spec: RunSpec, dims: ParallelDims) -> dict:
    """Log-probs (plain and memory-bounded), gradients, and parameters after SGD and AdamW steps."""
    pg = init_parallel(dims)
    config = read_config(spec.hf_dir)
    model = _loaded_model(spec, config, dims, pg)
    batches, my_samples = _rank_microbatches(spec, dims, pg)
    result = {"microbatches": len(batches)}
    for name, chunk in (("plain", None), ("chunked", 7)):
        distribution = TokenDistribution(config["vocab_size"], TEMPERATURE, chunk)
        pairs = forward_logprobs(model, batches, distribution, pg)
        result[f"logprobs_{name}"] = dict(zip(my_samples, pairs, strict=True))

    distribution = TokenDistribution(config["vocab_size"], TEMPERATURE, spec.chunk_tokens)
    for optimizer in ("sgd", "adam", "adam-distributed")[: 3 if spec.distributed_optimizer else 2]:
        model = _loaded_model(spec, config, dims, pg)  # DDP hooks a model once: a fresh one per run
        optimizer_config = OptimizerConfig(
            optimizer=optimizer.removesuffix("-distributed"),
            use_distributed_optimizer=optimizer.endswith("-distributed"),
            lr=LR,
            weight_decay=0.0,
            sgd_momentum=0.0,
            adam_eps=ADAM_EPS,
            clip_grad=CLIP_GRAD,
        )
        ddp, opt = setup_training(model, optimizer_config, pg)
        step = train_step(ddp, opt, batches, WeightedLogprobObjective(), distribution, pg)
        result[f"{optimizer}_step"] = step
        result[f"{optimizer}_params"] = hf_state(ddp, config, pg, lambda p: p.detach())
        if optimizer == "sgd":
            result["grads"] = hf_state(ddp, config, pg, lambda p: p.main_grad)
    return result


def resume_run(spec: RunSpec, dtype: str, ckpt_root: Path) -> dict:
    """The trainer's policy and checkpoint path with megatron's DistributedOptimizer: two steps, save, two
    more; then a policy resumed from the save takes the same two steps. This rank's parameters and optimizer
    state at the end of both runs."""
    _allow_checkpoint_writer()
    cfg = load_config(
        None,
        [
            f"model.hf_path={spec.hf_dir}",
            f"model.dtype={dtype}",
            "model.logprob_chunk_tokens=0",
            "optimizer.distributed=true",
            # Large steps, weight decay from the first (no warm-up): the loading's dummy step (cpu_shims.py)
            # then moves the main params, which the checkpoint's must replace.
            "optimizer.lr=0.01",
            "optimizer.weight_decay=0.1",
            "optimizer.warmup_steps=0",
        ],
    )
    dims = parallel_dims(cfg)
    pg = init_parallel(dims)
    config = read_config(spec.hf_dir)
    batches, _ = _rank_microbatches(spec, dims, pg)

    def rollout_step(policy: Policy) -> None:
        policy.scheduler.step(1)  # as the trainer does, once per rollout step
        result = train_step(
            policy.ddp, policy.optimizer, batches, WeightedLogprobObjective(), policy.distribution, pg
        )
        assert result.applied

    policy = build_policy(cfg, config, pg, weights=None)
    for _ in range(2):
        rollout_step(policy)
    state = RLState(
        step=2,
        loader={},
        sampler={},
        scheduler=policy.scheduler.state_dict(),
        extra={"optimizer_metadata": optimizer_metadata()},
    )
    ckpt = save_checkpoint(ckpt_root, 2, policy, state, hf_dir=spec.hf_dir, keep_last=0)
    assert resume_point(ckpt_root, fallback=False) == ckpt  # every rank's files match their checksums
    for _ in range(2):
        rollout_step(policy)

    resumed = build_policy(cfg, config, pg, weights=ckpt)
    saved = load_rl_state(ckpt, rank=dist.get_rank())
    load_optimizer(ckpt, resumed, saved.extra["optimizer_metadata"])
    resumed.scheduler.load_state_dict(saved.scheduler)
    for _ in range(2):
        rollout_step(resumed)
    return {
        "uninterrupted": _training_state(policy, config, pg),
        "resumed": _training_state(resumed, config, pg),
    }


def _allow_checkpoint_writer() -> None:
    """megatron's checkpoint writer starts a multiprocessing manager, which a daemonic process (a worker of
    tests/helpers/distributed_pool.py's pool) may not; the pool still ends its workers when it closes."""
    multiprocessing.current_process().daemon = False


def _training_state(policy: Policy, config: dict, pg) -> dict[str, Tensor]:
    """Parameters (Hugging Face names) and this rank's optimizer shard: main params, Adam moments, steps."""
    state = {f"param.{name}": value for name, value in hf_state(policy.ddp, config, pg, lambda p: p).items()}
    for i, optimizer in enumerate(policy.optimizer.chained_optimizers):
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        for j, param in enumerate(params):
            state[f"optimizer.{i}.{j}.main_param"] = param.detach().clone()
            for key, value in optimizer.optimizer.state[param].items():
                state[f"optimizer.{i}.{j}.{key}"] = value.clone()
    return state


def reference_run(spec: RunSpec) -> dict:
    """The same quantities computed directly in one process: no schedule, no DDP, no micro-batches."""
    pg = init_parallel(ParallelDims())
    config = read_config(spec.hf_dir)
    model = _loaded_model(spec, config, ParallelDims(), pg)
    batch = pack(spec.samples, list(range(len(spec.samples)))).to(next(model.parameters()).device)
    logits = model(
        batch.tokens[None], batch.positions[None], None, packed_seq_params=batch.packed_seq_params()
    )
    logprobs, entropy = logprobs_from_logits(
        logits[0], batch.labels, temperature=TEMPERATURE, vocab_size=config["vocab_size"]
    )
    responses = zip(
        batch.gather_response(logprobs.detach().cpu()),
        batch.gather_response(entropy.detach().cpu()),
        strict=True,
    )
    result = {"logprobs": dict(enumerate(responses))}
    objective = WeightedLogprobObjective()
    loss = objective.token_loss(batch, logprobs, entropy, slice(None)) / objective.denominator(batch)
    loss.backward()
    grads = hf_state(model, config, pg, lambda p: p.grad)
    params = hf_state(model, config, pg, lambda p: p.detach())
    result["grads"] = grads
    result["loss"] = loss.item()
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    scale = min(1.0, CLIP_GRAD / (norm + 1e-6))
    result["grad_norm"] = norm
    result["sgd_params"] = {k: params[k] - LR * scale * grads[k] for k in params}
    adam_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    adam = torch.optim.AdamW(list(adam_params.values()), lr=LR, eps=ADAM_EPS, weight_decay=0.0)
    for key, value in adam_params.items():
        value.grad = scale * grads[key]
    adam.step()
    result["adam_params"] = {k: v.detach() for k, v in adam_params.items()}
    return result


def _rank_microbatches(spec: RunSpec, dims: ParallelDims, pg) -> tuple[list[PackedBatch], list[int]]:
    """This DP rank's packed micro-batches of the spec's samples, and the samples they hold in order."""
    pad = sequence_pad_multiple(dims.cp)
    plan = plan_microbatches(
        [len(s.token_ids) for s in spec.samples],
        dp_size=pg.dp.size(),
        tokens_per_microbatch=spec.tokens_per_microbatch,
        cp=dims.cp,
        pad_multiple=pad,
    )
    mine = plan[pg.dp.rank()]
    return [pack(spec.samples, ids, pad) for ids in mine], [i for ids in mine for i in ids]


def _loaded_model(spec: RunSpec, config: dict, dims: ParallelDims, pg) -> torch.nn.Module:
    model = build_gpt_model(config, dims, pg, params_dtype=spec.params_dtype)
    load_hf_weights(model, config, SafetensorsDir(spec.hf_dir).get, pg)
    return model


def hf_state(model: torch.nn.Module, config: dict, pg, tensor_of) -> dict[str, Tensor]:
    """`tensor_of(param)` for this rank's parameters, TP shards merged, under Hugging Face names."""
    dims = GPTArch.from_hf_config(config)
    mapping = HFMapping(dims)
    tp = pg.tp
    state = {}
    for name, param in unwrap(model).named_parameters():
        entry = mapping.get(to_global_name(name, dims.num_layers, pg.pp.size(), pg.pp.rank()))
        local = tensor_of(param).detach().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp.size())]
        dist.all_gather(shards, local, group=tp)
        state.update((key, value.cpu()) for key, value in mapping.to_hf(entry, shards))
    return state
