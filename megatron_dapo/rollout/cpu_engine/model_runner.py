"""The Hugging Face model behind the CPU engine: prompt prefill, batched decode over one KV cache, weights.

The running batch shares one transformers DynamicCache whose rows are left-padded: row i's tokens fill the
last lengths[i] positions, padding keys and values are zeros and masked out, and positions are passed
explicitly, so every row computes what it would alone (up to float rounding). Prompts are prefilled one at a
time, unpadded, and kept in a small prompt cache, so the n samples of a prompt share one prefill.

Needs transformers >= 4.56 (cache layers exposed as `DynamicCache.layers`). Everything here runs on the
engine's single model thread; nothing is thread-safe.
"""

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from megatron_dapo.rollout.sglang_protocol import ProtocolError

PROMPT_CACHE_PROMPTS = 64  # prompts kept after prefill; a DAPO step reuses each one for its n samples


@dataclass(frozen=True)
class Prefill:
    """A prompt after its forward pass."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, prompt_len, head_dim]
    logits: torch.Tensor  # [vocab] next-token logits after the prompt


class ModelRunner:
    def __init__(
        self,
        model_path: str,
        dtype: torch.dtype,
        context_length: int | None,
        allow_weight_cast: bool = False,
    ):
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.vocab_size = (
            self.model.get_output_embeddings().out_features
        )  # logits width, padding rows included
        self.context_length = context_length or self.model.config.max_position_embeddings
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        forward_parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_parameters else "past_key_values"
        self._prompt_cache: OrderedDict[tuple[int, ...], Prefill] = OrderedDict()
        self._cache: DynamicCache | None = None
        self._lengths: list[int] = []  # tokens held in the cache, per row
        self._released_shapes: list[tuple[torch.nn.Parameter, torch.Size]] = []
        # Weight updates in another dtype: cast (--allow-weight-cast) or refused, as a sign of a wrong sender.
        self.allow_weight_cast = allow_weight_cast

    @property
    def num_rows(self) -> int:
        return len(self._lengths)

    @torch.inference_mode()
    def prefill(self, prompt: tuple[int, ...], remember: bool = True) -> tuple[Prefill, bool]:
        """The prompt's KV and next-token logits, and whether they came from the prompt cache; remember=False
        leaves the cache alone (a retracted sequence's prompt + partial output is not asked for twice)."""
        if remember and prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt], True
        cache = DynamicCache()
        output = self.model(
            input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache}
        )
        prefill = Prefill(
            kv=[(layer.keys, layer.values) for layer in cache.layers], logits=output.logits[0, -1]
        )
        if not remember:
            return prefill, False
        self._prompt_cache[prompt] = prefill
        if len(self._prompt_cache) > PROMPT_CACHE_PROMPTS:
            self._prompt_cache.popitem(last=False)
        return prefill, False

    def flush_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def add_rows(self, prefills: list[Prefill]) -> None:
        """Append one batch row per prefill, left-padding old and new rows to a common cache length."""
        if not prefills:
            return
        old_length = self._cache.layers[0].keys.shape[2] if self._cache is not None else 0
        new_length = max(old_length, *(prefill.kv[0][0].shape[2] for prefill in prefills))
        cache = DynamicCache()
        for layer_index in range(len(prefills[0].kv)):
            keys, values = [], []
            if self._cache is not None:
                layer = self._cache.layers[layer_index]
                keys.append(_left_pad(layer.keys, new_length))
                values.append(_left_pad(layer.values, new_length))
            keys += [_left_pad(prefill.kv[layer_index][0], new_length) for prefill in prefills]
            values += [_left_pad(prefill.kv[layer_index][1], new_length) for prefill in prefills]
            cache.update(torch.cat(keys), torch.cat(values), layer_index)
        self._cache = cache
        self._lengths += [prefill.kv[0][0].shape[2] for prefill in prefills]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every other row, then the leading cache columns that are padding in all rows left."""
        self._lengths = [self._lengths[row] for row in rows]
        if not rows:
            self._cache = None
            return
        index = torch.tensor(rows)
        start = self._cache.layers[0].keys.shape[2] - max(self._lengths)
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits [rows, vocab]."""
        cache_length = self._cache.layers[0].keys.shape[2]
        lengths = torch.tensor(self._lengths)
        columns = torch.arange(cache_length + 1)
        # Row i attends to its last lengths[i] cached tokens and to the new one.
        attention_mask = (columns[None, :] >= cache_length - lengths[:, None]).long()
        output = self.model(
            input_ids=torch.tensor(tokens)[:, None],
            attention_mask=attention_mask,
            position_ids=lengths[:, None],
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        )
        self._lengths = [length + 1 for length in self._lengths]
        return output.logits[:, -1]

    def reset_batch(self) -> None:
        self._cache, self._lengths = None, []

    @torch.inference_mode()
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model; check every name, shape, dtype and value before
        copying any, so that a refused update leaves the model as it was."""
        if self._released_shapes:
            raise ProtocolError("weights", "weights are released: call /resume_memory_occupation first")
        targets = self.model.state_dict()
        for name, tensor in named_tensors:
            self._check_weight(name, tensor, targets)
        for name, tensor in named_tensors:
            targets[name].copy_(tensor)
        self.flush_prompt_cache()

    def _check_weight(self, name: str, tensor: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        if name not in targets:
            raise ProtocolError(name, f"not a parameter of the model (it has e.g. {next(iter(targets))})")
        target = targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ProtocolError(name, f"shape {tuple(tensor.shape)} != the model's {tuple(target.shape)}")
        if tensor.dtype != target.dtype and not self.allow_weight_cast:
            raise ProtocolError(
                name,
                f"dtype {tensor.dtype} != the model's {target.dtype}: send the engine's --dtype, or start "
                "the engine with --allow-weight-cast",
            )
        if target.is_floating_point() and tensor.numel() and not _finite(tensor.to(target.dtype)):
            raise ProtocolError(name, "holds non-finite values (inf or NaN)")

    def release_weights(self) -> None:
        """Free the parameters' memory; their values are lost until weights are pushed again, as in SGLang."""
        if self._released_shapes:
            return
        self.flush_prompt_cache()
        self._released_shapes = [(parameter, parameter.shape) for parameter in self.model.parameters()]
        for parameter, _ in self._released_shapes:
            parameter.data = torch.empty(0, dtype=parameter.dtype)

    def resume_weights(self) -> None:
        """Reallocate the parameters, zero-filled: the trainer pushes the real values next."""
        for parameter, shape in self._released_shapes:
            parameter.data = torch.zeros(shape, dtype=parameter.dtype)
        self._released_shapes = []


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in the model's dtype (so a cast that overflows is caught too).

    min and max propagate NaN and hold any inf: one pass, 15x faster than isfinite() on bf16 here.
    """
    low, high = torch.aminmax(tensor)
    return bool(low.isfinite() and high.isfinite())


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [batch, heads, seq, head_dim] on the left of the sequence dimension up to `length`."""
    return F.pad(tensor, (0, 0, length - tensor.shape[2], 0))
