"""THD packing, the zigzag context-parallel split, and balanced micro-batch plans."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.data.packing import (
    Sample,
    balanced_partition,
    pack,
    plan_microbatches,
    sequence_pad_multiple,
)
from megatron_dapo.parallel.context import check_cp_divisible, zigzag_indices, zigzag_positions


def test_pack_lays_sequences_end_to_end_with_labels_and_response_mask():
    samples = [Sample([5, 6, 7, 8], 2), Sample([9, 10, 11], 1), Sample([1, 2], 1)]
    batch = pack(samples, [2, 0])
    assert batch.tokens.tolist() == [1, 2, 5, 6, 7, 8]
    assert batch.positions.tolist() == [0, 1, 0, 1, 2, 3]
    # Position t carries the label t+1 of its own sequence; the last position of a sequence has none (0).
    assert batch.labels.tolist() == [2, 0, 6, 7, 8, 0]
    assert batch.loss_mask.tolist() == [True, False, False, True, True, False]
    assert batch.sample_of_token.tolist() == [0, 0, 1, 1, 1, 1]
    assert batch.sample_ids == (2, 0)
    params = batch.packed_seq_params()
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 6]
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == 4


def test_padding_only_within_each_sequence_end():
    batch = pack([Sample([3, 4, 5], 1), Sample([6, 7, 8, 9, 10], 3)], [0, 1], pad_multiple=4)
    assert batch.seq_lens == (4, 8)
    assert batch.tokens.tolist() == [3, 4, 5, 0, 6, 7, 8, 9, 10, 0, 0, 0]
    assert batch.loss_mask.tolist() == [True, True, False, False] + [False, False, True, True] + [False] * 4


def test_response_values_scatter_and_gather_round_trip():
    samples = [Sample(list(range(10)), 4), Sample(list(range(7)), 1)]
    batch = pack(samples, [1, 0], pad_multiple=4)
    values = [torch.randn(6), torch.randn(6)]  # responses: 6 tokens (7 - 1) and 6 tokens (10 - 4)
    per_token = batch.scatter_response(values)
    assert per_token[~batch.loss_mask].abs().sum() == 0
    for got, want in zip(batch.gather_response(per_token), values, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"must have shape \[6\]"):
        batch.scatter_response([torch.randn(5), torch.randn(6)])


def test_sample_needs_a_prompt_token():
    with pytest.raises(ValueError, match="response_start=0"):
        Sample([1, 2, 3], 0)


def test_empty_selection_gives_a_filler_with_nothing_to_score():
    batch = pack([Sample([1, 2], 1)], [], pad_multiple=4)
    assert batch.tokens.numel() == 4 and not batch.loss_mask.any()
    assert batch.sample_ids == (-1,)
    assert batch.gather_response(torch.randn(4))[0].numel() == 0


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_zigzag_split_is_a_balanced_permutation(cp):
    seq_lens = [2 * cp * n for n in (1, 3, 2)]
    shares = [zigzag_indices(seq_lens, cp, rank) for rank in range(cp)]
    assert sorted(torch.cat(shares).tolist()) == list(range(sum(seq_lens)))
    assert len({s.numel() for s in shares}) == 1
    chunk = seq_lens[1] // (2 * cp)
    for rank in range(cp):  # rank r holds chunks r and 2cp-1-r of each sequence
        expected = list(range(rank * chunk, (rank + 1) * chunk))
        expected += list(range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))
        assert zigzag_positions(seq_lens[1], cp, rank).tolist() == expected


def test_cp_split_refuses_indivisible_sequences():
    with pytest.raises(ValueError, match="divisible by 2\\*cp = 4"):
        check_cp_divisible([8, 6], cp=2)


def test_cp_share_keeps_each_sequence_together():
    batch = pack([Sample(list(range(1, 9)), 3), Sample(list(range(11, 15)), 1)], [0, 1], pad_multiple=4)

    class FakeGroup:
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return 2

        def rank(self):
            return self._rank

    shares = [batch.cp_share(FakeGroup(rank)) for rank in range(2)]
    assert shares[0].tokens.tolist() == [1, 2, 7, 8, 11, 14]
    assert shares[1].tokens.tolist() == [3, 4, 5, 6, 12, 13]
    assert shares[1].positions.tolist() == [2, 3, 4, 5, 1, 2]
    assert shares[0].seq_lens == batch.seq_lens
    assert shares[1].token_cu_seqlens().tolist() == [0, 4, 6]
    assert batch.token_cu_seqlens().tolist() == [0, 8, 12]
    assert shares[1].response_tokens().tolist() == [5, 3]


def test_sequence_pad_multiple():
    assert sequence_pad_multiple(cp=1) == 1
    assert sequence_pad_multiple(cp=2) == 4
    assert sequence_pad_multiple(cp=2, tp=4, sequence_parallel=True) == 16


def test_balanced_partition_puts_longest_first_into_the_lightest():
    # 10 -> A, 9 -> B, 8 -> B (9 < 10), then the ones -> A (lighter each time)
    assert balanced_partition([10, 9, 8, 1, 1, 1], 2) == [[0, 3, 4, 5], [1, 2]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    dp_size=st.integers(1, 4),
    budget_slack=st.integers(0, 100),
    cp=st.sampled_from([1, 2]),
)
def test_plan_covers_every_sample_once_within_budget(lengths, dp_size, budget_slack, cp):
    pad = sequence_pad_multiple(cp)
    padded = [-(-n // pad) * pad for n in lengths]
    tokens_per_microbatch = -(-max(padded) // cp) + budget_slack
    plan = plan_microbatches(
        lengths, dp_size=dp_size, tokens_per_microbatch=tokens_per_microbatch, cp=cp, pad_multiple=pad
    )
    assert len(plan) == dp_size
    assert len({len(rank) for rank in plan}) == 1, "every DP rank runs the same number of micro-batches"
    seen = sorted(i for rank in plan for group in rank for i in group)
    assert seen == list(range(len(lengths)))
    for rank in plan:
        for group in rank:
            assert sum(padded[i] for i in group) <= tokens_per_microbatch * cp


def test_plan_balances_tokens_across_ranks_and_microbatches():
    lengths = [30, 28, 25, 20, 18, 15, 12, 10, 8, 6, 5, 3]
    plan = plan_microbatches(lengths, dp_size=2, tokens_per_microbatch=50)
    totals = [sum(lengths[i] for i in group) for rank in plan for group in rank]
    assert len(plan[0]) == 2
    assert max(totals) / min(totals) < 1.1


def test_plan_rejects_a_sample_longer_than_the_budget():
    with pytest.raises(ValueError, match=r"raise train\.tokens_per_microbatch to at least 42"):
        plan_microbatches([10, 81], dp_size=1, tokens_per_microbatch=40, cp=2, pad_multiple=4)
