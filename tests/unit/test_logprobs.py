"""Log-probs and entropy (model/logprobs.py), single process, against a float64 log_softmax reference.

The reference is independent of the code under test: torch.log_softmax over the true vocabulary of the full
logits in float64, differentiated by autograd. Every path is checked in value and gradient (w.r.t. logits, or
hidden states and weight), with temperature != 1 and a padded vocabulary.
"""

import pytest
import torch

from megatron_dapo.model.logprobs import logprobs_from_hidden, logprobs_from_logits, token_loss_from_hidden

TEMPERATURE = 0.7
HIDDEN = 24
PADDED_VOCAB = 64
VOCAB = 57  # rows 57..63 are Megatron's padding


def reference(hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB):
    """float64 log-probs of labels and entropy of softmax(logits / temperature) over the true vocabulary."""
    logits = hidden.double() @ weight.double().t()
    return reference_from_logits(logits, labels, temperature, vocab_size)


def reference_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB):
    logp = torch.log_softmax(logits.double()[:, :vocab_size] / temperature, dim=-1)
    return logp.gather(1, labels[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def random_problem(tokens, *, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(tokens, HIDDEN, generator=gen) * scale).to(dtype).requires_grad_()
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,), generator=gen)
    labels[0] = VOCAB - 1  # the last real row, next to the padding
    grad_logprob = torch.randn(tokens, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(tokens, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, grad_logprob, grad_entropy


def weighted_sum(logprob, entropy, grad_logprob, grad_entropy):
    """A scalar whose gradient w.r.t. (logprob, entropy) is the given per-token weights."""
    return (logprob.double() * grad_logprob).sum() + (entropy.double() * grad_entropy).sum()


def grads(outputs, inputs, grad_logprob, grad_entropy):
    return torch.autograd.grad(weighted_sum(*outputs, grad_logprob, grad_entropy), inputs)


def assert_close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tokens", [1, 13])
def test_plain_path_matches_reference(tokens):
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(tokens, seed=tokens)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    logprob, entropy = logprobs_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB)
    expected = reference_from_logits(logits, labels)
    assert logprob.dtype == entropy.dtype == torch.float32 and logprob.shape == entropy.shape == (tokens,)
    assert_close(logprob, expected[0], atol=2e-5)
    assert_close(entropy, expected[1], atol=2e-5)

    (grad,) = grads((logprob, entropy), logits, grad_logprob, grad_entropy)
    (expected_grad,) = grads(expected, logits, grad_logprob, grad_entropy)
    assert_close(grad, expected_grad, atol=2e-5)
    assert grad[:, VOCAB:].abs().max() == 0  # padded rows get no gradient


@pytest.mark.parametrize(
    ("tokens", "chunk_tokens"),
    [(1, 4), (12, 4), (13, 4), (13, 1), (13, 13), (13, 100)],
)
def test_chunked_paths_match_reference(tokens, chunk_tokens):
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(tokens, seed=chunk_tokens)
    expected = reference(hidden, weight, labels)
    expected_grads = grads(expected, (hidden, weight), grad_logprob, grad_entropy)

    logprob, entropy = logprobs_from_hidden(
        hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=chunk_tokens
    )
    assert_close(logprob, expected[0], atol=2e-5)
    assert_close(entropy, expected[1], atol=2e-5)
    for actual, wanted in zip(
        grads((logprob, entropy), (hidden, weight), grad_logprob, grad_entropy), expected_grads, strict=True
    ):
        assert_close(actual, wanted, atol=5e-5, rtol=1e-5)

    def token_loss(lp, ent, tokens):
        return weighted_sum(lp, ent, grad_logprob[tokens], grad_entropy[tokens])

    loss, logprob, entropy = token_loss_from_hidden(
        hidden,
        weight,
        labels,
        token_loss,
        temperature=TEMPERATURE,
        vocab_size=VOCAB,
        chunk_tokens=chunk_tokens,
    )
    assert not logprob.requires_grad and not entropy.requires_grad
    assert_close(logprob, expected[0], atol=2e-5)
    assert_close(entropy, expected[1], atol=2e-5)
    assert_close(loss, weighted_sum(*expected, grad_logprob, grad_entropy), atol=1e-4)
    for actual, wanted in zip(torch.autograd.grad(loss, (hidden, weight)), expected_grads, strict=True):
        assert_close(actual, wanted, atol=5e-5, rtol=1e-5)


def test_gradcheck_float64():
    """Analytic gradients against finite differences; the fused path (whose backward runs once, so
    gradcheck cannot probe it) against the float64 reference to rounding."""
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(5, dtype=torch.float64, seed=1)
    kwargs = {"temperature": TEMPERATURE, "vocab_size": VOCAB}
    logits = (hidden @ weight.t()).detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: logprobs_from_logits(x, labels, **kwargs), (logits,), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda h, w: logprobs_from_hidden(h, w, labels, chunk_tokens=2, **kwargs),
        (hidden, weight),
        fast_mode=True,
    )

    def token_loss(lp, ent, tokens):
        return weighted_sum(lp, ent, grad_logprob[tokens], grad_entropy[tokens])

    loss, _, _ = token_loss_from_hidden(hidden, weight, labels, token_loss, chunk_tokens=2, **kwargs)
    expected_grads = grads(reference(hidden, weight, labels), (hidden, weight), grad_logprob, grad_entropy)
    for actual, wanted in zip(torch.autograd.grad(loss, (hidden, weight)), expected_grads, strict=True):
        assert_close(actual, wanted, atol=1e-12, rtol=1e-12)


