"""Per-token log-probs and entropy of the policy, vocab-parallel across tensor-parallel (TP) ranks.

The distribution is softmax(logits / temperature) over the true vocabulary: the one the rollout sampled
from. Rows of Megatron's padded vocabulary (global index >= `vocab_size`) exist in neither the Hugging
Face model nor the rollout engine, so they are left out of the softmax. Each TP rank holds a contiguous slice
of the vocabulary; ranks exchange per-token statistics (one max and one sum all-reduce per chunk), never
logits (model/vocab_softmax.py). The softmax runs in fp32 (float64 for float64 inputs) whatever the dtype of
the logits.

Three entry points, exact to one another:
- `logprobs_from_logits`: from the output layer's logits `[T, V/tp]`; holds `[T, V/tp]` buffers.
- `logprobs_from_hidden`: from hidden states `[T, H]` and the output weight shard `[V/tp, H]`, chunk by chunk;
  backward recomputes each chunk's logits, so memory is bounded by the chunk (one extra matmul).
- `token_loss_from_hidden`: the training path. The loss is a sum of per-token terms of (log-prob, entropy)
  whose form is known before the forward (old log-probs, advantages), so each chunk forms its gradient while
  its logits are at hand: memory bounded by the chunk, and the three matmuls of the plain path.

Labels are the NEXT tokens, already shifted by the caller: `labels[t]` is the token sampled after position t.
Positions with no next token still need a valid id (mask them out of the loss).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatron_dapo.model.vocab_softmax import (
    SoftmaxStats,
    VocabShard,
    grad_wrt_logits,
    softmax_dtype,
    softmax_stats,
)

# [256, V/tp] chunk buffers: under 1/16 of the plain path's [T, V/tp] from T = 4k tokens on, and still rows
# enough for an efficient matmul.
DEFAULT_CHUNK_TOKENS = 256

TokenLossFn = Callable[[Tensor, Tensor, slice], Tensor]


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `labels` and entropy from this rank's logits shard.

    logits: [T, V/tp], any float dtype, kept for backward as given; labels: [T] next-token ids, global;
    vocab_size: the true vocabulary (the HF config's), None when the vocabulary is not padded.
    Returns logprobs [T] fp32 and entropy [T] fp32 (None without `with_entropy`), equal on every TP rank.
    """
    _check_2d("logits", logits)
    _check_labels(labels, logits.shape[0])
    shard = VocabShard.of(logits.shape[1], vocab_size, tp_group)
    shard.check_labels(labels)
    _check_temperature(temperature)
    return _LogProbsFromLogits.apply(logits, labels, shard, temperature, with_entropy)


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs and entropy from hidden states, never holding more than `chunk_tokens` rows of logits.

    hidden: [T, H], the output layer's input, whole on every TP rank (under sequence parallelism, gather it
    with `gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)`); weight: [V/tp, H],
    the output layer's (or tied embedding's) shard, same dtype; labels: [T] next-token ids, global.
    Backward recomputes each chunk's logits and all-reduces the hidden gradient over TP, as Megatron's
    column-parallel output layer does.
    Returns logprobs [T] fp32 and entropy [T] fp32 (None without `with_entropy`).
    """
    shard = _check_hidden_inputs(hidden, weight, labels, tp_group, temperature, vocab_size, chunk_tokens)
    hidden = _copy_to_tp_region(hidden, tp_group)
    return _LogProbsFromHidden.apply(hidden, weight, labels, shard, temperature, chunk_tokens, with_entropy)


def token_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_loss_fn: TokenLossFn,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor, Tensor]:
    """A loss summed over tokens, with its gradient formed during the forward, chunk by chunk.

    `token_loss_fn(logprobs [c], entropy [c], tokens: slice) -> scalar` gives the loss of the chunk's tokens
    (`tokens` indexes the caller's per-token tensors: old log-probs, advantages, mask, weights). It must be a
    sum of per-token terms, each depending only on its own token's log-prob and entropy, and on no other
    tensor that needs a gradient. Inputs as for `logprobs_from_hidden`.
    Returns the loss (scalar fp32, the same on every TP rank; its backward runs once and only scales the
    gradients formed in the forward), and the detached logprobs [T] and entropy [T] for metrics.
    """
    shard = _check_hidden_inputs(hidden, weight, labels, tp_group, temperature, vocab_size, chunk_tokens)
    hidden = _copy_to_tp_region(hidden, tp_group)
    return _TokenLossFromHidden.apply(hidden, weight, labels, token_loss_fn, shard, temperature, chunk_tokens)


class _LogProbsFromLogits(torch.autograd.Function):
    """Saves the logits as given (no fp32 copy) and recomputes the fp32 softmax in backward."""

    @staticmethod
    def forward(ctx, logits, labels, shard, temperature, with_entropy):
        label_index, label_owned = shard.local_labels(labels)
        z = _scaled_logits_copy(logits[:, : shard.real_rows], temperature)
        stats = softmax_stats(z, torch.empty_like(z), label_index, label_owned, shard.tp_group, with_entropy)
        del z
        ctx.set_materialize_grads(False)
        ctx.shard, ctx.temperature = shard, temperature
        ctx.save_for_backward(logits, label_index, label_owned, stats.lse, stats.entropy)
        return stats.logprob, stats.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        logits, label_index, label_owned, lse, entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None
        real_rows = ctx.shard.real_rows
        logp = _scaled_logits_copy(logits[:, :real_rows], ctx.temperature).sub_(lse[:, None])
        grad = grad_wrt_logits(
            logp,
            torch.empty_like(logp),
            label_index,
            label_owned,
            entropy,
            grad_logprob,
            grad_entropy,
            ctx.temperature,
        )
        if real_rows == logits.shape[1]:
            return grad.to(logits.dtype), None, None, None, None
        grad_logits = torch.zeros_like(logits)
        grad_logits[:, :real_rows] = grad
        return grad_logits, None, None, None, None


def _scaled_logits_copy(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in the softmax dtype, in a new buffer (the caller's logits stay untouched)."""
    z = logits.to(softmax_dtype(logits.dtype), copy=True)
    return z if temperature == 1.0 else z.div_(temperature)


class _ChunkedOutputLayer:
    """The output layer and softmax, `chunk_tokens` rows at a time, in [chunk, Vr] buffers reused by every
    chunk (on CPU a fresh buffer of that size costs page faults comparable to the softmax itself)."""

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        shard: VocabShard,
        temperature: float,
        chunk_tokens: int,
    ) -> None:
        self.hidden, self.weight = hidden, weight[: shard.real_rows]
        self.label_index, self.label_owned = shard.local_labels(labels)
        self.tp_group, self.temperature = shard.tp_group, temperature
        self.chunks = _chunks(hidden.shape[0], chunk_tokens)
        shape = (min(chunk_tokens, hidden.shape[0]), shard.real_rows)
        z_dtype = softmax_dtype(weight.dtype)
        self._matmul = weight.new_empty(shape)  # logits and their gradient in the weight's dtype
        self._cast = z_dtype != weight.dtype
        self._z = weight.new_empty(shape, dtype=z_dtype) if self._cast else self._matmul
        self._scratch = weight.new_empty(shape, dtype=z_dtype)

    def scaled_logits(self, tokens: slice) -> Tensor:
        """logits / temperature [c, Vr] in the softmax dtype. The matmul runs in the weight's dtype, as the
        output layer's does, so the plain path sees the same logits."""
        rows = tokens.stop - tokens.start
        logits = torch.matmul(self.hidden[tokens], self.weight.t(), out=self._matmul[:rows])
        z = self._z[:rows].copy_(logits) if self._cast else logits
        return z if self.temperature == 1.0 else z.div_(self.temperature)

    def softmax_stats(self, tokens: slice, z: Tensor, with_entropy: bool) -> SoftmaxStats:
        scratch = self._scratch[: z.shape[0]]
        label_index, label_owned = self.label_index[tokens], self.label_owned[tokens]
        return softmax_stats(z, scratch, label_index, label_owned, self.tp_group, with_entropy)

    def backprop(
        self,
        tokens: slice,
        logp: Tensor,
        entropy: Tensor | None,
        grad_logprob: Tensor | None,
        grad_entropy: Tensor | None,
        grad_hidden: Tensor,
        grad_weight: Tensor,
    ) -> None:
        """From the chunk's log-probs [c, Vr] (overwritten), write its hidden gradient into grad_hidden [T, H]
        and add its weight gradient into grad_weight [V/tp, H]."""
        rows = logp.shape[0]
        grad_z = grad_wrt_logits(
            logp,
            self._scratch[:rows],
            self.label_index[tokens],
            self.label_owned[tokens],
            entropy,
            grad_logprob,
            grad_entropy,
            self.temperature,
        )
        if self._cast:
            grad_z = self._matmul[:rows].copy_(grad_z)
        torch.matmul(grad_z, self.weight, out=grad_hidden[tokens])
        # Accumulates in the weight's dtype: exact in fp32; in bf16, one rounding per chunk (not one in all).
        grad_weight[: self.weight.shape[0]].addmm_(grad_z.t(), self.hidden[tokens])


