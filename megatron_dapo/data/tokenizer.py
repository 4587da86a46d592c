"""Load a tokenizer directory the way it was saved, so every process tokenizes alike."""

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `directory` (a Hugging Face model directory).

    A tokenizer saved as a plain `tokenizers` backend (the demo's) is loaded as saved: beside a qwen2
    config.json, transformers 5's AutoTokenizer would rebuild it as Qwen2's byte-level tokenizer, which maps
    the demo's spaces to nothing.
    """
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
