"""The CPU engine's sampler against float64 references, and SGLang's order of finish checks."""

import pytest
import torch

from megatron_dapo.rollout.cpu_engine.requests import EngineSampling
from megatron_dapo.rollout.cpu_engine.sampling import sample_tokens
from megatron_dapo.rollout.cpu_engine.scheduler import finish_reason_after

VOCAB = 50


def _filtered_distribution(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """float64 reference: softmax(logits / T), cut to the top_k tokens and to the tokens whose preceding mass
    (in descending order) is at most top_p, renormalised. [V] -> [V]."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    kept = torch.zeros_like(probs)
    mass_before = 0.0
    for rank, token in enumerate(order.tolist()):
        if rank < top_k and mass_before <= top_p:
            kept[token] = probs[token]
        mass_before += probs[token].item()
    return kept / kept.sum()


def _sample(logits, temperature, top_p, top_k, uniforms):
    rows = len(uniforms)
    return sample_tokens(
        logits.expand(rows, -1),
        temperatures=torch.full((rows,), temperature),
        top_ps=torch.full((rows,), top_p),
        top_ks=torch.full((rows,), top_k),
        uniforms=uniforms,
    )


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(1.0, 1.0, VOCAB), (0.6, 0.8, VOCAB), (1.3, 1.0, 7)]
)
def test_samples_follow_the_filtered_distribution(temperature, top_p, top_k):
    """Inverse CDF on a uniform grid: each token's share of the grid is its filtered probability."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    grid = 20_000
    uniforms = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    tokens, logprobs = _sample(logits, temperature, top_p, top_k, uniforms)
    frequencies = torch.bincount(tokens, minlength=VOCAB).double() / grid
    expected = _filtered_distribution(logits, temperature, top_p, top_k)
    assert torch.allclose(frequencies, expected, atol=2.0 / grid)
    # Log-probs are SGLang's: temperature-scaled over the whole vocabulary, not renormalised after the cut.
    reference = torch.log_softmax(logits.double() / temperature, dim=-1)[tokens]
    assert torch.allclose(logprobs.double(), reference, atol=1e-5)


def test_top_k_one_is_greedy_with_untempered_logprob():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    tokens, logprobs = sample_tokens(
        logits,
        temperatures=torch.ones(4),  # SGLang runs temperature 0 as temperature 1, top_k 1
        top_ps=torch.ones(4),
        top_ks=torch.ones(4, dtype=torch.long),
        uniforms=torch.tensor([0.0, 0.3, 0.7, 0.999]),
    )
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.allclose(logprobs, torch.log_softmax(logits, dim=-1).max(dim=-1).values, atol=1e-6)


def test_rows_sample_independently():
    """Each row uses its own temperature, cut and uniform: batching does not mix rows."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(3, VOCAB, generator=generator)
    uniforms = torch.rand(3, generator=generator, dtype=torch.float64)
    settings = [(0.5, 0.9, VOCAB), (1.0, 1.0, 3), (2.0, 0.5, 10)]
    tokens, logprobs = sample_tokens(
        logits,
        temperatures=torch.tensor([t for t, _, _ in settings]),
        top_ps=torch.tensor([p for _, p, _ in settings]),
        top_ks=torch.tensor([k for _, _, k in settings]),
        uniforms=uniforms,
    )
    for row, (temperature, top_p, top_k) in enumerate(settings):
        alone, alone_logprob = _sample(
            logits[row : row + 1], temperature, top_p, top_k, uniforms[row : row + 1]
        )
        assert tokens[row] == alone[0] and logprobs[row] == alone_logprob[0]


def _sampling(**overrides) -> EngineSampling:
    fields = dict(
        temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=4, stop_token_ids=frozenset({7}),
        ignore_eos=False, sampling_seed=None, skip_special_tokens=True, no_stop_trim=False,
    )  # fmt: skip
    return EngineSampling(**(fields | overrides))


def test_finish_checks_follow_sglang_order():
    eos = frozenset({2})
    sampling = _sampling()
    assert finish_reason_after(5, 1, 4, sampling, eos) is None
    assert finish_reason_after(7, 1, 4, sampling, eos) == {"type": "stop", "matched": 7}
    assert finish_reason_after(2, 3, 4, sampling, eos) == {"type": "stop", "matched": 2}  # the model's EOS
    # The length limit is checked first: a stop token as the last allowed token still reads "length".
    assert finish_reason_after(7, 4, 4, sampling, eos) == {"type": "length", "length": 4}
    ignoring = _sampling(ignore_eos=True)  # SGLang's ignore_eos skips stop_token_ids as well
    assert finish_reason_after(7, 1, 4, ignoring, eos) is None
    assert finish_reason_after(2, 1, 4, ignoring, eos) is None
