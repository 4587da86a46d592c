"""The CPU engine's batched KV cache against Hugging Face's own forward pass, and its weight loading."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.sglang_protocol import ProtocolError
from tests.helpers.tiny_models import save_tiny_qwen2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@torch.inference_mode()
def _reference_next_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def test_rows_joining_and_leaving_match_unbatched_forwards(model_dir):
    """Rows of different lengths join at different steps and leave early; every row's logits stay exact."""
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 64, (length,), generator=generator).tolist() for length in (3, 9, 5)]

    def check(rows: list[list[int]], logits: torch.Tensor) -> None:
        for row, tokens in enumerate(rows):
            assert torch.allclose(logits[row], _reference_next_logits(reference, tokens), atol=1e-5)

    def join(tokens: list[int]) -> torch.Tensor:
        prefill, _ = runner.prefill(tuple(tokens))
        runner.add_rows([prefill])
        return prefill.logits

    rows = [sequences[0]]
    check(rows, join(sequences[0])[None])
    for step in range(6):
        if step == 2:  # a longer prompt joins a batch already decoding
            rows.append(sequences[1])
            join(sequences[1])
        if step == 3:  # two rows join at once
            rows += [sequences[2], list(sequences[2])]
            join(sequences[2])
            join(sequences[2])
        if step == 4:  # the first row leaves
            runner.keep_rows(list(range(1, len(rows))))
            rows = rows[1:]
        new_tokens = torch.randint(0, 64, (len(rows),), generator=generator).tolist()
        for tokens, token in zip(rows, new_tokens, strict=True):
            tokens.append(token)
        check(rows, runner.decode(new_tokens))
    assert runner.num_rows == len(rows)


def test_prompt_cache_is_shared_and_flushed(model_dir):
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    first, cached = runner.prefill((1, 2, 3))
    again, cached_again = runner.prefill((1, 2, 3))
    assert not cached and cached_again and again is first
    runner.flush_prompt_cache()
    assert runner.prefill((1, 2, 3))[1] is False


def test_weight_loading(model_dir):
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    other = AutoModelForCausalLM.from_pretrained(save_tiny_qwen2(model_dir.parent / "other", seed=1))
    runner.load_weights(list(other.state_dict().items()))
    for name, tensor in other.state_dict().items():
        assert torch.equal(runner.model.state_dict()[name], tensor)
    with pytest.raises(ProtocolError, match=r"model\.nope\.weight"):
        runner.load_weights([("model.nope.weight", torch.zeros(1))])
    norm = runner.model.state_dict()["model.norm.weight"].clone()
    with pytest.raises(ProtocolError, match="shape"):
        runner.load_weights([("model.norm.weight", torch.zeros(3)), ("lm_head.weight", torch.zeros(64, 32))])
    assert torch.equal(runner.model.state_dict()["model.norm.weight"], norm)  # nothing copied on error
    runner.release_weights()
    assert all(parameter.numel() == 0 for parameter in runner.model.parameters())
    with pytest.raises(ProtocolError, match="released"):
        runner.load_weights(list(other.state_dict().items()))
    runner.resume_weights()
    runner.load_weights(list(other.state_dict().items()))
    prefill, _ = runner.prefill((4, 5))
    assert torch.allclose(prefill.logits, _reference_next_logits(other, [4, 5]), atol=1e-5)


def test_weights_of_another_dtype_or_not_finite_are_refused_unless_cast_is_allowed(model_dir):
    """An update in another dtype is refused (the sender is misconfigured) unless the engine was started with
    --allow-weight-cast; non-finite values always, also those a cast makes; a refusal copies nothing."""
    generator = torch.Generator().manual_seed(3)
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    state = runner.model.state_dict()
    before = {name: tensor.clone() for name, tensor in state.items()}
    update = [(name, torch.randn(tensor.shape, generator=generator)) for name, tensor in state.items()]
    halved = [(name, tensor.to(torch.bfloat16)) for name, tensor in update]
    with pytest.raises(ProtocolError, match=r"model\.embed_tokens\.weight: dtype torch.bfloat16 .*--allow"):
        runner.load_weights(halved)
    for position in (0, len(update) - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            poisoned = [(name, tensor.clone()) for name, tensor in update]
            poisoned[position][1].view(-1)[5] = bad
            with pytest.raises(ProtocolError, match=f"{poisoned[position][0]}: holds non-finite"):
                runner.load_weights(poisoned)
    assert all(torch.equal(state[name], tensor) for name, tensor in before.items())

    casting = ModelRunner(str(model_dir), torch.float16, context_length=None, allow_weight_cast=True)
    overflow = [(name, tensor * 1e6) for name, tensor in update]  # finite in float32, inf in float16
    with pytest.raises(ProtocolError, match="non-finite"):
        casting.load_weights(overflow)
    casting.load_weights(halved)
    for name, tensor in halved:
        assert torch.equal(casting.model.state_dict()[name], tensor.to(torch.float16))
