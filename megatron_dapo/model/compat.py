"""The megatron-core calls that lean on its internals, which move between 0.16 (Python 3.11) and newer
releases (Python 3.12, GPU clusters): layer-spec surgery, the Transformer Engine import, and the attribute
that makes GPTModel stop before its output layer.

Everything else in megatron_dapo uses megatron-core's public surface. Checked against 0.16.1 (Python 3.11)
and 0.17.1, 0.18.2 and 0.19.2 (Python 3.12; .ci/py312.sh tests the newest release): the same code serves all;
when a release changes one of these, this file is the one to change (parallel/cpu_shims.py: its CUDA calls).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import replace

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec


def local_layer_spec(qk_layernorm: bool, core_attention: type) -> ModuleSpec:
    """megatron's local (plain PyTorch) layer spec with RMSNorm, `core_attention` in place of its attention.

    megatron's local DotProductAttention supports neither packed (THD) sequences nor context parallelism.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention_submodules = replace(attention.submodules, core_attention=core_attention)
    self_attention = replace(attention, submodules=attention_submodules)
    return replace(spec, submodules=replace(spec.submodules, self_attention=self_attention))


def transformer_engine_layer_spec(qk_layernorm: bool) -> ModuleSpec:
    """Transformer Engine layer spec (fused norms, TE attention with THD and context parallel); GPU only."""
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    except ImportError as error:  # pragma: no cover - only on a GPU machine without TE
        raise ImportError(
            "the GPU path needs Transformer Engine: pip install 'megatron-dapo[gpu]' "
            "(transformer-engine[pytorch])"
        ) from error


@contextlib.contextmanager
def output_layer_skipped(model: GPTModel) -> Iterator[None]:
    """Within this block the last stage returns final-norm hidden states [s, b, h] instead of logits.

    GPTModel returns the decoder output (final norm applied by the decoder) when `post_process` is False; the
    attribute is read only in forward, in 0.16 and in newer releases alike.
    """
    post_process = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = post_process
