"""The demo tokenizer: character round trip, special tokens, and an offline AutoTokenizer directory."""

import string
from pathlib import Path

from transformers import AutoTokenizer

from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.demo.arithmetic import ArithmeticTask, generate_problems, response_text
from megatron_dapo.demo.tokenizer import CHAT_TEMPLATE, build_demo_tokenizer, save_demo_tokenizer


def test_round_trip_and_one_token_per_character() -> None:
    tokenizer = build_demo_tokenizer()
    texts = [string.digits + string.ascii_letters + string.punctuation + " \n", "Answer: -42\n"]
    texts += [r.problem + "\n" + response_text(r) for r in generate_problems(ArithmeticTask(), 50, seed=0)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_special_tokens_and_unknown_characters() -> None:
    tokenizer = build_demo_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<|pad|>", "<|end|>"]
    assert tokenizer("é\t", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id] * 2
    ids = tokenizer("<|user|>7<|end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tokenizer.decode(ids, skip_special_tokens=True) == "7"
    assert len(tokenizer) == 6 + 96


def test_saved_directory_loads_offline_with_auto_tokenizer(tmp_path: Path) -> None:
    directory = save_demo_tokenizer(tmp_path / "tok")
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    built = build_demo_tokenizer()
    text = "<|user|>3*4-5<|end|><|assistant|>Answer: 7<|end|>"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "3*4-5"}]
    rendered = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>3*4-5<|end|><|assistant|>"
    assert (loaded.pad_token, loaded.eos_token, loaded.unk_token) == ("<|pad|>", "<|end|>", "<|unk|>")


def test_load_tokenizer_keeps_the_demo_tokenizer_beside_a_qwen2_config(tmp_path: Path) -> None:
    # A model directory: the tokenizer next to a qwen2 config.json, as the demo's warm-started model has it.
    directory = save_demo_tokenizer(tmp_path / "model")
    (directory / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    text = "3*4-5=7\nAnswer: 7"
    assert load_tokenizer(directory).encode(text) == build_demo_tokenizer().encode(text)
