"""The one mapping between Megatron GPTModel parameters and Hugging Face causal-LM tensors.

A declarative table names, for every Megatron parameter, the Hugging Face tensor(s) it is made of and
its `Layout`: how those tensors are fused and how tensor parallelism splits the result. Explicit reshape
functions do the rest. Everything works one tensor at a time, so conversion tools, model loading and
rollout weight sync never hold more than one parameter in flight.

Megatron layouts (megatron-core 0.16, checked against the installed source):
- Fused QKV is grouped by query group: for each of the `num_query_groups` groups, the rows of its
  `heads // groups` query heads, then its key head, then its value head (the bias likewise). A TP rank
  holds whole query groups, so TP splits the fused tensor on dim 0.
- fc1 is [gate; up]; TP rank r holds [gate_r; up_r], so gate and up are split separately.
- The embedding and output layer carry the vocabulary padded to a size the caller gives (the model
  builder's rule); the padding rows are zero here and stripped on the way back.
- Names are those of the local spec with GLOBAL layer indices; `canonical_name` accepts Transformer Engine
  spec names (layer norms fused into linear_qkv / linear_fc1) and DDP / Float16Module prefixes too.

The shape facts come from model/arch.py's `GPTArch`, the one reader of config.json (no megatron import).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from megatron_dapo.model.arch import GPTArch


class Layout(Enum):
    """How the Hugging Face tensors fuse into one Megatron tensor, and how TP splits it."""

    REPLICATED = "replicated"  # norms: every TP rank holds the whole tensor
    ROW = "row"  # split on dim 1 (input features): linear_proj, linear_fc2
    QKV = "qkv"  # q, k, v fused per query group; split on dim 0 by whole query groups
    GATE_UP = "gate_up"  # [gate; up] fused; each TP rank holds [gate_r; up_r]
    VOCAB = "vocab"  # embedding / output layer: vocabulary padded, split on dim 0


@dataclass(frozen=True)
class TensorMap:
    """One Megatron parameter and the Hugging Face tensors it is made of, in fusion order."""

    megatron: str  # local-spec GPTModel parameter name with the GLOBAL layer index
    hf: tuple[str, ...]
    layout: Layout
    layer: int | None = None  # global layer index; None outside the decoder layers
    tied_copy: bool = False  # the last PP stage's output layer when tied: read from HF, never written back


# Per decoder layer: (Megatron suffix, HF suffixes, layout, present when). Suffixes follow
# "decoder.layers.{i}." and "model.layers.{i}." respectively.
_LAYER_TABLE: tuple[tuple[str, tuple[str, ...], Layout, str | None], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), Layout.REPLICATED, None),
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        Layout.QKV,
        None,
    ),
    (
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        Layout.QKV,
        "qkv_bias",
    ),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), Layout.REPLICATED, "qk_layernorm"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), Layout.REPLICATED, "qk_layernorm"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), Layout.ROW, None),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), Layout.REPLICATED, None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Layout.GATE_UP, None),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), Layout.ROW, None),
)

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_HEAD = "lm_head.weight"  # absent, or a copy of the embedding, when tie_word_embeddings is set

# The Transformer Engine spec fuses the pre-attention and pre-MLP norms into the following linear layer;
# megatron's dist-checkpoint keys use these names for both specs.
_TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# HF tensors that are not weights (older checkpoints stored rotary tables).
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class HFMapping:
    """The name table and the reshapes for one model; see the module docstring for the layouts."""

    def __init__(self, dims: GPTArch):
        self.dims = dims
        self.tensors: tuple[TensorMap, ...] = tuple(self._build_table())
        self._by_megatron = {t.megatron: t for t in self.tensors}
        if dims.tie_word_embeddings:
            self._by_megatron[OUTPUT_LAYER] = TensorMap(
                OUTPUT_LAYER, (HF_EMBEDDING,), Layout.VOCAB, tied_copy=True
            )
        self._by_hf = {name: t for t in self.tensors for name in t.hf}

    def _build_table(self) -> list[TensorMap]:
        """Every tensor written to a checkpoint, in model order (the tied output layer excluded)."""
        table = [TensorMap(EMBEDDING, (HF_EMBEDDING,), Layout.VOCAB)]
        for i in range(self.dims.num_layers):
            for megatron, hf, layout, when in _LAYER_TABLE:
                if when is None or getattr(self.dims, when):
                    table.append(
                        TensorMap(
                            f"decoder.layers.{i}.{megatron}",
                            tuple(f"model.layers.{i}.{name}" for name in hf),
                            layout,
                            i,
                        )
                    )
        table.append(TensorMap(FINAL_NORM, ("model.norm.weight",), Layout.REPLICATED))
        if not self.dims.tie_word_embeddings:
            table.append(TensorMap(OUTPUT_LAYER, (HF_HEAD,), Layout.VOCAB))
        return table

    # ---- names ----------------------------------------------------------------------------------------

    def get(self, megatron_name: str) -> TensorMap:
        """The entry of a GPTModel parameter (global layer index; local or TE spec; wrapper prefixes ok)."""
        name = canonical_name(megatron_name)
        if name not in self._by_megatron:
            raise KeyError(
                f"no Hugging Face mapping for Megatron parameter {megatron_name!r} "
                f"(model_type={self.dims.model_type}, {self.dims.num_layers} layers)"
            )
        return self._by_megatron[name]

    def for_hf(self, hf_name: str) -> TensorMap | None:
        """The entry a Hugging Face tensor belongs to; None for tensors that are not weights."""
        if _HF_IGNORED.search(hf_name) or (hf_name == HF_HEAD and self.dims.tie_word_embeddings):
            return None
        if hf_name not in self._by_hf:
            raise KeyError(
                f"Hugging Face tensor {hf_name!r} has no Megatron counterpart "
                f"(model_type={self.dims.model_type}): the weights do not match config.json"
            )
        return self._by_hf[hf_name]

    # ---- shapes ---------------------------------------------------------------------------------------

    def hf_shapes(self, entry: TensorMap) -> list[tuple[int, ...]]:
        """Expected shape of each Hugging Face tensor of `entry`, from the config."""
        d = self.dims
        q_rows, kv_rows = d.num_attention_heads * d.head_dim, d.num_query_groups * d.head_dim
        if entry.layout is Layout.VOCAB:
            return [(d.vocab_size, d.hidden_size)]
        if entry.layout is Layout.QKV:
            rest = (d.hidden_size,) if entry.megatron.endswith("weight") else ()
            return [(q_rows, *rest), (kv_rows, *rest), (kv_rows, *rest)]
        if entry.layout is Layout.GATE_UP:
            return [(d.ffn_hidden_size, d.hidden_size)] * 2
        if entry.megatron.endswith("linear_proj.weight"):
            return [(d.hidden_size, q_rows)]
        if entry.megatron.endswith("linear_fc2.weight"):
            return [(d.hidden_size, d.ffn_hidden_size)]
        if entry.megatron.endswith(("q_layernorm.weight", "k_layernorm.weight")):
            return [(d.head_dim,)]
        return [(d.hidden_size,)]  # the input, pre-MLP and final norms

    def megatron_shape(self, entry: TensorMap, padded_vocab_size: int | None = None) -> tuple[int, ...]:
        """Shape of the whole (TP=1) Megatron tensor; the vocabulary padded when a size is given."""
        shapes = self.hf_shapes(entry)
        if entry.layout is Layout.VOCAB:
            return (padded_vocab_size or self.dims.vocab_size, self.dims.hidden_size)
        if entry.layout in (Layout.QKV, Layout.GATE_UP):
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0]

    # ---- tensors --------------------------------------------------------------------------------------

    def to_megatron(
        self,
        entry: TensorMap,
        hf_tensors: Sequence[torch.Tensor],
        *,
        tp_size: int = 1,
        padded_vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[torch.Tensor]:
        """Hugging Face tensors of `entry` -> the Megatron tensor's shard on each of `tp_size` ranks."""
        self.dims.check_parallel(tp_size)  # QKV shards must hold whole query groups
        self._check_hf_shapes(entry, hf_tensors)
        hf_tensors = [t if dtype is None else t.to(dtype) for t in hf_tensors]
        if entry.layout is Layout.QKV:
            full = fuse_qkv(*hf_tensors, num_query_groups=self.dims.num_query_groups)
        elif entry.layout is Layout.GATE_UP:
            full = torch.cat(hf_tensors, dim=0)
        elif entry.layout is Layout.VOCAB:
            full = pad_vocab(hf_tensors[0], padded_vocab_size or self.dims.vocab_size)
        else:
            full = hf_tensors[0]
        return split_tp(entry.layout, full, tp_size)

    def to_hf(
        self, entry: TensorMap, tp_shards: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """The TP shards of one Megatron tensor (one shard: the whole tensor) -> (HF name, tensor) pairs.

        The tied output layer maps to nothing: its Hugging Face tensor is the embedding's.
        """
        if entry.tied_copy:
            return []
        full = merge_tp(entry.layout, tp_shards)
        expected = self.megatron_shape(entry, full.shape[0] if entry.layout is Layout.VOCAB else None)
        if tuple(full.shape) != expected:
            raise ValueError(
                f"{entry.megatron}: Megatron tensor has shape {tuple(full.shape)}, "
                f"expected {expected} from the config (model_type={self.dims.model_type})"
            )
        if entry.layout is Layout.QKV:
            parts = split_qkv(
                full,
                num_query_groups=self.dims.num_query_groups,
                num_attention_heads=self.dims.num_attention_heads,
            )
        elif entry.layout is Layout.GATE_UP:
            parts = list(full.chunk(2, dim=0))
        elif entry.layout is Layout.VOCAB:
            parts = [strip_vocab(full, self.dims.vocab_size)]
        else:
            parts = [full]
        return [(name, t if dtype is None else t.to(dtype)) for name, t in zip(entry.hf, parts, strict=True)]

    def _check_hf_shapes(self, entry: TensorMap, hf_tensors: Sequence[torch.Tensor]) -> None:
        expected = self.hf_shapes(entry)
        got = [tuple(t.shape) for t in hf_tensors]
        if got != expected:
            raise ValueError(
                f"config/weights mismatch: {', '.join(entry.hf)} have shapes {got}, config.json implies "
                f"{expected} (model_type={self.dims.model_type})"
            )


# ---- names --------------------------------------------------------------------------------------------


def canonical_name(megatron_name: str) -> str:
    """Local-spec name of a GPTModel parameter given by either spec, wrapper prefixes removed."""
    name = megatron_name
    while name.startswith("module."):  # DistributedDataParallel and Float16Module wrap the model
        name = name[len("module.") :]
    match = _LAYER_NAME.match(name)
    if match:
        index, suffix = match.groups()
        for local, te in _TE_NORM_NAMES.items():
            if suffix == te:
                return f"decoder.layers.{index}.{local}"
    return name


def checkpoint_key(entry: TensorMap) -> str:
    """The dist-checkpoint key megatron-core gives this tensor (layers stacked on a leading axis)."""
    match = _LAYER_NAME.match(entry.megatron)
    if not match:
        return entry.megatron
    suffix = match.group(2)
    return f"decoder.layers.{_TE_NORM_NAMES.get(suffix, suffix)}"


def layers_of_stage(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the decoder layers on pipeline stage `pp_rank` (even split)."""
    if num_layers % pp_size != 0:
        raise ValueError(f"pipeline parallel size {pp_size} does not divide num_layers={num_layers}")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def to_global_name(local_name: str, num_layers: int, pp_size: int, pp_rank: int) -> str:
    """A parameter name with the stage-local layer index of `pp_rank` -> the global index."""
    match = _LAYER_NAME.match(canonical_name(local_name))
    if not match:
        return canonical_name(local_name)
    index, suffix = match.groups()
    return f"decoder.layers.{layers_of_stage(num_layers, pp_size, pp_rank)[int(index)]}.{suffix}"


# ---- reshapes -----------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int) -> torch.Tensor:
    """HF q [heads·d, ...], k and v [groups·d, ...] -> Megatron fused [groups·(heads/groups + 2)·d, ...].

    Each query group's rows are its query heads, then its key head, then its value head.
    """
    rest = q.shape[1:]
    grouped = [x.reshape(num_query_groups, -1, *rest) for x in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, *, num_query_groups: int, num_attention_heads: int) -> list[torch.Tensor]:
    """Inverse of `fuse_qkv`: fused [groups·(heads/groups + 2)·d, ...] -> [q, k, v]."""
    rest = qkv.shape[1:]
    per_group = num_attention_heads // num_query_groups + 2
    head_dim = qkv.shape[0] // (num_query_groups * per_group)
    grouped = qkv.reshape(num_query_groups, per_group * head_dim, *rest)
    q, k, v = grouped.split([(per_group - 2) * head_dim, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """[V, H] -> [padded_size, H] with zero rows appended."""
    if padded_size < weight.shape[0]:
        raise ValueError(f"padded vocabulary {padded_size} is smaller than the vocabulary {weight.shape[0]}")
    if padded_size == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])])


def strip_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V_padded, H] -> [vocab_size, H]."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return weight[:vocab_size]


def split_tp(layout: Layout, full: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Whole Megatron tensor -> the shard of each TP rank (views where possible)."""
    if tp_size == 1 or layout is Layout.REPLICATED:
        return [full] * tp_size
    dim = 1 if layout is Layout.ROW else 0
    if full.shape[dim] % (2 * tp_size if layout is Layout.GATE_UP else tp_size) != 0:
        raise ValueError(
            f"TP size {tp_size} does not divide dim {dim} of a {layout.value} tensor {tuple(full.shape)}"
        )
    if layout is Layout.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat(pair) for pair in zip(gate.chunk(tp_size), up.chunk(tp_size), strict=True)]
    return list(full.chunk(tp_size, dim=dim))


def merge_tp(layout: Layout, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_tp`: the TP shards of one tensor, in rank order -> the whole tensor."""
    if len(shards) == 1 or layout is Layout.REPLICATED:
        return shards[0]
    if layout is Layout.GATE_UP:
        pairs = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([p[0] for p in pairs] + [p[1] for p in pairs], dim=0)
    return torch.cat(list(shards), dim=1 if layout is Layout.ROW else 0)
