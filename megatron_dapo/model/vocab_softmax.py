"""The softmax over a vocabulary split across tensor-parallel (TP) ranks, as the log-prob paths share it.

Each rank holds a contiguous slice of the padded vocabulary (`VocabShard`). `softmax_stats` gives every
rank the same log-sum-exp, label log-prob and entropy from two all-reduces of per-token pieces, never
logits; `grad_wrt_logits` gives the gradient of a loss of (log-prob, entropy) w.r.t. this rank's logits.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the padded vocabulary; the true vocabulary is a prefix of the padded one."""

    start: int  # global index of this rank's first row
    real_rows: int  # leading rows of this shard inside the true vocabulary (the rest is padding)
    vocab_size: int  # the true vocabulary size
    tp_group: dist.ProcessGroup | None

    @classmethod
    def of(cls, local_rows: int, vocab_size: int | None, tp_group: dist.ProcessGroup | None) -> "VocabShard":
        tp_size, tp_rank = (1, 0) if tp_group is None else (tp_group.size(), tp_group.rank())
        padded_size = local_rows * tp_size
        if vocab_size is None:
            vocab_size = padded_size
        if not 0 < vocab_size <= padded_size:
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {padded_size}] (the padded vocabulary: {local_rows} "
                f"rows per rank x TP {tp_size}); pass the tokenizer's / HF config's vocab_size"
            )
        start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(local_rows, tp_rank, tp_size)
        real_rows = min(max(vocab_size - start, 0), local_rows)
        group = tp_group if tp_size > 1 else None
        return cls(start=start, real_rows=real_rows, vocab_size=vocab_size, tp_group=group)

    def check_labels(self, labels: Tensor) -> None:
        # One host sync per call: a label outside the vocabulary would silently give a wrong log-prob.
        if labels.numel() and bool(((labels < 0) | (labels >= self.vocab_size)).any()):
            raise ValueError(
                f"labels must be token ids in [0, {self.vocab_size}) (got min {int(labels.min())}, max "
                f"{int(labels.max())}); give positions without a next token any valid id and mask them out"
            )

    def local_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Labels as column indices into this shard's real rows ([T], clamped), and which it owns ([T])."""
        local = labels - self.start
        owned = (local >= 0) & (local < self.real_rows)
        return local.clamp(0, max(self.real_rows - 1, 0)), owned


class SoftmaxStats(NamedTuple):
    local_max: Tensor  # [C] max of this rank's logits/temperature (-inf on a shard of padding only)
    lse: Tensor  # [C] log-sum-exp of logits/temperature over the whole vocabulary
    logprob: Tensor  # [C]
    entropy: Tensor | None  # [C]


def softmax_stats(
    z: Tensor,
    exp: Tensor,
    label_index: Tensor,
    label_owned: Tensor,
    tp_group: dist.ProcessGroup | None,
    with_entropy: bool,
) -> SoftmaxStats:
    """Softmax statistics over the whole vocabulary from this rank's logits/temperature z [C, Vr].

    z is shifted in place by its row max; exp [C, Vr] is scratch. Every rank gets the same lse, logprob and
    entropy: ranks exchange two all-reduces of [C]-sized pieces, never logits.
    """
    rows = z.shape[0]
    if z.shape[1] == 0:  # a shard holding padding only contributes nothing but must join the all-reduces
        local_max = z.new_full((rows,), float("-inf"))
        sum_exp = dot = label_logit = z.new_zeros(rows)
    else:
        local_max = z.amax(dim=1)
        z.sub_(local_max[:, None])  # z - max <= 0: exp cannot overflow
        label_logit = z.gather(1, label_index[:, None]).squeeze(1)  # meaningful only where owned
        torch.exp(z, out=exp)
        sum_exp = exp.sum(dim=1)
        dot = exp.mul_(z).sum(dim=1) if with_entropy else torch.zeros_like(sum_exp)

    global_max = local_max
    if tp_group is not None:
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    # Re-base each rank's pieces on the global max; sum_exp == 0 marks a padding-only shard, whose shift
    # (-inf) must not turn 0 * inf into nan.
    shift = torch.where(sum_exp > 0, local_max - global_max, 0.0)
    scale = torch.exp(shift)
    label_part = torch.where(label_owned, label_logit + shift, 0.0)
    pieces = torch.stack([sum_exp * scale, (dot + shift * sum_exp) * scale, label_part])
    if tp_group is not None:
        dist.all_reduce(pieces, group=tp_group)
    sum_exp, dot, label_logit = pieces  # sum exp(z - M), sum exp(z - M) (z - M), z[label] - M
    log_sum_exp = torch.log(sum_exp)
    # entropy = lse - E_p[z] = log S - (sum exp(z - M) (z - M)) / S: both terms relative to M, no cancellation
    entropy = log_sum_exp - dot / sum_exp if with_entropy else None
    return SoftmaxStats(local_max, global_max + log_sum_exp, label_logit - log_sum_exp, entropy)


def grad_wrt_logits(
    logp: Tensor,
    prob: Tensor,
    label_index: Tensor,
    label_owned: Tensor,
    entropy: Tensor | None,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """d loss / d logits [C, Vr], formed in place in logp [C, Vr] (log-probabilities); prob is scratch.

    With p = softmax(z), z = logits / temperature, a = dloss/dlogprob, b = dloss/dentropy (per token):
    dlogprob/dz = onehot(label) - p and dentropy/dz = -p (log p + entropy), so
    dloss/dz = a onehot - p (a + b (log p + entropy)); the 1/temperature is folded into a and b.
    """
    a = logp.new_zeros(logp.shape[0]) if grad_logprob is None else grad_logprob / temperature
    torch.exp(logp, out=prob)
    if grad_entropy is None:
        grad = torch.mul(prob, -a[:, None], out=logp)
    else:
        b = grad_entropy / temperature
        grad = logp.mul_(-b[:, None]).add_((-(a + b * entropy))[:, None]).mul_(prob)
    if grad.shape[1]:
        grad.scatter_add_(1, label_index[:, None], torch.where(label_owned, a, 0.0)[:, None])
    return grad


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in fp32 at least (bf16 has 8 mantissa bits); float64 stays float64 for gradcheck."""
    return torch.promote_types(dtype, torch.float32)