def test_fused_backward_twice_is_refused():
    hidden, weight, labels, _, _ = random_problem(3, seed=2)
    loss, _, _ = token_loss_from_hidden(
        hidden, weight, labels, lambda lp, ent, tokens: lp.sum(), vocab_size=VOCAB
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


@pytest.mark.parametrize("weighted", ["logprob", "entropy"])
def test_gradient_of_one_output_alone(weighted):
    """Backward with only one output used (the other's gradient is None inside autograd)."""
    hidden, weight, labels, _, _ = random_problem(9, seed=4)
    expected = reference(hidden, weight, labels)
    index = 0 if weighted == "logprob" else 1
    expected_grads = torch.autograd.grad(expected[index].sum(), (hidden, weight))
    outputs = logprobs_from_hidden(
        hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=4
    )
    for actual, wanted in zip(
        torch.autograd.grad(outputs[index].sum(), (hidden, weight)), expected_grads, strict=True
    ):
        assert_close(actual, wanted, atol=5e-5, rtol=1e-5)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    outputs = logprobs_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB)
    (grad,) = torch.autograd.grad(outputs[index].sum(), logits)
    (expected_grad,) = torch.autograd.grad(reference_from_logits(logits, labels)[index].sum(), logits)
    assert_close(grad, expected_grad, atol=2e-5)


def test_without_entropy():
    hidden, weight, labels, grad_logprob, _ = random_problem(7, seed=5)
    expected = reference(hidden, weight, labels)
    expected_grads = torch.autograd.grad((expected[0] * grad_logprob).sum(), (hidden, weight))
    logprob, entropy = logprobs_from_hidden(
        hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=3, with_entropy=False
    )
    assert entropy is None
    assert_close(logprob, expected[0], atol=2e-5)
    for actual, wanted in zip(
        torch.autograd.grad((logprob * grad_logprob).sum(), (hidden, weight)), expected_grads, strict=True
    ):
        assert_close(actual, wanted, atol=5e-5, rtol=1e-5)
    logits = hidden @ weight.t()
    logprob, entropy = logprobs_from_logits(
        logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB, with_entropy=False
    )
    assert entropy is None
    assert_close(logprob, expected[0], atol=2e-5)


def test_fused_policy_loss_matches_autograd_through_plain_path():
    """A clipped-surrogate loss with an entropy bonus (nonlinear in the log-prob): gradients formed in the
    forward equal autograd through the plain path."""
    hidden, weight, labels, _, _ = random_problem(11, seed=6)
    gen = torch.Generator().manual_seed(7)
    advantages = torch.randn(11, generator=gen)
    mask = (torch.rand(11, generator=gen) > 0.3).float()
    with torch.no_grad():
        old_logprob = reference(hidden, weight, labels)[0].float() + 0.3 * torch.randn(11, generator=gen)

    def token_loss(lp, ent, tokens):
        ratio = torch.exp(lp - old_logprob[tokens])
        surrogate = torch.minimum(ratio * advantages[tokens], ratio.clamp(0.8, 1.28) * advantages[tokens])
        return ((-surrogate - 0.01 * ent) * mask[tokens]).sum() / 7.0

    logits = hidden @ weight.t()
    logprob, entropy = logprobs_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB)
    expected_loss = token_loss(logprob, entropy, slice(None))
    expected_grads = torch.autograd.grad(expected_loss, (hidden, weight))
    loss, _, _ = token_loss_from_hidden(
        hidden, weight, labels, token_loss, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=4
    )
    assert_close(loss, expected_loss, atol=1e-6)
    for actual, wanted in zip(torch.autograd.grad(3.0 * loss, (hidden, weight)), expected_grads, strict=True):
        assert_close(actual, 3.0 * wanted, atol=1e-5, rtol=1e-5)


