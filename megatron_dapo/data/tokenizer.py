"""Load a tokenizer directory the way it was saved, so every process tokenizes alike."""

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_dapo.checkpoint.meta import META_FILE, hf_assets_dir

# A directory saved by save_pretrained has one of these; without either, AutoTokenizer's error names neither.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _tokenizer_dir(path: Path) -> Path:
    """The directory holding the tokenizer of `path`: a Megatron checkpoint of this project keeps it in hf/,
    so it needs no conversion; a Hugging Face model or tokenizer directory holds its own."""
    path = Path(path)
    directory = hf_assets_dir(path) if (path / META_FILE).is_file() else path
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)} in {directory}): give a Hugging Face "
            f"model or tokenizer directory, or a Megatron checkpoint of this project ({META_FILE})"
        )
    return directory


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path` (a Hugging Face directory, or a Megatron checkpoint of this project).

    A tokenizer saved as a plain `tokenizers` backend (the demo's) is loaded as saved: beside a qwen2
    config.json, transformers 5's AutoTokenizer would rebuild it as Qwen2's byte-level tokenizer, which maps
    the demo's spaces to nothing.
    """
    directory = _tokenizer_dir(path)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
