"""Named tensors of mixed dtypes and awkward sizes, for the weight payload tests."""

import torch


def mixed_named_tensors(generator: torch.Generator, *, views: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Tensors whose byte sizes misalign each other; `views` adds a strided view and a 0-d tensor."""
    named = [
        ("model.embed_tokens.weight", torch.randn(7, 4, generator=generator)),
        ("model.norm.weight", torch.randn(5, generator=generator).to(torch.bfloat16)),  # 10 bytes: misaligns
        ("model.layers.0.mlp.counts", torch.randint(0, 100, (2, 3), generator=generator)),
        ("model.layers.0.self_attn.o_proj.weight", torch.randn(3, 2, generator=generator).to(torch.float16)),
        ("empty", torch.zeros(0, 4)),
    ]
    if views:
        named.append(("strided_view", torch.randn(3, 4, generator=generator)[:, 1:3]))
        named.append(("scalar", torch.randn((), generator=generator, dtype=torch.float64)))
    return named
