"""The importance correction (algo/importance.py) against a reference written sample by sample in Python
floats: truncated or masked weights at token, sequence and geometric level, on samples of different lengths
whose ratios fall both inside and outside the band."""

import math

import pytest
import torch

from megatron_dapo.algo import (
    ImportanceCorrection,
    finalize_metrics,
    importance_metric_sums,
    importance_weights,
)


def random_samples(lengths: list[int], seed: int, level: str):
    """Per-token log pi_old and log pi_rollout of samples laid end to end, and their cu_seqlens. The
    log-ratios spread at the level the correction looks at: per token, per sample's sum, per sample's mean."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    old = torch.log(torch.rand(total, generator=gen, dtype=torch.float64) * 0.98 + 0.01)
    spread, noise = {"token": (0.0, 0.7), "sequence": (1.5, 0.05), "geometric": (0.08, 0.05)}[level]
    offsets = [float(torch.randn(1, generator=gen)) * spread for _ in lengths]
    per_token = [o / n if level == "sequence" else o for o, n in zip(offsets, lengths, strict=True)]
    drift = torch.cat([torch.full((n,), d) for d, n in zip(per_token, lengths, strict=True)])
    rollout = old - drift - noise * torch.randn(total, generator=gen, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return old, rollout, cu_seqlens


def reference(old, rollout, cu_seqlens, correction: ImportanceCorrection):
    """(weight, ratio at the correction's level) of each token, one sample at a time, in Python floats."""
    low, high = correction.band
    out, ratios = [], []
    for begin, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        logs = [o - r for o, r in zip(old[begin:end].tolist(), rollout[begin:end].tolist(), strict=True)]
        if correction.level == "sequence":
            logs = [math.fsum(logs)] * len(logs)
        elif correction.level == "geometric":
            logs = [math.fsum(logs) / len(logs)] * len(logs)
        for log_ratio in logs:
            ratios.append(math.exp(log_ratio))
            if correction.mode == "truncate":
                out.append(min(math.exp(max(log_ratio, -20.0)), high))
            else:
                out.append(1.0 if low <= math.exp(log_ratio) <= high else 0.0)
    return out, ratios


LENGTHS = [7, 1, 23, 12, 40, 3, 16, 9, 30, 5, 11, 2, 19, 8, 27, 4]
CASES = [
    ImportanceCorrection(cap=1.5),
    ImportanceCorrection(cap=2.0, mode="mask"),
    ImportanceCorrection(cap=3.0, mode="mask", lower=0.6),
    ImportanceCorrection(cap=2.0, level="sequence"),
    ImportanceCorrection(cap=2.5, level="sequence", mode="mask"),
    ImportanceCorrection(cap=1.1, level="geometric", mode="mask", lower=0.95),
]


@pytest.mark.parametrize("correction", CASES, ids=lambda c: f"{c.level}-{c.mode}-{c.cap}")
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_the_reference(correction, seed):
    old, rollout, cu_seqlens = random_samples(
        LENGTHS, seed=seed + 10 * CASES.index(correction), level=correction.level
    )
    expected, ratios = reference(old, rollout, cu_seqlens, correction)
    got = importance_weights(old, rollout, cu_seqlens, correction)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # float32 inputs (what the trainer passes) give the same weights, up to rounding near the band's ends
    single = importance_weights(old.float(), rollout.float(), cu_seqlens, correction)
    assert single.dtype == torch.float32
    assert (single.double() - got).abs().le(1e-5 * got.clamp(min=1)).float().mean() > 0.95
    # the ratios fall inside the band and beyond its upper end (and its lower end, which only masks)
    low, high = correction.band
    assert any(low <= r <= high for r in ratios) and any(r > high for r in ratios)
    assert correction.mode == "truncate" or any(r < low for r in ratios)
    if correction.level != "token":  # one weight per sample, shared by its tokens
        for begin, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            assert got[begin:end].unique().numel() == 1


def test_sequence_weights_cut_whole_samples_token_weights_do_not():
    """One sample far off in total though each of its tokens is close: only the sequence level sees it."""
    old = torch.full((50,), -1.0, dtype=torch.float64)
    rollout = old - 0.05  # every token's ratio e^0.05 ~ 1.05: inside [0.5, 2]; the product e^2.5 ~ 12 is not
    cu_seqlens = torch.tensor([0, 50])
    token = importance_weights(old, rollout, cu_seqlens, ImportanceCorrection(cap=2.0, mode="mask"))
    sequence = importance_weights(
        old, rollout, cu_seqlens, ImportanceCorrection(cap=2.0, level="sequence", mode="mask")
    )
    geometric = importance_weights(
        old, rollout, cu_seqlens, ImportanceCorrection(cap=1.01, level="geometric", mode="mask")
    )
    assert token.eq(1).all() and sequence.eq(0).all() and geometric.eq(0).all()


def test_extreme_ratios_stay_finite_and_truncation_never_rejects():
    old = torch.tensor([0.0, -300.0, -1.0, 0.0, -1.0])
    rollout = torch.tensor([-300.0, 0.0, -1.0, -1e30, -1.0])
    cu_seqlens = torch.tensor([0, 2, 5])
    for level in ("token", "sequence"):
        w = importance_weights(old, rollout, cu_seqlens, ImportanceCorrection(cap=2.0, level=level))
        assert torch.isfinite(w).all() and (w > 0).all() and (w <= 2).all()
    masked = importance_weights(old, rollout, cu_seqlens, ImportanceCorrection(cap=2.0, mode="mask"))
    assert masked.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]


def test_weights_are_detached():
    old = torch.randn(6, requires_grad=True)
    w = importance_weights(old, torch.randn(6), torch.tensor([0, 2, 6]), ImportanceCorrection(cap=2.0))
    assert not w.requires_grad


def test_metric_sums_add_up_and_finalise():
    w = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0])
    parts = [importance_metric_sums(w[:2]), importance_metric_sums(w[2:])]
    totals = {key: parts[0][key] + parts[1][key] for key in parts[0]}
    metrics = finalize_metrics(totals)
    assert metrics["is_weight_mean"] == pytest.approx(3.5 / 5)
    assert metrics["is_masked_share"] == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cap=0.0), "cap"),
        (dict(cap=math.inf), "cap"),
        (dict(cap=2.0, lower=0.5), "mask mode only"),
        (dict(cap=2.0, mode="mask", lower=2.0), "0 < lower < cap"),
        (dict(cap=1.0, mode="mask"), "0 < lower < cap"),
        (dict(cap=2.0, level="geometric"), "geometric"),
        (dict(cap=2.0, level="batch"), "level must be one of"),
        (dict(cap=2.0, mode="clip"), "mode one of"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImportanceCorrection(**kwargs)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="equal in shape"):
        importance_weights(
            torch.zeros(3), torch.zeros(4), torch.tensor([0, 3]), ImportanceCorrection(cap=2.0)
        )
    with pytest.raises(ValueError, match="cu_seqlens"):
        importance_weights(
            torch.zeros(3),
            torch.zeros(3),
            torch.tensor([0, 2]),
            ImportanceCorrection(cap=2.0, level="sequence"),
        )