def test_fused_loss_without_gradient_gives_zero_gradients():
    hidden, weight, labels, _, _ = random_problem(6, seed=8)
    loss, logprob, _ = token_loss_from_hidden(
        hidden, weight, labels, lambda lp, ent, tokens: torch.zeros(()), vocab_size=VOCAB, chunk_tokens=4
    )
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert loss == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0
    assert_close(logprob, reference(hidden, weight, labels, temperature=1.0)[0], atol=2e-5)


def test_large_logits_stay_finite_and_exact():
    """Logits of magnitude ~1e3: exp would overflow fp32 without the max shift."""
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(10, seed=9, scale=100.0)
    expected = reference(hidden, weight, labels)
    logprob, entropy = logprobs_from_hidden(
        hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=4
    )
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all()
    assert_close(logprob, expected[0], atol=0.0, rtol=1e-5)
    assert_close(entropy, expected[1], atol=1e-3)
    expected_grads = grads(expected, (hidden, weight), grad_logprob, grad_entropy)
    actual_grads = grads((logprob, entropy), (hidden, weight), grad_logprob, grad_entropy)
    for actual, wanted in zip(actual_grads, expected_grads, strict=True):
        assert torch.isfinite(actual).all()
        assert_close(actual, wanted, atol=1e-3 * wanted.abs().max().item())


def test_bf16_chunked_matches_plain():
    """Mixed precision: bf16 hidden and weight, softmax in fp32; chunked matmuls equal the output layer's."""
    hidden, weight, labels, grad_logprob, grad_entropy = random_problem(16, dtype=torch.bfloat16, seed=10)
    logits = hidden @ weight.t()
    plain = logprobs_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB)
    plain_grads = grads(plain, (hidden, weight), grad_logprob, grad_entropy)
    chunked = logprobs_from_hidden(
        hidden, weight, labels, temperature=TEMPERATURE, vocab_size=VOCAB, chunk_tokens=5
    )
    assert plain[0].dtype == chunked[0].dtype == torch.float32
    assert_close(chunked[0], plain[0], atol=1e-5)
    assert_close(chunked[1], plain[1], atol=1e-5)
    expected = reference(hidden, weight, labels)  # from the bf16 inputs, in float64
    assert_close(chunked[0], expected[0], atol=0.1)
    for actual, wanted in zip(
        grads(chunked, (hidden, weight), grad_logprob, grad_entropy), plain_grads, strict=True
    ):
        assert actual.dtype == torch.bfloat16
        assert_close(actual, wanted, atol=0.02 * wanted.abs().max().item())


def test_inputs_are_not_modified():
    hidden, weight, labels, _, _ = random_problem(8, seed=11)
    logits = (hidden @ weight.t()).detach()
    copies = [t.detach().clone() for t in (logits, hidden, weight, labels)]
    logprobs_from_logits(logits, labels, temperature=TEMPERATURE, vocab_size=VOCAB)
    logprob, entropy = logprobs_from_hidden(hidden, weight, labels, temperature=TEMPERATURE, chunk_tokens=3)
    (logprob.sum() + entropy.sum()).backward()
    for tensor, copy in zip((logits, hidden, weight, labels), copies, strict=True):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.tensor([0, VOCAB])}, "labels must be token ids in \\[0, 57\\)"),
        ({"labels": torch.tensor([-1, 0])}, "labels must be token ids"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels must be integer token ids of shape \\[2\\]"),
        ({"labels": torch.zeros(2)}, "labels must be integer"),
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"vocab_size": PADDED_VOCAB + 1}, "vocab_size=65 must be in \\[1, 64\\]"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive"),
        ({"hidden": torch.randn(1, 2, HIDDEN)}, "hidden must be a 2-D float tensor"),
        ({"weight": torch.randn(PADDED_VOCAB, HIDDEN + 1)}, "weight \\[V/tp, H\\] must match hidden"),
        ({"weight": torch.randn(PADDED_VOCAB, HIDDEN, dtype=torch.float64)}, "must match hidden .* dtype"),
    ],
)
def test_bad_input_names_the_field(change, message):
    gen = torch.Generator().manual_seed(12)
    args = {
        "hidden": torch.randn(2, HIDDEN, generator=gen),
        "weight": torch.randn(PADDED_VOCAB, HIDDEN, generator=gen),
        "labels": torch.tensor([3, 5]),
        "temperature": 1.0,
        "vocab_size": VOCAB,
        "chunk_tokens": 4,
    } | change
    with pytest.raises(ValueError, match=message):
        logprobs_from_hidden(**args)
    if "hidden" not in change and "weight" not in change and "chunk_tokens" not in change:
        logits = args["hidden"] @ args["weight"].t()
        with pytest.raises(ValueError, match=message):
            logprobs_from_logits(
                logits, args["labels"], temperature=args["temperature"], vocab_size=args["vocab_size"]
            )
