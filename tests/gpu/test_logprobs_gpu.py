"""Log-probs and entropy (model/logprobs.py) on CUDA: fp32 against float64, bf16 against the plain path, and
the memory bound of the chunked paths measured with CUDA's allocator.

TP over NCCL is not exercised here: the TP reductions are plain torch.distributed calls, tested over gloo in
tests/parallel/test_logprobs_tp.py.
"""

import pytest
import torch

from megatron_dapo.model.logprobs import logprobs_from_hidden, logprobs_from_logits, token_loss_from_hidden

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TEMPERATURE = 0.7
TOKENS, HIDDEN, PADDED_VOCAB, VOCAB, CHUNK_TOKENS = 300, 64, 1024, 1000, 64


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits: the fp32 comparisons need full precision."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def random_problem(dtype, seed=0, tokens=TOKENS, hidden_size=HIDDEN, padded_vocab=PADDED_VOCAB, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    weight = torch.randn(padded_vocab, hidden_size, generator=gen) * hidden_size**-0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[0] = vocab - 1
    grad_logprob, grad_entropy = torch.randn(2, tokens, generator=gen, dtype=torch.float64)
    on_device = [t.to(DEVICE) for t in (hidden, weight, labels, grad_logprob, grad_entropy)]
    on_device[0] = on_device[0].to(dtype).requires_grad_()
    on_device[1] = on_device[1].to(dtype).requires_grad_()
    return on_device


def reference(hidden, weight, labels):
    """float64 log-probs and entropy over the true vocabulary, from the same (possibly bf16) inputs."""
    logp = torch.log_softmax((hidden.double() @ weight.double().t())[:, :VOCAB] / TEMPERATURE, dim=-1)
    return logp.gather(1, labels[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def weighted_sum(logprob, entropy, grad_logprob, grad_entropy):
    return (logprob.double() * grad_logprob).sum() + (entropy.double() * grad_entropy).sum()


def all_paths(hidden, weight, labels, grad_logprob, grad_entropy):
    """path -> (logprob, entropy, grad hidden, grad weight), each from a fresh graph."""
    kwargs = {"temperature": TEMPERATURE, "vocab_size": VOCAB}
    results = {}
    logprob, entropy = logprobs_from_logits(hidden @ weight.t(), labels, **kwargs)
    grads = torch.autograd.grad(weighted_sum(logprob, entropy, grad_logprob, grad_entropy), (hidden, weight))
    results["plain"] = (logprob, entropy, *grads)
    logprob, entropy = logprobs_from_hidden(hidden, weight, labels, chunk_tokens=CHUNK_TOKENS, **kwargs)
    grads = torch.autograd.grad(weighted_sum(logprob, entropy, grad_logprob, grad_entropy), (hidden, weight))
    results["chunked"] = (logprob, entropy, *grads)

    def token_loss(lp, ent, tokens):
        return weighted_sum(lp, ent, grad_logprob[tokens], grad_entropy[tokens])

    loss, logprob, entropy = token_loss_from_hidden(
        hidden, weight, labels, token_loss, chunk_tokens=CHUNK_TOKENS, **kwargs
    )
    results["fused"] = (logprob, entropy, *torch.autograd.grad(loss, (hidden, weight)))
    return results


def assert_close(actual, expected, atol, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=0.0, msg=lambda m: f"{what}: {m}"
    )


def test_fp32_paths_match_float64_reference():
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(torch.float32, seed=1)
    expected = reference(hidden, weight, labels)
    expected_grads = torch.autograd.grad(
        weighted_sum(*expected, grad_logprob, grad_entropy), (hidden, weight)
    )
    names = ("logprob", "entropy", "grad hidden", "grad weight")
    for path, outputs in all_paths(hidden, weight, labels, grad_logprob, grad_entropy).items():
        for name, actual, wanted in zip(names, outputs, (*expected, *expected_grads), strict=True):
            assert actual.dtype == torch.float32, (path, name)
            assert_close(actual, wanted, atol=5e-5, what=f"{path} {name}")


def test_bf16_chunked_paths_match_plain():
    """bf16 hidden and weight, softmax in fp32. Chunked matmuls may pick other cuBLAS kernels than the full
    one, so logits can differ by a bf16 rounding from the plain path's; bf16 logits themselves are ~0.05
    from the float64 ones."""
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(torch.bfloat16, seed=2)
    results = all_paths(hidden, weight, labels, grad_logprob, grad_entropy)
    expected = reference(hidden, weight, labels)
    plain = results["plain"]
    for path, (logprob, entropy, grad_hidden, grad_weight) in results.items():
        assert logprob.dtype == entropy.dtype == torch.float32
        assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
        assert_close(logprob, expected[0], atol=0.15, what=f"{path} logprob vs float64")
        assert_close(entropy, expected[1], atol=0.15, what=f"{path} entropy vs float64")
        assert_close(logprob, plain[0], atol=0.05, what=f"{path} logprob vs plain")
        assert_close(entropy, plain[1], atol=0.05, what=f"{path} entropy vs plain")
        for name, actual, wanted in zip(
            ("grad hidden", "grad weight"), (grad_hidden, grad_weight), plain[2:], strict=True
        ):
            atol = 0.03 * wanted.float().abs().max().item()
            assert_close(actual, wanted, atol=atol, what=f"{path} {name} vs plain")


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_chunked_paths_hold_a_fraction_of_the_plain_memory(path):
    """Peak memory above the inputs, less the gradients every path returns: the chunked paths hold [chunk, V]
    buffers, the plain path [T, V] ones (4096 / 256 = 16x more rows)."""
    tokens, chunk_tokens, vocab = 4096, 256, 32768
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(
        torch.bfloat16, seed=3, tokens=tokens, hidden_size=256, padded_vocab=vocab, vocab=vocab
    )
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()

    def working_bytes(run):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = run()
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - before - grads_bytes

    def plain():
        logprob, entropy = logprobs_from_logits(hidden @ weight.t(), labels, temperature=TEMPERATURE)
        return torch.autograd.grad(
            weighted_sum(logprob, entropy, grad_logprob, grad_entropy), (hidden, weight)
        )

    def chunked():
        if path == "chunked":
            outputs = logprobs_from_hidden(
                hidden, weight, labels, temperature=TEMPERATURE, chunk_tokens=chunk_tokens
            )
            loss = weighted_sum(*outputs, grad_logprob, grad_entropy)
        else:
            loss, _, _ = token_loss_from_hidden(
                hidden,
                weight,
                labels,
                lambda lp, ent, t: weighted_sum(lp, ent, grad_logprob[t], grad_entropy[t]),
                temperature=TEMPERATURE,
                chunk_tokens=chunk_tokens,
            )
        return torch.autograd.grad(loss, (hidden, weight))

    plain_bytes, chunked_bytes = working_bytes(plain), working_bytes(chunked)
    logits_bytes = tokens * vocab * 4  # one fp32 [T, V] buffer
    assert plain_bytes >= logits_bytes
    assert chunked_bytes <= plain_bytes / 8, (chunked_bytes, plain_bytes)
