"""Vocab-parallel log-probs at TP=2 equal the single-process result (fp32, 1e-5), for every path.

Each rank holds half of the padded vocabulary; the cases put the true vocabulary's end inside rank 1's shard,
and past rank 0's shard (rank 1 then holds padding only). Log-probs, entropy and the gradients (w.r.t. this
rank's logits shard, or the hidden states and this rank's weight shard) are compared on every rank with the
same computation at TP=1 on the whole weight.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_dapo.model.logprobs import logprobs_from_hidden, logprobs_from_logits, token_loss_from_hidden
from tests.helpers.distributed_pool import DistributedPool

pytestmark = pytest.mark.slow

ATOL = 1e-5
TOKENS, HIDDEN, TEMPERATURE, CHUNK_TOKENS = 13, 16, 0.8, 4
# name -> (true vocab size, padded vocab size)
CASES = {"padding-in-last-shard": (250, 256), "shard-of-padding-only": (30, 64)}


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(world_size=2) as p:
        yield p


def random_problem(padded_vocab: int, vocab_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    weight = torch.randn(padded_vocab, HIDDEN, generator=gen)
    labels = torch.randint(0, vocab_size, (TOKENS,), generator=gen)
    labels[0] = vocab_size - 1
    return hidden, weight, labels, torch.randn(TOKENS, generator=gen), torch.randn(TOKENS, generator=gen)


def run_path(path, hidden, weight, labels, grad_logprob, grad_entropy, vocab_size, tp_group):
    """Log-probs, entropy and gradients of sum(a logprob + b entropy) through one path."""
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    kwargs = {"tp_group": tp_group, "temperature": TEMPERATURE, "vocab_size": vocab_size}
    if path == "fused":

        def token_loss(lp, ent, tokens):
            return (lp * grad_logprob[tokens]).sum() + (ent * grad_entropy[tokens]).sum()

        loss, logprob, entropy = token_loss_from_hidden(
            hidden, weight, labels, token_loss, chunk_tokens=CHUNK_TOKENS, **kwargs
        )
        return [logprob, entropy, *torch.autograd.grad(loss, (hidden, weight))]
    if path == "logits":
        inputs = ((hidden @ weight.t()).detach().requires_grad_(),)
        logprob, entropy = logprobs_from_logits(inputs[0], labels, **kwargs)
    else:
        inputs = (hidden, weight)
        logprob, entropy = logprobs_from_hidden(hidden, weight, labels, chunk_tokens=CHUNK_TOKENS, **kwargs)
    loss = (logprob * grad_logprob).sum() + (entropy * grad_entropy).sum()
    return [logprob.detach(), entropy.detach(), *torch.autograd.grad(loss, inputs)]


def tp_errors(path: str, vocab_size: int, padded_vocab: int, seed: int) -> list[float]:
    """On every rank: max |TP=2 - TP=1| of logprob, entropy and each gradient (this rank's shard)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    problem = random_problem(padded_vocab, vocab_size, seed)
    hidden, weight, labels, grad_logprob, grad_entropy = problem
    single = run_path(path, *problem, vocab_size, tp_group=None)
    rows = slice(rank * padded_vocab // world_size, (rank + 1) * padded_vocab // world_size)
    sharded = run_path(
        path, hidden, weight[rows], labels, grad_logprob, grad_entropy, vocab_size, dist.group.WORLD
    )
    if path == "logits":
        single[2] = single[2][:, rows]  # the gradient w.r.t. this rank's logits
    else:
        single[3] = single[3][rows]  # the gradient w.r.t. this rank's weight shard
    return [(a - b).abs().max().item() for a, b in zip(sharded, single, strict=True)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", ["logits", "hidden", "fused"])
def test_tp2_equals_tp1(pool, path, case):
    vocab_size, padded_vocab = CASES[case]
    for rank, errors in enumerate(pool.run(tp_errors, path, vocab_size, padded_vocab, seed=len(case))):
        assert max(errors) < ATOL, f"rank {rank}: max errors (logprob, entropy, grads...) {errors}"