def _chunks(num_tokens: int, chunk_tokens: int) -> list[slice]:
    return [slice(i, min(i + chunk_tokens, num_tokens)) for i in range(0, num_tokens, chunk_tokens)]


def _index(tensor: Tensor | None, tokens: slice) -> Tensor | None:
    return None if tensor is None else tensor[tokens]


class _LogProbsFromHidden(torch.autograd.Function):
    """Saves per-token lse and entropy; backward recomputes each chunk's logits but no reductions."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, temperature, chunk_tokens, with_entropy):
        layer = _ChunkedOutputLayer(hidden, weight, labels, shard, temperature, chunk_tokens)
        logprob = hidden.new_empty(hidden.shape[0], dtype=softmax_dtype(hidden.dtype))
        lse = torch.empty_like(logprob)
        entropy = torch.empty_like(logprob) if with_entropy else None
        for tokens in layer.chunks:
            stats = layer.softmax_stats(tokens, layer.scaled_logits(tokens), with_entropy)
            logprob[tokens], lse[tokens] = stats.logprob, stats.lse
            if with_entropy:
                entropy[tokens] = stats.entropy
        ctx.set_materialize_grads(False)
        ctx.shard, ctx.temperature, ctx.chunk_tokens = shard, temperature, chunk_tokens
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 7
        layer = _ChunkedOutputLayer(hidden, weight, labels, ctx.shard, ctx.temperature, ctx.chunk_tokens)
        grad_hidden = hidden.new_empty(hidden.shape)  # contiguous, for matmul's out=
        grad_weight = torch.zeros_like(weight)
        for tokens in layer.chunks:
            logp = layer.scaled_logits(tokens).sub_(lse[tokens, None])
            layer.backprop(
                tokens,
                logp,
                _index(entropy, tokens),
                _index(grad_logprob, tokens),
                _index(grad_entropy, tokens),
                grad_hidden,
                grad_weight,
            )
        return grad_hidden, grad_weight, None, None, None, None, None


class _TokenLossFromHidden(torch.autograd.Function):
    """Forms the gradients in the forward; backward only scales them by the incoming loss gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_loss_fn, shard, temperature, chunk_tokens):
        layer = _ChunkedOutputLayer(hidden, weight, labels, shard, temperature, chunk_tokens)
        logprob = hidden.new_empty(hidden.shape[0], dtype=softmax_dtype(hidden.dtype))
        entropy = torch.empty_like(logprob)
        loss = torch.zeros_like(logprob[0])
        grad_hidden = hidden.new_empty(hidden.shape)  # contiguous, for matmul's out=
        grad_weight = torch.zeros_like(weight)
        for tokens in layer.chunks:
            z = layer.scaled_logits(tokens)
            stats = layer.softmax_stats(tokens, z, with_entropy=True)
            logprob[tokens], entropy[tokens] = stats.logprob, stats.entropy
            chunk_loss, grad_logprob, grad_entropy = _loss_and_grads(token_loss_fn, stats, tokens)
            loss += chunk_loss
            logp = z.sub_((stats.lse - stats.local_max)[:, None])  # z held logits/temperature - local max
            layer.backprop(tokens, logp, stats.entropy, grad_logprob, grad_entropy, grad_hidden, grad_weight)
        # Kept on ctx, not saved for backward, so that backward can scale them in place and drop them.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(logprob, entropy)
        return loss, logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logprob, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("token_loss_from_hidden's loss can be backpropagated once (no retain_graph)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # In place: a scaled copy would double the memory of the weight gradient.
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


def _loss_and_grads(
    token_loss_fn: TokenLossFn, stats: SoftmaxStats, tokens: slice
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The chunk's loss and its gradients w.r.t. the chunk's log-probs and entropy (None where unused)."""
    with torch.enable_grad():
        logprob = stats.logprob.detach().requires_grad_()
        entropy = stats.entropy.detach().requires_grad_()
        chunk_loss = token_loss_fn(logprob, entropy, tokens)
        if chunk_loss.dim() != 0:
            raise ValueError(
                f"token_loss_fn must return a scalar (the chunk's summed loss), got {tuple(chunk_loss.shape)}"
            )
        if not chunk_loss.requires_grad:
            return chunk_loss.detach(), None, None
        grads = torch.autograd.grad(chunk_loss, (logprob, entropy), allow_unused=True)
    return chunk_loss.detach(), *grads


def _copy_to_tp_region(hidden: Tensor, tp_group: dist.ProcessGroup | None) -> Tensor:
    """Identity forward; backward all-reduces the hidden gradient, whose parts come from every vocab shard."""
    if tp_group is None or tp_group.size() == 1:
        return hidden
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ValueError(
            f"{name} must be a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}; "
            "drop the batch dimension of a packed sequence first"
        )


def _check_labels(labels: Tensor, num_tokens: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != num_tokens or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer token ids of shape [{num_tokens}] (one next token per position), "
            f"got {tuple(labels.shape)} {labels.dtype}"
        )


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number (the rollout's), got {temperature}")


def _check_hidden_inputs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    tp_group: dist.ProcessGroup | None,
    temperature: float,
    vocab_size: int | None,
    chunk_tokens: int,
) -> VocabShard:
    _check_2d("hidden", hidden)
    _check_2d("weight", weight)
    if weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight [V/tp, H] must match hidden [T, H] in H and dtype, got weight {tuple(weight.shape)} "
            f"{weight.dtype} and hidden {tuple(hidden.shape)} {hidden.dtype}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    _check_labels(labels, hidden.shape[0])
    _check_temperature(temperature)
    shard = VocabShard.of(weight.shape[0], vocab_size, tp_group)
    shard.check_labels(labels)
    return shard
