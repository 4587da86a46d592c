"""Next-token sampling as SGLang's sampler does it, and the log-prob SGLang returns for the sampled token.

SGLang (srt/layers/sampler.py) divides the logits by the temperature, takes the softmax, samples from it after
the top-k and top-p cut (applied jointly on the sorted probabilities, without renormalising between the two),
and returns log(softmax(logits / T)) of the sampled token: temperature-scaled, but over the whole vocabulary,
not renormalised after the top-k/top-p cut. A greedy request (temperature 0) runs as temperature 1 and
top_k 1, so its log-prob is log_softmax(logits). With SGLANG_RETURN_ORIGINAL_LOGPROB set, SGLang returns the
T = 1 log-probs instead; the CPU engine always returns the temperature-scaled ones, SGLang's default.

Departures, on purpose: the log-prob is log_softmax (SGLang takes log of the softmax, clamped to the dtype's
minimum: equal up to rounding), and each row draws its uniform from its own torch.Generator, so a sequence's
samples do not depend on which other sequences share its batch.
"""

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row by inverse CDF of the top-k/top-p-filtered, temperature-scaled distribution.

    logits [B, V] float; temperatures, top_ps [B] float (> 0, in (0, 1]); top_ks [B] long (V for no cut);
    uniforms [B] in [0, 1). Returns tokens [B] long and their log-probs [B] under softmax(logits / T).
    """
    logprobs = torch.log_softmax(logits.float() / temperatures[:, None], dim=-1)
    probs = logprobs.exp()
    # stable=True: among equal probabilities the lowest token id comes first, as torch.argmax picks it.
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (ranks[None, :] < top_ks[:, None]) & (mass_before <= top_ps[:, None])
    cdf = (sorted_probs * keep).cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    # The first position whose cumulative kept mass exceeds the target holds a kept token (its mass is > 0).
    positions = torch.searchsorted(cdf, targets, right=True).clamp(max=probs.shape[-1] - 1)
    tokens = sorted_ids.gather(-1, positions).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
