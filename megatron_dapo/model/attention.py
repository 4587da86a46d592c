"""Causal attention over packed (THD) sequences and the context-parallel group, for the local (CPU) spec.

megatron-core's local DotProductAttention refuses both packed sequences and context parallelism (0.16), so the
local spec uses this module instead; the GPU path keeps Transformer Engine's attention. Each CP rank holds two
zigzag chunks of every sequence (parallel/context.py); it all-gathers K and V over the CP group and masks with
the tokens' global positions, so the result equals attention over the whole sequence.
"""

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_dapo.parallel.context import check_cp_divisible, zigzag_positions


class PackedCausalAttention(MegatronModule):
    """Core attention (softmax(QKᵀ·scale)V) for THD-packed or [s, b] batches, with context parallelism."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"PackedCausalAttention is causal only, got {attn_mask_type}")
        if (attention_dropout or config.attention_dropout) > 0:
            raise ValueError("PackedCausalAttention has no dropout: set attention_dropout=0")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """THD: q [t, np, hn], k/v [t, ng, hn] -> [t, np·hn]. SBHD: [s, b, n, hn] -> [s, b, np·hn].

        `cu_seqlens` of THD input count whole (global) sequences; this rank holds 1/cp of each.
        """
        if attention_bias is not None:
            raise ValueError("PackedCausalAttention does not take an attention bias")
        cp = self.cp_group.size()
        if packed_seq_params is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            return self._attend(query, key, value, seq_lens, cp).flatten(1)
        # [s, b, n, hn]: each batch row is one whole sequence, split over CP like a packed one.
        s, b = query.shape[:2]
        thd = [x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (query, key, value)]
        out = self._attend(*thd, [s * cp] * b, cp)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, seq_lens: list[int], cp: int) -> Tensor:
        """query [t, np, hn], key/value [t, ng, hn] (this rank's tokens) -> [t, np, hn]."""
        check_cp_divisible(seq_lens, cp)
        if cp > 1:
            # Every rank needs the K/V of the whole sequence; the gradient flows back by reduce-scatter.
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        local_tokens = query.shape[0]
        outputs, start = [], 0
        for seq_len in seq_lens:
            length = seq_len // cp
            q = query[start : start + length].transpose(0, 1)
            k = _rows_of_every_rank(key, start, length, local_tokens, cp).transpose(0, 1)
            v = _rows_of_every_rank(value, start, length, local_tokens, cp).transpose(0, 1)
            if cp == 1:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
                )
            else:
                q_pos = zigzag_positions(seq_len, cp, self.cp_group.rank()).to(q.device)
                k_pos = torch.cat([zigzag_positions(seq_len, cp, rank) for rank in range(cp)]).to(q.device)
                mask = k_pos[None, :] <= q_pos[:, None]
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=True
                )
            outputs.append(out.transpose(0, 1))
            start += length
        return torch.cat(outputs)


def _rows_of_every_rank(gathered: Tensor, start: int, length: int, local_tokens: int, cp: int) -> Tensor:
    """One sequence's rows from each CP rank's block of an all-gathered [cp·t, ...] tensor, rank by rank."""
    if cp == 1:
        return gathered[start : start + length]
    return torch.cat(
        [gathered[r * local_tokens + start : r * local_tokens + start + length] for r in range(cp)]
    )
