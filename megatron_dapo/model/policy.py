"""Run the policy on a packed micro-batch and read off per-token log-probs and entropy.

The distribution is softmax(logits / temperature) over the true vocabulary: what the rollout sampled from.
Two paths, exact to each other (model/logprobs.py): the plain one from the output layer's logits, and the
memory-bounded one that stops GPTModel before its output layer and forms logits chunk by chunk from the final
hidden states and the output weight shard, so no [T, V] fp32 buffer ever exists.
"""

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model
from torch import Tensor, nn

from megatron_dapo.data.packing import PackedBatch
from megatron_dapo.model import compat
from megatron_dapo.model.logprobs import (
    TokenLossFn,
    logprobs_from_hidden,
    logprobs_from_logits,
    token_loss_from_hidden,
)


@dataclass(frozen=True)
class TokenDistribution:
    """How per-token probabilities are read off the model."""

    vocab_size: int  # the true vocabulary (config.json); rows of Megatron's padding are excluded
    temperature: float = 1.0  # the rollout's sampling temperature
    chunk_tokens: int | None = None  # memory-bounded path with chunks of this many tokens; None: from logits


def unwrap(model: nn.Module) -> GPTModel:
    """The GPTModel inside DistributedDataParallel / Float16Module wrappers."""
    return get_attr_wrapped_model(model, "decoder", return_model_obj=True)


def run_stage(model: nn.Module, batch: PackedBatch, distribution: TokenDistribution) -> Tensor:
    """Forward this pipeline stage on this rank's share of `batch` (already `cp_share`d).

    Returns what megatron's schedule passes on: hidden states [t, 1, h] from an inner stage; on the last stage
    logits [1, t, V/tp], or final hidden states [t, 1, h] on the memory-bounded path.
    """
    gpt = unwrap(model)
    args = (batch.tokens[None], batch.positions[None], None)
    kwargs = {"packed_seq_params": batch.packed_seq_params()}
    if gpt.post_process and distribution.chunk_tokens is not None:
        with compat.output_layer_skipped(gpt):
            return model(*args, **kwargs)
    return model(*args, **kwargs)


def token_logprobs(
    output: Tensor,
    batch: PackedBatch,
    model: nn.Module,
    distribution: TokenDistribution,
    tp_group: dist.ProcessGroup,
) -> tuple[Tensor, Tensor]:
    """Last stage: `run_stage`'s output -> log-probs of the labels [t], entropy [t] (fp32, differentiable)."""
    if distribution.chunk_tokens is None:
        return logprobs_from_logits(
            output[0],
            batch.labels,
            tp_group=tp_group,
            temperature=distribution.temperature,
            vocab_size=distribution.vocab_size,
        )
    hidden, weight = _hidden_and_output_weight(output, model, tp_group)
    return logprobs_from_hidden(
        hidden,
        weight,
        batch.labels,
        tp_group=tp_group,
        temperature=distribution.temperature,
        vocab_size=distribution.vocab_size,
        chunk_tokens=distribution.chunk_tokens,
    )


def token_loss(
    output: Tensor,
    batch: PackedBatch,
    model: nn.Module,
    distribution: TokenDistribution,
    tp_group: dist.ProcessGroup,
    loss_fn: TokenLossFn,
) -> tuple[Tensor, Tensor, Tensor]:
    """Last stage: the summed loss of the micro-batch's tokens, with detached log-probs [t] and entropy [t].

    On the memory-bounded path each chunk forms its own gradient during the forward (three matmuls, no
    recompute); on the plain path the loss is taken over all tokens at once.
    """
    if distribution.chunk_tokens is None:
        logprobs, entropy = token_logprobs(output, batch, model, distribution, tp_group)
        loss = loss_fn(logprobs, entropy, slice(0, logprobs.shape[0]))
        return loss, logprobs.detach(), entropy.detach()
    hidden, weight = _hidden_and_output_weight(output, model, tp_group)
    return token_loss_from_hidden(
        hidden,
        weight,
        batch.labels,
        loss_fn,
        tp_group=tp_group,
        temperature=distribution.temperature,
        vocab_size=distribution.vocab_size,
        chunk_tokens=distribution.chunk_tokens,
    )


def _hidden_and_output_weight(
    output: Tensor, model: nn.Module, tp_group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """Final hidden states [t, h] (whole on every TP rank) and this rank's output weight shard [V/tp, h]."""
    gpt = unwrap(model)
    hidden = output[:, 0]
    if gpt.config.sequence_parallel:
        # Under sequence parallelism each TP rank holds t/tp rows; the output layer would gather them first.
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=tp_group
        )
    if gpt.share_embeddings_and_output_weights:
        return hidden, gpt.shared_embedding_or_output_weight()
    return hidden, gpt.output_layer.weight
