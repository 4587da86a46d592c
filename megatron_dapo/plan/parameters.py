"""Parameter counts: the whole model (as Hugging Face counts it) and one GPU's share under TP and PP."""

from megatron_dapo.model.arch import padded_vocab_size
from megatron_dapo.plan.shape import ModelShape


def layer_parameters(shape: ModelShape, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (norms replicated, the rest split over TP)."""
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    qkv_rows = (shape.num_attention_heads + 2 * shape.num_query_groups) * d
    split = qkv_rows * h + shape.num_attention_heads * d * h + 3 * f * h
    if shape.qkv_bias:
        split += qkv_rows
    replicated = 2 * h + (2 * d if shape.qk_layernorm else 0)
    return split // tp + replicated


def count_parameters(shape: ModelShape) -> int:
    """All parameters of the unpadded model (what Hugging Face counts)."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return shape.num_layers * layer_parameters(shape, 1) + embeddings + shape.hidden_size


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters on one GPU of pipeline stage `stage`: its layers, plus the embedding (first stage), the
    final norm and the output layer (last stage; tied embeddings keep a copy there when PP > 1)."""
    vocab_rows = padded_vocab_size(shape.vocab_size, tp) // tp * shape.hidden_size
    count = shape.num_layers // pp * layer_parameters(shape, tp)
    if stage == 0:
        count += vocab_rows
    if stage == pp - 1:
        count += shape.hidden_size
        if not (shape.tie_word_embeddings and pp == 1):
            count += vocab_rows
    return count
